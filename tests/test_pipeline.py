"""The corpus stage on a local Ray cluster: validation, counts, tokenized noise, determinism, splits."""

from __future__ import annotations

import threading
from hashlib import blake2b
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import CorpusError, build_train_dataset, corpus_stats, read_corpus
from pipeline import CorruptConfig, ReadConfig

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


def test_counts_drops_and_repairs_every_kind_of_bad_text(tmp_path, ray_local):
    raw = [b"keep me", None, b"", b"   ", b"\t\n", b"and me too", b"bad \xff\xfe bytes", b" padded but real ",
           b"\x00\x01", ("long " * 10).encode()]
    # A writer can store any bytes under a string type; pyarrow does not check them on read.
    text = pa.array(raw, pa.binary()).view(pa.string())
    pq.write_table(pa.table({"text": text, "n": list(range(len(raw)))}), tmp_path / "dirty.parquet")
    cfg = ReadConfig(uri=str(tmp_path / "dirty.parquet"), max_chars=12)
    assert corpus_stats(cfg) == {"rows_read": 10, "dropped_null": 1, "dropped_invalid_utf8": 1,
                                 "dropped_empty": 4, "truncated": 2, "rows_kept": 4, "files": 1,
                                 "files_skipped": []}
    rows = read_corpus(cfg).take_all()
    assert sorted(r["text"] for r in rows) == [" padded but", "and me too", "keep me", "long long"]
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


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_unreadable_file_is_skipped_and_reported_with_skip(tmp_path, damage, ray_local):
    pq.write_table(pa.table({"text": [f"fine {i}" for i in range(100)]}), tmp_path / "good.parquet")
    good = (tmp_path / "good.parquet").read_bytes()
    (tmp_path / "bad.parquet").write_bytes(b"not parquet" if damage == "garbage" else good[: len(good) // 2])
    cfg = ReadConfig(uri=str(tmp_path), on_bad_file="skip")
    stats = corpus_stats(cfg)
    assert stats["rows_kept"] == 100 and stats["files"] == 1
    [skipped] = stats["files_skipped"]
    assert skipped["path"].endswith("bad.parquet") and "not a readable parquet file" in skipped["reason"]
    assert read_corpus(cfg).count() == 100


def test_damaged_data_pages_fail_or_skip_at_read_time(tmp_path, ray_local):
    # A valid footer over damaged column data: only reading the pages finds it.
    texts = [f"sentence number {i} " * 3 for i in range(2000)]
    pq.write_table(pa.table({"text": texts}), tmp_path / "a.parquet", compression="snappy", row_group_size=500)
    data = bytearray((tmp_path / "a.parquet").read_bytes())
    meta = pq.read_metadata(tmp_path / "a.parquet")
    column = meta.row_group(3).column(0)
    start = column.data_page_offset
    data[start + 10:start + 200] = b"\xff" * 190
    (tmp_path / "a.parquet").write_bytes(bytes(data))
    pq.write_table(pa.table({"text": ["other file"]}), tmp_path / "b.parquet")
    with pytest.raises(Exception, match=r"a\.parquet: damaged parquet data"):
        corpus_stats(ReadConfig(uri=str(tmp_path)))
    stats = corpus_stats(ReadConfig(uri=str(tmp_path), on_bad_file="skip"))
    assert stats["rows_kept"] == 1501  # three good row groups of a.parquet, then b.parquet
    assert [s["path"].rsplit("/", 1)[1] for s in stats["files_skipped"]] == ["a.parquet"]


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
    reversed_files = sorted((str(p) for p in Path(corpus["three"]).iterdir()), reverse=True)
    ds = build_train_dataset(ReadConfig(uri=reversed_files), CORRUPT, tiny_bert_dir, epochs=2,
                             num_actors=2, cpus_per_actor=1, batch_size=4)
    assert _rows(ds) == one_file_rows  # 3 files in reverse order, 2 actors, length-sorted == 1 file, 1 actor
    # A restart at epoch 1 (a fresh dataset, as a resumed job builds it) reproduces epoch 1 exactly.
    restarted = build_train_dataset(ReadConfig(uri=corpus["one"]), CORRUPT, tiny_bert_dir, epochs=1,
                                    num_actors=1, cpus_per_actor=1, start_epoch=1)
    assert _rows(restarted) == {k: v for k, v in one_file_rows.items() if k[1] == 1}
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


def test_length_aware_batches_pad_less_than_read_order(corpus, tiny_bert_dir, ray_local):
    from pipeline.batching import padding_fraction

    def target_lengths(batch_size):
        ds = build_train_dataset(ReadConfig(uri=corpus["one"]), CORRUPT, tiny_bert_dir, epochs=1,
                                 num_actors=1, cpus_per_actor=1, batch_size=batch_size)
        return np.concatenate([[len(t) for t in b["target_ids"]]
                               for b in ds.iter_batches(batch_size=8, batch_format="numpy")])

    bucketed, plain = target_lengths(8), target_lengths(None)
    assert sorted(bucketed) == sorted(plain)
    assert padding_fraction(bucketed, 8) < 0.5 * padding_fraction(plain, 8)


def test_the_corpus_stage_imports_no_torch():
    """Read tasks import pipeline; torch costs ~1.5 s per worker process and the stage never uses it (the
    tokenizer actors load it through transformers when they build their tokenizer)."""
    import subprocess
    import sys

    code = "import sys, pipeline, pipeline.read, pipeline.noise; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "False"
