"""Corrupt and tokenize a batch: the callable class that Ray Data runs in a pool of actors."""

from __future__ import annotations

from itertools import chain

import numpy as np
import pyarrow as pa

from pipeline.config import CorruptConfig
from pipeline.noise import delete_words

TOKEN_LIST = pa.list_(pa.int32())


class CorruptAndTokenize:
    """Batch in: ``text`` (string), ``row_key`` (uint64) and, when built with ``epoch=None``, ``epoch``
    (int64). Batch out: ``row_key`` (uint64), ``epoch`` (int64), ``noisy_ids`` and ``target_ids``
    (list<int32>, variable length, unpadded, ``[CLS] ... [SEP]`` as the tokenizer adds them, at most
    cfg.max_length tokens).

    target = the original text; noisy = delete_words(text) keyed by (cfg.seed, epoch, row_key).
    epoch: the epoch of every row, or None to read it per row from the batch (one actor pool then
    serves all epochs of a multi-epoch stream, see pipeline.dataset).
    The tokenizer is loaded once per instance (once per actor); each column is one batched call.
    """

    def __init__(self, tokenizer_path: str, cfg: CorruptConfig, epoch: int | None = None):
        from transformers import AutoTokenizer

        self.cfg = cfg
        self.epoch = epoch
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
        if not self.tokenizer.is_fast:
            raise ValueError(f"{tokenizer_path}: need a fast (Rust) tokenizer for batched encoding")

    def __call__(self, batch: pa.Table | dict) -> dict[str, pa.Array]:
        texts = _to_list(batch["text"])
        row_keys = np.asarray(_to_numpy(batch["row_key"]), dtype=np.uint64)
        if self.epoch is None:
            epochs = np.asarray(_to_numpy(batch["epoch"]), dtype=np.int64)
        else:
            epochs = np.full(len(texts), self.epoch, dtype=np.int64)
        noisy = delete_words(texts, row_keys, seed=self.cfg.seed, epoch=epochs, del_ratio=self.cfg.del_ratio)
        return {
            "row_key": pa.array(row_keys, type=pa.uint64()),
            "epoch": pa.array(epochs, type=pa.int64()),
            "noisy_ids": self._tokenize(noisy),
            "target_ids": self._tokenize(texts),
        }

    def _tokenize(self, texts: list[str]) -> pa.ListArray:
        ids = self.tokenizer(
            texts,
            add_special_tokens=True,
            truncation=True,
            max_length=self.cfg.max_length,
            return_attention_mask=False,
            return_token_type_ids=False,
            # Corpus text is data, never markup: a literal "[PAD]" or "[SEP]" in a sentence must not become
            # a special token (a pad id mid-row would break the right-padding contract of pad_batch).
            split_special_tokens=True,
        )["input_ids"]
        return token_lists(ids)


def token_lists(ids: list[list[int]]) -> pa.ListArray:
    """Python lists of token ids -> one arrow list<int32> array, built from flat values and offsets."""
    lengths = np.fromiter(map(len, ids), dtype=np.int32, count=len(ids))
    offsets = np.zeros(len(ids) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    values = np.fromiter(chain.from_iterable(ids), dtype=np.int32, count=int(offsets[-1]))
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values), type=TOKEN_LIST)


def _to_list(column) -> list:
    if isinstance(column, (pa.Array, pa.ChunkedArray)):
        return column.to_pylist()
    return list(column)


def _to_numpy(column) -> np.ndarray:
    if isinstance(column, (pa.Array, pa.ChunkedArray)):
        return column.to_numpy()
    return np.asarray(column)
