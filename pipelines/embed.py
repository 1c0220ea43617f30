"""`imagebind-embed`: embed a corpus with Ray Data, exactly once, resumable.

    read (one task per shard and kind) -> preprocess (CPU tasks) -> encode (actor pool per kind)
      -> write parts -> the driver commits each shard when all its items are in

One branch per media kind present in the input (its own encoder pool, batch size, dtype and
resources); the branches meet in one `union` before the part writer, so a corpus is one Ray Data
execution. Library use:

    from pipelines.config import load_config
    from pipelines.embed import run_job
    summary = run_job(load_config("configs/demo.yaml"))

Re-indexing reuses the pieces: `pipelines.plan.list_items` (listing without bytes) and
`embed_items` (embed a given subset of rows into an output, same commit protocol).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

import imagebind_core as ibc
from imagebind_core.errors import StoreUnavailable
from imagebind_core.io import canonical_uri, filesystem, store_name
from pipelines.config import ConfigError, JobConfig, load_config
from pipelines.console import (
    configure_logging,
    filtered_stderr,
    ignore_further_interrupts,
    resume_command,
    shutdown_ray,
)
from pipelines.formats import PlanError
from pipelines.lock import OutputLock, OutputLocked
from pipelines.plan import (
    Plan,
    ShardSpec,
    check_input,
    plan_items,
    plan_job,
    reconcile,
    shard_tasks,
)
from pipelines.progress import ProgressReporter, counter_actor
from pipelines.readers import read_tasks
from pipelines.rows import INVALID
from pipelines.stages import EncodeBatch, preprocess_batch, without_tensors
from pipelines.store import (
    Output,
    read_job_record,
    transient_store_error,
    with_store_retries,
    write_job_record,
)
from pipelines.writers import commit_shard, write_parts

logger = logging.getLogger(__name__)

# Logical CPUs of the part writer tasks: small I/O-bound work that must never wait long for a slot.
WRITER_NUM_CPUS = 0.1


class OutputMismatch(RuntimeError):
    """The output was started by a run with another model, input or format."""


# ----------------------------------------------------------------------------- lineage


def model_lineage(cfg: JobConfig, kinds: Sequence[str] = ()) -> dict[str, str]:
    """What produces this job's embeddings, as Parquet schema metadata (str -> str).

    Each kind's `JobConfig.model_spec` lineage, merged (a field that differs between kinds,
    e.g. the dtype, lists them); the preprocessing settings are those of `kinds`. The
    checkpoint's sha256 is `checkpoint_sha256` from the config when given (the actors verify
    it); otherwise the driver fetches the checkpoint once to hash it.
    """
    if cfg.checkpoint is None:
        sha = "random"
    elif cfg.checkpoint_sha256:
        sha = cfg.checkpoint_sha256.lower()
    else:
        logger.info("hashing checkpoint %s (set checkpoint_sha256 to skip)", cfg.checkpoint)
        _, sha = ibc.fetch_checkpoint(cfg.checkpoint, storage_options=cfg.storage_options())
    real = sorted({k for k in kinds if k != INVALID})
    per_kind = {
        k: cfg.model_spec(k).lineage(kinds=real, checkpoint_sha256=sha) for k in real or ["vision"]
    }
    if not real:  # no kinds (an empty shard's file): the defaults'
        per_kind["vision"]["dtype"] = cfg.encoder("vision").dtype
    return {f"imagebind.{k}": v for k, v in ibc.merge_lineage(per_kind).items()}


def _record_key(cfg: JobConfig, plan: Plan, lineage: dict[str, str]) -> dict[str, Any]:
    return {
        "input": canonical_uri(cfg.input),
        "format": plan.format,
        **ibc.lineage_key(lineage),
    }


def verify_record(output: Output, cfg: JobConfig, plan: Plan, lineage: dict[str, str]) -> bool:
    """Whether `output` has a job record (`_job.json`); OutputMismatch if it was written by a
    job with another model, input or format than this one (`lineage`: `model_lineage`)."""
    rec = read_job_record(output)
    if rec is None:
        return False
    key = _record_key(cfg, plan, lineage)
    old = dict(rec.get("key", {}))
    if isinstance(old.get("input"), str):  # records written before inputs were canonical
        old["input"] = canonical_uri(old["input"])
    diff = {k: (old.get(k), v) for k, v in key.items() if old.get(k) != v}
    if diff:
        lines = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
        raise OutputMismatch(
            f"output {cfg.output} was started by a different job ({lines}). Write to a new "
            "output, or delete this one to start over."
        )
    return True


def _check_record(output: Output, cfg: JobConfig, plan: Plan, lineage: dict[str, str]) -> None:
    if verify_record(output, cfg, plan, lineage):
        return
    write_job_record(
        output,
        {
            "key": _record_key(cfg, plan, lineage),
            "files_shards": plan.files_shards,
            "metadata": lineage,
            "created_at": time.time(),
        },
    )


# ----------------------------------------------------------------------------- the pipeline


@dataclass(frozen=True)
class Pool:
    """An encoder actor pool's size: it starts at `initial` and autoscales in [min, max]."""

    min: int
    initial: int
    max: int


def actor_memory_bytes(cfg: JobConfig, kind: str) -> int:
    """What one CPU encoder actor of `kind` holds: the weights in its dtype, half as much again
    for activations and the allocator, and ~0.6 GB of process (torch, Ray worker)."""
    # From the config, not a built model (the driver does not import torch): the transformer
    # trunk is most of an encoder — per block 4 d^2 attention + 2 r d^2 MLP weights — and the
    # stem, head and norms add up to ~15 % more (text's token table; images ~1 %): erring high.
    trunk = ibc.get_config(cfg.preset).encoder(ibc.model_modality(kind)).trunk
    d = trunk.embed_dim
    n = 1.15 * trunk.num_blocks * (4 + 2 * trunk.mlp_ratio) * d * d
    width = 2 if cfg.encoder(kind).dtype in ("bfloat16", "float16") else 4
    return int(1.5 * n * width) + 600 * 2**20


def available_memory_bytes() -> int | None:
    """This machine's available memory (Linux MemAvailable; else free pages), or None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def gpu_pools(cfg: JobConfig, kinds: Sequence[str], gpus: float) -> dict[str, tuple[int, int]]:
    """(initial, max) actors of each GPU-encoded kind among `kinds` on `gpus` GPUs.

    Each kind starts with an equal share of the GPUs, in whole actors of its `num_gpus` (one
    per GPU for the big towers; small encoders pack several actors on one GPU with fractional
    `num_gpus`); what rounding leaves over goes to the kinds with the largest actors first,
    so that at the start every GPU is taken. A pool may grow to every GPU (Ray Data's
    autoscaler adds actors when the other kinds' pools finish and free theirs).
    """
    need = {k: cfg.encoder(k).num_gpus for k in kinds if k != INVALID}
    need = {k: g for k, g in need.items() if g > 0}
    if not need:
        return {}
    share = gpus / len(need)
    initial = {k: int(share // g + 1e-9) for k, g in need.items()}
    left = gpus - sum(initial[k] * g for k, g in need.items())
    for k in sorted(need, key=lambda k: (-need[k], k)):
        while left + 1e-9 >= need[k]:
            initial[k] += 1
            left -= need[k]
    return {k: (initial[k], int(gpus // g + 1e-9)) for k, g in need.items()}


def pool_size(
    cfg: JobConfig,
    kind: str,
    kinds: Sequence[str],
    resources: dict[str, float] | None = None,
    local: bool = True,
    memory_bytes: float | None = None,
) -> Pool:
    """Resolve `encoders.<kind>.max_actors` ("auto" or a number) against the cluster.

    auto, GPU encoders: the cluster's GPUs now, shared between the job's GPU-encoded kinds
    (`gpu_pools`; an autoscaling cluster that starts without GPUs: set `max_actors`). auto,
    CPU encoders: one actor per
    `torch_threads` cores — on CPU several single-threaded actors are at least as fast as one
    multi-threaded actor (no intra-op synchronisation; text 1.03–1.28x on 2 cores, vision
    within noise: benchmarks/bench_cpu_actors.py) — split between the CPU-encoded kinds of
    the job; the cores are this machine's for a local Ray, half the cluster's logical CPUs
    otherwise (the other half decodes), and never more actors than fit in half of
    `memory_bytes` (default: this machine's available memory for a local Ray, the cluster's
    `memory` resource otherwise; per actor `actor_memory_bytes`). An auto pool starts at its
    full size: the model load is paid once, up front, not during a ramp-up.
    """
    enc = cfg.encoder(kind)
    if enc.max_actors != "auto":
        return Pool(enc.min_actors, enc.min_actors, enc.max_actors)
    res = resources or {}
    if enc.num_gpus > 0:
        initial, most = gpu_pools(cfg, kinds, res.get("GPU", 0))[kind]
        return Pool(enc.min_actors, max(initial, enc.min_actors), max(most, enc.min_actors))
    cpu_kinds = [k for k in kinds if k != INVALID and cfg.encoder(k).num_gpus == 0]
    share = max(1, len(cpu_kinds))
    cores = (os.cpu_count() or 1) if local else res.get("CPU", 0) / 2
    n = int(cores // (enc.threads * share))
    if memory_bytes is None:
        if local:
            memory_bytes = available_memory_bytes()
        else:
            memory_bytes = res.get("memory", 0) or None
    if memory_bytes:
        n = min(n, int(memory_bytes / 2 / share // actor_memory_bytes(cfg, kind)))
    n = max(n, enc.min_actors)
    return Pool(enc.min_actors, n, n)


def build_pipeline(
    cfg: JobConfig,
    plan: Plan,
    shards: Sequence[ShardSpec] | None = None,
    resources: dict[str, float] | None = None,
    local: bool = True,
    progress: Any = None,
) -> Any:
    """The Ray Data dataset of one run: its rows are the part writer's summaries.

    Lazy: nothing runs until it is iterated. `shards` defaults to every shard of `plan`;
    `resources` (`ray.cluster_resources()`) and `local` size "auto" pools (`pool_size`);
    the stages count their items into `progress` (`pipelines.progress.counter_actor()`).
    Returns None when there is nothing to do.
    """
    import ray.data
    from ray.data import DataContext

    so = cfg.storage_options()
    dim = ibc.get_config(cfg.preset).out_embed_dim
    tasks = shard_tasks(plan, cfg, plan.shards if shards is None else shards)
    branches = []
    for kind, rows in sorted(tasks.items()):
        ds = ray.data.from_items(rows, override_num_blocks=len(rows))
        ds = ds.map_batches(
            read_tasks,
            batch_size=1,
            batch_format="pyarrow",
            num_cpus=cfg.preprocess.read_num_cpus,
            fn_kwargs={"output_uri": cfg.output, "storage_options": so, "progress": progress},
        )
        if kind == INVALID:
            ds = ds.map_batches(
                without_tensors,
                batch_format="pyarrow",
                num_cpus=cfg.preprocess.read_num_cpus,
                fn_kwargs={"embed_dim": dim},
            )
            branches.append(ds)
            continue
        pre_batch = cfg.preprocess_batch(kind)
        # A shard is read as one block; cut it into task-sized blocks so that a shard's items
        # are preprocessed by parallel tasks and reach the encoders as many bundles (the actor
        # pool balances bundles, not rows). Streaming: no all-to-all exchange; fused into the
        # read tasks (`_fuse_into_read`), so it costs no operator of its own.
        ds = _fuse_into_read(
            ds.repartition(target_num_rows_per_block=pre_batch), cfg.preprocess.read_num_cpus
        )
        ds = ds.map_batches(
            preprocess_batch,
            batch_size=pre_batch,
            batch_format="pyarrow",
            num_cpus=cfg.preprocess.num_cpus,
            # A memory reservation the encoder does not have: Ray Data fuses neighbouring
            # stages whose resource requests are equal, which would move preprocessing into
            # the encoder actor. CPU work stays out of it.
            memory=cfg.preprocess.memory_mb * 2**20,
            fn_kwargs={
                "storage_options": so,
                "limits": dict(cfg.preprocess.limits),
                "options": {kind: cfg.preprocess.options.get(kind, {})},  # type: ignore[call-overload]
                "read_threads": cfg.preprocess.read_threads,
                "trace_path": cfg.debug.trace_path,
                "delay_per_item_s": cfg.debug.delay_per_item_s,
                "decode": {kind: cfg.preprocess.decode.get(kind, "cpu")},  # type: ignore[call-overload]
                "progress": progress,
            },
        )
        enc = cfg.encoder(kind)
        pool = pool_size(cfg, kind, plan.kinds, resources, local)
        concurrent = enc.concurrent_batches
        in_flight = max(enc.tasks_in_flight, concurrent)
        if pool.initial < pool.max:
            # Ray Data adds an actor only when the pool's tasks in flight per call slot pass
            # its upscaling threshold (1.75 by default): fewer queued tasks and the pool
            # could never grow (Ray warns "will not allow it to scale up").
            up = DataContext.get_current().autoscaling_config.actor_pool_util_upscaling_threshold
            in_flight = max(in_flight, math.ceil(up * concurrent))
        ds = ds.map_batches(
            EncodeBatch,
            batch_size=enc.batch_size,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(
                # A pool that starts at its largest size never scales up: fixed in size, Ray
                # Data keeps it (its actors end with the stage).
                min_size=pool.max if pool.initial == pool.max else pool.min,
                max_size=pool.max,
                initial_size=pool.initial,
                max_tasks_in_flight_per_actor=in_flight,
                # CUDA: two calls at once, so one batch is copied to the device while the
                # previous computes (the runner lets one compute at a time).
                max_concurrent_calls_per_actor=concurrent,
                enable_true_multi_threading=concurrent > 1,
            ),
            num_cpus=enc.num_cpus,
            num_gpus=enc.num_gpus,
            fn_constructor_kwargs={
                "kind": kind,
                "spec": cfg.model_spec(kind),
                "torch_threads": enc.threads,
                "null_encoder": cfg.debug.null_encoder,
                "trace_path": cfg.debug.actor_trace_path,
                "load_gate_path": cfg.debug.load_gate_path,
                "progress": progress,
            },
        )
        branches.append(ds)
    if not branches:
        return None
    ds = branches[0].union(*branches[1:]) if len(branches) > 1 else branches[0]
    return ds.map_batches(
        write_parts,
        batch_size=None,
        batch_format="pyarrow",
        num_cpus=WRITER_NUM_CPUS,
        fn_kwargs={"output_uri": cfg.output, "storage_options": so, "embed_dim": dim},
    )


def _fuse_into_read(ds: Any, read_num_cpus: float) -> Any:
    """`ds` (a streaming repartition right after the read) with the repartition's resource
    request set to the read's, so that Ray Data fuses the two: each read task then emits its
    rows as blocks of the target size itself, and no separate operator (a task per block, and
    its (de)serialisation) cuts them. `repartition` has no parameter for it; on a Ray whose
    logical plan differs, the operators stay apart (the same rows, one operator more)."""
    try:
        from ray.data._internal.logical.operators.map_operator import StreamingRepartition

        op = ds._logical_plan.dag
        if isinstance(op, StreamingRepartition) and isinstance(op.ray_remote_args, dict):
            op.ray_remote_args.update(num_cpus=read_num_cpus)
    except (ImportError, AttributeError):
        logger.debug("Ray Data internals differ: shard repartition not fused into the read")
    return ds


def required_cpus(cfg: JobConfig, kinds: Sequence[str]) -> float:
    """Logical CPUs the pipeline needs to make progress: every pool at its minimum size plus
    one reader, one preprocessing task per kind and a writer."""
    need = cfg.preprocess.read_num_cpus + WRITER_NUM_CPUS
    for k in kinds:
        if k == INVALID:
            continue
        enc = cfg.encoder(k)
        need += enc.min_actors * enc.num_cpus + cfg.preprocess.num_cpus
    return need


def local_num_cpus(cfg: JobConfig, kinds: Sequence[str]) -> int:
    """Logical CPUs of a local Ray the job starts (`ray.num_cpus` when set): two preprocessing
    tasks per core — decoding runs beside CPU encoder actors, the OS sharing the cores —
    on top of what the other stages hold (readers, Ray Data's repartition tasks at 1 CPU each,
    encoder pools at their minimum, the writer). Ray Data budgets every operator out of the
    same logical CPUs: with twice the cores in all, a 2-core machine ran one preprocessing
    task at a time (the first null-encoder run, benchmarks/results/)."""
    if cfg.ray.num_cpus:
        return cfg.ray.num_cpus
    real = [k for k in kinds if k != INVALID]
    others = required_cpus(cfg, real) - len(real) * cfg.preprocess.num_cpus + len(real)
    return math.ceil(2 * (os.cpu_count() or 1) * cfg.preprocess.num_cpus + others)


# ----------------------------------------------------------------------------- running


@dataclass
class JobSummary:
    """What a run did."""

    output: str
    shards_total: int
    shards_skipped: int  # already committed before this run, nothing new in them
    shards_committed: int  # committed by this run
    shards_extended: int = 0  # committed before, with new items: embedded into additions
    ok: dict[str, int] = field(default_factory=dict)  # items embedded by this run, per kind
    errors: dict[str, int] = field(default_factory=dict)  # items failed in this run, per kind
    seconds: float = 0.0
    # Items an interrupted earlier run embedded into parts of uncommitted shards, kept.
    items_reused: int = 0
    # From the start of the run to the first encoded batch's rows written (the encoder's first
    # batch plus one part write): what the job pays before its encoders produce anything.
    first_batch_seconds: float | None = None
    # From the start of the run to Ray being up (started or joined): first_batch_seconds minus
    # this is what the pipeline itself takes to its first batch.
    ray_up_seconds: float | None = None

    def items_per_s(self, kind: str) -> float:
        n = self.ok.get(kind, 0) + self.errors.get(kind, 0)
        return n / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        kinds = sorted(set(self.ok) | set(self.errors))
        return {
            "output": self.output,
            "shards_total": self.shards_total,
            "shards_skipped": self.shards_skipped,
            "shards_committed": self.shards_committed,
            "shards_extended": self.shards_extended,
            "items_reused": self.items_reused,
            "seconds": round(self.seconds, 3),
            "first_batch_seconds": (
                None if self.first_batch_seconds is None else round(self.first_batch_seconds, 3)
            ),
            "ray_up_seconds": (
                None if self.ray_up_seconds is None else round(self.ray_up_seconds, 3)
            ),
            "kinds": {
                k: {
                    "embedded": self.ok.get(k, 0),
                    "errors": self.errors.get(k, 0),
                    "items_per_s": round(self.items_per_s(k), 2),
                }
                for k in kinds
            },
        }

    def format(self) -> str:
        lines = [
            f"imagebind-embed: done in {self.seconds:.1f} s -> {self.output}",
            f"  shards: {self.shards_committed} committed by this run, "
            f"{self.shards_skipped} already done, {self.shards_total} in total",
        ]
        if self.items_reused:
            lines.append(f"  reused {self.items_reused} items from earlier parts")
        if self.first_batch_seconds is not None:
            ray_up = (
                f" (Ray up after {self.ray_up_seconds:.1f} s)"
                if self.ray_up_seconds is not None
                else ""
            )
            lines.append(
                f"  first encoded batch written after {self.first_batch_seconds:.1f} s{ray_up}"
            )
        if self.shards_extended:
            lines.append(
                f"  {self.shards_extended} shards committed earlier had new items (files or rows "
                "added since): embedded into additional files <shard>.add-<hash>.parquet"
            )
        for k in sorted(set(self.ok) | set(self.errors)):
            lines.append(
                f"  {k:8s} {self.ok.get(k, 0):8d} embedded {self.errors.get(k, 0):6d} errors "
                f"{self.items_per_s(k):9.2f} items/s"
            )
        if not self.ok and not self.errors and not self.shards_committed:
            lines.append("  nothing to do: every shard was already committed, nothing new in them")
        if sum(self.errors.values()):
            lines.append(f"  failed items and reasons: {self.output.rstrip('/')}/_errors/")
        return "\n".join(lines)


class _Tracker:
    """Which (shard, kind) tasks are complete: every id announced by its end marker is written."""

    def __init__(self, shards: Sequence[ShardSpec]) -> None:
        self.kinds = {s.name: set(s.kinds) for s in shards}
        self.expected: dict[tuple[str, str], int] = {}
        self.seen: dict[tuple[str, str], set[str]] = defaultdict(set)
        self.ok: dict[str, int] = defaultdict(int)
        self.err: dict[str, int] = defaultdict(int)

    def add(self, summary: pa.Table) -> list[str]:
        done = []
        for r in summary.to_pylist():
            key = (r["shard"], r["kind"])
            self.seen[key].update(r["ids"])
            self.ok[r["kind"]] += r["n_ok"]
            self.err[r["kind"]] += r["n_err"]
            if r["expected"] is not None:
                self.expected[key] = r["expected"]
            kinds = self.kinds.get(r["shard"])
            if kinds is None:
                continue
            if all(
                (r["shard"], k) in self.expected
                and len(self.seen[(r["shard"], k)]) >= self.expected[(r["shard"], k)]
                for k in kinds
            ):
                del self.kinds[r["shard"]]
                for k in kinds:
                    self.seen.pop((r["shard"], k), None)
                done.append(r["shard"])
        return done


def _ensure_ray(cfg: JobConfig, kinds: Sequence[str]) -> bool:
    """Start or join Ray; True when it runs on this machine only (one node)."""
    import ray

    if ray.is_initialized():
        return len(ray.nodes()) == 1
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS") or "local"
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
    if address == "local":
        kwargs["num_cpus"] = local_num_cpus(cfg, kinds)
    ray.init(address=address, **kwargs)
    return address == "local"


def _check_resources(cfg: JobConfig, kinds: Sequence[str]) -> None:
    import ray

    have = ray.cluster_resources()
    need = required_cpus(cfg, kinds)
    if have.get("CPU", 0) + 1e-9 < need:
        raise PlanError(
            f"the job needs at least {need:g} logical CPUs (encoders.*.num_cpus x min_actors + "
            f"preprocess.num_cpus per kind + readers) but Ray has {have.get('CPU', 0):g}: lower "
            "those settings or start Ray with more CPUs (ray.num_cpus)"
        )
    gpus = sum(cfg.encoder(k).num_gpus * cfg.encoder(k).min_actors for k in kinds if k != INVALID)
    if gpus > have.get("GPU", 0):
        logger.warning(
            "encoders ask for %g GPUs at minimum pool size, the cluster has %g now (fine if it "
            "autoscales)",
            gpus,
            have.get("GPU", 0),
        )


def check_output(cfg: JobConfig) -> None:
    """PlanError if the output names an existing file (it must be a folder or prefix)."""
    fs, path = filesystem(cfg.output, cfg.storage_options())
    if fs.isfile(path):
        raise PlanError(
            f"output {cfg.output} is an existing file; give a folder (or an object-store prefix)"
        )


def _quiet_issue_detectors(config: Any) -> Any:
    """Ray Data's issue detectors without the high-memory one.

    It compares each operator's worker RSS with the memory the operator requests, every 30 s
    for the whole run. Ray reuses worker processes across operators, so a writer task that
    runs in a worker which earlier preprocessed (and imported torch) reports ~400 MB and the
    detector tells users to reserve that for the writer: a false alarm, repeated. The job
    reserves memory where it is used (`preprocess.memory_mb`); the other detectors stay.
    """
    try:  # an internal module: on a Ray without it, keep Ray's defaults
        from ray.data._internal.issue_detection.detectors import HighMemoryIssueDetector
    except ImportError:
        return config
    return replace(
        config, detectors=[d for d in config.detectors if d is not HighMemoryIssueDetector]
    )


def _commit_task(*args: Any) -> dict[str, Any]:
    # A commit is idempotent and never rewrites a committed file: safe to retry through a
    # store outage.
    return with_store_retries(
        lambda: commit_shard(*args), f"committing shard {args[1]}", args[0], args[2]
    )


def _items_to_embed(pending: Sequence[ShardSpec], summary: JobSummary) -> int | None:
    """Items this run embeds, when every pending shard's count is known (None otherwise)."""
    if any(s.counts is None for s in pending):
        return None
    return sum(sum(s.counts.values()) for s in pending if s.counts) - summary.items_reused


def run_plan(cfg: JobConfig, plan: Plan) -> JobSummary:
    """Execute `plan` into `cfg.output` under the output lock; returns what was done.

    Raises OutputLocked if another run holds the output, OutputMismatch if the output was
    started by a different model/input.
    """
    import ray
    from ray.data import DataContext

    t0 = time.perf_counter()
    check_output(cfg)
    so = cfg.storage_options()
    output = Output(cfg.output, so)
    output.makedirs(output.root)
    lineage = model_lineage(cfg, plan.kinds)
    if cfg.checkpoint is not None:  # every actor verifies the checkpoint the metadata names
        cfg = cfg.model_copy(update={"checkpoint_sha256": lineage["imagebind.checkpoint_sha256"]})
    with OutputLock(cfg.output, so, ttl_s=cfg.lock_ttl_s) as lock:
        _check_record(output, cfg, plan, lineage)
        dim = int(lineage["imagebind.embed_dim"])
        committed = output.committed_shards()
        for shard in output.leftover_parts(committed):
            # A run that died after this commit (its parts hold committed ids: dropped), or
            # while embedding additions (ids no committed file holds: committed now).
            logger.info("shard %s: folding in parts left by an interrupted run", shard)
            commit_shard(cfg.output, shard, so, dim, lineage)
        planned = {s.name for s in plan.shards}
        for shard in sorted(output.parts_shards() - planned - committed):
            # Work for a shard that is no longer in the input (a manifest deleted mid-run).
            logger.warning("shard %s: no longer in the input; removing its parts", shard)
            output.rm_parts(shard)
        new, extended, unchanged = reconcile(plan, output, committed, so)
        pending = new + extended
        extended_names = {s.name for s in extended}
        summary = JobSummary(cfg.output, len(plan.shards), len(unchanged), 0)
        # Items an interrupted run embedded into parts of shards it did not commit: the
        # readers skip them, the commit folds them in.
        summary.items_reused = sum(len(output.part_ids(s.name)) for s in new)
        logger.info(
            "%s: %d shards, %d already committed, %d to do (%d of them committed earlier, with "
            "new items); kinds %s",
            cfg.input,
            len(plan.shards),
            summary.shards_skipped,
            len(pending),
            len(extended),
            ",".join(plan.kinds),
        )
        if summary.items_reused:
            logger.info(
                "reused %d items from earlier parts (embedded by an interrupted run)",
                summary.items_reused,
            )

        def count(shard: str, added: bool) -> None:
            if shard not in extended_names:
                summary.shards_committed += 1
            elif added:
                summary.shards_extended += 1
            else:  # its input changed, but every item in it was committed already
                summary.shards_skipped += 1

        # A shard with no items (an empty manifest, or only ids of earlier manifests) gets its
        # empty output file here: no task would ever report it complete.
        for s in [s for s in pending if not s.kinds]:
            res = commit_shard(cfg.output, s.name, so, dim, lineage, s.identity)
            count(s.name, res["added"])
        pending = [s for s in pending if s.kinds]
        if not pending:
            summary.seconds = time.perf_counter() - t0
            return summary
        local = _ensure_ray(cfg, plan.kinds)
        summary.ray_up_seconds = time.perf_counter() - t0
        _check_resources(cfg, plan.kinds)
        ctx = DataContext.get_current()
        prev_bars, prev_detectors = ctx.enable_progress_bars, ctx.issue_detectors_config
        ctx.enable_progress_bars = cfg.ray.bars()
        ctx.issue_detectors_config = _quiet_issue_detectors(prev_detectors)
        counter = counter_actor()
        tracker = _Tracker(pending)
        refs: list[Any] = []

        def shards_done() -> tuple[int, int, int]:
            done = len(ray.wait(refs, num_returns=len(refs), timeout=0)[0]) if refs else 0
            return done, len(pending), sum(tracker.ok.values()) + sum(tracker.err.values())

        reporter = ProgressReporter(
            counter, cfg.progress_interval_s, _items_to_embed(pending, summary), shards_done
        ).start()
        try:
            ds = build_pipeline(cfg, plan, pending, ray.cluster_resources(), local, counter)
            identity = {s.name: s.identity for s in pending}
            commit = ray.remote(num_cpus=0, max_retries=3)(_commit_task)
            for block in ds.iter_batches(batch_format="pyarrow", batch_size=None):
                if lock.lost.is_set():
                    raise OutputLocked(f"lost the lock on {cfg.output}; stopping")
                if summary.first_batch_seconds is None and pc.sum(block["n_ok"]).as_py():
                    summary.first_batch_seconds = time.perf_counter() - t0
                for shard in tracker.add(block):
                    refs.append(commit.remote(cfg.output, shard, so, dim, lineage, identity[shard]))
            results = ray.get(refs)
        except Exception as e:
            if not transient_store_error(e):
                raise
            cause = getattr(e, "cause", None) or e  # a Ray task error: the task's exception
            raise StoreUnavailable(
                store_name(cfg.output, so),
                f"it stopped answering during the run ({type(cause).__name__}: "
                f"{str(cause)[:300]}). Committed shards are kept and work in progress is in "
                "parts: rerun the same command to resume.",
            ) from e
        finally:
            reporter.stop()
            ray.kill(counter)
            ctx.enable_progress_bars, ctx.issue_detectors_config = prev_bars, prev_detectors
        now = output.committed_shards()
        missing = [s.name for s in pending if s.name not in now]
        missing += [s.name for s in extended if s.name in output.parts_shards()]
        if missing:
            raise RuntimeError(
                f"{len(missing)} shards were not completed (e.g. {missing[:3]}); rerun the same "
                "command to finish them"
            )
        output.prune_parts_dir()
        for r in results:
            count(r["shard"], r["added"])
        summary.ok = dict(tracker.ok)
        summary.errors = dict(tracker.err)
        summary.seconds = time.perf_counter() - t0
        return summary


def run_job(cfg: JobConfig) -> JobSummary:
    """Plan the input of `cfg` and embed every item not yet committed in `cfg.output`."""
    check_input(cfg.input, cfg.storage_options())
    output = Output(cfg.output, cfg.storage_options())
    rec = read_job_record(output)
    plan = plan_job(cfg, files_shards=(rec or {}).get("files_shards"))
    return run_plan(cfg, plan)


def embed_items(cfg: JobConfig, items: pa.Table, output: str | None = None) -> JobSummary:
    """Embed exactly the rows of `items` (a subset of `plan.list_items(cfg)`).

    Writes `<output>/<shard>.parquet` for every shard the rows belong to, holding only those
    rows, with the same lock, resume and exactly-once guarantees as a full run. `output`
    defaults to `cfg.output`.
    """
    if output is not None:
        cfg = cfg.model_copy(update={"output": output})
    return run_plan(cfg, plan_items(cfg, items))


# ----------------------------------------------------------------------------- CLI


def _describe_plan(cfg: JobConfig, plan: Plan) -> str:
    output = Output(cfg.output, cfg.storage_options())
    committed = output.committed_shards()
    pending = [s for s in plan.shards if s.name not in committed]
    lines = [
        f"input:   {cfg.input} (format {plan.format})",
        f"output:  {cfg.output}",
        f"model:   preset {cfg.preset}, checkpoint {cfg.checkpoint or 'none (random weights)'}, "
        f"normalize {cfg.normalize}",
        f"shards:  {len(plan.shards)} ({len(plan.shards) - len(pending)} already committed, "
        f"{len(pending)} to do)",
    ]
    for s in pending[:5]:
        lines.append(f"  - {s.name}  kinds {','.join(s.kinds) or '(none: no items)'}")
    if len(pending) > 5:
        lines.append(f"  ... and {len(pending) - 5} more")
    if plan.counts is not None:
        lines.append("items:   " + ", ".join(f"{k} {n}" for k, n in sorted(plan.counts.items())))
    else:
        lines.append("items:   counted while reading (tar shards are not opened for a plan)")
    if plan.skipped:
        lines.append(f"skipped: {len(plan.skipped)} files without a media extension")
    if plan.duplicates:
        lines.append(
            f"skipped: {plan.duplicates} manifest rows whose id is in an earlier row or manifest"
        )
    p = cfg.preprocess
    lines.append(
        f"preprocess: {p.num_cpus:g} CPU per task, {p.read_threads} read threads; "
        f"readers {p.read_num_cpus:g} CPU per shard"
    )
    for k in plan.kinds:
        if k == INVALID:
            lines.append(f"  {k}: rows rejected while reading go straight to _errors")
            continue
        e = cfg.encoder(k)
        actors = (
            f"{e.min_actors}-{e.max_actors}"
            if e.max_actors != "auto"
            else "auto (sized from the cluster at start)"
        )
        lines.append(
            f"encoder {k}: {actors} actors x ({e.num_gpus:g} GPU, {e.num_cpus:g} CPU, "
            f"{e.threads} threads), batch {e.batch_size}, {e.dtype}; "
            f"preprocess {cfg.preprocess_batch(k)} items per task"
        )
    lines.append(f"needs at least {required_cpus(cfg, plan.kinds):g} logical CPUs")
    return "\n".join(lines)


def _colon_without_space(value: Any) -> bool:
    """True if YAML read `{text:2}` (no space after the colon) as the key 'text:2'."""
    if isinstance(value, dict):
        return any(
            (isinstance(k, str) and ":" in k and v is None) or _colon_without_space(v)
            for k, v in value.items()
        )
    return False


def parse_set(values: Sequence[str]) -> dict[str, Any]:
    """`--set KEY=VALUE` flags as dotted-key overrides; each VALUE is read as YAML."""
    import yaml

    out = {}
    for v in values:
        if "=" not in v:
            raise ConfigError(
                f"--set {v!r}: expected KEY=VALUE, e.g. --set encoders.vision.batch_size=64"
            )
        k, val = v.split("=", 1)
        try:
            parsed = yaml.safe_load(val)
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {v!r}: the value is not valid YAML ({e})") from None
        if _colon_without_space(parsed):
            raise ConfigError(
                f"--set {v!r}: a mapping needs a space after each colon ({{text: 2}}); "
                f"simpler, set one key at a time: --set {k.strip()}.text=2"
            )
        out[k.strip()] = parsed
    return out


def add_job_arguments(p: argparse.ArgumentParser, set_example: str) -> None:
    """Flags shared by `imagebind-embed` and `imagebind-reindex` (model, storage, Ray)."""
    p.add_argument("--format", choices=["auto", "manifest", "webdataset", "files"])
    p.add_argument("--preset", help="model preset: huge, base, tiny")
    p.add_argument("--checkpoint", help="checkpoint path or URI (default: random weights)")
    p.add_argument("--checkpoint-sha256", help="expected sha256 of the checkpoint")
    p.add_argument("--s3-endpoint", help="S3-compatible endpoint URL (MinIO, moto, ...)")
    p.add_argument("--s3-region", help="S3 region")
    p.add_argument("--ray-address", help="Ray address: local (default), auto, host:port")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override any config field, e.g. --set {set_example}",
    )
    p.add_argument(
        "--no-progress",
        action="store_true",
        help="no Ray Data progress bars (default: drawn when stderr is a terminal)",
    )
    p.add_argument(
        "--progress-interval",
        type=float,
        metavar="SECONDS",
        help="seconds between progress lines in the log (default 10; progress_interval_s)",
    )
    p.add_argument("--log-level", default="INFO")


def job_overrides(
    args: argparse.Namespace, extra: dict[str, tuple[str, Any]]
) -> tuple[dict[str, Any], dict[str, str]]:
    """Config overrides from the shared flags, then `extra` (command-specific), then `--set`
    (which wins), and where each came from (dotted key -> flag, for error messages); `extra`
    maps a dotted key to (flag, value). Logging is configured here too: both CLIs call this
    first."""
    configure_logging(args.log_level)
    flags: dict[str, tuple[str, Any]] = {
        "input": ("--input", args.input),
        "format": ("--format", args.format),
        "preset": ("--preset", args.preset),
        "checkpoint": ("--checkpoint", args.checkpoint),
        "checkpoint_sha256": ("--checkpoint-sha256", args.checkpoint_sha256),
        "storage.endpoint_url": ("--s3-endpoint", args.s3_endpoint),
        "storage.region": ("--s3-region", args.s3_region),
        "ray.address": ("--ray-address", args.ray_address),
        "progress_interval_s": ("--progress-interval", args.progress_interval),
    }
    overrides = {k: v for k, (_, v) in flags.items()}
    sources = {k: f for k, (f, v) in flags.items() if v is not None}
    for k, (flag, v) in extra.items():
        overrides[k] = v
        if v is not None:
            sources[k] = flag
    if args.no_progress:
        overrides["ray.progress_bars"] = False
        sources["ray.progress_bars"] = "--no-progress"
    for raw in args.set:
        for k, v in parse_set([raw]).items():
            overrides[k] = v
            sources[k] = f"--set {raw}"
    return overrides, sources


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="imagebind-embed",
        description="Embed a corpus (manifest, WebDataset shards or media files; local or S3) "
        "with ImageBind on Ray Data into Parquet, exactly once and resumable.",
    )
    p.add_argument("--config", help="YAML job config; flags override its fields")
    p.add_argument("--input", help="input URI: folder, prefix, glob, manifest or tar shard(s)")
    p.add_argument("--output", help="output URI (local folder or s3://bucket/prefix)")
    add_job_arguments(p, "encoders.vision.max_actors=4")
    p.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="encoder dtype (auto: bfloat16 on GPUs and AMX/AVX-512-BF16 CPUs, else float32)",
    )
    p.add_argument("--batch-size", type=int, help="encoder batch size (every kind)")
    p.add_argument("--num-gpus", type=float, help="GPUs per encoder actor (every kind)")
    p.add_argument("--raw", action="store_true", help="store raw (unnormalised) embeddings")
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    p.add_argument("--json", action="store_true", help="print the final summary as JSON")
    return p


def dry_run(cfg: JobConfig) -> str:
    """What `--dry-run` prints: the plan, after the checks a run makes before it writes
    anything (PlanError, OutputMismatch as the run raises them)."""
    check_output(cfg)
    output = Output(cfg.output, cfg.storage_options())
    rec = read_job_record(output)
    plan = plan_job(cfg, files_shards=(rec or {}).get("files_shards"))
    if rec is not None:
        verify_record(output, cfg, plan, model_lineage(cfg, plan.kinds))
    return _describe_plan(cfg, plan)


def interrupted(cfg: JobConfig | None, argv: Sequence[str] | None) -> int:
    """Ctrl-C: stop Ray, say what the output keeps and how to resume; exit status 130."""
    ignore_further_interrupts()
    shutdown_ray()
    lines = ["imagebind-embed: interrupted."]
    if cfg is not None:
        with contextlib.suppress(Exception):
            output = Output(cfg.output, cfg.storage_options())
            committed = output.committed_shards()
            parts = sorted(output.parts_shards() - committed)
            items = sum(len(output.part_ids(s)) for s in parts)
            lines.append(
                f"  kept in {cfg.output}: {len(committed)} committed shards; {items} embedded "
                f"items in the parts of {len(parts)} unfinished shards (a rerun reuses them)"
            )
    lines.append("  resume with the same command:")
    lines.append(f"    {resume_command('imagebind-embed', argv)}")
    print("\n".join(lines), file=sys.stderr)
    return 130


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point. Exit status: 0 done (item errors included), 2 bad config or
    input, 3 output locked or started by another job, 130 interrupted (Ctrl-C; rerun to
    resume), 1 anything else (an unreachable object store included: rerun to resume)."""
    with filtered_stderr():
        return _main(argv)


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    cfg = None
    try:
        extra: dict[str, tuple[str, Any]] = {
            "output": ("--output", args.output),
            "encoder_defaults.dtype": ("--dtype", args.dtype),
            "encoder_defaults.batch_size": ("--batch-size", args.batch_size),
            "encoder_defaults.num_gpus": ("--num-gpus", args.num_gpus),
        }
        if args.raw:
            extra["normalize"] = ("--raw", False)
        overrides, sources = job_overrides(args, extra)
        cfg = load_config(args.config, overrides, sources)
        if args.dry_run:
            print(dry_run(cfg))
            return 0
        if cfg.checkpoint is None:
            logger.warning(
                "no checkpoint: embedding with RANDOM %s weights (seed %d) — fine for a demo or "
                "a test, meaningless otherwise",
                cfg.preset,
                cfg.seed,
            )
        summary = run_job(cfg)
    except KeyboardInterrupt:
        return interrupted(cfg, argv)
    except (ConfigError, PlanError) as e:
        print(f"imagebind-embed: {e}", file=sys.stderr)
        return 2
    except (OutputLocked, OutputMismatch) as e:
        print(f"imagebind-embed: {e}", file=sys.stderr)
        return 3
    except StoreUnavailable as e:
        print(f"imagebind-embed: {e}", file=sys.stderr)
        return 1
    print(json.dumps(summary.to_dict(), indent=2) if args.json else summary.format())
    return 0


if __name__ == "__main__":
    sys.exit(main())
