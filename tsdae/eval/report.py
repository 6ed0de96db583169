"""The run report: STS results of the base model, the trained model and (optionally) the model in
production, with deltas, as versioned JSON and Markdown tables; charts are ``tsdae.eval.charts``.

``build_report`` and ``render_markdown`` are pure; ``write_report`` is the only function that touches
files, and it writes each file atomically (temp file + os.replace), so a crash never leaves a
half-written report behind.
"""

from __future__ import annotations

import json
from pathlib import Path

from tsdae.eval.config import STS_TASKS
from tsdae.storage import write_atomic

SCHEMA_VERSION = 2
KNOWN_SCHEMAS = (1, 2)  # version 1 had no "production", "delta_production" or "validation"
_AVERAGES = ("avg7_all", "avg7_wmean")
AGGREGATIONS = {
    "all": "each task's subsets concatenated, then one Spearman correlation (SentEval/SimCSE default)",
    "wmean": "mean of the subsets' Spearman correlations weighted by their pair counts",
}
DEFAULT_LABELS = {"before": "before", "after": "after", "production": "production"}


def _diff(before: float | None, after: float | None) -> float | None:
    return None if before is None or after is None else after - before


def compare(old: dict, new: dict) -> dict:
    """new − old for two ``evaluate_sts``-shaped results, on the tasks both evaluated:
    {"tasks": {task: {"all", "wmean"}}, "avg7_all", "avg7_wmean"}; a None side gives a None delta."""
    common = [t for t in old["tasks"] if t in new["tasks"]]
    delta = {"tasks": {t: {k: _diff(old["tasks"][t][k], new["tasks"][t][k]) for k in AGGREGATIONS}
                       for t in common}}
    delta.update({k: _diff(old.get(k), new.get(k)) for k in _AVERAGES})
    return delta


def build_report(before: dict, after: dict | None, meta: dict, production: dict | None = None,
                 validation: list[dict] | None = None) -> dict:
    """Compose a report from ``evaluate_sts``-shaped results and run metadata (model, pooling, config,
    …; must be JSON-serialisable; an optional meta["labels"] renames the before/after/production columns).

    before: the base model; after: the trained model (None for evaluation-only runs); production: the
    previously promoted model (optional); validation: the periodic dev scores of the run
    (``tsdae.train.validation.load_validation_history``), optional.

    Returns {"schema_version": 2, "aggregations", "meta", "before", "after", "production", "delta",
    "delta_production", "validation"}: delta = after − before (None without after); delta_production =
    (after, else before) − production (None without production). Deltas have ``compare``'s shape.
    """
    delta = compare(before, after) if after is not None else None
    candidate = after if after is not None else before
    delta_production = compare(production, candidate) if production is not None else None
    return {"schema_version": SCHEMA_VERSION, "aggregations": dict(AGGREGATIONS), "meta": dict(meta),
            "before": before, "after": after, "production": production, "delta": delta,
            "delta_production": delta_production, "validation": list(validation) if validation else None}


def _fmt(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "—"
    return f"{value:+.2f}" if signed else f"{value:.2f}"


def ordered_tasks(report: dict) -> list[str]:
    """Tasks of every result in the report, the suite's order first, then custom sets."""
    seen: dict[str, None] = {}
    for key in ("before", "after", "production"):
        if report.get(key) is not None:
            seen.update(dict.fromkeys(report[key]["tasks"]))
    return [t for t in STS_TASKS if t in seen] + [t for t in seen if t not in STS_TASKS]


def _cell(result: dict | None, task: str, key: str) -> float | None:
    entry = (result or {}).get("tasks", {}).get(task)
    return None if entry is None else entry[key]


def _delta_cell(delta: dict | None, task: str, key: str) -> float | None:
    return None if delta is None else delta["tasks"].get(task, {}).get(key)


def _task_table(report: dict, key: str, labels: dict) -> list[str]:
    """One Markdown table: a row per task and the 7-task average, for aggregation key."""
    before, after, production = report["before"], report["after"], report.get("production")
    delta, delta_p = report["delta"], report.get("delta_production")
    head = f"| task | {labels['before']} | {labels['after']} | delta |"
    rule = "| --- | ---: | ---: | ---: |"
    if production is not None:
        head += f" {labels['production']} | vs {labels['production']} |"
        rule += " ---: | ---: |"
    rows = [head, rule]

    def row(name: str, b, a, d, p, dp) -> str:
        line = f"| {name} | {_fmt(b)} | {_fmt(a)} | {_fmt(d, True)} |"
        return line + (f" {_fmt(p)} | {_fmt(dp, True)} |" if production is not None else "")

    for task in ordered_tasks(report):
        rows.append(row(task, _cell(before, task, key), _cell(after, task, key), _delta_cell(delta, task, key),
                        _cell(production, task, key), _delta_cell(delta_p, task, key)))
    avg = f"avg7_{key}"
    rows.append(row("**7-task avg**", before.get(avg), (after or {}).get(avg), (delta or {}).get(avg),
                    (production or {}).get(avg), (delta_p or {}).get(avg)))
    return rows


def _subset_table(report: dict, labels: dict) -> list[str]:
    """Per-subset Spearman ×100 of the multi-subset tasks (STS12–16), every result side by side."""
    sides = [(labels[k], report[k]) for k in ("before", "after", "production") if report.get(k) is not None]
    rows = ["| task | subset | pairs | " + " | ".join(name for name, _ in sides) + " |",
            "| --- | --- | ---: | " + " | ".join("---:" for _ in sides) + " |"]
    for task in ordered_tasks(report):
        subsets: dict[str, int] = {}
        for _, result in sides:
            for name, entry in result["tasks"].get(task, {}).get("subsets", {}).items():
                subsets.setdefault(name, entry["n_pairs"])
        if len(subsets) < 2:
            continue
        for name, n_pairs in subsets.items():
            values = [result["tasks"].get(task, {}).get("subsets", {}).get(name, {}).get("spearman")
                      for _, result in sides]
            rows.append(f"| {task} | {name} | {n_pairs} | " + " | ".join(_fmt(v) for v in values) + " |")
    return rows if len(rows) > 2 else []


def render_markdown(report: dict) -> str:
    """A Markdown summary: per task and the 7-task average, for both aggregations (``all`` first, the
    literature's default), with deltas; per-subset numbers; the dev scores during training; skipped
    rows of custom sets; and a note on the protocol and pooling."""
    before, after, meta = report["before"], report["after"], report["meta"]
    labels = {**DEFAULT_LABELS, **(meta.get("labels") or {})}
    pooling = meta.get("pooling", before.get("pooling", "unknown"))

    lines = ["# STS evaluation", ""]
    lines += [f"- **{k}**: {v}" for k, v in meta.items() if isinstance(v, (str, int, float, bool))]
    lines += ["", "## Aggregation `all` (subsets concatenated; SentEval/SimCSE)", ""]
    lines += _task_table(report, "all", labels)
    lines += ["", "## Aggregation `wmean` (size-weighted mean of subset correlations)", ""]
    lines += _task_table(report, "wmean", labels)
    subsets = _subset_table(report, labels)
    if subsets:
        lines += ["", "## Per subset", ""] + subsets
    validation = report.get("validation")
    if validation:
        task = validation[0].get("val_task", "dev")
        best = max((r for r in validation if r.get("val_spearman") is not None),
                   key=lambda r: r["val_spearman"], default=None)
        lines += ["", f"## {task} during training (`all`)", "", "| step | Spearman ×100 |", "| ---: | ---: |"]
        lines += [f"| {r.get('val_step')} | {_fmt(r.get('val_spearman'))} |" for r in validation]
        if best is not None:
            lines += ["", f"Best checkpoint: step {best.get('val_step')} ({_fmt(best['val_spearman'])})."]
    issues = {k: r["bad_rows"] for k, r in (("before", before), ("after", after), ("production",
              report.get("production"))) if r and r.get("bad_rows")}
    if issues:
        lines += ["", "## Skipped rows in custom sets", ""]
        for side, by_task in issues.items():
            for task, info in by_task.items():
                shown = "; ".join(f"row {e['row']}: {e['reason']}" for e in info["examples"][:5])
                lines.append(f"- {labels[side]} / {task}: {info['n_bad']} of {info['n_rows']} rows skipped ({shown})")
    lines += [
        "",
        f"Spearman correlation ×100 of cosine similarity with the gold scores; pooling: **{pooling}**. "
        f"Aggregation **all**: {AGGREGATIONS['all']}; **wmean**: {AGGREGATIONS['wmean']}. "
        "The 7-task average is over STS12–16, STSB-test and SICK-R (STSB-dev and custom sets not "
        "included) and is shown only when all seven were evaluated.",
        "",
    ]
    return "\n".join(lines)


def write_report(report: dict, out_dir: str) -> dict[str, str]:
    """Write ``report.json`` (strict JSON: NaN is refused) and ``report.md`` under out_dir (created if
    needed); returns {"json": path, "markdown": path}."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "report.json", "markdown": out / "report.md"}
    write_atomic(paths["json"], json.dumps(report, indent=2, allow_nan=False) + "\n")
    write_atomic(paths["markdown"], render_markdown(report))
    return {k: str(v) for k, v in paths.items()}


def load_report(path: str) -> dict:
    """Read a report.json, refusing a schema version this code does not know; a version-1 report is
    returned in the current shape (no production, no validation)."""
    report = json.loads(Path(path).read_text(encoding="utf-8"))
    version = report.get("schema_version")
    if version not in KNOWN_SCHEMAS:
        raise ValueError(f"{path}: schema_version {version!r}, expected one of {KNOWN_SCHEMAS}")
    if version == 1:
        report = {**report, "schema_version": SCHEMA_VERSION, "aggregations": dict(AGGREGATIONS),
                  "production": None, "delta_production": None, "validation": None}
    return report
