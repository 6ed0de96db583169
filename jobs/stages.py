"""The stages a job is made of, each a function that raises StageError with the job's exit code.

jobs/run.py runs them in order; other jobs (nightly retraining, evaluation only) compose them.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from jobs.config import RunConfig

EXIT_CONFIG, EXIT_DATA, EXIT_TRAIN, EXIT_EVAL = 2, 3, 4, 5
EXIT_GATE, EXIT_PROMOTE = 6, 7  # jobs.nightly: candidate rejected; publishing or promotion failed
EXIT_STOPPED = 143  # SIGTERM (`ray job stop`, preemption): checkpointed, resumable with --resume
EXPORTED = ("encoder", "decoder", "metrics.jsonl", "summary.json")

log = logging.getLogger("tsdae")


class StageError(RuntimeError):
    """A stage failed; exit_code is what the job's driver exits with."""

    def __init__(self, exit_code: int, message: str):
        super().__init__(message)
        self.exit_code = exit_code


def announce(name: str) -> None:
    log.info("=== stage: %s", name)


def connect_ray(cfg: RunConfig) -> None:
    """Join the cluster this job was submitted to (or cfg.ray_address), else start a local one."""
    import ray

    from tsdae.trainer import WORKER_ENV

    # Workers get WORKER_ENV (and HF_HUB_OFFLINE when the driver has it) unless the job's own
    # runtime_env already sets a key: Ray refuses a driver runtime_env that repeats a job env var,
    # and a job's env vars are in the driver's environment.
    env = {k: v for k, v in WORKER_ENV.items() if k not in os.environ}
    if "HF_HUB_OFFLINE" in os.environ and cfg.ray_address is None and "RAY_ADDRESS" not in os.environ:
        env["HF_HUB_OFFLINE"] = os.environ["HF_HUB_OFFLINE"]
    local = cfg.ray_address is None and "RAY_ADDRESS" not in os.environ
    ray.init(
        address=cfg.ray_address,
        num_cpus=cfg.scale.local_num_cpus if local else None,
        runtime_env={"env_vars": env} if env else None,
    )
    # Ray Data's progress bars redraw many times a second: fine on a terminal, a flood in job logs.
    ray.data.DataContext.get_current().enable_progress_bars = sys.stderr.isatty()


def read_stage(cfg: RunConfig) -> dict:
    """Validate every corpus file's schema and count the rows that will be trained on."""
    from pipeline import CorpusError, corpus_stats

    announce("read corpus")
    try:
        stats = corpus_stats(cfg.read)
    except CorpusError as e:
        raise StageError(EXIT_DATA, f"bad corpus: {e}") from e
    for skipped in stats.get("files_skipped", []):
        log.warning("skipped corpus file: %s", skipped)
    log.info("corpus %s: %s", cfg.read.uri, {k: v for k, v in stats.items() if k != "files_skipped"})
    if stats["rows_kept"] < cfg.scale.num_workers:
        raise StageError(EXIT_DATA, f"bad corpus: {stats['rows_kept']} usable rows for "
                                    f"{cfg.scale.num_workers} workers")
    return stats


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


def evaluate_stage(label: str, model_ref, pooling: str, eval_cfg, subdir: str | None = None) -> dict:
    """Score a model on the STS suite in a Ray task with the evaluation stage's own resources."""
    import ray

    announce(f"evaluate {label}")
    task = ray.remote(_evaluate_task).options(num_cpus=eval_cfg.num_cpus, num_gpus=eval_cfg.num_gpus)
    try:
        result = ray.get(task.remote(model_ref, pooling, eval_cfg, subdir))
    except Exception as e:
        raise StageError(EXIT_EVAL, f"evaluation of {label} failed: {e}") from e
    tasks = ", ".join(f"{t} {r['all']:.2f}" for t, r in result["tasks"].items())
    avg = result.get("avg7_all")
    log.info("%s: %s%s", label, tasks, f" | 7-task avg {avg:.2f}" if avg is not None else "")
    return result


def train_stage(cfg: RunConfig, rows: int, run_name: str):
    """Stream, corrupt and tokenize the corpus into Ray Train; returns the Ray Train Result.

    SIGTERM while training (`ray job stop`, a preempted head) asks the workers to checkpoint and stop;
    the stage then fails with EXIT_STOPPED and the run resumes with `--resume <run name>`.
    """
    import signal

    from pipeline import build_train_dataset
    from tsdae.paths import resolve_model_path
    from tsdae.trainer import build_trainer, request_stop, stop_flag_uri

    announce("train")
    flag = stop_flag_uri(cfg.storage_path, run_name)
    _clear_stop_flag(flag)  # a resumed run must not stop on the request that stopped it before
    dataset = build_train_dataset(
        cfg.read, cfg.corrupt, resolve_model_path(cfg.model.name_or_path), epochs=cfg.train.epochs,
        num_actors=cfg.scale.preprocess_actors, cpus_per_actor=cfg.scale.cpus_per_preprocess_actor,
        batch_size=cfg.train.per_worker_batch(cfg.scale.num_workers)[0],  # length-aware micro-batches
    )
    trainer = build_trainer(
        dataset, model=cfg.model, train=cfg.train, scale=cfg.scale, max_length=cfg.corrupt.max_length,
        rows=rows, name=run_name, storage_path=cfg.storage_path, stop_flag=flag,
    )

    def on_sigterm(signum, frame):
        log.warning("SIGTERM: asking the workers to checkpoint and stop")
        request_stop(flag)

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        result = trainer.fit()
    except Exception as e:  # Ray wraps worker errors; the message carries the worker's traceback
        raise StageError(EXIT_TRAIN, f"training failed: {e}") from e
    finally:
        signal.signal(signal.SIGTERM, previous)
    if result.error or result.checkpoint is None:
        raise StageError(EXIT_TRAIN, f"training failed: {result.error or 'no checkpoint was reported'}")
    if (result.metrics or {}).get("stopped"):
        _clear_stop_flag(flag)
        raise StageError(EXIT_STOPPED, f"stopped at step {result.metrics['step']}; checkpoint "
                                       f"{result.checkpoint.path}; resume with --resume {run_name}")
    return result


def _clear_stop_flag(flag_uri: str) -> None:
    import fsspec

    fs, path = fsspec.core.url_to_fs(flag_uri)
    if fs.exists(path):
        fs.rm(path)


def export_stage(checkpoint, out_dir: Path) -> dict:
    """Copy the encoder, decoder and training record of the final checkpoint into out_dir."""
    announce("export")
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(checkpoint.to_directory(tmp))
        for item in EXPORTED:
            dest = out_dir / item
            if dest.is_dir():
                shutil.rmtree(dest)
            shutil.move(str(ckpt / item), dest)
    summary = json.loads((out_dir / "summary.json").read_text())
    if not summary["replicas_identical"]:
        raise StageError(EXIT_TRAIN, f"training replicas diverged: {summary['parameter_digests']}")
    return summary


def run_all(cfg: RunConfig, run_name: str, out_dir: Path, config_label: str) -> dict:
    """read → evaluate base → train → evaluate trained → export → report; returns the report."""
    from tsdae.charts import write_charts
    from tsdae.report import build_report, write_report

    started = time.perf_counter()
    stats = read_stage(cfg)
    before = evaluate_stage("base model", cfg.model.name_or_path, cfg.model.pooling, cfg.eval)
    t_train = time.perf_counter()
    result = train_stage(cfg, stats["rows_kept"], run_name)
    train_seconds = time.perf_counter() - t_train
    after = evaluate_stage("trained model", result.checkpoint, cfg.model.pooling, cfg.eval, subdir="encoder")
    summary = export_stage(result.checkpoint, out_dir)
    announce("report")
    sentences = sum(summary["rows_trained_per_rank"])
    available = stats["rows_kept"] * cfg.train.epochs
    meta = {
        "run_name": run_name,
        "config": config_label,
        "model": cfg.model.name_or_path,
        "pooling": cfg.model.pooling,
        "corpus": stats,
        "train": {
            **{k: v for k, v in summary.items() if k != "parameter_digests"},
            "seconds": round(train_seconds, 1),
            "sentences": sentences,
            "sentences_per_s": round(sentences / train_seconds, 2),
            # rows of the corpus stream not trained on: the incomplete last global batch, max_steps
            "rows_not_trained": available - sentences if not cfg.train.max_steps else None,
        },
        "checkpoint": result.checkpoint.path,
        "encoder_dir": str(out_dir / "encoder"),
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    report = build_report(before, after, meta)
    paths = write_report(report, str(out_dir))
    history = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line]
    paths.update(write_charts(report, str(out_dir), history=history))
    log.info("report: %s; encoder: %s; %.0f s in all", paths, out_dir / "encoder", meta["wall_seconds"])
    return report
