"""The repo's Serve config files: they validate, build, and `serve run configs/serve.yaml` works.

`serve run` runs as a subprocess with its own local Ray (`--address local`), as a user would
start it; only the HTTP port is changed (to a free one) in a copy of the file.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from helpers.net import free_port
from helpers.serve import start_serve_run, wait_ready

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("serve*.yaml"))


def serve_apps(config: dict) -> list:
    from ray.serve.schema import ServeDeploySchema

    return ServeDeploySchema.model_validate(config).applications


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_config_files_validate_and_build(path):
    from ray.serve import Application

    from serve.app import app as builder
    from serve.options import AppArgs

    apps = serve_apps(yaml.safe_load(path.read_text()))
    assert apps
    for a in apps:
        assert a.import_path == "serve.app:app"
        args = AppArgs.model_validate(a.args)
        assert isinstance(builder(args), Application)


def test_autoscaling_settings_reach_serve():
    """Each encoder's autoscaling fields become its deployment's AutoscalingConfig; a
    scale-to-zero encoder still starts with one replica."""
    from serve.app import encoder_app
    from serve.options import AppArgs

    args = AppArgs(
        modalities=["text", "depth"],
        encoder={"upscale_delay_s": 3, "downscale_delay_s": 40, "look_back_period_s": 12},
        encoders={
            "depth": {"min_replicas": 0, "max_replicas": 2, "downscale_to_zero_delay_s": 900},
            "text": {
                "metrics_interval_s": 1,
                "look_back_period_s": 4,
                "max_replicas": 3,
                "target_ongoing_requests": 5,
            },
        },
    )
    depth = encoder_app("depth", args, args.encoder_options("depth"))
    cfg = depth._bound_deployment._deployment_config.autoscaling_config
    assert (cfg.min_replicas, cfg.initial_replicas, cfg.max_replicas) == (0, 1, 2)
    assert (cfg.upscale_delay_s, cfg.downscale_delay_s) == (3, 40)
    assert (cfg.downscale_to_zero_delay_s, cfg.look_back_period_s) == (900, 12)
    assert cfg.target_ongoing_requests == 16  # unset: the encoder's max_batch_size
    text = encoder_app("text", args, args.encoder_options("text"))
    cfg = text._bound_deployment._deployment_config.autoscaling_config
    assert (cfg.min_replicas, cfg.max_replicas, cfg.metrics_interval_s) == (1, 3, 1)
    assert (cfg.look_back_period_s, cfg.target_ongoing_requests) == (4, 5)


def test_rayservice_manifest_args_validate():
    """deploy/rayservice.yaml embeds a serve config: its args must be valid AppArgs too."""
    from serve.options import AppArgs

    manifest = yaml.safe_load((ROOT / "deploy" / "rayservice.yaml").read_text())
    for a in serve_apps(yaml.safe_load(manifest["spec"]["serveConfigV2"])):
        AppArgs.model_validate(a.args)


def test_command_line_args_build_the_app():
    """`serve run serve.app:app preset=tiny modalities=text,vision` hands Serve these strings."""
    from ray.serve import Application
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary

    from serve.app import app as builder

    built = call_user_app_builder_with_args_if_necessary(
        builder, {"preset": "tiny", "modalities": "text,video", "max_inputs": "8"}
    )
    assert isinstance(built, Application)
    with pytest.raises(Exception, match="preset"):
        call_user_app_builder_with_args_if_necessary(builder, {"presett": "tiny"})


def test_bad_args_fail_with_a_sentence():
    from pydantic import ValidationError

    from serve.options import AppArgs

    with pytest.raises(ValidationError, match="max_ongoing_requests"):
        AppArgs(encoder={"max_batch_size": 64, "max_ongoing_requests": 8})
    with pytest.raises(ValidationError, match=r"encoders\.vision"):
        AppArgs(encoders={"vision": {"max_replicas": 0}})
    with pytest.raises(ValidationError, match="unknown preset 'hugh'"):
        AppArgs(preset="hugh")
    with pytest.raises(ValidationError, match="asks for no GPU"):
        AppArgs(device="cuda")
    with pytest.raises(ValidationError, match="modalities"):
        AppArgs(modalities="text,smell")
    # A load window holding under one load report (Serve 2.60 warns; later releases refuse).
    with pytest.raises(ValidationError, match=r"look_back_period_s \(5.0\) must be above"):
        AppArgs(encoder={"look_back_period_s": 5})
    with pytest.raises(ValidationError, match="replica_wait_timeout_s"):
        AppArgs(encoders={"depth": {"min_replicas": 0, "replica_wait_timeout_s": 0}})
    # Command-line style values (strings) are accepted where they are unambiguous.
    args = AppArgs.model_validate({"modalities": "text,video", "max_inputs": "8"})
    assert args.model_modalities() == ["vision", "text"] and args.max_inputs == 8
    assert AppArgs(s3_allowed_prefixes="s3://b/x").s3_allowed_prefixes == ["s3://b/x/"]


def direct_ingress_url(low: int, count: int = 8) -> str:
    """The ingress replica's own HTTP port: Serve allocates them upwards from `low`."""
    for port in range(low, low + count):
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code == 200:
                return f"http://127.0.0.1:{port}"
    raise AssertionError(f"no ingress replica answers on ports {low}-{low + count - 1}")


@pytest.mark.parametrize("mode", ["proxy", "proxy-grpc", "direct-ingress"])
def test_serve_run_config_yaml(tmp_path, mode):
    """`serve run configs/serve.yaml`, as documented, in the three ways docs/serve.md gives:
    as is; with RAY_SERVE_PROXY_USE_GRPC=1 (the proxy reaches the ingress over gRPC); and with
    RAY_SERVE_ENABLE_DIRECT_INGRESS=1, where the ingress replica also answers on its own port,
    with the same embeddings and the same errors as through the proxy."""
    direct_ingress = mode == "direct-ingress"
    config = yaml.safe_load((ROOT / "configs" / "serve.yaml").read_text())
    port = free_port()
    config["http_options"]["port"] = port
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    env.pop("RAY_ADDRESS", None)
    low = free_port()
    if mode == "proxy-grpc":
        env["RAY_SERVE_PROXY_USE_GRPC"] = "1"
    if direct_ingress:
        env["RAY_SERVE_ENABLE_DIRECT_INGRESS"] = "1"
        env["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"] = str(low)
        env["RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"] = str(low + 100)
    log = (tmp_path / "serve-run.log").open("w")
    proc = start_serve_run(path, env, log)  # its own process group: torn down as one below
    url = f"http://127.0.0.1:{port}"
    urls = [url]
    try:
        try:
            wait_ready(url, timeout_s=240)
        except TimeoutError:
            log.flush()
            tail = (tmp_path / "serve-run.log").read_text()[-3000:]
            pytest.fail(f"serve run did not become ready; its log ends with:\n{tail}")
        if direct_ingress:
            urls.append(direct_ingress_url(low))
        got = []
        for u in urls:
            r = httpx.post(u + "/v1/embeddings", json={"input": ["a dog", "a cat"]}, timeout=60)
            assert r.status_code == 200, r.text
            vecs = np.array([d["embedding"] for d in r.json()["data"]])
            assert vecs.shape == (2, 32)
            np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
            got.append(vecs)
            card = httpx.get(u + "/v1/models", timeout=30).json()["data"][0]
            assert card["id"] == "imagebind-tiny" and len(card["modalities"]) == 7
            bad = httpx.post(u + "/v1/embeddings", json={"input": "x", "modality": "smell"})
            assert bad.status_code == 400, bad.text
            assert "unknown modality" in bad.json()["error"]["message"]
            assert httpx.get(u + "/nope", timeout=30).status_code == 404
        np.testing.assert_allclose(got[-1], got[0], atol=1e-6)
    finally:
        # Ctrl-C, as a user would: `serve run` shuts Serve down and its Ray with it.
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)
        # Whatever of that Ray is left (same process group, started by this test) goes too.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
    # The proxy and replicas are Ray workers: they exit once they notice their Ray is gone.
    deadline = time.time() + 60
    for u in urls:
        while True:
            try:
                httpx.get(u + "/healthz", timeout=5)
            except httpx.HTTPError:
                break
            assert time.time() < deadline, f"{u} still answers after serve run stopped"
            time.sleep(1)


def test_dtype_auto_is_resolved_per_encoder_when_the_app_is_built(monkeypatch):
    import imagebind_core.checkpoint as C
    from serve.app import _dtype
    from serve.options import AppArgs

    monkeypatch.setattr(C, "cpu_has_fast_bf16", lambda: False)
    args = AppArgs(dtype="auto", encoders={"vision": {"num_gpus": 1}})
    assert _dtype(args, args.encoder_options("vision")) == "bfloat16"
    assert _dtype(args, args.encoder_options("text")) == "float32"
    monkeypatch.setattr(C, "cpu_has_fast_bf16", lambda: True)
    assert _dtype(args, args.encoder_options("text")) == "bfloat16"
    plain = AppArgs()
    assert _dtype(plain, plain.encoder_options("text")) is None  # float32, as before
