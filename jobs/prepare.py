"""Materialize the corrupted, tokenized training stream as parquet shards, for inspection and reuse.

    python -m jobs.prepare --config configs/demo.yaml --output prepared/demo
    python -m jobs.prepare --config configs/gpu-cluster.yaml --output s3://bucket/prepared/run1 --epochs 3

Writes ``row_key, epoch, noisy_ids, target_ids`` shards (what build_train_dataset streams; read them
back with pipeline.dataset.read_prepared) and ``corpus_stats.json`` (rows read, dropped by reason,
truncated, kept; files skipped). The noise is the same as a training run's with the same config.
Exit codes: 0 success, 2 bad config, 3 bad corpus.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

import fsspec

from jobs.config import OVERRIDES_HELP
from jobs.stages import EXIT_DATA, EXIT_STORAGE, connect_ray, start_job
from pipeline import CorpusError, build_train_dataset, corpus_stats, write_prepared
from tsdae.storage import StorageError

log = logging.getLogger("tsdae")


def parse_args(argv=None, prog=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="run config YAML (its read, corrupt, model, train, scale)")
    p.add_argument("--output", required=True, help="output URI (local path, s3://, gs://)")
    p.add_argument("--epochs", type=int, help="epochs to write (default: the config's train.epochs)")
    p.add_argument("--start-epoch", type=int, default=0)
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=OVERRIDES_HELP)
    return p.parse_intermixed_args(argv)


def main(argv=None, prog=None) -> int:
    args = parse_args(argv, prog)

    # 1. Config.
    cfg = start_job(args.config, overrides=args.overrides)
    if isinstance(cfg, int):  # the exit code of a bad config or a failed store
        return cfg
    epochs = args.epochs or cfg.train.epochs
    micro_batch, _ = cfg.train.per_worker_batch(cfg.scale.num_workers)  # rows per iter_torch_batches batch

    # 2. Build: join or start Ray, check and count the corpus, plan the stream.
    connect_ray(cfg.ray_address, cfg.scale.local_num_cpus)
    try:
        stats = corpus_stats(cfg.read)
        dataset = build_train_dataset(
            cfg.read, cfg.corrupt, cfg.model.name_or_path, epochs=epochs,  # each actor fetches it
            num_actors=cfg.scale.preprocess_actors, cpus_per_actor=cfg.scale.cpus_per_preprocess_actor,
            resources_per_actor=cfg.scale.resources_per_preprocess_actor,
            start_epoch=args.start_epoch, batch_size=micro_batch,
        )
    except CorpusError as e:
        log.error("bad corpus: %s", e)
        return EXIT_DATA
    except StorageError as e:
        log.error("%s", e)
        return EXIT_STORAGE

    # 3. Run: stream it into parquet shards.
    write_prepared(dataset, args.output)

    # 4. Report.
    summary = {"output": args.output, "epochs": list(range(args.start_epoch, args.start_epoch + epochs)),
               "per_epoch": stats}
    with fsspec.open(f"{args.output.rstrip('/')}/corpus_stats.json", "w") as f:
        f.write(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
