"""gs:// through gcsfs (the cloud extra) against a GCS emulator on loopback: the corpus, the node-local
model cache, a run's outputs and the registry, every path a job takes through fsspec.

The emulator speaks GCS's JSON API only: gcsfs's default class also asks GCS's gRPC control API for the
bucket type (60 s of timeouts against an emulator), so these tests use gcsfs's JSON-API class. It ignores
generation preconditions, so the conditional writes of the lease and the production swap are proven on
S3 (tests/test_lease.py, tests/test_registry.py); on GCS they are a read, then a write (README).
"""

from __future__ import annotations

import json
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import bucket_name
from fsspec.registry import _registry  # the gs:// class; fsspec.register_implementation has no undo

from jobs.registry import Registry
from pipeline import ReadConfig
from pipeline.read import corpus_stats
from tsdae.model_cache import RECORD, fetch_model
from tsdae.storage import OutputDir

gcsfs = pytest.importorskip("gcsfs", reason="gs:// needs the cloud extra (make installs it)")


@pytest.fixture
def gcs_bucket(gcs_server, monkeypatch, request) -> str:
    """A fresh bucket on the emulator, fsspec's gs:// pointed at it (anonymous, JSON API); its gs:// URI.
    The endpoint is a storage option, not STORAGE_EMULATOR_HOST: the filesystem travels pickled with its
    options to Ray's read tasks, in workers that may have started before this test set any variable."""
    monkeypatch.setitem(fsspec.config.conf, "gs", {"token": "anon", "project": "test",
                                                   "endpoint_url": gcs_server.endpoint})
    monkeypatch.setitem(_registry, "gs", gcsfs.core.GCSFileSystem)
    gcsfs.core.GCSFileSystem.clear_instance_cache()
    name = bucket_name(request)
    fsspec.filesystem("gs").mkdir(name)
    yield f"gs://{name}"
    gcsfs.core.GCSFileSystem.clear_instance_cache()


@pytest.mark.ray
def test_a_corpus_in_a_gcs_bucket_is_read_and_counted(gcs_bucket, ray_local):  # read by Ray Data tasks
    fs = fsspec.filesystem("gs")
    texts = [f"sentence number {i} of the corpus" for i in range(30)] + ["", None]
    for part, rows in enumerate((texts[:20], texts[20:])):
        with fs.open(f"{gcs_bucket}/corpus/part-{part}.parquet", "wb") as f:
            pq.write_table(pa.table({"text": pa.array(rows, pa.string())}), f)
    stats = corpus_stats(ReadConfig(uri=f"{gcs_bucket}/corpus/"))
    assert (stats["files"], stats["rows_read"], stats["rows_kept"]) == (2, 32, 30)
    assert stats["dropped_null"] == 1 and stats["dropped_empty"] == 1


def test_a_model_in_a_gcs_bucket_is_fetched_into_the_node_cache_once(gcs_bucket, tiny_bert_dir, tmp_path,
                                                                      monkeypatch):
    monkeypatch.setenv("TSDAE_MODEL_CACHE", str(tmp_path / "cache"))
    fsspec.filesystem("gs").put(f"{tiny_bert_dir}/", f"{gcs_bucket}/models/tiny/", recursive=True)
    local = Path(fetch_model(f"{gcs_bucket}/models/tiny"))
    names = sorted(p.name for p in Path(tiny_bert_dir).iterdir())
    assert sorted(p.name for p in local.iterdir() if p.name != RECORD) == names
    assert all((local / n).read_bytes() == Path(tiny_bert_dir, n).read_bytes() for n in names)
    assert fetch_model(f"{gcs_bucket}/models/tiny") == str(local)  # found in the cache, checked again


def test_outputs_and_the_registry_round_trip_through_a_gcs_bucket(gcs_bucket, tmp_path):
    fs = fsspec.filesystem("gs")
    out = OutputDir(f"{gcs_bucket}/runs/r1")
    (out.local / "encoder").mkdir(parents=True)
    (out.local / "encoder" / "config.json").write_text("{}")
    (out.local / "report.md").write_text("# report")
    assert out.publish("encoder", "report.md") == {"encoder": f"{gcs_bucket}/runs/r1/encoder",
                                                   "report.md": f"{gcs_bucket}/runs/r1/report.md"}
    assert fs.cat_file(f"{gcs_bucket}/runs/r1/report.md") == b"# report"
    assert fs.exists(f"{gcs_bucket}/runs/r1/encoder/config.json")

    model = tmp_path / "model"
    (model / "encoder").mkdir(parents=True)
    (model / "encoder" / "model.safetensors").write_text("weights")
    (model / "lineage.json").write_text(json.dumps({"parent": None}))
    registry = Registry(f"{gcs_bucket}/registry")
    registry.publish("m1", model)
    pointer = registry.promote("m1", expected_current=None)
    assert Registry(f"{gcs_bucket}/registry").production() == pointer and pointer["model_id"] == "m1"
    local = registry.fetch("m1", tmp_path / "fetched")  # every size and sha256 against MANIFEST.json
    assert (local / "encoder" / "model.safetensors").read_text() == "weights"
