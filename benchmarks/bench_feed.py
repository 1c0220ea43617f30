"""How well the offline job feeds an accelerator, measured on CPUs with a stand-in for one.

On a GPU node the question is whether the pipeline keeps the encoder busy: the GPU computes
while the CPUs read, decode and preprocess the next batches. This measures that on a machine
without a GPU. The encoder is the null encoder (`debug.null_encoder`) with a stand-in
accelerator (`debug.null_encoder_item_s`): each model batch is copied into a host buffer, as
the CUDA runner stages it, then holds the actor's one compute slot for a fixed time per item,
asleep, so the stand-in computes at a known rate and uses no CPU, as a GPU would. The actor
runs as on a GPU: one logical GPU per actor (a local Ray started with one), two calls at once,
the GPU's batch sizes and batches in flight (`encoder_defaults.max_tasks_in_flight`).

Per kind, in one warm local Ray:

1. capacity: the job's steady-state rate with the stand-in free (items/s: a full job minus a
   job on `--part` of the corpus, which pays the same fixed costs), i.e. what the pipeline can
   deliver on this machine;
2. the stand-in's rate is set to `--load` of that capacity (`null_encoder_item_s = 1 / rate`);
3. `--rounds` jobs with the stand-in, which logs when it computes
   (`debug.null_encoder_log_path`). Per job: its busy share from its first batch's start to
   its last batch's end (the steady state's utilisation: 1.0 = it never waited for input), the
   end to end share (its busy time over the job's wall time, planning to the last commit, Ray
   already up), how long after the job's start it got its first batch, and the CPU cores the
   job kept busy (the whole process tree: `bench_pipeline.CpuSampler`).

The issue's GPU targets are a steady state >= 0.9 of the bare encoder and >= 85 % utilisation;
on a GPU node the load is the GPU encoder's rate over the pipeline's capacity (the huge vision
encoder on an H200: ~1,333 images/s against ~16 CPU cores of preprocessing). Timings vary
with the machine: only the shares printed by one run are comparable.

    python benchmarks/bench_feed.py                      # vision and text, load 0.6
    python benchmarks/bench_feed.py --kinds vision --load 0.8 --json feed.json

The last line reads `stand-in accelerator busy (steady state, load <load>): vision <share>,
text <share>` (medians over the rounds).
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import sys
import tempfile
import time

from _common import key_value, write_results
from bench_pipeline import CpuSampler, _files, _median, make_corpus, make_text_manifests

FORMATS = {"vision": "files", "text": "manifest"}
# `--set KEY=VALUE` overrides of the job's config (e.g. encoder_defaults.max_tasks_in_flight=4).
OVERRIDES: dict[str, str] = {}


def feed_config(kind: str, source: str, out: str, preset: str, item_s: float, log: str | None):
    """The job's config: null encoder with a stand-in accelerator of `item_s` s per item
    (its busy intervals logged to `log`), one actor holding one logical GPU (so batched and
    queued as on a GPU)."""
    from pipelines.config import load_config

    return load_config(
        None,
        {
            "input": source,
            "output": out,
            "format": FORMATS[kind],
            "preset": preset,
            "ray.progress_bars": False,
            "debug.null_encoder": True,
            "debug.null_encoder_item_s": item_s,
            "debug.null_encoder_log_path": log,
            "encoder_defaults.num_gpus": 1,
            "encoder_defaults.min_actors": 1,
            "encoder_defaults.max_actors": 1,
            **OVERRIDES,
        },
    )


def start_ray(kinds: list[str], preset: str) -> None:
    """A local Ray started as the job starts one (`ensure_ray`), plus one logical GPU for the
    stand-in's actor: Ray then schedules it, and the job configures it, as on a GPU node."""
    import ray

    from pipelines.embed import ensure_ray
    from pipelines.resources import local_num_cpus

    cfgs = [feed_config(k, "x", "y", preset, 0.0, None) for k in kinds]
    cpus = max(local_num_cpus(c, [k]) for c, k in zip(cfgs, kinds, strict=True))
    cfg = cfgs[0].model_copy(update={"ray": cfgs[0].ray.model_copy(update={"num_cpus": cpus})})
    init = ray.init
    ray.init = functools.partial(init, num_gpus=1)  # ensure_ray's local Ray, with a GPU
    try:
        ensure_ray(cfg, kinds)
    finally:
        ray.init = init


def job(kind: str, source: str, out: str, preset: str, item_s: float = 0.0) -> dict:
    """One run of the job (planning to the last commit); with a stand-in (`item_s` > 0), its
    busy intervals too."""
    import pipelines.embed as embed

    log = f"{out}.stand-in.log" if item_s else None
    cfg = feed_config(kind, source, out, preset, item_s, log)
    with CpuSampler() as cpu:
        t0 = time.time()
        s = embed.run_job(cfg)
        wall = time.time() - t0
    r = {
        "items": s.ok.get(kind, 0) + s.errors.get(kind, 0),
        "wall_s": wall,
        "cpu_s": cpu.seconds,
        "first_batch_s": s.first_batch_seconds,
    }
    if log:
        with open(log) as f:
            spans = [(float(a), float(b), int(n)) for _, a, b, n in map(str.split, f)]
        first, last = min(a for a, _, _ in spans), max(b for _, b, _ in spans)
        busy = sum(b - a for a, b, _ in spans)
        r.update(
            stand_in_items=sum(n for _, _, n in spans),
            first_compute_s=first - t0,  # the job's start to the stand-in's first batch
            compute_window_s=last - first,
            busy_s=busy,
        )
    return r


def steady_rate(full: dict, part: dict) -> tuple[float, float]:
    """(items/s, CPU cores busy) of the steady state: the full job minus the part job."""
    dn, dw = full["items"] - part["items"], full["wall_s"] - part["wall_s"]
    if dw <= 0:
        return float("nan"), float("nan")
    return dn / dw, (full["cpu_s"] - part["cpu_s"]) / dw


def run_kind(kind: str, source: str, part: str, tmp: str, args: argparse.Namespace) -> dict:
    job(kind, source, f"{tmp}/{kind}-warm", args.preset)  # every worker has run each stage
    part_job = job(kind, part, f"{tmp}/{kind}-capacity-part", args.preset)
    full = job(kind, source, f"{tmp}/{kind}-capacity-full", args.preset)
    capacity, cap_cores = steady_rate(full, part_job)
    rate = args.load * capacity
    item_s = 1.0 / rate
    print(
        f"{kind:6s} capacity (stand-in free): {capacity:9.1f} items/s, {cap_cores:.2f} cores "
        f"busy | stand-in set to {rate:9.1f} items/s ({1e6 * item_s:.1f} us an item)",
        flush=True,
    )
    rounds = []
    for i in range(args.rounds):
        r = job(kind, source, f"{tmp}/{kind}-r{i}", args.preset, item_s)
        assert r["stand_in_items"] == r["items"], r  # every item went through the stand-in
        r["busy_share"] = r["busy_s"] / r["compute_window_s"]
        r["end_to_end"] = r["busy_s"] / r["wall_s"]
        r["cores_busy"] = r["cpu_s"] / r["wall_s"]
        rounds.append(r)
        print(
            f"{kind:6s} round {i + 1}: busy {r['busy_share']:.3f} of its "
            f"{r['compute_window_s']:.1f} s from first to last batch | end to end "
            f"{r['end_to_end']:.2f} ({r['items']} items in {r['wall_s']:.1f} s) | first batch "
            f"{r['first_compute_s']:.1f} s after the job's start | {r['cores_busy']:.2f} "
            "cores busy",
            flush=True,
        )
    med = {k: _median(r[k] for r in rounds) for k in ("busy_share", "end_to_end")}
    print(f"{kind:6s} median: busy {med['busy_share']:.3f}, end to end {med['end_to_end']:.2f}")
    return {
        "capacity_items_s": capacity,
        "capacity_cores_busy": cap_cores,
        "stand_in_items_s": rate,
        "stand_in_item_s": item_s,
        "rounds": rounds,
        "busy_share_median": med["busy_share"],
        "end_to_end_median": med["end_to_end"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kinds", default="vision,text")
    p.add_argument("--images", type=int, default=2048)
    p.add_argument("--texts", type=int, default=400_000)
    p.add_argument("--texts-per-manifest", type=int, default=20_000)
    p.add_argument("--part", type=float, default=0.25, help="the smaller job's share")
    p.add_argument("--load", type=float, default=0.6, help="the stand-in's rate over the capacity")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--preset", default="huge", help="sets the vectors' width (1024-d: huge)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        type=key_value,
        metavar="KEY=VALUE",
        help="a job config override",
    )
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    OVERRIDES.update(args.set)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    kinds = args.kinds.split(",")
    tmp = tempfile.mkdtemp(prefix="bench-feed-")
    try:
        start_ray(kinds, args.preset)
        print(
            f"stand-in accelerator: {os.cpu_count()} cores, Ray "
            f"{ray.cluster_resources().get('CPU', 0):.0f} logical CPUs and 1 logical GPU; "
            f"load {args.load}, preset {args.preset}",
            flush=True,
        )
        results: dict = {"cores": os.cpu_count(), "load": args.load}
        for kind in kinds:
            if kind == "text":
                source = make_text_manifests(f"{tmp}/src", args.texts, args.texts_per_manifest)
                part = make_text_manifests(
                    f"{tmp}/part", int(args.texts * args.part), args.texts_per_manifest
                )
            else:
                source = make_corpus(f"{tmp}/src", args.images, 0)["vision"]
                part = f"{tmp}/part-images"
                os.makedirs(part)
                for f in _files(source)[: int(args.images * args.part)]:
                    os.link(f, os.path.join(part, os.path.basename(f)))
            results[kind] = run_kind(kind, source, part, tmp, args)
        write_results(args.json, results)
        print(
            f"stand-in accelerator busy (steady state, load {args.load}): "
            + ", ".join(f"{k} {results[k]['busy_share_median']:.3f}" for k in kinds)
        )
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
