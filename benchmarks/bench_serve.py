"""Load test of the Serve endpoint against the encoder's own in-process speed, in one run.

    .venv/bin/python benchmarks/bench_serve.py                        # base preset, text+vision
    .venv/bin/python benchmarks/bench_serve.py --kinds text --concurrency 1,8 --window 10

Starts local Ray + Serve with `preset` (random weights: a model large enough to be the work),
then per kind:

1. in-process baseline, this process, same threads as a replica: one direct call (preprocess +
   encode of one input) alternating with one served request, so both see the same machine
   load, and the model's own throughput at `--max-batch-size` (before and after the load);
2. an asyncio load generator (httpx, one input per request, closed loop) at each concurrency:
   after `--warmup` seconds it counts the requests finishing within `--window` seconds;
3. the ratios: served items/s at saturation / in-process items/s at the same batch size
   (target >= 0.8), the p50 of served - direct latency per pair (target <= 15 ms), and the
   batching gain (items/s at concurrency 32 / at 1).

Absolute numbers depend on the machine and its load; compare the ratios, which are measured
within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
from _common import free_port

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def make_png(seed: int, size: tuple[int, int] = (320, 240)) -> bytes:
    """A photo-sized PNG with gradients and noise (decode + resize cost like a real image)."""
    from PIL import Image

    w, h = size
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy + seed * 37) % 256], -1)
    img = np.clip(img + rng.normal(0, 20, img.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "PNG")
    return buf.getvalue()


def payloads(kind: str, n: int = 64) -> list[bytes | str]:
    if kind == "text":
        words = [
            "dog",
            "cat",
            "car",
            "beach",
            "tree",
            "city",
            "night",
            "river",
            "child",
            "music",
            "red",
            "blue",
            "old",
            "new",
        ]
        rng = np.random.default_rng(0)
        return [" ".join(rng.choice(words, 8 + i % 8)) for i in range(n)]
    if kind == "vision":
        return [make_png(i) for i in range(8)]
    raise SystemExit(f"--kinds: {kind!r} is not benchmarked (text, vision)")


def direct_ingress_url() -> str:
    """The ingress replica's own port: Serve allocates them upwards from this minimum."""
    import httpx

    low = int(os.environ.get("RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT", "30000"))
    for port in range(low, low + 32):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                return f"http://127.0.0.1:{port}"
        except httpx.HTTPError:
            continue
    raise RuntimeError(f"no direct-ingress replica answered on ports {low}-{low + 31}")


def pctl(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q)) if xs else float("nan")


# --------------------------------------------------------------------------- in-process baseline


class Direct:
    """The encoder in this process, same preset, threads and preprocessing as a replica."""

    def __init__(self, kind: str, preset: str, threads: int) -> None:
        import torch

        import imagebind_core as ibc
        from imagebind_core.preprocess import model_modality

        torch.set_num_threads(threads)
        self.kind = kind
        self.m = str(model_modality(kind))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.model = ibc.load_model(None, preset=preset, modalities=[self.m])
        self.data = payloads(kind)

    def call(self, i: int) -> float:
        """One direct call (preprocess + encode one input); its seconds."""
        import torch

        from imagebind_core.preprocess import collate, preprocess

        t0 = time.perf_counter()
        with torch.inference_mode():
            x = collate([preprocess(self.kind, self.data[i % len(self.data)])])
            self.model.encode(self.m, x, normalize=True)
        return time.perf_counter() - t0

    def throughput(self, batch: int, seconds: float) -> float:
        """Model items/s at `batch` (inputs preprocessed beforehand)."""
        import torch

        from imagebind_core.preprocess import collate, preprocess

        x = collate([preprocess(self.kind, self.data[j % len(self.data)]) for j in range(batch)])
        with torch.inference_mode():
            self.model.encode(self.m, x)
            t0 = time.perf_counter()
            n = 0
            while time.perf_counter() - t0 < seconds or n < 2:
                self.model.encode(self.m, x, normalize=True)
                n += 1
            return n * batch / (time.perf_counter() - t0)


def paired_latency(url: str, direct: Direct, seconds: float) -> dict:
    """Alternate one direct call and one served request (concurrency 1), so that both see the
    same machine load; p50 of each and of the per-pair difference."""
    import httpx

    bodies = [
        {
            "input": d if isinstance(d, str) else base64.b64encode(d).decode(),
            "modality": direct.kind,
        }
        for d in direct.data
    ]
    d_lat, s_lat, proc, enc = [], [], [], []
    with httpx.Client(base_url=url, timeout=600) as client:
        t_end = time.perf_counter() + seconds
        i = 0
        while time.perf_counter() < t_end or i < 5:
            d_lat.append(direct.call(i))
            t0 = time.perf_counter()
            r = client.post("/v1/embeddings", json=bodies[i % len(bodies)])
            s_lat.append(time.perf_counter() - t0)
            r.raise_for_status()
            proc.append(float(r.headers["x-processing-ms"]) / 1000)
            enc.append(float(r.headers["x-encode-ms"]) / 1000)
            i += 1
    return {
        "pairs": i,
        "direct_p50_ms": 1000 * statistics.median(d_lat),
        "served_p50_ms": 1000 * statistics.median(s_lat),
        "overhead_p50_ms": 1000 * statistics.median(np.subtract(s_lat, d_lat)),
        "outside_ingress_p50_ms": 1000 * statistics.median(np.subtract(s_lat, proc)),
        "ingress_own_p50_ms": 1000 * statistics.median(np.subtract(proc, enc)),
        "encode_call_p50_ms": 1000 * statistics.median(enc),
    }


# --------------------------------------------------------------------------- load generator


async def load(url: str, kind: str, concurrency: int, warmup: float, window: float) -> dict:
    """Closed-loop clients, one input per request; stats of requests finishing in the window."""
    import httpx

    data = payloads(kind)
    bodies = [
        {"input": d if isinstance(d, str) else base64.b64encode(d).decode(), "modality": kind}
        for d in data
    ]
    t_start = time.perf_counter()
    w0, w1 = t_start + warmup, t_start + warmup + window
    lat: list[float] = []
    errors: dict[int, int] = {}
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:

        async def worker(k: int) -> None:
            i = k
            while time.perf_counter() < w1:
                t0 = time.perf_counter()
                r = await client.post("/v1/embeddings", json=bodies[i % len(bodies)])
                t1 = time.perf_counter()
                i += concurrency
                if w0 <= t1 <= w1:
                    if r.status_code == 200:
                        lat.append(t1 - t0)
                    else:
                        errors[r.status_code] = errors.get(r.status_code, 0) + 1

        tasks = [asyncio.create_task(worker(k)) for k in range(concurrency)]
        await asyncio.sleep(max(0.0, w1 - time.perf_counter()))
        for t in tasks:  # requests still in flight after the window do not count
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return {
        "concurrency": concurrency,
        "items_s": len(lat) / window,
        "p50_ms": 1000 * pctl(lat, 50),
        "p99_ms": 1000 * pctl(lat, 99),
        "completed": len(lat),
        "errors": errors,
    }


# --------------------------------------------------------------------------- main


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", default="base", help="imagebind_core preset (random weights)")
    p.add_argument("--kinds", default="text,vision", help="comma-separated: text, vision")
    p.add_argument("--concurrency", default="1,8,32,64", help="comma-separated client counts")
    p.add_argument("--max-batch-size", type=int, default=16, help="encoder max_batch_size")
    p.add_argument("--batch-wait-ms", type=float, default=0.0, help="batch_wait_timeout_s * 1000")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        # One intra-op thread: on a loaded shared machine two are slower than one (OpenMP
        # barriers wait for descheduled threads); raise it on a quiet machine.
        help="torch threads, replica and baseline",
    )
    p.add_argument("--warmup", type=float, default=10.0, help="seconds before each window")
    p.add_argument("--window", type=float, default=30.0, help="seconds measured per level")
    p.add_argument("--baseline-s", type=float, default=8.0, help="seconds per baseline figure")
    p.add_argument("--ray-cpus", type=int, default=4, help="logical CPUs for local Ray")
    p.add_argument("--json", default=None, help="also write the results to this file")
    p.add_argument(
        "--direct-ingress",
        action="store_true",
        help="RAY_SERVE_ENABLE_DIRECT_INGRESS=1: send requests to the ingress replica's own "
        "HTTP port instead of Serve's proxy",
    )
    p.add_argument(
        "--proxy-grpc",
        action="store_true",
        help="RAY_SERVE_PROXY_USE_GRPC=1: Serve's proxy reaches the ingress over gRPC",
    )
    a = p.parse_args()
    if a.proxy_grpc:
        os.environ["RAY_SERVE_PROXY_USE_GRPC"] = "1"  # before Ray starts: the proxy inherits
    if a.direct_ingress:
        os.environ["RAY_SERVE_ENABLE_DIRECT_INGRESS"] = "1"  # before Ray starts: workers inherit
    kinds = [k for k in a.kinds.split(",") if k]
    levels = [int(c) for c in a.concurrency.split(",") if c]

    import ray
    from ray import serve

    from serve.app import build_app
    from serve.options import AppArgs

    ray.init(num_cpus=a.ray_cpus, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    args = AppArgs(
        preset=a.preset,
        modalities=kinds,
        encoder={
            "num_cpus": 0.5,
            "torch_threads": a.threads,
            "max_batch_size": a.max_batch_size,
            "batch_wait_timeout_s": a.batch_wait_ms / 1000,
            "max_ongoing_requests": max(2 * a.max_batch_size, max(levels)),
            "max_queued_requests": 4 * max(levels),
        },
        ingress={"num_cpus": 0.5, "max_ongoing_requests": 4 * max(levels), "preprocess_threads": 2},
        request_timeout_s=600,
    )
    t0 = time.perf_counter()
    serve.run(build_app(args), name="bench", route_prefix="/", blocking=False)
    url = f"http://127.0.0.1:{port}"
    if a.direct_ingress:
        url = direct_ingress_url()
    print(
        f"# app up in {time.perf_counter() - t0:.1f} s at {url}; preset={a.preset} "
        f"max_batch_size={a.max_batch_size} threads={a.threads}",
        flush=True,
    )

    results = {"args": vars(a), "kinds": {}}
    for kind in kinds:
        asyncio.run(load(url, kind, 1, 0.0, 3.0))  # warm the path (and the replica's kernels)
        direct = Direct(kind, a.preset, a.threads)
        direct.call(0)
        pair = paired_latency(url, direct, a.baseline_s)
        if a.direct_ingress:  # the proxy still runs: its overhead in the same run, for contrast
            via_proxy = paired_latency(f"http://127.0.0.1:{port}", direct, a.baseline_s)
            print(
                f"\n## {kind}: through Serve's proxy instead, {via_proxy['pairs']} pairs: "
                f"overhead p50 {via_proxy['overhead_p50_ms']:.1f} ms [outside ingress "
                f"{via_proxy['outside_ingress_p50_ms']:.1f}]",
                flush=True,
            )
            pair = paired_latency(url, direct, a.baseline_s)  # again, after: drift shows
        before = direct.throughput(a.max_batch_size, a.baseline_s)
        print(
            f"\n## {kind}: concurrency 1, {pair['pairs']} alternating pairs: direct p50 "
            f"{pair['direct_p50_ms']:.1f} ms, served p50 {pair['served_p50_ms']:.1f} ms, "
            f"overhead p50 {pair['overhead_p50_ms']:.1f} ms [outside ingress "
            f"{pair['outside_ingress_p50_ms']:.1f}, ingress own {pair['ingress_own_p50_ms']:.1f}, "
            f"encoder call {pair['encode_call_p50_ms']:.1f}] (load average "
            f"{os.getloadavg()[0]:.1f})",
            flush=True,
        )
        print(
            f"in-process: {before:.2f} items/s at batch {a.max_batch_size} "
            f"(load average {os.getloadavg()[0]:.1f})",
            flush=True,
        )
        print(
            f"{'conc':>5} {'items/s':>9} {'p50 ms':>9} {'p99 ms':>9} {'vs in-proc':>10} "
            f"{'load':>5} errors"
        )
        rows = []
        for c in levels:
            r = asyncio.run(load(url, kind, c, a.warmup, a.window))
            r["vs_inproc"] = r["items_s"] / before
            # 1-minute load average after the window: on a shared machine, the context of
            # every figure (the ratios only mean something when it stayed about the same).
            r["loadavg"] = os.getloadavg()[0]
            rows.append(r)
            print(
                f"{c:>5} {r['items_s']:>9.2f} {r['p50_ms']:>9.1f} {r['p99_ms']:>9.1f} "
                f"{r['vs_inproc']:>10.2f} {r['loadavg']:>5.1f} {r['errors'] or ''}",
                flush=True,
            )
        after = direct.throughput(a.max_batch_size, a.baseline_s)
        inproc = (before + after) / 2  # the machine's load drifts: average both ends
        print(f"in-process: {after:.2f} items/s at batch {a.max_batch_size} (after)", flush=True)
        del direct
        for r in rows:
            r["vs_inproc"] = r["items_s"] / inproc
        by_c = {r["concurrency"]: r for r in rows}
        sat = max(rows, key=lambda r: r["items_s"])
        summary = {
            "inproc_items_s": inproc,
            "saturation_items_s": sat["items_s"],
            "saturation_vs_inproc": sat["vs_inproc"],
            "saturation_concurrency": sat["concurrency"],
            "p50_overhead_ms_at_1": pair["overhead_p50_ms"],
        }
        if 1 in by_c and 32 in by_c:
            summary["batching_gain_32_over_1"] = by_c[32]["items_s"] / by_c[1]["items_s"]
        print("summary: " + ", ".join(f"{k}={v:.2f}" for k, v in summary.items()), flush=True)
        results["kinds"][kind] = {"paired": pair, "levels": rows, "summary": summary}

    serve.shutdown()
    ray.shutdown()
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
