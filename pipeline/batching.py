"""Length-aware batching of token-id rows: the order that keeps a batch's sentences of similar length,
and how much padding an order leaves (what ``benchmarks.corpus`` measures)."""

from __future__ import annotations

import numpy as np


def length_order(target_lengths: np.ndarray, noisy_lengths: np.ndarray) -> np.ndarray:
    """Row order longest target first (then longest noisy input): consecutive rows of the result, cut
    into batches, have similar lengths (the megabatch sort of Hugging Face's LengthGroupedSampler)."""
    return np.lexsort((-np.asarray(noisy_lengths), -np.asarray(target_lengths)))


def padding_fraction(lengths: np.ndarray, batch_size: int) -> float:
    """Pad tokens / all tokens when consecutive rows of the given lengths are cut into batches of
    batch_size and each batch is right-padded to its longest row (what pad_batch does)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.size == 0:
        return 0.0
    starts = np.arange(0, lengths.size, batch_size)
    widths = np.maximum.reduceat(lengths, starts)
    rows = np.diff(np.append(starts, lengths.size))
    total = int((widths * rows).sum())
    return 1.0 - int(lengths.sum()) / total
