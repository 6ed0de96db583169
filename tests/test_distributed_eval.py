"""Distributed encoding: length-sorted blocks cover every sentence once (no Ray), and Ray Data model
actors give the same numbers as the single-process encoder, from a folder and from a checkpoint."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tsdae.eval import EvalConfig
from tsdae.eval.actors import length_sorted_blocks

STS_DIR = Path(__file__).resolve().parents[1] / "data" / "sts"


def _small_dev(tmp_path: Path, n: int) -> str:
    """An STS folder whose STS-B dev is the first n real dev pairs."""
    lines = (STS_DIR / "STSBenchmark" / "sts-dev.csv").read_text(encoding="utf-8").splitlines()[:n]
    (tmp_path / "STSBenchmark").mkdir(parents=True)
    (tmp_path / "STSBenchmark" / "sts-dev.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(tmp_path)


def test_length_sorted_blocks_cover_every_sentence_once():
    sentences = [f"s{i} " + "x" * (i * 7 % 23) for i in range(53)]
    blocks = length_sorted_blocks(sentences, rows_per_block=8)

    assert [b.num_rows for b in blocks] == [8] * 6 + [5]
    idx = np.concatenate([b.column("idx").to_numpy() for b in blocks])
    assert sorted(idx) == list(range(53))
    texts = [t for b in blocks for t in b.column("text").to_pylist()]
    assert texts == [sentences[i] for i in idx]
    lengths = [len(t) for t in texts]
    assert lengths == sorted(lengths, reverse=True)


@pytest.mark.ray
def test_actors_match_single_process_and_lose_no_pair(ray_local, tiny_bert_dir, tmp_path):
    from tsdae.eval import SentenceEncoder, evaluate_model_dir
    from tsdae.eval.actors import encode_with_actors, evaluate_distributed

    ray_local.data.DataContext.get_current().enable_progress_bars = False
    # 97 pairs, batch 8, blocks of 64 rows, 2 actors: the tail batch and block are partial.
    cfg = EvalConfig(sts_dir=_small_dev(tmp_path, 97), tasks=["STSB-dev"], batch_size=8, actors=2, num_cpus=1)

    ours = evaluate_distributed(tiny_bert_dir, "mean", cfg)
    local = evaluate_model_dir(tiny_bert_dir, "mean", cfg)

    assert ours["actors"] == 2 and ours["n_sentences"] == local["n_sentences"]
    assert ours["tasks"]["STSB-dev"]["n_pairs"] == 97
    assert ours["tasks"]["STSB-dev"]["all"] == pytest.approx(local["tasks"]["STSB-dev"]["all"], abs=1e-6)

    # From an exported model folder (what a run's "after" evaluation reads), each actor loading it once.
    import torch

    from tsdae.model import ModelConfig, build_tsdae, export_encoder

    model, tokenizer = build_tsdae(ModelConfig(name_or_path=tiny_bert_dir))
    with torch.no_grad():
        model.encoder.embeddings.word_embeddings.weight.mul_(1.5)
    folder = export_encoder(model, tokenizer, tmp_path / "encoder", max_seq_length=128)
    sentences = [f"sentence {i} " + "word " * (i % 11) for i in range(37)]
    emb = encode_with_actors(sentences, str(folder), "cls", EvalConfig(batch_size=4, actors=1, num_cpus=1))
    expected = SentenceEncoder.from_module(model.encoder, tokenizer, "cls").encode(sentences)
    np.testing.assert_allclose(emb, expected, atol=1e-5)
