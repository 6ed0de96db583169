"""The corpus stage on a local Ray cluster: validation, counts, tokenized noise, determinism, splits."""

from __future__ import annotations

import threading
from hashlib import blake2b

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import CorpusError, build_train_dataset, corpus_stats, read_corpus
from pipeline.config import CorruptConfig, ReadConfig

pytestmark = pytest.mark.ray

N_SENTENCES = 301  # odd, so an equal 2-way split must drop a row
CORRUPT = CorruptConfig(del_ratio=0.6, seed=7, max_length=64)


def _sentences(n: int) -> list[str]:
    rng = np.random.default_rng(0)
    words = "the a cat dog sat on mat quickly under bright blue sky river ran far away home".split()
    return [f"Sentence {i}: " + " ".join(rng.choice(words, size=rng.integers(3, 14))) + "."
            for i in range(n)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    """The same sentences as one file and as three files, plus the texts by row_key."""
    root = tmp_path_factory.mktemp("corpus")
    texts = _sentences(N_SENTENCES)
    table = pa.table({"text": texts, "source": ["test"] * len(texts)})
    pq.write_table(table, root / "one.parquet")
    (root / "three").mkdir()
    for i, start in enumerate(range(0, len(texts), 101)):
        pq.write_table(table.slice(start, 101), root / "three" / f"part-{i}.parquet")
    by_key = {int.from_bytes(blake2b(t.encode(), digest_size=8).digest(), "little"): t for t in texts}
    return {"one": str(root / "one.parquet"), "three": str(root / "three"), "by_key": by_key}


def _rows(ds) -> dict[tuple[int, int], tuple[tuple[int, ...], tuple[int, ...]]]:
    out = {}
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for key, epoch, noisy, target in zip(batch["row_key"], batch["epoch"], batch["noisy_ids"],
                                             batch["target_ids"]):
            out[int(key), int(epoch)] = (tuple(noisy.tolist()), tuple(target.tolist()))
    return out


@pytest.fixture(scope="module")
def one_file_rows(corpus, tiny_bert_dir, ray_local):
    ds = build_train_dataset(ReadConfig(uri=corpus["one"]), CORRUPT, tiny_bert_dir, epochs=2,
                             num_actors=1, cpus_per_actor=1)
    return _rows(ds)


def test_counts_and_drops_null_empty_and_blank_rows(tmp_path, ray_local):
    texts = ["keep me", None, "", "   ", "\t\n", "and me too", None, " padded but real "]
    pq.write_table(pa.table({"text": pa.array(texts, pa.string()), "n": list(range(len(texts)))}),
                   tmp_path / "dirty.parquet")
    cfg = ReadConfig(uri=str(tmp_path / "dirty.parquet"))
    assert corpus_stats(cfg) == {"rows_read": 8, "dropped_null": 2, "dropped_empty": 3, "rows_kept": 3}
    rows = read_corpus(cfg).take_all()
    assert sorted(r["text"] for r in rows) == [" padded but real ", "and me too", "keep me"]
    assert set(rows[0]) == {"text", "row_key"}
    assert read_corpus(cfg).schema().types[1] == pa.uint64()
    for r in rows:
        assert r["row_key"] == int.from_bytes(blake2b(r["text"].encode(), digest_size=8).digest(), "little")


def test_missing_or_non_string_column_names_the_file_and_its_columns(tmp_path):
    pq.write_table(pa.table({"text": ["fine"]}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"sentence": ["x"], "id": [1]}), tmp_path / "b.parquet")
    with pytest.raises(CorpusError, match=r"b\.parquet.*'text'.*sentence: string, id: int64"):
        read_corpus(ReadConfig(uri=str(tmp_path)))
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "b.parquet")
    with pytest.raises(CorpusError, match=r"b\.parquet.*int64, expected a string"):
        corpus_stats(ReadConfig(uri=str(tmp_path / "*.parquet")))


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_unreadable_file_is_named(tmp_path, damage):
    pq.write_table(pa.table({"text": ["fine"] * 100}), tmp_path / "good.parquet")
    good = (tmp_path / "good.parquet").read_bytes()
    bad = b"this is not parquet at all" if damage == "garbage" else good[: len(good) // 2]
    (tmp_path / "bad.parquet").write_bytes(bad)
    with pytest.raises(CorpusError, match=r"bad\.parquet: not a readable parquet file"):
        read_corpus(ReadConfig(uri=[str(tmp_path / "good.parquet"), str(tmp_path / "bad.parquet")]))


def test_no_files_names_the_uri(tmp_path):
    (tmp_path / "notes.txt").write_text("no parquet here")
    for uri in (str(tmp_path), str(tmp_path / "*.parquet"), str(tmp_path / "missing.parquet")):
        with pytest.raises(CorpusError, match="no parquet files found") as e:
            read_corpus(ReadConfig(uri=uri))
        assert uri in str(e.value)


def test_targets_decode_to_the_original_and_noise_is_a_subsequence(corpus, one_file_rows, tiny_bert_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_dir)
    assert len(one_file_rows) == 2 * N_SENTENCES
    squash = lambda s: "".join(s.split())  # noqa: E731  WordPiece decoding re-spaces punctuation
    for (key, _), (noisy, target) in one_file_rows.items():
        original = corpus["by_key"][key]
        assert squash(tokenizer.decode(list(target), skip_special_tokens=True)) == squash(original.lower())
        for ids in (noisy, target):
            assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id
        remaining = iter(target[1:-1])
        assert all(t in remaining for t in noisy[1:-1])  # words deleted, none added or moved
        assert len(noisy) < len(target) or len(original.split()) == 1


def test_noise_depends_on_row_key_and_epoch_only(corpus, one_file_rows, tiny_bert_dir):
    ds = build_train_dataset(ReadConfig(uri=corpus["three"]), CORRUPT, tiny_bert_dir, epochs=2,
                             num_actors=2, cpus_per_actor=1)
    assert _rows(ds) == one_file_rows  # 3 files, 2 actors == 1 file, 1 actor
    changed = sum(one_file_rows[k, 0][0] != one_file_rows[k, 1][0] for k in corpus["by_key"])
    assert changed > 0.8 * N_SENTENCES  # fresh noise each epoch


def test_equal_streaming_split_gives_every_rank_the_same_number_of_batches(corpus, tiny_bert_dir,
                                                                           ray_local):
    # What Ray Train V2 does with TorchTrainer(datasets=...): DataConfig.configure calls
    # streaming_split(world_size, equal=True).
    ds = build_train_dataset(ReadConfig(uri=corpus["three"]), CORRUPT, tiny_bert_dir, epochs=1,
                             num_actors=1, cpus_per_actor=1)
    counts = [None, None]

    def consume(rank, it):
        sizes = [len(b["row_key"]) for b in it.iter_batches(batch_size=32, batch_format="numpy")]
        counts[rank] = (len(sizes), sum(sizes))

    threads = [threading.Thread(target=consume, args=(r, it))
               for r, it in enumerate(ds.streaming_split(2, equal=True))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert counts[0] == counts[1] == (5, N_SENTENCES // 2)
