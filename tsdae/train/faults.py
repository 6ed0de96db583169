"""Injected worker failures, for the tests and the benchmark of failure handling: a training loop that
kills one worker's process once, mid-run, so that Ray Train must restart it from the last checkpoint."""

from __future__ import annotations

import itertools
import os
import time

import ray.train

from tsdae.train.loop import WorkerConfig, train_loop_per_worker
from tsdae.train.step import train_step


def settle_seconds() -> float:
    """How long an injected crash waits before it kills its worker: three of the Ray Train controller's
    polls (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, 2 s by default). Crashing at once raced the registration
    of the checkpoint reported just before: the retry then started from scratch and crashed again
    (seen once in a test run)."""
    return 3 * float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "2"))


class CrashOnce:
    """``build_trainer(loop=CrashOnce(at_step=3))``: the training loop, except that rank 1 (rank 0 on one
    worker) exits its process just before step at_step of a run's first attempt; a restarted attempt
    (one that resumes from a checkpoint) trains normally. Picklable, so Ray can ship it to the workers."""

    def __init__(self, at_step: int):
        self.at_step = at_step

    def __call__(self, cfg: WorkerConfig) -> None:
        ctx = ray.train.get_context()
        doomed = ray.train.get_checkpoint() is None and ctx.get_world_rank() == min(1, ctx.get_world_size() - 1)
        steps = itertools.count()

        def step(*args, **kwargs):
            if doomed and next(steps) == self.at_step:
                time.sleep(settle_seconds())
                os._exit(1)
            return train_step(*args, **kwargs)

        train_loop_per_worker(cfg, step_fn=step)
