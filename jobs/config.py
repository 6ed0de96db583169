"""The run config: composes one typed config per stage, loaded from YAML with strict keys."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from pipeline.config import CorruptConfig, ReadConfig
from tsdae.config import EvalConfig, ModelConfig, ScaleConfig, TrainConfig


@dataclass(frozen=True)
class GateConfig:
    """The regression gate of nightly retraining, in Spearman ×100 points on the gated STS tasks.

    tolerance: the candidate's average may be at most this far below production's (0: at least as good;
    negative: it must improve by that much).
    max_task_drop: no single task may fall more than this below production's score.
    """

    tolerance: float = 0.0
    max_task_drop: float = 1.0

    def __post_init__(self):
        if self.max_task_drop < 0:
            raise ValueError(f"nightly.gate.max_task_drop must be >= 0, got {self.max_task_drop}")


@dataclass(frozen=True)
class NightlyConfig:
    """Nightly retraining (``python -m jobs.nightly``): read.uri is the root of hive partitions
    ``<partition_key>=YYYY-MM-DD/``; each night trains on the partitions production has not seen.

    registry_uri: the model registry (local path or s3:// / gs:// URI): ``production.json`` and
    ``models/<model_id>/``.
    replay_partitions: how many already-seen partitions to mix in, drawn per night from
    (replay_seed, night).
    cache_dir: local folder the production model is downloaded to for the warm start.
    """

    registry_uri: str = "runs/registry"
    partition_key: str = "date"
    replay_partitions: int = 0
    replay_seed: int = 0
    cache_dir: str = "runs/model-cache"
    gate: GateConfig = field(default_factory=GateConfig)

    def __post_init__(self):
        if not self.registry_uri:
            raise ValueError("nightly.registry_uri must not be empty")
        if not self.partition_key:
            raise ValueError("nightly.partition_key must not be empty")
        if self.replay_partitions < 0:
            raise ValueError(f"nightly.replay_partitions must be >= 0, got {self.replay_partitions}")


@dataclass(frozen=True)
class RunConfig:
    """One TSDAE run: read → corrupt → train → evaluate.

    name: the run's name; a unique suffix is added per launch (a Ray Train run with the same name and
    storage path would silently resume the old one).
    storage_path: where Ray Train writes checkpoints (local path or s3:// / gs:// URI).
    output_dir: where the reports and the exported models go (local path).
    """

    name: str = "tsdae"
    storage_path: str = "runs/ray"
    output_dir: str = "runs"
    ray_address: str | None = None
    read: ReadConfig = field(default_factory=ReadConfig)
    corrupt: CorruptConfig = field(default_factory=CorruptConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    scale: ScaleConfig = field(default_factory=ScaleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    nightly: NightlyConfig | None = None  # only jobs.nightly reads it


class ConfigError(ValueError):
    """A config file or key that cannot be used; the message names the file and key."""


def _check_type(value, tp, key: str):
    """Accept value if it fits the annotation tp (simple types, Optional, list[...]); else raise."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arm in typing.get_args(tp):
            try:
                return _check_type(value, arm, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: {value!r} does not fit {tp}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{key}: expected null, got {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_check_type(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:  # YAML 1.1 reads "3e-5" (no dot) as a string
            return float(value)
        except ValueError:
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if tp in (int, float, str, bool):
        if isinstance(value, bool) and tp is not bool:
            raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r}")
        if not isinstance(value, tp):
            raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)
    raise ConfigError(f"{key}: unsupported type {tp}")


def from_dict(cls, data, prefix: str = ""):
    """Build dataclass cls from a mapping; unknown keys and wrong types are errors naming the key."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - fields)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"unknown key(s) {[where + k for k in unknown]}; allowed: {sorted(fields)}")
    kwargs = {k: _check_type(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ValueError as e:
        raise ConfigError(str(e)) from e


def load_config(path: str | Path, overrides: dict | None = None) -> RunConfig:
    """Load a run config from YAML; overrides are merged into the mapping (section by section)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: cannot read config: {e}") from e
    for key, value in (overrides or {}).items():
        if isinstance(value, dict):
            data.setdefault(key, {}).update(value)
        else:
            data[key] = value
    try:
        return from_dict(RunConfig, data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from e
