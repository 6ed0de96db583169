"""Export: sentence-transformers and plain transformers load the encoder and agree with our embeddings."""

from __future__ import annotations

import pytest
import torch

from tsdae.model import ModelConfig
from tsdae.model import export_decoder, export_encoder, model_pooling
from tsdae.model import build_tsdae

SENTENCES = ["a man is playing a guitar", "the weather is nice today", "short"]


@pytest.mark.parametrize("pooling", ["cls", "mean", "max"])
def test_sentence_transformers_loads_same_embeddings(tiny_bert_dir, tmp_path, pooling):
    st = pytest.importorskip("sentence_transformers")
    model, tokenizer = build_tsdae(ModelConfig(name_or_path=tiny_bert_dir, pooling=pooling))
    # Move the weights away from the checkpoint so the test sees the trained encoder, not the base one.
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.add_(0.01 * torch.randn_like(p))
    model.eval()
    out = export_encoder(model, tokenizer, tmp_path / "encoder", max_seq_length=64)
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        ours = model.embed(batch["input_ids"], batch["attention_mask"])
    theirs = st.SentenceTransformer(str(out), device="cpu").encode(SENTENCES, convert_to_tensor=True)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-4)
    assert model_pooling(str(out)) == pooling


def test_plain_transformers_loads_encoder_and_decoder(tiny_bert_dir, tmp_path):
    from transformers import AutoModel, AutoModelForCausalLM

    model, tokenizer = build_tsdae(ModelConfig(name_or_path=tiny_bert_dir))
    model.eval()
    enc_dir = export_encoder(model, tokenizer, tmp_path / "encoder", max_seq_length=64)
    dec_dir = export_decoder(model, tokenizer, tmp_path / "decoder")
    encoder = AutoModel.from_pretrained(enc_dir).eval()
    decoder = AutoModelForCausalLM.from_pretrained(dec_dir).eval()
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(encoder(**batch).last_hidden_state, model.encoder(**batch).last_hidden_state)
        emb = model.embed(batch["input_ids"], batch["attention_mask"])[:, None]
        ids = batch["input_ids"][:, :-1]
        torch.testing.assert_close(
            decoder(input_ids=ids, encoder_hidden_states=emb).logits,
            model.decoder(input_ids=ids, encoder_hidden_states=emb).logits,
        )
