"""SIGTERM to the job's driver (what `ray job stop` and a reclaimed node send) checkpoints and stops;
--resume continues the same run from that checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parents[1]


def _config(tmp_path, model_dir, max_steps) -> Path:
    texts = pq.read_table(ROOT / "data/corpus/demo.parquet").column("text").to_pylist()[:800]
    pq.write_table(pa.table({"text": texts}), tmp_path / "corpus.parquet")
    cfg = {
        "name": "stoptest", "storage_path": str(tmp_path / "ray"), "output_dir": str(tmp_path / "runs"),
        "read": {"uri": str(tmp_path / "corpus.parquet")},
        "corrupt": {"max_length": 32},
        "model": {"name_or_path": model_dir},
        "train": {"global_batch_size": 4, "max_steps": max_steps, "lr": 1e-3, "report_every": 2},
        "scale": {"num_workers": 2, "cpus_per_worker": 0.5, "cpus_per_preprocess_actor": 0.5, "local_num_cpus": 4},
        "eval": {"sts_dir": str(ROOT / "data/sts"), "tasks": ["STS16"], "num_cpus": 1,
                 "validation_task": None},  # checkpoint validation has tests of its own
    }
    path = tmp_path / f"stop-{max_steps}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _job(*args) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.Popen([sys.executable, "-m", "jobs.run", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_sigterm_checkpoints_and_resume_finishes_the_run(tiny_bert_dir, tmp_path):
    proc = _job("--config", str(_config(tmp_path, tiny_bert_dir, max_steps=10_000)))
    lines, deadline = [], time.time() + 600
    for line in proc.stdout:
        lines.append(line)
        if "[train] step 4/" in line:
            proc.send_signal(signal.SIGTERM)
            break
        assert time.time() < deadline, "".join(lines[-50:])
    lines += proc.stdout.readlines()
    assert proc.wait(timeout=300) == 143, "".join(lines[-60:])
    log = "".join(lines)
    assert "stop requested: checkpointed at step" in log
    (run_dir,) = (tmp_path / "ray").iterdir()
    checkpoints = sorted(p for p in run_dir.glob("checkpoint_*") if p.is_dir())
    assert checkpoints and (checkpoints[-1] / "complete.json").exists()
    stopped_at = json.loads((checkpoints[-1] / "complete.json").read_text())["step"]
    assert stopped_at >= 4

    resumed = _job("--config", str(_config(tmp_path, tiny_bert_dir, max_steps=stopped_at + 2)),
                   "--resume", run_dir.name)
    out = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0, out[-4000:]
    summary = json.loads((tmp_path / "runs" / run_dir.name / "summary.json").read_text())
    assert summary["resumed_from_step"] == stopped_at and summary["steps"] == stopped_at + 2
