"""Search deployments: nearest-neighbour search over the latest published index version.

The index root's `LATEST` pointer is polled by a background thread; when it names a new
version, that version's vector index is loaded off the request path and swapped in with one
reference assignment, so requests in flight finish on the old version and later ones use the
new one — no restart, never a mix. Retention on the writer side keeps older versions around, so
a replica that has not swapped yet still serves a complete version.

An index split into shards (`imagebind_core.index`) can be served by one deployment holding
every shard (`search_groups: 1`, the default) or by `n` shard-group deployments
`search-group-<g>` (group g loads the shards s with s % n == g) behind a `search` fan-out
deployment that queries every group and merges the top-k. Groups swap versions independently,
so a group keeps its previous version for `keep_previous_s` after a swap; the fan-out pins a
query to one version (the oldest any group answered with) and re-asks the groups that
answered from a newer one, so one answer never mixes two versions. A query by item id asks
the group holding the id's shard for the item's stored vector, then fans the search out
pinned to the version that vector came from.

`SearchIndexCore` holds the logic and can be used without Serve; `SearchIndex` (one group)
and `SearchFanout` are the thin Serve deployments. The ingress calls `search` (vectors
already embedded), `similar` (an item's own vector), `item` (what the media endpoints may
serve) and `info` on whichever is named `search`.
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
    labels_of,
    merge_hits,
    prune_vectors_cache,
    read_index_meta,
    read_pointer,
    read_version_record,
)
from imagebind_core.io import StorageOptions

logger = logging.getLogger(__name__)


class IndexNotReady(RuntimeError):
    """No index version has been published at the configured root yet (answer 503)."""


class VersionGone(IndexNotReady):
    """A query pinned to a version this group no longer holds (answer 503, retry)."""


class SearchIndexCore:
    """Holds the loaded version's `VectorIndex` (this group's shards) and keeps it in step
    with the `LATEST` pointer.

    Args:
        index_uri: the index root (local folder or s3:// prefix) that re-indexing publishes to.
        storage_options: fsspec options for an object-store root.
        poll_interval_s: how often to check the pointer; 0 disables the poller (call `refresh`).
        group, groups: this core serves the shards s with s % groups == group.
        keep_previous_s: how long the version before a swap stays loaded for pinned queries.
        vectors_cache: a local folder for the re-ranking vectors of an object-store index
            (`imagebind_core.index.cached_vectors`): copied there and memory-mapped instead of
            held in memory; copies no loaded version uses are deleted after each swap.
            None: in memory. Ignored for a local index (mapped where it is).
    """

    def __init__(
        self,
        index_uri: str,
        storage_options: dict | None = None,
        *,
        poll_interval_s: float = 5.0,
        group: int = 0,
        groups: int = 1,
        keep_previous_s: float = 30.0,
        vectors_cache: str | None = None,
    ) -> None:
        if not index_uri:
            raise ValueError("index_uri must name an index root")
        if not 0 <= group < groups:
            raise ValueError(f"search group must be in [0, {groups}), got {group}")
        self.index_uri = index_uri.rstrip("/")
        self.storage_options: StorageOptions = dict(storage_options or {})
        self.poll_interval_s = float(poll_interval_s)
        self.group, self.groups = int(group), int(groups)
        self.keep_previous_s = float(keep_previous_s)
        self.vectors_cache = vectors_cache or None
        # (pointer, index, version record): swapped as one reference
        self._current: tuple[Pointer, VectorIndex, dict] | None = None
        # the version before the last swap, kept for pinned queries: (.., drop after)
        self._previous: tuple[Pointer, VectorIndex, dict, float] | None = None
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
            previous = self._previous
            if previous is not None and time.monotonic() > previous[3]:
                self._previous = None  # grace over: free the old version
                self._prune_cache()
            try:
                pointer = read_pointer(self.index_uri, self.storage_options)
                current = self._current
                if pointer is None or (current is not None and current[0] == pointer):
                    return False
                version_uri = pointer.version_uri(self.index_uri)
                uri = join_uri(version_uri, INDEX_DIR)
                shards = read_index_meta(uri, self.storage_options)["options"]["shards"]
                mine = [s for s in range(shards) if s % self.groups == self.group]
                index = VectorIndex.load(
                    uri, self.storage_options, shards=mine, vectors_cache=self.vectors_cache
                )
                record = read_version_record(version_uri, self.storage_options)
            except Exception as e:
                self._last_error = f"{type(e).__name__}: {e}"
                logger.exception("could not load the latest index version of %s", self.index_uri)
                return False
            if current is not None:
                self._previous = (*current, time.monotonic() + self.keep_previous_s)
            self._current = (pointer, index, record)  # one assignment: the swap
            self._loaded_at = time.time()
            self._last_error = None
            self._prune_cache()
            logger.info(
                "serving index version %s (%d vectors, shards %s) from %s",
                pointer.name,
                index.count,
                sorted(index.shards),
                self.index_uri,
            )
            return True

    def _prune_cache(self) -> None:
        """Delete the cached vector copies no loaded version maps (after a swap, and once the
        previous version's grace is over)."""
        if self.vectors_cache is None:
            return
        kept = [v[1] for v in (self._current, self._previous) if v is not None]
        try:
            gone = prune_vectors_cache(self.vectors_cache, kept)
        except OSError:
            logger.exception("could not prune the vectors cache %s", self.vectors_cache)
            return
        if gone:
            logger.info("vectors cache %s: %d copies deleted", self.vectors_cache, len(gone))

    def _poll(self) -> None:
        while not self._stop.wait(self.poll_interval_s):
            self.refresh()

    def close(self) -> None:
        """Stop the poller."""
        self._stop.set()

    def _loaded(self, version: str | None = None) -> tuple[Pointer, VectorIndex, dict]:
        current = self._current
        if current is None:
            why = f" (last error: {self._last_error})" if self._last_error else ""
            raise IndexNotReady(f"no index version is published at {self.index_uri} yet{why}")
        if version is None or current[0].name == version:
            return current
        previous = self._previous
        if previous is not None and previous[0].name == version:
            return previous[0], previous[1], previous[2]
        raise VersionGone(f"index version {version} is no longer loaded; retry")

    def search_sync(
        self, vector: list[float], top_k: int, modality: str | None = None
    ) -> list[dict]:
        """Top-k hits (`id`, `uri`, `modality`, `score`) from the loaded version, best first.

        Raises IndexNotReady before the first publish and `imagebind_core.InvalidInput` for a
        bad vector, top_k or modality filter.
        """
        return self.search_version(vector, top_k, modality)["hits"]

    def search_version(
        self,
        vector: list[float],
        top_k: int,
        modality: str | None = None,
        version: str | None = None,
    ) -> dict:
        """`{"version": name, "hits": [...]}` from this group's shards of `version` (default:
        the loaded one); VersionGone if that version is not held."""
        pointer, index, _ = self._loaded(version)
        return {"version": pointer.name, "hits": index.search(vector, top_k, modality)}

    def lookup(self, item_id: str, version: str | None = None) -> dict:
        """What this group's shards of `version` (default: the loaded one) hold of `item_id`:
        `{"version": name, "number": version number, "shards": the version's shard count,
        "item": {id, uri, modality} or None, "vector": float32 array or None}`. The item is
        None when the id is absent or its shard belongs to another group (`group_of`)."""
        pointer, index, _ = self._loaded(version)
        return {
            "version": pointer.name,
            "number": pointer.version,
            "shards": index.options.shards,
            "item": index.item(item_id),
            "vector": index.vector_of(item_id),
        }

    def similar_sync(self, item_id: str, top_k: int, modality: str | None = None) -> list[dict]:
        """Top-k hits for the stored vector of the item `item_id` ("more like this"); the item
        itself comes first (`own_first`). Raises KeyError if the loaded version lacks it."""
        pointer, index, _ = self._loaded()
        vector = index.vector_of(item_id)
        if vector is None:
            raise KeyError(item_id)
        hits = self.search_version(vector, top_k + SIMILAR_EXTRA, modality, pointer.name)
        return own_first(hits["hits"], item_id, top_k)

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
            "shards": [],
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
                shards=sorted(index.shards),
                counts=dict(record.get("counts") or {}),
                created_at=record.get("created_at"),
                parent=record.get("parent"),
            )
        return out


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=64)
class SearchIndex(SearchIndexCore):
    """Serve deployment: `search` and `info` over (this group's shards of) the latest version.

    Takes `SearchIndexCore`'s arguments; its methods are the core's, run off the event loop.
    """

    async def search(self, vector: list[float], top_k: int, modality: str | None) -> list[dict]:
        """Top-k hits for `vector`; runs the FAISS search off the replica's event loop."""
        return await asyncio.to_thread(self.search_sync, vector, top_k, modality)

    async def similar(self, item_id: str, top_k: int, modality: str | None) -> list[dict]:
        """Top-k hits for the stored vector of `item_id` (see `SearchIndexCore.similar_sync`)."""
        return await asyncio.to_thread(self.similar_sync, item_id, top_k, modality)

    async def item(self, item_id: str) -> dict | None:
        """The item `item_id` of the loaded version, or None (see `item_sync`)."""
        return self.item_sync(item_id)

    async def search_group(
        self, vector: list[float], top_k: int, modality: str | None, version: str | None
    ) -> dict:
        """This group's top-k of `version` (see `SearchIndexCore.search_version`)."""
        return await asyncio.to_thread(self.search_version, vector, top_k, modality, version)

    async def lookup_group(self, item_id: str, version: str | None) -> dict:
        """This group's view of `item_id` in `version` (see `SearchIndexCore.lookup`)."""
        return await asyncio.to_thread(self.lookup, item_id, version)

    async def info(self) -> dict:
        """Loaded version and count (see `SearchIndexCore.info_sync`)."""
        return self.info_sync()

    def __del__(self) -> None:
        self.close()


# Hits fetched beyond top_k for "more like this": an item's exact copies score as it does
# (1.0) and ties go by id, so the item can rank after them and fall past top_k.
SIMILAR_EXTRA = 16


def own_first(hits: list[dict], item_id: str, top_k: int) -> list[dict]:
    """`hits` (of `item_id`'s own vector, top_k + SIMILAR_EXTRA of them) cut to `top_k`, the
    item itself first when it is among them: its exact copies tie with it."""
    own = [h for h in hits if h["id"] == item_id]
    return (own + [h for h in hits if h["id"] != item_id])[:top_k]


async def fan_out(
    groups: list[Any],
    vector: list[float],
    top_k: int,
    modality: str | None,
    version: str | None = None,
):
    """Query every group (callables `(vector, top_k, modality, version) -> awaitable dict`)
    and merge their top-k from one index version.

    With `version` every group is asked for that version. Otherwise every group is asked for
    its loaded version; if the answers come from different versions (a publish is being
    picked up), the groups that answered from a newer version are asked again pinned to the
    oldest one, which they keep for `keep_previous_s` after a swap.
    """
    answers = list(await asyncio.gather(*(g(vector, top_k, modality, version) for g in groups)))
    oldest = min(a["version"] for a in answers)  # names start with the zero-padded number
    redo = [i for i, a in enumerate(answers) if a["version"] != oldest]
    if redo:
        again = await asyncio.gather(*(groups[i](vector, top_k, modality, oldest) for i in redo))
        for i, a in zip(redo, again, strict=True):
            answers[i] = a
    return merge_hits([a["hits"] for a in answers], top_k)


def group_of(item_id: str, shards: int, groups: int) -> int:
    """The search group that loads the shard of `item_id` (shard = label % shards, group =
    shard % groups, as `SearchIndexCore` assigns them)."""
    return int(labels_of([str(item_id)])[0]) % shards % groups


async def lookup_owner(groups: list[Any], item_id: str, shards_hint: int = 1) -> dict:
    """`SearchIndexCore.lookup` of `item_id` from the group that holds its shard (callables
    `(item_id, version) -> awaitable dict`).

    The group is computed from `shards_hint` (the shard count last seen); the answer names
    the loaded version's shard count, and if that puts the id in another group, that group
    is asked pinned to the same version.
    """
    g = group_of(item_id, shards_hint, len(groups))
    answer = await groups[g](item_id, None)
    owner = group_of(item_id, answer["shards"], len(groups))
    if owner != g:
        answer = await groups[owner](item_id, answer["version"])
    return answer


def _unwrap(e: BaseException) -> BaseException:
    """A group's own exception (IndexNotReady, InvalidInput) out of Ray's wrapper, so the
    ingress sees the same causes as from a single `SearchIndex`."""
    cause = getattr(e, "cause", None)
    return cause if isinstance(cause, (IndexNotReady, ValueError, KeyError)) else e


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=64)
class SearchFanout:
    """Serve deployment `search` over shard groups: fans each query out to every
    `search-group-<g>` deployment and merges their top-k (see `fan_out`)."""

    def __init__(self, groups: list[Any]) -> None:
        self.groups = groups
        self._shards = 1  # the shard count last seen (where `lookup_owner` asks first)

    def _caller(self, handle: Any):
        async def call(vector, top_k, modality, version):
            return await handle.search_group.remote(vector, top_k, modality, version)

        return call

    def _looker(self, handle: Any):
        async def call(item_id, version):
            return await handle.lookup_group.remote(item_id, version)

        return call

    async def _lookup(self, item_id: str) -> dict:
        answer = await lookup_owner([self._looker(h) for h in self.groups], item_id, self._shards)
        self._shards = answer["shards"]
        return answer

    async def search(self, vector: list[float], top_k: int, modality: str | None) -> list[dict]:
        """The merged top-k over all shard groups."""
        from ray.exceptions import RayTaskError

        try:
            return await fan_out([self._caller(h) for h in self.groups], vector, top_k, modality)
        except RayTaskError as e:
            raise _unwrap(e) from None

    async def similar(self, item_id: str, top_k: int, modality: str | None) -> list[dict]:
        """Top-k hits for the stored vector of `item_id`: the vector from the group holding
        its shard, the search fanned out to every group pinned to that vector's version.
        KeyError if that version lacks the item."""
        from ray.exceptions import RayTaskError

        try:
            found = await self._lookup(item_id)
            if found["vector"] is None:
                raise KeyError(item_id)
            callers = [self._caller(h) for h in self.groups]
            hits = await fan_out(
                callers, found["vector"], top_k + SIMILAR_EXTRA, modality, found["version"]
            )
            return own_first(hits, item_id, top_k)
        except RayTaskError as e:
            raise _unwrap(e) from None

    async def item(self, item_id: str) -> dict | None:
        """`{id, uri, modality, version}` of `item_id` from the group holding its shard, or
        None if its loaded version lacks it."""
        from ray.exceptions import RayTaskError

        try:
            found = await self._lookup(item_id)
        except RayTaskError as e:
            raise _unwrap(e) from None
        item = found["item"]
        return None if item is None else {**item, "version": found["number"]}

    async def info(self) -> dict:
        """Every group's info, and the summed count; `version` (and the version record's
        `counts`, `created_at`, `parent`) is the oldest group's."""
        infos = await asyncio.gather(*(h.info.remote() for h in self.groups))
        loaded = [i for i in infos if i["name"] is not None]
        first = min(loaded, key=lambda i: i["name"]) if len(loaded) == len(infos) else None
        modalities: dict[str, int] = {}
        for i in infos:
            for m, n in i["modalities"].items():
                modalities[m] = modalities.get(m, 0) + n
        return {
            "index_uri": infos[0]["index_uri"],
            "version": first and first["version"],
            "name": first and first["name"],
            "published_at": first and first["published_at"],
            "count": sum(i["count"] for i in infos),
            "dim": first and first["dim"],
            "modalities": modalities,
            "counts": first["counts"] if first else {},
            "created_at": first and first["created_at"],
            "parent": first and first["parent"],
            "loaded_at": max((i["loaded_at"] or 0 for i in infos), default=None) or None,
            "started_at": min(i["started_at"] for i in infos),
            "groups": infos,
            "last_error": next((i["last_error"] for i in infos if i["last_error"]), None),
        }
