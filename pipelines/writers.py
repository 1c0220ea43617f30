"""Output side of the embedding job: per-shard part files and atomic shard commits.

Exactly once: every part file is written atomically (`pipelines.store`) under a name derived
from the ids it holds, so a retried task overwrites its own part instead of adding a copy. When
every item of a shard is in its parts, `commit_shard` merges them (deduplicating by id as a
last safety net), writes `_errors/<shard>.parquet`, then creates `<shard>.parquet` if it does
not exist yet (`Output.create_table`) — its existence marks the shard done — and deletes the
parts. A committed file is never rewritten: a commit that finds `<shard>.parquet` keeps it and
commits only ids that none of the shard's committed files hold, into an addition
`<shard>.add-<hash of those ids>.parquet` (created the same way). A rerun skips committed shards
whose input identity is unchanged and, inside uncommitted ones, every id already in a part.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Iterable, Mapping
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from imagebind_core.index import join_uri
from imagebind_core.io import StorageOptions
from pipelines.rows import (
    PART_COMPRESSION,
    STATUS_EOS,
    STATUS_OK,
    SUMMARY_SCHEMA,
    embedding_column,
    embedding_values,
    errors_schema,
    first_occurrences,
    output_schema,
    part_embedding,
    part_schema,
)
from pipelines.store import Output, with_store_retries

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------- writing parts


def _ids_hash(ids: Iterable[str]) -> str:
    """SHA-1 hex digest of a set of ids (order does not matter): names derived from content."""
    h = hashlib.sha1()
    for i in sorted(ids):
        h.update(i.encode())
        h.update(b"\0")
    return h.hexdigest()


def _part_name(kind: str, ids: Iterable[str]) -> str:
    # Derived from the ids it holds: a task retried by Ray rewrites the same name.
    return f"{kind}-{_ids_hash(ids)[:20]}.parquet"


def _kind_parts(out: Output, shard: str, kind: str) -> list[str]:
    """The part files of one (shard, kind) (`_part_name`)."""
    parts = out.ls_files(out.parts_dir(shard))
    return [p for p in parts if p.rsplit("/", 1)[-1].startswith(f"{kind}-")]


def part_fingerprints(out: Output, shard: str, kind: str) -> dict[str, str | None]:
    """id -> fingerprint of the rows already in the parts of one (shard, kind): what an
    interrupted earlier run embedded."""
    keys: dict[str, str | None] = {}
    for p in _kind_parts(out, shard, kind):
        t = out.read_table(p, columns=["id", "fingerprint"])
        ids, fps = t.column("id").to_pylist(), t.column("fingerprint").to_pylist()
        keys.update(zip(ids, fps, strict=True))
    return keys


def drop_part_rows(out: Output, shard: str, kind: str, ids: Iterable[str]) -> None:
    """Remove the rows of `ids` from the parts of one (shard, kind): items an interrupted run
    embedded that changed or went away since. A part that keeps rows is written again under
    the name of the ids it keeps before the old one goes (a crash in between leaves two copies
    of the same rows, which the commit de-duplicates)."""
    drop = pa.array(sorted(ids), pa.string())
    for p in _kind_parts(out, shard, kind):
        t = out.read_table(p)
        kept = t.filter(pc.invert(pc.is_in(t.column("id"), drop)))
        if kept.num_rows == t.num_rows:
            continue
        name = _part_name(kind, kept.column("id").to_pylist()) if kept.num_rows else None
        if name is not None:
            out.write_table_atomic(join_uri(out.parts_dir(shard), name), kept, PART_COMPRESSION)
        if name != p.rsplit("/", 1)[-1]:
            with contextlib.suppress(FileNotFoundError):
                out.fs.rm(p)


def _group_rows(batch: pa.Table) -> tuple[dict[tuple[str, str], list[int]], dict]:
    """Row indices of a block per (shard, kind), and the expected item count of each (shard,
    kind) whose end-of-shard marker the block carries."""
    status = batch.column("status").to_pylist()
    shards = batch.column("shard").to_pylist()
    kinds = batch.column("branch").to_pylist()
    counts = batch.column("count").to_pylist()
    groups: dict[tuple[str, str], list[int]] = {}
    expected: dict[tuple[str, str], int] = {}
    for i, (st, sh, k) in enumerate(zip(status, shards, kinds, strict=True)):
        if st == STATUS_EOS:
            expected[(sh, k)] = int(counts[i])
            groups.setdefault((sh, k), [])
        else:
            groups.setdefault((sh, k), []).append(i)
    return groups, expected


def _part_table(sub: pa.Table, embed_dim: int) -> pa.Table:
    """Rows of one (shard, kind) as a part file: `error` null for ok rows, otherwise the
    reason ("unknown error" where none was given)."""
    none = pa.scalar(None, pa.string())
    given = pc.if_else(pc.equal(sub.column("error"), ""), none, sub.column("error"))
    err = pc.if_else(
        pc.fill_null(pc.equal(sub.column("status"), STATUS_OK), False),
        none,
        pc.coalesce(given, "unknown error"),
    ).combine_chunks()
    return pa.table(
        {
            "id": sub.column("id"),
            "uri": sub.column("uri"),
            "modality": sub.column("modality"),
            "embedding": part_embedding(sub.column("embedding"), embed_dim),
            "fingerprint": sub.column("fingerprint"),
            "size": sub.column("size"),
            "mtime": sub.column("mtime"),
            "error": err,
        },
        schema=part_schema(embed_dim),
    )


def write_parts(
    batch: pa.Table,
    output_uri: str,
    storage_options: StorageOptions | None,
    embed_dim: int,
) -> pa.Table:
    """Write the ok/error rows of an encoded block as one part file per (shard, kind).

    Returns one summary row per (shard, kind): the ids written, and the expected item count
    when the block carried that task's end-of-shard marker. Usable as a Ray Data
    `map_batches` function (batch_format="pyarrow") or directly.
    """
    out = Output(output_uri, storage_options)
    groups, expected = _group_rows(batch)
    rows: dict[str, list[Any]] = {f.name: [] for f in SUMMARY_SCHEMA}
    for (shard, kind), idx in groups.items():
        ids: list[str] = []
        n_err = 0
        if idx:
            part = _part_table(batch.take(pa.array(idx, pa.int64())), embed_dim)
            n_err = part.num_rows - part.column("error").null_count
            ids = part.column("id").to_pylist()
            path = join_uri(out.parts_dir(shard), _part_name(kind, ids))
            # A part's name derives from its ids: writing it again is harmless.
            with_store_retries(
                lambda p=path, t=part: out.write_table_atomic(p, t, PART_COMPRESSION),
                f"writing {path}",
                output_uri,
                storage_options,
            )
        rows["shard"].append(shard)
        rows["kind"].append(kind)
        rows["ids"].append(ids)
        rows["expected"].append(expected.get((shard, kind)))
        rows["n_ok"].append(len(ids) - n_err)
        rows["n_err"].append(n_err)
    return pa.table(rows, schema=SUMMARY_SCHEMA)


# ------------------------------------------------------------------------- committing


def _dedupe(table: pa.Table, shard: str) -> pa.Table:
    keep = first_occurrences(table.column("id"))
    if len(keep) != table.num_rows:
        logger.warning("shard %s: %d duplicate rows dropped", shard, table.num_rows - len(keep))
        table = table.take(pa.array(keep, pa.int64()))
    return table


def _num_rows(out: Output, path: str) -> int:
    with out.fs.open(path, "rb") as f:
        return pq.ParquetFile(f).metadata.num_rows


def _read_part(out: Output, path: str, embed_dim: int) -> pa.Table:
    """A part file as `part_schema`; its vectors may be float lists (parts written by
    versions before `part_embedding_type`, left by an interrupted run)."""
    t = out.read_table(path)
    i = t.schema.get_field_index("embedding")
    if i >= 0:
        t = t.set_column(i, "embedding", part_embedding(t.column(i), embed_dim))
    return t.cast(part_schema(embed_dim))


def _merged_parts(out: Output, shard: str, embed_dim: int) -> pa.Table:
    """Every row of the shard's part files, deduplicated by id (first part in name order
    wins) and sorted by id."""
    pschema = part_schema(embed_dim)
    tables = [_read_part(out, p, embed_dim) for p in out.ls_files(out.parts_dir(shard))]
    table = pa.concat_tables(tables) if tables else pschema.empty_table()
    return _dedupe(table, shard).sort_by("id")


def _write_commit(
    out: Output,
    shard: str,
    main: str,
    errors: str,
    table: pa.Table,
    embed_dim: int,
    metadata: Mapping[str, str],
) -> tuple[int, int]:
    """Write the failed rows of `table` to `errors` (or remove a stale one), then create
    `main` with the embedded rows; (embedded, failed) counts."""
    is_err = table.column("error").is_valid()
    bad = table.filter(is_err)
    # A filter copies every vector; most shards have no failed rows, and keep them in place.
    good = table.filter(pc.invert(is_err)) if bad.num_rows else table
    meta = dict(metadata)
    if bad.num_rows:
        out.write_table_atomic(
            errors, bad.select([f.name for f in errors_schema()]).cast(errors_schema(meta))
        )
    elif out.exists(errors):
        out.fs.rm(errors)
    schema = output_schema(embed_dim, meta)
    vectors = embedding_column(*embedding_values(good.column("embedding"), embed_dim), embed_dim)
    good = good.set_column(good.schema.get_field_index("embedding"), "embedding", vectors)
    if not out.create_table(main, good.select(schema.names).cast(schema)):
        # another commit of the same rows won the race; it is the same data
        logger.warning("shard %s: %s was committed concurrently; kept as it is", shard, main)
    return good.num_rows, bad.num_rows


def commit_shard(
    output_uri: str,
    shard: str,
    storage_options: StorageOptions | None,
    embed_dim: int,
    metadata: Mapping[str, str],
    identity: str | None = None,
) -> dict[str, Any]:
    """Merge a complete shard's parts into `<shard>.parquet` (+ `_errors/<shard>.parquet`).

    Idempotent, and never rewrites a committed file: run again after a crash at any point, as
    a retried task or by a second driver, it leaves what is committed as it is. When the shard
    is committed already, the parts' ids that no committed file of the shard holds go to an
    addition `<shard>.add-<hash>.parquet` (+ errors); the others are dropped. Rows are
    deduplicated by id (first part in name order wins) and sorted by id. `identity` (the
    input identity the shard now covers) is recorded for the next run. Returns {"shard",
    "ok", "errors", "added"}: rows this call committed (for a shard committed before, with
    nothing new: what its main files hold), and whether they went to an addition.
    """
    out = Output(output_uri, storage_options)
    table = _merged_parts(out, shard, embed_dim)
    main, errors = out.shard_path(shard), out.errors_path(shard)
    committed = out.exists(main)
    result: dict[str, Any] = {"shard": shard, "ok": 0, "errors": 0, "added": False}
    if committed:
        done = out.committed_ids(shard)
        new = [i for i, id_ in enumerate(table.column("id").to_pylist()) if id_ not in done]
        table = table.take(pa.array(new, pa.int64()))
    files = None  # the committed files the input record vouches for: listed, unless known
    if committed and not table.num_rows:
        result["ok"] = _num_rows(out, main)
        if out.exists(errors):
            result["errors"] = _num_rows(out, errors)
    else:
        if committed:
            suffix = ".add-" + _ids_hash(table.column("id").to_pylist())[:12]
            main, errors = out.path(f"{shard}{suffix}.parquet"), out.errors_path(shard + suffix)
            result["added"] = True
        result["ok"], result["errors"] = _write_commit(
            out, shard, main, errors, table, embed_dim, metadata
        )
        if not committed:  # a first commit: its files are these two (a listing of the
            # output's folder per commit would cost O(shards) each on an object store)
            files = out.sizes_of([main, errors])
    if identity is not None:
        out.write_identity(shard, identity, files)
    out.rm_parts(shard)
    return result
