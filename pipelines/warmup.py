"""Worker warm-up: the processes that will preprocess import their decoders before their first task.

A Ray worker process pays its imports in its first preprocessing task: pyarrow and fsspec,
the kind's decoders (Pillow, PyAV, soundfile, ...) with torch for every kind but still images
and text, and, for texts, the tokenizer — ~1.6-2.0 CPU-s per process with torch
(benchmarks/results/null-encoder-text-profile-2core.txt, "Cold workers"), paid by every worker
at once when a job starts. With `preprocess.warm_workers` (off by default),
`start_warmup` submits, as soon as Ray is up, one small task per preprocessing task slot
(`preprocess.num_cpus` each, the preprocessing tasks' own request), no more than the run's
preprocessing tasks, less one per kind; each does those imports in the worker process Ray
gives it. Ray keeps a finished task's worker process for later tasks of the same job and
runtime environment (Ray Data's map tasks run in the job's runtime environment, like these
tasks), so a preprocessing task that Ray hands such a process finds the modules loaded.

Which idle process Ray hands a task is Ray's choice: tasks that asked for no CPU ran beside
the pipeline's first tasks and Ray started new, cold processes for those; holding the slots
makes a preprocessing task wait for a warmed process's slot, but Ray may still give it another
idle process (benchmarks/results/warmup-cpu-2core.txt counts both). The slots are ones the
preprocessing would fill with processes paying the same imports, and one per kind stays free,
so every kind's first preprocessing task starts at once. Nothing else waits: the driver never
blocks on the tasks (`Warmup.finish` only counts the ones already done; the others run to
their end, never interrupted: an import cut short could leave a process unable to import
torch again), and a failure is logged at DEBUG and changes nothing: a process not warmed pays
the imports in its first preprocessing task, as without warm-up.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pipelines.config import JobConfig
from pipelines.plan import ShardSpec
from pipelines.resources import WRITER_NUM_CPUS, pool_size
from pipelines.rows import INVALID

logger = logging.getLogger(__name__)

# How long a warm-up task waits for `debug.warm_gate_path` to fill before giving up.
GATE_TIMEOUT_S = 300.0


def warm_worker(
    kinds: Sequence[str], trace_path: str | None = None, gate_path: str | None = None
) -> dict[str, Any]:
    """Import what preprocessing `kinds` needs into this process; build the tokenizer for texts.

    Returns {"pid", "cold": whether this call imported any module (the process had not
    preprocessed these kinds before), "seconds": this call's own time}. With `trace_path`,
    appends the line `warm <pid> cold|warm` when done (the start-up tests read it beside the
    items' `<pid> <id>` lines). With `gate_path`, first waits until that file is not empty (tests:
    the job must finish while the warm-up is held back).
    """
    if gate_path:
        _wait_for(gate_path)
    t0 = time.perf_counter()
    loaded = len(sys.modules)
    import imagebind_core as ibc
    import pipelines.stages  # noqa: F401  (the preprocessing task's module: pyarrow, fsspec)

    for kind in kinds:
        if kind == "text":
            # The tokenizer, built once, by the stage's own call (no torch: texts stay numpy).
            ibc.preprocess.preprocess_texts(["warm-up"])
            continue
        # Empty bytes: the kind's decoder module is imported, then the item is refused (the
        # stage's own call: still images without torch).
        with contextlib.suppress(ibc.InvalidInput):
            ibc.preprocess.preprocess_array(kind, b"")
    seconds = time.perf_counter() - t0
    cold = len(sys.modules) > loaded
    if trace_path:
        with open(trace_path, "a") as f:  # one O_APPEND write: lines do not interleave
            f.write(f"warm {os.getpid()} {'cold' if cold else 'warm'}\n")
    return {"pid": os.getpid(), "cold": cold, "seconds": seconds}


def _wait_for(path: str) -> None:
    deadline = time.monotonic() + GATE_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            if os.path.getsize(path) > 0:
                return
        except OSError:
            pass
        time.sleep(0.1)


def preprocess_tasks(cfg: JobConfig, shards: Sequence[ShardSpec]) -> int | None:
    """Preprocessing tasks a run over `shards` makes: each shard's items of a kind are cut
    into blocks of `preprocess_batch(kind)` rows, one task each. None when a shard's item
    counts are not known before reading (tar shards)."""
    if any(s.counts is None for s in shards):
        return None
    return sum(
        math.ceil(n / cfg.preprocess_batch(k))
        for s in shards
        for k, n in (s.counts or {}).items()
        if k != INVALID
    )


def warm_task_count(
    cfg: JobConfig,
    kinds: Sequence[str],
    pools: dict[str, int],
    cpus: float,
    tasks: int | None = None,
) -> int:
    """Warm-up tasks for a cluster of `cpus` logical CPUs: the preprocessing tasks that fit
    beside the other stages (a reader per kind, the writer, the encoder pools at their
    starting sizes `pools`), or the run's `tasks` (`preprocess_tasks`) if fewer — a process
    no preprocessing task will use is not worth warming — less one per kind, so that every
    kind's first preprocessing task starts at once, whatever the warm-up is doing."""
    others = WRITER_NUM_CPUS + sum(
        cfg.preprocess.read_num_cpus + cfg.encoder(k).num_cpus * pools.get(k, 0) for k in kinds
    )
    slots = int((cpus - others) // cfg.preprocess.num_cpus + 1e-9)
    if tasks is not None:
        slots = min(slots, tasks)
    return max(0, slots - len(kinds))


@dataclass
class Warmup:
    """The warm-up tasks of one run (see `start_warmup`)."""

    refs: list[Any] = field(default_factory=list)

    def finish(self) -> tuple[int, int]:
        """(worker processes this warm-up imported into, tasks submitted), without waiting for
        the tasks still running or queued; a task that failed is logged (DEBUG)."""
        import ray

        if not self.refs:
            return 0, 0
        try:
            done, _ = ray.wait(self.refs, num_returns=len(self.refs), timeout=0)
        except Exception as e:  # Ray going down at the end of a failed run
            logger.debug("worker warm-up not counted: %s", e)
            return 0, len(self.refs)
        warmed = set()
        for ref in done:
            try:
                r = ray.get(ref)
            except Exception as e:  # a failed warm-up changes nothing but the count
                logger.debug("worker warm-up failed: %s", e)
                continue
            if r["cold"]:
                warmed.add(r["pid"])
        return len(warmed), len(self.refs)


def start_warmup(
    cfg: JobConfig, kinds: Sequence[str], shards: Sequence[ShardSpec], local: bool = True
) -> Warmup:
    """Submit the warm-up tasks of a run over `shards` of a plan with `kinds` (Ray is up);
    returns at once.

    `warm_task_count` tasks (pools sized as `build_pipeline` sizes them, `local` as there),
    shared between the alive nodes in proportion to their logical CPUs, each pinned to its
    node (soft affinity: a node that goes away leaves its tasks to run elsewhere). Nothing
    when `preprocess.warm_workers` is false or no kind is preprocessed.
    """
    real = sorted({k for s in shards for k in s.kinds} - {INVALID})
    if not cfg.preprocess.warm_workers or not real:
        return Warmup()
    try:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        resources = ray.cluster_resources()
        pools = {k: pool_size(cfg, k, kinds, resources, local).initial for k in real}
        cpus = resources.get("CPU", 0)
        total = warm_task_count(cfg, real, pools, cpus, preprocess_tasks(cfg, shards))
        task = ray.remote(num_cpus=cfg.preprocess.num_cpus, max_retries=0)(warm_worker)
        refs = []
        for node in ray.nodes():
            node_cpus = node.get("Resources", {}).get("CPU", 0) if node.get("Alive") else 0
            n = int(total * node_cpus // cpus) if cpus else 0
            strategy = NodeAffinitySchedulingStrategy(node["NodeID"], soft=True)
            refs += [
                task.options(scheduling_strategy=strategy).remote(
                    real, cfg.debug.trace_path, cfg.debug.warm_gate_path
                )
                for _ in range(n)
            ]
    except Exception as e:  # never a reason for the job to fail
        logger.debug("worker warm-up not started: %s", e)
        return Warmup()
    logger.debug("warming %d worker processes for %s", len(refs), ",".join(real))
    return Warmup(refs)
