"""Typed configs of the corpus stage: where to read, how to corrupt and tokenize."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ReadConfig:
    """Where the corpus is and which column holds the sentences.

    uri: any fsspec/pyarrow URI of parquet data: a file, a directory, a glob (local, s3://, gs://,
    memory://), or a list of them.
    """

    uri: str | list[str] = "data/corpus/demo.parquet"
    text_column: str = "text"

    def __post_init__(self):
        if not self.uri:
            raise ValueError("read.uri must name a parquet file, directory or glob")
        if not self.text_column:
            raise ValueError("read.text_column must not be empty")


@dataclass(frozen=True)
class CorruptConfig:
    """TSDAE input noise and tokenization.

    del_ratio: fraction of words *deleted* (the paper's 0.6), per word, at least one word kept.
    seed: the noise for a sentence is a pure function of (seed, epoch, row key).
    max_length: token cap for both the noisy input and the reconstruction target.
    """

    del_ratio: float = 0.6
    seed: int = 0
    max_length: int = 128

    def __post_init__(self):
        if not 0.0 <= self.del_ratio < 1.0:
            raise ValueError(f"corrupt.del_ratio must be in [0, 1), got {self.del_ratio}")
        if self.max_length < 4:
            raise ValueError(f"corrupt.max_length must be >= 4, got {self.max_length}")
