"""Where a batch's real tokens are: the index sets of the packed training step, found once, on the CPU.

The packed encoder and decoder (tsdae.model.fast) run their linear layers on real tokens only, so they
need to know where those are. Finding them on the device (``nonzero``, a boolean mask, ``bool(...)``)
makes the host wait for the GPU at every micro-batch: the index sets' sizes decide the next kernels'
shapes. So they are computed where the batch is built, from the row lengths (tsdae.train.batch), and
travel with it; ``packing_of`` finds them on the device for callers that have no packing (it syncs).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch


class Packing(NamedTuple):
    """The index sets of one micro-batch (long tensors, on the batch's device).

    noisy_rows: flat positions in B×S of the noisy input's real tokens, row-major (N rows).
    first_rows: for each sentence, the index into noisy_rows of its first token ([CLS]; B rows).
    label_rows: flat positions in B×(T−1) of the decoder inputs whose label is a real token (M rows:
      with right padding each sentence's first length−1 positions).
    labels: the labels there, target_ids[:, 1:] at label_rows (M rows).
    """

    noisy_rows: torch.Tensor
    first_rows: torch.Tensor
    label_rows: torch.Tensor
    labels: torch.Tensor


def packing_from_lengths(noisy_lengths: np.ndarray, target_lengths: np.ndarray, width_S: int, width_T: int,
                         target_ids_BT: np.ndarray) -> Packing:
    """The packing of a right-padded batch from its rows' lengths (numpy, on the CPU: no device sync).
    Every noisy row must hold at least one token (its first is the sentence vector's position)."""
    noisy_lengths = np.asarray(noisy_lengths, dtype=np.int64)
    target_lengths = np.asarray(target_lengths, dtype=np.int64)
    if noisy_lengths.size and noisy_lengths.min() < 1:
        raise ValueError(f"noisy row {int(np.argmin(noisy_lengths))} is empty: every input needs a first token")
    B = noisy_lengths.size
    noisy_rows = np.flatnonzero(np.arange(width_S) < noisy_lengths[:, None])
    first_rows = np.cumsum(noisy_lengths) - noisy_lengths
    label_mask_BT = np.arange(max(width_T - 1, 0)) < np.maximum(target_lengths - 1, 0)[:, None]
    label_rows = np.flatnonzero(label_mask_BT)
    labels = target_ids_BT[:, 1:][label_mask_BT] if B else np.zeros(0, dtype=np.int64)
    as_long = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64))  # noqa: E731
    return Packing(as_long(noisy_rows), as_long(first_rows), as_long(label_rows), as_long(labels))


def packing_of(noisy_mask_BS: torch.Tensor, target_ids_BT: torch.Tensor, pad_id: int) -> Packing:
    """The packing of a right-padded batch, found on its device (``nonzero``: the host waits for it)."""
    noisy_rows = noisy_mask_BS.reshape(-1).nonzero().squeeze(1)
    lengths = noisy_mask_BS.sum(1)
    first_rows = lengths.cumsum(0) - lengths
    keep_BT = target_ids_BT[:, 1:] != pad_id
    return Packing(noisy_rows, first_rows, keep_BT.reshape(-1).nonzero().squeeze(1), target_ids_BT[:, 1:][keep_BT])
