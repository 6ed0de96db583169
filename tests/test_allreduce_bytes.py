"""benchmarks.allreduce: the comm hook counts every gradient DDP all-reduces (fp32: 4 bytes per trainable
parameter, once per step whatever the number of micro-batches), and the scaling rule's arithmetic."""

from __future__ import annotations

import socket

import pytest
import torch.distributed as dist

from benchmarks.allreduce import allreduce_bytes_per_step, per_gpu_batch_for
from tsdae.model import ModelConfig, build_tsdae
from tsdae.train import pad_batch

NOISY = [[101, 7, 8, 102], [101, 9, 102]]
TARGET = [[101, 7, 5, 8, 102], [101, 9, 6, 6, 102]]


@pytest.fixture
def one_rank_gloo(monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("micro_batches", [1, 2])
def test_bytes_are_every_trainable_gradient_once_per_step(one_rank_gloo, tiny_bert_dir, micro_batches):
    model = build_tsdae(ModelConfig(name_or_path=tiny_bert_dir))[0]
    model.train()
    parts = [pad_batch({"noisy_ids": NOISY, "target_ids": TARGET}, pad_id=0) for _ in range(micro_batches)]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert allreduce_bytes_per_step(model, parts) == 4 * trainable


def test_per_gpu_batch_keeps_the_allreduce_at_its_share():
    # 1 GB over 8 ranks at 100 Gbit/s: 2*7/8*8e9/1e11 = 0.14 s; 1 TFLOP per sentence at 50% of 100 TFLOP/s = 20 ms
    row = per_gpu_batch_for(1e9, 1e12, 100e9, 100e12, share=0.10, mfu=0.5, world=8)
    assert row["allreduce_ms"] == pytest.approx(140.0)
    assert row["per_gpu_batch"] in (63, 64)  # 0.14 * 9 / 0.02 = 63, rounded up
    per_sentence_ms = row["compute_ms"] / row["per_gpu_batch"]
    assert per_sentence_ms == pytest.approx(20.0)
    assert row["allreduce_ms"] / (row["allreduce_ms"] + row["compute_ms"]) <= 0.10 + 1e-9
