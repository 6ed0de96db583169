"""What each change of our training step contributes: the step rebuilt one change at a time, from the
plain Hugging Face decoder on random batches to ours, timed on the same sentences per round.

Variants up to ``explicit_decoder_mask`` run in the reference's benchmark process (the C library's
default allocator), the later ones in ours (tsdae.model.fast.allocator.retain_freed_memory).
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.batches import collate, consecutive_batches, random_batches, target_mask
from benchmarks.steps import loss_step, make_optimizer, ours_step, run_steps
from tsdae.device import native_bf16
from tsdae.model import pool, tsdae_loss
# The ablation rebuilds our step from its pieces, so it reaches inside the model package on purpose.
from tsdae.model.autoencoder import gradient_last
from tsdae.model.fast import decoder as fast_decoder
from tsdae.model.fast import encoder as fast_encoder
from tsdae.model.fast.dropout import use_fast_dropout
from tsdae.model.fast.linear import use_fast_linear
from tsdae.train import Batch

VARIANTS = {  # name: (process, loss variant, length-aware batches, fused AdamW, cross q/k trained, bf16)
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
FAST_LINEAR_LOSSES = ("ours", "compiled")  # from +onednn_fp32_matmul on (tsdae.model.fast.linear)


def variants(compile: bool) -> list[str]:
    """The variants this run measures: +torch_compile only when asked; +bf16_autocast only on a CPU that
    multiplies bf16 natively (elsewhere bf16 is emulated, ~30x slower than fp32, and not what
    train.precision: auto picks)."""
    skip = set() if compile else {"+torch_compile"}
    if not native_bf16(torch.device("cpu")):
        skip.add("+bf16_autocast")
    return [v for v in VARIANTS if v not in skip]


class Ablation:
    """Each change on its own, cumulatively, on a copy of the initial model (same sentences per round).

    The q/k of the cross-attention train in the variants that compute them (as in the reference) and
    are frozen from the single-key variant on.
    """

    def __init__(self, model, noisy, target, pad_id: int, args):
        self.args, self.model, self.pad_id = args, copy.deepcopy(model), pad_id
        model = self.model
        self.cross_qk = fast_decoder.cross_attention_projections(model.decoder)
        trainable = [p for p in model.parameters() if p.requires_grad] + self.cross_qk
        self.optimizers = {f: make_optimizer(trainable, args.lr, fused=f) for f in (False, True)}
        rng = np.random.default_rng(args.seed + 1)
        target_lengths = np.array([len(t) for t in target])
        self.rounds = []  # [(random batches, length-sorted batches)] per round
        for _ in range(args.ablation_rounds):
            rows = rng.choice(len(noisy), args.ablation_steps * args.batch_size, replace=False)
            rand = [collate(noisy, target, b, pad_id) for b in random_batches(rows, args.batch_size, rng)]
            by_length = rows[np.argsort(-target_lengths[rows], kind="stable")]  # the pipeline's window sort
            srt = [collate(noisy, target, b, pad_id) for b in consecutive_batches(by_length, args.batch_size)]
            self.rounds.append((rand, srt))

        def hf_embedding(batch: Batch) -> torch.Tensor:
            """The Hugging Face encoder call and CLS pooling (dense lookup gradients)."""
            hidden = model.encoder(input_ids=batch.noisy_ids, attention_mask=batch.noisy_mask)
            return pool(hidden.last_hidden_state, batch.noisy_mask, "cls")

        def staged(single_key=True, mask=False, packed_decoder=False, packed_encoder=False, sparse=False,
                   tied_gradient_last=False):
            """Our loss with the later optimisations switched on one at a time."""
            def loss(batch: Batch) -> torch.Tensor:
                output_weight = None
                if tied_gradient_last:
                    output_weight = gradient_last(model.decoder.get_output_embeddings().weight)
                if packed_encoder:
                    emb_BH = fast_encoder.encoder_hidden_states(model.encoder, batch.noisy_ids, batch.noisy_mask,
                                                                first_token_only=True, sparse_grad=sparse)
                else:
                    emb_BH = hf_embedding(batch)
                ids, labels = batch.target_ids[:, :-1], batch.target_ids[:, 1:]
                keep = labels != pad_id
                if packed_decoder:
                    hidden = fast_decoder.decoder_label_states(model.decoder, emb_BH, ids, keep, sparse_grad=sparse)
                else:
                    decoder_mask = target_mask(batch, pad_id)[:, :-1] if mask else None
                    hidden = fast_decoder.decoder_hidden_states(model.decoder, emb_BH, ids, decoder_mask,
                                                                single_key_cross_attention=single_key,
                                                                sparse_grad=sparse)[keep]
                logits = fast_decoder.label_logits(model.decoder, hidden, output_weight)
                return F.cross_entropy(logits, labels[keep])
            return loss

        def plain(batch: Batch) -> torch.Tensor:
            return tsdae_loss(model.decoder, hf_embedding(batch), batch.target_ids, pad_id, fast=False)

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
        }
        self.compiled = torch.compile(model, dynamic=True) if args.compile else None

    def step(self, loss_name: str, fused: bool, bf16: bool):
        optimizer = self.optimizers[fused]
        if loss_name in ("ours", "ours_mkl"):  # ours_mkl: with nn.Linear, i.e. torch's own (MKL) products
            return ours_step(self.model, optimizer, bf16)
        if loss_name == "compiled":
            return ours_step(self.compiled, optimizer, bf16)
        autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else None
        return loss_step(self.losses[loss_name], optimizer, autocast)

    def run(self, rnd: int, name: str, warmup: int = 1) -> float:
        """Sentences/s of one variant on round rnd's sentences (the same for every variant)."""
        _, loss_name, sorted_batches, fused, train_qk, bf16 = VARIANTS[name]
        for p in self.cross_qk:
            p.requires_grad_(train_qk)
        rand, srt = self.rounds[rnd]
        batches = srt if sorted_batches else rand
        use_fast_dropout(self.model, fast=loss_name in FAST_DROPOUT_LOSSES)
        use_fast_linear(self.model, fast=loss_name in FAST_LINEAR_LOSSES)
        self.model.train()
        step = self.step(loss_name, fused, bf16)
        run_steps(step, batches[:warmup])
        seconds, _ = run_steps(step, batches[warmup:])
        for p in self.cross_qk:
            p.requires_grad_(False)
        return sum(b.rows for b in batches[warmup:]) / seconds
