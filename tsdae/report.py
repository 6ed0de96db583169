"""The run report: STS results before and after training, as versioned JSON and a Markdown table.

``build_report`` and ``render_markdown`` are pure; ``write_report`` is the only function that touches
files, and it writes each file atomically (temp file + os.replace), so a crash never leaves a
half-written report behind.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from tsdae.config import STS_TASKS

SCHEMA_VERSION = 1
_AVERAGES = ("avg7_all", "avg7_wmean")


def _diff(before: float | None, after: float | None) -> float | None:
    return None if before is None or after is None else after - before


def build_report(before: dict, after: dict | None, meta: dict) -> dict:
    """Compose a report from two ``evaluate_sts``-shaped results (``after`` None for evaluation-only
    runs) and run metadata (model, pooling, config, …; must be JSON-serialisable).

    Returns {"schema_version": 1, "meta", "before", "after", "delta"}; delta is None without ``after``,
    else {"tasks": {task: {"all", "wmean"}}, "avg7_all", "avg7_wmean"} = after − before for the tasks
    both evaluated (a None side gives a None delta).
    """
    delta = None
    if after is not None:
        common = [t for t in before["tasks"] if t in after["tasks"]]
        delta = {"tasks": {t: {k: _diff(before["tasks"][t][k], after["tasks"][t][k]) for k in ("all", "wmean")}
                           for t in common}}
        delta.update({k: _diff(before.get(k), after.get(k)) for k in _AVERAGES})
    return {"schema_version": SCHEMA_VERSION, "meta": dict(meta), "before": before, "after": after,
            "delta": delta}


def _fmt(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "—"
    return f"{value:+.2f}" if signed else f"{value:.2f}"


def _ordered_tasks(report: dict) -> list[str]:
    """Tasks of before (and after), the suite's order first."""
    seen = dict.fromkeys(report["before"]["tasks"])
    if report["after"] is not None:
        seen.update(dict.fromkeys(report["after"]["tasks"]))
    return [t for t in STS_TASKS if t in seen] + [t for t in seen if t not in STS_TASKS]


def render_markdown(report: dict) -> str:
    """A Markdown summary: the ``all`` Spearman ×100 per task before/after/delta, the 7-task average
    row, and a note on aggregation and pooling."""
    before, after, delta, meta = report["before"], report["after"], report["delta"], report["meta"]
    pooling = meta.get("pooling", before.get("pooling", "unknown"))

    def cell(result: dict | None, task: str, key: str = "all") -> float | None:
        entry = (result or {}).get("tasks", {}).get(task)
        return None if entry is None else entry[key]

    lines = ["# STS evaluation", ""]
    lines += [f"- **{k}**: {v}" for k, v in meta.items() if isinstance(v, (str, int, float, bool))]
    lines += ["", "| task | before | after | delta |", "| --- | ---: | ---: | ---: |"]
    for task in _ordered_tasks(report):
        d = None if delta is None else delta["tasks"].get(task, {}).get("all")
        lines.append(f"| {task} | {_fmt(cell(before, task))} | {_fmt(cell(after, task))} | {_fmt(d, True)} |")
    d_avg = None if delta is None else delta["avg7_all"]
    lines.append(f"| **7-task avg** | {_fmt(before.get('avg7_all'))} | "
                 f"{_fmt((after or {}).get('avg7_all'))} | {_fmt(d_avg, True)} |")
    lines += [
        "",
        f"Spearman correlation ×100 of cosine similarity with the gold scores; pooling: **{pooling}**. "
        "Aggregation: **all** (each task's subsets concatenated, then one correlation, as SentEval/SimCSE "
        "report); the 7-task average is over STS12–16, STSB-test and SICK-R (STSB-dev not included) "
        "and is shown only when all seven were evaluated. "
        f"The size-weighted mean of subset correlations (wmean) gives a 7-task average of "
        f"{_fmt(before.get('avg7_wmean'))} before and {_fmt((after or {}).get('avg7_wmean'))} after.",
        "",
    ]
    return "\n".join(lines)


def _write_atomic(path: Path, text: str) -> None:
    """Write text to path through a temp file in the same folder and os.replace (atomic on POSIX)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_report(report: dict, out_dir: str) -> dict[str, str]:
    """Write ``report.json`` (strict JSON: NaN is refused) and ``report.md`` under out_dir (created if
    needed); returns {"json": path, "markdown": path}."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "report.json", "markdown": out / "report.md"}
    _write_atomic(paths["json"], json.dumps(report, indent=2, allow_nan=False) + "\n")
    _write_atomic(paths["markdown"], render_markdown(report))
    return {k: str(v) for k, v in paths.items()}


def load_report(path: str) -> dict:
    """Read a report.json, refusing a schema version this code does not know."""
    report = json.loads(Path(path).read_text(encoding="utf-8"))
    if report.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(f"{path}: schema_version {report.get('schema_version')!r}, expected {SCHEMA_VERSION}")
    return report
