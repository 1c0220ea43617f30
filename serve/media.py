"""The search page: its files, and the media and thumbnails of published index items.

Which items may be read is decided by `serve.inputs.Inputs.media_allowed`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import mimetypes
import os
from typing import TYPE_CHECKING, Any

import cachetools
from fastapi import Request
from fastapi.responses import JSONResponse, Response

import imagebind_core as ibc
from serve.http import APIError

if TYPE_CHECKING:
    from serve.http import RequestPolicy
    from serve.inputs import Inputs
    from serve.options import AppArgs

log = logging.getLogger(__name__)

UI_DIR = os.path.join(os.path.dirname(__file__), "ui")
# The page's files, fixed at import: nothing else under any path is ever read for /ui/.
UI_FILES = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
    "placeholder.svg": "image/svg+xml",
}
# The page runs only its own script and style, talks only to this origin, shows media only
# from blob: URLs it made itself (and its own placeholder.svg), and cannot be framed. A query
# file travels as a data: URI in a request body, never as an image source: no data: here.
UI_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
    "img-src 'self' blob:; media-src 'self' blob:; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
# Media bytes are data, never a document: no sniffing, and sandboxed if opened directly.
MEDIA_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'none'; sandbox",
    "Cache-Control": "private, max-age=300",
}
MIN_THUMBNAIL_SIDE = 16
_MEDIA_TYPES = {
    "vision": "image/",
    "depth": "image/",
    "thermal": "image/",
    "video": "video/",
    "audio": "audio/",
    "text": "text/",
}


def media_type(item: dict) -> str:
    """The Content-Type of a published item's bytes: guessed from its URI when that agrees
    with its modality (`image/png` for a vision item), else a generic one of the modality."""
    kind = item["modality"]
    if kind == "text":
        return "text/plain; charset=utf-8"
    guessed, _ = mimetypes.guess_type(item["uri"])
    family = _MEDIA_TYPES.get(kind)
    if guessed and family and guessed.startswith(family) and guessed != "image/svg+xml":
        return guessed
    return "application/octet-stream"


def media_response(data: bytes, media_type: str) -> Response:
    """Bytes of a published item (or its thumbnail), never to be run as a document."""
    return Response(data, media_type=media_type, headers=MEDIA_HEADERS)


def placeholder_response(reason: str) -> Response:
    """The page's placeholder image, for a thumbnail that cannot be made (never cached)."""
    with open(os.path.join(UI_DIR, "placeholder.svg"), "rb") as f:
        data = f.read()
    headers = {
        **MEDIA_HEADERS,
        "Cache-Control": "no-store",
        # Header values are latin-1 and one line: the reason is cut to what is safe to send.
        "x-placeholder": reason.encode("ascii", "replace").decode()[:200].replace("\n", " "),
    }
    return Response(data, media_type="image/svg+xml", headers=headers)


def ui_file(name: str) -> Response:
    """One of the page's files (`UI_FILES`), else 404."""
    if name not in UI_FILES:
        raise APIError(404, f"no file {name!r} in the search page", code="not_found")
    with open(os.path.join(UI_DIR, name), "rb") as f:
        return Response(f.read(), media_type=UI_FILES[name], headers=UI_HEADERS)


class SearchPage:
    """GET /v1/index, /v1/media and /v1/thumbnail: what the search page shows of the published
    index, with the same auth as the API and only media under the allow-lists.

    Args:
        args: the application's arguments (`thumbnail_cache_bytes`).
        policy: the request policy (auth).
        inputs: reads the items' bytes and holds the allow-lists.
        index: the calls to the `search` deployment.
    """

    def __init__(self, args: AppArgs, policy: RequestPolicy, inputs: Inputs, index: Any) -> None:
        self.policy = policy
        self.inputs = inputs
        self.index = index
        # Thumbnails by (index version, id, size), bounded in bytes, least recently used out.
        # Read and written on the replica's event loop only.
        self.thumbnails: cachetools.LRUCache = cachetools.LRUCache(
            maxsize=args.thumbnail_cache_bytes, getsizeof=len
        )

    async def index_info(self, request: Request) -> Response:
        """GET /v1/index: the published version the endpoint serves and its counts."""
        self.policy.check_auth(request)
        self.index.need()
        info = await self.index.call("info")
        keys = ("version", "name", "published_at", "created_at", "parent", "count", "dim")
        body = {
            "object": "index",
            **{k: info.get(k) for k in keys},
            "modalities": info.get("modalities", {}),
            "counts": info.get("counts", {}),
            "loaded_at": info.get("loaded_at"),
        }
        return JSONResponse(body)

    async def published_item(self, request: Request, item_id: str | None) -> dict:
        """The published item `item_id` whose media may be served: 401 without the key, 404
        when search is off or the loaded version lacks the id, 403 when its URI is outside
        the allow-lists."""
        self.policy.check_auth(request)
        self.index.need()
        if not item_id:
            raise APIError(400, "id: give the item's id (?id=...)", param="id", code="invalid_id")
        item = await self.index.call("item", item_id, param="id")
        if item is None:
            raise APIError(
                404,
                f"id: no item {item_id!r} in the published index version",
                param="id",
                code="item_not_found",
            )
        if not self.inputs.media_allowed(item["uri"]):
            raise APIError(
                403,
                f"id: the media of {item_id!r} is not under an allowed prefix or folder "
                "(s3_allowed_prefixes, media_local_dirs)",
                param="id",
                code="uri_not_allowed",
            )
        return item

    async def media(self, request: Request, item_id: str | None) -> Response:
        """GET /v1/media?id=: the original bytes of a published item (404 if it is gone;
        504 past the request's deadline)."""
        async with self.policy.deadline(request):
            return await self._media(request, item_id)

    async def _media(self, request: Request, item_id: str | None) -> Response:
        item = await self.published_item(request, item_id)
        loop = asyncio.get_running_loop()
        try:
            data = await loop.run_in_executor(self.inputs.pool, self.inputs.read_media, item)
        except ibc.InvalidInput as e:
            raise APIError(
                404, f"id: media of {item_id!r}: {e.reason}", param="id", code="media_unavailable"
            ) from None
        except ibc.StoreUnavailable as e:
            raise self._store_unavailable(e) from None
        return media_response(data, media_type(item))

    async def thumbnail(self, request: Request, item_id: str | None, size: int) -> Response:
        """GET /v1/thumbnail?id=&size=: a JPEG of at most `size` pixels a side of a published
        image or video, made on first request and cached; unreadable or undecodable media
        answer the placeholder image (200, header `x-placeholder` saying why); 504 past the
        request's deadline."""
        async with self.policy.deadline(request):
            return await self._thumbnail(request, item_id, size)

    async def _thumbnail(self, request: Request, item_id: str | None, size: int) -> Response:
        from imagebind_core.thumbnail import MAX_THUMBNAIL_SIDE, THUMBNAIL_KINDS, make_thumbnail

        if not MIN_THUMBNAIL_SIDE <= size <= MAX_THUMBNAIL_SIDE:
            raise APIError(
                400,
                f"size must be in [{MIN_THUMBNAIL_SIDE}, {MAX_THUMBNAIL_SIDE}], got {size}",
                param="size",
                code="invalid_size",
            )
        item = await self.published_item(request, item_id)
        if item["modality"] not in THUMBNAIL_KINDS:
            raise APIError(
                400,
                f"id: {item_id!r} is an item of modality {item['modality']}; thumbnails exist for "
                f"{list(THUMBNAIL_KINDS)} (GET /v1/media serves the item itself)",
                param="id",
                code="no_thumbnail",
            )
        key = (item["version"], item["id"], size)
        jpeg = self.thumbnails.get(key)
        if jpeg is None:

            def make() -> bytes:
                return make_thumbnail(self.inputs.read_media(item), item["modality"], size)

            try:
                jpeg = await asyncio.get_running_loop().run_in_executor(self.inputs.pool, make)
            except ibc.InvalidInput as e:
                # Never cached: a file fixed in place gets its thumbnail on the next request.
                log.info("thumbnail of %r: %s", item_id, e)
                return placeholder_response(e.reason)
            except ibc.StoreUnavailable as e:
                raise self._store_unavailable(e) from None
            with contextlib.suppress(ValueError):  # larger than the whole cache: not kept
                self.thumbnails[key] = jpeg
        return media_response(jpeg, "image/jpeg")

    def _store_unavailable(self, e: Exception) -> APIError:
        log.warning("media: %s", e)
        return APIError(
            503,
            f"{e}; retry later",
            type="server_error",
            code="store_unavailable",
            headers=self.index.retry_after_header,
        )
