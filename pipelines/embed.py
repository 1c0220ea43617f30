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

Around the run: the command line is `pipelines.cli`, pool sizes and logical CPUs come from
`pipelines.resources`, the model lineage written with every file from `pipelines.lineage`,
and the run's summary is `pipelines.summary.JobSummary`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import replace
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

import imagebind_core as ibc
from imagebind_core.errors import CheckpointError, StoreUnavailable
from imagebind_core.io import canonical_uri, store_name
from pipelines.config import JobConfig
from pipelines.lineage import model_lineage
from pipelines.lock import OutputLock, OutputLocked
from pipelines.plan import (
    Plan,
    ShardSpec,
    check_folder,
    check_input,
    plan_items,
    plan_job,
    reconcile,
    shard_tasks,
    store_errors,
)
from pipelines.progress import PARTS_DROPPED, ProgressReporter, counter_actor
from pipelines.readers import read_tasks
from pipelines.resources import (
    WRITER_NUM_CPUS,
    Pool,
    check_resources,
    local_num_cpus,
    pool_size,
    read_concurrency,
)
from pipelines.rows import INVALID
from pipelines.stages import EncodeBatch, preprocess_batch, without_tensors
from pipelines.store import (
    Output,
    OutputUnwritable,
    find_cause,
    read_job_record,
    transient_store_error,
    unwritable_error,
    with_store_retries,
    write_job_record,
)
from pipelines.summary import JobSummary
from pipelines.warmup import start_warmup
from pipelines.writers import commit_shard, write_parts

logger = logging.getLogger(__name__)


class OutputMismatch(RuntimeError):
    """The output was started by a run with another model, input or format."""


# ----------------------------------------------------------------------------- job record


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
    if isinstance(old.get("input"), str):  # a record may hold the input as the user spelled it
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

# Rows per table of the read tasks of rows rejected while listing (no preprocessing block
# size to match: they go straight to the writer).
INVALID_ROWS_PER_TABLE = 1024


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
    dim = ibc.get_config(cfg.preset).out_embed_dim
    tasks = shard_tasks(plan, cfg, plan.shards if shards is None else shards)
    branches = []
    readers = read_concurrency(cfg, resources, local)
    for kind, rows in sorted(tasks.items()):
        ds = _read_stage(cfg, rows, progress, kind, readers)
        if kind == INVALID:  # rows rejected while reading: straight to the writer
            ds = ds.map_batches(
                without_tensors,
                batch_format="pyarrow",
                num_cpus=cfg.preprocess.read_num_cpus,
                fn_kwargs={"embed_dim": dim},
            )
        else:
            ds = _preprocess_stage(cfg, ds, kind, progress, readers)
            pool = pool_size(cfg, kind, plan.kinds, resources, local)
            ds = _encode_stage(cfg, ds, kind, pool, progress)
        branches.append(ds)
    if not branches:
        return None
    ds = branches[0].union(*branches[1:]) if len(branches) > 1 else branches[0]
    return ds.map_batches(
        write_parts,
        batch_size=None,
        batch_format="pyarrow",
        num_cpus=WRITER_NUM_CPUS,
        fn_kwargs={
            "output_uri": cfg.output,
            "storage_options": cfg.storage_options(),
            "embed_dim": dim,
        },
    )


def _read_stage(
    cfg: JobConfig, rows: list[dict[str, Any]], progress: Any, kind: str, readers: int
) -> Any:
    """One kind's read tasks (one per shard, at most `readers` at once): the shard's rows,
    without bytes, emitted in tables of the kind's preprocessing block size (each one block,
    and one progress report: Ray Data's and the counter's costs are per table, not per row)."""
    import ray.data

    ds = ray.data.from_items(rows, override_num_blocks=len(rows))
    chunk = cfg.preprocess_batch(kind) if kind != INVALID else INVALID_ROWS_PER_TABLE
    return ds.map_batches(
        read_tasks,
        batch_size=1,
        batch_format="pyarrow",
        compute=ray.data.TaskPoolStrategy(size=readers),
        num_cpus=cfg.preprocess.read_num_cpus,
        fn_kwargs={
            "output_uri": cfg.output,
            "storage_options": cfg.storage_options(),
            "progress": progress,
            "chunk_rows": chunk,
        },
    )


def _preprocess_stage(cfg: JobConfig, ds: Any, kind: str, progress: Any, readers: int) -> Any:
    """`kind`'s preprocessing tasks: read bytes, decode, preprocess (CPU). `readers`: the read
    stage's task bound, which the repartition fused into it shares."""
    pre_batch = cfg.preprocess_batch(kind)
    # A shard is read as one block; cut it into task-sized blocks so that a shard's items
    # are preprocessed by parallel tasks and reach the encoders as many bundles (the actor
    # pool balances bundles, not rows). Streaming: no all-to-all exchange; fused into the
    # read tasks (`_fuse_into_read`), so it costs no operator of its own.
    ds = _fuse_into_read(
        ds.repartition(target_num_rows_per_block=pre_batch), cfg.preprocess.read_num_cpus, readers
    )
    return ds.map_batches(
        preprocess_batch,
        batch_size=pre_batch,
        batch_format="pyarrow",
        num_cpus=cfg.preprocess.num_cpus,
        # A memory reservation the encoder does not have: Ray Data fuses neighbouring
        # stages whose resource requests are equal, which would move preprocessing into
        # the encoder actor. CPU work stays out of it.
        memory=cfg.preprocess.memory_mb * 2**20,
        fn_kwargs={
            "storage_options": cfg.storage_options(),
            "limits": dict(cfg.preprocess.limits),
            "options": {kind: cfg.preprocess.options.get(kind, {})},  # type: ignore[call-overload]
            "read_threads": cfg.preprocess.read_threads,
            "trace_path": cfg.debug.trace_path,
            "delay_per_item_s": cfg.debug.delay_per_item_s,
            "decode": {kind: cfg.preprocess.decode.get(kind, "cpu")},  # type: ignore[call-overload]
            "progress": progress,
        },
    )


def _encode_stage(cfg: JobConfig, ds: Any, kind: str, pool: Pool, progress: Any) -> Any:
    """`kind`'s encoder actor pool (`stages.EncodeBatch`), sized by `pool`."""
    import ray.data
    from ray.data import DataContext

    enc = cfg.encoder(kind)
    concurrent = enc.concurrent_batches
    in_flight = max(enc.tasks_in_flight, concurrent)
    if pool.initial < pool.max:
        # Ray Data adds an actor only when the pool's tasks in flight per call slot pass
        # its upscaling threshold (1.75 by default): fewer queued tasks and the pool
        # could never grow (Ray warns "will not allow it to scale up").
        up = DataContext.get_current().autoscaling_config.actor_pool_util_upscaling_threshold
        in_flight = max(in_flight, math.ceil(up * concurrent))
    return ds.map_batches(
        EncodeBatch,
        # One call per preprocessed block where a block holds at least a model batch (texts:
        # 8,192 rows per block, 512 per batch on a GPU): the actor cuts it into model batches
        # itself, so Ray Data's costs per call and per output block, and the writer's per
        # part file, are paid once per block. Smaller blocks are bundled up to a model batch.
        batch_size=max(enc.batch_size, cfg.preprocess_batch(kind)),
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(
            # A pool that starts at its largest size never scales up: fixed in size, Ray
            # Data keeps it (its actors end with the stage).
            min_size=pool.max if pool.initial == pool.max else pool.min,
            max_size=pool.max,
            initial_size=pool.initial,
            max_tasks_in_flight_per_actor=in_flight,
            # CUDA: two calls at once, so one batch is copied to the device while the
            # other computes (the runner lets one compute at a time).
            max_concurrent_calls_per_actor=concurrent,
            enable_true_multi_threading=concurrent > 1,
        ),
        num_cpus=enc.num_cpus,
        num_gpus=enc.num_gpus,
        fn_constructor_kwargs={
            "kind": kind,
            "spec": cfg.model_spec(kind),
            "batch_size": enc.batch_size,
            "torch_threads": enc.threads,
            "null_encoder": cfg.debug.null_encoder,
            "null_item_s": cfg.debug.null_encoder_item_s,
            "null_log_path": cfg.debug.null_encoder_log_path,
            "trace_path": cfg.debug.actor_trace_path,
            "load_gate_path": cfg.debug.load_gate_path,
            "progress": progress,
        },
    )


def _fuse_into_read(ds: Any, read_num_cpus: float, readers: int) -> Any:
    """`ds` (a streaming repartition right after the read) with the repartition's resource
    request and task bound set to the read's, so that Ray Data fuses the two: each read task
    then emits its rows as blocks of the target size itself, and no separate operator (a task
    per block, and its (de)serialisation) cuts them. `repartition` has no parameter for it; on
    a Ray whose logical plan differs, the operators stay apart (the same rows, one operator
    more)."""
    try:
        from ray.data import TaskPoolStrategy
        from ray.data._internal.logical.operators.map_operator import StreamingRepartition

        op = ds._logical_plan.dag
        if isinstance(op, StreamingRepartition) and isinstance(op.ray_remote_args, dict):
            op.ray_remote_args.update(num_cpus=read_num_cpus)
            object.__setattr__(op, "compute", TaskPoolStrategy(size=readers))  # a frozen field
    except (ImportError, AttributeError):
        logger.debug("Ray Data internals differ: shard repartition not fused into the read")
    return ds


# ----------------------------------------------------------------------------- running


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


# Arrow reads its allocator from this variable when a process first allocates.
ARROW_POOL_ENV = "ARROW_DEFAULT_MEMORY_POOL"
# How long a local Ray the job starts keeps an idle worker process above its soft limit (Ray's
# own default: 1 s). Ray Data runs fractional-CPU readers and writers beside the preprocessing
# tasks, so a job's worker processes outnumber the logical CPUs (the soft limit); with 1 s, the
# extra ones are ended between two bursts of tasks and started again for the next, each new
# process importing Ray, pyarrow and the stage's modules again (what that costs:
# benchmarks/results/pipeline-cpu-2core.md). Kept for a minute, a busy job's processes live as
# long as it does and end a minute after it.
IDLE_WORKER_ENV = "RAY_idle_worker_killing_time_threshold_ms"
IDLE_WORKER_KEEP_MS = 60_000


def arrow_memory_pool(cfg: JobConfig) -> str | None:
    """The Arrow allocator the job asks for (`ray.arrow_memory_pool`), or None to leave
    Arrow's choice (ARROW_DEFAULT_MEMORY_POOL set by the user, or no such allocator in this
    pyarrow build: jemalloc is optional in it).

    Why not pyarrow's default, mimalloc: the listing and the diff build and shuffle columns of
    millions of strings, and mimalloc grows a large buffer by copying it, which made them
    several times slower in fresh worker processes; jemalloc also used the least memory
    (benchmarks/results/arrow-memory-pool-2core.md)."""
    name = cfg.ray.arrow_memory_pool
    if name is None:
        if os.environ.get(ARROW_POOL_ENV):
            return None
        name = "jemalloc"
    return name if name in pa.supported_memory_backends() else None


def ensure_ray(cfg: JobConfig, kinds: Sequence[str]) -> bool:
    """Start or join Ray; True when it runs on this machine only (one node). The driver and
    the job's Ray workers allocate Arrow memory from `arrow_memory_pool(cfg)`."""
    import ray

    pool = arrow_memory_pool(cfg)
    if pool is not None:
        pa.set_memory_pool(getattr(pa, f"{pool}_memory_pool")())
    if ray.is_initialized():
        return len(ray.nodes()) == 1
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS") or "local"
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
    if address == "local":
        kwargs["num_cpus"] = local_num_cpus(cfg, kinds)
        # A new local Ray's processes inherit the driver's environment: its prestarted workers
        # then serve the job. A job runtime_env would make Ray start other workers for it
        # (slower: benchmarks/results/arrow-memory-pool-2core.md).
        keep = None if os.environ.get(IDLE_WORKER_ENV) else str(IDLE_WORKER_KEEP_MS)
        with _environ(ARROW_POOL_ENV, pool), _environ(IDLE_WORKER_ENV, keep):
            ray.init(address=address, **kwargs)
        return True
    if pool is not None:
        kwargs["runtime_env"] = {"env_vars": {ARROW_POOL_ENV: pool}}
    ray.init(address=address, **kwargs)
    return False


@contextlib.contextmanager
def _environ(name: str, value: str | None) -> Iterator[None]:
    """os.environ[name] = value (when not None) inside the block, as before after it."""
    before = os.environ.get(name)
    if value is not None:
        os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


def check_output(cfg: JobConfig) -> None:
    """PlanError if the output names an existing file or lies under one (it must be a folder
    or prefix)."""
    check_folder(cfg.output, "output", cfg.storage_options())


def check_model(cfg: JobConfig, kinds: Sequence[str] | None = None) -> None:
    """CheckpointError naming the checkpoint if it is missing, unreachable, empty or not a
    PyTorch checkpoint: said before Ray starts or the output is written. With `kinds` and no
    `checkpoint_sha256` (the driver then fetches the checkpoint to hash it), also if it does
    not hold those kinds' encoders of the preset (`imagebind_core.verify_checkpoint`);
    otherwise the encoder actors that load it say so."""
    if cfg.checkpoint is None:
        return
    ibc.check_checkpoint(cfg.checkpoint, cfg.storage_options())
    if kinds is not None and not cfg.checkpoint_sha256:
        local, _ = ibc.fetch_checkpoint(cfg.checkpoint, storage_options=cfg.storage_options())
        modalities = sorted({ibc.model_modality(k).value for k in kinds if k != INVALID})
        if modalities:
            ibc.verify_checkpoint(local, cfg.preset, modalities, source=cfg.checkpoint)


def _quiet_issue_detectors(config: Any) -> Any:
    """Ray Data's issue detectors without the high-memory one.

    It compares each operator's worker RSS with the memory the operator requests, every 30 s
    for the whole run. Ray reuses worker processes across operators, so a writer task that
    runs in a worker which earlier preprocessed (and imported torch) reports hundreds of MB and the
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
    t0 = time.perf_counter()
    check_output(cfg)
    check_model(cfg, plan.kinds)
    lineage = model_lineage(cfg, plan.kinds)
    output = Output(cfg.output, cfg.storage_options())
    output.makedirs(output.root)
    if cfg.checkpoint is not None:  # every actor verifies the checkpoint the metadata names
        cfg = cfg.model_copy(update={"checkpoint_sha256": lineage["imagebind.checkpoint_sha256"]})
    lock = OutputLock(cfg.output, cfg.storage_options(), ttl_s=cfg.lock_ttl_s)
    with store_errors(cfg.output, "output", cfg.storage_options()):
        lock.acquire()  # the output's first write: a missing bucket is said here
    with lock:
        _check_record(output, cfg, plan, lineage)
        run = _Run(cfg, plan, output, lineage, t0)
        run.tidy_output()
        pending = run.reconcile()
        if pending:
            run.execute(pending, lock)
        run.summary.seconds = time.perf_counter() - t0
        return run.summary


class _Run:
    """One run of `run_plan` under the output lock: its output, lineage and summary."""

    def __init__(
        self, cfg: JobConfig, plan: Plan, output: Output, lineage: dict[str, str], t0: float
    ) -> None:
        self.cfg, self.plan, self.output, self.lineage, self.t0 = cfg, plan, output, lineage, t0
        self.storage_options = cfg.storage_options()
        self.dim = int(lineage["imagebind.embed_dim"])
        self.summary = JobSummary(cfg.output, len(plan.shards), 0, 0)
        self.extended: list[ShardSpec] = []

    def commit(self, shard: str, identity: str | None = None) -> dict[str, Any]:
        """Commit `shard` from the driver (`writers.commit_shard`)."""
        return commit_shard(
            self.cfg.output, shard, self.storage_options, self.dim, self.lineage, identity
        )

    def tidy_output(self) -> None:
        """Fold in the parts an interrupted run left; drop those of shards gone from the input."""
        committed = self.output.committed_shards()
        for shard in self.output.leftover_parts(committed):
            # A run that died after this commit (its parts hold committed ids: dropped), or
            # while embedding additions (ids no committed file holds: committed now).
            logger.info("shard %s: folding in parts left by an interrupted run", shard)
            self.commit(shard)
        planned = {s.name for s in self.plan.shards}
        for shard in sorted(self.output.parts_shards() - planned - committed):
            # Work for a shard that is not in the input (a manifest deleted mid-run).
            logger.warning("shard %s: no longer in the input; removing its parts", shard)
            self.output.rm_parts(shard)

    def reconcile(self) -> list[ShardSpec]:
        """The shards to embed (new ones and committed ones with new items), after committing
        those without items; the summary's counts of what is already done."""
        files = self.output.committed_files()
        committed = self.output.committed_shards(files)
        new, self.extended, unchanged = reconcile(
            self.plan,
            self.output,
            committed,
            self.storage_options,
            files=self.output.committed_files_by_shard(files),
        )
        pending = new + self.extended
        summary = self.summary
        summary.shards_skipped = len(unchanged)
        # Items an interrupted run embedded into parts of shards it did not commit: the
        # readers skip them, the commit folds them in.
        summary.items_reused = sum(len(self.output.part_ids(s.name)) for s in new)
        logger.info(
            "%s: %d shards, %d already committed, %d to do (%d of them committed earlier, with "
            "new items); kinds %s",
            self.cfg.input,
            len(self.plan.shards),
            summary.shards_skipped,
            len(pending),
            len(self.extended),
            ",".join(self.plan.kinds),
        )
        if summary.items_reused:
            logger.info(
                "%d items in earlier parts (embedded by an interrupted run): those whose input "
                "is unchanged are reused",
                summary.items_reused,
            )
        # A shard with no items (an empty manifest, or only ids of earlier manifests) gets its
        # empty output file here: no task would ever report it complete.
        for s in [s for s in pending if not s.kinds]:
            self.count(s.name, self.commit(s.name, s.identity)["added"])
        return [s for s in pending if s.kinds]

    def count(self, shard: str, added: bool) -> None:
        """Count a committed shard in the summary."""
        if shard not in {s.name for s in self.extended}:
            self.summary.shards_committed += 1
        elif added:
            self.summary.shards_extended += 1
        else:  # its input changed, but every item in it was committed already
            self.summary.shards_skipped += 1

    def execute(self, pending: list[ShardSpec], lock: OutputLock) -> None:
        """Start or join Ray, run the pipeline over `pending`, commit each shard as it
        completes, and check that every one was committed."""
        import ray
        from ray.data import DataContext

        cfg, plan = self.cfg, self.plan
        local = ensure_ray(cfg, plan.kinds)
        self.summary.ray_up_seconds = time.perf_counter() - self.t0
        check_resources(cfg, plan.kinds)
        warmup = start_warmup(cfg, plan.kinds, pending, local)  # fire and forget: never awaited
        ctx = DataContext.get_current()
        prev_bars, prev_detectors = ctx.enable_progress_bars, ctx.issue_detectors_config
        prev_raise = ctx.raise_original_map_exception
        # A stage's own exception (StoreUnavailable, a refused write) reaches this driver as
        # the Ray task error's cause, not as a UserCodeException that lost it in pickling.
        ctx.raise_original_map_exception = True
        ctx.enable_progress_bars = cfg.ray.bars()
        ctx.issue_detectors_config = _quiet_issue_detectors(prev_detectors)
        counter = counter_actor()
        tracker = _Tracker(pending)
        refs: list[Any] = []

        def shards_done() -> tuple[int, int, int]:
            done = len(ray.wait(refs, num_returns=len(refs), timeout=0)[0]) if refs else 0
            return done, len(pending), sum(tracker.ok.values()) + sum(tracker.err.values())

        to_embed = _items_to_embed(pending, self.summary)
        reporter = ProgressReporter(counter, cfg.progress_interval_s, to_embed, shards_done)
        reporter.start()
        try:
            ds = build_pipeline(cfg, plan, pending, ray.cluster_resources(), local, counter)
            self._stream(ds, pending, tracker, refs, lock)
            results = ray.get(refs)
        except Exception as e:
            bad_model = find_cause(e, CheckpointError)
            if bad_model is not None:  # an encoder actor could not load it: one sentence
                raise CheckpointError(str(bad_model)) from None
            refused = unwritable_error(e, cfg.output)
            if refused is not None:
                raise OutputUnwritable(
                    f"cannot write to the output {cfg.output}: {refused.strerror or refused}"
                    f"{f' ({refused.filename})' if refused.filename else ''}. Committed shards "
                    "are kept and work in progress is in parts: make the output writable "
                    "(space, permissions) and rerun the same command to resume."
                ) from e
            if not transient_store_error(e):
                raise
            cause = getattr(e, "cause", None) or e  # a Ray task error: the task's exception
            resume = (
                "Committed shards are kept and work in progress is in parts: rerun the same "
                "command to resume."
            )
            if isinstance(cause, StoreUnavailable):  # a stage's retries ran out
                raise StoreUnavailable(cause.store, f"{cause.reason}. {resume}", cause.uri) from e
            raise StoreUnavailable(
                store_name(cfg.output, cfg.storage_options()),
                f"it stopped answering during the run ({type(cause).__name__}: "
                f"{str(cause)[:300]}). {resume}",
            ) from e
        finally:
            counts = reporter.stop()
            # Part rows counted as reused at the start whose item had changed or gone.
            self.summary.items_reused -= counts.get(PARTS_DROPPED, 0)
            ray.kill(counter)
            self.summary.workers_warmed, self.summary.warmup_tasks = warmup.finish()
            ctx.enable_progress_bars, ctx.issue_detectors_config = prev_bars, prev_detectors
            ctx.raise_original_map_exception = prev_raise
        self._check_complete(pending)
        for r in results:
            self.count(r["shard"], r["added"])
        self.summary.ok = dict(tracker.ok)
        self.summary.errors = dict(tracker.err)

    def _stream(
        self,
        ds: Any,
        pending: list[ShardSpec],
        tracker: _Tracker,
        refs: list[Any],
        lock: OutputLock,
    ) -> None:
        """Iterate the pipeline's write summaries; a commit task for each completed shard
        (its ref appended to `refs`)."""
        import ray

        identity = {s.name: s.identity for s in pending}
        commit = ray.remote(num_cpus=0, max_retries=3)(_commit_task)
        for block in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            if lock.lost.is_set():
                raise OutputLocked(f"lost the lock on {self.cfg.output}; stopping")
            if self.summary.first_batch_seconds is None and pc.sum(block["n_ok"]).as_py():
                self.summary.first_batch_seconds = time.perf_counter() - self.t0
            for shard in tracker.add(block):
                args = (self.storage_options, self.dim, self.lineage, identity[shard])
                refs.append(commit.remote(self.cfg.output, shard, *args))

    def _check_complete(self, pending: list[ShardSpec]) -> None:
        """RuntimeError unless every pending shard is committed and its parts folded in."""
        now = self.output.committed_shards()
        missing = [s.name for s in pending if s.name not in now]
        missing += [s.name for s in self.extended if s.name in self.output.parts_shards()]
        if missing:
            raise RuntimeError(
                f"{len(missing)} shards were not completed (e.g. {missing[:3]}); rerun the same "
                "command to finish them"
            )
        self.output.prune_parts_dir()


def run_job(cfg: JobConfig) -> JobSummary:
    """Plan the input of `cfg` and embed every item not yet committed in `cfg.output`."""
    check_input(cfg.input, cfg.storage_options())
    check_model(cfg)
    output = Output(cfg.output, cfg.storage_options())
    rec = job_record(cfg, output)
    plan = plan_job(cfg, files_shards=(rec or {}).get("files_shards"))
    return run_plan(cfg, plan)


def job_record(cfg: JobConfig, output: Output) -> dict | None:
    """`read_job_record(output)`, the store's trouble said naming the output (`store_errors`):
    often the first read of an output on an object store."""
    with store_errors(cfg.output, "output", cfg.storage_options()):
        return read_job_record(output)


def embed_items(cfg: JobConfig, items: pa.Table, output: str | None = None) -> JobSummary:
    """Embed exactly the rows of `items` (a subset of `plan.list_items(cfg)`).

    Writes `<output>/<shard>.parquet` for every shard the rows belong to, holding only those
    rows, with the same lock, resume and exactly-once guarantees as a full run. `output`
    defaults to `cfg.output`.
    """
    if output is not None:
        cfg = cfg.model_copy(update={"output": output})
    return run_plan(cfg, plan_items(cfg, items))


if __name__ == "__main__":  # `python -m pipelines.embed`: the command line
    from pipelines.cli import embed_main

    sys.exit(embed_main())
