"""Run configs: every shipped file loads; unknown keys and wrong types are errors naming the key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jobs.config import ConfigError, RunConfig, load_config, parse_config, preflight

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


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
        parse_config({"scale": {"num_workers": "two"}})


def test_invalid_value_is_rejected():
    with pytest.raises(ConfigError, match="del_ratio"):
        parse_config({"corrupt": {"del_ratio": 1.5}})
    with pytest.raises(ConfigError, match="pooling"):
        parse_config({"model": {"pooling": "first"}})
    with pytest.raises(ConfigError, match="eval.tasks"):
        parse_config({"eval": {"tasks": ["STS99"]}})


def test_yaml_exponent_without_dot_is_a_float(tmp_path):
    path = tmp_path / "lr.yaml"
    path.write_text("train:\n  lr: 3e-5\n")
    assert load_config(path).train.lr == pytest.approx(3e-5)


def test_optional_and_list_fields():
    cfg = parse_config({"train": {"max_steps": None}, "read": {"uri": ["a.parquet", "b.parquet"]}})
    assert cfg.train.max_steps is None and cfg.read.uri == ["a.parquet", "b.parquet"]


def test_values_are_frozen():
    cfg = parse_config({})
    with pytest.raises(ValueError):
        cfg.train.lr = 1.0  # type: ignore[misc]
    assert cfg.train.replace(lr=1e-4).lr == 1e-4 and cfg.train.lr == 3e-5


def test_strict_types_no_silent_coercion():
    for bad in ({"train": {"epochs": 2.0}}, {"train": {"deterministic": "yes"}}, {"scale": {"use_gpu": 1}},
                {"read": {"uri": 5}}):
        with pytest.raises(ConfigError, match=next(iter(bad)) + r"\."):
            parse_config(bad)
    assert parse_config({"train": {"lr": 1}}).train.lr == 1.0  # an int is a valid float


def test_batch_arithmetic_is_checked_against_the_worker_counts_at_load_time():
    with pytest.raises(ConfigError, match=r"train\.global_batch_size 5 is not divisible by 2 workers"):
        parse_config({"train": {"global_batch_size": 5}, "scale": {"num_workers": 2}})
    with pytest.raises(ConfigError, match=r"by 3 workers"):  # the elastic lower bound must split it too
        parse_config({"train": {"global_batch_size": 8}, "scale": {"num_workers": 4, "min_workers": 3}})
    with pytest.raises(ConfigError, match=r"micro_batch_size 3"):
        parse_config({"train": {"global_batch_size": 8, "micro_batch_size": 3}, "scale": {"num_workers": 2}})


def test_dotted_overrides_are_validated_like_the_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  lr: 3.0e-5\n")
    cfg = load_config(path, {"train.lr": 1e-4, "scale.num_workers": 4, "train.global_batch_size": 16})
    assert (cfg.train.lr, cfg.scale.num_workers, cfg.train.global_batch_size) == (1e-4, 4, 16)
    with pytest.raises(ConfigError, match=r"train\.lrr"):
        load_config(path, {"train.lrr": 1e-4})


def test_shipped_schema_is_generated_from_the_config_models():
    from jobs.config import SCHEMA_PATH, json_schema

    assert json.loads(SCHEMA_PATH.read_text()) == json_schema(), \
        "configs/schema.json is stale: python -m jobs.config --schema > configs/schema.json"
    assert set(json_schema()["properties"]) >= {"read", "corrupt", "model", "train", "scale", "eval", "nightly"}


def test_preflight_names_what_does_not_exist(tmp_path):
    from jobs.config import preflight

    sts = str(ROOT / "data/sts")
    preflight(parse_config({"eval": {"sts_dir": sts}}))  # the defaults point at things that exist
    with pytest.raises(ConfigError, match=r"model\.name_or_path: .*/nonexistent/model"):
        preflight(parse_config({"model": {"name_or_path": "/nonexistent/model"}, "eval": {"sts_dir": sts}}))
    with pytest.raises(ConfigError, match=r"model\.name_or_path: .*pip install no-such-model"):
        preflight(parse_config({"model": {"name_or_path": "package:no_such_model"}, "eval": {"sts_dir": sts}}))
    with pytest.raises(ConfigError, match=r"eval\.sts_dir: no data for \['STS12'"):
        preflight(parse_config({"eval": {"sts_dir": str(tmp_path), "tasks": ["STS12"], "validation_task": None}}))
    with pytest.raises(ConfigError, match=r"eval\.production_model"):
        preflight(parse_config({"eval": {"sts_dir": sts, "production_model": str(tmp_path / "gone")}}))
    with pytest.raises(ConfigError, match=r"eval\.custom_sets\[0\]\.uri"):
        preflight(parse_config({"eval": {"sts_dir": sts, "custom_sets": [{"name": "m", "uri": str(tmp_path / "x.csv")}]}}))


@pytest.mark.parametrize("change, key", [
    ({"train": {"global_batch_size": 5}}, "train.global_batch_size"),
    ({"model": {"name_or_path": "/nonexistent/model"}}, "model.name_or_path"),
    ({"eval": {"tasks": ["STS99"]}}, "eval.tasks"),
])
def test_a_bad_config_exits_2_naming_the_key_before_ray_starts(tmp_path, change, key):
    """What a new user met: a batch that does not split ran the base evaluation for 235 s and died with a
    traceback (exit 1); a missing model exited 5 after 35 s. Now both, and an unknown task, exit 2 at once."""
    import subprocess
    import sys

    import yaml

    cfg = yaml.safe_load((ROOT / "configs/demo.yaml").read_text())
    for section, values in change.items():
        cfg[section].update(values)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = subprocess.run([sys.executable, "-m", "jobs.run", "--config", str(path)], cwd=ROOT, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 2, out.stderr[-2000:]
    assert key in out.stderr and "Traceback" not in out.stderr
    # "At once": before Ray starts and before any stage (no wall-clock bound: a loaded machine is slow).
    assert "Started a local Ray instance" not in out.stderr and "=== stage" not in out.stderr


@pytest.mark.parametrize("name", ["../escape", "a/b", "with space", ".hidden"])
def test_a_run_name_that_is_not_one_path_component_is_refused_by_key(name):
    with pytest.raises(ConfigError, match="name"):
        parse_config({"name": name})


def test_uris_are_refused_where_their_filesystem_is_missing_or_unknown(monkeypatch):
    # s3fs and gcsfs come with the project (the cloud extra): a bucket is where a cluster run's outputs belong
    cfg = parse_config({"output_dir": "gs://bucket/runs",
                        "read": {"uri": ["data/corpus/demo.parquet", "nosuchfs://bucket/x.parquet"]}})
    with pytest.raises(ConfigError) as e:
        preflight(cfg)
    message = str(e.value)
    assert "output_dir" not in message
    assert "read.uri[1]: 'nosuchfs://bucket/x.parquet': no filesystem is known for nosuchfs://" in message

    import fsspec

    def not_installed(protocol):
        raise ImportError("Install s3fs to access S3")

    monkeypatch.setattr(fsspec, "get_filesystem_class", not_installed)
    with pytest.raises(ConfigError, match=r"read.uri: 's3://bucket/corpus/' needs a filesystem that is not "
                                          r"installed: Install s3fs to access S3"):
        preflight(parse_config({"read": {"uri": "s3://bucket/corpus/"}}))
    with pytest.raises(ConfigError, match=r"output_dir: 'gs://bucket/runs' needs a filesystem that is not installed"
                                          r".*pip install 'tsdae-ray\[cloud\]'"):
        preflight(parse_config({"output_dir": "gs://bucket/runs"}))


def test_local_storage_is_refused_on_a_cluster_of_several_nodes_unless_declared_shared():
    from jobs.config import shared_disk_problems

    nightly = {"nightly": {"registry_uri": "/mnt/registry"}}
    cfg = parse_config({"storage_path": "runs/ray", **nightly})
    assert shared_disk_problems(cfg, nodes=1) == []
    problems = shared_disk_problems(cfg, nodes=2)
    assert [p.split(":")[0] for p in problems] == ["storage_path", "nightly.registry_uri"]
    assert "'runs/ray' is a local path, and the Ray cluster has 2 nodes" in problems[0]
    assert "scale.shared_filesystem: true" in problems[0]
    assert shared_disk_problems(parse_config({"storage_path": "file:///data/ray"}), nodes=3)  # still local
    assert shared_disk_problems(parse_config({"storage_path": "runs/ray", "scale": {"shared_filesystem": True},
                                              **nightly}), nodes=2) == []
    assert shared_disk_problems(parse_config({"storage_path": "s3://bucket/ray",
                                              "nightly": {"registry_uri": "mlflow://tsdae"}}), nodes=2) == []


def test_custom_resources_name_a_custom_resource_with_a_positive_amount():
    cfg = parse_config({"scale": {"resources_per_worker": {"worker_node": 1}, "resources_per_preprocess_actor": {"w": 0.5}},
                        "eval": {"resources": {"worker_node": 0.01}}})
    assert cfg.scale.resources_per_worker == {"worker_node": 1.0} and cfg.eval.resources == {"worker_node": 0.01}
    with pytest.raises(ConfigError, match=r"scale.resources_per_worker: 'GPU' is one of Ray's own resources"):
        parse_config({"scale": {"resources_per_worker": {"GPU": 1}}})
    with pytest.raises(ConfigError, match=r"eval.resources: 'worker_node': amount must be > 0"):
        parse_config({"eval": {"resources": {"worker_node": 0}}})
