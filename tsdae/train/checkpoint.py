"""The training checkpoint: its files, how they are written and read, and how a run's model is exported
from one. The only module that knows the format.

A checkpoint folder (local, or wherever Ray Train's storage_path puts it: S3, GCS):

    state.pt        {"model": TSDAE state dict, "optimizer", "scheduler", "step", "position"}
    encoder/        the encoder in the export format (tsdae.model.export): AutoModel / SentenceTransformer load it
    complete.json   {"step", "position"}, written last: a folder without it was cut off and is never loaded
    metrics.jsonl   the final checkpoint only: rank 0's metrics at every report step
    summary.json    the final checkpoint only: steps, rows per rank, whether the replicas ended identical

``state.pt`` is read with ``torch.load(weights_only=True)``: tensors and plain values only, so a file
planted under the checkpoint prefix cannot run code on the workers that resume from it.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pyarrow.fs as pafs
import torch
from transformers import AutoModel, AutoTokenizer

from tsdae.model import ModelConfig, build_tsdae, export_decoder, export_encoder, fetch_model
from tsdae.storage import exists, fetch

STATE_FILE = "state.pt"
COMPLETE_FILE = "complete.json"
ENCODER_DIR = "encoder"
DECODER_DIR = "decoder"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"


def save_checkpoint(path: Path, model, tokenizer, optimizer, scheduler, step: int, max_seq_length: int,
                    position: dict, records: dict[str, str] | None = None) -> None:
    """Write a checkpoint into the local folder path (Ray Train uploads it): state.pt, encoder/, the
    records given ({file name: text}: METRICS_FILE and SUMMARY_FILE at the end of a run), complete.json last."""
    tmp = path / (STATE_FILE + ".tmp")
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "step": step, "position": position}, tmp)
    os.replace(tmp, path / STATE_FILE)
    export_encoder(model, tokenizer, path / ENCODER_DIR, max_seq_length=max_seq_length)
    for name, text in (records or {}).items():
        (path / name).write_text(text)
    (path / COMPLETE_FILE).write_text(json.dumps({"step": step, "position": position}) + "\n")


def location(checkpoint) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path) of a ray.train.Checkpoint, wherever it is stored."""
    return checkpoint.filesystem or pafs.LocalFileSystem(), str(checkpoint.path).rstrip("/")


def load_state(checkpoint) -> dict:
    """The state.pt of a ray.train.Checkpoint (only that file is fetched); refuses an incomplete one."""
    fs, root = location(checkpoint)
    if not exists(fs, f"{root}/{COMPLETE_FILE}"):
        raise RuntimeError(f"checkpoint {root} is incomplete (no {COMPLETE_FILE}); refusing to load it")
    with tempfile.TemporaryDirectory(prefix="tsdae-state-") as tmp:
        return torch.load(fetch(fs, f"{root}/{STATE_FILE}", Path(tmp)), map_location="cpu", weights_only=True)


def load_encoder(checkpoint, base_model: str | None = None):
    """(encoder, tokenizer) of a checkpoint: its ``encoder/`` folder when it has one (only that folder is
    fetched); else base_model's architecture with the ``encoder.*`` weights of state.pt."""
    fs, root = location(checkpoint)
    with tempfile.TemporaryDirectory(prefix="tsdae-ckpt-") as tmp:
        if exists(fs, f"{root}/{ENCODER_DIR}/config.json"):
            local = fetch(fs, f"{root}/{ENCODER_DIR}", Path(tmp))
            return AutoModel.from_pretrained(local), AutoTokenizer.from_pretrained(local)
    if base_model is None:
        raise FileNotFoundError(f"checkpoint {root} has no {ENCODER_DIR}/ folder; pass base_model to rebuild "
                                f"the encoder from {STATE_FILE}")
    state = load_state(checkpoint)
    base = fetch_model(base_model)  # on the node that validates, from its URI
    model = AutoModel.from_pretrained(base)
    prefix = "encoder."
    model.load_state_dict({k[len(prefix):]: v for k, v in state["model"].items() if k.startswith(prefix)})
    return model, AutoTokenizer.from_pretrained(base)


def load_tsdae(checkpoint, model_cfg: ModelConfig):
    """(TSDAE model in eval mode, tokenizer): model_cfg's architecture with the checkpoint's weights."""
    state = load_state(checkpoint)
    model, tokenizer = build_tsdae(model_cfg)
    model.load_state_dict(state["model"])
    return model.eval(), tokenizer


def export_model(checkpoint, out_dir: Path, model_cfg: ModelConfig, max_seq_length: int) -> dict[str, Path]:
    """Export a checkpoint's model to out_dir: ``encoder/`` and ``decoder/``, both from its state.pt, so
    that the two always come from the same step. Returns {"encoder": path, "decoder": path}."""
    model, tokenizer = load_tsdae(checkpoint, model_cfg)
    return {"encoder": export_encoder(model, tokenizer, out_dir / ENCODER_DIR, max_seq_length=max_seq_length),
            "decoder": export_decoder(model, tokenizer, out_dir / DECODER_DIR)}


def copy_encoder(checkpoint, dest: Path) -> Path:
    """Copy a checkpoint's ``encoder/`` folder (already in the export format) to the local folder dest."""
    fs, root = location(checkpoint)
    pafs.copy_files(f"{root}/{ENCODER_DIR}", str(dest), source_filesystem=fs,
                    destination_filesystem=pafs.LocalFileSystem())
    return dest


def read_text(checkpoint, name: str) -> str:
    """A record file (METRICS_FILE, SUMMARY_FILE) of a checkpoint, as text."""
    fs, root = location(checkpoint)
    with fs.open_input_stream(f"{root}/{name}") as f:
        return f.read().decode()
