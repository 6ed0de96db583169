"""The fast BERT decoder path equals the plain Hugging Face call: loss and every gradient, fp32, tiny model."""

from __future__ import annotations

import pytest
import torch

from tsdae.model import ModelConfig
from tsdae.model.fast.decoder import (
    cross_attention_projections,
    decoder_hidden_states,
    decoder_label_states,
    project_dropped_heads,
    supports_fast_decoder,
)
from tsdae.model import build_tsdae, tsdae_loss

@pytest.fixture
def tiny(tiny_bert_dir, target_sentences):
    torch.manual_seed(0)
    model, tokenizer = build_tsdae(ModelConfig(name_or_path=tiny_bert_dir))
    target = tokenizer(target_sentences, padding=True, return_tensors="pt")
    assert (target["attention_mask"] == 0).any()
    return model, target


def _loss_and_grads(model, target, **kwargs):
    model.zero_grad(set_to_none=True)
    emb = torch.randn(target["input_ids"].shape[0], model.decoder.config.hidden_size, generator=torch.Generator().manual_seed(1))
    emb.requires_grad_(True)
    loss = tsdae_loss(model.decoder, emb, target["input_ids"], model.pad_id, **kwargs)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.item(), emb.grad.clone(), grads


@pytest.mark.parametrize("with_mask", [False, True])
def test_fast_path_equals_plain_huggingface_call(tiny, with_mask):
    model, target = tiny
    model.eval()  # dropout off: both paths are deterministic
    assert supports_fast_decoder(model.decoder)
    mask = target["attention_mask"] if with_mask else None
    plain = _loss_and_grads(model, target, decoder_attention_mask_BT=mask, fast=False)
    fast = _loss_and_grads(model, target, decoder_attention_mask_BT=mask, fast=True)
    assert fast[0] == pytest.approx(plain[0], abs=1e-5)
    torch.testing.assert_close(fast[1], plain[1], atol=1e-5, rtol=1e-4)
    assert fast[2].keys() == plain[2].keys()
    for name in plain[2]:
        torch.testing.assert_close(fast[2][name], plain[2][name], atol=1e-5, rtol=1e-4, msg=name)


def test_dropout_branch_matches_when_dropout_is_negligible(tiny):
    """Train mode with p=1e-9 takes the per-head dropout branch of the cross-attention, keeps every head."""
    model, target = tiny
    model.train()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 1e-9
    plain = _loss_and_grads(model, target, fast=False)
    fast = _loss_and_grads(model, target, fast=True)
    assert fast[0] == pytest.approx(plain[0], abs=1e-5)
    for name in plain[2]:
        torch.testing.assert_close(fast[2][name], plain[2][name], atol=1e-5, rtol=1e-4, msg=name)


def test_full_cross_attention_variant_matches(tiny):
    model, target = tiny
    model.eval()
    emb = torch.randn(target["input_ids"].shape[0], 32)
    ids = target["input_ids"][:, :-1]
    with torch.no_grad():
        a = decoder_hidden_states(model.decoder, emb, ids, single_key_cross_attention=True)
        b = decoder_hidden_states(model.decoder, emb, ids, single_key_cross_attention=False)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_project_dropped_heads_equals_dense_of_masked_context():
    torch.manual_seed(0)
    B, T, N, D = 3, 5, 4, 8
    dense = torch.nn.Linear(N * D, N * D)
    v_BH = torch.randn(B, N * D)
    keep_BTN = torch.bernoulli(torch.full((B, T, N), 0.7)) / 0.7
    ctx_BTH = (keep_BTN[..., None] * v_BH.view(B, 1, N, D)).reshape(B, T, N * D)
    torch.testing.assert_close(project_dropped_heads(dense, v_BH, keep_BTN), dense(ctx_BTH), atol=1e-5, rtol=1e-5)


def test_cross_attention_query_key_have_zero_gradient_and_are_frozen(tiny_bert_dir, tiny):
    """The softmax over one key is constant: in the plain path their gradient is zero up to float rounding
    (~1e-12 here), and they cannot change the output, so freezing them changes no result."""
    model, target = tiny
    frozen = cross_attention_projections(model.decoder)
    assert len(frozen) == 4 * model.decoder.config.num_hidden_layers
    assert not any(p.requires_grad for p in frozen)
    assert all(p.requires_grad for p in model.parameters() if all(p is not f for f in frozen)
               and p is not model.encoder.pooler.dense.weight and p is not model.encoder.pooler.dense.bias)
    for p in frozen:
        p.requires_grad_(True)
    _loss_and_grads(model, target, fast=False)
    assert all(p.grad is not None and p.grad.abs().max() < 1e-9 for p in frozen)


def test_other_decoders_take_the_plain_path(tiny_bert_dir):
    from transformers import RobertaConfig, RobertaForCausalLM

    config = RobertaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=32, is_decoder=True, add_cross_attention=True)
    assert not supports_fast_decoder(RobertaForCausalLM(config))


def test_packed_label_states_equal_the_padded_path_at_real_labels(tiny):
    """Packing the decoder to the positions with a real label (a prefix of each right-padded row) changes
    nothing there: causal attention never looks past them."""
    model, target = tiny
    model.eval()
    emb = torch.randn(target["input_ids"].shape[0], 32)
    ids, labels = target["input_ids"][:, :-1], target["input_ids"][:, 1:]
    keep = labels != model.pad_id
    assert (keep != (ids != model.pad_id)).any(), "the [SEP] input positions must be dropped too"
    with torch.no_grad():
        padded = decoder_hidden_states(model.decoder, emb, ids)[keep]
        packed = decoder_label_states(model.decoder, emb, ids, keep)
    torch.testing.assert_close(packed, padded, atol=1e-5, rtol=1e-5)
