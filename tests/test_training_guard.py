"""A guard for refactoring: a tiny-BERT run's first 20 losses and its final parameters are pinned.

Recorded once (tests/assets/training_guard.json) and kept unchanged while the code around them moves:
the same corpus rows, noise, batches, loss scaling, optimizer and schedule must give the same numbers.
The run goes through the job's own train stage (a run config file → ``jobs.stages.train_stage``), fp32,
deterministic, dropout off, with 1 and with 2 workers.

The parameters are pinned as a fingerprint (each tensor's sum and L2 norm, in float64) at a tolerance,
not as a SHA-256 of their bits: fp32 products are computed by different kernels on different CPUs (oneDNN
and MKL choose them by instruction set), so bits differ between machines. Measured by recording the run
twice on an AVX-512 Xeon, once with the AVX2 kernels forced (ONEDNN_MAX_CPU_ISA=AVX2,
MKL_ENABLE_INSTRUCTIONS=AVX2, ATEN_CPU_CAPABILITY=avx2): losses agreed to 1e-7 relative, every weight
fingerprint to 2e-7 relative, except the attention key biases, whose gradient is zero in exact arithmetic
(a softmax does not change when a constant is added to every score) so that Adam moves them by rounding
noise alone (norms ~5e-7): hence the absolute tolerance. A change of behaviour (another row order, noise
draw, loss scale, learning rate) moves the losses by 1e-3 or more.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parents[1]
PINNED = Path(__file__).resolve().parent / "assets" / "training_guard.json"
STEPS = 20
RTOL = 1e-4
ATOL = 1e-5


def guard_run(tmp_path: Path, model_dir: str, workers: int) -> dict:
    """Train the guard configuration; returns {"losses": [...], "fingerprint": {name: [sum, norm]}}."""
    from jobs.config import load_config
    from jobs.stages import train_stage

    texts = pq.read_table(ROOT / "data/corpus/demo.parquet").column("text").to_pylist()[:200]
    corpus = tmp_path / "corpus.parquet"
    pq.write_table(pa.table({"text": texts}), corpus, row_group_size=50)
    config = {
        "name": f"guard{workers}",
        "storage_path": str(tmp_path / "ray"),
        "output_dir": str(tmp_path / "runs"),
        "read": {"uri": str(corpus), "shuffle_rows": 0},  # the order the guard was recorded in
        "corrupt": {"max_length": 32, "seed": 3},
        "model": {"name_or_path": model_dir},
        "train": {"global_batch_size": 8, "max_steps": STEPS, "lr": 1e-3, "report_every": 1,
                  "deterministic": True, "precision": "fp32", "seed": 5},
        "scale": {"num_workers": workers, "cpus_per_worker": 0.5, "cpus_per_preprocess_actor": 0.5},
        "eval": {"sts_dir": str(ROOT / "data/sts"), "validation_task": None},
    }
    path = tmp_path / f"guard-{workers}.yaml"
    path.write_text(yaml.safe_dump(config))
    cfg = load_config(path)
    result = train_stage(cfg, len(texts), f"guard-{workers}")
    with result.checkpoint.as_directory() as d:
        d = Path(d)
        metrics = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines() if line]
        state = torch.load(d / "state.pt", map_location="cpu", weights_only=True)["model"]
    return {
        "losses": [m["loss"] for m in metrics],
        "fingerprint": {name: [float(t.double().sum()), float(t.double().norm())] for name, t in state.items()
                        if t.is_floating_point()},
    }


@pytest.mark.parametrize("workers", [1, 2])
def test_first_losses_and_final_parameters_are_unchanged(ray_local, tiny_bert_no_dropout_dir, tmp_path, workers):
    got = guard_run(tmp_path, tiny_bert_no_dropout_dir, workers)
    pinned = json.loads(PINNED.read_text())[str(workers)]
    assert len(got["losses"]) == STEPS
    assert got["losses"] == pytest.approx(pinned["losses"], rel=RTOL)
    assert got["fingerprint"].keys() == pinned["fingerprint"].keys()
    for name, (total, norm) in pinned["fingerprint"].items():
        assert got["fingerprint"][name][1] == pytest.approx(norm, rel=RTOL, abs=ATOL), name
        assert got["fingerprint"][name][0] == pytest.approx(total, rel=RTOL, abs=ATOL), name
