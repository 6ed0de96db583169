"""Run TSDAE end to end: read the corpus → evaluate the base model → train → evaluate → report.

    python -m jobs.run --config configs/demo.yaml
    ray job submit --working-dir . -- python -m jobs.run --config configs/cluster.yaml

Exit codes: 0 success, 2 bad config, 3 bad corpus, 4 training failed, 5 evaluation failed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

EXIT_CONFIG, EXIT_DATA, EXIT_TRAIN, EXIT_EVAL = 2, 3, 4, 5

log = logging.getLogger("tsdae")


def _stage(name: str) -> None:
    log.info("=== stage: %s", name)


def _evaluate_task(model_ref, pooling: str, eval_cfg, subdir: str | None = None) -> dict:
    """Runs inside a Ray task: fetch the model (a path, a package model or a checkpoint) and score it."""
    import torch

    from tsdae.encode import evaluate_model_dir
    from tsdae.paths import resolve_model_path

    device = "cuda" if eval_cfg.num_gpus and torch.cuda.is_available() else "cpu"
    if device == "cpu":
        torch.set_num_threads(max(1, int(eval_cfg.num_cpus)))
    if isinstance(model_ref, str):
        return evaluate_model_dir(resolve_model_path(model_ref), pooling, eval_cfg, device=device)
    with model_ref.as_directory() as d:  # a ray.train.Checkpoint, local or in cloud storage
        return evaluate_model_dir(str(Path(d) / subdir), pooling, eval_cfg, device=device)


def evaluate(model_ref, pooling: str, eval_cfg, subdir: str | None = None) -> dict:
    """Score a model on the STS suite in a Ray task with the evaluation stage's own resources."""
    import ray

    task = ray.remote(_evaluate_task).options(num_cpus=eval_cfg.num_cpus, num_gpus=eval_cfg.num_gpus)
    return ray.get(task.remote(model_ref, pooling, eval_cfg, subdir))


def _log_scores(label: str, result: dict) -> None:
    tasks = ", ".join(f"{t} {r['all']:.2f}" for t, r in result["tasks"].items())
    avg = result.get("avg7_all")
    log.info("%s: %s%s", label, tasks, f" | 7-task avg {avg:.2f}" if avg is not None else "")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="run config YAML (see configs/)")
    p.add_argument("--name", help="run name (default: the config's name); a UTC timestamp is appended")
    return p.parse_args(argv)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    args = parse_args(argv)
    started = time.perf_counter()

    # 1. Config.
    from jobs.config import ConfigError, load_config

    try:
        cfg = load_config(args.config)
    except ConfigError as e:
        log.error("bad config: %s", e)
        return EXIT_CONFIG
    run_name = f"{args.name or cfg.name}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"
    out_dir = Path(cfg.output_dir) / run_name
    out_dir.mkdir(parents=True, exist_ok=True)
    log.info("run %s → %s", run_name, out_dir)

    # 2. Ray: join the cluster this job was submitted to, or start a local one.
    import ray

    from tsdae.trainer import WORKER_ENV, build_trainer

    os.environ.update({k: os.environ.get(k, v) for k, v in WORKER_ENV.items()})
    local = cfg.ray_address is None and "RAY_ADDRESS" not in os.environ
    ray.init(
        address=cfg.ray_address,
        num_cpus=cfg.scale.local_num_cpus if local else None,
        runtime_env={"env_vars": WORKER_ENV},
    )

    # 3. Corpus: validate every file's schema and count what will be trained on.
    from pipeline import CorpusError, build_train_dataset, corpus_stats
    from tsdae.paths import resolve_model_path

    _stage("read corpus")
    try:
        stats = corpus_stats(cfg.read)
    except CorpusError as e:
        log.error("bad corpus: %s", e)
        return EXIT_DATA
    log.info("corpus %s: %s", cfg.read.uri, stats)
    if stats["rows_kept"] < cfg.scale.num_workers:
        log.error("bad corpus: %d usable rows for %d workers", stats["rows_kept"], cfg.scale.num_workers)
        return EXIT_DATA

    # 4. Base model on STS.
    _stage("evaluate base model")
    before = evaluate(cfg.model.name_or_path, cfg.model.pooling, cfg.eval)
    _log_scores("base", before)

    # 5. Train.
    _stage("train")
    # Ray Data's progress bars redraw many times a second: fine on a terminal, a flood in job logs.
    ray.data.DataContext.get_current().enable_progress_bars = sys.stderr.isatty()
    dataset = build_train_dataset(
        cfg.read, cfg.corrupt, resolve_model_path(cfg.model.name_or_path), epochs=cfg.train.epochs,
        num_actors=cfg.scale.preprocess_actors, cpus_per_actor=cfg.scale.cpus_per_preprocess_actor,
    )
    trainer = build_trainer(
        dataset, model=cfg.model, train=cfg.train, scale=cfg.scale, max_length=cfg.corrupt.max_length,
        rows=stats["rows_kept"], name=run_name, storage_path=cfg.storage_path,
    )
    t_train = time.perf_counter()
    try:
        result = trainer.fit()
    except Exception as e:  # Ray wraps worker errors; the message carries the worker's traceback
        log.error("training failed: %s", e)
        return EXIT_TRAIN
    train_seconds = time.perf_counter() - t_train
    if result.error or result.checkpoint is None:
        log.error("training failed: %s", result.error or "no checkpoint was reported")
        return EXIT_TRAIN

    # 6. Trained model on STS, straight from the final checkpoint (local or cloud storage).
    _stage("evaluate trained model")
    after = evaluate(result.checkpoint, cfg.model.pooling, cfg.eval, subdir="encoder")
    _log_scores("trained", after)

    # 7. Report and export: the encoder, decoder and training record land in the run's directory.
    from tsdae.report import build_report, render_markdown, write_report

    _stage("report")
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(result.checkpoint.to_directory(tmp))
        for item in ("encoder", "decoder", "metrics.jsonl", "summary.json"):
            dest = out_dir / item
            if dest.is_dir():
                shutil.rmtree(dest)
            shutil.move(str(ckpt / item), dest)
    summary = json.loads((out_dir / "summary.json").read_text())
    sentences = sum(summary["rows_trained_per_rank"])
    meta = {
        "run_name": run_name,
        "config": args.config,
        "model": cfg.model.name_or_path,
        "pooling": cfg.model.pooling,
        "corpus": stats,
        "train": {
            **{k: v for k, v in summary.items() if k != "parameter_digests"},
            "seconds": round(train_seconds, 1),
            "sentences": sentences,
            "sentences_per_s": round(sentences / train_seconds, 2),
        },
        "checkpoint": result.checkpoint.path,
        "encoder_dir": str(out_dir / "encoder"),
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    report = build_report(before, after, meta)
    paths = write_report(report, out_dir)
    print(render_markdown(report), flush=True)
    log.info("report: %s; encoder: %s; %.0f s in all", paths, out_dir / "encoder", meta["wall_seconds"])
    if not summary["replicas_identical"]:
        log.error("training replicas diverged: %s", summary["parameter_digests"])
        return EXIT_TRAIN
    return 0


if __name__ == "__main__":
    sys.exit(main())
