"""Deletion noise: pure, no Ray, no model (milliseconds)."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.noise import delete_words


def _corpus(n_rows: int, seed: int = 0) -> tuple[list[str], np.ndarray]:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 30, size=n_rows)
    texts = [" ".join(f"w{j}_{i}" for j in range(k)) for i, k in enumerate(lengths)]  # all words distinct
    keys = rng.integers(0, 2**64, size=n_rows, dtype=np.uint64)
    return texts, keys


def _noise(texts, keys, seed=0, epoch=0, del_ratio=0.6):
    return delete_words(texts, keys, seed=seed, epoch=epoch, del_ratio=del_ratio)


def test_deleted_fraction_matches_ratio():
    texts, keys = _corpus(8000)
    texts = [t for t in texts if len(t.split()) >= 10]  # where "at least one word" almost never fires
    keys = keys[: len(texts)]
    noisy = _noise(texts, keys)
    n_words = sum(len(t.split()) for t in texts)
    n_kept = sum(len(t.split()) for t in noisy)
    assert n_words > 100_000
    assert abs(1 - n_kept / n_words - 0.6) < 0.01


def test_keeps_at_least_one_word_and_the_order():
    texts, keys = _corpus(3000)
    texts[:3] = ["single", "two words", "   spaced \t out\nwords  "]
    for text, noisy in zip(texts, _noise(texts, keys, del_ratio=0.95)):
        kept = noisy.split(" ")
        assert len(kept) >= 1 and all(kept)  # at least one word, single spaces, no empty words
        words = iter(text.split())
        assert all(w in words for w in kept), (text, noisy)  # a subsequence: order kept


def test_identical_whatever_the_batch_composition():
    texts, keys = _corpus(500)
    whole = _noise(texts, keys, epoch=3)
    pieces = [_noise(texts[i:i + 37], keys[i:i + 37], epoch=3) for i in range(0, 500, 37)]
    assert sum(pieces, []) == whole
    order = np.random.default_rng(1).permutation(500)
    shuffled = _noise([texts[i] for i in order], keys[order], epoch=3)
    assert shuffled == [whole[i] for i in order]
    per_row_epochs = _noise(texts, keys, epoch=np.full(500, 3))
    assert per_row_epochs == whole


def test_changes_with_epoch_and_seed_but_not_with_nothing():
    texts, keys = _corpus(300)
    base = _noise(texts, keys, seed=0, epoch=0)
    assert _noise(texts, keys, seed=0, epoch=0) == base
    for other in (_noise(texts, keys, seed=0, epoch=1), _noise(texts, keys, seed=1, epoch=0)):
        changed = sum(a != b for a, b in zip(base, other))
        assert changed > 0.5 * len(texts)


def test_row_key_decides_the_noise_not_the_text_position():
    texts = ["the same sentence with quite a few words in it for noise"] * 2
    same = _noise(texts, np.array([5, 5], dtype=np.uint64))
    different = _noise(texts, np.array([5, 6], dtype=np.uint64))
    assert same[0] == same[1]
    assert different[0] != different[1]


def test_zero_ratio_keeps_everything_normalized():
    texts, keys = _corpus(200)
    texts[0] = "  extra   spaces\there "
    noisy = _noise(texts, keys, del_ratio=0.0)
    assert noisy == [" ".join(t.split()) for t in texts]


def test_empty_inputs():
    assert _noise([], np.array([], dtype=np.uint64)) == []
    assert _noise(["", "   ", "word"], np.arange(3, dtype=np.uint64)) == ["", "", "word"]
    with pytest.raises(ValueError, match="row keys"):
        _noise(["a", "b"], np.arange(1, dtype=np.uint64))
