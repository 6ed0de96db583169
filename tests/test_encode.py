"""SentenceEncoder on a tiny random BERT (seconds), and our STS-B number against sentence-transformers'
evaluator on the packaged model (marked ``model``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tsdae.config import EvalConfig
from tsdae.encode import SentenceEncoder, evaluate_model_dir
from tsdae.evaluation import evaluate_sts
from tsdae.sts import load_task

SENTENCES = [
    "a short one",
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "hello",
    'she said "no" twice, then left',
    "A much, much longer sentence that has many more tokens than the others so that padding matters a lot here.",
    "hello",  # a duplicate
    "tokens",
]
STS_DIR = Path(__file__).resolve().parents[1] / "data" / "sts"


def _direct(model_dir: str, sentences: list[str], pooling: str, max_length: int = 128) -> np.ndarray:
    """One sentence at a time, no padding, pooling written out here (not tsdae.pooling)."""
    from transformers import AutoModel, AutoTokenizer

    model, tokenizer = AutoModel.from_pretrained(model_dir).eval(), AutoTokenizer.from_pretrained(model_dir)
    rows = []
    with torch.no_grad():
        for s in sentences:
            hidden_TH = model(**tokenizer(s, truncation=True, max_length=max_length,
                                          return_tensors="pt")).last_hidden_state[0]
            rows.append({"cls": hidden_TH[0], "mean": hidden_TH.mean(0), "max": hidden_TH.max(0).values}[pooling])
    return torch.stack(rows).numpy()


@pytest.mark.parametrize("pooling", ["cls", "mean", "max"])
def test_matches_direct_unbatched_computation(tiny_bert_dir, pooling):
    emb = SentenceEncoder(tiny_bert_dir, pooling, batch_size=3).encode(SENTENCES)
    assert emb.dtype == np.float32 and emb.shape == (len(SENTENCES), 32)
    np.testing.assert_allclose(emb, _direct(tiny_bert_dir, SENTENCES, pooling), atol=1e-5)


@pytest.mark.parametrize("pooling", ["cls", "mean", "max"])
def test_independent_of_batch_size_and_order(tiny_bert_dir, pooling):
    encoder = SentenceEncoder(tiny_bert_dir, pooling, batch_size=1)
    reference = encoder.encode(SENTENCES)
    perm = np.random.default_rng(0).permutation(len(SENTENCES))
    for batch_size in (2, 3, 128):
        encoder.batch_size = batch_size
        np.testing.assert_allclose(encoder.encode(SENTENCES), reference, atol=1e-5)
        np.testing.assert_allclose(encoder.encode([SENTENCES[i] for i in perm]), reference[perm], atol=1e-5)


def test_truncates_to_max_length(tiny_bert_dir):
    long = " ".join(["word"] * 300)
    emb = SentenceEncoder(tiny_bert_dir, "mean", max_length=16).encode([long, "short"])
    np.testing.assert_allclose(emb, _direct(tiny_bert_dir, [long, "short"], "mean", max_length=16), atol=1e-5)


def test_from_module_restores_train_mode(tiny_bert_dir):
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(tiny_bert_dir).train()
    encoder = SentenceEncoder.from_module(model, AutoTokenizer.from_pretrained(tiny_bert_dir), "cls", batch_size=2)
    emb = encoder.encode(SENTENCES)
    assert model.training  # dropout off while encoding, back on afterwards
    np.testing.assert_allclose(emb, _direct(tiny_bert_dir, SENTENCES, "cls"), atol=1e-5)
    assert encoder.encode([]).shape == (0, 32)


def test_rejects_unknown_pooling(tiny_bert_dir):
    with pytest.raises(ValueError, match="pooling"):
        SentenceEncoder(tiny_bert_dir, "median")


def test_evaluate_model_dir_on_small_suite(tiny_bert_dir, tmp_path):
    stsb = tmp_path / "STSBenchmark" / "sts-dev.csv"
    stsb.parent.mkdir()
    rows = [f"g\tf\ty\t{i}\t{i % 5}.0\t{a}\t{b}" for i, (a, b) in enumerate(zip(SENTENCES, SENTENCES[1:]))]
    stsb.write_text("\n".join(rows) + "\n")
    cfg = EvalConfig(sts_dir=str(tmp_path), tasks=["STSB-dev"], batch_size=4)

    result = evaluate_model_dir(tiny_bert_dir, "mean", cfg)

    assert result["tasks"]["STSB-dev"]["n_pairs"] == len(SENTENCES) - 1
    assert result["n_sentences"] == len(set(SENTENCES))
    assert result["avg7_all"] is None
    assert result["wall_s"] >= result["encode_s"] > 0 and result["sentences_per_s"] > 0
    assert result["pooling"] == "mean"
    json.dumps(result, allow_nan=False)


@pytest.mark.model
def test_stsb_dev_matches_sentence_transformers(packaged_model_dir):
    """Our protocol on STS-B dev (mean pooling, max_length 128) equals sentence-transformers'
    EmbeddingSimilarityEvaluator (cosine, Spearman; it reports 0–1, we report ×100) to 0.01."""
    pytest.importorskip("sentence_transformers")
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.evaluation import EmbeddingSimilarityEvaluator

    [subset] = load_task(str(STS_DIR), "STSB-dev")
    ours = evaluate_sts(SentenceEncoder(packaged_model_dir, "mean", max_length=128).encode,
                        {"STSB-dev": [subset]})["tasks"]["STSB-dev"]["all"]

    st_model = SentenceTransformer(packaged_model_dir, device="cpu")
    st_model.max_seq_length = 128
    evaluator = EmbeddingSimilarityEvaluator(subset.sentences1, subset.sentences2, subset.scores.tolist(),
                                             batch_size=64, main_similarity="cosine", name="stsb-dev",
                                             write_csv=False)
    theirs = evaluator(st_model)["stsb-dev_spearman_cosine"]

    assert 0 < theirs <= 1  # 0-1 scaled in sentence-transformers 6.x
    assert ours == pytest.approx(100 * theirs, abs=0.01)
    assert ours == pytest.approx(86.72, abs=0.05)  # measured here, recorded in tsdae/encode.py
