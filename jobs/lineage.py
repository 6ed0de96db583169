"""The lineage manifest: exactly what went into a model, stored beside it as ``lineage.json``.

Pure except ``package_versions`` and ``git_info``, which read the environment they run in.
"""

from __future__ import annotations

import os
import platform
import subprocess
from datetime import datetime, timezone
from importlib import metadata

SCHEMA_VERSION = 1
PACKAGES = ("tsdae-ray", "ray", "torch", "transformers", "tokenizers", "safetensors", "pyarrow", "fsspec",
            "numpy", "pandas", "scipy")


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    """Installed versions of the packages that decide what a run computes (None: not installed)."""
    versions = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_info(explicit: str | None = None) -> dict:
    """The commit the code came from. `ray job submit --working-dir .` uploads no .git (see .rayignore),
    so a job gets it from the submitter: --git-commit or TSDAE_GIT_COMMIT; a local run asks git."""
    commit = explicit or os.environ.get("TSDAE_GIT_COMMIT")
    if commit:
        return {"commit": commit, "dirty": None, "source": "submitter"}
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return {"commit": None, "dirty": None, "source": "unknown"}
    if head.returncode != 0:
        return {"commit": None, "dirty": None, "source": "unknown"}
    return {"commit": head.stdout.strip(), "dirty": bool(status.stdout.strip()), "source": "git"}


def build_lineage(*, model_id: str, parent: str | None, base_model: str, through: str, key: str,
                  partitions: list[dict], replay: list[dict], consumed: list[str], cfg, config_label: str,
                  report: dict, decision: dict, git: dict, versions: dict, mlflow_run_id: str | None = None) -> dict:
    """One model's lineage (JSON-serialisable).

    partitions / replay: {"name", "uri", "files": [{"path", "size"}], "rows"} of the new and the replayed
    partitions (rows from the parquet footers, before empty rows are dropped; the corpus stage's own
    counts of what was trained on are under "corpus"). consumed: every partition this model's line has
    trained on, parents included; the next night trains on the rest.
    cfg: the run config (jobs.config.RunConfig) as the job ran it, warm start included.
    mlflow_run_id: the night's MLflow run (jobs.tracking), when tracking is on.
    """
    meta = report["meta"]
    return {
        "schema_version": SCHEMA_VERSION,
        "model_id": model_id,
        "parent": parent,  # the production model this one was warm-started from; None: base_model
        "base_model": base_model,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "night": {"through": through, "idempotency_key": key, "run_name": meta.get("run_name"),
                  "mlflow_run_id": mlflow_run_id},
        "data": {
            "uri": cfg.read.uri,
            "partitions": partitions,
            "replay": replay,
            "consumed_partitions": consumed,
            "corpus": meta.get("corpus"),
        },
        "corruption": cfg.corrupt.model_dump(),
        "seeds": {"corrupt": cfg.corrupt.seed, "train": cfg.train.seed,
                  "replay": cfg.nightly.replay_seed if cfg.nightly else None},
        "config": {"label": config_label, "resolved": cfg.model_dump()},
        "code": git,
        "packages": versions,
        "train": meta.get("train"),
        "checkpoint": meta.get("checkpoint"),
        "metrics": {"production": report["before"], "candidate": report["after"]},
        "gate": decision,
    }
