"""The benchmark's counted model FLOPs agree with torch's FlopCounterMode on a small BERT TSDAE."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode
from transformers import BertConfig, BertLMHeadModel, BertModel

from tsdae.train.flops import Shape, forward_flops, training_flops
from tsdae.model.fast.decoder import cross_attention_projections
from tsdae.model import TSDAE, tie_decoder_to_encoder


@pytest.fixture
def small_tsdae():
    torch.manual_seed(0)
    kwargs = dict(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=160)
    encoder = BertModel(BertConfig(**kwargs))
    decoder = BertLMHeadModel(BertConfig(**kwargs, is_decoder=True, add_cross_attention=True))
    tie_decoder_to_encoder(encoder, decoder)
    encoder.pooler.requires_grad_(False)
    for p in cross_attention_projections(decoder):
        p.requires_grad_(False)
    return TSDAE(encoder, decoder, "cls", pad_id=0).eval()


def test_training_flops_match_torch_flop_counter(small_tsdae):
    model = small_tsdae
    S, T = 7, 12  # one sentence: no padding, every label real
    noisy = torch.randint(1, 97, (1, S))
    target = torch.randint(1, 97, (1, T))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(noisy, torch.ones_like(noisy), target).backward()
    shape = Shape.of(model.encoder.config)
    H, L, P = shape.hidden, shape.layers, T - 1
    # torch counts every query-key pair of the causal self-attention; we count the P(P+1)/2 needed ones.
    full_minus_causal = 3 * L * 4 * H * (P * P - P * (P + 1) // 2)
    # (BERT's pooler is not run: nothing uses it. With CLS pooling the encoder's last layer runs past its
    # keys and values for the first token only, which the count assumes by default.)
    expected = training_flops(shape, [S], [T]) + full_minus_causal
    assert counter.get_total_flops() == expected


def test_full_last_layer_count_adds_the_other_tokens_work():
    shape = Shape(hidden=384, intermediate=1536, layers=6, vocab=30522)
    S, H, F = 12, 384, 1536
    full, cls_only = forward_flops(shape, S, 28, first_token_only=False), forward_flops(shape, S, 28)
    assert full - cls_only == (S - 1) * 2 * (2 * H * H + 2 * H * F) + 4 * (S * S - S) * H


def test_plain_decoder_count_adds_the_per_token_cross_attention():
    shape = Shape(hidden=384, intermediate=1536, layers=6, vocab=30522)
    ours, plain = forward_flops(shape, 12, 28), forward_flops(shape, 12, 28, single_key=False)
    P, H = 27, 384
    assert plain - ours == 6 * (2 * (2 * P * H * H + 2 * H * H) + 4 * P * H - 4 * H * H)


def test_the_peak_is_the_best_library_and_cpu_fp32_measures_onednn_too():
    from tsdae.model.fast import linear
    from tsdae.train.flops import matmul_peak_by_library, matmul_peak_flops

    peaks = matmul_peak_by_library(torch.device("cpu"), torch.float32, n=128, repeats=1)
    assert set(peaks) == ({"F.linear", "onednn"} if linear.available() else {"F.linear"})
    assert all(p > 0 for p in peaks.values())
    assert set(matmul_peak_by_library(torch.device("cpu"), torch.bfloat16, n=64, repeats=1)) == {"F.linear"}
    assert matmul_peak_flops(torch.device("cpu"), n=64, repeats=1) > 0


def test_the_peak_includes_the_models_own_layer_shapes(small_tsdae, monkeypatch):
    """A model's layers are timed too, so a peak is never below what they reach (a large emulated-bf16
    square alone was, and gave an MFU above 1)."""
    from tsdae.train import flops

    assert flops.linear_shapes(small_tsdae) == [(64, 64), (64, 97), (64, 160), (160, 64)]
    timed = []
    real = F.linear

    def recording(x, w, *args):
        timed.append((x.shape[0], x.shape[1], w.shape[0]))
        return real(x, w, *args)

    monkeypatch.setattr(flops.F, "linear", recording)
    flops.matmul_peak_by_library(torch.device("cpu"), torch.bfloat16, n=32, repeats=1,
                                 layers=flops.linear_shapes(small_tsdae), rows=8)
    assert set(timed) == {(32, 32, 32), (8, 64, 64), (8, 64, 97), (8, 64, 160), (8, 160, 64)}
