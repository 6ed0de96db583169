"""The training order (pipeline.shuffle through the read tasks): every row once per epoch, files and rows
permuted by (seed, epoch), the same order on every read, file order when shuffle_rows is 0. No Ray: the
read tasks' bodies are called directly."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import ReadConfig
from pipeline.read import CorpusSource, check_corpus, row_keys
from pipeline.shuffle import file_order, window_order

N_ROWS = 1000


@pytest.fixture
def corpus(tmp_path):
    """Two files of sorted sentences ("positive" rows, then "negative" ones), 100-row row groups."""
    texts = [f"{'good' if i < N_ROWS // 2 else 'bad'} sentence number {i}" for i in range(N_ROWS)]
    for part, rows in enumerate((texts[:600], texts[600:])):
        pq.write_table(pa.table({"text": rows}), tmp_path / f"part-{part}.parquet", row_group_size=100)
    return tmp_path, texts


def _epoch_texts(uri, epoch: int, **read) -> list[str]:
    cfg = ReadConfig(uri=str(uri), **read)
    source = CorpusSource(check_corpus(cfg), cfg, epochs=[epoch], mode="rows")
    out = []
    for task in source.get_read_tasks(1):
        for block in task():
            assert block.num_rows <= 8192
            assert block.column("epoch").to_pylist() == [epoch] * block.num_rows
            assert block.column("row_key").to_pylist() == row_keys(block.column("text")).tolist()
            out += block.column("text").to_pylist()
    return out


def test_file_order_when_shuffle_is_off(corpus):
    uri, texts = corpus
    assert _epoch_texts(uri, 0, shuffle_rows=0) == texts
    assert _epoch_texts(uri, 3, shuffle_rows=0) == texts


@pytest.mark.parametrize("window", [64, 250, 65536])
def test_every_row_once_per_epoch_in_a_shuffled_order(corpus, window):
    uri, texts = corpus
    epoch0 = _epoch_texts(uri, 0, shuffle_rows=window)
    assert sorted(epoch0) == sorted(texts)
    assert epoch0 != texts
    if window >= 600:  # a window holds a whole file: part-0's 500 "good" and 100 "bad" rows are mixed
        part0 = [t for t in epoch0 if int(t.rsplit(" ", 1)[1]) < 600]
        assert 20 < sum(t.startswith("bad") for t in part0[:300]) < 80
    # The same on every read (a restart), different in another epoch or with another seed.
    assert _epoch_texts(uri, 0, shuffle_rows=window) == epoch0
    assert _epoch_texts(uri, 1, shuffle_rows=window) != epoch0
    assert _epoch_texts(uri, 0, shuffle_rows=window, shuffle_seed=1) != epoch0


def test_the_order_does_not_depend_on_where_the_files_are(corpus, tmp_path_factory):
    """The same files under another folder: the same order (it keys on sentences and the sorted file
    list, not on paths)."""
    uri, _ = corpus
    other = tmp_path_factory.mktemp("copy")
    for f in sorted(uri.glob("*.parquet")):
        (other / f.name).write_bytes(f.read_bytes())
    assert _epoch_texts(other, 2, shuffle_rows=300) == _epoch_texts(uri, 2, shuffle_rows=300)


def test_permutations_are_pure_functions_of_seed_and_epoch():
    assert sorted(file_order(10, seed=0, epoch=0).tolist()) == list(range(10))
    assert file_order(10, seed=0, epoch=0).tolist() == file_order(10, seed=0, epoch=0).tolist()
    orders = {tuple(file_order(10, seed=s, epoch=e).tolist()) for s in range(3) for e in range(3)}
    assert len(orders) == 9
    keys = np.arange(1, 501, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    order = window_order(keys, seed=0, epoch=0)
    assert sorted(order.tolist()) == list(range(500))
    # A row's place depends only on its own key: a subset of the window keeps its relative order.
    subset = keys[::3]
    sub_order = window_order(subset, seed=0, epoch=0)
    full_rank = np.empty(500, dtype=np.int64)
    full_rank[order] = np.arange(500)
    assert np.all(np.diff(full_rank[::3][sub_order]) > 0)


def test_a_damaged_file_skipped_mid_read_keeps_the_rows_before_the_damage(tmp_path):
    """on_bad_file: skip with shuffling on: the rows read before a damaged row group are kept (the same
    ones corpus_stats counts: groups are read in file order), shuffled, on every read."""
    texts = [f"sentence number {i} " * 3 for i in range(2000)]
    path = tmp_path / "a.parquet"
    pq.write_table(pa.table({"text": texts}), path, compression="snappy", row_group_size=500)
    data = bytearray(path.read_bytes())
    start = pq.read_metadata(path).row_group(3).column(0).data_page_offset
    data[start + 10:start + 200] = b"\xff" * 190
    path.write_bytes(bytes(data))
    first = _epoch_texts(tmp_path, 0, shuffle_rows=700, on_bad_file="skip")
    assert sorted(first) == sorted(texts[:1500]) and first != texts[:1500]
    assert _epoch_texts(tmp_path, 0, shuffle_rows=700, on_bad_file="skip") == first
