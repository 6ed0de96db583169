"""How the benchmarks train and score: our step is tsdae.train's own train_step; the reference and the
ablation variants run a loss of their own in the plain loop the reference's trainer runs."""

from __future__ import annotations

import contextlib
import time
from typing import Callable

import torch

from benchmarks.batches import MODEL
from tsdae.model import ModelConfig, build_tsdae
from tsdae.train import Batch, train_step

Step = Callable[[Batch], torch.Tensor]


def build_ours(seed: int, model_ref: str = MODEL):
    torch.manual_seed(seed)
    return build_tsdae(ModelConfig(name_or_path=model_ref))


def make_optimizer(params, lr: float, fused: bool) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=fused, foreach=None if fused else True)


def ours_step(model, optimizer, bf16: bool = False) -> Step:
    """One batch = one global batch of one rank: the train loop's own step (model may be compiled)."""
    return lambda b: train_step(model, optimizer, [b], bf16=bf16)


def loss_step(loss_fn: Callable[[Batch], torch.Tensor], optimizer, autocast=None) -> Step:
    """zero_grad, forward, backward, optimizer step: the loop a loss module is trained in by the
    reference's trainer (and, for comparison, the ablation's variants of our loss)."""
    def step(batch: Batch) -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        with autocast() if autocast else contextlib.nullcontext():
            loss = loss_fn(batch)
        loss.backward()
        optimizer.step()
        return loss.detach()
    return step


def run_steps(step: Step, batches: list[Batch], sync=lambda: None) -> tuple[float, list[float]]:
    """One step per batch; returns (seconds, losses). Losses are read after the timed loop."""
    losses = []
    sync()
    t0 = time.perf_counter()
    for batch in batches:
        losses.append(step(batch))
    sync()
    seconds = time.perf_counter() - t0
    return seconds, [float(loss) for loss in losses]
