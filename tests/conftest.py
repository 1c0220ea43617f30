"""Shared fixtures: one local Ray per test session, moto's standalone S3 server over real HTTP.

Servers bind to 127.0.0.1 only. Nothing here downloads anything.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator

import pytest
from helpers.net import S3Server, free_port

# Ray: token auth off for local tests; no usage stats; quiet.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# Dummy credentials for the local S3 server; never real ones.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """moto's standalone server (`moto.server`) in a subprocess on 127.0.0.1, real HTTP."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while True:
        try:
            urllib.request.urlopen(url + "/moto-api/", timeout=1)
            break
        except Exception:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise RuntimeError("moto server did not start") from None
            time.sleep(0.2)
    try:
        yield S3Server(url)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for the whole session.

    4 logical CPUs on a 2-core box: Ray Data's checkpoint filter and an encoder actor would
    otherwise take both CPUs and starve the read (see ray-2.60 notes).
    """
    import ray

    if not ray.is_initialized():
        ray.init(
            num_cpus=4,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
            runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled"}},
        )
    yield ray
    # Serve (if started) and Ray are torn down once, at the end of the session.
    try:
        from ray import serve

        serve.shutdown()
    except Exception:
        pass
    ray.shutdown()
