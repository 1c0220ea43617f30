"""Autoscaling over real HTTP: replicas follow the load up and down, and encoders scale to zero.

One app (TINY, random weights) with three encoders, each showing one behaviour:

- `encoder-text`: 1 to 3 replicas. A bounded load on loopback makes Serve's controller add
  replicas; every request keeps succeeding while they start; after the load the count falls
  back to 1.
- `encoder-imu`: `min_replicas: 0` with a wait (100 s) long enough for a cold start: it goes
  away when idle, the first request afterwards waits for a new replica and succeeds, and the
  replica goes away again. `/readyz` neither waits for it nor wakes it.
- `encoder-depth`: `min_replicas: 0` with a wait shorter than any cold start: the first request
  after idling is a 503 with Retry-After (never a hang), and a client retrying as told is
  served once the replica it triggered is up.

The replica counts come from Serve's status API (`serve.status()`), polled in the test process;
the measured timeline is printed (`pytest -s`) and recorded in docs/serve.md.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import threading
import time

import httpx
import media
import pytest
from helpers.serve import serve_base_url, wait_ready

pytestmark = pytest.mark.slow

APP = "autoscale"
PREFIX = "/autoscale"
# Fast autoscaling for the test: reports every 0.5 s averaged over 2 s, 1 s before adding a
# replica, 2 s before removing one, 3 s of idling before the last of a scale-to-zero encoder.
FAST = {
    "metrics_interval_s": 0.5,
    "look_back_period_s": 2.0,
    "upscale_delay_s": 1.0,
    "downscale_delay_s": 2.0,
}


class Replicas:
    """Polls `serve.status()` in a thread: the replica states of the app's deployments over
    time, and waits on them."""

    def __init__(self, app: str) -> None:
        self.app = app
        self.history: list[tuple[float, dict[str, dict[str, int]]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def now(self) -> dict[str, dict[str, int]]:
        from ray import serve

        app = serve.status().applications.get(self.app)
        if app is None:
            return {}
        return {
            name: {str(k): v for k, v in d.replica_states.items()}
            for name, d in app.deployments.items()
        }

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(Exception):  # the controller busy: try again
                self.history.append((time.monotonic(), self.now()))
            self._stop.wait(0.5)

    def running(self, deployment: str) -> int:
        return self.history[-1][1].get(deployment, {}).get("RUNNING", 0) if self.history else 0

    def total(self, deployment: str) -> int:
        return sum(self.history[-1][1].get(deployment, {}).values()) if self.history else 0

    def first(self, deployment: str, state: str | None, since: float) -> float | None:
        """When the history first shows a replica of `deployment` (in `state`, or in any state
        for None) at or after `since`, in seconds after `since`."""
        for t, snap in self.history:
            states = snap.get(deployment, {})
            if t >= since and (states.get(state, 0) if state else sum(states.values())):
                return t - since
        return None

    def wait(self, what: str, cond, timeout_s: float) -> float:
        """Wait until `cond()` holds; the monotonic time it first did. TimeoutError otherwise."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if cond():
                return time.monotonic()
            time.sleep(0.25)
        raise TimeoutError(f"{what}: not within {timeout_s} s; last states {self.history[-1:]}")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)


@pytest.fixture(scope="module")
def scaling_app(ray_session):
    from ray import serve

    from serve.app import build_app
    from serve.options import AppArgs

    base = serve_base_url()
    args = AppArgs(
        preset="tiny",
        modalities=["text", "imu", "depth"],
        status_interval_s=1.0,
        max_inputs=32,
        encoder={
            "num_cpus": 0.1,
            "health_check_period_s": 1.0,
            # One input per model call and two calls per replica at once: a request of n
            # texts is n chunks, so a few clients put tens of chunks in flight.
            "max_batch_size": 1,
            "max_ongoing_requests": 2,
            "target_ongoing_requests": 2,
            **FAST,
        },
        encoders={
            "text": {"min_replicas": 1, "max_replicas": 3},
            # Waits out a cold start even on a loaded machine (23 s seen at load average 36).
            "imu": {
                "min_replicas": 0,
                "downscale_to_zero_delay_s": 3.0,
                "replica_wait_timeout_s": 100.0,
            },
            "depth": {
                "min_replicas": 0,
                "downscale_to_zero_delay_s": 3.0,
                "replica_wait_timeout_s": 0.5,  # shorter than any cold start
            },
        },
        ingress={"num_cpus": 0.1, "max_ongoing_requests": 256},
        retry_after_s=1,
        request_timeout_s=120,
    )
    serve.run(build_app(args), name=APP, route_prefix=PREFIX, blocking=False)
    url = base + PREFIX
    wait_ready(url)
    replicas = Replicas(APP)
    yield url, replicas
    replicas.close()
    serve.delete(APP)


def post(url: str, kind: str, inputs: list[str], timeout: float = 150) -> httpx.Response:
    return httpx.post(
        url + "/v1/embeddings", json={"input": inputs, "modality": kind}, timeout=timeout
    )


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_replicas_follow_the_load_up_and_down(scaling_app):
    url, replicas = scaling_app
    dep = "encoder-text"
    replicas.wait("text at 1 replica", lambda: replicas.running(dep) == 1, 60)
    statuses: list[int] = []
    status_seen: list[dict] = []
    stop = threading.Event()

    async def load() -> None:
        texts = [f"load text {i}" for i in range(16)]  # 16 chunks per request

        async with httpx.AsyncClient(base_url=url, timeout=120) as ac:

            async def client() -> None:
                while not stop.is_set():
                    r = await ac.post("/v1/embeddings", json={"input": texts})
                    statuses.append(r.status_code)

            async def watch() -> None:
                while not stop.is_set():
                    r = await ac.get("/v1/status")
                    if r.status_code == 200:
                        status_seen.append(r.json()["deployments"][dep])
                    await asyncio.sleep(1)

            await asyncio.gather(*(client() for _ in range(4)), watch())

    t0 = time.monotonic()
    loader = threading.Thread(target=lambda: asyncio.run(load()), daemon=True)
    loader.start()
    try:
        t_more = replicas.wait("a replica added", lambda: replicas.total(dep) > 1, 90)
        t_two = replicas.wait("2 running", lambda: replicas.running(dep) >= 2, 90)
        t_top = replicas.wait("3 running", lambda: replicas.running(dep) == 3, 90)
        time.sleep(3)  # traffic on three replicas
    finally:
        stop.set()
        loader.join(150)
    t_stop = time.monotonic()
    assert not loader.is_alive(), "the load did not stop"
    # Every request succeeded while replicas started (no 503 from a full queue, no 5xx).
    assert statuses and set(statuses) == {200}, sorted(set(statuses))
    # The endpoint's own status route saw the scaling and the queued chunks.
    assert max(s["running"] for s in status_seen) >= 2, status_seen[-3:]
    assert max(s["waiting_chunks"] + s["ongoing_chunks"] for s in status_seen) > 0
    assert status_seen[-1]["min_replicas"] == 1 and status_seen[-1]["max_replicas"] == 3

    t_down = replicas.wait(
        "back to 1 replica", lambda: replicas.total(dep) == 1 and replicas.running(dep) == 1, 120
    )
    assert post(url, "text", ["still served"]).status_code == 200
    print(
        f"\nscale-up/down timeline (encoder-text, 1..3, target 2 chunks/replica, "
        f"{len(statuses)} requests of 16 inputs, all 200): "
        f"first replica added +{t_more - t0:.1f} s, 2 running +{t_two - t0:.1f} s, "
        f"3 running +{t_top - t0:.1f} s; load stopped +{t_stop - t0:.1f} s; "
        f"back to 1 replica {t_down - t_stop:.1f} s after the load stopped"
    )


def test_replicas_and_queues_are_in_prometheus(scaling_app):
    """The operator's view: replicas per deployment and state (ours, from the ingress) and
    chunks waiting / handed over per encoder, next to Serve's own autoscaling gauges; our
    replica gauge follows Serve's status."""
    import ray

    url, replicas = scaling_app
    node = ray.nodes()[0]
    metrics_url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
    app = f'application="{APP}"'
    assert post(url, "text", ["count me"]).status_code == 200
    want = {
        "ray_imagebind_deployment_replicas{": 'serve_deployment="encoder-text"',
        "ray_imagebind_encoder_waiting_chunks{": 'modality="text"',
        "ray_imagebind_encoder_ongoing_chunks{": 'modality="text"',
        "ray_serve_autoscaling_target_replicas{": 'deployment="encoder-text"',
        "ray_serve_deployment_queued_queries{": 'deployment="encoder-text"',
        "ray_serve_num_ongoing_requests_at_replicas{": 'deployment="encoder-text"',
        "ray_serve_deployment_replica_healthy{": 'deployment="encoder-text"',
    }

    def gauge_running_text(lines: list[str]) -> float | None:
        for ln in lines:
            if (
                ln.startswith("ray_imagebind_deployment_replicas{")
                and app in ln
                and 'serve_deployment="encoder-text"' in ln
                and 'state="RUNNING"' in ln
            ):
                return float(ln.rsplit(" ", 1)[1])
        return None

    deadline = time.monotonic() + 60  # replicas push their metrics every few seconds
    while True:
        lines = [ln for ln in httpx.get(metrics_url, timeout=10).text.splitlines() if app in ln]
        missing = [
            k for k, tag in want.items() if not any(ln.startswith(k) and tag in ln for ln in lines)
        ]
        running = gauge_running_text(lines)
        agrees = running is not None and running == replicas.running("encoder-text")
        if (not missing and agrees) or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert not missing, (missing, [ln for ln in lines if "imagebind" in ln][:10])
    assert agrees, (running, replicas.history[-1])


def test_scale_to_zero_then_cold_start_then_zero_again(scaling_app):
    url, replicas = scaling_app
    dep = "encoder-imu"
    imu = b64(media.make_imu_npy(seed=0))
    replicas.wait("imu scaled to zero", lambda: replicas.total(dep) == 0 and replicas.history, 90)
    # Readiness does not wait for a scaled-to-zero encoder, and asking does not wake it.
    for _ in range(3):
        r = httpx.get(url + "/readyz", timeout=30)
        assert r.status_code == 200, r.text
        assert r.json()["deployments"][dep] is False
    time.sleep(3)
    assert replicas.total(dep) == 0, replicas.history[-1]

    t0 = time.monotonic()
    r = post(url, "imu", [imu])
    cold = time.monotonic() - t0
    assert r.status_code == 200, r.text
    assert len(r.json()["data"]) == 1
    replicas.wait("imu running", lambda: replicas.running(dep) == 1, 10)
    t1 = time.monotonic()
    assert post(url, "imu", [imu]).status_code == 200
    warm = time.monotonic() - t1
    t_last = time.monotonic()
    t_zero = replicas.wait("imu back to zero", lambda: replicas.total(dep) == 0, 90)
    seen, up = replicas.first(dep, None, t0), replicas.first(dep, "RUNNING", t0)
    print(
        f"\nscale to zero (encoder-imu, downscale_to_zero_delay_s 3): first request after "
        f"idling answered in {cold:.1f} s (replica listed +{seen:.1f} s, RUNNING +{up:.1f} s; a "
        f"warm request {warm * 1000:.0f} ms); zero again {t_zero - t_last:.1f} s after the "
        "last request"
    )


def test_scaled_to_zero_wait_is_bounded_503_then_served_on_retry(scaling_app):
    url, replicas = scaling_app
    dep = "encoder-depth"
    depth = b64(media.make_depth_png(size=(96, 80), seed=0))
    replicas.wait("depth scaled to zero", lambda: replicas.total(dep) == 0, 90)

    t0 = time.monotonic()
    r = post(url, "depth", [depth], timeout=60)
    first = time.monotonic() - t0
    assert r.status_code == 503, r.text
    assert r.headers["retry-after"] == "1"
    err = r.json()["error"]
    assert err["code"] == "no_replica" and "encoder-depth" in err["message"], err
    assert first < 15, f"the bounded wait (0.5 s) took {first:.1f} s"

    # The refused request started a replica; a client retrying as told is served.
    codes = [503]
    deadline = time.monotonic() + 90
    while codes[-1] != 200 and time.monotonic() < deadline:
        time.sleep(float(r.headers.get("retry-after", 1)))
        r = post(url, "depth", [depth], timeout=60)
        codes.append(r.status_code)
        assert r.status_code in (200, 503), r.text
    assert codes[-1] == 200, codes
    print(
        f"\nscale to zero with a 0.5 s wait (encoder-depth): first request 503 after "
        f"{first:.2f} s, served after {len(codes) - 1} retries, "
        f"{time.monotonic() - t0:.1f} s after the first request"
    )
