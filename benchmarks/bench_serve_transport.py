"""Ingress -> encoder round trip by transport: Serve's gRPC channel against Ray's object store.

    .venv/bin/python benchmarks/bench_serve_transport.py              # 3 rounds of 200 calls
    .venv/bin/python benchmarks/bench_serve_transport.py --calls 500 --rounds 5

What `serve/ingress.py` chooses between (`GRPC_MAX_BYTES`): one replica calls another, like the
ingress calls an encoder (same replica settings as the app), with the payloads the ingress sends
for one input: text token ids, a compact uint8 image, a float32 image, and a few sizes around
the threshold. The encoder side returns a (k, 1024) float32 array at once, so what is timed is
the hop, not a model. Calls alternate between the two transports so that both see the same
machine load; the ratio gRPC / by reference is within one round.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

PAYLOADS = {
    "text (1, 77) int64": ((1, 77), np.int64),
    "image compact (1, 3, 224, 224) uint8": ((1, 3, 224, 224), np.uint8),
    "image (1, 3, 224, 224) float32": ((1, 3, 224, 224), np.float32),
    "4 images compact uint8": ((4, 3, 224, 224), np.uint8),
    "audio (1, 3, 1, 128, 204) float32": ((1, 3, 1, 128, 204), np.float32),
}


def build(calls: int):
    from ray import serve

    from serve.app import REPLICA_ENV
    from serve.encoder import EncodeCall

    opts = {"num_cpus": 0.25, "runtime_env": {"env_vars": dict(REPLICA_ENV)}}

    @serve.deployment(ray_actor_options=opts)
    class Echo:
        async def embed(self, call: EncodeCall) -> np.ndarray:
            return np.zeros((call.x.shape[0], 1024), np.float32)

    @serve.deployment(ray_actor_options=opts)
    class Caller:
        def __init__(self, encoder) -> None:
            self.by_reference = encoder
            self.grpc = encoder.options(_by_reference=False)

        async def run(self) -> dict[str, dict[str, float]]:
            out: dict[str, dict[str, float]] = {}
            for name, (shape, dtype) in PAYLOADS.items():
                x = np.zeros(shape, dtype)
                times: dict[str, list[float]] = {"by_reference": [], "grpc": []}
                for i in range(calls + 5):  # the first 5 warm both paths
                    for kind in ("by_reference", "grpc") if i % 2 else ("grpc", "by_reference"):
                        h = getattr(self, kind)
                        t0 = time.perf_counter()
                        await h.embed.remote(EncodeCall(x))
                        if i >= 5:
                            times[kind].append(1000 * (time.perf_counter() - t0))
                out[name] = {
                    "bytes": float(x.nbytes),
                    **{f"{k}_p50_ms": statistics.median(v) for k, v in times.items()},
                }
            return out

    return Caller.bind(Echo.bind())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--calls", type=int, default=200, help="calls per payload and transport")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--ray-cpus", type=int, default=4, help="logical CPUs for local Ray")
    a = p.parse_args()

    import ray
    from ray import serve

    ray.init(num_cpus=a.ray_cpus, include_dashboard=False, log_to_driver=False)
    from _common import free_port

    # No HTTP is used; the proxy still binds a port, on loopback.
    serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
    handle = serve.run(build(a.calls), name="transport", route_prefix=None)
    print(f"{'payload':<40} {'bytes':>9} {'by ref ms':>10} {'gRPC ms':>9} {'gRPC/ref':>9}")
    for r in range(a.rounds):
        for name, row in handle.run.remote().result().items():
            ref, grpc = row["by_reference_p50_ms"], row["grpc_p50_ms"]
            print(f"{name:<40} {int(row['bytes']):>9} {ref:>10.2f} {grpc:>9.2f} {grpc / ref:>9.2f}")
        print(f"# round {r + 1}, load average {os.getloadavg()[0]:.1f}", flush=True)
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
