"""Durable bytes: atomic local writes, compare-and-swap of one small object on any fsspec filesystem,
copies out of any pyarrow filesystem (local, S3, GCS), a job's output folder at a path or a URI
(``OutputDir``, ``publish``), and telling a failure of the storage itself from bad data."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

import fsspec
import pyarrow.fs as pafs

log = logging.getLogger("tsdae")


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


def _mentions(text: str, fragment: str) -> bool:
    """fragment occurs in text; a status code (digits) only as a whole token, not inside a hash or a number
    of a path ("…/144429821e.json" is not HTTP 429)."""
    if fragment.isdigit():
        return re.search(rf"(?<![0-9a-z]){fragment}(?![0-9a-z])", text) is not None
    return fragment in text


def storage_cause(error: BaseException) -> str | None:
    """The likely cause if error is a failure of the storage rather than of the data, else None."""
    text = f"{type(error).__name__}: {error}".lower()
    for cause, fragments in _CAUSES.items():
        if any(_mentions(text, f) for f in fragments):
            return cause
    if isinstance(error, _STORAGE_TYPES) or type(error).__module__.startswith(_STORAGE_MODULES):
        return "storage"
    return None


def storage_error(uri: str, error: BaseException, otherwise: str | None = None) -> StorageError | None:
    """A StorageError naming uri and the likely cause if error is a storage failure, else None.
    otherwise: the cause to name for any other OSError (a write of bytes this process holds: whatever
    fails there is the store)."""
    cause = storage_cause(error) or (otherwise if isinstance(error, OSError) else None)
    if cause is None:
        return None
    return StorageError(f"{uri}: storage failure ({cause}): {type(error).__name__}: {error}")


@contextlib.contextmanager
def storage_failures(uri: str, otherwise: str | None = None):
    """Re-raise, as a StorageError naming uri, any storage failure inside the block (others unchanged);
    otherwise: as in storage_error."""
    try:
        yield
    except StorageError:
        raise
    except Exception as e:
        if failed := storage_error(uri, e, otherwise):
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
    etag, data = _read_one_version(fs, path, s3)

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


def _read_one_version(fs, path: str, s3: bool, attempts: int = 10) -> tuple[str | None, bytes | None]:
    """(ETag on S3 else None, bytes) of one version of the object at path; (None, None) if there is none.

    s3fs reads every range of a file If-Match the ETag its first request saw: an object replaced in
    between (a lease renewed while another job reads it) raises FileExpired (EBUSY); read it again, up to
    attempts times, then raise Conflict."""
    for _ in range(attempts):
        try:
            with fs.open(path, "rb") as f:
                return (f.details["ETag"] if s3 else None), f.read()
        except FileNotFoundError:
            return None, None
        except OSError as e:
            if e.errno != errno.EBUSY:
                raise
    raise Conflict(f"{path} changed {attempts} times while it was read")


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


# -- a job's outputs at a path or a URI ---------------------------------------------------------------------
def publish(local: Path, uri: str) -> str:
    """Make uri (any fsspec URI or path) a copy of the local file or folder local, and return uri.

    Each file goes to its own key (a folder's files in parallel, at the same relative keys); then, for a
    folder, objects under uri that local does not have (an earlier attempt's) are removed. No bucket is
    ever created: fsspec's recursive put would create a missing one, and we want the error. Any failure
    is a StorageError naming uri."""
    local = Path(local)
    fs, root = fsspec.core.url_to_fs(uri)
    root = root.rstrip("/")
    files = sorted(p for p in local.rglob("*") if p.is_file()) if local.is_dir() else [local]
    keys = [f"{root}/{p.relative_to(local).as_posix()}" for p in files] if local.is_dir() else [root]
    with storage_failures(uri, otherwise="write"):
        if is_local(fs):
            for key in keys:
                Path(key).parent.mkdir(parents=True, exist_ok=True)
        if files:
            fs.put([str(p) for p in files], keys)
        if local.is_dir():
            stale = sorted(set(fs.find(root)) - set(keys))
            if stale:
                fs.rm(stale)
    return uri


class OutputDir:
    """A job's output folder: a local path or any fsspec URI (``s3://bucket/runs/<run>``, ``gs://…``,
    ``file://…``).

    Files are produced in ``local``, a local folder: the folder itself for a local path, else a staging
    folder in the temp dir, from which ``publish`` puts them at the URI. Only this process reads
    ``local``; anything else (a Ray task, a later job) reads ``uri_of(name)``. ``close`` removes the
    staging folder, except after a failed upload: then it is kept, and named in the log, so that nothing
    the job produced is lost.
    """

    def __init__(self, uri: str):
        protocol = fsspec.core.split_protocol(uri)[0]
        self.fs, root = fsspec.core.url_to_fs(uri)
        self.remote = not is_local(self.fs)
        self.published: dict[str, str] = {}  # name → URI, in the order published
        self._failed = False
        if self.remote:
            self.uri = uri.rstrip("/")
            self.local = Path(tempfile.mkdtemp(prefix="tsdae-out-"))
        else:  # a path as given (relative stays relative), or the path of a file:// URI
            self.local = Path(root if protocol else uri)
            self.local.mkdir(parents=True, exist_ok=True)
            self.uri = str(self.local)

    def uri_of(self, name: str) -> str:
        """Where the file or folder name (relative to the output folder) is for every process."""
        return f"{self.uri}/{name}" if self.remote else str(self.local / name)

    def publish(self, *names: str) -> dict[str, str]:
        """Put local/<name> (a file or a folder) at uri_of(name) for each name, replacing what an earlier
        attempt left there; a name that does not exist locally is removed at the URI. A local output
        folder is already in place. Returns {name: URI} of those that exist; raises StorageError."""
        done = {}
        for name in names:
            path, uri = self.local / name, self.uri_of(name)
            if self.remote:
                try:
                    if path.exists():
                        publish(path, uri)
                    else:
                        with storage_failures(uri, otherwise="write"):
                            if self.fs.exists(uri):
                                self.fs.rm(uri, recursive=True)
                except StorageError:
                    self._failed = True
                    raise
            if path.exists():
                done[name] = self.published[name] = uri
        return done

    def close(self) -> None:
        if not self.remote:
            return
        if self._failed:
            log.warning("outputs that could not be put at %s are kept in %s", self.uri, self.local)
            return
        shutil.rmtree(self.local, ignore_errors=True)

    def __enter__(self) -> "OutputDir":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
