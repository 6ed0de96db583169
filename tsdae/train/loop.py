"""The TSDAE training loop that every Ray Train worker runs, top to bottom: build, resume, train, report."""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import fsspec
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from tsdae.device import use_bf16, use_device
from tsdae.model import ModelConfig, build_tsdae, retain_freed_memory
from tsdae.train import checkpoint
from tsdae.train.collate import RankBatch, RankCollate
from tsdae.train.config import TrainConfig
from tsdae.train.flops import Shape, linear_shapes, matmul_peak_flops
from tsdae.train.step import build_optimizer, lr_factor, parameter_digest, step_seed, train_step

# Through logging, not print: Ray Train both tees and logs a worker's print, so each line showed twice.
log = logging.getLogger("tsdae.train")


@dataclass(frozen=True)
class WorkerConfig:
    """What every worker needs (``train_loop_config`` of the TorchTrainer; built by build_trainer).

    max_seq_length: the ``max_seq_length`` of the encoder every checkpoint exports (the evaluation's
    max_length, so that the exported model embeds as it was scored). threads: torch CPU threads of a CPU
    worker. steps_per_epoch: optimizer steps per epoch on every rank.
    stop_flag: a URI that the driver writes to ask for a checkpoint and an early stop (checked at report
    steps). validate: rank 0 asks Ray Train to score every checkpoint it reports (not a stop checkpoint).
    """

    model: ModelConfig
    train: TrainConfig
    max_seq_length: int
    threads: int
    steps_per_epoch: int
    stop_flag: str | None = None
    validate: bool = False
    ddp_bucket_mb: int = 25


def train_loop_per_worker(cfg: WorkerConfig, step_fn: Callable = train_step) -> None:
    """Train TSDAE on this worker's part of the "train" dataset (rows: ``noisy_ids``, ``target_ids``,
    ``epoch``). A run restarted by Ray resumes from its last checkpoint and skips the global batches it
    trained; a stop request (or an announced preemption) checkpoints at the next report step and ends
    the run early with ``stopped`` in its metrics. step_fn: the training step (tests wrap it, see
    tsdae.train.faults). Between reports nothing here reads a value back from the device."""
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    train = cfg.train
    micro, accumulation = train.per_worker_batch(world)
    device = use_device(ray.train.torch.get_device(), cfg.threads)
    if device.type == "cpu" and train.retain_freed_memory:
        retain_freed_memory()  # +6-18% sentences/s on CPU: no page faults on each step's big buffers
    bf16 = use_bf16(train.precision, device)
    total_steps = train.max_steps or cfg.steps_per_epoch * train.epochs

    # 1. Build: the model (restored if Ray restarted us), DDP, optimizer and schedule.
    torch.manual_seed(train.seed)  # decoder-only weights start equal on every rank
    model, tokenizer = build_tsdae(cfg.model)
    restored = ray.train.get_checkpoint()
    state = checkpoint.load_state(restored) if restored else None
    if state is not None:
        model.load_state_dict(state["model"])
    # Gradients as views of DDP's buckets: no copy into and out of them each step. No static_graph: our
    # step accumulates micro-batches under no_sync, on which DDP's reducer asserts with a static graph.
    ddp_model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={
        "gradient_as_bucket_view": True, "bucket_cap_mb": cfg.ddp_bucket_mb})
    optimizer = build_optimizer(model, train.lr, train.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, train.schedule, train.warmup_steps, total_steps))
    step = start_step = 0
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step = start_step = state["step"]
        if rank == 0:
            log.info("[train] resumed at step %d (data position %s)", step, state["position"])
    model.train()
    meter = Meter(total_steps, matmul_peak_flops(device, torch.bfloat16 if bf16 else torch.float32, n=1024,
                                                 repeats=2, layers=linear_shapes(model)))

    # 2. Train on this rank's rows of each global batch, skipping those trained before a restart. Ray's
    # prefetch thread pads, packs, counts and pins the next batch while the device trains. One thread:
    # with two, batches reached a Ray Train worker out of order (seen in the guard run), which breaks
    # deterministic mode and exact resume.
    collate = RankCollate(rank=rank, world=world, global_batch=train.global_batch_size,
                          deterministic=train.deterministic, micro=micro, accumulation=accumulation,
                          pad_id=tokenizer.pad_token_id, shape=Shape.of(model.encoder.config),
                          first_token_only=cfg.model.pooling == "cls", pin=device.type == "cuda")
    batches = ray.train.get_dataset_shard("train").iter_torch_batches(
        batch_size=train.global_batch_size if train.deterministic else train.global_batch_size // world,
        collate_fn=collate, drop_last=True, prefetch_batches=1)
    stopped = False
    for index, batch in enumerate(batches):
        if index < start_step:
            continue
        if step >= total_steps:
            break
        torch.manual_seed(step_seed(train.seed, rank, step))
        loss = step_fn(ddp_model, optimizer, [part.to(device) for part in batch.parts], world=world, bf16=bf16,
                       max_grad_norm=train.max_grad_norm, scheduler=scheduler)
        step += 1
        meter.add(loss, batch)
        # The last step's checkpoint is the final one, written below with the run's records.
        checkpoint_now = bool(train.checkpoint_every) and step % train.checkpoint_every == 0 and step < total_steps
        if step % train.report_every == 0 or checkpoint_now:
            stopped = step < total_steps and stop_requested(cfg.stop_flag, device)
            metrics = meter.report(step, cfg.steps_per_epoch, scheduler.get_last_lr()[0], device, world, rank)
            metrics["stopped"] = stopped
            save_and_report(cfg, metrics, checkpoint_now or stopped, validate=cfg.validate and not stopped,
                            state=(model, tokenizer, optimizer, scheduler, step))
            if stopped:
                if rank == 0:
                    log.info("[train] stop requested: checkpointed at step %d", step)
                break

    # 3. Finish: prove the replicas identical; the final checkpoint carries the run's records.
    summary = {
        "steps": step, "world_size": world, "global_batch_size": train.global_batch_size,
        "micro_batch_size": micro, "accumulation": accumulation, "precision": "bf16" if bf16 else "fp32",
        "resumed_from_step": start_step, "stopped": stopped,
        "rows_trained_per_rank": all_gather(meter.rows_trained),
        # {epoch: rows} per rank; epochs may overlap at their boundary in the stream (see pipeline.dataset)
        "rows_trained_per_epoch_per_rank": [{str(e): n for e, n in sorted(d.items())}
                                            for d in all_gather(meter.rows_per_epoch)],
        "parameter_digests": all_gather(parameter_digest(model)),
    }
    summary["replicas_identical"] = len(set(summary["parameter_digests"])) == 1
    if rank == 0:
        log.info("[train] done: %d steps, rows per rank %s, replicas identical: %s", step,
                 summary["rows_trained_per_rank"], summary["replicas_identical"])
    if stopped:  # the stop checkpoint above (its metrics say "stopped") is the one to resume from
        return
    model.eval()
    records = {checkpoint.METRICS_FILE: "".join(json.dumps(m) + "\n" for m in meter.history),
               checkpoint.SUMMARY_FILE: json.dumps(summary, indent=2) + "\n"}
    metrics = {"step": step, "final": True, **{k: v for k, v in summary.items() if k != "parameter_digests"}}
    save_and_report(cfg, metrics, True, validate=cfg.validate, state=(model, tokenizer, optimizer, scheduler, step),
                    records=records)


def save_and_report(cfg: WorkerConfig, metrics: dict, save: bool, *, validate: bool, state: tuple,
                    records: dict[str, str] | None = None) -> None:
    """Report metrics from every rank; with save, rank 0 writes a checkpoint and reports it too, asking
    Ray Train to validate it when validate (Ray refuses validation without a checkpoint)."""
    model, tokenizer, optimizer, scheduler, step = state
    with tempfile.TemporaryDirectory() as tmp:
        folder = None
        if save and ray.train.get_context().get_world_rank() == 0:
            folder = Path(tmp)
            position = {"global_batches": step, "rows": step * cfg.train.global_batch_size}
            checkpoint.save_checkpoint(folder, model, tokenizer, optimizer, scheduler, step, cfg.max_seq_length,
                                       position, records)
        saved = ray.train.Checkpoint.from_directory(str(folder)) if folder else None
        if validate and saved is not None:
            ray.train.report(metrics, checkpoint=saved,
                             validation=ray.train.ValidationTaskConfig(fn_kwargs={"step": step}))
        else:
            ray.train.report(metrics, checkpoint=saved)


class Meter:
    """Sums over the steps since the last report (losses stay on the device until then) and over the run."""

    def __init__(self, total_steps: int, peak_flops: float):
        self.total_steps, self.peak_flops = total_steps, peak_flops
        self.history: list[dict] = []
        self.rows_trained = 0
        self.rows_per_epoch: dict[int, int] = {}
        self._reset()

    def _reset(self) -> None:
        self.loss, self.steps, self.sentences, self.tokens, self.flops = 0.0, 0, 0, 0, 0
        self.started = time.perf_counter()

    def add(self, loss: torch.Tensor, batch: RankBatch) -> None:
        self.loss += loss  # a tensor: no device sync until the report
        self.steps += 1
        self.sentences += batch.rows
        self.tokens += batch.labels + batch.rows
        self.flops += batch.flops
        self.rows_trained += batch.rows
        for epoch, count in batch.rows_per_epoch.items():
            self.rows_per_epoch[epoch] = self.rows_per_epoch.get(epoch, 0) + count

    def report(self, step: int, steps_per_epoch: int, lr: float, device, world: int, rank: int) -> dict:
        """The window's metrics summed over ranks (every rank must call it together); starts a new window."""
        loss, sentences, tokens, flops = sum_across_ranks(
            [float(self.loss), self.sentences, self.tokens, self.flops], device)
        if not math.isfinite(loss):
            raise FloatingPointError(f"non-finite loss at step {step} (rank {rank})")
        seconds = time.perf_counter() - self.started
        metrics = {"step": step, "epoch": (step - 1) // steps_per_epoch, "loss": loss / self.steps, "lr": lr,
                   "sentences_per_s": sentences / seconds, "tokens_per_s": tokens / seconds,
                   "mfu": flops / seconds / (self.peak_flops * world), "world_size": world}
        self.history.append(metrics)
        if rank == 0:
            log.info("[train] step %d/%d loss %.4f lr %.2e %.1f sentences/s %.0f tokens/s MFU %.1f%%", step,
                     self.total_steps, metrics["loss"], lr, metrics["sentences_per_s"], metrics["tokens_per_s"], 100 * metrics["mfu"])
        self._reset()
        return metrics


def stop_requested(flag_uri: str | None, device) -> bool:
    """True on every rank if rank 0 sees the stop flag (the driver writes it on SIGTERM) or Ray Train
    announces that a node of this run is about to be preempted. Every rank must call it together."""
    flag = 0.0
    if flag_uri and (not dist.is_initialized() or dist.get_rank() == 0):
        fs, path = fsspec.core.url_to_fs(flag_uri)
        flag = float(fs.exists(path))
    return sum_across_ranks([flag], device)[0] > 0 or ray.train.get_preemption_info() is not None


def sum_across_ranks(values: list[float], device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def all_gather(obj) -> list:
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
