"""`imagebind-reindex`: keep a published embedding index in step with a living corpus.

One run:

1. takes the re-index lease on the index root (`pipelines.lock.OutputLock` on `<root>/_lock`);
   a second run finds it held and exits without doing anything;
2. reads the published pointer (`<root>/LATEST`) and the parent version's rows (the Lance
   versions its record pins, `pipelines.tables`; Parquet for versions published before);
3. lists the corpus without reading payloads (`pipelines.plan.list_items`, the same inputs as
   `imagebind-embed`; in Ray tasks for a parent of `index.diff_on_ray_rows` rows or more,
   `list_items_on_ray`; only the new shards when the parent's shards are the same files as when
   it listed them, `inputs.json`) and diffs it against the parent by (`id`, `fingerprint`; shard
   by shard against the parent's key snapshot when it has one, `pipelines.keys`, so only what
   differs is joined): new and changed items are embedded, unchanged rows are carried forward as
   they are (same bytes, no recomputation), deleted items are left out. A different model
   lineage (preset, checkpoint sha256, dtype, embedding size, normalisation, preprocessing
   version, options and limits; the seed for random weights) re-embeds everything. Items that
   failed in the parent with the same fingerprint are not retried unless `index.retry_failed` is
   set (a bad file must not make every run publish a new version);
4. if nothing changed, publishes nothing; otherwise stages a complete version
   (`pipelines.publish.StagedVersion`) under `<root>/versions/<n>-<run>/` — `data/embedded/`
   (this run's embeddings, written by `pipelines.embed.embed_items` with its exactly-once
   protocol), the version's rows as new Lance versions of `<root>/rows.lance` and
   `<root>/failures.lance` (the parent's pinned version, minus the ids not carried, plus this
   run's rows: carried rows are not rewritten), `index/` (the FAISS index,
   `imagebind_core.index`), `version.json` (the record, pinning the Lance versions) — and
   publishes it with one compare-and-swap of `LATEST` (`pipelines.publish`);
5. applies retention (the last `index.keep_versions` versions stay; Lance frees what only
   removed versions used);
6. with `index.milvus`, brings that Milvus collection to the version published or found
   current (`pipelines.milvus_sink`; a failure is reported, the version stands).

`_run_locked` reads as these steps, one function each.

Library use: `reindex(pipelines.config.load_reindex_config("reindex.yaml"))`; the command
line is `pipelines.cli.reindex_main`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from imagebind_core.index import (
    BUILD_BATCH_ROWS,
    DATA_DIR,
    INDEX_DIR,
    VERSIONS_DIR,
    IndexUpdate,
    Pointer,
    join_uri,
    update_index,
)
from imagebind_core.io import filesystem, protocol_of
from imagebind_core.kinds import KINDS
from pipelines.config import ReindexConfig
from pipelines.diff import KEY_COLUMNS, diff_listing, diff_on_ray, relocate
from pipelines.formats import PlanError
from pipelines.lineage import lineage_changes, lineage_key, model_lineage
from pipelines.lock import OutputLock, OutputLocked
from pipelines.plan import check_folder, check_input, shard_identities, store_errors
from pipelines.publish import (
    INPUTS_NAME,
    RECORD_FORMAT,
    IndexRoot,
    PublishConflict,
    StagedVersion,
    arrow_fs,
    data_pins,
    data_record,
    iter_parquet,
    parquet_files,
    read_parquet_tree,
    record_rows,
    utc_now,
)
from pipelines.store import OutputDamaged, transient_store_error
from pipelines.tables import Pin, count_pin, read_pin, scan_pin

logger = logging.getLogger(__name__)

# The columns of a version's rows that its index holds; the Milvus sink's.
INDEX_COLUMNS = ["id", "uri", "modality", "embedding"]
SINK_COLUMNS = [*INDEX_COLUMNS, "fingerprint"]

# ----------------------------------------------------------------------------- the index change


def _index_change(appended: pa.Table, drop_ids: pa.Array, dim: int) -> tuple[pa.Table, list[str]]:
    """What the index must apply: upsert every row this run appended (embedded, relocated),
    delete the parent ids the version no longer holds."""
    upserts = _index_columns(appended) if appended.num_rows else _empty_rows(dim)
    gone = pc.invert(pc.is_in(drop_ids, value_set=upserts["id"]))
    return upserts, drop_ids.filter(gone).to_pylist()


def _index_columns(table: pa.Table) -> pa.Table:
    """The index's columns of `table` (without `embedding` when it was read without vectors)."""
    return table.select([c for c in INDEX_COLUMNS if c in table.column_names])


# ----------------------------------------------------------------------------- the run


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
    milvus: dict[str, Any] | None = None  # the Milvus sink's MilvusSyncResult; None: no sink

    @property
    def exit_status(self) -> int:
        """The command line's exit status: 3 when another run held the lock or published
        first (nothing published), 4 when the Milvus sink failed (the version stands), else 0."""
        if self.status in ("locked", "conflict"):
            return 3
        return 4 if self.milvus is not None and self.milvus["status"] == "failed" else 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        return asdict(self)

    def format(self) -> str:
        """Human-readable summary for the CLI."""
        head = f"imagebind-reindex: {self.status} in {self.seconds:.1f} s ({self.index_root})"
        lines = [head]
        if self.message:
            lines.append(f"  {self.message}")
        if self.name and self.status == "unchanged":
            lines.append(f"  version {self.name} stays the published one")
        elif self.name:
            parent = f"parent {self.parent_name}" if self.parent_name else "the first version"
            lines.append(f"  version {self.name} ({parent})")
        if self.full_reason:
            lines.append(f"  full re-embed: {self.full_reason}")
        if self.counts:
            lines.append("  " + ", ".join(f"{k} {v}" for k, v in self.counts.items()))
        if self.removed:
            lines.append(f"  retention removed {len(self.removed)} old version(s)")
        if self.milvus is not None:
            m = self.milvus
            lines.append(
                f"  milvus {m['uri']} {m['collection']}: {m['status']}"
                + (f" ({m['message']})" if m["message"] else "")
                + f", {m['upserted']} upserted, {m['deleted']} deleted"
            )
        return "\n".join(lines)


def reindex(cfg: ReindexConfig) -> ReindexResult:
    """Run one incremental re-index of `cfg.job.input` into the index at `cfg.index.root`."""
    t0 = time.perf_counter()
    storage_options = cfg.job.storage_options()
    root = cfg.index.root.rstrip("/")
    # Before the index root, its lock or any folder exists.
    if not cfg.index.allow_empty:  # an emptied S3 prefix does not exist: the listing says so
        try:
            check_input(cfg.job.input, storage_options)
        except PlanError as e:
            if protocol_of(cfg.job.input) == "file":
                raise
            raise PlanError(
                f"{e} (a prefix whose objects were all deleted is not found either: pass "
                "--allow-empty (index.allow_empty) to publish an empty version)"
            ) from None
    check_folder(root, "index root", storage_options)
    ir = IndexRoot(root, storage_options)
    try:
        with store_errors(root, "index root", storage_options):
            lock = OutputLock(
                root, storage_options, ttl_s=cfg.index.lock_ttl_s, what="index root"
            ).acquire()
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
    """The run under the lock: diff the corpus against the parent, stage, publish."""
    timings: dict[str, float] = {}
    with _timed(timings, "read_parent_s"):
        key = lineage_key(cfg.job)
        with _damage_named(ir):
            parent = _read_parent(cfg, ir, key)
    # Staged before the diff: the listing writes the version's key snapshot into its folder.
    stage = ir.stage(parent.version + 1)
    with _timed(timings, "list_and_diff_s"):
        try:
            listed, diff = _list_and_diff(cfg, ir, parent, stage)
        except BaseException:
            with contextlib.suppress(Exception):  # the error at hand is the one to report
                stage.discard()
            raise
    _log_diff(cfg, diff, parent, listed)
    dim = int(key["embed_dim"])
    if parent.pointer is not None and parent.full_reason is None and diff.empty:
        stage.discard()
        result = ReindexResult(
            "unchanged",
            ir.root,
            parent.pointer.version,
            parent.pointer.name,
            message="the corpus matches the published version; nothing published",
        )
        rows = lambda: _published_rows(ir, parent, dim)  # noqa: E731
        return _sync_milvus(cfg, result, parent.name, rows, dim)
    logger.info("staging version %s", stage.name)
    with _timed(timings, "embed_s"):
        _embed_changes(cfg, stage, diff)
    if lock.lost.is_set():
        raise OutputLocked(f"lost the re-index lock on {ir.root} while embedding; not publishing")
    with _timed(timings, "commit_rows_s"):
        # A version without a parent index (the first, a full re-embed) builds its index from
        # the Lance version, streamed: the vectors this run embedded are not read here.
        building = parent.index_uri(ir.root) is None
        new_rows, new_errors = stage.read_embedded(vectors=not building)
        data = _commit_rows(stage, diff, parent, new_rows, compact=cfg.index.compact_rows)
    with _timed(timings, "index_s"):
        index = _write_index(cfg, stage, parent, data, dim)
    counts = _counts(diff, new_rows, new_errors, count_pin(data.rows, ir.storage_options))
    if listed.inputs is not None:  # before the record: a folder without it is unfinished
        inputs = dict(listed.inputs)
        if listed.keys is not None:  # the snapshot holds each item the version holds
            held = counts["total"] + count_pin(data.failures, ir.storage_options)
            inputs["keys"] = {**listed.keys, "rows": held}
        _write_inputs(stage, inputs)
    record = _version_record(cfg, stage, parent, key, counts, data, index, timings)
    stage.write_record({**record, "diff": _diff_kind(listed)})
    result = _publish(cfg, ir, stage, parent, counts, lock)
    upserts, deletes = _index_change(data.appended, data.drop_ids, dim)
    sink_rows = lambda: _pinned_rows(data.rows, ir.storage_options, dim)  # noqa: E731
    return _sync_milvus(cfg, result, parent.name, sink_rows, dim, (upserts["id"], deletes))


@contextlib.contextmanager
def _timed(timings: dict[str, float], name: str) -> Iterator[None]:
    """Add the seconds the block takes to `timings[name]` (the record's `timings_s`)."""
    t = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = time.perf_counter() - t


@dataclass
class _Parent:
    """The published version a run starts from (no pointer before the first version): the
    Lance versions its record pins (`pins`; None for a version published as Parquet, whose
    `files` are listed instead), whether a diff against it runs on Ray Data (`on_ray`), and
    the identities of its corpus's shards when they were listed (`inputs`)."""

    pointer: Pointer | None
    etag: str | None
    record: dict | None
    full_reason: str | None  # why this run re-embeds everything; None: it does not
    on_ray: bool = False
    pins: tuple[Pin | None, Pin | None] | None = None  # (rows, failures)
    files: tuple[list[str], list[str]] = ([], [])  # (data files, _errors files) of Parquet
    data_uri: str = ""  # the Parquet version's data/ folder
    inputs: dict | None = None  # its `inputs.json`: its shards' identities when listed

    @property
    def version(self) -> int:
        return self.pointer.version if self.pointer else 0

    @property
    def name(self) -> str | None:
        return self.pointer.name if self.pointer else None

    def index_uri(self, root: str) -> str | None:
        """The parent's index, which this run's index updates; None when it is built anew."""
        if self.pointer is None or self.full_reason is not None:
            return None
        return join_uri(self.pointer.version_uri(root), INDEX_DIR)


def _full_reason(
    cfg: ReindexConfig, pointer: Pointer | None, record: dict | None, key: dict
) -> str | None:
    """Why this run re-embeds everything (first version, another model, `index.full`)."""
    changes = lineage_changes(record.get("lineage_key") if record else None, key)
    if pointer is None:
        return "first version"
    if changes:
        return "model changed (" + "; ".join(changes) + ")"
    if cfg.index.full:
        return "requested (index.full)"
    return None


@contextlib.contextmanager
def _damage_named(ir: IndexRoot) -> Iterator[None]:
    """The published version unreadable for a reason other than its store's (LATEST, a version
    record or a table file emptied, cut short or deleted outside a run): OutputDamaged naming
    what could not be read, instead of the reader's traceback on every run."""
    try:
        yield
    except (ValueError, FileNotFoundError) as e:
        if transient_store_error(e):
            raise
        raise OutputDamaged(
            f"index root {ir.root}: the published version cannot be read "
            f"({type(e).__name__}: {str(e)[:400]}). It was changed outside a run: restore "
            "what the message names (from a backup, or the store's object versions), or "
            "re-index into a new index root."
        ) from None


def _read_parent(cfg: ReindexConfig, ir: IndexRoot, key: dict[str, str]) -> _Parent:
    """The published pointer and its version: rows and failures on the driver, or only the
    list of their files when the parent holds at least `index.diff_on_ray_rows` rows."""
    pointer, etag = ir.latest()
    record = ir.read_record(pointer.name) if pointer else None
    parent = _Parent(pointer, etag, record, _full_reason(cfg, pointer, record, key))
    if pointer is None:
        return parent
    storage_options = ir.storage_options
    parent.on_ray = record_rows(record) >= cfg.index.diff_on_ray_rows
    parent.pins = data_pins(record, ir.root)
    if parent.pins is None:  # published before the Lance layout: Parquet files, read once
        parent.data_uri = join_uri(pointer.version_uri(ir.root), DATA_DIR)
        parent.files = (
            parquet_files(parent.data_uri, storage_options, errors=False),
            parquet_files(parent.data_uri, storage_options, errors=True),
        )
    parent.inputs = _read_inputs(ir, pointer)
    return parent


def _parent_tables(parent: _Parent, ir: IndexRoot) -> tuple[pa.Table | None, pa.Table | None]:
    """The parent's rows and failures on the driver, for a diff there: the diff's columns of
    a Lance version (the embeddings stay in Lance), every column of a Parquet one."""
    so = ir.storage_options
    if parent.pins is None:
        return (
            read_parquet_tree(parent.data_uri, so, errors=False),
            read_parquet_tree(parent.data_uri, so, errors=True),
        )
    return read_pin(parent.pins[0], so, columns=list(KEY_COLUMNS)), read_pin(parent.pins[1], so)


# ----------------------------------------------------------------------------- listing


def _read_inputs(ir: IndexRoot, pointer: Pointer) -> dict | None:
    """The parent's `inputs.json` (None when it has none: published before it was written, or
    of a corpus of files, or unreadable — then the run lists everything, as before)."""
    try:
        doc = ir.read_inputs(pointer.name)
    except ValueError as e:
        logger.warning(
            "%s is not readable (%s): the corpus is listed whole",
            join_uri(pointer.version_uri(ir.root), INPUTS_NAME),
            e,
        )
        return None
    return doc if isinstance(doc, dict) and isinstance(doc.get("shards"), dict) else None


def _listing_key(cfg: ReindexConfig, fmt: str) -> str:
    """What, besides its shards' files, decides a corpus's listing: its input, format and the
    WebDataset member rules. A parent listed under another key is listed again whole."""
    doc = {"input": cfg.job.input, "format": fmt, "webdataset": cfg.job.webdataset.model_dump()}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class _Listed:
    """The corpus as this run lists it: `listing` (a table on the driver, or a Ray dataset
    when `on_ray`), the `inputs.json` record the new version keeps (None: a corpus of files),
    and `appended`: only the shards new since the parent were listed, the parent's shards
    being the same files as when it listed them (carried by identity, not read). `keys` and
    `diff`: see below."""

    listing: Any
    inputs: dict | None
    on_ray: bool
    appended: bool = False
    # The new version's key snapshot (`pipelines.keys`; its `rows` added once counted), and
    # the diff when the snapshot path made it with the listing.
    keys: dict | None = None
    diff: Any = None


def _inputs_record(cfg: ReindexConfig, fmt: str, shards: dict[str, str | None]) -> dict | None:
    if fmt not in ("manifest", "webdataset"):
        return None
    return {
        "listing_key": _listing_key(cfg, fmt),
        "format": fmt,
        "shards": dict(sorted(shards.items())),
    }


def _identities(plan: Any) -> dict[str, str | None]:
    """{shard: identity} of a plan's shards; None for a shard a run must list again even when
    its file is unchanged (a manifest whose rows ask the store for fingerprints)."""
    return {s.name: (s.identity if s.lists_alone else None) for s in plan.shards}


def _listed_alike(cfg: ReindexConfig, parent: _Parent, fmt: Any) -> dict | None:
    """The parent's `inputs.json` when this run may reuse what the parent's listing recorded:
    the same input, format and member rules, a Lance parent, and neither a full re-embed nor
    `index.retry_failed` (which reach into every shard); None otherwise."""
    rec = parent.inputs
    if (
        rec is None
        or parent.full_reason is not None
        or cfg.index.retry_failed
        or parent.pins is None
        or rec.get("format") != fmt.name
        or rec.get("listing_key") != _listing_key(cfg, fmt.name)
    ):
        return None
    return rec


def _new_sources(cfg: ReindexConfig, parent: _Parent, fmt: Any, sources: list) -> list | None:
    """The sources of shards the parent does not have, when the corpus only gained shards
    since the parent listed it (each of the parent's shards is still there, its file's
    identity unchanged and its listing known to follow from it alone); None otherwise (the
    corpus is listed whole), and whenever `_listed_alike` says no."""
    rec = _listed_alike(cfg, parent, fmt)
    if rec is None:
        return None
    now = shard_identities(fmt, sources)
    old = rec["shards"]
    if any(ident is None or now.get(name) != ident for name, ident in old.items()):
        return None
    names = list(now)
    return [src for src, name in zip(sources, names, strict=True) if name not in old]


def _snapshot(parent: _Parent, cfg: ReindexConfig, fmt: Any) -> dict | None:
    """The parent's key snapshot when this run can diff against it shard by shard
    (`_listed_alike`, and the same digest scheme); None otherwise."""
    from pipelines.keys import usable

    rec = _listed_alike(cfg, parent, fmt)
    return rec["keys"] if rec is not None and usable(rec.get("keys")) else None


def _list_corpus(
    cfg: ReindexConfig,
    ir: IndexRoot,
    parent: _Parent,
    stage: StagedVersion,
    *,
    whole: bool = False,
) -> _Listed:
    """The corpus listing (no payloads read): a table on the driver, or, when the diff runs
    on Ray Data, a Ray dataset listed by Ray tasks (`pipelines.plan.list_items_on_ray`). When
    the corpus only gained shards since the parent (`_new_sources`), only those are planned
    and listed, unless `whole`. A parent diffed on Ray with a key snapshot is diffed shard by
    shard as its shards are listed (`pipelines.keys.diff_shards`: `diff` is set); Ray
    listings write the new version's snapshot into `stage`'s folder (`keys`). An input
    without items is an error unless a version exists and `index.allow_empty` is set (then
    every item is deleted)."""
    from pipelines import keys as ks
    from pipelines.embed import ensure_ray
    from pipelines.formats import EmptyInput
    from pipelines.plan import input_sources, list_items, list_items_on_ray
    from pipelines.rows import LISTING_SCHEMA

    def start_ray(kinds: Any) -> None:
        # Ray as the embedding job starts it for the corpus's kinds (`ray.address`, logical
        # CPUs), not Ray Data's default.
        ensure_ray(cfg.job, kinds)

    so = ir.storage_options
    folder = f"{VERSIONS_DIR}/{stage.name}/{ks.KEYS_DIR}"
    try:
        fmt, sources = input_sources(cfg.job)
        snap = _snapshot(parent, cfg, fmt)
        new = None if whole else _new_sources(cfg, parent, fmt, sources)
        if new is not None:
            assert parent.inputs is not None
            shards = dict(parent.inputs["shards"])
            if not new:
                return _Listed(LISTING_SCHEMA.empty_table(), None, False, appended=True)
            plan = fmt.plan(cfg.job, new, None, 8)
            shards.update(_identities(plan))
            inputs = _inputs_record(cfg, fmt.name, shards)
            # The parent's snapshot with bases for the new shards (none: the parent has none).
            keys = None
            if snap is not None:
                since = len(snap["deltas"])
                bases = {
                    **snap["bases"],
                    **{s.name: {"file": f"{folder}/{ks.base_name(s.name)}", "since": since}
                       for s in plan.shards},
                }  # fmt: skip
                keys = ks.new_record(bases, snap["deltas"], 0, int(snap.get("delta_rows", 0)))
                keys["repeats"] = bool(snap.get("repeats") or plan.duplicates)
                keys["kinds"] = sorted(set(snap.get("kinds") or ()) | set(plan.kinds))
            # On Ray from `diff_on_ray_rows` new items; tars are not counted before they
            # are listed: there, as the parent is diffed.
            items = sum(plan.counts.values()) if plan.counts is not None else None
            big = parent.on_ray if items is None else items >= cfg.index.diff_on_ray_rows
            if not big:
                listing = list_items(cfg.job, plan=plan)
                if keys is not None:
                    _write_bases(listing, plan, ir, folder)
                return _Listed(listing, inputs, False, appended=True, keys=keys)
            out = (ir.root, folder, so) if keys is not None else None
            listing = list_items_on_ray(cfg.job, start_ray=start_ray, plan=plan, bases=out)
            return _Listed(listing, inputs, True, appended=True, keys=keys)
        if parent.on_ray and snap is not None:
            got = _diff_by_shard(cfg, ir, parent, snap, fmt, sources, folder, start_ray)
            if got is not None:
                return got
        plan = fmt.plan(cfg.job, sources, None, 8)
        inputs = _inputs_record(cfg, fmt.name, _identities(plan))
        every = {s.name: {"file": f"{folder}/{ks.base_name(s.name)}", "since": 0}
                 for s in plan.shards}  # fmt: skip
        # A snapshot for the next run: every shard's base, written as it is listed.
        keys = ks.new_record(every, [], 0, 0) if inputs is not None else None
        if keys is not None:  # whether the next run must plan the manifests to find repeats
            keys["repeats"] = bool(plan.duplicates)
            keys["kinds"] = sorted(plan.kinds)
        if not parent.on_ray:
            listing = list_items(cfg.job, plan=plan)
            if keys is not None:
                _write_bases(listing, plan, ir, folder)
            return _Listed(listing, inputs, False, keys=keys)
        out = (ir.root, folder, so) if keys is not None else None
        listing = list_items_on_ray(cfg.job, start_ray=start_ray, plan=plan, bases=out)
        return _Listed(listing, inputs, True, keys=keys)
    except EmptyInput as e:
        if parent.pointer is None or not cfg.index.allow_empty:
            hint = (
                "; pass --allow-empty (index.allow_empty) to publish an empty version"
                if parent.pointer is not None
                else ""
            )
            raise EmptyInput(f"{e}{hint}") from None
        return _Listed(LISTING_SCHEMA.empty_table(), None, False)


def _diff_by_shard(
    cfg: ReindexConfig,
    ir: IndexRoot,
    parent: _Parent,
    snap: dict,
    fmt: Any,
    sources: list,
    folder: str,
    start_ray: Callable[[Any], None],
) -> _Listed | None:
    """The corpus listed and diffed shard by shard against the parent's key snapshot
    (`pipelines.keys.diff_shards`); None when the snapshot cannot be used (said in a warning:
    the caller lists and diffs the whole corpus). A manifest corpus whose last plan found no
    repeated ids is not planned on the driver first (`manifest_specs`): its tasks find
    repeats, which send the run to the whole plan."""
    import ray

    from pipelines import keys as ks
    from pipelines.plan import manifest_specs

    assert parent.pins is not None
    unplanned = fmt.name == "manifest" and snap.get("repeats") is False
    if unplanned:
        plan = manifest_specs(cfg.job, sources)
        # Ray for the kinds the corpus had (the plan, not reading the manifests, allows all:
        # a local Ray started for all would have more logical CPUs, workers and tasks than
        # the run needs); restarted below if the change brings another.
        plan.kinds = tuple(snap.get("kinds") or plan.kinds)
    else:
        plan = fmt.plan(cfg.job, sources, None, 8)
    started_here = not ray.is_initialized()
    so = ir.storage_options
    with _damage_named(ir):
        counts = (count_pin(parent.pins[0], so), count_pin(parent.pins[1], so))
    try:
        # Not under `_damage_named`: the corpus's errors (a bad manifest's PlanError) are
        # reported as they are.
        got = ks.diff_shards(
            cfg.job,
            plan,
            snap,
            ir.root,
            so,
            parent.pins,
            counts,
            folder,
            start_ray,
            repeats_found=plan.duplicates,
            unplanned=unplanned,
        )
    except ks.SnapshotMismatch as e:
        logger.warning(
            "the published version's key snapshot cannot be used (%s): listing and diffing the "
            "whole corpus",
            e,
        )
        return None
    logger.info(
        "diffed by shard: %d items matched the parent's key snapshot where they were listed; "
        "%d listing rows and parent ids came back to the driver",
        got.matched,
        got.returned,
    )
    kinds = set(plan.kinds)
    if unplanned:
        kinds |= set(pc.unique(got.diff.to_embed.column("modality")).to_pylist()) & set(KINDS)
        if started_here and not kinds <= set(plan.kinds):
            ray.shutdown()  # nothing runs on it now: the diff is on the driver
            start_ray(sorted(kinds))
    got.record["kinds"] = sorted(kinds)
    identities = got.identities if unplanned else _identities(plan)
    inputs = _inputs_record(cfg, fmt.name, identities)
    return _Listed(None, inputs, True, keys=got.record, diff=got.diff)


def _write_bases(listing: pa.Table, plan: Any, ir: IndexRoot, folder: str) -> None:
    """Write the snapshot bases of `plan`'s shards from a listing on the driver (one sort by
    shard, then a slice a shard)."""
    from pipelines.keys import base_name, write_base

    ordered = listing.sort_by("shard")
    names = ordered.column("shard").to_numpy(zero_copy_only=False)
    for s in plan.shards:
        lo, hi = (int(np.searchsorted(names, s.name, side)) for side in ("left", "right"))
        rows = ordered.slice(lo, hi - lo)
        write_base(rows, join_uri(ir.root, folder, base_name(s.name)), ir.storage_options)


def _list_and_diff(
    cfg: ReindexConfig, ir: IndexRoot, parent: _Parent, stage: StagedVersion
) -> tuple[_Listed, Any]:
    """List the corpus (its new shards only, when that is all that changed) and diff it
    against the parent. New manifests that repeat an id the parent has are listed again with
    the whole corpus (`_parent_holds`)."""
    listed = _list_corpus(cfg, ir, parent, stage)
    diff = _diff(cfg, ir, listed, parent)
    if listed.appended and listed.inputs and listed.inputs["format"] == "manifest":
        with _damage_named(ir):
            held = _parent_holds(parent, diff.to_embed.column("id"), ir.storage_options)
        if held is not None:
            logger.info(
                "new manifests list id %r, which the published version already has: listing "
                "the whole corpus",
                held,
            )
            listed = _list_corpus(cfg, ir, parent, stage, whole=True)
            diff = _diff(cfg, ir, listed, parent)
    return listed, diff


def _diff(cfg: ReindexConfig, ir: IndexRoot, listed: _Listed, parent: _Parent) -> Any:
    """The listing against the parent (`pipelines.diff`): on Ray Data or on the driver. An
    appended listing (new shards only) is diffed against nothing: its items are new, the
    parent's rows and failures are carried by count. A diff the listing made (`diff`) is
    that diff."""
    if listed.diff is not None:
        return listed.diff
    full = parent.full_reason is not None
    if listed.appended:
        if listed.on_ray:
            fs = arrow_fs(ir.root, ir.storage_options)
            diff = diff_on_ray(listed.listing, None, None, fs, num_partitions=2)
        else:
            diff = diff_listing(listed.listing, None, None)
        assert parent.pins is not None
        with _damage_named(ir):
            diff.carried_rows = count_pin(parent.pins[0], ir.storage_options)
            diff.failed_kept = count_pin(parent.pins[1], ir.storage_options)
        return diff
    if listed.on_ray:
        return diff_on_ray(
            listed.listing,
            *(parent.pins or parent.files),
            arrow_fs(ir.root, ir.storage_options),
            full=full,
            retry_failed=cfg.index.retry_failed,
            parent_count=record_rows(parent.record),
            num_partitions=cfg.index.diff_partitions,
            storage_options=ir.storage_options,
        )
    with _damage_named(ir):
        rows, errors = _parent_tables(parent, ir)
    return diff_listing(
        listed.listing, rows, errors, full=full, retry_failed=cfg.index.retry_failed
    )


def _parent_holds(parent: _Parent, ids: pa.Array, storage_options: Any) -> str | None:
    """One of `ids` that the parent's rows or failures hold (None: none), from a streamed
    read of their id column: new shards that repeat an id of the parent's shards are listed
    with the whole corpus, whose planning decides which shard keeps the id."""
    if not len(ids) or parent.pins is None:
        return None
    if isinstance(ids, pa.ChunkedArray):
        ids = ids.combine_chunks()
    for pin in parent.pins:
        if pin is None:
            continue
        for batch in scan_pin(pin, storage_options, columns=["id"]):
            hit = batch.column(0).filter(pc.is_in(batch.column(0), value_set=ids))
            if len(hit):
                return hit[0].as_py()
    return None


def _log_diff(cfg: ReindexConfig, diff: Any, parent: _Parent, how: _Listed) -> None:
    listed = sum(
        getattr(diff, k)
        for k in ("added", "changed", "retried", "reembedded", "carried_rows", "failed_kept")
    )
    logger.info(
        "%s: %d listed; %d new, %d changed, %d retried, %d re-embedded, %d deleted, "
        "%d carried (%d relocated), %d failures kept%s%s",
        cfg.job.input,
        listed,
        diff.added,
        diff.changed,
        diff.retried,
        diff.reembedded,
        diff.deleted,
        diff.carried_rows,
        diff.relocated,
        diff.failed_kept,
        f"; full re-embed: {parent.full_reason}" if parent.full_reason else "",
        " (diff on Ray Data)" if how.on_ray else "",
    )
    if how.appended:
        logger.info(
            "the published version's shards are unchanged: only the %d new shards were listed",
            len(how.inputs["shards"]) - len(parent.inputs["shards"])
            if how.inputs and parent.inputs
            else 0,
        )


def _embed_changes(cfg: ReindexConfig, stage: StagedVersion, diff: Any) -> None:
    """Embed the new, changed and retried items into the version's `data/embedded/`
    (`pipelines.embed.embed_items`: the embedding job's exactly-once protocol)."""
    from pipelines.embed import embed_items

    if diff.to_embed.num_rows:
        embed_items(cfg.job, diff.to_embed, output=stage.embedded_uri)


@dataclass
class _Committed:
    """The version's Lance pins and the rows this run appended to the rows dataset."""

    rows: Pin | None
    failures: Pin | None
    appended: pa.Table
    drop_ids: pa.Array


def _commit_rows(
    stage: StagedVersion,
    diff: Any,
    parent: _Parent,
    new_rows: pa.Table | None,
    *,
    compact: bool = True,
) -> _Committed:
    """Commit the version's rows and failures to the root's Lance datasets, tagged with the
    stage's name: the parent's pinned versions minus the ids not carried (deleted, changed,
    re-embedded, retried, relocated) plus this run's embedded rows (streamed from
    `data/embedded/`) and the relocated rows with their new uri. A parent published as
    Parquet is copied once (streamed, carried rows only) into a fresh Lance version.
    `new_rows`: this run's embedded rows, which the index upserts with the relocated ones.
    `compact`: compact the datasets where due (`pipelines.tables.VersionTable.compact`)."""
    so = stage.root.storage_options
    moved_ids = diff.moved.column("id").combine_chunks().cast(pa.string())
    drop = pa.concat_arrays([diff.drop_ids.cast(pa.string()), moved_ids])
    full = parent.full_reason is not None
    pins = parent.pins or (None, None)
    out: list[Pin | None] = []
    appended = pa.table({})
    for k, table in enumerate(stage.root.tables()):
        errors = k == 1
        new_files = stage.embedded_files(errors=errors)
        batches: list[Any] = [iter_parquet(stage.embedded_uri, new_files, so)]
        schemas = [_schema(stage.embedded_uri, new_files, so)]
        base = None if full else pins[k]
        moved = pa.table({})
        if not full and parent.pins is not None and base is not None and len(moved_ids):
            moved = relocate(read_pin(base, so, ids=moved_ids), diff.moved)
            batches.append(moved.to_batches())
        elif not full and parent.pins is None:  # Parquet parent: every carried row, once
            files, hits = parent.files[k], []
            batches.append(_carried(parent.data_uri, files, so, diff.drop_ids, diff.moved, hits))
            schemas.append(_schema(parent.data_uri, files, so))
            moved = _Later(hits)
        known = [x for x in schemas if x is not None]
        schema = pa.unify_schemas(known, promote_options="default") if known else None
        out.append(
            table.commit(
                base,
                drop,
                (b for it in batches for b in it),
                _plain(schema),
                stage.name,
                compact=compact,
            )
        )
        if not errors:
            appended = moved.table() if isinstance(moved, _Later) else moved
    parts = [_index_columns(t) for t in (new_rows, appended) if t is not None and t.num_rows]
    return _Committed(
        out[0],
        out[1],
        pa.concat_tables(parts, promote_options="default") if parts else pa.table({}),
        drop,
    )


def _plain(schema: pa.Schema | None) -> pa.Schema | None:
    return schema.remove_metadata() if schema is not None else None


def _schema(uri: str, files: list[str], storage_options: Any) -> pa.Schema | None:
    """The Arrow schema of the first of `files` (None if there are none)."""
    if not files:
        return None
    import pyarrow.parquet as pq

    from imagebind_core.io import filesystem

    fs, _ = filesystem(uri, storage_options)
    with fs.open(files[0], "rb") as fh:
        return pq.read_schema(fh)


def _carried(
    uri: str,
    files: list[str],
    storage_options: Any,
    drop_ids: pa.Array,
    moved: pa.Table,
    relocated: list[pa.Table],
) -> Any:
    """The rows of a Parquet parent's `files` that are carried, relocated, batch by batch;
    the relocated ones are also added to `relocated` (the index updates their uri)."""
    for batch in iter_parquet(uri, files, storage_options):
        kept = batch.filter(pc.invert(pc.is_in(batch.column("id"), value_set=drop_ids)))
        if not kept.num_rows:
            continue
        t = relocate(pa.Table.from_batches([kept]), moved)
        if moved.num_rows:
            hit = t.filter(pc.is_in(t.column("id"), value_set=moved.column("id")))
            if hit.num_rows:
                relocated.append(hit)
        yield from t.to_batches()


@dataclass
class _Later:
    """Tables a generator collects while Lance consumes it."""

    parts: list[pa.Table]

    def table(self) -> pa.Table:
        if not self.parts:
            return pa.table({})
        return pa.concat_tables(self.parts, promote_options="default")


def _empty_rows(dim: int, cols: list[str] = INDEX_COLUMNS) -> pa.Table:
    """No rows, with the columns `cols` (default: those the index reads)."""
    types = {"embedding": pa.list_(pa.float32(), dim)}
    return pa.table({c: pa.array([], types.get(c, pa.string())) for c in cols})


def _write_index(
    cfg: ReindexConfig, stage: StagedVersion, parent: _Parent, data: _Committed, dim: int
) -> Any:
    """The version's index: the parent's with this run's change applied (new and re-embedded
    rows, relocated rows' new uri, deleted ids), or a build from every row of the version's
    pinned Lance version (`imagebind_core.index.update_index`) — also, with a warning, when
    the parent's index files this update must read are damaged."""
    so = stage.root.storage_options
    upserts, deletes = _index_change(data.appended, data.drop_ids, dim)

    def all_rows() -> Any:  # streamed: a build reads the version twice, in batches
        if data.rows is None:
            return _empty_rows(dim)
        # vectors in batches of the build's own size: Lance reads ahead several batches
        return scan_pin(data.rows, so, columns=INDEX_COLUMNS, batch_rows=BUILD_BATCH_ROWS)

    def update(parent_uri: str | None) -> IndexUpdate:
        return update_index(
            stage.index_uri,
            parent_uri=parent_uri,
            upserts=upserts,
            deletes=deletes,
            all_rows=all_rows,
            options=cfg.index.index_options(),
            storage_options=so,
        )

    parent_uri = parent.index_uri(stage.root.root)
    try:
        return update(parent_uri)
    except (RuntimeError, ValueError, OSError, EOFError) as e:  # faiss, numpy, JSON, files
        # The parent's index files changed outside a run (emptied, cut short, deleted): the
        # rows are intact, so this version's index is built from them, as `--full` would.
        if parent_uri is None or transient_store_error(e):
            raise
        why = f"{type(e).__name__}: {str(e)[:300]}"
    logger.warning(
        "the parent version's index at %s could not be read or updated (%s); building this "
        "version's index from its rows instead",
        parent_uri,
        why,
    )
    fs, path = filesystem(stage.index_uri, so)
    with contextlib.suppress(FileNotFoundError):
        fs.rm(path, recursive=True)  # what the failed update wrote
    return replace(update(None), reason=f"the parent's index could not be read ({why})")


def _pinned_rows(pin: Pin | None, storage_options: Any, dim: int) -> pa.Table:
    """The sink's columns of a pinned version's rows (empty when it has none)."""
    rows = read_pin(pin, storage_options, columns=SINK_COLUMNS)
    return rows if rows is not None else _empty_rows(dim, SINK_COLUMNS)


def _published_rows(ir: IndexRoot, parent: _Parent, dim: int) -> pa.Table:
    """The published version's rows, for the Milvus sink of a run that publishes nothing."""
    if parent.pins is not None:
        return _pinned_rows(parent.pins[0], ir.storage_options, dim)
    rows = ir.read_rows(parent.pointer.name)  # a version published as Parquet
    return rows.select(SINK_COLUMNS) if rows is not None else _empty_rows(dim, SINK_COLUMNS)


def _sync_milvus(
    cfg: ReindexConfig,
    result: ReindexResult,
    parent: str | None,
    rows: Callable[[], pa.Table],
    dim: int,
    change: tuple[pa.ChunkedArray, list[str]] | None = None,
) -> ReindexResult:
    """Bring the Milvus collection (`index.milvus`, `pipelines.milvus_sink`) to the version
    `result` published or found current; its failure is reported in `result.milvus`."""
    if cfg.index.milvus is None or result.status not in ("published", "unchanged"):
        return result
    from pipelines.milvus_sink import sync_version

    upsert_ids, delete_ids = change if change is not None else (None, None)
    synced = sync_version(
        cfg.index.milvus,
        version=result.name,
        parent=parent if result.status == "published" else None,
        rows=rows,
        upsert_ids=upsert_ids,
        delete_ids=delete_ids,
        dim=dim,
    )
    result.milvus = synced.to_dict()
    return result


def _modalities(pin: Pin | None, storage_options: Any) -> list[str]:
    """The modalities of a pinned version's rows (one column scanned, batch by batch)."""
    if pin is None:
        return []
    seen: set[str] = set()
    for batch in scan_pin(pin, storage_options, columns=["modality"]):
        seen.update(v for v in pc.unique(batch.column("modality")).to_pylist() if v is not None)
    return sorted(seen)


def _counts(
    diff: Any, new_rows: pa.Table | None, new_errors: pa.Table | None, total: int
) -> dict[str, int]:
    """The record's counts; added/changed/reembedded/retried count rows embedded successfully."""
    new_ids = set(new_rows.column("id").to_pylist()) if new_rows is not None else set()
    ok = Counter(
        c
        for i, c in zip(diff.to_embed.column("id").to_pylist(), diff.classes, strict=True)
        if i in new_ids
    )
    return {
        "added": ok["added"],
        "changed": ok["changed"],
        "deleted": diff.deleted,
        "carried": diff.carried_rows,
        "relocated": diff.relocated,
        "failed": new_errors.num_rows if new_errors is not None else 0,
        "failed_kept": diff.failed_kept,
        "reembedded": ok["reembedded"],
        "retried": ok["retried"],
        "total": total,
    }


def _version_record(
    cfg: ReindexConfig,
    stage: StagedVersion,
    parent: _Parent,
    key: dict[str, str],
    counts: dict[str, int],
    data: _Committed,
    index: Any,
    timings: dict[str, float],
) -> dict[str, Any]:
    """`version.json` (docs/reindex.md lists its fields)."""
    return {
        "format": RECORD_FORMAT,
        "version": stage.version,
        "name": stage.name,
        "parent": parent.pointer.version if parent.pointer else None,
        "parent_name": parent.name,
        "created_at": utc_now(),
        "input": cfg.job.input,
        "counts": counts,
        "full_reembed": parent.full_reason is not None,
        "full_reason": parent.full_reason,
        "lineage": model_lineage(cfg.job, _modalities(data.rows, stage.root.storage_options)),
        "lineage_key": key,
        "embed_dim": int(key["embed_dim"]),
        "index": {**index.record(), "nprobe": cfg.index.nprobe},
        "data": data_record(data.rows, data.failures),
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
    }


def _diff_kind(listed: _Listed) -> str:
    """The record's `diff`: where the diff ran, and whether only new shards were listed."""
    where = "ray" if listed.on_ray else "driver"
    if listed.diff is not None:
        return f"{where}, by shard"
    return f"{where}, new shards" if listed.appended else where


def _write_inputs(stage: StagedVersion, inputs: dict) -> None:
    fs, path = filesystem(join_uri(stage.uri, INPUTS_NAME), stage.root.storage_options)
    fs.pipe_file(path, json.dumps(inputs).encode())


def _publish(
    cfg: ReindexConfig,
    ir: IndexRoot,
    stage: StagedVersion,
    parent: _Parent,
    counts: dict[str, int],
    lock: OutputLock,
) -> ReindexResult:
    """Swap `LATEST` to the staged version unless the lock was lost or another run published
    first (then the stage is removed), and apply retention."""
    if lock.lost.is_set():
        stage.discard()
        raise OutputLocked(f"lost the re-index lock on {ir.root}; not publishing {stage.name}")
    try:
        ir.publish(stage.pointer(), parent.etag)
    except PublishConflict as e:
        logger.error("%s", e)
        stage.discard()
        return ReindexResult("conflict", ir.root, stage.version, stage.name, message=str(e))
    removed = ir.apply_retention(cfg.index.keep_versions)
    return ReindexResult(
        "published",
        ir.root,
        stage.version,
        stage.name,
        parent.name,
        counts,
        parent.full_reason,
        removed,
    )


if __name__ == "__main__":  # `python -m pipelines.reindex`: the command line
    from pipelines.cli import reindex_main

    sys.exit(reindex_main())
