"""The STS suite in a bucket (eval.sts_dir as a URI): checked before a job starts, fetched into the node's
cache where an evaluation runs, read exactly as the local folder."""

from __future__ import annotations

from pathlib import Path

import fsspec
import pytest

from jobs.config import ConfigError, parse_config, preflight
from tsdae.eval import load_tasks, missing_tasks

ROOT = Path(__file__).resolve().parents[1]
STS = ROOT / "data" / "sts"
TASKS = ["STSB-dev", "STSB-test", "SICK-R"]


def test_a_bucket_sts_dir_reads_like_the_local_folder(s3_bucket, tmp_path, monkeypatch):
    monkeypatch.setenv("TSDAE_MODEL_CACHE", str(tmp_path / "cache"))
    uri = f"{s3_bucket}/sts"
    fs = fsspec.filesystem("s3")
    for rel in ("STSBenchmark/sts-dev.csv", "STSBenchmark/sts-test.csv", "SICK/SICK_test_annotated.txt"):
        fs.put(str(STS / rel), f"{uri}/{rel}")
    assert missing_tasks(uri, TASKS) == []
    assert missing_tasks(uri, ["STS12", "STSB-dev"]) == ["STS12"]
    remote, local = load_tasks(uri, TASKS), load_tasks(str(STS), TASKS)
    for task in TASKS:
        assert [(s.sentences1, s.sentences2, s.scores.tolist()) for s in remote[task]] == \
               [(s.sentences1, s.sentences2, s.scores.tolist()) for s in local[task]]
    assert any((tmp_path / "cache").iterdir())  # fetched into the node's cache, not read over the network

    preflight(parse_config({"eval": {"sts_dir": uri, "tasks": ["STSB-test"], "validation_task": "STSB-dev"}}))
    with pytest.raises(ConfigError, match=r"eval.sts_dir: no data for \['STS12'\]"):
        preflight(parse_config({"eval": {"sts_dir": uri, "tasks": ["STS12"], "validation_task": None}}))
