"""Linear layers whose fp32 CPU matrix products run on oneDNN instead of MKL.

On CPU, PyTorch multiplies fp32 matrices with MKL's sgemm. On AMD processors MKL runs its AVX2 kernels.
On the benchmark machine (2-core AMD EPYC, Zen 5, full-width AVX-512) that is about half of what the
cores can do. Measured in one process, same torch build:
- a 2048×2048×2048 product: ~205 GFLOP/s with ``torch.mm``, ~450 with oneDNN;
- TSDAE's shapes (224 tokens × 384 → 1536, → 30522): ~200 vs ~420.

oneDNN ships inside PyTorch: ``torch.ops.mkldnn._linear_pointwise`` is the op Inductor uses for CPU
linear layers. Its fp32 path computes in fp32, with no implicit bf16 (its error against float64 is the
same order as MKL's; tested).

``FastLinear`` is an ``nn.Linear`` whose forward, input gradient and weight gradient go through that op
when the input is a non-empty fp32 CPU tensor, CPU autocast is off and the op exists (x86-64 builds with
oneDNN). Anywhere else it is ``nn.Linear``. ``use_fast_linear`` switches a model's linear layers in
place. The Parameter objects stay the same, so tying, optimizers, DDP, state dicts and exports are
unchanged.

Under torch.compile the products stay on oneDNN as one opaque custom op (``tsdae::onednn_product``),
which the compiler calls and does not try to lower: Inductor cannot lower the oneDNN op with dynamic row
counts, and ``F.linear`` would compile to MKL's products (262 ms per TSDAE step against 197 with this op,
measured on 30 length-aware batches). On this CPU the eager step is faster still (benchmarks.compile_step).

oneDNN builds (JIT-compiles) a kernel per problem shape. A TSDAE step's token count changes with every
batch, so rows are zero-padded to a multiple of ``ROW_BUCKET`` (16; coarser for thousands of rows,
``bucket_rows``). That caps the distinct shapes a run builds kernels for, and keeps them within oneDNN's
primitive cache (1,024 by default). Padding rows contribute nothing: their outputs are dropped, their
gradients are zero. A caller that pads its rows itself (``layer_on_onednn``) saves the padded copy.
Measured over 100 fresh batches: 35.7 sentences/s without buckets, 42.9 with buckets of 16.
"""

from __future__ import annotations

import platform

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

ROW_BUCKET = 16


def _onednn_linear_op():
    """torch.ops.mkldnn._linear_pointwise where this build has it on x86-64, else None."""
    if platform.machine().lower() not in ("x86_64", "amd64") or not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._linear_pointwise.default
    except (AttributeError, RuntimeError):
        return None


_LINEAR = _onednn_linear_op()


def available() -> bool:
    """True where FastLinear can run its products on oneDNN (this build, this machine)."""
    return _LINEAR is not None


def bucket_rows(n: int) -> int:
    """n rounded up to a multiple of ROW_BUCKET, or of an eighth of n's power of two where that is larger:
    at most 8 shapes per doubling of n, so a run with large batches builds few kernels too, and under
    1/8 extra rows."""
    step = max(ROW_BUCKET, 1 << max(0, n.bit_length() - 4))
    return -(-n // step) * step


@torch.library.custom_op("tsdae::onednn_product", mutates_args=())
def _compiled_product(x_MK: torch.Tensor, w_NK: torch.Tensor, bias_N: torch.Tensor | None) -> torch.Tensor:
    """The oneDNN product as one opaque op for torch.compile: the compiler calls it, it does not lower it."""
    return _LINEAR(x_MK, w_NK, bias_N, "none", [], "")


@_compiled_product.register_fake
def _(x_MK, w_NK, bias_N):
    return x_MK.new_empty(x_MK.shape[0], w_NK.shape[0])


def _product(x_MK: torch.Tensor, w_NK: torch.Tensor, bias_N: torch.Tensor | None = None) -> torch.Tensor:
    """x_MK @ w_NK.T (+ bias_N), on oneDNN. Transposed (non-contiguous) operands are accepted."""
    if torch.compiler.is_compiling():
        return _compiled_product(x_MK, w_NK, bias_N)
    return _LINEAR(x_MK, w_NK, bias_N, "none", [], "")


def _pad_rows(t_MK: torch.Tensor, rows: int) -> torch.Tensor:
    return t_MK if t_MK.shape[0] == rows else F.pad(t_MK, (0, 0, 0, rows - t_MK.shape[0]))


class _OneDNNLinear(torch.autograd.Function):
    """y = x W^T + b with all three products (y, dx, dW) on oneDNN, rows padded to ROW_BUCKET."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        lead = x.shape[:-1]
        x_MK = x.reshape(-1, x.shape[-1])
        n = x_MK.shape[0]
        x_MK = _pad_rows(x_MK, bucket_rows(n))
        ctx.save_for_backward(x_MK, weight)
        ctx.rows, ctx.has_bias = n, bias is not None
        return _product(x_MK, weight, bias)[:n].view(*lead, weight.shape[0])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x_MK, weight = ctx.saved_tensors
        n = ctx.rows
        g_MN = _pad_rows(grad.reshape(n, grad.shape[-1]), x_MK.shape[0])
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = _product(g_MN, weight.t())[:n].view(*grad.shape[:-1], weight.shape[1])
        if ctx.needs_input_grad[1]:
            dw = _product(g_MN.t(), x_MK.t())  # a fresh tensor: autograd may accumulate into it in place
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = g_MN.sum(0)
        return dx, dw, db


def runs_on_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """True where fast_linear(x, weight) takes the oneDNN path."""
    return (
        _LINEAR is not None
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and x.numel() > 0
        and not torch.is_autocast_enabled("cpu")
    )


def fast_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias), with its products on oneDNN where runs_on_onednn (same values within
    fp32 rounding)."""
    if runs_on_onednn(x, weight):
        return _OneDNNLinear.apply(x, weight, bias)
    return F.linear(x, weight, bias)


class FastLinear(nn.Linear):
    """nn.Linear computed by fast_linear (see the module docstring). Same parameters and state dict."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fast_linear(x, self.weight, self.bias)


def use_fast_linear(module: nn.Module, fast: bool = True) -> int:
    """Make every plain nn.Linear inside module a FastLinear (fast=False: back to nn.Linear), in place;
    returns how many changed.

    The layers keep their identity and Parameters (only the class changes), so tied weights stay tied.
    """
    source, target = (nn.Linear, FastLinear) if fast else (FastLinear, nn.Linear)
    changed = 0
    for layer in module.modules():
        if type(layer) is source:
            layer.__class__ = target
            changed += 1
    return changed


def layer_on_onednn(layer: nn.Module, x: torch.Tensor) -> bool:
    """True where this layer's products on input x run on oneDNN, on rows padded to bucket_rows."""
    return isinstance(layer, FastLinear) and runs_on_onednn(x, layer.weight)


def linear_of(layer: nn.Module):
    """The linear function a module's own layers use: fast_linear inside a FastLinear model, else F.linear."""
    return fast_linear if isinstance(layer, FastLinear) else F.linear
