"""Ray Train wiring: a TorchTrainer that runs `train_loop_per_worker` over the corpus stream."""

from __future__ import annotations

import os

from tsdae.config import ModelConfig, ScaleConfig, TrainConfig
from tsdae.train import train_loop_per_worker

# What every worker process needs in its environment: no hub, and tokenizer threads that do not
# oversubscribe the CPUs Ray gave the worker.
WORKER_ENV = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "RAYON_NUM_THREADS": "1"}


def steps_per_epoch(rows: int, scale: ScaleConfig, train: TrainConfig) -> int:
    """Optimizer steps per epoch on every rank: the equal split gives each rank rows // world rows."""
    per_rank = rows // scale.num_workers
    return max(1, -(-per_rank // train.batch_size))


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
    max_failures: int = 0,
):
    """A TorchTrainer for one run; `name` must be unique per launch (a same-named run resumes)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    if "://" not in storage_path:
        storage_path = os.path.abspath(storage_path)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "model": model,
            "train": train,
            "max_length": max_length,
            "threads": max(1, int(scale.cpus_per_worker)),
            "steps_per_epoch": steps_per_epoch(rows, scale, train),
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=scale.num_workers,
            use_gpu=scale.use_gpu,
            resources_per_worker={"CPU": scale.cpus_per_worker, **({"GPU": 1} if scale.use_gpu else {})},
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage_path,
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
        datasets={"train": dataset},
    )
