"""The stop protocol: SIGTERM to a job's driver (``ray job stop``, a reclaimed head) becomes a checkpoint.

The driver writes a flag object under the run's storage; rank 0 of the workers looks for it at every
report step (``tsdae.train.loop.stop_requested``), and then every worker checkpoints and the run ends
early with ``stopped`` in its last metrics. ``--resume <run name>`` continues it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from collections.abc import Iterator

import fsspec

log = logging.getLogger("tsdae")


def run_uri(storage_path: str, run_name: str) -> str:
    """The folder (URI or absolute path) of a Ray Train run under storage_path."""
    base = storage_path if "://" in storage_path else os.path.abspath(storage_path)
    return f"{base.rstrip('/')}/{run_name}"


def stop_flag_uri(storage_path: str, run_name: str) -> str:
    """Where the driver asks a run's workers to checkpoint and stop."""
    return f"{run_uri(storage_path, run_name)}/STOP"


def request_stop(flag_uri: str) -> None:
    """Ask the workers of a run to checkpoint at their next report step and stop."""
    with fsspec.open(flag_uri, "w", auto_mkdir=True) as f:
        f.write("stop requested\n")


def clear_stop(flag_uri: str) -> None:
    """Remove a stop request (a resumed run must not stop on the request that stopped it before)."""
    fs, path = fsspec.core.url_to_fs(flag_uri)
    if fs.exists(path):
        fs.rm(path)


@contextlib.contextmanager
def stop_on_sigterm(flag_uri: str) -> Iterator[None]:
    """While the block runs, SIGTERM requests a stop instead of killing the driver."""
    def on_sigterm(signum, frame):
        log.warning("SIGTERM: asking the workers to checkpoint and stop")
        request_stop(flag_uri)

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
