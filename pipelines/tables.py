"""The rows of an index root's versions in Lance: one dataset for the rows, one for failures.

An index root holds `<root>/rows.lance` (embedded rows: `id`, `uri`, `modality`, `fingerprint`,
..., `embedding`) and `<root>/failures.lance` (items that failed, with their error). A published
version pins one Lance version of each (`Pin`, in `version.json` under `data`); readers open
exactly that Lance version, never the dataset's latest, so a run that committed to Lance and
crashed before swapping `LATEST` stays invisible.

A new version is the parent's pinned Lance version (restored on top when a crashed run's
commits came after it) plus a delete of the ids it does not carry plus an append of this run's
rows: Lance keeps the parent's data files and adds a deletion file per touched fragment, so a
run writes bytes in proportion to its change. It then compacts where a tiered policy says
it is due (`compact`: small fragments merged by size tier, mostly-deleted fragments
rewritten). `commit` checks that every Lance version it created directly follows its base
(no foreign commit in between; a compaction's own versions are checked by their operations)
and tags the result with the staged version's name; retention (`release`) drops the tags of
removed versions and lets Lance delete what no retained tag pins.
"""

from __future__ import annotations

import datetime as _dt
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from imagebind_core.index import join_uri
from imagebind_core.io import StorageOptions, protocol_of

logger = logging.getLogger(__name__)

ROWS_TABLE = "rows.lance"
FAILURES_TABLE = "failures.lance"
# Rows per batch when streaming rows out of a Lance version.
SCAN_BATCH_ROWS = 65_536
# Compaction after a run's commit (`compact`). Each run appends one small fragment and adds
# deletion files to the fragments its change touched; left alone, a root that is re-indexed
# daily holds hundreds of fragments after a year and every scan pays for them. Merges are
# tiered: fragments below COMPACT_TARGET_ROWS live rows are grouped by size (powers of
# COMPACT_FAN_IN) and a tier is merged once it holds COMPACT_FAN_IN fragments, so a row is
# rewritten about log_FAN_IN(target / rows a run adds) times in its life, not on every run.
# A fragment with COMPACT_DELETED or more of its rows deleted is rewritten without them: the
# deleted rows take at most as much space as the live ones, and each costs at most one
# rewritten row. The target bounds one merge's output (512 MB of float32 vectors at D = 1024).
COMPACT_TARGET_ROWS = 1 << 17
COMPACT_FAN_IN = 8
COMPACT_DELETED = 0.5


class ForeignCommit(RuntimeError):
    """Another writer committed to a version dataset while this run was writing to it."""


def lance_options(uri: str, storage_options: StorageOptions | None) -> dict[str, str] | None:
    """Lance's object-store options for `uri`, from the project's fsspec/s3fs options
    (`imagebind_core.io.s3_storage_options`); None for local paths. Credentials not given
    fall back to the usual AWS chain, as with s3fs."""
    if protocol_of(uri) not in ("s3", "s3a"):
        return None
    so = dict(storage_options or {})
    out: dict[str, str] = {}
    endpoint = so.get("endpoint_url")
    if endpoint:
        out["aws_endpoint"] = str(endpoint)
        if str(endpoint).startswith("http://"):
            out["allow_http"] = "true"
    region = (so.get("client_kwargs") or {}).get("region_name")
    if region:
        out["aws_region"] = str(region)
    for src, dst in (
        ("key", "aws_access_key_id"),
        ("secret", "aws_secret_access_key"),
        ("token", "aws_session_token"),
    ):
        if so.get(src) is not None:
            out[dst] = str(so[src])
    if so.get("anon"):
        out["aws_skip_signature"] = "true"
    return out


@dataclass(frozen=True)
class Pin:
    """One Lance version of one dataset: what a version record publishes."""

    uri: str
    version: int

    def to_json(self) -> dict[str, Any]:
        return {"uri": self.uri, "version": self.version}

    @classmethod
    def from_json(cls, data: dict | None) -> Pin | None:
        if not data:
            return None
        return cls(str(data["uri"]), int(data["version"]))


class VersionTable:
    """One Lance dataset of an index root (`ROWS_TABLE` or `FAILURES_TABLE`)."""

    def __init__(self, root: str, name: str, storage_options: StorageOptions | None) -> None:
        self.uri = join_uri(root, name)
        self.options = lance_options(self.uri, storage_options)

    def open(self, version: int | str | None = None) -> Any:
        """The dataset at `version` (a number or a tag; None: the latest)."""
        import lance

        return lance.dataset(self.uri, version=version, storage_options=self.options)

    def exists(self) -> bool:
        try:
            self.open()
        except (ValueError, OSError, FileNotFoundError):
            return False
        return True

    def commit(
        self,
        base: Pin | None,
        drop_ids: pa.Array | None,
        batches: Iterable[pa.RecordBatch],
        schema: pa.Schema | None,
        tag: str,
        *,
        compact: bool = True,
    ) -> Pin | None:
        """A new Lance version: `base` (None: start empty) without `drop_ids`, plus `batches`
        (conformed to the base's schema, or to `schema` when starting empty), then compacted
        where due (`compact`; False: left as appended). Returns its pin, tagged `tag`, or None
        when there is no base and nothing to write.

        Raises ForeignCommit if a Lance version this run did not write appears between its
        base and its result (the re-index lease makes that a lost lease or a stray writer).
        """
        import lance

        if base is None:
            if schema is None:
                return None
            exists = self.exists()
            before = self.open().latest_version if exists else 0
            ds = lance.write_dataset(
                _reader(batches, schema),
                self.uri,
                mode="overwrite" if exists else "create",
                storage_options=self.options,
            )
            _check_next(self.uri, before, ds.version)
        else:
            if base.uri != self.uri:
                raise ValueError(
                    f"the parent version's rows are in {base.uri}, not in {self.uri}; "
                    "an index root's versions share one dataset"
                )
            ds = self.open(base.version)
            latest = ds.latest_version
            if latest != base.version:
                # Commits of a run that crashed before publishing: start over from the base.
                logger.info(
                    "%s: versions %d-%d were never published; restoring version %d",
                    self.uri,
                    base.version + 1,
                    latest,
                    base.version,
                )
                ds.restore()
                _check_next(self.uri, latest, ds.version)
            schema = ds.schema
            if drop_ids is not None and len(drop_ids):
                before = ds.version
                ds.delete(pc.field("id").isin(drop_ids))
                _check_next(self.uri, before, ds.version)
            reader = _reader(batches, schema)
            first = _peek(reader)
            if first is not None:
                before = ds.version
                ds = lance.write_dataset(
                    _chain(first, reader, schema), ds, mode="append", storage_options=self.options
                )
                _check_next(self.uri, before, ds.version)
            if compact:
                ds = self.compact(ds)
        ds.tags.create(tag, ds.version)
        return Pin(self.uri, ds.version)

    def compact(self, ds: Any) -> Any:
        """`ds` (this run's latest commit) after the compaction the policy above asks for:
        the same rows, fewer fragments or deletion files; `ds` itself when none is due.
        Raises ForeignCommit if a Lance version that is not this compaction's appears."""
        for excluded, deletions in _compactions(ds):
            before = ds.version
            m = ds.optimize.compact_files(
                target_rows_per_fragment=COMPACT_TARGET_ROWS,
                materialize_deletions=deletions,
                materialize_deletions_threshold=COMPACT_DELETED,
                excluded_fragment_ids=excluded,
            )
            ds = self.open()
            _check_compaction(self.uri, ds, before)
            logger.info(
                "%s: compacted %d fragments into %d (%s)",
                self.uri,
                m.fragments_removed,
                m.fragments_added,
                "deleted rows dropped" if deletions else "small fragments merged",
            )
        return ds

    def untag(self, tag: str) -> None:
        """Drop `tag` (a discarded stage's) if it exists."""
        if not self.exists():
            return
        ds = self.open()
        if tag in ds.tags.list():
            ds.tags.delete(tag)

    def release(self, keep_tag: Any) -> int:
        """Drop the tags `keep_tag(name)` rejects and let Lance delete the versions and files
        no remaining tag (nor the latest version) needs. Returns the bytes removed."""
        if not self.exists():
            return 0
        ds = self.open()
        for tag in list(ds.tags.list()):
            if not keep_tag(tag):
                ds.tags.delete(tag)
        stats = ds.cleanup_old_versions(
            older_than=_dt.timedelta(0), error_if_tagged_old_versions=False
        )
        return int(stats.bytes_removed)


def _compactions(ds: Any) -> Iterator[tuple[list[int], bool]]:
    """The compactions due on `ds`, as (fragment ids to leave out, materialise deletions):
    the fragments with COMPACT_DELETED or more of their rows deleted, then the smallest
    size tier that holds COMPACT_FAN_IN fragments. Both come from `ds` as passed in: the
    fragments a deletion rewrite creates are in neither list, so the tier merge that follows
    may take them in too (rows are never changed by a merge, only where they are stored)."""
    frags = [
        (f.fragment_id, f.metadata.physical_rows, f.metadata.deletion_file)
        for f in ds.get_fragments()
    ]
    ids = [i for i, _, _ in frags]
    gone = {
        i
        for i, rows, d in frags
        if d is not None and rows and d.num_deleted_rows / rows >= COMPACT_DELETED
    }
    if gone:
        yield [i for i in ids if i not in gone], True
    tiers: dict[int, list[int]] = {}
    for i, rows, d in frags:
        live = rows - (d.num_deleted_rows if d is not None else 0)
        if i not in gone and 0 < live < COMPACT_TARGET_ROWS:
            tiers.setdefault(_tier(live), []).append(i)
    for tier in sorted(tiers):
        if len(tiers[tier]) >= COMPACT_FAN_IN:
            keep = set(tiers[tier])
            yield [i for i in ids if i not in keep], False
            return


def _tier(rows: int) -> int:
    """floor(log_FAN_IN(rows)), in integers."""
    t = 0
    while rows >= COMPACT_FAN_IN:
        rows //= COMPACT_FAN_IN
        t += 1
    return t


# The operations of one `compact_files` call: it reserves fragment ids, then rewrites.
_COMPACTION_OPS = {"Rewrite", "ReserveFragments", "BaseOperation"}


def _check_compaction(uri: str, ds: Any, before: int) -> None:
    """ForeignCommit unless every Lance version after `before` is this compaction's."""
    n = ds.version - before
    if n <= 0:
        return
    ops = [type(t.operation).__name__ for t in ds.get_transactions(n)]
    if len(ops) != n or not set(ops) <= _COMPACTION_OPS:
        raise ForeignCommit(
            f"{uri}: another writer committed while this run compacted after Lance version "
            f"{before} (operations {ops}); not publishing"
        )


def _check_next(uri: str, before: int, after: int) -> None:
    if after != before + 1:
        raise ForeignCommit(
            f"{uri}: another writer committed between Lance versions {before} and {after}; "
            "not publishing (is another re-index running without the lease?)"
        )


def conform(batch: pa.RecordBatch | pa.Table, schema: pa.Schema) -> pa.RecordBatch:
    """`batch` with exactly `schema`'s columns, in order (missing ones null), cast to it.
    Raises ValueError naming a column `batch` has that `schema` lacks."""
    extra = [n for n in batch.schema.names if n not in schema.names]
    if extra:
        raise ValueError(
            f"rows have column(s) {extra} the version dataset lacks ({schema.names}); "
            "a change of the row layout needs a full re-index (index.full)"
        )
    n = batch.num_rows
    cols = [
        batch.column(f.name).cast(f.type) if f.name in batch.schema.names else pa.nulls(n, f.type)
        for f in schema
    ]
    if isinstance(batch, pa.Table):
        return pa.Table.from_arrays(cols, schema=schema).combine_chunks().to_batches()[0]
    return pa.RecordBatch.from_arrays(cols, schema=schema)


def _conformed(batches: Iterable[pa.RecordBatch], schema: pa.Schema) -> Iterator[pa.RecordBatch]:
    for b in batches:
        if b.num_rows:
            yield conform(b, schema)


def _reader(batches: Iterable[pa.RecordBatch], schema: pa.Schema) -> pa.RecordBatchReader:
    return pa.RecordBatchReader.from_batches(schema, _conformed(batches, schema))


def _peek(reader: pa.RecordBatchReader) -> pa.RecordBatch | None:
    try:
        return reader.read_next_batch()
    except StopIteration:
        return None


def _chain(
    first: pa.RecordBatch, rest: pa.RecordBatchReader, schema: pa.Schema
) -> pa.RecordBatchReader:
    def gen() -> Iterator[pa.RecordBatch]:
        yield first
        yield from rest

    return pa.RecordBatchReader.from_batches(schema, gen())


def read_pin(
    pin: Pin | None,
    storage_options: StorageOptions | None,
    *,
    columns: list[str] | None = None,
    ids: pa.Array | None = None,
) -> pa.Table | None:
    """The rows of a pinned version (only `columns`; only `ids` when given); None if unpinned."""
    if pin is None:
        return None
    import lance

    ds = lance.dataset(
        pin.uri, version=pin.version, storage_options=lance_options(pin.uri, storage_options)
    )
    filt = pc.field("id").isin(ids) if ids is not None else None
    return ds.to_table(columns=columns, filter=filt)


def scan_pin(
    pin: Pin,
    storage_options: StorageOptions | None,
    *,
    columns: list[str] | None = None,
    batch_rows: int = SCAN_BATCH_ROWS,
) -> Iterator[pa.RecordBatch]:
    """Stream a pinned version's rows (`batch_rows` at a time)."""
    import lance

    ds = lance.dataset(
        pin.uri, version=pin.version, storage_options=lance_options(pin.uri, storage_options)
    )
    yield from ds.to_batches(columns=columns, batch_size=batch_rows)


def count_pin(pin: Pin | None, storage_options: StorageOptions | None) -> int:
    """Rows in a pinned version (0 if unpinned)."""
    if pin is None:
        return 0
    import lance

    return lance.dataset(
        pin.uri, version=pin.version, storage_options=lance_options(pin.uri, storage_options)
    ).count_rows()
