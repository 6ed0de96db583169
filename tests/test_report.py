"""Report: schema, deltas (vs base and vs production), Markdown tables, atomic files and round trip."""

from __future__ import annotations

import json
import os

import pytest

from tsdae.eval import STS_TASKS
from tsdae.eval.report import SCHEMA_VERSION, build_report, load_report, render_markdown, write_report


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


def _sections(md: str) -> dict[str, dict[str, str]]:
    """{section heading: {first cell: table row}} of a rendered report."""
    out, current = {}, None
    for line in md.splitlines():
        if line.startswith("## "):
            current = out.setdefault(line[3:], {})
        elif line.startswith("| ") and current is not None:
            current[line.split("|")[1].strip()] = line
    return out


def test_build_report_deltas(before_after):
    before, after = before_after
    report = build_report(before, after, {"model": "m", "pooling": "cls"})

    assert report["schema_version"] == SCHEMA_VERSION == 2
    assert set(report["aggregations"]) == {"all", "wmean"}
    assert report["before"] is before and report["after"] is after
    assert report["production"] is None and report["delta_production"] is None and report["validation"] is None
    for i, task in enumerate(STS_TASKS):
        expected = 2.5 if i % 2 == 0 else -1.25
        assert report["delta"]["tasks"][task] == {"all": pytest.approx(expected), "wmean": pytest.approx(expected)}
    assert report["delta"]["avg7_all"] == pytest.approx(1.5)
    assert report["delta"]["avg7_wmean"] == pytest.approx(1.25)


def test_production_deltas_and_columns(before_after):
    before, after = before_after
    production = _result({t: 71.0 for t in STS_TASKS}, 71.0, 70.0)
    report = build_report(before, after, {"model": "m"}, production=production)

    assert report["delta_production"]["tasks"]["STS12"]["all"] == pytest.approx(72.5 - 71.0)
    assert report["delta_production"]["avg7_all"] == pytest.approx(74.5 - 71.0)
    rows = _sections(render_markdown(report))["Aggregation `all` (subsets concatenated; SentEval/SimCSE)"]
    assert rows["task"] == "| task | before | after | delta | production | vs production |"
    assert rows["STS12"] == "| STS12 | 70.00 | 72.50 | +2.50 | 71.00 | +1.50 |"
    assert rows["**7-task avg**"] == "| **7-task avg** | 73.00 | 74.50 | +1.50 | 71.00 | +3.50 |"

    # Evaluation only (no after): the one model is compared with production.
    alone = build_report(before, None, {"model": "m"}, production=production)
    assert alone["delta"] is None
    assert alone["delta_production"]["tasks"]["STS12"]["all"] == pytest.approx(70.0 - 71.0)


def test_markdown_both_aggregations_labelled(before_after):
    before, after = before_after
    md = render_markdown(build_report(before, after, {"model": "m", "pooling": "mean",
                                                      "labels": {"before": "base", "after": "trained"}}))
    sections = _sections(md)
    all_rows = sections["Aggregation `all` (subsets concatenated; SentEval/SimCSE)"]
    wmean_rows = sections["Aggregation `wmean` (size-weighted mean of subset correlations)"]
    for i, task in enumerate(STS_TASKS):
        sign = "+2.50" if i % 2 == 0 else "-1.25"
        assert all_rows[task].rstrip(" |").endswith(sign), all_rows[task]
    assert all_rows["task"] == "| task | base | trained | delta |"
    assert all_rows["STS12"] == "| STS12 | 70.00 | 72.50 | +2.50 |"
    assert wmean_rows["STS12"] == "| STS12 | 69.00 | 71.50 | +2.50 |"
    assert all_rows["**7-task avg**"] == "| **7-task avg** | 73.00 | 74.50 | +1.50 |"
    assert wmean_rows["**7-task avg**"] == "| **7-task avg** | 72.00 | 73.25 | +1.25 |"
    assert "pooling: **mean**" in md and "**all**" in md and "**wmean**" in md
    assert "Per subset" not in sections  # one subset per task: nothing to break down


def test_per_subset_validation_and_bad_rows_sections(before_after):
    before, after = before_after
    for result, shift in ((before, 0.0), (after, 3.0)):
        result["tasks"]["STS12"]["subsets"] = {"MSRpar": {"spearman": 40.0 + shift, "n_pairs": 750},
                                               "OnWN": {"spearman": 60.0 + shift, "n_pairs": 750}}
    after["bad_rows"] = {"mine": {"n_rows": 10, "n_bad": 2, "examples": [{"row": 3, "reason": "missing score"}]}}
    validation = [{"val_step": 100, "val_spearman": 80.0, "val_task": "STSB-dev"},
                  {"val_step": 200, "val_spearman": 81.5, "val_task": "STSB-dev"}]
    md = render_markdown(build_report(before, after, {"model": "m"}, validation=validation))
    sections = _sections(md)

    assert sections["Per subset"]["STS12"] == "| STS12 | OnWN | 750 | 60.00 | 63.00 |"  # last subset row
    assert "| STS12 | MSRpar | 750 | 40.00 | 43.00 |" in md
    assert sections["STSB-dev during training (`all`)"]["200"] == "| 200 | 81.50 |"
    assert "Best checkpoint: step 200 (81.50)." in md
    assert "after / mine: 2 of 10 rows skipped (row 3: missing score)" in md


def test_evaluation_only_report(before_after, tmp_path):
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


def test_load_report_upgrades_v1_and_rejects_unknown_schema(before_after, tmp_path):
    before, after = before_after
    path = tmp_path / "report.json"
    path.write_text(json.dumps({"schema_version": 1, "meta": {}, "before": before, "after": after, "delta": None}))
    report = load_report(str(path))
    assert report["schema_version"] == 2 and report["production"] is None and report["validation"] is None
    render_markdown(report)

    path.write_text(json.dumps({"schema_version": 3}))
    with pytest.raises(ValueError, match="schema_version 3"):
        load_report(str(path))
