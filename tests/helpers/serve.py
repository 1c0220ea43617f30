"""Helpers for tests that run the Serve app: one HTTP proxy per session, apps by name.

Imported by the `test_serve_*` modules (and usable by any module that deploys a Serve app).
Serve's HTTP options are fixed by the first `serve.start` of a Ray session, so every module
must go through `serve_base_url` rather than choosing its own port.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import IO

import httpx

from helpers.net import free_port


def serve_base_url() -> str:
    """Start Serve on 127.0.0.1 and a free port (once per Ray session); its base URL."""
    from ray import serve
    from ray.serve.context import _get_global_client

    try:
        client = _get_global_client()
    except Exception:  # no Serve instance in this Ray session yet
        client = None
    if client is None:
        serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
        client = _get_global_client()
    http = client.http_config
    return f"http://{http.host}:{http.port}"


def wait_ready(url: str, timeout_s: float = 120.0) -> None:
    """Poll `{url}/readyz` until it answers 200."""
    deadline = time.time() + timeout_s
    last = None
    while time.time() < deadline:
        try:
            r = httpx.get(url + "/readyz", timeout=10)
            if r.status_code == 200:
                return
            last = r.text
        except httpx.HTTPError as e:
            last = repr(e)
        time.sleep(0.5)
    raise TimeoutError(f"{url} not ready after {timeout_s} s: {last}")


def start_serve_run(config: Path, env: dict[str, str], log: IO) -> subprocess.Popen:
    """`serve run --address local <config>` (the venv's `serve` CLI) from the repository root,
    its output to `log`, in its own process group so that a test tears it down as one."""
    return subprocess.Popen(
        [str(Path(sys.executable).with_name("serve")), "run", "--address", "local", str(config)],
        cwd=Path(__file__).resolve().parents[2],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
