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

from tsdae.train import checkpoint
from tsdae.train.batch import Batch, micro_batches, pad_batch
from tsdae.train.config import ScaleConfig, TrainConfig
from tsdae.train.faults import CrashOnce
from tsdae.train.flops import Shape, linear_shapes, matmul_peak_by_library, matmul_peak_flops, training_flops
from tsdae.train.loop import WorkerConfig, train_loop_per_worker
from tsdae.train.step import build_optimizer, train_step
from tsdae.train.trainer import build_trainer, steps_per_epoch
from tsdae.train.validation import VAL_METRIC, Selection, load_validation_history, select_checkpoint, validates

__all__ = [
    "VAL_METRIC", "Batch", "CrashOnce", "ScaleConfig", "Selection", "Shape", "TrainConfig", "WorkerConfig", "build_optimizer",
    "build_trainer", "checkpoint", "linear_shapes", "load_validation_history", "matmul_peak_by_library", "matmul_peak_flops", "micro_batches", "pad_batch",
    "select_checkpoint", "steps_per_epoch", "train_loop_per_worker", "train_step", "training_flops", "validates",
]
