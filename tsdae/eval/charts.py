"""PNG charts of a run: STS per task (base / trained / production), the training loss, and the dev score
over steps. Matplotlib's object API on the Agg canvas: no pyplot, no global figure state, safe in Ray
workers and headless jobs. Each file is written atomically (``tsdae.storage.write_atomic``).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from tsdae.eval.report import DEFAULT_LABELS, ordered_tasks
from tsdae.storage import write_atomic

_COLORS = {"before": "#9aa5b1", "after": "#1f77b4", "production": "#ff7f0e"}


def _figure(width: float = 8.0, height: float = 4.0):
    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    write_atomic(path, buf.getvalue())
    return str(path)


def plot_task_bars(report: dict, path: str | Path, key: str = "all") -> str:
    """Grouped bars, one group per task plus the 7-task average: Spearman ×100 (aggregation key) of each
    result in the report, the trained model's delta written above its bar."""
    labels = {**DEFAULT_LABELS, **(report["meta"].get("labels") or {})}
    sides = [k for k in ("before", "after", "production") if report.get(k) is not None]
    tasks = ordered_tasks(report)

    def value(side: str, group: str):
        result = report[side]
        if group == "7-task avg":
            return result.get(f"avg7_{key}")
        entry = result["tasks"].get(group)
        return None if entry is None else entry[key]

    has_avg = any(report[s].get(f"avg7_{key}") is not None for s in sides)
    groups = tasks + (["7-task avg"] if has_avg else [])

    fig = _figure(max(8.0, 1.0 * len(groups)), 4.2)
    ax = fig.add_subplot()
    width = 0.8 / len(sides)
    x = np.arange(len(groups))
    for i, side in enumerate(sides):
        heights = [value(side, g) for g in groups]
        xs = x - 0.4 + width * (i + 0.5)
        bars = ax.bar(xs, [h if h is not None else 0.0 for h in heights], width, label=labels[side],
                      color=_COLORS[side])
        if side == "after" and report.get("delta"):
            delta = report["delta"]
            for bar, g in zip(bars, groups):
                d = delta.get(f"avg7_{key}") if g == "7-task avg" else delta["tasks"].get(g, {}).get(key)
                if d is not None:
                    ax.annotate(f"{d:+.1f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                                ha="center", va="bottom", fontsize=7, xytext=(0, 2), textcoords="offset points")
    values = [value(s, g) for s in sides for g in groups if value(s, g) is not None]
    low = min(values, default=0.0)
    ax.set_ylim(max(0.0, low - 10.0) if low > 0 else low - 5.0, max(values, default=100.0) + 8.0)
    ax.set_xticks(x, groups, rotation=30, ha="right")
    ax.set_ylabel(f"Spearman ×100 ({key})")
    ax.set_title(f"STS per task, aggregation '{key}' (pooling: {report['meta'].get('pooling', 'unknown')})")
    ax.legend(loc="upper left", ncols=len(sides), fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, Path(path))


def plot_loss_curve(history: list[dict], path: str | Path) -> str:
    """Training loss (the mean over each reporting window, all ranks) against the optimizer step;
    history rows as in the run's metrics.jsonl: {"step", "loss", …}."""
    rows = [r for r in history if r.get("loss") is not None]
    fig = _figure(7.0, 3.6)
    ax = fig.add_subplot()
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], marker="." if len(rows) < 50 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("reconstruction loss")
    ax.set_title("TSDAE training loss")
    ax.grid(alpha=0.3)
    return _save(fig, Path(path))


def plot_dev_curve(records: list[dict], path: str | Path, base_score: float | None = None) -> str:
    """Dev Spearman ×100 over steps (``tsdae.train.validation.load_validation_history`` records), the base
    model's score as a dashed line, the best checkpoint marked."""
    rows = [r for r in records if r.get("val_spearman") is not None and r.get("val_step") is not None]
    task = records[0].get("val_task", "dev") if records else "dev"
    fig = _figure(7.0, 3.6)
    ax = fig.add_subplot()
    steps, scores = [r["val_step"] for r in rows], [r["val_spearman"] for r in rows]
    ax.plot(steps, scores, marker="o", label="checkpoint")
    if rows:
        best = max(rows, key=lambda r: r["val_spearman"])
        ax.scatter([best["val_step"]], [best["val_spearman"]], s=120, facecolors="none", edgecolors="red",
                   zorder=3, label=f"best: step {best['val_step']} ({best['val_spearman']:.2f})")
    if base_score is not None:
        ax.axhline(base_score, linestyle="--", color="gray", label=f"base model ({base_score:.2f})")
    ax.set_xlabel("step")
    ax.set_ylabel("Spearman ×100 (all)")
    ax.set_title(f"{task} during training")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, Path(path))


def write_charts(report: dict, out_dir: str, history: list[dict] | None = None) -> dict[str, str]:
    """Write the charts that the data allows into out_dir: ``sts_tasks.png`` always, ``loss.png`` with a
    training history, ``dev_over_steps.png`` when the report has validation records. Returns
    {name: path}."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"sts_tasks": plot_task_bars(report, out / "sts_tasks.png")}
    if history:
        paths["loss"] = plot_loss_curve(history, out / "loss.png")
    if report.get("validation"):
        task = report["validation"][0].get("val_task", "STSB-dev")
        base = (report["before"]["tasks"].get(task) or {}).get("all")
        paths["dev_over_steps"] = plot_dev_curve(report["validation"], out / "dev_over_steps.png", base)
    return paths
