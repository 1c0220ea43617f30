"""The Kubernetes manifests in deploy/ parse and carry what KubeRay and Kubernetes require, and the
configurations they embed are valid for the code in this repository (no cluster needed)."""

from __future__ import annotations

import importlib
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import pytest
import ray
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
CRON_FIELD = r"(\*|\d+(-\d+)?)(/\d+)?(,(\*|\d+(-\d+)?)(/\d+)?)*"


def docs(name: str) -> list[dict[str, Any]]:
    with open(DEPLOY / name) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def one(items: list[dict], kind: str, name: str | None = None) -> dict:
    found = [
        d for d in items if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def configmap_file(items: list[dict], name: str, key: str) -> str:
    return one(items, "ConfigMap", name)["data"][key]


def scripts() -> dict[str, str]:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]["scripts"]


@pytest.mark.parametrize("name", ["rayjob-embed.yaml", "cronjob-reindex.yaml", "rayservice.yaml"])
def test_every_document_is_a_named_kubernetes_object(name):
    for d in docs(name):
        assert isinstance(d.get("apiVersion"), str) and isinstance(d.get("kind"), str), d
        meta = d.get("metadata") or {}
        assert meta.get("name") or meta.get("generateName"), d["kind"]
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", meta["name"]), meta["name"]


def check_pod_template(template: dict, where: str) -> list[dict]:
    spec = template["spec"]
    containers = spec["containers"]
    assert containers, f"{where}: no containers"
    for c in containers:
        assert c["name"] and c["image"], where
        limits = c.get("resources", {}).get("limits", {})
        assert "cpu" in limits and "memory" in limits, f"{where}: set cpu/memory limits"
    # Every mounted volume is declared.
    declared = {v["name"] for v in spec.get("volumes", [])}
    for c in containers:
        for m in c.get("volumeMounts", []):
            assert m["name"] in declared, f"{where}: volume {m['name']} not declared"
    return containers


def check_ray_cluster_spec(spec: dict, where: str) -> None:
    assert spec["rayVersion"] == ray.__version__, f"{where}: rayVersion != installed Ray"
    head = spec["headGroupSpec"]
    # KubeRay's rayStartParams is map[string]string: numbers must be quoted.
    assert all(isinstance(v, str) for v in head["rayStartParams"].values()), where
    check_pod_template(head["template"], f"{where} head")
    groups = spec["workerGroupSpecs"]
    assert groups, f"{where}: no worker groups"
    names = [g["groupName"] for g in groups]
    assert len(set(names)) == len(names), f"{where}: duplicate groupName"
    for g in groups:
        assert isinstance(g["rayStartParams"], dict)
        assert all(isinstance(v, str) for v in g["rayStartParams"].values())
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], g["groupName"]
        check_pod_template(g["template"], f"{where} {g['groupName']}")
    gpu = [
        g
        for g in groups
        for c in g["template"]["spec"]["containers"]
        if "nvidia.com/gpu" in c["resources"]["limits"]
    ]
    assert gpu, f"{where}: no GPU worker group"


def check_rayjob(job: dict, where: str) -> list[str]:
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[0] in scripts(), f"{where}: entrypoint {argv[0]} is not a console script"
    assert spec["shutdownAfterJobFinishes"] is True  # no cluster left running after the job
    assert spec["submissionMode"] in ("K8sJobMode", "HTTPMode", "InteractiveMode")
    check_ray_cluster_spec(spec["rayClusterSpec"], where)
    return argv


def mounted_file(spec: dict, items: list[dict], path: str) -> str:
    """The content of `path` inside the head container, from the ConfigMap mounted there."""
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    volumes = {v["name"]: v for v in head.get("volumes", [])}
    for m in head["containers"][0].get("volumeMounts", []):
        mount = m["mountPath"].rstrip("/") + "/"
        if path.startswith(mount):
            cm = volumes[m["name"]]["configMap"]["name"]
            return configmap_file(items, cm, path[len(mount) :])
    raise AssertionError(f"{path} is not mounted in the head container")


def test_rayjob_runs_the_embedding_job_with_a_valid_config(tmp_path):
    from pipelines.config import load_config
    from pipelines.embed import build_parser

    items = docs("rayjob-embed.yaml")
    job = one(items, "RayJob")
    argv = check_rayjob(job, "rayjob-embed")
    args = build_parser().parse_args(argv[1:])
    cfg_file = tmp_path / "embed.yaml"
    cfg_file.write_text(mounted_file(job["spec"], items, args.config))
    cfg = load_config(str(cfg_file))
    assert cfg.input.startswith("s3://") and cfg.output.startswith("s3://")
    assert cfg.encoder_defaults.num_gpus > 0


def reindex_parts() -> tuple[list[dict], dict, dict]:
    items = docs("cronjob-reindex.yaml")
    template = yaml.safe_load(configmap_file(items, "imagebind-reindex-rayjob", "rayjob.yaml"))
    return items, one(items, "CronJob"), template


def test_cronjob_creates_a_rayjob_running_reindex(tmp_path):
    from pipelines.reindex import build_parser, load_reindex_config

    items, cron, template = reindex_parts()
    assert cron["apiVersion"] == "batch/v1"
    spec = cron["spec"]
    fields = spec["schedule"].split()
    assert len(fields) == 5 and all(re.fullmatch(CRON_FIELD, f) for f in fields), spec["schedule"]
    assert spec["concurrencyPolicy"] in ("Forbid", "Replace", "Allow")
    pod = spec["jobTemplate"]["spec"]["template"]
    assert pod["spec"]["restartPolicy"] in ("OnFailure", "Never")
    (container,) = check_pod_template(pod, "cronjob")
    # The pod runs `kubectl create -f <the RayJob template>` from the mounted ConfigMap.
    cmd = container["command"]
    assert cmd[:3] == ["kubectl", "create", "-f"]
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    mount = container["volumeMounts"][0]
    assert cmd[3].startswith(mount["mountPath"])
    assert volumes[mount["name"]]["configMap"]["name"] == "imagebind-reindex-rayjob"
    # Its service account may create RayJobs.
    sa = pod["spec"]["serviceAccountName"]
    one(items, "ServiceAccount", sa)
    binding = one(items, "RoleBinding")
    assert {"kind": "ServiceAccount", "name": sa} in binding["subjects"]
    role = one(items, "Role", binding["roleRef"]["name"])
    assert any(
        "ray.io" in r["apiGroups"] and "rayjobs" in r["resources"] and "create" in r["verbs"]
        for r in role["rules"]
    )
    # The RayJob: a fresh name per run, imagebind-reindex with a valid config.
    assert template["metadata"]["generateName"].endswith("-")
    argv = check_rayjob(template, "reindex RayJob")
    assert argv[0] == "imagebind-reindex"
    args = build_parser().parse_args(argv[1:])
    cfg_file = tmp_path / "reindex.yaml"
    cfg_file.write_text(mounted_file(template["spec"], items, args.config))
    cfg = load_reindex_config(str(cfg_file))
    assert cfg.index.root.startswith("s3://")


def test_rayservice_serves_the_app_over_the_reindexed_index(tmp_path):
    from serve.schemas import AppArgs

    (svc,) = docs("rayservice.yaml")
    assert svc["apiVersion"] == "ray.io/v1" and svc["kind"] == "RayService"
    spec = svc["spec"]
    assert isinstance(spec["serveConfigV2"], str)  # KubeRay takes it as an embedded string
    serve_cfg = yaml.safe_load(spec["serveConfigV2"])
    (app,) = serve_cfg["applications"]
    assert app["name"] and app["route_prefix"] == "/"
    module, attr = app["import_path"].split(":")
    assert callable(getattr(importlib.import_module(module), attr))
    args = AppArgs.model_validate(app["args"])
    check_ray_cluster_spec(spec["rayClusterSpec"], "rayservice")
    # The endpoint searches the index the scheduled re-index publishes.
    from pipelines.reindex import load_reindex_config

    cfg_file = tmp_path / "reindex.yaml"
    cfg_file.write_text(
        configmap_file(docs("cronjob-reindex.yaml"), "imagebind-reindex-config", "reindex.yaml")
    )
    assert load_reindex_config(str(cfg_file)).index.root == args.index_uri


def test_dockerfile_matches_ray_version():
    text = (DEPLOY / "Dockerfile").read_text()
    m = re.search(r"^FROM rayproject/ray:([\d.]+)-py(\d)(\d+)", text, re.M)
    assert m and m.group(1) == ray.__version__
    assert "[data,serve,index]" in text
