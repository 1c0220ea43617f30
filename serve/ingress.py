"""HTTP ingress: parse, authenticate, bound, decode + preprocess, fan out to the encoders.

The ingress owns no model. It holds one `DeploymentHandle` per model modality and turns each
request into chunks of at most the encoder's `max_batch_size` preprocessed inputs. Decoding and
preprocessing (`imagebind_core.preprocess`) run on a thread pool here, so they overlap with the
encoders' batches instead of stalling them.

Every client fault is a 4xx in OpenAI's error shape `{"error": {"message", "type", "param",
"code"}}`; a 500 means a bug.
"""

# No `from __future__ import annotations`: FastAPI must see `Request` itself on the route
# methods that `serve.ingress` rewraps, or it takes `request` for a query parameter.
import asyncio
import base64
import binascii
import contextlib
import difflib
import hmac
import logging
import os
import re
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import cachetools
import numpy as np
import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import JSONResponse, RedirectResponse, Response
from pydantic import BaseModel, ValidationError
from ray import serve
from ray.serve import metrics
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from imagebind_core.kinds import model_modality
from serve.encoder import EncodeCall
from serve.schemas import (
    ALL_KINDS,
    AppArgs,
    EmbeddingRequest,
    ModelCard,
    ModelList,
    SearchHit,
    SearchRequest,
    SearchResponse,
    chunk_bounds,
)

log = logging.getLogger(__name__)

_URI_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_TIME_BUCKETS_S = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]
TIMEOUT_HEADER = "x-request-timeout"
_INLINE_TEXT_CHARS = 2048
_WHITESPACE = {ord(c): None for c in " \t\r\n\v\f"}
# A body still arriving after max(request deadline, this) is a 408: a client that stalls
# mid-upload must not hold an ingress slot forever. The floor keeps a tiny X-Request-Timeout
# from turning the proxy's own body hand-off into a "client too slow".
BODY_READ_MIN_S = 5.0
# Encoder calls up to this many bytes of input go over Serve's gRPC transport, larger ones
# through the object store (see `EmbeddingService._call_encoder`).
GRPC_MAX_BYTES = 512 * 1024
# Prometheus' text exposition format, as Ray's metrics agent serves it.
PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"
# While an encoder has not answered once, a request waits this long for it before the 503
# `starting`: a fresh ingress replica next to running encoders (a restart, a scale-up) hears
# from them within milliseconds and must not refuse its first requests.
STARTUP_GRACE_S = 1.0
CLIENT_CLOSED = 499  # nginx's status for a client that went away: counted, never answered
# --- search page ---
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
# What each request field must be, for type errors (pydantic's own message names union members).
_FIELD_HINTS = {
    "input": "must be a string or a list of strings (token-id arrays are not supported)",
}


class APIError(Exception):
    """A request that cannot be served, as an HTTP status plus OpenAI-style error body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def response(self) -> JSONResponse:
        """The JSON response for this error."""
        body = {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def _unknown_field_message(name: str, schema: type[BaseModel]) -> str:
    """`unknown field 'inputs' (did you mean 'input'?)`, or the list of the known fields."""
    known = list(schema.model_fields)
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    if close:
        return f"unknown field {name!r} (did you mean {close[0]!r}?)"
    return f"unknown field {name!r}; the fields of this request are {', '.join(known)}"


def _validation_message(
    e: ValidationError, schema: type[BaseModel] | None = None
) -> tuple[str, str | None, str]:
    """The error to report as `field: message`, the field as `param`, and the error code.

    An unknown top-level field comes first, named with the closest known one: `{"inputs":
    ...}` is a typo of `input`, not a request missing its input."""
    errors = e.errors()
    for err in errors:
        loc = err.get("loc", ())
        if err.get("type") == "extra_forbidden" and len(loc) == 1 and schema is not None:
            return _unknown_field_message(str(loc[0]), schema), str(loc[0]), "unknown_field"
    err = errors[0]
    parts = [str(p) for p in err.get("loc", ())]
    msg = err.get("msg", "invalid value")
    if parts and parts[0] in _FIELD_HINTS:
        # A union's error location carries the member tried (`input.str`): name the field.
        return f"{parts[0]} {_FIELD_HINTS[parts[0]]}", parts[0], "invalid_request"
    loc = ".".join(parts)
    return (f"{loc}: {msg}" if loc else msg), (loc or None), "invalid_request"


class EmbeddingService:
    """The request logic of the ingress, independent of FastAPI routing and Serve.

    Args:
        args: the application's arguments.
        encoders: `{model modality: handle}`; a handle's `embed.remote(EncodeCall)` returns an
            awaitable (k, D) array, its `ready.remote()` the encoder's info.
        search: handle of the `SearchIndex` deployment, or None when no index is configured.
    """

    def __init__(
        self, args: AppArgs, encoders: Mapping[str, Any], search: Any | None = None
    ) -> None:
        self.args = args
        self.encoders = dict(encoders)
        # Serve's gRPC transport for small calls: see `_call_encoder`.
        self._encoders_grpc = {m: h.options(_by_reference=False) for m, h in self.encoders.items()}
        self.search_index = search
        self.model_id = args.served_model()
        self.kinds = list(args.modalities)
        key = args.api_key
        if key is None and args.api_key_env:
            key = os.environ.get(args.api_key_env) or None
            if key is None:
                # Failing closed: an operator who named a secret expects auth to be on.
                raise RuntimeError(
                    f"api_key_env={args.api_key_env!r} is set but that environment variable "
                    "is empty in the ingress replica"
                )
        self._api_key = key.encode() if key else None
        self._pool = ThreadPoolExecutor(
            max_workers=args.ingress.preprocess_threads, thread_name_prefix="preprocess"
        )
        self._storage_options: dict[str, Any] | None = None
        # Thumbnails by (index version, id, size), bounded in bytes, least recently used out.
        # Read and written on the replica's event loop only.
        self.thumbnails: cachetools.LRUCache = cachetools.LRUCache(
            maxsize=args.thumbnail_cache_bytes, getsizeof=len
        )
        self._info: dict[str, Any] | None = None
        self.created = int(time.time())
        self._m_requests = metrics.Counter(
            "imagebind_requests",
            description="HTTP requests by route, modality and status code.",
            tag_keys=("route", "modality", "status"),
        )
        self._m_inputs = metrics.Counter(
            "imagebind_inputs", description="Inputs received.", tag_keys=("modality",)
        )
        self._m_latency = metrics.Histogram(
            "imagebind_request_seconds",
            description="Request latency inside the ingress.",
            boundaries=_TIME_BUCKETS_S,
            tag_keys=("route", "modality"),
        )
        self._m_preprocess = metrics.Histogram(
            "imagebind_preprocess_seconds",
            description="Decode + preprocess time of one input.",
            boundaries=_TIME_BUCKETS_S,
            tag_keys=("modality",),
        )
        # Scaling, as an operator watches it (GET /v1/status, Prometheus): chunks this ingress
        # replica waits to hand to each encoder (no replica free, or none running) and chunks
        # a replica holds; replicas per deployment and state from Serve's controller.
        self.app_name: str | None = None  # set by `Ingress`; None: no Serve status (tests)
        self._waiting = dict.fromkeys(self.encoders, 0)
        self._ongoing = dict.fromkeys(self.encoders, 0)
        self._status: dict[str, dict[str, Any]] = {}
        self._status_at = 0.0
        self._m_waiting = metrics.Gauge(
            "imagebind_encoder_waiting_chunks",
            description="Chunks an ingress replica waits to hand to the encoder (no replica "
            "free, or none running).",
            tag_keys=("modality",),
        )
        self._m_ongoing = metrics.Gauge(
            "imagebind_encoder_ongoing_chunks",
            description="Chunks an ingress replica has handed to encoder replicas, unanswered.",
            tag_keys=("modality",),
        )
        self._m_replicas = metrics.Gauge(
            "imagebind_deployment_replicas",
            description="Replicas of each deployment of the app by state, as Serve's "
            "controller reports them to each ingress replica.",
            tag_keys=("serve_deployment", "state"),
        )
        self._replica_tags: set[tuple[str, str]] = set()
        # Start-up: `{model modality: set once its encoder has answered}` for the encoders a
        # request may not wait for (see `track_startup`); None: not tracked (an
        # `EmbeddingService` outside Serve, as tests build it).
        self._started: dict[str, asyncio.Event] | None = None
        self._start_watch: asyncio.Task | None = None
        self._metrics_url: str | None = None

    # --- scaling status ----------------------------------------------------------------------
    def refresh_status(self) -> dict[str, dict[str, Any]]:
        """Replica counts per deployment of this app from Serve's status API (blocking: call it
        from a thread), and the Prometheus gauges set from them and from the chunk counts."""
        for m in self.encoders:
            self._m_waiting.set(self._waiting[m], tags={"modality": m})
            self._m_ongoing.set(self._ongoing[m], tags={"modality": m})
        if self.app_name is None:
            return self._status
        app = serve.status().applications.get(self.app_name)
        snap: dict[str, dict[str, Any]] = {}
        for name, d in (app.deployments if app else {}).items():
            states = {str(k): int(v) for k, v in d.replica_states.items()}
            snap[name] = {"status": str(getattr(d.status, "value", d.status)), "replicas": states}
        seen = set()
        for name, entry in snap.items():
            for state, n in entry["replicas"].items():
                seen.add((name, state))
                self._m_replicas.set(n, tags={"serve_deployment": name, "state": state})
        for name, state in self._replica_tags - seen:  # a state that emptied reads 0, not stale
            self._m_replicas.set(0, tags={"serve_deployment": name, "state": state})
        self._replica_tags |= seen
        self._status, self._status_at = snap, time.monotonic()
        return snap

    def running_replicas(self, deployment: str) -> int | None:
        """RUNNING replicas of `deployment` in the last status snapshot (None: not known)."""
        entry = self._status.get(deployment)
        return None if entry is None else entry["replicas"].get("RUNNING", 0)

    async def status(self, request: Request) -> Response:
        """GET /v1/status: per deployment, replicas by state, the autoscaling range, and the
        chunks this ingress replica waits to hand over / has handed over."""
        self.check_auth(request)
        if time.monotonic() - self._status_at > 1.0:
            try:
                await asyncio.to_thread(self.refresh_status)
            except Exception as e:  # the controller is busy or restarting: say so, no 500
                raise APIError(
                    503,
                    f"Serve's status is unavailable ({type(e).__name__}); retry later",
                    type="server_error",
                    code="status_unavailable",
                    headers=self.retry_after_header,
                ) from None
        out: dict[str, Any] = {}
        for name, entry in self._status.items():
            out[name] = {**entry, "running": entry["replicas"].get("RUNNING", 0)}
        for m in self.encoders:
            opts = self.args.encoder_options(m)
            out.setdefault(f"encoder-{m}", {"status": "UNKNOWN", "replicas": {}, "running": 0})
            out[f"encoder-{m}"].update(
                min_replicas=opts.min_replicas,
                max_replicas=opts.max_replicas,
                target_ongoing_requests=opts.target(),
                max_batch_size=opts.max_batch_size,
                waiting_chunks=self._waiting[m],
                ongoing_chunks=self._ongoing[m],
            )
        if "ingress" in out:
            ing = self.args.ingress
            out["ingress"].update(
                min_replicas=ing.min_replicas,
                max_replicas=ing.max_replicas,
                target_ongoing_requests=ing.target_ongoing_requests,
            )
        body = {"object": "status", "application": self.app_name, "deployments": out}
        return JSONResponse(body)

    # --- start-up ----------------------------------------------------------------------------
    def track_startup(self) -> None:
        """Refuse requests for an encoder until its first replica has loaded its model.

        While an app starts, the ingress is up within seconds and the encoders load their
        weights for much longer; a request handed to an encoder with no replica yet would wait
        for one. Until each encoder with `min_replicas >= 1` has answered its first `ready`
        call, its requests are answered 503 `code: starting` with `Retry-After` (within
        `STARTUP_GRACE_S`), never held until the model is there. An
        encoder allowed to scale to zero is not tracked: a request is what starts its replica
        (bounded by `replica_wait_timeout_s`)."""
        self._started = {}
        for m in self.encoders:
            self._started[m] = asyncio.Event()
            if self.args.encoder_options(m).min_replicas == 0:
                self._started[m].set()
        self._ensure_start_watch()

    def _ensure_start_watch(self) -> None:
        """The task waiting for the encoders' first replicas, started once on the running loop
        (the replica's constructor may run outside it: then the first request starts it)."""
        if self._started is None or self._start_watch is not None or not self.starting():
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._start_watch = loop.create_task(self._await_encoders())

    async def _await_encoders(self) -> None:
        async def first_answer(m: str) -> None:
            while True:
                try:
                    info = await self.encoders[m].ready.remote()
                except Exception as e:  # a replica failed while starting: Serve starts another
                    log.info("encoder-%s not started yet: %s", m, e)
                    await asyncio.sleep(1.0)
                    continue
                if self._info is None and isinstance(info, dict):
                    self._info = info
                assert self._started is not None
                self._started[m].set()
                log.info("encoder-%s has a replica; requests for it are served", m)
                return

        waiting = [m for m, ev in (self._started or {}).items() if not ev.is_set()]
        await asyncio.gather(*(first_answer(m) for m in waiting))

    def starting(self) -> list[str]:
        """The encoder deployments that have not answered once yet (empty when not tracked)."""
        return [f"encoder-{m}" for m, ev in (self._started or {}).items() if not ev.is_set()]

    async def check_started(self, kind: str) -> None:
        """503 with Retry-After while the encoder of `kind` has not loaded its model yet
        (after at most `STARTUP_GRACE_S` of waiting for it)."""
        started = (self._started or {}).get(model_modality(kind).value)
        if started is None or started.is_set():
            return
        self._ensure_start_watch()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(started.wait(), STARTUP_GRACE_S)
        m = model_modality(kind).value
        if not started.is_set():
            retry = max(1, round(self.args.retry_after_s))
            raise APIError(
                503,
                f"the {kind} encoder (encoder-{m}) is still starting (loading its model); "
                f"retry in {retry} s, or poll GET /readyz until it answers 200",
                type="server_error",
                code="starting",
                headers={"Retry-After": str(retry)},
            )

    # --- request plumbing --------------------------------------------------------------------
    @property
    def retry_after_header(self) -> dict[str, str]:
        """The `Retry-After` header of a 503 (`retry_after_s`, at least 1 s)."""
        return {"Retry-After": str(max(1, round(self.args.retry_after_s)))}

    def check_auth(self, request: Request) -> None:
        """401 unless auth is off or the bearer token matches (constant-time compare)."""
        if self._api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            token.strip().encode(), self._api_key
        ):
            raise APIError(
                401,
                "missing or invalid API key: send `Authorization: Bearer <key>`",
                type="authentication_error",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )

    async def read_body(self, request: Request) -> bytes:
        """The request body, refusing (413) one over `max_body_bytes` before buffering it and
        (415) a compressed one."""
        encoding = request.headers.get("content-encoding", "").strip().lower()
        if encoding not in ("", "identity"):
            raise APIError(
                415,
                f"Content-Encoding {encoding!r} is not supported: send the JSON body uncompressed",
                code="unsupported_encoding",
            )
        limit = self.args.max_body_bytes
        too_big = APIError(
            413,
            f"request body is over the limit of {limit} bytes",
            code="request_too_large",
        )
        declared = request.headers.get("content-length")
        if declared is not None:
            try:
                if int(declared) > limit:
                    raise too_big
            except ValueError:
                raise APIError(400, "Content-Length is not a number") from None
        body = bytearray()
        async for part in request.stream():
            body += part
            if len(body) > limit:
                raise too_big
        return bytes(body)

    async def read_body_in_time(self, request: Request, deadline_s: float) -> bytes:
        """`read_body`, or 408 when the body has not fully arrived in time."""
        wait = max(deadline_s, BODY_READ_MIN_S)
        try:
            async with asyncio.timeout(wait):
                return await self.read_body(request)
        except TimeoutError:
            raise APIError(
                408, f"request body not received within {wait:g} s", code="request_timeout"
            ) from None

    @contextlib.asynccontextmanager
    async def json_request(self, request: Request, schema: type[BaseModel]):
        """Read the body (408 if it does not arrive in time) and validate it into `schema`
        (400 naming the field), then run the block under what is left of the request's
        deadline (504 when it runs out)."""
        deadline = self.deadline_s(request)
        started = time.monotonic()
        body = await self.read_body_in_time(request, deadline)
        try:
            async with asyncio.timeout(max(0.0, deadline - (time.monotonic() - started))):
                try:
                    req = schema.model_validate_json(body)
                except ValidationError as e:
                    msg, param, code = _validation_message(e, schema)
                    raise APIError(400, msg, param=param, code=code) from None
                yield req
        except TimeoutError:
            raise APIError(
                504,
                f"request timed out after {deadline:g} s",
                type="server_error",
                code="timeout",
            ) from None

    def deadline_s(self, request: Request) -> float:
        """The server's request timeout, shortened by an `X-Request-Timeout` header (seconds)."""
        limit = self.args.request_timeout_s
        raw = request.headers.get(TIMEOUT_HEADER)
        if raw is None:
            return limit
        try:
            asked = float(raw)
        except ValueError:
            raise APIError(400, f"{TIMEOUT_HEADER} must be a number of seconds") from None
        if not asked > 0:
            raise APIError(400, f"{TIMEOUT_HEADER} must be positive")
        return min(limit, asked)

    def check_model(self, model: str | None) -> None:
        """404 for a model id this endpoint does not serve (None means the served one)."""
        if model is not None and model != self.model_id:
            raise APIError(
                404,
                f"model {model!r} does not exist; this endpoint serves {self.model_id!r}",
                param="model",
                code="model_not_found",
            )

    def check_kind(self, kind: str, param: str = "modality") -> str:
        """400 for an unknown modality or one this deployment does not serve."""
        if kind not in ALL_KINDS:
            raise APIError(
                400,
                f"unknown modality {kind!r}; choose one of {list(ALL_KINDS)}",
                param=param,
                code="unknown_modality",
            )
        if kind not in self.kinds:
            raise APIError(
                400,
                f"modality {kind!r} is not served by this deployment; it serves {self.kinds}",
                param=param,
                code="modality_not_served",
            )
        return kind

    def storage_options(self) -> dict[str, Any]:
        if self._storage_options is None:
            self._storage_options = self.args.storage_options()
        return self._storage_options

    # --- inputs ------------------------------------------------------------------------------
    def load_bytes(self, kind: str, index: int, value: str) -> bytes:
        """A media input's bytes from base64, a `data:` URI or an allow-listed `s3://` URI."""
        import imagebind_core as ibc

        param = f"input[{index}]"
        limit = self.args.max_input_bytes
        if value[:5].lower() == "data:":  # RFC 2397; the media type is not trusted
            header, sep, payload = value.partition(",")
            if not sep:
                raise APIError(
                    400,
                    f"{param}: malformed data: URI (no comma)",
                    param=param,
                    code="invalid_input",
                )
            if header.lower().endswith(";base64"):
                value = payload
            else:
                data = urllib.parse.unquote_to_bytes(payload)
                if len(data) > limit:
                    raise APIError(
                        400,
                        f"{param}: over the limit of {limit} bytes",
                        param=param,
                        code="too_large",
                    )
                return data
        else:
            m = _URI_SCHEME.match(value)
            if m:
                return self._read_uri(kind, index, value, m.group(1).lower())
        # base64: refuse by length before decoding (4 characters carry 3 bytes).
        if len(value) // 4 * 3 > limit + 3:
            raise APIError(
                400, f"{param}: over the limit of {limit} bytes", param=param, code="too_large"
            )
        # What clients send: line-wrapped (MIME, `base64` without -w0), the URL-safe alphabet,
        # padding dropped. All are unambiguous; anything else is refused.
        compact = value.translate(_WHITESPACE)
        if "-" in compact or "_" in compact:
            compact = compact.replace("-", "+").replace("_", "/")
        compact += "=" * (-len(compact) % 4)
        try:
            data = base64.b64decode(compact, validate=True)
        except (binascii.Error, ValueError) as e:
            raise APIError(
                400,
                f"{param}: not valid base64 ({e}); send {kind} inputs as base64 (standard or "
                "URL-safe alphabet), a data: URI or an allowed s3:// URI",
                param=param,
                code="invalid_input",
            ) from None
        if not data:
            raise ibc.InvalidInput(kind, "empty input", param)
        return data

    def _read_uri(self, kind: str, index: int, uri: str, scheme: str) -> bytes:
        import imagebind_core as ibc

        param = f"input[{index}]"
        if scheme != "s3":
            raise APIError(
                400,
                f"{param}: {scheme}:// URIs are not accepted; only s3:// under the allowed "
                "prefixes",
                param=param,
                code="uri_not_allowed",
            )
        if not self.s3_allowed(uri):
            raise APIError(
                400,
                f"{param}: {uri!r} is not under an allowed prefix "
                f"({self.args.s3_allowed_prefixes or 'none configured'})",
                param=param,
                code="uri_not_allowed",
            )
        return ibc.read_bytes(
            uri, self.storage_options(), max_bytes=self.args.max_input_bytes, modality=kind
        )

    def s3_allowed(self, uri: str) -> bool:
        """Whether `uri` is under one of `s3_allowed_prefixes`. Checked on the string, before
        any request leaves this process; dot segments are refused so that no normalisation
        downstream can step outside a prefix."""
        parts = uri[len("s3://") :].split("/")
        allowed = any(uri.startswith(p) for p in self.args.s3_allowed_prefixes)
        return allowed and not any(p in (".", "..") for p in parts)

    def media_allowed(self, uri: str) -> bool:
        """Whether the media endpoints may read `uri`: an s3:// URI under the allowed prefixes,
        or a local file (a path or file://) inside one of `media_local_dirs`, symlinks
        resolved. Nothing else (https://, other schemes) is ever read for the page."""
        m = _URI_SCHEME.match(uri)
        scheme = m.group(1).lower() if m else "file"
        if scheme == "s3":
            return self.s3_allowed(uri)
        if scheme != "file" or not self.args.media_local_dirs:
            return False
        path = os.path.realpath(uri[len("file://") :] if m else uri)
        return any(os.path.commonpath([path, d]) == d for d in self.args.media_local_dirs)

    def prepare(self, kind: str, index: int, value: str) -> tuple[np.ndarray, int]:
        """One input -> (model input array, text tokens). Runs on the preprocessing pool."""
        # The submodule, not `ibc.preprocess`: the package attribute of that name is lazy.
        from imagebind_core.preprocess import preprocess

        t0 = time.perf_counter()
        item_id = f"input[{index}]"
        if kind == "text":
            x = preprocess("text", value, item_id=item_id)
            tokens = int((x != 0).sum())  # padding is token id 0
        else:
            # compact: images go to the encoder replica as uint8 pixels, a quarter of the
            # bytes of the float input; the replica expands them (EncoderCore.encode)
            x = preprocess(kind, self.load_bytes(kind, index, value), item_id=item_id, compact=True)
            tokens = 0
        self._m_preprocess.observe(time.perf_counter() - t0, tags={"modality": kind})
        return x.numpy(), tokens

    async def prepare_all(self, kind: str, inputs: list[str]) -> tuple[list[np.ndarray], int]:
        """Preprocess every input on the pool; the lowest-index bad input -> 400."""
        import imagebind_core as ibc

        if kind == "text" and sum(map(len, inputs)) <= _INLINE_TEXT_CHARS:
            # Tokenising a few short texts takes microseconds: cheaper on the event loop than
            # two thread hand-offs, which cost milliseconds on a busy machine.
            results: list[Any] = []
            for i, v in enumerate(inputs):
                try:
                    results.append(self.prepare(kind, i, v))
                except Exception as e:
                    results.append(e)
        else:
            loop = asyncio.get_running_loop()
            futs = [
                loop.run_in_executor(self._pool, self.prepare, kind, i, v)
                for i, v in enumerate(inputs)
            ]
            results = await asyncio.gather(*futs, return_exceptions=True)
        arrays, tokens = [], 0
        for i, r in enumerate(results):
            if isinstance(r, APIError):
                raise r
            if isinstance(r, ibc.InvalidInput):
                raise APIError(
                    400,
                    f"input[{i}]: invalid {kind} input: {r.reason}",
                    param=f"input[{i}]",
                    code="invalid_input",
                )
            if isinstance(r, ibc.StoreUnavailable):
                # The store (or this endpoint's credentials for it), not the request: 503.
                log.warning("input[%d]: %s", i, r)
                raise APIError(
                    503,
                    f"input[{i}]: {r}; retry later",
                    type="server_error",
                    param=f"input[{i}]",
                    code="store_unavailable",
                    headers=self.retry_after_header,
                )
            if isinstance(r, BaseException):
                raise r
            arrays.append(r[0])
            tokens += r[1]
        return arrays, tokens

    async def encode(self, kind: str, arrays: list[np.ndarray], normalize: bool) -> np.ndarray:
        """(n, ...) preprocessed inputs -> (n, D), in chunks of the encoder's max_batch_size."""
        import torch

        from imagebind_core.preprocess import collate

        m = model_modality(kind).value
        size = self.args.encoder_options(m).max_batch_size
        calls = [
            EncodeCall(
                collate([torch.from_numpy(a) for a in arrays[s:e]]).numpy(),
                normalize,
            )
            for s, e in chunk_bounds(len(arrays), size)
        ]
        tasks = [asyncio.ensure_future(self._call_encoder(m, c)) for c in calls]
        try:
            outs = await asyncio.gather(*tasks)
        except BaseException:
            for t in tasks:
                t.cancel()
            raise
        return np.concatenate(outs)

    async def _call_encoder(self, modality: str, call: EncodeCall) -> np.ndarray:
        """One chunk to the encoder; a replica dying mid-call is retried once, then 503.

        Transport: a chunk of up to `GRPC_MAX_BYTES` (a few texts, one to three images as
        compact pixels, an audio clip, a depth map) goes over Serve's gRPC channel to the
        replica, pickled into the message; a larger one (video clips, big batches) through
        Ray's object store, which shares it without copies and has no message size limit
        (gRPC's is 4 MiB here). Per hop, gRPC against by reference on the 2-core box
        (`benchmarks/bench_serve_transport.py`): text 0.59-0.65x, a compact image 0.50-0.54x,
        an audio clip (313 KB) 0.53-0.56x, four compact images (602 KB) 0.91-0.95x, a float32
        image (602 KB) 1.24-1.33x.
        """
        from grpc.aio import AioRpcError
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
        from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

        small = call.x.nbytes <= GRPC_MAX_BYTES
        handle = (self._encoders_grpc if small else self.encoders)[modality]
        retry = {"Retry-After": str(max(0, round(self.args.retry_after_s)))}
        for attempt in range(2):
            call.sent_at = time.time()
            try:
                resp = handle.embed.remote(call)
                await self._wait_for_replica(modality, resp)
                self._ongoing[modality] += 1
                try:
                    return await resp
                finally:
                    self._ongoing[modality] -= 1
            except BackPressureError:
                raise APIError(
                    503,
                    f"encoder-{modality} is overloaded; retry later",
                    type="server_error",
                    code="overloaded",
                    headers=retry,
                ) from None
            except DeploymentUnavailableError:
                raise APIError(
                    503,
                    f"encoder-{modality} is unavailable; retry later",
                    type="server_error",
                    code="unavailable",
                    headers=retry,
                ) from None
            except (ActorDiedError, ActorUnavailableError, RayActorError, AioRpcError) as e:
                # AioRpcError: the gRPC channel to a replica that died (Serve maps only
                # UNAVAILABLE to ActorUnavailableError)
                if attempt == 0:
                    log.warning("encoder-%s replica failed (%s); retrying once", modality, e)
                    continue
                raise APIError(
                    503,
                    f"encoder-{modality} replica failed; retry later",
                    type="server_error",
                    code="replica_failed",
                    headers=retry,
                ) from None
        raise AssertionError("unreachable")

    async def _wait_for_replica(self, modality: str, resp: Any) -> None:
        """Wait until Serve hands `resp` to a replica, at most `replica_wait_timeout_s`.

        A deployment scaled to zero queues the call in this replica's router, which asks the
        controller for a replica at once; a busy one queues it until a replica has a free slot.
        Either way the wait is bounded: past it the call is withdrawn and the request answered
        503 with Retry-After (the replica being started keeps starting, so a retry finds it).
        Errors of the assignment itself (backpressure, deployment gone) propagate.
        """
        limit = self.args.encoder_options(modality).replica_wait_timeout_s
        # The assignment step of `await resp` (Serve's DeploymentResponse), awaited apart so
        # that only the wait for a replica is bounded, never the model's own time. Anything
        # else (a stand-in handle in tests) has no such step. If a Ray upgrade renames it,
        # tests/test_serve_autoscale.py's bounded-wait test fails.
        fetch = getattr(resp, "_fetch_future_result_async", None)
        if fetch is None:
            return
        assigned = asyncio.ensure_future(fetch())
        self._waiting[modality] += 1
        try:
            await asyncio.wait_for(asyncio.shield(assigned), limit)
        except TimeoutError:
            resp.cancel()
            raise APIError(
                503,
                f"no encoder-{modality} replica took the request within {limit:g} s (the "
                "deployment is starting a replica or all replicas are busy); retry later",
                type="server_error",
                code="no_replica",
                headers=self.retry_after_header,
            ) from None
        except asyncio.CancelledError:
            resp.cancel()  # the client went away or a sibling chunk failed: withdraw the call
            raise
        finally:
            self._waiting[modality] -= 1

    # --- routes ------------------------------------------------------------------------------
    async def embeddings(self, request: Request) -> Response:
        """POST /v1/embeddings."""
        t0 = time.perf_counter()
        kind = "unknown"
        status = 500
        try:
            self.check_auth(request)
            async with self.json_request(request, EmbeddingRequest) as req:
                self.check_model(req.model)
                kind = self.check_kind(req.modality)
                await self.check_started(kind)
                dim = self.embed_dim()
                if req.dimensions is not None and req.dimensions != dim:
                    raise APIError(
                        400,
                        f"dimensions={req.dimensions} is not supported; this model returns {dim}",
                        param="dimensions",
                        code="invalid_request",
                    )
                inputs = req.inputs()
                if not inputs:
                    raise APIError(400, "input is empty", param="input", code="invalid_request")
                if len(inputs) > self.args.max_inputs:
                    raise APIError(
                        400,
                        f"{len(inputs)} inputs is over the limit of {self.args.max_inputs} per "
                        "request",
                        param="input",
                        code="too_many_inputs",
                    )
                self._m_inputs.inc(len(inputs), tags={"modality": kind})
                arrays, tokens = await self.prepare_all(kind, inputs)
                t_enc = time.perf_counter()
                vectors = await self.encode(kind, arrays, req.normalize)
                t_enc = time.perf_counter() - t_enc
            bad = np.flatnonzero(~np.isfinite(vectors).all(axis=1))
            if bad.size:  # never sent as JSON nulls (what orjson writes for NaN)
                raise APIError(
                    500,
                    f"the encoder returned non-finite values for input[{int(bad[0])}] "
                    f"({bad.size} of {len(vectors)} inputs); with dtype float16 this is overflow",
                    type="server_error",
                    code="non_finite_embedding",
                )
            # `EmbeddingResponse`'s shape, built as a dict: the vectors stay float32 arrays
            # for `_json_response` (pydantic would validate and copy each of 1024 floats).
            body = {
                "object": "list",
                "data": [
                    {
                        "object": "embedding",
                        "index": i,
                        "embedding": _encode_vector(v, req.encoding_format),
                    }
                    for i, v in enumerate(vectors)
                ],
                "model": self.model_id,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
            status = 200
            # Like OpenAI's `openai-processing-ms`: time spent inside the ingress, and the part
            # of it waiting for the encoders (queue + batch + model).
            headers = {
                "x-processing-ms": f"{1000 * (time.perf_counter() - t0):.1f}",
                "x-encode-ms": f"{1000 * t_enc:.1f}",
            }
            return _json_response(body, headers=headers)
        except APIError as e:
            status = e.status
            raise
        except (ClientDisconnect, asyncio.CancelledError):
            status = CLIENT_CLOSED  # the client went away: not a server error
            raise
        finally:
            self._observe("embeddings", kind, status, t0)

    def embed_dim(self) -> int:
        """Size of the served embeddings (from the preset: known before any encoder answers)."""
        import imagebind_core as ibc

        return int(ibc.get_config(self.args.preset).out_embed_dim)

    async def search(self, request: Request) -> Response:
        """POST /v1/search: embed the query (or take a vector) and ask the index."""
        t0 = time.perf_counter()
        kind = "unknown"
        status = 500
        try:
            self.check_auth(request)
            if self.search_index is None:
                raise APIError(
                    404,
                    "search is not enabled: this app was started without `index_uri`",
                    code="search_disabled",
                )
            async with self.json_request(request, SearchRequest) as req:
                self.check_model(req.model)
                if req.filter_modality is not None and req.filter_modality not in ALL_KINDS:
                    raise APIError(
                        400,
                        f"unknown filter_modality {req.filter_modality!r}",
                        param="filter_modality",
                        code="unknown_modality",
                    )
                if req.id is not None:
                    kind = "id"
                    hits = await self._index_call(
                        "similar", req.id, req.top_k, req.filter_modality, param="id"
                    )
                else:
                    if req.vector is not None:
                        kind = "vector"
                        vector = [float(v) for v in req.vector]
                    else:
                        kind = self.check_kind(req.modality)
                        await self.check_started(kind)
                        arrays, _ = await self.prepare_all(kind, [req.input or ""])
                        vector = (await self.encode(kind, arrays, True))[0].tolist()
                    hits = await self._index_call(
                        "search", vector, req.top_k, req.filter_modality, param="vector"
                    )
            resp = SearchResponse(data=[SearchHit(**h) for h in hits], model=self.model_id)
            status = 200
            return JSONResponse(resp.model_dump())
        except APIError as e:
            status = e.status
            raise
        except (ClientDisconnect, asyncio.CancelledError):
            status = CLIENT_CLOSED
            raise
        finally:
            self._observe("search", kind, status, t0)

    def need_search(self) -> None:
        """404 when the app was started without an index."""
        if self.search_index is None:
            raise APIError(
                404,
                "search is not enabled: this app was started without `index_uri`",
                code="search_disabled",
            )

    async def _index_call(self, method: str, *args: Any, param: str | None = None) -> Any:
        """`search_index.<method>.remote(*args)`, its refusals as API errors: no version
        published yet -> 503, an id the version lacks (KeyError) -> 404, a bad query
        (ValueError, e.g. imagebind_core.InvalidInput) -> 400 naming `param`."""
        from ray.exceptions import RayTaskError

        from serve.search import IndexNotReady

        try:
            return await getattr(self.search_index, method).remote(*args)
        except Exception as e:
            # Over Serve the replica's exception arrives as a RayTaskError carrying it.
            cause = getattr(e, "cause", None) if isinstance(e, RayTaskError) else e
            if isinstance(cause, IndexNotReady):
                raise APIError(
                    503,
                    f"search: {cause}",
                    type="server_error",
                    code="index_not_ready",
                    headers=self.retry_after_header,
                ) from None
            if isinstance(cause, KeyError):
                raise APIError(
                    404,
                    f"{param}: no item {cause.args[0]!r} in the published index version",
                    param=param,
                    code="item_not_found",
                ) from None
            if isinstance(cause, ValueError):
                raise APIError(400, f"search: {cause}", param=param) from None
            raise

    # --- search page: index version, media and thumbnails of published items ---------------
    async def index_info(self, request: Request) -> Response:
        """GET /v1/index: the published version the endpoint serves and its counts."""
        self.check_auth(request)
        self.need_search()
        info = await self._index_call("info")
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
        self.check_auth(request)
        self.need_search()
        if not item_id:
            raise APIError(400, "id: give the item's id (?id=...)", param="id", code="invalid_id")
        item = await self._index_call("item", item_id, param="id")
        if item is None:
            raise APIError(
                404,
                f"id: no item {item_id!r} in the published index version",
                param="id",
                code="item_not_found",
            )
        if not self.media_allowed(item["uri"]):
            raise APIError(
                403,
                f"id: the media of {item_id!r} is not under an allowed prefix or folder "
                "(s3_allowed_prefixes, media_local_dirs)",
                param="id",
                code="uri_not_allowed",
            )
        return item

    def read_media(self, item: dict) -> bytes:
        """The bytes of a published item (at most `max_input_bytes`); InvalidInput when it is
        missing or too large, StoreUnavailable when the store cannot be reached."""
        import imagebind_core as ibc

        return ibc.read_bytes(
            item["uri"],
            self.storage_options(),
            max_bytes=self.args.max_input_bytes,
            modality=item["modality"],
        )

    async def media(self, request: Request, item_id: str | None) -> Response:
        """GET /v1/media?id=: the original bytes of a published item (404 if it is gone)."""
        import imagebind_core as ibc

        item = await self.published_item(request, item_id)
        loop = asyncio.get_running_loop()
        try:
            data = await loop.run_in_executor(self._pool, self.read_media, item)
        except ibc.InvalidInput as e:
            raise APIError(
                404, f"id: media of {item_id!r}: {e.reason}", param="id", code="media_unavailable"
            ) from None
        except ibc.StoreUnavailable as e:
            raise self._store_unavailable(e) from None
        return Response(data, media_type=media_type(item), headers=MEDIA_HEADERS)

    async def thumbnail(self, request: Request, item_id: str | None, size: int) -> Response:
        """GET /v1/thumbnail?id=&size=: a JPEG of at most `size` pixels a side of a published
        image or video, made on first request and cached; unreadable or undecodable media
        answer the placeholder image (200, header `x-placeholder` saying why)."""
        import imagebind_core as ibc
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
                f"id: {item_id!r} is a {item['modality']} item; thumbnails exist for "
                f"{list(THUMBNAIL_KINDS)} (GET /v1/media serves the item itself)",
                param="id",
                code="no_thumbnail",
            )
        key = (item["version"], item["id"], size)
        jpeg = self.thumbnails.get(key)
        if jpeg is None:

            def make() -> bytes:
                return make_thumbnail(self.read_media(item), item["modality"], size)

            try:
                jpeg = await asyncio.get_running_loop().run_in_executor(self._pool, make)
            except ibc.InvalidInput as e:
                # Never cached: a file fixed in place gets its thumbnail on the next request.
                log.info("thumbnail of %r: %s", item_id, e)
                return placeholder_response(e.reason)
            except ibc.StoreUnavailable as e:
                raise self._store_unavailable(e) from None
            with contextlib.suppress(ValueError):  # larger than the whole cache: not kept
                self.thumbnails[key] = jpeg
        return Response(jpeg, media_type="image/jpeg", headers=MEDIA_HEADERS)

    def _store_unavailable(self, e: Exception) -> APIError:
        log.warning("media: %s", e)
        return APIError(
            503,
            f"{e}; retry later",
            type="server_error",
            code="store_unavailable",
            headers=self.retry_after_header,
        )

    async def models(self, request: Request) -> Response:
        """GET /v1/models."""
        self.check_auth(request)
        return JSONResponse(ModelList(data=[await self._card()]).model_dump())

    async def model(self, request: Request, model: str) -> Response:
        """GET /v1/models/{model}."""
        self.check_auth(request)
        self.check_model(model)
        return JSONResponse((await self._card()).model_dump())

    async def _card(self) -> ModelCard:
        info = self._info
        if info is None:
            try:
                # Lineage from an encoder that has a replica: asking one scaled to zero would
                # start it. The first call that finds one caches the answer.
                m = next(
                    m
                    for m in self.encoders
                    if self.args.encoder_options(m).min_replicas > 0
                    or self.running_replicas(f"encoder-{m}")
                )
                info = self._info = await asyncio.wait_for(
                    self.encoders[m].ready.remote(), timeout=10
                )
            except Exception:  # not loaded yet: answer without the lineage
                info = {}
        return ModelCard(
            id=self.model_id,
            created=self.created,
            embed_dim=info.get("embed_dim") or self.embed_dim(),
            modalities=self.kinds,
            lineage=info.get("lineage", {}),
        )

    async def readiness(self) -> Response:
        """GET /readyz: 200 once every encoder (and the index, if any) answers, else 503."""

        async def probe(name: str, call: Any) -> tuple[str, bool]:
            try:
                await asyncio.wait_for(call, timeout=5)
                return name, True
            except Exception:
                return name, False

        # An encoder allowed to scale to zero has no replica to answer while idle: it is never
        # probed (a probe is a request, and a request starts a replica) and never gates
        # readiness (that would keep traffic, and so the scale-up, away forever). Its entry
        # says whether Serve reports a running replica.
        optional = {m for m in self.encoders if self.args.encoder_options(m).min_replicas == 0}
        # Encoders still loading their model are not ready; a probe would wait its 5 s.
        self._ensure_start_watch()
        starting = set(self.starting())
        probes = [
            probe(f"encoder-{m}", h.ready.remote())
            for m, h in self.encoders.items()
            if m not in optional and f"encoder-{m}" not in starting
        ]
        if self.search_index is not None:
            probes.append(probe("search", self.search_index.info.remote()))
        states = dict(await asyncio.gather(*probes))
        states.update(dict.fromkeys(starting, False))
        ready = all(states.values())
        for m in optional:
            states[f"encoder-{m}"] = bool(self.running_replicas(f"encoder-{m}"))
        body = {"ready": ready, "deployments": states}
        return JSONResponse(body, status_code=200 if ready else 503)

    def node_metrics_url(self) -> str:
        """The Prometheus endpoint of Ray's metrics agent on this replica's node (blocking: a
        call to Ray's GCS the first time, cached)."""
        if self._metrics_url is None:
            import ray

            node_id = ray.get_runtime_context().get_node_id()
            node = next((n for n in ray.nodes() if n["NodeID"] == node_id), None)
            if node is None:
                raise LookupError(f"node {node_id} is not in Ray's node table")
            host, port = node["NodeManagerAddress"], node["MetricsExportPort"]
            self._metrics_url = f"http://{host}:{port}/metrics"
        return self._metrics_url

    async def metrics(self, request: Request) -> Response:
        """GET /metrics: the Prometheus text of Ray's metrics agent on the node of the ingress
        replica that answers (the same text as its `--metrics-export-port`)."""
        self.check_auth(request)
        url = "Ray's node table"
        try:
            url = await asyncio.to_thread(self.node_metrics_url)
            body = await asyncio.to_thread(_http_get, url, 10.0)
        except (OSError, LookupError) as e:
            raise APIError(
                503,
                f"Ray's metrics endpoint on this node ({url}) did not answer: {e!r}",
                type="server_error",
                code="metrics_unavailable",
                headers=self.retry_after_header,
            ) from None
        return Response(body, media_type=PROMETHEUS_TEXT)

    def _observe(self, route: str, kind: str, status: int, t0: float) -> None:
        tags = {"route": route, "modality": kind}
        self._m_requests.inc(tags={**tags, "status": str(status)})
        self._m_latency.observe(time.perf_counter() - t0, tags=tags)


def media_type(item: dict) -> str:
    """The Content-Type of a published item's bytes: guessed from its URI when that agrees
    with its modality (`image/png` for a vision item), else a generic one of the modality."""
    import mimetypes

    kind = item["modality"]
    if kind == "text":
        return "text/plain; charset=utf-8"
    guessed, _ = mimetypes.guess_type(item["uri"])
    family = _MEDIA_TYPES.get(kind)
    if guessed and family and guessed.startswith(family) and guessed != "image/svg+xml":
        return guessed
    return "application/octet-stream"


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


def _http_get(url: str, timeout_s: float) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout_s) as r:
        return r.read()


def _encode_vector(v: np.ndarray, fmt: str) -> np.ndarray | str:
    """float: a float32 array (a JSON list in `_json_response`); base64: little-endian float32
    bytes, as OpenAI sends them."""
    if fmt == "base64":
        return base64.b64encode(np.asarray(v, dtype="<f4").tobytes()).decode("ascii")
    return np.ascontiguousarray(v, dtype=np.float32)


def _json_response(content: Any, status_code: int = 200, headers: dict | None = None) -> Response:
    """JSON with numpy arrays written by orjson: float32 values in their shortest exact form
    (~11 characters instead of the ~19 of `json.dumps` on Python floats), 0.02 ms instead of
    0.5 ms for one 1024-d vector; a client parsing them back to float32 gets the same bits."""
    body = orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)
    return Response(body, status_code=status_code, headers=headers, media_type="application/json")


# --- FastAPI wiring --------------------------------------------------------------------------

api = FastAPI(
    title="imagebind-ray",
    description="ImageBind embeddings for six modalities; OpenAI-compatible for text.",
    redirect_slashes=False,  # `/v1/embeddings/` is a 404 in the error shape, not a redirect
    # FastAPI's own /docs, /redoc and /openapi.json answer everyone: ours (on `Ingress`) ask
    # for the API key like every other route when one is set.
    docs_url=None,
    redoc_url=None,
    openapi_url=None,
)
OPENAPI_PATH = "/openapi.json"


@api.exception_handler(APIError)
async def _api_error(_: Request, e: APIError) -> Response:
    return e.response()


@api.exception_handler(RequestValidationError)
async def _request_invalid(_: Request, e: RequestValidationError) -> Response:
    err = e.errors()[0] if e.errors() else {}
    loc = ".".join(str(p) for p in err.get("loc", ()))
    return APIError(
        400, f"{loc}: {err.get('msg', 'invalid request')}", code="invalid_request"
    ).response()


_ROUTING_CODES = {404: "not_found", 405: "method_not_allowed"}


def _under_root(request: Request, path: str) -> str:
    """`path` under the app's route prefix (what the browser must ask for)."""
    return request.scope.get("root_path", "").rstrip("/") + path


@api.exception_handler(StarletteHTTPException)
async def _routing_error(request: Request, e: StarletteHTTPException) -> Response:
    # Unknown paths and wrong methods, in the same error shape as everything else.
    if e.status_code == 404:
        msg = f"no route {request.url.path!r}; see GET /v1/models and the API docs"
    elif e.status_code == 405:
        msg = f"{request.method} is not allowed on {request.url.path!r}"
    else:
        msg = str(e.detail)
    err = APIError(e.status_code, msg, code=_ROUTING_CODES.get(e.status_code))
    err.headers.update(e.headers or {})
    return err.response()


def ui_file(name: str) -> Response:
    """One of the page's files (`UI_FILES`), else 404."""
    if name not in UI_FILES:
        raise APIError(404, f"no file {name!r} in the search page", code="not_found")
    with open(os.path.join(UI_DIR, name), "rb") as f:
        return Response(f.read(), media_type=UI_FILES[name], headers=UI_HEADERS)


@serve.deployment(ray_actor_options={"num_cpus": 0.25})
@serve.ingress(api)
class Ingress:
    """Serve deployment `ingress`: the FastAPI app above around an `EmbeddingService`."""

    def __init__(
        self,
        args: dict[str, Any],
        encoders: dict[str, Any],
        search: Any | None = None,
    ) -> None:
        self.service = EmbeddingService(AppArgs.model_validate(args), encoders, search)
        self.service.app_name = serve.get_replica_context().app_name
        self.service.track_startup()
        # Replica counts for /readyz, /v1/status and the gauges, refreshed off the event loop.
        self._stop = threading.Event()
        threading.Thread(target=self._poll_status, name="serve-status", daemon=True).start()

    def _poll_status(self) -> None:
        interval = self.service.args.status_interval_s
        while True:
            try:
                self.service.refresh_status()
            except Exception as e:  # the controller restarting: keep the last snapshot
                log.debug("serve status unavailable: %s", e)
            if self._stop.wait(interval):
                return

    def __del__(self) -> None:
        self._stop.set()

    @api.post("/v1/embeddings")
    async def embeddings(self, request: Request) -> Response:
        """Embed inputs of one modality (OpenAI-compatible for text)."""
        return await self.service.embeddings(request)

    @api.post("/v1/search")
    async def search(self, request: Request) -> Response:
        """Nearest neighbours of a query in the configured index."""
        return await self.service.search(request)

    @api.get("/v1/index")
    async def index(self, request: Request) -> Response:
        """The published index version this endpoint searches, with its counts."""
        return await self.service.index_info(request)

    @api.get("/v1/media")
    async def media(self, request: Request, id: str | None = None) -> Response:
        """The bytes of an item of the published index (allow-listed URIs only)."""
        return await self.service.media(request, id)

    @api.get("/v1/thumbnail")
    async def thumbnail(self, request: Request, id: str | None = None, size: int = 256) -> Response:
        """A JPEG thumbnail of an image or video item of the published index."""
        return await self.service.thumbnail(request, id, size)

    @api.get("/", include_in_schema=False)
    async def root(self, request: Request) -> Response:
        """The search page."""
        return RedirectResponse(_under_root(request, "/ui/"), status_code=307)

    @api.get("/ui", include_in_schema=False)
    async def ui_bare(self, request: Request) -> Response:
        """The search page (its relative links need the trailing slash)."""
        return RedirectResponse(_under_root(request, "/ui/"), status_code=307)

    @api.get("/ui/", include_in_schema=False)
    async def ui_index(self) -> Response:
        """The search page (no key needed: it holds no data and asks for the key itself)."""
        return ui_file("index.html")

    @api.get("/ui/{name}", include_in_schema=False)
    async def ui_asset(self, name: str) -> Response:
        """The search page's script, style and placeholder image."""
        return ui_file(name)

    @api.get("/v1/models")
    async def models(self, request: Request) -> Response:
        """The served model."""
        return await self.service.models(request)

    @api.get("/v1/status")
    async def status(self, request: Request) -> Response:
        """Replicas and queues per deployment: the autoscaling as it happens."""
        return await self.service.status(request)

    @api.get("/metrics", include_in_schema=False)
    async def metrics(self, request: Request) -> Response:
        """Prometheus metrics of this node (auth like `/v1/*`)."""
        return await self.service.metrics(request)

    @api.get("/v1/models/{model}")
    async def model(self, request: Request, model: str) -> Response:
        """One model by id (404 if not served)."""
        return await self.service.model(request, model)

    @api.get(OPENAPI_PATH, include_in_schema=False)
    async def openapi(self, request: Request) -> Response:
        """The OpenAPI schema (the API key is required when one is set)."""
        self.service.check_auth(request)
        return JSONResponse(api.openapi())

    @api.get("/docs", include_in_schema=False)
    async def docs(self, request: Request) -> Response:
        """Swagger UI (the API key is required when one is set)."""
        self.service.check_auth(request)
        return get_swagger_ui_html(openapi_url=_under_root(request, OPENAPI_PATH), title=api.title)

    @api.get("/redoc", include_in_schema=False)
    async def redoc(self, request: Request) -> Response:
        """ReDoc (the API key is required when one is set)."""
        self.service.check_auth(request)
        return get_redoc_html(openapi_url=_under_root(request, OPENAPI_PATH), title=api.title)

    @api.api_route("/healthz", methods=["GET", "HEAD"])
    async def healthz(self) -> Response:
        """Liveness: the ingress answers."""
        return JSONResponse({"status": "ok"})

    @api.api_route("/readyz", methods=["GET", "HEAD"])
    async def readyz(self) -> Response:
        """Readiness: every encoder has loaded its weights and answers."""
        return await self.service.readiness()
