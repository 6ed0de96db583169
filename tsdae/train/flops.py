"""Counted model FLOPs of a TSDAE training step, and the matmul peak they are divided by (MFU).

The peak is the fastest matmul this process can run on the device, over the libraries our step uses.

FLOPs are counted from the architecture and each sentence's real token counts (no padding), matmuls
only (2 FLOPs per multiply-add), training = 3 × forward (the backward computes an input and a weight
gradient per matmul). tests/test_flops.py checks the count against torch's FlopCounterMode.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tsdae.model.fast import fast_linear, onednn_available


@dataclass(frozen=True)
class Shape:
    """What the FLOP count needs from a BERT config."""

    hidden: int
    intermediate: int
    layers: int
    vocab: int

    @classmethod
    def of(cls, config) -> "Shape":
        return cls(config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.vocab_size)


def forward_flops(shape: Shape, noisy_tokens: int, target_tokens: int, *, single_key: bool = True,
                  first_token_only: bool = True) -> int:
    """Forward matmul FLOPs of one sentence: encoder on its noisy tokens, decoder on its target.

    The decoder reads target_tokens - 1 positions and predicts as many labels (all real tokens).
    single_key=True counts what the model needs: the cross-attention's value and output projections once
    per sentence. False counts what the plain Hugging Face decoder does: a query and an output projection
    per token, a key and a value per sentence, and the attention products against the one key.
    first_token_only=True (CLS pooling) counts what the sentence vector needs of the encoder's last layer:
    keys and values of every token, the rest for the first token only. False: the full last layer.
    """
    H, F, L, V = shape.hidden, shape.intermediate, shape.layers, shape.vocab
    S, P = noisy_tokens, target_tokens - 1
    per_token_layer = 2 * (4 * H * H + 2 * H * F)  # q, k, v, attention output; FFN in and out
    full_layer = S * per_token_layer + 4 * S * S * H  # + QK^T and AV over all S×S pairs
    if first_token_only:
        last_layer = S * 2 * 2 * H * H + 2 * (2 * H * H + 2 * H * F) + 4 * S * H
    else:
        last_layer = full_layer
    encoder = (L - 1) * full_layer + last_layer
    causal_pairs = P * (P + 1) // 2
    self_attention = P * per_token_layer + 4 * causal_pairs * H
    if single_key:
        cross = 2 * 2 * H * H
    else:
        cross = 2 * (2 * P * H * H + 2 * H * H) + 4 * P * H
    head = P * 2 * (H * H + H * V)  # transform dense + vocabulary projection
    return encoder + L * (self_attention + cross) + head


def training_flops(shape: Shape, noisy_lengths, target_lengths, *, single_key: bool = True,
                   first_token_only: bool = True) -> int:
    """Model FLOPs of a training step over sentences with these token counts (3 × forward)."""
    return 3 * sum(forward_flops(shape, s, t, single_key=single_key, first_token_only=first_token_only)
                   for s, t in zip(noisy_lengths, target_lengths))


def linear_shapes(model: torch.nn.Module) -> list[tuple[int, int]]:
    """The distinct (in_features, out_features) of a model's linear layers."""
    return sorted({(m.in_features, m.out_features) for m in model.modules() if isinstance(m, torch.nn.Linear)})


def matmul_peak_by_library(device: torch.device, dtype: torch.dtype = torch.float32, n: int = 2048,
                           repeats: int = 3, layers: list[tuple[int, int]] = (), rows: int = 512) -> dict[str, float]:
    """Best FLOP/s per library over `repeats` timed products (after one warm-up) on the kernels our linear
    layers run: "F.linear" (what nn.Linear calls; in bf16, what a layer runs under bf16 autocast) and, on
    CPU in fp32 where tsdae.model.fast.linear uses it, "onednn". The products: one n×n×n, and for each
    (in, out) of layers (``linear_shapes(model)``) a rows×in by in×out one, so the peak is never below
    what the model's own layers reach.

    On kernels and shapes the model uses, not torch.mm on one large square: on an AVX2-only Zen 3, bf16
    (emulated there) ran at ~1.3 GFLOP/s on a 1024³ torch.mm, far below the small products of a tiny
    model's bf16 layers, which put its MFU at 2.45. On AMD CPUs fp32 MKL (F.linear) measures ~205 GFLOP/s
    on 2048³ where oneDNN measures ~450 (Zen 5).
    """
    shapes = [(n, n, n)] + [(rows, i, o) for i, o in layers]
    inputs = [(torch.randn(m, k, device=device, dtype=dtype), torch.randn(o, k, device=device, dtype=dtype))
              for m, k, o in shapes]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    libraries = {"F.linear": F.linear}
    if device.type == "cpu" and dtype == torch.float32 and onednn_available():
        libraries["onednn"] = fast_linear
    peaks = {}
    for name, product in libraries.items():
        best = 0.0
        for (m, k, o), (x, w) in zip(shapes, inputs):
            product(x, w)
            sync()
            for _ in range(repeats):
                t0 = time.perf_counter()
                product(x, w)
                sync()
                best = max(best, 2 * m * k * o / (time.perf_counter() - t0))
        peaks[name] = best
    return peaks


def matmul_peak_flops(device: torch.device, dtype: torch.dtype = torch.float32, n: int = 2048,
                      repeats: int = 3, layers: list[tuple[int, int]] = (), rows: int = 512) -> float:
    """The matmul peak MFU divides by: the best library's (matmul_peak_by_library)."""
    return max(matmul_peak_by_library(device, dtype, n, repeats, layers, rows).values())
