"""The Milvus sink (`pipelines.milvus_sink`) on milvus-lite: a version's change vs a full load,
and query latency against the built-in FAISS index on the same vectors.

    .venv/bin/python benchmarks/bench_milvus_sink.py --n 100000 --change 1000 [--queries 200]

milvus-lite 2.5 is Milvus' engine as one local process on a unix socket (tests/helpers/milvus.py),
not a cluster: the figures are what one machine's engine and the sink's client cost, not a
distributed deployment's. Vectors are synthetic clustered unit vectors (bench_search.sample).
Reports:

- a full load of N rows into an empty collection (`sync_version` with no parent: upserts in
  `--batch-size` rows, then the ids read back to find stale ones);
- the next version's change: `--change` rows upserted (half re-embedded, half new) and
  `--change / 2` ids deleted (`sync_version` with the parent held);
- single-query top-k latency p50/p99 and recall@k against exact search: Milvus with a FLAT
  (exact) index and with AUTOINDEX (what the sink creates by default), the built-in index
  (`imagebind_core.index`, exact flat and IVF-Flat as `index.flat_threshold` picks them) on
  `--threads` FAISS threads.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_search import exact_top, recall, sample, time_queries
from helpers.milvus import milvus_lite

from imagebind_core.index import VectorIndex
from pipelines.config import MilvusSettings
from pipelines.milvus_sink import sync_version


def rows_table(ids: list[str], x: np.ndarray) -> pa.Table:
    return pa.table(
        {
            "id": pa.array(ids, pa.string()),
            "uri": pa.array([f"s3://corpus/{i}" for i in ids], pa.string()),
            "modality": pa.array(["vision"] * len(ids), pa.string()),
            "fingerprint": pa.array(["etag"] * len(ids), pa.string()),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), x.shape[1]),
        }
    )


def pct(lat: np.ndarray) -> dict[str, float]:
    return {"p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99))}


def milvus_queries(uri: str, name: str, queries: np.ndarray, k: int):
    from pymilvus import MilvusClient

    c = MilvusClient(uri=uri)
    lat, got = [], []
    try:
        for q in queries:
            t = time.perf_counter()
            res = c.search(name, data=[q], limit=k, output_fields=["id"])
            lat.append(time.perf_counter() - t)
            got.append({h["id"] for h in res[0]})
    finally:
        c.close()
    return np.array(lat) * 1e3, got


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--change", type=int, default=1000, help="rows upserted by the change")
    p.add_argument("--batch-size", type=int, default=1000)
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--clusters", type=int, default=1000)
    p.add_argument("--spread", type=float, default=1.0)
    p.add_argument("--threads", type=int, default=1, help="FAISS threads while searching")
    p.add_argument("--json", default=None, help="also write the results here")
    a = p.parse_args()
    import faiss

    rng = np.random.default_rng(0)
    centres = rng.standard_normal((a.clusters, a.dim), dtype=np.float32)
    x = sample(centres, a.n, a.spread, seed=1)
    ids = [f"item-{i}" for i in range(a.n)]
    queries = sample(centres, a.queries, a.spread, seed=2)
    want = exact_top([(np.array(ids, dtype=object), x)], queries, a.top_k)
    v1 = rows_table(ids, x)

    # The next version: half of the change re-embedded, half new, change/2 deleted.
    half = a.change // 2
    fresh = sample(centres, a.change, a.spread, seed=3)
    changed_ids = ids[:half]
    new_ids = [f"new-{i}" for i in range(a.change - half)]
    gone = ids[half : half + half]
    keep = ids[half + half :]
    v2 = pa.concat_tables(
        [rows_table(changed_ids + new_ids, fresh), rows_table(keep, x[half + half :])]
    )
    up_ids = changed_ids + new_ids
    out: dict = {
        "engine": "milvus-lite 2.5.1 (Milvus C++ engine, one local process, unix socket)",
        "n": a.n,
        "dim": a.dim,
        "change_upserts": len(up_ids),
        "change_deletes": len(gone),
        "batch_size": a.batch_size,
        "cpus": os.cpu_count(),
    }
    print(json.dumps(out))
    with milvus_lite() as uri:
        for index_type in ("FLAT", "AUTOINDEX"):
            s = MilvusSettings(
                uri=uri, collection=f"bench_{index_type.lower()}", batch_size=a.batch_size,
                index_type=index_type,
            )  # fmt: skip
            full = sync_version(
                s, version="1-a", parent=None, rows=lambda: v1, upsert_ids=None,
                delete_ids=None, dim=a.dim,
            )  # fmt: skip
            assert full.status == "loaded", full
            change = sync_version(
                s, version="2-b", parent="1-a", rows=lambda: v2, upsert_ids=up_ids,
                delete_ids=gone, dim=a.dim,
            )  # fmt: skip
            assert change.status == "applied", change
            # queries on version 1's vectors: reload it with a change back (not timed)
            back = sync_version(
                s, version="3-c", parent="2-b", rows=lambda: v1, upsert_ids=ids[: 2 * half],
                delete_ids=new_ids, dim=a.dim,
            )  # fmt: skip
            assert back.status == "applied", back
            lat, got = milvus_queries(uri, s.collection, queries, a.top_k)
            out[f"milvus_{index_type}"] = {
                "full_load_s": round(full.seconds, 2),
                "change_s": round(change.seconds, 2),
                "search": {**pct(lat), f"recall@{a.top_k}": recall(got, want)},
            }
            print(json.dumps({index_type: out[f"milvus_{index_type}"]}))

    faiss.omp_set_num_threads(a.threads)
    for label, threshold in (("flat", a.n + 1), ("ivf_flat", 20_000)):
        t = time.perf_counter()
        index = VectorIndex.from_table(v1, flat_threshold=threshold, pq_threshold=a.n + 1)
        build_s = time.perf_counter() - t
        lat, got = time_queries(index, queries, a.top_k)
        out[f"faiss_{label}"] = {
            "build_s": round(build_s, 2),
            "search": {**pct(lat), f"recall@{a.top_k}": recall(got, want)},
        }
        print(json.dumps({label: out[f"faiss_{label}"]}))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
