"""Pure helpers of the training loop: schedules, batch arithmetic, derived seeds, rank slicing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tsdae.device import use_bf16
from tsdae.train import ScaleConfig, TrainConfig, steps_per_epoch
from tsdae.train.loop import rank_batches
from tsdae.train.step import lr_factor, step_seed


def test_schedules():
    assert [lr_factor(s, "constant", 0, 10) for s in (0, 5, 9)] == [1.0, 1.0, 1.0]
    assert [lr_factor(s, "constant", 4, 10) for s in (0, 1, 3, 4)] == [0.25, 0.5, 1.0, 1.0]
    assert lr_factor(2, "linear", 2, 10) == pytest.approx(1.0)
    assert lr_factor(6, "linear", 2, 10) == pytest.approx(0.5)
    assert lr_factor(10, "linear", 2, 10) == pytest.approx(0.0)
    assert lr_factor(6, "cosine", 2, 10) == pytest.approx(0.5)
    assert lr_factor(10, "cosine", 2, 10) == pytest.approx(0.0, abs=1e-12)


def test_global_batch_splits_into_micro_batches():
    assert TrainConfig(global_batch_size=16).per_worker_batch(2) == (8, 1)
    assert TrainConfig(global_batch_size=16, micro_batch_size=2).per_worker_batch(2) == (2, 4)
    assert TrainConfig(global_batch_size=16, micro_batch_size=32).per_worker_batch(4) == (4, 1)
    with pytest.raises(ValueError, match="global_batch_size 16 is not divisible by 3"):
        TrainConfig(global_batch_size=16).per_worker_batch(3)
    with pytest.raises(ValueError, match="micro_batch_size 3"):
        TrainConfig(global_batch_size=16, micro_batch_size=3).per_worker_batch(2)


def test_steps_per_epoch_counts_full_global_batches():
    scale = ScaleConfig(num_workers=2)
    assert steps_per_epoch(101, scale, TrainConfig(global_batch_size=8)) == 12  # 50 rows per rank / 4
    assert steps_per_epoch(101, scale, TrainConfig(global_batch_size=8, deterministic=True)) == 12
    with pytest.raises(ValueError, match="no full global batch"):
        steps_per_epoch(5, scale, TrainConfig(global_batch_size=8))


def test_step_seeds_are_derived_and_distinct():
    assert step_seed(0, 1, 7) == step_seed(0, 1, 7)
    assert len({step_seed(0, r, s) for r in range(4) for s in range(100)}) == 400
    assert step_seed(1, 0, 0) != step_seed(0, 0, 0)


class _Stream:
    """Stands in for a Ray DataIterator: iter_batches over an in-memory column."""

    def __init__(self, n):
        self.rows = np.arange(n)

    def iter_batches(self, batch_size, batch_format, drop_last):
        stop = len(self.rows) - (len(self.rows) % batch_size if drop_last else 0)
        for i in range(0, stop, batch_size):
            yield {"row": self.rows[i:i + batch_size]}


def test_deterministic_ranks_take_disjoint_slices_of_each_global_batch():
    got = {r: [b["row"].tolist() for b in rank_batches(_Stream(21), 8, r, 2, deterministic=True)] for r in (0, 1)}
    assert got[0] == [[0, 1, 2, 3], [8, 9, 10, 11]]
    assert got[1] == [[4, 5, 6, 7], [12, 13, 14, 15]]  # rows 16..20 make no full global batch
    one = [b["row"].tolist() for b in rank_batches(_Stream(21), 8, 0, 1, deterministic=True)]
    assert one == [list(range(8)), list(range(8, 16))]


def test_precision_auto_uses_bf16_only_where_the_cpu_has_it(monkeypatch):
    cpu = torch.device("cpu")
    assert use_bf16("bf16", cpu) and not use_bf16("fp32", cpu)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert not use_bf16("auto", cpu)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    assert use_bf16("auto", cpu)
