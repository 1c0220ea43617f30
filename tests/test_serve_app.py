"""The Serve app over real HTTP: local Ray, the TINY preset, two apps started once per module.

App "a" serves all seven kinds without auth (limits small enough to hit); app "b" serves text
only, behind a bearer token, with queues of one so that a burst overflows them. Every answer
is compared with `imagebind_core` called directly in this process (same preset and seed).
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import socket
import time

import httpx
import media
import numpy as np
import pytest
from helpers.serve import serve_base_url, wait_ready
from numerics import assert_embeddings_close

from imagebind_core.preprocess.common import DEFAULT_LIMITS

PREFIX_A = "/t5a"
PREFIX_B = "/t5b"
PREFIX_C = "/t5c"
API_KEY = "s3cret-token"
BUCKET = "serve-test"
KINDS = ("text", "vision", "video", "audio", "depth", "thermal", "imu")


def make_input(kind: str, seed: int = 0) -> bytes | str:
    """One small input of `kind` (text as str, media as encoded file bytes)."""
    if kind == "text":
        return f"a photo of thing number {seed}"
    if kind == "vision":
        return media.make_image(size=(96, 80), seed=seed)
    if kind == "video":
        return media.make_video(seconds=1.0 + 0.5 * seed, size=(64, 48))
    if kind == "audio":
        return media.make_wav(seconds=2.0, seed=seed)
    if kind == "depth":
        return media.make_depth_png(size=(96, 80), seed=seed)
    if kind == "thermal":
        return media.make_gray_png(size=(96, 80), bits=8, seed=seed)
    if kind == "imu":
        return media.make_imu_npy(seed=seed)
    raise ValueError(kind)


def wire(x: bytes | str) -> str:
    """How an input travels in JSON: text as is, media as base64."""
    return x if isinstance(x, str) else base64.b64encode(x).decode()


@pytest.fixture(scope="module")
def direct():
    """`embed(kind, inputs, normalize)` with imagebind_core in this process: the reference."""
    import imagebind_core as ibc
    from imagebind_core.preprocess import collate, model_modality, preprocess

    models: dict[str, object] = {}

    def embed(kind: str, inputs: list, normalize: bool = True) -> np.ndarray:
        m = str(model_modality(kind))
        if m not in models:
            models[m] = ibc.load_model(None, preset="tiny", modalities=[m], seed=0)
        x = collate([preprocess(kind, d) for d in inputs])
        return models[m].encode(m, x, normalize=normalize).numpy()

    return embed


@pytest.fixture(scope="module")
def apps(ray_session, s3_server):
    """Deploy apps a and b once; yield their base URLs; delete them afterwards."""
    from ray import serve

    from serve.app import build_app
    from serve.options import AppArgs

    s3_server.create_bucket(BUCKET)
    base = serve_base_url()
    small = {"num_cpus": 0.1, "health_check_period_s": 1.0}
    args_a = AppArgs(
        preset="tiny",
        encoder={**small, "max_batch_size": 4, "max_ongoing_requests": 8},
        ingress={"num_cpus": 0.1, "preprocess_threads": 2},
        max_inputs=8,
        max_body_bytes=2_000_000,
        s3_allowed_prefixes=[f"s3://{BUCKET}/allowed"],
        s3_endpoint_url=s3_server.endpoint_url,
        s3_region=s3_server.region,
    )
    args_b = AppArgs(
        preset="tiny",
        modalities=["text"],
        model_name="guarded",
        api_key=API_KEY,
        encoder={
            **small,
            "max_batch_size": 1,
            "max_ongoing_requests": 1,
            "max_queued_requests": 1,
        },
        ingress={"num_cpus": 0.1},
        retry_after_s=2,
    )
    # App c: the ingress itself bounded (one request at a time, one queued): the proxy answers
    # the overflow before any replica sees it.
    args_c = AppArgs(
        preset="tiny",
        modalities=["text"],
        encoder=small,
        ingress={"num_cpus": 0.1, "max_ongoing_requests": 1, "max_queued_requests": 1},
        retry_after_s=3,
    )
    serve.run(build_app(args_a), name="t5a", route_prefix=PREFIX_A, blocking=False)
    serve.run(build_app(args_b), name="t5b", route_prefix=PREFIX_B, blocking=False)
    serve.run(build_app(args_c), name="t5c", route_prefix=PREFIX_C, blocking=False)
    urls = {"a": base + PREFIX_A, "b": base + PREFIX_B, "c": base + PREFIX_C}
    wait_ready(urls["a"])
    yield urls
    serve.delete("t5a")
    serve.delete("t5b")
    serve.delete("t5c")


@pytest.fixture(scope="module")
def client(apps):
    with httpx.Client(base_url=apps["a"], timeout=120) as c:
        yield c


def embed(client: httpx.Client, inputs, kind: str = "text", **extra) -> httpx.Response:
    body = {"input": inputs, "modality": kind, **extra}
    return client.post("/v1/embeddings", json=body)


def vectors(resp: httpx.Response) -> np.ndarray:
    from serve.schemas import EmbeddingResponse

    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"] == "application/json"
    EmbeddingResponse.model_validate(resp.json())  # the documented response schema
    data = resp.json()["data"]
    assert [d["index"] for d in data] == list(range(len(data)))
    return np.array([d["embedding"] for d in data], dtype=np.float32)


def error(resp: httpx.Response, status: int) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert err["message"]
    return err


# --------------------------------------------------------------------------- modalities


@pytest.mark.parametrize("kind", KINDS)
def test_each_modality_single_and_batched(client, direct, kind):
    items = [make_input(kind, seed) for seed in range(3)]
    single = vectors(embed(client, wire(items[0]), kind))
    assert_embeddings_close(single, direct(kind, items[:1]))
    np.testing.assert_allclose(np.linalg.norm(single, axis=1), 1.0, atol=1e-5)

    batched = vectors(embed(client, [wire(x) for x in items], kind))
    assert_embeddings_close(batched, direct(kind, items))
    assert not np.allclose(batched[0], batched[1])  # different inputs, different vectors


def test_raw_output_on_request(client, direct):
    items = ["raw one", "raw two"]
    raw = vectors(embed(client, items, normalize=False))
    assert_embeddings_close(raw, direct("text", items, normalize=False))
    # The reference scales text after normalising (logit scale): raw is not unit length.
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1.0, atol=1e-3)


def test_request_larger_than_a_batch_is_chunked_in_order(client, direct):
    texts = [f"text number {i}" for i in range(7)]  # max_batch_size 4 -> chunks of 4 + 3
    assert_embeddings_close(vectors(embed(client, texts)), direct("text", texts))


def test_base64_round_trip_and_data_uri(client, direct):
    png = make_input("vision", 1)
    plain = vectors(embed(client, wire(png), "vision"))
    resp = embed(client, wire(png), "vision", encoding_format="base64")
    assert resp.status_code == 200, resp.text
    b64 = resp.json()["data"][0]["embedding"]
    assert isinstance(b64, str)
    decoded = np.frombuffer(base64.b64decode(b64), dtype="<f4")
    np.testing.assert_array_equal(decoded, plain[0])
    uri = "data:image/png;base64," + wire(png)
    assert_embeddings_close(vectors(embed(client, uri, "vision")), plain)


def test_openai_client_text(apps, direct):
    import openai

    oa = openai.OpenAI(base_url=apps["a"] + "/v1", api_key="unused", max_retries=0)
    texts = ["a dog on a beach", "a red car"]
    out = oa.embeddings.create(model="imagebind-tiny", input=texts)  # base64 on the wire
    got = np.array([d.embedding for d in out.data], dtype=np.float32)
    assert_embeddings_close(got, direct("text", texts))
    assert out.model == "imagebind-tiny"
    assert out.usage.prompt_tokens > 2 * 2  # start + end token per text, plus words
    floats = oa.embeddings.create(
        model="imagebind-tiny", input="a red car", encoding_format="float"
    )
    assert_embeddings_close(floats.data[0].embedding, got[1])
    with pytest.raises(openai.NotFoundError):
        oa.embeddings.create(model="gpt-nothing", input="x")


def test_concurrent_requests_of_different_modalities(apps, direct):
    kinds = ["text", "vision", "audio", "imu", "depth", "thermal"] * 3
    items = {k: [make_input(k, s) for s in range(2)] for k in set(kinds)}
    expected = {k: direct(k, v) for k, v in items.items()}

    async def run() -> list[tuple[str, httpx.Response]]:
        async with httpx.AsyncClient(base_url=apps["a"], timeout=120) as ac:

            async def one(kind: str) -> tuple[str, httpx.Response]:
                body = {"input": [wire(x) for x in items[kind]], "modality": kind}
                return kind, await ac.post("/v1/embeddings", json=body)

            return await asyncio.gather(*(one(k) for k in kinds))

    for kind, resp in asyncio.run(run()):
        assert_embeddings_close(vectors(resp), expected[kind])


def test_prometheus_metrics(apps, client):
    """Per-modality counts, batch sizes, queue and compute time reach Ray's Prometheus export."""
    import ray

    node = ray.nodes()[0]
    url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
    want = [
        "ray_imagebind_requests_total{",
        "ray_imagebind_inputs_total{",
        "ray_imagebind_request_seconds_bucket{",
        "ray_imagebind_preprocess_seconds_bucket{",
        "ray_imagebind_encoder_items_total{",
        "ray_imagebind_encoder_batch_size_bucket{",
        "ray_imagebind_encoder_queue_seconds_bucket{",
        "ray_imagebind_encoder_compute_seconds_bucket{",
    ]
    assert embed(client, "count me").status_code == 200

    def missing_from(mine: list[str]) -> list[str]:
        out = [w for w in want if not any(ln.startswith(w) for ln in mine)]
        text_ok = [
            ln
            for ln in mine
            if ln.startswith("ray_imagebind_requests_total{")
            and 'modality="text"' in ln
            and 'status="200"' in ln
            and float(ln.rsplit(" ", 1)[1]) >= 1
        ]
        if not text_ok:
            out.append("text requests with status 200")
        if not any('modality="vision"' in ln for ln in mine if "encoder_batch_size" in ln):
            out.append("vision batch sizes")
        return out

    deadline = time.time() + 60  # each replica pushes its metrics every few seconds
    while True:
        lines = httpx.get(url, timeout=10).text.splitlines()
        mine = [ln for ln in lines if ln.startswith("ray_imagebind_")]
        missing = missing_from(mine)
        if not missing or time.time() > deadline:
            break
        time.sleep(2)
    assert not missing, (missing, mine[:20])


# --------------------------------------------------------------------------- object storage


def test_s3_inputs_only_under_allowed_prefixes(client, s3_server, direct):
    png = make_input("vision", 2)
    s3 = s3_server.client()
    s3.put_object(Bucket=BUCKET, Key="allowed/cat.png", Body=png)
    s3.put_object(Bucket=BUCKET, Key="private/cat.png", Body=png)
    s3.put_object(Bucket=BUCKET, Key="allowed-not/cat.png", Body=png)

    ok = vectors(embed(client, [f"s3://{BUCKET}/allowed/cat.png", wire(png)], "vision"))
    assert_embeddings_close(ok, direct("vision", [png, png]))

    # The same bytes exist at these URIs; refusal is by name (code uri_not_allowed), so nothing
    # was fetched: a fetch would have embedded them.
    for uri in (
        f"s3://{BUCKET}/private/cat.png",
        f"s3://{BUCKET}/allowed-not/cat.png",  # prefix is a folder, not a string prefix
        f"s3://{BUCKET}/allowed/../private/cat.png",
        "https://example.com/cat.png",
        "file:///etc/passwd",
    ):
        err = error(embed(client, [wire(png), uri], "vision"), 400)
        assert err["param"] == "input[1]" and err["code"] == "uri_not_allowed", (uri, err)

    err = error(embed(client, f"s3://{BUCKET}/allowed/missing.png", "vision"), 400)
    assert "not found" in err["message"] and err["param"] == "input[0]"


def test_s3_keys_with_double_colons_are_keys_not_url_chains(client, s3_server, direct):
    """fsspec reads `a::b` as a chain of URLs; here a URI is one object in one store."""
    from listener import Listener

    png = make_input("vision", 4)
    s3_server.client().put_object(Bucket=BUCKET, Key="allowed/a::b.png", Body=png)
    ok = vectors(embed(client, [f"s3://{BUCKET}/allowed/a::b.png"], "vision"))
    assert_embeddings_close(ok, direct("vision", [png]))

    other = Listener()  # the host a chained URL would read from
    try:
        uri = f"s3://{BUCKET}/allowed/a::http://127.0.0.1:{other.port}/cat.png"
        err = error(embed(client, [wire(png), uri], "vision"), 400)
        assert err["param"] == "input[1]" and "not found" in err["message"], err
        assert other.hits == []
    finally:
        other.close()


def test_a_request_of_many_inputs_does_not_hold_later_requests_behind_all_of_them():
    """The preprocessing pool is shared: a request queues at most `preprocess_threads` of its
    inputs at a time, so a later request's input starts after a few of the earlier request's,
    not after all of them."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from serve.inputs import Inputs
    from serve.options import AppArgs

    threads = 2
    args = AppArgs(preset="tiny", ingress={"preprocess_threads": threads})
    started: list[str] = []
    lock = threading.Lock()

    def prepare(kind, index, value):
        with lock:
            started.append(value)
        time.sleep(0.05)
        return np.zeros(1)

    with ThreadPoolExecutor(threads) as pool:
        inputs = Inputs(args, pool)
        inputs.prepare = prepare

        async def main():
            big = asyncio.create_task(inputs.prepare_all("vision", [f"a{i}" for i in range(20)]))
            await asyncio.sleep(0.01)  # the big request's first inputs are running
            small = await inputs.prepare_all("vision", ["b0"])
            return await big, small

        (big, _), (small, _) = asyncio.run(main())
    assert len(big) == 20 and len(small) == 1
    assert sorted(started) == sorted([f"a{i}" for i in range(20)] + ["b0"])
    assert started.index("b0") <= 2 * threads, started


def test_inputs_of_requests_past_their_deadline_are_never_preprocessed(ray_session):
    """Four requests of slow inputs, each past its `X-Request-Timeout` (504) while the pool
    still holds their queued inputs: those are withdrawn, never started, so a later request
    waits at most for the inputs already running, not for all the abandoned ones (counted,
    not timed)."""
    import json
    import threading

    from serve.http import APIError
    from serve.ingress import EmbeddingService
    from serve.options import AppArgs

    threads = 2
    svc = EmbeddingService(AppArgs(preset="tiny", ingress={"preprocess_threads": threads}), {})

    async def started(kind):
        return None

    svc.startup.check_started = started
    begun: list[str] = []
    lock = threading.Lock()

    def prepare(kind, index, value):
        with lock:
            begun.append(value)
        time.sleep(0.5)
        return np.zeros(1)

    svc.inputs.prepare = prepare

    def request(r: int):
        body = {"modality": "vision", "input": [f"r{r}i{i}" for i in range(4)]}
        req = _post("/v1/embeddings", json.dumps(body).encode())
        req.scope["headers"].append((b"x-request-timeout", b"0.2"))
        return req

    async def one(r: int) -> int:
        try:
            await svc.embeddings(request(r))
        except APIError as e:
            return e.status
        return 200

    async def main():
        return await asyncio.gather(*(one(r) for r in range(4)))

    assert asyncio.run(main()) == [504] * 4
    svc.inputs.pool.shutdown(wait=True)  # let whatever was started finish
    # Only the inputs that were running at the deadline (the pool's width) ever started.
    assert len(begun) <= threads, begun


def test_input_size_limit_is_on_the_decoded_bytes(ray_session):
    """`max_input_bytes` limits the bytes an input decodes to: line-wrapped base64 (MIME)
    under the limit is taken even when its characters with the line breaks are over, and an
    input one byte over is refused whatever its encoding."""
    from serve.http import APIError
    from serve.ingress import EmbeddingService
    from serve.options import AppArgs

    limit = 3000
    svc = EmbeddingService(AppArgs(preset="tiny", max_input_bytes=limit), {})
    load = svc.inputs.load_bytes
    for size in (limit - 1, limit):
        data = media.random_bytes(size)
        wrapped = base64.encodebytes(data).decode()  # 76-character lines
        assert len(wrapped) // 4 * 3 > limit + 3  # over by its characters alone
        assert load("vision", 0, wrapped) == data
        assert load("vision", 0, base64.b64encode(data).decode()) == data
    for size in (limit + 1, limit + 2, limit + 3, 2 * limit):
        data = media.random_bytes(size)
        for value in (
            base64.b64encode(data).decode(),
            base64.encodebytes(data).decode(),
            "data:image/png;base64," + base64.b64encode(data).decode(),
        ):
            with pytest.raises(APIError) as e:
                load("vision", 2, value)
            assert e.value.status == 400 and e.value.code == "too_large", size
            assert e.value.param == "input[2]" and f"limit of {limit} bytes" in e.value.message


def test_unreachable_object_store_is_503_naming_it(ray_session):
    from listener import closed_port

    from serve.http import APIError
    from serve.ingress import EmbeddingService
    from serve.options import AppArgs

    dead = f"http://127.0.0.1:{closed_port()}"
    args = AppArgs(
        preset="tiny",
        s3_allowed_prefixes=["s3://photos/ok"],
        s3_endpoint_url=dead,
        retry_after_s=4,
    )
    svc = EmbeddingService(args, {})
    with pytest.raises(APIError) as e:
        asyncio.run(svc.inputs.prepare_all("vision", ["s3://photos/ok/cat.png"]))
    err = e.value
    assert err.status == 503 and err.code == "store_unavailable" and err.param == "input[0]"
    assert dead in err.message and err.headers["Retry-After"] == "4"


def test_a_replica_that_cannot_import_its_decoders_is_503_and_unhealthy(ray_session):
    # An ingress replica whose decoder import was interrupted part way cannot preprocess any
    # more (imagebind_core.WorkerBroken): not the request's fault (503, retry), and its health
    # check fails so that Serve replaces it.
    from helpers.pipeline import break_imports, imports_restored

    from serve.http import APIError
    from serve.ingress import EmbeddingService, Ingress
    from serve.options import AppArgs

    svc = EmbeddingService(AppArgs(preset="tiny", retry_after_s=4), {})
    png = base64.b64encode(media.make_image()).decode()
    health = Ingress.func_or_class.check_health
    health(None)  # healthy
    for kind, module, value in (
        ("text", "imagebind_core.preprocess.text", "a caption"),
        ("vision", "imagebind_core.preprocess.image", png),
    ):
        with imports_restored(module):
            break_imports(module)
            with pytest.raises(APIError) as e:
                asyncio.run(svc.inputs.prepare_all(kind, [value]))
            err = e.value
            assert err.status == 503 and err.code == "replica_broken", (kind, err.message)
            assert err.param == "input[0]" and err.headers["Retry-After"] == "4"
            with pytest.raises(RuntimeError, match=f"cannot load {module}"):
                health(None)
    health(None)


# --------------------------------------------------------------------------- errors


def test_bad_inputs_are_400_naming_the_input(client):
    png = wire(make_input("vision"))
    err = error(embed(client, [png, "@@not base64@@"], "vision"), 400)
    assert err["param"] == "input[1]" and "base64" in err["message"]
    garbage = base64.b64encode(media.random_bytes(2048)).decode()
    err = error(embed(client, [png, png, garbage], "vision"), 400)
    assert err["param"] == "input[2]" and err["message"].startswith("input[2]: invalid vision")
    err = error(embed(client, [wire(make_input("vision"))], "audio"), 400)  # a PNG as audio
    assert err["param"] == "input[0]"
    # Texts are tokenised as one batch; the first bad one is named.
    long = "x" * (DEFAULT_LIMITS.max_text_chars + 1)
    err = error(embed(client, ["fine", long, long], "text"), 400)
    assert err["param"] == "input[1]" and err["message"].startswith("input[1]: invalid text")
    assert "over the limit" in err["message"]


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        ({"input": "x", "modality": "smell"}, 400, "unknown modality"),
        ({"input": "x", "model": "gpt-4"}, 404, "does not exist"),
        ({"input": []}, 400, "empty"),
        ({"input": [f"t{i}" for i in range(9)]}, 400, "over the limit of 8"),
        ({"input": "x", "modalty": "text"}, 400, "modalty"),
        ({"input": [1, 2, 3]}, 400, "list of strings"),
        ({"input": "x", "normalize": "yes"}, 400, "normalize"),
        ({"input": "x", "dimensions": "32"}, 400, "dimensions"),
        ({"input": "x", "encoding_format": "int8"}, 400, "encoding_format"),
        ({"input": "x", "dimensions": 7}, 400, "dimensions"),
        ({}, 400, "input"),
    ],
)
def test_request_errors(client, body, status, needle):
    err = error(client.post("/v1/embeddings", json=body), status)
    assert needle in err["message"], err


def test_client_spellings_of_base64_and_data_uris(client, direct):
    png = make_input("vision", seed=3)
    b64 = base64.b64encode(png).decode()
    urlsafe = base64.urlsafe_b64encode(png).decode().rstrip("=")
    assert "-" in urlsafe or "_" in urlsafe
    variants = [
        base64.encodebytes(png).decode(),  # MIME: wrapped at 76 characters
        urlsafe,  # URL-safe alphabet, padding dropped
        "DATA:image/png;BASE64," + b64,
        "  " + b64 + "\n",
    ]
    got = vectors(embed(client, variants, "vision"))
    assert_embeddings_close(got, direct("vision", [png] * 4))
    err = error(embed(client, [b64[:-5] + "!!!!!"], "vision"), 400)
    assert err["param"] == "input[0]" and "base64" in err["message"]


def test_routing_and_protocol_errors_use_the_error_shape(client):
    assert error(client.get("/v1/embeddings"), 405)["code"] == "method_not_allowed"
    assert error(client.get("/v1/nothing"), 404)["code"] == "not_found"
    error(client.post("/v1/embeddings/", json={"input": "x"}), 404)  # no redirect
    assert client.head("/healthz").status_code == 200
    assert client.head("/readyz").status_code == 200
    r = client.post(
        "/v1/embeddings",
        content=gzip.compress(b'{"input": "x"}'),
        headers={"content-encoding": "gzip", "content-type": "application/json"},
    )
    assert error(r, 415)["code"] == "unsupported_encoding"
    # A query parameter or header that does not parse names itself and what was sent.
    err = error(client.get("/v1/thumbnail", params={"id": "x", "size": "abc"}), 400)
    assert (err["param"], err["code"]) == ("size", "invalid_request")
    assert err["message"].startswith("size: ") and "'abc'" in err["message"], err
    # FastAPI would take the last of repeated values, and 256.0, +256, 2_56 or " 256" for 256.
    for url, param in (
        ("/v1/media?id=a&id=b", "id"),
        ("/v1/thumbnail?id=a&size=64&size=9", "size"),
    ):
        err = error(client.get(url), 400)
        assert (err["param"], err["code"]) == (param, "duplicate_parameter"), err
        assert "given 2 times" in err["message"], err
    for size in ("256.0", "+256", "2_56", " 256"):
        err = error(client.get("/v1/thumbnail", params={"id": "x", "size": size}), 400)
        assert (err["param"], err["code"]) == ("size", "invalid_request"), err
        assert repr(size) in err["message"], err
    r = client.get("/v1/thumbnail", params={"id": "x", "size": "256"})
    assert r.status_code < 400 or r.json()["error"]["param"] != "size", r.text
    r = client.post("/v1/embeddings", json={"input": "x"}, headers={"X-Request-Timeout": "soon"})
    err = error(r, 400)
    assert (err["param"].lower(), err["code"]) == ("x-request-timeout", "invalid_header"), err


def test_a_stalled_upload_is_408_not_a_hang(apps):
    url = httpx.URL(apps["a"])
    body = b'{"input": "a dog"}'
    head = (
        f"POST {url.path}/v1/embeddings HTTP/1.1\r\nHost: {url.host}\r\n"
        "Content-Type: application/json\r\nX-Request-Timeout: 1\r\n"
        f"Content-Length: {len(body) + 50}\r\n\r\n"
    ).encode()
    t0 = time.monotonic()
    with socket.create_connection((url.host, url.port), timeout=60) as s:
        s.sendall(head + body)  # 50 bytes short, and never sent
        reply = b""
        while b"\r\n\r\n" not in reply or b"request_timeout" not in reply:
            chunk = s.recv(65536)  # headers and body may arrive in separate reads
            if not chunk:
                break
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 408"), reply[:300]
    assert b"request_timeout" in reply and time.monotonic() - t0 < 30


def test_a_body_must_keep_a_minimum_rate_not_the_whole_deadline(apps):
    # The request deadline is 60 s, but a stalled body holds an ingress slot (the slots are
    # what every request, /healthz included, waits for): it gets 5 s to start plus the time
    # its bytes take at `body_min_rate`. A slow but steady upload is not cut.
    url = httpx.URL(apps["a"])

    def post(parts: list[bytes], declared: int, pause_s: float) -> tuple[bytes, float]:
        head = (
            f"POST {url.path}/v1/embeddings HTTP/1.1\r\nHost: {url.host}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {declared}\r\n\r\n"
        ).encode()
        t0 = time.monotonic()
        with socket.create_connection((url.host, url.port), timeout=90) as sock:
            sock.sendall(head)
            for p in parts:
                sock.sendall(p)
                time.sleep(pause_s)
            reply = b""
            while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                reply += chunk
        return reply, time.monotonic() - t0

    reply, took = post([b'{"input":'], 1000, 0)  # 991 bytes never sent
    assert reply.startswith(b"HTTP/1.1 408"), reply[:300]
    assert b"request body too slow: 9 bytes in" in reply, reply[-300:]
    assert took < 20, took  # not the 60 s deadline
    # ~64 KiB/s for 6 s, past the first 5 s: twice the minimum rate.
    pad = [b" " * 65536 for _ in range(6)]
    body = [b'{"input": "a dog"', *pad, b"}"]
    reply, took = post(body, sum(map(len, body)), 1.0)
    assert reply.startswith(b"HTTP/1.1 200"), reply[:300]
    assert took > 5.5, took


def test_malformed_json_and_size_limits(client):
    r = client.post(
        "/v1/embeddings", content=b"{not json", headers={"content-type": "application/json"}
    )
    error(r, 400)
    big = "a" * 2_100_000  # over max_body_bytes=2_000_000
    err = error(embed(client, big, "vision"), 413)
    assert "2000000" in err["message"]
    # Chunked upload without Content-Length: counted while reading.
    chunks = (b'{"input": "' + b"a" * 500_000 for _ in range(5))
    error(client.post("/v1/embeddings", content=chunks), 413)


def test_timeout_is_504(client):
    items = [f"text {i}" for i in range(8)]
    assert embed(client, items).status_code == 200
    r = client.post(
        "/v1/embeddings",
        json={"input": items},
        headers={"X-Request-Timeout": "0.001"},
    )
    err = error(r, 504)
    assert err["code"] == "timeout"
    # Later requests are unaffected.
    assert embed(client, "still fine").status_code == 200


def test_models_health_ready_and_no_search(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["deployments"] == {
        f"encoder-{m}": True for m in ("vision", "text", "audio", "depth", "thermal", "imu")
    }
    models = client.get("/v1/models").json()
    (card,) = models["data"]
    assert card["id"] == "imagebind-tiny" and card["embed_dim"] == 32
    assert card["modalities"] == list(KINDS)
    assert card["lineage"]["checkpoint_sha256"] == "random"
    assert client.get("/v1/models/imagebind-tiny").status_code == 200
    error(client.get("/v1/models/nope"), 404)
    err = error(client.post("/v1/search", json={"input": "a dog"}), 404)
    assert "index_uri" in err["message"]


# --------------------------------------------------------------------------- app b: auth, load


def test_auth(apps, direct):
    url = apps["b"]
    body = {"input": ["a dog"], "model": "guarded"}
    r = httpx.post(url + "/v1/embeddings", json=body)
    assert error(r, 401)["type"] == "authentication_error"
    assert r.headers["www-authenticate"] == "Bearer"
    bad = {"Authorization": "Bearer wrong"}
    error(httpx.post(url + "/v1/embeddings", json=body, headers=bad), 401)
    error(httpx.get(url + "/v1/models", headers=bad), 401)
    error(httpx.get(url + "/v1/status", headers=bad), 401)  # replica counts are not public
    good = {"Authorization": f"Bearer {API_KEY}"}
    status = httpx.get(url + "/v1/status", headers=good, timeout=30).json()["deployments"]
    assert status["encoder-text"]["running"] == 1 and status["ingress"]["running"] == 1
    r = httpx.post(url + "/v1/embeddings", json=body, headers=good, timeout=60)
    assert_embeddings_close(vectors(r), direct("text", ["a dog"]))
    assert httpx.get(url + "/healthz").status_code == 200  # probes need no key
    # The API's documentation is behind the key too (it lists every route and field).
    for path in ("/openapi.json", "/docs", "/redoc"):
        assert error(httpx.get(url + path), 401)["code"] == "invalid_api_key", path
        assert httpx.get(url + path, headers=good).status_code == 200, path
    schema = httpx.get(url + "/openapi.json", headers=good).json()
    assert "/v1/embeddings" in schema["paths"] and "/docs" not in schema["paths"]
    assert f"{PREFIX_B}/openapi.json" in httpx.get(url + "/docs", headers=good).text
    # Auth off on app a: no header needed (the other tests), the docs included.
    assert "/v1/search" in httpx.get(apps["a"] + "/openapi.json").json()["paths"]
    assert httpx.get(apps["a"] + "/docs").status_code == 200


def test_overload_is_503_with_retry_after(apps):
    url = apps["b"]
    headers = {"Authorization": f"Bearer {API_KEY}"}
    body = {"input": [f"text {i} " * 20 for i in range(4)]}

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=120, headers=headers) as ac:
            return await asyncio.gather(*(ac.post("/v1/embeddings", json=body) for _ in range(24)))

    responses = asyncio.run(burst())
    codes = sorted({r.status_code for r in responses})
    assert set(codes) <= {200, 503}, codes
    rejected = [r for r in responses if r.status_code == 503]
    assert rejected, "a queue of one must overflow under a burst of 24 x 4 inputs"
    assert rejected[0].headers["retry-after"] == "2"
    assert rejected[0].json()["error"]["code"] == "overloaded"
    r = httpx.post(url + "/v1/embeddings", json={"input": "after"}, headers=headers, timeout=60)
    assert r.status_code == 200, r.text


def _serving_rss(app: str) -> dict[int, int]:
    """RSS (bytes) of this session's Serve processes for `app` (ingress and encoder replicas)
    and its HTTP proxy: the descendants of this test process, read from /proc."""
    import os

    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(d))
    out, todo = {}, [os.getpid()]
    while todo:
        pid = todo.pop()
        todo.extend(children.get(pid, []))
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().split(b"\0")[0].decode(errors="replace")
            if cmd.startswith(f"ray::ServeReplica:{app}:") or cmd.startswith("ray::ProxyActor"):
                with open(f"/proc/{pid}/status") as f:
                    rss = next(ln for ln in f if ln.startswith("VmRSS:"))
                out[pid] = int(rss.split()[1]) * 1024
        except (OSError, StopIteration):
            continue
    return out


def test_sustained_overload_is_503_memory_flat_and_recovers(apps):
    """About 10x app b's capacity (its encoder takes one chunk at a time and queues one; 20
    clients each keep a one-input request in flight) for a bounded time: every answer is a 200
    or a 503 with Retry-After, the serving processes' memory stays flat, and the endpoint
    answers normally as soon as the load stops."""
    url = apps["b"]
    headers = {"Authorization": f"Bearer {API_KEY}"}
    body = {"input": ["a sustained load " * 20]}
    ok = httpx.post(url + "/v1/embeddings", json=body, headers=headers, timeout=60)
    assert ok.status_code == 200, ok.text  # warm: first-call allocations are not load
    before = _serving_rss("t5b")
    assert len(before) >= 3, before  # proxy, ingress, encoder
    statuses: list[int] = []
    retry_after: set[str | None] = set()
    peak: dict[int, int] = dict(before)

    async def client(ac: httpx.AsyncClient, stop_at: float) -> None:
        while time.monotonic() < stop_at and len(statuses) < 2_000:
            r = await ac.post("/v1/embeddings", json=body)
            statuses.append(r.status_code)
            if r.status_code == 503:
                retry_after.add(r.headers.get("retry-after"))

    async def sample(stop_at: float) -> None:
        while time.monotonic() < stop_at:
            for pid, rss in (await asyncio.to_thread(_serving_rss, "t5b")).items():
                peak[pid] = max(peak.get(pid, 0), rss)
            await asyncio.sleep(0.5)

    async def load() -> None:
        stop_at = time.monotonic() + 8
        limits = httpx.Limits(max_connections=20)
        async with httpx.AsyncClient(
            base_url=url, headers=headers, timeout=60, limits=limits
        ) as ac:
            await asyncio.gather(sample(stop_at), *(client(ac, stop_at) for _ in range(20)))

    asyncio.run(load())
    assert set(statuses) <= {200, 503}, sorted(set(statuses))  # never a 500, never a hang
    assert statuses.count(503) > statuses.count(200) > 0, (statuses.count(200), len(statuses))
    assert retry_after == {"2"}
    # Memory flat: bounded queues mean no process grows with the backlog.
    grown = {pid: (peak[pid] - before[pid]) / 2**20 for pid in before if pid in peak}
    print(f"overload: {statuses.count(200)} x 200, {statuses.count(503)} x 503; MiB grown {grown}")
    assert max(grown.values()) < 100, grown  # MiB
    # Recovers at once: the next requests are served, not refused.
    t0 = time.monotonic()
    for _ in range(3):
        r = httpx.post(url + "/v1/embeddings", json=body, headers=headers, timeout=60)
        assert r.status_code == 200, r.text
    assert time.monotonic() - t0 < 15


def test_ingress_overload_is_503_at_the_proxy(apps):
    url = apps["c"]
    wait_ready(url)
    body = {"input": [f"text {i} " * 30 for i in range(8)]}

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=120) as ac:
            return await asyncio.gather(*(ac.post("/v1/embeddings", json=body) for _ in range(32)))

    responses = asyncio.run(burst())
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 503}, sorted(set(codes))  # bounded, never a 500 or a hang
    rejected = [r for r in responses if r.status_code == 503]
    assert rejected, "an ingress with one slot and a queue of one must overflow under 32 requests"
    assert codes.count(200) >= 1
    assert all(r.headers.get("retry-after") == "3" for r in rejected)
    r = httpx.post(url + "/v1/embeddings", json={"input": "after"}, timeout=60)
    assert r.status_code == 200, r.text


def test_encoder_calls_pick_their_transport_and_survive_a_grpc_failure(ray_session):
    """Small chunks go over Serve's gRPC transport, large ones by reference; a broken gRPC
    channel (a dead replica) is retried once, then answered 503, never a 500."""
    import grpc
    from grpc.aio import AioRpcError

    from serve.encoder import EncodeCall
    from serve.http import APIError
    from serve.ingress import GRPC_MAX_BYTES, EmbeddingService
    from serve.options import AppArgs

    class Handle:
        def __init__(self, by_reference: bool = True, fail: int = 0) -> None:
            self.by_reference, self.fail, self.calls = by_reference, fail, []
            self.embed = self

        def options(self, _by_reference: bool = True) -> Handle:
            self.grpc = Handle(_by_reference, self.fail)
            return self.grpc

        def remote(self, call: EncodeCall):
            self.calls.append(call.x.nbytes)

            async def answer():
                if self.fail:
                    self.fail -= 1
                    raise AioRpcError(grpc.StatusCode.INTERNAL, None, None, "socket closed")
                return np.zeros((call.x.shape[0], 4), np.float32)

            return answer()

    by_ref = Handle()
    svc = EmbeddingService(AppArgs(preset="tiny"), {"text": by_ref})
    small = np.zeros((1, GRPC_MAX_BYTES), np.uint8)
    large = np.zeros((1, GRPC_MAX_BYTES + 1), np.uint8)
    asyncio.run(svc._call_encoder("text", EncodeCall(small)))
    asyncio.run(svc._call_encoder("text", EncodeCall(large)))
    assert by_ref.grpc.by_reference is False
    assert by_ref.grpc.calls == [small.nbytes] and by_ref.calls == [large.nbytes]

    flaky = Handle(fail=1)  # the first gRPC call breaks, the retry succeeds
    svc = EmbeddingService(AppArgs(preset="tiny"), {"text": flaky})
    assert asyncio.run(svc._call_encoder("text", EncodeCall(small))).shape == (1, 4)
    assert len(flaky.grpc.calls) == 2

    dead = Handle(fail=2)  # broken twice: 503 with Retry-After
    svc = EmbeddingService(AppArgs(preset="tiny"), {"text": dead})
    with pytest.raises(APIError) as e:
        asyncio.run(svc._call_encoder("text", EncodeCall(small)))
    assert e.value.status == 503 and "Retry-After" in e.value.headers


def _post(path: str, body: bytes):
    """A starlette Request for `EmbeddingService`'s routes, without Serve."""
    from starlette.requests import Request

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    scope = {
        "type": "http",
        "method": "POST",
        "path": path,
        "headers": [(b"content-type", b"application/json")],
        "query_string": b"",
    }
    return Request(scope, receive)


class CoreHandle:
    """A stand-in for an encoder's DeploymentHandle over a real `EncoderCore` (no Serve)."""

    def __init__(self, core, dtype: str | None = None) -> None:
        self.core, self.dtype = core, dtype
        self.embed, self.ready = self._Method(self._embed), self._Method(self._info)

    class _Method:
        def __init__(self, fn) -> None:
            self.remote = fn

    def options(self, **_) -> CoreHandle:
        return self

    def _embed(self, call):
        async def answer():
            return self.core.encode([call])[0]

        return answer()

    def _info(self):
        async def answer():
            info = self.core.info()
            if self.dtype is not None:  # what a replica computing in this dtype reports
                info["lineage"]["dtype"] = self.dtype
            return info

        return answer()


@pytest.mark.parametrize(("kind", "value"), [("imu", 1e30), ("imu", 3e38), ("thermal", 3e38)])
def test_finite_inputs_that_overflow_the_model_are_422_naming_the_input(ray_session, kind, value):
    """Huge but finite values (an IMU recording of 1e30 or 3e38) make the model's arithmetic
    overflow: a 422 naming the input and saying why, never a 500 or a JSON null; the float16
    hint only when the model really computes in a half dtype. A thermal frame of 3e38 is
    refused before the model, as a float thermal map outside [0, 1]: a 400 naming it."""
    import io
    import json

    from serve.encoder import EncoderCore
    from serve.http import APIError
    from serve.ingress import EmbeddingService
    from serve.options import AppArgs

    shape = (6, 200) if kind == "imu" else (32, 32)
    buf = io.BytesIO()
    np.save(buf, np.full(shape, value, np.float32))
    huge = base64.b64encode(buf.getvalue()).decode()
    fine = wire(make_input(kind))
    core = EncoderCore(str(__import__("imagebind_core").model_modality(kind)), preset="tiny")
    body = json.dumps({"modality": kind, "input": [fine, huge]}).encode()
    for dtype, hint in ((None, False), ("float16", True)):
        svc = EmbeddingService(AppArgs(preset="tiny"), {core.modality: CoreHandle(core, dtype)})
        with pytest.raises(APIError) as e:
            asyncio.run(svc.embeddings(_post("/v1/embeddings", body)))
        err = e.value
        if kind == "thermal":
            assert (err.status, err.param, err.code) == (400, "input[1]", "invalid_input"), err
            assert "float thermal values must lie in [0, 1]" in err.message, err.message
            continue
        assert (err.status, err.param, err.code) == (422, "input[1]", "input_overflow")
        assert err.message.startswith(f"input[1]: invalid {kind} input: its values are too large")
        assert "overflow" in err.message
        assert ("float16" in err.message) is hint, err.message
    # The same request without the huge input is answered.
    ok = json.dumps({"modality": kind, "input": [fine]}).encode()
    assert asyncio.run(svc.embeddings(_post("/v1/embeddings", ok))).status_code == 200


def test_non_finite_embeddings_are_never_json_nulls(ray_session):
    """Whatever makes a vector non-finite, the input is named and no NaN is sent as null."""
    from serve.http import APIError
    from serve.ingress import EmbeddingService
    from serve.options import AppArgs

    class NaNEncoder:
        def __init__(self) -> None:
            self.embed = self

        def options(self, **_) -> NaNEncoder:
            return self

        def remote(self, call):
            async def answer():
                out = np.ones((call.x.shape[0], 32), np.float32)
                out[-1, 3] = np.nan
                return out

            return answer()

    body = b'{"input": ["fine", "also fine, but the model overflows"]}'
    svc = EmbeddingService(AppArgs(preset="tiny"), {"text": NaNEncoder()})
    with pytest.raises(APIError) as e:
        asyncio.run(svc.embeddings(_post("/v1/embeddings", body)))
    assert e.value.status == 422 and e.value.param == "input[1]", e.value.message
    assert "float16" not in e.value.message  # the dtype is unknown: not guessed


def test_api_key_from_the_environment(ray_session, monkeypatch):
    from starlette.requests import Request

    from serve.http import APIError
    from serve.ingress import EmbeddingService
    from serve.options import AppArgs

    def request(auth: str | None) -> Request:
        headers = [(b"authorization", auth.encode())] if auth else []
        return Request({"type": "http", "method": "POST", "path": "/", "headers": headers})

    monkeypatch.setenv("IMAGEBIND_TEST_KEY", "from-env")
    svc = EmbeddingService(AppArgs(preset="tiny", api_key_env="IMAGEBIND_TEST_KEY"), {})
    svc.policy.check_auth(request("Bearer from-env"))
    for bad in (None, "Bearer wrong", "Basic from-env"):
        with pytest.raises(APIError) as e:
            svc.policy.check_auth(request(bad))
        assert e.value.status == 401
    # An explicit api_key wins over the environment.
    svc = EmbeddingService(
        AppArgs(preset="tiny", api_key="k", api_key_env="IMAGEBIND_TEST_KEY"), {}
    )
    svc.policy.check_auth(request("Bearer k"))
    # Naming a variable that is unset fails closed instead of serving without auth.
    monkeypatch.delenv("IMAGEBIND_TEST_KEY")
    with pytest.raises(RuntimeError, match="IMAGEBIND_TEST_KEY"):
        EmbeddingService(AppArgs(preset="tiny", api_key_env="IMAGEBIND_TEST_KEY"), {})


# --------------------------------------------------------------------------- failure


def test_replica_killed_mid_traffic_recovers(apps, direct):
    import ray

    url = apps["a"]
    texts = ["during the kill", "another one"]
    expected = direct("text", texts)
    names = [
        a
        for a in ray.util.list_named_actors(all_namespaces=True)
        if "SERVE_REPLICA::t5a#encoder-text#" in a["name"]
    ]
    assert names, "no encoder-text replica found"
    r = httpx.post(url + "/v1/embeddings", json={"input": texts}, timeout=60)  # warm, alone
    assert r.status_code == 200, r.text
    statuses: list[int] = []
    log: list[tuple[float, float, int]] = []  # (sent, answered, status)
    killed: list[float] = []

    def served_after_kill() -> bool:
        return bool(killed) and any(s > killed[0] and c == 200 for s, _, c in log)

    async def traffic(stop_at: float, give_up_at: float) -> None:
        # At least 6 s of traffic, and on until a request sent after the kill is answered: on
        # a loaded machine the replacement replica can take longer than that to start.
        async with httpx.AsyncClient(base_url=url, timeout=60) as ac:
            while time.time() < stop_at or (not served_after_kill() and time.time() < give_up_at):
                sent = time.monotonic()
                r = await ac.post("/v1/embeddings", json={"input": texts})
                log.append((sent, time.monotonic(), r.status_code))
                statuses.append(r.status_code)
                if r.status_code == 200:
                    assert_embeddings_close(vectors(r), expected)

    async def run() -> None:
        stop_at, give_up_at = time.time() + 6, time.time() + 90
        workers = [asyncio.create_task(traffic(stop_at, give_up_at)) for _ in range(3)]
        await asyncio.sleep(1.0)
        n_before = len(statuses)
        killed.append(time.monotonic())
        for a in names:
            ray.kill(ray.get_actor(a["name"], namespace=a["namespace"]), no_restart=True)
        await asyncio.gather(*workers)
        assert n_before > 0 and len(statuses) > n_before

    asyncio.run(run())
    assert set(statuses) <= {200, 503}, sorted(set(statuses))  # never a 500
    # Only what was in flight when the replica died may fail: each of the 3 clients had at
    # most one request out; later requests wait for the replacement instead of failing.
    rel = [(s - killed[0], e - killed[0], code) for s, e, code in log]
    failed = [(s, e) for s, e, code in rel if code != 200]
    print(f"kill: {len(log)} requests, failed (sent, answered) relative to the kill: {failed}")
    assert any(s <= 0 <= e for s, e, _ in rel), "no request was in flight at the kill"
    assert any(s > 0 and code == 200 for s, _, code in rel), "nothing served after the kill"
    assert len(failed) <= 3, failed
    assert all(s <= 0.5 for s, _ in failed), failed
    wait_ready(url, timeout_s=90)
    r = httpx.post(url + "/v1/embeddings", json={"input": texts}, timeout=60)
    assert_embeddings_close(vectors(r), expected)
