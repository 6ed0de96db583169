"""The training stage's configs: optimisation (TrainConfig) and resources (ScaleConfig)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from tsdae.config import Float, Resources, Section

Precision = Literal["auto", "fp32", "bf16"]


class TrainConfig(Section):
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
    kernel each step (tsdae.model.fast.allocator; +6-18% measured); the worker keeps its peak heap until
    it exits.
    """

    epochs: int = Field(1, ge=1)
    max_steps: int | None = Field(None, ge=1)
    global_batch_size: int = Field(8, ge=1)
    micro_batch_size: int | None = Field(None, ge=1)
    lr: Float = Field(3e-5, gt=0)
    weight_decay: Float = Field(0.0, ge=0)
    schedule: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    max_grad_norm: Float | None = Field(None, gt=0)
    precision: Precision = "auto"
    seed: int = 0
    deterministic: bool = False
    report_every: int = Field(10, ge=1)
    checkpoint_every: int = Field(0, ge=0)
    keep_checkpoints: int = Field(2, ge=1)
    retain_freed_memory: bool = True

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


class ScaleConfig(Section):
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
    accelerator_type: with use_gpu, the GPU every worker must have (Ray's accelerator type, e.g. "A10G",
    "A100", "H100"), so that one run never mixes GPU kinds (the slowest would set every step's pace).
    resources_per_worker / resources_per_preprocess_actor: custom Ray resources each training worker / each
    tokenizer actor requires, e.g. {gpu_node: 1} so that they run only on the nodes started with
    ``ray start --resources '{"gpu_node": 8}'`` (CPUs and GPUs have their own keys).
    ddp_bucket_mb: the size of DDP's gradient buckets; each is all-reduced as soon as its gradients are
    ready, overlapping the rest of the backward pass (PyTorch's default, 25).
    shared_filesystem: set true when the local paths are on NFS/EFS mounted at the same path on every
    node. Otherwise a job on a Ray cluster of more than one node refuses a local storage_path (and a
    local nightly.registry_uri) at start: each node would write its own disk.
    """

    num_workers: int = Field(2, ge=1)
    min_workers: int | None = Field(None, ge=1)
    max_failures: int = Field(0, ge=0)
    use_gpu: bool = False
    cpus_per_worker: Float = Field(1.0, gt=0)
    preprocess_actors: int = Field(1, ge=1)
    cpus_per_preprocess_actor: Float = Field(1.0, gt=0)
    local_num_cpus: int | None = Field(None, ge=1)
    accelerator_type: str | None = None
    ddp_bucket_mb: int = Field(25, ge=1)
    resources_per_worker: Resources = {}
    resources_per_preprocess_actor: Resources = {}
    shared_filesystem: bool = False

    @model_validator(mode="after")
    def _elastic_range(self) -> "ScaleConfig":
        if self.min_workers is not None and self.min_workers > self.num_workers:
            raise ValueError(f"min_workers {self.min_workers} is more than num_workers {self.num_workers}")
        if self.accelerator_type and not self.use_gpu:
            raise ValueError("accelerator_type needs use_gpu: true")
        return self

    def worker_counts(self) -> list[int]:
        """Every worker count a run may train with: num_workers, and min_workers when elastic."""
        return sorted({self.num_workers, self.min_workers or self.num_workers})
