"""cluster.yaml is a valid Ray cluster launcher config (the schema `ray up` checks first) with
the node types the embedding job expects."""

from __future__ import annotations

import json
import os

import jsonschema
import ray
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load() -> dict:
    with open(os.path.join(ROOT, "cluster.yaml")) as f:
        return yaml.safe_load(f)


def test_cluster_yaml_matches_ray_schema():
    schema_path = os.path.join(os.path.dirname(ray.__file__), "autoscaler", "ray-schema.json")
    with open(schema_path) as f:
        schema = json.load(f)
    jsonschema.validate(_load(), schema)


def test_cluster_yaml_node_types():
    cfg = _load()
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    gpu = [t for t in types.values() if t["resources"].get("GPU", 0) > 0]
    cpu = [
        t for n, t in types.items() if n != cfg["head_node_type"] and not t["resources"].get("GPU")
    ]
    assert gpu and cpu, "needs a GPU worker type for encoders and a CPU one for decoding"
    for t in gpu + cpu:
        assert t["max_workers"] > t.get("min_workers", 0), "worker types must autoscale"
        assert all(isinstance(v, int) for v in t["resources"].values())
    setup = " ".join(cfg["setup_commands"])
    assert "pip install" in setup and "imagebind-ray[data]" in setup
