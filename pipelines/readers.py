"""The read task of the embedding job: one (shard, kind) task row in, its item rows out.

`read_tasks` is the reading stage's Ray Data function; `read_shard_task` reads one task (see
`pipelines.plan.shard_tasks`) through its format's `shard_rows` (`pipelines.formats`), skips
what an earlier run already wrote, and ends with the task's end-of-shard marker.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from imagebind_core.io import StorageOptions
from pipelines.formats import wds_member
from pipelines.plan import input_format
from pipelines.progress import PARTS_DROPPED, notify, report
from pipelines.rows import (
    INVALID,
    ITEM_SCHEMA,
    STATUS_EOS,
    STATUS_ERROR,
    eos_row,
    item_row,
    member_fingerprint,
)
from pipelines.store import Output
from pipelines.writers import drop_part_rows, part_fingerprints

logger = logging.getLogger(__name__)


def _item_rows(
    task: dict[str, Any], storage_options: StorageOptions | None, skip: frozenset[str] = frozenset()
) -> Iterator[dict]:
    kind = task["kind"]
    if task["items"] is not None and kind == INVALID:  # rows rejected while listing (plan_items)
        for it in task["items"]:
            yield item_row(
                it["id"],
                it.get("uri"),
                it.get("modality"),
                task["shard"],
                it.get("fingerprint"),
                it.get("size"),
                it.get("mtime"),
                error=it.get("error") or "invalid item",
            )
        return
    yield from input_format(task["format"]).shard_rows(
        task["shard"],
        task["uri"],
        task["fingerprint"],
        {kind},
        storage_options=storage_options,
        extensions=task["wds_extensions"],
        items={kind: task["items"]} if task["items"] is not None else None,
        skip=skip,
    )


def _to_table(rows: list[dict[str, Any]]) -> pa.Table:
    # Arrow's row converter: ~10x cheaper per row than gathering each column in Python.
    return pa.Table.from_pylist(rows, schema=ITEM_SCHEMA)


def read_shard_task(
    task: dict[str, Any],
    output_uri: str,
    storage_options: StorageOptions | None,
    *,
    chunk_rows: int = 64,
    chunk_bytes: int = 64 << 20,
    progress: Any = None,
) -> Iterator[pa.Table]:
    """Item rows of one (shard, kind) task in chunks, then its end-of-shard marker.

    Items already in the task's part files (an interrupted earlier run) are skipped, if the
    shard still holds them with the same fingerprint; the parts' other rows (items changed or
    gone since) are removed from the parts (`_reusable`). Ids outside `include` and ids in
    `exclude` (repeats of an earlier shard) are skipped too; the marker's `count` is the
    number of items emitted. An `include`d id the shard does not yield (the object changed
    since it was listed, or the tar breaks before it) becomes an error row: it must not vanish.
    """
    out = Output(output_uri, storage_options)
    parts = part_fingerprints(out, task["shard"], task["kind"])
    include = set(task["include"]) if task.get("include") is not None else None
    fmt = input_format(task["format"])
    if fmt.shard_table is not None and task["items"] is None:
        yield from _read_table_task(
            task, fmt, storage_options, out, parts, include, chunk_rows, chunk_bytes, progress
        )
        return
    current = None
    if parts and task["items"] is not None:  # only a resume compares
        current = {it["id"]: it.get("fingerprint") for it in task["items"]}
    done = _reusable(out, task, parts, current, include, progress)
    seen: set[str] = set()
    buf: list[dict[str, Any]] = []
    nbytes = 0
    broken: str | None = None  # why the shard stopped yielding, if it did
    for row in _item_rows(task, storage_options, frozenset(done)):
        row["branch"] = task["kind"]
        id_ = row["id"]
        if include is not None and id_ not in include:
            if row["status"] == STATUS_ERROR and id_.endswith(f"#unreadable-{task['kind']}"):
                broken = row["error"]
            continue
        if id_ in done or id_ in seen:
            continue
        seen.add(id_)
        buf.append(row)
        nbytes += len(row["data"] or b"")
        if len(buf) >= chunk_rows or nbytes >= chunk_bytes:
            yield _to_table(buf)
            buf, nbytes = [], 0
    missing = _missing_rows(task, sorted((include or set()) - seen - done), broken)
    buf.extend(missing)
    buf.append(eos_row(task["shard"], task["kind"], len(seen) + len(missing)))
    yield _to_table(buf)


def _read_table_task(
    task: dict[str, Any],
    fmt: Any,
    storage_options: StorageOptions | None,
    out: Output,
    parts: dict[str, str | None],
    include: set[str] | None,
    chunk_rows: int,
    chunk_bytes: int,
    progress: Any = None,
) -> Iterator[pa.Table]:
    """`read_shard_task` for a format that reads a shard as one table (`shard_table`): the
    same rows and marker, filtered and cut into tables of `chunk_rows` column by column."""
    kind = task["kind"]
    table = fmt.shard_table(
        task["shard"], task["uri"], task["fingerprint"], {kind}, storage_options=storage_options
    )
    ids = table.column("id")
    current = None
    if parts:
        fps = table.column("fingerprint").to_pylist()
        current = dict(zip(ids.to_pylist(), fps, strict=True))
    done = _reusable(out, task, parts, current, include, progress)
    if done:
        table = table.filter(pc.invert(pc.is_in(ids, pa.array(sorted(done), pa.string()))))
    if include is not None:
        table = table.filter(pc.is_in(table.column("id"), pa.array(sorted(include), pa.string())))
    n = table.num_rows
    table = _with_task_columns(table, kind)
    sizes = pc.fill_null(pc.binary_length(table.column("data")), 0).to_numpy()
    ends = np.zeros(n + 1, np.int64)
    np.cumsum(sizes, out=ends[1:])
    start = 0
    while start < n:  # at most chunk_rows rows, and chunk_bytes of inline data unless one row
        stop = min(start + chunk_rows, n)
        stop = max(
            start + 1, min(stop, int(np.searchsorted(ends, ends[start] + chunk_bytes, "right")) - 1)
        )
        yield table.slice(start, stop - start)
        start = stop
    seen = set(table.column("id").to_pylist()) if include is not None else set()
    missing = _missing_rows(task, sorted((include or set()) - seen - done), None)
    yield _to_table([*missing, eos_row(task["shard"], kind, n + len(missing))])


def _reusable(
    out: Output,
    task: dict[str, Any],
    parts: dict[str, str | None],
    current: dict[str, str | None] | None,
    include: set[str] | None,
    progress: Any = None,
) -> set[str]:
    """The ids the task skips: its part rows (`parts`, id -> fingerprint) whose item the shard
    still holds unchanged, and `exclude`. The other part rows (the item changed, left the
    shard, or is no longer wanted) are removed from the parts, so that the commit holds what a
    clean run of the input as it is now would, and the items are read again if still there.

    `current`: id -> fingerprint of the shard's items now (a fingerprint of None, as for a
    manifest row without one, cannot tell a change: the part row is kept); None for a tar,
    whose members' fingerprints derive from the tar's own (an unchanged tar has the same
    members)."""
    exclude = set(task.get("exclude") or ())
    if not parts:
        return exclude

    def still(id_: str, fp: str | None) -> bool:
        if id_ in exclude or (include is not None and id_ not in include):
            return False
        if current is not None:
            return id_ in current and current[id_] in (None, fp)
        if "#" not in id_:  # not a member id (`wds_id`)
            return False
        if id_.endswith(f"#unreadable-{task['kind']}"):  # unreadable_shard_row's fingerprint
            return fp == task["fingerprint"]
        return fp == member_fingerprint(task["fingerprint"] or "", wds_member(id_))

    stale = {i for i, fp in parts.items() if not still(i, fp)}
    if stale:
        notify(
            progress,
            logger,
            f"shard {task['shard']}: {len(stale)} {task['kind']} items embedded by an "
            "interrupted run changed or went away since; their rows are dropped (changed items "
            "are embedded again)",
        )
        drop_part_rows(out, task["shard"], task["kind"], stale)
        report(progress, PARTS_DROPPED, len(stale))
    return (set(parts) - stale) | exclude


def _with_task_columns(table: pa.Table, kind: str) -> pa.Table:
    """Shard rows (ITEM_SCHEMA but `branch` and `count`) with those columns, in schema order."""
    n = table.num_rows
    extra = {
        "branch": pa.array([kind], pa.string()).take(np.zeros(n, np.int64)),
        "count": pa.nulls(n, pa.int64()),
    }
    cols = [table.column(f.name) if f.name not in extra else extra[f.name] for f in ITEM_SCHEMA]
    return pa.Table.from_arrays(cols, schema=ITEM_SCHEMA)


def _missing_rows(task: dict[str, Any], ids: list[str], broken: str | None) -> list[dict]:
    """Error rows for `include`d ids the shard did not yield (`broken`: why it stopped)."""
    out = []
    for id_ in ids:
        member = wds_member(id_) if task["format"] == "webdataset" and "#" in id_ else None
        row = item_row(
            id_,
            f"{task['uri']}#{member}" if member else task["uri"],
            task["kind"],
            task["shard"],
            # The listing's fingerprint: the failure is kept until the member changes.
            member_fingerprint(task["fingerprint"] or "", member) if member else None,
            error=broken or "listed, but not found when the shard was read",
        )
        row["branch"] = task["kind"]
        out.append(row)
    return out


def read_tasks(
    batch: pa.Table,
    output_uri: str,
    storage_options: StorageOptions | None,
    progress: Any = None,
    chunk_rows: int = 64,
) -> Iterator[pa.Table]:
    """Ray Data `map_batches` function: task rows (`task` JSON) -> item rows, in tables of up
    to `chunk_rows` rows (the job passes its preprocessing block size, so each table is one
    block). `progress`: the job's `pipelines.progress.counter_actor()` (None: not counted)."""
    for t in batch.column("task").to_pylist():
        for table in read_shard_task(
            json.loads(t), output_uri, storage_options, chunk_rows=chunk_rows, progress=progress
        ):
            report(progress, "read", sum(s != STATUS_EOS for s in table["status"].to_pylist()))
            yield table
