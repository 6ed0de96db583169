"""How a benchmark hands over its result: a JSON file under benchmarks/results/ and one JSON line last."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
from pathlib import Path

import torch


def publish(result: dict, path: str | Path) -> dict:
    """Write result to path (indented) and print it as the last line of output (one JSON object)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result), flush=True)
    return result


def machine() -> dict:
    """The machine a result was measured on: CPU model and features, cores, torch."""
    cpu = platform.processor() or ""
    info = ""
    with contextlib.suppress(OSError):
        info = Path("/proc/cpuinfo").read_text()
    model = re.search(r"^model name\s*:\s*(.+)$", info, re.M)
    family = re.search(r"^cpu family\s*:\s*(\d+)", info, re.M)
    flags = set((re.search(r"^flags\s*:\s*(.+)$", info, re.M) or re.match("", "")).group(0).split())
    return {
        "cpu": model.group(1).strip() if model else cpu,
        "cpu_family": int(family.group(1)) if family else None,  # AMD: 25 Zen 3/4, 26 Zen 5
        "cores": os.cpu_count(),
        "avx512f": "avx512f" in flags,
        "avx512_bf16": "avx512_bf16" in flags,
        "amx_tile": "amx_tile" in flags,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
    }


def load_average() -> list[float] | None:
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None
