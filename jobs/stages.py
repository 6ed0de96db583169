"""The stages a job is made of, each a function that raises StageError with the job's exit code.

jobs/run.py runs them in order; other jobs (nightly retraining, evaluation only) compose them.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import ray

from jobs.config import (ConfigError, RunConfig, dump_config, load_config, parse_overrides, preflight,
                         shared_disk_problems)
# The exit codes live in jobs.exits; the jobs read them from here too, beside the stages that return them.
from jobs.exits import (EXIT_CONFIG, EXIT_DATA, EXIT_EVAL, EXIT_GATE, EXIT_PROMOTE, EXIT_STOPPED,  # noqa: F401
                        EXIT_STORAGE, EXIT_TRAIN)
from jobs.stop import clear_stop, stop_flag_uri, stop_on_sigterm
from jobs.tracking import Tracker
from pipeline import CorpusError, build_train_dataset, corpus_stats
from tsdae.eval import build_report, evaluate_model, write_charts, write_report
from tsdae.storage import OutputDir, StorageError, storage_cause
from tsdae.train import (VAL_METRIC, Selection, build_trainer, checkpoint, load_validation_history,
                         select_checkpoint, validates)

# What every Ray worker process needs in its environment: tokenizer threads that do not oversubscribe
# the CPUs Ray gave the worker (HF_HUB_OFFLINE is passed on from the driver when it is set there).
WORKER_ENV = {"TOKENIZERS_PARALLELISM": "false", "RAYON_NUM_THREADS": "1"}

log = logging.getLogger("tsdae")


class StageError(RuntimeError):
    """A stage failed; exit_code is what the job's driver exits with."""

    def __init__(self, exit_code: int, message: str):
        super().__init__(message)
        self.exit_code = exit_code


def start_job(config_path: str, check=None, overrides: list[str] = ()) -> RunConfig | int:
    """Set up the job's logging, load its run config with the command line's overrides ("train.lr=1e-4")
    and check what it points at (``preflight``); check(cfg) may raise ConfigError for what one job needs
    beyond that. Returns the config, or, after logging why not, the exit code the job then exits with
    before Ray starts: EXIT_CONFIG for a bad config, EXIT_STORAGE when the store failed while a URI of it
    was checked (missing credentials, access denied: the message names the URI)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        cfg = load_config(config_path, parse_overrides(overrides))
        preflight(cfg, str(config_path))
        if check is not None:
            check(cfg)
    except ConfigError as e:
        log.error("bad config: %s", e)
        return EXIT_CONFIG
    except StorageError as e:
        log.error("%s", e)
        return EXIT_STORAGE
    return cfg


def announce(name: str) -> None:
    log.info("=== stage: %s", name)


def connect_ray(address: str | None, local_num_cpus: int | None = None) -> None:
    """Join the cluster this job was submitted to (or address), else start a local one with
    local_num_cpus logical CPUs (null: the machine's cores)."""
    # Workers get WORKER_ENV (and HF_HUB_OFFLINE when the driver has it) unless the job's own
    # runtime_env already sets a key: Ray refuses a driver runtime_env that repeats a job env var,
    # and a job's env vars are in the driver's environment.
    env = {k: v for k, v in WORKER_ENV.items() if k not in os.environ}
    local = address is None and "RAY_ADDRESS" not in os.environ
    if "HF_HUB_OFFLINE" in os.environ and local:
        env["HF_HUB_OFFLINE"] = os.environ["HF_HUB_OFFLINE"]
    ray.init(address=address, num_cpus=local_num_cpus if local else None,
             runtime_env={"env_vars": env} if env else None)
    # Ray Data's progress bars redraw many times a second: fine on a terminal, a flood in job logs.
    ray.data.DataContext.get_current().enable_progress_bars = sys.stderr.isatty()


def check_cluster_storage(cfg: RunConfig) -> None:
    """After connect_ray, before any stage: refuse (EXIT_CONFIG) local paths that processes on other nodes
    would write and read, on a cluster of more than one alive node (jobs.config.shared_disk_problems)."""
    nodes = sum(1 for node in ray.nodes() if node["Alive"]) if ray.is_initialized() else 1
    problems = shared_disk_problems(cfg, nodes)
    if problems:
        raise StageError(EXIT_CONFIG, "bad config: " + "; ".join(problems))


def storage_failed(error: BaseException) -> bool:
    """Whether a storage failure is error or behind it: a StorageError (Ray re-raises a task's error as an
    instance of its class, or names it in the message of its own), or an OSError of the store itself
    (``tsdae.storage.storage_cause``): Ray Train's own checkpoint and snapshot uploads fail as pyarrow's
    OSError ("AWS Error NETWORK_CONNECTION …"), inside a ControllerError (``controller_failure``) or a
    WorkerGroupError (``worker_failures``)."""
    seen, todo = set(), [error]
    while todo:
        error = todo.pop()
        if error is None or id(error) in seen:
            continue
        seen.add(id(error))
        if isinstance(error, StorageError) or "StorageError:" in str(error):
            return True
        if isinstance(error, OSError) and storage_cause(error) is not None:
            return True
        todo += [error.__cause__, error.__context__, getattr(error, "controller_failure", None),
                 *(getattr(error, "worker_failures", None) or {}).values()]
    return False


def read_stage(cfg: RunConfig) -> dict:
    """Validate every corpus file's schema and count the rows that will be trained on."""
    announce("read corpus")
    try:
        stats = corpus_stats(cfg.read)
    except CorpusError as e:
        raise StageError(EXIT_DATA, f"bad corpus: {e}") from e
    except StorageError as e:
        raise StageError(EXIT_STORAGE, str(e)) from e
    for skipped in stats.get("files_skipped", []):
        log.warning("skipped corpus file: %s", skipped)
    log.info("corpus %s: %s", cfg.read.uri, {k: v for k, v in stats.items() if k != "files_skipped"})
    if stats["rows_kept"] < cfg.scale.num_workers:
        raise StageError(EXIT_DATA, f"bad corpus: {stats['rows_kept']} usable rows for "
                                    f"{cfg.scale.num_workers} workers")
    return stats


def evaluate_stage(label: str, model_ref: str, pooling: str, eval_cfg) -> dict:
    """Score a model (a path, ``package:`` name or fsspec URI; pooling may be "auto") on the STS suite
    (``tsdae.eval.evaluate_model``: actors, a Ray task or this process)."""
    announce(f"evaluate {label}")
    try:
        result = evaluate_model(model_ref, pooling, eval_cfg)
    except Exception as e:
        if storage_failed(e):  # e.g. the model's URI could not be fetched where the evaluation runs
            raise StageError(EXIT_STORAGE, f"evaluation of {label} stopped by a storage failure: {e}") from e
        raise StageError(EXIT_EVAL, f"evaluation of {label} failed: {e}") from e
    tasks = ", ".join(f"{t} {r['all']:.2f}" for t, r in result["tasks"].items() if r["all"] is not None)
    avg = result.get("avg7_all")
    log.info("%s: %s%s", label, tasks, f" | 7-task avg {avg:.2f}" if avg is not None else "")
    return result


def train_stage(cfg: RunConfig, rows: int, run_name: str, callbacks: list | None = None):
    """Stream, corrupt and tokenize the corpus into Ray Train; returns the Ray Train Result. callbacks:
    Ray Train callbacks for the controller (the live MLflow metrics).

    SIGTERM while training (`ray job stop`, a preempted head) asks the workers to checkpoint and stop
    (jobs.stop); the stage then fails with EXIT_STOPPED and the run resumes with `--resume <run name>`.
    """
    announce("train")
    flag = stop_flag_uri(cfg.storage_path, run_name)
    clear_stop(flag)  # a resumed run must not stop on the request that stopped it before
    dataset = build_train_dataset(
        cfg.read, cfg.corrupt, cfg.model.name_or_path, epochs=cfg.train.epochs,  # each actor fetches it
        num_actors=cfg.scale.preprocess_actors, cpus_per_actor=cfg.scale.cpus_per_preprocess_actor,
        resources_per_actor=cfg.scale.resources_per_preprocess_actor,
        batch_size=cfg.train.per_worker_batch(cfg.scale.num_workers)[0],  # length-aware micro-batches
    )
    trainer = build_trainer(
        dataset, model=cfg.model, train=cfg.train, scale=cfg.scale, max_seq_length=cfg.eval.max_length,
        rows=rows, name=run_name, storage_path=cfg.storage_path, stop_flag=flag, eval_cfg=cfg.eval,
        callbacks=callbacks,
    )
    with stop_on_sigterm(flag):
        try:
            result = trainer.fit()
        except Exception as e:  # Ray wraps worker errors; the message carries the worker's traceback
            if storage_failed(e):
                raise StageError(EXIT_STORAGE, f"training stopped by a storage failure: {e}") from e
            raise StageError(EXIT_TRAIN, f"training failed: {e}") from e
    if result.error or result.checkpoint is None:
        raise StageError(EXIT_TRAIN, f"training failed: {result.error or 'no checkpoint was reported'}")
    if (result.metrics or {}).get("stopped"):
        clear_stop(flag)
        raise StageError(EXIT_STOPPED, f"stopped at step {result.metrics['step']}; checkpoint "
                                       f"{result.checkpoint.path}; resume with --resume {run_name}")
    return result


FINAL_ENCODER_DIR = "final_encoder"
# What export_stage writes into a run's output folder, in the order it is put in the bucket.
EXPORTS = (checkpoint.ENCODER_DIR, checkpoint.DECODER_DIR, FINAL_ENCODER_DIR, checkpoint.METRICS_FILE,
           checkpoint.SUMMARY_FILE)


def export_stage(result, selected: Selection, out_dir: Path, cfg: RunConfig) -> dict:
    """Export the run's model (the selected checkpoint) once into the local folder out_dir (``EXPORTS``):
    ``encoder/`` and ``decoder/``, plus ``final_encoder/`` when the selected checkpoint is not the final
    one, and the run's records (``metrics.jsonl``, ``summary.json``) from the final checkpoint. Returns
    the summary."""
    announce(f"export the model of step {selected.step} ({selected.source})")
    final_dir = out_dir / FINAL_ENCODER_DIR
    for stale in (out_dir / checkpoint.ENCODER_DIR, out_dir / checkpoint.DECODER_DIR, final_dir):
        if stale.exists():
            shutil.rmtree(stale)
    checkpoint.export_model(selected.checkpoint, out_dir, cfg.model, cfg.eval.max_length)
    if selected.source == "best_dev":
        checkpoint.copy_encoder(result.checkpoint, final_dir)
    for name in (checkpoint.METRICS_FILE, checkpoint.SUMMARY_FILE):
        (out_dir / name).write_text(checkpoint.read_text(result.checkpoint, name))
    summary = json.loads((out_dir / checkpoint.SUMMARY_FILE).read_text())
    if not summary["replicas_identical"]:
        raise StageError(EXIT_TRAIN, f"training replicas diverged: {summary['parameter_digests']}")
    return summary


def publish_outputs(out: OutputDir, *names: str) -> dict[str, str]:
    """Put the named files and folders of a run's output folder at its URI (``OutputDir.publish``); a
    storage failure fails the job with EXIT_STORAGE. Returns {name: URI}."""
    try:
        return out.publish(*names)
    except StorageError as e:
        raise StageError(EXIT_STORAGE, f"cannot write the run's outputs: {e}") from e


def log_outputs(out: OutputDir) -> None:
    """One log block with the final URI (or path) of every output a job wrote."""
    if out.published:
        log.info("outputs in %s:\n%s", out.uri, "\n".join(f"  {uri}" for uri in out.published.values()))


def run_all(cfg: RunConfig, run_name: str, out: OutputDir, config_label: str, tracker: Tracker | None = None) -> dict:
    """read → evaluate base (and production) → train, validating checkpoints on the dev task → select
    the run's model (best dev score, else the final checkpoint) → export it → evaluate the export →
    report and charts; returns the report. The resolved config is saved first, as config.yaml.
    Before all of it, the cluster's storage check (check_cluster_storage: exit 2 on a bad config).

    out: the run's output folder (a path or a URI): each file is produced in out.local and put at its URI
    as soon as it is complete, so a run that fails later keeps what it had written; the evaluation of the
    export reads it from its URI, as a Ray task on another node would have to.
    tracker: the run's MLflow run (jobs.tracking; None: no tracking): params first, training metrics live
    and reconciled after training, the STS table and the files at the end.
    """
    check_cluster_storage(cfg)
    started = time.perf_counter()
    tracker = tracker or Tracker()
    out_dir = out.local
    config_file = out_dir / "config.yaml"
    config_file.write_text(dump_config(cfg))
    publish_outputs(out, config_file.name)  # the first write: a bucket that cannot be written fails here
    tracker.log_config(cfg)
    stats = read_stage(cfg)
    before = evaluate_stage("base model", cfg.model.name_or_path, cfg.model.pooling, cfg.eval)
    production = None
    if cfg.eval.production_model:  # scored with its own pooling ("auto": tsdae.json / sentence-transformers)
        production = evaluate_stage("production model", cfg.eval.production_model, "auto", cfg.eval)
    validate = validates(cfg.eval)
    t_train = time.perf_counter()
    result = train_stage(cfg, stats["rows_kept"], run_name, tracker.live_callbacks(cfg.storage_path, run_name))
    train_seconds = time.perf_counter() - t_train
    validation = load_validation_history(result.path, result.filesystem) if validate else []
    for record in validation:
        log.info("%s at step %s: %.2f (%.0f s)", record["val_task"], record["val_step"], record[VAL_METRIC],
                 record["val_seconds"])
    selected = select_checkpoint(result, validate)
    summary = export_stage(result, selected, out_dir, cfg)
    publish_outputs(out, *EXPORTS)
    history = [json.loads(line) for line in (out_dir / checkpoint.METRICS_FILE).read_text().splitlines() if line]
    tracker.log_training(history, validation)
    encoder_dir = out_dir / checkpoint.ENCODER_DIR
    label = "trained model" if selected.source == "final" else f"trained model (best dev, step {selected.step})"
    after = evaluate_stage(label, out.uri_of(checkpoint.ENCODER_DIR), cfg.model.pooling, cfg.eval)
    announce("report")
    sentences = sum(summary["rows_trained_per_rank"])
    task = cfg.eval.validation_task if validate else None
    final_encoder = FINAL_ENCODER_DIR if (out_dir / FINAL_ENCODER_DIR).exists() else checkpoint.ENCODER_DIR
    meta = {
        "run_name": run_name,
        "config": config_label,
        "model": cfg.model.name_or_path,
        "pooling": cfg.model.pooling,
        "production_model": cfg.eval.production_model,
        "evaluated_model": selected.describe(task),
        "corpus": stats,
        "train": {
            **{k: v for k, v in summary.items() if k != "parameter_digests"},
            "seconds": round(train_seconds, 1),
            "sentences": sentences,
            "sentences_per_s": round(sentences / train_seconds, 2),
            # rows of the corpus stream not trained on: the incomplete last global batch, max_steps
            "rows_not_trained": stats["rows_kept"] * cfg.train.epochs - sentences if not cfg.train.max_steps else None,
        },
        # "after", encoder/ and decoder/ are the selected checkpoint; metrics.jsonl and summary.json the run's
        "model_selection": {
            "validation": validate,
            "task": task,
            "metric": VAL_METRIC,
            "validations": len(validation),
            "selected": selected.source,
            "selected_step": selected.step,
            "selected_score": selected.score,
            "selected_checkpoint": selected.checkpoint.path,
            "final_step": selected.final_step,
            "final_score": selected.final_score,
            "final_checkpoint": selected.final_checkpoint.path,
        },
        "checkpoint": selected.checkpoint.path,
        "encoder_dir": out.uri_of(checkpoint.ENCODER_DIR),
        "final_encoder_dir": out.uri_of(final_encoder),
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    report = build_report(before, after, meta, production=production, validation=validation)
    paths = write_report(report, str(out_dir))
    paths.update(write_charts(report, str(out_dir), history=history))
    published = publish_outputs(out, *(Path(p).name for p in paths.values()))
    tracker.log_report(report, [config_file, *map(Path, paths.values()), out_dir / checkpoint.METRICS_FILE,
                                out_dir / checkpoint.SUMMARY_FILE], encoder_dir)
    log.info("report: %s; encoder: %s (%s); %.0f s in all", published["report.md"], meta["encoder_dir"],
             meta["evaluated_model"], meta["wall_seconds"])
    return report
