"""Search and update of the vector index on synthetic clustered vectors (D = 1024).

    .venv/bin/python benchmarks/bench_search.py --n 250000 [--nlist 1024] [--queries 200]

Builds, from synthetic clustered unit vectors (a mixture of overlapping Gaussians: real
embeddings cluster; pure noise would be the worst case for any inverted-file index), the
IVF-PQ index `imagebind_core.index.VectorIndex` uses for large modalities (with re-ranking
vectors stored), saves it, and reports:

- build time, and the index files' bytes (PQ codes + ids + quantizer, rows, re-ranking
  vectors) against the raw float32 vectors (N x D x 4);
- single-query latency p50/p99 on `--threads` FAISS threads (one core by default) and
  recall@10 against exact search, per nprobe and re-rank factor;
- the resident memory of a fresh process that loads the saved index (what one search replica
  holds; the re-ranking vectors are memory-mapped and counted once touched);
- an update with `--change` items changed (half re-embedded, half new) and as many deleted:
  time, bytes written and recall afterwards (tests/test_search_shards.py checks that shards
  merge to one index's answer and that an update keeps a rebuild's recall).

Queries are fresh points of the same mixture (not stored items), the hard case for IVF.
The vectors are never all in memory: they are made in seeded blocks of 65,536 whenever they
are read (the build's two passes, exact search before and after the update), so sizes past
this machine's RAM run (4M x 1024 float32 is 16 GB).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa

from imagebind_core.index import (
    IndexOptions,
    VectorIndex,
    check_query,
    merge_hits,
    update_index,
)

BLOCK = 65_536


def sample(centres: np.ndarray, n: int, spread: float, seed: int | list[int]) -> np.ndarray:
    """n unit float32 vectors from a Gaussian mixture around `centres` (made in blocks)."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, centres.shape[1]), np.float32)
    for s in range(0, n, 65_536):
        m = min(65_536, n - s)
        x = centres[rng.integers(0, len(centres), m)]
        x = x + spread * rng.standard_normal(x.shape, dtype=np.float32)
        out[s : s + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def table(ids: list[str], x: np.ndarray) -> pa.Table:
    return pa.table(
        {
            "id": pa.array(ids, pa.string()),
            "uri": pa.array([f"s3://corpus/{i}" for i in ids], pa.string()),
            "modality": pa.array(["vision"] * len(ids), pa.string()),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), x.shape[1]),
        }
    )


class Corpus:
    """The N stored vectors, made block by block (block b from seed [1, b]) on each read."""

    def __init__(self, centres: np.ndarray, n: int, spread: float) -> None:
        self.centres, self.n, self.spread = centres, n, spread

    def ids(self, pos: np.ndarray) -> np.ndarray:
        return np.array([f"item-{i}" for i in pos.tolist()], dtype=object)

    def blocks(self):
        """(positions, ids, vectors) per block."""
        for b, s in enumerate(range(0, self.n, BLOCK)):
            pos = np.arange(s, min(s + BLOCK, self.n))
            yield pos, self.ids(pos), sample(self.centres, len(pos), self.spread, seed=[1, b])

    def tables(self):
        for _, ids, x in self.blocks():
            yield table(ids.tolist(), x)


def exact_top(blocks, queries: np.ndarray, k: int) -> list[set]:
    """The ids of each query's exact top-k over (ids, vectors) blocks, kept as they stream."""
    best_s = np.full((len(queries), 0), -np.inf, np.float32)
    best_i = np.empty((len(queries), 0), dtype=object)
    for ids, x in blocks:
        s = queries @ x.T
        kk = min(k, s.shape[1])
        top = np.argpartition(-s, kk - 1, axis=1)[:, :kk]
        cand_s = np.concatenate([best_s, np.take_along_axis(s, top, 1)], 1)
        cand_i = np.concatenate([best_i, ids[top]], 1)
        keep = np.argsort(-cand_s, axis=1, kind="stable")[:, :k]
        best_s, best_i = np.take_along_axis(cand_s, keep, 1), np.take_along_axis(cand_i, keep, 1)
    return [set(r.tolist()) for r in best_i]


def time_queries(index: VectorIndex, queries: np.ndarray, k: int):
    lat, got = [], []
    for q in queries:
        t = time.perf_counter()
        hits = index.search(q, k)
        lat.append(time.perf_counter() - t)
        got.append({h["id"] for h in hits})
    return np.array(lat) * 1e3, got


def evict(index: VectorIndex) -> None:
    """Drop the re-ranking vectors' pages from this process's mappings (MADV_DONTNEED) and
    from the page cache (POSIX_FADV_DONTNEED): the next reads of them go to the disk."""
    import mmap

    for sh in index.shards.values():
        for g in sh.segments:
            for part in g.parts.values():
                m = getattr(part.vectors, "_mmap", None)
                if m is None:
                    continue
                m.madvise(mmap.MADV_DONTNEED)
                with open(part.vectors.filename, "rb") as f:
                    os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def prefetch_ab(index: VectorIndex, queries: np.ndarray, k: int, cold: bool) -> dict:
    """p50/p99 of searches with `will_need` (the product) and without it (a no-op in its
    place), alternated query by query, in the same order for both; `cold`: every search
    starts with the re-ranking vectors evicted (`evict`), else after one untimed pass."""
    import imagebind_core.index as core

    real = core.will_need
    sides = {"with": real, "without": lambda arr, rows: None}
    lat: dict[str, list[float]] = {name: [] for name in sides}
    got: dict[str, list[list]] = {name: [] for name in sides}
    try:
        if not cold:
            time_queries(index, queries, k)
        for j, q in enumerate(queries):
            for name in sorted(sides, reverse=bool(j % 2)):
                core.will_need = sides[name]
                if cold:
                    evict(index)
                t = time.perf_counter()
                hits = index.search(q, k)
                lat[name].append((time.perf_counter() - t) * 1e3)
                got[name].append([(h["id"], h["score"]) for h in hits])
    finally:
        core.will_need = real
    assert got["with"] == got["without"], "prefetching changed an answer"
    return {
        name: dict(zip(("p50_ms", "p99_ms"), np.percentile(v, [50, 99]).tolist(), strict=True))
        for name, v in lat.items()
    }


def search_per_segment(index: VectorIndex, q: np.ndarray, k: int) -> list[dict]:
    """`index.search` with each segment computing its own coarse assignment (the baseline of
    the shared one)."""
    x, o, depth = check_query(q, k, None, index.dim), index.options, index.rerank_depths
    return merge_hits(
        [
            merge_hits([g.search(x, k, None, o.nprobe, depth, None) for g in sh.segments], k)
            for sh in index.shards.values()
        ],
        k,
    )


def shared_vs_per_segment(index: VectorIndex, queries: np.ndarray, k: int) -> dict:
    """p50/p99 of searches sharing one coarse assignment and of per-segment ones,
    alternated query by query (same warm state); the answers must agree."""
    lat: dict[str, list[float]] = {"shared": [], "per_segment": []}
    for q in queries:
        t = time.perf_counter()
        a = index.search(q, k)
        lat["shared"].append(time.perf_counter() - t)
        t = time.perf_counter()
        b = search_per_segment(index, q, k)
        lat["per_segment"].append(time.perf_counter() - t)
        assert [h["id"] for h in a] == [h["id"] for h in b]
    return {
        name: dict(
            zip(("p50_ms", "p99_ms"), np.percentile(np.array(v) * 1e3, [50, 99]), strict=True)
        )
        for name, v in lat.items()
    }


def recall(got: list[set], want: list[set]) -> float:
    return float(np.mean([len(g & w) / len(w) for g, w in zip(got, want, strict=True)]))


def du(path: str) -> dict[str, int]:
    """Bytes under `path` by kind of file."""
    out = {"faiss": 0, "rows": 0, "rerank_vectors": 0, "other": 0}
    for d, _, files in os.walk(path):
        for f in files:
            n = os.path.getsize(os.path.join(d, f))
            key = (
                "faiss"
                if f.endswith((".faiss", ".labels.npy", ".order.npy"))
                else "rows"
                if f == "rows.parquet"
                else "rerank_vectors"
                if f.endswith(".vectors.npy")
                else "other"
            )
            out[key] += n
    return out


REPLICA = """
import json, sys, numpy as np, faiss, pyarrow.parquet
from imagebind_core.index import VectorIndex
def rss():
    with open("/proc/self/status") as f:
        st = dict(line.split(":", 1) for line in f)
    return {k: int(st[k].split()[0]) for k in ("VmRSS", "RssAnon", "RssFile")}
before = rss()
index = VectorIndex.load(sys.argv[1])
loaded = rss()
for v in np.load(sys.argv[2]):
    index.search(v, 10)
print(json.dumps({"before": before, "loaded": loaded, "queried": rss()}))
"""


def replica_memory(path: str, queries: np.ndarray, rerank: int) -> dict:
    """Peak RSS of a fresh process that loads the index and runs the queries."""
    qfile = os.path.join(path, "..", "queries.npy")
    np.save(qfile, queries)
    meta = os.path.join(path, "meta.json")
    with open(meta) as f:
        doc = json.load(f)
    doc["options"]["rerank"] = rerank
    with open(meta, "w") as f:
        json.dump(doc, f)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run(
        [sys.executable, "-c", REPLICA, path, qfile], capture_output=True, text=True, env=env
    )
    if out.returncode:
        raise RuntimeError(out.stderr)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=250_000)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--nlist", type=int, default=None, help="IVF lists (default ~4 sqrt(n))")
    p.add_argument("--nprobe", type=int, nargs="+", default=[16, 32, 64])
    p.add_argument(
        "--rerank",
        type=lambda v: v if v == "auto" else int(v),
        nargs="+",
        default=[0, 4, 10],
        help='re-ranking depths to search at; "auto": the depth the index measures for itself '
        "(`rerank: auto`: the build measures it; measured again on the loaded index, timed)",
    )
    p.add_argument("--pq-m", type=int, default=64)
    p.add_argument("--clusters", type=int, default=1000)
    p.add_argument("--spread", type=float, default=1.0)
    p.add_argument("--change", type=int, default=1000, help="items changed in the update")
    p.add_argument("--threads", type=int, default=1, help="FAISS threads while searching")
    p.add_argument("--dir", default=None, help="scratch folder (default: a temporary one)")
    p.add_argument(
        "--warm-up",
        action="store_true",
        help="run each setting's queries once untimed before timing them (the re-ranking "
        "vectors they read are then in the page cache, as on a replica serving hot queries); "
        "without it, each setting's first touch of its candidates' pages is timed",
    )
    p.add_argument(
        "--prefetch-ab",
        action="store_true",
        help="after the search table, time each re-ranking setting with and without "
        "`will_need` (the candidates' pages asked of the kernel at once), alternated query by "
        "query, cold (the vectors' pages evicted before every search) and warm; then stop",
    )
    p.add_argument(
        "--reuse",
        action="store_true",
        help="search the v1 index an earlier run with the same --n --dim --clusters --spread "
        "--nlist --pq-m left in --dir instead of building it (the vectors are re-made from "
        "their seeds for the exact answers)",
    )
    a = p.parse_args()
    import faiss

    work = a.dir or tempfile.mkdtemp(prefix="bench-search-")
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((a.clusters, a.dim), dtype=np.float32)
    corpus = Corpus(centres, a.n, a.spread)
    queries = sample(centres, a.queries, a.spread, seed=2)
    raw = a.n * a.dim * 4
    print(
        f"n={a.n} dim={a.dim} raw={raw / 2**20:.0f} MiB queries={a.queries} "
        f"threads={a.threads} cpus={os.cpu_count()}"
    )
    fixed = [r for r in a.rerank if r != "auto"] or [0]
    top = max(fixed)
    auto = "auto" in a.rerank
    opts = dict(
        flat_threshold=1, pq_threshold=1, nlist=a.nlist, pq_m=a.pq_m, rerank="auto" if auto else top
    )
    t0 = time.perf_counter()
    v1 = os.path.join(work, "v1")
    if a.reuse:
        if not a.dir or not os.path.exists(os.path.join(v1, "meta.json")):
            p.error("--reuse needs --dir with the v1 index of an earlier run")
        build_s = None
        kinds = {m: part.kind for m, part in VectorIndex.load(v1).parts.items()}
        shutil.rmtree(os.path.join(work, "v2"), ignore_errors=True)
        print(f"build: reused {v1}  kinds={kinds}")
    else:
        r = update_index(
            v1,
            parent_uri=None,
            upserts=table([], np.zeros((0, a.dim), np.float32)),
            deletes=[],
            all_rows=corpus.tables,
            options=IndexOptions(**opts),
        )
        build_s = time.perf_counter() - t0
        print(
            f"build (train + add + save): {build_s:.1f} s  "
            f"kinds={ {m: p.kind for m, p in r.parts.items()} }"
        )
    sizes = du(v1)
    print(
        "index bytes: "
        + ", ".join(
            f"{k} {v / 2**20:.1f} MiB ({100 * v / raw:.1f}% of raw)" for k, v in sizes.items()
        )
    )

    index = VectorIndex.load(v1)
    calibrate_s = None
    if auto:  # measured (again: it is seeded, the same depth) on the loaded index, timed
        index.options = dataclasses.replace(index.options, rerank="auto")
        t0 = time.perf_counter()
        index.calibrate_rerank()
        calibrate_s = time.perf_counter() - t0
        print(f"rerank auto: {index.rerank_depths} measured in {calibrate_s:.1f} s")
    training = index.training
    print(f"training: {json.dumps(training)}")
    exact = exact_top(((i, x) for _, i, x in corpus.blocks()), queries, a.top_k)
    faiss.omp_set_num_threads(a.threads)
    results = []
    for rerank in a.rerank:
        for nprobe in a.nprobe:
            index.options = dataclasses.replace(index.options, nprobe=nprobe, rerank=rerank)
            depths = index.rerank_depths
            label = f"auto({max(depths.values())})" if isinstance(depths, dict) else str(rerank)
            if a.warm_up:  # the same queries once, untimed: their vectors' pages cached
                time_queries(index, queries, a.top_k)
            lat, got = time_queries(index, queries, a.top_k)
            p50, p99 = np.percentile(lat, [50, 99])
            rec = recall(got, exact)
            results.append(
                {
                    "rerank": label if rerank == "auto" else rerank,
                    "nprobe": nprobe,
                    "p50_ms": p50,
                    "p99_ms": p99,
                    "recall": rec,
                }
            )
            print(
                f"rerank={label:<9s} nprobe={nprobe:<4d} p50 {p50:7.2f} ms  p99 {p99:7.2f} ms"
                f"  recall@{a.top_k} {rec:.3f}"
            )
    if a.prefetch_ab:
        ab = []
        for rerank in (r for r in fixed if r):
            index.options = dataclasses.replace(index.options, nprobe=a.nprobe[0], rerank=rerank)
            for cold in (True, False):
                r = prefetch_ab(index, queries, a.top_k, cold)
                w, wo = r["with"], r["without"]
                ab.append({"rerank": rerank, "nprobe": a.nprobe[0], "cold": cold, **r})
                print(
                    f"rerank={rerank:<3d} nprobe={a.nprobe[0]:<4d} {'cold' if cold else 'warm'}: "
                    f"p50/p99 with will_need {w['p50_ms']:7.2f} / {w['p99_ms']:7.2f} ms, without "
                    f"{wo['p50_ms']:7.2f} / {wo['p99_ms']:7.2f} ms; with/without p50 "
                    f"{w['p50_ms'] / wo['p50_ms']:.2f}x p99 {w['p99_ms'] / wo['p99_ms']:.2f}x"
                )
        print("RESULTS " + json.dumps({"n": a.n, "dim": a.dim, "prefetch_ab": ab}))
        return
    faiss.omp_set_num_threads(os.cpu_count() or 1)

    for rerank in sorted({0, top}):
        mem = replica_memory(v1, queries, rerank)
        b, q = mem["before"], mem["queried"]
        anon, file_ = q["RssAnon"] - b["RssAnon"], q["RssFile"] - b["RssFile"]
        print(
            f"replica RSS growth (rerank={rerank}, after load + queries): "
            f"anonymous {anon / 1024:.0f} MiB ({anon * 1024 / raw * 100:.1f}% of raw), "
            f"file-backed (mapped re-rank vectors) {file_ / 1024:.0f} MiB"
        )

    # The update: change/2 re-embedded, change/2 new, change deleted.
    half = a.change // 2
    upd = np.random.default_rng(3).permutation(a.n)
    changed, deleted = upd[:half], upd[half : half + a.change]
    new_x = sample(centres, a.change - half, a.spread, seed=4)
    ch_x = sample(centres, half, a.spread, seed=5)
    new_ids = [f"new-{i}" for i in range(a.change - half)]
    upserts = table(corpus.ids(changed).tolist() + new_ids, np.vstack([ch_x, new_x]))
    replaced = dict(zip(changed.tolist(), range(half), strict=True))
    gone = np.zeros(a.n, bool)
    gone[deleted] = True

    def after_update():
        """The corpus after the update, as (ids, vectors) blocks."""
        for pos, bids, bx in corpus.blocks():
            for j, p_ in enumerate(pos.tolist()):
                if p_ in replaced:
                    bx[j] = ch_x[replaced[p_]]
            yield bids[~gone[pos]], bx[~gone[pos]]
        yield np.array(new_ids, dtype=object), new_x

    v2 = os.path.join(work, "v2")
    t0 = time.perf_counter()
    r2 = update_index(
        v2,
        parent_uri=v1,
        upserts=upserts,
        deletes=corpus.ids(deleted).tolist(),
        all_rows=None,
        options=index.options,
    )
    upd_s = time.perf_counter() - t0
    written = sum(du(v2).values())
    print(
        f"update ({a.change} changed: {half} re-embedded, {a.change - half} new; "
        f"{a.change} deleted): mode={r2.mode} {upd_s:.1f} s, wrote {written / 2**20:.1f} MiB "
        f"({100 * written / raw:.1f}% of raw)"
    )
    exact2 = exact_top(after_update(), queries, a.top_k)
    updated = VectorIndex.load(v2)
    faiss.omp_set_num_threads(a.threads)
    for rerank in sorted({0, top}):
        updated.options = dataclasses.replace(updated.options, nprobe=32, rerank=rerank)
        _, got = time_queries(updated, queries, a.top_k)
        print(
            f"after update, rerank={rerank} nprobe=32: recall@{a.top_k} {recall(got, exact2):.3f}"
        )
    if auto:
        updated.options = dataclasses.replace(updated.options, nprobe=32, rerank="auto")
        _, got = time_queries(updated, queries, a.top_k)
        print(
            f"after update, rerank=auto({max(updated.rerank_depths.values())}) nprobe=32: "
            f"recall@{a.top_k} {recall(got, exact2):.3f}"
        )
    updated.options = dataclasses.replace(updated.options, nprobe=32, rerank=top)
    segs = sum(len(sh.segments) for sh in updated.shards.values())
    cmp = shared_vs_per_segment(updated, queries, a.top_k)
    sh, ps = cmp["shared"], cmp["per_segment"]
    print(
        f"after update ({segs} segments), nprobe=32 rerank={top}: one coarse "
        f"assignment p50 {sh['p50_ms']:.2f} ms p99 {sh['p99_ms']:.2f} ms; per segment p50 "
        f"{ps['p50_ms']:.2f} ms p99 {ps['p99_ms']:.2f} ms; p50 ratio "
        f"{ps['p50_ms'] / sh['p50_ms']:.2f}x"
    )
    del updated, index
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    print(
        f"peak RSS of this process: "
        f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GiB"
    )
    print(
        "RESULTS "
        + json.dumps(
            {
                "n": a.n,
                "dim": a.dim,
                "build_s": build_s,
                "calibrate_s": calibrate_s,
                "training": training,
                "sizes": sizes,
                "search": results,
                "update_s": upd_s,
                "update_written": written,
                "after_update_search": cmp,
            }
        )
    )
    if not a.dir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
