"""cluster.yaml is what `ray up` accepts (Ray's JSON schema, then its own prepare_config and
validate_config, the checks `ray up` runs first) and boots what this project runs: the
project's image on a current GPU host image, credentials on every node, the dashboard reachable
through `ray dashboard` only."""

from __future__ import annotations

import json
import os
import re

import jsonschema
import ray
import yaml
from ray.autoscaler._private.aws.config import DEFAULT_AMI
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load() -> dict:
    with open(os.path.join(ROOT, "cluster.yaml")) as f:
        return yaml.safe_load(f)


def _read(*path: str) -> str:
    with open(os.path.join(ROOT, *path)) as f:
        return f.read()


def _prepared() -> dict:
    """The config as `ray up` sees it after its offline checks."""
    cfg = prepare_config(_load())
    validate_config(cfg)
    return cfg


def _manifest_images() -> set[str]:
    images = set()
    for name in os.listdir(os.path.join(ROOT, "deploy")):
        if name.endswith(".yaml"):
            images |= set(re.findall(r"image: (\S*imagebind-ray\S*)", _read("deploy", name)))
    return images


def test_cluster_yaml_matches_ray_schema():
    schema_path = os.path.join(os.path.dirname(ray.__file__), "autoscaler", "ray-schema.json")
    with open(schema_path) as f:
        schema = json.load(f)
    jsonschema.validate(_load(), schema)


def test_every_node_boots_the_projects_image_on_a_current_host():
    """Without an ImageId Ray falls back to its default Deep Learning AMI (Ubuntu 18.04, CUDA
    11.2, no Python 3.11); without `docker:` nothing pins Python, Ray or torch."""
    cfg = _prepared()
    image = cfg["docker"].get("image")
    assert image and image in _manifest_images(), image  # the image deploy/ builds and runs
    assert not cfg["docker"].get("head_image") and not cfg["docker"].get("worker_image")
    ray_default_amis = {a.lower() for a in DEFAULT_AMI.values()}
    for name, t in cfg["available_node_types"].items():
        ami = t["node_config"].get("ImageId", "")
        assert ami and ami.lower() not in ray_default_amis | {"latest_dlami"}, name
        if ami.startswith("resolve:ssm:"):
            # AWS's public parameter for its current Ubuntu 22.04 GPU base image (driver + docker).
            assert re.fullmatch(
                r"resolve:ssm:/aws/service/deeplearning/ami/x86_64/"
                r"base-oss-nvidia-driver-gpu-ubuntu-2[24]\.04/latest/ami-id",
                ami,
            ), ami
        else:
            assert re.fullmatch(r"ami-[0-9a-f]{8,17}", ami), ami


def test_every_node_has_credentials():
    """Ray gives its own instance profile to the head only: workers reading and writing S3
    need one of their own."""
    cfg = _prepared()
    for name, t in cfg["available_node_types"].items():
        profile = t["node_config"].get("IamInstanceProfile")
        assert profile and (profile.get("Name") or profile.get("Arn")), f"{name}: no profile"


def test_dashboard_is_in_the_image_and_reached_through_ssh():
    cfg = _prepared()
    dockerfile = _read("deploy", "Dockerfile")
    assert f"'ray[default]=={ray.__version__}'" in dockerfile and "boto3" in dockerfile
    setup = " ".join(cfg["setup_commands"])
    assert "ray.dashboard" in setup and "boto3" in setup and ray.__version__ in setup, setup
    head = " ".join(cfg["head_start_ray_commands"])
    # The default security group opens 22 only: `ray dashboard cluster.yaml` tunnels 8265.
    assert "ray start --head" in head and "0.0.0.0" not in head, head
    assert "ray dashboard cluster.yaml" in _read("cluster.yaml")
    assert "ray dashboard cluster.yaml" in _read("docs", "pipelines.md")


def test_cluster_yaml_node_types():
    cfg = _prepared()
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
