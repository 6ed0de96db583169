"""Run configs: every shipped file loads; unknown keys and wrong types are errors naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from jobs.config import ConfigError, RunConfig, from_dict, load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    assert cfg.corrupt.del_ratio == 0.6  # deletes 60%, as in the paper (not keep 60%)


def test_unknown_key_is_named(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*train\.learning_rate"):
        load_config(path)


def test_wrong_type_is_named():
    with pytest.raises(ConfigError, match=r"scale\.num_workers"):
        from_dict(RunConfig, {"scale": {"num_workers": "two"}})


def test_invalid_value_is_rejected():
    with pytest.raises(ConfigError, match="del_ratio"):
        from_dict(RunConfig, {"corrupt": {"del_ratio": 1.5}})
    with pytest.raises(ConfigError, match="pooling"):
        from_dict(RunConfig, {"model": {"pooling": "first"}})
    with pytest.raises(ConfigError, match="eval.tasks"):
        from_dict(RunConfig, {"eval": {"tasks": ["STS99"]}})


def test_yaml_exponent_without_dot_is_a_float(tmp_path):
    path = tmp_path / "lr.yaml"
    path.write_text("train:\n  lr: 3e-5\n")
    assert load_config(path).train.lr == pytest.approx(3e-5)


def test_optional_and_list_fields():
    cfg = from_dict(RunConfig, {"train": {"max_steps": None}, "read": {"uri": ["a.parquet", "b.parquet"]}})
    assert cfg.train.max_steps is None and cfg.read.uri == ["a.parquet", "b.parquet"]
