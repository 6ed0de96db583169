"""Ray Train wiring: a TorchTrainer that runs `train_loop_per_worker` over the corpus stream."""

from __future__ import annotations

import os

from tsdae.config import EvalConfig, ModelConfig, ScaleConfig, TrainConfig
from tsdae.train import train_loop_per_worker

# What every worker process needs in its environment: tokenizer threads that do not oversubscribe
# the CPUs Ray gave the worker (HF_HUB_OFFLINE is passed on from the driver when it is set there).
WORKER_ENV = {"TOKENIZERS_PARALLELISM": "false", "RAYON_NUM_THREADS": "1"}


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
    max_length: int,
    rows: int,
    name: str,
    storage_path: str,
    stop_flag: str | None = None,
    fault_at_step: int | None = None,
    eval_cfg: EvalConfig | None = None,
):
    """A TorchTrainer for one run; `name` must be unique per launch (a same-named run resumes).

    stop_flag: a file URI; when it appears the workers checkpoint and stop early (see request_stop).
    fault_at_step: for failure-handling tests only; rank 1 kills its own process once at that step.
    eval_cfg: with an ``eval.validation_task`` (see ``validation_enabled``), every checkpoint the workers
    report (periodic and final, not a stop checkpoint) is scored on that task by Ray Train's validation
    hook, in a separate Ray task (``tsdae.validation``); Ray then keeps the train.keep_checkpoints best
    by VAL_METRIC (plus always the latest, for resuming) instead of the most recent ones.
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    train.per_worker_batch(scale.num_workers)  # fail now, not on the workers, if the batch cannot split
    if scale.min_workers is not None:
        train.per_worker_batch(scale.min_workers)
    if "://" not in storage_path:
        storage_path = os.path.abspath(storage_path)
    if train.deterministic:
        # One ordered stream, read whole by every worker; each takes its rows of every global batch.
        dataset.context.execution_options.preserve_order = True
    workers = scale.num_workers if scale.min_workers is None else (scale.min_workers, scale.num_workers)
    validate = validation_enabled(eval_cfg)
    if validate:
        from tsdae.validation import VAL_METRIC, build_validation_config

        checkpoint_config = ray.train.CheckpointConfig(
            num_to_keep=train.keep_checkpoints, checkpoint_score_attribute=VAL_METRIC, checkpoint_score_order="max")
        extra = {"validation_config": build_validation_config(eval_cfg, base_model=model.name_or_path,
                                                              pooling=model.pooling)}
    else:
        checkpoint_config = ray.train.CheckpointConfig(num_to_keep=train.keep_checkpoints)
        extra = {}
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "model": model,
            "train": train,
            "max_length": max_length,
            "threads": max(1, int(scale.cpus_per_worker)),
            "steps_per_epoch": steps_per_epoch(rows, scale, train),
            "fault_at_step": fault_at_step,
            "stop_flag": stop_flag,
            "validate": validate,
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=workers,
            use_gpu=scale.use_gpu,
            resources_per_worker={"CPU": scale.cpus_per_worker, **({"GPU": 1} if scale.use_gpu else {})},
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage_path,
            failure_config=ray.train.FailureConfig(max_failures=scale.max_failures),
            checkpoint_config=checkpoint_config,
        ),
        datasets={"train": dataset},
        dataset_config=ray.train.DataConfig(datasets_to_split=[] if train.deterministic else "all"),
        **extra,
    )


def validation_enabled(eval_cfg: EvalConfig | None) -> bool:
    """Whether a run validates its checkpoints during training: an eval config with a validation_task."""
    return eval_cfg is not None and eval_cfg.validation_task is not None


def stop_flag_uri(storage_path: str, run_name: str) -> str:
    """Where the driver asks a run's workers to checkpoint and stop."""
    base = storage_path if "://" in storage_path else os.path.abspath(storage_path)
    return f"{base.rstrip('/')}/{run_name}/STOP"


def request_stop(flag_uri: str) -> None:
    """Ask the workers of a run to checkpoint at their next report step and stop (SIGTERM handler)."""
    import fsspec

    with fsspec.open(flag_uri, "w", auto_mkdir=True) as f:
        f.write("stop requested\n")
