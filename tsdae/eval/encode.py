"""Sentence embeddings from a Hugging Face encoder, and the STS evaluation of a model directory.

Measured on the 2-core CPU (AMD EPYC, AVX-512, torch's default 2 threads), all-MiniLM-L6-v2, whole suite
(8 tasks, 40,700 sentence slots, 30,778 distinct sentences, 14.5 tokens on average, longest 93):
  this module, batch 128:                   encode 51.6 s (~596 sentences/s), wall 52.7 s
  sentence-transformers encode per subset:  95.1 s (40,700 sentences, ~428 sentences/s)
Dedupe (evaluate_sts) saves 24% of the sentences and one global length sort keeps padding near zero.
What is left is fp32 GEMM (a profile: addmm 85% of the time at ~195 GFLOP/s on two cores, about the
fp32 FMA peak of two such cores at ~3 GHz), so neither batch size (64 and 128 equal, 256 +12%, 512 +40%) nor the attention kernel (sdpa and
eager equal) moves it; torch already uses one thread per core (we set no global thread count). bf16
would, but it changes the numbers, so it is used on CUDA only.
"""

from __future__ import annotations

import contextlib
import time

import numpy as np
import torch
from transformers import AutoModel, AutoTokenizer

from tsdae.eval.config import PRECISIONS, EvalConfig
from tsdae.eval.protocol import evaluate_sts
from tsdae.eval.sts import load_suite
from tsdae.model import POOLINGS, model_pooling, pool

class SentenceEncoder:
    """Encode sentences with an encoder (``model(input_ids, attention_mask, …).last_hidden_state``) and a
    pooling mode ("cls", "mean" or "max", via ``tsdae.model.pooling.pool``).

    ``SentenceEncoder(model_dir, …)`` loads a Hugging Face directory (AutoModel + AutoTokenizer) onto
    ``device``; ``SentenceEncoder.from_module(model, tokenizer, …)`` wraps an already-loaded encoder
    (the training code's) and leaves it where it is.
    """

    def __init__(self, model_dir: str, pooling: str = "cls", max_length: int = 128, batch_size: int = 128,
                 device: str = "cpu", precision: str = "auto"):
        pooling = model_pooling(model_dir, pooling)
        model = AutoModel.from_pretrained(model_dir).to(device)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self._setup(model, tokenizer, pooling, max_length, batch_size, precision)

    @classmethod
    def from_module(cls, model: torch.nn.Module, tokenizer, pooling: str = "cls", max_length: int = 128,
                    batch_size: int = 128, precision: str = "auto") -> "SentenceEncoder":
        """Wrap a loaded encoder; inputs go to the device of its parameters."""
        self = cls.__new__(cls)
        self._setup(model, tokenizer, pooling, max_length, batch_size, precision)
        return self

    def _setup(self, model, tokenizer, pooling: str, max_length: int, batch_size: int, precision: str) -> None:
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        if batch_size < 1 or max_length < 1:
            raise ValueError(f"batch_size and max_length must be >= 1, got {batch_size}, {max_length}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        self.model, self.tokenizer = model, tokenizer
        self.pooling, self.max_length, self.batch_size = pooling, max_length, batch_size
        self.precision = precision

    def _autocast(self, device: torch.device):
        """bf16 autocast for "bf16", and for "auto" on CUDA; else none (fp32)."""
        bf16 = self.precision == "bf16" or (self.precision == "auto" and device.type == "cuda")
        return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def encode(self, sentences: list[str]) -> np.ndarray:
        """Embed sentences: returns emb_NH float32, row i for sentences[i].

        All sentences are tokenized at once (truncated to max_length) and batched in order of token
        length, so a batch holds sentences of similar length and little padding; results are put back
        in input order. Because attention masks out padding, a sentence's vector does not depend on its
        batch (up to float rounding). Runs under inference_mode with the model in eval mode (its
        previous train/eval mode is restored), with bf16 autocast per ``precision`` (default: CUDA only).
        """
        if not sentences:
            return np.zeros((0, self.model.config.hidden_size), dtype=np.float32)
        features = self.tokenizer(list(sentences), truncation=True, max_length=self.max_length)
        lengths = np.fromiter((len(ids) for ids in features["input_ids"]), dtype=np.int64, count=len(sentences))
        # Longest first: the first batch shows the peak memory at once, and a stable sort keeps ties in
        # input order, so the batches (hence the float rounding) are the same whatever the call.
        order = np.argsort(-lengths, kind="stable")
        device = self.device
        autocast = self._autocast(device)
        was_training = self.model.training
        self.model.eval()
        out_NH = None
        try:
            with torch.inference_mode(), autocast:
                for start in range(0, len(order), self.batch_size):
                    idx = order[start:start + self.batch_size]
                    batch = self.tokenizer.pad({k: [v[i] for i in idx] for k, v in features.items()},
                                               return_tensors="pt")
                    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                    hidden_BTH = self.model(**batch).last_hidden_state
                    emb_BH = pool(hidden_BTH, batch["attention_mask"], self.pooling).float().cpu().numpy()
                    if out_NH is None:
                        out_NH = np.empty((len(sentences), emb_BH.shape[1]), dtype=np.float32)
                    out_NH[idx] = emb_BH
        finally:
            self.model.train(was_training)
        return out_NH


def evaluate_model_dir(model_dir: str, pooling: str, cfg: EvalConfig, device: str = "cpu") -> dict:
    """Evaluate a Hugging Face or sentence-transformers encoder directory on cfg.tasks (data under
    cfg.sts_dir) and cfg.custom_sets, in this process. pooling may be "auto" (``tsdae.model.model_pooling``).

    Returns ``evaluate_sts``'s dict plus "pooling", "max_length", "batch_size", "precision", "bad_rows"
    (custom sets' skipped rows, ``tsdae.eval.sts.load_suite``), "wall_s" (load data and model, encode, score),
    "encode_s" and "sentences_per_s" (distinct sentences / encode_s).

    Reference (packaged all-MiniLM-L6-v2, default EvalConfig, ``all``): STS-B test cls 73.50 / mean 82.03;
    7-task average cls 73.69 / mean 78.87 (wmean: 72.84 / 78.78); STS-B dev cls 79.73 / mean 86.72.
    """
    t0 = time.perf_counter()
    subsets_by_task, bad_rows = load_suite(cfg)
    encoder = SentenceEncoder(model_dir, pooling, cfg.max_length, cfg.batch_size, device, cfg.precision)
    encode_s = 0.0

    def timed_encode(sentences: list[str]) -> np.ndarray:
        nonlocal encode_s
        t = time.perf_counter()
        emb = encoder.encode(sentences)
        encode_s += time.perf_counter() - t
        return emb

    result = evaluate_sts(timed_encode, subsets_by_task)
    return with_run_info(result, pooling=encoder.pooling, cfg=cfg, bad_rows=bad_rows,
                         wall_s=time.perf_counter() - t0, encode_s=encode_s)


def with_run_info(result: dict, *, pooling: str, cfg: EvalConfig, bad_rows: dict, wall_s: float,
                  encode_s: float, **extra) -> dict:
    """``evaluate_sts``'s result plus how it was computed (the keys ``evaluate_model_dir`` documents)."""
    result.update({
        "pooling": pooling,
        "max_length": cfg.max_length,
        "batch_size": cfg.batch_size,
        "precision": cfg.precision,
        "bad_rows": bad_rows,
        **extra,
        "wall_s": round(wall_s, 3),
        "encode_s": round(encode_s, 3),
        "sentences_per_s": round(result["n_sentences"] / encode_s, 1) if encode_s > 0 else None,
    })
    return result
