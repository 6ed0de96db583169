"""Ray Train wiring: a TorchTrainer that runs the training loop over the corpus stream."""

from __future__ import annotations

import os
from typing import Callable

import ray.train
from ray.train.torch import TorchTrainer

from tsdae.eval import EvalConfig
from tsdae.model import ModelConfig
from tsdae.train.config import ScaleConfig, TrainConfig
from tsdae.train.loop import WorkerConfig, train_loop_per_worker
from tsdae.train.validation import VAL_METRIC, build_validation_config, validates


def steps_per_epoch(rows: int, scale: ScaleConfig, train: TrainConfig) -> int:
    """Optimizer steps per epoch, the same on every rank: full global batches only (the incomplete
    last one is dropped). With an equal split each rank gets rows // world rows of the stream."""
    world = scale.num_workers
    per_rank = train.global_batch_size // world
    steps = rows // train.global_batch_size if train.deterministic else (rows // world) // per_rank
    if steps < 1:
        raise ValueError(f"{rows} rows make no full global batch of {train.global_batch_size}")
    return steps


def build_trainer(
    dataset,
    *,
    model: ModelConfig,
    train: TrainConfig,
    scale: ScaleConfig,
    max_seq_length: int,
    rows: int,
    name: str,
    storage_path: str,
    stop_flag: str | None = None,
    eval_cfg: EvalConfig | None = None,
    loop: Callable[[WorkerConfig], None] = train_loop_per_worker,
    callbacks: list[ray.train.UserCallback] | None = None,
) -> TorchTrainer:
    """A TorchTrainer for one run; `name` must be unique per launch (a same-named run resumes).

    max_seq_length: the exported encoders' max_seq_length (jobs pass eval.max_length).
    stop_flag: a URI; when it appears the workers checkpoint and stop early (jobs.stop writes it).
    eval_cfg: with an ``eval.validation_task``, every checkpoint the workers report (periodic and final,
    not a stop checkpoint) is scored on that task by Ray Train's validation hook, in a separate Ray task
    (``tsdae.train.validation``); Ray then keeps the train.keep_checkpoints best by VAL_METRIC (plus
    always the latest, for resuming) instead of the most recent ones.
    loop: the per-worker function (tests inject failures with tsdae.train.faults.CrashOnce).
    callbacks: Ray Train callbacks, run on the controller after each report (jobs.tracking's live metrics).
    """
    for workers in scale.worker_counts():  # fail now, not on the workers, if the batch cannot split
        train.per_worker_batch(workers)
    if "://" not in storage_path:
        storage_path = os.path.abspath(storage_path)
    if train.deterministic:
        # One ordered stream, read whole by every worker; each takes its rows of every global batch.
        dataset.context.execution_options.preserve_order = True
    validate = validates(eval_cfg)
    extra = {}
    checkpoint_config = ray.train.CheckpointConfig(num_to_keep=train.keep_checkpoints)
    if validate:
        checkpoint_config = ray.train.CheckpointConfig(
            num_to_keep=train.keep_checkpoints, checkpoint_score_attribute=VAL_METRIC, checkpoint_score_order="max")
        extra["validation_config"] = build_validation_config(eval_cfg, base_model=model.name_or_path,
                                                             pooling=model.pooling)
    worker = WorkerConfig(model=model, train=train, max_seq_length=max_seq_length,
                          threads=max(1, int(scale.cpus_per_worker)), steps_per_epoch=steps_per_epoch(rows, scale, train),
                          stop_flag=stop_flag, validate=validate, ddp_bucket_mb=scale.ddp_bucket_mb)
    return TorchTrainer(
        loop,
        train_loop_config=worker,
        scaling_config=ray.train.ScalingConfig(
            num_workers=scale.num_workers if scale.min_workers is None else (scale.min_workers, scale.num_workers),
            use_gpu=scale.use_gpu,
            accelerator_type=scale.accelerator_type,
            resources_per_worker={"CPU": scale.cpus_per_worker, **({"GPU": 1} if scale.use_gpu else {}),
                                  **scale.resources_per_worker},
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage_path,
            failure_config=ray.train.FailureConfig(max_failures=scale.max_failures),
            checkpoint_config=checkpoint_config,
            callbacks=list(callbacks or []),
        ),
        datasets={"train": dataset},
        dataset_config=ray.train.DataConfig(datasets_to_split=[] if train.deterministic else "all"),
        **extra,
    )
