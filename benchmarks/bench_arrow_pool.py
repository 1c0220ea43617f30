"""Arrow's allocators on the work the listing and the re-index diff do to string columns: a
table of `--rows` ids and uris in `--chunks` chunks (a listing's blocks), reordered by hash
partition as Ray Data's join shuffle does it (`Table.take` of every row), in a fresh process
per allocator and round (`ARROW_DEFAULT_MEMORY_POOL`), since an allocator's cost shows on the
first large buffers a process makes.

    /work/main/.venv/bin/python benchmarks/bench_arrow_pool.py [--rows 4000000] [--chunks 40] \
        [--rounds 3] [--json FILE]

Prints per allocator the median seconds of the first and the second take and the process's
peak RSS, and last `first take / jemalloc's: mimalloc <r>x, system <r>x`. The job's default
allocator is `ray.arrow_memory_pool` (docs/pipelines.md).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

from _common import run_child, status_kb, write_results

POOLS = ("jemalloc", "mimalloc", "system")


def child(rows: int, chunks: int) -> dict:
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    per = rows // chunks
    blocks = []
    for c in range(chunks):
        ids = pa.array([f"i{c * per + i:010d}" for i in range(per)])
        blocks.append(
            pa.table({"id": ids, "uri": pc.binary_join_element_wise("/corpus/", ids, ".jpg", "")})
        )
    table = pa.concat_tables(blocks)
    part = np.random.default_rng(0).integers(0, 2, table.num_rows)
    order = pc.sort_indices(pa.array(part))  # rows grouped by partition, as the shuffle does
    times = []
    for _ in range(2):
        t = time.perf_counter()
        out = table.take(order)
        times.append(time.perf_counter() - t)
        del out
    return {
        "pool": pa.default_memory_pool().backend_name,
        "first_take_s": times[0],
        "second_take_s": times[1],
        "peak_rss_mb": status_kb("VmHWM") / 1024,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=4_000_000)
    p.add_argument("--chunks", type=int, default=40)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(child(a.rows, a.chunks)))
        return
    runs = []
    for r in range(a.rounds):
        for pool in POOLS:
            out = run_child(
                [sys.executable, __file__, "--child", "--rows", str(a.rows), "--chunks",
                 str(a.chunks)],
                env=dict(os.environ, ARROW_DEFAULT_MEMORY_POOL=pool),
            )  # fmt: skip
            if out["pool"] != pool:
                raise SystemExit(f"asked for {pool}, Arrow used {out['pool']}")
            out["round"] = r
            print(json.dumps(out), flush=True)
            runs.append(out)
    med = {
        pool: {
            k: statistics.median(x[k] for x in runs if x["pool"] == pool)
            for k in ("first_take_s", "second_take_s", "peak_rss_mb")
        }
        for pool in POOLS
    }
    for pool, m in med.items():
        print(f"{pool:9s} first take {m['first_take_s']:.3f} s, second {m['second_take_s']:.3f} s, "
              f"peak RSS {m['peak_rss_mb']:.0f} MB")  # fmt: skip
    base = med["jemalloc"]["first_take_s"]
    print("first take / jemalloc's: " + ", ".join(
        f"{pool} {med[pool]['first_take_s'] / base:.2f}x" for pool in POOLS[1:]))  # fmt: skip
    write_results(a.json, {"runs": runs, "rows": a.rows, "chunks": a.chunks})


if __name__ == "__main__":
    main()
