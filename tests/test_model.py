"""The TSDAE model and loss on a tiny random BERT: equality with the reference, masking, tying, errors."""

from __future__ import annotations

import pytest
import torch

from tsdae.model import ModelConfig
from tsdae.model import ModelError, build_tsdae, tsdae_loss

SENTENCES = [
    "the cat sat on the mat",
    "a much longer sentence about distributed training of sentence embeddings on many machines",
    "short one",
    "ray data streams parquet files from object storage",
]
NOISY = ["cat mat", "longer about training embeddings machines", "one", "ray streams files storage"]


def _batch(tokenizer):
    noisy = tokenizer(NOISY, padding=True, return_tensors="pt")
    target = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    assert tokenizer.padding_side == "right"
    return noisy, target


@pytest.fixture
def tiny(tiny_bert_dir):
    torch.manual_seed(0)
    model, tokenizer = build_tsdae(ModelConfig(name_or_path=tiny_bert_dir))
    return model.eval(), tokenizer


@pytest.mark.parametrize("fast", [True, False])
def test_loss_equals_reference_implementation(tiny_bert_dir, tiny, fast):
    st = pytest.importorskip("sentence_transformers")
    from sentence_transformers.sentence_transformer.losses import DenoisingAutoEncoderLoss
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer

    model, tokenizer = tiny
    model.fast = fast  # the fast BERT paths (the default) and the plain Hugging Face call
    reference = st.SentenceTransformer(
        modules=[
            Transformer(tiny_bert_dir, max_seq_length=64),
            Pooling(32, pooling_mode="cls"),
        ],
        device="cpu",
    )
    ref_loss = DenoisingAutoEncoderLoss(reference, tie_encoder_decoder=True)
    # Same weights: the reference's decoder gets ours (cross-attention is freshly initialised in both).
    ref_loss.decoder.load_state_dict(model.decoder.state_dict())
    ref_loss.eval()
    noisy, target = _batch(tokenizer)
    with torch.no_grad():
        expected = ref_loss([dict(noisy), dict(target)], labels=None)
        ours = model(noisy["input_ids"], noisy["attention_mask"], target["input_ids"])
    assert torch.isfinite(ours)
    assert ours.item() == pytest.approx(expected.item(), abs=1e-5)


def test_explicit_decoder_padding_mask_changes_nothing(tiny):
    model, tokenizer = tiny
    noisy, target = _batch(tokenizer)
    assert (target["attention_mask"] == 0).any(), "the batch must contain padding for this test to mean anything"
    with torch.no_grad():
        emb = model.embed(noisy["input_ids"], noisy["attention_mask"])
        without = tsdae_loss(model.decoder, emb, target["input_ids"], model.pad_id)
        with_mask = tsdae_loss(model.decoder, emb, target["input_ids"], model.pad_id, target["attention_mask"])
    assert without.item() == pytest.approx(with_mask.item(), abs=1e-6)


def test_padding_labels_are_ignored(tiny):
    """Extra right padding on the targets must not change the loss."""
    model, tokenizer = tiny
    noisy, target = _batch(tokenizer)
    padded = torch.nn.functional.pad(target["input_ids"], (0, 5), value=tokenizer.pad_token_id)
    with torch.no_grad():
        a = model(noisy["input_ids"], noisy["attention_mask"], target["input_ids"])
        b = model(noisy["input_ids"], noisy["attention_mask"], padded)
    assert a.item() == pytest.approx(b.item(), abs=1e-6)


def test_decoder_body_shares_encoder_parameters(tiny):
    model, _ = tiny
    enc, dec = model.encoder, model.decoder
    assert dec.base_model.embeddings.word_embeddings.weight is enc.embeddings.word_embeddings.weight
    assert dec.get_output_embeddings().weight is enc.embeddings.word_embeddings.weight
    assert dec.base_model.encoder.layer[0].attention.self.query.weight is enc.encoder.layer[0].attention.self.query.weight
    # A gradient step through the decoder alone moves the encoder's weights.
    before = enc.encoder.layer[1].output.dense.weight.detach().clone()
    emb = torch.randn(2, 32)
    ids = torch.tensor([[101, 2023, 2003, 102], [101, 2008, 102, 0]])
    tsdae_loss(dec, emb, ids, 0).backward()
    torch.optim.SGD(model.parameters(), lr=1.0).step()
    assert not torch.equal(before, enc.encoder.layer[1].output.dense.weight)


def test_untied_decoder_has_its_own_weights(tiny_bert_dir):
    model, _ = build_tsdae(ModelConfig(name_or_path=tiny_bert_dir, tie_decoder=False, decoder_name_or_path=tiny_bert_dir))
    assert model.decoder.base_model.embeddings.word_embeddings.weight is not model.encoder.embeddings.word_embeddings.weight


def test_decoder_with_other_vocabulary_is_rejected(tiny_bert_dir, tmp_path):
    from transformers import BertConfig, BertModel, BertTokenizerFast

    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world"]))
    other = tmp_path / "other"
    BertModel(BertConfig(vocab_size=7, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(other)
    BertTokenizerFast(vocab=str(vocab)).save_pretrained(other)
    with pytest.raises(ModelError, match="different vocabularies"):
        build_tsdae(ModelConfig(name_or_path=tiny_bert_dir, tie_decoder=False, decoder_name_or_path=str(other)))


def test_model_without_causal_lm_head_is_a_clear_error(tmp_path, tiny_bert_dir):
    from transformers import AutoTokenizer, DistilBertConfig, DistilBertModel

    path = tmp_path / "tiny-distilbert"
    DistilBertModel(DistilBertConfig(vocab_size=30522, dim=32, n_layers=1, n_heads=2, hidden_dim=64)).save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_bert_dir).save_pretrained(path)
    with pytest.raises(ModelError, match="tiny-distilbert"):
        build_tsdae(ModelConfig(name_or_path=str(path)))


@pytest.mark.parametrize("pooling", ["cls", "mean", "max"])
def test_poolings_train(tiny_bert_dir, pooling):
    model, tokenizer = build_tsdae(ModelConfig(name_or_path=tiny_bert_dir, pooling=pooling))
    noisy, target = _batch(tokenizer)
    loss = model(noisy["input_ids"], noisy["attention_mask"], target["input_ids"])
    loss.backward()
    assert model.encoder.encoder.layer[0].attention.self.query.weight.grad.abs().sum() > 0
