"""The training stream: corpus rows -> (noisy_ids, target_ids) for every epoch, as one Ray Dataset."""

from __future__ import annotations

import ray

from pipeline.config import CorruptConfig, ReadConfig
from pipeline.preprocess import CorruptAndTokenize
from pipeline.read import CorpusError, read_corpus

# Rows per tokenizer call in an actor when there is no length grouping: big enough to amortize the
# Python overhead of a batched call (512 rows: ~9.5k sentences/s, 2048: ~16.7k wall on one busy core),
# small enough that a file is split into several calls and the stream keeps moving.
TOKENIZE_BATCH_ROWS = 2048
PREPARED_COLUMNS = ("row_key", "epoch", "noisy_ids", "target_ids")


def build_train_dataset(
    read_cfg: ReadConfig,
    corrupt_cfg: CorruptConfig,
    model_ref: str,
    epochs: int,
    num_actors: int,
    cpus_per_actor: float,
    *,
    start_epoch: int = 0,
    batch_size: int | None = None,
    resources_per_actor: dict[str, float] | None = None,
) -> ray.data.Dataset:
    """Rows ``row_key`` (uint64), ``epoch`` (int64), ``noisy_ids`` and ``target_ids`` (list<int32>,
    unpadded, with [CLS]/[SEP]) for epochs start_epoch .. start_epoch+epochs-1: every kept corpus row
    once per epoch, with that epoch's noise, a pure function of (corrupt_cfg.seed, epoch, row_key).

    model_ref: the model reference of the config (``package:``, path, hub name or URI), passed as it is to
    the tokenizer actors, each of which fetches it on its own node; never a local copy of the driver's.

    Checks the corpus now (CorpusError before anything streams). Lazy otherwise: nothing runs until
    the dataset is iterated, and then it streams: no stage ever holds the whole corpus.

    Shape of the plan: ONE read whose tasks go epoch by epoch, file by file (rows tagged with their
    epoch), then ONE pool of num_actors CorruptAndTokenize actors, each with cpus_per_actor Ray CPUs,
    so preprocessing runs on CPUs that Ray Train has not reserved for its workers. Read tasks are
    started in order, so epochs follow each other in the stream except for the overlap of in-flight
    tasks at a boundary; rows carry their ``epoch``. Where epoch boundaries must be exact (per-epoch
    checkpoints, per-epoch equal splits), build one dataset per epoch: ``epochs=1, start_epoch=e``.

    batch_size: the per-worker training batch size. With it (and corrupt_cfg.length_window > 0) the
    actors sort each window of length_window × batch_size rows by token length, longest first, so the
    consecutive rows that iter_torch_batches puts in one batch have similar lengths (less padding;
    benchmarks/corpus.py measures it). Without it rows keep their read order.

    cpus_per_actor: Ray CPUs reserved per actor; the fast tokenizer's Rust thread pool is capped to the
    same number (RAYON_NUM_THREADS) so the actors use what Ray accounts for, no more.
    resources_per_actor: custom Ray resources each actor requires ({name: amount}; None: none).
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if num_actors < 1 or cpus_per_actor <= 0:
        raise ValueError(f"need num_actors >= 1 and cpus_per_actor > 0, got {num_actors}, {cpus_per_actor}")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")

    stream = read_corpus(read_cfg, epochs=list(range(start_epoch, start_epoch + epochs)))
    length_sort = bool(batch_size and corrupt_cfg.length_window)
    rows_per_call = batch_size * corrupt_cfg.length_window if length_sort else TOKENIZE_BATCH_ROWS
    threads = max(1, int(cpus_per_actor))
    return stream.map_batches(
        CorruptAndTokenize,
        fn_constructor_kwargs={"model_ref": model_ref, "cfg": corrupt_cfg, "epoch": None,
                               "length_sort": length_sort},
        compute=ray.data.ActorPoolStrategy(size=num_actors),
        num_cpus=cpus_per_actor,
        resources=resources_per_actor or None,
        batch_format="pyarrow",
        batch_size=rows_per_call,
        udf_modifying_row_count=False,
        runtime_env={"env_vars": {
            "RAYON_NUM_THREADS": str(threads),
            "TOKENIZERS_PARALLELISM": "true" if threads > 1 else "false",
        }},
    )


def write_prepared(dataset: ray.data.Dataset, output_uri: str) -> None:
    """Write a build_train_dataset stream as parquet shards (PREPARED_COLUMNS) under output_uri."""
    dataset.select_columns(list(PREPARED_COLUMNS)).write_parquet(output_uri)


def read_prepared(uri: str, epochs: list[int] | None = None) -> ray.data.Dataset:
    """Read shards written by write_prepared back as a training stream (same rows, same columns),
    optionally only some epochs. Streams; no tokenizer needed."""
    ds = ray.data.read_parquet(uri)
    missing = set(PREPARED_COLUMNS) - set(ds.schema().names)
    if missing:
        raise CorpusError(f"{uri}: not prepared shards, missing columns {sorted(missing)}")
    if epochs is not None:
        wanted = set(epochs)
        ds = ds.filter(lambda row: row["epoch"] in wanted)
    return ds.select_columns(list(PREPARED_COLUMNS))
