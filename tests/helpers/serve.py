"""Helpers for tests that run the Serve app: one HTTP proxy per session, apps by name.

Imported by the `test_serve_*` modules (and usable by any module that deploys a Serve app).
Serve's HTTP options are fixed by the first `serve.start` of a Ray session, so every module
must go through `serve_base_url` rather than choosing its own port.
"""

from __future__ import annotations

import socket
import time

import httpx


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
