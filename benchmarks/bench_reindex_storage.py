"""A re-index with a fixed number of rows changed on a large parent: bytes written, wall time
and driver peak RSS of the run, split into version rows, index and the rest.

    RAY_AUTH_MODE=disabled /work/main/.venv/bin/python benchmarks/bench_reindex_storage.py \
        [--sizes 250000 1000000] [--diff-on-ray-rows N] [--dim 1024] [--changed 1000] \
        [--workdir /tmp/bench-rstore] [--json benchmarks/results/reindex-storage-cpu-2core.json] \
        [--runs 1] [--keep] [--baseline /path/to/other/checkout] [--manifest-rows 100000]

`pipelines.reindex.reindex` runs as it is (lease, parent read, diff, version rows, index
update, record, compare-and-swap publish, retention) on a local index root, with two steps
replaced so that no model runs and no corpus of N files is needed: the corpus listing is a
synthetic table (`id`, `uri`, `modality`, `fingerprint`, ...) and the embedding step writes
random float32 vectors of `--dim` (1024, 512 or 32: the `huge`, `base` or `tiny` preset's
embedding size, the run's lineage) for the rows to embed into the stage's `data/embedded/`
(Parquet, as the embedding job does). The first run builds the parent (N rows, not measured);
each measured run (`--runs`, each in a fresh process, on the version the previous one
published) changes the fingerprint of `--changed` rows no earlier run changed.
The embedding job's cost (the same on any layout) is therefore left out: what is measured is
what the version layout and the index cost. The synthetic listing is made before the measured
window (`listing_made_s`; the run then holds its `listing_mb`, as it holds a real listing);
`timings_s` is the run's own phase breakdown from its version record. With
`--manifest-rows R` the listing is not replaced: the same rows are written, before each
measured run, as Parquet manifests of R rows (`id`, `uri`, `modality`, `fingerprint`) that the
run lists itself (`pipelines.plan`), so the listing's cost is measured too.

Bytes written: the sizes of the files under the index root that are new or changed after the
run, by area: `rows` (the version's rows: `rows.lance`/`failures.lance`, or a version's
`data/carried/`), `embedded` (`data/embedded/`), `index` (the version's `index/`), `keys`
(its key snapshot's files, `pipelines.keys`), `other`.
The same script runs against any commit whose `pipelines.reindex` has `_list_corpus` and
`_embed_changes` (e.g. `git worktree add /tmp/main main` and `PYTHONPATH=/tmp/main`).
`--baseline DIR` compares in one run: the measured runs alternate between the checkout at DIR
(`"code": "baseline"`, its packages first on `PYTHONPATH`) and this one (`"code": "this"`),
on the same parent, and the summary prints each size's medians and their ratio.
`--keep` leaves each size's index root in `--workdir`; a later call with `--keep` reuses a
root that holds a published version (no build) and goes on changing new rows.
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
import pyarrow.parquet as pq
from _common import add_table_args, run_child, status_kb, write_results

FILE_ROWS = 50_000
# The preset whose lineage a run of `--dim` has (the embedding is replaced, no model is built):
# D only sets the change's vector bytes and the parent's build time.
PRESET_OF_DIM = {1024: "huge", 512: "base", 32: "tiny"}


def _listing(n: int, changed: int, run: int) -> pa.Table:
    """The corpus as measured run `run` (0: the parent's build) lists it: runs 1..run have each
    changed the fingerprint of their own `changed` rows (row i belongs to run i % step + 1)."""
    from pipelines.rows import LISTING_SCHEMA

    ids = [f"i{i:010d}" for i in range(n)]
    step = max(1, n // max(changed, 1))
    if run >= step:
        raise SystemExit(f"--changed {changed} on {n} rows allows {step - 1} measured runs")
    i = np.arange(n)
    touched = (i % step < run) & (i // step < changed)
    cols = {
        "id": ids,
        "uri": [f"/corpus/{i}.jpg" for i in ids],
        "modality": ["vision"] * n,
        "fingerprint": np.where(touched, "g", "f").tolist(),
    }
    return pa.table(
        {f.name: cols.get(f.name, pa.nulls(n, f.type)) for f in LISTING_SCHEMA},
        schema=LISTING_SCHEMA,
    )


def _patch(listing: pa.Table | None, dim: int) -> None:
    import pipelines.reindex as ri
    from imagebind_core.index import join_uri
    from imagebind_core.io import filesystem

    def list_corpus(cfg, ir, parent, stage, **_):
        return ri._Listed(listing, None, False)

    def embed_changes(cfg, stage, diff):
        todo = diff.to_embed
        fs, folder = filesystem(stage.embedded_uri, {})
        fs.makedirs(folder, exist_ok=True)
        for k, s in enumerate(range(0, todo.num_rows, FILE_ROWS)):
            part = todo.slice(s, FILE_ROWS)
            vec = np.random.default_rng(s).standard_normal((part.num_rows, dim), np.float32)
            vec /= np.linalg.norm(vec, axis=1, keepdims=True)
            table = pa.table(
                {
                    "id": part["id"],
                    "uri": part["uri"],
                    "modality": part["modality"],
                    "fingerprint": part["fingerprint"],
                    "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vec.ravel()), dim),
                }
            )
            pq.write_table(table, join_uri(stage.embedded_uri, f"part-{k:05d}.parquet"))

    if listing is not None:  # else the run lists the corpus's manifests itself
        ri._list_corpus = list_corpus
    ri._embed_changes = embed_changes


def _files(root: str) -> dict[str, tuple[int, float]]:
    out = {}
    for d, _, names in os.walk(root):
        for f in names:
            p = os.path.join(d, f)
            st = os.stat(p)
            out[os.path.relpath(p, root)] = (st.st_size, st.st_mtime)
    return out


def _area(rel: str) -> str:
    if rel.startswith(("rows.lance", "failures.lance")) or "/data/carried/" in rel:
        return "rows"
    if "/data/embedded/" in rel:
        return "embedded"
    if "/index/" in rel:
        return "index"
    if "/keys/" in rel:
        return "keys"
    return "other"


def _run_number(step: str, root: str) -> int:
    """The measured run about to start (0: the parent's build; the parent is version 1)."""
    from pipelines.publish import IndexRoot

    pointer = IndexRoot(f"{root}/index", {}).latest()[0] if step == "run" else None
    return pointer.version if pointer is not None else 0


def write_manifests(root: str, n: int, changed: int, run: int, rows: int) -> None:
    """The corpus of run `run` as Parquet manifests of `rows` rows under `<root>/corpus`."""
    folder = f"{root}/corpus"
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    listing = _listing(n, changed, run).select(["id", "uri", "modality", "fingerprint"])
    for k, s in enumerate(range(0, n, rows)):
        pq.write_table(listing.slice(s, rows), f"{folder}/m{k:05d}.parquet")


def child(
    step: str, root: str, n: int, changed: int, dim: int, ray_rows: int | None, manifests: bool
) -> dict:
    import pipelines
    from pipelines.config import load_reindex_config
    from pipelines.publish import IndexRoot
    from pipelines.reindex import reindex

    run = _run_number(step, root)
    listing = None
    t0 = time.perf_counter()
    if not manifests:
        os.makedirs(f"{root}/corpus", exist_ok=True)
        open(f"{root}/corpus/placeholder", "w").close()  # the input must exist
        # The synthetic listing is made before the measured window (its Python strings are
        # this script's, not the product's); the run holds it, as it holds a real listing.
        listing = _listing(n, changed, run)
    listing_s = time.perf_counter() - t0
    _patch(listing, dim)
    cfg = load_reindex_config(
        None,
        {
            "input": f"{root}/corpus",
            "preset": PRESET_OF_DIM[dim],  # its D; no model is built (embedding replaced)
            "index.root": f"{root}/index",
            "index.keep_versions": 2,
            **({} if ray_rows is None else {"index.diff_on_ray_rows": ray_rows}),
        },
    )
    before = _files(f"{root}/index") if os.path.exists(f"{root}/index") else {}
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = status_kb("VmRSS")
    t0 = time.perf_counter()
    r = reindex(cfg)
    wall = time.perf_counter() - t0
    peak = (status_kb("VmHWM") - base) / 1024
    after = _files(f"{root}/index")
    record = IndexRoot(f"{root}/index", {}).read_record(r.name)
    timings, index = record.get("timings_s", {}), record.get("index") or {}
    written: dict[str, int] = {"rows": 0, "embedded": 0, "index": 0, "keys": 0, "other": 0}
    for rel, (size, mtime) in after.items():
        if before.get(rel) != (size, mtime):
            written[_area(rel)] += size
    return {
        "status": r.status,
        "counts": r.counts,
        "wall_s": round(wall, 2),
        "driver_peak_growth_mb": round(peak, 1),
        "written_mb": {k: round(v / 2**20, 2) for k, v in written.items()},
        "written_total_mb": round(sum(written.values()) / 2**20, 2),
        "root_mb": round(sum(s for s, _ in after.values()) / 2**20, 1),
        "timings_s": timings,
        "index_mode": index.get("mode"),  # "updated", or "built" (a retrain: not a median's)
        "index_reason": index.get("reason"),
        "listing_made_s": round(listing_s, 2) if listing is not None else None,
        "listing_mb": round(listing.nbytes / 2**20, 1) if listing is not None else None,
        "listing": "synthetic table" if listing is not None else "manifests",
        "run": run,
        "code_path": os.path.dirname(os.path.dirname(os.path.abspath(pipelines.__file__))),
    }


def _has_version(root: str) -> bool:
    from pipelines.publish import IndexRoot

    return (
        os.path.exists(f"{root}/index") and IndexRoot(f"{root}/index", {}).latest()[0] is not None
    )


def _median(xs: list[float]) -> float:
    return float(np.median(xs)) if xs else float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_table_args(p, sizes=[250_000, 1_000_000], workdir="/tmp/bench-rstore")
    p.add_argument(
        "--diff-on-ray-rows",
        type=int,
        default=None,
        help="index.diff_on_ray_rows for both runs (default: the config's, 1,000,000; "
        "0 diffs every size on Ray Data, so sizes compare on one path)",
    )
    p.add_argument("--runs", type=int, default=1, help="measured runs per size (default 1)")
    p.add_argument("--keep", action="store_true", help="keep (and reuse) each size's root")
    p.add_argument("--baseline", help="a checkout to alternate with this one, run for run")
    p.add_argument(
        "--manifest-rows",
        type=int,
        default=0,
        help="write the corpus as Parquet manifests of this many rows, listed by the run itself "
        "(default 0: a synthetic listing table replaces the listing)",
    )
    p.add_argument("--child", nargs=3, metavar=("STEP", "ROOT", "N"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.dim not in PRESET_OF_DIM:
        p.error(f"--dim must be one of {sorted(PRESET_OF_DIM)}: a preset's embedding size")
    if a.child:
        step, root, n = a.child
        ray_rows, manifests = a.diff_on_ray_rows, a.manifest_rows > 0
        print(json.dumps(child(step, root, int(n), a.changed, a.dim, ray_rows, manifests)))
        return
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    codes = [("this", here)]
    if a.baseline:
        codes = [("baseline", os.path.abspath(a.baseline)), ("this", here)]
    results = []
    for n in a.sizes:
        root = os.path.join(a.workdir, str(n))
        me = [sys.executable, __file__, "--changed", str(a.changed), "--dim", str(a.dim)]
        if a.diff_on_ray_rows is not None:
            me += ["--diff-on-ray-rows", str(a.diff_on_ray_rows)]
        if a.manifest_rows:
            me += ["--manifest-rows", str(a.manifest_rows)]
        built = None
        if not (a.keep and _has_version(root)):
            shutil.rmtree(root, ignore_errors=True)
            if a.manifest_rows:
                write_manifests(root, n, a.changed, 0, a.manifest_rows)
            built = run_child([*me, "--child", "build", root, str(n)])
        for k in range(a.runs * len(codes)):
            label, code = codes[k % len(codes)]
            if a.manifest_rows:  # written here: not part of the measured process
                write_manifests(root, n, a.changed, _run_number("run", root), a.manifest_rows)
            env = dict(
                os.environ, PYTHONPATH=os.pathsep.join([code, os.environ.get("PYTHONPATH", "")])
            )
            r = run_child([*me, "--child", "run", root, str(n)], env=env)
            r.update(
                rows=n,
                dim=a.dim,
                changed=a.changed,
                code=label,
                diff_on_ray_rows=a.diff_on_ray_rows,
            )
            if built is not None:
                r.update(parent_build_s=built["wall_s"])
                r.update(parent_build_peak_growth_mb=built["driver_peak_growth_mb"])
            print(json.dumps(r), flush=True)
            results.append(r)
        if not a.keep:
            shutil.rmtree(root, ignore_errors=True)
    # Medians over runs that updated the index: a run whose index was rebuilt (a retrain
    # rule fired, an O(N) event) is listed above and counted apart.
    upd = [r for r in results if r.get("index_mode") != "built"]
    rebuilt = [r for r in results if r.get("index_mode") == "built"]
    for r in rebuilt:
        print(f"rebuilt, not in the medians: {r['rows']:,} rows, run {r['run']}: "
              f"{r['wall_s']} s ({r['index_reason']})", flush=True)  # fmt: skip

    def med(n: int, label: str, key: str) -> float:
        return _median([r[key] for r in upd if r["rows"] == n and r["code"] == label])

    for n in a.sizes:
        line = [f"{n:>10,} rows:"]
        for label, _ in codes:
            line.append(
                f"{label} median wall {med(n, label, 'wall_s'):.2f} s, "
                f"peak {med(n, label, 'driver_peak_growth_mb'):.0f} MB"
            )
        print("  ".join(line), flush=True)
    first, last = a.sizes[0], a.sizes[-1]
    for label, _ in codes:
        for key in ("wall_s", "driver_peak_growth_mb"):
            if len(a.sizes) > 1:
                ratio = med(last, label, key) / med(first, label, key)
                print(f"{label}: {key} {last:,} / {first:,} rows = {ratio:.2f}x")
    if a.baseline:
        for n in a.sizes:
            ratio = med(n, "baseline", "wall_s") / med(n, "this", "wall_s")
            print(f"{n:,} rows: wall baseline / this = {ratio:.2f}x")
    write_results(a.json, results)


if __name__ == "__main__":
    main()
