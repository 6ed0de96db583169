"""Durable bytes: atomic local writes, and copies out of any pyarrow filesystem (local, S3, GCS)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pyarrow.fs as pafs


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write text (UTF-8) or bytes to a local path through a temp file in the same folder and os.replace
    (atomic on POSIX): a reader sees the old file or the new one, never a partial write."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def fetch(fs: pafs.FileSystem, path: str, dest: Path) -> Path:
    """A local copy of path (a file or a folder) from fs, under dest; a local filesystem is used in place."""
    if isinstance(fs, pafs.LocalFileSystem):
        return Path(path)
    target = Path(dest) / Path(path).name
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        pafs.copy_files(path, str(target), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    else:
        with fs.open_input_stream(path) as src, open(target, "wb") as out:
            shutil.copyfileobj(src, out)
    return target
