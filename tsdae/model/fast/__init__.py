"""The training step's fast paths. Each keeps the loss and gradients of the plain Hugging Face step within
float rounding (tested) and opens with what it measured. In the ablation of ``python -m
benchmarks.training`` (MiniLM, batch 8, fp32, 2-core Zen 5; sentences/s, ±10% per row):

    decoder    LM head at real labels only 26.0 → 26.8; single-key cross-attention → 27.3;
               packed decoder (linear layers at real labels only) 24.3 → 29.2
    encoder    packed encoder, CLS-only last layer 29.2 → 35.9; sparse lookup gradients → 36.7
    dropout    CPU masks from 16 random bits per element 37.2 → 37.7
    linear     fp32 CPU products on oneDNN instead of MKL 37.7 → 56.8
    allocator  CPU workers keep freed memory: +18% in a bare step loop, +6% in benchmarks.training

Each switches itself off where it does not apply (GPUs, bf16 autocast, non-BERT models): there the
step is the plain Hugging Face one.
"""

from tsdae.model.fast.allocator import retain_freed_memory
from tsdae.model.fast.linear import available as onednn_available
from tsdae.model.fast.linear import fast_linear

__all__ = ["fast_linear", "onednn_available", "retain_freed_memory"]
