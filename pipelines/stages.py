"""The two compute stages of the embedding job, callable with or without Ray.

- `preprocess_batch`: a stateless CPU function (Ray tasks): fetch each item's bytes (inline,
  or from its URI with a few threads to hide object-store latency), run
  `imagebind_core.preprocess` (compact: still images as uint8 pixels), and serialise the model
  input; texts leave sorted by length. A bad item becomes an error row (`InvalidInput`'s
  reason), never an exception out of the block.
- `EncodeBatch`: a callable class (one Ray actor per pool member) that loads the model once in
  `__init__` and in `__call__` only stacks, moves (expanding compact pixels), runs the encoder under
  `torch.inference_mode()` and returns float32 embeddings. No decoding happens here, so a GPU
  actor never waits on CPU work.
"""

from __future__ import annotations

import io
import logging
import os
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa

import imagebind_core as ibc
from imagebind_core.io import StorageOptions, filesystem
from pipelines.writers import (
    PREPROCESSED_SCHEMA,
    STATUS_ERROR,
    STATUS_OK,
    StoreUnavailable,
    embedding_type,
    encoded_schema,
    fingerprint_from_info,
    transient_store_error,
)

logger = logging.getLogger(__name__)


def _tensor_bytes(t: Any) -> bytes:
    buf = io.BytesIO()
    np.save(buf, t.numpy(), allow_pickle=False)
    return buf.getvalue()


def _tensor_from_bytes(b: bytes) -> np.ndarray:
    return np.load(io.BytesIO(b), allow_pickle=False)


def _fetch(
    uri: str, kind: str, storage_options: StorageOptions | None, max_bytes: int, stat: bool
) -> tuple[bytes, tuple[str, int | None, float | None] | None]:
    info = None
    if stat:
        fs, path = filesystem(uri, storage_options)
        try:
            info = fingerprint_from_info(fs.info(path))
        except FileNotFoundError:
            raise ibc.InvalidInput(kind, f"object not found: {uri}") from None
        except Exception as e:
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
) -> pa.Table:
    """Item rows (`data` or `uri`) -> rows with `tensor` (the item's model input as .npy).

    Rows that are not `ok` pass through. Missing `fingerprint`/`size`/`mtime` (manifest rows)
    are filled from the object's metadata. Every failure of an item, whatever it raises,
    becomes an `error` row with the reason — except an unreachable store: a read that fails
    with a connection error, timeout or 5xx is retried `store_retries` times with backoff,
    then the block fails with StoreUnavailable (the item is not bad; a rerun reads it).
    """
    lim = ibc.Limits(**dict(limits or {}))
    opts = {k: dict(v) for k, v in (options or {}).items()}
    n = batch.num_rows
    status = batch.column("status").to_pylist()
    errors = batch.column("error").to_pylist()
    ids = batch.column("id").to_pylist()
    uris = batch.column("uri").to_pylist()
    kinds = batch.column("modality").to_pylist()
    fps = batch.column("fingerprint").to_pylist()
    sizes = batch.column("size").to_pylist()
    mtimes = batch.column("mtime").to_pylist()
    data: list[Any] = batch.column("data").to_pylist()
    tensors: list[bytes | None] = [None] * n
    lengths = [0] * n  # text rows: tokens through EOT, the text encoder's cost

    todo = [i for i in range(n) if status[i] == STATUS_OK]
    fetch = [i for i in todo if data[i] is None]
    if fetch:

        def get(i: int) -> tuple[int, Any]:
            for attempt in range(store_retries + 1):
                try:
                    res = _fetch(uris[i], kinds[i], storage_options, lim.max_bytes, fps[i] is None)
                    return i, res
                except Exception as e:
                    if not transient_store_error(e):
                        # Whatever else a read raises (a bad URI, a refused object): the item
                        # fails, never the block; the reason names the input.
                        if isinstance(e, ibc.InvalidInput):
                            return i, e.reason
                        return i, f"cannot read {uris[i]}: {type(e).__name__}: {e}"
                    if attempt == store_retries:
                        raise StoreUnavailable(
                            f"object store unavailable reading {uris[i]} after "
                            f"{store_retries + 1} attempts: {type(e).__name__}: {e}"
                        ) from e
                    time.sleep(min(2.0**attempt, 10.0))
            raise AssertionError("unreachable")

        with ThreadPoolExecutor(min(read_threads, len(fetch))) as ex:
            for i, res in ex.map(get, fetch):
                if isinstance(res, str):
                    status[i], errors[i] = STATUS_ERROR, res
                    continue
                data[i], info = res
                if info is not None:
                    fps[i], sizes[i], mtimes[i] = info

    for i in todo:
        if status[i] != STATUS_OK:
            continue
        if delay_per_item_s:
            time.sleep(delay_per_item_s)
        try:
            # compact: still images travel to the encoders as uint8 pixels, a quarter of the
            # float32 bytes (at an H200's ~1400 huge images/s, 0.2 instead of 0.8 GB/s through
            # the object store and, on a cluster, the network); EncodeBatch expands them.
            t = ibc.preprocess(
                kinds[i],
                data[i],
                item_id=ids[i],
                limits=lim,
                compact=True,
                **opts.get(kinds[i], {}),
            )
            tensors[i] = _tensor_bytes(t)
            if kinds[i] == "text":
                lengths[i] = int(ibc.text_lengths(t))
        except ibc.InvalidInput as e:
            status[i], errors[i] = STATUS_ERROR, e.reason
        except Exception as e:  # a bug in a decoder must still not take the block down
            logger.exception("preprocessing %s failed", ids[i])
            status[i], errors[i] = STATUS_ERROR, f"internal error: {type(e).__name__}: {e}"
    if trace_path and todo:
        # One write per batch, O_APPEND: lines from concurrent workers do not interleave.
        lines = "".join(f"{os.getpid()} {ids[i]}\n" for i in todo)
        with open(trace_path, "a") as f:
            f.write(lines)

    cols = {
        f.name: batch.column(f.name) for f in PREPROCESSED_SCHEMA if f.name in batch.column_names
    }
    cols.update(
        {
            "status": pa.array(status, pa.string()),
            "error": pa.array(errors, pa.string()),
            "fingerprint": pa.array(fps, pa.string()),
            "size": pa.array(sizes, pa.int64()),
            "mtime": pa.array(mtimes, pa.float64()),
            "tensor": pa.array(tensors, pa.large_binary()),
        }
    )
    out = pa.table({f.name: cols[f.name] for f in PREPROCESSED_SCHEMA}, schema=PREPROCESSED_SCHEMA)
    if any(lengths):
        # Texts in order of length: the encoder cuts its batches from this block in order and
        # runs each one only as long as its longest text (ImageBindModel.encode drops the
        # padding), so similar lengths together cost less than file order — measured in
        # benchmarks/bench_pipeline.py. Row order carries no meaning downstream (rows keep
        # their ids; shards are committed whole).
        out = out.take(np.argsort(lengths, kind="stable"))
    return out


def _embedding_column(emb: np.ndarray | None, ok: list[int], n: int, dim: int) -> pa.Array:
    values = np.zeros((n, dim), np.float32)
    mask = np.ones(n, bool)  # True = null
    if emb is not None and ok:
        values[ok] = emb
        mask[ok] = False
    flat = pa.array(values.reshape(-1), pa.float32())
    return pa.FixedSizeListArray.from_arrays(flat, dim, mask=pa.array(mask))


def without_tensors(batch: pa.Table, embed_dim: int) -> pa.Table:
    """Rows that reach the writer without an encoder (rejected while reading): null embedding."""
    n = batch.num_rows
    schema = encoded_schema(embed_dim)
    cols = {name: batch.column(name) for name in schema.names if name in batch.column_names}
    cols["embedding"] = _embedding_column(None, [], n, embed_dim)
    return pa.table({name: cols[name] for name in schema.names}, schema=schema)


class EncodeBatch:
    """Embeds the `ok` rows of preprocessed batches of one kind (a Ray Data actor class).

    Args:
        kind: media kind of this pool ("video" runs the vision encoder).
        preset, checkpoint, sha256, seed, storage_options: passed to `imagebind_core.load_model`.
        dtype: compute dtype; embeddings are returned as float32 whatever it is.
        device: "cpu", "cuda", or None (CUDA when available).
        normalize: unit-length embeddings (default) or the reference's raw output.
        torch_threads: intra-op threads of this actor.
        model: an already built model (tests, single-process use); skips loading.
        options: this kind's preprocessing options (`preprocess.options.<kind>`), for
            expanding compact inputs exactly as they were preprocessed.
    """

    def __init__(
        self,
        kind: str,
        preset: str = "huge",
        checkpoint: str | None = None,
        sha256: str | None = None,
        dtype: str = "float32",
        device: str | None = None,
        normalize: bool = True,
        seed: int = 0,
        storage_options: StorageOptions | None = None,
        torch_threads: int | None = None,
        model: Any = None,
        options: Mapping[str, Any] | None = None,
    ) -> None:
        import warnings

        import torch

        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.kind = kind
        self.options = dict(options or {})
        self.modality = ibc.model_modality(kind)
        self.normalize = normalize
        if model is None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # random weights: the driver already warned
                model = ibc.load_model(
                    checkpoint,
                    preset,
                    modalities=[self.modality],
                    device=device,
                    dtype=dtype,
                    sha256=sha256,
                    storage_options=storage_options,
                    seed=seed,
                )
        self.model = model
        self.dim = int(model.embed_dim)
        self.schema = encoded_schema(self.dim)

    def _forward(self, arrays: list[np.ndarray]) -> np.ndarray:
        import torch

        x = ibc.collate([torch.from_numpy(a) for a in arrays])  # (B, ...item shape)
        # compact pixels: expanded on the model's device, so the small form is what moves
        x = ibc.expand(self.kind, x, self.model.device, **self.options)
        with torch.inference_mode():
            y = self.model({self.modality.value: x}, normalize=self.normalize)[self.modality.value]
        return y.float().cpu().numpy()  # (B, D)

    def __call__(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        status = batch.column("status").to_pylist()
        errors = batch.column("error").to_pylist()
        ok = [i for i in range(n) if status[i] == STATUS_OK]
        emb = None
        if ok:
            tensors = batch.column("tensor")
            arrays = [_tensor_from_bytes(tensors[i].as_py()) for i in ok]
            try:
                emb = self._forward(arrays)
            except Exception as batch_error:
                # Isolate the item(s) the encoder refuses; the others are embedded.
                logger.warning(
                    "encoder failed on a batch of %d (%s); retrying one by one",
                    len(ok),
                    batch_error,
                )
                rows, good = [], []
                for i, a in zip(ok, arrays, strict=True):
                    try:
                        rows.append(self._forward([a])[0])
                        good.append(i)
                    except Exception as e:
                        status[i], errors[i] = (
                            STATUS_ERROR,
                            f"encoder failed: {type(e).__name__}: {e}",
                        )
                ok, emb = good, (np.stack(rows) if rows else None)
        cols = {
            name: batch.column(name) for name in self.schema.names if name in batch.column_names
        }
        cols["status"] = pa.array(status, pa.string())
        cols["error"] = pa.array(errors, pa.string())
        cols["embedding"] = _embedding_column(emb, ok, n, self.dim)
        return pa.table({name: cols[name] for name in self.schema.names}, schema=self.schema)


__all__ = [
    "EncodeBatch",
    "StoreUnavailable",
    "embedding_type",
    "preprocess_batch",
    "transient_store_error",
    "without_tensors",
]
