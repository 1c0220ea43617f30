"""The row vocabulary of the embedding job: schemas, statuses, error kinds, fingerprints, and
the constructors of the rows that flow from the readers through the stages to the writers.

A row's `status` says what it is: an item to embed (`ok`), an item that already failed
(`error`, with the reason in `error`), or the end-of-shard marker (`eos`) a reader emits after
the last item of a (shard, kind) task, whose `count` is the number of items the task emitted.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
from collections.abc import Mapping
from typing import Any

import numpy as np
import pyarrow as pa

# Row status inside the pipeline: an item to embed, an item that already failed, or the
# end-of-shard marker a reader emits after the last item of a (shard, kind) task.
STATUS_OK = "ok"
STATUS_ERROR = "error"
STATUS_EOS = "eos"

# Pseudo-kind of rows rejected while reading (unknown modality, no uri/text): they skip
# preprocessing and encoding and go straight to the errors table.
INVALID = "invalid"

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


def part_embedding_type(dim: int) -> pa.DataType:
    """How a part file holds a vector: its float32 values as little-endian bytes,
    `fixed_size_binary(4 * dim)`.

    Why not `embedding_type`: a part is written once and read once, by its shard's commit,
    then deleted. Parquet stores a list column with a definition and a repetition level per
    float, and real embeddings hardly compress; as bytes in an uncompressed file
    (`PART_COMPRESSION`), a part's vectors cost a fraction of the CPU to write and to read
    (benchmarks/results/write-commit-2core.md). The committed files keep `embedding_type`.
    """
    return pa.binary(4 * dim)


# Parts are transient and nearly all vector bytes: stored uncompressed (`part_embedding_type`).
PART_COMPRESSION = "none"


def embedding_column(values: np.ndarray, valid: np.ndarray, dim: int) -> pa.Array:
    """(n, dim) float32 and which rows have a vector -> `embedding_type(dim)` (null elsewhere)."""
    flat = pa.array(np.ascontiguousarray(values, np.float32).reshape(-1), pa.float32())
    return pa.FixedSizeListArray.from_arrays(flat, dim, mask=pa.array(~np.asarray(valid, bool)))


def _one_array(col: pa.Array | pa.ChunkedArray) -> pa.Array:
    if isinstance(col, pa.ChunkedArray):
        return col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    return col


def embedding_values(col: pa.Array | pa.ChunkedArray, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """A column of vectors, either as `embedding_type` (any float list of width `dim`) or as
    part bytes (`part_embedding_type`) -> ((n, dim) float32, which rows have one). Rows
    without a vector hold whatever their slots hold (zeros as the encoder writes them)."""
    arr = _one_array(col)
    n = len(arr)
    valid = arr.is_valid().to_numpy(zero_copy_only=False)
    if n == 0:
        return np.zeros((0, dim), np.float32), valid
    if pa.types.is_fixed_size_binary(arr.type):
        if arr.type.byte_width != 4 * dim:
            raise ValueError(f"vectors of {arr.type.byte_width} bytes, expected {4 * dim}")
        data = arr.buffers()[1]
        values = np.frombuffer(data, "<f4", count=n * dim, offset=arr.offset * 4 * dim)
        return values.reshape(n, dim).astype(np.float32, copy=False), valid
    arr = arr.cast(embedding_type(dim))
    child = arr.values.slice(arr.offset * dim, n * dim)  # `.values` ignores the offset
    return child.to_numpy(zero_copy_only=False).reshape(n, dim), valid


def part_embedding(col: pa.Array | pa.ChunkedArray, dim: int) -> pa.Array:
    """A column of vectors (`embedding_values` takes either form) -> `part_embedding_type`."""
    arr = _one_array(col)
    if arr.type == part_embedding_type(dim):
        return arr
    values, valid = embedding_values(arr, dim)
    data = np.ascontiguousarray(values, "<f4")
    nulls = len(valid) - int(valid.sum())
    bitmap = pa.array(valid, pa.bool_()).buffers()[1] if nulls else None
    return pa.FixedSizeBinaryArray.from_buffers(
        part_embedding_type(dim), len(valid), [bitmap, pa.py_buffer(data)], null_count=nulls
    )


def encoded_schema(dim: int) -> pa.Schema:
    """Rows leaving the encoders: `tensor` replaced by `embedding` (null for non-ok rows)."""
    base = [f for f in ITEM_SCHEMA if f.name != "data"]
    return pa.schema([*base, pa.field("embedding", embedding_type(dim))])


def _pick(*names: str, **fields: pa.Field) -> list[pa.Field]:
    """Fields of ITEM_SCHEMA by name, in order; a name given in `fields` takes that field."""
    return [fields[n] if n in fields else ITEM_SCHEMA.field(n) for n in names]


def part_schema(dim: int) -> pa.Schema:
    """One part file: embedded and failed items of one shard (error null <=> embedded); the
    vectors as bytes (`part_embedding_type`)."""
    embedding = pa.field("embedding", part_embedding_type(dim))
    return pa.schema(
        _pick(
            "id", "uri", "modality", "embedding", "fingerprint", "size", "mtime", "error",
            embedding=embedding,
        )
    )  # fmt: skip


def output_schema(dim: int, metadata: Mapping[str, str] | None = None) -> pa.Schema:
    """The committed embeddings file `<shard>.parquet`."""
    embedding = pa.field("embedding", embedding_type(dim), nullable=False)
    fields = _pick(
        "id", "uri", "modality", "embedding", "fingerprint", "size", "mtime", embedding=embedding
    )
    return pa.schema(fields, metadata=dict(metadata or {}))


def errors_schema(metadata: Mapping[str, str] | None = None) -> pa.Schema:
    """`_errors/<shard>.parquet`: items that could not be embedded, with the reason."""
    error = pa.field("error", pa.string(), nullable=False)
    fields = _pick("id", "uri", "modality", "error", "fingerprint", "size", "mtime", error=error)
    return pa.schema(fields, metadata=dict(metadata or {}))


# The corpus listing of re-indexing (`pipelines.plan.list_items`): `source` is the manifest or
# tar the item is listed in (the file itself for the files format).
LISTING_SCHEMA = pa.schema(
    _pick(
        "id", "uri", "modality", "shard", "source", "fingerprint", "size", "mtime", "error",
        source=pa.field("source", pa.string()),
    )
)  # fmt: skip


# ----------------------------------------------------------------------------- row constructors

# The item columns a listing and a reader share (ITEM_SCHEMA adds branch, status, count, data).
ITEM_KEYS = ("id", "uri", "modality", "shard", "fingerprint", "size", "mtime")


def item_row(
    id_: str,
    uri: str | None,
    kind: str | None,
    shard: str,
    fingerprint: str | None = None,
    size: int | None = None,
    mtime: float | None = None,
    *,
    data: bytes | None = None,
    error: str | None = None,
) -> dict[str, Any]:
    """One item row (ITEM_SCHEMA, without `branch`): `ok`, or `error` when `error` is given."""
    return {
        "id": id_,
        "uri": uri,
        "modality": kind,
        "shard": shard,
        "fingerprint": fingerprint,
        "size": size,
        "mtime": mtime,
        "status": STATUS_OK if error is None else STATUS_ERROR,
        "error": error,
        "data": data,
    }


def unreadable_shard_row(
    shard: str, uri: str, kind: str, fingerprint: str | None, exc: BaseException
) -> dict[str, Any]:
    """The error row that stands for the unenumerable rest of a truncated or corrupt tar shard
    (id `<shard>#unreadable-<kind>`)."""
    return item_row(
        f"{shard}#unreadable-{kind}",
        uri,
        kind,
        shard,
        fingerprint,
        error=f"cannot read tar shard: {type(exc).__name__}: {exc}",
    )


def first_occurrences(ids: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Row indices of the first row of each distinct id, in row order (all rows when the ids
    are unique). Polars' distinct count and first-distinct mask: one hash pass, no Python per
    row, and about 4x faster than Arrow's `count_distinct` on 100k ids, which each listed
    item pays twice a re-index (planning and listing)."""
    import polars as pl

    n = len(ids)
    if n == 0:
        return np.arange(0)
    s = pl.Series(ids)
    if s.n_unique() == n:
        return np.arange(n)
    return np.flatnonzero(s.is_first_distinct().to_numpy())


def eos_row(shard: str, kind: str, count: int) -> dict[str, Any]:
    """The end-of-shard marker of a (shard, kind) task that emitted `count` items."""
    return {
        "id": f"{shard}#eos-{kind}",
        "shard": shard,
        "modality": kind,
        "branch": kind,
        "status": STATUS_EOS,
        "count": count,
    }


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
