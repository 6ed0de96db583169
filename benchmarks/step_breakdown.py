"""Where a training step's time goes, and the MFU that leaves within reach.

MFU divides counted model FLOPs by the matmul peak, so every millisecond a step spends outside matrix
products, and every product that runs below the peak, lowers it. This module times steps without a
profiler (the wall time), then runs as many again under torch.profiler (CPU) for the self time of each
kind of kernel:

- linear_products: the layers' matrix products (oneDNN's ``_linear_pointwise``, or ``mm``/``addmm``);
- attention_products: batched products and fused attention kernels;
- optimizer: the fused AdamW kernel;
- cross_entropy: log-softmax and NLL, forward and backward, over the vocabulary;
- other: the step's wall time minus those (elementwise kernels, copies, framework and Python dispatch).

From them it derives two bounds: the MFU if the step were its products alone, and if it were its
products, optimizer and cross-entropy (work every step must do, the last two memory-bound). A target
above a bound is out of reach without faster products, whatever else is removed.
"""

from __future__ import annotations

from typing import Callable

from torch.profiler import ProfilerActivity, profile

CATEGORIES = {
    "linear_products": ("mkldnn::_linear_pointwise", "aten::mm", "aten::addmm"),
    "attention_products": ("aten::bmm", "aten::baddbmm", "aten::_scaled_dot_product_flash_attention_for_cpu",
                           "aten::_scaled_dot_product_flash_attention_for_cpu_backward"),
    "optimizer": ("aten::_fused_adamw_", "aten::_fused_adam_"),
    "cross_entropy": ("aten::_log_softmax", "aten::_log_softmax_backward_data", "aten::nll_loss_forward",
                      "aten::nll_loss_backward"),
}


def kernel_seconds(key_averages) -> dict[str, float]:
    """Self CPU seconds per category of a profiler's key_averages() (events of other kinds ignored)."""
    by_key = {event.key: event.self_cpu_time_total / 1e6 for event in key_averages}
    return {category: sum(by_key.get(key, 0.0) for key in keys) for category, keys in CATEGORIES.items()}


def step_breakdown(run: Callable[[], float], steps: int, flops: float, peak_flops: float) -> dict:
    """run() trains `steps` steps (the same ones each call) and returns their wall seconds; flops are
    their counted model FLOPs, peak_flops the matmul peak MFU divides by. Milliseconds per step."""
    wall = run()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    seconds = kernel_seconds(prof.key_averages())
    products = seconds["linear_products"] + seconds["attention_products"]
    must = products + seconds["optimizer"] + seconds["cross_entropy"]
    out = {"steps": steps, "step_ms": 1e3 * wall / steps}
    out |= {f"{category}_ms": 1e3 * s / steps for category, s in seconds.items()}
    out["other_ms"] = 1e3 * max(0.0, wall - sum(seconds.values())) / steps
    out |= {
        "products_counted_gflops": flops / products / 1e9 if products else None,
        "mfu": flops / (peak_flops * wall),
        "mfu_bound_products_only": flops / (peak_flops * products) if products else None,
        "mfu_bound_products_optimizer_cross_entropy": flops / (peak_flops * must) if must else None,
        "is": "step_ms: wall time without the profiler; each *_ms: that kind of kernel's self time under "
              "torch.profiler; other_ms: the rest of the wall time. products_counted_gflops: counted model "
              "FLOPs / product time. mfu_bound_*: counted FLOPs / (peak x that time alone)",
    }
    return out
