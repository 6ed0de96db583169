"""The TSDAE training loop, run by every Ray Train worker, and the small helpers it is built from."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from tsdae.allocator import retain_freed_memory
from tsdae.config import ModelConfig, TrainConfig
from tsdae.export import export_decoder, export_encoder
from tsdae.flops import Shape, matmul_peak_flops, training_flops
from tsdae.model import build_tsdae

# Through logging, not print: Ray Train both tees and logs a worker's print, so each line showed twice.
log = logging.getLogger("tsdae.train")

STATE_FILE = "state.pt"
COMPLETE_FILE = "complete.json"


# ---------------------------------------------------------------------------------------------- helpers
def lr_factor(step: int, schedule: str, warmup_steps: int, total_steps: int | None) -> float:
    """Multiplier of the base learning rate before optimizer step `step` (0-based): linear warmup over
    warmup_steps, then constant, linear decay to 0 or cosine decay to 0 at total_steps."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant" or not total_steps:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def native_bf16(device: torch.device) -> bool:
    """Whether this device multiplies bf16 matrices natively: a CUDA GPU with bf16, or a CPU with
    AVX-512 BF16 or AMX (there bf16 autocast trains 1.7x faster than fp32 at the same loss: benchmarks.training)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(getattr(torch.cpu, name, lambda: False)() for name in checks)
    return False


def use_bf16(precision: str, device: torch.device) -> bool:
    """train.precision → bf16 autocast or not: "bf16", "fp32", or "auto" = where the device has it."""
    return precision == "bf16" or (precision == "auto" and native_bf16(device))


def step_seed(seed: int, rank: int, step: int) -> int:
    """Seed for dropout at (rank, step): derived, so a restarted run draws the same masks."""
    return int(np.random.SeedSequence((seed, rank, step)).generate_state(1)[0])


def parameter_digest(module: torch.nn.Module) -> str:
    """SHA-256 over every parameter and buffer, bit for bit: equal digests mean identical replicas."""
    h = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def rank_batches(shard, global_batch: int, rank: int, world: int, deterministic: bool):
    """Yield this rank's rows of every global batch (dicts of numpy columns, global_batch/world rows).

    deterministic: the shard is the whole ordered stream on every rank; rank r takes rows
    [r·b, (r+1)·b) of each global batch. Otherwise the shard is this rank's equal share of the stream
    and is cut into batches of b rows. A final incomplete global batch is dropped on every rank, so
    all ranks run the same number of steps.
    """
    per_rank = global_batch // world
    if deterministic:
        for batch in shard.iter_batches(batch_size=global_batch, batch_format="numpy", drop_last=True):
            yield {k: v[rank * per_rank:(rank + 1) * per_rank] for k, v in batch.items()}
    else:
        yield from shard.iter_batches(batch_size=per_rank, batch_format="numpy", drop_last=True)


def _label_tokens(target_ids) -> int:
    """Labels of unpadded target rows: a row of n tokens yields n-1 labels (none of them padding)."""
    return int(sum(len(t) - 1 for t in target_ids))


def _all_gather(obj) -> list:
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def fault_settle_seconds() -> float:
    """How long an injected crash (``fault_at_step``) waits before it kills its worker: three of the Ray
    Train controller's polls (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, 2 s by default). Crashing at once
    raced the registration of the checkpoint reported just before: the retry then started from scratch
    and crashed again (seen once in a test run)."""
    return 3 * float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "2"))


def _sum_across_ranks(values: list[float], device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def save_checkpoint(path: Path, model, tokenizer, optimizer, scheduler, step: int, max_length: int,
                    position: dict) -> None:
    """Write a checkpoint directory; `complete.json` is written last, so a directory without it was
    cut off while being written and is never loaded."""
    tmp = path / (STATE_FILE + ".tmp")
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "step": step, "position": position}, tmp)
    os.replace(tmp, path / STATE_FILE)
    export_encoder(model, tokenizer, path / "encoder", max_seq_length=max_length)
    (path / COMPLETE_FILE).write_text(json.dumps({"step": step, "position": position}) + "\n")


def load_checkpoint(path: Path) -> dict:
    if not (path / COMPLETE_FILE).exists():
        raise RuntimeError(f"checkpoint {path} is incomplete (no {COMPLETE_FILE}); refusing to resume from it")
    return torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)


def stop_requested(flag_uri: str | None, device) -> bool:
    """True on every rank if rank 0 sees the stop flag (written by the driver on SIGTERM) or Ray Train
    announces that a node of this run is about to be preempted. Every rank must call it together."""
    import fsspec
    import ray.train

    flag = 0.0
    if flag_uri and (not dist.is_initialized() or dist.get_rank() == 0):
        fs, path = fsspec.core.url_to_fs(flag_uri)
        flag = float(fs.exists(path))
    preempted = ray.train.get_preemption_info() is not None
    return _sum_across_ranks([flag], device)[0] > 0 or preempted


def _report(metrics: dict, checkpoint_dir: Path | None, validate: bool = False, step: int | None = None) -> None:
    """Report metrics (every rank) and this rank's checkpoint, if any. validate: ask Ray Train to score
    the checkpoint with the trainer's validation_config (tsdae.validation.validate_checkpoint, in a
    separate Ray task); only a rank that reports a checkpoint may ask (Ray refuses validation without
    one), and the step travels to the validation function for the history."""
    import ray.train

    checkpoint = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
    if validate and checkpoint is not None:
        ray.train.report(metrics, checkpoint=checkpoint,
                         validation=ray.train.ValidationTaskConfig(fn_kwargs={"step": step}))
    else:
        ray.train.report(metrics, checkpoint=checkpoint)


# ------------------------------------------------------------------------------------------- the loop
def train_loop_per_worker(config: dict) -> None:
    """Train TSDAE on this worker's part of the "train" dataset.

    config: {"model": ModelConfig, "train": TrainConfig, "max_length": int, "threads": int,
    "steps_per_epoch": int, "stop_flag": URI checked at report steps (the driver writes it on SIGTERM),
    "fault_at_step": int | None (tests: kill rank 1 once at that step), "validate": bool (rank 0 asks
    Ray Train to validate each checkpoint it reports, periodic and final, off the workers; build_trainer
    sets it with the validation_config)}.
    On a stop request or an announced preemption the loop checkpoints at once and ends early with
    `summary["stopped"]`; rerunning with the same run name resumes from that checkpoint.
    Rows carry `noisy_ids` and `target_ids` (token id lists, no padding); `pad_batch` pads them on
    the right. Rank 0 reports checkpoints (`state.pt` with model, optimizer, scheduler, step and data
    position; `encoder/`; `complete.json` last) and at the end also `decoder/`, `metrics.jsonl`,
    `summary.json`.
    """
    import ray.train
    import ray.train.torch

    from pipeline.batching import pad_batch

    model_cfg: ModelConfig = config["model"]
    train_cfg: TrainConfig = config["train"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    micro, accum = train_cfg.per_worker_batch(world)
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(config.get("threads", 1))))
        if train_cfg.retain_freed_memory:
            retain_freed_memory()  # +6-18% sentences/s on CPU: no page faults on each step's big buffers
    bf16 = use_bf16(train_cfg.precision, device)
    steps_per_epoch = config["steps_per_epoch"]
    # MFU estimate: counted model FLOPs of the real token counts ÷ this device's measured matmul peak.
    peak_flops = matmul_peak_flops(device, torch.bfloat16 if bf16 else torch.float32, n=1024, repeats=2)
    total_steps = train_cfg.max_steps or steps_per_epoch * train_cfg.epochs

    # 1. Build: model (restored from the last checkpoint if Ray restarted us), DDP, optimizer, schedule.
    torch.manual_seed(train_cfg.seed)  # decoder-only weights start equal on every rank
    model, tokenizer = build_tsdae(model_cfg)
    pad_id = tokenizer.pad_token_id
    shape = Shape.of(model.encoder.config)
    state = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            state = load_checkpoint(Path(d))
        model.load_state_dict(state["model"])
    ddp_model = ray.train.torch.prepare_model(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    # fused: one kernel over all parameters per step (CPU and CUDA); its state loads the same as the
    # default implementation's, so older checkpoints resume.
    optimizer = torch.optim.AdamW(trainable, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, train_cfg.schedule, train_cfg.warmup_steps, total_steps))
    step = 0
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step = state["step"]
        if rank == 0:
            log.info(f"[train] resumed at step {step} (data position {state['position']})")
    model.train()

    # 2. Data: this rank's rows of each global batch; a resumed run skips the batches already trained.
    shard = ray.train.get_dataset_shard("train")
    batches = rank_batches(shard, train_cfg.global_batch_size, rank, world, train_cfg.deterministic)
    history: list[dict] = []
    window = {"loss": 0.0, "steps": 0, "sentences": 0, "tokens": 0, "flops": 0, "t": time.perf_counter()}
    rows_trained = 0
    rows_per_epoch: dict[int, int] = {}
    start_step = step
    stopped = False

    # 3. Train.
    for index, batch in enumerate(batches):
        if index < start_step:
            continue  # data position: the same global batches were trained before the restart
        if step >= total_steps:
            break
        if config.get("fault_at_step") == step and state is None and rank == min(1, world - 1):
            time.sleep(fault_settle_seconds())  # injected worker crash (tests): only on the first attempt
            os._exit(1)
        torch.manual_seed(step_seed(train_cfg.seed, rank, step))
        # The loss is the mean over all label tokens of the global batch: each micro-batch adds its
        # token-sum / global token count; ×world undoes DDP's averaging of gradients over ranks.
        local_tokens = _label_tokens(batch["target_ids"])
        global_tokens = _sum_across_ranks([local_tokens], device)[0] if world > 1 else local_tokens
        step_loss = torch.zeros((), device=device)
        optimizer.zero_grad(set_to_none=True)
        for m in range(accum):
            part = {k: v[m * micro:(m + 1) * micro] for k, v in batch.items()}
            tensors = {k: t.to(device, non_blocking=True) for k, t in pad_batch(part, pad_id).items()}
            n_labels = int((tensors["target_ids"][:, 1:] != pad_id).sum())
            sync = m == accum - 1 or world == 1
            with (contextlib.nullcontext() if sync else ddp_model.no_sync()), \
                    torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                mean_loss = ddp_model(tensors["noisy_input_ids"], tensors["noisy_attention_mask"],
                                      tensors["target_ids"])
                loss = mean_loss * (n_labels * world / global_tokens)
            loss.backward()
            step_loss += loss.detach() / world
        if train_cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(trainable, train_cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        step += 1
        n = len(batch["target_ids"])
        rows_trained += n
        for e, count in zip(*np.unique(batch["epoch"], return_counts=True)):
            rows_per_epoch[int(e)] = rows_per_epoch.get(int(e), 0) + int(count)
        window["loss"] += step_loss  # a tensor: no device sync until the report
        window["steps"] += 1
        window["sentences"] += n
        window["tokens"] += local_tokens + n
        window["flops"] += training_flops(shape, [len(x) for x in batch["noisy_ids"]],
                                          [len(t) for t in batch["target_ids"]],
                                          first_token_only=model_cfg.pooling == "cls")

        # The last step's checkpoint is the final one, written below with the export.
        checkpoint_now = bool(train_cfg.checkpoint_every) and step % train_cfg.checkpoint_every == 0 \
            and step < total_steps
        if step % train_cfg.report_every == 0 or checkpoint_now:
            stopped = stop_requested(config.get("stop_flag"), device) and step < total_steps
            checkpoint_now = checkpoint_now or stopped
            loss_sum, sentences, tokens, flops = _sum_across_ranks(
                [float(window["loss"]), window["sentences"], window["tokens"], window["flops"]], device)
            if not math.isfinite(loss_sum):
                raise FloatingPointError(f"non-finite loss at step {step} (rank {rank})")
            seconds = time.perf_counter() - window["t"]
            metrics = {
                "step": step,
                "epoch": (step - 1) // steps_per_epoch,
                "loss": loss_sum / window["steps"],
                "lr": scheduler.get_last_lr()[0],
                "sentences_per_s": sentences / seconds,
                "tokens_per_s": tokens / seconds,
                "mfu": flops / seconds / (peak_flops * world),
                "world_size": world,
                "stopped": stopped,
            }
            history.append(metrics)
            if rank == 0:
                log.info(f"[train] step {step}/{total_steps} loss {metrics['loss']:.4f} lr {metrics['lr']:.2e} "
                         f"{metrics['sentences_per_s']:.1f} sentences/s {metrics['tokens_per_s']:.0f} tokens/s "
                         f"MFU {metrics['mfu']:.1%}")
            with tempfile.TemporaryDirectory() as tmp:
                ckpt_dir = None
                if checkpoint_now and rank == 0:
                    ckpt_dir = Path(tmp)
                    position = {"global_batches": step, "rows": step * train_cfg.global_batch_size}
                    save_checkpoint(ckpt_dir, model, tokenizer, optimizer, scheduler, step,
                                    config["max_length"], position)
                # A stop checkpoint is not validated: the run is being shut down (and resumes from it).
                _report(metrics, ckpt_dir, validate=bool(config.get("validate")) and not stopped, step=step)
            window = {"loss": 0.0, "steps": 0, "sentences": 0, "tokens": 0, "flops": 0,
                      "t": time.perf_counter()}
            if stopped:
                if rank == 0:
                    log.info(f"[train] stop requested: checkpointed at step {step}")
                break

    # 4. Finish: prove the replicas are identical, then rank 0 adds the decoder and the record.
    digests = _all_gather(parameter_digest(model))
    rows_per_rank = _all_gather(rows_trained)
    epochs_per_rank = _all_gather(rows_per_epoch)
    summary = {
        "steps": step,
        "world_size": world,
        "global_batch_size": train_cfg.global_batch_size,
        "micro_batch_size": micro,
        "accumulation": accum,
        "precision": "bf16" if bf16 else "fp32",
        "resumed_from_step": start_step,
        "stopped": stopped,
        "rows_trained_per_rank": rows_per_rank,
        # {epoch: rows} per rank; epochs may overlap at their boundary in the stream (see pipeline.dataset)
        "rows_trained_per_epoch_per_rank": [{str(e): n for e, n in sorted(d.items())} for d in epochs_per_rank],
        "replicas_identical": len(set(digests)) == 1,
        "parameter_digests": digests,
    }
    if rank == 0:
        log.info(f"[train] done: {step} steps, rows per rank {rows_per_rank}, "
                 f"replicas identical: {summary['replicas_identical']}")
    if stopped:  # the stop checkpoint above (its metrics say "stopped") is the one to resume from
        return
    with tempfile.TemporaryDirectory() as tmp:
        ckpt_dir = None
        if rank == 0:
            ckpt_dir = Path(tmp)
            model.eval()
            position = {"global_batches": step, "rows": step * train_cfg.global_batch_size}
            save_checkpoint(ckpt_dir, model, tokenizer, optimizer, scheduler, step, config["max_length"], position)
            export_decoder(model, tokenizer, ckpt_dir / "decoder")
            (ckpt_dir / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in history))
            (ckpt_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        _report({"step": step, "final": True, **{k: v for k, v in summary.items() if k != "parameter_digests"}},
                ckpt_dir, validate=bool(config.get("validate")), step=step)
