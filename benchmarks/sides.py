"""The CPU comparison's two implementations, each training in a process of its own, so each runs with
its own process settings: ours with tsdae.model.fast.allocator.retain_freed_memory (as the train loop
does on CPU), the reference with the C library's defaults (as its users run it). The parent process
alternates chunks of steps between them (benchmarks.training)."""

from __future__ import annotations

import contextlib
import copy
import multiprocessing
import traceback
from typing import Callable

import numpy as np
import torch
from transformers.utils import logging as hf_logging

from benchmarks.ablation import Ablation
from benchmarks.batches import (collate, consecutive_batches, corrupt_and_tokenize, load_sentences, padding_fraction,
                                random_batches, sample_batches, token_counts)
from benchmarks.reference import build_reference, reference_loss
from benchmarks.step_breakdown import step_breakdown
from benchmarks.steps import build_ours, loss_step, make_optimizer, ours_step, run_steps
from tsdae.eval import SentenceEncoder, evaluate_sts, load_task
from tsdae.model import resolve_model_path, retain_freed_memory
from tsdae.train import Batch, Shape, linear_shapes, matmul_peak_by_library, training_flops

KINDS = ("ours", "reference", "ours_bf16")


class Side:
    """One implementation, in its own process: its data, model, optimizer and batches.

    kind "ours": our TSDAE step, length-aware batches, with retain_freed_memory; it also hosts the
    ablation variants that build on that allocator setting. "ours_bf16": the same in bf16 autocast
    (fp32 master weights), from the same initial weights. "reference": sentence-transformers' loss on
    random batches with the default allocator; it also hosts the ablation variants before it.
    """

    def __init__(self, kind: str, args):
        self.kind, self.args = kind, args
        self.retained = retain_freed_memory() if kind.startswith("ours") else False
        self.bf16 = kind == "ours_bf16"
        if args.threads:
            torch.set_num_threads(args.threads)
        hf_logging.set_verbosity_error()  # the decoder's freshly initialised cross-attention is expected
        model_path = resolve_model_path(args.model)
        n, bs = args.sentences, args.batch_size
        # Train sentences, tokenized and noised by the pipeline's actor in its length-sorted order, and
        # held-out ones for the final eval loss: the same in both processes (pure functions of the seed).
        texts, keys = load_sentences(args.corpus, n + args.eval_sentences)
        train = corrupt_and_tokenize(texts[:n], keys[:n], model_path, args.del_ratio, args.seed, bs)
        held_out = corrupt_and_tokenize(texts[n:], keys[n:], model_path, args.del_ratio, args.seed, bs)
        self.noisy, self.target = train["noisy_ids"], train["target_ids"]
        ours, tokenizer = build_ours(args.seed, args.model)
        self.tokenizer, self.pad_id = tokenizer, tokenizer.pad_token_id
        self.shape = Shape.of(ours.encoder.config)
        self.eval_batches = [collate(held_out["noisy_ids"], held_out["target_ids"], rows, self.pad_id)
                             for rows in random_batches(len(held_out["row_key"]), bs, np.random.default_rng(1))]
        self.ablation = (Ablation(ours, self.noisy, self.target, self.pad_id, args)
                         if args.ablation_rounds and not self.bf16 else None)
        self.breakdown_model = copy.deepcopy(ours) if kind == "ours" and args.breakdown_steps else None
        if kind.startswith("ours"):
            self.model, self.encoder = ours, ours.encoder
            self.loss = lambda b: ours(b.noisy_ids, b.noisy_mask, b.target_ids)
            rows = consecutive_batches(n, bs)  # the pipeline's order: length-aware batches
        else:
            reference = build_reference(model_path, ours)  # our initial weights, then ours is dropped
            self.model, self.encoder = reference, reference.encoder[0].auto_model
            self.loss = lambda b: reference_loss(reference, b, self.pad_id)
            rows = random_batches(n, bs, np.random.default_rng(args.seed))  # its trainer's random sampler
            del ours
        self.batches = [collate(self.noisy, self.target, r, self.pad_id) for r in rows]
        if args.steps:
            self.batches = self.batches[:args.steps]
        self.optimizer = make_optimizer(self.model.parameters(), args.lr, fused=True)
        self.step = (ours_step(self.model, self.optimizer, self.bf16) if kind.startswith("ours")
                     else loss_step(self.loss, self.optimizer))
        self.losses: list[float] = []
        self.model.train()

    def initial(self) -> dict:
        """Loss on one held-out batch in eval mode (equal weights: equal for both), STS-B test before."""
        lengths = np.array([len(t) for t in self.target]), np.array([len(x) for x in self.noisy])
        out = {"steps": len(self.batches), "retained_freed_memory": self.retained,
               "mean_target_tokens": float(lengths[0].mean()), "mean_noisy_tokens": float(lengths[1].mean()),
               "initial_loss": eval_loss(self.loss, self.model, self.eval_batches[:1])}
        if self.kind == "ours" and self.args.stsb:  # the same initial weights on every side
            out["stsb_test_base"] = stsb_test(self.encoder, self.tokenizer, self.args.sts_dir)
        self.warm_up()
        return out

    def warm_up(self) -> None:
        """One untimed forward and backward pass on the longest batch, without an optimizer step (the
        weights do not change), then the seed again: the timed pass then measures the steady state of a
        long run, not this process's first touches of memory and first kernels. Every side does it."""
        longest = max(self.batches, key=lambda b: b.target_ids.numel() + b.noisy_ids.numel())
        with torch.autocast("cpu", dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext():
            loss = self.loss(longest)
        loss.backward()
        self.optimizer.zero_grad(set_to_none=True)
        torch.manual_seed(self.args.seed)

    def peak(self) -> dict[str, float]:
        """The matmul peak of each library our layers may use (bf16 on the bf16 side), measured here."""
        return matmul_peak_by_library(torch.device("cpu"), torch.bfloat16 if self.bf16 else torch.float32,
                                      n=self.args.peak_n, layers=linear_shapes(self.model))

    def chunk(self, start: int) -> dict:
        """Train steps [start, start + chunk); their time, losses and counted model FLOPs (one formula for
        both sides: what the model needs for these sentences' real tokens)."""
        chunk = self.batches[start:start + self.args.chunk]
        seconds, losses = run_steps(self.step, chunk)
        self.losses += losses
        return {"seconds": seconds, "last_loss": losses[-1],
                "flops": training_flops(self.shape, *token_counts(chunk, self.pad_id))}

    def final(self) -> dict:
        tail = max(1, len(self.losses) // 10)
        out = {"final_loss": eval_loss(self.loss, self.model, self.eval_batches),
               "train_loss_last_steps": float(np.mean(self.losses[-tail:])),
               "padding": padding_fraction(self.batches, self.pad_id)}
        if self.args.stsb:
            out["stsb_test"] = stsb_test(self.encoder, self.tokenizer, self.args.sts_dir)
        return out

    def breakdown(self, peak_flops: float) -> dict:
        """Where our step's time goes (benchmarks.step_breakdown), on a copy of the initial model: a seeded
        sample of this side's batches, after one untimed pass over them."""
        model, n = self.breakdown_model, self.args.breakdown_steps
        model.train()
        batches = sample_batches(self.batches, n, self.args.seed + 2)
        step = ours_step(model, make_optimizer(model.parameters(), self.args.lr, fused=True))
        run_steps(step, batches)
        return step_breakdown(lambda: run_steps(step, batches)[0], len(batches),
                              training_flops(self.shape, *token_counts(batches, self.pad_id)), peak_flops)

    def ablation_round(self, rnd: int, name: str) -> float:
        """Sentences/s of one ablation variant on round rnd's sentences (the same for every variant)."""
        return self.ablation.run(rnd, name)


def _serve(kind: str, args, conn) -> None:
    """A Side's process: build it, then answer (method, args) calls until None arrives."""
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


def eval_loss(loss_fn: Callable[[Batch], torch.Tensor], module, batches: list[Batch]) -> float:
    """Mean loss over batches in eval mode (no dropout), without gradients."""
    was_training = module.training
    module.eval()
    with torch.no_grad():
        value = float(np.mean([loss_fn(b).item() for b in batches]))
    module.train(was_training)
    return value


def stsb_test(encoder, tokenizer, sts_dir: str) -> float:
    """Spearman ×100 on STS-B test, CLS pooling."""
    was_training = encoder.training
    result = evaluate_sts(SentenceEncoder.from_module(encoder, tokenizer, pooling="cls").encode,
                          {"STSB-test": load_task(sts_dir, "STSB-test")})
    encoder.train(was_training)
    return result["tasks"]["STSB-test"]["all"]
