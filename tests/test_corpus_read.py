"""Reading the corpus without Ray: text cleaning, hive filters, config checks (milliseconds)."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.batching import padding_fraction
from pipeline.config import CorruptConfig, ReadConfig, parse_filter
from pipeline.read import CorpusError, clean_texts, list_corpus_files, partition_values


def test_clean_texts_counts_every_reason():
    raw = [b"ok", None, b"", b" \t", b"\xe2\x80\x8b", b"bad \xff", b"a b c d e f", b"abcdefghijk"]
    text, counts = clean_texts(pa.array(raw, pa.binary()).view(pa.string()), max_chars=6)
    assert text.to_pylist() == ["ok", "a b c", "abcdef"]
    assert counts == {"rows_read": 8, "dropped_null": 1, "dropped_invalid_utf8": 1, "dropped_empty": 3,
                      "truncated": 2, "rows_kept": 3}


def test_clean_texts_takes_large_strings_and_chunks():
    text, counts = clean_texts(pa.chunked_array([pa.array(["x", "y"], pa.large_string()),
                                                 pa.array([" "], pa.large_string())]), max_chars=10)
    assert text.type == pa.string() and text.to_pylist() == ["x", "y"] and counts["dropped_empty"] == 1


@pytest.fixture
def hive(tmp_path):
    for date in ("2026-10-31", "2026-11-01", "2026-11-02"):
        for lang in ("en", "de"):
            d = tmp_path / f"date={date}" / f"lang={lang}"
            d.mkdir(parents=True)
            pq.write_table(pa.table({"text": [f"{date} {lang}"]}), d / "part-0.parquet")
    (tmp_path / "_SUCCESS").write_text("")
    return tmp_path


def test_hive_partition_filters_prune_files(hive):
    paths, _ = list_corpus_files(str(hive), [parse_filter("date >= 2026-11-01"), parse_filter("lang == 'en'")])
    assert [partition_values(p) for p in paths] == [{"date": "2026-11-01", "lang": "en"},
                                                    {"date": "2026-11-02", "lang": "en"}]
    assert len(list_corpus_files(str(hive))[0]) == 6
    with pytest.raises(CorpusError, match="partition columns are"):
        list_corpus_files(str(hive), [parse_filter("year > 3")])
    with pytest.raises(CorpusError, match="passes the filters"):
        list_corpus_files(str(hive), [parse_filter("date > 2027-01-01")])


def test_glob_and_list_uris(hive):
    assert len(list_corpus_files(str(hive / "date=2026-11-0*" / "*" / "*.parquet"))[0]) == 4
    one = str(hive / "date=2026-11-01" / "lang=de" / "part-0.parquet")
    assert list_corpus_files([one, one])[0] == [one]


def test_numeric_partition_values_compare_as_numbers(tmp_path):
    for shard in (2, 10):
        (tmp_path / f"shard={shard}").mkdir()
        pq.write_table(pa.table({"text": ["x"]}), tmp_path / f"shard={shard}" / "a.parquet")
    paths, _ = list_corpus_files(str(tmp_path), [parse_filter("shard > 3")])
    assert [partition_values(p)["shard"] for p in paths] == ["10"]


def test_config_rejects_what_cannot_work():
    with pytest.raises(ValueError, match="memory://"):
        ReadConfig(uri="memory://corpus/")
    with pytest.raises(ValueError, match="on_bad_file"):
        ReadConfig(on_bad_file="ignore")
    with pytest.raises(ValueError, match="cannot parse"):
        ReadConfig(filters=["date is today"])
    with pytest.raises(ValueError, match="swap_ratio"):
        CorruptConfig(swap_ratio=1.0)
    assert parse_filter('date >= "2026-11-01"') == ("date", ">=", "2026-11-01")


def test_padding_fraction():
    assert padding_fraction([3, 3, 3, 3], 2) == 0.0
    assert padding_fraction([4, 2, 4, 2], 2) == pytest.approx(0.25)
    assert padding_fraction([4, 4, 2, 2], 2) == 0.0
    assert padding_fraction([], 8) == 0.0
