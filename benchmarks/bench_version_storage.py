"""Version storage: the carried-row rewrite (Parquet, today) against Lance, 1,000 rows changed.

    /work/main/.venv/bin/python benchmarks/bench_version_storage.py \
        [--sizes 100000 400000] [--dim 1024] [--changed 1000] [--workdir /tmp/bench-vstore] \
        [--json benchmarks/results/version-storage-cpu-2core.json]

For each table size and each format, one child process builds the parent version (not timed)
and a second child process makes the next version with `--changed` rows replaced by new
vectors; that second process's wall time, bytes written (files added under the root) and peak
RSS (`ru_maxrss`) are what is reported:

- `parquet-rewrite`: what `imagebind-reindex` does with a Parquet version: read the parent's
  rows into one Arrow table, drop the changed ids, write the carried rows again into the new
  version and write the new rows beside them;
- `lance-merge-insert`: one Lance dataset per index root; the new version is one
  `merge_insert("id")` commit (update matched ids, insert the rest): new fragments for the new
  rows plus deletion files for the replaced ones, every other fragment referenced as it is.

Rows: `id` (string), `uri`, `modality`, `fingerprint`, `embedding` (float32 x dim, random unit
vectors: the storage cost does not depend on clustering).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from _common import add_table_args, run_child, tree_bytes, write_results

ROWS_PER_FILE = 1_000_000  # pipelines.publish.CARRIED_ROWS_PER_FILE


def make_rows(start: int, n: int, dim: int, seed: int, tag: str = "v1") -> pa.Table:
    rng = np.random.default_rng(seed)
    vec = rng.standard_normal((n, dim), dtype=np.float32)
    vec /= np.linalg.norm(vec, axis=1, keepdims=True)
    ids = [f"item-{i:010d}" for i in range(start, start + n)]
    return pa.table(
        {
            "id": pa.array(ids, pa.string()),
            "uri": pa.array([f"s3://corpus/{i}.jpg" for i in ids], pa.string()),
            "modality": pa.array(["vision"] * n, pa.string()),
            "fingerprint": pa.array([f"etag:{tag}-{i}" for i in ids], pa.string()),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vec.reshape(-1)), dim),
        }
    )


def changed_rows(n: int, changed: int, dim: int) -> pa.Table:
    """`changed` rows spread over the table (ids every n/changed), with new vectors."""
    step = max(1, n // changed)
    picks = list(range(0, n, step))[:changed]
    tables = [make_rows(i, 1, dim, seed=10_000_000 + i, tag="v2") for i in picks]
    return pa.concat_tables(tables)


# ----------------------------------------------------------------------------- children


def build(fmt: str, root: str, n: int, dim: int) -> None:
    chunk = 50_000
    if fmt == "parquet-rewrite":
        os.makedirs(f"{root}/v1", exist_ok=True)
        for k, start in enumerate(range(0, n, chunk)):
            t = make_rows(start, min(chunk, n - start), dim, seed=start)
            pq.write_table(t, f"{root}/v1/part-{k:05d}.parquet")
    else:
        import lance

        for start in range(0, n, chunk):
            t = make_rows(start, min(chunk, n - start), dim, seed=start)
            lance.write_dataset(t, f"{root}/table.lance", mode="append" if start else "create")


def update(fmt: str, root: str, n: int, dim: int, changed: int) -> dict:
    new = changed_rows(n, changed, dim)
    t0 = time.perf_counter()
    if fmt == "parquet-rewrite":
        parent = pa.concat_tables(
            pq.read_table(f"{root}/v1/{f}") for f in sorted(os.listdir(f"{root}/v1"))
        )
        carried = parent.filter(pc.invert(pc.is_in(parent["id"], new["id"])))
        os.makedirs(f"{root}/v2/carried")
        os.makedirs(f"{root}/v2/embedded")
        for k, start in enumerate(range(0, carried.num_rows, ROWS_PER_FILE)):
            pq.write_table(
                carried.slice(start, ROWS_PER_FILE), f"{root}/v2/carried/part-{k:05d}.parquet"
            )
        pq.write_table(new, f"{root}/v2/embedded/part-00000.parquet")
        total = carried.num_rows + new.num_rows
    else:
        import lance

        ds = lance.dataset(f"{root}/table.lance")
        (ds.merge_insert("id").when_matched_update_all().when_not_matched_insert_all().execute(new))
        ds = lance.dataset(f"{root}/table.lance")
        total = ds.count_rows()
    wall = time.perf_counter() - t0
    return {
        "wall_s": round(wall, 3),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "rows_after": total,
    }


# ----------------------------------------------------------------------------- parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_table_args(p, sizes=[100_000, 400_000], workdir="/tmp/bench-vstore")
    p.add_argument("--formats", nargs="+", default=["parquet-rewrite", "lance-merge-insert"])
    p.add_argument(
        "--child", nargs=4, metavar=("STEP", "FORMAT", "ROOT", "N"), help=argparse.SUPPRESS
    )
    a = p.parse_args()
    if a.child:
        step, fmt, root, n = a.child
        if step == "build":
            build(fmt, root, int(n), a.dim)
        else:
            print(json.dumps(update(fmt, root, int(n), a.dim, a.changed)))
        return
    results = []
    for n in a.sizes:
        for fmt in a.formats:
            root = os.path.join(a.workdir, f"{fmt}-{n}")
            shutil.rmtree(root, ignore_errors=True)
            os.makedirs(root)
            me = [sys.executable, __file__, "--dim", str(a.dim), "--changed", str(a.changed)]
            subprocess.run([*me, "--child", "build", fmt, root, str(n)], check=True)
            before = tree_bytes(root)
            r = run_child([*me, "--child", "update", fmt, root, str(n)])
            after = tree_bytes(root)
            added = sum(s for f, s in after.items() if before.get(f) != s)
            r.update(
                rows=n,
                dim=a.dim,
                changed=a.changed,
                format=fmt,
                table_bytes=sum(before.values()),
                bytes_written=added,
                files_written=sum(1 for f, s in after.items() if before.get(f) != s),
            )
            r["written_pct_of_table"] = round(100 * added / r["table_bytes"], 3)
            print(json.dumps(r), flush=True)
            results.append(r)
            shutil.rmtree(root, ignore_errors=True)
    write_results(a.json, results)


if __name__ == "__main__":
    main()
