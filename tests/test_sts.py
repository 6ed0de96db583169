"""STS loaders: hand-made files in tmp_path, the counts of the bundled suite, and custom sets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tsdae.eval import STS_TASKS, CustomStsConfig, EvalConfig
from tsdae.eval.sts import StsSubset, load_custom, load_suite, load_task, load_tasks

BUNDLED = Path(__file__).resolve().parents[1] / "data" / "sts"


def _write(path: Path, lines: list[str], newline: str = "\n") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(newline.join(lines).encode("utf-8") + newline.encode())


def test_year_task_one_subset_per_file_and_empty_gold_dropped(tmp_path):
    folder = tmp_path / "STS15-en-test"
    _write(folder / "STS.input.b.txt", ['a "quoted" one\tsecond', "dropped 1\tdropped 2", "x\ty"])
    _write(folder / "STS.gs.b.txt", ["4.5", "", "0"])
    _write(folder / "STS.input.a.txt", ["p\tq"])
    _write(folder / "STS.gs.a.txt", ["2"])
    (folder / "00-readme.txt").write_text("not a subset\n")

    subsets = load_task(str(tmp_path), "STS15")

    assert [s.name for s in subsets] == ["a", "b"]
    b = subsets[1]
    assert b.sentences1 == ['a "quoted" one', "x"]
    assert b.sentences2 == ["second", "y"]
    np.testing.assert_array_equal(b.scores, [4.5, 0.0])
    assert b.scores.dtype == np.float64 and len(b) == 2


def test_stsb_extra_trailing_fields_ignored_and_quotes_kept(tmp_path):
    rows = [
        "main-captions\tMSRvid\t2012test\t0001\t2.500\tA girl is \"styling\" her hair.\tA girl brushes.",
        "main-forums\tanswer-answer\t2016\t0008\t3\tOne \"open quote\tTwo. \tsource A\tsource B",
    ]
    _write(tmp_path / "STSBenchmark" / "sts-test.csv", rows)

    [subset] = load_task(str(tmp_path), "STSB-test")

    assert subset.name == "STSB-test"
    assert subset.sentences1 == ['A girl is "styling" her hair.', 'One "open quote']
    assert subset.sentences2 == ["A girl brushes.", "Two. "]
    np.testing.assert_array_equal(subset.scores, [2.5, 3.0])


def test_sick_header_and_crlf(tmp_path):
    _write(tmp_path / "SICK" / "SICK_test_annotated.txt", [
        "pair_ID\tsentence_A\tsentence_B\trelatedness_score\tentailment_judgment",
        "6\tA boy plays\tA kid plays\t3.3\tNEUTRAL",
        "7\tA man\tA woman\t1\tCONTRADICTION",
    ], newline="\r\n")

    [subset] = load_task(str(tmp_path), "SICK-R")

    assert subset.sentences1 == ["A boy plays", "A man"]
    assert subset.sentences2 == ["A kid plays", "A woman"]
    np.testing.assert_array_equal(subset.scores, [3.3, 1.0])


def test_malformed_input_line_names_file_and_line(tmp_path):
    folder = tmp_path / "STS12-en-test"
    _write(folder / "STS.input.x.txt", ["a\tb", "only one field"])
    _write(folder / "STS.gs.x.txt", ["1", "2"])
    with pytest.raises(ValueError, match=r"STS\.input\.x\.txt:2: .*got 1"):
        load_task(str(tmp_path), "STS12")


def test_non_numeric_score_names_file_and_line(tmp_path):
    _write(tmp_path / "STSBenchmark" / "sts-dev.csv", [
        "g\tf\ty\t1\t1.0\ts1\ts2",
        "g\tf\ty\t2\t1.0\ts1\ts2",
        "g\tf\ty\t3\tfive\ts1\ts2",
    ])
    with pytest.raises(ValueError, match=r"sts-dev\.csv:3: score 'five'"):
        load_task(str(tmp_path), "STSB-dev")


def test_gold_and_input_line_counts_must_match(tmp_path):
    folder = tmp_path / "STS13-en-test"
    _write(folder / "STS.input.x.txt", ["a\tb", "c\td"])
    _write(folder / "STS.gs.x.txt", ["1"])
    with pytest.raises(ValueError, match="has 2 lines but .*STS.gs.x.txt has 1"):
        load_task(str(tmp_path), "STS13")


def test_missing_folder_file_and_unknown_task(tmp_path):
    with pytest.raises(FileNotFoundError, match="STS14-en-test"):
        load_task(str(tmp_path), "STS14")
    with pytest.raises(FileNotFoundError, match="sts-test.csv"):
        load_task(str(tmp_path), "STSB-test")
    folder = tmp_path / "STS16-en-test"
    _write(folder / "STS.input.x.txt", ["a\tb"])
    with pytest.raises(FileNotFoundError, match=r"STS\.gs\.x\.txt"):
        load_task(str(tmp_path), "STS16")
    with pytest.raises(ValueError, match="unknown STS task 'STS17'"):
        load_task(str(tmp_path), "STS17")


# Pair counts of the bundled suite: the numbers SentEval reports (STS15/16 keep only scored pairs).
BUNDLED_COUNTS = {
    "STS12": (5, 3108), "STS13": (3, 1500), "STS14": (6, 3750), "STS15": (5, 3000), "STS16": (5, 1186),
    "STSB-test": (1, 1379), "SICK-R": (1, 4927), "STSB-dev": (1, 1500),
}


def test_bundled_suite_counts():
    if not BUNDLED.is_dir():
        pytest.skip(f"no bundled STS data at {BUNDLED}")
    loaded = load_tasks(str(BUNDLED), list(STS_TASKS))
    assert list(loaded) == list(STS_TASKS)
    for task, (n_subsets, n_pairs) in BUNDLED_COUNTS.items():
        subsets = loaded[task]
        assert len(subsets) == n_subsets, task
        assert sum(len(s) for s in subsets) == n_pairs, task
        for s in subsets:
            assert isinstance(s, StsSubset)
            assert len(s.sentences1) == len(s.sentences2) == len(s.scores)
            assert np.all((s.scores >= 0) & (s.scores <= 5)), (task, s.name)
    assert "SMTnews" not in {s.name for s in loaded["STS13"]}  # STS13 ships without SMT


# Custom STS sets: parquet / CSV / TSV at an fsspec URI, configurable columns, bad rows reported.


def _custom_rows():
    """Two good rows and one of each kind of bad row."""
    return {
        "a": ["one", "two", "", "four", "five", "six"],
        "b": ["uno", "dos", "tres", "cuatro", "   ", "seis"],
        "gold": ["1.5", "4", "3", "", "2", "many"],
    }


def test_custom_csv_with_renamed_columns_reports_bad_rows(tmp_path):
    import pandas as pd

    path = tmp_path / "pairs.csv"
    rows = _custom_rows()
    rows["a"][0] = 'a "quoted", with comma'
    pd.DataFrame(rows).to_csv(path, index=False)
    cfg = CustomStsConfig(name="mine", uri=f"file://{path}", sentence1_column="a", sentence2_column="b",
                          score_column="gold")

    subset, issues = load_custom(cfg)

    assert subset.name == "mine"
    assert subset.sentences1 == ['a "quoted", with comma', "two"]
    assert subset.sentences2 == ["uno", "dos"]
    np.testing.assert_array_equal(subset.scores, [1.5, 4.0])
    assert issues["n_rows"] == 6 and issues["n_bad"] == 4
    assert issues["examples"] == [
        {"row": 2, "reason": "empty sentence1"},
        {"row": 3, "reason": "missing score"},
        {"row": 4, "reason": "empty sentence2"},
        {"row": 5, "reason": "score 'many' is not a number"},
    ]


def test_custom_parquet_with_nulls_and_tsv_without_quoting(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"sentence1": ["x", None, "z"], "sentence2": ["p", "q", "r"],
                             "score": [1.0, 2.0, None]}), tmp_path / "p.parquet")
    subset, issues = load_custom(CustomStsConfig(name="pq", uri=str(tmp_path / "p.parquet")))
    assert subset.sentences1 == ["x"] and issues["n_bad"] == 2
    assert [e["reason"] for e in issues["examples"]] == ["empty sentence1", "missing score"]

    (tmp_path / "t.tsv").write_text('sentence1\tsentence2\tscore\nsays "hi\tthere"\t3\n')
    subset, issues = load_custom(CustomStsConfig(name="tsv", uri=str(tmp_path / "t.tsv")))
    assert subset.sentences1 == ['says "hi'] and subset.sentences2 == ['there"'] and issues["n_bad"] == 0


def test_custom_error_policy_missing_columns_and_unknown_format(tmp_path):
    import pandas as pd

    path = tmp_path / "pairs.csv"
    pd.DataFrame(_custom_rows()).to_csv(path, index=False)
    with pytest.raises(ValueError, match=r"4 bad row\(s\): row 2: empty sentence1"):
        load_custom(CustomStsConfig(name="m", uri=str(path), sentence1_column="a", sentence2_column="b",
                                    score_column="gold", on_bad_rows="error"))
    with pytest.raises(ValueError, match=r"no column\(s\) \['sentence1', 'sentence2', 'score'\]"):
        load_custom(CustomStsConfig(name="m", uri=str(path)))
    with pytest.raises(ValueError, match="cannot tell the format"):
        load_custom(CustomStsConfig(name="m", uri=str(tmp_path / "pairs.json")))
    with pytest.raises(ValueError, match="clashes"):
        CustomStsConfig(name="STSB-dev", uri="x.csv")


def test_load_suite_adds_custom_sets_from_a_remote_uri(tmp_path):
    import fsspec

    with fsspec.open("memory://sets/remote.tsv", "w") as f:
        f.write("sentence1\tsentence2\tscore\na\tb\t1\nc\td\t\n")
    _write(tmp_path / "STSBenchmark" / "sts-dev.csv", ["g\tf\ty\t1\t1.0\ts1\ts2"])
    cfg = EvalConfig(sts_dir=str(tmp_path), tasks=["STSB-dev"],
                     custom_sets=[CustomStsConfig(name="remote", uri="memory://sets/remote.tsv")])

    by_task, bad = load_suite(cfg)

    assert list(by_task) == ["STSB-dev", "remote"]
    assert by_task["remote"][0].sentences1 == ["a"]
    assert bad == {"remote": {"n_rows": 2, "n_bad": 1, "examples": [{"row": 1, "reason": "missing score"}]}}


def test_eval_config_with_custom_sets_from_a_run_config_mapping():
    from jobs.config import ConfigError, parse_config

    cfg = parse_config({"eval": {"actors": 2, "production_model": "s3://models/live", "custom_sets": [
        {"name": "mine", "uri": "s3://bucket/pairs.parquet", "score_column": "label"}]}}).eval
    assert cfg.custom_sets == [CustomStsConfig(name="mine", uri="s3://bucket/pairs.parquet", score_column="label")]
    assert cfg.actors == 2 and cfg.production_model == "s3://models/live"
    with pytest.raises(ConfigError, match=r"eval\.custom_sets\[0\]\.colour"):
        parse_config({"eval": {"custom_sets": [{"name": "m", "uri": "x.csv", "colour": 1}]}})
    for bad in ({"actors": -1}, {"precision": "fp8"}, {"validation_task": "STS99"},
                {"custom_sets": [{"name": "m", "uri": "a.csv"}, {"name": "m", "uri": "b.csv"}]}):
        with pytest.raises(ConfigError):
            parse_config({"eval": bad})
