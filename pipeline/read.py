"""Read the corpus: list, filter and check the parquet files up front, then stream clean, keyed rows.

Checks happen when the pipeline is built, before anything streams: a bad file fails the job in seconds
with its name, not an hour into training inside a Ray task. Only parquet footers are read for that.
The rows then come from our own Ray Datasource, one read task per (epoch, file), streaming each file
in record batches of READ_BATCH_ROWS rows (for training, in the order of pipeline.shuffle), so memory is bounded by Ray Data's backpressure however
large the corpus, and a file that turns out to be damaged mid-read is handled by read.on_bad_file.
"""

from __future__ import annotations

import logging
import operator
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from hashlib import blake2b

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from pipeline.config import ReadConfig
from pipeline.shuffle import file_order, window_order
from tsdae.storage import storage_error, storage_failures

log = logging.getLogger(__name__)

DROP_REASONS = ("dropped_null", "dropped_invalid_utf8", "dropped_empty")
COUNTS = ("rows_read", *DROP_REASONS, "truncated", "rows_kept")
# Rows per block out of a read task: ~1 MB of text at the corpus's ~90 characters a sentence.
READ_BATCH_ROWS = 8192
# "Visible": anything but whitespace, separators, control/format characters, combining marks and the
# replacement character; a text without one has no content (and BERT's normalizer would leave it empty).
_VISIBLE = r"[^\s\p{Z}\p{Cc}\p{Cf}\p{Mn}\x{FFFD}]"
_GLOB_CHARS = "*?["
_LOCAL_PROTOCOLS = {"file", "local"}
_OPS = {"==": operator.eq, "!=": operator.ne, ">=": operator.ge, "<=": operator.le, ">": operator.gt,
        "<": operator.lt}
_HIVE = re.compile(r"^([^=/]+)=([^/]*)$")


class CorpusError(ValueError):
    """The corpus cannot be read: no files, an unreadable file, or no string text column."""


@dataclass(frozen=True)
class CorpusFiles:
    """The files a read covers, after filters and checks, and the ones left out with the reason."""

    paths: list[str]
    filesystem: pafs.FileSystem
    skipped: list[dict]  # {"path", "reason"}


def read_corpus(cfg: ReadConfig, *, epochs: list[int] | None = None) -> ray.data.Dataset:
    """Stream the corpus as rows ``text`` (string) and ``row_key`` (uint64), plus ``epoch`` (int64) when
    epochs is given: then the corpus is read once per epoch, epochs in order, each row tagged.

    Rows are cleaned by clean_texts (null, invalid UTF-8 and empty/whitespace-only texts dropped,
    over-long ones cut to max_chars); corpus_stats counts exactly what this drops.
    row_key is the first 8 bytes (little-endian) of blake2b over the UTF-8 of the kept text: a pure
    function of the sentence, so it survives re-reads, re-sharding, a different file split or order and
    other Python, pandas or Ray versions. A sentence that occurs twice gets the same key and so the same
    noise in an epoch, which is harmless: the two rows are the same training example anyway.
    Raises CorpusError at build time if the URI matches no parquet file, a file lacks the column or has
    a non-string one, or (on_bad_file: fail) a file is not readable parquet.
    """
    files = check_corpus(cfg)
    return _read(CorpusSource(files, cfg, epochs=epochs, mode="rows"))


def corpus_stats(cfg: ReadConfig) -> dict:
    """What one epoch reads: ``rows_read``, ``dropped_null``, ``dropped_invalid_utf8``, ``dropped_empty``
    (empty, whitespace-only or no visible character), ``truncated`` (cut to max_chars, kept),
    ``rows_kept``, ``files`` (files read) and ``files_skipped`` (list of {"path", "reason"}).

    One streaming pass over the text column that returns one row of counts per file; the corpus is never
    materialized. Checks the files first, like read_corpus. Every epoch reads the same rows (cleaning
    is deterministic), so these are also the per-epoch numbers.
    """
    files = check_corpus(cfg)
    per_file = _read(CorpusSource(files, cfg, epochs=None, mode="stats")).take_all()
    stats = {c: sum(int(r[c]) for r in per_file) for c in COUNTS}
    skipped = list(files.skipped) + [{"path": r["path"], "reason": r["error"]} for r in per_file if r["error"]]
    stats["files"] = len(files.paths) + len(files.skipped) - len(skipped)
    stats["files_skipped"] = sorted(skipped, key=lambda s: s["path"])
    return stats


def check_corpus(cfg: ReadConfig) -> CorpusFiles:
    """List the files (applying cfg.filters), read every footer and check the text column."""
    paths, filesystem = list_corpus_files(cfg.uri, cfg.parsed_filters())
    good, skipped = validate_schemas(paths, filesystem, cfg.text_column, cfg.on_bad_file)
    if not good:
        raise CorpusError(f"no readable parquet file at {cfg.uri!r}; skipped: {skipped}")
    return CorpusFiles(good, filesystem, skipped)


def _list_files(fs, path: str) -> list[str]:
    """The data files a file, directory or glob path names (sorted), [] if none."""
    if any(c in path for c in _GLOB_CHARS):
        return sorted(p for p in fs.glob(path) if fs.isfile(p))
    if fs.isdir(path):
        return sorted(p for p in fs.find(path) if _is_data_file(p[len(path):]))
    return [path] if fs.isfile(path) else []


def list_corpus_files(uri: str | list[str], filters: list[tuple[str, str, str]] = ()
                      ) -> tuple[list[str], pafs.FileSystem]:
    """Expand a file, directory, glob or list of them into parquet file paths, with one filesystem.

    Directories are searched recursively for ``*.parquet``, skipping ``_*``/``.*`` entries (``_SUCCESS``,
    ``_metadata``); globs and directories are sorted so every rerun sees the files in the same order.
    filters: (column, op, value) conditions on the ``column=value`` folders of each path (hive layout).
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
        with storage_failures(one):
            found = _list_files(fs, path)
        if not found:
            raise CorpusError(f"no parquet files found at {one!r}")
        found = [p for p in found if _partition_matches(p, filters)]
        if not found:
            raise CorpusError(f"no parquet file at {one!r} passes the filters {filters}")
        for p in found:  # a file named twice (a dir and a glob over it) is read once
            if p not in seen:
                seen.add(p)
                paths.append(p)
    protocols = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
    if protocols & _LOCAL_PROTOCOLS:
        return paths, pafs.LocalFileSystem()
    return paths, pafs.PyFileSystem(pafs.FSSpecHandler(fs))


def partition_values(path: str) -> dict[str, str]:
    """The hive partition columns of a path: ``a/date=2026-11-01/lang=en/x.parquet`` -> {date:…, lang:…}."""
    return {m.group(1): m.group(2) for part in path.split("/")[:-1] if (m := _HIVE.match(part))}


@dataclass(frozen=True)
class Partition:
    """One hive partition ``<key>=<value>/`` directly under a corpus root; files are (path relative to the
    partition folder, bytes), sorted."""

    name: str
    value: str
    uri: str
    files: tuple[tuple[str, int], ...]


def list_partitions(root_uri: str, key: str) -> list[Partition]:
    """Every ``<key>=<value>`` folder directly under root_uri that holds at least one parquet data file
    (the same files a read of it would take), sorted by value. Raises CorpusError if root_uri is not a
    folder, StorageError if the store fails."""
    fs, root = fsspec.core.url_to_fs(root_uri)
    root = root.rstrip("/")
    with storage_failures(root_uri):
        listing = fs.find(root, detail=True) if fs.isdir(root) else None
    if listing is None:
        raise CorpusError(f"no partition folder at {root_uri!r}")
    files: dict[str, list[tuple[str, int]]] = {}
    for path, info in listing.items():
        relative = path[len(root) + 1:]
        folder, _, inside = relative.partition("/")
        if inside and _is_data_file(inside) and key in partition_values(f"{folder}/x"):
            files.setdefault(folder, []).append((inside, int(info["size"])))
    partitions = [Partition(folder, partition_values(f"{folder}/x")[key], f"{root_uri.rstrip('/')}/{folder}",
                            tuple(sorted(found))) for folder, found in files.items()]
    return sorted(partitions, key=lambda p: p.value)


def _partition_matches(path: str, filters) -> bool:
    if not filters:
        return True
    values = partition_values(path)
    for column, op, wanted in filters:
        if column not in values:
            raise CorpusError(f"{path}: filter on {column!r}, but its partition columns are {sorted(values)}")
        have = values[column]
        try:
            have_cmp, wanted_cmp = float(have), float(wanted)
        except ValueError:
            have_cmp, wanted_cmp = have, wanted
        if not _OPS[op](have_cmp, wanted_cmp):
            return False
    return True


def validate_schemas(paths: list[str], filesystem: pafs.FileSystem, text_column: str,
                     on_bad_file: str = "fail") -> tuple[list[str], list[dict]]:
    """Read every file's footer and check that text_column exists and holds strings.

    Returns (good paths in order, skipped [{"path", "reason"}]). An unreadable footer raises CorpusError
    with on_bad_file="fail" and is skipped with "skip"; a missing or non-string column always raises.
    Footers are read by 16 threads: on object stores a footer is one small ranged GET per file.
    """
    def check(path: str) -> str | None:
        try:
            schema = pq.read_schema(path, filesystem=filesystem)
        except Exception as e:
            if failed := storage_error(path, e):  # never "bad parquet", never skipped
                raise failed from e
            if not isinstance(e, (pa.ArrowException, OSError)):
                raise
            reason = f"not a readable parquet file ({e})"
            if on_bad_file == "fail":
                raise CorpusError(f"{path}: {reason}") from e
            return reason
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
        return None

    with ThreadPoolExecutor(max_workers=max(1, min(16, len(paths)))) as pool:
        reasons = list(pool.map(check, paths))  # re-raises the first CorpusError in path order
    good = [p for p, r in zip(paths, reasons) if r is None]
    skipped = [{"path": p, "reason": r} for p, r in zip(paths, reasons) if r is not None]
    for s in skipped:
        log.warning("skipping %s: %s", s["path"], s["reason"])
    return good, skipped


def clean_texts(text: pa.Array | pa.ChunkedArray, max_chars: int) -> tuple[pa.Array, dict[str, int]]:
    """Pure: a string column -> (the kept texts, counts of COUNTS).

    Dropped, each counted once in this order: null; invalid UTF-8 (a parquet writer can store any bytes
    in a string column, and pyarrow does not check them on read); empty, whitespace-only or without a
    visible character. Texts longer than max_chars are cut there (back to the last whitespace when the
    cut would split a word and the text has whitespace before it) and counted as truncated.
    """
    if isinstance(text, pa.ChunkedArray):
        text = text.combine_chunks() if text.num_chunks else pa.array([], pa.string())
    if not pa.types.is_string(text.type):
        text = text.cast(pa.string())
    n = len(text)
    is_null = text.is_null().to_numpy(zero_copy_only=False)
    valid_utf8 = _valid_utf8(text)
    usable = ~is_null & valid_utf8
    # Only valid strings go through the UTF-8 kernels below.
    text = text.filter(pa.array(usable))
    has_visible = pc.fill_null(pc.match_substring_regex(text, _VISIBLE), False).to_numpy(zero_copy_only=False)
    text = text.filter(pa.array(has_visible))
    too_long = pc.greater(pc.utf8_length(text), max_chars).to_numpy(zero_copy_only=False)
    if too_long.any():
        values = text.to_pylist()
        for i in np.flatnonzero(too_long):
            values[i] = _cut(values[i], max_chars)
        text = pa.array(values, pa.string())
    counts = {
        "rows_read": n,
        "dropped_null": int(is_null.sum()),
        "dropped_invalid_utf8": int((~is_null & ~valid_utf8).sum()),
        "dropped_empty": int(usable.sum() - has_visible.sum()),
        "truncated": int(too_long.sum()),
        "rows_kept": len(text),
    }
    return text, counts


def row_keys(text: pa.Array) -> np.ndarray:
    """uint64 key per text: blake2b-64 of its UTF-8 bytes, little-endian."""
    digests = b"".join(blake2b(t.encode("utf-8"), digest_size=8).digest() for t in text.to_pylist())
    return np.frombuffer(digests, dtype="<u8").astype(np.uint64)


class CorpusSource(Datasource):
    """Ray Datasource over checked corpus files: one read task per (epoch, file), epoch by epoch; within
    an epoch the files come in sorted order, or in the epoch's permutation when read.shuffle_rows > 0
    (and each task then shuffles its rows: pipeline.shuffle).

    mode="rows": blocks ``text``, ``row_key`` (+ ``epoch`` when epochs is given), READ_BATCH_ROWS rows
    at most. mode="stats": one row per file: ``path``, COUNTS, ``error`` ("" or why the file was skipped).
    """

    def __init__(self, files: CorpusFiles, cfg: ReadConfig, *, epochs: list[int] | None, mode: str):
        super().__init__()
        self.files, self.cfg, self.epochs, self.mode = files, cfg, epochs, mode

    def get_name(self) -> str:
        return "ParquetCorpus"

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None) -> list[ReadTask]:
        epochs = self.epochs if self.epochs is not None else [None]
        paths = self.files.paths
        return [
            ReadTask(_Reader(paths[i], self.files.filesystem, self.cfg, epoch, self.mode),
                     BlockMetadata(num_rows=None, size_bytes=None, exec_stats=None, input_files=[paths[i]]))
            for epoch in epochs for i in self._order(epoch)
        ]

    def _order(self, epoch: int | None) -> np.ndarray:
        """Files in sorted order, or (training with read.shuffle_rows) in this epoch's permutation."""
        n = len(self.files.paths)
        if epoch is None or not self.cfg.shuffle_rows:
            return np.arange(n)
        return file_order(n, seed=self.cfg.shuffle_seed, epoch=epoch)


class _Reader:
    """The body of one read task (a picklable callable returning an iterator of blocks)."""

    def __init__(self, path, filesystem, cfg: ReadConfig, epoch: int | None, mode: str):
        self.path, self.filesystem, self.cfg, self.epoch, self.mode = path, filesystem, cfg, epoch, mode
        self.shuffle = mode == "rows" and epoch is not None and cfg.shuffle_rows > 0

    def __call__(self):
        totals = dict.fromkeys(COUNTS, 0)
        window: list[pa.Table] = []  # rows waiting to be shuffled (at most shuffle_rows + one batch)
        buffered = 0
        try:
            parquet = pq.ParquetFile(self.path, filesystem=self.filesystem)
            # Row group by row group, in file order (also when shuffling): a damaged group then stops the file
            # exactly there, every time, after the rows corpus_stats counted.
            batches = (b for g in range(parquet.num_row_groups)
                       for b in parquet.iter_batches(batch_size=READ_BATCH_ROWS, row_groups=[g],
                                                     columns=[self.cfg.text_column]))
            for record_batch in batches:
                text, counts = clean_texts(record_batch.column(0), self.cfg.max_chars)
                if self.mode == "stats":
                    for k, v in counts.items():
                        totals[k] += v
                    continue
                block = {"text": text, "row_key": pa.array(row_keys(text), pa.uint64())}
                if self.epoch is not None:
                    block["epoch"] = pa.repeat(pa.scalar(self.epoch, pa.int64()), len(text))
                if not self.shuffle:
                    yield pa.table(block)
                    continue
                window.append(pa.table(block))
                buffered += len(text)
                if buffered >= self.cfg.shuffle_rows:
                    yield from self._shuffled(window)
                    window, buffered = [], 0
            yield from self._shuffled(window)
        except Exception as e:
            if failed := storage_error(self.path, e):  # skipping would change this run's rows
                raise failed from e
            if not isinstance(e, (pa.ArrowException, OSError)):
                raise
            # The footer was fine at build time; the data pages are not. Rows already yielded stay (the
            # same ones on every read, so noise and counts stay deterministic).
            reason = f"damaged parquet data ({type(e).__name__}: {e})"
            if self.cfg.on_bad_file == "fail":
                raise CorpusError(f"{self.path}: {reason}") from e
            log.warning("skipping the rest of %s: %s", self.path, reason)
            yield from self._shuffled(window)  # the rows read before the damage, as on every read
            if self.mode == "stats":
                yield pa.table({"path": [self.path], **{k: [v] for k, v in totals.items()}, "error": [reason]})
            return
        if self.mode == "stats":
            yield pa.table({"path": [self.path], **{k: [v] for k, v in totals.items()}, "error": [""]})


    def _shuffled(self, tables: list[pa.Table]):
        """The buffered rows in their shuffled order, as blocks of at most READ_BATCH_ROWS rows."""
        if not tables:
            return
        window = pa.concat_tables(tables)
        order = window_order(window.column("row_key").to_numpy(), seed=self.cfg.shuffle_seed, epoch=self.epoch)
        window = window.take(pa.array(order))
        for start in range(0, window.num_rows, READ_BATCH_ROWS):
            yield window.slice(start, READ_BATCH_ROWS)


def _read(source: CorpusSource) -> ray.data.Dataset:
    # One output block stream per read task: without override_num_blocks Ray would split each task's
    # blocks to reach its default parallelism (200), for nothing: the actors re-batch anyway.
    tasks = len(source.files.paths) * len(source.epochs or [None])
    return ray.data.read_datasource(source, override_num_blocks=tasks)


def _valid_utf8(text: pa.Array) -> np.ndarray:
    """Bool per row: the value (or null) is valid UTF-8. One fast full validation; per row only if it fails."""
    try:
        text.validate(full=True)
        return np.ones(len(text), dtype=bool)
    except pa.ArrowInvalid:
        pass
    raw = text.view(pa.binary()).to_pylist()
    return np.fromiter((v is None or _decodes(v) for v in raw), dtype=bool, count=len(raw))


def _decodes(value: bytes) -> bool:
    try:
        value.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def _cut(text: str, max_chars: int) -> str:
    head = text[:max_chars]
    if not text[max_chars].isspace():
        space = max(head.rfind(" "), head.rfind("\t"), head.rfind("\n"))
        if space > 0 and head[:space].strip():
            head = head[:space]
    return head.rstrip()


def _is_data_file(relative: str) -> bool:
    parts = [p for p in relative.split("/") if p]
    return bool(parts) and parts[-1].endswith(".parquet") and not any(p[0] in "_." for p in parts)
