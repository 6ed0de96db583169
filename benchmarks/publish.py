"""How a benchmark hands over its result: a JSON file under benchmarks/results/ and one JSON line last."""

from __future__ import annotations

import json
from pathlib import Path


def publish(result: dict, path: str | Path) -> dict:
    """Write result to path (indented) and print it as the last line of output (one JSON object)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result), flush=True)
    return result
