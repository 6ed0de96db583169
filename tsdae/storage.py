"""Durable bytes: atomic local writes, compare-and-swap of one small object on any fsspec filesystem,
copies out of any pyarrow filesystem (local, S3, GCS), and telling a failure of the storage itself from
bad data."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import tempfile
from pathlib import Path

import pyarrow.fs as pafs


class StorageError(OSError):
    """The storage failed (credentials, permission, endpoint, network, throttling) after the library's own
    retries; the data itself may be fine. The message names the URI and the likely cause."""


# Exception types and message fragments that mean "the store failed", not "the bytes are bad". pyarrow
# reports both kinds as OSError (its IOError status), so the message decides where the type cannot.
_STORAGE_TYPES = (PermissionError, ConnectionError, TimeoutError)
_STORAGE_MODULES = ("botocore", "aiobotocore", "s3fs", "gcsfs", "google.auth", "google.api_core", "aiohttp")
_CAUSES = {
    "credentials": ("credential", "invalidaccesskeyid", "signaturedoesnotmatch", "expiredtoken",
                    "security token", "unable to locate"),
    "permission": ("access denied", "accessdenied", "forbidden", "permission denied", "not authorized"),
    "endpoint or network": ("connection", "connect timeout", "timed out", "could not resolve", "curlcode",
                            "name or service not known", "endpoint", "network"),
    "throttling": ("slowdown", "slow down", "throttl", "too many requests", "service unavailable",
                   "503", "429"),
    "missing bucket": ("nosuchbucket", "no such bucket", "bucket does not exist"),
}


def storage_cause(error: BaseException) -> str | None:
    """The likely cause if error is a failure of the storage rather than of the data, else None."""
    text = f"{type(error).__name__}: {error}".lower()
    for cause, fragments in _CAUSES.items():
        if any(f in text for f in fragments):
            return cause
    if isinstance(error, _STORAGE_TYPES) or type(error).__module__.startswith(_STORAGE_MODULES):
        return "storage"
    return None


def storage_error(uri: str, error: BaseException) -> StorageError | None:
    """A StorageError naming uri and the likely cause if error is a storage failure, else None."""
    cause = storage_cause(error)
    if cause is None:
        return None
    return StorageError(f"{uri}: storage failure ({cause}): {type(error).__name__}: {error}")


@contextlib.contextmanager
def storage_failures(uri: str):
    """Re-raise, as a StorageError naming uri, any storage failure inside the block (others unchanged)."""
    try:
        yield
    except StorageError:
        raise
    except Exception as e:
        if failed := storage_error(uri, e):
            raise failed from e
        raise


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


class Conflict(RuntimeError):
    """The object changed between the read and the write of a compare-and-swap."""


def protocols(fs) -> set[str]:
    """The protocol names of an fsspec filesystem."""
    return {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)


def is_local(fs) -> bool:
    return bool(protocols(fs) & {"file", "local"})


@contextlib.contextmanager
def compare_and_swap(fs, path: str):
    """Yields (the object's bytes or None if there is none, write(data)): write replaces the object only if
    it is still what was read (or still absent), else raises Conflict; of two racing swaps one wins.

    S3: a PUT If-Match the ETag that was read, If-None-Match: * where there was none. Local paths: an OS
    file lock (``<path>.lock``) held from the read to the end of the block, and an atomic replace. Other
    object stores: a read, then an unconditional write.
    """
    if is_local(fs):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(f"{path}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            data = Path(path).read_bytes() if Path(path).exists() else None
            yield data, lambda new: write_atomic(Path(path), new)
        return
    s3 = "s3" in protocols(fs)
    try:
        with fs.open(path, "rb") as f:  # s3fs reads every range of it If-Match the ETag it saw first
            etag, data = (f.details["ETag"] if s3 else None), f.read()
    except FileNotFoundError:
        etag, data = None, None

    def write(new: bytes) -> None:
        if not s3:
            fs.pipe_file(path, new)
            return
        try:
            if etag is None:
                fs.pipe_file(path, new, mode="create")  # If-None-Match: *
            else:
                fs.pipe_file(path, new, IfMatch=etag)
        except OSError as e:  # s3fs: FileExistsError for If-None-Match, EINVAL for a failed If-Match
            if isinstance(e, FileExistsError) or e.errno == errno.EINVAL:
                raise Conflict(f"{path} changed since it was read") from e
            raise

    yield data, write


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
