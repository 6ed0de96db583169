"""Pure helpers of the training loop: schedules, batch arithmetic, derived seeds, rank slicing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tsdae.device import use_bf16
from tsdae.train import ScaleConfig, Shape, TrainConfig, steps_per_epoch, training_flops
from tsdae.train.collate import RankCollate
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


def _stream_batch(n: int, start: int = 0) -> dict:
    """A batch as the train loop's iterator hands it to the collate function (numpy columns)."""
    ids = np.empty(n, dtype=object)
    ids[:] = [np.array([101, 1000 + start + i, 102], dtype=np.int32) for i in range(n)]
    return {"noisy_ids": ids, "target_ids": ids.copy(), "epoch": np.array([0] * (n - 1) + [1]),
            "row_key": np.arange(start, start + n, dtype=np.uint64)}


def test_deterministic_ranks_take_disjoint_slices_of_each_global_batch():
    shape = Shape(hidden=32, intermediate=64, layers=2, vocab=100)
    common = dict(world=2, global_batch=8, micro=2, accumulation=2, pad_id=0, shape=shape, first_token_only=True,
                  pin=False)
    got = {r: RankCollate(rank=r, deterministic=True, **common)(_stream_batch(8)) for r in (0, 1)}
    assert [p.noisy_ids[:, 1].tolist() for p in got[0].parts] == [[1000, 1001], [1002, 1003]]
    assert [p.noisy_ids[:, 1].tolist() for p in got[1].parts] == [[1004, 1005], [1006, 1007]]
    assert got[1].rows == 4 and got[1].labels == 4 * 2 and got[1].rows_per_epoch == {0: 3, 1: 1}
    assert got[0].flops == training_flops(shape, [3] * 4, [3] * 4)
    # Without determinism each rank's batch is already its own share: nothing is sliced away.
    own = RankCollate(rank=1, deterministic=False, **common)(_stream_batch(4, start=50))
    assert [p.noisy_ids[:, 1].tolist() for p in own.parts] == [[1050, 1051], [1052, 1053]]


def test_precision_auto_uses_bf16_only_where_the_cpu_has_it(monkeypatch):
    cpu = torch.device("cpu")
    assert use_bf16("bf16", cpu) and not use_bf16("fp32", cpu)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert not use_bf16("auto", cpu)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    assert use_bf16("auto", cpu)
