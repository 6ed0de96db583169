"""The training benchmark's batch construction, and its device path on a tiny model (so a GPU-less
machine still runs every line of it that is not CUDA-specific)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from benchmarks import training

CORPUS = Path(__file__).resolve().parents[1] / training.CORPUS


def test_length_aware_batches_cover_each_row_once_with_little_padding():
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 60, size=1000)
    sorted_batches = training.length_aware_batches(lengths, 8, np.random.default_rng(1), pool=200)
    random_batches = training.random_batches(len(lengths), 8, np.random.default_rng(1))
    assert sorted(np.concatenate(sorted_batches).tolist()) == list(range(1000))

    def padding(batches):
        return 1 - sum(lengths[b].sum() for b in batches) / sum(lengths[b].max() * len(b) for b in batches)

    assert padding(sorted_batches) < 0.05 < 0.3 < padding(random_batches)


@pytest.mark.skipif(not CORPUS.exists(), reason="needs ../shared/data/corpus")
def test_device_path_runs_on_cpu_with_a_tiny_model(tmp_path, monkeypatch):
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    args = training.parse_args(["--device", "cpu", "--steps", "4", "--batch-size", "4", "--chunk", "2",
                                "--out", str(tmp_path / "out.json")])
    tiny = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
    result = training.run_device(args, tiny)
    assert result["ours_tokens_per_s"] > 0 and 0 < result["mfu"] < 1
