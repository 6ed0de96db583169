"""TSDAE input noise: pure, Ray-free batch functions with derived (never global) randomness.

The uniform that decides word j of a row is a pure function of (seed, epoch, row_key, j): a SplitMix64
stream keyed by the row (https://prng.di.unimi.it/splitmix64.c), evaluated for all words of a batch at
once with wrap-around uint64 arithmetic in numpy. So a sentence gets the same noise whatever batch,
block, file split or actor it lands in, fresh noise every epoch, and the same noise after a restart.

Two levels: delete_words works on text (the reference semantics, kept for tests and inspection);
TokenBatch and delete/substitute/mask/swap/insert work on the token ids of the original sentence and
are what the corpus stage runs. Every function takes its uniforms explicitly (draw() derives them).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain, compress, islice

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)  # SplitMix64's increment (2^64 / golden ratio)
_MUL1 = np.uint64(0xBF58476D1CE4E5B9)
_MUL2 = np.uint64(0x94D049BB133111EB)
_DOMAIN = np.uint64(0x7453_4441_455F_6E7A)  # "tSDAE_nz": keeps these streams apart from other uses
_MASK64 = (1 << 64) - 1


def mix64(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finalizer: a bijection on uint64 that spreads every input bit over the output."""
    z = (z ^ (z >> np.uint64(30))) * _MUL1
    z = (z ^ (z >> np.uint64(27))) * _MUL2
    return z ^ (z >> np.uint64(31))


def row_streams(row_keys: np.ndarray, *, seed: int, epoch: int | np.ndarray) -> np.ndarray:
    """The per-row SplitMix64 state for (seed, epoch, row_key); uint64, one per row.

    epoch: an int for the whole batch, or one per row (a batch that straddles two epochs).
    """
    with np.errstate(over="ignore"):
        seed_key = mix64(np.uint64(seed & _MASK64) ^ _DOMAIN)
        epoch_u64 = np.asarray(epoch).astype(np.uint64)
        epoch_key = mix64(seed_key + _GOLDEN * (epoch_u64 + np.uint64(1)))
        return mix64(np.asarray(row_keys, dtype=np.uint64) ^ epoch_key)


def word_uniforms(streams: np.ndarray, word_index: np.ndarray) -> np.ndarray:
    """Uniform [0, 1) doubles: output number word_index+1 of each row's SplitMix64 stream.

    streams: uint64 per word (the row's stream, repeated); word_index: int per word.
    """
    with np.errstate(over="ignore"):
        state = streams + _GOLDEN * (word_index.astype(np.uint64) + np.uint64(1))
        return (mix64(state) >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def delete_words(
    texts: list[str],
    row_keys: np.ndarray,
    *,
    seed: int,
    epoch: int | np.ndarray,
    del_ratio: float,
) -> list[str]:
    """Delete each whitespace-separated word independently with probability del_ratio.

    Contract: texts[i] is keyed by row_keys[i] (uint64). Word order is kept, kept words are joined with
    single spaces, and at least one word survives: if every word of a row draws "delete", the word with
    the largest uniform is kept (the same draws decide it, no extra randomness). A text without words
    becomes "". As in the TSDAE reference (sentence-transformers' DenoisingAutoEncoderDataset), words are
    dropped independently, so the deleted fraction is del_ratio on average, not exactly per sentence;
    unlike it we split on whitespace (not nltk) and never touch global random state.

    >>> delete_words(["a b c d"], np.array([7], np.uint64), seed=0, epoch=0, del_ratio=0.0)
    ['a b c d']
    """
    if len(texts) != len(row_keys):
        raise ValueError(f"{len(texts)} texts but {len(row_keys)} row keys")
    if not texts:
        return []
    words_per_row = [t.split() for t in texts]
    counts = np.fromiter(map(len, words_per_row), dtype=np.int64, count=len(texts))
    words = list(chain.from_iterable(words_per_row))
    n_rows, n_words = len(texts), len(words)
    if n_words == 0:
        return [""] * n_rows

    row_of_word = np.repeat(np.arange(n_rows), counts)  # int per word
    starts = np.cumsum(counts) - counts  # first word of each row in the flat arrays
    word_index = np.arange(n_words) - starts[row_of_word]
    streams = row_streams(row_keys, seed=seed, epoch=epoch)
    u = word_uniforms(streams[row_of_word], word_index)
    keep = u >= del_ratio  # P(delete) = P(u < del_ratio) = del_ratio; del_ratio=0 keeps every word

    # At least one word: rows with words but nothing kept keep their largest-u word.
    kept_per_row = np.bincount(row_of_word, weights=keep, minlength=n_rows)
    rescue = (kept_per_row == 0) & (counts > 0)
    if rescue.any():
        nonempty = counts > 0
        row_max = np.full(n_rows, -1.0)
        row_max[nonempty] = np.maximum.reduceat(u, starts[nonempty])
        candidates = np.flatnonzero(rescue[row_of_word] & (u == row_max[row_of_word]))
        _, first = np.unique(row_of_word[candidates], return_index=True)  # one per row, ties -> first
        keep[candidates[first]] = True
        kept_per_row = np.bincount(row_of_word, weights=keep, minlength=n_rows)

    kept_words = compress(words, keep.tolist())
    return [" ".join(islice(kept_words, k)) for k in kept_per_row.astype(np.int64).tolist()]



# ---------------------------------------------------------------------------------------------------
# Token-level noise: the same word-level decisions, applied to the token ids of the original sentence.
#
# Tokenizing once and deriving the noisy ids from the original's ids (instead of tokenizing the noisy
# text a second time) is what makes the corpus stage fast: 19,800 sentences per CPU-second for deletion
# + tokenization of the real corpus, vs 3,800 for the reference's nltk path (benchmarks/corpus.py).
# For deletion it is exact: words are whitespace words (the tokenizer sees them pre-split), and deleting
# a word's tokens equals tokenizing the text without that word (tests/test_noise.py checks it against
# delete_words + the tokenizer, punctuation, accents and literal "[SEP]" included).

# One independent stream per decision, so enabling one noise type never changes another's draws.
_KIND = {name: np.uint64(k) for name, k in (
    ("substitute", 0x5B57_1D00_0000_0001), ("substitute_id", 0x5B57_1D00_0000_0002),
    ("mask", 0x3A5C_0000_0000_0003), ("swap", 0x53A9_0000_0000_0004), ("swap_order", 0x53A9_0000_0000_0005),
    ("insert", 0x1A5E_0000_0000_0006), ("insert_id", 0x1A5E_0000_0000_0007),
)}


@dataclass(frozen=True)
class Noise:
    """The paper's noise types, each a per-word probability; any combination (applied in this order).

    delete: each word is removed (at least one word with tokens is kept).
    substitute: each word becomes one random non-special token.
    mask: each word becomes one mask token (the only special token noise ever adds).
    swap: each word is picked, and the picked words of a sentence are shuffled among their positions.
    insert: a random non-special token is inserted after each word.
    """

    delete: float = 0.6
    substitute: float = 0.0
    mask: float = 0.0
    swap: float = 0.0
    insert: float = 0.0  # each in [0, 1): pipeline.config.CorruptConfig validates them


@dataclass(frozen=True)
class TokenBatch:
    """The content tokens of a batch of rows (no special tokens), each tagged with its whitespace word.

    ids: int32[T], rows one after another, each row's tokens in order.
    word: int64[T], the word each token belongs to (an index into word_row/word_pos); a word's tokens
      are contiguous. A word may have no tokens (e.g. only control characters).
    word_row: int64[W], the row of each word; word_pos: int64[W], its position among the row's words in
      the original sentence (what the random draws are keyed by).
    """

    ids: np.ndarray
    word: np.ndarray
    word_row: np.ndarray
    word_pos: np.ndarray
    n_rows: int

    @classmethod
    def from_lists(cls, ids_per_row: list[list[int]], word_ids_per_row: list[list[int]],
                   words_per_row: np.ndarray) -> TokenBatch:
        """From a tokenizer's per-row ids and word ids (word index within the row, one per token)."""
        words_per_row = np.asarray(words_per_row, dtype=np.int64)
        n_rows = len(words_per_row)
        tokens_per_row = np.fromiter(map(len, ids_per_row), dtype=np.int64, count=n_rows)
        n_tokens = int(tokens_per_row.sum())
        ids = np.fromiter(chain.from_iterable(ids_per_row), dtype=np.int32, count=n_tokens)
        local = np.fromiter(chain.from_iterable(word_ids_per_row), dtype=np.int64, count=n_tokens)
        first_word = np.cumsum(words_per_row) - words_per_row
        word = np.repeat(first_word, tokens_per_row) + local
        word_row = np.repeat(np.arange(n_rows), words_per_row)
        word_pos = np.arange(len(word_row)) - first_word[word_row]
        return cls(ids, word, word_row, word_pos, n_rows)

    def row_lengths(self) -> np.ndarray:
        return np.bincount(self.word_row[self.word], minlength=self.n_rows)

    def rows(self) -> list[list[int]]:
        """The ids of each row as Python lists (for tests and inspection)."""
        ends = np.cumsum(self.row_lengths())
        return [a.tolist() for a in np.split(self.ids, ends[:-1])] if self.n_rows else []

    def _take(self, index: np.ndarray) -> TokenBatch:
        return TokenBatch(self.ids[index], self.word[index], self.word_row, self.word_pos, self.n_rows)


def draw(streams: np.ndarray, batch: TokenBatch, kind: str | None = None) -> np.ndarray:
    """One uniform [0, 1) per word of batch: a pure function of (row stream, word position, kind).

    kind=None is the stream delete_words uses, so token deletion and text deletion make the same choices.
    """
    if kind is None:
        row_stream = streams
    else:
        with np.errstate(over="ignore"):
            row_stream = mix64(streams ^ _KIND[kind])
    return word_uniforms(row_stream[batch.word_row], batch.word_pos)


def delete(batch: TokenBatch, u: np.ndarray, ratio: float) -> TokenBatch:
    """Drop the tokens of every word with u < ratio; where that empties a row that had tokens, keep its
    word with tokens and the largest u (delete_words' rule: the same word whenever that word has tokens)."""
    keep_word = u >= ratio
    has_tokens = np.bincount(batch.word, minlength=len(u)) > 0
    kept_per_row = np.bincount(batch.word_row, weights=keep_word & has_tokens, minlength=batch.n_rows)
    rows_with_tokens = np.bincount(batch.word_row, weights=has_tokens, minlength=batch.n_rows) > 0
    rescue = (kept_per_row == 0) & rows_with_tokens
    if rescue.any():
        candidates = np.flatnonzero(rescue[batch.word_row] & has_tokens)
        # Largest u first within each row, then the first row entry is that row's winner.
        order = np.lexsort((-u[candidates], batch.word_row[candidates]))
        ranked = candidates[order]
        _, first = np.unique(batch.word_row[ranked], return_index=True)
        keep_word = keep_word.copy()
        keep_word[ranked[first]] = True
    return batch._take(keep_word[batch.word])


def substitute(batch: TokenBatch, u: np.ndarray, ratio: float, new_ids: np.ndarray) -> TokenBatch:
    """Every word with u < ratio becomes a single token, new_ids[word] (int32 per word)."""
    picked = (u < ratio)[batch.word]
    first = np.ones(len(batch.ids), dtype=bool)
    first[1:] = batch.word[1:] != batch.word[:-1]
    out = batch._take(~picked | first)
    ids = out.ids.copy()
    hit = (u < ratio)[out.word]
    ids[hit] = new_ids[out.word[hit]]
    return TokenBatch(ids, out.word, out.word_row, out.word_pos, out.n_rows)


def mask(batch: TokenBatch, u: np.ndarray, ratio: float, mask_id: int) -> TokenBatch:
    """Every word with u < ratio becomes one mask token."""
    return substitute(batch, u, ratio, np.full(len(u), mask_id, dtype=np.int32))


def swap(batch: TokenBatch, u: np.ndarray, ratio: float, u_order: np.ndarray) -> TokenBatch:
    """Words with u < ratio are shuffled among their own positions within the row (by u_order);
    every other word stays where it is. A word's tokens move together."""
    first = np.ones(len(batch.ids), dtype=bool)
    first[1:] = batch.word[1:] != batch.word[:-1]
    sequence = batch.word[first]  # words that have tokens, in the current order
    slots = np.flatnonzero(u[sequence] < ratio)
    if slots.size < 2:
        return batch
    picked = sequence[slots]
    shuffled = picked[np.lexsort((u_order[picked], batch.word_row[picked]))]  # stays within each row
    new_sequence = sequence.copy()
    new_sequence[slots] = shuffled
    rank = np.empty(len(u), dtype=np.int64)
    rank[new_sequence] = np.arange(len(new_sequence))
    return batch._take(np.argsort(rank[batch.word], kind="stable"))


def insert(batch: TokenBatch, u: np.ndarray, ratio: float, new_ids: np.ndarray) -> TokenBatch:
    """After every word (with tokens) with u < ratio, insert the token new_ids[word]; it counts as part
    of that word from then on."""
    last = np.ones(len(batch.ids), dtype=bool)
    last[:-1] = batch.word[1:] != batch.word[:-1]
    after = np.flatnonzero(last & (u < ratio)[batch.word])
    words = batch.word[after]
    at = after + 1
    return TokenBatch(np.insert(batch.ids, at, new_ids[words]), np.insert(batch.word, at, words),
                      batch.word_row, batch.word_pos, batch.n_rows)


def random_ids(u: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """Map uniforms to ids drawn uniformly from candidates (int32)."""
    return candidates[np.minimum((u * len(candidates)).astype(np.int64), len(candidates) - 1)]


def corrupt(batch: TokenBatch, row_keys: np.ndarray, *, seed: int, epoch: int | np.ndarray, noise: Noise,
            candidate_ids: np.ndarray, mask_id: int | None) -> TokenBatch:
    """All enabled noise types, in Noise's order, each with its own draws keyed by (seed, epoch, row_key).

    candidate_ids: the ids substitution and insertion may draw (the tokenizer's non-special ids).
    """
    streams = row_streams(row_keys, seed=seed, epoch=epoch)
    if noise.delete:
        batch = delete(batch, draw(streams, batch), noise.delete)
    if noise.substitute:
        batch = substitute(batch, draw(streams, batch, "substitute"), noise.substitute,
                           random_ids(draw(streams, batch, "substitute_id"), candidate_ids))
    if noise.mask:
        if mask_id is None:
            raise ValueError("mask noise needs a tokenizer with a mask token")
        batch = mask(batch, draw(streams, batch, "mask"), noise.mask, mask_id)
    if noise.swap:
        batch = swap(batch, draw(streams, batch, "swap"), noise.swap, draw(streams, batch, "swap_order"))
    if noise.insert:
        batch = insert(batch, draw(streams, batch, "insert"), noise.insert,
                       random_ids(draw(streams, batch, "insert_id"), candidate_ids))
    return batch
