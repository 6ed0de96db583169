"""Ray Train on a local cluster: 2 DDP workers on CPU train a tiny TSDAE; replicas stay bit-identical."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline import CorruptConfig, ReadConfig
from tsdae.model import ModelConfig
from tsdae.train import ScaleConfig, TrainConfig

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory) -> str:
    texts = pq.read_table(ROOT / "data/corpus/demo.parquet").column("text").to_pylist()[:101]
    path = tmp_path_factory.mktemp("corpus") / "corpus.parquet"
    pq.write_table(pa.table({"text": texts}), path)
    return str(path)


def test_two_workers_train_identical_replicas(ray_local, tiny_bert_dir, small_corpus, tmp_path):
    from transformers import AutoModel

    from pipeline import build_train_dataset
    from tsdae.train import build_trainer

    dataset = build_train_dataset(
        ReadConfig(uri=small_corpus), CorruptConfig(max_length=32), tiny_bert_dir,
        epochs=1, num_actors=1, cpus_per_actor=0.5,
    )
    train = TrainConfig(global_batch_size=8, max_steps=6, lr=1e-3, report_every=2, checkpoint_every=3)
    trainer = build_trainer(
        dataset, model=ModelConfig(name_or_path=tiny_bert_dir), train=train,
        scale=ScaleConfig(num_workers=2, cpus_per_worker=0.5), max_seq_length=32, rows=101,
        name="replicas", storage_path=str(tmp_path / "ray"),
    )
    result = trainer.fit()
    assert result.error is None
    with result.checkpoint.as_directory() as d:
        d = Path(d)
        summary = json.loads((d / "summary.json").read_text())
        metrics = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
        trained = AutoModel.from_pretrained(d / "encoder")
    assert summary["world_size"] == 2 and summary["steps"] == 6
    assert summary["replicas_identical"], summary["parameter_digests"]
    assert summary["rows_trained_per_rank"] == [24, 24]
    assert [m["step"] for m in metrics] == [2, 3, 4, 6]
    assert all(m["loss"] > 0 and 0 < m["mfu"] < 1 for m in metrics)
    base = AutoModel.from_pretrained(tiny_bert_dir)
    moved = [not torch.equal(a, b) for a, b in zip(base.parameters(), trained.parameters())]
    assert any(moved), "training did not change the encoder"
