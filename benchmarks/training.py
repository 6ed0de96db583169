"""Training throughput of our TSDAE against sentence-transformers' (the issue "Performance").

    python -m benchmarks.training                 # CPU: ours vs the reference, fp32 (+ ours in bf16), batch 8
    python -m benchmarks.training --device cuda   # GPU: ours vs the reference, BERT-base-sized, bf16

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

GPU (--device cuda): ours against the reference on the same GPU, alternating, at 8, 64 and 256 sentences
per batch, on a randomly initialised BERT-base-sized model in bf16 autocast, with torch alone (no Ray):
sentences/s, tokens/s, MFU, peak GPU memory and host syncs per step (benchmarks.training_gpu says how).

The last line of output is one JSON object; it is also written to --out.
"""

from __future__ import annotations

import argparse
import os

import torch
from transformers.utils import logging as hf_logging

from benchmarks.batches import CORPUS, MODEL
from benchmarks.publish import publish
from tsdae.device import native_bf16


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu",
                   help="cpu: ours vs the reference, all-MiniLM-L6-v2; cuda: ours vs the reference, BERT-base, bf16")
    p.add_argument("--sentences", type=int, default=1600, help="training sentences (one pass each)")
    p.add_argument("--steps", type=int, default=None, help="CPU: cap on steps (default one pass)")
    p.add_argument("--batch-size", type=int, default=8, help="CPU: sentences per batch")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 64, 256], help="cuda: sentences per batch")
    p.add_argument("--rounds", type=int, default=5, help="cuda: alternating rounds per batch size")
    p.add_argument("--warmup", type=int, default=10, help="cuda: untimed steps per side per batch size")
    p.add_argument("--tokens", default="benchmarks/data/demo-tokens.npz",
                   help="cuda: the demo corpus, corrupted and tokenized (python -m benchmarks.training_gpu --prepare)")
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
    p.add_argument("--model", default=MODEL, help="CPU: the base model")
    p.add_argument("--peak-n", type=int, default=None,
                   help="size of the n^3 product the matmul peak is timed on (default 2048 on CPU, 8192 on cuda)")
    p.add_argument("--bf16", choices=["auto", "on", "off"], default="auto",
                   help="the CPU comparison's bf16 side: auto = only where the CPU has native bf16")
    p.add_argument("--sts-dir", default="data/sts")
    p.add_argument("--out", default=None, help="write the JSON here (default benchmarks/results/training-<device>.json)")
    args = p.parse_args(argv)
    args.argv = list(argv) if argv is not None else __import__("sys").argv[1:]
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
    # Each device's side imports only what it runs: the GPU side runs on machines with torch alone (no Ray).
    if args.device == "cpu":
        from benchmarks.training_cpu import run_cpu as run
    else:
        from benchmarks.training_gpu import run_device as run
    result = run(args)
    return publish(result, args.out or f"benchmarks/results/training-{args.device}.json")


if __name__ == "__main__":
    main()
