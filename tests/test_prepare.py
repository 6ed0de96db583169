"""jobs.prepare: the shards it writes read back as the same training rows (local Ray cluster)."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.ray


def test_prepared_shards_equal_the_stream(tmp_path, tiny_bert_dir, ray_local, monkeypatch):
    from jobs import prepare
    from pipeline import CorruptConfig, ReadConfig, build_train_dataset, read_prepared

    pq.write_table(pa.table({"text": [f"sentence {i} with a few more words" for i in range(50)] + [None]}),
                   tmp_path / "c.parquet")
    config = tmp_path / "run.yaml"
    config.write_text(f"read: {{uri: {tmp_path / 'c.parquet'}}}\ncorrupt: {{seed: 3, max_length: 32}}\n"
                      f"model: {{name_or_path: {tiny_bert_dir}}}\ntrain: {{epochs: 2, global_batch_size: 8}}\n")
    monkeypatch.setattr(prepare, "connect_ray", lambda *args: None)  # the session cluster is up
    assert prepare.main(["--config", str(config), "--output", str(tmp_path / "out")]) == 0
    summary = json.loads((tmp_path / "out" / "corpus_stats.json").read_text())
    assert summary["epochs"] == [0, 1] and summary["per_epoch"]["dropped_null"] == 1

    def rows(ds):
        return sorted((r["row_key"], r["epoch"], list(r["noisy_ids"]), list(r["target_ids"])) for r in ds.take_all())

    expected = build_train_dataset(ReadConfig(uri=str(tmp_path / "c.parquet")),
                                   CorruptConfig(seed=3, max_length=32), tiny_bert_dir, epochs=2,
                                   num_actors=1, cpus_per_actor=1)
    assert rows(read_prepared(str(tmp_path / "out"))) == rows(expected)
    assert len(rows(read_prepared(str(tmp_path / "out"), epochs=[1]))) == 50
