"""One night at a time: a lease object that a night creates before it trains and removes when it ends.

Two submissions of the same night (a cron retry, a double click) share one run name and one Ray Train
storage folder; the lease makes sure only one of them trains. It is taken with a conditional write, so
exactly one of two racing takers gets it: on S3 a create-only PUT (If-None-Match: *), on local paths an
OS file lock around the check and the write (``tsdae.storage.compare_and_swap``). It carries an expiry,
renewed while the night runs, so a night that crashed blocks the next submission for at most ``ttl_s``,
never forever; an expired lease is taken over by the same swap (again, one taker wins).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid

import fsspec

from tsdae.storage import Conflict, compare_and_swap

log = logging.getLogger("tsdae")


def submission_id() -> str | None:
    """The Ray job submission id (``raysubmit_…``) of this driver, or None outside a submitted job. Ray
    passes it to the driver only inside RAY_JOB_CONFIG_JSON_ENV_VAR (metadata "job_submission_id"); the
    two-node test found RAY_JOB_SUBMISSION_ID, read before, unset under Ray 2.60."""
    with contextlib.suppress(ValueError, TypeError, AttributeError):
        job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", ""))["metadata"]["job_submission_id"]
        if job:
            return str(job)
    return os.environ.get("RAY_JOB_SUBMISSION_ID") or None


def holder_name() -> str:
    """Who holds a lease: the Ray job's submission id where there is one, the host and process, and a
    random suffix (two processes never share a name)."""
    job = submission_id()
    return f"{job + '@' if job else ''}{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class Lease:
    """The lease at uri (a JSON object {"holder", "taken_at", "expires_at"}) for holder. Every change is
    one compare-and-swap of that object (tsdae.storage.compare_and_swap)."""

    def __init__(self, uri: str, holder: str, ttl_s: float):
        self.uri, self.holder, self.ttl_s = uri, holder, ttl_s
        self.fs, self.path = fsspec.core.url_to_fs(uri)

    def _record(self) -> bytes:
        now = time.time()
        return json.dumps({"holder": self.holder, "taken_at": now, "expires_at": now + self.ttl_s}).encode()

    def _current(self) -> dict | None:
        with compare_and_swap(self.fs, self.path) as (data, _):
            return json.loads(data) if data else None

    def acquire(self) -> dict | None:
        """Take the lease; None if taken, else the record of whoever holds it."""
        with compare_and_swap(self.fs, self.path) as (data, write):
            current = json.loads(data) if data else None
            if current is not None and current["holder"] != self.holder:
                if current["expires_at"] > time.time():
                    return current
                log.warning("lease %s of %s expired at %s; taking it over", self.uri, current["holder"],
                            time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(current["expires_at"])))
            try:
                write(self._record())
                return None
            except Conflict:  # another taker won between the read and the write
                pass
        return self._current() or self.acquire()  # released in between: try again from the start

    def renew(self) -> bool:
        """Push the expiry out by ttl_s if this holder still holds the lease; False if it lost it."""
        with compare_and_swap(self.fs, self.path) as (data, write):
            if data is None or json.loads(data)["holder"] != self.holder:
                return False
            try:
                write(self._record())
                return True
            except Conflict:
                return False

    def release(self) -> None:
        """Remove the lease if this holder holds it (never someone else's)."""
        with compare_and_swap(self.fs, self.path) as (data, _):
            if data is not None and json.loads(data)["holder"] == self.holder:
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
