"""benchmarks.step_breakdown: each kind of kernel lands in its category, and the MFU bounds follow."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from benchmarks.step_breakdown import kernel_seconds, step_breakdown


def test_kernel_seconds_sums_self_time_per_category_and_ignores_the_rest():
    events = [SimpleNamespace(key=k, self_cpu_time_total=us) for k, us in [
        ("mkldnn::_linear_pointwise", 3_000_000), ("aten::addmm", 1_000_000), ("aten::bmm", 500_000),
        ("aten::_fused_adamw_", 250_000), ("aten::_log_softmax", 100_000),
        ("aten::_log_softmax_backward_data", 50_000), ("aten::copy_", 9_000_000)]]
    assert kernel_seconds(events) == {"linear_products": 4.0, "attention_products": 0.5, "optimizer": 0.25,
                                      "cross_entropy": pytest.approx(0.15)}


def test_a_real_step_is_split_into_its_kernels_and_bounds_exceed_the_mfu():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 1000))
    optimizer = torch.optim.AdamW(model.parameters(), fused=True)
    x, labels = torch.randn(128, 64), torch.randint(0, 1000, (128,))
    steps = 3

    def run() -> float:
        start = time.perf_counter()
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), labels).backward()
            optimizer.step()
        return time.perf_counter() - start

    flops = steps * 3 * 2 * 128 * (64 * 256 + 256 * 1000)
    out = step_breakdown(run, steps, flops, peak_flops=1e12)
    for key in ("linear_products_ms", "optimizer_ms", "cross_entropy_ms"):
        assert out[key] > 0, key
    assert out["attention_products_ms"] == 0
    parts = sum(out[k] for k in ("linear_products_ms", "optimizer_ms", "cross_entropy_ms", "other_ms"))
    assert out["other_ms"] > 0 and parts == pytest.approx(out["step_ms"])  # other: the rest of the wall time
    assert out["mfu"] < out["mfu_bound_products_optimizer_cross_entropy"] < out["mfu_bound_products_only"]
    assert out["products_counted_gflops"] == pytest.approx(flops / (out["linear_products_ms"] * steps / 1e3) / 1e9)
