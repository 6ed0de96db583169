"""Periodic evaluation during training, off the training workers, through Ray Train's validation hook.

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
import shutil
import tempfile
import time
from pathlib import Path

from tsdae.config import EvalConfig, ModelConfig

VAL_METRIC = "val_spearman"  # Spearman ×100 (``all``) on EvalConfig.validation_task
HISTORY_DIR = "tsdae_validation"
ENCODER_SUBDIR = "encoder"
STATE_FILE = "state.pt"  # tsdae.train.STATE_FILE (not imported: importing the train loop pulls in Ray Train)


def _fs_and_path(checkpoint):
    import pyarrow.fs

    return checkpoint.filesystem or pyarrow.fs.LocalFileSystem(), str(checkpoint.path).rstrip("/")


def _exists(fs, path: str) -> bool:
    import pyarrow.fs

    return fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound


def _fetch(fs, path: str, dest: Path) -> Path:
    """A local copy of path (file or folder) from fs; local filesystems are used in place."""
    import pyarrow.fs

    if isinstance(fs, pyarrow.fs.LocalFileSystem):
        return Path(path)
    target = dest / Path(path).name
    if fs.get_file_info(path).type == pyarrow.fs.FileType.Directory:
        pyarrow.fs.copy_files(path, str(target), source_filesystem=fs,
                              destination_filesystem=pyarrow.fs.LocalFileSystem())
    else:
        with fs.open_input_stream(path) as src, open(target, "wb") as out:
            shutil.copyfileobj(src, out)
    return target


def checkpoint_encoder(checkpoint, base_model: str | None = None, subdir: str | None = ENCODER_SUBDIR):
    """Load the encoder of a training checkpoint (local or in cloud storage) as (model, tokenizer).

    Uses the checkpoint's ``encoder/`` folder when it has one (only that folder is fetched); else
    rebuilds ``base_model``'s architecture (AutoModel) and loads the ``encoder.*`` weights of
    ``state.pt`` (the train loop's {"model": TSDAE state_dict, "optimizer", "step"}).
    """
    import torch
    from transformers import AutoModel, AutoTokenizer

    from tsdae.paths import resolve_model_path

    fs, root = _fs_and_path(checkpoint)
    with tempfile.TemporaryDirectory(prefix="tsdae-ckpt-") as tmp:
        if subdir and _exists(fs, f"{root}/{subdir}/config.json"):
            local = _fetch(fs, f"{root}/{subdir}", Path(tmp))
            return AutoModel.from_pretrained(local), AutoTokenizer.from_pretrained(local)
        if base_model is None:
            raise FileNotFoundError(f"checkpoint {root} has no {subdir}/ folder; pass base_model to rebuild "
                                    f"the encoder from {STATE_FILE}")
        if not _exists(fs, f"{root}/{STATE_FILE}"):
            raise FileNotFoundError(f"checkpoint {root} has neither {subdir}/ nor {STATE_FILE}")
        state = torch.load(_fetch(fs, f"{root}/{STATE_FILE}", Path(tmp)), map_location="cpu", weights_only=True)
    base = resolve_model_path(base_model)
    model = AutoModel.from_pretrained(base)
    prefix = "encoder."
    weights = {k[len(prefix):]: v for k, v in state["model"].items() if k.startswith(prefix)}
    model.load_state_dict(weights, strict=True)
    return model, AutoTokenizer.from_pretrained(base)


def validate_checkpoint(checkpoint, *, base_model: str, pooling: str, sts_dir: str, task: str = "STSB-dev",
                        max_length: int = 128, batch_size: int = 128, precision: str = "auto",
                        num_threads: int = 1, step: int | None = None) -> dict:
    """Ray Train validation function: score a checkpoint's encoder on one STS task.

    Every argument after ``checkpoint`` is JSON-serialisable (Ray passes them as fn_kwargs); ``step``
    comes from the report that carried the checkpoint. Returns
    {VAL_METRIC: all ×100, "val_spearman_wmean", "val_task", "val_step", "val_seconds"} and writes the
    same record to ``<run>/tsdae_validation/``.
    """
    import torch

    from tsdae.encode import SentenceEncoder
    from tsdae.evaluation import evaluate_sts
    from tsdae.sts import load_tasks

    t0 = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        torch.set_num_threads(max(1, num_threads))
    model, tokenizer = checkpoint_encoder(checkpoint, base_model=base_model)
    encoder = SentenceEncoder.from_module(model.to(device), tokenizer, pooling, max_length, batch_size, precision)
    scores = evaluate_sts(encoder.encode, load_tasks(sts_dir, [task]))["tasks"][task]
    record = {VAL_METRIC: scores["all"], "val_spearman_wmean": scores["wmean"], "val_task": task,
              "val_step": step, "val_seconds": round(time.perf_counter() - t0, 2)}
    _write_history(checkpoint, record)
    return record


def _write_history(checkpoint, record: dict) -> None:
    fs, root = _fs_and_path(checkpoint)
    folder = f"{root.rsplit('/', 1)[0]}/{HISTORY_DIR}"
    name = f"step-{record['val_step']:09d}.json" if record["val_step"] is not None else f"{root.rsplit('/', 1)[1]}.json"
    fs.create_dir(folder, recursive=True)
    with fs.open_output_stream(f"{folder}/{name}") as f:
        f.write((json.dumps({**record, "checkpoint": root}) + "\n").encode())


def load_validation_history(run_path: str, filesystem=None) -> list[dict]:
    """The validation records of a run (``Result.path`` and ``Result.filesystem``), sorted by step."""
    import pyarrow.fs

    fs = filesystem or pyarrow.fs.LocalFileSystem()
    selector = pyarrow.fs.FileSelector(f"{str(run_path).rstrip('/')}/{HISTORY_DIR}", allow_not_found=True)
    records = []
    for info in fs.get_file_info(selector):
        if info.is_file and info.base_name.endswith(".json"):
            with fs.open_input_stream(info.path) as f:
                records.append(json.loads(f.read().decode()))
    return sorted(records, key=lambda r: (r["val_step"] is None, r["val_step"] or 0))


def build_validation_config(eval_cfg: EvalConfig, *, base_model: str, pooling: str):
    """The ``validation_config`` for TorchTrainer: ``validate_checkpoint`` on eval_cfg.validation_task,
    in a Ray task with eval_cfg.validation_num_cpus / validation_num_gpus (null: num_cpus / num_gpus), so
    it never takes a training worker's resources."""
    import ray.train

    if eval_cfg.validation_task is None:
        raise ValueError("eval.validation_task is null: validation is off")
    num_cpus = eval_cfg.num_cpus if eval_cfg.validation_num_cpus is None else eval_cfg.validation_num_cpus
    num_gpus = eval_cfg.num_gpus if eval_cfg.validation_num_gpus is None else eval_cfg.validation_num_gpus
    return ray.train.ValidationConfig(
        fn=validate_checkpoint,
        task_config=ray.train.ValidationTaskConfig(
            fn_kwargs={"base_model": base_model, "pooling": pooling, "sts_dir": eval_cfg.sts_dir,
                       "task": eval_cfg.validation_task, "max_length": eval_cfg.max_length,
                       "batch_size": eval_cfg.batch_size, "precision": eval_cfg.precision,
                       "num_threads": max(1, int(num_cpus))},
            timeout_s=eval_cfg.validation_timeout_s,
        ),
        ray_remote_kwargs={"num_cpus": num_cpus, "num_gpus": num_gpus},
    )


def best_checkpoint(result) -> tuple | None:
    """(checkpoint, metrics) of the kept checkpoint with the highest VAL_METRIC, or None if none was
    validated. ``result`` is the Ray Train Result of ``trainer.fit()``."""
    scored = [(c, m) for c, m in (result.best_checkpoints or []) if m.get(VAL_METRIC) is not None]
    return max(scored, key=lambda cm: cm[1][VAL_METRIC]) if scored else None


def _model_from_state(checkpoint, model_cfg: ModelConfig):
    """(TSDAE model in eval mode, tokenizer) rebuilt from a training checkpoint's ``state.pt``."""
    import torch

    from tsdae.model import build_tsdae

    fs, root = _fs_and_path(checkpoint)
    with tempfile.TemporaryDirectory(prefix="tsdae-best-") as tmp:
        state = torch.load(_fetch(fs, f"{root}/{STATE_FILE}", Path(tmp)), map_location="cpu", weights_only=True)
    model, tokenizer = build_tsdae(model_cfg)
    model.load_state_dict(state["model"])
    return model.eval(), tokenizer


def _fresh_dir(out_dir: str | Path) -> Path:
    out = Path(out_dir)
    if out.exists():
        shutil.rmtree(out)
    return out


def export_best_encoder(checkpoint, out_dir: str | Path, model_cfg: ModelConfig, max_length: int) -> Path:
    """Write the best checkpoint's encoder to out_dir as a sentence-transformers + Hugging Face folder:
    a copy of its ``encoder/`` when it has one, else exported from ``state.pt`` with
    ``tsdae.export.export_encoder`` (the same files as the final export)."""
    from tsdae.export import export_encoder

    out = _fresh_dir(out_dir)
    fs, root = _fs_and_path(checkpoint)
    if _exists(fs, f"{root}/{ENCODER_SUBDIR}/config.json"):
        with tempfile.TemporaryDirectory(prefix="tsdae-best-") as tmp:
            shutil.copytree(_fetch(fs, f"{root}/{ENCODER_SUBDIR}", Path(tmp)), out)
        return out
    model, tokenizer = _model_from_state(checkpoint, model_cfg)
    return export_encoder(model, tokenizer, out, max_seq_length=max_length)


def export_best_decoder(checkpoint, out_dir: str | Path, model_cfg: ModelConfig) -> Path:
    """Write the decoder of a training checkpoint (rebuilt from its ``state.pt``) to out_dir, as
    ``tsdae.export.export_decoder`` does for the final one, so that encoder/ and decoder/ of a run's
    export come from the same step."""
    from tsdae.export import export_decoder

    out = _fresh_dir(out_dir)
    model, tokenizer = _model_from_state(checkpoint, model_cfg)
    return export_decoder(model, tokenizer, out)
