"""Throughput of the offline embedding job against its baselines, measured in one process/run.

For each kind (images, texts) on a generated corpus:

- loop:  a single-process loop doing what the job does — read the file, `preprocess`,
         `collate` into batches of the same size, encode with the same model — timed from
         model construction to the last embedding (the job builds its models inside the run too);
- bare:  the encoder alone on pre-decoded, pre-collated tensors (the ceiling: an encoder that
         never starves);
- job:   `run_job` on local Ray (Ray already started: `ray.init` is reported apart), timed
         from planning to the last committed shard, after a one-item job has warmed Ray Data
         up (its time, the first job's start-up, is printed apart); "steady" subtracts the
         time of another one-item run of the same job (actor start-up, model build, one shard
         commit: the fixed cost).

Loop and job run in `--rounds` pairs, the order alternating (loop first, then job first, ...),
and each round's job/loop ratio is printed: the machine's speed drifts over minutes, and
neighbours in time are the fair comparison. The median round gives the summary figures.

Prints items/s and the ratios job/loop and job/bare, and the job's peak resident memory (sum
over the driver and every Ray process it started; shared pages count once per process, so
this over-estimates) beside the loop's (the same sampler runs around both, at the same
cost). Use a model large enough to be the work (`--preset base`, random
weights); `--preset tiny` measures framework overhead only. Never compare absolute numbers
across runs or machines, only the ratios printed by one run.

    python benchmarks/bench_pipeline.py --preset base --images 96 --texts 512
    python benchmarks/bench_pipeline.py --preset tiny --images 96 --texts 512

`--null-encoder` measures the pipeline's own ceiling instead: the job with encoders that run
no model (`debug.null_encoder`), fed as a GPU encoder is (its preprocessing and encoder batch
sizes), against the bare preprocessing in one process on one core, done as the job's stage does
it (read the file and `preprocess(..., compact=True)` it; texts: take the manifest's text and
tokenize a block at a time with `preprocess_texts`). Images are JPEG files, texts inline in
Parquet manifests. Both sides are counted two ways, in rounds of alternating order:

- CPU: items per CPU-second — the job's over every process it runs on (driver, Ray's
  daemons, workers: utime+stime of the process tree, `CpuSampler`), the bare loop's of its
  own process. The bench's own sampling threads in the driver are measured and left out.
  1.0 means Ray and the transport cost nothing; neighbours on a shared machine barely move it;
- wall: the job's items/s per core of the machine against the bare loop's items/s (one core).

Both count the job's steady state: the difference between the full job and a job on a part
of the corpus (`--null-part`, a quarter by default), which pays the same fixed costs (worker
and actor start-up and imports, tokenizer builds, planning, the last commit) but fewer items.
Each round also splits the steady state's CPU per item by the role of the process that
spent it (`process_role`): task workers (read, preprocess, write, commit tasks), encoder
actors, the driver (Ray Data's executor, the job's loop), and Ray (raylet, GCS, agents, log
monitor, Ray Data's and the job's small actors), beside the bare loop's; and how many task
workers each job started, with their CPU (start-up included). Ray ends idle workers above
its soft limit between jobs, so a full job can start workers the part job did not: their
start-up (~1-3 CPU-s each) then lands in that round's steady state.
The last line reads `null-encoder ceiling: vision <ratio>, text <ratio>` (the CPU ratios).

    python benchmarks/bench_pipeline.py --null-encoder --json benchmarks/results/null.json
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import shutil
import sys
import tempfile
import threading
import time
import warnings
from typing import Any

import numpy as np
from _common import null_encoder_settings

import imagebind_core as ibc

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


# ----------------------------------------------------------------------------- corpus


# Caption vocabulary of the synthetic corpora (the caption files draw on the first ten words).
WORDS = (
    *("a", "the", "dog", "cat", "runs", "over", "under", "bright", "dark", "city"),
    *("red", "car", "park", "beach"),
)


def make_corpus(root: str, n_images: int, n_texts: int) -> dict[str, str]:
    """Write `n_images` 640x480 JPEGs and `n_texts` captions; returns {kind: folder}."""
    from PIL import Image

    rng = np.random.default_rng(0)
    os.makedirs(f"{root}/images", exist_ok=True)
    os.makedirs(f"{root}/texts", exist_ok=True)
    yy, xx = np.mgrid[0:480, 0:640].astype(np.float32)
    for i in range(n_images):
        img = np.stack(
            [
                127 + 127 * np.sin(xx / (7 + i % 5)),
                255 * yy / 479,
                127 + 127 * np.cos((xx + yy) / (11 + i % 3)),
            ],
            -1,
        )
        img += rng.normal(0, 8, img.shape)
        buf = io.BytesIO()
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
        with open(f"{root}/images/{i:05d}.jpg", "wb") as f:
            f.write(buf.getvalue())
    for i in range(n_texts):
        text = " ".join(rng.choice(WORDS[:10], size=8 + i % 12))
        with open(f"{root}/texts/{i:05d}.txt", "w") as f:
            f.write(text)
    return {"vision": f"{root}/images", "text": f"{root}/texts"}


# ----------------------------------------------------------------------------- baselines


def _files(folder: str) -> list[str]:
    return sorted(os.path.join(folder, n) for n in os.listdir(folder))


def run_loop(kind: str, folder: str, preset: str, batch: int) -> tuple[float, int]:
    """Single-process read + preprocess + collate + encode; (seconds, items)."""
    import torch

    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = ibc.load_model(None, preset, modalities=[ibc.model_modality(kind)], device="cpu")
    m = ibc.model_modality(kind).value
    files = _files(folder)
    n = 0
    for i in range(0, len(files), batch):
        xs = []
        for p in files[i : i + batch]:
            with open(p, "rb") as f:
                xs.append(ibc.preprocess(kind, f.read()))
        with torch.inference_mode():
            model({m: ibc.collate(xs)}, normalize=True)
        n += len(xs)
    return time.perf_counter() - t0, n


def run_loop_sampled(kind: str, folder: str, preset: str, batch: int) -> tuple[float, int, float]:
    """`run_loop` under the job's RSS sampler (its /proc scans cost both sides alike), counting
    this process only — Ray's processes idle beside the loop; (seconds, items, peak RSS MB)."""
    with RssSampler(descendants=False) as rss:
        seconds, n = run_loop(kind, folder, preset, batch)
    return seconds, n, rss.peak_sum / 2**20


def run_bare(kind: str, folder: str, preset: str, batch: int) -> tuple[float, int]:
    """The encoder alone on pre-decoded batches; (seconds, items)."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = ibc.load_model(None, preset, modalities=[ibc.model_modality(kind)], device="cpu")
    m = ibc.model_modality(kind).value
    files = _files(folder)
    batches = []
    for i in range(0, len(files), batch):
        xs = []
        for p in files[i : i + batch]:
            with open(p, "rb") as f:
                xs.append(ibc.preprocess(kind, f.read()))
        batches.append(ibc.collate(xs))
    t0 = time.perf_counter()
    with torch.inference_mode():
        for x in batches:
            model({m: x}, normalize=True)
    return time.perf_counter() - t0, len(files)


# ----------------------------------------------------------------------------- the job


def _tree_rss(root_pid: int, descendants: bool = True) -> tuple[int, int]:
    """(sum, max) of VmRSS in bytes over `root_pid` and its descendants (Linux /proc); with
    `descendants=False` the scan is the same (the same cost) but only `root_pid` counts."""
    parent: dict[int, int] = {}
    rss: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                parent[int(d)] = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{d}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        rss[int(d)] = int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            continue
    tree, frontier = {root_pid}, ([root_pid] if descendants else [])
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parent.items() if pp == p and c not in tree]
        tree.update(kids)
        frontier.extend(kids)
    vals = [rss.get(p, 0) for p in tree]
    return sum(vals), max(vals)


class RssSampler:
    """Peak of the process-tree RSS, sampled every `period` seconds in a thread."""

    def __init__(self, period: float = 0.25, descendants: bool = True) -> None:
        self.period = period
        self.descendants = descendants
        self.peak_sum = 0
        self.peak_proc = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            s, m = _tree_rss(os.getpid(), self.descendants)
            self.peak_sum, self.peak_proc = max(self.peak_sum, s), max(self.peak_proc, m)
            self._stop.wait(self.period)

    def __enter__(self) -> RssSampler:
        self._t.start()
        return self

    def __exit__(self, *a: object) -> None:
        self._stop.set()
        self._t.join()


def run_job_once(
    kind: str, folder: str, out: str, preset: str, batch: int, overrides: dict
) -> dict:
    """`run_job` on `folder` with the job's defaults plus `overrides`: seconds (planning to
    last commit), items, peak RSS."""
    import pipelines.embed as embed
    from pipelines.config import load_config

    cfg = load_config(
        None,
        {
            "input": folder,
            "output": out,
            "format": "files",
            "preset": preset,
            "encoder_defaults.batch_size": batch,
            "ray.progress_bars": False,
            **overrides,
        },
    )
    with RssSampler() as rss:
        t0 = time.perf_counter()
        summary = embed.run_job(cfg)
        t1 = time.perf_counter()
    n = summary.ok.get(kind, 0) + summary.errors.get(kind, 0)
    return {
        "seconds": t1 - t0,
        "items": n,
        "peak_rss_sum_mb": rss.peak_sum / 2**20,
        "peak_rss_proc_mb": rss.peak_proc / 2**20,
    }


# ----------------------------------------------------------------------------- null encoder


def _tree_cpu_ticks(root_pid: int) -> dict[int, int]:
    """utime + stime (clock ticks) of `root_pid` and every descendant alive now."""
    parent: dict[int, int] = {}
    cpu: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parent[int(d)] = int(fields[1])
        cpu[int(d)] = int(fields[11]) + int(fields[12])
    tree, frontier = {root_pid}, [root_pid]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parent.items() if pp == p and c not in tree]
        tree.update(kids)
        frontier.extend(kids)
    return {p: cpu[p] for p in tree if p in cpu}


# Where a job's CPU goes, by the role of each process (`process_role`).
ROLES = ("task workers", "encoder actors", "driver", "Ray")
# How sure a title makes a worker's role: a later title of a higher rank wins. A worker
# process starts as "default_worker.py", then shows the task or actor it runs ("ray::<name>")
# and, a task worker between tasks, "ray::IDLE"; an actor keeps its class's name.
_RANK = {"starting": 0, "ray actor or task": 1, "task workers": 2, "encoder actors": 3}


def process_role(pid: int, root_pid: int) -> str | None:
    """What a process of a local Ray started by `root_pid` shows itself as now (None: gone):
    "driver"; "encoder actors" (Ray Data's actor pool: `ray::MapWorker(...)`); "task
    workers" (`ray::IDLE`, `ray::MapBatches(...)`); "ray actor or task" (another
    `ray::<name>`: Ray Data's and the job's small actors, or a task such as a shard commit);
    "starting" (a worker not yet titled); "Ray" (raylet, GCS, agents, log monitor)."""
    if pid == root_pid:
        return "driver"
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().split(b"\0")[0].decode(errors="replace")
    except OSError:
        return None
    if cmd.startswith("ray::MapWorker("):
        return "encoder actors"
    if cmd.startswith(("ray::IDLE", "ray::MapBatches")):
        return "task workers"
    if cmd.startswith("ray::"):
        return "ray actor or task"
    return "starting" if "default_worker" in cmd else "Ray"


def _merge_role(seen: str | None, now: str) -> str:
    """A process's role over its samples: the title of the highest `_RANK` wins."""
    if seen is None or now not in _RANK or seen not in _RANK or _RANK[now] >= _RANK[seen]:
        return now
    return seen


def _final_role(role: str) -> str:
    """`process_role`'s answers folded into `ROLES`: a task worker seen only while it ran a
    task, or before its title, counts as one; a worker seen only as another `ray::<name>` is
    one of Ray's or the job's small actors."""
    return {"starting": "task workers", "ray actor or task": "Ray"}.get(role, role)


class CpuSampler:
    """CPU seconds the process tree of this driver (Ray's daemons and workers of a local Ray)
    spends while the block runs: each process's utime+stime, sampled every `period` s, minus
    what it had at the start. A process that exits between two samples loses at most one
    period of its time (workers live for the whole job, so this undercounts little).

    `by_role` splits the seconds by the role of each process (`process_role` at each sample,
    `_merge_role` over them). The sampler's own thread and the `exclude` threads of this
    process (other instruments, e.g. `ObjectStoreSampler`) are measured (`thread_time`) and
    left out of the driver's seconds: they are not the job.
    """

    def __init__(self, period: float = 0.5, exclude: tuple[Any, ...] = ()) -> None:
        self.period = period
        self.exclude = exclude
        self.own_seconds = 0.0
        self._start: dict[int, int] = {}
        self._last: dict[int, int] = {}
        self._roles: dict[int, str] = {}
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        root = os.getpid()
        for p, t in _tree_cpu_ticks(root).items():
            self._last[p] = t
            role = process_role(p, root)
            if role is not None:
                self._roles[p] = _merge_role(self._roles.get(p), role)

    def _run(self) -> None:
        c0 = time.thread_time()
        while True:
            self._sample()
            if self._stop.wait(self.period):
                break
        self._sample()
        self.own_seconds = time.thread_time() - c0

    def _instrument_seconds(self) -> float:
        return self.own_seconds + sum(getattr(x, "own_seconds", 0.0) for x in self.exclude)

    def _role_seconds(self) -> dict[str, float]:
        hz = os.sysconf("SC_CLK_TCK")
        out = dict.fromkeys(ROLES, 0.0)
        for p, t in self._last.items():
            role = _final_role(self._roles.get(p, "Ray"))
            out[role] += (t - self._start.get(p, 0)) / hz
        return out

    @property
    def by_role(self) -> dict[str, float]:
        out = self._role_seconds()
        out["driver"] = max(0.0, out["driver"] - self._instrument_seconds())
        return out

    @property
    def started(self) -> dict[str, list[float]]:
        """Processes started while the block ran, by role: [how many, their CPU seconds]
        (their start-up included: importing Ray, pyarrow, torch in a new worker)."""
        hz = os.sysconf("SC_CLK_TCK")
        out: dict[str, list[float]] = {role: [0, 0.0] for role in ROLES}
        for p, t in self._last.items():
            if p not in self._start:
                role = _final_role(self._roles.get(p, "Ray"))
                out[role][0] += 1
                out[role][1] += t / hz
        return out

    @property
    def seconds(self) -> float:
        return sum(self.by_role.values())

    def __enter__(self) -> CpuSampler:
        self._start = _tree_cpu_ticks(os.getpid())
        self._t.start()
        return self

    def __exit__(self, *a: object) -> None:
        self._stop.set()
        self._t.join()


class ObjectStoreSampler:
    """Peak object-store use and spilled bytes of the local Ray while a job runs (Ray's own
    memory stats, polled every `period` s)."""

    def __init__(self, period: float = 0.5) -> None:
        self.period = period
        self.peak_bytes = 0
        self.spilled_bytes = 0
        self.own_seconds = 0.0  # this sampler's thread (CpuSampler leaves it out)
        self.ok = True
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _stats(self):
        import ray
        from ray._private.internal_api import get_memory_info_reply
        from ray._private.state import state

        node = ray.nodes()[0] if not hasattr(self, "_node") else self._node
        self._node = node
        reply = get_memory_info_reply(
            state, node["NodeManagerAddress"], node["NodeManagerPort"], timeout_seconds=5
        )
        return reply.store_stats

    def _run(self) -> None:
        c0 = time.thread_time()
        try:
            while not self._stop.is_set():
                try:
                    st = self._stats()
                    self.peak_bytes = max(self.peak_bytes, int(st.object_store_bytes_used))
                    self.spilled_bytes = int(st.spilled_bytes_total)
                except Exception:  # an internal API: report nothing rather than fail the run
                    self.ok = False
                    return
                self._stop.wait(self.period)
        finally:
            self.own_seconds = time.thread_time() - c0

    def __enter__(self) -> ObjectStoreSampler:
        self._t.start()
        return self

    def __exit__(self, *a: object) -> None:
        self._stop.set()
        self._t.join()


def make_text_manifests(root: str, n: int, per_file: int) -> str:
    """`n` captions as inline-text Parquet manifests of `per_file` rows; returns the folder."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(1)
    os.makedirs(f"{root}/manifests", exist_ok=True)
    for k, start in enumerate(range(0, n, per_file)):
        ids = range(start, min(n, start + per_file))
        texts = [" ".join(rng.choice(WORDS, size=6 + i % 14)) for i in ids]
        pq.write_table(
            pa.table(
                {"id": [f"t{i:07d}" for i in ids], "modality": ["text"] * len(texts), "text": texts}
            ),
            f"{root}/manifests/part-{k:04d}.parquet",
        )
    return f"{root}/manifests"


def bare_preprocess(
    kind: str, source: str, limit: int, block: int = 8192
) -> tuple[int, float, float]:
    """One process, one thread: read + preprocess up to `limit` items as the job's stage does
    (images: `preprocess(compact=True)` each; texts: `preprocess_texts` on `block` texts at
    a time, the stage's one call per block); (items, CPU s, wall s)."""
    import pyarrow.parquet as pq

    if kind == "text":
        texts = []
        for name in sorted(os.listdir(source)):
            texts.extend(
                pq.read_table(os.path.join(source, name), columns=["text"])["text"].to_pylist()
            )
            if len(texts) >= limit:
                break
        items = texts[:limit]
        ibc.preprocess("text", items[0])  # tokenizer built: every worker does that once
        c0, w0 = time.process_time(), time.perf_counter()
        for start in range(0, len(items), block):
            ibc.preprocess.preprocess_texts(items[start : start + block])
    else:
        files = _files(source)[:limit]
        with open(files[0], "rb") as f:
            ibc.preprocess(kind, f.read(), compact=True)
        c0, w0 = time.process_time(), time.perf_counter()
        for p in files:
            with open(p, "rb") as f:
                ibc.preprocess(kind, f.read(), compact=True)
    return (
        len(items if kind == "text" else files),
        time.process_time() - c0,
        time.perf_counter() - w0,
    )


def start_ray_as_the_job(cpus: int, kinds: list[str]) -> None:
    """A local Ray of `cpus` logical CPUs, started as the job starts one (its Arrow allocator:
    `pipelines.embed.ensure_ray`)."""
    from pipelines.config import load_config
    from pipelines.embed import ensure_ray

    ensure_ray(load_config(None, {"input": "x", "output": "y", "ray.num_cpus": cpus}), kinds)


def null_config(kind: str, source: str, out: str, fmt: str):
    """The job's config with null encoders, batched as for a GPU encoder, one actor."""
    from pipelines.config import load_config

    return load_config(
        None, {"input": source, "output": out, "format": fmt, **null_encoder_settings(kind)}
    )


def null_job(kind: str, source: str, out: str, fmt: str) -> dict:
    """The job with null encoders; wall and tree CPU seconds, object store, first batch."""
    import pipelines.embed as embed

    cfg = null_config(kind, source, out, fmt)
    store = ObjectStoreSampler()
    with store, CpuSampler(exclude=(store,)) as cpu_s:
        w0 = time.perf_counter()
        summary = embed.run_job(cfg)
        wall = time.perf_counter() - w0
    return {
        "items": summary.ok.get(kind, 0) + summary.errors.get(kind, 0),
        "wall_s": wall,
        "cpu_s": cpu_s.seconds,
        "cpu_s_by_role": cpu_s.by_role,
        "started_processes": cpu_s.started,
        "instruments_cpu_s": cpu_s.own_seconds + store.own_seconds,
        "first_batch_s": summary.first_batch_seconds,
        "object_store_peak_mb": store.peak_bytes / 2**20 if store.ok else None,
        "spilled_mb": store.spilled_bytes / 2**20 if store.ok else None,
    }


def _median(values) -> float:
    """Median of the rounds that measured something (nan rounds left out; nan if none)."""
    vals = sorted(v for v in values if not math.isnan(v))
    return vals[len(vals) // 2] if vals else math.nan


def run_null_ceiling(args: argparse.Namespace) -> None:
    import ray
    import torch

    torch.set_num_threads(1)
    cores = os.cpu_count() or 1
    tmp = tempfile.mkdtemp(prefix="bench-null-")
    try:
        kinds = args.kinds.split(",")
        folders = make_corpus(tmp, args.images if "vision" in kinds else 0, 0)
        if "text" in kinds:
            folders["text"] = make_text_manifests(tmp, args.texts, args.texts_per_manifest)
        fmts = {"vision": "files", "text": "manifest"}
        bare_items = {"vision": args.bare_images, "text": args.bare_texts}
        from pipelines.resources import local_num_cpus

        # The logical CPUs the job gives a local Ray it starts itself, for the busiest kind.
        cpus = max(local_num_cpus(null_config(k, "x", "y", fmts[k]), [k]) for k in kinds)
        start_ray_as_the_job(cpus, kinds)
        results: dict = {
            "cores": cores,
            "ray_logical_cpus": cpus,
            "command": "python " + " ".join(sys.argv),
        }
        print(
            f"null encoder: {cores} cores, Ray {cpus} logical CPUs; images {args.images}, "
            f"texts {args.texts}",
            flush=True,
        )
        ratios = {}
        for kind in args.kinds.split(","):
            part = f"{tmp}/part-{kind}"
            if kind == "text":
                part = make_text_manifests(
                    part, int(args.texts * args.null_part), args.texts_per_manifest
                )
            else:
                os.makedirs(part)
                for f in _files(folders[kind])[: int(args.images * args.null_part)]:
                    os.link(f, os.path.join(part, os.path.basename(f)))
            # Ray Data's first start, on the whole corpus: every Ray worker process that the
            # measured jobs will use has then run each stage once (a worker's first
            # preprocessing task imports torch and builds the tokenizer, ~1.5-2 CPU-s). A
            # warm-up on the part only left some workers cold, and the full job, which spreads
            # over more of them, paid that start-up inside its "steady" difference.
            null_job(kind, folders[kind], f"{tmp}/warm-{kind}", fmts[kind])
            rounds = []
            for i in range(args.rounds):
                order = ["bare", "job"] if i % 2 == 0 else ["job", "bare"]
                r: dict = {}
                for side in order:
                    if side == "bare":
                        n, c, w = bare_preprocess(
                            kind,
                            folders[kind],
                            bare_items[kind],
                            null_config(kind, "x", "y", fmts[kind]).preprocess_batch(kind),
                        )
                        r.update(bare_items_per_cpu_s=n / c, bare_items_per_s=n / w)
                    else:
                        fixed = null_job(kind, part, f"{tmp}/fixed-{kind}-{i}", fmts[kind])
                        job = null_job(kind, folders[kind], f"{tmp}/out-{kind}-{i}", fmts[kind])
                        steady_n = job["items"] - fixed["items"]
                        r.update(job=job, fixed=fixed)
                        # A part job that cost as much as the full one (its fixed costs
                        # swamped by neighbours' load) leaves no steady state: nan, not 1e13.
                        d_cpu = job["cpu_s"] - fixed["cpu_s"]
                        d_wall = job["wall_s"] - fixed["wall_s"]
                        r["job_items_per_cpu_s"] = steady_n / d_cpu if d_cpu > 0 else math.nan
                        r["job_items_per_s_per_core"] = (
                            steady_n / d_wall / cores if d_wall > 0 else math.nan
                        )
                        # The steady state's CPU per item, by role: where Ray's share goes.
                        r["steady_us_per_item"] = {
                            role: (job["cpu_s_by_role"][role] - fixed["cpu_s_by_role"][role])
                            / steady_n
                            * 1e6
                            for role in ROLES
                        }
                r["cpu_ratio"] = r["job_items_per_cpu_s"] / r["bare_items_per_cpu_s"]
                r["wall_ratio"] = r["job_items_per_s_per_core"] / r["bare_items_per_s"]
                rounds.append(r)
                print(
                    f"{kind:6s} round {i + 1}: bare {r['bare_items_per_cpu_s']:8.1f} items/CPU-s "
                    f"({r['bare_items_per_s']:8.1f}/s) | job {r['job_items_per_cpu_s']:8.1f} "
                    f"items/CPU-s ({r['job_items_per_s_per_core']:8.1f}/s per core) | CPU ratio "
                    f"{r['cpu_ratio']:.2f}, wall ratio {r['wall_ratio']:.2f} | first batch "
                    f"{r['job']['first_batch_s'] or float('nan'):.1f} s | object store peak "
                    f"{r['job']['object_store_peak_mb'] or float('nan'):.0f} MB, spilled "
                    f"{r['job']['spilled_mb'] or 0:.0f} MB",
                    flush=True,
                )
                split = r["steady_us_per_item"]
                started = {
                    name: r[name]["started_processes"]["task workers"] for name in ("job", "fixed")
                }
                print(
                    "         steady state, us of CPU per item: "
                    + ", ".join(f"{role} {split[role]:.1f}" for role in ROLES)
                    + f" | bare {1e6 / r['bare_items_per_cpu_s']:.1f} | task workers started: "
                    + ", ".join(
                        f"{name} job {n:.0f} ({cpu:.1f} CPU-s)"
                        for name, (n, cpu) in zip(("full", "part"), started.values(), strict=True)
                    ),
                    flush=True,
                )
            med, wall_med = (_median(x[key] for x in rounds) for key in ("cpu_ratio", "wall_ratio"))
            ratios[kind] = med
            results[kind] = {
                "items": rounds[0]["job"]["items"],
                "rounds": rounds,
                "cpu_ratio_median": med,
                "wall_ratio_median": wall_med,
                "object_store_peak_mb": max(
                    (x["job"]["object_store_peak_mb"] or 0) for x in rounds
                ),
                "spilled_mb": max((x["job"]["spilled_mb"] or 0) for x in rounds),
                "steady_us_per_item_median": {
                    role: _median(x["steady_us_per_item"][role] for x in rounds) for role in ROLES
                },
                "bare_us_per_item_median": _median(1e6 / x["bare_items_per_cpu_s"] for x in rounds),
            }
            print(f"{kind:6s} median: CPU ratio {med:.2f}, wall ratio {wall_med:.2f}")
            split = results[kind]["steady_us_per_item_median"]
            print(
                f"{kind:6s} median us of CPU per item: "
                + ", ".join(f"{role} {split[role]:.1f}" for role in ROLES)
                + f" | bare {results[kind]['bare_us_per_item_median']:.1f}"
            )
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=2)
        ray.shutdown()
        print("null-encoder ceiling: " + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items()))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="base")
    p.add_argument("--images", type=int, default=96)
    p.add_argument("--texts", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument(
        "--threads", type=int, default=os.cpu_count() or 1, help="torch threads of loop and bare"
    )
    p.add_argument("--kinds", default="vision,text")
    p.add_argument(
        "--rounds", type=int, default=3, help="(loop, job) pairs per kind, in alternating order"
    )
    # The job runs with its defaults; these override them (unset: the job's default).
    p.add_argument("--encoder-cpus", type=float, help="job: logical CPUs per encoder actor")
    p.add_argument("--job-threads", type=int, help="job: torch threads per encoder actor")
    p.add_argument("--actors", type=int, help="job: a fixed pool of this many encoder actors")
    p.add_argument("--preprocess-batch", type=int, help="job: rows per preprocess task")
    p.add_argument("--files-per-shard", type=int, help="job: input files per shard")
    p.add_argument("--json", help="also write the results here")
    p.add_argument(
        "--null-encoder",
        action="store_true",
        help="the pipeline's ceiling: encoders that run no model, against bare preprocessing "
        "(defaults then: --images 2048 --texts 100000 --rounds 3)",
    )
    p.add_argument("--texts-per-manifest", type=int, default=20000, help="null encoder")
    p.add_argument(
        "--null-part", type=float, default=0.25, help="null encoder: the smaller job's share"
    )
    p.add_argument("--bare-images", type=int, default=256, help="null encoder: bare loop items")
    p.add_argument("--bare-texts", type=int, default=20000, help="null encoder: bare loop items")
    args = p.parse_args()
    if args.null_encoder:
        given = set(sys.argv)
        if "--images" not in given:
            args.images = 2048
        if "--texts" not in given:
            args.texts = 100_000
        run_null_ceiling(args)
        return

    import ray
    import torch

    torch.set_num_threads(args.threads)
    tmp = tempfile.mkdtemp(prefix="bench-pipeline-")
    try:
        folders = make_corpus(tmp, args.images, args.texts)
        t0 = time.perf_counter()
        # What the job starts when it starts Ray itself: twice the cores in logical CPUs.
        from pipelines.config import load_config
        from pipelines.resources import local_num_cpus

        # The logical CPUs the job gives a local Ray it starts itself.
        kinds = args.kinds.split(",")
        cpus = local_num_cpus(load_config(None, {"input": "x", "output": "y"}), kinds)
        start_ray_as_the_job(cpus, kinds)
        ray_init_s = time.perf_counter() - t0
        results = {"preset": args.preset, "batch_size": args.batch_size, "ray_init_s": ray_init_s}
        flags = ("encoder_cpus", "job_threads", "actors", "preprocess_batch", "files_per_shard")
        given_flags = " ".join(f"{a}={getattr(args, a)}" for a in flags if getattr(args, a))
        print(
            f"preset {args.preset}, batch {args.batch_size}, {os.cpu_count()} cores, loop/bare "
            f"torch threads {args.threads}; ray.init {ray_init_s:.1f} s (not counted); job "
            f"settings: {given_flags or 'the job defaults'}"
        )
        for kind in args.kinds.split(","):
            folder = folders[kind]
            # The job's fixed cost (actor start, model build, one shard): a one-item run.
            one = f"{tmp}/one-{kind}"
            os.makedirs(one)
            first = _files(folder)[0]
            shutil.copy(first, os.path.join(one, os.path.basename(first)))
            given = {
                "encoder_defaults.num_cpus": args.encoder_cpus,
                "encoder_defaults.torch_threads": args.job_threads,
                "encoder_defaults.min_actors": args.actors,
                "encoder_defaults.max_actors": args.actors,
                "preprocess.batch_size": args.preprocess_batch,
                "files.files_per_shard": args.files_per_shard,
            }
            common = (args.preset, args.batch_size, {k: v for k, v in given.items() if v})
            # The first job in a Ray instance also pays Ray Data's own start (its imports in
            # the driver, its stats/autoscaling/location actors): a one-item run takes it, and
            # is reported apart. The measured jobs then run warm, and another one-item run
            # (warm too) gives the fixed cost that "steady" subtracts.
            cold = run_job_once(kind, one, f"{tmp}/out0-{kind}", *common)
            bare_s, _ = run_bare(kind, folder, args.preset, args.batch_size)
            # Rounds of (loop, job) in alternating order, each ratio from neighbours in time:
            # a shared machine's speed drifts over minutes, which one pair cannot tell from a
            # real difference.
            rounds = []
            for i in range(args.rounds):
                out = f"{tmp}/out-{kind}-{i}"
                if i % 2 == 0:
                    loop_s, n, loop_rss = run_loop_sampled(
                        kind, folder, args.preset, args.batch_size
                    )
                    job = run_job_once(kind, folder, out, *common)
                else:
                    job = run_job_once(kind, folder, out, *common)
                    loop_s, n, loop_rss = run_loop_sampled(
                        kind, folder, args.preset, args.batch_size
                    )
                assert job["items"] == n, (job, n)
                rounds.append({"loop_seconds": loop_s, "loop_peak_rss_mb": loop_rss, **job})
            job1 = run_job_once(kind, one, f"{tmp}/out1-{kind}", *common)
            ratios = [r["loop_seconds"] / r["seconds"] for r in rounds]
            mid = sorted(range(len(rounds)), key=lambda i: ratios[i])[len(rounds) // 2]
            med = rounds[mid]  # the round with the median job/loop ratio
            extra = med["seconds"] - job1["seconds"]
            r = {
                "items": n,
                "rounds": rounds,
                "job_vs_loop_per_round": ratios,
                "loop_items_s": n / med["loop_seconds"],
                "bare_items_s": n / bare_s,
                "job_items_s": n / med["seconds"],
                # Throughput once running: (n - 1) items over the time beyond a 1-item run.
                # Undefined (nan) when the fixed cost is nearly all of it (tiny models).
                "job_steady_items_s": (n - 1) / extra if extra > 0.1 * med["seconds"] else math.nan,
                "fixed_seconds": job1["seconds"],
                "cold_one_item_seconds": cold["seconds"],
                "peak_rss_sum_mb": max(x["peak_rss_sum_mb"] for x in rounds),
                "peak_rss_proc_mb": max(x["peak_rss_proc_mb"] for x in rounds),
                "loop_peak_rss_mb": max(x["loop_peak_rss_mb"] for x in rounds),
            }
            r["job_vs_loop"] = r["job_items_s"] / r["loop_items_s"]
            r["job_steady_vs_loop"] = r["job_steady_items_s"] / r["loop_items_s"]
            r["job_vs_bare"] = r["job_items_s"] / r["bare_items_s"]
            r["job_steady_vs_bare"] = r["job_steady_items_s"] / r["bare_items_s"]
            results[kind] = r
            print(
                f"{kind:7s} {n:5d} items | job/loop per round (alternating order): "
                + ", ".join(f"{x:.2f}x" for x in ratios)
                + f"\n        median round: loop {r['loop_items_s']:7.1f}/s | job "
                f"{r['job_items_s']:7.1f}/s (steady {r['job_steady_items_s']:7.1f}/s) | "
                f"bare encoder {r['bare_items_s']:7.1f}/s\n"
                f"        job/loop {r['job_vs_loop']:.2f}x (steady {r['job_steady_vs_loop']:.2f}x)"
                f" | job/bare {r['job_vs_bare']:.2f}x (steady {r['job_steady_vs_bare']:.2f}x)"
                f" | peak RSS: {r['peak_rss_sum_mb']:.0f} MB all processes, "
                f"{r['peak_rss_proc_mb']:.0f} MB largest process (loop: "
                f"{r['loop_peak_rss_mb']:.0f} MB)\n"
                f"        fixed cost (a one-item job): {job1['seconds']:.1f} s warm, "
                f"{cold['seconds']:.1f} s as the first job of the Ray instance"
            )
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=2)
        ray.shutdown()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
