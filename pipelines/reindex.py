"""`imagebind-reindex`: keep a published embedding index in step with a living corpus.

One run:

1. takes the re-index lease on the index root (`pipelines.lock.OutputLock` on `<root>/_lock`);
   a second run finds it held and exits without doing anything;
2. reads the published pointer (`<root>/LATEST`) and the parent version's rows;
3. lists the corpus without reading payloads (`pipelines.readers.list_items`, the same inputs
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

Library use: `reindex(pipelines.config.load_reindex_config("reindex.yaml"))`; the command
line is `pipelines.cli.reindex_main`.
"""

from __future__ import annotations

import logging
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from imagebind_core.index import DATA_DIR, INDEX_DIR, Pointer, join_uri, update_index
from imagebind_core.io import filesystem
from pipelines.config import ReindexConfig
from pipelines.diff import carry_on_ray, diff_listing, diff_on_ray
from pipelines.lineage import lineage_changes, lineage_key, model_lineage
from pipelines.lock import OutputLock, OutputLocked
from pipelines.publish import (
    IndexRoot,
    PublishConflict,
    new_run_id,
    utc_now,
    version_name,
)
from pipelines.readers import check_input
from pipelines.writers import parquet_bytes

logger = logging.getLogger(__name__)

EMBEDDED_DIR = "embedded"  # this run's embeddings (embed_items output) inside data/
CARRIED_DIR = "carried"  # rows copied from the parent version inside data/
ERRORS_DIR = "_errors"
RECORD_FORMAT = 1
# Rows per carried-forward Parquet file.
CARRIED_ROWS_PER_FILE = 1_000_000


# ----------------------------------------------------------------------------- lineage


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

    @property
    def exit_status(self) -> int:
        """The command line's exit status: 3 when another run held the lock or published
        first (nothing published), else 0."""
        return 3 if self.status in ("locked", "conflict") else 0

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
    from pipelines.embed import embed_items
    from pipelines.readers import LISTING_SCHEMA, EmptyInput, list_items

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


if __name__ == "__main__":  # `python -m pipelines.reindex`: the command line
    from pipelines.cli import reindex_main

    sys.exit(reindex_main())
