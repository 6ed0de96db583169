"""Training: the worker loop and its one training step, the Ray Train wiring, the checkpoint format,
the validation hook that scores checkpoints while the workers train, and FLOP counting.

    config      TrainConfig (optimisation), ScaleConfig (workers and preprocessing actors)
    batch       rows of token ids → right-padded tensors (Batch), counts taken on the CPU
    step        train_step: one optimizer step over a rank's micro-batches; lr schedule, derived seeds
    loop        train_loop_per_worker: build, resume, train, report (what each Ray Train worker runs)
    checkpoint  the checkpoint's files: save, load, export a run's model from one
    trainer     build_trainer: the TorchTrainer of a run
    validation  dev score per checkpoint (Ray Train's validation hook) and the choice of the run's model
    flops       counted model FLOPs and the matmul peak (MFU)
    faults      an injected worker crash, for the tests of failure handling
"""

import importlib

from tsdae.train.batch import Batch, micro_batches, pad_batch
from tsdae.train.config import ScaleConfig, TrainConfig
from tsdae.train.flops import Shape, linear_shapes, matmul_peak_by_library, matmul_peak_flops, training_flops
from tsdae.train.step import build_optimizer, train_step

# What needs Ray (or pyarrow) loads on first use, so the step above imports with torch alone: the GPU
# benchmark runs it on machines that have no Ray.
_LAZY = {
    "checkpoint": None, "CrashOnce": "faults", "WorkerConfig": "loop", "train_loop_per_worker": "loop",
    "build_trainer": "trainer", "steps_per_epoch": "trainer", "VAL_METRIC": "validation", "Selection": "validation",
    "load_validation_history": "validation", "select_checkpoint": "validation", "validates": "validation",
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = importlib.import_module(f"{__name__}.{_LAZY[name] or name}")
    return module if _LAZY[name] is None else getattr(module, name)


__all__ = [
    "VAL_METRIC", "Batch", "CrashOnce", "ScaleConfig", "Selection", "Shape", "TrainConfig", "WorkerConfig", "build_optimizer",
    "build_trainer", "checkpoint", "linear_shapes", "load_validation_history", "matmul_peak_by_library", "matmul_peak_flops", "micro_batches", "pad_batch",
    "select_checkpoint", "steps_per_epoch", "train_loop_per_worker", "train_step", "training_flops", "validates",
]
