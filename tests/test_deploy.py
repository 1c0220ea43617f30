"""The Kubernetes manifests in deploy/ are what a real cluster accepts and can run (no cluster
needed): every document validates against the KubeRay CRDs' own OpenAPI schemas (vendored in
tests/data/kuberay/, unknown fields rejected) and Kubernetes' strict schemas
(kubernetes-validate, v1.25-v1.37); every pod meets the "restricted" Pod Security Standard; the
RayService's GPU worker group holds its Serve deployments from start to max_replicas, counted
from the app Ray builds out of serveConfigV2; the configurations they embed are valid for the
code in this repository; the image pins what the tests run."""

from __future__ import annotations

import copy
import gzip
import importlib
import math
import re
import shlex
import tomllib
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import ray
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
CRDS = Path(__file__).resolve().parent / "data" / "kuberay"
KUBERAY_VERSIONS = sorted(p.name for p in CRDS.iterdir() if p.is_dir())
K8S_VERSIONS = [f"1.{m}" for m in range(25, 38)]
MANIFESTS = ["rayjob-embed.yaml", "cronjob-reindex.yaml", "rayservice.yaml"]
CRON_FIELD = r"(\*|\d+(-\d+)?)(/\d+)?(,(\*|\d+(-\d+)?)(/\d+)?)*"
IMAGE = "registry.example.com/imagebind-ray:0.1.0"


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


def reindex_rayjob() -> dict:
    return yaml.safe_load(
        configmap_file(docs("cronjob-reindex.yaml"), "imagebind-reindex-rayjob", "rayjob.yaml")
    )


def all_objects() -> list[tuple[str, dict]]:
    """Every object deploy/ makes: the documents, plus the RayJob the CronJob creates."""
    out = [(f"{n}: {d['kind']}", d) for n in MANIFESTS for d in docs(n)]
    return [*out, ("cronjob-reindex.yaml: the RayJob template", reindex_rayjob())]


def ray_cluster_spec(obj: dict) -> dict:
    # RayJob embeds `rayClusterSpec`, RayService `rayClusterConfig` (every KubeRay release).
    key = {"RayJob": "rayClusterSpec", "RayService": "rayClusterConfig"}[obj["kind"]]
    return obj["spec"][key]


def pod_templates(obj: dict) -> list[tuple[str, dict]]:
    """(where, pod template) for every pod the object makes."""
    kind = obj["kind"]
    if kind == "CronJob":
        return [("CronJob pod", obj["spec"]["jobTemplate"]["spec"]["template"])]
    if kind not in ("RayJob", "RayService"):
        return []
    spec = ray_cluster_spec(obj)
    out = [("head", spec["headGroupSpec"]["template"])]
    out += [(f"worker group {g['groupName']}", g["template"]) for g in spec["workerGroupSpecs"]]
    if kind == "RayJob" and "submitterPodTemplate" in obj["spec"]:
        out.append(("submitter", obj["spec"]["submitterPodTemplate"]))
    return out


# --- KubeRay CRD schemas ------------------------------------------------------------------


def strict(schema: dict) -> dict:
    """A CRD's structural OpenAPI schema as a JSON schema that rejects unknown fields (what the
    API server's strict field validation, kubectl's default since 1.27, does) and knows
    int-or-string."""
    s = {k: v for k, v in schema.items() if not k.startswith("x-kubernetes-")}
    if schema.get("x-kubernetes-int-or-string"):
        s["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if "properties" in s:
        s["properties"] = {k: strict(v) for k, v in s["properties"].items()}
        if "additionalProperties" not in s and not schema.get(
            "x-kubernetes-preserve-unknown-fields"
        ):
            s["additionalProperties"] = False
    if isinstance(s.get("additionalProperties"), dict):
        s["additionalProperties"] = strict(s["additionalProperties"])
    if isinstance(s.get("items"), dict):
        s["items"] = strict(s["items"])
    return s


@cache
def crd_schema(version: str, kind: str) -> dict:
    plural = {"RayJob": "rayjobs", "RayService": "rayservices"}[kind]
    with gzip.open(CRDS / version / f"ray.io_{plural}.yaml.gz", "rt") as f:
        crd = yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    assert crd["spec"]["names"]["kind"] == kind
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return strict(v1["schema"]["openAPIV3Schema"])


def errors(validator: jsonschema.protocols.Validator, obj: dict) -> list[str]:
    return [
        f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
        for e in validator.iter_errors(obj)
    ]


def test_the_strict_crd_schema_rejects_what_kuberay_rejects():
    """The check itself: the field name every KubeRay release rejects, and an unknown field."""
    svc = one(docs("rayservice.yaml"), "RayService")
    bad = copy.deepcopy(svc)
    bad["spec"]["rayClusterSpec"] = bad["spec"].pop("rayClusterConfig")
    job = copy.deepcopy(reindex_rayjob())
    job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0][
        "imagePullPolicyy"
    ] = "Always"
    for version in KUBERAY_VERSIONS:
        v = jsonschema.Draft7Validator(crd_schema(version, "RayService"))
        assert any("rayClusterSpec" in e for e in errors(v, bad)), version
        v = jsonschema.Draft7Validator(crd_schema(version, "RayJob"))
        assert any("imagePullPolicyy" in e for e in errors(v, job)), version


@pytest.mark.parametrize("version", KUBERAY_VERSIONS)
def test_ray_objects_validate_against_the_kuberay_crds(version):
    found = 0
    for where, obj in all_objects():
        if obj["apiVersion"] != "ray.io/v1":
            continue
        found += 1
        validator = jsonschema.Draft7Validator(crd_schema(version, obj["kind"]))
        assert not errors(validator, obj), f"KubeRay {version}, {where}: {errors(validator, obj)}"
    assert found == 3  # the embed RayJob, the re-index RayJob, the RayService


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_object_validates_against_strict_kubernetes_schemas(version):
    """Built-in kinds as they are; custom resources by their metadata (as a ConfigMap's) and
    every pod template they embed (as a v1 PodTemplate)."""
    pod = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}}
    for where, obj in all_objects():
        meta = obj["metadata"]
        name = meta.get("name") or meta["generateName"] + "abcde"  # what the API server appends
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= 63, where
        parts = [(where, obj)]
        if obj["apiVersion"] == "ray.io/v1":
            parts = [
                (f"{where} metadata", {**pod, "kind": "ConfigMap", "metadata": obj["metadata"]})
            ]
            parts += [(f"{where}, {p}", {**pod, "template": t}) for p, t in pod_templates(obj)]
            parts += [
                (f"{where}, autoscaler", {**pod, "template": {"spec": {"containers": [c]}}})
                for c in autoscaler_sidecar(obj)
            ]
        for at, doc in parts:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                raise AssertionError(f"Kubernetes {version}, {at}: {e}") from None


def autoscaler_sidecar(obj: dict) -> list[dict]:
    """The container KubeRay adds to the head pod, as far as autoscalerOptions sets it."""
    opts = ray_cluster_spec(obj).get("autoscalerOptions", {})
    if not ray_cluster_spec(obj).get("enableInTreeAutoscaling"):
        return []
    fields = ("securityContext", "resources", "env", "envFrom", "volumeMounts")
    return [{"name": "autoscaler", "image": IMAGE} | {k: opts[k] for k in fields if k in opts}]


# --- what KubeRay's controller checks beyond the schema (ray-operator utils/validation.go) --


def test_kuberay_controller_rules():
    for where, obj in all_objects():
        if obj["apiVersion"] != "ray.io/v1":
            continue
        meta = obj["metadata"]
        name = meta.get("name") or meta["generateName"] + "x" * 5
        # A DNS-1035 label of at most 47 characters (MaxRayJobNameLength, ...NameLength).
        assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= 47, where
        spec = ray_cluster_spec(obj)
        assert spec["rayVersion"] == ray.__version__, f"{where}: rayVersion != installed Ray"
        for g in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
            # rayStartParams is map[string]string: numbers must be quoted.
            assert all(isinstance(v, str) for v in g["rayStartParams"].values()), where
            assert g["template"]["spec"]["containers"], where
        names = [g["groupName"] for g in spec["workerGroupSpecs"]]
        assert len(set(names)) == len(names), f"{where}: duplicate groupName"
        for g in spec["workerGroupSpecs"]:
            assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], g["groupName"]
        if obj["kind"] != "RayJob":
            continue
        s = obj["spec"]
        rules = s.get("deletionStrategy", {}).get("deletionRules", [])
        if not s.get("shutdownAfterJobFinishes"):
            assert not s.get("ttlSecondsAfterFinished"), where
        if rules:
            assert not s.get("shutdownAfterJobFinishes"), f"{where}: exclusive with deletionRules"
            order = ["DeleteWorkers", "DeleteCluster", "DeleteSelf"]
            for status in ("SUCCEEDED", "FAILED"):
                ttls = {
                    r["policy"]: r["condition"].get("ttlSeconds", 0)
                    for r in rules
                    if r["condition"]["jobStatus"] == status
                }
                seq = [ttls[p] for p in order if p in ttls]
                assert seq == sorted(seq), f"{where}: TTLs out of order for {status}"
        assert s["submissionMode"] in ("K8sJobMode", "HTTPMode", "InteractiveMode")
        if "submitterPodTemplate" in s:
            assert s["submitterPodTemplate"]["spec"]["restartPolicy"] == "Never", where


def test_every_ray_cluster_goes_away_and_the_reindex_rayjobs_do_too():
    """No cluster outlives its job by more than an hour; the scheduled RayJobs are deleted
    (a day after success, a week after failure) instead of piling up."""
    embed = one(docs("rayjob-embed.yaml"), "RayJob")["spec"]
    assert embed["shutdownAfterJobFinishes"] is True
    assert embed["ttlSecondsAfterFinished"] <= 3600
    rules = reindex_rayjob()["spec"]["deletionStrategy"]["deletionRules"]
    for status in ("SUCCEEDED", "FAILED"):
        ttls = {r["policy"]: r["condition"]["ttlSeconds"] for r in rules if
                r["condition"]["jobStatus"] == status}  # fmt: skip
        assert ttls["DeleteCluster"] <= 3600, status
        assert "DeleteSelf" in ttls and ttls["DeleteSelf"] <= 7 * 86400, status


# --- pods ----------------------------------------------------------------------------------


def check_restricted(template: dict, where: str, extra: tuple | list = ()) -> None:
    """The "restricted" Pod Security Standard (kubernetes.io/docs/concepts/security/
    pod-security-standards), for the fields these pods could set."""
    spec = template["spec"]
    pod_sc = spec.get("securityContext", {})
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        assert not spec.get(key), f"{where}: {key}"
    for v in spec.get("volumes", []):
        allowed = {"configMap", "emptyDir", "secret", "projected", "persistentVolumeClaim"}
        assert set(v) - {"name"} <= allowed, f"{where}: volume {v['name']}"
    for c in [*spec["containers"], *spec.get("initContainers", []), *extra]:
        sc = c.get("securityContext", {})
        at = f"{where}, container {c['name']}"
        assert sc.get("allowPrivilegeEscalation") is False, f"{at}: allowPrivilegeEscalation"
        assert not sc.get("privileged"), at
        caps = sc.get("capabilities", {})
        assert "ALL" in caps.get("drop", []), f"{at}: capabilities.drop [ALL]"
        assert set(caps.get("add", [])) <= {"NET_BIND_SERVICE"}, at
        assert (sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot"))) is True, f"{at}: runAsNonRoot"
        # A numeric user: the kubelet cannot check runAsNonRoot against a named one.
        assert sc.get("runAsUser", pod_sc.get("runAsUser", 0)) > 0, f"{at}: runAsUser"
        seccomp = sc.get("seccompProfile", pod_sc.get("seccompProfile", {}))
        assert seccomp.get("type") in ("RuntimeDefault", "Localhost"), f"{at}: seccompProfile"
        for p in c.get("ports", []):
            assert "hostPort" not in p, at


def test_every_pod_is_restricted_and_complete():
    for where, obj in all_objects():
        # KubeRay adds the autoscaler to the head pod with autoscalerOptions.securityContext.
        sidecar = autoscaler_sidecar(obj) if obj["kind"] in ("RayJob", "RayService") else []
        for part, template in pod_templates(obj):
            at = f"{where}, {part}"
            check_restricted(template, at, sidecar if part == "head" else [])
            spec = template["spec"]
            for c in spec["containers"]:
                limits = c.get("resources", {}).get("limits", {})
                assert "cpu" in limits and "memory" in limits, f"{at}: set cpu/memory limits"
            declared = {v["name"] for v in spec.get("volumes", [])}
            for c in spec["containers"]:
                for m in c.get("volumeMounts", []):
                    assert m["name"] in declared, f"{at}: volume {m['name']} not declared"


def image_refs() -> list[tuple[str, str]]:
    out = []
    for where, obj in all_objects():
        for part, template in pod_templates(obj):
            out += [(f"{where}, {part}", c["image"]) for c in template["spec"]["containers"]]
    return out


def test_images_are_fully_named_and_pinned():
    """A registry host (a bare name means docker.io/library/...), a version tag or digest, and
    nothing from bitnami's withdrawn tags."""
    refs = image_refs()
    assert refs
    for where, ref in refs:
        host, _, rest = ref.partition("/")
        assert "." in host or ":" in host or host == "localhost", f"{where}: {ref} has no registry"
        tag = rest.rpartition(":")[2] if ":" in rest else ""
        assert "@sha256:" in ref or re.fullmatch(r"v?\d+\.\d+\.\d+", tag), f"{where}: {ref}"
        assert "bitnami" not in ref, f"{where}: {ref}"
    ours = {ref for _, ref in refs if "imagebind-ray" in ref}
    assert ours == {IMAGE}, ours


# --- the embedded configurations -----------------------------------------------------------


def scripts() -> dict[str, str]:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]["scripts"]


def entrypoint(job: dict, where: str) -> list[str]:
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[0] in scripts(), f"{where}: entrypoint {argv[0]} is not a console script"
    return argv


def mounted_file(job: dict, items: list[dict], path: str) -> str:
    """The content of `path` inside the head container, from the ConfigMap mounted there."""
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    volumes = {v["name"]: v for v in head.get("volumes", [])}
    for m in head["containers"][0].get("volumeMounts", []):
        mount = m["mountPath"].rstrip("/") + "/"
        if path.startswith(mount):
            cm = volumes[m["name"]]["configMap"]["name"]
            return configmap_file(items, cm, path[len(mount) :])
    raise AssertionError(f"{path} is not mounted in the head container")


def test_rayjob_runs_the_embedding_job_with_a_valid_config(tmp_path):
    from pipelines.cli import build_embed_parser as build_parser
    from pipelines.config import load_config

    items = docs("rayjob-embed.yaml")
    job = one(items, "RayJob")
    argv = entrypoint(job, "rayjob-embed")
    args = build_parser().parse_args(argv[1:])
    cfg_file = tmp_path / "embed.yaml"
    cfg_file.write_text(mounted_file(job, items, args.config))
    cfg = load_config(str(cfg_file))
    assert cfg.input.startswith("s3://") and cfg.output.startswith("s3://")
    assert cfg.encoder_defaults.num_gpus > 0
    groups = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert any("nvidia.com/gpu" in c["resources"]["limits"]
               for g in groups for c in g["template"]["spec"]["containers"])  # fmt: skip


def test_cronjob_creates_a_rayjob_running_reindex(tmp_path):
    from pipelines.cli import build_reindex_parser as build_parser
    from pipelines.config import load_reindex_config

    items = docs("cronjob-reindex.yaml")
    cron, template = one(items, "CronJob"), reindex_rayjob()
    spec = cron["spec"]
    fields = spec["schedule"].split()
    assert len(fields) == 5 and all(re.fullmatch(CRON_FIELD, f) for f in fields), spec["schedule"]
    pod = spec["jobTemplate"]["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    # The pod runs `kubectl create -f <the RayJob template>` (the image's entrypoint is kubectl).
    assert "kubectl" in container["image"] and "command" not in container
    args = container["args"]
    assert args[:2] == ["create", "-f"]
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    (mount,) = [m for m in container["volumeMounts"] if args[2].startswith(m["mountPath"])]
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
    argv = entrypoint(template, "reindex RayJob")
    assert argv[0] == "imagebind-reindex"
    args = build_parser().parse_args(argv[1:])
    cfg_file = tmp_path / "reindex.yaml"
    cfg_file.write_text(mounted_file(template, items, args.config))
    assert load_reindex_config(str(cfg_file)).index.root.startswith("s3://")


# --- the RayService ------------------------------------------------------------------------


def rayservice() -> tuple[dict, dict]:
    svc = one(docs("rayservice.yaml"), "RayService")
    assert isinstance(svc["spec"]["serveConfigV2"], str)  # KubeRay takes it as a string
    return svc, yaml.safe_load(svc["spec"]["serveConfigV2"])


def test_rayservice_serves_the_app_over_the_reindexed_index(tmp_path):
    from pipelines.config import load_reindex_config
    from serve.options import AppArgs

    _, serve_cfg = rayservice()
    (app,) = serve_cfg["applications"]
    assert app["name"] and app["route_prefix"] == "/"
    module, attr = app["import_path"].split(":")
    assert callable(getattr(importlib.import_module(module), attr))
    args = AppArgs.model_validate(app["args"])
    cfg_file = tmp_path / "reindex.yaml"
    cfg_file.write_text(
        configmap_file(docs("cronjob-reindex.yaml"), "imagebind-reindex-config", "reindex.yaml")
    )
    assert load_reindex_config(str(cfg_file)).index.root == args.index_uri


def test_rayservice_pods_carry_the_required_api_key():
    """The app refuses to start without the key api_key_env names: every pod that can run a
    replica gets it from a secret that is not optional."""
    svc, serve_cfg = rayservice()
    (app,) = serve_cfg["applications"]
    var = app["args"]["api_key_env"]
    for part, template in pod_templates(svc):
        for c in template["spec"]["containers"]:
            env = {e["name"]: e for e in c.get("env", [])}
            assert var in env, f"{part}: {var} not set"
            ref = env[var]["valueFrom"]["secretKeyRef"]
            assert ref.get("optional") is not True, f"{part}: the API key secret is optional"
            for src in c.get("envFrom", []):
                assert src.get("secretRef", {}).get("name") != ref["name"] or not src[
                    "secretRef"
                ].get("optional"), part


def serve_demand() -> tuple[list[dict], list[dict]]:
    """The replicas Serve asks for at start and at max_replicas, from the application Ray
    builds out of serveConfigV2 the way its controller does (ServeDeploySchema, the app
    builder with its args, build_app)."""
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve._private.build_app import build_app
    from ray.serve._private.utils import import_attr
    from ray.serve.schema import ServeDeploySchema

    _, serve_cfg = rayservice()
    schema = ServeDeploySchema.model_validate(serve_cfg)
    start, peak = [], []
    for app_cfg in schema.applications:
        assert not app_cfg.deployments, "per-deployment overrides: count them too"
        app = call_user_app_builder_with_args_if_necessary(
            import_attr(app_cfg.import_path), app_cfg.args
        )
        built = build_app(app, name=app_cfg.name)
        for d in built.deployments:
            opts = d.ray_actor_options or {}
            need = {
                "name": d.name,
                "GPU": float(opts.get("num_gpus") or 0),
                "CPU": float(opts.get("num_cpus", 1)),
                "memory": float(opts.get("memory") or 0),
            }
            auto = d._deployment_config.autoscaling_config
            if auto is None:
                n0 = n1 = d._deployment_config.num_replicas
            else:
                n0 = auto.initial_replicas or auto.min_replicas
                n1 = auto.max_replicas
            start += [need] * n0
            peak += [need] * n1
    return start, peak


def pods_needed(replicas: list[dict], pod: dict) -> int:
    """First-fit decreasing: one-GPU pods of this size holding every replica (a replica never
    spans pods, so 0.2-GPU replicas pack five to a GPU)."""
    bins: list[dict] = []
    for r in sorted(replicas, key=lambda r: (r["GPU"], r["CPU"]), reverse=True):
        for b in bins:
            if all(b[k] + r[k] <= pod[k] + 1e-9 for k in pod):
                break
        else:
            b = dict.fromkeys(pod, 0.0)
            bins.append(b)
        for k in pod:
            b[k] += r[k]
    return len(bins)


def quantity(q: str | int) -> float:
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([A-Za-z]*)", str(q))
    return float(m.group(1)) * units.get(m.group(2), 1)


def test_rayservice_gpu_group_holds_the_serve_deployments():
    svc, _ = rayservice()
    spec = ray_cluster_spec(svc)
    assert spec["headGroupSpec"]["rayStartParams"].get("num-cpus") == "0"  # no replica there
    (gpu,) = [g for g in spec["workerGroupSpecs"] if g["groupName"] == "gpu"]
    (c,) = gpu["template"]["spec"]["containers"]
    limits = c["resources"]["limits"]
    # What Ray on a KubeRay pod advertises: CPUs and GPUs from the container's limits. Memory is
    # counted at the pod's limit, an upper bound (Ray keeps part for its object store); no
    # replica here asks for memory (memory_bytes unset).
    pod = {
        "GPU": float(limits["nvidia.com/gpu"]),
        "CPU": float(math.floor(quantity(limits["cpu"]))),
        "memory": quantity(limits["memory"]),
    }
    start, peak = serve_demand()
    assert sum(r["GPU"] for r in start) == pytest.approx(2.0)  # vision 1 + five encoders x 0.2
    assert sum(r["GPU"] for r in peak) == pytest.approx(6.0)  # 4 x 1 + 10 x 0.2
    at_start, at_peak = pods_needed(start, pod), pods_needed(peak, pod)
    assert gpu["minReplicas"] >= at_start and gpu["replicas"] >= at_start, (at_start, gpu)
    assert gpu["maxReplicas"] >= at_peak, (at_peak, gpu)
    # ... and no GPU pod the deployments could never use.
    assert gpu["maxReplicas"] == at_peak and gpu["minReplicas"] == at_start, (at_start, at_peak)


# --- the image -----------------------------------------------------------------------------


def makefile_pins() -> dict[str, str]:
    text = (ROOT / "Makefile").read_text()
    (line,) = re.findall(r"^TORCH_PINS\s*:=\s*(.+)$", text, re.M)
    return dict(p.split("==") for p in line.split())


def test_dockerfile_pins_what_the_tests_run():
    text = (DEPLOY / "Dockerfile").read_text()
    m = re.search(r"^FROM rayproject/ray:([\d.]+)-py(\d)(\d+)", text, re.M)
    assert m and m.group(1) == ray.__version__ and (m.group(2), m.group(3)) == ("3", "11")
    (pins,) = re.findall(r'^ARG TORCH_PINS="([^"]+)"', text, re.M)
    assert dict(p.split("==") for p in pins.split()) == makefile_pins()
    # One pip run installs the package together with the pins (the resolver cannot move them),
    # Ray's dashboard and boto3.
    run = re.search(r"^RUN pip install (.+?)(?<!\\)$", text, re.M | re.S).group(1)
    assert "${TORCH_PINS}" in run and "'.[data,serve,index]'" in run, run
    assert f"'ray[default]=={ray.__version__}'" in run and "boto3" in run, run
    assert re.search(r"^USER \d+(:\d+)?$", text, re.M), "a numeric user (runAsNonRoot)"
    assert re.search(r"NVIDIA driver .*\d{3}\.\d+", text), "say which driver the image needs"


def test_the_strict_kubernetes_schema_rejects_unknown_fields():
    """The check itself: a misspelt field in a pod template and in the CronJob."""
    (_, template), *_ = pod_templates(one(docs("rayjob-embed.yaml"), "RayJob"))
    bad = copy.deepcopy(template)
    bad["spec"]["securityContext"]["runAsNonroot"] = True
    cron = copy.deepcopy(one(docs("cronjob-reindex.yaml"), "CronJob"))
    cron["spec"]["jobTemplate"]["spec"]["ttlSecondAfterFinished"] = 60
    pod = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}}
    for doc in ({**pod, "template": bad}, cron):
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(doc, K8S_VERSIONS[-1], strict=True)
