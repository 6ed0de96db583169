"""FastDropout: Bernoulli(p) drops with exact expectation, gradients through the same mask, seeded
determinism, and a drop-in swap that leaves the model's state untouched."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tsdae.model.fast.dropout import FastDropout, keep_scale_mask, use_fast_dropout


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_drop_rate_and_scale(p):
    torch.manual_seed(0)
    mask = keep_scale_mask(torch.Size([1_000_003]), p, torch.float32, torch.device("cpu"))
    dropped = (mask == 0).float().mean().item()
    effective_p = round(p * 65536) / 65536
    assert dropped == pytest.approx(effective_p, abs=4 * (p * (1 - p) / mask.numel()) ** 0.5)
    kept = mask[mask != 0]
    assert torch.all(kept == 1 / (1 - effective_p))  # survivors scaled so the expectation is unchanged


def test_forward_backward_use_one_mask_and_eval_is_identity():
    torch.manual_seed(0)
    drop = FastDropout(0.3)
    x = torch.randn(4, 7, 33, requires_grad=True)
    y = drop(x)
    y.sum().backward()
    mask = x.grad
    torch.testing.assert_close(y, x.detach() * mask)
    assert 0.2 < (mask == 0).float().mean().item() < 0.4
    drop.eval()
    assert torch.equal(drop(x), x)


def test_seeded_masks_repeat_and_differ_between_calls():
    x = torch.ones(64, 64)
    drop = FastDropout(0.5)
    torch.manual_seed(3)
    a, b = drop(x), drop(x)
    torch.manual_seed(3)
    assert torch.equal(drop(x), a)
    assert not torch.equal(a, b)


def test_edge_probabilities():
    x = torch.randn(10, 10)
    assert torch.equal(FastDropout(0.0)(x), x)
    assert torch.equal(FastDropout(1.0)(x), torch.zeros_like(x))
    assert torch.equal(FastDropout(1e-9)(x), x)  # rounds to no drop: nothing scaled either


def test_use_fast_dropout_swaps_every_plain_dropout_and_keeps_state():
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.2), nn.Sequential(nn.Dropout(0.1), nn.Linear(4, 2)))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert use_fast_dropout(model) == 2
    assert [type(m) for m in model.modules() if isinstance(m, nn.Dropout)] == [FastDropout, FastDropout]
    assert [m.p for m in model.modules() if isinstance(m, nn.Dropout)] == [0.2, 0.1]
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert use_fast_dropout(model) == 0


def test_every_element_of_a_word_drops_alike():
    """Each 64-bit draw feeds four elements; all four 16-bit shares must be uniform (the sign bit too)."""
    torch.manual_seed(0)
    mask = keep_scale_mask(torch.Size([400_000, 4]), 0.5, torch.float32, torch.device("cpu"))
    per_share = (mask == 0).float().mean(0)
    torch.testing.assert_close(per_share, torch.full((4,), 0.5), atol=0.005, rtol=0)


def test_use_fast_dropout_can_be_undone():
    model = nn.Sequential(nn.Dropout(0.2), nn.Linear(3, 3), nn.Dropout(0.4))
    use_fast_dropout(model)
    assert use_fast_dropout(model, fast=False) == 2
    assert [(type(m), m.p) for m in model.modules() if isinstance(m, nn.Dropout)] == [(nn.Dropout, 0.2), (nn.Dropout, 0.4)]


def test_torch_compile_draws_the_masks_in_its_graph_without_breaking_it():
    from tsdae.model.fast.dropout import dropout_multiplier

    def step(x):
        keep = dropout_multiplier(x.shape, 0.5, x.dtype, x.device)
        return FastDropout(0.5)(x) * keep

    x = torch.ones(64, 64)
    explained = torch._dynamo.explain(step)(x)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    dropped = (torch.compile(step, backend="eager")(x) == 0).float().mean().item()
    assert dropped == pytest.approx(0.75, abs=0.05)  # two independent masks of p = 0.5
