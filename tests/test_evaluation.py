"""The STS protocol on a hand-computed example with a fake encoder (no model)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tsdae.eval import AVERAGE_TASKS
from tsdae.eval.protocol import cosine_similarity, evaluate_sts
from tsdae.eval.sts import StsSubset


def _subset(name: str, sims: list[float], gold: list[float], tag: str) -> tuple[StsSubset, dict]:
    """Pairs (left_i, right_i) whose embeddings have cosine similarity sims[i]: left = [1, 0] scaled,
    right = [c, sqrt(1 - c²)] scaled by a different norm (so a dot product would give other numbers)."""
    vectors = {}
    s1, s2 = [], []
    for i, c in enumerate(sims):
        left, right = f"{tag} left {i}", f"{tag} right {i}"
        vectors[left] = np.array([1.0, 0.0]) * (i + 1)
        vectors[right] = np.array([c, np.sqrt(1 - c * c)]) * (10 - i)
        s1.append(left)
        s2.append(right)
    return StsSubset(name, s1, s2, np.array(gold, dtype=np.float64)), vectors


class FakeEncoder:
    """Looks sentences up in a table and records every call."""

    def __init__(self, vectors: dict[str, np.ndarray]):
        self.vectors, self.calls = vectors, []

    def __call__(self, sentences: list[str]) -> np.ndarray:
        self.calls.append(list(sentences))
        return np.stack([self.vectors[s] for s in sentences]).astype(np.float32)


@pytest.fixture
def two_subset_task():
    # Subset A: sim ranks [3, 2, 1], gold ranks [3, 1, 2] → Σd² = 2, rho = 1 - 6·2/(3·8) = 0.5.
    a, va = _subset("A", [0.9, 0.5, 0.1], [3.0, 1.0, 2.0], "a")
    # Subset B: sims and gold in the same order → rho = 1.
    b, vb = _subset("B", [0.8, 0.7, 0.2, 0.3], [4.5, 3.5, 0.5, 2.5], "b")
    return [a, b], {**va, **vb}


def test_all_vs_wmean_hand_computed(two_subset_task):
    subsets, vectors = two_subset_task
    result = evaluate_sts(FakeEncoder(vectors), {"STS12": subsets})
    task = result["tasks"]["STS12"]

    assert task["subsets"]["A"] == {"spearman": pytest.approx(50.0), "n_pairs": 3}
    assert task["subsets"]["B"] == {"spearman": pytest.approx(100.0), "n_pairs": 4}
    assert task["wmean"] == pytest.approx((50.0 * 3 + 100.0 * 4) / 7)
    # Concatenated: sims [.9 .5 .1 .8 .7 .2 .3] → ranks [7 4 1 6 5 2 3];
    # gold [3 1 2 4.5 3.5 .5 2.5] → ranks [5 2 3 7 6 1 4]; d = [2 2 -2 -1 -1 1 -1], Σd² = 16.
    assert task["all"] == pytest.approx(100 * (1 - 6 * 16 / (7 * 48)))
    assert task["n_pairs"] == 7
    assert result["avg7_all"] is None and result["avg7_wmean"] is None
    json.dumps(result, allow_nan=False)


def test_each_distinct_sentence_encoded_once(two_subset_task):
    subsets, vectors = two_subset_task
    # The same pairs under three tasks, and one pair whose sentences repeat within a subset.
    repeat = StsSubset("R", ["a left 0", "a left 0"], ["a right 0", "b right 3"], np.array([1.0, 2.0]))
    fake = FakeEncoder(vectors)
    result = evaluate_sts(fake, {"STS12": subsets, "STS13": subsets, "STSB-dev": [repeat]})

    assert len(fake.calls) == 1
    [encoded] = fake.calls
    assert len(encoded) == len(set(encoded)) == len(vectors) == result["n_sentences"]
    assert result["tasks"]["STS12"] == result["tasks"]["STS13"]
    assert result["tasks"]["STSB-dev"]["subsets"]["R"]["spearman"] == pytest.approx(-100.0)  # sims .9 > .3


def test_avg7_over_all_seven_tasks(two_subset_task):
    subsets, vectors = two_subset_task
    a, b = subsets
    by_task = {task: [a] if i % 2 else [b, a] for i, task in enumerate(AVERAGE_TASKS)}
    result = evaluate_sts(FakeEncoder(vectors), {**by_task, "STSB-dev": [b]})

    all_ = [result["tasks"][t]["all"] for t in AVERAGE_TASKS]
    wmean = [result["tasks"][t]["wmean"] for t in AVERAGE_TASKS]
    assert result["avg7_all"] == pytest.approx(np.mean(all_))
    assert result["avg7_wmean"] == pytest.approx(np.mean(wmean))
    assert result["avg7_all"] != pytest.approx(result["avg7_wmean"])

    del by_task["SICK-R"]
    assert evaluate_sts(FakeEncoder(vectors), by_task)["avg7_all"] is None


def test_undefined_correlation_is_none_not_nan():
    # Constant gold scores: Spearman is undefined; the result must stay valid JSON.
    s = StsSubset("C", ["x", "y"], ["y", "z"], np.array([2.0, 2.0]))
    vectors = {"x": np.array([1.0, 0.0]), "y": np.array([0.0, 1.0]), "z": np.array([1.0, 1.0])}
    result = evaluate_sts(FakeEncoder(vectors), {"STS12": [s]})
    assert result["tasks"]["STS12"]["all"] is None and result["tasks"]["STS12"]["wmean"] is None
    json.dumps(result, allow_nan=False)


def test_wrong_encode_shape_is_an_error(two_subset_task):
    subsets, _ = two_subset_task
    with pytest.raises(ValueError, match="encode returned shape"):
        evaluate_sts(lambda sentences: np.zeros((len(sentences) - 1, 2)), {"STS12": subsets})


def test_cosine_similarity_scale_invariant_and_zero_safe():
    a = np.array([[1.0, 0.0], [3.0, 4.0], [0.0, 0.0]])
    b = np.array([[5.0, 0.0], [-6.0, -8.0], [1.0, 1.0]])
    np.testing.assert_allclose(cosine_similarity(a, b), [1.0, -1.0, 0.0])
