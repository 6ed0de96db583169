"""Pad token-id rows into tensors: the collate step of ``iter_torch_batches``.

Padding is only ever on the right, and this is where that is checked: the TSDAE decoder runs without
an attention mask (causal self-attention already hides the right padding from every real token).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch
from ray.data.collate_fn import NumpyBatchCollateFn


def pad_batch(batch: dict[str, np.ndarray], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad ``noisy_ids`` and ``target_ids`` into tensors.

    In: ``noisy_ids``, ``target_ids``: one row of token ids per example, in any form Ray hands over:
    an object array of 1-D int arrays (what a list<int32> column becomes with batch_format="numpy",
    also when all rows have the same length), a 2-D int array (a fixed-shape tensor column), a pyarrow
    list array, or a list of lists. Other columns are ignored.
    Out: ``noisy_input_ids`` (long, B×Tn), ``noisy_attention_mask`` (long, B×Tn, 1 = real token),
    ``target_ids`` (long, B×Tt, pad_id after each row's tokens), and ``epoch`` (long, B) when the batch
    has an ``epoch`` column (for per-epoch row accounting in the train loop).
    Raises AssertionError if a row holds pad_id before a real token (left or inner padding); trailing
    pad_ids in a row are treated as padding.
    """
    noisy_BT, noisy_mask_BT = _right_pad(batch["noisy_ids"], pad_id, "noisy_ids")
    target_BT, _ = _right_pad(batch["target_ids"], pad_id, "target_ids")
    out = {
        "noisy_input_ids": torch.from_numpy(noisy_BT),
        "noisy_attention_mask": torch.from_numpy(noisy_mask_BT),
        "target_ids": torch.from_numpy(target_BT),
    }
    if "epoch" in batch:
        out["epoch"] = torch.from_numpy(np.asarray(batch["epoch"], dtype=np.int64))
    return out


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


def epoch_counts(epoch_B: torch.Tensor) -> dict[int, int]:
    """Rows per epoch in one collated batch: {epoch: rows}. The train loop adds these up per rank."""
    epochs, counts = torch.unique(epoch_B, return_counts=True)
    return {int(e): int(c) for e, c in zip(epochs.tolist(), counts.tolist())}


class PadCollate(NumpyBatchCollateFn):
    """``iter_torch_batches(collate_fn=PadCollate(pad_id))``: Ray hands it a dict of numpy arrays.

    A NumpyBatchCollateFn subclass, not a bare function: Ray 2.60 deprecates plain callables there and
    picks the batch format from the base class. Picklable (module-level class, one int of state).
    """

    def __init__(self, pad_id: int):
        self.pad_id = int(pad_id)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        return pad_batch(batch, self.pad_id)


def make_collate_fn(pad_id: int) -> PadCollate:
    """The collate function for ``iter_torch_batches``: pads with the tokenizer's pad_token_id."""
    return PadCollate(pad_id)


def _right_pad(column, pad_id: int, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Rows of ids -> (ids_BT int64 padded with pad_id on the right, mask_BT int64)."""
    if isinstance(column, (pa.Array, pa.ChunkedArray)):
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
