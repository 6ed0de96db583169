"""The packed BERT encoder path equals the Hugging Face encoder at every real token, and the whole TSDAE
step with it (and with sparse word-embedding gradients) gives the plain path's loss and gradients."""

from __future__ import annotations

import pytest
import torch

from tsdae.model import ModelConfig
from tsdae.model.fast.encoder import encoder_hidden_states, supports_fast_encoder
from tsdae.model import build_tsdae

NOISY = ["cat mat", "much longer sentence distributed training embeddings many machines", "short"]


@pytest.fixture
def tiny(tiny_bert_dir, target_sentences):
    torch.manual_seed(0)
    model, tokenizer = build_tsdae(ModelConfig(name_or_path=tiny_bert_dir))
    noisy = tokenizer(NOISY, padding=True, return_tensors="pt")
    target = tokenizer(target_sentences, padding=True, return_tensors="pt")
    assert (noisy["attention_mask"] == 0).sum() > 5, "the noisy batch must be padded for the test to mean anything"
    return model.eval(), noisy, target


def test_packed_encoder_equals_huggingface_at_real_tokens(tiny):
    model, noisy, _ = tiny
    assert supports_fast_encoder(model.encoder)
    with torch.no_grad():
        plain = model.encoder(**noisy).last_hidden_state
        packed = encoder_hidden_states(model.encoder, noisy["input_ids"], noisy["attention_mask"])
    real = noisy["attention_mask"].bool()
    torch.testing.assert_close(packed[real], plain[real], atol=1e-5, rtol=1e-5)
    assert (packed[~real] == 0).all()


def _step(model, noisy, target, fast: bool):
    model.fast = fast
    model.zero_grad(set_to_none=True)
    loss = model(noisy["input_ids"], noisy["attention_mask"], target["input_ids"])
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("pooling", ["cls", "mean", "max"])
def test_training_step_equals_plain_path(tiny, pooling):
    model, noisy, target = tiny
    model.pooling = pooling
    plain_loss, plain = _step(model, noisy, target, fast=False)
    fast_loss, fast = _step(model, noisy, target, fast=True)
    assert fast_loss == pytest.approx(plain_loss, abs=1e-5)
    assert fast.keys() == plain.keys()
    words = model.encoder.get_input_embeddings().weight
    assert words.grad is not None and words.grad.layout == torch.strided  # sparse lookups sum into one dense grad
    for name in plain:
        torch.testing.assert_close(fast[name], plain[name], atol=1e-5, rtol=1e-4, msg=name)


def test_other_encoders_take_the_plain_path():
    from transformers import RobertaConfig, RobertaModel

    config = RobertaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=32)
    assert not supports_fast_encoder(RobertaModel(config))
