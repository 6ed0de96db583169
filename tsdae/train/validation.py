"""Periodic evaluation during training, off the training workers, through Ray Train's validation hook,
and the choice of a run's model from the scores.

The train loop reports a checkpoint with ``validation=ValidationTaskConfig(fn_kwargs={"step": step})``;
Ray Train then runs ``validate_checkpoint`` as a separate Ray task with the evaluation stage's own
resources (``build_validation_config``), merges its metrics into that checkpoint's metrics, and — with
``CheckpointConfig(checkpoint_score_attribute=VAL_METRIC, checkpoint_score_order="max")`` — keeps the
best checkpoint by dev score. The workers never wait for it (at most one validation runs at a time; the
others queue on the controller).

Each validation also writes one small JSON record beside the run's checkpoints
(``<run>/tsdae_validation/step-<step>.json``), because Ray keeps metrics only for the checkpoints it
keeps; ``load_validation_history`` reads them back for the "dev score over steps" chart.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import pyarrow.fs as pafs
import ray.train

from tsdae.device import compute_device
from tsdae.eval import EvalConfig, SentenceEncoder, evaluate_sts, load_tasks
from tsdae.train import checkpoint

VAL_METRIC = "val_spearman"  # Spearman ×100 (``all``) on EvalConfig.validation_task
HISTORY_DIR = "tsdae_validation"


def validates(eval_cfg: EvalConfig | None) -> bool:
    """Whether a run validates its checkpoints during training: an eval config with a validation_task."""
    return eval_cfg is not None and eval_cfg.validation_task is not None


def validate_checkpoint(ckpt, *, base_model: str, pooling: str, sts_dir: str, task: str = "STSB-dev",
                        max_length: int = 128, batch_size: int = 128, precision: str = "auto",
                        num_cpus: float = 1, num_gpus: float = 0, step: int | None = None) -> dict:
    """Ray Train validation function: score a checkpoint's encoder on one STS task.

    Every argument after the checkpoint is JSON-serialisable (Ray passes them as fn_kwargs); ``step``
    comes from the report that carried the checkpoint. Returns
    {VAL_METRIC: all ×100, "val_spearman_wmean", "val_task", "val_step", "val_seconds"} and writes the
    same record to ``<run>/tsdae_validation/``.
    """
    t0 = time.perf_counter()
    device = compute_device(num_gpus, num_cpus)
    model, tokenizer = checkpoint.load_encoder(ckpt, base_model=base_model)
    encoder = SentenceEncoder.from_module(model.to(device), tokenizer, pooling, max_length, batch_size, precision)
    scores = evaluate_sts(encoder.encode, load_tasks(sts_dir, [task]))["tasks"][task]
    record = {VAL_METRIC: scores["all"], "val_spearman_wmean": scores["wmean"], "val_task": task,
              "val_step": step, "val_seconds": round(time.perf_counter() - t0, 2)}
    _write_history(ckpt, record)
    return record


def _write_history(ckpt, record: dict) -> None:
    fs, root = checkpoint.location(ckpt)
    folder = f"{root.rsplit('/', 1)[0]}/{HISTORY_DIR}"
    name = f"step-{record['val_step']:09d}.json" if record["val_step"] is not None else f"{root.rsplit('/', 1)[1]}.json"
    fs.create_dir(folder, recursive=True)
    with fs.open_output_stream(f"{folder}/{name}") as f:
        f.write((json.dumps({**record, "checkpoint": root}) + "\n").encode())


def load_validation_history(run_path: str, filesystem=None) -> list[dict]:
    """The validation records of a run (``Result.path`` and ``Result.filesystem``), sorted by step."""
    fs = filesystem or pafs.LocalFileSystem()
    selector = pafs.FileSelector(f"{str(run_path).rstrip('/')}/{HISTORY_DIR}", allow_not_found=True)
    records = []
    for info in fs.get_file_info(selector):
        if info.is_file and info.base_name.endswith(".json"):
            with fs.open_input_stream(info.path) as f:
                records.append(json.loads(f.read().decode()))
    return sorted(records, key=lambda r: (r["val_step"] is None, r["val_step"] or 0))


def build_validation_config(eval_cfg: EvalConfig, *, base_model: str, pooling: str) -> ray.train.ValidationConfig:
    """The ``validation_config`` for TorchTrainer: ``validate_checkpoint`` on eval_cfg.validation_task,
    in a Ray task with eval_cfg.validation_num_cpus / validation_num_gpus (null: num_cpus / num_gpus) and
    eval_cfg.resources, so it never takes a training worker's resources."""
    if eval_cfg.validation_task is None:
        raise ValueError("eval.validation_task is null: validation is off")
    num_cpus, num_gpus = eval_cfg.validation_resources()
    return ray.train.ValidationConfig(
        fn=validate_checkpoint,
        task_config=ray.train.ValidationTaskConfig(
            fn_kwargs={"base_model": base_model, "pooling": pooling, "sts_dir": eval_cfg.sts_dir,
                       "task": eval_cfg.validation_task, "max_length": eval_cfg.max_length,
                       "batch_size": eval_cfg.batch_size, "precision": eval_cfg.precision,
                       "num_cpus": num_cpus, "num_gpus": num_gpus},
            timeout_s=eval_cfg.validation_timeout_s,
        ),
        ray_remote_kwargs={"num_cpus": num_cpus, "num_gpus": num_gpus, "resources": eval_cfg.resources},
    )


def best_checkpoint(result) -> tuple | None:
    """(checkpoint, metrics) of the kept checkpoint with the highest VAL_METRIC, or None if none was
    validated. ``result`` is the Ray Train Result of ``trainer.fit()``."""
    scored = [(c, m) for c, m in (result.best_checkpoints or []) if m.get(VAL_METRIC) is not None]
    return max(scored, key=lambda cm: cm[1][VAL_METRIC]) if scored else None


@dataclass(frozen=True)
class Selection:
    """Which checkpoint of a finished run is its model. source: "best_dev" or "final"; scores are
    VAL_METRIC, None where a checkpoint was not validated."""

    source: str
    checkpoint: object
    step: int | None
    score: float | None
    final_checkpoint: object
    final_step: int | None
    final_score: float | None

    def describe(self, task: str | None) -> str:
        """One line for logs and the report."""
        def score(value):
            return "not validated" if value is None else f"{value:.2f}"

        if self.source == "best_dev":
            return (f"best {task} checkpoint, step {self.step} ({score(self.score)}; "
                    f"final step {self.final_step}: {score(self.final_score)})")
        how = f"{task} {score(self.score)}" if task else "validation off"
        return f"final checkpoint, step {self.step} ({how})"


def select_checkpoint(result, validate: bool) -> Selection:
    """The run's model: with validation, the kept checkpoint with the best dev score; the final
    checkpoint when it scores at least as well (a tie goes to it), when none was validated, or without
    validation."""
    final = result.checkpoint
    final_metrics = getattr(result, "metrics", None) or {}
    final_score = final_metrics.get(VAL_METRIC)
    chosen = Selection("final", final, final_metrics.get("step"), final_score, final, final_metrics.get("step"),
                       final_score)
    best = best_checkpoint(result) if validate and getattr(result, "best_checkpoints", None) else None
    if best is None or str(best[0].path) == str(final.path):
        return chosen
    if final_score is not None and final_score >= best[1][VAL_METRIC]:
        return chosen
    return Selection("best_dev", best[0], best[1].get("step"), best[1][VAL_METRIC], final,
                     final_metrics.get("step"), final_score)
