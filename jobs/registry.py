"""The model registry: immutable model directories and one small pointer file naming production.

Layout under the registry URI (a local path or any fsspec URI: s3://, gs://, …):

    production.json            the pointer: {"model_id", "consumed_partitions", "previous_model_id", …}
    models/<model_id>/         one immutable model: encoder/, decoder/, lineage.json, report.json, …
    models/<model_id>/MANIFEST.json   written last: every file's size and sha256
    nights/<key>.json          what a night with this idempotency key decided (promoted / rejected)

Promotion is ordered so that a crash at any point leaves production either untouched or fully moved:
upload every file → write MANIFEST.json (the model is now complete) → download it again and check every
checksum (and, in the nightly job, that it loads) → rewrite production.json. A model without a manifest
is an unfinished upload that nothing points to; the next attempt overwrites it. production.json is
replaced atomically: temp file + os.replace on a local filesystem, one PUT on an object store (S3 and
GCS make a single object write atomic: a reader sees the old or the new object, never a mix).

    python -m jobs.registry runs/registry show
    python -m jobs.registry runs/registry promote <model_id>     # manual rollback to a verified model
    python -m jobs.registry mlflow://tsdae-nightly show           # the same on MLflow's model registry

Exit codes: 0 done, 2 a bad registry URI, 7 the model failed verification or production moved.

``open_registry`` picks the registry a URI names: this storage registry (the default), or, for
``mlflow://<registered model name>``, MLflow's model registry (``jobs.mlflow_registry``), which keeps the
same guarantees (``ModelRegistry``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Protocol

import fsspec

from jobs.config import MLFLOW_SCHEME
from jobs.exits import EXIT_CONFIG, EXIT_PROMOTE
from tsdae.model_cache import MANIFEST, is_relative_inside, sha256_file
from tsdae.storage import Conflict, compare_and_swap, is_local, storage_failures, write_atomic

SCHEMA_VERSION = 1
POINTER = "production.json"

log = logging.getLogger("tsdae")


class RegistryError(RuntimeError):
    """The registry is inconsistent or a model failed verification; production was not changed."""


# Model ids and manifest keys come back from storage that others can write to, and become local paths
# (the model cache, the files of a download) and registry queries: anything that could leave its folder
# or change a query is refused before it is used.
_MODEL_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")


def check_model_id(model_id: str) -> str:
    """model_id, if it is one path component of letters, digits, '.', '_', '-' (no '..'); else RegistryError."""
    if not isinstance(model_id, str) or not _MODEL_ID.fullmatch(model_id) or ".." in model_id:
        raise RegistryError(f"model id {model_id!r} is not a valid model id (one name of letters, digits, "
                            f"'.', '_' and '-', not '..'); refusing to use it as a path")
    return model_id


def check_manifest_key(model_id: str, rel: str) -> str:
    """rel, if it is a relative path inside the model's folder; else RegistryError."""
    if not is_relative_inside(rel):
        raise RegistryError(f"model {model_id}: manifest key {rel!r} is not a relative path inside the model's "
                            f"folder; refusing to download it")
    return rel


def _json_bytes(obj: dict) -> bytes:
    return (json.dumps(obj, indent=2, allow_nan=False) + "\n").encode()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def manifest_entries(src: Path) -> dict[str, dict]:
    """{relative path: {"size", "sha256"}} of every file under the local folder src (a manifest's files)."""
    files = sorted(p for p in Path(src).rglob("*") if p.is_file())
    return {p.relative_to(src).as_posix(): {"size": p.stat().st_size, "sha256": sha256_file(p)} for p in files}


def install_verified(model_id: str, manifest: dict, dest: Path, download: Callable[[str, Path], None]) -> Path:
    """Download the files of a model's manifest into the local folder dest, each through download(relative
    path, local file), and check every size and sha256; returns dest. A dest that a previous call
    completed is reused.

    Downloads into a sibling temp folder and renames it into place, so dest is complete or absent.
    """
    check_model_id(model_id)
    for rel in manifest["files"]:
        check_manifest_key(model_id, rel)
    dest = Path(dest)
    done_marker = dest / MANIFEST
    if done_marker.exists() and json.loads(done_marker.read_text())["files"] == manifest["files"]:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}."))
    try:
        for rel, entry in manifest["files"].items():
            local = tmp / rel
            local.parent.mkdir(parents=True, exist_ok=True)
            download(rel, local)
            size, digest = local.stat().st_size, sha256_file(local)
            if size != entry["size"] or digest != entry["sha256"]:
                raise RegistryError(f"model {model_id}: {rel} has size {size} sha256 {digest[:12]}…, "
                                    f"manifest says {entry['size']} {entry['sha256'][:12]}…")
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


class ModelRegistry(Protocol):
    """What the nightly job and the CLI need from a registry. Both implementations (``Registry`` here,
    ``jobs.mlflow_registry.MlflowRegistry``) keep the same guarantees: a model is complete (its manifest
    written last) before anything can point at it; fetch checks every file against the manifest;
    promote refuses an incomplete model or a production that moved underneath, and its one write is
    the last of a promotion, so a crash anywhere leaves production on the old model or the new one."""

    uri: str

    def production(self) -> dict | None: ...
    def promote(self, model_id: str, *, expected_current: str | None, **fields) -> dict: ...
    def manifest(self, model_id: str) -> dict | None: ...
    def model_source(self, model_id: str) -> str | None: ...
    def publish(self, model_id: str, src: Path) -> dict: ...
    def fetch(self, model_id: str, dest: str | Path) -> Path: ...
    def lineage(self, model_id: str) -> dict | None: ...
    def night(self, key: str) -> dict | None: ...
    def record_night(self, key: str, record: dict) -> None: ...


def open_registry(uri: str, tracking_uri: str | None = None) -> ModelRegistry:
    """The registry at uri: ``mlflow://<registered model name>`` is MLflow's model registry on
    tracking_uri (None: MLFLOW_TRACKING_URI); anything else is the storage registry."""
    if uri.startswith(MLFLOW_SCHEME):
        from jobs.mlflow_registry import MlflowRegistry  # mlflow is an optional extra: imported when used

        return MlflowRegistry(uri, tracking_uri)
    return Registry(uri)


class Registry:
    """Read and write one registry. Every method is safe to re-run after a crash."""

    def __init__(self, uri: str):
        self.uri = uri.rstrip("/")
        self.fs, root = fsspec.core.url_to_fs(uri)
        self.root = root.rstrip("/")
        self.local = is_local(self.fs)

    # -- paths and small JSON objects ------------------------------------------------------------------
    def _path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def model_uri(self, model_id: str) -> str:
        return f"{self.uri}/models/{check_model_id(model_id)}"

    def model_source(self, model_id: str) -> str:
        """The model's folder as every process reads it (tsdae.model_cache.fetch_model checks it against
        its MANIFEST.json): its URI, or an absolute path for a local registry (a relative one would be
        resolved against each worker's own working directory)."""
        return self._path("models", check_model_id(model_id)) if self.local else self.model_uri(model_id)

    def read_json(self, *parts: str) -> dict | None:
        """The JSON object at parts, or None if there is none."""
        path = self._path(*parts)
        try:
            with storage_failures("/".join([self.uri, *parts])), self.fs.open(path, "rb") as f:
                return json.loads(f.read())
        except FileNotFoundError:
            return None

    def write_json(self, obj: dict, *parts: str) -> None:
        """Write a JSON object so that readers see the old or the new one, never a partial write."""
        data = _json_bytes(obj)
        path = self._path(*parts)
        if not self.local:
            self.fs.pipe_file(path, data)  # one PUT: atomic per object on S3 and GCS
            return
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        write_atomic(Path(path), data)

    # -- the pointer -----------------------------------------------------------------------------------
    def production(self) -> dict | None:
        """The production pointer, or None before the first promotion."""
        return self._checked(self.read_json(POINTER))

    def _checked(self, pointer: dict | None) -> dict | None:
        if pointer is not None and pointer.get("schema_version") != SCHEMA_VERSION:
            raise RegistryError(f"{self.uri}/{POINTER}: schema_version {pointer.get('schema_version')!r}, "
                                f"expected {SCHEMA_VERSION}")
        return pointer

    def promote(self, model_id: str, *, expected_current: str | None, **fields) -> dict:
        """Point production at a complete model (its manifest exists). The last write of a promotion.

        expected_current: the production model_id the caller started from; if another promotion
        happened in between, refuse rather than overwrite it. The check and the write are one step: on
        S3 a conditional PUT on the ETag that was read (If-Match; If-None-Match: * for the first
        promotion), on local paths an OS file lock around both, so of two promotions racing from the
        same production exactly one wins. (Other object stores: a check, then the write.)
        fields: extra JSON fields for the pointer (consumed partitions, metrics).
        """
        if self.manifest(model_id) is None:
            raise RegistryError(f"model {model_id} has no {MANIFEST}: it was never completely written")
        with self._pointer_swap() as (current, commit):
            current_id = current["model_id"] if current else None
            if current_id != expected_current:
                raise RegistryError(f"production moved from {expected_current} to {current_id} while this job ran")
            pointer = {"schema_version": SCHEMA_VERSION, "model_id": model_id,
                       "model_uri": self.model_uri(model_id), "promoted_at": _now(),
                       "previous_model_id": current_id, **fields}
            commit(pointer)
        log.info("production → %s (was %s)", model_id, current_id)
        return pointer

    @contextlib.contextmanager
    def _pointer_swap(self):
        """(the production pointer, commit(new pointer)) as one compare-and-swap (tsdae.storage): commit
        raises RegistryError if another promotion wrote the pointer in between."""
        with compare_and_swap(self.fs, self._path(POINTER)) as (data, write):
            def commit(pointer: dict) -> None:
                try:
                    write(_json_bytes(pointer))
                except Conflict as e:
                    raise RegistryError(f"{self.uri}/{POINTER} changed while this promotion was being written "
                                        f"(another promotion won); production is the other one") from e

            yield self._checked(json.loads(data) if data else None), commit

    # -- immutable models ------------------------------------------------------------------------------
    def manifest(self, model_id: str) -> dict | None:
        return self.read_json("models", check_model_id(model_id), MANIFEST)

    def publish(self, model_id: str, src: Path) -> dict:
        """Upload every file under the local folder src to models/<model_id>/, then its manifest.

        A model that already has a manifest with the same checksums is left as it is. One with other
        files (a re-run after a crash between publish and promote retrains and re-evaluates) loses its
        manifest first, so it is incomplete while it is rewritten; production's own model is never
        rewritten.
        """
        src = Path(src)
        entries = manifest_entries(src)
        existing = self.manifest(model_id)
        if existing is not None:
            if existing["files"] == entries:
                log.info("model %s is already published with the same files", model_id)
                return existing
            current = self.production()
            if current is not None and current["model_id"] == model_id:
                raise RegistryError(f"model {model_id} is in production; it cannot be rewritten")
            log.warning("model %s was published but never promoted; rewriting it", model_id)
            self.fs.rm_file(self._path("models", model_id, MANIFEST))
        total = sum(e["size"] for e in entries.values())
        done = 0
        for i, (rel, entry) in enumerate(entries.items(), 1):
            self._put_file(src / rel, self._path("models", model_id, rel))
            done += entry["size"]
            if i == len(entries) or i % max(1, len(entries) // 10) == 0:
                log.info("upload %s: %d/%d files, %.1f/%.1f MB", model_id, i, len(entries), done / 1e6, total / 1e6)
        manifest = {"schema_version": SCHEMA_VERSION, "model_id": model_id, "created_at": _now(), "files": entries}
        self.write_json(manifest, "models", model_id, MANIFEST)
        return manifest

    def _put_file(self, local: Path, remote: str) -> None:
        self.fs.makedirs(remote.rsplit("/", 1)[0], exist_ok=True)
        self.fs.put_file(str(local), remote)

    def fetch(self, model_id: str, dest: str | Path) -> Path:
        """Download models/<model_id>/ to the local folder dest, checking every size and checksum
        against its manifest; returns dest, complete or absent (``install_verified``)."""
        manifest = self.manifest(model_id)
        if manifest is None:
            raise RegistryError(f"model {model_id} has no {MANIFEST} at {self.model_uri(model_id)}")
        return install_verified(model_id, manifest, Path(dest),
                                lambda rel, local: self.fs.get_file(self._path("models", model_id, rel), str(local)))

    def lineage(self, model_id: str) -> dict | None:
        """The lineage.json published with a model (None if it has none)."""
        return self.read_json("models", check_model_id(model_id), "lineage.json")

    # -- nights ----------------------------------------------------------------------------------------
    def night(self, key: str) -> dict | None:
        """What the night with this idempotency key decided, or None if it never finished."""
        return self.read_json("nights", f"{key}.json")

    def record_night(self, key: str, record: dict) -> None:
        self.write_json({"schema_version": SCHEMA_VERSION, "key": key, "recorded_at": _now(), **record},
                        "nights", f"{key}.json")


def main(argv=None, prog=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    p = argparse.ArgumentParser(prog=prog, description="Show the production model, or point production at a "
                                            "published model (rollback).")
    p.add_argument("registry_uri", help="a storage registry (path, s3://, gs://) or mlflow://<registered model name>")
    p.add_argument("--tracking-uri", help="the MLflow server of an mlflow:// registry (default: MLFLOW_TRACKING_URI)")
    sub = p.add_subparsers(dest="action", required=True)
    sub.add_parser("show", help="print the production pointer (JSON)")
    promote = sub.add_parser("promote", help="verify a published model's files, then point production at it")
    promote.add_argument("model_id")
    args = p.parse_args(argv)

    try:
        registry = open_registry(args.registry_uri, args.tracking_uri)
    except (ValueError, ImportError) as e:  # a bad URI; mlflow:// without the mlflow extra
        log.error("bad registry %s: %s", args.registry_uri, e)
        return EXIT_CONFIG
    current = registry.production()
    if args.action == "show":
        print(json.dumps(current, indent=2))
        return 0
    try:
        with tempfile.TemporaryDirectory() as tmp:  # verify every checksum before moving the pointer
            registry.fetch(args.model_id, Path(tmp) / args.model_id)
        # The next night trains on what this model has not seen: take that from its own lineage.
        lineage = registry.lineage(args.model_id) or {}
        consumed = lineage.get("data", {}).get("consumed_partitions", [])
        registry.promote(args.model_id, expected_current=current["model_id"] if current else None,
                         consumed_partitions=consumed, manual=True)
    except (RegistryError, OSError) as e:
        log.error("promotion of %s failed, production stays %s: %s", args.model_id,
                  current["model_id"] if current else "empty", e)
        return EXIT_PROMOTE
    return 0


if __name__ == "__main__":
    sys.exit(main())
