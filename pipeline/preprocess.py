"""Corrupt and tokenize a batch: the callable class that Ray Data runs in a pool of actors."""

from __future__ import annotations

import copy

import numpy as np
import pyarrow as pa

from pipeline.batching import length_order
from pipeline.config import CorruptConfig
from pipeline.noise import TokenBatch, corrupt

TOKEN_LIST = pa.list_(pa.int32())


class CorruptAndTokenize:
    """Batch in: ``text`` (string), ``row_key`` (uint64) and, when built with ``epoch=None``, ``epoch``
    (int64). Batch out: ``row_key`` (uint64), ``epoch`` (int64), ``noisy_ids`` and ``target_ids``
    (list<int32>, variable length, unpadded, ``[CLS] ... [SEP]`` as the tokenizer's template adds them,
    at most cfg.max_length tokens).

    target = the original text's tokens; noisy = cfg's noise applied to those tokens word by word
    (whitespace words), keyed by (cfg.seed, epoch, row_key). Both are truncated to max_length *after*
    the noise, exactly as tokenizing the noisy text would. The original is tokenized once, pre-split on
    whitespace, so that every token knows its word.
    length_sort: reorder the rows of each batch by target length, longest first, so that consecutive
    rows (a training batch) have similar lengths (the megabatch sort of Hugging Face's
    LengthGroupedSampler). Rows are never dropped or added.
    epoch: the epoch of every row, or None to read it per row from the batch.
    model_ref: the model whose tokenizer to use, as the config gives it (``package:``, a local path, a hub
    name or a URI). The actor fetches it itself, into its node's model cache (``tsdae.model_cache``): the
    driver's local copy may be on another machine. The tokenizer is loaded once per instance (once per
    actor).
    """

    def __init__(self, model_ref: str, cfg: CorruptConfig, epoch: int | None = None,
                 length_sort: bool = False):
        # Here, not at the top: transformers imports torch (~1.5 s per process), which the actors need for
        # AutoTokenizer but the read tasks, which import this package too, do not.
        from transformers import AutoTokenizer

        from tsdae.model_cache import fetch_model

        self.cfg = cfg
        self.noise = cfg.noise()
        self.epoch = epoch
        self.length_sort = length_sort
        tokenizer = AutoTokenizer.from_pretrained(fetch_model(model_ref))
        if not tokenizer.is_fast:
            raise ValueError(f"{model_ref}: need a fast (Rust) tokenizer for batched encoding")
        # Our own copy of the Rust tokenizer: no padding or truncation (both are ours to do), and corpus
        # text is data, never markup: a literal "[PAD]" or "[SEP]" in a sentence must not become a
        # special token (a pad id mid-row would break the right-padding contract of pad_batch).
        self.backend = copy.deepcopy(tokenizer.backend_tokenizer)
        self.backend.no_padding()
        self.backend.no_truncation()
        self.backend.encode_special_tokens = True
        self.prefix, self.suffix = _template(self.backend)
        special = set(tokenizer.all_special_ids) | set(self.backend.get_added_tokens_decoder())
        vocab = np.arange(self.backend.get_vocab_size(with_added_tokens=False), dtype=np.int32)
        self.candidate_ids = vocab[~np.isin(vocab, np.fromiter(special, dtype=np.int64))]
        self.mask_id = tokenizer.mask_token_id

    def __call__(self, batch: pa.Table | dict) -> dict[str, pa.Array]:
        texts = _to_list(batch["text"])
        row_keys = np.asarray(_to_numpy(batch["row_key"]), dtype=np.uint64)
        if self.epoch is None:
            epochs = np.asarray(_to_numpy(batch["epoch"]), dtype=np.int64)
        else:
            epochs = np.full(len(texts), self.epoch, dtype=np.int64)
        original = self.tokenize_words(texts)
        noisy = corrupt(original, row_keys, seed=self.cfg.seed, epoch=epochs, noise=self.noise,
                        candidate_ids=self.candidate_ids, mask_id=self.mask_id)
        noisy_ids = self.with_specials(noisy)
        target_ids = self.with_specials(original)
        out = {
            "row_key": pa.array(row_keys, type=pa.uint64()),
            "epoch": pa.array(epochs, type=pa.int64()),
            "noisy_ids": noisy_ids,
            "target_ids": target_ids,
        }
        if self.length_sort and len(texts) > 1:
            order = length_order(_lengths(target_ids), _lengths(noisy_ids))
            out = {k: v.take(pa.array(order)) for k, v in out.items()}
        return out

    def tokenize_words(self, texts: list[str]) -> TokenBatch:
        """Content tokens (no specials, no truncation) of each text, split on whitespace first."""
        words = [t.split() for t in texts]
        encodings = self.backend.encode_batch(words, is_pretokenized=True, add_special_tokens=False)
        return TokenBatch.from_lists([e.ids for e in encodings], [e.word_ids for e in encodings],
                                     np.fromiter(map(len, words), dtype=np.int64, count=len(words)))

    def with_specials(self, batch: TokenBatch) -> pa.ListArray:
        """Truncate each row's content to fit max_length with the template, then add the template."""
        return token_lists_with_template(batch.ids, batch.row_lengths(), self.prefix, self.suffix,
                                         self.cfg.max_length)


def token_lists_with_template(ids: np.ndarray, lengths: np.ndarray, prefix: list[int], suffix: list[int],
                              max_length: int) -> pa.ListArray:
    """Rows of content ids (flat ids, per-row lengths) -> list<int32> rows prefix + content + suffix,
    content cut so that a row has at most max_length ids."""
    n = len(lengths)
    cap = max_length - len(prefix) - len(suffix)
    starts = np.cumsum(lengths) - lengths
    position = np.arange(len(ids)) - np.repeat(starts, lengths)
    kept = np.minimum(lengths, cap)
    out_lengths = kept + len(prefix) + len(suffix)
    offsets = np.zeros(n + 1, dtype=np.int32)
    np.cumsum(out_lengths, out=offsets[1:])
    values = np.empty(int(offsets[-1]), dtype=np.int32)
    row_start = offsets[:-1].astype(np.int64)
    for j, token in enumerate(prefix):
        values[row_start + j] = token
    for j, token in enumerate(suffix):
        values[row_start + len(prefix) + kept + j] = token
    keep = position < cap
    values[np.repeat(row_start + len(prefix), lengths)[keep] + position[keep]] = ids[keep]
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values), type=TOKEN_LIST)


def _template(backend) -> tuple[list[int], list[int]]:
    """The special ids the tokenizer puts before and after a single sequence ([CLS] / [SEP] for BERT)."""
    core = backend.encode(["hello"], is_pretokenized=True, add_special_tokens=False).ids
    full = backend.encode(["hello"], is_pretokenized=True, add_special_tokens=True).ids
    for start in range(len(full) - len(core) + 1):
        if full[start:start + len(core)] == core:
            return full[:start], full[start + len(core):]
    raise ValueError("cannot find the tokenizer's special-token template around a single sequence")


def _lengths(column: pa.ListArray) -> np.ndarray:
    return np.diff(column.offsets.to_numpy())


def _to_list(column) -> list:
    if isinstance(column, (pa.Array, pa.ChunkedArray)):
        return column.to_pylist()
    return list(column)


def _to_numpy(column) -> np.ndarray:
    if isinstance(column, (pa.Array, pa.ChunkedArray)):
        return column.to_numpy()
    return np.asarray(column)
