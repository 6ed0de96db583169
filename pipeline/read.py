"""Read the corpus: list and validate the parquet files up front, then stream (text, row_key) rows.

Validation happens when the pipeline is built, before anything streams: a bad file fails the job in
seconds with its name, not an hour into training inside a Ray task. Only parquet footers are read.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from hashlib import blake2b

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
from ray.data.aggregate import Sum

from pipeline.config import ReadConfig

STATS_COLUMNS = ("rows_read", "dropped_null", "dropped_empty")
_GLOB_CHARS = "*?["
_LOCAL_PROTOCOLS = {"file", "local"}


class CorpusError(ValueError):
    """The corpus cannot be read: no files, an unreadable file, or no string text column."""


def read_corpus(cfg: ReadConfig) -> ray.data.Dataset:
    """Stream the corpus as rows ``text`` (string) and ``row_key`` (uint64).

    Null, empty and whitespace-only texts are dropped; kept texts are passed through unchanged.
    row_key is the first 8 bytes (little-endian) of blake2b over the UTF-8 text: a pure function of the
    sentence, so it survives re-reads, re-sharding, a different file split and other Python, pandas or
    Ray versions (pandas' hash_array would also be stable in practice, but its algorithm is not a
    documented contract). A sentence that occurs twice gets the same key and so the same noise in an
    epoch, which is harmless: the two rows are the same training example anyway.
    Raises CorpusError at build time if a file is missing the column, has a non-string one, is not
    readable parquet, or if the URI matches no parquet file.
    """
    paths, filesystem = list_corpus_files(cfg.uri)
    validate_schemas(paths, filesystem, cfg.text_column)
    return _read_text_column(paths, filesystem, cfg.text_column).map_batches(
        _clean_and_key,
        batch_format="pyarrow",
        batch_size=None,  # whole blocks: filtering is zero-copy, no re-batching needed
        fn_kwargs={"text_column": cfg.text_column},
    )


def corpus_stats(cfg: ReadConfig) -> dict[str, int]:
    """Count rows_read, dropped_null, dropped_empty (empty or whitespace-only) and rows_kept.

    One streaming Ray Data aggregation over the text column only; the corpus is never materialized.
    Validates the files first, like read_corpus.
    """
    paths, filesystem = list_corpus_files(cfg.uri)
    validate_schemas(paths, filesystem, cfg.text_column)
    counts = _read_text_column(paths, filesystem, cfg.text_column).map_batches(
        _count_batch, batch_format="pyarrow", batch_size=None, fn_kwargs={"text_column": cfg.text_column}
    )
    sums = counts.aggregate(*(Sum(c, alias_name=c) for c in STATS_COLUMNS))
    stats = {c: int((sums or {}).get(c) or 0) for c in STATS_COLUMNS}  # an empty corpus sums to None
    stats["rows_kept"] = stats["rows_read"] - stats["dropped_null"] - stats["dropped_empty"]
    return stats


def list_corpus_files(uri: str | list[str]) -> tuple[list[str], pafs.FileSystem]:
    """Expand a file, directory, glob or list of them into parquet file paths, with one filesystem.

    Directories are searched recursively for ``*.parquet``, skipping ``_*``/``.*`` entries (``_SUCCESS``,
    ``_metadata``); globs and directories are sorted so every rerun sees the files in the same order.
    Paths are returned without the protocol, relative to the returned pyarrow filesystem, which is the
    native local one for local paths and fsspec's (wrapped for pyarrow) for anything else.
    """
    uris = [uri] if isinstance(uri, str) else list(uri)
    fs, paths, seen = None, [], set()
    for one in uris:
        one_fs, path = fsspec.core.url_to_fs(one)
        if fs is not None and one_fs.protocol != fs.protocol:
            raise CorpusError(f"corpus URIs mix filesystems ({fs.protocol} and {one_fs.protocol}): {uris}")
        fs = one_fs
        if any(c in path for c in _GLOB_CHARS):
            found = sorted(p for p in fs.glob(path) if fs.isfile(p))
        elif fs.isdir(path):
            found = sorted(p for p in fs.find(path) if _is_data_file(p[len(path):]))
        elif fs.isfile(path):
            found = [path]
        else:
            found = []
        if not found:
            raise CorpusError(f"no parquet files found at {one!r}")
        for p in found:  # a file named twice (a dir and a glob over it) is read once
            if p not in seen:
                seen.add(p)
                paths.append(p)
    protocols = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
    if protocols & _LOCAL_PROTOCOLS:
        return paths, pafs.LocalFileSystem()
    return paths, pafs.PyFileSystem(pafs.FSSpecHandler(fs))


def validate_schemas(paths: list[str], filesystem: pafs.FileSystem, text_column: str) -> None:
    """Read every file's footer and check that text_column exists and holds strings.

    Footers are read by 16 threads: on object stores a footer is one small ranged GET per file.
    """
    def check(path: str) -> None:
        try:
            schema = pq.read_schema(path, filesystem=filesystem)
        except (pa.ArrowException, OSError) as e:
            raise CorpusError(f"{path}: not a readable parquet file ({e})") from e
        columns = ", ".join(f"{f.name}: {f.type}" for f in schema)
        if text_column not in schema.names:
            raise CorpusError(f"{path}: no column {text_column!r}; its columns are [{columns}]")
        text_type = schema.field(text_column).type
        if not (pa.types.is_string(text_type) or pa.types.is_large_string(text_type)
                or pa.types.is_string_view(text_type)):
            raise CorpusError(
                f"{path}: column {text_column!r} is {text_type}, expected a string; "
                f"its columns are [{columns}]"
            )

    with ThreadPoolExecutor(max_workers=min(16, len(paths))) as pool:
        list(pool.map(check, paths))  # re-raises the first CorpusError in path order


def _is_data_file(relative: str) -> bool:
    parts = [p for p in relative.split("/") if p]
    return bool(parts) and parts[-1].endswith(".parquet") and not any(p[0] in "_." for p in parts)


def _read_text_column(paths: list[str], filesystem: pafs.FileSystem, text_column: str) -> ray.data.Dataset:
    # Exactly the files validated above: no extension filter, no hive partition columns. Ray 2.60
    # deprecates read_parquet(columns=) for select_columns, which its optimizer pushes into the read.
    return ray.data.read_parquet(
        paths, filesystem=filesystem, file_extensions=None, partitioning=None
    ).select_columns([text_column])


def _null_and_blank(text: pa.ChunkedArray | pa.Array) -> tuple[pa.Array, pa.Array]:
    """Two boolean masks without nulls: the text is null; the text is empty or only whitespace."""
    is_null = pc.is_null(text)
    is_blank = pc.fill_null(pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(text)), 0), False)
    return is_null, is_blank


def _clean_and_key(table: pa.Table, text_column: str) -> pa.Table:
    """Block in: text_column (string). Block out: text (string), row_key (uint64), blank rows dropped."""
    text = table.column(text_column).cast(pa.string())
    is_null, is_blank = _null_and_blank(text)
    text = text.filter(pc.invert(pc.or_(is_null, is_blank)))
    digests = b"".join(blake2b(t.encode("utf-8"), digest_size=8).digest() for t in text.to_pylist())
    row_key = np.frombuffer(digests, dtype="<u8").astype(np.uint64)
    return pa.table({"text": text, "row_key": pa.array(row_key, type=pa.uint64())})


def _count_batch(table: pa.Table, text_column: str) -> pa.Table:
    """Block in: text_column. Block out: one row of counts (STATS_COLUMNS, int64)."""
    text = table.column(text_column)
    is_null, is_blank = _null_and_blank(text)
    counts = [len(text), pc.sum(is_null).as_py() or 0, pc.sum(is_blank).as_py() or 0]
    return pa.table({c: pa.array([n], type=pa.int64()) for c, n in zip(STATS_COLUMNS, counts)})
