"""Start-up: the model loads while the first blocks are read and preprocessed, and the workers
that will preprocess import their decoders ahead of their first task, without the job waiting.

Ray Data 2.60 starts an actor pool's actors without waiting for them
(`DataContext.wait_for_min_actors_s` is -1) and `EncodeBatch.__init__` only starts the load in
a thread. Proven by ordering, not timing: every encoder's load is held back
(`debug.load_gate_path`) until preprocessing has written its first items to the same file
(`debug.trace_path`), so the job can only finish if reading and preprocessing run while the
model waits to load; the file then shows items preprocessed before each "load <kind>" line.

Worker warm-up (`pipelines.warmup`), also by ordering: in a fresh Ray, a process whose warm-up
did the imports (`warm <pid> cold`) then preprocesses items (`<pid> <id>` lines after it), so
its first preprocessing task found torch and the tokenizer loaded; and with every warm-up task
held back until preprocessing has written items (`debug.warm_gate_path`), the job still runs
to its end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import defaultdict

import media
import pytest
from helpers.pipeline import SMALL_JOB, read_output

from pipelines.config import load_config
from pipelines.embed import run_job
from pipelines.plan import ShardSpec
from pipelines.warmup import preprocess_tasks, warm_task_count

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_reads_and_preprocessing_run_while_the_model_loads(tmp_path, ray_session):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    names = []
    for i in range(6):
        (corpus / f"pic{i}.png").write_bytes(media.make_image("PNG", size=(64, 48), seed=i))
        (corpus / f"cap{i}.txt").write_text(f"caption number {i}")
        names += [f"pic{i}.png", f"cap{i}.txt"]
    events = tmp_path / "events.txt"
    cfg = load_config(
        None,
        {
            **SMALL_JOB,
            "input": str(corpus),
            "output": str(tmp_path / "out"),
            "debug.trace_path": str(events),
            "debug.load_gate_path": str(events),
        },
    )
    summary = run_job(cfg)

    emb, err, _ = read_output(str(tmp_path / "out"))
    assert sorted(emb.column("id").to_pylist()) == sorted(names) and err.num_rows == 0
    lines = events.read_text().splitlines()
    loads = [i for i, line in enumerate(lines) if line.startswith("load ")]
    assert sorted(lines[i] for i in loads) == ["load text", "load vision"], lines
    # Each load completed after preprocessing had finished work (an item line before it).
    assert min(loads) > 0 and not lines[0].startswith("load "), lines
    # The summary's start-up figures: Ray up, then the first encoded batch, then the end.
    assert 0 < summary.ray_up_seconds < summary.first_batch_seconds <= summary.seconds


def _captions(folder, n):
    folder.mkdir()
    for i in range(n):
        (folder / f"cap{i:02d}.txt").write_text(f"caption number {i}")
    return sorted(f"cap{i:02d}.txt" for i in range(n))


def _trace(path):
    """The trace file as (warm-up lines: pid -> (index, state), item lines: pid -> indices)."""
    warm, items = {}, defaultdict(list)
    for i, line in enumerate(path.read_text().splitlines()):
        parts = line.split()
        if parts[0] == "warm":
            warm[int(parts[1])] = (i, parts[2])
        elif parts[0].isdigit():
            items[int(parts[0])].append(i)
    return warm, items


# One kind, whole-CPU preprocessing tasks: on 4 logical CPUs, 3 preprocessing slots beside the
# reader, the writer and two quarter-CPU encoder actors; one stays free, so 2 warm-up tasks.
WARM_JOB = {
    **SMALL_JOB,
    "preprocess.warm_workers": True,
    "preprocess.num_cpus": 1,
    "encoder_defaults.max_actors": 2,
    "encoder_defaults.min_actors": 2,
}


def test_warm_task_count_leaves_one_slot_per_kind():
    cfg = load_config(None, {**WARM_JOB, "input": "in", "output": "out"})
    assert warm_task_count(cfg, ["text"], {"text": 2}, 4) == 2
    assert warm_task_count(cfg, ["text", "vision"], {"text": 1, "vision": 1}, 4) == 1
    assert warm_task_count(cfg, ["text"], {"text": 2}, 33) == 31
    assert warm_task_count(cfg, ["text"], {"text": 2}, 1.5) == 0  # never below zero
    # No more processes warmed than the run has preprocessing tasks (less the free slot).
    assert warm_task_count(cfg, ["text"], {"text": 2}, 33, tasks=3) == 2
    shards = [
        ShardSpec("a", "files", "a", None, ("text", "vision"), counts={"text": 9, "vision": 4}),
        ShardSpec("b", "files", "b", None, ("text",), counts={"text": 4}),
    ]
    cfg = cfg.model_copy(update={"preprocess": cfg.preprocess.model_copy(update={"batch_size": 4})})
    assert preprocess_tasks(cfg, shards) == 3 + 1 + 1
    assert preprocess_tasks(cfg, [*shards, ShardSpec("c", "webdataset", "c", None, ())]) is None


@pytest.mark.slow
def test_warmed_workers_then_preprocess_without_paying_the_imports(tmp_path):
    # A fresh Ray (the command line starts its own): no worker has imported anything yet.
    names = _captions(tmp_path / "corpus", 40)
    events = tmp_path / "events.txt"
    cmd = [
        sys.executable,
        "-m",
        "pipelines.embed",
        "--json",
        "--input",
        str(tmp_path / "corpus"),
        "--output",
        str(tmp_path / "out"),
        "--set",
        "ray.num_cpus=4",
        "--set",
        f"debug.trace_path={events}",
        "--set",
        "debug.delay_per_item_s=0.5",
    ]
    cmd += [a for k, v in WARM_JOB.items() for a in ("--set", f"{k}={json.dumps(v)}")]
    env = {**os.environ, "PYTHONPATH": ROOT, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    summary = json.loads(res.stdout)
    assert summary["warmup_tasks"] == 2 and summary["workers_warmed"] >= 1, summary
    emb, err, _ = read_output(str(tmp_path / "out"))
    assert sorted(emb.column("id").to_pylist()) == names and err.num_rows == 0

    warm, items = _trace(events)
    assert sum(len(v) for v in items.values()) == len(names)
    cold = {pid: i for pid, (i, state) in warm.items() if state == "cold"}
    assert len(cold) >= summary["workers_warmed"], (warm, summary)
    # Every process the warm-up imported into preprocessed nothing before it (it would have
    # imported torch itself) ...
    assert all(min(items[pid], default=i + 1) > i for pid, i in cold.items()), (warm, items)
    # ... and at least one of them then preprocessed: its first task found the imports done.
    assert any(items[pid] for pid in cold), (warm, dict(items))


def test_the_job_never_waits_for_the_warm_up(tmp_path, ray_session):
    names = _captions(tmp_path / "corpus", 12)
    events = tmp_path / "events.txt"
    cfg = load_config(
        None,
        {
            **WARM_JOB,
            "input": str(tmp_path / "corpus"),
            "output": str(tmp_path / "out"),
            "debug.trace_path": str(events),
            # Every warm-up task holds its slot but starts only once items are preprocessed.
            "debug.warm_gate_path": str(events),
        },
    )
    summary = run_job(cfg)

    emb, err, _ = read_output(str(tmp_path / "out"))
    assert sorted(emb.column("id").to_pylist()) == names and err.num_rows == 0
    assert summary.warmup_tasks == 2 and summary.first_batch_seconds is not None
    lines = events.read_text().splitlines()
    assert lines and not lines[0].startswith("warm "), lines


_POOL_PROBE = """
import json, os, sys
import pyarrow as pa, ray
from pipelines.config import load_config
from pipelines.embed import ensure_ray
over = {"input": "in", "output": "out", "ray.num_cpus": 2, **json.loads(sys.argv[1])}
cfg = load_config(None, over)
ensure_ray(cfg, ["text"])
backend = ray.remote(num_cpus=1)(lambda: pa.default_memory_pool().backend_name)
out = {
    "driver": pa.default_memory_pool().backend_name,
    "workers": sorted(set(ray.get([backend.remote() for _ in range(4)]))),
    "env_after": os.environ.get("ARROW_DEFAULT_MEMORY_POOL"),
}
if "--bursts" in sys.argv:
    import time

    @ray.remote(num_cpus=0.25)  # as Ray Data's fractional readers and writers: 8 at once here
    def pid():
        time.sleep(1.0)
        return os.getpid()

    def alive(p):
        try:
            os.kill(p, 0)
            return True
        except ProcessLookupError:
            return False

    workers = set(ray.get([pid.remote() for _ in range(8)]))
    time.sleep(3.0)  # idle for longer than Ray's own 1 s
    out["bursts"] = {"workers": len(workers), "ended": sum(not alive(p) for p in workers)}
print(json.dumps(out))
"""


def _pool_probe(tmp_path, overrides: dict, *flags: str) -> dict:
    env = {**os.environ, "PYTHONPATH": ROOT, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    env.pop("ARROW_DEFAULT_MEMORY_POOL", None)
    env.pop("RAY_idle_worker_killing_time_threshold_ms", None)
    res = subprocess.run(
        [sys.executable, "-c", _POOL_PROBE, json.dumps(overrides), *flags],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_a_new_local_ray_allocates_arrow_memory_with_jemalloc(tmp_path):
    # pyarrow's own default (mimalloc) copies a large string buffer each time it grows: the
    # re-index diff's shuffles took 1.5-1.9x as long with it (benchmarks/results/
    # arrow-memory-pool-2core.md). The driver and every worker of a fresh Ray use jemalloc, and
    # the driver's environment is left as it was.
    import pyarrow as pa

    if "jemalloc" not in pa.supported_memory_backends():
        pytest.skip("this pyarrow build has no jemalloc")  # the Linux wheels have it
    got = _pool_probe(tmp_path, {})
    assert got == {"driver": "jemalloc", "workers": ["jemalloc"], "env_after": None}, got


def test_a_new_local_ray_keeps_its_idle_workers_between_bursts_of_tasks(tmp_path):
    # Ray Data runs fractional-CPU readers and writers beside the preprocessing tasks, so a
    # job's worker processes outnumber the logical CPUs. Ray's own default ends the idle ones
    # above that number after 1 s, and the next burst of tasks starts new processes that import
    # everything again. A local Ray the job starts keeps them (`embed.IDLE_WORKER_KEEP_MS`).
    got = _pool_probe(tmp_path, {}, "--bursts")["bursts"]
    assert got["workers"] > 2, got  # more worker processes than the 2 logical CPUs
    assert got["ended"] == 0, got


def test_the_arrow_allocator_follows_the_config_and_the_users_environment(monkeypatch):
    from pipelines.config import load_config
    from pipelines.embed import arrow_memory_pool

    monkeypatch.delenv("ARROW_DEFAULT_MEMORY_POOL", raising=False)
    base = {"input": "in", "output": "out"}
    assert arrow_memory_pool(load_config(None, base)) == "jemalloc"
    cfg = load_config(None, {**base, "ray.arrow_memory_pool": "system"})
    assert arrow_memory_pool(cfg) == "system"
    # A user's ARROW_DEFAULT_MEMORY_POOL is left to Arrow (and inherited by a local Ray) ...
    monkeypatch.setenv("ARROW_DEFAULT_MEMORY_POOL", "mimalloc")
    assert arrow_memory_pool(load_config(None, base)) is None
    # ... unless the config names one.
    assert arrow_memory_pool(cfg) == "system"
    with pytest.raises(Exception, match="arrow_memory_pool"):
        load_config(None, {**base, "ray.arrow_memory_pool": "tcmalloc"})
