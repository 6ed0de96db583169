"""Report: schema, deltas, Markdown rows, atomic files and round trip."""

from __future__ import annotations

import json
import os

import pytest

from tsdae.config import STS_TASKS
from tsdae.report import SCHEMA_VERSION, build_report, load_report, render_markdown, write_report


def _result(all_by_task: dict[str, float], avg7_all: float | None, avg7_wmean: float | None) -> dict:
    """An evaluate_sts-shaped result with wmean = all - 1 and one subset per task."""
    tasks = {t: {"all": v, "wmean": v - 1, "n_pairs": 10, "subsets": {t: {"spearman": v, "n_pairs": 10}}}
             for t, v in all_by_task.items()}
    return {"tasks": tasks, "avg7_all": avg7_all, "avg7_wmean": avg7_wmean, "n_sentences": 20, "pooling": "cls"}


@pytest.fixture
def before_after():
    before = _result({t: 70.0 + i for i, t in enumerate(STS_TASKS)}, 73.0, 72.0)
    after_scores = {t: 70.0 + i + (2.5 if i % 2 == 0 else -1.25) for i, t in enumerate(STS_TASKS)}
    return before, _result(after_scores, 74.5, 73.25)


def test_build_report_deltas(before_after):
    before, after = before_after
    report = build_report(before, after, {"model": "m", "pooling": "cls"})

    assert report["schema_version"] == SCHEMA_VERSION == 1
    assert report["before"] is before and report["after"] is after
    for i, task in enumerate(STS_TASKS):
        expected = 2.5 if i % 2 == 0 else -1.25
        assert report["delta"]["tasks"][task] == {"all": pytest.approx(expected), "wmean": pytest.approx(expected)}
    assert report["delta"]["avg7_all"] == pytest.approx(1.5)
    assert report["delta"]["avg7_wmean"] == pytest.approx(1.25)


def test_markdown_rows_and_signs(before_after):
    before, after = before_after
    md = render_markdown(build_report(before, after, {"model": "m", "pooling": "mean"}))

    rows = {line.split("|")[1].strip(): line for line in md.splitlines() if line.startswith("| ")}
    for i, task in enumerate(STS_TASKS):
        assert task in rows, task
        sign = "+2.50" if i % 2 == 0 else "-1.25"
        assert rows[task].rstrip(" |").endswith(sign), rows[task]
    assert rows["STS12"] == "| STS12 | 70.00 | 72.50 | +2.50 |"
    assert rows["**7-task avg**"] == "| **7-task avg** | 73.00 | 74.50 | +1.50 |"
    assert "pooling: **mean**" in md and "**all**" in md


def test_evaluation_only_report(before_after, tmp_path):
    before, _ = before_after
    partial = _result({"STSB-dev": 80.0}, None, None)
    report = build_report(partial, None, {"model": "m"})
    assert report["after"] is None and report["delta"] is None
    md = render_markdown(report)
    assert "| STSB-dev | 80.00 | — | — |" in md
    assert "| **7-task avg** | — | — | — |" in md
    write_report(report, str(tmp_path))  # None values are valid JSON


def test_write_report_round_trip_and_no_temp_files(before_after, tmp_path):
    before, after = before_after
    report = build_report(before, after, {"model": "m", "pooling": "cls", "steps": 100})
    out = tmp_path / "nested" / "out"

    paths = write_report(report, str(out))

    assert set(paths) == {"json", "markdown"}
    assert load_report(paths["json"]) == json.loads(json.dumps(report))
    assert open(paths["markdown"]).read() == render_markdown(report)
    assert sorted(os.listdir(out)) == ["report.json", "report.md"]


def test_crash_mid_write_keeps_previous_report(before_after, tmp_path, monkeypatch):
    before, after = before_after
    paths = write_report(build_report(before, after, {"model": "old"}), str(tmp_path))

    def crash(fd):
        raise OSError("disk gone")

    monkeypatch.setattr(os, "fsync", crash)  # dies after the temp file is written, before os.replace
    with pytest.raises(OSError, match="disk gone"):
        write_report(build_report(before, after, {"model": "new"}), str(tmp_path))

    assert load_report(paths["json"])["meta"]["model"] == "old"
    assert sorted(os.listdir(tmp_path)) == ["report.json", "report.md"]


def test_nan_is_refused(before_after, tmp_path):
    before, after = before_after
    before["avg7_all"] = float("nan")
    with pytest.raises(ValueError):
        write_report(build_report(before, after, {}), str(tmp_path))
    assert os.listdir(tmp_path) == []


def test_load_report_rejects_unknown_schema(tmp_path):
    path = tmp_path / "report.json"
    path.write_text(json.dumps({"schema_version": 2}))
    with pytest.raises(ValueError, match="schema_version 2"):
        load_report(str(path))
