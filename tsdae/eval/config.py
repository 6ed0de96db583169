"""The evaluation stage's config: which STS tasks, where their data is, and the resources that score them."""

from __future__ import annotations

from typing import Literal, get_args

from pydantic import Field, field_validator, model_validator

from tsdae.config import Float, Resources, Section

# The seven tasks of the literature's average, plus STS-B dev (model selection; not in the average).
STS_TASKS = ("STS12", "STS13", "STS14", "STS15", "STS16", "STSB-test", "SICK-R", "STSB-dev")
AVERAGE_TASKS = STS_TASKS[:7]
Task = Literal["STS12", "STS13", "STS14", "STS15", "STS16", "STSB-test", "SICK-R", "STSB-dev"]
EvalPrecision = Literal["auto", "fp32", "bf16"]
PRECISIONS: tuple[str, ...] = get_args(EvalPrecision)


class CustomStsConfig(Section):
    """A user's STS set: a parquet, CSV or TSV file at an fsspec URI (local path, file://, s3://, gs://…).

    name: the task's name in reports (must not be one of STS_TASKS).
    format: parquet, csv or tsv; null infers it from the file extension.
    on_bad_rows: "report" skips rows with a missing/non-numeric score or an empty sentence and lists them
    in the result; "error" refuses the file instead.
    """

    name: str
    uri: str = Field(min_length=1)
    sentence1_column: str = "sentence1"
    sentence2_column: str = "sentence2"
    score_column: str = "score"
    format: Literal["parquet", "csv", "tsv"] | None = None
    on_bad_rows: Literal["report", "error"] = "report"

    @field_validator("name")
    @classmethod
    def _own_name(cls, name: str) -> str:
        if not name or name in STS_TASKS:
            raise ValueError(f"name {name!r} is empty or clashes with a standard task")
        return name


class EvalConfig(Section):
    """STS evaluation: which tasks, where the data is, and the resources of the evaluation task.

    sts_dir: the STS suite (SentEval layout, see data/README.md): a local folder or any fsspec URI
    (``s3://bucket/sts``), fetched once into the node-local cache where an evaluation runs.

    num_cpus / num_gpus: resources of the one evaluation task, of the periodic validation task, and of
    each encoder actor when ``actors`` >= 1.
    actors: 0 encodes in one Ray task; N >= 1 encodes with N Ray Data model actors (one per GPU on a GPU
    cluster, a few per CPU node).
    precision: "auto" is bf16 autocast on CUDA and fp32 on CPU (bf16 moves CPU numbers by ~0.1).
    production_model: the model in production (path, ``package:`` or fsspec URI), evaluated beside the
    base and trained models for the report's third column; null: none.
    validation_task: the task scored on every checkpoint during training (model selection), in a Ray task
    beside the training workers (``tsdae.train.validation``); the best checkpoint by this score is the
    run's model. null: no validation (the final checkpoint is the model).
    validation_num_cpus / validation_num_gpus: resources of that validation task (null: num_cpus /
    num_gpus). It runs while the workers train, so it must fit beside them or it waits for the end.
    validation_timeout_s: a validation still running after this long is cancelled (null: no limit).
    resources: custom Ray resources the evaluation task, each encoder actor and the validation task require
    ({eval_node: 1}: they run only on nodes started with ``ray start --resources '{"eval_node": 4}'``).
    """

    sts_dir: str = "data/sts"
    tasks: list[Task] = list(STS_TASKS)
    batch_size: int = Field(128, ge=1)
    max_length: int = Field(128, ge=1)
    num_cpus: Float = Field(1.0, gt=0)
    num_gpus: Float = Field(0.0, ge=0)
    actors: int = Field(0, ge=0)
    precision: EvalPrecision = "auto"
    custom_sets: list[CustomStsConfig] = []
    production_model: str | None = None
    validation_task: Task | None = "STSB-dev"
    validation_num_cpus: Float | None = Field(None, gt=0)
    validation_num_gpus: Float | None = Field(None, ge=0)
    validation_timeout_s: Float | None = Field(None, gt=0)
    resources: Resources = {}

    @model_validator(mode="after")
    def _distinct_custom_sets(self) -> "EvalConfig":
        names = [c.name for c in self.custom_sets]
        if len(set(names)) != len(names):
            raise ValueError(f"custom_sets has duplicate names: {names}")
        return self

    def validation_resources(self) -> tuple[float, float]:
        """(CPUs, GPUs) of the validation task: validation_num_* where set, else num_*."""
        cpus = self.num_cpus if self.validation_num_cpus is None else self.validation_num_cpus
        gpus = self.num_gpus if self.validation_num_gpus is None else self.validation_num_gpus
        return cpus, gpus
