"""The training step never reads a value back from the device: everything data-dependent (where the real
tokens and labels are, how many labels the global batch has) arrives with the batch from the CPU.

On a GPU each such read (``.item()``, ``.tolist()``, ``bool(t)``, ``nonzero``, a boolean-mask index) stalls
the host until the device has caught up. A CPU cannot show a stall, so these tests make every such read
raise, then run whole training steps: a sync that creeps back in fails here.
"""

from __future__ import annotations

import contextlib
import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist

from tsdae.model import ModelConfig, build_tsdae, packing_of
from tsdae.train import Shape, build_optimizer, train_step
from tsdae.train.collate import RankCollate

ROWS = [[101, 2023, 2003, 1037, 6251, 102], [101, 2460, 102], [101, 1037, 2936, 2028, 2008, 2515, 2307, 102],
        [101, 2054, 2055, 102]]
NOISY = [[101, 2003, 6251, 102], [101, 102], [101, 2936, 2515, 102], [101, 2054, 102]]
HOST_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "numpy", "unique",
              "masked_select")


@contextlib.contextmanager
def no_host_reads(monkeypatch):
    """Every Python-level way of reading a tensor's value back to the host raises while the block runs:
    the methods above, torch.nonzero / torch.unique / torch.masked_select, and indexing with a bool tensor
    (which is a nonzero underneath)."""
    with monkeypatch.context() as patch:
        def refuse(name):
            def read(*args, **kwargs):
                raise AssertionError(f"the step read a tensor back to the host: {name}")
            return read

        for name in HOST_READS:
            patch.setattr(torch.Tensor, name, refuse(f"Tensor.{name}"))
        for name in ("nonzero", "unique", "masked_select"):
            patch.setattr(torch, name, refuse(f"torch.{name}"))
        getitem = torch.Tensor.__getitem__

        def index(self, key):
            keys = key if isinstance(key, tuple) else (key,)
            if any(isinstance(k, torch.Tensor) and k.dtype == torch.bool for k in keys):
                raise AssertionError("the step indexed with a boolean mask (a nonzero underneath)")
            return getitem(self, key)

        patch.setattr(torch.Tensor, "__getitem__", index)
        yield


def _column(rows):
    column = np.empty(len(rows), dtype=object)
    column[:] = [np.asarray(r, dtype=np.int32) for r in rows]
    return column


def _rank_batch(model, micro: int, accumulation: int):
    rows = {"noisy_ids": _column(NOISY), "target_ids": _column(ROWS), "epoch": np.zeros(len(ROWS), dtype=np.int64)}
    collate = RankCollate(rank=0, world=1, global_batch=len(ROWS), deterministic=False, micro=micro,
                          accumulation=accumulation, pad_id=0, shape=Shape.of(model.encoder.config),
                          first_token_only=True, pin=False)
    return collate(rows)


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_a_step_reads_nothing_back_from_the_device(tiny_bert_dir, monkeypatch, pooling):
    torch.manual_seed(0)
    model, _ = build_tsdae(ModelConfig(name_or_path=tiny_bert_dir, pooling=pooling))
    model.train()
    optimizer = build_optimizer(model, 1e-3)
    batch = _rank_batch(model, micro=2, accumulation=2)
    before = [p.detach().clone() for p in model.parameters()]
    with no_host_reads(monkeypatch):
        for _ in range(2):
            loss = train_step(model, optimizer, batch.parts, max_grad_norm=1.0)
    assert torch.isfinite(loss) and loss > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_the_guard_catches_a_sync(tiny_bert_dir, monkeypatch):
    """Without the packing the fast paths find the real tokens themselves (nonzero): refused."""
    model, _ = build_tsdae(ModelConfig(name_or_path=tiny_bert_dir))
    part = _rank_batch(model, micro=4, accumulation=1).parts[0]
    with no_host_reads(monkeypatch), pytest.raises(AssertionError, match="read a tensor back|boolean mask"):
        model(part.noisy_ids, part.noisy_mask, part.target_ids)


def test_the_packing_from_the_cpu_is_what_the_device_would_find(tiny_bert_dir):
    model, _ = build_tsdae(ModelConfig(name_or_path=tiny_bert_dir))
    model.eval()
    part = _rank_batch(model, micro=4, accumulation=1).parts[0]
    found = packing_of(part.noisy_mask, part.target_ids, pad_id=0)
    for given, expected in zip(part.packing, found):
        assert torch.equal(given, expected)
    with torch.no_grad():
        assert model(part.noisy_ids, part.noisy_mask, part.target_ids, part.packing) == pytest.approx(
            float(model(part.noisy_ids, part.noisy_mask, part.target_ids)), rel=1e-6)


@pytest.fixture
def one_rank_group():
    """A gloo process group of one rank in this process, destroyed afterwards."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_a_ddp_step_with_the_global_label_count_all_reduced_reads_nothing_back(tiny_bert_dir, monkeypatch,
                                                                                one_rank_group):
    """The DDP path: the label count's all-reduce (async, launched first) and gradient sync under no_sync."""
    torch.manual_seed(0)
    model, _ = build_tsdae(ModelConfig(name_or_path=tiny_bert_dir))
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = build_optimizer(model, 1e-3)
    batch = _rank_batch(model, micro=2, accumulation=2)
    with no_host_reads(monkeypatch):
        loss = train_step(ddp, optimizer, batch.parts, world=2)  # world 2: the collective path is taken
    assert torch.isfinite(loss)


def test_the_loss_is_the_mean_over_the_global_batchs_labels_whatever_the_micro_batches(tiny_bert_no_dropout_dir):
    """Label sums backpropagated, gradients divided by the global label count: one micro-batch of 4 and
    two of 2 update the weights alike (fp32 rounding)."""
    results = []
    for micro, accumulation in ((4, 1), (2, 2)):
        torch.manual_seed(0)
        model, _ = build_tsdae(ModelConfig(name_or_path=tiny_bert_no_dropout_dir))
        optimizer = build_optimizer(model, 1e-3)
        loss = train_step(model, optimizer, _rank_batch(model, micro, accumulation).parts)
        results.append((float(loss), [p.detach().clone() for p in model.parameters()]))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-5)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_cpu_only_tricks_are_off_on_other_devices():
    """The CPU step's tricks (sparse embedding gradients, 16-bit dropout masks, oneDNN products) are chosen
    by device type: on a CUDA device each is off (a meta tensor stands in for a non-CPU tensor here)."""
    from tsdae.model.fast import dropout, linear
    from tsdae.model.fast.encoder import sparse_lookups

    cuda = torch.device("cuda")
    assert not sparse_lookups(cuda) and sparse_lookups(torch.device("cpu"))
    assert not dropout._cheap_masks(cuda)
    x, w = torch.empty(4, 8, device="meta"), torch.empty(8, 8, device="meta")
    assert not linear.runs_on_onednn(x, w)
    assert linear.runs_on_onednn(torch.ones(4, 8), torch.ones(8, 8)) == linear.available()
