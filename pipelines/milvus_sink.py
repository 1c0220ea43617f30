"""The optional Milvus sink of `imagebind-reindex` (`index.milvus`): after a run publishes a
version, apply that version's change to a Milvus collection.

The collection holds one row per embedded item of the published version: `id` (primary key),
`embedding`, `uri`, `modality`, `fingerprint`. A side collection `<collection>_imagebind_state`
holds one row naming the version the collection holds (`<n>-<run>`, unique per run), written
only after the version's rows are all in. `sync_version` then:

- does nothing when the collection already holds the version (a rerun after a crash between
  the sink and the end of the run);
- applies the version's change — upsert the rows embedded, re-embedded or relocated by the run,
  delete the ids gone — when the collection holds the version's parent;
- otherwise (first run, a sink that missed versions or failed half-way, a model change) loads
  the version's rows in full: upsert them all in batches, then delete every id the version does
  not hold (found by iterating the collection's ids), so readers keep a populated collection.

The sink runs after the publish, under the re-index lease (one writer at a time). A failure is
returned (`MilvusSyncResult.status == "failed"`, with the URI and the reason) and logged; it
never undoes the publish, and the next run, finding the collection behind, loads it in full.

Input is plain Arrow (the caller computes the change): the version's rows (a callable, read
only for a full load) and the ids to upsert and delete.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

if TYPE_CHECKING:
    from pipelines.config import MilvusSettings

logger = logging.getLogger(__name__)

# The version's columns the collection holds (the primary key first).
COLUMNS = ["id", "embedding", "uri", "modality", "fingerprint"]
STATE_SUFFIX = "_imagebind_state"
_MAX_VARCHAR = 65_535  # Milvus' longest VARCHAR


class MilvusSinkError(RuntimeError):
    """The collection cannot take this index's rows (not the sink's, bad rows)."""


@dataclass
class MilvusSyncResult:
    """What the sink did: `status` is `applied` (the version's change), `loaded` (every row of
    the version), `current` (the collection already held it) or `failed`."""

    status: str
    uri: str
    collection: str
    version: str | None = None
    held_before: str | None = None
    upserted: int = 0
    deleted: int = 0
    seconds: float = 0.0
    message: str = ""

    @property
    def failed(self) -> bool:
        return self.status == "failed"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def sync_version(
    settings: MilvusSettings,
    *,
    version: str,
    parent: str | None,
    rows: Callable[[], pa.Table],
    upsert_ids: pa.Array | pa.ChunkedArray | Sequence[str] | None,
    delete_ids: Sequence[str] | None,
    dim: int,
    client: Any = None,
) -> MilvusSyncResult:
    """Bring `settings.collection` to the published `version` (its folder name).

    `parent` is the version the change was computed against (None for a first version);
    `upsert_ids` / `delete_ids` are that change (None: no change known, e.g. a run that
    published nothing); `rows()` returns the version's rows (`COLUMNS`; read only when the
    change cannot be applied, and for the upserted rows). Never raises for a Milvus or row
    problem: the result says `failed` and why.
    """
    t0 = time.perf_counter()
    result = MilvusSyncResult("failed", settings.uri, settings.collection, version)
    sink = None
    try:
        sink = _Sink(settings, client)
        held = sink.held_version()
        result.held_before = held
        if held == version:
            result.status = "current"
        elif held is not None and held == parent and upsert_ids is not None:
            result.upserted, result.deleted = sink.apply_change(
                rows(), upsert_ids, delete_ids or [], dim
            )
            sink.record_version(version)
            result.status = "applied"
        else:
            result.upserted, result.deleted = sink.full_load(rows(), dim)
            sink.record_version(version)
            result.status = "loaded"
    except Exception as e:  # the publish stands; the next run retries
        result.message = f"{type(e).__name__}: {e}"
        logger.error(
            "Milvus sink %s (collection %s) failed for version %s: %s; the version is "
            "published, the next run brings the collection up to date",
            settings.uri,
            settings.collection,
            version,
            result.message,
        )
    finally:
        if sink is not None and client is None:
            sink.c.close()
    if not result.failed:
        logger.info(
            "Milvus sink %s (collection %s): %s version %s (held %s): %d upserted, %d deleted",
            settings.uri,
            settings.collection,
            result.status,
            version,
            held,
            result.upserted,
            result.deleted,
        )
    result.seconds = time.perf_counter() - t0
    return result


class _Sink:
    """One sync's connection to the collection and its state record."""

    def __init__(self, settings: MilvusSettings, client: Any = None):
        self.s = settings
        self.name = settings.collection
        self.state = settings.collection + STATE_SUFFIX
        if client is None:
            from pymilvus import MilvusClient

            client = MilvusClient(uri=settings.uri, token=settings.token or "")
        self.c = client

    # ------------------------------------------------------------------ the state record

    def held_version(self) -> str | None:
        """The version the collection holds in full; None if none (or no collection)."""
        if not self.c.has_collection(self.state) or not self.c.has_collection(self.name):
            return None
        got = self.c.query(
            self.state,
            ids=[self.name],
            output_fields=["version"],
            consistency_level="Strong",
        )
        return got[0]["version"] or None if got else None

    def record_version(self, version: str | None) -> None:
        if not self.c.has_collection(self.state):
            self._create_state()
        row = {"collection": self.name, "version": version or "", "v": [0.0, 0.0]}
        self.c.upsert(self.state, [row])

    def _create_state(self) -> None:
        from pymilvus import DataType, MilvusClient

        schema = MilvusClient.create_schema(
            auto_id=False,
            enable_dynamic_field=False,
            description="imagebind-reindex: the index version each sink collection holds",
        )
        schema.add_field("collection", DataType.VARCHAR, is_primary=True, max_length=255)
        schema.add_field("version", DataType.VARCHAR, max_length=1024)
        schema.add_field("v", DataType.FLOAT_VECTOR, dim=2)  # Milvus needs a vector field
        params = self.c.prepare_index_params()
        params.add_index("v", index_type="FLAT", metric_type="L2")
        self.c.create_collection(
            self.state, schema=schema, index_params=params, consistency_level="Strong"
        )

    # ------------------------------------------------------------------ the collection

    def _ensure_collection(self, dim: int) -> None:
        """Create the collection, or recreate it when it is the sink's with another embedding
        size (a model change); refuse one the sink did not create."""
        if self.c.has_collection(self.name):
            desc = self.c.describe_collection(self.name)
            fields = {f["name"]: f for f in desc.get("fields", [])}
            if set(fields) != set(COLUMNS) or not self._is_ours():
                raise MilvusSinkError(
                    f"collection {self.name!r} exists with fields {sorted(fields)} and is not "
                    f"one this sink created (no row in {self.state!r}); name another "
                    "index.milvus.collection or drop it"
                )
            have = int(fields["embedding"].get("params", {}).get("dim", -1))
            if have == dim:
                return
            logger.warning(
                "Milvus collection %s holds %d-d vectors, the version %d-d: recreating it",
                self.name,
                have,
                dim,
            )
            self.record_version(None)
            self.c.drop_collection(self.name)
        self._create_collection(dim)

    def _is_ours(self) -> bool:
        if not self.c.has_collection(self.state):
            return False
        got = self.c.query(self.state, ids=[self.name], output_fields=["collection"])
        return bool(got)

    def _create_collection(self, dim: int) -> None:
        from pymilvus import DataType, MilvusClient

        schema = MilvusClient.create_schema(
            auto_id=False,
            enable_dynamic_field=False,
            description="imagebind-reindex: the rows of the published index version",
        )
        schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=_MAX_VARCHAR)
        schema.add_field("embedding", DataType.FLOAT_VECTOR, dim=dim)
        schema.add_field("uri", DataType.VARCHAR, max_length=_MAX_VARCHAR)
        schema.add_field("modality", DataType.VARCHAR, max_length=64)
        schema.add_field("fingerprint", DataType.VARCHAR, max_length=_MAX_VARCHAR)
        params = self.c.prepare_index_params()
        # cosine on unit vectors, as the built-in index (imagebind_core.index)
        params.add_index("embedding", index_type=self.s.index_type, metric_type="IP")
        self.c.create_collection(
            self.name, schema=schema, index_params=params, consistency_level="Strong"
        )
        self.record_version(None)  # the collection is the sink's, holding no version yet

    # ------------------------------------------------------------------ writes

    def apply_change(
        self,
        rows: pa.Table,
        upsert_ids: pa.Array | pa.ChunkedArray | Sequence[str],
        delete_ids: Sequence[str],
        dim: int,
    ) -> tuple[int, int]:
        """Upsert the version's rows with `upsert_ids`, delete `delete_ids`."""
        self._ensure_collection(dim)
        if isinstance(upsert_ids, pa.ChunkedArray):
            ids = upsert_ids.combine_chunks()
        elif isinstance(upsert_ids, pa.Array):
            ids = upsert_ids
        else:
            ids = pa.array(list(upsert_ids), pa.string())
        changed = rows.filter(pc.is_in(rows["id"], value_set=ids)) if len(ids) else None
        n = self._upsert(changed, dim) if changed is not None else 0
        if changed is not None and n != len(pc.unique(ids)):
            raise MilvusSinkError(
                f"{len(pc.unique(ids))} ids to upsert but the version holds {n} of them"
            )
        return n, self._delete(list(delete_ids))

    def full_load(self, rows: pa.Table, dim: int) -> tuple[int, int]:
        """Upsert every row of the version, then delete the ids it does not hold."""
        self._ensure_collection(dim)
        n = self._upsert(rows, dim)
        keep = set(rows["id"].to_pylist())
        stale = [i for i in self._ids() if i not in keep]
        return n, self._delete(stale)

    def _upsert(self, rows: pa.Table, dim: int) -> int:
        n = 0
        for batch in _batches(rows, self.s.batch_size, dim):
            self.c.upsert(self.name, batch)
            n += len(batch)
        return n

    def _delete(self, ids: list[str]) -> int:
        for k in range(0, len(ids), self.s.batch_size):
            self.c.delete(self.name, ids=ids[k : k + self.s.batch_size])
        return len(ids)

    def _ids(self) -> Iterator[str]:
        it = self.c.query_iterator(
            self.name,
            batch_size=max(self.s.batch_size, 1000),
            filter="",
            output_fields=["id"],
            consistency_level="Strong",
        )
        try:
            while page := it.next():
                yield from (r["id"] for r in page)
        finally:
            it.close()


def _batches(rows: pa.Table, size: int, dim: int) -> Iterator[list[dict[str, Any]]]:
    """`rows` as Milvus row dicts, `size` at a time; float32 vectors as numpy rows."""
    missing = [c for c in COLUMNS if c not in rows.column_names and c != "fingerprint"]
    if missing:
        raise MilvusSinkError(f"the version's rows lack the column(s) {missing}")
    for batch in rows.to_batches(max_chunksize=size):
        if not batch.num_rows:
            continue
        emb = batch.column("embedding")
        flat = pc.list_flatten(emb).to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
        if flat.size != batch.num_rows * dim or emb.null_count:
            raise MilvusSinkError(
                f"embeddings of {dim} floats expected; the batch has {flat.size} floats "
                f"for {batch.num_rows} rows ({emb.null_count} null)"
            )
        vecs = flat.reshape(batch.num_rows, dim)
        cols = {
            c: batch.column(c).to_pylist()
            for c in ("id", "uri", "modality", "fingerprint")
            if c in batch.schema.names
        }
        fps = cols.get("fingerprint") or [None] * batch.num_rows
        yield [
            {
                "id": cols["id"][k],
                "embedding": vecs[k],
                "uri": cols["uri"][k] or "",
                "modality": cols["modality"][k] or "",
                "fingerprint": fps[k] or "",
            }
            for k in range(batch.num_rows)
        ]
