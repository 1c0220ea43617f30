"""The two compute stages of the embedding job, callable with or without Ray.

- `preprocess_batch`: a stateless CPU function (Ray tasks): fetch each item's bytes (inline,
  or from its URI with a few threads to hide object-store latency), run
  `imagebind_core.preprocess` into the item's smallest exact form (still images as uint8
  pixels, texts as int32 token ids through their end-of-text token), and hand the block's
  inputs on as one contiguous buffer (`tensor_columns`); texts leave sorted by length. A bad
  item becomes an error row (`InvalidInput`'s reason, no tensor), never an exception out of
  the block.
- `EncodeBatch`: a callable class (one Ray actor per pool member), a thin wrapper over
  `imagebind_core.EncoderRunner`: it views a block's inputs as (B, ...) arrays without
  copying them row by row (`batch_arrays`), and the runner moves, expands and encodes them.
  No decoding happens here, so a GPU actor never waits on CPU work — except with the opt-in
  `preprocess.decode: {vision: gpu}`: JPEG files then travel as they are (`ENCODED_JPEG`
  rows, only their header checked in preprocessing) and the actor decodes, resizes and crops
  them in batches on its device (`EncoderRunner.decode_jpegs`); the files the device refuses
  take the exact CPU path there, one by one.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import os
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NoReturn

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

import imagebind_core as ibc
from imagebind_core.io import StorageOptions, filesystem, protocol_of
from pipelines.progress import report
from pipelines.rows import (
    PREPROCESSED_SCHEMA,
    STATUS_EOS,
    STATUS_ERROR,
    STATUS_OK,
    embedding_column,
    encoded_schema,
    fingerprint_from_info,
)
from pipelines.store import transient_store_error, with_store_retries

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- transport

# `tensor_dtype` of a row whose `tensor` is the item's JPEG file, to be decoded by the encoder
# on its device (`preprocess.decode: {vision: gpu}`); its `tensor_shape` is [bytes].
ENCODED_JPEG = "jpeg"


def compact_input(kind: str, t: Any) -> np.ndarray:
    """One item's model input (`preprocess(..., compact=True)`) -> the form it travels in.

    Texts: int32 token ids (the vocabulary has 49 408) without the zero padding after the
    last token, padded back with zeros to the batch's longest row by `batch_arrays`: the
    tokenizer's ids, cut where only padding follows (the model drops those columns anyway,
    `ImageBindModel.encode`). Everything else as preprocessed (still images are uint8 already).
    """
    a = t if isinstance(t, np.ndarray) else t.numpy()
    if kind == "text":
        nz = np.flatnonzero(a)
        return a[: int(nz[-1]) + 1 if nz.size else 0].astype(np.int32)
    return a


def tensor_columns(
    arrays: Sequence[np.ndarray | None], dtypes: Sequence[str | None] | None = None
) -> tuple[pa.Array, pa.Array, pa.Array]:
    """Per-row arrays (None for rows without one) -> (`tensor`, `tensor_shape`,
    `tensor_dtype`) columns. `tensor` holds each row's raw C-order bytes, all rows in one
    contiguous buffer (a null row adds no bytes), so a run of rows is one slice of it.
    `dtypes` names a row's `tensor_dtype` where not None (`ENCODED_JPEG`) instead of its
    array's dtype."""
    n = len(arrays)
    flat = [
        None if a is None else np.ascontiguousarray(a).reshape(-1).view(np.uint8) for a in arrays
    ]
    sizes = np.array([0 if a is None else a.size for a in flat], np.int64)
    offsets = np.zeros(n + 1, np.int64)
    np.cumsum(sizes, out=offsets[1:])
    data = np.empty(int(offsets[-1]), np.uint8)
    for a, o in zip(flat, offsets[:-1].tolist(), strict=True):
        if a is not None:
            data[o : o + a.size] = a
    valid = pa.array([a is not None for a in arrays], pa.bool_())
    tensor = pa.LargeBinaryArray.from_buffers(
        pa.large_binary(),
        n,
        [valid.buffers()[1], pa.py_buffer(offsets), pa.py_buffer(data)],
        null_count=n - int(valid.true_count),
    )
    shape = pa.array([None if a is None else list(a.shape) for a in arrays], pa.list_(pa.int32()))
    names = [None if a is None else a.dtype.str for a in arrays]
    if dtypes is not None:
        names = [d or n for n, d in zip(names, dtypes, strict=True)]
    dtype = pa.array(names, pa.string())
    return tensor, shape, dtype


def jpeg_rows(batch: pa.Table, rows: Sequence[int]) -> list[int]:
    """Those of `rows` that carry a JPEG file for the encoder (`ENCODED_JPEG`)."""
    dtypes = batch.column("tensor_dtype")
    if not pc.any(pc.equal(dtypes, ENCODED_JPEG)).as_py():
        return []
    names = dtypes.to_pylist()
    return [i for i in rows if names[i] == ENCODED_JPEG]


def token_columns(ids: np.ndarray, present: np.ndarray) -> tuple[pa.Array, pa.Array, pa.Array]:
    """Texts' token ids, (n, context) int64 (any values in rows where `present` is False) ->
    the `tensor_columns` of their compact forms (`compact_input`: int32 through the last
    non-zero id), built with array operations: no Python per row."""
    n, width = ids.shape
    nonzero = ids != 0
    keep = np.where(
        present & nonzero.any(axis=1), width - np.argmax(nonzero[:, ::-1], axis=1), 0
    ).astype(np.int64)
    # Boolean indexing walks the matrix in row-major order: row i's ids, then row i + 1's.
    data = ids[np.arange(width) < keep[:, None]].astype(np.int32)
    offsets = np.zeros(n + 1, np.int64)
    np.cumsum(keep * data.itemsize, out=offsets[1:])
    valid = pa.array(present, pa.bool_())
    nulls = n - int(np.count_nonzero(present))
    tensor = pa.LargeBinaryArray.from_buffers(
        pa.large_binary(),
        n,
        [valid.buffers()[1], pa.py_buffer(offsets), pa.py_buffer(data.view(np.uint8))],
        null_count=nulls,
    )
    list_offsets = np.zeros(n + 1, np.int32)
    np.cumsum(present, out=list_offsets[1:])
    mask = pa.array(~present, pa.bool_())
    shape = pa.ListArray.from_arrays(
        pa.array(list_offsets), pa.array(keep[present].astype(np.int32)), mask=mask
    )
    dtype = pc.if_else(valid, np.dtype(np.int32).str, pa.scalar(None, pa.string()))
    return tensor, shape, dtype


def batch_arrays(
    batch: pa.Table, rows: Sequence[int], pad: bool = False
) -> list[tuple[list[int], np.ndarray | ibc.RowParts]]:
    """The inputs of `rows` as batches: one (row indices, (n, ...) array) per item shape and
    dtype, in first-row order. Rows that are neighbours in a block's buffer (null rows
    between them add no bytes) are a zero-copy view of it. A batch whose rows lie in several
    runs (the blocks Ray Data joined into one call, or rows of other shapes between them) is
    an `ibc.RowParts` of those views: the runner copies it once, where it must be contiguous.

    Args:
        pad: 1-D rows of one dtype form one batch whatever their lengths, zero-padded to the
            longest (token ids, see `compact_input`): a new array, so the blocks' token ids
            (small) are joined first.
    """
    if not rows:
        return []
    chunked = batch.column("tensor")
    if pad:
        col = chunked.chunk(0) if chunked.num_chunks == 1 else chunked.combine_chunks()
        offsets, buf = _buffer_of(col)
        padded = _padded_run(batch, rows, offsets, buf)
        if padded is not None:
            return [padded]
        chunks = [(0, offsets, buf)]
    else:
        chunks = _chunk_buffers(chunked)
    firsts = np.array([c[0] for c in chunks], np.int64)
    shapes = batch.column("tensor_shape").to_pylist()
    dtypes = batch.column("tensor_dtype").to_pylist()
    groups: dict[tuple, list[int]] = {}
    for i in rows:
        shape = tuple(shapes[i])
        key = (len(shape), dtypes[i]) if pad and len(shape) == 1 else (shape, dtypes[i])
        groups.setdefault(key, []).append(i)
    out: list[tuple[list[int], np.ndarray | ibc.RowParts]] = []
    for (shape, dt), idx in groups.items():
        dtype = np.dtype(dt)
        if isinstance(shape, int):  # padded 1-D rows
            offsets, buf = chunks[0][1], chunks[0][2]
            width = max(int(shapes[i][0]) for i in idx)
            x = np.zeros((len(idx), width), dtype)
            for j, i in enumerate(idx):
                x[j, : shapes[i][0]] = buf[offsets[i] : offsets[i + 1]].view(dtype)
            out.append((idx, x))
            continue
        sel = np.asarray(idx, np.int64)
        which = np.searchsorted(firsts, sel, side="right") - 1
        local = sel - firsts[which]
        starts = np.array([chunks[c][1][r] for c, r in zip(which, local, strict=True)])
        ends = np.array([chunks[c][1][r + 1] for c, r in zip(which, local, strict=True)])
        # A new run where the chunk changes or a row does not start where the last one ended.
        breaks = np.flatnonzero((which[1:] != which[:-1]) | (starts[1:] != ends[:-1])) + 1
        bounds = [0, *breaks.tolist(), len(idx)]
        views = [
            chunks[which[a]][2][starts[a] : ends[b - 1]].view(dtype).reshape(b - a, *shape)
            for a, b in itertools.pairwise(bounds)
        ]
        out.append((idx, views[0] if len(views) == 1 else ibc.RowParts(views)))
    return out


def _buffer_of(col: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """A `tensor` chunk's row offsets (len + 1, int64) and its data buffer as uint8."""
    offsets = np.frombuffer(col.buffers()[1], np.int64)[col.offset : col.offset + len(col) + 1]
    data = col.buffers()[2]
    return offsets, np.frombuffer(data, np.uint8) if data is not None else np.empty(0, np.uint8)


def _chunk_buffers(chunked: pa.ChunkedArray) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """Each chunk (received block) of a `tensor` column: (its first row in the column, its
    row offsets, its data buffer), as `_buffer_of`; nothing copied."""
    out, first = [], 0
    for col in chunked.chunks:
        out.append((first, *_buffer_of(col)))
        first += len(col)
    return out


def model_batches(
    groups: list[tuple[list[int], np.ndarray | ibc.RowParts]], batch_size: int | None
) -> list[tuple[list[int], np.ndarray | ibc.RowParts]]:
    """`batch_arrays`' groups cut into batches of at most `batch_size` rows (None: as they
    are), each a view of its group. A 2-D integer group (token ids, zero-padded) loses the
    columns past its batch's last non-zero id: the model ignores them, the copy need not."""
    if not batch_size:
        return groups
    out = []
    for idx, x in groups:
        for s in range(0, len(idx), batch_size):
            part = x[s : s + batch_size]
            if (
                isinstance(part, np.ndarray)
                and part.ndim == 2
                and part.dtype.kind in "iu"
                and len(idx) > batch_size
            ):
                used = part.any(axis=0)
                part = part[:, : len(used) - int(np.argmax(used[::-1])) if used.any() else 0]
            out.append((idx[s : s + batch_size], part))
    return out


def encoded_rows(batch: pa.Table, rows: Sequence[int]) -> list[memoryview]:
    """The `tensor` bytes of `rows` (`ENCODED_JPEG` rows: the files), as zero-copy views of
    the buffers of the blocks they came in."""
    chunks = _chunk_buffers(batch.column("tensor"))
    firsts = [c[0] for c in chunks]
    out = []
    for i in rows:
        first, offsets, buf = chunks[bisect.bisect_right(firsts, i) - 1]
        out.append(memoryview(buf[offsets[i - first] : offsets[i - first + 1]]))
    return out


def _padded_run(
    batch: pa.Table, rows: Sequence[int], offsets: np.ndarray, buf: np.ndarray
) -> tuple[list[int], np.ndarray] | None:
    """`batch_arrays(..., pad=True)` with array operations, for the common case of a text
    block: every row of `rows` 1-D, of one dtype, and the rows one run of the buffer in order
    (neighbours, null rows between them adding no bytes). None otherwise."""
    sel = np.asarray(rows, np.int64)
    starts, ends = offsets[sel], offsets[sel + 1]
    if not np.array_equal(starts[1:], ends[:-1]):
        return None
    dtypes = pc.unique(batch.column("tensor_dtype").take(sel))
    shapes = batch.column("tensor_shape").take(sel)
    if len(dtypes) != 1 or dtypes[0].as_py() is None:
        return None
    if pc.any(pc.not_equal(pc.list_value_length(shapes), 1)).as_py():
        return None
    dtype = np.dtype(dtypes[0].as_py())
    lens = (ends - starts) // dtype.itemsize
    x = np.zeros((len(sel), int(lens.max())), dtype)
    # Row-major boolean assignment fills row 0's leading cells, then row 1's: buffer order.
    x[np.arange(x.shape[1]) < lens[:, None]] = buf[starts[0] : ends[-1]].view(dtype)
    return list(rows), x


# ----------------------------------------------------------------------------- preprocessing


def _device_jpeg(data: Any, decode: str, lim: ibc.Limits) -> np.ndarray | None:
    """With `decode` "gpu": a JPEG the encoder's device can decode, as its bytes (uint8), else
    None (the CPU path). Only the header is read; a file over the limits raises InvalidInput."""
    if decode != "gpu":
        return None
    from imagebind_core.preprocess.jpeg import device_decodable

    if not device_decodable(data, lim):
        return None
    return np.frombuffer(data, np.uint8)


def _fetch(
    uri: str, kind: str, storage_options: StorageOptions | None, max_bytes: int, stat: bool
) -> tuple[bytes, tuple[str, int | None, float | None] | None]:
    info = None
    if stat:
        fs, path = filesystem(uri, storage_options)
        try:
            info = fingerprint_from_info(fs.info(path))
        except Exception as e:
            if transient_store_error(e):  # s3fs says "not found" for an endpoint it cannot reach
                raise
            if isinstance(e, FileNotFoundError):
                raise ibc.InvalidInput(kind, f"object not found: {uri}") from None
            raise ibc.InvalidInput(kind, f"cannot stat {uri}: {e}") from None
    return ibc.read_bytes(uri, storage_options, max_bytes=max_bytes, modality=kind), info


def preprocess_batch(
    batch: pa.Table,
    storage_options: StorageOptions | None = None,
    limits: Mapping[str, Any] | None = None,
    options: Mapping[str, Mapping[str, Any]] | None = None,
    read_threads: int = 8,
    trace_path: str | None = None,
    delay_per_item_s: float = 0.0,
    store_retries: int = 4,
    decode: Mapping[str, str] | None = None,
    progress: Any = None,
) -> pa.Table:
    """Item rows (`data` or `uri`) -> rows with the item's model input (`tensor_columns`).

    Rows that are not `ok` pass through. Missing `fingerprint`/`size`/`mtime` (manifest rows)
    are filled from the object's metadata. Every failure of an item, whatever it raises,
    becomes an `error` row with the reason — except an unreachable store: a read that fails
    with a connection error, timeout or 5xx is retried `store_retries` times with backoff,
    then the block fails with StoreUnavailable (the item is not bad; a rerun reads it).

    `decode` ({kind: "cpu" | "gpu"}): with "gpu", JPEG files the encoder's device decodes
    (`imagebind_core.preprocess.jpeg.device_decodable`: header checked against `limits`) are
    passed on as `ENCODED_JPEG` rows; other items of the kind take the CPU path.

    `progress` is the job's `pipelines.progress.counter_actor()` (None: not counted).
    """
    lim = ibc.Limits(**dict(limits or {}))
    cols = {
        name: batch.column(name).to_pylist()
        for name in ("status", "error", "id", "uri", "modality", "fingerprint", "size", "mtime")
    }
    cols["data"] = batch.column("data").to_pylist()
    todo = [i for i in range(batch.num_rows) if cols["status"][i] == STATUS_OK]
    fetch = [i for i in todo if cols["data"][i] is None]
    if fetch:
        _fetch_items(cols, fetch, storage_options, lim, read_threads, store_retries)
    try:
        tensors, formats, tokens = _preprocess_items(
            cols, todo, lim, options or {}, dict(decode or {}), delay_per_item_s
        )
    except ibc.WorkerBroken as e:
        _exit_broken_worker(e)
    if trace_path and todo:
        # One write per batch, O_APPEND: lines from concurrent workers do not interleave.
        lines = "".join(f"{os.getpid()} {cols['id'][i]}\n" for i in todo)
        with open(trace_path, "a") as f:
            f.write(lines)
    out = _preprocessed_table(batch, cols, tensors, formats, tokens, metadata_filled=bool(fetch))
    report(progress, "preprocess", sum(1 for s in cols["status"] if s != STATUS_EOS))
    return out


def _exit_broken_worker(e: ibc.WorkerBroken) -> NoReturn:
    """End a Ray worker that can no longer preprocess (an earlier task's import of a decoder
    was interrupted when that task was cancelled): its items are not bad, and every later task
    it ran would fail them all. A worker that dies is a system failure to Ray, which runs the
    task again on a fresh worker; an exception would fail the job instead. Outside Ray
    (nothing would run the task again) the error is raised."""
    import ray

    if not ray.is_initialized() or ray.get_runtime_context().worker.mode != ray.WORKER_MODE:
        raise e
    logger.error("%s: this worker exits, and Ray runs its task again on another", e)
    logging.shutdown()  # flush the line above before the process ends
    os._exit(70)  # EX_SOFTWARE


def _fetch_items(
    cols: dict[str, list[Any]],
    fetch: list[int],
    storage_options: StorageOptions | None,
    lim: ibc.Limits,
    read_threads: int,
    store_retries: int,
) -> None:
    """Read the bytes of rows `fetch` from their URIs into `cols["data"]` (with the object's
    metadata where the row has none); a row that cannot be read becomes an error row."""
    uris, kinds, fps = cols["uri"], cols["modality"], cols["fingerprint"]

    def get(i: int) -> tuple[int, Any]:
        try:
            return i, with_store_retries(
                lambda: _fetch(uris[i], kinds[i], storage_options, lim.max_bytes, fps[i] is None),
                f"reading {uris[i]}",
                uris[i],
                storage_options,
                store_retries,
            )
        except ibc.StoreUnavailable as e:
            if protocol_of(uris[i]) in ("http", "https"):
                # A web host is not the job's store: one still down after the retries fails
                # its items (dead links are common in web corpora), not the whole job.
                return i, f"cannot read {uris[i]}: {e.reason}"
            raise
        except ibc.InvalidInput as e:
            return i, e.reason
        except Exception as e:
            # Whatever else a read raises (a bad URI, a refused object): the item fails,
            # never the block; the reason names the input.
            return i, f"cannot read {uris[i]}: {type(e).__name__}: {e}"

    with ThreadPoolExecutor(min(read_threads, len(fetch))) as ex:
        for i, res in ex.map(get, fetch):
            if isinstance(res, str):
                cols["status"][i], cols["error"][i] = STATUS_ERROR, res
                continue
            cols["data"][i], info = res
            if info is not None:
                cols["fingerprint"][i], cols["size"][i], cols["mtime"][i] = info


def _preprocess_items(
    cols: dict[str, list[Any]],
    todo: list[int],
    lim: ibc.Limits,
    options: Mapping[str, Mapping[str, Any]],
    decoders: Mapping[str, str],
    delay_per_item_s: float,
) -> tuple[list[Any], list[str | None], tuple[list[int], np.ndarray] | None]:
    """Each `ok` row's model input (`preprocess(..., compact=True)`), or its JPEG file with
    format ENCODED_JPEG for the device to decode; a failure makes the row an error row. Texts
    are tokenized together (`preprocess_texts`): returned as (rows, (k, context) token ids)
    instead of one tensor each."""
    n = len(cols["id"])
    tensors: list[Any] = [None] * n
    formats: list[str | None] = [None] * n
    ids, kinds, data = cols["id"], cols["modality"], cols["data"]
    texts = [i for i in todo if cols["status"][i] == STATUS_OK and kinds[i] == "text"]
    tokens = _tokenize_rows(cols, texts, lim, options.get("text", {}), delay_per_item_s)
    if tokens is not None:
        todo = [i for i in todo if kinds[i] != "text"]
    for i in todo:
        if cols["status"][i] != STATUS_OK:
            continue
        if delay_per_item_s:
            time.sleep(delay_per_item_s)
        try:
            jpeg = _device_jpeg(data[i], decoders.get(kinds[i], "cpu"), lim)
            if jpeg is not None:
                tensors[i], formats[i] = jpeg, ENCODED_JPEG
                continue
            # compact: still images travel to the encoders as uint8 pixels, a quarter of the
            # float32 bytes; the encoder expands them on its device. As numpy: an image
            # worker never imports torch.
            tensors[i] = ibc.preprocess.preprocess_array(
                kinds[i],
                data[i],
                item_id=ids[i],
                limits=lim,
                **dict(options.get(kinds[i], {})),
            )
        except ibc.InvalidInput as e:
            cols["status"][i], cols["error"][i] = STATUS_ERROR, e.reason
        except ibc.WorkerBroken:
            raise  # the process's, not the item's: `preprocess_batch` replaces the worker
        except Exception as e:  # a bug in a decoder must still not take the block down
            logger.exception("preprocessing %s failed", ids[i])
            cols["status"][i] = STATUS_ERROR
            cols["error"][i] = f"internal error: {type(e).__name__}: {e}"
    return tensors, formats, tokens


def _tokenize_rows(
    cols: dict[str, list[Any]],
    rows: list[int],
    lim: ibc.Limits,
    options: Mapping[str, Any],
    delay_per_item_s: float,
) -> tuple[list[int], np.ndarray] | None:
    """The text rows `rows` tokenized in one call: (rows still ok, their token ids); bad texts
    become error rows. None when there are none, or when the call fails other than on a bad
    text (the rows then take the per-item path, which isolates the item at fault)."""
    if not rows:
        return None
    if delay_per_item_s:
        time.sleep(delay_per_item_s * len(rows))
    try:
        matrix, errors = ibc.preprocess.preprocess_texts(
            [cols["data"][i] for i in rows],
            limits=lim,
            item_ids=[cols["id"][i] for i in rows],
            **dict(options),
        )
    except ibc.WorkerBroken:
        raise
    except Exception:
        logger.debug("batch tokenization failed; texts one by one", exc_info=True)
        return None
    for j, e in errors.items():
        cols["status"][rows[j]], cols["error"][rows[j]] = STATUS_ERROR, e.reason
    keep = [j for j in range(len(rows)) if j not in errors]
    return [rows[j] for j in keep], matrix[keep]


def _preprocessed_table(
    batch: pa.Table,
    cols: dict[str, list[Any]],
    tensors: list[Any],
    formats: list[str | None],
    tokens: tuple[list[int], np.ndarray] | None,
    *,
    metadata_filled: bool,
) -> pa.Table:
    """The block as PREPROCESSED_SCHEMA rows; a block with texts leaves sorted by length."""
    out_cols = {
        f.name: batch.column(f.name) for f in PREPROCESSED_SCHEMA if f.name in batch.column_names
    }
    changed = {"status": pa.string(), "error": pa.string()}
    if metadata_filled:  # metadata filled in from the objects read
        changed.update(fingerprint=pa.string(), size=pa.int64(), mtime=pa.float64())
    for name, typ in changed.items():
        out_cols[name] = pa.array(cols[name], typ)
    columns, lengths = _tensor_columns_of(cols["modality"], tensors, formats, tokens)
    out_cols["tensor"], out_cols["tensor_shape"], out_cols["tensor_dtype"] = columns
    out = pa.table(
        {f.name: out_cols[f.name] for f in PREPROCESSED_SCHEMA}, schema=PREPROCESSED_SCHEMA
    )
    if lengths is not None:
        # Texts in order of length: the encoder cuts its batches from this block in order and
        # runs each one only as long as its longest text (ImageBindModel.encode drops the
        # padding), so similar lengths together cost less than file order. Row order carries
        # no meaning downstream (rows keep their ids; shards are committed whole).
        out = out.take(np.argsort(lengths, kind="stable"))
    return out


def _tensor_columns_of(
    kinds: list[str],
    tensors: list[Any],
    formats: list[str | None],
    tokens: tuple[list[int], np.ndarray] | None,
) -> tuple[tuple[pa.Array, pa.Array, pa.Array], np.ndarray | None]:
    """The block's inputs as `tensor_columns`, and the token count of each text row (None for
    a block without texts). `tokens`: (rows, token ids) of the texts tokenized together."""
    n = len(kinds)
    if tokens is not None and all(t is None for t in tensors):
        # A block of texts (a text branch's): one (n, context) matrix, compacted at once.
        rows, matrix = tokens
        present = np.zeros(n, bool)
        present[rows] = True
        tok = np.zeros((n, matrix.shape[1]), np.int64)
        tok[rows] = matrix
        # Tokens through the first EOT (the largest id; = ibc.text_lengths): the encoder's cost.
        return token_columns(tok, present), np.where(present, tok.argmax(axis=1) + 1, 0)
    if tokens is not None:  # texts mixed with other kinds (direct calls): one array per row
        for i, row in zip(tokens[0], tokens[1], strict=True):
            tensors[i] = row
    compact = [
        None if t is None else t if f else compact_input(k, t)
        for k, t, f in zip(kinds, tensors, formats, strict=True)
    ]
    columns = tensor_columns(compact, formats if any(formats) else None)
    lengths = None
    if any(k == "text" for k in kinds):
        lengths = np.array(
            [
                int(x.argmax()) + 1 if x is not None and k == "text" else 0
                for k, x in zip(kinds, compact, strict=True)
            ]
        )
    return columns, lengths


def without_tensors(batch: pa.Table, embed_dim: int) -> pa.Table:
    """Rows that reach the writer without an encoder (rejected while reading): null embedding."""
    n = batch.num_rows
    schema = encoded_schema(embed_dim)
    cols = {name: batch.column(name) for name in schema.names if name in batch.column_names}
    cols["embedding"] = embedding_column(
        np.zeros((n, embed_dim), np.float32), np.zeros(n, bool), embed_dim
    )
    return pa.table({name: cols[name] for name in schema.names}, schema=schema)


class EncodeBatch:
    """Embeds the `ok` rows of preprocessed batches of one kind (a Ray Data actor class).

    A thin wrapper over `imagebind_core.EncoderRunner`, which loads the model in a thread
    started here: the actor is ready at once and receives its first blocks while the weights
    load; the first call waits for them.

    Args:
        kind: media kind of this pool ("video" runs the vision encoder).
        spec: the model and preprocessing settings (`imagebind_core.ModelSpec`).
        batch_size: items per model call; a larger block is cut into such batches, in its
            row order (texts arrive sorted by length: each batch is as wide as its longest).
        torch_threads: intra-op threads of this actor.
        model: an already built model (tests, single-process use); skips loading.
        null_encoder: run everything but the model (embeddings are zeros): measures what the
            pipeline can deliver to an encoder (benchmarks/bench_pipeline.py --null-encoder).
        null_item_s: with `null_encoder`, a stand-in for an accelerator of known speed
            (benchmarks/bench_feed.py): each model batch is copied into a host buffer, as a
            CUDA runner stages it, then holds the actor's one compute slot for this many
            seconds per item, asleep.
        null_log_path: a local file that gets a line "<pid> <start> <end> <items>" per
            stand-in batch: when its compute slot was busy (Unix time, seconds).
        trace_path: a local file that gets one line per actor: pid, kind, logical GPU ids
            (tests of pool sizing and GPU packing).
        load_gate_path: a test hook (`debug.load_gate_path`): the model load starts only once
            this local file exists and is not empty (waiting up to `LOAD_GATE_TIMEOUT_S`),
            then appends "load <kind>" to it when the weights are in.
        progress: the job's `pipelines.progress.counter_actor()` (None: not counted).
    """

    def __init__(
        self,
        kind: str,
        spec: ibc.ModelSpec | None = None,
        *,
        batch_size: int | None = None,
        torch_threads: int | None = None,
        model: Any = None,
        null_encoder: bool = False,
        null_item_s: float = 0.0,
        null_log_path: str | None = None,
        trace_path: str | None = None,
        load_gate_path: str | None = None,
        progress: Any = None,
    ) -> None:
        self.progress = progress
        self.null_item_s = null_item_s
        self.null_log_path = null_log_path
        self._compute_slot = threading.Lock()  # the stand-in's device: one batch at a time
        self._staging = threading.local()  # the stand-in's host buffer, one per calling thread
        if torch_threads and not null_encoder:
            import torch

            torch.set_num_threads(torch_threads)
        self.kind = kind
        self.batch_size = batch_size
        self.modality = ibc.model_modality(kind)
        if spec is None:
            spec = ibc.ModelSpec(preset=model.config.name if model is not None else "huge")
        self.spec = spec
        self.runner = (
            None
            if null_encoder
            else ibc.EncoderRunner(
                spec,
                self.modality,
                model=model,
                background=True,
                before_load=(lambda: _wait_for_gate(load_gate_path)) if load_gate_path else None,
            )
        )
        if load_gate_path and self.runner is not None:
            threading.Thread(
                target=_log_load, args=(self.runner, load_gate_path, kind), daemon=True
            ).start()
        self.dim = spec.embed_dim if model is None else int(model.embed_dim)
        self.schema = encoded_schema(self.dim)
        self._started = time.perf_counter()
        self._first_batch_logged = False
        if trace_path:
            _trace_actor(trace_path, kind)

    def _encode_groups(self, groups: list[tuple[list[int], np.ndarray]]) -> list[np.ndarray]:
        if self.runner is None:
            if self.null_item_s:
                for idx, x in groups:
                    self._stand_in(x, len(idx))
            return [np.zeros((len(idx), self.dim), np.float32) for idx, _ in groups]
        return list(self.runner.encode_all((self.kind, x) for _, x in groups))

    def _stand_in(self, x: Any, n: int) -> None:
        """The null encoder's stand-in accelerator (`null_item_s`): stage `x` as the CUDA
        runner does (one copy of its rows into a reused host buffer), then compute for
        `n * null_item_s` seconds without the CPU, one batch at a time per actor (logged to
        `null_log_path`)."""
        parts = x if isinstance(x, ibc.RowParts) else None
        if parts is None:
            x = np.asarray(x)  # JPEG files decoded here (`decode: gpu`) come as a CPU tensor
        buf = getattr(self._staging, "buf", None)
        if buf is None or buf.shape != x.shape or buf.dtype != x.dtype:
            buf = self._staging.buf = np.empty(x.shape, x.dtype)
        if parts is not None:
            parts.join(out=buf)
        else:
            np.copyto(buf, x)
        with self._compute_slot:
            start = time.time()
            time.sleep(n * self.null_item_s)
            end = time.time()
        if self.null_log_path:
            with open(self.null_log_path, "a") as f:
                f.write(f"{os.getpid()} {start:.6f} {end:.6f} {n}\n")

    def _decode_jpegs(
        self, batch: pa.Table, rows: list[int], status: list[Any], errors: list[Any]
    ) -> list[tuple[list[int], Any]]:
        """Decode the block's `ENCODED_JPEG` rows on the model's device: [(rows, pixels)] for
        the decoded ones; the others become error rows with the CPU path's reason."""
        files = encoded_rows(batch, rows)
        if self.runner is not None:
            res = self.runner.decode_jpegs(files)
        else:  # null encoder: decode on the CPU, the cost stays in the measurement
            from imagebind_core.preprocess.jpeg import decode_jpegs

            res = decode_jpegs(
                files, "cpu", self.spec.make_limits(), **self.spec.options_for("vision")
            )
        for j, e in res.errors.items():
            status[rows[j]], errors[rows[j]] = STATUS_ERROR, e.reason
        if res.fallbacks:
            logger.info(
                "%d of %d JPEG files refused by the device decoder took the CPU path",
                len(res.fallbacks),
                len(rows),
            )
        return [([rows[j] for j in res.rows], res.pixels)] if res.rows else []

    def __call__(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        status = batch.column("status").to_pylist()
        errors = batch.column("error").to_pylist()
        ok = [i for i in range(n) if status[i] == STATUS_OK]
        values = np.zeros((n, self.dim), np.float32)
        done = np.zeros(n, bool)
        jpegs = jpeg_rows(batch, ok)
        if jpegs:
            on_device = set(jpegs)
            ok = [i for i in ok if i not in on_device]
        groups = model_batches(batch_arrays(batch, ok, pad=self.kind == "text"), self.batch_size)
        if self.runner is not None and (groups or jpegs):
            # Wait for the model here, outside the per-item fallback below: a load that failed
            # (a bad checkpoint) fails the job with its reason instead of every item.
            self.runner.model  # noqa: B018
        if jpegs:
            groups.extend(self._decode_jpegs(batch, jpegs, status, errors))
            ok = ok + jpegs
        try:
            for (idx, _), y in zip(groups, self._encode_groups(groups), strict=True):
                values[idx] = y
                done[idx] = True
        except Exception as batch_error:
            # Isolate the item(s) the encoder refuses; the others are embedded.
            logger.warning(
                "encoder failed on a batch of %d (%s); retrying one by one", len(ok), batch_error
            )
            for idx, x in groups:
                for j, i in enumerate(idx):
                    if done[i]:
                        continue
                    try:
                        values[i] = self._encode_groups([([i], x[j : j + 1])])[0][0]
                        done[i] = True
                    except Exception as e:
                        status[i] = STATUS_ERROR
                        errors[i] = f"encoder failed: {type(e).__name__}: {e}"
        # A finite input whose values overflow the model's arithmetic gets NaN/Inf: an error
        # row with the reason, never a non-finite vector in the table and the index.
        bad = [i for i in ibc.non_finite_rows(values) if done[i]]
        if bad:
            reason = ibc.overflow_reason(self.runner.model.lineage()["dtype"])
            for i in bad:
                status[i], errors[i], done[i] = STATUS_ERROR, reason, False
                values[i] = 0.0
        if ok and not self._first_batch_logged:
            self._first_batch_logged = True
            logger.info(
                "%s encoder: first batch done %.1f s after the actor started",
                self.kind,
                time.perf_counter() - self._started,
            )
        cols = {
            name: batch.column(name) for name in self.schema.names if name in batch.column_names
        }
        cols["status"] = pa.array(status, pa.string())
        cols["error"] = pa.array(errors, pa.string())
        cols["embedding"] = embedding_column(values, done, self.dim)
        report(self.progress, "encode", sum(1 for s in status if s != STATUS_EOS))
        return pa.table({name: cols[name] for name in self.schema.names}, schema=self.schema)


# How long a gated load (`load_gate_path`) waits for its file before failing.
LOAD_GATE_TIMEOUT_S = 300.0


def _wait_for_gate(path: str) -> None:
    end = time.monotonic() + LOAD_GATE_TIMEOUT_S
    while not (os.path.exists(path) and os.path.getsize(path) > 0):
        if time.monotonic() > end:
            raise RuntimeError(
                f"load gate {path} stayed empty for {LOAD_GATE_TIMEOUT_S:g} s: nothing was "
                "preprocessed while the model waited to load"
            )
        time.sleep(0.05)


def _log_load(runner: ibc.EncoderRunner, path: str, kind: str) -> None:
    try:
        runner.model  # noqa: B018 - waits for the load
    except BaseException:
        return
    with open(path, "a") as f:
        f.write(f"load {kind}\n")


def _trace_actor(path: str, kind: str) -> None:
    try:
        import ray

        gpus = ray.get_runtime_context().get_accelerator_ids().get("GPU", [])
    except Exception:  # not in a Ray worker
        gpus = []
    with open(path, "a") as f:
        f.write(f"{os.getpid()} {kind} {','.join(map(str, gpus)) or '-'}\n")


__all__ = [
    "ENCODED_JPEG",
    "EncodeBatch",
    "preprocess_batch",
    "without_tensors",
]
