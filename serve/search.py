"""The `SearchIndex` deployment: nearest-neighbour search over the latest published index version.

The index root's `LATEST` pointer is polled by a background thread; when it names a new
version, that version's vector index is loaded off the request path and swapped in with one
reference assignment, so requests in flight finish on the old version and later ones use the
new one — no restart, never a mix. Retention on the writer side keeps older versions around, so
a replica that has not swapped yet still serves a complete version.

`SearchIndexCore` holds the logic and can be used without Serve; `SearchIndex` is the thin
Serve deployment. The ingress calls `search` (vectors already embedded), `similar` (an item's
own vector), `item` (what the media endpoints may serve) and `info`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any

from ray import serve

from imagebind_core.index import (
    INDEX_DIR,
    Pointer,
    VectorIndex,
    join_uri,
    read_pointer,
    read_version_record,
)
from imagebind_core.io import StorageOptions

logger = logging.getLogger(__name__)


class IndexNotReady(RuntimeError):
    """No index version has been published at the configured root yet (answer 503)."""


class SearchIndexCore:
    """Holds the loaded version's `VectorIndex` and keeps it in step with the `LATEST` pointer.

    Args:
        index_uri: the index root (local folder or s3:// prefix) that re-indexing publishes to.
        storage_options: fsspec options for an object-store root.
        poll_interval_s: how often to check the pointer; 0 disables the poller (call `refresh`).
    """

    def __init__(
        self,
        index_uri: str,
        storage_options: dict | None = None,
        *,
        poll_interval_s: float = 5.0,
    ) -> None:
        if not index_uri:
            raise ValueError("index_uri must name an index root")
        self.index_uri = index_uri.rstrip("/")
        self.storage_options: StorageOptions = dict(storage_options or {})
        self.poll_interval_s = float(poll_interval_s)
        # (pointer, index, version record): swapped as one reference
        self._current: tuple[Pointer, VectorIndex, dict] | None = None
        self._started_at = time.time()
        self._loaded_at: float | None = None
        self._last_error: str | None = None
        self._refresh_lock = threading.Lock()
        self._stop = threading.Event()
        self.refresh()
        self._thread: threading.Thread | None = None
        if self.poll_interval_s > 0:
            self._thread = threading.Thread(target=self._poll, name="index-poller", daemon=True)
            self._thread.start()

    def refresh(self) -> bool:
        """Load the pointer's version if it differs from the loaded one; True if swapped.

        A failure (store unreachable, half-written version) is logged and the loaded version
        stays in service.
        """
        with self._refresh_lock:
            try:
                pointer = read_pointer(self.index_uri, self.storage_options)
                current = self._current
                if pointer is None or (current is not None and current[0] == pointer):
                    return False
                version_uri = pointer.version_uri(self.index_uri)
                index = VectorIndex.load(join_uri(version_uri, INDEX_DIR), self.storage_options)
                record = read_version_record(version_uri, self.storage_options)
            except Exception as e:
                self._last_error = f"{type(e).__name__}: {e}"
                logger.exception("could not load the latest index version of %s", self.index_uri)
                return False
            self._current = (pointer, index, record)  # one assignment: the swap
            self._loaded_at = time.time()
            self._last_error = None
            logger.info(
                "serving index version %s (%d vectors) from %s",
                pointer.name,
                index.count,
                self.index_uri,
            )
            return True

    def _poll(self) -> None:
        while not self._stop.wait(self.poll_interval_s):
            self.refresh()

    def close(self) -> None:
        """Stop the poller."""
        self._stop.set()

    def _loaded(self) -> tuple[Pointer, VectorIndex, dict]:
        current = self._current
        if current is None:
            why = f" (last error: {self._last_error})" if self._last_error else ""
            raise IndexNotReady(f"no index version is published at {self.index_uri} yet{why}")
        return current

    def search_sync(
        self, vector: list[float], top_k: int, modality: str | None = None
    ) -> list[dict]:
        """Top-k hits (`id`, `uri`, `modality`, `score`) from the loaded version, best first.

        Raises IndexNotReady before the first publish and `imagebind_core.InvalidInput` for a
        bad vector, top_k or modality filter.
        """
        _, index, _ = self._loaded()
        return index.search(vector, top_k, modality)

    def similar_sync(self, item_id: str, top_k: int, modality: str | None = None) -> list[dict]:
        """Top-k hits for the stored vector of the item `item_id` ("more like this"); the item
        itself is among them (score 1.0). Raises KeyError if the loaded version lacks it."""
        _, index, _ = self._loaded()
        vector = index.vector_of(item_id)
        if vector is None:
            raise KeyError(item_id)
        return index.search(vector, top_k, modality)

    def item_sync(self, item_id: str) -> dict | None:
        """`{id, uri, modality, version}` of `item_id` in the loaded version, or None if that
        version does not hold it (what the endpoint serves media for)."""
        pointer, index, _ = self._loaded()
        item = index.item(item_id)
        return None if item is None else {**item, "version": pointer.version}

    def info_sync(self) -> dict[str, Any]:
        """The loaded version (name, number, publish time), its size and per-modality counts,
        the change counts, creation time and parent from its version record, when it was loaded
        and when this replica started (a hot swap changes the former only)."""
        current = self._current
        out: dict[str, Any] = {
            "index_uri": self.index_uri,
            "version": None,
            "name": None,
            "published_at": None,
            "count": 0,
            "dim": None,
            "modalities": {},
            "loaded_at": self._loaded_at,
            "started_at": self._started_at,
            "last_error": self._last_error,
            "counts": {},
            "created_at": None,
            "parent": None,
        }
        if current is not None:
            pointer, index, record = current
            out.update(
                version=pointer.version,
                name=pointer.name,
                published_at=pointer.published_at,
                count=index.count,
                dim=index.dim,
                modalities={m: p.count for m, p in index.parts.items()},
                counts=dict(record.get("counts") or {}),
                created_at=record.get("created_at"),
                parent=record.get("parent"),
            )
        return out


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=64)
class SearchIndex(SearchIndexCore):
    """Serve deployment `search-index`: `search` and `info` over the latest published version."""

    def __init__(
        self,
        index_uri: str,
        storage_options: dict | None = None,
        *,
        poll_interval_s: float = 5.0,
    ) -> None:
        super().__init__(index_uri, storage_options, poll_interval_s=poll_interval_s)

    async def search(self, vector: list[float], top_k: int, modality: str | None) -> list[dict]:
        """Top-k hits for `vector`; runs the FAISS search off the replica's event loop."""
        return await asyncio.to_thread(self.search_sync, vector, top_k, modality)

    async def similar(self, item_id: str, top_k: int, modality: str | None) -> list[dict]:
        """Top-k hits for the stored vector of `item_id` (see `SearchIndexCore.similar_sync`)."""
        return await asyncio.to_thread(self.similar_sync, item_id, top_k, modality)

    async def item(self, item_id: str) -> dict | None:
        """The item `item_id` of the loaded version, or None (see `item_sync`)."""
        return self.item_sync(item_id)

    async def info(self) -> dict:
        """Loaded version and count (see `SearchIndexCore.info_sync`)."""
        return self.info_sync()

    def __del__(self) -> None:
        self.close()
