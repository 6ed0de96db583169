"""Typed configs of the corpus stage: where to read, how to corrupt and tokenize."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator

from pipeline.noise import Noise
from tsdae.config import Float, Section

FILTER_OPS = ("==", "!=", ">=", "<=", ">", "<")
_FILTER = re.compile(r"^\s*([A-Za-z_][\w.-]*)\s*(==|!=|>=|<=|>|<)\s*(.+?)\s*$")


class ReadConfig(Section):
    """Where the corpus is, which column holds the sentences, and what to do with bad input.

    uri: any fsspec URI of parquet data: a file, a directory (searched recursively), a glob, or a list
      of them; local paths, s3://, gs:// and the other fsspec protocols whose package is installed.
      Not memory://: an in-memory filesystem lives in one process, and Ray's read tasks run in others.
    text_column: the string column with one sentence per row.
    filters: conditions on hive partition folders (``date=2026-11-01/part-0.parquet``), each
      ``"<column> <op> <value>"`` with op one of == != >= <= > <, e.g. ``["date >= 2026-11-01"]``. Applied
      to the file list before anything is read; values compare as numbers when both sides are numbers,
      else as strings (ISO dates compare correctly as strings). A file without the column is an error.
    on_bad_file: ``fail`` (default): an unreadable or truncated parquet file stops the job, naming it.
      ``skip``: the file is left out and listed with the reason in the corpus stats / run report.
      A missing or non-string text column is always an error: that is a wrong config, not a bad file.
    max_chars: longer texts are cut to this many characters (at a whitespace boundary when there is
      one) and counted as ``truncated``.
    shuffle_rows: the training order. > 0: each epoch reads the files in its own permutation and
      shuffles each file's rows in windows of this many rows,
      so a corpus stored sorted (by class, source or date) is not trained one kind after the other;
      memory: one window of text per read task. 0: file order, as stored. The order is a pure function
      of (shuffle_seed, epoch); the rows of an epoch and every rank's batch count do not change.
    shuffle_seed: seeds the training order (pipeline.shuffle); independent of corrupt.seed.
    """

    uri: str | list[str] = "data/corpus/demo.parquet"
    text_column: str = Field("text", min_length=1)
    filters: list[str] = []
    on_bad_file: Literal["fail", "skip"] = "fail"
    max_chars: int = Field(2000, ge=1)
    shuffle_rows: int = Field(65536, ge=0)
    shuffle_seed: int = 0

    @field_validator("uri")
    @classmethod
    def _check_uri(cls, uri: str | list[str]) -> str | list[str]:
        uris = [uri] if isinstance(uri, str) else uri
        if not uris or not all(uris):
            raise ValueError("must name a parquet file, directory or glob")
        for one in uris:
            if one.startswith("memory://"):
                raise ValueError(f"{one!r}: memory:// is in-process and Ray reads run in other processes; "
                                 "write the corpus to a local path or an object store")
        return uri

    @field_validator("filters")
    @classmethod
    def _check_filters(cls, filters: list[str]) -> list[str]:
        for f in filters:
            parse_filter(f)
        return filters

    def parsed_filters(self) -> list[tuple[str, str, str]]:
        return [parse_filter(f) for f in self.filters]


def parse_filter(text: str) -> tuple[str, str, str]:
    """``"date >= 2026-11-01"`` -> ("date", ">=", "2026-11-01"); quotes around the value are dropped."""
    m = _FILTER.match(text)
    if not m:
        raise ValueError(f"read.filters: cannot parse {text!r}; expected '<column> <op> <value>' with op "
                         f"one of {FILTER_OPS}")
    column, op, value = m.groups()
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        value = value[1:-1]
    return column, op, value


class CorruptConfig(Section):
    """TSDAE input noise, tokenization and length grouping.

    del_ratio: fraction of words *deleted* (the paper's 0.6), per word, at least one word kept.
    substitute_ratio, mask_ratio, swap_ratio, insert_ratio: the paper's other noise types, per word,
      0 = off; any combination with deletion (see pipeline.noise.Noise for the order and contracts).
    seed: the noise for a sentence is a pure function of (seed, epoch, row key).
    max_length: token cap for both the noisy input and the reconstruction target.
    length_window: length-aware batching: rows are sorted by token length in windows of
      length_window × batch_size rows, so a training batch holds sentences of similar length
      (little padding); 0 turns it off. Needs the batch size (build_train_dataset(batch_size=...)).
    """

    del_ratio: Float = Field(0.6, ge=0.0, lt=1.0)
    substitute_ratio: Float = Field(0.0, ge=0.0, lt=1.0)
    mask_ratio: Float = Field(0.0, ge=0.0, lt=1.0)
    swap_ratio: Float = Field(0.0, ge=0.0, lt=1.0)
    insert_ratio: Float = Field(0.0, ge=0.0, lt=1.0)
    seed: int = 0
    max_length: int = Field(128, ge=4)
    length_window: int = Field(32, ge=0)

    def noise(self) -> Noise:
        return Noise(delete=self.del_ratio, substitute=self.substitute_ratio, mask=self.mask_ratio,
                     swap=self.swap_ratio, insert=self.insert_ratio)
