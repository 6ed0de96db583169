"""One optimizer step of TSDAE, and the small pure helpers around it: the one training step that the
worker loop, the benchmarks and the GPU path all run."""

from __future__ import annotations

import contextlib
import hashlib
import math

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from tsdae.device import autocast
from tsdae.train.batch import Batch


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, micro_batches: list[Batch], *,
               world: int = 1, bf16: bool = False, max_grad_norm: float | None = None,
               scheduler=None) -> torch.Tensor:
    """Forward, backward and update over this rank's micro-batches of one global batch.

    model: the TSDAE module, or its DDP wrapper (then gradients are all-reduced once, after the last
    micro-batch). The loss is the mean over every label token of the global batch, so 2 ranks × b/2
    train what 1 rank × b trains: each micro-batch's backward takes its label sum (× world, which undoes
    DDP's average over ranks), and the gradients are divided by the global batch's label count before
    the update. That count is summed over ranks by one all-reduce launched first, which runs while the
    micro-batches compute; nothing waits for it before the division (on a GPU not even then: the stream
    does). No step of this function reads a value back from the device: the micro-batches carry their
    packing and label counts from the CPU (tsdae.train.batch).
    Returns this rank's share of the global mean loss as a detached device tensor (summed over ranks it
    is the loss).
    """
    device = micro_batches[0].target_ids.device
    count = torch.full((), float(sum(b.n_labels for b in micro_batches)), dtype=torch.float32, device=device)
    pending = dist.all_reduce(count, async_op=True) if world > 1 else None
    optimizer.zero_grad(set_to_none=True)
    label_sum = None
    for i, batch in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        defer_sync = model.no_sync() if not last and hasattr(model, "no_sync") else contextlib.nullcontext()
        with defer_sync, autocast(device, bf16):
            loss = model(batch.noisy_ids, batch.noisy_mask, batch.target_ids, batch.packing) * batch.n_labels
        (loss * world).backward()
        label_sum = loss.detach() if label_sum is None else label_sum + loss.detach()
    if pending is not None:
        pending.wait()
    trainable = [p for p in model.parameters() if p.requires_grad]
    divide_gradients(trainable, count)
    if max_grad_norm:
        torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    return label_sum / count


def divide_gradients(params: list[nn.Parameter], divisor: torch.Tensor) -> None:
    """p.grad /= divisor for every parameter with a gradient (one fused kernel over the dense ones)."""
    grads = [p.grad for p in params if p.grad is not None]
    torch._foreach_div_([g for g in grads if not g.is_sparse], divisor)
    for g in grads:
        if g.is_sparse:
            g.div_(divisor)


def build_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters, fused: one kernel over all parameters per step (CPU and CUDA);
    its state loads the same as the default implementation's, so older checkpoints resume."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(trainable, lr=lr, weight_decay=weight_decay, fused=True)


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


def step_seed(seed: int, rank: int, step: int) -> int:
    """Seed for dropout at (rank, step): derived, so a restarted run draws the same masks."""
    return int(np.random.SeedSequence((seed, rank, step)).generate_state(1)[0])


def parameter_digest(module: nn.Module) -> str:
    """SHA-256 over every parameter and buffer, bit for bit: equal digests mean identical replicas."""
    h = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
