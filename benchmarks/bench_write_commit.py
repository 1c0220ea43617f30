"""The job's output side in one process, no Ray: `write_parts` on encoded blocks, then
`commit_shard` on each shard, CPU time per item; this checkout against another one.

Blocks are what an encoder actor hands the writer (`pipelines.rows.encoded_schema`): ids,
uris, fingerprints and 1024-d vectors. `--values` picks the vectors: `real` (random unit
vectors in float32, which barely compress, like a float32 model's), `bf16` (the same rounded
to bfloat16, as a bf16 model's come out: half of each float's bytes are zero) or `zeros` (the
null encoder's). Each measurement runs in a fresh process of its checkout (`--baseline`: e.g.
a `git worktree` of an earlier commit, with this interpreter); the two checkouts alternate in
`--pairs` pairs, and each pair gives this checkout's CPU over the baseline's. Each run also
reads the committed files back and checks every vector against what it wrote.

    git worktree add /tmp/base <commit>
    python benchmarks/bench_write_commit.py --baseline /tmp/base --pairs 3

(figures: benchmarks/results/write-commit-2core.md; `--json PATH` also writes them as JSON)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

from _common import ROOT, run_child, tree_bytes, write_results


def _vectors(n: int, dim: int, values: str, seed: int):
    import numpy as np

    if values == "zeros":
        return np.zeros((n, dim), np.float32)
    x = np.random.default_rng(seed).standard_normal((n, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    if values == "bf16":  # round to nearest bfloat16: the low 16 bits of each float are zero
        bits = x.view(np.uint32)
        bits += 0x7FFF + ((bits >> 16) & 1)
        bits &= 0xFFFF0000
    return x


def measure(args: argparse.Namespace) -> dict:
    """One run in this process: write every block's parts, commit every shard."""
    sys.path.insert(0, args.child)  # the checkout under test, before this file's own
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from pipelines.rows import STATUS_EOS, STATUS_OK, encoded_schema
    from pipelines.writers import commit_shard, write_parts

    dim, block = args.dim, args.block
    schema = encoded_schema(dim)
    blocks, vectors = [], {}
    for b in range(args.items // block):
        shard = f"s{b // args.blocks_per_shard:04d}"
        ids = [f"{shard}/{b * block + i:09d}" for i in range(block)]
        x = _vectors(block, dim, args.values, b)
        vectors.update(zip(ids, x, strict=True))
        eos = int((b + 1) % args.blocks_per_shard == 0)
        n = block + eos
        cols = {f.name: pa.nulls(n, f.type) for f in schema}
        cols["id"] = pa.array(ids + [f"{shard}#eos"] * eos, pa.string())
        cols["uri"] = pa.array([f"s3://bucket/corpus/{i}.txt" for i in ids] + [None] * eos)
        cols["modality"] = pa.array(["text"] * n)
        cols["shard"] = pa.array([shard] * n)
        cols["branch"] = pa.array(["text"] * n)
        cols["fingerprint"] = pa.array(
            [f"{(b * block + i) * 0x9E3779B97F4A7C15 % 2**64:016x}" for i in range(block)]
            + [None] * eos
        )
        cols["status"] = pa.array([STATUS_OK] * block + [STATUS_EOS] * eos)
        cols["count"] = pa.array([None] * block + [block * args.blocks_per_shard] * eos, pa.int64())
        flat = pa.array(np.concatenate([x, np.zeros((eos, dim), np.float32)]).reshape(-1))
        valid = pa.array([True] * block + [False] * eos)
        cols["embedding"] = pa.FixedSizeListArray.from_arrays(flat, dim, mask=pc.invert(valid))
        blocks.append(pa.table(cols, schema=schema))
    # A warm-up block and commit: what a process does once (imports, the filesystem's set-up)
    # stays out of the timing.
    warm = os.path.join(args.workdir, "warm")
    write_parts(blocks[0].slice(0, 64), warm, None, dim)
    commit_shard(warm, blocks[0].column("shard")[0].as_py(), None, dim, {})
    out = os.path.join(args.workdir, "out")
    c0 = time.process_time()
    for t in blocks:
        write_parts(t, out, None, dim)
    write_s = time.process_time() - c0
    part_bytes = sum(tree_bytes(out).values())
    shards = sorted({t.column("shard")[0].as_py() for t in blocks})
    c0 = time.process_time()
    for s in shards:
        commit_shard(out, s, None, dim, {"imagebind.bench": "1"})
    commit_s = time.process_time() - c0
    committed = {p: b for p, b in tree_bytes(out).items() if p.endswith(".parquet")}
    worst = 0.0
    for p in committed:
        t = pq.read_table(p)
        got = np.asarray(t.column("embedding").combine_chunks().values).reshape(-1, dim)
        want = np.stack([vectors[i] for i in t.column("id").to_pylist()])
        worst = max(worst, float(np.abs(got - want).max()))
    n = len(vectors)
    return {
        "items": n,
        "write_us_per_item": round(1e6 * write_s / n, 2),
        "commit_us_per_item": round(1e6 * commit_s / n, 2),
        "part_bytes_per_item": round(part_bytes / n, 1),
        "committed_bytes_per_item": round(sum(committed.values()) / n, 1),
        "max_abs_error": worst,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--baseline", help="another checkout of the project")
    p.add_argument("--items", type=int, default=65536)
    p.add_argument("--block", type=int, default=8192, help="rows per encoded block")
    p.add_argument("--blocks-per-shard", type=int, default=2)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--values", choices=("real", "bf16", "zeros"), default="real")
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--child", help=argparse.SUPPRESS)  # a checkout: measure it, print JSON
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(measure(args)))
        return
    roots = [("this", ROOT)] + (
        [("baseline", os.path.abspath(args.baseline))] if args.baseline else []
    )
    common = [
        f"--{k.replace('_', '-')}={getattr(args, k)}"
        for k in ("items", "block", "blocks_per_shard", "dim", "values")
    ]
    print(
        f"{os.cpu_count()} cores; {args.items} items of {args.dim}-d {args.values} vectors",
        flush=True,
    )
    results = []
    for i in range(args.pairs):
        pair = {}
        for name, root in roots if i % 2 == 0 else roots[::-1]:
            tmp = tempfile.mkdtemp(prefix="bench-write-")
            try:
                env = {**os.environ, "PYTHONPATH": root}
                cmd = [sys.executable, __file__, f"--child={root}", f"--workdir={tmp}", *common]
                r = pair[name] = run_child(cmd, env)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            print(
                f"pair {i + 1} {name:8s} write {r['write_us_per_item']:6.2f} us/item, commit "
                f"{r['commit_us_per_item']:6.2f} us/item | parts {r['part_bytes_per_item']:.0f} "
                f"B/item, committed {r['committed_bytes_per_item']:.0f} B/item | max abs error "
                f"{r['max_abs_error']:g}",
                flush=True,
            )
        if "baseline" in pair:
            total = {k: pair[k]["write_us_per_item"] + pair[k]["commit_us_per_item"] for k in pair}
            pair["ratio"] = round(total["this"] / total["baseline"], 3)
            print(
                f"pair {i + 1} this/baseline CPU (write + commit): {pair['ratio']:.2f}", flush=True
            )
        results.append(pair)
    if args.baseline:
        v = sorted(r["ratio"] for r in results)
        print(
            f"median this/baseline CPU (write + commit): {v[len(v) // 2]:.2f} (of {len(v)} pairs)"
        )
    write_results(args.json, results)


if __name__ == "__main__":
    main()
