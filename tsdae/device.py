"""Where a process computes and in which precision: the one home of device, thread and bf16 choices,
used by the training workers, the evaluation task and actors, and the validation task."""

from __future__ import annotations

import contextlib

import torch


def compute_device(gpus: float, cpu_threads: float) -> torch.device:
    """The device a process of a Ray task or actor with these resources computes on: CUDA when it was
    given a GPU and one is visible, else the CPU with torch's intra-op threads set to the CPUs it was
    given (Ray does not cap them; torch's default, one per core of the machine, oversubscribes a node
    that runs several such processes)."""
    if gpus and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return use_device(torch.device("cpu"), cpu_threads)


def use_device(device: torch.device, cpu_threads: float) -> torch.device:
    """Set torch's CPU threads for a process that computes on device (a CPU one); returns device."""
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(cpu_threads)))
    return device


def native_bf16(device: torch.device) -> bool:
    """Whether this device multiplies bf16 matrices natively: a CUDA GPU with bf16, or a CPU with
    AVX-512 BF16 or AMX (there bf16 autocast trained 1.7x faster than fp32 at the same loss:
    benchmarks.training). Elsewhere bf16 is emulated and slower than fp32 (~1.3 against ~37 GFLOP/s per
    core measured for torch.mm on an AVX2-only Zen 3)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(getattr(torch.cpu, name, lambda: False)() for name in checks)
    return False


def use_bf16(precision: str, device: torch.device) -> bool:
    """train.precision → bf16 autocast or not: "bf16", "fp32", or "auto" = where the device has it."""
    return precision == "bf16" or (precision == "auto" and native_bf16(device))


def autocast(device: torch.device, bf16: bool):
    """bf16 autocast on device when bf16, else a no-op context."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
