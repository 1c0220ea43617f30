"""Search latency of the vector index at 100k vectors of dimension 1024.

    .venv/bin/python benchmarks/bench_search.py [--n 100000] [--dim 1024] [--queries 500]

Builds, from the same synthetic clustered unit vectors (a mixture of overlapping Gaussians:
real embeddings cluster; pure noise would be the worst case for any inverted-file index),
the exact flat index
(the baseline) and the IVF-Flat index `imagebind_core.index.VectorIndex` builds for large
modalities, then times single-query searches (what one `/v1/search` request does) and prints
p50/p99 latency, speed-up against exact search and recall@10 against exact search, plus a
modality-filtered search. Absolute numbers depend on the machine; compare the ratios.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from imagebind_core.index import VectorIndex


def sample(centres: np.ndarray, n: int, spread: float, rng: np.random.Generator) -> np.ndarray:
    """n unit vectors from a Gaussian mixture around `centres` (spread 1: noise as large as
    the centre, so clusters overlap)."""
    x = centres[rng.integers(0, len(centres), n)]
    x = x + spread * rng.standard_normal(x.shape, dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def time_queries(index: VectorIndex, queries: np.ndarray, top_k: int, modality: str | None):
    lat, results = [], []
    for q in queries:
        t = time.perf_counter()
        hits = index.search(q, top_k, modality)
        lat.append(time.perf_counter() - t)
        results.append([h["id"] for h in hits])
    return np.array(lat) * 1e3, results


def recall(approx: list[list[str]], exact: list[list[str]]) -> float:
    return float(
        np.mean([len(set(a) & set(e)) / len(e) for a, e in zip(approx, exact, strict=True)])
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--queries", type=int, default=500)
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--nprobe", type=int, nargs="+", default=[16, 32, 64])
    p.add_argument("--clusters", type=int, default=1000)
    p.add_argument("--spread", type=float, default=1.0)
    p.add_argument(
        "--threads", type=int, default=1, help="FAISS OpenMP threads (a replica's CPU share)"
    )
    a = p.parse_args()
    import faiss

    faiss.omp_set_num_threads(a.threads)
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((a.clusters, a.dim), dtype=np.float32)
    x = sample(centres, a.n, a.spread, rng)
    ids = [f"item-{i}" for i in range(a.n)]
    mods = ["vision" if i % 4 else "text" for i in range(a.n)]  # 75% vision, 25% text
    # Queries: fresh points of the same mixture (not stored items), the hard case for IVF.
    queries = sample(centres, a.queries, a.spread, rng)
    print(f"n={a.n} dim={a.dim} queries={a.queries} top_k={a.top_k} threads={a.threads}")

    t = time.perf_counter()
    flat = VectorIndex.build(ids, ids, mods, x, flat_threshold=a.n + 1)
    print(f"build exact flat: {time.perf_counter() - t:.1f} s")
    t = time.perf_counter()
    ivf = VectorIndex.build(ids, ids, mods, x)
    print(
        # a modality below the index's flat threshold stays exact (a flat index has no lists)
        f"build IVF-Flat ({ {m: getattr(p.index, 'nlist', 'flat') for m, p in ivf.parts.items()} }"
        " lists): "
        f"{time.perf_counter() - t:.1f} s"
    )

    for filt in (None, "text"):
        lat0, exact = time_queries(flat, queries, a.top_k, filt)
        p50_0, p99_0 = np.percentile(lat0, [50, 99])
        label = f"filter={filt}"
        print(f"[{label}] exact flat      p50 {p50_0:7.2f} ms  p99 {p99_0:7.2f} ms  (baseline)")
        for nprobe in a.nprobe:
            ivf.nprobe = nprobe
            lat, got = time_queries(ivf, queries, a.top_k, filt)
            p50, p99 = np.percentile(lat, [50, 99])
            print(
                f"[{label}] IVF nprobe={nprobe:<4d} p50 {p50:7.2f} ms  p99 {p99:7.2f} ms  "
                f"speed-up p50 x{p50_0 / p50:5.1f}  recall@{a.top_k} {recall(got, exact):.3f}"
            )
    # Self-retrieval: an item's own vector returns it first (exact at any nprobe).
    ivf.nprobe = 1
    own = rng.integers(0, a.n, 200)
    ok = sum(ivf.search(x[i], 1)[0]["id"] == ids[i] for i in own)
    print(f"self-retrieval at nprobe=1: {ok}/{len(own)} first")


if __name__ == "__main__":
    main()
