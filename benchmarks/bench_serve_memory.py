"""How much memory an ingress replica takes under a burst of video requests, with its input
budget (`ingress.max_held_input_bytes`) at two sizes, in one run.

    RAY_AUTH_MODE=disabled .venv/bin/python benchmarks/bench_serve_memory.py \
        [--budgets-mb 256 2048] [--requests 16] [--videos 8] [--json FILE]

Starts local Ray + Serve (tiny preset: the model is not the point), deploys one video app per
budget, and sends each the same burst: `--requests` concurrent requests of `--videos` short
videos (each one 18 MB of float32 clips once preprocessed). The ingress replica's resident
memory is sampled every 20 ms from /proc while the burst runs; printed per budget: its growth
at the peak over its size before the burst, and whether every request was answered 200. The
last line compares the peaks.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import sys
import threading
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
from _common import free_port, write_results

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def make_video(seed: int, seconds: float = 1.0, size: tuple[int, int] = (64, 48)) -> bytes:
    import av

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        st = out.add_stream("libx264", rate=Fraction(15))
        st.width, st.height = size
        st.pix_fmt = "yuv420p"
        for _ in range(round(15 * seconds)):
            img = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            for packet in st.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in st.encode():
            out.mux(packet)
    return buf.getvalue()


def replica_pid(app: str) -> int:
    """The process of `app`'s ingress replica (Ray titles it `ray::ServeReplica:<app>:...`)."""
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            with open(f"/proc/{p}/cmdline", "rb") as f:
                title = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if title.startswith(f"ray::ServeReplica:{app}:ingress"):
            return int(p)
    raise RuntimeError(f"no ingress replica of app {app!r} found")


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise KeyError("VmRSS")


def wait_ready(url: str, timeout_s: float = 300.0) -> None:
    import httpx

    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        try:
            if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} not ready after {timeout_s:.0f} s")


async def burst(url: str, videos: list[str], requests: int) -> list[int]:
    import httpx

    body = {"input": videos, "modality": "video"}
    async with httpx.AsyncClient(timeout=600) as c:
        rs = await asyncio.gather(
            *(c.post(f"{url}/v1/embeddings", json=body) for _ in range(requests))
        )
    return [r.status_code for r in rs]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budgets-mb", type=int, nargs="+", default=[256, 2048])
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--videos", type=int, default=8)
    p.add_argument("--json", help="also write the results here")
    a = p.parse_args()

    import ray
    from ray import serve

    from serve.app import build_app
    from serve.options import AppArgs

    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    videos = [base64.b64encode(make_video(i)).decode() for i in range(a.videos)]
    results = []
    for mb in a.budgets_mb:
        app = f"mem{mb}"
        args = AppArgs(
            preset="tiny",
            modalities=["video"],
            encoder={"num_cpus": 0.5, "max_batch_size": 8, "max_ongoing_requests": 64},
            ingress={
                "num_cpus": 0.5,
                "preprocess_threads": 2,
                "max_held_input_bytes": mb * 1024 * 1024,
            },
            max_inputs=max(64, a.videos),
            request_timeout_s=600,
        )
        serve.run(build_app(args), name=app, route_prefix=f"/{app}", blocking=False)
        url = f"http://127.0.0.1:{port}/{app}"
        wait_ready(url)
        asyncio.run(burst(url, videos[:1], 1))  # warm the path
        pid = replica_pid(app)
        before = rss_mb(pid)
        peak = [before]
        done = threading.Event()

        def sample(pid: int = pid, peak: list[float] = peak, done: threading.Event = done):
            while not done.is_set():
                peak[0] = max(peak[0], rss_mb(pid))
                time.sleep(0.02)

        t = threading.Thread(target=sample, daemon=True)
        t.start()
        t0 = time.perf_counter()
        codes = asyncio.run(burst(url, videos, a.requests))
        wall = time.perf_counter() - t0
        done.set()
        t.join()
        out = {
            "budget_mb": mb,
            "rss_before_mb": round(before, 1),
            "rss_peak_growth_mb": round(peak[0] - before, 1),
            "wall_s": round(wall, 2),
            "all_200": all(c == 200 for c in codes),
            "codes": sorted(set(codes)),
        }
        print(json.dumps(out), flush=True)
        results.append(out)
        serve.delete(app)
    held = a.requests * a.videos * 18_063_360 / 2**20
    peaks = ", ".join(
        f"budget {r['budget_mb']} MB: {r['rss_peak_growth_mb']:.0f} MB" for r in results
    )
    print(f"{a.requests} requests x {a.videos} videos ({held:.0f} MB of model inputs if all were "
          f"held at once): peak growth {peaks}")  # fmt: skip
    write_results(a.json, results)


if __name__ == "__main__":
    main()
