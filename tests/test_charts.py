"""Charts: each PNG is written (valid header, non-trivial size) from the data it needs, and only then."""

from __future__ import annotations

import os

from tsdae.eval.charts import plot_dev_curve, plot_loss_curve, plot_task_bars, write_charts
from tsdae.eval import STS_TASKS
from tsdae.eval.report import build_report

PNG = b"\x89PNG\r\n\x1a\n"


def _result(offset: float) -> dict:
    tasks = {t: {"all": 70.0 + i + offset, "wmean": 69.0 + i + offset, "n_pairs": 10, "subsets": {}}
             for i, t in enumerate(STS_TASKS)}
    return {"tasks": tasks, "avg7_all": 73.0 + offset, "avg7_wmean": 72.0 + offset, "pooling": "cls"}


def _is_png(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(8) == PNG and os.path.getsize(path) > 5_000


def test_write_charts_all_three(tmp_path):
    validation = [{"val_step": s, "val_spearman": 79.0 + s / 100, "val_task": "STSB-dev"} for s in (100, 200, 300)]
    report = build_report(_result(0.0), _result(2.0), {"pooling": "cls"}, production=_result(1.0),
                          validation=validation)
    history = [{"step": s, "loss": 5.0 / s} for s in range(10, 310, 10)]

    paths = write_charts(report, str(tmp_path / "run"), history=history)

    assert set(paths) == {"sts_tasks", "loss", "dev_over_steps"}
    assert all(_is_png(p) for p in paths.values())
    assert sorted(os.listdir(tmp_path / "run")) == ["dev_over_steps.png", "loss.png", "sts_tasks.png"]


def test_only_the_charts_the_data_allows(tmp_path):
    report = build_report({"tasks": {"STSB-dev": {"all": 80.0, "wmean": 80.0, "n_pairs": 3, "subsets": {}}},
                           "avg7_all": None, "avg7_wmean": None}, None, {})
    assert set(write_charts(report, str(tmp_path))) == {"sts_tasks"}


def test_single_plots_and_empty_inputs(tmp_path):
    assert _is_png(plot_task_bars(build_report(_result(0.0), None, {}), tmp_path / "bars.png", key="wmean"))
    assert _is_png(plot_loss_curve([{"step": 1, "loss": 2.0}], tmp_path / "loss.png"))
    assert plot_dev_curve([], tmp_path / "dev.png", base_score=80.0).endswith("dev.png")
