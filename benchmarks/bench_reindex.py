"""Incremental re-index with 1% of the corpus changed, against a full embed of the same corpus.

    RAY_AUTH_MODE=disabled .venv/bin/python benchmarks/bench_reindex.py \
        [--n 300] [--changed 0.01] [--preset base] [--workdir /tmp/bench-reindex]

One process, one local Ray, one corpus of captions in a local folder (text keeps a CPU run
short while the `base` model is still the work; the code path is the same for every kind):

1. first build (everything embedded; warms Ray Data up);
2. modify 1% of the items and re-index (the incremental run);
3. no change, re-index (nothing published: the cost of listing + diffing);
4. delete one item and re-index (publishes without embedding: carry-forward + index + publish);
5. change one item and re-index: the fixed overhead of a run that embeds anything (Ray Data
   start-up, encoder actor start and model construction, shard commit, index build, publish);
6. full re-embed of the same corpus (`index.full`), the baseline.

Prints each time with the job's own phase timings (from the version record), the ratio
incremental / full, and whether incremental <= 5% of full + the fixed overhead of step 5.
Times are never compared across runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time

from pipelines.config import load_reindex_config
from pipelines.publish import IndexRoot
from pipelines.reindex import reindex

WORDS = [
    "red",
    "green",
    "blue",
    "small",
    "large",
    "quiet",
    "loud",
    "dog",
    "cat",
    "street",
    "river",
    "mountain",
    "violin",
    "piano",
    "rain",
    "sun",
    "night",
    "morning",
    "city",
    "forest",
    "boat",
    "train",
    "bird",
    "child",
    "old",
    "new",
    "bright",
    "dark",
]


def caption(i: int, salt: int = 0) -> str:
    """A deterministic caption of 8-20 words for item i."""
    n = 8 + (i * 7 + salt) % 13
    return " ".join(WORDS[(i * 31 + k * 17 + salt * 13) % len(WORDS)] for k in range(n))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=300, help="corpus size (captions)")
    p.add_argument("--changed", type=float, default=0.01, help="fraction modified")
    p.add_argument("--preset", default="base")
    p.add_argument("--workdir", default="/tmp/bench-reindex")
    p.add_argument("--num-cpus", type=int, default=4, help="logical CPUs of the local Ray")
    p.add_argument("--threads", type=int, default=2, help="torch threads of the encoder actor")
    a = p.parse_args()

    shutil.rmtree(a.workdir, ignore_errors=True)
    corpus = os.path.join(a.workdir, "corpus")
    os.makedirs(corpus)
    for i in range(a.n):
        with open(os.path.join(corpus, f"cap{i:06d}.txt"), "w") as f:
            f.write(caption(i))
    overrides = {
        "input": corpus,
        "preset": a.preset,
        "index.root": os.path.join(a.workdir, "index"),
        "ray.address": "local",
        "ray.num_cpus": a.num_cpus,
        "ray.progress_bars": False,
        "preprocess.num_cpus": 0.5,
        "preprocess.batch_size": 32,
        "encoder_defaults.num_cpus": 2,
        "encoder_defaults.batch_size": 32,
        "encoder_defaults.torch_threads": a.threads,
        "files.files_per_shard": 100,
    }
    cfg = load_reindex_config(None, overrides)
    cfg_full = load_reindex_config(None, {**overrides, "index.full": True})

    def run(label: str, c=cfg) -> float:
        t = time.perf_counter()
        r = reindex(c)
        dt = time.perf_counter() - t
        phases = ""
        if r.status == "published":
            rec = IndexRoot(c.index.root).read_record(r.name)
            phases = " ".join(f"{k[:-2]}={v:.1f}" for k, v in rec["timings_s"].items())
        counts = {k: v for k, v in r.counts.items() if v}
        print(f"{label:34s} {dt:7.1f} s {r.status:9s} {json.dumps(counts)}  [{phases}]", flush=True)
        return dt

    k = max(1, round(a.n * a.changed))
    print(f"corpus: {a.n} captions, preset {a.preset}, {k} changed ({k / a.n:.1%})")
    run("1. first build (warm-up)")
    for i in range(k):
        with open(os.path.join(corpus, f"cap{i * (a.n // k):06d}.txt"), "w") as f:
            f.write(caption(i, salt=1))
    t_inc = run(f"2. incremental ({k} changed)")
    t_noop = run("3. no change (publishes nothing)")
    os.remove(os.path.join(corpus, f"cap{a.n - 1:06d}.txt"))
    t_del = run("4. one deletion (no embedding)")
    with open(os.path.join(corpus, f"cap{a.n - 2:06d}.txt"), "w") as f:
        f.write(caption(a.n, salt=2))
    t_one = run("5. one item changed (fixed cost)")
    t_full = run("6. full re-embed (baseline)", cfg_full)
    budget = 0.05 * t_full + t_one
    print(f"incremental / full = {t_inc / t_full:.3f}")
    print(
        f"target: incremental <= 5% of full + fixed overhead (one-item run, {t_one:.1f} s) = "
        f"{budget:.1f} s -> {'met' if t_inc <= budget else 'NOT met'}"
    )
    print(
        f"incremental beyond the fixed overhead: {t_inc - t_one:.1f} s = "
        f"{(t_inc - t_one) / t_full:.2%} of full; no-change run {t_noop:.1f} s, "
        f"deletion-only run {t_del:.1f} s"
    )


if __name__ == "__main__":
    main()
