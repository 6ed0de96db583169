"""Right padding of token-id rows into a Batch: pure, no Ray cluster, no model (milliseconds)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from tsdae.train import micro_batches, pad_batch

PAD = 0


def _object_column(rows):
    """What Ray's batch_format="numpy" hands over for a list<int32> column: an object array of arrays."""
    column = np.empty(len(rows), dtype=object)
    column[:] = [np.asarray(r, dtype=np.int32) for r in rows]
    return column


def test_right_pads_ragged_rows_with_masks():
    noisy = [[101, 7, 102], [101, 102], [101, 5, 6, 7, 102]]
    target = [[101, 7, 8, 102], [101, 9, 102], [101, 5, 6, 7, 8, 102]]
    out = pad_batch({"noisy_ids": _object_column(noisy), "target_ids": _object_column(target),
                     "row_key": np.arange(3, dtype=np.uint64)}, PAD)
    assert out.noisy_ids.dtype == torch.long and out.target_ids.dtype == torch.long
    assert out.noisy_ids.tolist() == [[101, 7, 102, 0, 0], [101, 102, 0, 0, 0], [101, 5, 6, 7, 102]]
    assert out.noisy_mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert out.target_ids.tolist() == [
        [101, 7, 8, 102, 0, 0], [101, 9, 102, 0, 0, 0], [101, 5, 6, 7, 8, 102]]
    # labels the loss counts: target[1:] without padding, counted on the CPU from the row lengths
    assert out.n_labels == 3 + 2 + 5 == int((out.target_ids[:, 1:] != PAD).sum())


@pytest.mark.parametrize("form", ["object", "equal_length_object", "2d", "arrow", "lists"])
def test_every_form_ray_can_hand_over(form):
    rows = [[101, 3, 4, 102], [101, 5, 102, 0]] if form == "2d" else [[101, 3, 4, 102], [101, 5, 102]]
    if form == "equal_length_object":
        rows = [[101, 3, 4, 102], [101, 5, 6, 102]]
    column = {
        "object": lambda: _object_column(rows),
        "equal_length_object": lambda: _object_column(rows),
        "2d": lambda: np.asarray(rows, dtype=np.int32),  # a fixed-shape tensor column, pre-padded
        "arrow": lambda: pa.array(rows, type=pa.list_(pa.int32())),
        "lists": lambda: rows,
    }[form]()
    out = pad_batch({"noisy_ids": column, "target_ids": column}, PAD)
    lengths = [len([t for t in r if t != PAD]) for r in rows]
    assert out.noisy_mask.sum(1).tolist() == lengths
    for i, n in enumerate(lengths):
        assert out.noisy_ids[i, :n].tolist() == rows[i][:n]
        assert (out.noisy_ids[i, n:] == PAD).all()
    assert out.n_labels == sum(n - 1 for n in lengths)


def test_left_or_inner_padding_is_refused():
    left = _object_column([[101, 7, 102], [0, 0, 101, 7, 102]])
    ok = _object_column([[101, 7, 102], [101, 102]])
    with pytest.raises(AssertionError, match="row 1"):
        pad_batch({"noisy_ids": left, "target_ids": ok}, PAD)
    with pytest.raises(AssertionError, match="target_ids"):
        pad_batch({"noisy_ids": ok, "target_ids": _object_column([[101, 0, 7, 102]])[[0]]}, PAD)
    left_2d = np.array([[0, 101, 102], [101, 5, 102]], dtype=np.int32)
    with pytest.raises(AssertionError):
        pad_batch({"noisy_ids": left_2d, "target_ids": left_2d}, PAD)


def test_micro_batches_cut_a_ranks_rows_in_order():
    rows = {"noisy_ids": _object_column([[101, 10 + i, 102] for i in range(6)]),
            "target_ids": _object_column([[101, 10 + i, 10 + i, 102] for i in range(6)])}
    parts = micro_batches(rows, micro=2, accumulation=3, pad_id=PAD)
    assert [p.noisy_ids[:, 1].tolist() for p in parts] == [[10, 11], [12, 13], [14, 15]]
    assert [p.n_labels for p in parts] == [6, 6, 6]
