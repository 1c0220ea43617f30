"""Worker warm-up (`preprocess.warm_workers`) on and off: time to the first batch, CPU per item.

Each run is the embedding command line (`python -m pipelines.embed --json`) in a fresh process
that starts its own local Ray, so every run starts with cold worker processes (within one Ray,
workers stay warm from one job to the next and there would be nothing to measure). Encoders
are null (`debug.null_encoder`, one actor, batched as for a GPU encoder), so the figures are
the pipeline's own. Per kind, runs with the warm-up on and off alternate in `--rounds` pairs
(the order alternating too), since a shared machine's speed drifts over minutes. Per run:

- `first_batch_s` and `ray_up_s` from the job's summary, and their difference (the pipeline's
  own start-up: what the warm-up is meant to shorten);
- CPU: utime+stime of the whole process tree (driver, Ray's daemons and workers,
  `bench_pipeline.CpuSampler`), per item, start-up included: the warm-up's cost in processes
  it warms but the job never uses is in it;
- `workers_warmed` / `warmup_tasks` from the summary, and from the job's trace
  (`debug.trace_path`: a line per item with the process that preprocessed it, and the
  warm-up's `warm <pid> cold` lines) how many processes preprocessed and how many of those
  the warm-up had imported into before their first item (`reused`).

    python benchmarks/bench_warmup.py --rounds 2 --images 256 --texts 20000

(figures: benchmarks/results/warmup-cpu-2core.txt; `--json PATH` also writes them as JSON)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from _common import null_encoder_settings, write_results
from bench_pipeline import CpuSampler, make_corpus, make_text_manifests

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def reuse(trace: str) -> tuple[int, int]:
    """(processes that preprocessed, those of them warmed before their first item)."""
    warmed: dict[str, int] = {}
    first: dict[str, int] = {}
    with open(trace) as f:
        for i, line in enumerate(f):
            parts = line.split()
            if parts[0] == "warm":
                if parts[2] == "cold":
                    warmed[parts[1]] = i
            else:
                first.setdefault(parts[0], i)
    return len(first), sum(1 for pid, i in first.items() if warmed.get(pid, i) < i)


def cli_job(
    kind: str,
    source: str,
    fmt: str,
    out: str,
    sets: dict,
    root: str = ROOT,
    null: bool = True,
    timeout: float | None = None,
) -> tuple[dict, CpuSampler, float]:
    """The embedding command line of the checkout at `root`, in a fresh process and Ray, null
    encoders unless `null` is False: (its --json summary, the process tree's CpuSampler, wall
    seconds)."""
    sets = {"format": fmt, **(null_encoder_settings(kind) if null else {}), **sets}
    cmd = [sys.executable, "-m", "pipelines.embed", "--json", "--input", source, "--output", out]
    cmd += [a for k, v in sets.items() for a in ("--set", f"{k}={json.dumps(v)}")]
    # The checkout first; what PYTHONPATH held stays after it (e.g. where Ray is installed).
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": path, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    with CpuSampler() as cpu:
        w0 = time.perf_counter()
        res = subprocess.run(
            cmd, cwd=root, env=env, capture_output=True, text=True, check=False, timeout=timeout
        )
        wall = time.perf_counter() - w0
    if res.returncode != 0 or not res.stdout.strip():
        raise RuntimeError(f"job failed ({res.returncode}): {res.stderr[-2000:]}")
    # The summary is the last thing printed: Ray may print to stdout before it (a raylet
    # warning), so it is read from its first line ("{").
    out = res.stdout if res.stdout.startswith("{") else res.stdout[res.stdout.index("\n{") + 1 :]
    return json.loads(out), cpu, wall


def run_once(kind: str, source: str, fmt: str, out: str, warm: bool) -> dict:
    """One job in a fresh process and Ray; its summary's start-up figures and the tree's CPU."""
    trace = out + ".trace"
    s, cpu, wall = cli_job(
        kind, source, fmt, out, {"preprocess.warm_workers": warm, "debug.trace_path": trace}
    )
    items = s["kinds"][kind]["embedded"] + s["kinds"][kind]["errors"]
    processes, reused = reuse(trace)
    return {
        "kind": kind,
        "warm_workers": warm,
        "items": items,
        "wall_s": round(wall, 2),
        "cpu_s": round(cpu.seconds, 2),
        "cpu_ms_per_item": round(1000 * cpu.seconds / items, 3),
        "ray_up_s": s["ray_up_seconds"],
        "first_batch_s": s["first_batch_seconds"],
        "pipeline_start_s": round(s["first_batch_seconds"] - s["ray_up_seconds"], 3),
        "workers_warmed": s["workers_warmed"],
        "warmup_tasks": s["warmup_tasks"],
        "preprocess_processes": processes,
        "reused": reused,
    }


def _line(r: dict) -> str:
    return (
        f"{r['kind']:6s} warm {'on ' if r['warm_workers'] else 'off'}: "
        f"first batch {r['first_batch_s']:6.1f} s (Ray up {r['ray_up_s']:5.1f} s, pipeline "
        f"{r['pipeline_start_s']:5.1f} s) | CPU {r['cpu_ms_per_item']:7.3f} ms/item "
        f"({r['cpu_s']:6.1f} s, {r['items']} items, wall {r['wall_s']:5.1f} s) | warmed "
        f"{r['workers_warmed']}/{r['warmup_tasks']}, preprocessed in {r['preprocess_processes']}"
        f" processes, {r['reused']} of them warmed"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--texts", type=int, default=20000)
    p.add_argument("--kinds", default="text,vision")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    tmp = tempfile.mkdtemp(prefix="bench-warmup-")
    try:
        sources = {
            "vision": (make_corpus(tmp, args.images, 0)["vision"], "files"),
            "text": (make_text_manifests(tmp, args.texts, args.texts), "manifest"),
        }
        print(f"{os.cpu_count()} cores; images {args.images}, texts {args.texts}", flush=True)
        results = []
        for rnd in range(args.rounds):
            for kind in kinds:
                order = (True, False) if rnd % 2 == 0 else (False, True)
                for warm in order:
                    out = os.path.join(tmp, f"out-{kind}-{rnd}-{int(warm)}")
                    r = run_once(kind, *sources[kind], out, warm)
                    r["round"] = rnd + 1
                    results.append(r)
                    print(f"round {rnd + 1} {_line(r)}", flush=True)
        for kind in kinds:
            for warm in (True, False):
                rs = [r for r in results if r["kind"] == kind and r["warm_workers"] == warm]
                fb = sorted(r["first_batch_s"] for r in rs)
                cpu = sorted(r["cpu_ms_per_item"] for r in rs)
                print(
                    f"{kind:6s} warm {'on ' if warm else 'off'} median: first batch "
                    f"{fb[len(fb) // 2]:.1f} s, CPU {cpu[len(cpu) // 2]:.3f} ms/item"
                )
        write_results(args.json, results)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
