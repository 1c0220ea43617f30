"""Many re-index runs on one version table (`pipelines.tables.VersionTable`), with and without
compaction: bytes written per run, fragments and deletion files left, and the time to read the
latest version's key columns (what the next run's diff reads) and its whole rows.

    /work/main/.venv/bin/python benchmarks/bench_version_compaction.py [--rows 100000] \
        [--runs 60] [--change 1000] [--dim 256] [--workdir /tmp/bench-compaction] [--json FILE]

Each run does what a re-index run does to the rows table: delete `--change` ids of the latest
version (changed items) and append `--change` rows (their new embeddings), through
`VersionTable.commit`. The two variants run on the same sequence of changes, in this process:
`off` with `VersionTable.compact` replaced by a no-op (the layout before compaction), `on` as
the product runs. Reads are timed three times each, alternating between the variants; the
medians and their ratio (on / off) are printed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import time

import numpy as np
import pyarrow as pa
from _common import tree_bytes, write_results

from pipelines import tables


def _rows(ids: list[str], dim: int, seed: int) -> pa.Table:
    vec = np.random.default_rng(seed).standard_normal((len(ids), dim), np.float32)
    return pa.table(
        {
            "id": ids,
            "fingerprint": [f"etag:{seed}:{i}" for i in ids],
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vec.ravel()), dim),
        }
    )


def run(variant: str, a: argparse.Namespace) -> dict:
    root = os.path.join(a.workdir, variant)
    shutil.rmtree(root, ignore_errors=True)
    table = tables.VersionTable(root, tables.ROWS_TABLE, None)
    if variant == "off":
        table.compact = lambda ds: ds  # the layout without compaction
    first = _rows([f"b{i}" for i in range(a.rows)], a.dim, 0)
    pin = table.commit(None, None, first.to_batches(), first.schema, "v0")
    live = [f"b{i}" for i in range(a.rows)]
    rng = np.random.default_rng(1)  # the same changes for both variants
    written = []
    for r in range(1, a.runs + 1):
        pick = rng.choice(len(live), a.change, replace=False)
        drop = [live[i] for i in pick]
        new = [f"r{r}-{k}" for k in range(a.change)]
        for i, n in zip(sorted(pick), new, strict=True):
            live[i] = n
        before = tree_bytes(table.uri)
        rows = _rows(new, a.dim, r)
        pin = table.commit(pin, pa.array(drop), rows.to_batches(), None, f"v{r}")
        after = tree_bytes(table.uri)
        written.append(sum(s for p, s in after.items() if before.get(p) != s))
    ds = table.open(pin.version)
    frags = ds.get_fragments()
    return {
        "variant": variant,
        "root": root,
        "pin": pin.version,
        "fragments": len(frags),
        "deletion_files": sum(f.metadata.deletion_file is not None for f in frags),
        "rows": ds.count_rows(),
        "written_mb_per_run_mean": round(statistics.mean(written) / 2**20, 2),
        "written_mb_per_run_max": round(max(written) / 2**20, 2),
        "written_mb_total": round(sum(written) / 2**20, 1),
        "written_bytes_total": sum(written),  # the ratio's: a tiny run rounds to 0.0 MB
    }


def read_times(res: dict) -> tuple[float, float]:
    table = tables.VersionTable(res["root"], tables.ROWS_TABLE, None)
    ds = table.open(res["pin"])
    t0 = time.perf_counter()
    ds.to_table(columns=["id", "fingerprint"])
    t1 = time.perf_counter()
    ds.to_table()
    return t1 - t0, time.perf_counter() - t1


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--runs", type=int, default=60)
    p.add_argument("--change", type=int, default=1000)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--workdir", default="/tmp/bench-compaction")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    results = {v: run(v, a) for v in ("off", "on")}
    assert results["off"]["rows"] == results["on"]["rows"] == a.rows
    times: dict[str, list[tuple[float, float]]] = {"off": [], "on": []}
    for _ in range(3):
        for v in ("off", "on"):
            times[v].append(read_times(results[v]))
    for v, r in results.items():
        r["read_keys_s"] = round(statistics.median(t[0] for t in times[v]), 4)
        r["read_all_s"] = round(statistics.median(t[1] for t in times[v]), 4)
        print(
            f"compaction {v:3s}: {r['fragments']:4d} fragments, {r['deletion_files']:4d} "
            f"deletion files; written per run mean {r['written_mb_per_run_mean']:.2f} MB, max "
            f"{r['written_mb_per_run_max']:.2f} MB, total {r['written_mb_total']:.1f} MB; read "
            f"keys {r['read_keys_s']:.3f} s, all {r['read_all_s']:.3f} s"
        )
    on, off = results["on"], results["off"]
    print(
        f"on / off: written {on['written_bytes_total'] / off['written_bytes_total']:.2f}x, "
        "read keys "
        f"{on['read_keys_s'] / off['read_keys_s']:.2f}x, read all "
        f"{on['read_all_s'] / off['read_all_s']:.2f}x"
    )
    write_results(
        a.json, {k: {x: y for x, y in v.items() if x != "root"} for k, v in results.items()}
    )


if __name__ == "__main__":
    main()
