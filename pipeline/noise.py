"""TSDAE deletion noise: a pure, Ray-free batch function with derived (never global) randomness.

The uniform that decides word j of a row is a pure function of (seed, epoch, row_key, j): a SplitMix64
stream keyed by the row (https://prng.di.unimi.it/splitmix64.c), evaluated for all words of a batch at
once with wrap-around uint64 arithmetic in numpy. So a sentence gets the same noise whatever batch,
block, file split or actor it lands in, fresh noise every epoch, and the same noise after a restart.
Measured on one core: 0.66-0.88M sentences/s at 15 words/sentence for batches of 4096-256
(`taskset -c 0 python -m pipeline.noise`).
"""

from __future__ import annotations

from itertools import chain, compress, islice

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)  # SplitMix64's increment (2^64 / golden ratio)
_MUL1 = np.uint64(0xBF58476D1CE4E5B9)
_MUL2 = np.uint64(0x94D049BB133111EB)
_DOMAIN = np.uint64(0x7453_4441_455F_6E7A)  # "tSDAE_nz": keeps these streams apart from other uses
_MASK64 = (1 << 64) - 1


def _mix64(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finalizer: a bijection on uint64 that spreads every input bit over the output."""
    z = (z ^ (z >> np.uint64(30))) * _MUL1
    z = (z ^ (z >> np.uint64(27))) * _MUL2
    return z ^ (z >> np.uint64(31))


def row_streams(row_keys: np.ndarray, *, seed: int, epoch: int | np.ndarray) -> np.ndarray:
    """The per-row SplitMix64 state for (seed, epoch, row_key); uint64, one per row.

    epoch: an int for the whole batch, or one per row (a batch that straddles two epochs).
    """
    with np.errstate(over="ignore"):
        seed_key = _mix64(np.uint64(seed & _MASK64) ^ _DOMAIN)
        epoch_u64 = np.asarray(epoch).astype(np.uint64)
        epoch_key = _mix64(seed_key + _GOLDEN * (epoch_u64 + np.uint64(1)))
        return _mix64(np.asarray(row_keys, dtype=np.uint64) ^ epoch_key)


def word_uniforms(streams: np.ndarray, word_index: np.ndarray) -> np.ndarray:
    """Uniform [0, 1) doubles: output number word_index+1 of each row's SplitMix64 stream.

    streams: uint64 per word (the row's stream, repeated); word_index: int per word.
    """
    with np.errstate(over="ignore"):
        state = streams + _GOLDEN * (word_index.astype(np.uint64) + np.uint64(1))
        return (_mix64(state) >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def delete_words(
    texts: list[str],
    row_keys: np.ndarray,
    *,
    seed: int,
    epoch: int | np.ndarray,
    del_ratio: float,
) -> list[str]:
    """Delete each whitespace-separated word independently with probability del_ratio.

    Contract: texts[i] is keyed by row_keys[i] (uint64). Word order is kept, kept words are joined with
    single spaces, and at least one word survives: if every word of a row draws "delete", the word with
    the largest uniform is kept (the same draws decide it, no extra randomness). A text without words
    becomes "". As in the TSDAE reference (sentence-transformers' DenoisingAutoEncoderDataset), words are
    dropped independently, so the deleted fraction is del_ratio on average, not exactly per sentence;
    unlike it we split on whitespace (not nltk) and never touch global random state.

    >>> delete_words(["a b c d"], np.array([7], np.uint64), seed=0, epoch=0, del_ratio=0.0)
    ['a b c d']
    """
    if len(texts) != len(row_keys):
        raise ValueError(f"{len(texts)} texts but {len(row_keys)} row keys")
    if not texts:
        return []
    words_per_row = [t.split() for t in texts]
    counts = np.fromiter(map(len, words_per_row), dtype=np.int64, count=len(texts))
    words = list(chain.from_iterable(words_per_row))
    n_rows, n_words = len(texts), len(words)
    if n_words == 0:
        return [""] * n_rows

    row_of_word = np.repeat(np.arange(n_rows), counts)  # int per word
    starts = np.cumsum(counts) - counts  # first word of each row in the flat arrays
    word_index = np.arange(n_words) - starts[row_of_word]
    streams = row_streams(row_keys, seed=seed, epoch=epoch)
    u = word_uniforms(streams[row_of_word], word_index)
    keep = u >= del_ratio  # P(delete) = P(u < del_ratio) = del_ratio; del_ratio=0 keeps every word

    # At least one word: rows with words but nothing kept keep their largest-u word.
    kept_per_row = np.bincount(row_of_word, weights=keep, minlength=n_rows)
    rescue = (kept_per_row == 0) & (counts > 0)
    if rescue.any():
        nonempty = counts > 0
        row_max = np.full(n_rows, -1.0)
        row_max[nonempty] = np.maximum.reduceat(u, starts[nonempty])
        candidates = np.flatnonzero(rescue[row_of_word] & (u == row_max[row_of_word]))
        _, first = np.unique(row_of_word[candidates], return_index=True)  # one per row, ties -> first
        keep[candidates[first]] = True
        kept_per_row = np.bincount(row_of_word, weights=keep, minlength=n_rows)

    kept_words = compress(words, keep.tolist())
    return [" ".join(islice(kept_words, k)) for k in kept_per_row.astype(np.int64).tolist()]


if __name__ == "__main__":
    # Throughput on one core: python -m pipeline.noise [n_sentences]
    import sys
    import time

    n = int(sys.argv[1]) if len(sys.argv) > 1 else 200_000
    rng = np.random.default_rng(0)
    vocab = [f"w{i}" for i in range(5000)]
    lengths = rng.integers(5, 26, size=n)  # mean 15 words
    texts = [" ".join(vocab[j] for j in rng.integers(0, 5000, size=k)) for k in lengths]
    keys = rng.integers(0, 2**63, size=n, dtype=np.uint64)
    for batch_size in (256, 1024, 4096):
        t0 = time.perf_counter()
        for i in range(0, n, batch_size):
            delete_words(texts[i:i + batch_size], keys[i:i + batch_size], seed=0, epoch=1, del_ratio=0.6)
        dt = time.perf_counter() - t0
        print(f"batch_size={batch_size}: {n / dt:,.0f} sentences/s, {lengths.sum() / dt:,.0f} words/s")
