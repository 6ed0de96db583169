"""One night at a time: a lease object that a night creates before it trains and removes when it ends.

Two submissions of the same night (a cron retry, a double click) share one run name and one Ray Train
storage folder; the lease makes sure only one of them trains. It is taken with a conditional write, so
exactly one of two racing takers gets it: on S3 a create-only PUT (If-None-Match: *), on local paths an
OS file lock around the check and the write. It carries an expiry, renewed while the night runs, so a
night that crashed blocks the next submission for at most ``ttl_s``, never forever; an expired lease is
taken over with a PUT If-Match its ETag (again, one taker wins). Other object stores get a check, then a
write.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path

import fsspec

from tsdae.storage import write_atomic

log = logging.getLogger("tsdae")


def holder_name() -> str:
    """Who holds a lease: the Ray job's submission id where there is one, the host and process, and a
    random suffix (two processes never share a name)."""
    job = os.environ.get("RAY_JOB_SUBMISSION_ID") or os.environ.get("RAY_JOB_ID")
    return f"{job + '@' if job else ''}{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class Lease:
    """The lease at uri (a JSON object {"holder", "taken_at", "expires_at"}) for holder."""

    def __init__(self, uri: str, holder: str, ttl_s: float):
        self.uri, self.holder, self.ttl_s = uri, holder, ttl_s
        self.fs, self.path = fsspec.core.url_to_fs(uri)
        protocols = {self.fs.protocol} if isinstance(self.fs.protocol, str) else set(self.fs.protocol)
        self.local = bool(protocols & {"file", "local"})
        self.s3 = "s3" in protocols
        self._etag: str | None = None

    def _record(self) -> bytes:
        now = time.time()
        return json.dumps({"holder": self.holder, "taken_at": now, "expires_at": now + self.ttl_s}).encode()

    def _read(self) -> tuple[dict | None, str | None]:
        """(the stored record, its ETag on S3), (None, None) if there is none."""
        try:
            with self.fs.open(self.path, "rb") as f:
                etag = f.details.get("ETag") if self.s3 else None
                return json.loads(f.read()), etag
        except FileNotFoundError:
            return None, None

    def acquire(self) -> dict | None:
        """Take the lease; None if taken, else the record of whoever holds it."""
        if self.local:
            with self._locked():
                current, _ = self._read()
                if current is not None and current["expires_at"] > time.time() and current["holder"] != self.holder:
                    return current
                write_atomic(Path(self.path), self._record())
                return None
        if not self.s3:
            current, _ = self._read()
            if current is not None and current["expires_at"] > time.time() and current["holder"] != self.holder:
                return current
            self.fs.pipe_file(self.path, self._record())
            return None
        try:
            self._etag = self.fs.pipe_file(self.path, self._record(), mode="create")["ETag"]  # If-None-Match: *
            return None
        except FileExistsError:
            pass
        current, etag = self._read()
        if current is None:  # released in between: try once more from the start
            return self.acquire()
        if current["expires_at"] > time.time():
            return current
        log.warning("lease %s of %s expired at %s; taking it over", self.uri, current["holder"],
                    time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(current["expires_at"])))
        return self._replace_if(etag, current)

    def _replace_if(self, etag: str, current: dict) -> dict | None:
        """PUT the record If-Match etag; None if it landed, else the record that won instead."""
        try:
            self._etag = self.fs.pipe_file(self.path, self._record(), IfMatch=etag)["ETag"]
            return None
        except OSError as e:
            if e.errno != errno.EINVAL:  # s3fs: EINVAL = a precondition did not hold
                raise
            return self._read()[0] or current

    def renew(self) -> bool:
        """Push the expiry out by ttl_s if this holder still holds the lease; False if it lost it."""
        if self.local:
            with self._locked():
                current, _ = self._read()
                if current is None or current["holder"] != self.holder:
                    return False
                write_atomic(Path(self.path), self._record())
                return True
        current, etag = self._read()
        if current is None or current["holder"] != self.holder:
            return False
        if not self.s3:
            self.fs.pipe_file(self.path, self._record())
            return True
        return self._replace_if(etag, current) is None

    def release(self) -> None:
        """Remove the lease if this holder holds it (never someone else's)."""
        with self._locked() if self.local else contextlib.nullcontext():
            current, _ = self._read()
            if current is not None and current["holder"] == self.holder:
                self.fs.rm_file(self.path)

    @contextlib.contextmanager
    def renewing(self, every_s: float | None = None):
        """Renew the lease every ttl_s / 3 (or every_s) in a thread until the block ends."""
        stop = threading.Event()

        def loop():
            while not stop.wait(every_s or self.ttl_s / 3):
                try:
                    if not self.renew():
                        log.error("lease %s was taken over by another holder", self.uri)
                        return
                except Exception as e:  # a failed renewal is retried at the next tick
                    log.warning("renewing lease %s failed: %s", self.uri, e)

        thread = threading.Thread(target=loop, name="lease-renewal", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            stop.set()
            thread.join()

    @contextlib.contextmanager
    def _locked(self):
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        with open(f"{self.path}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            yield
