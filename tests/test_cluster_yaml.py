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
