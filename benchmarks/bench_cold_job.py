"""A whole embedding job as a user runs it, cold, against the same job from another checkout.

Each run is the command line (`python -m pipelines.embed --json`) in a fresh process that
starts its own local Ray, so Ray's start, every worker process's imports, the encoder actor's
start, planning and the shard commits are all in it: what the null-encoder ceiling
(`bench_pipeline.py --null-encoder`) subtracts out as fixed costs. Encoders are null (one
actor, batched as for a GPU encoder: `_common.null_encoder_settings`), so the figures are the
pipeline's own. Runs of this checkout and of `--baseline` (another checkout of the project,
e.g. a `git worktree` of an earlier commit, using this interpreter) alternate in `--pairs`
pairs, the order alternating too, since a shared machine's speed drifts over minutes. Per run:
wall seconds, CPU of the whole process tree per item (`bench_pipeline.CpuSampler`: driver,
Ray's daemons, every worker), the first batch, and the worker processes started (task workers:
readers, preprocessing, writers); per pair, this checkout's wall and CPU over the baseline's.

    git worktree add /tmp/base <commit>
    python benchmarks/bench_cold_job.py --baseline /tmp/base --texts 400000 --pairs 3
    python benchmarks/bench_cold_job.py --baseline /tmp/base --preset huge   # 1024-d vectors

(figures: benchmarks/results/pipeline-cpu-2core.md; `--json PATH` also writes them as JSON)
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile

from _common import write_results
from bench_pipeline import make_corpus, make_text_manifests
from bench_warmup import ROOT, cli_job


def run(root: str, kind: str, source: str, fmt: str, out: str, sets: dict) -> dict:
    s, cpu, wall = cli_job(kind, source, fmt, out, sets, root=root)
    items = s["kinds"][kind]["embedded"] + s["kinds"][kind]["errors"]
    return {
        "checkout": root,
        "items": items,
        "wall_s": round(wall, 2),
        "cpu_s": round(cpu.seconds, 2),
        "cpu_us_per_item": round(1e6 * cpu.seconds / items, 1),
        "first_batch_s": s["first_batch_seconds"],
        "ray_up_s": s["ray_up_seconds"],
        "task_workers_started": cpu.started["task workers"][0],
    }


def _line(name: str, r: dict) -> str:
    return (
        f"{name:8s} wall {r['wall_s']:6.1f} s | CPU {r['cpu_s']:6.1f} s = "
        f"{r['cpu_us_per_item']:8.1f} us/item | first batch {r['first_batch_s']:5.1f} s "
        f"(Ray up {r['ray_up_s']:4.1f} s) | task workers started {r['task_workers_started']}"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--baseline", required=True, help="another checkout of the project")
    p.add_argument("--kind", choices=("text", "vision"), default="text")
    p.add_argument("--texts", type=int, default=400000)
    p.add_argument("--texts-per-manifest", type=int, default=20000)
    p.add_argument("--images", type=int, default=2048)
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument(
        "--preset",
        help="the model preset (default: the null encoders' tiny; huge: 1024-d vectors to write)",
    )
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    base = os.path.abspath(args.baseline)
    tmp = tempfile.mkdtemp(prefix="bench-cold-")
    try:
        if args.kind == "text":
            source, fmt = make_text_manifests(tmp, args.texts, args.texts_per_manifest), "manifest"
        else:
            source, fmt = make_corpus(tmp, args.images, 0)["vision"], "files"
        sets = {"preset": args.preset} if args.preset else {}
        print(f"{os.cpu_count()} cores; {args.kind} {sets}, baseline {base}", flush=True)
        results = []
        for i in range(args.pairs):
            order = [("this", ROOT), ("baseline", base)]
            pair = {}
            for name, root in order if i % 2 == 0 else order[::-1]:
                out = os.path.join(tmp, f"out-{name}-{i}")
                r = run(root, args.kind, source, fmt, out, sets)
                pair[name] = r
                print(f"pair {i + 1} {_line(name, r)}", flush=True)
            ratio = {k: pair["this"][k] / pair["baseline"][k] for k in ("wall_s", "cpu_s")}
            print(
                f"pair {i + 1} this/baseline: wall {ratio['wall_s']:.2f}, CPU {ratio['cpu_s']:.2f}",
                flush=True,
            )
            results.append({**pair, "ratio": ratio})
        for k in ("wall_s", "cpu_s"):
            v = sorted(r["ratio"][k] for r in results)
            print(f"median this/baseline {k[:-2]}: {v[len(v) // 2]:.2f} (of {len(v)} pairs)")
        write_results(args.json, results)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
