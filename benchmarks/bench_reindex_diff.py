"""The re-index diff + the new version's Lance commit, on the driver vs on Ray Data: the
driver's peak memory.

    RAY_AUTH_MODE=disabled /work/main/.venv/bin/python benchmarks/bench_reindex_diff.py \
        [--sizes 50000 200000] [--dim 1024] [--changed 1000] [--workdir /tmp/bench-rdiff] \
        [--json benchmarks/results/reindex-diff-cpu-2core.json]

For each parent size N (a Lance dataset written in fragments of 50k rows: `id`, `uri`,
`modality`, `fingerprint`, `embedding` float32 x dim) and a listing with `--changed` items
changed, `--changed` deleted and `--changed` added, a fresh process runs one path and reports
its wall time and the growth of the process's peak RSS (`VmHWM`, reset after start-up) over
the diff and the commit of the new version's deletes (`pipelines.tables.VersionTable.commit`;
the embedded rows' append is the same on both paths and not part of this measurement):

- `driver`: what `imagebind-reindex` does below `index.diff_on_ray_rows`: read the parent's
  pinned Lance version (`read_pin`), `diff_listing`, commit;
- `ray`: `diff_on_ray` over the pinned version (`ray.data.read_lance`) + commit, on a local Ray
  (4 logical CPUs); a warm-up diff on 10 rows runs first so one-time imports and worker start
  are not counted.

Both paths' listing (built before the measurement) is on the driver in either case.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

import numpy as np
import pyarrow as pa
from _common import add_table_args, run_child, status_kb, write_results

FILE_ROWS = 50_000


def build(root: str, n: int, dim: int) -> None:
    from pipelines.tables import ROWS_TABLE, VersionTable

    table = VersionTable(root, ROWS_TABLE, None)
    schema = next(_parts(min(n, 1), dim)).schema
    table.commit(None, None, (b for t in _parts(n, dim) for b in t.to_batches()), schema, "parent")


def _parts(n: int, dim: int):
    for s in range(0, n, FILE_ROWS):
        m = min(FILE_ROWS, n - s)
        rng = np.random.default_rng(s)
        vec = rng.standard_normal((m, dim), dtype=np.float32)
        ids = [f"i{i:010d}" for i in range(s, s + m)]
        yield pa.table(
            {
                "id": ids,
                "uri": [f"/c/{i}" for i in ids],
                "modality": ["vision"] * m,
                "fingerprint": ["f"] * m,
                "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vec.ravel()), dim),
            }
        )


def listing(n: int, changed: int) -> pa.Table:
    step = max(1, n // (2 * changed))
    touched = list(range(0, n, step))[: 2 * changed]
    change, delete = set(touched[:changed]), set(touched[changed:])
    ids = [i for i in range(n) if i not in delete]
    fps = ["g" if i in change else "f" for i in ids]
    names = [f"i{i:010d}" for i in ids] + [f"new{k}" for k in range(changed)]
    return pa.table(
        {
            "id": names,
            "uri": [f"/c/{i}" for i in names],
            "modality": ["vision"] * len(names),
            "fingerprint": fps + ["f"] * changed,
        }
    )


def run(path: str, root: str, n: int, changed: int) -> dict:
    from pyarrow.fs import LocalFileSystem

    from pipelines.tables import ROWS_TABLE, Pin, VersionTable, read_pin

    lst = listing(n, changed)
    table = VersionTable(root, ROWS_TABLE, None)
    pin = Pin(table.uri, table.open("parent").version)
    if path == "ray":
        import ray

        from pipelines.diff import diff_on_ray

        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
        diff_on_ray(lst.slice(0, 10), pin, None, LocalFileSystem(), num_partitions=2)
    else:
        from pipelines.diff import diff_listing
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = status_kb("VmRSS")
    t0 = time.perf_counter()
    if path == "ray":
        d = diff_on_ray(lst, pin, None, LocalFileSystem(), parent_count=n)
    else:
        d = diff_listing(lst, read_pin(pin, None), None)
    table.commit(pin, d.drop_ids, [], None, f"run-{path}")
    carried = d.carried_rows
    wall = time.perf_counter() - t0
    return {
        "wall_s": round(wall, 2),
        "driver_peak_growth_mb": round((status_kb("VmHWM") - base) / 1024, 1),
        "carried": carried,
        "to_embed": d.to_embed.num_rows,
        "deleted": d.deleted,
    }


def _folder_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(folder) for f in fs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_table_args(p, sizes=[50_000, 200_000], workdir="/tmp/bench-rdiff")
    p.add_argument("--paths", nargs="+", default=["driver", "ray"])
    p.add_argument("--child", nargs=3, metavar=("PATH", "ROOT", "N"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        path, root, n = a.child
        print(json.dumps(run(path, root, int(n), a.changed)))
        return
    results = []
    for n in a.sizes:
        root = os.path.join(a.workdir, str(n))
        shutil.rmtree(root, ignore_errors=True)
        build(root, n, a.dim)
        parent_mb = _folder_bytes(root) / 2**20
        for path in a.paths:
            me = [sys.executable, __file__, "--changed", str(a.changed)]
            r = run_child([*me, "--child", path, root, str(n)])
            r.update(rows=n, dim=a.dim, changed=a.changed, path=path, parent_mb=round(parent_mb))
            print(json.dumps(r), flush=True)
            results.append(r)
        shutil.rmtree(root, ignore_errors=True)
    write_results(a.json, results)


if __name__ == "__main__":
    main()
