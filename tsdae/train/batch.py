"""Rows of token ids → padded tensors on their way to the model (the collate step of the train loop).

Padding is only ever on the right, and this is where that is checked: the TSDAE decoder runs without
an attention mask (causal self-attention already hides the right padding from every real token).
Everything the step needs to know about where the real tokens are (the packing, the label count) is
taken here, on the CPU, from the row lengths, so the training step never reads it back from the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from tsdae.model import Packing, packing_from_lengths


@dataclass(frozen=True)
class Batch:
    """One micro-batch for ``TSDAE.forward``.

    noisy_ids: long B×S, the corrupted sentences, right-padded with pad_id; noisy_mask: long B×S, 1 at
    real tokens; target_ids: long B×T, the original sentences, right-padded with pad_id.
    packing: where the real tokens and labels are (tsdae.model.packing), from the row lengths.
    n_labels: the tokens the reconstruction loss counts (each target row's length − 1).
    """

    noisy_ids: torch.Tensor
    noisy_mask: torch.Tensor
    target_ids: torch.Tensor
    packing: Packing
    n_labels: int

    @property
    def rows(self) -> int:
        return self.target_ids.shape[0]

    def _map(self, fn) -> "Batch":
        return Batch(fn(self.noisy_ids), fn(self.noisy_mask), fn(self.target_ids), Packing(*map(fn, self.packing)),
                     self.n_labels)

    def pin(self) -> "Batch":
        """The batch in page-locked host memory, so that a copy to a GPU can run without blocking."""
        return self._map(torch.Tensor.pin_memory)

    def to(self, device: torch.device) -> "Batch":
        """The batch on device; from pinned memory the copies are queued without waiting (non_blocking)."""
        if device.type == "cpu":
            return self
        return self._map(lambda t: t.to(device, non_blocking=True))


def pad_batch(rows: dict, pad_id: int) -> Batch:
    """Right-pad the ``noisy_ids`` and ``target_ids`` columns of a batch of rows into a Batch, with its
    packing and label count taken from the row lengths (numpy, on the CPU).

    In: one row of token ids per example, in any form Ray hands over: an object array of 1-D int arrays
    (what a list<int32> column becomes with batch_format="numpy", also when all rows have the same
    length), a 2-D int array (a fixed-shape tensor column), a pyarrow list array, or a list of lists.
    Other columns are ignored.
    Raises AssertionError if a row holds pad_id before a real token (left or inner padding); trailing
    pad_ids in a row are treated as padding. Raises ValueError for an empty noisy row.
    """
    noisy_BS, noisy_mask_BS = _right_pad(rows["noisy_ids"], pad_id, "noisy_ids")
    target_BT, target_mask_BT = _right_pad(rows["target_ids"], pad_id, "target_ids")
    target_lengths = target_mask_BT.sum(1)
    packing = packing_from_lengths(noisy_mask_BS.sum(1), target_lengths, noisy_BS.shape[1], target_BT.shape[1],
                                   target_BT)
    return Batch(torch.from_numpy(noisy_BS), torch.from_numpy(noisy_mask_BS), torch.from_numpy(target_BT), packing,
                 int(np.maximum(target_lengths - 1, 0).sum()))


def micro_batches(rows: dict, micro: int, accumulation: int, pad_id: int) -> list[Batch]:
    """This rank's rows of one global batch (a dict of columns) cut into `accumulation` padded micro-batches."""
    return [pad_batch({k: v[m * micro:(m + 1) * micro] for k, v in rows.items()}, pad_id)
            for m in range(accumulation)]


def _right_pad(column, pad_id: int, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Rows of ids -> (ids_BT int64 padded with pad_id on the right, mask_BT int64)."""
    if not isinstance(column, (np.ndarray, list)) and hasattr(column, "to_numpy"):  # a pyarrow (chunked) array
        column = column.to_numpy(zero_copy_only=False)
    if isinstance(column, np.ndarray) and column.dtype != object:
        if column.ndim != 2:
            raise ValueError(f"{name}: expected rows of token ids, got an array of shape {column.shape}")
        ids_BT = column.astype(np.int64)
        filled_BT = np.ones(ids_BT.shape, dtype=bool)
    else:
        rows = [np.asarray(r, dtype=np.int64).reshape(-1) for r in column]
        lengths = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
        width = int(lengths.max(initial=0))
        filled_BT = np.arange(width) < lengths[:, None]
        ids_BT = np.full((len(rows), width), pad_id, dtype=np.int64)
        if rows:
            ids_BT[filled_BT] = np.concatenate(rows)  # row-major: each row's ids land left-aligned

    # A row's real tokens end at its last non-pad id; any pad before that is left or inner padding.
    is_pad_BT = ids_BT == pad_id
    real_BT = filled_BT & ~is_pad_BT
    width = ids_BT.shape[1]
    if width:
        last_real = np.where(real_BT.any(axis=1), width - np.argmax(real_BT[:, ::-1], axis=1), 0)
    else:
        last_real = np.zeros(len(ids_BT), dtype=np.int64)
    mask_BT = np.arange(width) < last_real[:, None]
    bad_rows = np.flatnonzero((mask_BT & is_pad_BT).any(axis=1))
    if bad_rows.size:
        row = int(bad_rows[0])
        raise AssertionError(
            f"{name}: {bad_rows.size} row(s) not right-padded; row {row} has pad id {pad_id} before a "
            f"real token: {ids_BT[row, : last_real[row]].tolist()}"
        )
    return ids_BT, mask_BT.astype(np.int64)
