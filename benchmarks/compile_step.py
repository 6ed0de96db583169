"""Our fp32 training step, eager against torch.compile, on CPU: does graph capture raise the MFU?

    python -m benchmarks.compile_step                      # Inductor's defaults
    python -m benchmarks.compile_step --cpp-wrapper        # kernels called from C++, not Python
    python -m benchmarks.compile_step --mode max-autotune-no-cudagraphs

benchmarks.step_breakdown shows that a third of the step is outside the matrix products: elementwise
kernels, copies, dispatch. Capturing the step into a compiled graph is the usual cure. This measures it,
in one process, on the model and sentences of benchmarks.training (all-MiniLM-L6-v2, batch 8, 0.6 of
the words deleted), with our linear layers' products on oneDNN in both (tsdae.model.fast.linear keeps them in the
compiled graph as an opaque op) and dropout masks drawn in the graph when compiled (tsdae.model.fast.dropout):

- fixed: one batch of median size, repeated, compiled for that one shape: the best case for capture
  (no recompiles; the graph breaks only at the packed paths' index selects);
- varying: length-aware batches as training sees them, compiled with dynamic=True.

Eager and compiled passes alternate over the same batches, training the same weights with one
optimizer. Reported per case: ms per step (median of the rounds), compiled ÷ eager, the MFU of each
(counted FLOPs ÷ the fp32 matmul peak measured here), compile seconds, graph breaks, and the eval-mode
loss of both on one batch (they must agree). The last line of output is one JSON object; it is also
written to --out.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch._dynamo
import torch._inductor.config

from transformers.utils import logging as hf_logging

from benchmarks.batches import CORPUS, MODEL, corpus_batches, sample_batches, token_counts
from benchmarks.publish import machine, publish
from benchmarks.steps import build_ours, make_optimizer, ours_step, run_steps
from tsdae.model import resolve_model_path, retain_freed_memory
from tsdae.train import Shape, linear_shapes, matmul_peak_by_library, training_flops


CASES = ("fixed", "varying")


def cases(batches: list, steps: int, seed: int) -> dict[str, list]:
    """{"fixed": one median-size batch, steps times; "varying": a seeded sample of steps batches}."""
    median = sorted(batches, key=lambda b: b.target_ids.numel() + b.noisy_ids.numel())[len(batches) // 2]
    return {"fixed": [median] * steps, "varying": sample_batches(batches, steps, seed)}


def compare(model, optimizer, batches: list, rounds: int, compile_kwargs: dict, flops: float, peak: float) -> dict:
    """Alternate eager and compiled passes over batches; ms per step, MFU and compile cost of each."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    modules = {"eager": model, "compiled": torch.compile(model, **compile_kwargs)}
    steps = {name: ours_step(module, optimizer) for name, module in modules.items()}
    t0 = time.perf_counter()
    run_steps(steps["compiled"], batches)  # compiles (and recompiles) here, untimed
    compile_seconds = time.perf_counter() - t0
    run_steps(steps["eager"], batches)
    ms = {name: [] for name in steps}
    for r in range(rounds):
        for name in (("eager", "compiled") if r % 2 == 0 else ("compiled", "eager")):
            seconds, _ = run_steps(steps[name], batches)
            ms[name].append(1e3 * seconds / len(batches))
    model.eval()
    with torch.no_grad():
        b = batches[0]
        losses = {name: float(module(b.noisy_ids, b.noisy_mask, b.target_ids)) for name, module in modules.items()}
    model.train()
    out = {"steps": len(batches), "compile_and_first_pass_s": compile_seconds,
           "graph_breaks": sum(torch._dynamo.utils.counters["graph_break"].values())}
    for name, runs in ms.items():
        out[f"{name}_ms_per_step"] = statistics.median(runs)
        out[f"{name}_rounds_ms"] = [round(m, 1) for m in runs]
        out[f"{name}_mfu"] = flops / len(batches) / (peak * statistics.median(runs) / 1e3)
        out[f"{name}_eval_loss"] = losses[name]
    out["compiled_over_eager"] = out["eager_ms_per_step"] / out["compiled_ms_per_step"]
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sentences", type=int, default=1600, help="corpus sentences the batches come from")
    p.add_argument("--steps", type=int, default=20, help="batches per pass")
    p.add_argument("--rounds", type=int, default=4, help="timed passes of each, alternating")
    p.add_argument("--cases", default=",".join(CASES), help="comma-separated, of: " + ", ".join(CASES))
    p.add_argument("--mode", default=None, help="torch.compile mode (default: Inductor's defaults)")
    p.add_argument("--cpp-wrapper", action="store_true", help="Inductor calls its kernels from C++")
    p.add_argument("--del-ratio", type=float, default=0.6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--corpus", default=CORPUS)
    p.add_argument("--out", default="benchmarks/results/compile-step-cpu.json")
    args = p.parse_args(argv)
    args.cases = args.cases.split(",")
    unknown = [c for c in args.cases if c not in CASES]
    if unknown:
        p.error(f"--cases: unknown case {unknown[0]!r}; the cases are {', '.join(CASES)}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    hf_logging.set_verbosity_error()
    retain_freed_memory()  # as the train loop does on CPU
    torch._inductor.config.cpp_wrapper = args.cpp_wrapper
    model, tokenizer = build_ours(args.seed)
    batches = corpus_batches(args.corpus, args.sentences, resolve_model_path(MODEL), args.del_ratio, args.seed, 8,
                             tokenizer.pad_token_id)
    model.train()
    optimizer = make_optimizer(model.parameters(), 3e-5, fused=True)
    shape = Shape.of(model.encoder.config)
    peaks = matmul_peak_by_library(torch.device("cpu"), torch.float32, layers=linear_shapes(model))
    peak = max(peaks.values())
    result = {"benchmark": "compile_step", "machine": machine(), "torch": torch.__version__,
              "mode": args.mode, "cpp_wrapper": args.cpp_wrapper, "batch_size": 8,
              "peak_gflops": peak / 1e9, "peak_gflops_by_library": {k: v / 1e9 for k, v in peaks.items()}}
    for name, case in cases(batches, args.steps, args.seed).items():
        if name not in args.cases:
            continue
        kwargs = {"dynamic": name == "varying", "mode": args.mode}
        flops = training_flops(shape, *token_counts(case, tokenizer.pad_token_id))
        result[name] = compare(model, optimizer, case, args.rounds, kwargs, flops, peak)
        print(name, {k: v for k, v in result[name].items() if "ms" in k or k == "compiled_over_eager"}, flush=True)
    result["is"] = ("compiled_over_eager: eager ms / compiled ms (above 1: compiling is faster). *_mfu: counted "
                    "model FLOPs / (peak_gflops x step time). fixed: one shape, the best case for capture")
    return publish(result, args.out)


if __name__ == "__main__":
    main()
