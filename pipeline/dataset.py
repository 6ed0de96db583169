"""The training stream: corpus rows -> (noisy_ids, target_ids) for every epoch, as one Ray Dataset."""

from __future__ import annotations

import pyarrow as pa
import ray

from pipeline.config import CorruptConfig, ReadConfig
from pipeline.preprocess import CorruptAndTokenize
from pipeline.read import read_corpus

# Rows per tokenizer call in an actor: big enough to amortize the Python overhead of a batched call,
# small enough that a block is split into several calls and the stream keeps moving.
TOKENIZE_BATCH_ROWS = 512


def build_train_dataset(
    read_cfg: ReadConfig,
    corrupt_cfg: CorruptConfig,
    tokenizer_path: str,
    epochs: int,
    num_actors: int,
    cpus_per_actor: float,
    *,
    start_epoch: int = 0,
) -> ray.data.Dataset:
    """Rows ``row_key`` (uint64), ``epoch`` (int64), ``noisy_ids`` and ``target_ids`` (list<int32>,
    unpadded, with [CLS]/[SEP]) for epochs start_epoch .. start_epoch+epochs-1: every kept corpus row
    once per epoch, with that epoch's noise, a pure function of (corrupt_cfg.seed, epoch, row_key).

    Validates the corpus now (CorpusError before anything streams). Lazy otherwise: nothing runs until
    the dataset is iterated.

    Shape of the plan: one read per epoch, each tagged with its epoch, unioned, then ONE pool of
    num_actors CorruptAndTokenize actors that takes the epoch from each row. Not one actor map per
    epoch: Ray runs all inputs of a union at once, so that would start epochs × num_actors actors.

    Order: Ray 2.60's union does not concatenate. Without preserve_order it emits blocks as they
    finish, with preserve_order it round-robins one block per input, so epochs interleave in the
    stream either way (checked in ray/data/_internal/execution/operators/union_operator.py). Rows carry
    their ``epoch``; where epoch boundaries must be exact (per-epoch checkpoints), build one dataset
    per epoch instead: ``build_train_dataset(..., epochs=1, start_epoch=e)``.

    cpus_per_actor: Ray CPUs reserved per actor; the fast tokenizer's Rust thread pool is capped to the
    same number (RAYON_NUM_THREADS) so the actors use what Ray accounts for, no more.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if num_actors < 1 or cpus_per_actor <= 0:
        raise ValueError(f"need num_actors >= 1 and cpus_per_actor > 0, got {num_actors}, {cpus_per_actor}")

    # One read (and one footer check) per epoch: a branch of a union must be its own operator chain.
    per_epoch = [
        read_corpus(read_cfg).map_batches(
            _with_epoch, batch_format="pyarrow", batch_size=None, fn_kwargs={"epoch": e},
            udf_modifying_row_count=False,
        )
        for e in range(start_epoch, start_epoch + epochs)
    ]
    stream = per_epoch[0].union(*per_epoch[1:]) if epochs > 1 else per_epoch[0]

    threads = max(1, int(cpus_per_actor))
    return stream.map_batches(
        CorruptAndTokenize,
        fn_constructor_kwargs={"tokenizer_path": tokenizer_path, "cfg": corrupt_cfg, "epoch": None},
        compute=ray.data.ActorPoolStrategy(size=num_actors),
        num_cpus=cpus_per_actor,
        batch_format="pyarrow",
        batch_size=TOKENIZE_BATCH_ROWS,
        udf_modifying_row_count=False,
        runtime_env={"env_vars": {
            "RAYON_NUM_THREADS": str(threads),
            "TOKENIZERS_PARALLELISM": "true" if threads > 1 else "false",
        }},
    )


def _with_epoch(table: pa.Table, epoch: int) -> pa.Table:
    """Block in: text, row_key. Block out: the same plus ``epoch`` (int64)."""
    return table.append_column("epoch", pa.repeat(pa.scalar(epoch, type=pa.int64()), len(table)))
