"""The part of a large re-index that reads every item: planning and listing a manifest corpus
and diffing it against the parent version, either as one join on Ray Data
(`pipelines.plan.list_items_on_ray` + `pipelines.diff.diff_on_ray`: `--diff ray`) or shard by
shard against the parent's key snapshot (`pipelines.keys.diff_shards`, the manifests not read
on the driver first: `--diff shards`); `--diff both` alternates them run for run. Wall time
per size, and its growth from size to size.

    RAY_AUTH_MODE=disabled /work/main/.venv/bin/python benchmarks/bench_list_and_diff.py \
        [--sizes 1000000 4000000] [--changed 1000] [--manifest-rows 100000] [--rounds 2] \
        [--diff both] [--workdir /tmp/bench-list-diff] [--baseline /path/to/other/checkout] \
        [--json FILE]

For each size N the script writes, once, a corpus of N items as Parquet manifests of
`--manifest-rows` rows (`id`, `uri`, `modality`, `fingerprint`) with `--changed` fingerprints
changed against a parent: a Lance rows table as `imagebind-reindex` writes it (the key
columns, `shard`, and a 4-wide `embedding`: the diff never reads the embeddings, so their
width changes nothing here), and the parent's key snapshot (each manifest listed by the
product, with the parent's fingerprints). Each measurement is a fresh process that starts Ray
as the re-index does (`pipelines.embed.ensure_ray`), plans, lists and diffs (`plan_s`:
planning, with Ray's start, also given apart as `ray_start_s`; `diff_s`: listing and diff).
With `--baseline DIR`, the checkout at DIR (`--diff ray`) and this one alternate, run for run,
on the same data; medians and ratios are printed. What follows the diff in a re-index (the
Lance commit, the index update) is flat in N and measured by `bench_reindex_storage.py`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from _common import run_child, write_results


def build(root: str, n: int, changed: int, manifest_rows: int) -> None:
    """The corpus (fingerprints of every (n // changed)-th item changed; none when `changed`
    is 0) and the parent."""
    if os.path.exists(f"{root}/.done"):
        if not os.path.exists(f"{root}/snapshot.json"):  # built by an earlier version
            write_snapshot(root)
        return
    from pipelines.tables import ROWS_TABLE, VersionTable

    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(f"{root}/corpus")
    ids = pa.array([f"i{i:010d}" for i in range(n)])
    uris = pa.array([f"/corpus/i{i:010d}.jpg" for i in range(n)])
    touched = np.arange(n) % max(1, n // changed) == 0 if changed else np.zeros(n, bool)
    fp_now = pa.array(np.where(touched, "g", "f"))
    for k, s in enumerate(range(0, n, manifest_rows)):
        m = min(manifest_rows, n - s)
        pq.write_table(
            pa.table(
                {
                    "id": ids.slice(s, m),
                    "uri": uris.slice(s, m),
                    "modality": pa.repeat(pa.scalar("vision"), m),
                    "fingerprint": fp_now.slice(s, m),
                }
            ),
            f"{root}/corpus/m{k:05d}.parquet",
        )

    def parts():
        for s in range(0, n, 50_000):
            m = min(50_000, n - s)
            yield pa.table(
                {
                    "id": ids.slice(s, m),
                    "uri": uris.slice(s, m),
                    "modality": pa.repeat(pa.scalar("vision"), m),
                    "fingerprint": pa.repeat(pa.scalar("f"), m),
                    "shard": pa.repeat(pa.scalar(f"m{s // manifest_rows:05d}"), m),
                    "embedding": pa.FixedSizeListArray.from_arrays(
                        pa.array(np.zeros(m * 4, np.float32)), 4
                    ),
                }
            )

    schema = next(parts()).schema
    table = VersionTable(f"{root}/rows", ROWS_TABLE, None)
    table.commit(None, None, (b for t in parts() for b in t.to_batches()), schema, "parent")
    write_snapshot(root)
    open(f"{root}/.done", "w").close()


def write_snapshot(root: str) -> None:
    """The parent's key snapshot (`pipelines.keys`), as a re-index that listed the corpus
    before the change would have written it: each manifest listed as the product lists it,
    with the parent's fingerprints."""
    from pipelines import keys
    from pipelines.config import load_reindex_config
    from pipelines.plan import list_shard, plan_job

    over = {"input": f"{root}/corpus", "preset": "huge", "index.root": f"{root}/index"}
    cfg = load_reindex_config(None, over)
    bases, rows = {}, 0
    plan = plan_job(cfg.job)
    for shard in plan.shards:
        t = list_shard(shard, cfg.job)
        t = t.set_column(
            t.schema.get_field_index("fingerprint"),
            "fingerprint",
            pa.repeat(pa.scalar("f"), t.num_rows),
        )
        rel = f"snapshot/{keys.base_name(shard.name)}"
        keys.write_base(t, f"{root}/{rel}", None)
        bases[shard.name] = {"file": rel, "since": 0}
        rows += t.num_rows
    with open(f"{root}/snapshot.json", "w") as f:
        json.dump({**keys.new_record(bases, [], rows, 0), "kinds": list(plan.kinds)}, f)


def child(root: str, n: int, how: str = "ray") -> dict:
    from pyarrow.fs import LocalFileSystem

    import pipelines
    from pipelines.config import load_reindex_config
    from pipelines.diff import diff_on_ray
    from pipelines.embed import ensure_ray
    from pipelines.plan import list_items_on_ray
    from pipelines.tables import ROWS_TABLE, Pin, VersionTable

    cfg = load_reindex_config(
        None, {"input": f"{root}/corpus", "preset": "huge", "index.root": f"{root}/index"}
    )
    table = VersionTable(f"{root}/rows", ROWS_TABLE, None)
    pin = Pin(table.uri, table.open("parent").version)
    ray_s = []

    def start_ray(kinds):
        t = time.perf_counter()
        ensure_ray(cfg.job, kinds)
        ray_s.append(time.perf_counter() - t)

    t0 = time.perf_counter()
    if how == "shards":  # the parent's snapshot: each shard diffed where it is listed
        from pipelines.keys import diff_shards
        from pipelines.plan import input_sources, manifest_specs

        # As `pipelines.reindex` plans a manifest corpus whose snapshot found no repeats: the
        # manifests are read by the tasks only.
        with open(f"{root}/snapshot.json") as f:
            snap = json.load(f)
        plan = manifest_specs(cfg.job, input_sources(cfg.job)[1])
        plan.kinds = tuple(snap["kinds"])  # Ray for the corpus's kinds, as the re-index does
        start_ray(plan.kinds)
        t1 = time.perf_counter()
        out = f"runs/{os.getpid()}"
        d = diff_shards(
            cfg.job, plan, snap, root, {}, (pin, None), (n, 0), out, start_ray, unplanned=True
        ).diff
        t2 = time.perf_counter()
        shutil.rmtree(f"{root}/{out}", ignore_errors=True)
    else:
        listing = list_items_on_ray(cfg.job, start_ray=start_ray)
        t1 = time.perf_counter()
        d = diff_on_ray(listing, pin, None, LocalFileSystem(), parent_count=n)
        t2 = time.perf_counter()
    return {
        "plan_s": round(t1 - t0, 2),
        "ray_start_s": round(sum(ray_s), 2),
        "diff_s": round(t2 - t1, 2),
        "wall_s": round(t2 - t0, 2),
        "changed": d.changed,
        "carried": d.carried_rows,
        "code_path": os.path.dirname(os.path.dirname(os.path.abspath(pipelines.__file__))),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 4_000_000])
    p.add_argument("--changed", type=int, default=1000)
    p.add_argument("--manifest-rows", type=int, default=100_000)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--workdir", default="/tmp/bench-list-diff")
    p.add_argument("--baseline", help="a checkout to alternate with this one, for the ratio")
    p.add_argument(
        "--diff",
        choices=["ray", "shards", "both"],
        default="both",
        help="ray: the whole-corpus join on Ray Data (`diff_on_ray`); shards: shard by shard "
        "against the parent's key snapshot (`pipelines.keys.diff_shards`); both: alternated",
    )
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(child(a.child[0], int(a.child[1]), a.child[2])))
        return
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    hows = ["ray", "shards"] if a.diff == "both" else [a.diff]
    if a.baseline:
        codes = [("baseline", os.path.abspath(a.baseline), "ray"), ("this", here, hows[-1])]
    else:
        codes = [(how, here, how) for how in hows]
    for n in a.sizes:
        build(f"{a.workdir}/n{n}", n, a.changed, a.manifest_rows)
    results = []
    for r in range(a.rounds):
        for n in a.sizes:
            for label, code, how in codes:
                path = os.pathsep.join([code, os.environ.get("PYTHONPATH", "")])
                out = run_child(
                    [sys.executable, __file__, "--child", f"{a.workdir}/n{n}", str(n), how],
                    env=dict(os.environ, PYTHONPATH=path),
                )
                out.update(size=n, code=label, round=r)
                if out.get("changed") != a.changed or out.get("carried") != n - a.changed:
                    raise SystemExit(f"wrong diff: {out}")
                print(json.dumps(out), flush=True)
                results.append(out)
    med = {
        (label, n): {
            k: statistics.median(x[k] for x in results if x["code"] == label and x["size"] == n)
            for k in ("plan_s", "ray_start_s", "diff_s", "wall_s")
        }
        for label, *_ in codes
        for n in a.sizes
    }
    for (label, n), m in med.items():
        print(f"{label:8s} {n:>11,} rows: median plan {m['plan_s']:.2f} s (Ray's start "
              f"{m['ray_start_s']:.2f} s of it), diff "
              f"{m['diff_s']:.2f} s, wall {m['wall_s']:.2f} s")  # fmt: skip
    for label, *_ in codes:
        lo, hi = a.sizes[0], a.sizes[-1]
        if lo != hi:
            print(f"{label}: wall {hi:,} / {lo:,} = "
                  f"{med[(label, hi)]['wall_s'] / med[(label, lo)]['wall_s']:.2f}x")  # fmt: skip
    if len(codes) == 2:
        (first, *_), (second, *_) = codes
        for n in a.sizes:
            b, t = med[(first, n)]["wall_s"], med[(second, n)]["wall_s"]
            print(f"{n:,} rows: wall {second} / {first} = {t / b:.2f}x")
    write_results(a.json, {"rounds": results, "sizes": a.sizes})


if __name__ == "__main__":
    main()
