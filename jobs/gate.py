"""The regression gate: promote a candidate only if it is at least as good as production on STS.

Pure: two ``evaluate_sts``-shaped results in, a JSON-serialisable decision out. Both results must come
from the same evaluation run of the same suite (the nightly job scores production and the candidate
back to back), so a change of STS data or evaluation code can never look like a regression.
"""

from __future__ import annotations

from jobs.config import GateConfig
from tsdae.eval import AVERAGE_TASKS


def gated_tasks(tasks: list[str]) -> list[str]:
    """The evaluated tasks the gate averages: those of the 7-task average (STS-B dev is for model
    selection, not for the gate), in the suite's order."""
    return [t for t in AVERAGE_TASKS if t in tasks]


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def decide(production: dict, candidate: dict, cfg: GateConfig) -> dict:
    """Compare candidate with production on the tasks both evaluated (``all`` Spearman ×100).

    Promote iff candidate's average ≥ production's − cfg.tolerance and no task drops by more than
    cfg.max_task_drop. The average is the 7-task average when all seven were evaluated, else the mean
    over the gated tasks that were ("average_tasks" says which). A task whose candidate score is
    undefined (constant embeddings) rejects; one whose production score is undefined is not compared.

    Returns {"promote": bool, "reasons": [str], "average_tasks", "is_7_task_average",
             "production": {"avg", "tasks"}, "candidate": {"avg", "tasks"}, "delta": {"avg", "tasks"},
             "tolerance", "max_task_drop"}.
    """
    tasks = gated_tasks([t for t in production["tasks"] if t in candidate["tasks"]])
    prod = {t: production["tasks"][t]["all"] for t in tasks}
    cand = {t: candidate["tasks"][t]["all"] for t in tasks}
    reasons = []
    if not tasks:
        reasons.append(f"no task of the 7-task average was evaluated on both models ({list(AVERAGE_TASKS)})")
    undefined = [t for t in tasks if cand[t] is None]
    if undefined:
        reasons.append(f"candidate has no defined score on {undefined}")
    compared = [t for t in tasks if cand[t] is not None and prod[t] is not None]
    delta = {t: cand[t] - prod[t] for t in compared}
    prod_avg = _mean([prod[t] for t in compared]) if compared else None
    cand_avg = _mean([cand[t] for t in compared]) if compared else None
    if compared and not undefined:
        if cand_avg < prod_avg - cfg.tolerance:
            reasons.append(f"average {cand_avg:.2f} is below production's {prod_avg:.2f} minus tolerance "
                           f"{cfg.tolerance:g}")
        dropped = {t: round(d, 2) for t, d in delta.items() if -d > cfg.max_task_drop}
        if dropped:
            reasons.append(f"task(s) dropped by more than {cfg.max_task_drop:g}: {dropped}")
    return {
        "promote": not reasons,
        "reasons": reasons,
        "average_tasks": compared,
        "is_7_task_average": len(compared) == len(AVERAGE_TASKS),
        "production": {"avg": prod_avg, "tasks": prod},
        "candidate": {"avg": cand_avg, "tasks": cand},
        "delta": {"avg": None if prod_avg is None else cand_avg - prod_avg, "tasks": delta},
        "tolerance": cfg.tolerance,
        "max_task_drop": cfg.max_task_drop,
    }


def summarize(decision: dict) -> str:
    """One line for logs and the report: the verdict and its numbers."""
    avg = decision["delta"]["avg"]
    numbers = ("" if avg is None else
               f"avg {decision['candidate']['avg']:.2f} vs production {decision['production']['avg']:.2f} "
               f"({avg:+.2f}, tolerance {decision['tolerance']:g}, max task drop {decision['max_task_drop']:g})")
    if decision["promote"]:
        return f"PROMOTE: {numbers}"
    return f"REJECT: {'; '.join(decision['reasons'])}" + (f" [{numbers}]" if numbers else "")
