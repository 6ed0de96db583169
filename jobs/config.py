"""The run config: composes one typed config per stage, loaded from YAML with strict keys.

    python -m jobs.config --schema > configs/schema.json   # the JSON Schema editors use for configs/*.yaml
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any

import fsspec
import yaml
from pydantic import Field, ValidationError, model_validator

from pipeline import CorruptConfig, ReadConfig
from tsdae.config import ConfigError, Float, Section, describe
from tsdae.eval import EvalConfig, missing_tasks
from tsdae.model import ModelConfig, check_model_ref
from tsdae.train import ScaleConfig, TrainConfig

SCHEMA_PATH = Path(__file__).resolve().parents[1] / "configs" / "schema.json"


class GateConfig(Section):
    """The regression gate of nightly retraining, in Spearman ×100 points on the gated STS tasks.

    tolerance: the candidate's average may be at most this far below production's (0: at least as good;
    negative: it must improve by that much).
    max_task_drop: no single task may fall more than this below production's score.
    """

    tolerance: Float = 0.0
    max_task_drop: Float = Field(1.0, ge=0)


MLFLOW_SCHEME = "mlflow://"


class TrackingConfig(Section):
    """MLflow tracking of a run (``jobs.tracking``; needs the optional extra ``tsdae-ray[mlflow]``).

    mlflow_uri: the tracking server (``http://host:5000`` or any MLflow tracking URI); null: the standard
    MLFLOW_TRACKING_URI; no tracking when neither is set.
    experiment: the MLflow experiment the runs go to (created when missing).
    log_model: upload the exported ``encoder/`` with the run's artifacts.
    enabled: false turns tracking off even when a URI is set (an MLflow registry still uses the URI).
    """

    mlflow_uri: str | None = Field(None, min_length=1)
    experiment: str = Field("tsdae", min_length=1)
    log_model: bool = True
    enabled: bool = True

    def server(self) -> str | None:
        """The tracking URI in force: mlflow_uri, else MLFLOW_TRACKING_URI, else None."""
        return self.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI") or None

    def active(self) -> bool:
        return self.enabled and self.server() is not None


class NightlyConfig(Section):
    """Nightly retraining (``python -m jobs.nightly``): read.uri is the root of hive partitions
    ``<partition_key>=YYYY-MM-DD/``; each night trains on the partitions production has not seen.

    registry_uri: the model registry: a local path or s3:// / gs:// URI (``production.json`` and
    ``models/<model_id>/``), or ``mlflow://<registered model name>`` for MLflow's model registry on the
    tracking server (tracking.mlflow_uri, else MLFLOW_TRACKING_URI).
    replay_partitions: how many already-seen partitions to mix in, drawn per night from
    (replay_seed, night).
    cache_dir: local folder the production model is downloaded to for the warm start.
    lease_ttl_s: a night holds a lease (<storage_path>/leases/<model id>.json) while it runs, renewed every
    third of this; a second submission of the same night stops, naming the holder. A night that crashed
    blocks a re-submission for at most this long.
    """

    registry_uri: str = Field("runs/registry", min_length=1)
    partition_key: str = Field("date", min_length=1)
    replay_partitions: int = Field(0, ge=0)
    replay_seed: int = 0
    cache_dir: str = "runs/model-cache"
    lease_ttl_s: float = Field(1800, ge=10)
    gate: GateConfig = GateConfig()

    @model_validator(mode="after")
    def _registered_model_name(self) -> "NightlyConfig":
        if self.registry_uri.startswith(MLFLOW_SCHEME) and not self.registry_uri[len(MLFLOW_SCHEME):].strip("/"):
            raise ValueError(f"registry_uri {self.registry_uri!r} names no registered model: mlflow://<name>")
        return self


class RunConfig(Section):
    """One TSDAE run: read → corrupt → train → evaluate.

    name: the run's name; a unique suffix is added per launch (a Ray Train run with the same name and
    storage path would silently resume the old one).
    storage_path: where Ray Train writes checkpoints (local path or s3:// / gs:// URI).
    output_dir: where each run's outputs go, under ``<output_dir>/<run name>/``: a local path or any fsspec
    URI (s3://, gs://, file://). The reports, charts, exported ``encoder/`` and
    ``decoder/``, ``metrics.jsonl``, ``summary.json`` and ``config.yaml`` (the resolved config the run
    used); a night adds ``lineage.json``. On a cluster use a bucket: the driver's working directory is
    Ray's scratch copy of the job.
    ray_address: the Ray cluster to join (null: the job's cluster, else a local one).
    """

    # One path component: it names the run's folders and, for a night, its registry model id.
    name: str = Field("tsdae", min_length=1, max_length=100, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    storage_path: str = "runs/ray"
    output_dir: str = "runs"
    ray_address: str | None = None
    read: ReadConfig = ReadConfig()
    corrupt: CorruptConfig = CorruptConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    scale: ScaleConfig = ScaleConfig()
    eval: EvalConfig = EvalConfig()
    tracking: TrackingConfig = TrackingConfig()
    nightly: NightlyConfig | None = None  # only jobs.nightly reads it

    def run_output(self, run_name: str) -> str:
        """The output folder of one run (a path or a URI): ``<output_dir>/<run_name>``."""
        return f"{self.output_dir.rstrip('/')}/{run_name}"

    @model_validator(mode="after")
    def _batch_splits_over_the_workers(self) -> "RunConfig":
        for workers in self.scale.worker_counts():  # fails here, not on the workers after the base evaluation
            self.train.per_worker_batch(workers)
        return self


def parse_config(data: Any, source: str = "config") -> RunConfig:
    """Build and validate a RunConfig from a mapping; every problem is named by its dotted key."""
    try:
        return RunConfig.model_validate({} if data is None else data)
    except ValidationError as e:
        raise ConfigError(f"{source}: {describe(e)}") from None


def set_dotted(data: dict, dotted_key: str, value: Any) -> None:
    """data["a"]["b"] = value for "a.b" (sections created as needed)."""
    *sections, last = dotted_key.split(".")
    for name in sections:
        if data.get(name) is None:  # absent, or null in the file (``nightly:`` with nothing under it)
            data[name] = {}
        data = data[name]
        if not isinstance(data, dict):
            raise ConfigError(f"{dotted_key}: {name!r} is not a section")
    data[last] = value


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """Command-line overrides ``["train.lr=1e-4", "scale.num_workers=4"]`` → ``{"train.lr": 1e-4, …}``.
    Each value is read as a YAML scalar, as it would be in the file (4 → int, 1e-4 → float, true → bool,
    null → None, [a, b] → list); load_config then validates it like the file."""
    overrides = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected KEY=VALUE with a dotted key, e.g. train.lr=1e-4")
        try:
            overrides[key] = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"override {key}: {text!r} is not a YAML value: {e}") from None
    return overrides


OVERRIDES_HELP = ("config values to override by dotted key, after the options: train.lr=1e-4 "
                  "scale.num_workers=4 (read as YAML, validated like the file)")


def load_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Load a run config from YAML (None: the defaults); overrides ({"train.lr": 1e-4}) replace values by
    dotted key first. Errors name the file, or the command line when an override is at fault."""
    data: Any = {}
    if path is not None:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"{path}: cannot read config: {e}") from e
    source = str(path or "defaults")
    if overrides:
        source += " with the command-line overrides " + " ".join(f"{k}={v!r}" for k, v in overrides.items())
    for key, value in (overrides or {}).items():
        try:
            set_dotted(data, key, value)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
    return parse_config(data, source)


def dump_config(cfg: RunConfig) -> str:
    """The resolved config as YAML (what a run saves as ``config.yaml``; load_config reads it back equal)."""
    return yaml.safe_dump(cfg.model_dump(), sort_keys=False)


_LOCAL = (None, "file", "local")


def filesystem_problem(uri: str) -> str | None:
    """Why the filesystem of uri cannot be used here (its package is not installed, or no filesystem has
    that scheme), or None."""
    protocol = fsspec.core.split_protocol(uri)[0]
    if protocol in _LOCAL:
        return None
    try:
        fsspec.get_filesystem_class(protocol)
    except ImportError as e:
        return f"{uri!r} needs a filesystem that is not installed: {e} (s3fs, gcsfs: pip install 'tsdae-ray[cloud]')"
    except ValueError:
        return f"{uri!r}: no filesystem is known for {protocol}://"
    return None


def uri_problems(cfg: RunConfig) -> list[str]:
    """The keys whose URIs cannot be used: a filesystem that is not installed, or a URI where the job
    reads or writes only local folders (nightly.cache_dir: a URI there would become a local folder
    named after its scheme)."""
    read = [cfg.read.uri] if isinstance(cfg.read.uri, str) else list(cfg.read.uri)
    remote = {("read.uri" if len(read) == 1 else f"read.uri[{i}]"): u for i, u in enumerate(read)}
    remote.update({f"eval.custom_sets[{i}].uri": c.uri for i, c in enumerate(cfg.eval.custom_sets)})
    remote["output_dir"] = cfg.output_dir  # tsdae.storage.OutputDir: written locally, then put there
    remote["eval.sts_dir"] = cfg.eval.sts_dir  # fetched into each evaluating node's cache
    local = {}
    if cfg.nightly is not None:
        local["nightly.cache_dir"] = cfg.nightly.cache_dir
        remote["storage_path"] = cfg.storage_path  # the night's lease is written there through fsspec
        if not cfg.nightly.registry_uri.startswith(MLFLOW_SCHEME):
            remote["nightly.registry_uri"] = cfg.nightly.registry_uri
    problems = [f"{key}: {p}" for key, uri in remote.items() if (p := filesystem_problem(uri))]
    problems += [f"{key}: {uri!r} must be a local path (this job writes and reads it on the driver's disk)"
                 for key, uri in local.items() if fsspec.core.split_protocol(uri)[0] not in _LOCAL]
    return problems


def preflight(cfg: RunConfig, source: str = "config") -> None:
    """Check what a config points at before anything starts: every model reference loads, the STS data
    of every task (and the validation task) is there, every custom set exists. Raises ConfigError naming
    the key; a job then exits 2 before Ray starts or any evaluation runs."""
    problems = uri_problems(cfg)
    refs = {"model.name_or_path": cfg.model.name_or_path, "model.decoder_name_or_path": cfg.model.decoder_name_or_path,
            "eval.production_model": cfg.eval.production_model}
    for key, ref in refs.items():
        if ref is not None:
            try:
                check_model_ref(ref)
            except FileNotFoundError as e:
                problems.append(f"{key}: {e}")
    tasks = list(dict.fromkeys([*cfg.eval.tasks, *([cfg.eval.validation_task] if cfg.eval.validation_task else [])]))
    missing = missing_tasks(cfg.eval.sts_dir, tasks) if not filesystem_problem(cfg.eval.sts_dir) else []
    if missing:
        problems.append(f"eval.sts_dir: no data for {missing} under {cfg.eval.sts_dir!r}")
    for i, custom in enumerate(cfg.eval.custom_sets):
        if filesystem_problem(custom.uri):
            continue
        fs, path = fsspec.core.url_to_fs(custom.uri)
        if not fs.exists(path):
            problems.append(f"eval.custom_sets[{i}].uri: no file at {custom.uri!r}")
    mlflow_needed = [key for key, used in (
        ("tracking.mlflow_uri", cfg.tracking.active()),
        ("nightly.registry_uri", cfg.nightly is not None and cfg.nightly.registry_uri.startswith(MLFLOW_SCHEME)),
    ) if used]
    if mlflow_needed and importlib.util.find_spec("mlflow") is None:
        problems.append(f"{mlflow_needed[0]}: MLflow is not installed: pip install 'tsdae-ray[mlflow]'")
    if "nightly.registry_uri" in mlflow_needed and not (cfg.tracking.server() or os.environ.get("MLFLOW_REGISTRY_URI")):
        problems.append(f"nightly.registry_uri: {cfg.nightly.registry_uri} needs an MLflow server: set "
                        "tracking.mlflow_uri or MLFLOW_TRACKING_URI")
    if problems:
        raise ConfigError(f"{source}: " + "; ".join(problems))


def shared_disk_problems(cfg: RunConfig, nodes: int) -> list[str]:
    """The keys naming a local path that the job's processes on other nodes write and read, on a Ray
    cluster of `nodes` alive nodes: storage_path (checkpoints, written by every worker, read on resume and
    by the driver) and a storage nightly.registry_uri (the warm start is read by every worker). None on one
    node, or when the config declares the paths shared (scale.shared_filesystem)."""
    if nodes <= 1 or cfg.scale.shared_filesystem:
        return []
    paths = {"storage_path": cfg.storage_path}
    if cfg.nightly is not None and not cfg.nightly.registry_uri.startswith(MLFLOW_SCHEME):
        paths["nightly.registry_uri"] = cfg.nightly.registry_uri
    return [f"{key}: {uri!r} is a local path, and the Ray cluster has {nodes} nodes with no shared disk declared: "
            f"use an s3:// or gs:// URI, or set scale.shared_filesystem: true if it is on NFS/EFS mounted at the "
            f"same path on every node" for key, uri in paths.items() if fsspec.core.split_protocol(uri)[0] in _LOCAL]


def json_schema() -> dict:
    """The run config's JSON Schema (what configs/schema.json holds)."""
    schema = RunConfig.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "tsdae-ray run config"
    return schema


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Print the run config's JSON Schema.")
    p.add_argument("--schema", action="store_true", required=True)
    p.parse_args(argv)
    sys.stdout.write(json.dumps(json_schema(), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
