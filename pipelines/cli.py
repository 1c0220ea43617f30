"""The command lines of both jobs: `imagebind-embed` (`embed_main`) and `imagebind-reindex`
(`reindex_main`).

Both share the model, storage and Ray flags (`add_job_arguments`), turn flags into dotted-key
config overrides that remember which flag set them (`job_overrides`, `--set KEY=VALUE`), and
run through one frame (`_run_command`): load the config, run, print the summary (or JSON), map
errors to exit statuses, and on Ctrl-C stop Ray and say how to resume.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

from imagebind_core.errors import CheckpointError, StoreUnavailable
from pipelines.config import (
    ConfigError,
    JobConfig,
    ReindexConfig,
    load_config,
    load_reindex_config,
)
from pipelines.console import (
    bounded_interrupts,
    configure_logging,
    exit_now,
    filtered_stderr,
    resume_command,
    shutdown_ray,
)
from pipelines.embed import (
    OutputMismatch,
    check_model,
    check_output,
    job_record,
    run_job,
    verify_record,
)
from pipelines.formats import PlanError
from pipelines.lineage import model_lineage
from pipelines.lock import OutputLocked
from pipelines.plan import Plan, check_input, plan_job
from pipelines.publish import IndexRoot
from pipelines.reindex import reindex
from pipelines.resources import required_cpus
from pipelines.rows import INVALID
from pipelines.store import Output, OutputDamaged, OutputUnwritable

logger = logging.getLogger(__name__)

EMBED = "imagebind-embed"
REINDEX = "imagebind-reindex"

# Exit statuses by error, first match wins; 0 is success, 130 an interrupt, 1 anything else.
EMBED_STATUSES: tuple[tuple[tuple[type[BaseException], ...], int], ...] = (
    ((ConfigError, PlanError, CheckpointError), 2),
    ((OutputLocked, OutputMismatch, OutputDamaged), 3),
    ((StoreUnavailable, OutputUnwritable), 1),
)
REINDEX_STATUSES: tuple[tuple[tuple[type[BaseException], ...], int], ...] = (
    ((ConfigError, PlanError, CheckpointError), 2),
    ((OutputLocked, OutputDamaged), 3),
    ((StoreUnavailable, OutputUnwritable), 1),
)


# The flags that set one config field, dotted key -> flag (the value is the flag's argument),
# and the switches, dotted key -> (flag, the value it sets): both commands' (a command's own
# flags are on its parser only, `job_overrides` takes the ones it has).
FLAGS: dict[str, str] = {
    "input": "--input",
    "format": "--format",
    "preset": "--preset",
    "checkpoint": "--checkpoint",
    "checkpoint_sha256": "--checkpoint-sha256",
    "storage.endpoint_url": "--s3-endpoint",
    "storage.region": "--s3-region",
    "ray.address": "--ray-address",
    "progress_interval_s": "--progress-interval",
    "output": "--output",  # imagebind-embed
    "encoder_defaults.dtype": "--dtype",
    "encoder_defaults.batch_size": "--batch-size",
    "encoder_defaults.num_gpus": "--num-gpus",
    "index.root": "--index-root",  # imagebind-reindex
    "index.keep_versions": "--keep-versions",
    "index.lock_ttl_s": "--lock-ttl-s",
}
SWITCHES: dict[str, tuple[str, Any]] = {
    "ray.progress_bars": ("--no-progress", False),
    "normalize": ("--raw", False),  # imagebind-embed
    "index.full": ("--full", True),  # imagebind-reindex
    "index.retry_failed": ("--retry-failed", True),
    "index.allow_empty": ("--allow-empty", True),
}


# ----------------------------------------------------------------------------- shared flags


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


def _parser(prog: str, description: str, *, config: str, input: str) -> argparse.ArgumentParser:
    """A command line with its `--config` and `--input` flags (help texts given)."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--config", help=config)
    p.add_argument("--input", help=input)
    return p


def add_job_arguments(p: argparse.ArgumentParser, set_example: str) -> None:
    """Flags shared by `imagebind-embed` and `imagebind-reindex` (model, storage, Ray)."""
    p.add_argument("--format", choices=["auto", "manifest", "webdataset", "files"])
    p.add_argument("--preset", help="model preset: huge, base, tiny")
    p.add_argument("--checkpoint", help="checkpoint path or URI (default: random weights)")
    p.add_argument("--checkpoint-sha256", help="expected sha256 of the checkpoint")
    p.add_argument("--s3-endpoint", help="S3-compatible endpoint URL (MinIO, moto, ...)")
    p.add_argument("--s3-region", help="S3 region")
    p.add_argument(
        "--ray-address",
        help="Ray to join: auto or host:port (default: RAY_ADDRESS if set, else a new local Ray)",
    )
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


def job_overrides(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, str]]:
    """Config overrides from the flags and switches `args` has (FLAGS, SWITCHES), then from
    `--set` (which wins), and where each came from (dotted key -> flag, for error messages).
    Logging is configured here too: both CLIs call this first."""
    configure_logging(args.log_level)
    overrides: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for key, flag in FLAGS.items():
        if hasattr(args, _dest(flag)):
            overrides[key] = value = getattr(args, _dest(flag))
            if value is not None:
                sources[key] = flag
    for key, (flag, value) in SWITCHES.items():
        if getattr(args, _dest(flag), False):
            overrides[key], sources[key] = value, flag
    for raw in args.set:
        for key, value in parse_set([raw]).items():
            overrides[key], sources[key] = value, f"--set {raw}"
    return overrides, sources


def _dest(flag: str) -> str:
    """The attribute argparse stores `flag` under."""
    return flag.removeprefix("--").replace("-", "_")


# ----------------------------------------------------------------------------- the frame


def _run_command(
    prog: str,
    argv: Sequence[str] | None,
    parser: argparse.ArgumentParser,
    load: Callable[..., Any],
    execute: Callable[[argparse.Namespace, Any], Any],
    interrupted: Callable[[Any, Sequence[str] | None], int],
    statuses: Sequence[tuple[tuple[type[BaseException], ...], int]],
) -> int:
    """One command line's run: parse `argv`, load the config (`load(path, overrides,
    sources)`, the overrides from `job_overrides`), `execute(args, cfg)`, print what it
    returns and exit with its status.

    `execute` returns a str (printed as is, status 0) or a result with `to_dict()`,
    `format()` and an `exit_status` (printed as JSON with `--json`). An error listed in
    `statuses` prints `prog: message` and exits with its status; Ctrl-C calls
    `interrupted(cfg or None, argv)`. Runs with Ray's known-harmless stderr lines filtered.
    """
    # A second Ctrl-C, or a cleanup past its grace, ends the command line at once.
    interrupts = bounded_interrupts(prog, argv) if argv is None else contextlib.nullcontext()
    with filtered_stderr(), interrupts:
        args = parser.parse_args(argv)
        cfg = None
        try:
            overrides, sources = job_overrides(args)
            cfg = load(args.config, overrides, sources)
            result = execute(args, cfg)
        except KeyboardInterrupt:
            status = interrupted(cfg, argv)
        except tuple(t for types, _ in statuses for t in types) as e:
            print(f"{prog}: {e}", file=sys.stderr)
            return next(status for types, status in statuses if isinstance(e, types))
        else:
            if isinstance(result, str):
                print(result)
                return 0
            print(json.dumps(result.to_dict(), indent=2) if args.json else result.format())
            return result.exit_status
    if argv is None:  # the command line itself, not a caller in this process
        exit_now(status)
    return status


# ----------------------------------------------------------------------------- imagebind-embed


def build_embed_parser() -> argparse.ArgumentParser:
    """The `imagebind-embed` command line."""
    p = _parser(
        EMBED,
        "Embed a corpus (manifest, WebDataset shards or media files; local or S3) with "
        "ImageBind on Ray Data into Parquet, exactly once and resumable.",
        config="YAML job config; flags override its fields",
        input="input URI: folder, prefix, glob, manifest or tar shard(s)",
    )
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


def _embed(args: argparse.Namespace, cfg: JobConfig) -> Any:
    if args.dry_run:
        return dry_run(cfg)
    if cfg.checkpoint is None:
        logger.warning(
            "no checkpoint: embedding with RANDOM %s weights (seed %d) — fine for a demo or "
            "a test, meaningless otherwise",
            cfg.preset,
            cfg.seed,
        )
    return run_job(cfg)


def embed_main(argv: Sequence[str] | None = None) -> int:
    """`imagebind-embed`. Exit status: 0 done (item errors included), 2 bad config,
    input or checkpoint, 3 output locked, started by another job or damaged (a file it must read is
    not what a run wrote; the message names it), 130 interrupted (Ctrl-C; rerun to
    resume), 1 anything else (an unreachable object store included: rerun to resume)."""
    return _run_command(
        EMBED,
        argv,
        build_embed_parser(),
        load_config,
        _embed,
        embed_interrupted,
        EMBED_STATUSES,
    )


def dry_run(cfg: JobConfig) -> str:
    """What `--dry-run` prints: the plan, after the checks a run makes before it writes
    anything (PlanError, OutputMismatch as the run raises them)."""
    check_input(cfg.input, cfg.storage_options())
    check_output(cfg)
    check_model(cfg)
    output = Output(cfg.output, cfg.storage_options())
    rec = job_record(cfg, output)
    plan = plan_job(cfg, files_shards=(rec or {}).get("files_shards"))
    if rec is not None:
        verify_record(output, cfg, plan, model_lineage(cfg, plan.kinds))
    return _describe_plan(cfg, plan)


def embed_interrupted(cfg: JobConfig | None, argv: Sequence[str] | None) -> int:
    """Ctrl-C: stop Ray, say what the output keeps and how to resume; exit status 130."""
    shutdown_ray()
    lines = [f"{EMBED}: interrupted."]
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
    lines.append(f"    {resume_command(EMBED, argv)}")
    print("\n".join(lines), file=sys.stderr)
    return 130


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
        f"readers {p.read_num_cpus:g} CPU per shard, "
        + (
            "auto: as many at once as cores, or the cluster's logical CPUs"
            if p.read_concurrency == "auto"
            else f"at most {p.read_concurrency} at once"
        )
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


# ----------------------------------------------------------------------------- imagebind-reindex


def build_reindex_parser() -> argparse.ArgumentParser:
    """The `imagebind-reindex` command line."""
    p = _parser(
        REINDEX,
        "Incrementally re-index a corpus into a versioned, atomically published embedding "
        "index (embed new and changed items, carry the rest, drop deleted ones).",
        config="YAML: imagebind-embed fields plus an `index:` section",
        input="corpus URI (as for imagebind-embed)",
    )
    p.add_argument("--index-root", help="index root URI (local folder or s3://bucket/prefix)")
    add_job_arguments(p, "index.nprobe=64")
    p.add_argument("--keep-versions", type=int, help="published versions to keep (default 3)")
    p.add_argument("--lock-ttl-s", type=float, help="lease of the re-index lock in seconds")
    p.add_argument("--full", action="store_true", help="re-embed everything this run")
    p.add_argument(
        "--retry-failed", action="store_true", help="retry items that failed before, unchanged"
    )
    p.add_argument(
        "--allow-empty",
        action="store_true",
        help="publish an empty version if the input holds no items any more",
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    return p


def reindex_main(argv: Sequence[str] | None = None) -> int:
    """`imagebind-reindex`. Exit status: 0 published or unchanged, 2 bad config or input,
    3 another run holds the lock or published first (nothing published) or the published
    version cannot be read (changed outside a run), 4 the Milvus sink
    failed (`index.milvus`; the version stands), 130 interrupted
    (Ctrl-C; nothing published), 1 anything else."""
    return _run_command(
        REINDEX,
        argv,
        build_reindex_parser(),
        load_reindex_config,
        lambda _args, cfg: reindex(cfg),
        reindex_interrupted,
        REINDEX_STATUSES,
    )


def reindex_interrupted(cfg: ReindexConfig | None, argv: Sequence[str] | None) -> int:
    """Ctrl-C: stop Ray, say that nothing was published and how to run again; status 130."""
    shutdown_ray()
    lines = [f"{REINDEX}: interrupted; nothing was published."]
    if cfg is not None:
        with contextlib.suppress(Exception):
            pointer, _ = IndexRoot(cfg.index.root, cfg.job.storage_options()).latest()
            where = f"version {pointer.name}" if pointer else "no version yet"
            lines.append(f"  {cfg.index.root}: LATEST still points at {where}")
    lines.append("  run again with the same command (the embedding of changed items restarts):")
    lines.append(f"    {resume_command(REINDEX, argv)}")
    print("\n".join(lines), file=sys.stderr)
    return 130
