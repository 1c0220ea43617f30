"""What the embedding job asks of the machine or cluster: encoder pool sizes, logical CPUs,
memory per actor.

Everything here reads the job's config and the resources Ray reports (or /proc on this
machine); nothing starts Ray or imports torch.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import imagebind_core as ibc
from pipelines.config import JobConfig
from pipelines.formats import PlanError
from pipelines.rows import INVALID

logger = logging.getLogger(__name__)

# Logical CPUs of the part writer tasks: small I/O-bound work that must never wait long for a slot.
WRITER_NUM_CPUS = 0.1


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
    CPU encoders: one actor per `torch_threads` cores — on CPU several single-threaded actors
    are at least as fast as one multi-threaded actor, having no intra-op synchronisation
    (benchmarks/bench_cpu_actors.py compares them) — split between the CPU-encoded kinds of
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


def read_concurrency(
    cfg: JobConfig, resources: dict[str, float] | None = None, local: bool = True
) -> int:
    """Shard-reading tasks that run at once, per kind (`preprocess.read_concurrency`).

    auto: this machine's cores for a local Ray, the cluster's logical CPUs otherwise. Without a
    bound, Ray Data starts every shard's read task at once (a quarter CPU each), and each task
    holds a worker process of its own: on a small machine those processes start side by side
    while the first blocks wait (benchmarks/results/pipeline-cpu-2core.md). A read task only
    lists its shard, or streams it, ahead of preprocessing tasks that take far longer per
    item."""
    n = cfg.preprocess.read_concurrency
    if n != "auto":
        return n
    if local:
        return os.cpu_count() or 1
    return max(1, int((resources or {}).get("CPU", 0)))


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
    same logical CPUs, so fewer of them would leave preprocessing one task at a time on a
    small machine."""
    if cfg.ray.num_cpus:
        return cfg.ray.num_cpus
    real = [k for k in kinds if k != INVALID]
    others = required_cpus(cfg, real) - len(real) * cfg.preprocess.num_cpus + len(real)
    return math.ceil(2 * (os.cpu_count() or 1) * cfg.preprocess.num_cpus + others)


def check_resources(cfg: JobConfig, kinds: Sequence[str]) -> None:
    """PlanError if the Ray cluster has fewer logical CPUs than `required_cpus`; a warning if
    the encoders' minimum pools ask for more GPUs than it has now."""
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
