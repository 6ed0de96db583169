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

from tsdae import linear


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


def matmul_peak_by_library(device: torch.device, dtype: torch.dtype = torch.float32, n: int = 2048,
                           repeats: int = 3) -> dict[str, float]:
    """Best FLOP/s of an n×n×n matmul over `repeats` timed products (after one warm-up), per library.

    "torch.mm" always; "onednn" too on CPU in fp32 where tsdae.linear can use it. On AMD CPUs torch.mm's
    MKL runs AVX2 kernels: on the benchmark machine (Zen 5) it measures ~205 GFLOP/s where oneDNN
    measures ~450, so a peak from torch.mm alone would overstate MFU about twofold.
    """
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    products = {"torch.mm": lambda: torch.mm(a, b, out=out)}
    if device.type == "cpu" and dtype == torch.float32 and linear.available():
        products["onednn"] = lambda: linear.fast_linear(a, b)  # a @ b.T: the same n³ multiply-adds
    peaks = {}
    for name, product in products.items():
        product()
        sync()
        best = 0.0
        for _ in range(repeats):
            t0 = time.perf_counter()
            product()
            sync()
            best = max(best, 2 * n**3 / (time.perf_counter() - t0))
        peaks[name] = best
    return peaks


def matmul_peak_flops(device: torch.device, dtype: torch.dtype = torch.float32, n: int = 2048,
                      repeats: int = 3) -> float:
    """The matmul peak MFU divides by: the best library's (matmul_peak_by_library)."""
    return max(matmul_peak_by_library(device, dtype, n, repeats).values())
