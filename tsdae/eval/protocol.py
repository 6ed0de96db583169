"""The STS protocol (SentEval / SimCSE): cosine similarity of the two embeddings of a pair, Spearman
correlation with the gold scores, ×100.

Two aggregations of a task made of several subsets, because the literature uses both and they can differ
by several points:
  all   — the subsets' pairs concatenated, one Spearman (SentEval's "all", the SimCSE tables);
  wmean — the subsets' Spearman correlations averaged with weights = their pair counts.
The 7-task average (AVERAGE_TASKS) uses each task's ``all`` (and, separately, ``wmean``).

Pure computation only: no logging, no files. ``tsdae.eval.encode`` wires a model in, ``tsdae.eval.report`` writes.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
from scipy.stats import spearmanr

from tsdae.eval.config import AVERAGE_TASKS
from tsdae.eval.sts import StsSubset

EncodeFn = Callable[[list[str]], np.ndarray]


def cosine_similarity(a_NH: np.ndarray, b_NH: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two (N, H) arrays, computed in float64; a zero vector gives 0."""
    a = np.asarray(a_NH, dtype=np.float64)
    b = np.asarray(b_NH, dtype=np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return (a * b).sum(axis=1) / np.maximum(norms, 1e-12)


def spearman100(x: np.ndarray, y: np.ndarray) -> float | None:
    """Spearman's rank correlation of x and y, ×100; None when undefined (constant input, < 2 pairs),
    so that results stay valid JSON."""
    if len(x) < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    rho = float(spearmanr(x, y).statistic)
    return 100.0 * rho if math.isfinite(rho) else None


def unique_sentences(subsets_by_task: dict[str, list[StsSubset]]) -> list[str]:
    """Every distinct sentence of every pair, in order of first appearance."""
    seen: dict[str, None] = {}
    for subsets in subsets_by_task.values():
        for subset in subsets:
            seen.update(dict.fromkeys(subset.sentences1))
            seen.update(dict.fromkeys(subset.sentences2))
    return list(seen)


def score_task(sims_by_subset: dict[str, np.ndarray], gold_by_subset: dict[str, np.ndarray]) -> dict:
    """Aggregate one task. Both dicts map subset name → (N,) arrays, in the same order.

    Returns {"all", "wmean", "n_pairs", "subsets": {name: {"spearman", "n_pairs"}}}; ``wmean`` skips
    subsets whose correlation is undefined and is None if all are.
    """
    subsets = {}
    for name, sims in sims_by_subset.items():
        subsets[name] = {"spearman": spearman100(sims, gold_by_subset[name]), "n_pairs": int(len(sims))}
    all_sims = np.concatenate([np.asarray(s, dtype=np.float64) for s in sims_by_subset.values()])
    all_gold = np.concatenate([np.asarray(g, dtype=np.float64) for g in gold_by_subset.values()])
    scored = [s for s in subsets.values() if s["spearman"] is not None]
    weight = sum(s["n_pairs"] for s in scored)
    wmean = sum(s["spearman"] * s["n_pairs"] for s in scored) / weight if weight else None
    return {"all": spearman100(all_sims, all_gold), "wmean": wmean, "n_pairs": int(len(all_sims)),
            "subsets": subsets}


def average_over(tasks: dict[str, dict], key: str, names: tuple[str, ...] = AVERAGE_TASKS) -> float | None:
    """Mean of tasks[name][key] over names; None unless every name was evaluated with a defined value."""
    values = [tasks[name][key] if name in tasks else None for name in names]
    if any(v is None for v in values):
        return None
    return sum(values) / len(values)


def evaluate_sts(encode: EncodeFn, subsets_by_task: dict[str, list[StsSubset]]) -> dict:
    """Evaluate an encoder on STS tasks.

    encode: list of N sentences → (N, H) array; called exactly once, with every distinct sentence of
    every task once (STS12–16, STS-B and SICK share ~25% of their sentences).
    subsets_by_task: task name → its subsets (``tsdae.eval.sts.load_task``).

    Returns a JSON-serialisable dict:
      {"tasks": {task: {"all", "wmean", "n_pairs", "subsets": {name: {"spearman", "n_pairs"}}}},
       "avg7_all": float | None, "avg7_wmean": float | None, "n_sentences": int}
    Correlations are Spearman ×100; the averages are over AVERAGE_TASKS and None unless all seven
    were evaluated.
    """
    sentences = unique_sentences(subsets_by_task)
    emb_NH = np.asarray(encode(sentences)) if sentences else np.zeros((0, 1), dtype=np.float32)
    if emb_NH.ndim != 2 or emb_NH.shape[0] != len(sentences):
        raise ValueError(f"encode returned shape {emb_NH.shape} for {len(sentences)} sentences; expected (N, H)")
    row = {s: i for i, s in enumerate(sentences)}

    tasks = {}
    for task, subsets in subsets_by_task.items():
        sims, gold = {}, {}
        for subset in subsets:
            idx1 = np.fromiter((row[s] for s in subset.sentences1), dtype=np.int64, count=len(subset.sentences1))
            idx2 = np.fromiter((row[s] for s in subset.sentences2), dtype=np.int64, count=len(subset.sentences2))
            sims[subset.name] = cosine_similarity(emb_NH[idx1], emb_NH[idx2])
            gold[subset.name] = subset.scores
        tasks[task] = score_task(sims, gold)
    return {"tasks": tasks, "avg7_all": average_over(tasks, "all"), "avg7_wmean": average_over(tasks, "wmean"),
            "n_sentences": len(sentences)}
