"""The vector index of one published embedding-index version, and the read side of the layout.

An index root (a local folder or an object-store prefix such as ``s3://bucket/index``) holds:

```
<root>/LATEST                            small JSON pointer: {"version", "name", "published_at"}
<root>/versions/<name>/version.json      the version record (parent, counts, lineage, time)
<root>/versions/<name>/data/embedded/    the rows that version's run embedded (Parquet)
<root>/versions/<name>/index/            the vector index of the version's rows (this module)
<root>/rows.lance, <root>/failures.lance every version's rows (id, uri, modality, embedding, ...)
                                         and failures: Lance datasets, of which each version
                                         record pins one Lance version (`pipelines.tables`)
```

``<name>`` is ``<version:08d>-<run id>``. Readers follow ``LATEST`` only, and a version is
never modified after its pointer was published, so a reader sees one whole version or
another, never a mix. Writing (staging, compare-and-swap of the pointer, retention) lives in
``pipelines.publish``; this module is the part both the pipelines (build) and the endpoint
(search) need, so it sits in the core and imports no Ray.

The vector index is FAISS (see docs/reindex.md for the Lance/LanceDB comparison), split into
`shards` shards by a 63-bit hash of the id (`labels_of`; shard = label % shards), each shard
one FAISS index per modality, so a modality filter searches only that modality's vectors and
an unfiltered search merges the per-modality top-k exactly. A modality's kind follows its
size: below `flat_threshold` an exact inner-product index; up to `pq_threshold` an inverted
file (IVF-Flat) with unquantised vectors; from there IVF-PQ (product-quantised codes, with
optional exact re-ranking of the candidates from stored float vectors). All shards share one
trained coarse quantizer and PQ codebooks per modality, so a shard holds exactly the entries
one unsharded index would hold for its ids, and merging the shards' top-k (by score, then
id) equals one index's search. Vectors are L2-normalised, so scores are cosine similarities.

A shard is a list of immutable segments (what one build, update or compaction wrote). A new
version's index is the parent's with the change applied (`update_index`), not a rebuild: it
references the parent's segments, writes a deletion file (the labels of deleted and changed
ids) for each segment that lost rows and one new segment with the new vectors, encoded with
the parent's trained quantizer. When a shard collects more than `IndexOptions.max_segments`
segments its newest ones are merged (FAISS `merge_from`, no re-encoding); when more than
`compact_deleted` of it is deleted, all of it. It is rebuilt only when a modality changes
kind or its size leaves the retrain band (`IndexOptions.retrain_growth`).

```
<version>/index/meta.json                  format, dim, options, training record, per shard
                                           its segments (path relative to this folder,
                                           counts, parts, deletion file)
<version>/index/trained/<modality>.faiss   the empty trained IVF index (quantizer, codebooks)
<version>/index/shard-NNNNN/rows.parquet   label, id, uri, modality of the segment's rows
<version>/index/shard-NNNNN/<modality>.faiss         the segment's FAISS index
<version>/index/shard-NNNNN/<modality>.vectors.npy   IVF-PQ re-ranking vectors (rerank > 0)
<version>/index/shard-NNNNN/<modality>.labels.npy    their labels (sorted)
<version>/index/shard-NNNNN/<modality>.order.npy     the row of `vectors.npy` of each of
                                                     those labels, when the rows are not in
                                                     label order (a streamed build writes
                                                     them in arrival order)
<version>/index/shard-NNNNN/deleted-KKKK.npy         labels deleted from segment KKKK of the
                                                     shard (which an older version wrote)
```
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import posixpath
import struct
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from imagebind_core.errors import InvalidInput
from imagebind_core.io import StorageOptions, base_name, filesystem, listed_sizes, protocol_of
from imagebind_core.kinds import KINDS

logger = logging.getLogger(__name__)

POINTER_NAME = "LATEST"
VERSIONS_DIR = "versions"
RECORD_NAME = "version.json"
DATA_DIR = "data"
INDEX_DIR = "index"
INDEX_FORMAT = 4
# 2: one segment per shard, in the shard's folder; 3: re-ranking vectors always in label order
# (4 adds `<modality>.order.npy`; readers of 3 would take its rows as label-ordered)
READABLE_FORMATS = (2, 3, 4)
META_NAME = "meta.json"
TRAINED_DIR = "trained"
MAX_TOP_K = 1000
VECTORS_HEADER_BYTES = 4096  # re-ranking vectors start on a page (`_vectors_header`)
# `rerank: auto`: the depths it chooses from (x top_k candidates re-ranked per shard), the
# depth of an IVF-PQ part whose index records none (built before calibration), and the
# calibration's queries and k. Its estimate is a mean of 100 per-query recalls in [0, 1]; near
# a 0.95 mean their standard deviation is at most sqrt(0.95 x 0.05) = 0.22, so the estimate's
# standard error is at most 0.022.
AUTO = "auto"
RERANK_LEVELS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
UNCALIBRATED_RERANK = 10
CALIBRATION_QUERIES = 100
CALIBRATION_K = 10


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


_NORMALIZE_BLOCK = 65_536  # rows normalised at a time (bounds the float64 scratch copy)


def _normalize(x: np.ndarray) -> np.ndarray:
    """Row-wise L2 normalisation (zero rows stay zero) -> float32.

    Computed in float64 after scaling each row by a power of two that brings its largest
    component near 1: a vector of magnitude ~1e308 (or ~1e-310) overflows (underflows) its own
    norm even in float64, which would turn every cosine score into 0. Scaling by a power of two
    is exact, so in-range vectors get the same bits as without it. Large inputs are processed
    in blocks, so the float64 scratch space stays small.
    """
    x = np.asarray(x)
    if x.ndim == 2 and len(x) > _NORMALIZE_BLOCK:
        out = np.empty(x.shape, np.float32)
        for s in range(0, len(x), _NORMALIZE_BLOCK):
            out[s : s + _NORMALIZE_BLOCK] = _normalize(x[s : s + _NORMALIZE_BLOCK])
        return out
    x = np.asarray(x, dtype=np.float64)
    peak = np.abs(x).max(axis=1, keepdims=True) if x.size else np.zeros((len(x), 1))
    _, exp = np.frexp(np.where(np.isfinite(peak) & (peak > 0), peak, 1.0))
    x = np.ldexp(x, -exp)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x / np.maximum(norms, 1e-300), dtype=np.float32)


def _contiguous(rows: Any) -> Any:
    """`rows` with one chunk per column, strings with 64-bit offsets. A search takes a few
    rows by position, and Arrow's take over a chunked column concatenates its chunks on every
    call (measured: 8 ms a call at 4M rows in 4 chunks, as Parquet row groups load, against
    7 us in one); one chunk of 32-bit-offset strings would stop at 2 GiB of text."""
    import pyarrow as pa

    fields = [
        pa.field(f.name, pa.large_string()) if pa.types.is_string(f.type) else f
        for f in rows.schema
    ]
    return rows.cast(pa.schema(fields)).combine_chunks()


def _rows_schema() -> Any:
    import pyarrow as pa

    return pa.schema([("id", pa.string()), ("uri", pa.string()), ("modality", pa.string())])


def labels_of(ids: Sequence[str]) -> np.ndarray:
    """The FAISS label of each id: the first 63 bits of its BLAKE2b hash, as int64.

    Labels are stable across versions (an update removes and adds by label) and spread ids
    evenly over shards (`label % shards`)."""
    return np.fromiter(
        (
            int.from_bytes(hashlib.blake2b(str(i).encode(), digest_size=8).digest(), "little") >> 1
            for i in ids
        ),
        dtype=np.int64,
        count=len(ids),
    )


@dataclass(frozen=True)
class IndexOptions:
    """How a version's vector index is laid out (docs/reindex.md, "The vector index").

    Attributes:
        flat_threshold: a modality with fewer vectors gets an exact flat index.
        pq_threshold: a modality with at least `flat_threshold` but fewer than this many
            vectors gets IVF-Flat (unquantised vectors); from this size on, IVF-PQ.
        nlist: IVF lists (default about 4 * sqrt(n) at training time).
        nprobe: IVF lists scanned per query (recall/latency trade-off).
        pq_m: PQ code bytes per vector (subquantizers of 8 bits); the largest divisor of the
            dimension not above it is used.
        rerank: IVF-PQ only: re-score `rerank * top_k` PQ candidates with the exact float
            vectors (stored next to the codes); 0 = PQ scores only, no float vectors kept;
            "auto" = the smallest depth of RERANK_LEVELS at which the index's own
            measurement reaches `recall_target` (`VectorIndex.calibrate_rerank`, made when
            the index is built and kept by its updates).
        recall_target: the recall@10 `rerank: auto` aims at.
        shards: the index is split into this many shards by `label % shards`.
        retrain_growth: an IVF modality is retrained (the version's index rebuilt) when its
            size leaves [trained / g, trained * g], trained being its size at training.
        retrain_drift: ... or when the vectors added since training fit the coarse quantizer
            worse than vectors held out of its training did: their mean cosine to the
            nearest centroid is lower by more than this (checked once they number at least
            max(100, 1 % of trained)).
        max_segments: an update merges a shard's newest segments (back to the first older
            one larger than them all, at least two) when it would hold more segments than
            this (each update adds one to the shards it adds rows to).
        compact_deleted: an update merges all of a shard's segments into one when more than
            this fraction of its stored rows are deleted.
    """

    flat_threshold: int = 20_000
    pq_threshold: int = 200_000
    nlist: int | None = None
    nprobe: int = 32
    pq_m: int = 64
    rerank: int | str = "auto"
    recall_target: float = 0.95
    shards: int = 1
    retrain_growth: float = 4.0
    retrain_drift: float = 0.05
    max_segments: int = 8
    compact_deleted: float = 0.25

    def __post_init__(self) -> None:
        for name in ("flat_threshold", "pq_threshold", "nprobe", "pq_m", "shards", "max_segments"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"index option {name} must be an integer >= 1, got {v!r}")
        if self.nlist is not None and (not isinstance(self.nlist, int) or self.nlist < 1):
            raise ValueError(f"index option nlist must be None or >= 1, got {self.nlist!r}")
        if self.rerank != AUTO and (
            not isinstance(self.rerank, int) or isinstance(self.rerank, bool) or self.rerank < 0
        ):
            raise ValueError(
                f"index option rerank must be an integer >= 0 or {AUTO!r}, got {self.rerank!r}"
            )
        target = self.recall_target
        if isinstance(target, bool) or not isinstance(target, int | float) or not 0 < target <= 1:
            raise ValueError(
                f"index option recall_target must be in (0, 1], got {self.recall_target!r}"
            )
        if not self.retrain_drift >= 0:
            raise ValueError(f"index option retrain_drift must be >= 0, got {self.retrain_drift}")
        if not 0 <= self.compact_deleted <= 1:
            raise ValueError(
                f"index option compact_deleted must be in [0, 1], got {self.compact_deleted}"
            )
        if not self.retrain_growth > 1:
            raise ValueError(f"index option retrain_growth must be > 1, got {self.retrain_growth}")

    def kind_for(self, n: int) -> str:
        """The index kind of a modality with `n` vectors."""
        if n < self.flat_threshold:
            return "flat"
        return "ivf" if n < self.pq_threshold else "ivfpq"

    def layout(self) -> dict:
        """The options an existing index must share for an update (others apply at search)."""
        return {
            "flat_threshold": self.flat_threshold,
            "pq_threshold": self.pq_threshold,
            "nlist": self.nlist,
            "pq_m": self.pq_m,
            "rerank_vectors": self.keeps_vectors,
            "shards": self.shards,
        }

    @property
    def keeps_vectors(self) -> bool:
        """Whether IVF-PQ parts keep their float vectors for re-ranking."""
        return self.rerank == AUTO or self.rerank > 0

    def to_json(self) -> dict:
        return dict(self.__dict__)


def _pq_shape(dim: int, pq_m: int, n_train: int) -> tuple[int, int]:
    """(subquantizers, bits) for IVF-PQ: m the largest divisor of dim <= pq_m, 8 bits unless
    the training sample is too small for 256 centroids per subquantizer."""
    m = max(d for d in range(1, min(pq_m, dim) + 1) if dim % d == 0)
    nbits = 8 if n_train >= 1024 else max(1, int(math.log2(max(2, n_train // 4))))
    return m, nbits


def _train(kind: str, x: np.ndarray, opts: IndexOptions, n: int | None = None) -> tuple[Any, dict]:
    """An empty, trained IVF index of `kind` for a modality of `n` vectors (default len(x))
    and its training record; `x` holds them all or a uniform sample of them, of which a
    seeded sample trains."""
    import faiss

    dim = x.shape[1]
    n = len(x) if n is None else n
    nlist = opts.nlist or max(1, min(int(4 * math.sqrt(n)), n // 39))
    nlist = min(nlist, n)
    # The drift rule's baseline is the fit of vectors k-means did not see: in-sample fit is
    # optimistic (each point pulled its centroid), so new vectors from the same distribution
    # would look drifted and force needless rebuilds.
    order = np.random.default_rng(0).permutation(len(x))
    held_n = min(_HELD_OUT, len(x) // 10)
    held_n = held_n if held_n >= 100 else 0
    rest = order[held_n:]
    sample_n = min(len(rest), max(40 * nlist, 16_384), _MAX_TRAIN)
    sample = x if sample_n == len(x) else x[np.sort(rest[:sample_n])]
    held = x[np.sort(order[:held_n])] if held_n else sample
    quantizer = faiss.IndexFlatIP(dim)
    info: dict[str, Any] = {"kind": kind, "trained_count": n, "nlist": nlist}
    if kind == "ivf":
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
    else:
        m, nbits = _pq_shape(dim, opts.pq_m, len(sample))
        index = faiss.IndexIVFPQ(quantizer, dim, nlist, m, nbits, faiss.METRIC_INNER_PRODUCT)
        info.update(pq_m=m, pq_bits=nbits)
    index.train(sample)
    info.update(fit=round(float(_fit(index, held).mean()), 6), added=0, added_fit=0.0)
    # Through bytes: the returned index owns its quantizer (no Python reference to keep).
    return faiss.deserialize_index(faiss.serialize_index(index)), info


def _train_modalities(
    modalities: dict[str, tuple[int, Callable[[], np.ndarray]]], opts: IndexOptions
) -> tuple[dict[str, str], dict[str, dict], dict[str, Any]]:
    """Each modality's index kind, training record and (IVF kinds) trained template, from
    its vector count and a function giving its vectors or a uniform sample of them (called
    only for the IVF kinds)."""
    kinds: dict[str, str] = {}
    training: dict[str, dict] = {}
    templates: dict[str, Any] = {}
    for m, (n, vectors) in sorted(modalities.items()):
        kinds[m] = opts.kind_for(n)
        if kinds[m] == "flat":
            training[m] = {"kind": "flat", "trained_count": n}
        else:
            templates[m], training[m] = _train(kinds[m], vectors(), opts, n=n)
    return kinds, training, templates


def _fit(index: Any, x: np.ndarray) -> np.ndarray:
    """Each vector's cosine to its nearest coarse centroid of the IVF `index` (how well the
    trained quantizer fits the vectors; the drift rule compares it with training time)."""
    import faiss

    d, _ = faiss.extract_index_ivf(index).quantizer.search(x, 1)
    return d[:, 0]


def _empty(kind: str, dim: int, template: Any | None) -> Any:
    """An empty index of `kind`: flat, or a copy of the modality's trained IVF template."""
    import faiss

    if kind == "flat":
        return faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    if template is None:
        raise ValueError(f"an {kind} part needs its trained template")
    return faiss.clone_index(template)


@dataclass
class _Part:
    """One modality's FAISS index within a shard; `vectors` are the float vectors kept for
    re-ranking IVF-PQ candidates, `vlabels` their labels (sorted) and `vorder` the row of
    `vectors` of each of them (None: the rows are in `vlabels` order)."""

    index: Any
    kind: str
    vectors: np.ndarray | None = None
    vlabels: np.ndarray | None = None
    vorder: np.ndarray | None = None
    template: Any = None  # the trained template whose quantizer `index` uses, kept alive

    @property
    def count(self) -> int:
        return int(self.index.ntotal)

    def vrows(self, labels: np.ndarray) -> np.ndarray:
        """The rows of `vectors` holding `labels` (which this part must hold)."""
        assert self.vlabels is not None
        pos = np.searchsorted(self.vlabels, labels)
        return pos if self.vorder is None else self.vorder[pos]

    def address_by_label(self) -> None:
        """Make an IVF index without re-ranking vectors reconstructible by label (`vector`):
        a hash map label -> list entry, made once when the index is built or loaded, never
        while searches run. It is left out of the saved index (`serialize`)."""
        import faiss

        if self.kind != "flat" and self.vectors is None:
            self.index.set_direct_map_type(faiss.DirectMap.Hashtable)

    def serialize(self) -> bytes:
        """A flat part: the FAISS index as bytes. An IVF part: its inverted lists only (codes
        and labels, `faiss.write_InvertedLists`); the coarse quantizer and PQ codebooks are
        the modality's trained template, stored once per index root rather than once per
        segment (at nlist = 4 sqrt(N), D = 1024 the quantizer alone is 16 MB at 1M vectors
        and 0.5 GB at 10^9). No label map of `address_by_label` is stored either way."""
        import faiss

        if self.kind == "flat":
            return faiss.serialize_index(self.index).tobytes()
        w = faiss.VectorIOWriter()
        faiss.write_InvertedLists(faiss.extract_index_ivf(self.index).invlists, w)
        return faiss.vector_to_array(w.data).tobytes()

    @classmethod
    def deserialize(cls, blob: np.ndarray, entry: dict, template: Any | None) -> _Part:
        """The part stored by `serialize` (`entry`: its meta.json entry); IVF parts are
        rebuilt on a copy of the modality's trained `template`. Parts of format-2 indexes
        (`codes` absent) are whole FAISS indexes."""
        import faiss

        if entry.get("codes") != "invlists":
            return cls(faiss.deserialize_index(blob), entry["kind"])
        if template is None:
            raise ValueError(f"an {entry['kind']} part needs its trained template")
        r = faiss.VectorIOReader()
        faiss.copy_array_to_vector(blob, r.data)
        lists = faiss.read_InvertedLists(r)
        index = _on_template(template)
        index.replace_invlists(lists, True)
        lists.this.disown()  # the index owns and frees the lists now
        index.ntotal = int(entry["count"])
        return cls(index, entry["kind"], template=template)

    def vector(self, label: int) -> np.ndarray:
        """The stored vector of `label` (which this part must hold) as float32."""
        if self.vectors is not None:
            row = int(self.vrows(np.array([label], np.int64))[0])
            return np.array(self.vectors[row], dtype=np.float32)
        return np.asarray(self.index.reconstruct(int(label)), dtype=np.float32)


def _probe(part: _Part, q: np.ndarray, k: int, params: Any, coarse: dict | None) -> Any:
    """FAISS search of one part. An IVF part's coarse assignment (the `nprobe` nearest
    centroids) is computed once per query and quantizer and kept in `coarse`: every segment
    and shard of a modality is on its trained template's one quantizer, so a query pays for it
    once, not once per segment (at nlist ~ 4 sqrt(N) it is the largest fixed cost of a probe:
    126k centroids x 1024 at 10^9). FAISS's own `search` does the same two steps."""
    import faiss

    index = part.index
    if coarse is None or not isinstance(index, faiss.IndexIVF):
        return index.search(q, k, params=params)
    nprobe = params.nprobe
    key = (int(index.quantizer.this), nprobe)
    if key not in coarse:
        coarse[key] = index.quantizer.search(q, nprobe)
    dq, iq = coarse[key]
    # The C++ call: FAISS's Python wrapper of it takes no search parameters (the selector of
    # deleted labels); its assignment's width is params.nprobe, as computed above.
    x = np.ascontiguousarray(q, np.float32)  # held: FAISS reads it through a raw pointer
    d = np.empty((len(x), k), np.float32)
    i = np.empty((len(x), k), np.int64)
    index.search_preassigned_c(
        len(x),
        faiss.swig_ptr(x),
        k,
        faiss.swig_ptr(iq),
        faiss.swig_ptr(dq),
        faiss.swig_ptr(d),
        faiss.swig_ptr(i),
        False,
        params,
    )
    return d, i


def _on_template(template: Any) -> Any:
    """An empty IVF index that uses the trained `template`'s coarse quantizer (shared, not
    copied: every segment of a modality searches with one quantizer in memory) and a copy of
    its PQ codebooks. The caller keeps `template` alive as long as the index."""
    import faiss

    if isinstance(template, faiss.IndexIVFPQ):
        index = faiss.IndexIVFPQ(
            template.quantizer,
            template.d,
            template.nlist,
            template.pq.M,
            template.pq.nbits,
            template.metric_type,
        )
        index.pq = template.pq
        index.by_residual = template.by_residual
        index.is_trained = True
        return index
    if isinstance(template, faiss.IndexIVFFlat):
        return faiss.IndexIVFFlat(
            template.quantizer, template.d, template.nlist, template.metric_type
        )
    raise ValueError(f"unsupported trained template {type(template).__name__}")


@dataclass(frozen=True)
class PartInfo:
    """A modality's index kind and vector count (summed over the loaded shards)."""

    kind: str
    count: int


def _in_sorted(labels: np.ndarray, values: Any) -> np.ndarray:
    """`np.isin(labels, values)` for sorted, unique `labels` (a segment's): one binary search
    per value. An update looks a change's few labels up in segments of N rows; np.isin sorts
    both arrays on every call (O(N log N), three calls a segment), this costs
    O(len(values) log N) and the mask. Labels out of order (not a file this module wrote) fall
    back to np.isin."""
    values = np.asarray(values, labels.dtype)
    if len(labels) > 1 and not np.all(labels[1:] > labels[:-1]):
        return np.isin(labels, values)
    mask = np.zeros(len(labels), bool)
    if len(labels) and len(values):
        at = np.searchsorted(labels, values)
        ok = at < len(labels)
        at = at[ok]
        mask[at[labels[at] == values[ok]]] = True
    return mask


class _Segment:
    """An immutable set of a shard's vectors written together (by a build, an update's
    additions or a compaction): rows + per-modality parts, and the labels later versions
    deleted from it (`deleted`, sorted; their entries stay in the files and are skipped)."""

    def __init__(
        self,
        labels: np.ndarray,
        rows: Any,
        parts: dict[str, _Part],
        deleted: np.ndarray | None = None,
    ) -> None:
        self.labels = labels  # int64, sorted
        self.rows = _contiguous(rows)  # pyarrow Table (id, uri, modality) in label order
        self.parts = parts
        self.deleted = np.zeros(0, np.int64) if deleted is None else np.unique(deleted)
        # Made once, here: searches on several threads share it (FAISS only reads it).
        self._selector: Any = None
        if len(self.deleted):
            import faiss

            batch = faiss.IDSelectorBatch(self.deleted)
            self._selector = (faiss.IDSelectorNot(batch), batch)  # keep `batch` alive
        self._live_counts: dict[str, int] | None = None

    @property
    def stored(self) -> int:
        return len(self.labels)

    @property
    def count(self) -> int:
        return len(self.labels) - len(self.deleted)

    def live(self) -> np.ndarray:
        """Boolean mask of the rows not deleted."""
        return ~_in_sorted(self.labels, self.deleted)

    def live_counts(self) -> dict[str, int]:
        """Live vectors per modality (computed once: a segment does not change)."""
        if self._live_counts is None:
            mods = self.rows.column("modality").to_numpy(zero_copy_only=False)[self.live()]
            names, counts = np.unique(mods.astype(str), return_counts=True)
            self._live_counts = dict(zip(names.tolist(), counts.tolist(), strict=True))
        return self._live_counts

    def row_of(self, label: int) -> int | None:
        """The row of `label` if this segment holds it live, else None."""
        j = int(np.searchsorted(self.labels, label))
        if j == len(self.labels) or int(self.labels[j]) != label:
            return None
        k = int(np.searchsorted(self.deleted, label))
        return None if k < len(self.deleted) and int(self.deleted[k]) == label else j

    @classmethod
    def build(
        cls,
        labels: np.ndarray,
        rows: Any,
        vecs: np.ndarray,
        kinds: dict[str, str],
        templates: dict[str, Any],
        opts: IndexOptions,
    ) -> _Segment:
        """A segment from its rows (any order) and their normalised vectors."""
        order = np.argsort(labels, kind="stable")
        rows = rows.select(_rows_schema().names).cast(_rows_schema())
        labels, vecs, rows = labels[order], vecs[order], rows.take(order)
        seg = cls(labels, rows, {})
        mods = rows.column("modality").to_numpy(zero_copy_only=False)
        dim = vecs.shape[1]
        for m in sorted(set(mods.tolist())):
            sel = np.flatnonzero(mods == m)
            part = _Part(_empty(kinds[m], dim, templates.get(m)), kinds[m])
            part.index.add_with_ids(vecs[sel], labels[sel])
            if part.kind == "ivfpq" and opts.keeps_vectors:
                part.vectors, part.vlabels = np.ascontiguousarray(vecs[sel]), labels[sel]
            seg.parts[m] = part
        return seg

    @classmethod
    def merge(cls, segments: Sequence[_Segment], fs: Any = None, path: str = "") -> _Segment:
        """One segment with the live rows of `segments` (compaction): FAISS entries are moved
        (`merge_from`: codes are copied, never re-encoded), deleted ones dropped. Re-ranking
        vectors are streamed into `{path}/<modality>.vectors.npy` on `fs` when given (a
        shard's vectors need not fit in memory; `save` to `path` then keeps that file), else
        gathered in memory."""
        import faiss
        import pyarrow as pa

        parts: dict[str, _Part] = {}
        for m in sorted({m for s in segments for m in s.parts}):
            merged: Any = None
            kind = next(s.parts[m].kind for s in segments if m in s.parts)
            for s in segments:
                part = s.parts.get(m)
                if part is None:
                    continue
                idx = faiss.clone_index(part.index)
                if kind != "flat":
                    idx.set_direct_map_type(faiss.DirectMap.NoMap)
                if len(s.deleted):
                    idx.remove_ids(faiss.IDSelectorBatch(s.deleted))
                if merged is None:
                    merged = idx
                else:
                    merged.merge_from(idx, 0)
            if merged is None or merged.ntotal == 0:
                continue
            parts[m] = _Part(merged, kind)
            kept = [
                (s.parts[m], s.parts[m].vlabels[~np.isin(s.parts[m].vlabels, s.deleted)])
                for s in segments
                if m in s.parts and s.parts[m].vectors is not None
            ]
            if kept:
                _merge_vectors(parts[m], kept, fs, f"{path}/{m}.vectors.npy")
        masks = [s.live() for s in segments]
        labels = np.concatenate([s.labels[k] for s, k in zip(segments, masks, strict=True)])
        rows = pa.concat_tables(
            [s.rows.filter(pa.array(k)) for s, k in zip(segments, masks, strict=True)]
        )
        order = np.argsort(labels, kind="stable")
        return cls(labels[order], rows.take(order), parts)

    def _params(self, part: _Part, nprobe: int) -> Any:
        """FAISS search parameters: nprobe, and the selector that skips the deleted labels."""
        import faiss

        sel = self._selector[0] if self._selector is not None else None
        if part.kind == "flat":
            return faiss.SearchParameters(sel=sel) if sel is not None else None
        return faiss.SearchParametersIVF(sel=sel, nprobe=min(nprobe, part.index.nlist))

    def search(
        self,
        q: np.ndarray,
        top_k: int,
        modality: str | None,
        nprobe: int,
        rerank: int | dict[str, int],
        coarse: dict | None = None,
    ) -> list[dict]:
        """This segment's top-k for the normalised (1, D) query, ordered by (-score, id).
        `rerank`: one depth, or one per modality (`VectorIndex.rerank_depths`). `coarse`
        caches the query's coarse assignment per IVF quantizer (`_probe`)."""
        if modality is None:
            parts = list(self.parts.items())
        else:
            parts = [(modality, self.parts[modality])] if modality in self.parts else []
        scores: list[np.ndarray] = []
        labels: list[np.ndarray] = []
        for m, part in parts:
            depth = rerank if isinstance(rerank, int) else rerank.get(m, UNCALIBRATED_RERANK)
            k = top_k
            if part.kind != "flat" and part.vectors is not None and depth:
                k = top_k * depth
            d, i = _probe(part, q, min(k, part.count), self._params(part, nprobe), coarse)
            keep = i[0] >= 0
            d, i = d[0][keep], i[0][keep]
            if part.vectors is not None and depth and len(i):
                rows = part.vrows(i)
                will_need(part.vectors, rows)
                exact = np.asarray(part.vectors[rows], np.float64) @ q[0].astype(np.float64)
                d = exact.astype(np.float32)
            scores.append(d)
            labels.append(i)
        if not scores:
            return []
        s = np.concatenate(scores)
        pos = np.searchsorted(self.labels, np.concatenate(labels))
        if len(s) > top_k:  # re-ranked candidates: only the top_k and their ties are ordered
            keep = np.flatnonzero(s >= np.partition(s, len(s) - top_k)[len(s) - top_k])
            s, pos = s[keep], pos[keep]
        ids = self.rows.column("id").take(pos).to_pylist()
        best = sorted(range(len(s)), key=lambda j: (-s[j], ids[j]))[:top_k]
        picked = self.rows.take(pos[best])
        return [
            {"id": i, "uri": u, "modality": m, "score": float(s[j])}
            for i, u, m, j in zip(
                picked.column("id").to_pylist(),
                picked.column("uri").to_pylist(),
                picked.column("modality").to_pylist(),
                best,
                strict=True,
            )
        ]

    def save(self, fs: Any, path: str) -> dict:
        """Write the segment's files (not its deletions) under `path`; returns their entry.
        A part with `vlabels` but no `vectors` had its re-ranking vectors streamed to `path`
        already (`_ShardBuilder`, `merge`)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        fs.makedirs(path, exist_ok=True)
        table = pa.table({"label": pa.array(self.labels, pa.int64())})
        for c in ("id", "uri", "modality"):
            table = table.append_column(c, self.rows.column(c))
        buf = io.BytesIO()
        pq.write_table(table, buf)
        fs.pipe_file(f"{path}/rows.parquet", buf.getvalue())
        parts = {}
        for m, part in self.parts.items():
            fs.pipe_file(f"{path}/{m}.faiss", part.serialize())
            entry: dict[str, Any] = {"kind": part.kind, "count": part.count, "vectors": False}
            if part.kind != "flat":
                entry["codes"] = "invlists"
            if part.vlabels is not None:
                if part.vectors is not None:
                    n, dim = part.vectors.shape
                    with _open_vectors(fs, f"{path}/{m}.vectors.npy", n, dim) as f:
                        for i in range(0, n, BUILD_BATCH_ROWS):
                            _write_rows(f, part.vectors[i : i + BUILD_BATCH_ROWS])
                fs.pipe_file(f"{path}/{m}.labels.npy", _npy(part.vlabels))
                if part.vorder is not None:
                    fs.pipe_file(f"{path}/{m}.order.npy", _npy(part.vorder))
                    entry["order"] = True
                entry["vectors"] = True
            parts[m] = entry
        return {"rows": self.stored, "parts": parts, "files": _segment_file_sizes(fs, path, parts)}

    @classmethod
    def load(
        cls,
        fs: Any,
        base: str,
        entry: dict,
        local: bool,
        templates: dict[str, Any],
        deleted: np.ndarray | None = None,
        vectors_cache: str | None = None,
    ) -> _Segment:
        """Read the segment of `entry` (paths relative to the index folder `base`; IVF parts
        on their modality's trained template); re-ranking vectors are memory-mapped when
        local, or from their copy in the local folder `vectors_cache` (`cached_vectors`).
        `deleted` overrides the entry's deletions."""
        import pyarrow.parquet as pq

        path = _resolve(base, entry["path"])
        table = pq.read_table(io.BytesIO(fs.cat_file(f"{path}/rows.parquet")))
        labels = table.column("label").to_numpy()
        rows = table.select(_rows_schema().names).cast(_rows_schema())
        parts = {}
        for m, p in entry["parts"].items():
            blob = np.frombuffer(fs.cat_file(f"{path}/{m}.faiss"), dtype=np.uint8)
            part = _Part.deserialize(blob, p, templates.get(m))
            if p.get("vectors"):
                vpath = f"{path}/{m}.vectors.npy"
                if local:
                    part.vectors = _map_random(vpath)
                elif vectors_cache:
                    part.vectors = cached_vectors(fs, vpath, vectors_cache)
                else:
                    part.vectors = np.load(io.BytesIO(fs.cat_file(vpath)))
                part.vlabels = np.load(io.BytesIO(fs.cat_file(f"{path}/{m}.labels.npy")))
                if p.get("order"):
                    part.vorder = np.load(io.BytesIO(fs.cat_file(f"{path}/{m}.order.npy")))
            parts[m] = part
        if deleted is None:
            deleted = _read_deleted(fs, base, entry)
        return cls(labels, rows, parts, deleted)


def _segment_file_names(parts: dict) -> list[str]:
    """The files a segment with these meta.json `parts` entries consists of."""
    names = ["rows.parquet"]
    for m, p in parts.items():
        names.append(f"{m}.faiss")
        if p.get("vectors"):
            names += [f"{m}.vectors.npy", f"{m}.labels.npy"]
            if p.get("order"):
                names.append(f"{m}.order.npy")
    return names


def _listed_sizes(fs: Any, path: str) -> dict[str, int]:
    """{file name: size} of the files directly in the folder `path` (empty if none)."""
    return {base_name(p): n for p, n in listed_sizes(fs, path).items()}


def _segment_file_sizes(fs: Any, path: str, parts: dict) -> dict[str, int]:
    """{file name: size} of the segment just written at `path` (recorded in its entry: an
    update checks the files it shares against it, `_damaged_segment_file`)."""
    listed = _listed_sizes(fs, path)
    return {n: listed[n] for n in _segment_file_names(parts) if n in listed}


def _damaged_segment_file(fs: Any, base: str, meta: dict) -> str | None:
    """The first file of the index's segments (folder `base`) whose size is not the one
    recorded when it was written, described; None when all match. An update shares the
    segments it does not merge without reading their codes or vectors, so a file cut short,
    emptied or deleted since would otherwise pass into every later version. Entries without
    recorded sizes (written before they were recorded) are not checked."""
    for seg in (e for segs in _segment_entries(meta) for e in segs):
        recorded = seg.get("files")
        if not recorded:
            continue
        path = _resolve(base, seg["path"])
        listed = _listed_sizes(fs, path)
        for name, size in sorted(recorded.items()):
            if listed.get(name) != size:
                now = "missing" if name not in listed else f"{listed[name]} bytes"
                return f"{path}/{name} is {now}, {size} bytes when it was written"
    return None


def _map_random(path: str) -> np.ndarray:
    """The .npy file at `path` memory-mapped for random reads: a search reads a few scattered
    vectors, and the kernel's default read-ahead would pull ~32 neighbours into the page
    cache with each one (measured: 200 queries touched nearly the whole file)."""
    import mmap

    arr = np.load(path, mmap_mode="r")
    m = getattr(arr, "_mmap", None)
    if m is not None and hasattr(mmap, "MADV_RANDOM"):
        m.madvise(mmap.MADV_RANDOM)
    return arr


CACHED_SUFFIX = ".vectors.npy"


def cached_vectors(fs: Any, path: str, cache_dir: str) -> np.ndarray:
    """The re-ranking vectors file `path` on the object store `fs`, memory-mapped from its copy
    in the local folder `cache_dir`, downloaded unless a copy of the same object is there.

    A search replica then holds only the pages its queries read (page cache, evictable), not
    N x D x 4 bytes of memory; the cost is the same bytes of local disk. Copies are named by
    the object's URI, size and ETag (or mtime), so one written again under the same name is
    fetched again; a segment an update shares with its parent is fetched once for both
    versions. A copy lands under a temporary name and is renamed into place whole, so
    processes sharing the folder never map a partial file."""
    import threading

    info = fs.info(path)
    size = int(info["size"])
    tag = info.get("ETag") or info.get("etag") or info.get("mtime") or ""
    name = f"{fs.unstrip_protocol(path)}\0{size}\0{tag}"
    key = hashlib.sha256(name.encode()).hexdigest()[:32]
    local = os.path.join(cache_dir, key + CACHED_SUFFIX)
    if not (os.path.exists(local) and os.path.getsize(local) == size):
        os.makedirs(cache_dir, exist_ok=True)
        part = f"{local}.{os.getpid()}-{threading.get_ident()}.part"
        try:
            fs.get_file(path, part)
            if os.path.getsize(part) != size:
                raise OSError(f"copying {path} to {part}: {os.path.getsize(part)} of {size} bytes")
            os.replace(part, local)
        finally:
            if os.path.exists(part):
                os.remove(part)
    return _map_random(local)


def prune_vectors_cache(cache_dir: str, keep: Iterable[VectorIndex]) -> list[str]:
    """Delete the copies in `cache_dir` (`cached_vectors`) that none of the indexes in `keep`
    maps, and partial downloads untouched for an hour (a crashed copy); returns the paths
    deleted. A replica calls it after loading a new version, keeping the versions it still
    serves: copies of segments the new version shares with the old stay. (A deleted file
    another process still maps stays readable to it until unmapped.)"""
    used = {
        os.path.realpath(p.vectors.filename)
        for index in keep
        for sh in index.shards.values()
        for seg in sh.segments
        for p in seg.parts.values()
        if isinstance(p.vectors, np.memmap) and p.vectors.filename
    }
    gone = []
    try:
        names = os.listdir(cache_dir)
    except FileNotFoundError:
        return gone
    for name in names:
        path = os.path.join(cache_dir, name)
        try:
            stale = name.endswith(".part") and time.time() - os.path.getmtime(path) > 3600
            if stale or (name.endswith(CACHED_SUFFIX) and os.path.realpath(path) not in used):
                os.remove(path)
                gone.append(path)
        except FileNotFoundError:  # another process's rename or prune
            continue
    return gone


def will_need(arr: np.ndarray, rows: np.ndarray) -> None:
    """Ask the kernel to start reading the pages of `rows` of the memory-mapped `arr` now,
    all of them at once (madvise WILLNEED), before they are touched; a no-op for an array in
    memory. A re-rank then waits on reads in flight together instead of taking one page fault
    after another, each a synchronous read of the disk when the page is not cached (the file
    is mapped MADV_RANDOM, `_map_random`). The cost when the pages are cached is one system
    call per row (about a microsecond); the gain when they are not is the disk's queue depth:
    `benchmarks/bench_rerank_io.py`, `benchmarks/bench_search.py --prefetch-ab`."""
    import mmap

    m = getattr(arr, "_mmap", None)
    if m is None or len(rows) < 2 or not hasattr(mmap, "MADV_WILLNEED"):
        return
    # Where the array's data starts in the mapping: np.memmap maps from an offset aligned to
    # the allocation granularity, so the .npy header's end is not the mapping's start.
    data = arr.ctypes.data - np.frombuffer(m, np.uint8).ctypes.data
    row_bytes = arr.strides[0]
    start = data + np.asarray(rows, np.int64) * row_bytes
    page = start - start % mmap.PAGESIZE
    for a, n in zip(page.tolist(), (start + row_bytes - page).tolist(), strict=True):
        m.madvise(mmap.MADV_WILLNEED, a, n)


def _open_vectors(fs: Any, file: str, n: int, dim: int) -> Any:
    """`file` on `fs` opened for writing an (n, dim) float32 .npy, its header written
    (`_vectors_header`): the rows are then streamed in (`_write_rows`)."""
    fs.makedirs(posixpath.dirname(file), exist_ok=True)
    f = fs.open(file, "wb")
    f.write(_vectors_header(n, dim))
    return f


def _vectors_header(n: int, dim: int) -> bytes:
    """A .npy (format 1.0) header for (n, dim) float32, padded to 4096 bytes so that the rows
    start on a page boundary: a row of D = 1024 is then one page of the file, where numpy's
    64-byte-aligned header makes every row straddle two, and a re-rank's cold read of a
    candidate reads one page, not two. Written by hand because numpy's writer aligns to 64
    only; any numpy reads it (the header length is a field of the format)."""
    magic = b"\x93NUMPY\x01\x00"
    text = repr({"descr": "<f4", "fortran_order": False, "shape": (n, dim)})
    pad = VECTORS_HEADER_BYTES - len(magic) - 2 - len(text) - 1
    return magic + struct.pack("<H", len(text) + pad + 1) + (text + " " * pad + "\n").encode()


def _write_rows(f: Any, v: np.ndarray) -> None:
    f.write(memoryview(np.ascontiguousarray(v, "<f4")).cast("B"))


def _label_order(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """(`labels` sorted, the row of each: None when they already were in order)."""
    order = np.argsort(labels, kind="stable")
    return labels[order], None if bool(np.all(order == np.arange(len(order)))) else order


def _merge_vectors(part: _Part, kept: list[tuple[_Part, np.ndarray]], fs: Any, file: str) -> None:
    """Give the merged `part` the re-ranking vectors of the `kept` labels of each source part:
    in memory (label order) when `fs` is None, else streamed into `file` on `fs`: each
    source's rows in file order (sequential reads), in chunks of `BUILD_BATCH_ROWS`, with
    `vorder` mapping labels to rows."""
    if fs is None:
        labels = np.concatenate([k for _, k in kept])
        vecs = np.concatenate([np.asarray(p.vectors[p.vrows(k)]) for p, k in kept])
        order = np.argsort(labels, kind="stable")
        part.vlabels, part.vectors = labels[order], np.ascontiguousarray(vecs[order])
        return
    dim = next(p.vectors.shape[1] for p, _ in kept)
    written = []
    with _open_vectors(fs, file, sum(len(k) for _, k in kept), dim) as f:
        for p, k in kept:
            rows = p.vrows(k)
            o = np.argsort(rows, kind="stable")
            rows = rows[o]
            written.append(k[o])
            for i in range(0, len(rows), BUILD_BATCH_ROWS):
                _write_rows(f, p.vectors[rows[i : i + BUILD_BATCH_ROWS]])
    part.vlabels, part.vorder = _label_order(np.concatenate(written))


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def _resolve(base: str, rel: str) -> str:
    """The filesystem path of `rel` (relative to the index folder `base`; segments written
    by an ancestor version are referenced as ``../../<version>/index/...``)."""
    return posixpath.normpath(posixpath.join(base, rel))


def _relative(path: str, base: str) -> str:
    """`path` relative to the index folder `base` (both filesystem paths of one store)."""
    return posixpath.relpath(path, base)


def _read_deleted(fs: Any, base: str, entry: dict) -> np.ndarray:
    if not entry.get("deleted"):
        return np.zeros(0, np.int64)
    return np.load(io.BytesIO(fs.cat_file(_resolve(base, entry["deleted"]))))


def _segment_entries(meta: dict) -> list[list[dict]]:
    """Each shard's segment entries from an index's meta.json (format 2, written before
    segments existed, is one segment per shard in the shard's folder)."""
    out = []
    for s, e in enumerate(meta["shards"]):
        if "segments" in e:
            out.append(e["segments"])
        else:
            parts = {m: {**p, "live": p["count"]} for m, p in e["parts"].items()}
            out.append(
                [
                    {
                        "path": shard_dir(s),
                        "rows": e["count"],
                        "count": e["count"],
                        "parts": parts,
                        "deleted": None,
                    }
                ]
            )
    return out


class _Shard:
    """The vectors whose `label % shards` is this shard's number: its segments, oldest
    first (an id is live in at most one of them)."""

    def __init__(self, segments: list[_Segment]) -> None:
        self.segments = segments

    @property
    def count(self) -> int:
        return sum(s.count for s in self.segments)

    def locate(self, label: int) -> tuple[_Segment, int] | None:
        """(segment, row) holding `label` live, or None."""
        for seg in reversed(self.segments):
            j = seg.row_of(label)
            if j is not None:
                return seg, j
        return None

    def search(
        self,
        q: np.ndarray,
        top_k: int,
        modality: str | None,
        nprobe: int,
        rerank: int | dict[str, int],
        coarse: dict | None = None,
    ) -> list[dict]:
        """This shard's top-k, ordered by (-score, id) like every level of the merge; its
        segments share the query's coarse assignments (`coarse`: also with other shards)."""
        coarse = {} if coarse is None else coarse
        hits = [s.search(q, top_k, modality, nprobe, rerank, coarse) for s in self.segments]
        return hits[0] if len(hits) == 1 else merge_hits(hits, top_k)

    @classmethod
    def load(
        cls,
        fs: Any,
        base: str,
        entries: list[dict],
        local: bool,
        templates: dict[str, Any],
        vectors_cache: str | None = None,
    ) -> _Shard:
        return cls(
            [
                _Segment.load(fs, base, e, local, templates, vectors_cache=vectors_cache)
                for e in entries
            ]
        )


def merge_hits(hit_lists: Sequence[list[dict]], top_k: int) -> list[dict]:
    """The global top-k from per-shard top-k lists: by score, then id (the order every
    shard uses, so the merge equals one index's search over the union)."""
    merged = [h for hits in hit_lists for h in hits]
    merged.sort(key=lambda h: (-h["score"], h["id"]))
    return merged[:top_k]


def check_query(vector: Any, top_k: Any, modality: Any, dim: int | None) -> np.ndarray:
    """Validate a search request; returns the query as a normalised (1, D) float32 array.

    Bad input (wrong length, non-finite or zero vector, top_k out of range, unknown modality)
    raises InvalidInput naming the field. `dim` None skips the length check.
    """
    try:
        q = np.asarray(vector, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise InvalidInput("vector", "must be a list of numbers") from None
    if dim is not None and q.shape[0] != dim:
        raise InvalidInput(
            "vector", f"has {q.shape[0]} values; this index holds {dim}-d embeddings"
        )
    if not np.all(np.isfinite(q)) or not np.any(q):
        raise InvalidInput("vector", "must be finite and not all zero")
    if not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= MAX_TOP_K:
        raise InvalidInput("top_k", f"must be an integer in [1, {MAX_TOP_K}], got {top_k!r}")
    if modality is not None and str(modality) not in KINDS:
        raise InvalidInput("modality", f"unknown modality filter {modality!r}; one of {KINDS}")
    return _normalize(q[None, :])


def _rows_table(ids: Any, uris: Any, modalities: Any) -> Any:
    import pyarrow as pa

    return pa.table(
        {
            "id": pa.array([str(i) for i in ids], pa.string()),
            "uri": pa.array([str(u) for u in uris], pa.string()),
            "modality": pa.array([str(m) for m in modalities], pa.string()),
        },
        schema=_rows_schema(),
    )


def _check_labels(labels: np.ndarray, ids: Any) -> None:
    """Duplicate ids, or (vanishingly unlikely) two ids with one 63-bit label, are refused."""
    uniq, counts = np.unique(labels, return_counts=True)
    if len(uniq) == len(labels):
        return
    bad = uniq[counts > 1][0]
    clash = sorted({str(ids[j]) for j in np.flatnonzero(labels == bad)})
    if len(clash) == 1:
        raise ValueError(f"duplicate id {clash[0]!r} in the index rows")
    raise ValueError(f"ids {clash} hash to the same index label; rename one of them")


class VectorIndex:
    """Cosine-similarity search over (id, uri, modality) rows, split into shards by id hash,
    one FAISS index per modality in each shard.

    Build with `VectorIndex.build(...)`, persist with `save(uri)`, read with `load(uri)`
    (all shards, or the ones a search replica serves), update a saved index with
    `update_index`. Search is thread-safe (FAISS searches do not mutate the index).
    """

    def __init__(
        self,
        shards: dict[int, _Shard],
        dim: int,
        options: IndexOptions,
        training: dict[str, dict],
        templates: dict[str, Any],
    ) -> None:
        self.shards = shards
        self.dim = dim
        self.options = options
        self.training = training
        self.templates = templates
        for shard in shards.values():
            for seg in shard.segments:
                for part in seg.parts.values():
                    part.address_by_label()

    @property
    def nprobe(self) -> int:
        return self.options.nprobe

    @property
    def count(self) -> int:
        """Number of vectors in the loaded shards."""
        return sum(s.count for s in self.shards.values())

    @property
    def parts(self) -> dict[str, PartInfo]:
        """Kind and vector count per modality over the loaded shards."""
        out: dict[str, PartInfo] = {}
        for s in self.shards.values():
            for seg in s.segments:
                live = seg.live_counts()
                for m, p in seg.parts.items():
                    prev = out.get(m)
                    out[m] = PartInfo(p.kind, live.get(m, 0) + (prev.count if prev else 0))
        return {m: p for m, p in sorted(out.items()) if p.count}

    @classmethod
    def build(
        cls,
        ids: Sequence[str],
        uris: Sequence[str],
        modalities: Sequence[str],
        embeddings: np.ndarray,
        **options: Any,
    ) -> VectorIndex:
        """Build from rows and their (N, D) embeddings; `options` are `IndexOptions` fields."""
        opts = IndexOptions(**options)
        emb = np.asarray(embeddings)
        if emb.ndim != 2 or emb.shape[0] != len(ids):
            raise ValueError(
                f"embeddings must be (N, D) with N = {len(ids)} rows, got shape {emb.shape}"
            )
        if not (len(ids) == len(uris) == len(modalities)):
            raise ValueError("ids, uris and modalities must have the same length")
        dim = int(emb.shape[1])
        rows = _rows_table(ids, uris, modalities)
        labels = labels_of(rows.column("id").to_pylist())
        _check_labels(labels, rows.column("id").to_pylist())
        vecs = _normalize(emb) if len(emb) else np.zeros((0, dim), np.float32)
        mods = rows.column("modality").to_numpy(zero_copy_only=False)
        kinds, training, templates = _train_modalities(
            {m: (int((mods == m).sum()), lambda m=m: vecs[mods == m]) for m in set(mods.tolist())},
            opts,
        )
        shard_of = labels % opts.shards
        shards = {}
        for s in range(opts.shards):
            sel = np.flatnonzero(shard_of == s)
            seg = _Segment.build(labels[sel], rows.take(sel), vecs[sel], kinds, templates, opts)
            shards[s] = _Shard([seg])
        index = cls(shards, dim, opts, training, templates)
        if _needs_calibration(opts, training):
            index.calibrate_rerank()
        return index

    @classmethod
    def from_table(cls, table: Any, **options: Any) -> VectorIndex:
        """Build from a pyarrow Table with `id`, `uri`, `modality`, `embedding` columns."""
        missing = {"id", "uri", "modality", "embedding"} - set(table.column_names)
        if missing:
            raise ValueError(f"embedding table lacks columns {sorted(missing)}")
        return cls.build(
            table.column("id").to_pylist(),
            table.column("uri").to_pylist(),
            table.column("modality").to_pylist(),
            embeddings_of(table),
            **options,
        )

    def search(
        self, vector: Sequence[float], top_k: int, modality: str | None = None
    ) -> list[dict]:
        """The `top_k` rows most similar to `vector` in the loaded shards, best first.

        Returns dicts with `id`, `uri`, `modality`, `score` (cosine similarity), ordered by
        score then id. Bad input raises InvalidInput naming the field (`check_query`).
        """
        q = check_query(vector, top_k, modality, self.dim)
        mod = None if modality is None else str(modality)
        return self._search(q, top_k, mod, self.rerank_depths)

    def _search(
        self, q: np.ndarray, top_k: int, mod: str | None, rerank: int | dict[str, int]
    ) -> list[dict]:
        coarse: dict = {}  # every shard and segment of a modality shares one quantizer
        per_shard = [
            s.search(q, top_k, mod, self.options.nprobe, rerank, coarse)
            for s in self.shards.values()
        ]
        return merge_hits(per_shard, top_k)

    @property
    def rerank_depths(self) -> int | dict[str, int]:
        """The re-ranking depth searches use: the `rerank` option, or with `rerank: auto`
        each modality's calibrated depth (`calibrate_rerank`; UNCALIBRATED_RERANK for an
        IVF-PQ modality whose index records none)."""
        if self.options.rerank != AUTO:
            return self.options.rerank
        return {m: int(t.get("rerank", UNCALIBRATED_RERANK)) for m, t in self.training.items()}

    def calibrate_rerank(
        self, queries: int = CALIBRATION_QUERIES, k: int = CALIBRATION_K, seed: int = 0
    ) -> dict[str, dict]:
        """Choose each IVF-PQ modality's re-ranking depth for `rerank: auto`: the smallest of
        RERANK_LEVELS whose recall@k against exact search, measured on this index, reaches
        the `recall_target` option (the largest level if none does, with a warning). Records
        it in the modality's training record (`rerank`, with the measured `rerank_recall` and
        `rerank_queries`) and returns those fields per modality.

        The queries are `queries` of the modality's live vectors, drawn at random (seeded);
        each query's own item is left out of both answers, where it would be a free hit. The
        exact answers come from one pass over the stored float vectors (k best per query
        kept), the approximate ones from this index's own search (all loaded shards, merged,
        at the `nprobe` option) asking for k + 1. How well this predicts recall on a user's
        queries depends on how those sit among the vectors: queries from another modality
        (text against images) can need a deeper re-rank; measure with your own queries
        (`benchmarks/bench_search.py`) and set `rerank` to a number where they differ."""
        out: dict[str, dict] = {}
        for m, t in sorted(self.training.items()):
            parts = [
                (seg, seg.parts[m])
                for sh in self.shards.values()
                for seg in sh.segments
                if m in seg.parts and seg.parts[m].vectors is not None
            ]
            if t.get("kind") != "ivfpq" or not parts:
                continue
            found = _calibration_queries(parts, queries, k, seed)
            if found is None:
                continue
            qvec, qlab, exact = found
            recall, depth = 0.0, RERANK_LEVELS[-1]
            for depth in RERANK_LEVELS:
                recall = self._recall(qvec, qlab, exact, m, k, depth)
                if recall >= self.options.recall_target:
                    break
            else:
                logger.warning(
                    "%s: re-ranking %d x top_k candidates reaches a recall@%d of %.3f, below "
                    "the recall_target %.3f: a larger nprobe (now %d) may be needed",
                    m, depth, k, recall, self.options.recall_target, self.options.nprobe,
                )  # fmt: skip
            rec = {"rerank": depth, "rerank_recall": round(recall, 4), "rerank_queries": len(qvec)}
            t.update(rec)
            out[m] = rec
            logger.info(
                "%s: rerank %d (recall@%d %.3f over %d queries)", m, depth, k, recall, len(qvec)
            )
        return out

    def _recall(
        self, qvec: np.ndarray, qlab: np.ndarray, exact: list[set], m: str, k: int, depth: int
    ) -> float:
        """Mean recall@k of this index's search of modality `m` at re-ranking `depth`."""
        total = 0.0
        for q, own, truth in zip(qvec, qlab, exact, strict=True):
            hits = self._search(q[None, :], k + 1, m, {m: depth})
            got = [int(x) for x in labels_of([h["id"] for h in hits]) if int(x) != int(own)]
            total += len(set(got[:k]) & truth) / len(truth)
        return total / len(qvec)

    def _locate(self, item_id: str) -> tuple[_Segment, int, int] | None:
        """(segment, row, label) of `item_id` if one of the loaded shards holds it, else None."""
        label = int(labels_of([str(item_id)])[0])
        shard = self.shards.get(label % self.options.shards)
        found = shard.locate(label) if shard is not None else None
        if found is None or found[0].rows.column("id")[found[1]].as_py() != str(item_id):
            return None
        return found[0], found[1], label

    def shard_of(self, item_id: str) -> int:
        """The number of the shard that holds (or would hold) `item_id`."""
        return int(labels_of([str(item_id)])[0]) % self.options.shards

    def item(self, item_id: str) -> dict | None:
        """`{id, uri, modality}` of the item `item_id`, or None if the loaded shards do not
        hold it."""
        found = self._locate(item_id)
        if found is None:
            return None
        seg, j, _ = found
        return {c: seg.rows.column(c)[j].as_py() for c in ("id", "uri", "modality")}

    def vector_of(self, item_id: str) -> np.ndarray | None:
        """The stored (normalised) vector of `item_id` as float32, or None if the loaded
        shards do not hold it: the exact re-ranking vector when the part keeps one, else the
        FAISS index's reconstruction (exact for flat and IVF-Flat, the PQ decoding for IVF-PQ
        without re-ranking vectors)."""
        found = self._locate(item_id)
        if found is None:
            return None
        seg, j, label = found
        return seg.parts[seg.rows.column("modality")[j].as_py()].vector(label)

    def meta(self) -> dict:
        return {
            "format": INDEX_FORMAT,
            "metric": "cosine",
            "dim": self.dim,
            "count": self.count,
            "options": self.options.to_json(),
            "training": self.training,
        }

    def save(self, uri: str, storage_options: StorageOptions | None = None) -> None:
        """Write the index (every shard, which must all be loaded) under the folder `uri`."""

        if set(self.shards) != set(range(self.options.shards)):
            raise ValueError("only an index with all its shards loaded can be saved")
        fs, path = filesystem(uri, storage_options)
        fs.makedirs(path, exist_ok=True)
        _save_templates(fs, path, self.templates)
        meta = self.meta()
        meta["trained"] = TRAINED_DIR
        meta["shards"] = []
        for s in range(self.options.shards):
            segs = self.shards[s].segments
            sdir = f"{path}/{shard_dir(s)}"
            one = segs[0]
            if len(segs) > 1 or len(one.deleted):
                one = _Segment.merge(segs, fs, sdir)
            entries = [_segment_entry(one, fs, sdir, path)] if one.stored else []
            meta["shards"].append({"count": one.stored, "segments": entries})
        # meta.json last: a reader that finds it finds everything it names.
        fs.pipe_file(f"{path}/{META_NAME}", json.dumps(meta, sort_keys=True).encode())

    @classmethod
    def load(
        cls,
        uri: str,
        storage_options: StorageOptions | None = None,
        shards: Sequence[int] | None = None,
        vectors_cache: str | None = None,
    ) -> VectorIndex:
        """Read an index written by `save` (or `update_index`) from the folder `uri`: the
        trained IVF templates, and the shards numbered in `shards` (default all; numbers past
        the index's shard count are skipped). Re-ranking vectors are memory-mapped from a
        local `uri`; from an object store they are read into memory, or, with
        `vectors_cache` (a local folder), copied there once and memory-mapped from the copy
        (`cached_vectors`, `prune_vectors_cache`)."""
        import faiss

        fs, path = filesystem(uri, storage_options)
        meta = read_index_meta(uri, storage_options)
        opts = IndexOptions(**meta["options"])
        wanted = range(opts.shards) if shards is None else [s for s in shards if s < opts.shards]
        local = protocol_of(uri) == "file"
        trained = _resolve(path, meta.get("trained", TRAINED_DIR))
        tmpl = {}
        for m, t in meta["training"].items():
            if t["kind"] != "flat":
                blob = np.frombuffer(fs.cat_file(f"{trained}/{m}.faiss"), np.uint8)
                tmpl[m] = faiss.deserialize_index(blob)
        entries = _segment_entries(meta)
        cache = None if local else vectors_cache
        loaded = {s: _Shard.load(fs, path, entries[s], local, tmpl, cache) for s in wanted}
        return cls(loaded, int(meta["dim"]), opts, meta["training"], tmpl)


def _calibration_queries(
    parts: list[tuple[_Segment, _Part]], queries: int, k: int, seed: int
) -> tuple[np.ndarray, np.ndarray, list[set]] | None:
    """`calibrate_rerank`'s queries in one modality's `parts` (segment, part with float
    vectors): (vectors, labels, each one's exact top-k labels, itself left out), or None
    when the parts hold fewer than k + 1 live vectors. One pass over the stored vectors,
    in chunks (memory-mapped files are read once, in order)."""
    labels, live = [], []
    for seg, part in parts:
        assert part.vlabels is not None
        deleted = _in_sorted(part.vlabels, seg.deleted)  # in vlabels order
        by_row, gone = part.vlabels, deleted
        if part.vorder is not None:  # vectors' rows are in arrival order
            by_row, gone = np.empty_like(part.vlabels), np.empty_like(deleted)
            by_row[part.vorder], gone[part.vorder] = part.vlabels, deleted
        labels.append(by_row)
        live.append(~gone)
    counts = [int(x.sum()) for x in live]
    total = sum(counts)
    if total <= k:
        return None
    pick = np.sort(np.random.default_rng(seed).choice(total, min(queries, total), replace=False))
    qvec, qlab = [], []
    start = 0
    for (_, part), lab, ok, n in zip(parts, labels, live, counts, strict=True):
        rows = np.flatnonzero(ok)[pick[(pick >= start) & (pick < start + n)] - start]
        qvec.extend(np.asarray(part.vectors[r], np.float32) for r in rows.tolist())
        qlab.extend(lab[rows].tolist())
        start += n
    q = np.stack(qvec)
    ql = np.asarray(qlab, np.int64)
    best_s = np.full((len(q), k), -np.inf, np.float32)
    best_l = np.full((len(q), k), -1, np.int64)
    for (_, part), lab, ok in zip(parts, labels, live, strict=True):
        assert part.vectors is not None
        for s in range(0, len(lab), BUILD_BATCH_ROWS):
            sc = q @ np.asarray(part.vectors[s : s + BUILD_BATCH_ROWS], np.float32).T
            chunk = lab[s : s + BUILD_BATCH_ROWS]
            sc[:, ~ok[s : s + BUILD_BATCH_ROWS]] = -np.inf
            sc[ql[:, None] == chunk[None, :]] = -np.inf  # a query's own vector
            cand_s = np.concatenate([best_s, sc], axis=1)
            cand_l = np.concatenate([best_l, np.broadcast_to(chunk, sc.shape)], axis=1)
            top = np.argpartition(-cand_s, k - 1, axis=1)[:, :k]
            best_s = np.take_along_axis(cand_s, top, axis=1)
            best_l = np.take_along_axis(cand_l, top, axis=1)
    exact = [set(lab[s > -np.inf].tolist()) for lab, s in zip(best_l, best_s, strict=True)]
    return q, ql, exact


def _calibrate_saved(uri: str, storage_options: StorageOptions | None) -> None:
    """`calibrate_rerank` on the index just written at `uri` (not yet published), its
    depths recorded in the training records of its meta.json (rewritten). An index on an
    object store is searched from a temporary local copy of its re-ranking vectors.

    A measurement that fails (the store unreachable while the vectors are copied, the disk
    full) is logged and leaves the depths unrecorded: the index is whole without them and
    searched at UNCALIBRATED_RERANK, and the next update measures again. A failed
    measurement must not cost the build it follows."""
    import tempfile

    fs, path = filesystem(uri, storage_options)
    try:
        with tempfile.TemporaryDirectory(prefix="imagebind-calibrate-") as cache:
            index = VectorIndex.load(uri, storage_options, vectors_cache=cache)
            records = index.calibrate_rerank()
            del index
    except Exception as e:
        logger.warning(
            "%s: could not measure the re-ranking depth (%s: %s); searched at %d until an "
            "update measures it",
            uri, type(e).__name__, e, UNCALIBRATED_RERANK,
        )  # fmt: skip
        return
    if records:
        meta = json.loads(fs.cat_file(f"{path}/{META_NAME}"))
        for m, rec in records.items():
            meta["training"][m].update(rec)
        fs.pipe_file(f"{path}/{META_NAME}", json.dumps(meta, sort_keys=True).encode())


def _needs_calibration(options: IndexOptions, training: dict) -> bool:
    """`rerank: auto` and an IVF-PQ modality whose depth is not measured yet."""
    return options.rerank == AUTO and any(
        t.get("kind") == "ivfpq" and "rerank" not in t for t in training.values()
    )


def _save_templates(fs: Any, path: str, templates: dict[str, Any]) -> None:
    """Write the trained IVF templates (`trained/<modality>.faiss`) of an index folder."""
    import faiss

    if templates:
        fs.makedirs(f"{path}/{TRAINED_DIR}", exist_ok=True)
    for m, t in templates.items():
        fs.pipe_file(f"{path}/{TRAINED_DIR}/{m}.faiss", faiss.serialize_index(t).tobytes())


def shard_dir(s: int) -> str:
    """The folder of shard number `s` inside an index folder."""
    return f"shard-{s:05d}"


def index_files(uri: str, storage_options: StorageOptions | None = None) -> list[str]:
    """The filesystem paths of the segment folders and deletion files the index at `uri`
    uses, its own and those of ancestor versions it shares (retention must keep them);
    empty if there is no index there."""
    _, path = filesystem(uri, storage_options)
    try:
        meta = read_index_meta(uri, storage_options)
    except FileNotFoundError:
        return []
    out = [_resolve(path, meta.get("trained", TRAINED_DIR))]
    for e in (e for segs in _segment_entries(meta) for e in segs):
        out.append(_resolve(path, e["path"]))
        if e.get("deleted"):
            out.append(_resolve(path, e["deleted"]))
    return out


def read_index_meta(uri: str, storage_options: StorageOptions | None = None) -> dict:
    """The `meta.json` of the index folder `uri` (format checked)."""
    fs, path = filesystem(uri, storage_options)
    try:
        meta = json.loads(fs.cat_file(f"{path}/{META_NAME}"))
    except FileNotFoundError:
        raise FileNotFoundError(f"no vector index at {uri} ({META_NAME} missing)") from None
    if meta.get("format") not in READABLE_FORMATS:
        raise ValueError(f"{uri}: unsupported index format {meta.get('format')!r}")
    return meta


@dataclass(frozen=True)
class IndexUpdate:
    """What `update_index` did: `mode` "updated" (the parent's index with the change applied)
    or "built" (from every row), `reason` for a build, and the counts applied."""

    mode: str
    reason: str | None
    added: int
    removed: int
    parts: dict[str, PartInfo]
    shards: int
    compacted: int = 0

    def record(self) -> dict:
        """The `index` entry of the version record."""
        return {
            "metric": "cosine",
            "mode": self.mode,
            "reason": self.reason,
            "upserted": self.added,
            "removed": self.removed,
            "shards": self.shards,
            "compacted_shards": self.compacted,
            "parts": {m: {"kind": p.kind, "count": p.count} for m, p in self.parts.items()},
        }


def update_index(
    out_uri: str,
    *,
    parent_uri: str | None,
    upserts: Any,
    deletes: Sequence[str],
    all_rows: Callable[[], Any],
    options: IndexOptions,
    storage_options: StorageOptions | None = None,
) -> IndexUpdate:
    """Write the index of a new version at `out_uri`: the parent's index (`parent_uri`, an
    index folder) with the change applied, shard by shard, or a build from every row when
    there is no usable parent or the retrain rule says so.

    Args:
        upserts: pyarrow Table (id, uri, modality, embedding) of the rows that are new or
            whose vector or uri changed since the parent.
        deletes: ids present in the parent and gone from the new version.
        all_rows: returns every row of the new version (same columns): a Table or an
            iterable of record batches; called only to build, twice (two streamed passes:
            counts and training samples, then the vectors; `_build_streaming`).
        options: the layout (must equal the parent's, else a build) and search settings.

    The update never retrains: the parent's coarse quantizer and PQ codebooks are kept and
    new vectors are encoded with them. A build happens when a modality's kind changes
    (it crossed `flat_threshold` or `pq_threshold`) or an IVF modality's size left
    [trained / retrain_growth, trained * retrain_growth].
    """

    reason, training, scan = _rebuild_reason(parent_uri, upserts, deletes, options, storage_options)
    if reason is not None:
        n, parts = _build_streaming(out_uri, all_rows, options, storage_options)
        return IndexUpdate("built", reason, n, 0, parts, options.shards)
    assert scan is not None
    return _update_from_parent(out_uri, scan, upserts, training, options, storage_options)


# Vectors kept per modality to train on: `_train` never uses more.
_MAX_TRAIN = 262_144
# Vectors `_train` holds out of k-means to measure the trained quantizer's fit (a tenth of
# what it is given, at most this many; none below 100).
_HELD_OUT = 16_384
# Rows a build handles at a time: its transient copies of one batch's vectors (normalised,
# selected per shard and modality) stay ~64 MiB each at D = 1024, whatever the caller's batches.
BUILD_BATCH_ROWS = 16_384


def _batches_of(all_rows: Callable[[], Any]) -> Iterator[Any]:
    """One pass over `all_rows()` (a pyarrow Table, or an iterable of record batches or
    tables) as tables of at most `BUILD_BATCH_ROWS` rows (slices: no copy)."""
    import pyarrow as pa

    rows = all_rows()
    if isinstance(rows, pa.Table):
        rows = rows.to_batches(max_chunksize=BUILD_BATCH_ROWS)
    for b in rows:
        t = pa.Table.from_batches([b]) if isinstance(b, pa.RecordBatch) else b
        for s in range(0, t.num_rows, BUILD_BATCH_ROWS):
            yield t.slice(s, BUILD_BATCH_ROWS)
        if not t.num_rows:
            yield t


class _Reservoir:
    """A uniform sample of at most `cap` vectors of one modality, kept while streaming
    (algorithm R, seeded), and the modality's count."""

    def __init__(self, cap: int, seed: int) -> None:
        self.cap, self.seen = cap, 0
        self.rng = np.random.default_rng(seed)
        self.x: np.ndarray | None = None

    def add(self, v: np.ndarray) -> None:
        if self.x is None:
            self.x = np.empty((self.cap, v.shape[1]), np.float32)
        fill = max(0, min(len(v), self.cap - self.seen))
        self.x[self.seen : self.seen + fill] = v[:fill]
        rest = v[fill:]
        if len(rest):  # row number t replaces a random slot with probability cap / (t + 1)
            t = self.seen + fill + np.arange(len(rest))
            slot = (self.rng.random(len(rest)) * (t + 1)).astype(np.int64)
            hit = slot < self.cap
            self.x[slot[hit]] = rest[hit]
        self.seen += len(v)

    def sample(self) -> np.ndarray:
        assert self.x is not None
        return self.x[: min(self.seen, self.cap)]


def _pick(a: Any, sel: np.ndarray) -> Any:
    """`a[sel]` (`a.take(sel)` for a table) for `sel`, increasing positions (`flatnonzero`),
    without a copy when they are all of `a`'s rows (one shard, one modality: the usual case)."""
    if len(sel) == len(a):
        return a
    return a[sel] if isinstance(a, np.ndarray) else a.take(sel)


class _ShardBuilder:
    """One shard of a streamed build, written under `path`: FAISS parts filled batch by
    batch, rows kept (no vectors), and IVF-PQ re-ranking vectors streamed straight into
    their `.vectors.npy` in arrival order (`counts`, from the first pass, sizes its header),
    with `vorder` giving each label's row. No vector stays in memory beyond the FAISS codes
    and no scratch copy is written."""

    def __init__(self, dim, kinds, templates, opts: IndexOptions, fs, path, counts) -> None:
        self.dim, self.kinds, self.templates, self.opts = dim, kinds, templates, opts
        self.fs, self.path, self.counts = fs, path, counts
        self.labels: list[np.ndarray] = []
        self.rows: list[Any] = []
        self.parts: dict[str, _Part] = {}
        self.vlabels: dict[str, list[np.ndarray]] = {}
        self.vfiles: dict[str, Any] = {}

    def add(self, labels: np.ndarray, rows: Any, vecs: np.ndarray, mods: np.ndarray) -> None:
        self.labels.append(labels)
        self.rows.append(rows)
        for m in np.unique(mods).tolist():
            sel = np.flatnonzero(mods == m)
            v, lab = _pick(vecs, sel), _pick(labels, sel)
            part = self.parts.get(m)
            if part is None:
                kind = self.kinds[m]
                part = self.parts[m] = _Part(_empty(kind, self.dim, self.templates.get(m)), kind)
                if kind == "ivfpq" and self.opts.keeps_vectors:
                    file = f"{self.path}/{m}.vectors.npy"
                    self.vfiles[m] = _open_vectors(self.fs, file, self.counts[m], self.dim)
                    self.vlabels[m] = []
            part.index.add_with_ids(v, lab)
            if m in self.vfiles:
                _write_rows(self.vfiles[m], v)
                self.vlabels[m].append(lab)

    def discard(self) -> None:
        """Close the vector files of a failed build without completing them (an object
        store's multipart upload is abandoned)."""
        for f in self.vfiles.values():
            getattr(f, "discard", f.close)()

    def finish(self) -> _Segment:
        import pyarrow as pa

        labels = np.concatenate(self.labels) if self.labels else np.zeros(0, np.int64)
        order = np.argsort(labels, kind="stable")
        rows = _contiguous(pa.concat_tables(self.rows) if self.rows else _rows_table([], [], []))
        labels, rows = labels[order], rows.take(order)
        _check_labels(labels, rows.column("id"))  # an id seen in two batches
        seg = _Segment(labels, rows, self.parts)
        for m, f in self.vfiles.items():
            f.close()
            vl = np.concatenate(self.vlabels[m])
            if len(vl) != self.counts[m]:
                raise RuntimeError(
                    f"{m}: the build's two passes read {self.counts[m]} and {len(vl)} vectors"
                    " (the rows changed while the index was built)"
                )
            self.parts[m].vlabels, self.parts[m].vorder = _label_order(vl)
        return seg


def _fill(builders: list[_ShardBuilder], all_rows: Callable[[], Any], shards: int) -> None:
    """The build's second pass: every row to its shard's builder."""
    for batch in _batches_of(all_rows):
        if not batch.num_rows:
            continue
        rows = _rows_of(batch)
        labels = labels_of(rows.column("id").to_pylist())
        vecs = _normalize(embeddings_of(batch))
        mods = rows.column("modality").to_numpy(zero_copy_only=False).astype(str)
        shard = labels % shards
        for s in np.unique(shard).tolist():
            sel = np.flatnonzero(shard == s)
            builders[s].add(_pick(labels, sel), _pick(rows, sel), _pick(vecs, sel), mods[sel])
        del vecs


def _build_streaming(
    out_uri: str,
    all_rows: Callable[[], Any],
    options: IndexOptions,
    storage_options: StorageOptions | None,
) -> tuple[int, dict[str, PartInfo]]:
    """Build and write the index of every row in two passes over `all_rows()` (id, uri,
    modality, embedding; a Table or an iterable of batches), holding no more vectors than
    the training samples (`_MAX_TRAIN` per modality), one batch and the FAISS codes: pass 1
    counts each modality (per shard) and keeps a uniform sample of its vectors, which train
    the IVF templates; pass 2 adds every vector to its shard and streams the re-ranking
    vectors to their files. Returns (count, parts)."""
    reservoirs: dict[str, _Reservoir] = {}
    counts: dict[str, np.ndarray] = {}  # modality -> rows per shard
    dim = None
    for batch in _batches_of(all_rows):
        if not batch.num_rows:
            dim = dim or embeddings_of(batch).shape[1]
            continue
        vecs = _normalize(embeddings_of(batch))
        dim = vecs.shape[1]
        mods = batch.column("modality").to_numpy(zero_copy_only=False).astype(str)
        shard = (
            labels_of(batch.column("id").to_pylist()) % options.shards
            if options.shards > 1
            else np.zeros(len(mods), np.int64)
        )
        for m in np.unique(mods).tolist():
            sel = np.flatnonzero(mods == m)
            seed = int(labels_of([m])[0] % 2**32)
            reservoirs.setdefault(m, _Reservoir(_MAX_TRAIN, seed)).add(_pick(vecs, sel))
            per_shard = np.bincount(shard[sel], minlength=options.shards)
            counts[m] = counts[m] + per_shard if m in counts else per_shard
        del vecs
    kinds, training, templates = _train_modalities(
        {m: (r.seen, r.sample) for m, r in reservoirs.items()}, options
    )
    del reservoirs
    fs, path = filesystem(out_uri, storage_options)
    fs.makedirs(path, exist_ok=True)
    _save_templates(fs, path, templates)
    builders = [
        _ShardBuilder(
            dim or 0,
            kinds,
            templates,
            options,
            fs,
            f"{path}/{shard_dir(s)}",
            {m: int(c[s]) for m, c in counts.items()},
        )
        for s in range(options.shards)
    ]
    try:
        _fill(builders, all_rows, options.shards)
    except BaseException:
        for b in builders:
            b.discard()
        raise
    entries = []
    parts: dict[str, PartInfo] = {}
    for s, b in enumerate(builders):  # each shard written, then dropped
        seg = b.finish()
        seg_path = f"{path}/{shard_dir(s)}"
        segs = [_segment_entry(seg, fs, seg_path, path)] if seg.stored else []
        entries.append({"count": seg.stored, "segments": segs})
        for m, p in seg.parts.items():
            prev = parts.get(m)
            parts[m] = PartInfo(p.kind, p.count + (prev.count if prev else 0))
        builders[s] = None  # type: ignore[call-overload]
        del seg, b
    parts = dict(sorted(parts.items()))
    _write_meta(fs, path, dim or 0, options, training, parts, entries, TRAINED_DIR)
    if _needs_calibration(options, training):
        _calibrate_saved(out_uri, storage_options)
    return sum(e["count"] for e in entries), parts


def _rows_of(batch: Any) -> Any:
    """The (id, uri, modality) columns of a batch as an index rows table of their own.

    Copied, because a build keeps them after the batch is gone: the columns of a batch
    imported over the Arrow C interface (a Lance scan's) share one release, so a zero-copy
    view of its strings kept the whole batch, vectors included, alive (measured: ~5 KB a row,
    the build's memory growing with the table)."""
    import pyarrow as pa

    schema = _rows_schema()
    cols = []
    for f in schema:
        col = batch.column(f.name).cast(f.type)
        cols.append(pa.concat_arrays(col.chunks) if col.num_chunks else pa.array([], f.type))
    return pa.table(cols, schema=schema)


def _update_from_parent(
    out_uri: str,
    scan: _ParentScan,
    upserts: Any,
    training: dict,
    options: IndexOptions,
    storage_options: StorageOptions | None,
) -> IndexUpdate:
    """`update_index` once `_rebuild_reason` allowed an update, shard by shard: the parent's
    segments are referenced, not copied; a segment that loses rows gets a new deletion file;
    the upserts become one new segment. Past `max_segments` the newest segments are merged
    into one (`_merge_start`), past `compact_deleted` all of them (their live rows only); only
    merged segments' vectors are read."""
    up_labels = scan.up_labels
    kinds = _kinds_with_new_modalities(training, upserts.column("modality").to_pylist())
    vecs = embeddings_of(upserts)
    vecs = _normalize(vecs) if len(vecs) else np.zeros((0, int(scan.meta["dim"])), np.float32)
    rows = upserts.select(["id", "uri", "modality"])
    fs, path = filesystem(out_uri, storage_options)
    fs.makedirs(path, exist_ok=True)
    pfs, ppath, templates = scan.fs, scan.path, scan.templates
    trained = _relative(_resolve(ppath, scan.meta.get("trained", TRAINED_DIR)), path)
    local = protocol_of(scan.uri) == "file"
    shards, compacted = [], 0
    for s, (entries, hits) in enumerate(scan.shards):  # one shard at a time
        sel = np.flatnonzero(up_labels % options.shards == s)
        new = None
        if len(sel):
            new = _Segment.build(
                up_labels[sel], rows.take(sel), vecs[sel], kinds, templates, options
            )
        # A segment's deletions: its earlier ones and this change's (None: unchanged).
        dels = [
            None if h is None else np.union1d(_read_deleted(pfs, ppath, e), h)
            for e, h in zip(entries, hits, strict=True)
        ]
        segs = entries + ([new] if new is not None else [])
        stored = sum(e["rows"] for e in entries) + (new.stored if new else 0)
        deleted = sum(e["rows"] - e["count"] for e in entries)
        sdir = f"{path}/{shard_dir(s)}"
        start = None  # entries[start:] and the new segment are merged into one
        if deleted > options.compact_deleted * stored:
            start = 0
        elif len(segs) > options.max_segments:
            start = _merge_start([e["rows"] for e in entries] + ([new.stored] if new else []))
        if start is not None:
            loaded = [
                _Segment.load(pfs, ppath, e, local, templates, d)
                for e, d in zip(entries[start:], dels[start:], strict=True)
            ]
            new = _Segment.merge(loaded + ([new] if new is not None else []), fs, sdir)
            entries, dels = entries[:start], dels[:start]
            compacted += 1
        out = []
        for k, (e, d) in enumerate(zip(entries, dels, strict=True)):
            if e["count"] == 0:
                continue  # every row deleted: the segment is no longer referenced
            e = dict(e, path=_relative(_resolve(ppath, e["path"]), path))
            if d is not None:
                name = f"{sdir}/deleted-{k:04d}.npy"
                fs.makedirs(sdir, exist_ok=True)
                fs.pipe_file(name, _npy(d))
                e["deleted"] = _relative(name, path)
            elif e.get("deleted"):
                e["deleted"] = _relative(_resolve(ppath, e["deleted"]), path)
            out.append(e)
        if new is not None and new.stored:
            out.append(_segment_entry(new, fs, sdir, path))
        shards.append({"count": sum(e["count"] for e in out), "segments": out})
    parts: dict[str, PartInfo] = {}
    for sh in shards:
        for e in sh["segments"]:
            for m, p in e["parts"].items():
                prev = parts.get(m)
                parts[m] = PartInfo(p["kind"], p["live"] + (prev.count if prev else 0))
    parts = {m: p for m, p in parts.items() if p.count}
    _write_meta(fs, path, int(scan.meta["dim"]), options, training, parts, shards, trained)
    if _needs_calibration(options, {m: t for m, t in training.items() if m in parts}):
        _calibrate_saved(out_uri, storage_options)  # a parent built before calibration
    return IndexUpdate(
        "updated",
        None,
        len(up_labels),
        scan.removed,
        dict(sorted(parts.items())),
        options.shards,
        compacted,
    )


def _merge_start(sizes: list[int]) -> int:
    """Which of a shard's segments (stored rows, oldest first) a merge takes: the newest ones,
    back to the first older segment larger than all of them together, at least two. Like a
    binary counter, each vector is rewritten about log2(N / change) times, and the large old
    segments (the base) are left alone until deletions call for a full compaction."""
    j = len(sizes) - 1
    total = sizes[j]
    while j > 0 and sizes[j - 1] <= total:
        j -= 1
        total += sizes[j]
    return min(j, len(sizes) - 2)


def _segment_entry(seg: _Segment, fs: Any, seg_path: str, index_path: str) -> dict:
    """Save a new segment (no deletions) at `seg_path`; its meta.json entry."""
    e = seg.save(fs, seg_path)
    for p in e["parts"].values():
        p["live"] = p["count"]
    return dict(e, path=_relative(seg_path, index_path), count=seg.stored, deleted=None)


def _delete_in_segments(
    fs: Any,
    base: str,
    entries: list[dict],
    remove: np.ndarray,
    up_labels: np.ndarray,
    up_ids: list[str],
) -> tuple[list[dict], list[np.ndarray | None], int]:
    """Find the removals `remove` in a shard's segments, reading their label and modality
    columns (and ids where an upserted label is live). Returns the entries with their new
    live counts, the labels each segment loses (None: none) and the number of live rows
    removed. An upserted label a segment holds live must belong to the same id (no hash
    clash)."""
    import pyarrow.compute as pc

    out, dels, gone = [], [], 0
    for e in entries:
        labels, mods = _segment_keys(fs, base, e)
        old = _read_deleted(fs, base, e)
        live = ~_in_sorted(labels, old)
        hit = _in_sorted(labels, remove) & live
        up = _in_sorted(labels, up_labels) & live
        if up.any():  # re-embedded ids: read their ids to rule out a label clash
            ids = _segment_ids_at(fs, base, e, np.flatnonzero(up))
            mine = dict(zip(labels[up].tolist(), ids, strict=True))
            for lab, i in zip(up_labels.tolist(), up_ids, strict=True):
                if mine.get(lab, i) != i:
                    raise ValueError(f"ids {sorted([mine[lab], i])} hash to the same index label")
        if not hit.any():
            out.append(e)
            dels.append(None)
            continue
        gone += int(hit.sum())
        lost = {
            r["values"]: r["counts"]
            for r in pc.value_counts(mods.take(np.flatnonzero(hit))).to_pylist()
        }
        parts = {m: dict(p, live=p["live"] - lost.get(m, 0)) for m, p in e["parts"].items()}
        out.append(dict(e, count=e["count"] - int(hit.sum()), parts=parts))
        dels.append(labels[hit])
    return out, dels, gone


def _segment_columns(fs: Any, base: str, entry: dict, columns: list[str]) -> Any:
    """`columns` of a segment's rows file, in label order; only their column chunks are read
    (ranged reads), not the file: an update must not read a segment's ids and uris."""
    import pyarrow.parquet as pq

    with fs.open(f"{_resolve(base, entry['path'])}/rows.parquet", "rb") as f:
        return pq.read_table(f, columns=columns)


def _segment_keys(fs: Any, base: str, entry: dict) -> tuple[np.ndarray, Any]:
    """(labels, modalities as an Arrow column) of a segment: all an update reads of a
    segment that it does not compact (about 12 bytes a row in memory: the modality column
    stays dictionary-encoded, as on disk)."""
    import pyarrow.parquet as pq

    with fs.open(f"{_resolve(base, entry['path'])}/rows.parquet", "rb") as f:
        t = pq.read_table(f, columns=["label", "modality"], read_dictionary=["modality"])
    return t.column("label").to_numpy(), t.column("modality")


def _segment_ids_at(fs: Any, base: str, entry: dict, rows: np.ndarray) -> list[str]:
    """The ids of a segment's rows at the sorted positions `rows`, read a row group at a
    time and only from row groups that hold one (not the segment's whole id column)."""
    import pyarrow.parquet as pq

    out: list[str] = []
    with fs.open(f"{_resolve(base, entry['path'])}/rows.parquet", "rb") as f:
        pf = pq.ParquetFile(f)
        start = 0
        for g in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            lo, hi = np.searchsorted(rows, [start, start + n])
            if hi > lo:
                col = pf.read_row_group(g, columns=["id"]).column("id")
                out.extend(col.take(rows[lo:hi] - start).to_pylist())
            start += n
    return out


def _write_meta(fs, path, dim, options, training, parts, entries, trained) -> None:
    """The updated index's `meta.json`, written last (after every shard); `trained`: the
    folder of the trained templates, relative to `path` (the first version's, shared)."""
    new_meta = {
        "trained": trained,
        "format": INDEX_FORMAT,
        "metric": "cosine",
        "dim": dim,
        "count": sum(e["count"] for e in entries),
        "options": options.to_json(),
        "training": {m: t for m, t in training.items() if m in parts},
        "shards": entries,
    }
    fs.pipe_file(f"{path}/{META_NAME}", json.dumps(new_meta, sort_keys=True).encode())


def _kinds_with_new_modalities(training: dict, up_mods: list[str]) -> dict[str, str]:
    """Modality -> index kind of the updated index. A modality the parent lacks gets a flat
    part (`_rebuild_reason` allows a new modality only below flat_threshold), recorded in
    `training` too."""
    kinds = {m: t["kind"] for m, t in training.items()}
    for m in set(up_mods) - set(kinds):
        kinds[m] = "flat"
        training[m] = {"kind": "flat", "trained_count": int(sum(x == m for x in up_mods))}
    return kinds


@dataclass
class _ParentScan:
    """The parent index as an update needs it, from one read of its segments' keys: its
    meta.json and trained templates, and per shard the segment entries with their live counts
    after the change and the labels each segment loses (`_delete_in_segments`)."""

    uri: str
    fs: Any
    path: str
    meta: dict
    templates: dict[str, Any]
    up_labels: np.ndarray
    shards: list[tuple[list[dict], list[np.ndarray | None]]]
    removed: int

    @classmethod
    def read(
        cls,
        uri: str,
        meta: dict,
        upserts: Any,
        deletes: Sequence[str],
        options: IndexOptions,
        storage_options: StorageOptions | None,
    ) -> _ParentScan:
        fs, path = filesystem(uri, storage_options)
        ids = upserts.column("id").to_pylist()
        up_labels = labels_of(ids)
        _check_labels(up_labels, ids)
        remove = np.unique(np.concatenate([labels_of(deletes), up_labels]))
        shards, removed = [], 0
        for s, seg_entries in enumerate(_segment_entries(meta)):
            sel = np.flatnonzero(up_labels % options.shards == s)
            entries, hits, gone = _delete_in_segments(
                fs,
                path,
                seg_entries,
                remove[remove % options.shards == s],
                up_labels[sel],
                [ids[j] for j in sel],
            )
            shards.append((entries, hits))
            removed += gone
        templates = VectorIndex.load(uri, storage_options, shards=[]).templates
        return cls(uri, fs, path, meta, templates, up_labels, shards, removed)

    def counts_after(self, upserts: Any) -> dict[str, int]:
        """Vectors per modality in the new version: the parent's live ones after the
        removals, plus the upserts."""
        counts = {m: 0 for m in self.meta["training"]}
        for entries, _ in self.shards:
            for e in entries:
                for m, p in e["parts"].items():
                    counts[m] = counts.get(m, 0) + p["live"]
        for m in upserts.column("modality").to_pylist():
            counts[m] = counts.get(m, 0) + 1
        return counts


def _rebuild_reason(
    parent_uri: str | None,
    upserts: Any,
    deletes: Sequence[str],
    options: IndexOptions,
    storage_options: StorageOptions | None,
) -> tuple[str | None, dict, _ParentScan | None]:
    """Why the new version's index must be built from every row (None: update), the
    training record the updated index carries (drift counters advanced by the upserts), and
    the parent's scan the update uses."""
    if parent_uri is None:
        return "no parent index", {}, None
    try:
        meta = read_index_meta(parent_uri, storage_options)
    except (FileNotFoundError, ValueError) as e:
        return f"parent index unusable ({e})", {}, None
    old = IndexOptions(**meta["options"]) if "options" in meta else None
    if old is None or old.layout() != options.layout():
        return "index options changed", {}, None
    vecs = embeddings_of(upserts)
    if upserts.num_rows and vecs.shape[1] != meta["dim"]:
        return f"embedding dimension changed ({meta['dim']} -> {vecs.shape[1]})", {}, None
    pfs, ppath = filesystem(parent_uri, storage_options)
    damaged = _damaged_segment_file(pfs, ppath, meta)
    if damaged is not None:
        logger.warning(
            "the parent index at %s is damaged (%s): building the new index from every row",
            parent_uri,
            damaged,
        )
        return f"parent index damaged ({damaged})", {}, None
    training = {m: dict(t) for m, t in meta["training"].items()}
    scan = _ParentScan.read(parent_uri, meta, upserts, deletes, options, storage_options)
    up_mods = np.asarray(upserts.column("modality").to_pylist(), dtype=object)
    for m, n in sorted(scan.counts_after(upserts).items()):
        t = training.get(m)
        kind = options.kind_for(n)
        if n == 0:
            continue
        if t is None:
            if kind != "flat":
                return f"new modality {m} with {n} vectors needs training", {}, None
            continue
        if kind != t["kind"]:
            return f"{m}: {n} vectors need a {kind} index (was {t['kind']})", {}, None
        if kind == "flat":
            continue
        reason = _retrain_reason(m, n, t, options, scan.templates, vecs[up_mods == m])
        if reason is not None:
            return reason, {}, None
    return None, training, scan


def _retrain_reason(
    m: str, n: int, t: dict, options: IndexOptions, templates: dict, added: np.ndarray
) -> str | None:
    """Why the IVF part of modality `m` (`n` vectors after the change, training record `t`)
    must be retrained, or None; advances `t`'s drift counters by the `added` vectors."""
    g = options.retrain_growth
    if not t["trained_count"] / g <= n <= t["trained_count"] * g:
        return f"{m}: {n} vectors, trained at {t['trained_count']} (retrain_growth {g})"
    if len(added):
        t["added"] += len(added)
        t["added_fit"] += float(_fit(templates[m], _normalize(added)).sum())
    added_fit = t["added_fit"] / t["added"] if t["added"] else t["fit"]
    if (
        t["added"] >= max(100, 0.01 * t["trained_count"])
        and t["fit"] - added_fit > options.retrain_drift
    ):
        return (
            f"{m}: vectors added since training fit the quantizer worse "
            f"(mean cosine to nearest centroid {added_fit:.3f} vs {t['fit']:.3f} at "
            f"training; retrain_drift {options.retrain_drift})"
        )
    return None


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
