"""This rank's share of each batch of the training stream, collated in Ray Data's prefetch threads: its
micro-batches padded and pinned, and what the loop counts of them, all on the CPU (tsdae.train.batch
pads; this module is where Ray hands the rows over)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from ray.data.collate_fn import NumpyBatchCollateFn

from tsdae.train.batch import Batch, micro_batches
from tsdae.train.flops import Shape, training_flops


@dataclass(frozen=True)
class RankBatch:
    """This rank's rows of one global batch, ready for the step: its micro-batches, and what the loop
    counts of them (rows, label tokens, counted model FLOPs, rows per epoch), all taken on the CPU."""

    parts: list[Batch]
    rows: int
    labels: int
    flops: int
    rows_per_epoch: dict[int, int]


class RankCollate(NumpyBatchCollateFn):
    """``iter_torch_batches(collate_fn=RankCollate(...))``: turns one batch of the stream into this rank's
    RankBatch. Ray calls it in its prefetch threads, so padding, packing, counting and pinning happen
    while the device trains on the previous batch.

    deterministic: every rank reads the whole stream in global batches and takes rows [r·b, (r+1)·b) of
    each (b = global_batch / world); otherwise each batch is already this rank's share of b rows.
    pin: page-lock the tensors (for a CUDA device: the copy to it then does not block).
    """

    def __init__(self, *, rank: int, world: int, global_batch: int, deterministic: bool, micro: int,
                 accumulation: int, pad_id: int, shape: Shape, first_token_only: bool, pin: bool):
        self.rank, self.per_rank, self.deterministic = rank, global_batch // world, deterministic
        self.micro, self.accumulation, self.pad_id = micro, accumulation, int(pad_id)
        self.shape, self.first_token_only, self.pin = shape, first_token_only, pin

    def __call__(self, batch: dict[str, np.ndarray]) -> RankBatch:
        if self.deterministic:
            start = self.rank * self.per_rank
            batch = {k: v[start:start + self.per_rank] for k, v in batch.items()}
        parts = micro_batches(batch, self.micro, self.accumulation, self.pad_id)
        if self.pin:
            parts = [p.pin() for p in parts]
        noisy = [len(x) for x in batch["noisy_ids"]]
        target = [len(t) for t in batch["target_ids"]]
        epochs, counts = np.unique(np.asarray(batch["epoch"]), return_counts=True)
        return RankBatch(parts, len(target), sum(p.n_labels for p in parts),
                         training_flops(self.shape, noisy, target, first_token_only=self.first_token_only),
                         {int(e): int(c) for e, c in zip(epochs, counts)})
