"""The CPU side of benchmarks.training: ours against the reference, each side in a process of its own
(benchmarks.sides), alternating chunks over the same sentences, then the ablation and STS-B."""

from __future__ import annotations

import statistics

from benchmarks.ablation import VARIANTS, variants
from benchmarks.publish import load_average, machine
from benchmarks.sides import Remote

BF16_SKIPPED = ("this CPU has no native bf16 (AVX-512 BF16 or AMX): bf16 is emulated there, far slower than fp32, "
                "and train.precision: auto trains fp32")


def run_cpu(args) -> dict:
    load_before = load_average()
    kinds = ["ours", "reference"] + (["ours_bf16"] if args.bf16 else [])
    sides = {kind: Remote(kind, args) for kind in kinds}
    try:
        for side in sides.values():
            side.ready()
        return _compare(args, sides, load_before)
    finally:
        for side in sides.values():
            side.close()


def _compare(args, sides: dict, load_before) -> dict:
    initial = {kind: side.call("initial") for kind, side in sides.items()}
    steps = initial["ours"]["steps"]
    assert all(i["steps"] == steps for i in initial.values()), "every side trains on the same number of batches"
    bf16 = "ours_bf16" in sides

    # Alternating chunks (the order rotates too); the fp32 (and bf16) matmul peaks before each round.
    kinds = list(sides)
    times = {kind: [] for kind in kinds}
    flops = {kind: [] for kind in kinds}  # counted model FLOPs of each chunk's sentences (same formula)
    peaks, peaks_bf16 = [], []
    for r, start in enumerate(range(0, steps, args.chunk)):
        peaks.append(sides["ours"].call("peak"))
        if bf16:
            peaks_bf16.append(sides["ours_bf16"].call("peak"))
        last = {}
        for kind in kinds[r % len(kinds):] + kinds[:r % len(kinds)]:
            result = sides[kind].call("chunk", start)
            times[kind].append(result["seconds"])
            flops[kind].append(result["flops"])
            last[kind] = result["last_loss"]
        print(f"[bench] steps {min(start + args.chunk, steps)}/{steps}: "
              + ", ".join(f"{k} {times[k][-1]:.1f}s loss {last[k]:.3f}" for k in kinds), flush=True)
    # MFU divides by the best library's peak: on AMD CPUs F.linear's (MKL's) is about half of oneDNN's.
    peak = statistics.median(max(p.values()) for p in peaks)
    peak_by_library = {lib: statistics.median(p[lib] for p in peaks) / 1e9 for lib in peaks[0]}
    breakdown = sides["ours"].call("breakdown", peak) if args.breakdown_steps else None

    ablations = None
    if args.ablation_rounds:
        measured = variants(args.compile)
        rates: dict[str, list[float]] = {v: [] for v in measured}
        for rnd in range(args.ablation_rounds):
            for name in (measured if rnd % 2 == 0 else measured[::-1]):
                rates[name].append(sides[VARIANTS[name][0]].call("ablation_round", rnd, name))
        ablations = {v: statistics.median(r) for v, r in rates.items()} | {"_rounds": rates}
    final = {kind: side.call("final") for kind, side in sides.items()}

    sentences = steps * args.batch_size
    rate = {kind: sentences / sum(times[kind]) for kind in kinds}
    # Chunks hold different sentences (ours walks length-sorted windows), so each chunk's ratio compares
    # counted-FLOP rates; over the whole pass both train on exactly the same sentences.
    chunk_ratios = [(fo / to) / (fr / tr) for fo, to, fr, tr
                    in zip(flops["ours"], times["ours"], flops["reference"], times["reference"])]
    flops_per_sentence = sum(flops["ours"]) / sentences
    quality = {}
    if args.stsb:
        quality = {"stsb_test_base": initial["ours"]["stsb_test_base"],
                   "stsb_test_ours": final["ours"]["stsb_test"],
                   "stsb_test_reference": final["reference"]["stsb_test"],
                   "stsb_test_ours_bf16": final["ours_bf16"]["stsb_test"] if bf16 else None}
    peak_bf16 = statistics.median(max(p.values()) for p in peaks_bf16) if bf16 else None
    return {
        "benchmark": "training",
        "device": "cpu",
        "machine": machine(),
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "ours_sentences_per_s": rate["ours"],
        "reference_sentences_per_s": rate["reference"],
        "speedup": rate["ours"] / rate["reference"],
        "speedup_is": "sentences/s over the same sentences (one pass each, alternating chunks)",
        "speedup_median_chunk": statistics.median(chunk_ratios),
        "speedup_median_chunk_is": "median over the alternating chunks of ours/reference counted-model-FLOP/s "
                                   "(chunks hold different sentences); robust to a chunk slowed by other load",
        "speedup_per_chunk": chunk_ratios,
        "mfu": flops_per_sentence * rate["ours"] / peak,
        "reference_mfu": flops_per_sentence * rate["reference"] / peak,
        "ours_bf16_sentences_per_s": rate.get("ours_bf16"),
        "speedup_bf16": rate["ours_bf16"] / rate["reference"] if bf16 else None,
        "mfu_bf16": flops_per_sentence * rate["ours_bf16"] / peak_bf16 if bf16 else None,
        "mfu_bf16_is": "our bf16-autocast step against the bf16 matmul peak of F.linear, measured in the same run",
        "bf16_skipped": None if bf16 else BF16_SKIPPED,
        "peak_gflops_bf16": peak_bf16 / 1e9 if bf16 else None,
        "peak_gflops": peak / 1e9,
        "peak_gflops_is": f"median over rounds of the best library's fp32 {args.peak_n}^3 product on the kernels our "
                          f"linear layers run (peak_gflops_by_library)",
        "peak_gflops_by_library": peak_by_library,
        "peak_gflops_per_chunk": [max(p.values()) / 1e9 for p in peaks],
        "flops_per_sentence": flops_per_sentence,
        "ours_tokens_per_s": rate["ours"] * initial["ours"]["mean_target_tokens"],
        "ours_final_loss": final["ours"]["final_loss"],
        "reference_final_loss": final["reference"]["final_loss"],
        "ours_bf16_final_loss": final["ours_bf16"]["final_loss"] if bf16 else None,
        "final_loss_is": f"mean eval-mode loss over {args.eval_sentences // args.batch_size} held-out batches, "
                         f"the same for both",
        "ours_train_loss_last_steps": final["ours"]["train_loss_last_steps"],
        "reference_train_loss_last_steps": final["reference"]["train_loss_last_steps"],
        "initial_loss_ours": initial["ours"]["initial_loss"],
        "initial_loss_reference": initial["reference"]["initial_loss"],
        **quality,
        "step_breakdown": breakdown,
        "mask_speedup": (ablations["+single_key_cross_attention"] / ablations["explicit_decoder_mask"]
                         if ablations else None),
        "ablation_sentences_per_s": ablations,
        "ablation_is": "median sentences/s per variant over rounds (same sentences per round, variants in "
                       "alternating order); variants up to explicit_decoder_mask run in the reference's process "
                       "(default allocator), the later ones in ours (retain_freed_memory); +bf16_autocast only "
                       "on a CPU with native bf16",
        "padding_reference_batches": final["reference"]["padding"],
        "padding_our_batches": final["ours"]["padding"],
        "settings": {
            "model": args.model, "pooling": "cls", "batch_size": args.batch_size, "steps": steps,
            "sentences": sentences, "chunk": args.chunk, "lr": args.lr, "del_ratio_deleted": args.del_ratio,
            "seed": args.seed, "length_aware": "the pipeline's: windows of length_window x batch_size rows sorted by length",
            "dtype": "float32", "corpus": args.corpus,
            "mean_target_tokens": initial["ours"]["mean_target_tokens"],
            "mean_noisy_tokens": initial["ours"]["mean_noisy_tokens"],
            "ours_process": "tsdae.model.fast.allocator.retain_freed_memory() (as the train loop does on CPU): "
                            f"{initial['ours']['retained_freed_memory']}",
            "reference_process": "default allocator",
            "reference_loop": "DenoisingAutoEncoderLoss + fused AdamW (SentenceTransformerTrainer's default "
                              "optimizer; the trainer itself needs datasets/accelerate, not installed)",
            "ablation_rounds": args.ablation_rounds, "ablation_steps": args.ablation_steps,
            "command": "python -m benchmarks.training " + " ".join(args.argv),
        },
    }
