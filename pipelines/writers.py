"""Output side of the embedding job: schemas, per-shard parts, atomic shard commits.

Layout under the output URI (local folder or `s3://bucket/prefix`):

    <shard>.parquet            committed embeddings of one input shard (the commit marker)
    _errors/<shard>.parquet    items of that shard that failed, with the reason
    _parts/<shard>/*.parquet   work in progress: one file per (block, shard, kind)
    _job.json                  what produced this output (model lineage, input, shard count)
    _lock                      held by the run writing here (see pipelines.lock)

Exactly once: every part file is written atomically (temporary name + rename on a local disk;
one PUT on S3) under a name derived from the ids it holds, so a retried task overwrites its own
part instead of adding a copy. When every item of a shard is in its parts, `commit_shard`
merges them (deduplicating by id as a last safety net), writes `_errors/<shard>.parquet`, then
`<shard>.parquet` atomically — its existence marks the shard done — and deletes the parts. A
rerun skips committed shards and, inside uncommitted ones, every id already in a part.
Readers of the output (pyarrow, Ray Data, DuckDB) ignore `_`-prefixed folders by default.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import logging
import os
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from imagebind_core.io import StorageOptions, filesystem, protocol_of

logger = logging.getLogger(__name__)

PARTS_DIR = "_parts"
ERRORS_DIR = "_errors"
JOB_RECORD = "_job.json"

# Row status inside the pipeline: an item to embed, an item that already failed, or the
# end-of-shard marker a reader emits after the last item of a (shard, kind) task.
STATUS_OK = "ok"
STATUS_ERROR = "error"
STATUS_EOS = "eos"

# The rows flowing from the readers into preprocessing (`data`: inline bytes or UTF-8 text;
# null means "read `uri`").
ITEM_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("uri", pa.string()),
        pa.field("modality", pa.string()),
        pa.field("shard", pa.string()),
        pa.field("branch", pa.string()),  # the kind of the task (pipeline branch) it came from
        pa.field("fingerprint", pa.string()),
        pa.field("size", pa.int64()),
        pa.field("mtime", pa.float64()),
        pa.field("status", pa.string()),
        pa.field("error", pa.string()),
        pa.field("count", pa.int64()),
        pa.field("data", pa.large_binary()),
    ]
)
# After preprocessing: `data` replaced by the item's model input: raw bytes (one contiguous
# buffer per block), shape and numpy dtype string (pipelines.stages.tensor_columns).
PREPROCESSED_SCHEMA = pa.schema(
    [f for f in ITEM_SCHEMA if f.name != "data"]
    + [
        pa.field("tensor", pa.large_binary()),
        pa.field("tensor_shape", pa.list_(pa.int32())),
        pa.field("tensor_dtype", pa.string()),
    ]
)

SUMMARY_SCHEMA = pa.schema(
    [
        pa.field("shard", pa.string()),
        pa.field("kind", pa.string()),
        pa.field("ids", pa.list_(pa.string())),
        pa.field("expected", pa.int64()),
        pa.field("n_ok", pa.int64()),
        pa.field("n_err", pa.int64()),
    ]
)


def embedding_type(dim: int) -> pa.DataType:
    """`fixed_size_list<float32>[dim]`."""
    return pa.list_(pa.float32(), dim)


def encoded_schema(dim: int) -> pa.Schema:
    """Rows leaving the encoders: `tensor` replaced by `embedding` (null for non-ok rows)."""
    base = [f for f in ITEM_SCHEMA if f.name != "data"]
    return pa.schema([*base, pa.field("embedding", embedding_type(dim))])


def part_schema(dim: int) -> pa.Schema:
    """One part file: embedded and failed items of one shard (error null <=> embedded)."""
    return pa.schema(
        [
            pa.field("id", pa.string(), nullable=False),
            pa.field("uri", pa.string()),
            pa.field("modality", pa.string()),
            pa.field("embedding", embedding_type(dim)),
            pa.field("fingerprint", pa.string()),
            pa.field("size", pa.int64()),
            pa.field("mtime", pa.float64()),
            pa.field("error", pa.string()),
        ]
    )


def output_schema(dim: int, metadata: Mapping[str, str] | None = None) -> pa.Schema:
    """The committed embeddings file `<shard>.parquet`."""
    fields = [
        pa.field("id", pa.string(), nullable=False),
        pa.field("uri", pa.string()),
        pa.field("modality", pa.string()),
        pa.field("embedding", embedding_type(dim), nullable=False),
        pa.field("fingerprint", pa.string()),
        pa.field("size", pa.int64()),
        pa.field("mtime", pa.float64()),
    ]
    return pa.schema(fields, metadata=dict(metadata or {}))


def errors_schema(metadata: Mapping[str, str] | None = None) -> pa.Schema:
    """`_errors/<shard>.parquet`: items that could not be embedded, with the reason."""
    fields = [
        pa.field("id", pa.string(), nullable=False),
        pa.field("uri", pa.string()),
        pa.field("modality", pa.string()),
        pa.field("error", pa.string(), nullable=False),
        pa.field("fingerprint", pa.string()),
        pa.field("size", pa.int64()),
        pa.field("mtime", pa.float64()),
    ]
    return pa.schema(fields, metadata=dict(metadata or {}))


# ------------------------------------------------------------------------- fingerprints


def _epoch(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, _dt.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=_dt.UTC)
        return value.timestamp()
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def fingerprint_from_info(info: Mapping[str, Any]) -> tuple[str, int | None, float | None]:
    """(fingerprint, size, mtime) of an object from its listing entry alone (no bytes read).

    The fingerprint is `etag:<ETag>` when the store reports one (S3 and compatibles), else
    `stat:<size>:<mtime>` (local files; mtime in seconds with microseconds). Re-indexing
    compares these strings to decide what changed.
    """
    size = info.get("size")
    size = int(size) if size is not None else None
    mtime = _epoch(info.get("mtime", info.get("LastModified", info.get("last_modified"))))
    etag = info.get("ETag") or info.get("etag")
    if etag:
        return f"etag:{str(etag).strip(chr(34))}", size, mtime
    return f"stat:{size}:{mtime:.6f}" if mtime is not None else f"stat:{size}:", size, mtime


def text_fingerprint(text: str) -> str:
    """Fingerprint of an inline text item: a hash of its UTF-8 bytes."""
    return "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()


def member_fingerprint(tar_fingerprint: str, member: str) -> str:
    """Fingerprint of a WebDataset member: the tar shard's fingerprint plus the member name."""
    return f"{tar_fingerprint}#{member}"


# --------------------------------------------------------------------------- file helpers


def join(root: str, *parts: str) -> str:
    """Join fs paths with '/' (object-store paths never use os.sep)."""
    out = root.rstrip("/")
    for p in parts:
        if p:
            out = f"{out}/{p.strip('/')}"
    return out


class Output:
    """The output location: an fsspec filesystem plus the root path inside it."""

    def __init__(self, uri: str, storage_options: StorageOptions | None = None) -> None:
        self.uri = uri
        self.storage_options = dict(storage_options or {})
        self.fs, root = filesystem(uri, storage_options)
        self.root = root.rstrip("/") or root
        self.local = protocol_of(uri) == "file"

    def path(self, *parts: str) -> str:
        return join(self.root, *parts)

    def shard_path(self, shard: str) -> str:
        return self.path(f"{shard}.parquet")

    def errors_path(self, shard: str) -> str:
        return self.path(ERRORS_DIR, f"{shard}.parquet")

    def parts_dir(self, shard: str) -> str:
        return self.path(PARTS_DIR, shard)

    def makedirs(self, path: str) -> None:
        if self.local:
            os.makedirs(path, exist_ok=True)

    def exists(self, path: str) -> bool:
        with contextlib.suppress(Exception):
            self.fs.invalidate_cache(path)
        return self.fs.exists(path)

    def ls_files(self, path: str) -> list[str]:
        """Files directly under `path` (none if it does not exist); hidden/temporary excluded."""
        with contextlib.suppress(Exception):
            self.fs.invalidate_cache(path)
        try:
            entries = self.fs.ls(path, detail=True)
        except (FileNotFoundError, NotADirectoryError):
            return []
        out = []
        for e in entries:
            name = e["name"].rstrip("/").rsplit("/", 1)[-1]
            if e.get("type") == "file" and not name.startswith(".") and name.endswith(".parquet"):
                out.append(e["name"])
        return sorted(out)

    def write_bytes_atomic(self, path: str, data: bytes) -> None:
        """Write `path` so that readers see all of it or nothing."""
        if self.local:
            d, name = os.path.split(path)
            os.makedirs(d, exist_ok=True)
            tmp = os.path.join(d, f".{name}.{uuid.uuid4().hex}.tmp")
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        else:  # one PUT (or a multipart upload completed on close): atomic on S3
            with self.fs.open(path, "wb") as f:
                f.write(data)

    def write_table_atomic(self, path: str, table: pa.Table) -> None:
        """Write a Parquet file atomically."""
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd")
        self.write_bytes_atomic(path, sink.getvalue().to_pybytes())

    def read_table(self, path: str, columns: list[str] | None = None) -> pa.Table:
        with self.fs.open(path, "rb") as f:
            return pq.read_table(f, columns=columns)

    def read_json(self, path: str) -> dict | None:
        try:
            with self.fs.open(path, "rb") as f:
                return json.loads(f.read())
        except FileNotFoundError:
            return None

    def rm_tree(self, path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(path, recursive=True)
        with contextlib.suppress(Exception):
            self.fs.invalidate_cache(path)

    def committed_shards(self) -> set[str]:
        """Names of the shards whose `<shard>.parquet` exists."""
        with contextlib.suppress(Exception):
            self.fs.invalidate_cache(self.root)
        try:
            files = self.fs.find(self.root)
        except FileNotFoundError:
            return set()
        out = set()
        prefix = self.root.rstrip("/") + "/"
        for f in files:
            rel = f[len(prefix) :] if f.startswith(prefix) else f
            parts = rel.split("/")
            if any(p.startswith(("_", ".")) for p in parts) or not rel.endswith(".parquet"):
                continue
            out.add(rel[: -len(".parquet")])
        return out

    def leftover_parts(self, committed: set[str]) -> list[str]:
        """Committed shards that still have a `_parts/<shard>/` folder: a run that died between
        writing `<shard>.parquet` and deleting the parts. Only disk space; reruns clean it."""
        base = self.path(PARTS_DIR)
        try:
            files = self.fs.find(base)
        except FileNotFoundError:
            return []
        prefix = base.rstrip("/") + "/"
        shards = {f[len(prefix) :].rsplit("/", 1)[0] for f in files if f.startswith(prefix)}
        return sorted(s for s in shards if s in committed)

    def part_ids(self, shard: str) -> set[str]:
        """Ids already written to parts of an uncommitted shard (resume inside a shard)."""
        ids: set[str] = set()
        for p in self.ls_files(self.parts_dir(shard)):
            ids.update(self.read_table(p, columns=["id"]).column("id").to_pylist())
        return ids


# ------------------------------------------------------------------------- the job record


def read_job_record(output: Output) -> dict | None:
    """`<output>/_job.json`, or None on a fresh output."""
    return output.read_json(output.path(JOB_RECORD))


def write_job_record(output: Output, record: Mapping[str, Any]) -> None:
    output.write_bytes_atomic(
        output.path(JOB_RECORD), json.dumps(dict(record), indent=2, sort_keys=True).encode()
    )


# ------------------------------------------------------------------------- writing parts


def _part_name(kind: str, ids: Iterable[str]) -> str:
    # Derived from the ids it holds: a task retried by Ray rewrites the same name.
    h = hashlib.sha1()
    for i in sorted(ids):
        h.update(i.encode())
        h.update(b"\0")
    return f"{kind}-{h.hexdigest()[:20]}.parquet"


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
    pschema = part_schema(embed_dim)
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
    rows: dict[str, list[Any]] = {f.name: [] for f in SUMMARY_SCHEMA}
    for (shard, kind), idx in groups.items():
        ids: list[str] = []
        n_err = 0
        if idx:
            sub = batch.take(pa.array(idx, pa.int64()))
            err = pa.array(
                [
                    None if s == STATUS_OK else (e or "unknown error")
                    for s, e in zip(
                        sub.column("status").to_pylist(),
                        sub.column("error").to_pylist(),
                        strict=True,
                    )
                ],
                pa.string(),
            )
            n_err = sum(1 for e in err.to_pylist() if e is not None)
            part = pa.table(
                {
                    "id": sub.column("id"),
                    "uri": sub.column("uri"),
                    "modality": sub.column("modality"),
                    "embedding": sub.column("embedding").cast(embedding_type(embed_dim)),
                    "fingerprint": sub.column("fingerprint"),
                    "size": sub.column("size"),
                    "mtime": sub.column("mtime"),
                    "error": err,
                },
                schema=pschema,
            )
            ids = part.column("id").to_pylist()
            path = join(out.parts_dir(shard), _part_name(kind, ids))
            out.write_table_atomic(path, part)
        rows["shard"].append(shard)
        rows["kind"].append(kind)
        rows["ids"].append(ids)
        rows["expected"].append(expected.get((shard, kind)))
        rows["n_ok"].append(len(ids) - n_err)
        rows["n_err"].append(n_err)
    return pa.table(rows, schema=SUMMARY_SCHEMA)


# ------------------------------------------------------------------------- committing


def commit_shard(
    output_uri: str,
    shard: str,
    storage_options: StorageOptions | None,
    embed_dim: int,
    metadata: Mapping[str, str],
) -> dict[str, Any]:
    """Merge a complete shard's parts into `<shard>.parquet` (+ `_errors/<shard>.parquet`).

    Idempotent: run again after a crash at any point it produces the same files. Rows are
    deduplicated by id (first part in name order wins) and sorted by id.
    Returns {"shard", "ok", "errors"}.
    """
    out = Output(output_uri, storage_options)
    parts = out.ls_files(out.parts_dir(shard))
    pschema = part_schema(embed_dim)
    tables = [out.read_table(p).cast(pschema) for p in parts]
    table = pa.concat_tables(tables) if tables else pschema.empty_table()
    seen: set[str] = set()
    keep = []
    for i, id_ in enumerate(table.column("id").to_pylist()):
        if id_ not in seen:
            seen.add(id_)
            keep.append(i)
    if len(keep) != table.num_rows:
        logger.warning("shard %s: %d duplicate rows dropped", shard, table.num_rows - len(keep))
        table = table.take(pa.array(keep, pa.int64()))
    table = table.sort_by("id")
    is_err = table.column("error").is_valid()
    good = table.filter(pc.invert(is_err))
    bad = table.filter(is_err)
    meta = dict(metadata)
    if bad.num_rows:
        out.write_table_atomic(
            out.errors_path(shard),
            bad.select([f.name for f in errors_schema()]).cast(errors_schema(meta)),
        )
    elif out.exists(out.errors_path(shard)):
        out.fs.rm(out.errors_path(shard))
    out.write_table_atomic(
        out.shard_path(shard),
        good.select([f.name for f in output_schema(embed_dim)]).cast(
            output_schema(embed_dim, meta)
        ),
    )
    out.rm_tree(out.parts_dir(shard))
    return {"shard": shard, "ok": good.num_rows, "errors": bad.num_rows}
