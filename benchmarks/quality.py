"""Quality at the reference's settings: STS-B after TSDAE training, ours (jobs.run, several variants) against
sentence-transformers' own TSDAE (benchmarks.quality_reference), over several seeds, plus ours at the
reference's wall time.

    pip install -e '.[quality]'   # the reference's trainer (datasets, accelerate)
    python -m benchmarks.quality                                  # 2,000 sentences, seeds 0 1 (~70 min, 2 cores)
    python -m benchmarks.quality --sentences 10000 --seeds 0 1 2  # the full slice (a bigger machine)
    python -m benchmarks.quality --variants shuffled --seeds 0 --no-reference --no-equal-time  # one run

Settings (the reference's): all-MiniLM-L6-v2, CLS pooling, deletion 0.6, lr 3e-5 constant, global batch
8 (ours: 2 workers × 4), one epoch, no validation. The slice: every k-th of the first 10,000 sentences of
../shared/data/corpus/sentences.parquet (k = 10,000 / --sentences), in file order, so it keeps the
corpus's layout (5,331 positive movie-review sentences, then negative ones) at any size.
Each run is its own process (ours: `python -m jobs.run`, as a user runs it); a seed sets every random
choice of a run (ours: corrupt.seed, train.seed, read.shuffle_seed; the reference: its noise and the
trainer's seed). Scores: Spearman × 100 on STS-B test and dev (tsdae.eval, the same code for both).

Equal wall time: ours (the default variant, same settings) trains for as many steps as fit in the
reference's training time at ours' measured seconds per step on the slice (the fastest run of each: on
a shared machine, the least disturbed), on a longer stretch of the same corpus when the slice is too
short (the slice's stride at further offsets). Every finished run is also written to <out>.partial.json;
--reuse it to go on after an interruption.
Training time is the trainer's own (ours: the train stage, workers' start-up included; the reference:
trainer.train()); start-up of Ray and evaluation are not counted for either.
The last output line is one JSON object (benchmarks/results/quality-cpu.json keeps a run).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

from benchmarks.publish import load_average, machine, publish

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT.parent / "shared" / "data" / "corpus" / "sentences.parquet"
STS_DIR = ROOT.parent / "shared" / "data" / "sts"
FIRST = 10_000
TASKS = ["STSB-dev", "STSB-test"]

# The reference's settings on our pipeline (configs/demo.yaml otherwise).
SETTINGS = {
    "train.global_batch_size": 8, "train.lr": 3e-5, "train.schedule": "constant", "train.epochs": 1,
    "train.checkpoint_every": 0, "train.report_every": 50, "corrupt.del_ratio": 0.6, "model.pooling": "cls",
    "eval.validation_task": None, "eval.tasks": TASKS, "scale.num_workers": 2,
}
VARIANTS = {
    "file_order": {"read.shuffle_rows": 0},  # the stream as stored (before the shuffle)
    "shuffled": {},  # the default
    "shuffled_clip": {"train.max_grad_norm": 1.0},  # + the reference trainer's gradient clipping
    "shuffled_fp32": {"train.precision": "fp32"},  # + fp32 where "auto" picks bf16 (CPUs with native bf16)
    "shuffled_no_length": {"corrupt.length_window": 0},  # + no length-aware batching
}
DEFAULT_VARIANTS = ["file_order", "shuffled", "shuffled_clip", "shuffled_fp32"]
DEFAULT_VARIANT = "shuffled"


def write_slice(path: Path, sentences: int, offsets: int = 1) -> int:
    """The slice (offset 0) and, for offsets > 1, the further strides of the first 10,000 rows after it."""
    table = pq.read_table(CORPUS, columns=["text"]).slice(0, FIRST)
    stride = max(1, FIRST // sentences)
    rows = [i for offset in range(offsets) for i in range(offset % stride, FIRST, stride)][: sentences * offsets]
    pq.write_table(table.take(rows), path)
    return len(rows)


def run_ours(name: str, corpus: Path, work: Path, seed: int, overrides: dict) -> dict:
    settings = {**SETTINGS, "read.uri": str(corpus), "eval.sts_dir": str(STS_DIR), "output_dir": str(work / "runs"),
                "storage_path": str(work / "ray"), "corrupt.seed": seed, "train.seed": seed,
                "read.shuffle_seed": seed, **overrides}
    args = [f"{k}={json.dumps(v)}" for k, v in settings.items()]
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "jobs.run", "--config", "configs/demo.yaml", "--name", name, *args],
                          cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode:
        raise RuntimeError(f"{name}: jobs.run exited {done.returncode}:\n{done.stderr[-4000:]}")
    report = json.loads(max((work / "runs").glob(f"{name}-*/report.json"), key=os.path.getmtime).read_text())
    train = report["meta"]["train"]
    return {"train_s": train["seconds"], "wall_s": round(wall, 1), "sentences": train["sentences"],
            "steps": train["steps"], **{t: report["after"]["tasks"][t]["all"] for t in TASKS},
            "base": {t: report["before"]["tasks"][t]["all"] for t in TASKS}}


def run_reference(corpus: Path, work: Path, seed: int) -> dict:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "benchmarks.quality_reference", "--corpus", str(corpus),
                           "--seed", str(seed), "--out", str(work / f"reference-{seed}"), "--sts-dir", str(STS_DIR)],
                          cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"reference seed {seed} exited {done.returncode}:\n{done.stderr[-4000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return {"train_s": result["train_s"], "wall_s": round(time.perf_counter() - started, 1),
            "sentences": result["sentences"], **{t: result[t] for t in TASKS}}


def summarize(runs: list[dict]) -> dict:
    out = {"runs": len(runs)}
    for key in (*TASKS, "train_s"):
        values = [r[key] for r in runs]
        out[f"{key}_mean"] = round(statistics.fmean(values), 2)
        out[f"{key}_std"] = round(statistics.stdev(values), 2) if len(values) > 1 else None
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sentences", type=int, default=2000, help="slice size (a divisor of 10,000 keeps it exact)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=list(VARIANTS))
    p.add_argument("--no-reference", action="store_true")
    p.add_argument("--no-equal-time", action="store_true")
    p.add_argument("--keep", action="store_true", help="keep the runs' folders (printed)")
    p.add_argument("--equal-time-seeds", type=int, nargs="+", help="seeds of the equal-time runs (default: --seeds)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "quality-cpu.json"))
    p.add_argument("--reuse", help="runs recorded by an earlier invocation (its <out>.partial.json, written after "
                                   "every run): those (variant, seed) are not run again")
    p.add_argument("--note", default="", help="a remark kept in the JSON (how the machine was used, …)")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = Path(tempfile.mkdtemp(prefix="tsdae-quality-"))
    corpus = work / "slice.parquet"
    write_slice(corpus, args.sentences)
    results: dict[str, list[dict]] = json.loads(Path(args.reuse).read_text()) if args.reuse else {}
    partial = Path(args.out).with_suffix(".partial.json")

    def done(variant: str, seed: int) -> bool:
        return any(r["seed"] == seed for r in results.get(variant, []))

    def record(variant: str, seed: int, run: dict) -> None:
        run = {"seed": seed, **run}
        results.setdefault(variant, []).append(run)
        partial.parent.mkdir(parents=True, exist_ok=True)
        partial.write_text(json.dumps(results, indent=1))
        print(f"{variant:>20} seed {seed}: STS-B test {run['STSB-test']:.2f} dev {run['STSB-dev']:.2f} "
              f"train {run['train_s']:.0f} s ({run['sentences']} sentences)", flush=True)

    # Seed by seed, the variants interleaved: a slow spell on a shared machine hits every variant alike.
    for seed in args.seeds:
        if not args.no_reference and not done("reference", seed):
            record("reference", seed, run_reference(corpus, work, seed))
        for variant in args.variants:
            if not done(variant, seed):
                record(variant, seed, run_ours(f"quality-{variant}-s{seed}", corpus, work, seed, VARIANTS[variant]))

    equal_time = None
    if not args.no_equal_time and not args.no_reference and DEFAULT_VARIANT in results:
        # As many steps as ours' train stage fits in the reference's training time, at ours' seconds per
        # step on the slice (whole stage: start-up included, so the estimate errs against ours). Both the
        # fastest of their runs: on a shared machine, the least disturbed measurement of each.
        budget = min(r["train_s"] for r in results["reference"])
        ours = results[DEFAULT_VARIANT]
        per_step = min(r["train_s"] / r["steps"] for r in ours)
        offsets = max(1, math.ceil(budget / per_step * SETTINGS["train.global_batch_size"] / args.sentences))
        longer = work / "longer.parquet"
        rows = write_slice(longer, args.sentences, offsets)
        steps = min(rows // SETTINGS["train.global_batch_size"], max(1, math.floor(budget / per_step)))
        for seed in args.equal_time_seeds or args.seeds:
            if not done("equal_time", seed):
                record("equal_time", seed, run_ours(f"quality-equal-time-s{seed}", longer, work, seed,
                                                    {**VARIANTS[DEFAULT_VARIANT], "train.max_steps": steps}))
        equal_time = {"budget_train_s": round(budget, 1), "ours_s_per_step": round(per_step, 3), "steps": steps,
                      "sentences": steps * SETTINGS["train.global_batch_size"]}

    summary = {name: summarize(runs) for name, runs in results.items()}
    if "reference" in summary and DEFAULT_VARIANT in summary:
        summary["default_minus_reference_test"] = round(
            summary[DEFAULT_VARIANT]["STSB-test_mean"] - summary["reference"]["STSB-test_mean"], 2)
    if equal_time and "equal_time" in summary:
        summary["equal_time_minus_reference_test"] = round(
            summary["equal_time"]["STSB-test_mean"] - summary["reference"]["STSB-test_mean"], 2)
    for name, s in summary.items():
        print(f"{name}: {s}", flush=True)
    if args.keep:
        print(f"runs kept in {work}", flush=True)
    publish({
        "command": "python -m benchmarks.quality " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d"), "machine": machine(), "load_average_at_end": load_average(),
        "slice": {"source": "first 10,000 rows of sentences.parquet", "stride": max(1, FIRST // args.sentences),
                  "sentences": args.sentences},
        "settings": SETTINGS, "variants": {v: VARIANTS[v] for v in VARIANTS if v in results}, "default": DEFAULT_VARIANT,
        "seeds": args.seeds, "equal_time": equal_time, "summary": summary, "runs": results, "note": args.note,
    }, args.out)


if __name__ == "__main__":
    main()
