"""HTTP ingress: the routes, and the transport of preprocessed inputs to the encoders.

The ingress owns no model. It holds one `DeploymentHandle` per model modality and turns each
request into chunks of at most the encoder's `max_batch_size` preprocessed inputs. Decoding and
preprocessing (`serve.inputs`) run on a thread pool here, so they overlap with the encoders'
batches instead of stalling them. Errors, auth, the body and its deadline are `serve.http`'s.
"""

# No `from __future__ import annotations`: FastAPI must see `Request` itself on the route
# methods that `serve.ingress` rewraps, or it takes `request` for a query parameter.
import asyncio
import contextlib
import dataclasses
import logging
import threading
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import JSONResponse, RedirectResponse, Response
from ray import serve
from ray.serve import metrics
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

import imagebind_core as ibc
from imagebind_core._lazy import broken
from serve.encoder import EncodeCall, seconds_histogram
from serve.http import (
    CLIENT_CLOSED,
    APIError,
    RequestPolicy,
    check_query,
    encode_vector,
    json_response,
    retry_after,
)
from serve.inputs import Inputs
from serve.media import SearchPage, ui_file
from serve.options import AppArgs
from serve.schemas import (
    ALL_KINDS,
    EmbeddingRequest,
    EmbeddingResponse,
    ModelCard,
    ModelList,
    SearchHit,
    SearchRequest,
    SearchResponse,
)
from serve.status import ScalingStatus, Startup

log = logging.getLogger(__name__)

# Encoder calls up to this many bytes of input go over Serve's gRPC transport, larger ones
# through the object store (see `EmbeddingService._call_encoder`).
GRPC_MAX_BYTES = 512 * 1024
# Prometheus' text exposition format, as Ray's metrics agent serves it.
PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"


def chunk_bounds(n: int, size: int) -> list[tuple[int, int]]:
    """[(start, stop)] splitting n inputs into ceil(n/size) chunks of at most `size`."""
    return [(i, min(i + size, n)) for i in range(0, n, size)] if n else []


@dataclasses.dataclass
class Observed:
    """The tags of one request's metrics, filled in as the route learns them."""

    kind: str = "unknown"
    status: int = 500
    t0: float = dataclasses.field(default_factory=time.perf_counter)


class RequestMetrics:
    """Requests by route, modality and status; their latency; inputs received."""

    def __init__(self) -> None:
        self.requests = metrics.Counter(
            "imagebind_requests",
            description="HTTP requests by route, modality and status code.",
            tag_keys=("route", "modality", "status"),
        )
        self.inputs = metrics.Counter(
            "imagebind_inputs", description="Inputs received.", tag_keys=("modality",)
        )
        self.latency = seconds_histogram(
            "imagebind_request_seconds",
            "Request latency inside the ingress.",
            ("route", "modality"),
        )

    @contextlib.asynccontextmanager
    async def observed(self, route: str) -> AsyncIterator[Observed]:
        """Count the request and its latency once it is answered: an APIError's status, 499
        when the client went away, 500 for anything else the block raises."""
        seen = Observed()
        try:
            yield seen
        except APIError as e:
            seen.status = e.status
            raise
        except (ClientDisconnect, asyncio.CancelledError):
            seen.status = CLIENT_CLOSED  # the client went away: not a server error
            raise
        finally:
            tags = {"route": route, "modality": seen.kind}
            self.requests.inc(tags={**tags, "status": str(seen.status)})
            self.latency.observe(time.perf_counter() - seen.t0, tags=tags)


class IndexClient:
    """Calls to the `search` deployment, its refusals as API errors.

    Args:
        handle: the deployment's handle, or None when the app has no index (every call 404).
        retry_after_header: the `Retry-After` header of a 503.
    """

    def __init__(self, handle: Any | None, retry_after_header: dict[str, str]) -> None:
        self.handle = handle
        self.retry_after_header = retry_after_header

    def need(self) -> None:
        """404 when the app was started without an index."""
        if self.handle is None:
            raise APIError(
                404,
                "search is not enabled: this app was started without `index_uri`",
                code="search_disabled",
            )

    async def call(
        self, method: str, *args: Any, param: str | None = None, code: str = "invalid_request"
    ) -> Any:
        """`handle.<method>.remote(*args)`, its refusals as API errors: no version
        published yet -> 503, an id the version lacks (KeyError) -> 404, a bad query
        (ValueError, e.g. imagebind_core.InvalidInput) -> 400 naming `param`, with `code`."""
        from ray.exceptions import RayTaskError

        from serve.search import IndexNotReady

        try:
            return await getattr(self.handle, method).remote(*args)
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
                raise APIError(400, f"search: {cause}", param=param, code=code) from None
            raise


class EmbeddingService:
    """The request logic of the ingress, independent of FastAPI routing and Serve.

    Holds the request policy (`policy`: auth, body, deadline), the input decoder (`inputs`),
    what it knows of the deployments (`scaling`, `startup`), the handles it calls (`encoders`,
    `index`) and the search page's media routes (`page`).

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
        self.model_id = args.served_model()
        self.kinds = list(args.modalities)
        self.created = int(time.time())
        self.policy = RequestPolicy(args)
        self.retry_after_header = self.policy.retry_after_header
        pool = ThreadPoolExecutor(
            max_workers=args.ingress.preprocess_threads, thread_name_prefix="preprocess"
        )
        self.inputs = Inputs(args, pool)
        self.encoders = dict(encoders)
        # Serve's gRPC transport for small calls: see `_call_encoder`.
        self._encoders_grpc = {m: h.options(_by_reference=False) for m, h in self.encoders.items()}
        self.search_index = search
        self.index = IndexClient(search, self.retry_after_header)
        self.page = SearchPage(args, self.policy, self.inputs, self.index)
        self.scaling = ScalingStatus(args, list(self.encoders))
        self.startup = Startup(args, self.encoders, self._remember_info)
        self.request_metrics = RequestMetrics()
        self._info: dict[str, Any] | None = None
        self._metrics_url: str | None = None

    def _remember_info(self, info: dict[str, Any]) -> None:
        if self._info is None:
            self._info = info

    # --- checks ------------------------------------------------------------------------------
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

    def check_inputs(self, req: EmbeddingRequest) -> list[str]:
        """The request's inputs: 400 for a `dimensions` other than the model's, none, or more
        than `max_inputs`."""
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
                f"{len(inputs)} inputs is over the limit of {self.args.max_inputs} per request",
                param="input",
                code="too_many_inputs",
            )
        return inputs

    def embed_dim(self) -> int:
        """Size of the served embeddings (from the preset: known before any encoder answers)."""
        return int(ibc.get_config(self.args.preset).out_embed_dim)

    # --- transport ---------------------------------------------------------------------------
    async def encode(
        self,
        kind: str,
        arrays: list[np.ndarray],
        normalize: bool,
        param: Callable[[int], str] = "input[{}]".format,
    ) -> np.ndarray:
        """(n, ...) preprocessed inputs -> (n, D), in chunks of the encoder's max_batch_size.

        An input whose vector comes back non-finite (its values overflow the model's
        arithmetic) is a 422 naming it (`param(i)`): never a vector of NaN, never a 500."""
        out = await self._encode_chunks(kind, arrays, normalize)
        bad = ibc.non_finite_rows(out)
        if bad:
            name = param(bad[0])
            reason = ibc.overflow_reason(await self._encoder_dtype(kind))
            raise APIError(
                422,
                f"{name}: invalid {kind} input: {reason}",
                param=name,
                code="input_overflow",
            )
        return out

    async def _encoder_dtype(self, kind: str) -> str | None:
        """The compute dtype of `kind`'s encoder as its replica reports it (None if unknown)."""
        try:
            handle = self.encoders[str(ibc.model_modality(kind))]
            info = await asyncio.wait_for(handle.ready.remote(), timeout=5)
            return info.get("lineage", {}).get("dtype")
        except Exception:
            return None

    async def _encode_chunks(
        self, kind: str, arrays: list[np.ndarray], normalize: bool
    ) -> np.ndarray:
        m = str(ibc.model_modality(kind))
        size = self.args.encoder_options(m).max_batch_size
        calls = [
            EncodeCall(np.stack(arrays[s:e]), normalize) for s, e in chunk_bounds(len(arrays), size)
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
        (gRPC's is 4 MiB here). `benchmarks/bench_serve_transport.py` measures both per hop.
        """
        from grpc.aio import AioRpcError
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
        from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

        small = call.x.nbytes <= GRPC_MAX_BYTES
        handle = (self._encoders_grpc if small else self.encoders)[modality]
        for attempt in range(2):
            call.sent_at = time.time()
            try:
                resp = handle.embed.remote(call)
                await self._wait_for_replica(modality, resp)
                self.scaling.ongoing[modality] += 1
                try:
                    return await resp
                finally:
                    self.scaling.ongoing[modality] -= 1
            except BackPressureError:
                raise self._encoder_refused(modality, "is overloaded", "overloaded") from None
            except DeploymentUnavailableError:
                raise self._encoder_refused(modality, "is unavailable", "unavailable") from None
            except (ActorDiedError, ActorUnavailableError, RayActorError, AioRpcError) as e:
                # AioRpcError: the gRPC channel to a replica that died (Serve maps only
                # UNAVAILABLE to ActorUnavailableError)
                if attempt == 0:
                    log.warning("encoder-%s replica failed (%s); retrying once", modality, e)
                    continue
                raise self._encoder_refused(modality, "replica failed", "replica_failed") from None
        raise AssertionError("unreachable")

    def _encoder_refused(self, modality: str, what: str, code: str) -> APIError:
        # Retry-After may be 0 here: the caller may retry at once (another replica, or the
        # same one after its restart).
        return APIError(
            503,
            f"encoder-{modality} {what}; retry later",
            type="server_error",
            code=code,
            headers=retry_after(self.args.retry_after_s, floor=0),
        )

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
        self.scaling.waiting[modality] += 1
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
            self.scaling.waiting[modality] -= 1

    # --- routes: embeddings and search -------------------------------------------------------
    async def embeddings(self, request: Request) -> Response:
        """POST /v1/embeddings."""
        async with self.request_metrics.observed("embeddings") as seen:
            self.policy.check_auth(request)
            async with self.policy.json_request(request, EmbeddingRequest) as req:
                self.check_model(req.model)
                kind = seen.kind = self.check_kind(req.modality)
                await self.startup.check_started(kind)
                inputs = self.check_inputs(req)
                self.request_metrics.inputs.inc(len(inputs), tags={"modality": kind})
                async with self.inputs.held(kind, len(inputs)):
                    arrays, tokens = await self.inputs.prepare_all(kind, inputs)
                    t_enc = time.perf_counter()
                    vectors = await self.encode(kind, arrays, req.normalize)
                    t_enc = time.perf_counter() - t_enc
                    del arrays
            body = self._embedding_body(vectors, req.encoding_format, tokens)
            seen.status = 200
            # Like OpenAI's `openai-processing-ms`: time spent inside the ingress, and the part
            # of it waiting for the encoders (queue + batch + model).
            headers = {
                "x-processing-ms": f"{1000 * (time.perf_counter() - seen.t0):.1f}",
                "x-encode-ms": f"{1000 * t_enc:.1f}",
            }
            return json_response(body, headers=headers)

    def _embedding_body(self, vectors: np.ndarray, fmt: str, tokens: int) -> dict[str, Any]:
        """`EmbeddingResponse`'s shape, built as a dict: the vectors stay float32 arrays for
        `json_response` (pydantic would validate and copy each of 1024 floats). `encode` has
        refused non-finite vectors (orjson would write NaN as a JSON null)."""
        data = [
            {"object": "embedding", "index": i, "embedding": encode_vector(v, fmt)}
            for i, v in enumerate(vectors)
        ]
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        return {"object": "list", "data": data, "model": self.model_id, "usage": usage}

    async def search(self, request: Request) -> Response:
        """POST /v1/search: embed the query (or take a vector) and ask the index."""
        async with self.request_metrics.observed("search") as seen:
            self.policy.check_auth(request)
            self.index.need()
            async with self.policy.json_request(request, SearchRequest) as req:
                self.check_model(req.model)
                if req.filter_modality is not None and req.filter_modality not in ALL_KINDS:
                    raise APIError(
                        400,
                        f"unknown filter_modality {req.filter_modality!r}",
                        param="filter_modality",
                        code="unknown_modality",
                    )
                if req.id is not None:
                    seen.kind = "id"
                    hits = await self.index.call(
                        "similar", req.id, req.top_k, req.filter_modality, param="id"
                    )
                else:
                    if req.vector is not None:
                        seen.kind = "vector"
                        vector = [float(v) for v in req.vector]
                    else:
                        seen.kind = self.check_kind(req.modality)
                        vector = await self._query_vector(seen.kind, req.input or "")
                    hits = await self.index.call(
                        "search",
                        vector,
                        req.top_k,
                        req.filter_modality,
                        param="vector",
                        code="invalid_vector",
                    )
            resp = SearchResponse(data=[SearchHit(**h) for h in hits], model=self.model_id)
            seen.status = 200
            return JSONResponse(resp.model_dump())

    async def _query_vector(self, kind: str, query: str) -> list[float]:
        """The unit-length embedding of one query input."""
        await self.startup.check_started(kind)
        async with self.inputs.held(kind, 1):
            arrays, _ = await self.inputs.prepare_all(kind, [query])
            return (await self.encode(kind, arrays, True, lambda _: "input"))[0].tolist()

    # --- routes: models, status, readiness, metrics ------------------------------------------
    async def models(self, request: Request) -> Response:
        """GET /v1/models."""
        self.policy.check_auth(request)
        return JSONResponse(ModelList(data=[await self._card()]).model_dump())

    async def model(self, request: Request, model: str) -> Response:
        """GET /v1/models/{model}."""
        self.policy.check_auth(request)
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
                    or self.scaling.running_replicas(f"encoder-{m}")
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

    async def status(self, request: Request) -> Response:
        """GET /v1/status: per deployment, replicas by state, the autoscaling range, and the
        chunks this ingress replica waits to hand over / has handed over."""
        self.policy.check_auth(request)
        if self.scaling.stale():
            try:
                await asyncio.to_thread(self.scaling.refresh)
            except Exception as e:  # the controller is busy or restarting: say so, no 500
                raise APIError(
                    503,
                    f"Serve's status is unavailable ({type(e).__name__}); retry later",
                    type="server_error",
                    code="status_unavailable",
                    headers=self.retry_after_header,
                ) from None
        return JSONResponse(self.scaling.report())

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
        self.startup.ensure_watch()
        starting = set(self.startup.starting())
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
            states[f"encoder-{m}"] = bool(self.scaling.running_replicas(f"encoder-{m}"))
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
        self.policy.check_auth(request)
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


def _http_get(url: str, timeout_s: float) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout_s) as r:
        return r.read()


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


_PARAMETER_PLACES = ("query", "path", "header", "cookie")


@api.exception_handler(RequestValidationError)
async def _request_invalid(_: Request, e: RequestValidationError) -> Response:
    # A query, path or header parameter FastAPI could not parse (`?size=abc`): `param` names
    # the parameter itself, and the message says where it was and what was sent.
    err = e.errors()[0] if e.errors() else {}
    loc = [str(p) for p in err.get("loc", ())]
    where = loc.pop(0) if len(loc) > 1 and loc[0] in _PARAMETER_PLACES else None
    param = ".".join(loc) or None
    msg = err.get("msg", "invalid request")
    if where is not None and err.get("type") == "missing":
        msg = f"{msg} ({where} parameter)"
    elif where is not None:
        msg = f"{msg} ({where} parameter, got {err.get('input')!r})"
    return APIError(
        400, f"{param}: {msg}" if param else msg, param=param, code="invalid_request"
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


def _documented(request: type, response: type) -> dict[str, Any]:
    """OpenAPI for a route that reads its JSON body itself (`RequestPolicy.json_request`: the
    body limit, deadline and error shape stay ours): the pydantic models it validates with as
    the request body and the 200 response, and the error shape."""
    return {
        "openapi_extra": {
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": request.model_json_schema()}},
            }
        },
        "responses": {
            200: {"model": response, "description": "Success"},
            400: {"description": 'Bad request: `{"error": {message, type, param, code}}`'},
        },
    }


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
        self.service.scaling.app_name = serve.get_replica_context().app_name
        self.service.startup.track()
        # Replica counts for /readyz, /v1/status and the gauges, refreshed off the event loop.
        self._stop = threading.Event()
        threading.Thread(target=self._poll_status, name="serve-status", daemon=True).start()

    def _poll_status(self) -> None:
        interval = self.service.args.status_interval_s
        while True:
            try:
                self.service.scaling.refresh()
            except Exception as e:  # the controller restarting: keep the last snapshot
                log.debug("serve status unavailable: %s", e)
            if self._stop.wait(interval):
                return

    def __del__(self) -> None:
        self._stop.set()

    def check_health(self) -> None:
        """Serve's periodic health check: a replica that can no longer preprocess (an import
        interrupted part way, `imagebind_core.WorkerBroken`) fails it and is replaced."""
        reason = broken()
        if reason is not None:
            raise RuntimeError(reason)

    @api.post("/v1/embeddings", **_documented(EmbeddingRequest, EmbeddingResponse))
    async def embeddings(self, request: Request) -> Response:
        """Embed inputs of one modality (OpenAI-compatible for text)."""
        return await self.service.embeddings(request)

    @api.post("/v1/search", **_documented(SearchRequest, SearchResponse))
    async def search(self, request: Request) -> Response:
        """Nearest neighbours of a query in the configured index."""
        return await self.service.search(request)

    @api.get("/v1/index")
    async def index(self, request: Request) -> Response:
        """The published index version this endpoint searches, with its counts."""
        return await self.service.page.index_info(request)

    @api.get("/v1/media")
    async def media(self, request: Request, id: str | None = None) -> Response:
        """The bytes of an item of the published index (allow-listed URIs only)."""
        check_query(request, ("id",))
        return await self.service.page.media(request, id)

    @api.get("/v1/thumbnail")
    async def thumbnail(self, request: Request, id: str | None = None, size: int = 256) -> Response:
        """A JPEG thumbnail of an image or video item of the published index."""
        check_query(request, ("id", "size"), whole=("size",))
        return await self.service.page.thumbnail(request, id, size)

    @api.get("/", include_in_schema=False)
    @api.get("/ui", include_in_schema=False)
    async def root(self, request: Request) -> Response:
        """The search page (at `/ui/`: its relative links need the trailing slash)."""
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
        self.service.policy.check_auth(request)
        return JSONResponse(api.openapi())

    @api.get("/docs", include_in_schema=False)
    async def docs(self, request: Request) -> Response:
        """Swagger UI (the API key is required when one is set)."""
        return self._docs_page(request, get_swagger_ui_html)

    @api.get("/redoc", include_in_schema=False)
    async def redoc(self, request: Request) -> Response:
        """ReDoc (the API key is required when one is set)."""
        return self._docs_page(request, get_redoc_html)

    def _docs_page(self, request: Request, render: Any) -> Response:
        self.service.policy.check_auth(request)
        return render(openapi_url=_under_root(request, OPENAPI_PATH), title=api.title)

    # HEAD on its own route, out of the schema: one route with both methods gives both the
    # same OpenAPI operation id (FastAPI warns "Duplicate Operation ID").
    @api.head("/healthz", include_in_schema=False)
    @api.get("/healthz")
    async def healthz(self) -> Response:
        """Liveness: the ingress answers."""
        return JSONResponse({"status": "ok"})

    @api.head("/readyz", include_in_schema=False)
    @api.get("/readyz")
    async def readyz(self) -> Response:
        """Readiness: every encoder has loaded its weights and answers."""
        return await self.service.readiness()
