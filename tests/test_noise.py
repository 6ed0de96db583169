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


# ---- Token-level noise: the five noise types on TokenBatch (pure, milliseconds) --------------------

from pipeline.noise import Noise, TokenBatch, corrupt, delete, draw, insert, mask, row_streams, substitute, swap  # noqa: E402

CANDIDATES = np.arange(1000, 2000, dtype=np.int32)
MASK_ID = 103


def _token_batch(n_rows: int, seed: int = 0) -> tuple[TokenBatch, np.ndarray]:
    """Rows of 1-25 words, each word 1-3 tokens; token ids encode (row, word, piece) so moves are visible."""
    rng = np.random.default_rng(seed)
    words = rng.integers(1, 26, size=n_rows)
    ids, word_ids = [], []
    for r, n in enumerate(words):
        pieces = rng.integers(1, 4, size=n)
        ids.append([10_000 + r * 1000 + w * 10 + p for w, k in enumerate(pieces) for p in range(k)])
        word_ids.append([w for w, k in enumerate(pieces) for _ in range(k)])
    keys = rng.integers(0, 2**64, size=n_rows, dtype=np.uint64)
    return TokenBatch.from_lists(ids, word_ids, words), keys


def _words_of(row: list[int]) -> list[tuple[int, ...]]:
    """Group a row of the ids above back into words (consecutive ids with the same id // 10)."""
    out: list[list[int]] = []
    for t in row:
        if out and t >= 10_000 and out[-1][0] >= 10_000 and out[-1][0] // 10 == t // 10:
            out[-1].append(t)
        else:
            out.append([t])
    return [tuple(w) for w in out]


def test_token_deletion_keeps_order_whole_words_and_one_word():
    batch, keys = _token_batch(2000)
    streams = row_streams(keys, seed=0, epoch=0)
    out = delete(batch, draw(streams, batch), 0.95)
    for before, after in zip(batch.rows(), out.rows()):
        assert len(after) >= 1
        remaining = iter(_words_of(before))
        assert all(w in remaining for w in _words_of(after))  # whole words, in order
    out = delete(batch, draw(streams, batch), 0.6)
    kept = np.bincount(out.word, minlength=len(batch.word_row)) > 0
    long_rows = (np.bincount(batch.word_row) >= 10)[batch.word_row]  # where the rescue almost never fires
    assert abs(1 - kept[long_rows].mean() - 0.6) < 0.02


def test_substitution_and_masking_replace_whole_words_by_one_token():
    batch, keys = _token_batch(1500)
    streams = row_streams(keys, seed=1, epoch=0)
    u = draw(streams, batch, "substitute")
    new_ids = CANDIDATES[np.arange(len(u)) % len(CANDIDATES)]
    out = substitute(batch, u, 0.3, new_ids)
    for before, after in zip(batch.rows(), out.rows()):
        b, a = _words_of(before), _words_of(after)
        assert len(b) == len(a)
        for wb, wa in zip(b, a):
            assert wa == wb or (len(wa) == 1 and wa[0] in CANDIDATES)
    replaced = sum(np.isin(out.ids, CANDIDATES))
    assert abs(replaced / len(batch.word_row) - 0.3) < 0.03
    masked = mask(batch, draw(streams, batch, "mask"), 0.2, MASK_ID)
    assert abs((masked.ids == MASK_ID).sum() / len(batch.word_row) - 0.2) < 0.03


def test_swap_permutes_whole_words_within_each_row():
    batch, keys = _token_batch(1500)
    streams = row_streams(keys, seed=2, epoch=0)
    out = swap(batch, draw(streams, batch, "swap"), 0.5, draw(streams, batch, "swap_order"))
    moved = 0
    for before, after in zip(batch.rows(), out.rows()):
        assert sorted(_words_of(before)) == sorted(_words_of(after))  # same words, each intact
        moved += _words_of(before) != _words_of(after)
    assert moved > 0.5 * batch.n_rows


def test_insertion_adds_random_tokens_between_words():
    batch, keys = _token_batch(1500)
    streams = row_streams(keys, seed=3, epoch=0)
    u = draw(streams, batch, "insert")
    out = insert(batch, u, 0.25, CANDIDATES[np.arange(len(u)) % len(CANDIDATES)])
    for before, after in zip(batch.rows(), out.rows()):
        words = [w for w in _words_of(after) if w[0] >= 10_000]
        assert words == _words_of(before)  # the original words, in order, intact
        assert all(t in CANDIDATES for t in after if t < 10_000)
    assert abs((len(out.ids) - len(batch.ids)) / len(batch.word_row) - 0.25) < 0.03


def test_combined_noise_is_a_function_of_seed_epoch_and_row_key_only():
    batch, keys = _token_batch(400)
    noise = Noise(delete=0.3, substitute=0.1, mask=0.1, swap=0.2, insert=0.1)
    run = lambda b, k, epoch=5: corrupt(b, k, seed=9, epoch=epoch, noise=noise,  # noqa: E731
                                       candidate_ids=CANDIDATES, mask_id=MASK_ID).rows()
    whole = run(batch, keys)
    rows, word_ids = batch.rows(), []
    for r in range(batch.n_rows):
        word_ids.append((batch.word[batch.word_row[batch.word] == r] - np.flatnonzero(batch.word_row == r)[0]).tolist())
    words = np.bincount(batch.word_row, minlength=batch.n_rows)
    order = np.random.default_rng(1).permutation(batch.n_rows)
    shuffled = TokenBatch.from_lists([rows[i] for i in order], [word_ids[i] for i in order], words[order])
    assert run(shuffled, keys[order]) == [whole[i] for i in order]  # batch composition and order
    assert run(batch, keys) == whole  # rerun
    assert sum(a != b for a, b in zip(run(batch, keys, epoch=6), whole)) > 0.8 * batch.n_rows  # fresh per epoch
    assert all(len(r) >= 1 for r in whole)
    assert not any(t in (0, 101, 102) for r in whole for t in r)  # no pad/CLS/SEP from the noise


@pytest.fixture(scope="module")
def actor(tiny_bert_dir):
    from pipeline.config import CorruptConfig
    from pipeline.preprocess import CorruptAndTokenize

    return lambda **kw: CorruptAndTokenize(tiny_bert_dir, CorruptConfig(**{"seed": 4, **kw}), epoch=2)


def test_token_deletion_equals_tokenizing_the_deleted_text(actor, tiny_bert_dir):
    from transformers import AutoTokenizer

    texts, keys = _corpus(500)
    texts[:4] = ["Hello, world! It's a test.", "  spaced\tout  words ", "[SEP] [PAD] literal specials",
                 "naïve café — “quotes” 3.14"]
    texts = [t.replace("_", " ") for t in texts]
    ours = actor(max_length=32)
    out = ours({"text": texts, "row_key": keys})
    noisy_text = delete_words(texts, keys, seed=4, epoch=2, del_ratio=0.6)
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_dir)
    encode = lambda t: tokenizer(t, truncation=True, max_length=32, split_special_tokens=True)["input_ids"]  # noqa: E731
    assert out["noisy_ids"].to_pylist() == encode(noisy_text)
    assert out["target_ids"].to_pylist() == encode(texts)


def test_every_noise_type_keeps_specials_at_the_ends_only(actor, tiny_bert_dir):
    texts, keys = _corpus(300)
    out = actor(del_ratio=0.5, substitute_ratio=0.2, mask_ratio=0.2, swap_ratio=0.3, insert_ratio=0.2,
                max_length=16)({"text": texts, "row_key": keys})
    ours = actor()
    for row in out["noisy_ids"].to_pylist():
        assert row[0] == 101 and row[-1] == 102 and 3 <= len(row) <= 16  # never empty, capped
        assert not set(row[1:-1]) & {0, 101, 102}  # no pad, CLS or SEP inside (MASK is mask noise)
    assert ours.mask_id == 103 and not np.isin([0, 100, 101, 102, 103], ours.candidate_ids).any()


def test_length_sort_only_reorders_rows(actor):
    texts, keys = _corpus(256)
    plain = actor()({"text": texts, "row_key": keys})
    sorting = actor()
    sorting.length_sort = True
    out = sorting({"text": texts, "row_key": keys})
    lengths = [len(r) for r in out["target_ids"].to_pylist()]
    assert lengths == sorted(lengths, reverse=True)
    by_key = lambda b: {k: (n, t) for k, n, t in zip(b["row_key"].to_pylist(), b["noisy_ids"].to_pylist(),  # noqa: E731
                                                     b["target_ids"].to_pylist())}
    assert by_key(out) == by_key(plain)
