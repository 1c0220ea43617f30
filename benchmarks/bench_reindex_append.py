"""A re-index's listing and diff when the corpus only gained a manifest: the run lists only
the new manifest (the parent's `inputs.json` says its manifests are unchanged), against the
same run listing and diffing every item, on the same data. Wall time per size and growth.

    RAY_AUTH_MODE=disabled /work/main/.venv/bin/python benchmarks/bench_reindex_append.py \
        [--sizes 1000000 4000000] [--added 1000] [--manifest-rows 100000] [--rounds 2] \
        [--workdir /tmp/bench-reindex-append] [--json FILE]

For each size N the script writes, once, N items as Parquet manifests of `--manifest-rows`
rows with fingerprints, a parent holding them (a Lance rows table as `imagebind-reindex`
writes it, with 4-wide embeddings: the diff never reads them; `bench_list_and_diff.build`),
and one more manifest of `--added` new items. Each measurement is a fresh process that starts
Ray as the re-index does (`pipelines.embed.ensure_ray`; before the timed part, since the
embedding step starts it in either case) and times `pipelines.reindex._list_and_diff`
against that parent: with the parent's inputs record (`new shards`: the new manifest is
listed, its ids checked against the parent's id column) or without it (`whole`: every
manifest listed and diffed, on Ray Data from 1M parent rows, as before such records).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
from _common import run_child, write_results
from bench_list_and_diff import build

NEW = "zz_new"  # the added manifest's shard name: it sorts after the others


def add_manifest(root: str, added: int) -> None:
    path = f"{root}/corpus/{NEW}.parquet"
    if os.path.exists(path):
        return
    ids = [f"new{i:010d}" for i in range(added)]
    pq.write_table(
        pa.table(
            {
                "id": ids,
                "uri": [f"/corpus/{i}.jpg" for i in ids],
                "modality": ["vision"] * added,
                "fingerprint": ["f"] * added,
            }
        ),
        path,
    )


def child(root: str, n: int, mode: str) -> dict:
    from imagebind_core.index import Pointer
    from pipelines.config import load_reindex_config
    from pipelines.embed import ensure_ray
    from pipelines.plan import input_sources, shard_identities
    from pipelines.publish import IndexRoot
    from pipelines.reindex import _inputs_record, _list_and_diff, _Parent
    from pipelines.tables import ROWS_TABLE, Pin, VersionTable

    cfg = load_reindex_config(
        None, {"input": f"{root}/corpus", "preset": "huge", "index.root": f"{root}/index"}
    )
    table = VersionTable(f"{root}/rows", ROWS_TABLE, None)
    pin = Pin(table.uri, table.open("parent").version)
    inputs = None
    if mode == "new shards":  # what the parent's inputs.json would hold: all but the new one
        fmt, sources = input_sources(cfg.job)
        old = {k: v for k, v in shard_identities(fmt, sources).items() if k != NEW}
        inputs = _inputs_record(cfg, fmt.name, old)
    parent = _Parent(
        Pointer(1, "parent", ""),
        None,
        {"counts": {"total": n}},
        None,
        on_ray=n >= cfg.index.diff_on_ray_rows,
        pins=(pin, None),
        inputs=inputs,
    )
    ensure_ray(cfg.job, ["vision"])
    t0 = time.perf_counter()
    listed, diff = _list_and_diff(cfg, IndexRoot(cfg.index.root, {}), parent)
    wall = time.perf_counter() - t0
    return {
        "wall_s": round(wall, 3),
        "added": diff.added,
        "carried": diff.carried_rows,
        "appended": listed.appended,
        "on_ray": listed.on_ray,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 4_000_000])
    p.add_argument("--added", type=int, default=1000)
    p.add_argument("--manifest-rows", type=int, default=100_000)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--workdir", default="/tmp/bench-reindex-append")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(child(a.child[0], int(a.child[1]), a.child[2])))
        return
    for n in a.sizes:
        build(f"{a.workdir}/n{n}", n, 0, a.manifest_rows)
        add_manifest(f"{a.workdir}/n{n}", a.added)
    modes = ["whole", "new shards"]
    results = []
    for r in range(a.rounds):
        for n in a.sizes:
            for mode in modes:
                out = run_child(
                    [sys.executable, __file__, "--child", f"{a.workdir}/n{n}", str(n), mode]
                )
                out.update(size=n, mode=mode, round=r)
                if out["added"] != a.added or out["carried"] != n:
                    raise SystemExit(f"wrong diff: {out}")
                if out["appended"] != (mode == "new shards"):
                    raise SystemExit(f"listed the wrong way: {out}")
                print(json.dumps(out), flush=True)
                results.append(out)
    med = {
        (m, n): statistics.median(x["wall_s"] for x in results if x["mode"] == m and x["size"] == n)
        for m in modes
        for n in a.sizes
    }
    for (m, n), w in med.items():
        print(f"{m:10s} {n:>11,} parent rows: median list-and-diff wall {w:.3f} s")
    lo, hi = a.sizes[0], a.sizes[-1]
    for m in modes:
        if lo != hi:
            print(f"{m}: wall {hi:,} / {lo:,} = {med[(m, hi)] / med[(m, lo)]:.2f}x")
    for n in a.sizes:
        print(f"{n:,} rows: new shards / whole = {med[('new shards', n)] / med[('whole', n)]:.3f}x")
    write_results(a.json, {"rounds": results, "sizes": a.sizes, "added": a.added})


if __name__ == "__main__":
    main()
