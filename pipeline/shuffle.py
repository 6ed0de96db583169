"""The order the training stream visits the corpus in: pure functions of (seed, epoch).

The reference trains on shuffled random batches; a corpus read in file order is not shuffled at all
(a file of movie reviews sorted positive-then-negative trains on one class, then on the other). The
read stage shuffles at two levels, both bounded and both without a Ray shuffle:

- files: each epoch visits the files in its own permutation (file_order);
- rows: each read task shuffles its file's rows in windows of ``shuffle_rows`` rows (window_order). Row
  groups are read in file order, so a damaged group stops a file after the rows corpus_stats counted.

Nothing here moves rows between read tasks, so every epoch still has exactly the corpus's rows, and
Ray Data's equal split gives every DDP rank the same batch count as before. The row order within a
window is decided by a keyed hash of each row's key, so a window holding the same rows is ordered the
same way on every read, after a restart or with a different block split.
"""

from __future__ import annotations

import numpy as np

from pipeline.noise import mix64, row_streams

# Separates the shuffle's streams from the noise's (both derive from (seed, epoch, row_key)).
_SALT = np.uint64(0x5348_5546_464C_4521)  # "SHUFFLE!"


def _rng(seed: int, epoch: int, *context: int) -> np.random.Generator:
    return np.random.default_rng([seed & 0xFFFF_FFFF, (seed >> 32) & 0xFFFF_FFFF, epoch, int(_SALT >> np.uint64(32)),
                                  *context])


def file_order(n_files: int, *, seed: int, epoch: int) -> np.ndarray:
    """The permutation of the (sorted) file list that epoch `epoch` reads in."""
    return _rng(seed, epoch, 1).permutation(n_files)


def window_order(row_keys: np.ndarray, *, seed: int, epoch: int) -> np.ndarray:
    """The order of a window's rows: ascending keyed hash of each row key (ties, i.e. the same sentence
    twice, keep their read order)."""
    with np.errstate(over="ignore"):
        sort_keys = mix64(row_streams(row_keys, seed=seed, epoch=epoch) ^ _SALT)
    return np.argsort(sort_keys, kind="stable")
