"""`imagebind-reindex`: keep a published embedding index in step with a living corpus.

One run:

1. takes the re-index lease on the index root (`pipelines.lock.OutputLock` on `<root>/_lock`);
   a second run finds it held and exits without doing anything;
2. reads the published pointer (`<root>/LATEST`) and the parent version's rows;
3. lists the corpus without reading payloads (`pipelines.plan.list_items`, the same inputs
   as `imagebind-embed`) and diffs it against the parent by (`id`, `fingerprint`): new and
   changed items are embedded, unchanged rows are carried forward as they are (same bytes, no
   recomputation), deleted items are left out. A different model lineage (preset, checkpoint
   sha256, dtype, embedding size, normalisation, preprocessing version, options and limits;
   the seed for random weights) re-embeds everything. Items that failed in the parent with
   the same fingerprint are not retried unless `index.retry_failed` is set (a bad file must
   not make every run publish a new version);
4. if nothing changed, publishes nothing; otherwise stages a complete version under
   `<root>/versions/<n>-<run>/` — `data/embedded/` (this run's embeddings, written by
   `pipelines.embed.embed_items` with its exactly-once protocol), `data/carried/` (rows copied
   from the parent), `index/` (the FAISS index, `imagebind_core.index`), `version.json` (the
   record) — and publishes it with one compare-and-swap of `LATEST` (`pipelines.publish`);
5. applies retention (the last `index.keep_versions` versions stay).

Library use: `reindex(load_reindex_config("reindex.yaml"))`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, ValidationError

import imagebind_core as ibc
from imagebind_core.index import DATA_DIR, INDEX_DIR, IndexOptions, Pointer, join_uri, update_index
from imagebind_core.io import filesystem
from imagebind_core.kinds import KINDS
from pipelines.config import (
    ConfigError,
    JobConfig,
    build_config,
    format_validation_error,
    read_config_file,
)
from pipelines.diff import carry_on_ray, diff_listing, diff_on_ray
from pipelines.formats import PlanError
from pipelines.lock import OutputLock, OutputLocked
from pipelines.plan import check_input
from pipelines.publish import (
    IndexRoot,
    PublishConflict,
    new_run_id,
    utc_now,
    version_name,
)
from pipelines.store import parquet_bytes

logger = logging.getLogger(__name__)

EMBEDDED_DIR = "embedded"  # this run's embeddings (embed_items output) inside data/
CARRIED_DIR = "carried"  # rows copied from the parent version inside data/
ERRORS_DIR = "_errors"
RECORD_FORMAT = 1
# The lineage fields whose change forces a full re-embed: everything that changes a vector
# (imagebind_core.runner.LINEAGE_KEYS, plus the seed of random weights).
LINEAGE_KEYS = ibc.LINEAGE_KEYS
# Rows per carried-forward Parquet file.
CARRIED_ROWS_PER_FILE = 1_000_000


class IndexSettings(BaseModel):
    """The `index:` section of a re-index config (the rest is an `imagebind-embed` config)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    root: str = Field(description="Index root URI: a local folder or s3://bucket/prefix.")
    keep_versions: int = Field(3, ge=1, description="Published versions retention keeps.")
    lock_ttl_s: float = Field(
        600.0, gt=0, description="Lease of the re-index lock; renewed every third of it."
    )
    retry_failed: bool = Field(
        False, description="Retry items that failed in the parent although unchanged."
    )
    full: bool = Field(False, description="Re-embed everything this run.")
    allow_empty: bool = Field(
        False,
        description="Publish an empty version when the input exists but holds no items "
        "(every item deleted). Off by default: an emptied folder or prefix is more often a "
        "mistake than a corpus, and publishing it would empty the index.",
    )
    flat_threshold: int = Field(
        20_000, ge=1, description="Modalities with fewer vectors get an exact flat index."
    )
    pq_threshold: int = Field(
        200_000,
        ge=1,
        description="Modalities with at least this many vectors get IVF-PQ (below: IVF-Flat).",
    )
    nlist: int | None = Field(None, ge=1, description="IVF lists (default ~4 sqrt(n)).")
    nprobe: int = Field(32, ge=1, description="IVF lists searched per query.")
    diff_on_ray_rows: int = Field(
        1_000_000,
        ge=0,
        description="Parents with at least this many rows (failures included) are diffed "
        "and carried forward on Ray Data, so the driver never holds their rows; smaller ones "
        "on the driver. 0: always on Ray Data.",
    )
    diff_partitions: int | None = Field(
        None,
        ge=1,
        description="Hash partitions of the Ray Data diff (default one per million rows, "
        "at least 2).",
    )
    pq_m: int = Field(64, ge=1, description="IVF-PQ code bytes per vector.")
    rerank: int = Field(
        10,
        ge=0,
        description="IVF-PQ: re-score rerank x top_k candidates with stored float vectors "
        "(0: off, no float vectors stored).",
    )
    shards: int = Field(1, ge=1, description="Index shards (by id hash).")
    retrain_growth: float = Field(
        4.0,
        gt=1,
        description="Rebuild (retrain) an IVF modality when its size leaves "
        "[trained / g, trained * g].",
    )

    def index_options(self) -> IndexOptions:
        """The `imagebind_core.index.IndexOptions` these settings describe."""
        return IndexOptions(
            flat_threshold=self.flat_threshold,
            pq_threshold=self.pq_threshold,
            nlist=self.nlist,
            nprobe=self.nprobe,
            pq_m=self.pq_m,
            rerank=self.rerank,
            shards=self.shards,
            retrain_growth=self.retrain_growth,
        )


@dataclass(frozen=True)
class ReindexConfig:
    """The embedding job's settings (`JobConfig`; its `output` is set per version) + `index`."""

    job: JobConfig
    index: IndexSettings


def load_reindex_config(
    path: str | None = None,
    overrides: dict[str, Any] | None = None,
    sources: Mapping[str, str] | None = None,
) -> ReindexConfig:
    """Read a YAML re-index config: `imagebind-embed` fields plus an `index:` section.

    `overrides` are dotted keys as for `pipelines.config.load_config`; keys under `index.` go
    to the index section; `sources` maps them to the flag that set them (for error messages).
    `output` may be omitted (each version's folder is the job's output). Raises ConfigError
    naming the bad field and where its value came from.
    """
    data = read_config_file(path) if path is not None else {}
    index = dict(data.pop("index", None) or {})
    job_over: dict[str, Any] = {}
    for k, v in (overrides or {}).items():
        if v is None:
            continue
        if k.startswith("index."):
            index[k[len("index.") :]] = v
        else:
            job_over[k] = v
    try:
        settings = IndexSettings.model_validate(index)
    except ValidationError as e:
        msg = format_validation_error(e, path, sources, prefix=("index",), model=IndexSettings)
        raise ConfigError(msg) from None
    data.setdefault("output", join_uri(settings.root, "versions", "_unused"))
    return ReindexConfig(build_config(data, job_over, path, sources), settings)


# ----------------------------------------------------------------------------- lineage


def lineage_key(job: JobConfig) -> dict[str, str]:
    """What must stay equal for rows to be carried forward (see LINEAGE_KEYS)."""
    from pipelines.embed import model_lineage

    return ibc.lineage_key(model_lineage(job, KINDS))


def lineage_changes(old: dict[str, str] | None, new: dict[str, str]) -> list[str]:
    """Human-readable differences (`field: old -> new`); empty if the lineage is unchanged."""
    if old is None:
        return []
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


# ----------------------------------------------------------------------------- version I/O


def _parquet_files(uri: str, storage_options: dict, *, errors: bool) -> list[str]:
    """The Parquet files `_read_parquet_tree` reads, as paths of `filesystem(uri)`."""
    fs, root = filesystem(uri, storage_options)
    try:
        fs.invalidate_cache(root)
        files = sorted(fs.find(root))
    except FileNotFoundError:
        return []
    picked = []
    for f in files:
        if not f.endswith(".parquet"):
            continue
        rel = f[len(root.rstrip("/")) + 1 :].split("/")
        hidden = [p for p in rel[:-1] if p.startswith(("_", "."))]
        if rel[-1].startswith(("_", ".")):
            continue
        if (errors and hidden == [ERRORS_DIR]) or (not errors and not hidden):
            picked.append(f)
    return picked


def _read_parquet_tree(uri: str, storage_options: dict, *, errors: bool) -> pa.Table | None:
    """All Parquet files under `uri`: data files (`errors=False`, `_`/`.` paths skipped) or the
    files inside `_errors/` folders (`errors=True`). None if there are none."""
    picked = _parquet_files(uri, storage_options, errors=errors)
    if not picked:
        return None
    fs, _ = filesystem(uri, storage_options)
    tables = []
    for f in picked:
        with fs.open(f, "rb") as fh:
            tables.append(pq.read_table(fh))
    return pa.concat_tables(tables, promote_options="default")


def _arrow_fs(uri: str, storage_options: dict) -> Any:
    """A pyarrow filesystem over the fsspec one of `uri` (for Ray Data reads and writes)."""
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    return PyFileSystem(FSSpecHandler(filesystem(uri, storage_options)[0]))


def _fs_path(uri: str, storage_options: dict) -> str:
    return filesystem(uri, storage_options)[1]


def _record_rows(record: dict | None) -> int:
    """Rows plus kept failures of a published version, from its record."""
    if not record:
        return 0
    c = record.get("counts", {})
    return int(c.get("total", 0)) + int(c.get("failed", 0)) + int(c.get("failed_kept", 0))


def _write_table(uri: str, table: pa.Table, storage_options: dict) -> None:
    fs, path = filesystem(uri, storage_options)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    fs.pipe_file(path, parquet_bytes(table))


def _write_chunks(folder: str, table: pa.Table, storage_options: dict) -> list[str]:
    names = []
    for k, start in enumerate(range(0, table.num_rows, CARRIED_ROWS_PER_FILE)):
        name = f"part-{k:05d}.parquet"
        _write_table(
            join_uri(folder, name), table.slice(start, CARRIED_ROWS_PER_FILE), storage_options
        )
        names.append(name)
    return names


# ----------------------------------------------------------------------------- the run


def _index_upserts(
    new_rows: pa.Table | None,
    carried: pa.Table,
    parent_rows: pa.Table | None,
    cols: list[str],
    schema: pa.Schema,
) -> pa.Table:
    """The rows the index must (re)insert: every embedded row, plus carried rows whose uri
    differs from the parent's (relocated: same content, new location)."""
    parts = [new_rows.select(cols)] if new_rows is not None and new_rows.num_rows else []
    if carried.num_rows and parent_rows is not None:
        at = pc.index_in(carried["id"], value_set=parent_rows["id"])
        old_uri = parent_rows["uri"].take(at)  # null where the id is not in the parent
        moved = pc.invert(pc.fill_null(pc.equal(carried["uri"], old_uri), False))
        parts.append(carried.filter(moved).select(cols))
    if not parts:
        return schema.empty_table()
    return pa.concat_tables([p.cast(schema) for p in parts])


def _index_deletes(parent_rows: pa.Table | None, rows: pa.Table) -> list[str]:
    """Ids in the parent version's rows that the new version no longer has."""
    if parent_rows is None or not parent_rows.num_rows:
        return []
    gone = pc.invert(pc.is_in(parent_rows["id"], value_set=rows["id"]))
    return parent_rows["id"].filter(gone).to_pylist()


def _index_change_on_ray(
    new_rows: pa.Table | None,
    carried: pa.Table | None,
    diff: Any,
    rows: pa.Table,
    cols: list[str],
) -> tuple[pa.Table, list[str]]:
    """`_index_upserts` and `_index_deletes` after a Ray Data diff: upserts are the embedded
    rows plus the carried rows the diff relocated (`diff.moved`); deletes are the parent ids
    the diff did not carry (`diff.drop_ids`) that the new version does not hold."""
    parts = [new_rows.select(cols)] if new_rows is not None and new_rows.num_rows else []
    if carried is not None and carried.num_rows and diff.moved is not None and diff.moved.num_rows:
        moved = pc.is_in(carried["id"], value_set=diff.moved["id"])
        parts.append(carried.filter(moved).select(cols))
    upserts = (
        pa.concat_tables([p.cast(rows.schema) for p in parts])
        if parts
        else rows.schema.empty_table()
    )
    if diff.drop_ids is None or not len(diff.drop_ids):
        return upserts, []
    gone = pc.invert(pc.is_in(diff.drop_ids, value_set=rows["id"]))
    return upserts, diff.drop_ids.filter(gone).to_pylist()


@dataclass
class ReindexResult:
    """What a run did: `status` is published, unchanged, locked or conflict."""

    status: str
    index_root: str
    version: int | None = None
    name: str | None = None
    parent_name: str | None = None
    counts: dict[str, int] = field(default_factory=dict)
    full_reason: str | None = None
    removed: list[str] = field(default_factory=list)
    seconds: float = 0.0
    message: str = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        return asdict(self)

    def format(self) -> str:
        """Human-readable summary for the CLI."""
        head = f"imagebind-reindex: {self.status} in {self.seconds:.1f} s ({self.index_root})"
        lines = [head]
        if self.message:
            lines.append(f"  {self.message}")
        if self.name:
            lines.append(f"  version {self.name} (parent {self.parent_name})")
        if self.full_reason:
            lines.append(f"  full re-embed: {self.full_reason}")
        if self.counts:
            lines.append("  " + ", ".join(f"{k} {v}" for k, v in self.counts.items()))
        if self.removed:
            lines.append(f"  retention removed {len(self.removed)} old version(s)")
        return "\n".join(lines)


def reindex(cfg: ReindexConfig) -> ReindexResult:
    """Run one incremental re-index of `cfg.job.input` into the index at `cfg.index.root`."""
    t0 = time.perf_counter()
    so = cfg.job.storage_options()
    root = cfg.index.root.rstrip("/")
    check_input(cfg.job.input, so)  # before the index root, its lock or any folder exists
    ir = IndexRoot(root, so)
    try:
        lock = OutputLock(root, so, ttl_s=cfg.index.lock_ttl_s).acquire()
    except OutputLocked as e:
        logger.warning("%s", e)
        return ReindexResult("locked", root, message=str(e), seconds=time.perf_counter() - t0)
    try:
        result = _run_locked(cfg, ir, lock)
    finally:
        lock.release()
    result.seconds = time.perf_counter() - t0
    return result


def _run_locked(cfg: ReindexConfig, ir: IndexRoot, lock: OutputLock) -> ReindexResult:
    from pipelines.embed import embed_items, model_lineage
    from pipelines.formats import EmptyInput
    from pipelines.plan import list_items
    from pipelines.rows import LISTING_SCHEMA

    so = ir.storage_options
    timings: dict[str, float] = {}
    t = time.perf_counter()
    pointer, etag = ir.latest()
    parent_rec = ir.read_record(pointer.name) if pointer else None
    key = lineage_key(cfg.job)
    changes = lineage_changes(parent_rec.get("lineage_key") if parent_rec else None, key)
    if pointer is None:
        full_reason = "first version"
    elif changes:
        full_reason = "model changed (" + "; ".join(changes) + ")"
    elif cfg.index.full:
        full_reason = "requested (index.full)"
    else:
        full_reason = None
    parent_rows = parent_errors = None
    parent_files: tuple[list[str], list[str]] = ([], [])
    parent_count = _record_rows(parent_rec)
    on_ray = pointer is not None and parent_count >= cfg.index.diff_on_ray_rows
    if pointer is not None:
        data_uri = join_uri(pointer.version_uri(ir.root), DATA_DIR)
        if on_ray:
            parent_files = (
                _parquet_files(data_uri, so, errors=False),
                _parquet_files(data_uri, so, errors=True),
            )
        else:
            parent_rows = _read_parquet_tree(data_uri, so, errors=False)
            parent_errors = _read_parquet_tree(data_uri, so, errors=True)
    timings["read_parent_s"] = time.perf_counter() - t

    t = time.perf_counter()
    try:
        listing = list_items(cfg.job)
    except EmptyInput as e:
        if pointer is None or not cfg.index.allow_empty:
            hint = (
                "; pass --allow-empty (index.allow_empty) to publish an empty version"
                if pointer is not None
                else ""
            )
            raise EmptyInput(f"{e}{hint}") from None
        listing = LISTING_SCHEMA.empty_table()
    if on_ray:
        diff = diff_on_ray(
            listing,
            *parent_files,
            _arrow_fs(ir.root, so),
            full=full_reason is not None,
            retry_failed=cfg.index.retry_failed,
            parent_count=parent_count,
            num_partitions=cfg.index.diff_partitions,
        )
    else:
        diff = diff_listing(
            listing,
            parent_rows,
            parent_errors,
            full=full_reason is not None,
            retry_failed=cfg.index.retry_failed,
        )
    timings["list_and_diff_s"] = time.perf_counter() - t
    logger.info(
        "%s: %d listed; %d new, %d changed, %d retried, %d re-embedded, %d deleted, "
        "%d carried (%d relocated), %d failures kept%s%s",
        cfg.job.input,
        listing.num_rows,
        diff.added,
        diff.changed,
        diff.retried,
        diff.reembedded,
        diff.deleted,
        diff.carried_rows,
        diff.relocated,
        diff.failed_kept,
        f"; full re-embed: {full_reason}" if full_reason else "",
        " (diff on Ray Data)" if on_ray else "",
    )
    if pointer is not None and full_reason is None and diff.empty:
        return ReindexResult(
            "unchanged",
            ir.root,
            pointer.version,
            pointer.name,
            message="the corpus matches the published version; nothing published",
        )

    version = (pointer.version if pointer else 0) + 1
    name = version_name(version, new_run_id())
    vuri = ir.version_uri(name)
    data_uri = join_uri(vuri, DATA_DIR)
    logger.info("staging version %s", name)
    t = time.perf_counter()
    if diff.to_embed.num_rows:
        embed_items(cfg.job, diff.to_embed, output=join_uri(data_uri, EMBEDDED_DIR))
    timings["embed_s"] = time.perf_counter() - t
    if lock.lost.is_set():
        raise OutputLocked(f"lost the re-index lock on {ir.root} while embedding; not publishing")

    t = time.perf_counter()
    embedded_uri = join_uri(data_uri, EMBEDDED_DIR)
    new_rows = _read_parquet_tree(embedded_uri, so, errors=False)
    new_errors = _read_parquet_tree(embedded_uri, so, errors=True)
    failed = new_errors.num_rows if new_errors is not None else 0
    carried_uri = join_uri(data_uri, CARRIED_DIR)
    if on_ray:
        # Workers copy the surviving parent rows; the driver reads them back for the index.
        fs = _arrow_fs(ir.root, so)
        for files, out, n in (
            (parent_files[0], carried_uri, diff.carried_rows),
            (parent_files[1], join_uri(carried_uri, ERRORS_DIR), diff.failed_kept),
        ):
            if n:
                carry_on_ray(files, fs, _fs_path(out, so), diff.drop_ids, diff.moved)
        carried = _read_parquet_tree(carried_uri, so, errors=False)
    else:
        carried = diff.carried
        if diff.carried.num_rows:
            _write_chunks(carried_uri, diff.carried, so)
        if diff.carried_errors.num_rows:
            _write_chunks(join_uri(carried_uri, ERRORS_DIR), diff.carried_errors, so)
    parts = [t_ for t_ in (new_rows, carried) if t_ is not None and t_.num_rows]
    cols = ["id", "uri", "modality", "embedding"]
    rows = (
        pa.concat_tables([p.select(cols) for p in parts], promote_options="default")
        if parts
        else None
    )
    dim = int(key["embed_dim"])
    if rows is None:
        rows = pa.table(
            {
                "id": pa.array([], pa.string()),
                "uri": pa.array([], pa.string()),
                "modality": pa.array([], pa.string()),
                "embedding": pa.array([], pa.list_(pa.float32(), dim)),
            }
        )
    # The index: the parent's with this run's change applied (new and re-embedded rows,
    # relocated rows' new uri, deleted ids), or a build from every row (imagebind_core.index).
    if on_ray:  # the parent's rows never reached the driver: the diff's ids say what moved
        upserts, deletes = _index_change_on_ray(new_rows, carried, diff, rows, cols)
    else:
        upserts = _index_upserts(new_rows, diff.carried, parent_rows, cols, rows.schema)
        deletes = _index_deletes(parent_rows, rows)
    index = update_index(
        join_uri(vuri, INDEX_DIR),
        parent_uri=(
            join_uri(pointer.version_uri(ir.root), INDEX_DIR)
            if pointer is not None and full_reason is None
            else None
        ),
        upserts=upserts,
        deletes=deletes,
        all_rows=lambda: rows,
        options=cfg.index.index_options(),
        storage_options=so,
    )
    timings["carry_and_index_s"] = time.perf_counter() - t

    # Counts of rows embedded successfully, by why they were embedded.
    new_ids = set(new_rows.column("id").to_pylist()) if new_rows is not None else set()
    ok = Counter(
        c
        for i, c in zip(diff.to_embed.column("id").to_pylist(), diff.classes, strict=True)
        if i in new_ids
    )
    counts = {
        "added": ok["added"],
        "changed": ok["changed"],
        "deleted": diff.deleted,
        "carried": diff.carried_rows,
        "relocated": diff.relocated,
        "failed": failed,
        "failed_kept": diff.failed_kept,
        "reembedded": ok["reembedded"],
        "retried": ok["retried"],
        "total": rows.num_rows,
    }
    record = {
        "format": RECORD_FORMAT,
        "version": version,
        "name": name,
        "parent": pointer.version if pointer else None,
        "parent_name": pointer.name if pointer else None,
        "created_at": utc_now(),
        "input": cfg.job.input,
        "counts": counts,
        "full_reembed": full_reason is not None,
        "full_reason": full_reason,
        "lineage": model_lineage(cfg.job, sorted(set(rows.column("modality").to_pylist()))),
        "lineage_key": key,
        "embed_dim": dim,
        "index": {**index.record(), "nprobe": cfg.index.nprobe},
        "diff": "ray" if on_ray else "driver",
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
    }
    ir.write_record(name, record)
    if lock.lost.is_set():
        ir.discard(name)
        raise OutputLocked(f"lost the re-index lock on {ir.root}; not publishing {name}")
    try:
        ir.publish(Pointer(version, name, utc_now()), etag)
    except PublishConflict as e:
        logger.error("%s", e)
        ir.discard(name)
        return ReindexResult("conflict", ir.root, version, name, message=str(e))
    removed = ir.apply_retention(cfg.index.keep_versions)
    return ReindexResult(
        "published",
        ir.root,
        version,
        name,
        pointer.name if pointer else None,
        counts,
        full_reason,
        removed,
    )


# ----------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    """The `imagebind-reindex` command line."""
    p = argparse.ArgumentParser(
        prog="imagebind-reindex",
        description="Incrementally re-index a corpus into a versioned, atomically published "
        "embedding index (embed new and changed items, carry the rest, drop deleted ones).",
    )
    p.add_argument("--config", help="YAML: imagebind-embed fields plus an `index:` section")
    p.add_argument("--input", help="corpus URI (as for imagebind-embed)")
    p.add_argument("--index-root", help="index root URI (local folder or s3://bucket/prefix)")
    from pipelines.embed import add_job_arguments

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


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point. Exit status: 0 published or unchanged, 2 bad config or input,
    3 another run holds the lock or published first (nothing published), 130 interrupted
    (Ctrl-C; nothing published), 1 anything else."""
    from pipelines.console import filtered_stderr

    with filtered_stderr():
        return _main(argv)


def _interrupted(cfg: ReindexConfig | None, argv: Sequence[str] | None) -> int:
    """Ctrl-C: stop Ray, say that nothing was published and how to run again; status 130."""
    from pipelines.console import ignore_further_interrupts, resume_command, shutdown_ray

    ignore_further_interrupts()
    shutdown_ray()
    lines = ["imagebind-reindex: interrupted; nothing was published."]
    if cfg is not None:
        with contextlib.suppress(Exception):
            pointer, _ = IndexRoot(cfg.index.root, cfg.job.storage_options()).latest()
            where = f"version {pointer.name}" if pointer else "no version yet"
            lines.append(f"  {cfg.index.root}: LATEST still points at {where}")
    lines.append("  run again with the same command (the embedding of changed items restarts):")
    lines.append(f"    {resume_command('imagebind-reindex', argv)}")
    print("\n".join(lines), file=sys.stderr)
    return 130


def _main(argv: Sequence[str] | None) -> int:
    from pipelines.embed import job_overrides

    args = build_parser().parse_args(argv)
    cfg = None
    try:
        extra: dict[str, tuple[str, Any]] = {
            "index.root": ("--index-root", args.index_root),
            "index.keep_versions": ("--keep-versions", args.keep_versions),
            "index.lock_ttl_s": ("--lock-ttl-s", args.lock_ttl_s),
        }
        if args.full:
            extra["index.full"] = ("--full", True)
        if args.retry_failed:
            extra["index.retry_failed"] = ("--retry-failed", True)
        if args.allow_empty:
            extra["index.allow_empty"] = ("--allow-empty", True)
        overrides, sources = job_overrides(args, extra)
        cfg = load_reindex_config(args.config, overrides, sources)
        result = reindex(cfg)
    except KeyboardInterrupt:
        return _interrupted(cfg, argv)
    except (ConfigError, PlanError) as e:
        print(f"imagebind-reindex: {e}", file=sys.stderr)
        return 2
    except OutputLocked as e:
        print(f"imagebind-reindex: {e}", file=sys.stderr)
        return 3
    print(json.dumps(result.to_dict(), indent=2) if args.json else result.format())
    return 3 if result.status in ("locked", "conflict") else 0


if __name__ == "__main__":
    sys.exit(main())
