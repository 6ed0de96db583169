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


def start_job(config_path: str, check=None) -> RunConfig | None:
    """Set up the job's logging and load its run config; check(cfg) may raise ConfigError for what one
    job needs beyond a valid config. Returns None after logging why the config is bad (the job then
    exits with EXIT_CONFIG)."""
    from jobs.config import ConfigError, load_config

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        cfg = load_config(config_path)
        if check is not None:
            check(cfg)
    except ConfigError as e:
        log.error("bad config: %s", e)
        return None
    return cfg


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
    """Runs inside a Ray task: fetch the model (a path, a package model, an fsspec URI or a checkpoint)
    and score it."""
    import torch

    from tsdae.encode import evaluate_model_dir, local_model_dir

    device = "cuda" if eval_cfg.num_gpus and torch.cuda.is_available() else "cpu"
    if device == "cpu":
        torch.set_num_threads(max(1, int(eval_cfg.num_cpus)))
    if isinstance(model_ref, str):
        with local_model_dir(model_ref) as model_dir:
            return evaluate_model_dir(model_dir, pooling, eval_cfg, device=device)
    with model_ref.as_directory() as d:  # a ray.train.Checkpoint, local or in cloud storage
        return evaluate_model_dir(str(Path(d) / subdir), pooling, eval_cfg, device=device)


def evaluate_stage(label: str, model_ref, pooling: str, eval_cfg, subdir: str | None = None) -> dict:
    """Score a model on the STS suite: with eval.actors >= 1 the encoding is spread over that many Ray
    Data model actors (``tsdae.distributed_eval``: every pair is checked to come back exactly once);
    otherwise one Ray task with the evaluation stage's own resources does it all.

    model_ref: a model path, ``package:`` name or fsspec URI, or a ray.train.Checkpoint whose ``subdir``
    holds the encoder. pooling may be "auto" for a model_ref string (read from the model's files).
    """
    import ray

    announce(f"evaluate {label}")
    try:
        if eval_cfg.actors >= 1:
            from tsdae.distributed_eval import evaluate_distributed

            result = evaluate_distributed(model_ref, pooling, eval_cfg, subdir=subdir)
        else:
            task = ray.remote(_evaluate_task).options(num_cpus=eval_cfg.num_cpus, num_gpus=eval_cfg.num_gpus)
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
        rows=rows, name=run_name, storage_path=cfg.storage_path, stop_flag=flag, eval_cfg=cfg.eval,
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


def select_model(result, validate: bool) -> dict:
    """Which checkpoint of a finished run is its model.

    With validation, the kept checkpoint with the best dev score (``tsdae.validation.best_checkpoint``);
    the final checkpoint when it scores at least as well, when no checkpoint was validated, or without
    validation. Returns {"source": "best_dev" | "final", "checkpoint", "step", "score", "final_checkpoint",
    "final_step", "final_score"} (scores: VAL_METRIC, None where not validated).
    """
    from tsdae.validation import VAL_METRIC, best_checkpoint

    final = result.checkpoint
    final_metrics = getattr(result, "metrics", None) or {}
    final_score = final_metrics.get(VAL_METRIC)
    best = best_checkpoint(result) if validate and getattr(result, "best_checkpoints", None) else None
    out = {"source": "final", "checkpoint": final, "step": final_metrics.get("step"), "score": final_score,
           "final_checkpoint": final, "final_step": final_metrics.get("step"), "final_score": final_score}
    if best is None or str(best[0].path) == str(final.path):
        return out
    if final_score is not None and final_score >= best[1][VAL_METRIC]:
        return out  # a tie goes to the final checkpoint
    return {**out, "source": "best_dev", "checkpoint": best[0], "step": best[1].get("step"),
            "score": best[1][VAL_METRIC]}


def export_selected(selected: dict, out_dir: Path, cfg: RunConfig) -> Path | None:
    """After export_stage (the final checkpoint's files): when an earlier checkpoint is the run's model,
    its encoder and decoder replace ``encoder/`` and ``decoder/``, and the final encoder moves to
    ``final_encoder/``. Returns final_encoder/ when written, else None (and removes a stale one)."""
    from tsdae.validation import export_best_decoder, export_best_encoder

    final_dir = out_dir / "final_encoder"
    if final_dir.exists():
        shutil.rmtree(final_dir)
    if selected["source"] != "best_dev":
        return None
    announce(f"export best checkpoint (step {selected['step']})")
    shutil.move(str(out_dir / "encoder"), final_dir)
    export_best_encoder(selected["checkpoint"], out_dir / "encoder", cfg.model, cfg.corrupt.max_length)
    export_best_decoder(selected["checkpoint"], out_dir / "decoder", cfg.model)
    return final_dir


def _describe_selection(selected: dict, task: str | None) -> str:
    def score(value):
        return "not validated" if value is None else f"{value:.2f}"

    if selected["source"] == "best_dev":
        return (f"best {task} checkpoint, step {selected['step']} ({score(selected['score'])}; "
                f"final step {selected['final_step']}: {score(selected['final_score'])})")
    how = f"{task} {score(selected['score'])}" if task else "validation off"
    return f"final checkpoint, step {selected['step']} ({how})"


def run_all(cfg: RunConfig, run_name: str, out_dir: Path, config_label: str) -> dict:
    """read → evaluate base (and production) → train, validating checkpoints on the dev task → evaluate
    the selected checkpoint → export → report and charts; returns the report.

    The run's model (``encoder/``, evaluated as "after") is the checkpoint with the best dev score when
    validation is on (eval.validation_task), else the final one; see select_model and export_selected.
    """
    from tsdae.charts import write_charts
    from tsdae.report import build_report, write_report
    from tsdae.trainer import validation_enabled
    from tsdae.validation import VAL_METRIC, load_validation_history

    started = time.perf_counter()
    stats = read_stage(cfg)
    before = evaluate_stage("base model", cfg.model.name_or_path, cfg.model.pooling, cfg.eval)
    production = None
    if cfg.eval.production_model:  # scored with its own pooling ("auto": tsdae.json / sentence-transformers)
        production = evaluate_stage("production model", cfg.eval.production_model, "auto", cfg.eval)
    validate = validation_enabled(cfg.eval)
    t_train = time.perf_counter()
    result = train_stage(cfg, stats["rows_kept"], run_name)
    train_seconds = time.perf_counter() - t_train
    validation = []
    if validate and getattr(result, "path", None):
        validation = load_validation_history(result.path, getattr(result, "filesystem", None))
        for record in validation:
            log.info("%s at step %s: %.2f (%.0f s)", record["val_task"], record["val_step"], record[VAL_METRIC],
                     record["val_seconds"])
    selected = select_model(result, validate)
    label = "trained model" if selected["source"] == "final" else f"trained model (best dev, step {selected['step']})"
    after = evaluate_stage(label, selected["checkpoint"], cfg.model.pooling, cfg.eval, subdir="encoder")
    summary = export_stage(result.checkpoint, out_dir)
    final_encoder = export_selected(selected, out_dir, cfg)
    announce("report")
    sentences = sum(summary["rows_trained_per_rank"])
    available = stats["rows_kept"] * cfg.train.epochs
    task = cfg.eval.validation_task if validate else None
    meta = {
        "run_name": run_name,
        "config": config_label,
        "model": cfg.model.name_or_path,
        "pooling": cfg.model.pooling,
        "production_model": cfg.eval.production_model,
        "evaluated_model": _describe_selection(selected, task),
        "corpus": stats,
        "train": {
            **{k: v for k, v in summary.items() if k != "parameter_digests"},
            "seconds": round(train_seconds, 1),
            "sentences": sentences,
            "sentences_per_s": round(sentences / train_seconds, 2),
            # rows of the corpus stream not trained on: the incomplete last global batch, max_steps
            "rows_not_trained": available - sentences if not cfg.train.max_steps else None,
        },
        # "after", encoder/ and decoder/ are the selected checkpoint; metrics.jsonl and summary.json the run's
        "model_selection": {
            "validation": validate,
            "task": task,
            "metric": VAL_METRIC,
            "validations": len(validation),
            "selected": selected["source"],
            "selected_step": selected["step"],
            "selected_score": selected["score"],
            "selected_checkpoint": selected["checkpoint"].path,
            "final_step": selected["final_step"],
            "final_score": selected["final_score"],
            "final_checkpoint": selected["final_checkpoint"].path,
        },
        "checkpoint": selected["checkpoint"].path,
        "encoder_dir": str(out_dir / "encoder"),
        "final_encoder_dir": str(final_encoder or out_dir / "encoder"),
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    report = build_report(before, after, meta, production=production, validation=validation)
    paths = write_report(report, str(out_dir))
    history = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line]
    paths.update(write_charts(report, str(out_dir), history=history))
    log.info("report: %s; encoder: %s (%s); %.0f s in all", paths, out_dir / "encoder", meta["evaluated_model"],
             meta["wall_seconds"])
    return report
