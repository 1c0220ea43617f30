"""The corpus listing of a re-index (`pipelines.plan.list_items`): wall time and the growth of
the process's peak RSS for a manifest corpus of N inline-text rows.

    /work/main/.venv/bin/python benchmarks/bench_listing.py [--sizes 1000000] [--manifests 4] \
        [--workdir /tmp/bench-listing] [--baseline /path/to/other/checkout] [--json FILE] \
        [--plan-only]

The corpus (`--manifests` Parquet manifests of `id`, `text`, `modality` under `--workdir`) is
made once per size. Each measurement runs in a fresh process (its peak is its own); with
`--baseline DIR` the checkout at DIR (its packages first on `PYTHONPATH`) is measured first,
then this one, and the ratios are printed. Inline texts need no store request, so what is
measured is the listing's own cost (manifest reads, rows, Arrow), not a store's latency.
`--plan-only` measures the planning alone (`pipelines.plan.plan_job`: each manifest read for
its ids and kinds, the corpus-wide repeat check), as the re-index's Ray listing runs it on the
driver.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
from _common import run_child, status_kb, write_results


def make_corpus(folder: str, n: int, manifests: int) -> None:
    if os.path.exists(f"{folder}/.done"):
        return
    os.makedirs(folder, exist_ok=True)
    per = -(-n // manifests)
    for k in range(manifests):
        m = max(0, min(per, n - k * per))
        ids = [f"t{k}-{i:09d}" for i in range(m)]
        texts = [f"a caption, number {i} of manifest {k}" for i in range(m)]
        table = pa.table({"id": ids, "text": texts, "modality": ["text"] * m})
        pq.write_table(table, f"{folder}/m{k:04d}.parquet")
    open(f"{folder}/.done", "w").close()


def child(folder: str, plan_only: bool = False) -> dict:
    import pipelines
    from pipelines.config import load_config
    from pipelines.plan import list_items, plan_job

    cfg = load_config(None, {"input": folder, "output": f"{folder}-out", "preset": "tiny"})
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak to the current RSS
    base = status_kb("VmRSS")
    t0 = time.perf_counter()
    if plan_only:
        plan = plan_job(cfg)
        return {
            "rows": sum(sum((s.counts or {}).values()) for s in plan.shards),
            "plan_s": round(time.perf_counter() - t0, 2),
            "peak_growth_mb": round((status_kb("VmHWM") - base) / 1024, 1),
            "code_path": os.path.dirname(os.path.dirname(os.path.abspath(pipelines.__file__))),
        }
    listing = list_items(cfg)
    return {
        "rows": listing.num_rows,
        "wall_s": round(time.perf_counter() - t0, 2),
        "peak_growth_mb": round((status_kb("VmHWM") - base) / 1024, 1),
        "listing_mb": round(listing.nbytes / 2**20, 1),
        "code_path": os.path.dirname(os.path.dirname(os.path.abspath(pipelines.__file__))),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1_000_000])
    p.add_argument("--manifests", type=int, default=4)
    p.add_argument("--workdir", default="/tmp/bench-listing")
    p.add_argument("--baseline", help="a checkout to measure first, for the ratio")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--plan-only", action="store_true", help="measure the planning alone")
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a.plan_only)))
        return
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    codes = ([("baseline", os.path.abspath(a.baseline))] if a.baseline else []) + [("this", here)]
    results = []
    for n in a.sizes:
        folder = os.path.join(a.workdir, f"corpus-{n}-{a.manifests}")
        make_corpus(folder, n, a.manifests)
        by = {}
        for label, code in codes:
            path = os.pathsep.join([code, os.environ.get("PYTHONPATH", "")])
            r = run_child(
                [sys.executable, __file__, "--child", folder]
                + (["--plan-only"] if a.plan_only else []),
                env=dict(os.environ, PYTHONPATH=path),
            )
            r.update(size=n, manifests=a.manifests, code=label)
            print(json.dumps(r), flush=True)
            results.append(r)
            by[label] = r
        if a.baseline:
            b, t = by["baseline"], by["this"]
            wall = "plan_s" if a.plan_only else "wall_s"
            print(
                f"{n:,} rows: peak growth baseline / this = "
                f"{b['peak_growth_mb'] / t['peak_growth_mb']:.2f}x, "
                f"{wall} baseline / this = {b[wall] / t[wall]:.2f}x",
                flush=True,
            )
    write_results(a.json, results)


if __name__ == "__main__":
    main()
