"""The search page's files and the media of published items: content types and headers.

Which items may be read is decided by `serve.inputs.Inputs.media_allowed`; the routes that
serve them are on `serve.ingress.EmbeddingService`.
"""

from __future__ import annotations

import mimetypes
import os

from fastapi.responses import Response

from serve.http import APIError

UI_DIR = os.path.join(os.path.dirname(__file__), "ui")
# The page's files, fixed at import: nothing else under any path is ever read for /ui/.
UI_FILES = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
    "placeholder.svg": "image/svg+xml",
}
# The page runs only its own script and style, talks only to this origin, shows media only
# from blob: URLs it made itself, and cannot be framed.
UI_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
    "img-src 'self' blob: data:; media-src 'self' blob:; connect-src 'self'; "
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
