"""Training throughput of our TSDAE against sentence-transformers' (the issue "Performance").

    python -m benchmarks.training                 # CPU: ours vs the reference, fp32 (+ ours in bf16), batch 8
    python -m benchmarks.training --device cuda   # GPU: our step on a BERT-base-sized model in bf16

CPU (default), about 15 minutes on an idle 2-core machine. Both implementations start from the same
weights (the packaged all-MiniLM-L6-v2, CLS pooling, the decoder tied to the encoder; the reference's
decoder-only cross-attention gets our initial values) and train on the same sentences of the corpus with
the same noise (pipeline.noise, 0.6 of the words *deleted*; sentence-transformers' example keeps 0.6
instead), batch 8, AdamW lr 3e-5 constant, one pass over the sentences each, in alternating chunks of
steps. The reference is its DenoisingAutoEncoderLoss in the loop its SentenceTransformerTrainer runs
(random batches, fused AdamW: the HF Trainer's default optimizer on torch >= 2.8); the trainer itself
needs `datasets` and `accelerate`, which this project does not install. Ours is the train loop's own
step (tsdae.train.train_step: TSDAE.forward, backward, fused AdamW) on batches as the pipeline pads
them, built length-aware. Tokenization is done up front for both: it is not part of either step.

Before the timed pass every side runs one untimed forward and backward pass on its longest batch (no
optimizer step: the weights do not change), so the timing is a long run's steady state.

Each implementation runs in a process of its own, so each has its own process settings: ours calls
tsdae.model.fast.allocator.retain_freed_memory() as the train loop does on CPU; the reference keeps the C
library's defaults, as its users run it. On a CPU with native bf16 (AVX-512 BF16 or AMX) a third
process trains ours in bf16 autocast (what ``train.precision: auto`` picks there) from the same weights
on the same sentences; elsewhere bf16 is emulated and that side is skipped, with the reason.

Then a short alternating ablation measures what each change contributes (same sentences per round),
and STS-B test (CLS pooling) is scored before and after training. MFU = counted model FLOPs per
sentence (tsdae.train.flops) × sentences/s ÷ the fp32 matmul peak measured between the chunks (bf16: ÷ the
bf16 peak). The peak is the best library's: torch.mm (MKL) and, on CPU in fp32, oneDNN, which our
linear layers use (tsdae.model.fast.linear) and which on AMD CPUs measures about twice MKL's. step_breakdown
(benchmarks.step_breakdown) says where our fp32 step's time goes, and the MFU each part leaves in reach.

GPU (--device cuda): our step only (no Ray), a randomly initialised BERT-base-sized model (12 layers,
hidden 768), bf16 autocast, reporting tokens/s and MFU against the bf16 matmul peak of the same GPU.

The last line of output is one JSON object; it is also written to --out.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile

import torch
from transformers import AutoTokenizer, BertConfig, BertModel
from transformers.utils import logging as hf_logging

from benchmarks.ablation import VARIANTS, variants
from benchmarks.batches import CORPUS, MODEL, corpus_batches, token_counts
from benchmarks.publish import load_average, machine, publish
from benchmarks.sides import Remote
from benchmarks.steps import build_ours, make_optimizer, ours_step, run_steps
from tsdae.device import native_bf16
from tsdae.model import resolve_model_path
from tsdae.train import Shape, linear_shapes, matmul_peak_flops, training_flops

BF16_SKIPPED = ("this CPU has no native bf16 (AVX-512 BF16 or AMX): bf16 is emulated there, far slower than fp32, "
                "and train.precision: auto trains fp32")


# ---------------------------------------------------------------------------------------------------
# The two benchmarks.


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


def build_random_tsdae(config_kwargs: dict, tokenizer_path: str):
    """A TSDAE of the given BERT size with random weights, through build_tsdae (saved to a temp dir)."""
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
        BertModel(BertConfig(vocab_size=tokenizer.vocab_size, **config_kwargs)).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        return build_ours(0, tmp)


BERT_BASE = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072}


def run_device(args, config_kwargs: dict = BERT_BASE) -> dict:
    """Our step alone on args.device, in bf16 autocast: tokens/s and MFU against the bf16 matmul peak."""
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    model_path = resolve_model_path(args.model)
    n = args.steps * args.batch_size
    model, tokenizer = build_random_tsdae(config_kwargs, model_path)
    model.to(device).train()
    pad_id = tokenizer.pad_token_id
    batches = [b.to(device) for b in corpus_batches(args.corpus, n, model_path, args.del_ratio, args.seed,
                                                    args.batch_size, pad_id)]
    optimizer = make_optimizer(model.parameters(), args.lr, fused=True)
    step = ours_step(torch.compile(model, dynamic=True) if args.compile else model, optimizer, bf16=True)
    warm = max(1, len(batches) // 10)
    run_steps(step, batches[:warm], sync)
    peaks, rates, token_rates, flops_rates = [], [], [], []
    shape = Shape.of(model.encoder.config)
    timed = batches[warm:]
    for start in range(0, len(timed), args.chunk):
        chunk = timed[start:start + args.chunk]
        peaks.append(matmul_peak_flops(device, torch.bfloat16, n=args.peak_n, layers=linear_shapes(model),
                                       rows=args.batch_size * 32))
        seconds, losses = run_steps(step, chunk, sync)
        noisy_len, target_len = token_counts(chunk, pad_id)
        rates.append(len(target_len) / seconds)
        token_rates.append(sum(target_len) / seconds)
        flops_rates.append(training_flops(shape, noisy_len, target_len) / seconds)
        print(f"[bench] {device.type}: {token_rates[-1]:.0f} tokens/s, loss {losses[-1]:.3f}", flush=True)
    peak = statistics.median(peaks)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else machine()["cpu"]
    return {
        "benchmark": "training",
        "device": device.type,
        "machine": machine() | {"accelerator": name},
        "ours_sentences_per_s": statistics.median(rates),
        "ours_tokens_per_s": statistics.median(token_rates),
        "mfu": statistics.median(flops_rates) / peak,
        "peak_gflops": peak / 1e9,
        "peak_dtype": "bfloat16",
        "settings": {"model": "random BERT " + str(config_kwargs), "batch_size": args.batch_size,
                     "steps": len(batches), "warmup_steps": warm, "dtype": "bfloat16 autocast",
                     "compile": args.compile, "command": "python -m benchmarks.training " + " ".join(args.argv)},
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu: ours vs the reference; cuda: our step, BERT-base, bf16")
    p.add_argument("--sentences", type=int, default=1600, help="training sentences (one pass each)")
    p.add_argument("--steps", type=int, default=None, help="cap on steps (CPU: default one pass; cuda: 200)")
    p.add_argument("--batch-size", type=int, default=None, help="default 8 on CPU, 64 on cuda")
    p.add_argument("--chunk", type=int, default=20, help="steps per alternating chunk")
    p.add_argument("--eval-sentences", type=int, default=128, help="held-out sentences for the final loss")
    p.add_argument("--ablation-rounds", type=int, default=5, help="0 to skip the ablation")
    p.add_argument("--ablation-steps", type=int, default=9, help="steps per variant per round (1 is warm-up)")
    p.add_argument("--breakdown-steps", type=int, default=20,
                   help="steps timed, then profiled, for where our fp32 step's time goes (0 to skip)")
    p.add_argument("--compile", action="store_true",
                   help="add torch.compile to the ablation (its rounds include compiling; benchmarks.compile_step "
                        "times it after compiling)")
    p.add_argument("--no-stsb", dest="stsb", action="store_false", help="skip the STS-B test scores")
    p.add_argument("--lr", type=float, default=3e-5)
    p.add_argument("--del-ratio", type=float, default=0.6, help="fraction of words deleted")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, one per core)")
    p.add_argument("--corpus", default=CORPUS)
    p.add_argument("--model", default=MODEL, help="the base model (CPU) or the tokenizer (--device cuda)")
    p.add_argument("--peak-n", type=int, default=None,
                   help="size of the n^3 product the matmul peak is timed on (default 2048 on CPU, 8192 on cuda)")
    p.add_argument("--bf16", choices=["auto", "on", "off"], default="auto",
                   help="the CPU comparison's bf16 side: auto = only where the CPU has native bf16")
    p.add_argument("--sts-dir", default="data/sts")
    p.add_argument("--out", default=None, help="write the JSON here (default benchmarks/results/training-<device>.json)")
    args = p.parse_args(argv)
    args.argv = list(argv) if argv is not None else __import__("sys").argv[1:]
    if args.batch_size is None:
        args.batch_size = 8 if args.device == "cpu" else 64
    if args.device != "cpu" and args.steps is None:
        args.steps = 200
    if args.peak_n is None:
        args.peak_n = 2048 if args.device == "cpu" else 8192
    args.bf16 = args.bf16 == "on" or (args.bf16 == "auto" and native_bf16(torch.device("cpu")))
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.threads:
        torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()  # the decoder's freshly initialised cross-attention is expected
    result = run_cpu(args) if args.device == "cpu" else run_device(args)
    return publish(result, args.out or f"benchmarks/results/training-{args.device}.json")


if __name__ == "__main__":
    main()
