"""The encoder actor's own CPU per image when a call holds several preprocessed blocks.

Ray Data hands the job's encoder actor a model batch (128 images on a GPU) assembled from
smaller preprocessed blocks (64 images by default): one Arrow table whose `tensor` column
has one chunk per block. The actor views each block's rows where they lie
(`pipelines.stages.batch_arrays` -> `imagebind_core.RowParts`) and the runner copies them once,
into the pinned buffer on CUDA. Joining the blocks first (`combine_chunks`) would copy every
image once more, into freshly allocated memory.

Both ways are timed in this process, alternating, on the same table, in process CPU time:

- null call: `EncodeBatch(null_encoder=True)` on the table (the job's actor without a model),
  against `combine_chunks()` then the same call;
- staging: the batch's bytes into one reused host buffer (what `EncoderRunner.stage` does on
  CUDA, where that buffer is pinned): `RowParts.join(out=...)`, against `combine_chunks()` and
  then a copy of the joined array.

`--job` measures the same actor inside the job instead: the null-encoder job
(`bench_pipeline.py --null-encoder`'s configuration, 64-image blocks, 128-image calls) on a
small and a large corpus of JPEG files in one local Ray, alternating, with the encoder actor's
CPU (utime+stime of its process, sampled every 50 ms until it ends with its job); the
difference over the extra images is its CPU per image, start-up excluded. Run it from two
checkouts (`PYTHONPATH=<checkout>`) to compare them.

    python benchmarks/bench_actor_call.py
    python benchmarks/bench_actor_call.py --blocks 2 --block 64 --reps 20
    python benchmarks/bench_actor_call.py --job --images 4096 --small 512 --pairs 3
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pyarrow as pa
from _common import write_results

import imagebind_core as ibc
from pipelines.rows import PREPROCESSED_SCHEMA, STATUS_OK
from pipelines.stages import EncodeBatch, batch_arrays, tensor_columns


def preprocessed_block(n: int, first: int, shape=(3, 224, 224)) -> pa.Table:
    """`n` preprocessed image rows as the preprocessing stage emits them (uint8 pixels)."""
    rng = np.random.default_rng(first)
    tensor, tshape, tdtype = tensor_columns(
        [rng.integers(0, 256, shape, np.uint8) for _ in range(n)]
    )
    cols = {f.name: pa.nulls(n, f.type) for f in PREPROCESSED_SCHEMA}
    cols.update(
        id=pa.array([f"img{first + i}" for i in range(n)]),
        modality=pa.array(["vision"] * n),
        status=pa.array([STATUS_OK] * n),
        tensor=tensor,
        tensor_shape=tshape,
        tensor_dtype=tdtype,
    )
    return pa.table(cols, schema=PREPROCESSED_SCHEMA)


def _cpu_us(fn, reps: int, items: int) -> float:
    c0 = time.process_time()
    for _ in range(reps):
        fn()
    return (time.process_time() - c0) / reps / items * 1e6


def run_job_mode(args: argparse.Namespace) -> dict:
    """The encoder actor's CPU per image in the null-encoder job (see the module docstring)."""
    import os
    import shutil
    import tempfile
    import threading

    import bench_pipeline as bp

    import pipelines.embed as embed
    from pipelines.resources import local_num_cpus

    tmp = tempfile.mkdtemp(prefix="bench-actor-")
    try:
        folder = bp.make_corpus(tmp, args.images, 0)["vision"]
        small = os.path.join(tmp, "small")
        os.makedirs(small)
        for f in bp._files(folder)[: args.small]:
            os.link(f, os.path.join(small, os.path.basename(f)))
        cfg = bp.null_config("vision", "x", "y", "files")
        bp.start_ray_as_the_job(local_num_cpus(cfg, ["vision"]), ["vision"])
        root, hz, seen = os.getpid(), os.sysconf("SC_CLK_TCK"), set()

        def actor_seconds(source: str, out: str) -> float:
            """CPU seconds of the actor(s) this job started, read until the job returns."""
            last: dict[int, int] = {}
            stop = threading.Event()

            def watch() -> None:
                while not stop.is_set():
                    for pid, ticks in bp._tree_cpu_ticks(root).items():
                        if pid in seen or bp.process_role(pid, root) != "encoder actors":
                            continue
                        last[pid] = max(last.get(pid, 0), ticks)
                    stop.wait(0.05)

            t = threading.Thread(target=watch, daemon=True)
            t.start()
            embed.run_job(bp.null_config("vision", source, out, "files"))
            stop.set()
            t.join()
            seen.update(last)
            return sum(last.values()) / hz

        actor_seconds(folder, os.path.join(tmp, "warm"))  # workers started, imports done
        rounds = []
        for i in range(args.pairs):
            s = actor_seconds(small, os.path.join(tmp, f"s{i}"))
            b = actor_seconds(folder, os.path.join(tmp, f"b{i}"))
            us = (b - s) / (args.images - args.small) * 1e6
            rounds.append({"small_s": s, "large_s": b, "us_per_image": us})
            print(
                f"pair {i + 1}: actor CPU {s:.2f} s ({args.small} images), {b:.2f} s "
                f"({args.images}) -> {us:.0f} us per image",
                flush=True,
            )
        med = sorted(r["us_per_image"] for r in rounds)[len(rounds) // 2]
        print(f"encoder actor in the job, median: {med:.0f} us of CPU per image")
        return {"images": args.images, "small": args.small, "pairs": rounds, "median_us": med}
    finally:
        import ray

        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, default=2, help="preprocessed blocks per call")
    ap.add_argument("--block", type=int, default=64, help="images per preprocessed block")
    ap.add_argument("--reps", type=int, default=20, help="calls per timing")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--job", action="store_true", help="measure the actor inside the job")
    ap.add_argument("--images", type=int, default=4096, help="--job: the large corpus")
    ap.add_argument("--small", type=int, default=512, help="--job: the small corpus")
    ap.add_argument("--pairs", type=int, default=3, help="--job: small/large job pairs")
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.job:
        write_results(args.json, run_job_mode(args))
        return

    table = pa.concat_tables(
        [preprocessed_block(args.block, k * args.block) for k in range(args.blocks)]
    )
    n = table.num_rows
    actor = EncodeBatch("vision", ibc.ModelSpec(preset="tiny"), batch_size=n, null_encoder=True)
    ((_, parts),) = batch_arrays(table, range(n))
    host = np.empty(parts.shape, parts.dtype)  # reused, as the runner's pinned buffers are

    def stage_parts() -> None:
        x = batch_arrays(table, range(n))[0][1]
        x.join(out=host) if isinstance(x, ibc.RowParts) else np.copyto(host, x)

    def stage_joined() -> None:
        x = batch_arrays(table.combine_chunks(), range(n))[0][1]
        np.copyto(host, x)

    cases = {
        "null call": (lambda: actor(table), lambda: actor(table.combine_chunks())),
        "staging": (stage_parts, stage_joined),
    }
    print(
        f"{args.blocks} blocks of {args.block} images (3x224x224 uint8) per call, "
        f"{table.column('tensor').num_chunks} chunks; us of CPU per image"
    )
    results: dict = {"blocks": args.blocks, "block": args.block, "cases": {}}
    for name, (parts_fn, joined_fn) in cases.items():
        parts_fn(), joined_fn()  # warm
        rows = []
        for r in range(args.rounds):
            order = [("parts", parts_fn), ("joined", joined_fn)]
            got = dict((k, _cpu_us(f, args.reps, n)) for k, f in order[:: 1 if r % 2 else -1])
            rows.append(got)
            print(
                f"{name:9s} round {r + 1}: views of the blocks {got['parts']:7.1f} | joined "
                f"first {got['joined']:7.1f} | ratio {got['parts'] / got['joined']:.2f}"
            )
        ratios = sorted(x["parts"] / x["joined"] for x in rows)
        results["cases"][name] = {"rounds": rows, "median_ratio": ratios[len(ratios) // 2]}
        print(f"{name:9s} median ratio views/joined: {ratios[len(ratios) // 2]:.2f}")
    write_results(args.json, results)


if __name__ == "__main__":
    main()
