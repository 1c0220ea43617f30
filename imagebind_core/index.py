"""The vector index of one published embedding-index version, and the read side of the layout.

An index root (a local folder or an object-store prefix such as ``s3://bucket/index``) holds:

```
<root>/LATEST                            small JSON pointer: {"version", "name", "published_at"}
<root>/versions/<name>/version.json      the version record (parent, counts, lineage, time)
<root>/versions/<name>/data/*.parquet    the embedding rows (id, uri, modality, embedding, ...)
<root>/versions/<name>/index/            the vector index built from those rows (this module)
```

``<name>`` is ``<version:08d>-<run id>``. Readers follow ``LATEST`` only, and a version is
never modified after its pointer was published, so a reader sees one whole version or
another, never a mix. Writing (staging, compare-and-swap of the pointer, retention) lives in
``pipelines.publish``; this module is the part both the pipelines (build) and the endpoint
(search) need, so it sits in the core and imports no Ray.

The vector index is FAISS (see docs/reindex.md for the Lance/LanceDB comparison): one index
per modality value, so a modality filter searches only that modality's vectors and an
unfiltered search merges the per-modality top-k exactly. Modalities with fewer than
``flat_threshold`` vectors use an exact inner-product index; larger ones an inverted-file
index (IVF-Flat) with unquantised vectors. Vectors are L2-normalised, so scores are cosine
similarities. IVF-Flat has a property the tests rely on: a stored vector is filed under its
nearest centroid, and the same vector as a query probes that centroid's list first, so an
item's own embedding always finds itself with score 1.0 (an HNSW graph gives no such
guarantee).
"""

from __future__ import annotations

import io
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from imagebind_core.errors import InvalidInput
from imagebind_core.io import StorageOptions, filesystem

logger = logging.getLogger(__name__)

POINTER_NAME = "LATEST"
VERSIONS_DIR = "versions"
RECORD_NAME = "version.json"
DATA_DIR = "data"
INDEX_DIR = "index"
INDEX_FORMAT = 1
MAX_TOP_K = 1000
# The values a row's `modality` column may hold: the six model inputs plus "video" (a clip
# is encoded by the vision tower but may be stored under its own kind).
KNOWN_MODALITIES = ("vision", "video", "text", "audio", "depth", "thermal", "imu")


def join_uri(root: str, *parts: str) -> str:
    """`root/part/...` without doubled slashes (works for local paths and URLs)."""
    out = root.rstrip("/")
    for p in parts:
        out = f"{out}/{p.strip('/')}"
    return out


@dataclass(frozen=True)
class Pointer:
    """The content of `<root>/LATEST`: which version readers must use."""

    version: int
    name: str
    published_at: str

    def version_uri(self, root: str) -> str:
        """The folder of the version this pointer names."""
        return join_uri(root, VERSIONS_DIR, self.name)

    def to_json(self) -> bytes:
        doc = {"version": self.version, "name": self.name, "published_at": self.published_at}
        return json.dumps(doc, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes, where: str = "pointer") -> Pointer:
        """Parse a pointer, naming `where` if it is malformed."""
        try:
            doc = json.loads(data)
            return cls(int(doc["version"]), str(doc["name"]), str(doc["published_at"]))
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{where} is not a valid index pointer: {e}") from None


def read_pointer(root: str, storage_options: StorageOptions | None = None) -> Pointer | None:
    """The latest published version of the index at `root`, or None if nothing is published."""
    fs, path = filesystem(join_uri(root, POINTER_NAME), storage_options)
    try:
        data = fs.cat_file(path)
    except FileNotFoundError:
        return None
    return Pointer.from_json(data, join_uri(root, POINTER_NAME))


def read_version_record(version_uri: str, storage_options: StorageOptions | None = None) -> dict:
    """The version record (`version.json`) of one version folder."""
    fs, path = filesystem(join_uri(version_uri, RECORD_NAME), storage_options)
    return json.loads(fs.cat_file(path))


def _normalize(x: np.ndarray) -> np.ndarray:
    """Row-wise L2 normalisation (zero rows stay zero) -> float32.

    Computed in float64 after scaling each row by a power of two that brings its largest
    component near 1: a vector of magnitude ~1e308 (or ~1e-310) overflows (underflows) its own
    norm even in float64, which would turn every cosine score into 0. Scaling by a power of two
    is exact, so in-range vectors get the same bits as without it.
    """
    x = np.asarray(x, dtype=np.float64)
    peak = np.abs(x).max(axis=1, keepdims=True) if x.size else np.zeros((len(x), 1))
    _, exp = np.frexp(np.where(np.isfinite(peak) & (peak > 0), peak, 1.0))
    x = np.ldexp(x, -exp)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x / np.maximum(norms, 1e-300), dtype=np.float32)


@dataclass
class _Part:
    """One modality's FAISS index and the global row offset of its first vector."""

    index: Any
    offset: int
    count: int
    kind: str


class VectorIndex:
    """Cosine-similarity search over (id, uri, modality) rows, one FAISS index per modality.

    Build with `VectorIndex.build(...)`, persist with `save(uri)`, read with `load(uri)`.
    Search is thread-safe (FAISS searches do not mutate the index).
    """

    def __init__(
        self,
        ids: np.ndarray,
        uris: np.ndarray,
        modalities: np.ndarray,
        parts: dict[str, _Part],
        dim: int,
        nprobe: int,
    ) -> None:
        self.ids = ids
        self.uris = uris
        self.modalities = modalities
        self.parts = parts
        self.dim = dim
        self.nprobe = nprobe
        self._rows: dict[str, int] | None = None
        for part in parts.values():
            if part.kind == "ivf":
                # An IVF list entry is addressable by id (`vector_of`) only through this map:
                # one int64 per vector, made once here, never while searches run.
                part.index.make_direct_map()

    @property
    def count(self) -> int:
        """Number of vectors in the index."""
        return len(self.ids)

    @classmethod
    def build(
        cls,
        ids: Sequence[str],
        uris: Sequence[str],
        modalities: Sequence[str],
        embeddings: np.ndarray,
        *,
        flat_threshold: int = 20_000,
        nlist: int | None = None,
        nprobe: int = 32,
    ) -> VectorIndex:
        """Build from rows and their (N, D) embeddings.

        Args:
            flat_threshold: modalities with fewer vectors get an exact flat index.
            nlist: IVF lists for larger modalities (default about 4 * sqrt(n), which keeps
                lists a few hundred vectors long at 100k).
            nprobe: IVF lists scanned per query (recall/latency trade-off, see docs).
        """
        import faiss

        emb = np.asarray(embeddings)
        if emb.ndim != 2 or emb.shape[0] != len(ids):
            raise ValueError(
                f"embeddings must be (N, D) with N = {len(ids)} rows, got shape {emb.shape}"
            )
        if not (len(ids) == len(uris) == len(modalities)):
            raise ValueError("ids, uris and modalities must have the same length")
        dim = int(emb.shape[1])
        mods = np.asarray(modalities, dtype=object)
        # Group rows by modality (stable), so each modality is one contiguous range.
        order = np.argsort(mods, kind="stable")
        ids_s = np.asarray(ids, dtype=object)[order]
        uris_s = np.asarray(uris, dtype=object)[order]
        mods_s = mods[order]
        vecs = _normalize(emb[order]) if len(order) else np.zeros((0, dim), np.float32)
        parts: dict[str, _Part] = {}
        start = 0
        for m in sorted(set(mods_s.tolist())):
            n = int((mods_s == m).sum())
            x = vecs[start : start + n]
            if n < flat_threshold:
                index = faiss.IndexFlatIP(dim)
                kind = "flat"
            else:
                lists = nlist or max(1, min(int(4 * math.sqrt(n)), n // 39))
                quantizer = faiss.IndexFlatIP(dim)
                index = faiss.IndexIVFFlat(quantizer, dim, lists, faiss.METRIC_INNER_PRODUCT)
                index.train(x)
                kind = "ivf"
            index.add(x)
            parts[m] = _Part(index, start, n, kind)
            start += n
        return cls(ids_s, uris_s, mods_s, parts, dim, nprobe)

    @classmethod
    def from_table(cls, table: Any, **build_options: Any) -> VectorIndex:
        """Build from a pyarrow Table with `id`, `uri`, `modality`, `embedding` columns."""
        missing = {"id", "uri", "modality", "embedding"} - set(table.column_names)
        if missing:
            raise ValueError(f"embedding table lacks columns {sorted(missing)}")
        return cls.build(
            table.column("id").to_numpy(zero_copy_only=False),
            table.column("uri").to_numpy(zero_copy_only=False),
            table.column("modality").to_numpy(zero_copy_only=False),
            embeddings_of(table),
            **build_options,
        )

    def search(
        self, vector: Sequence[float], top_k: int, modality: str | None = None
    ) -> list[dict]:
        """The `top_k` rows most similar to `vector`, best first.

        Returns dicts with `id`, `uri`, `modality`, `score` (cosine similarity). Bad input
        (wrong length, non-finite or zero vector, top_k out of range, unknown modality)
        raises InvalidInput naming the field.
        """
        try:
            q = np.asarray(vector, dtype=np.float64).reshape(-1)
        except (TypeError, ValueError):
            raise InvalidInput("vector", "must be a list of numbers") from None
        if q.shape[0] != self.dim:
            raise InvalidInput(
                "vector", f"has {q.shape[0]} values; this index holds {self.dim}-d embeddings"
            )
        if not np.all(np.isfinite(q)) or not np.any(q):
            raise InvalidInput("vector", "must be finite and not all zero")
        if not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= MAX_TOP_K:
            raise InvalidInput("top_k", f"must be an integer in [1, {MAX_TOP_K}], got {top_k!r}")
        if modality is not None and str(modality) not in KNOWN_MODALITIES:
            raise InvalidInput(
                "modality", f"unknown modality filter {modality!r}; one of {KNOWN_MODALITIES}"
            )
        q = _normalize(q[None, :])
        if modality is None:
            parts = list(self.parts.values())
        else:
            parts = [self.parts[str(modality)]] if str(modality) in self.parts else []
        scores: list[np.ndarray] = []
        rows: list[np.ndarray] = []
        for part in parts:
            k = min(top_k, part.count)
            if part.kind == "ivf":
                part.index.nprobe = min(self.nprobe, part.index.nlist)
            d, i = part.index.search(q, k)
            keep = i[0] >= 0
            scores.append(d[0][keep])
            rows.append(i[0][keep] + part.offset)
        if not scores:
            return []
        s = np.concatenate(scores)
        r = np.concatenate(rows)
        best = np.lexsort((r, -s))[:top_k]  # by score, then by row for a stable order
        return [
            {
                "id": str(self.ids[j]),
                "uri": str(self.uris[j]),
                "modality": str(self.modalities[j]),
                "score": float(s[b]),
            }
            for b, j in zip(best, r[best], strict=True)
        ]

    def row_of(self, item_id: str) -> int | None:
        """The row of the item `item_id`, or None if the index does not hold it."""
        rows = self._rows
        if rows is None:  # built on first use; the index is immutable once built or loaded
            rows = self._rows = {str(v): i for i, v in enumerate(self.ids.tolist())}
        return rows.get(str(item_id))

    def item(self, item_id: str) -> dict | None:
        """`{id, uri, modality}` of the item `item_id`, or None if the index does not hold it."""
        j = self.row_of(item_id)
        if j is None:
            return None
        return {
            "id": str(self.ids[j]),
            "uri": str(self.uris[j]),
            "modality": str(self.modalities[j]),
        }

    def vector_of(self, item_id: str) -> np.ndarray | None:
        """The stored (normalised) vector of `item_id` as float32, or None if not held."""
        j = self.row_of(item_id)
        if j is None:
            return None
        part = self.parts[str(self.modalities[j])]
        return part.index.reconstruct(int(j - part.offset))

    def save(self, uri: str, storage_options: StorageOptions | None = None) -> None:
        """Write the index under the folder `uri` (local or object store)."""
        import faiss
        import pyarrow as pa
        import pyarrow.parquet as pq

        fs, path = filesystem(uri, storage_options)
        fs.makedirs(path, exist_ok=True)
        meta = {
            "format": INDEX_FORMAT,
            "metric": "cosine",
            "dim": self.dim,
            "count": self.count,
            "nprobe": self.nprobe,
            "parts": {},
        }
        for m, part in self.parts.items():
            name = f"{m}.faiss"
            fs.pipe_file(f"{path}/{name}", faiss.serialize_index(part.index).tobytes())
            meta["parts"][m] = {
                "file": name,
                "offset": part.offset,
                "count": part.count,
                "kind": part.kind,
            }
        rows = pa.table(
            {
                "id": pa.array(self.ids.tolist(), pa.string()),
                "uri": pa.array(self.uris.tolist(), pa.string()),
                "modality": pa.array(self.modalities.tolist(), pa.string()),
            }
        )
        buf = io.BytesIO()
        pq.write_table(rows, buf)
        fs.pipe_file(f"{path}/rows.parquet", buf.getvalue())
        # meta.json last: a reader that finds it finds everything it names.
        fs.pipe_file(f"{path}/meta.json", json.dumps(meta, sort_keys=True).encode())

    @classmethod
    def load(cls, uri: str, storage_options: StorageOptions | None = None) -> VectorIndex:
        """Read an index written by `save` from the folder `uri`."""
        import faiss
        import pyarrow.parquet as pq

        fs, path = filesystem(uri, storage_options)
        try:
            meta = json.loads(fs.cat_file(f"{path}/meta.json"))
        except FileNotFoundError:
            raise FileNotFoundError(f"no vector index at {uri} (meta.json missing)") from None
        if meta.get("format") != INDEX_FORMAT:
            raise ValueError(f"{uri}: unsupported index format {meta.get('format')!r}")
        rows = pq.read_table(io.BytesIO(fs.cat_file(f"{path}/rows.parquet")))
        parts = {}
        for m, p in meta["parts"].items():
            blob = np.frombuffer(fs.cat_file(f"{path}/{p['file']}"), dtype=np.uint8)
            parts[m] = _Part(faiss.deserialize_index(blob), p["offset"], p["count"], p["kind"])
        return cls(
            rows.column("id").to_numpy(zero_copy_only=False),
            rows.column("uri").to_numpy(zero_copy_only=False),
            rows.column("modality").to_numpy(zero_copy_only=False),
            parts,
            int(meta["dim"]),
            int(meta["nprobe"]),
        )


def embeddings_of(table: Any) -> np.ndarray:
    """The `embedding` column (fixed-size or variable list of floats) as an (N, D) float32 array."""
    import pyarrow as pa
    import pyarrow.compute as pc

    col = table.column("embedding").combine_chunks()
    n = len(col)
    if n == 0:
        size = col.type.list_size if pa.types.is_fixed_size_list(col.type) else 0
        return np.zeros((0, size), np.float32)
    flat = pc.list_flatten(col).to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    if flat.size % n:
        raise ValueError("embedding column holds lists of different lengths")
    return flat.reshape(n, flat.size // n)


def load_latest(
    root: str, storage_options: StorageOptions | None = None
) -> tuple[Pointer, VectorIndex] | None:
    """The latest published version's pointer and vector index, or None if none is published."""
    pointer = read_pointer(root, storage_options)
    if pointer is None:
        return None
    index = VectorIndex.load(join_uri(pointer.version_uri(root), INDEX_DIR), storage_options)
    return pointer, index
