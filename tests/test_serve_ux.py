"""What a newcomer to the endpoint meets (issue 22): typos named, start-up answered at once,
metrics where the docs say with the names the docs give, the lineage the job writes, the
re-index result documented, and the documented curl examples working as written.

The Serve tests share the session's Ray and HTTP proxy (`helpers.serve`); the curl examples
run against `serve run` in a subprocess with its own Ray, as a user starts it.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from helpers.net import free_port
from helpers.pipeline import SMALL_JOB
from helpers.serve import serve_base_url, start_serve_run, wait_ready

ROOT = Path(__file__).resolve().parents[1]
SERVE_DOC = ROOT / "docs" / "serve.md"
PREFIX = "/uxstart"
APP = "uxstart"


def doc_section(path: Path, heading: str) -> str:
    """The text of the section under `heading` (up to the next heading of its level or
    higher)."""
    text = path.read_text()
    level = len(heading) - len(heading.lstrip("#"))
    start = text.index(heading + "\n")
    nxt = re.compile(rf"^#{{1,{level}}} ", re.M)
    m = nxt.search(text, start + len(heading) + 1)
    return text[start : m.start() if m else len(text)]


# ----------------------------------------------------------------------------- request typos


def _request(body: dict | bytes):
    from starlette.requests import Request

    raw = body if isinstance(body, bytes) else json.dumps(body).encode()

    async def receive():
        return {"type": "http.request", "body": raw, "more_body": False}

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/",
        "headers": [(b"content-type", b"application/json")],
        "query_string": b"",
    }
    return Request(scope, receive)


def _answer(route, body: dict):
    from serve.http import APIError

    with pytest.raises(APIError) as e:
        asyncio.run(route(_request(body)))
    return e.value


@pytest.mark.parametrize("schema_name", ["EmbeddingRequest", "SearchRequest"])
def test_unknown_fields_are_named_with_the_field_meant(ray_session, schema_name):
    """`{"inputs": ...}` is a 400 naming `inputs` and suggesting `input`, for every field of
    every request schema; a name close to none lists the fields."""
    import serve.schemas as S
    from serve.ingress import EmbeddingService
    from serve.options import AppArgs

    schema = getattr(S, schema_name)
    svc = EmbeddingService(AppArgs(preset="tiny"), {}, search=object())
    route = svc.embeddings if schema is S.EmbeddingRequest else svc.search
    valid = {"input": "a dog"}
    assert set(schema.model_fields) >= {"input", "model", "modality"}
    for field in schema.model_fields:
        typo = field + "s"
        body = {typo: "x"} if field == "input" else {**valid, typo: "x"}
        err = _answer(route, body)
        assert err.status == 400, (field, err.message)
        assert err.message == f"unknown field {typo!r} (did you mean {field!r}?)", err.message
        assert (err.param, err.code) == (typo, "unknown_field")
    err = _answer(route, {**valid, "zzz": 1})
    assert err.message.startswith("unknown field 'zzz'; the fields of this request are input")
    # A known field with a wrong value says what this request's field must be.
    for bad in (3, ["a dog"]) if schema is S.SearchRequest else (3,):
        err = _answer(route, {"input": bad})
        assert err.status == 400 and err.param == "input" and err.code == "invalid_request"
        assert err.message == f"input {schema.field_hints['input']}", err.message
    assert "one string" in S.SearchRequest.field_hints["input"]
    assert "list of strings" in S.EmbeddingRequest.field_hints["input"]
    if schema is S.EmbeddingRequest:  # a missing input is said to be missing
        err = _answer(route, {"model": "x"})
        assert err.param == "input" and err.message == "input: Field required", err.message


@pytest.mark.parametrize(
    ("inputs", "param", "what"),
    [
        (["a", "b", 5], "input[2]", "a number"),
        (["a", None], "input[1]", "null"),
        ([{}], "input[0]", "an object"),
        (["a", True, "b"], "input[1]", "a boolean"),
        (["a", ["b"]], "input[1]", "an array"),
        ([1, 2], "input[0]", "a number"),
    ],
)
def test_a_list_element_of_the_wrong_type_is_named_with_its_index(ray_session, inputs, param, what):
    """`{"input": ["a", "b", 5]}` is a 400 naming `input[2]` and what it is, not `input`."""
    from serve.ingress import EmbeddingService
    from serve.options import AppArgs

    svc = EmbeddingService(AppArgs(preset="tiny"), {})
    err = _answer(svc.embeddings, {"input": inputs})
    assert (err.status, err.param, err.code) == (400, param, "invalid_request"), err.message
    assert err.message.startswith(f"{param} is {what}, not a string: input must be a string or")
    # The same for the search's raw vector.
    svc = EmbeddingService(AppArgs(preset="tiny"), {}, search=object())
    err = _answer(svc.search, {"vector": [0.5, "x"]})
    assert (err.status, err.param) == (400, "vector[1]")
    assert err.message == "vector[1] is a string, not a number", err.message
    # A number, of the right type but past a float's range: not "a number, not a number".
    err = _answer(svc.search, {"vector": [10**400, 0.5]})
    assert (err.status, err.param) == (400, "vector[0]")
    assert err.message.startswith("vector[0] is a number out of range"), err.message


def test_an_error_quoting_a_huge_value_is_cut():
    # A 30 MB unknown id came back whole in the 404's message.
    from serve.http import MAX_MESSAGE_CHARS, APIError

    err = APIError(404, f"id: no item {'a' * 3_000_000!r} in the published index version")
    assert len(err.message) < MAX_MESSAGE_CHARS + 50
    assert err.message.endswith("more characters)") and err.message.startswith("id: no item 'aa")
    assert len(err.response().body) < MAX_MESSAGE_CHARS + 200


@pytest.mark.parametrize(
    ("raw", "param", "code", "message"),
    [
        (
            b'{"input": "a", "input": "b"}',
            "input",
            "duplicate_key",
            "duplicate key 'input' in the JSON body: give each field once",
        ),
        (
            b'{"input": "a", "modality": "text", "modality": "vision"}',
            "modality",
            "duplicate_key",
            "duplicate key 'modality' in the JSON body: give each field once",
        ),
        (
            rb'{"input": ["fine", "\ud800"]}',
            "input[1]",
            "invalid_request",
            "input[1]: the text holds an unpaired UTF-16 surrogate (\\ud800), which is not a "
            "character: send valid Unicode (a surrogate pair, or the character itself in UTF-8)",
        ),
        (b'{"input": NaN}', None, "invalid_request", "invalid JSON: NaN is not a JSON value"),
        (b'["a"]', None, "invalid_request", "the body must be a JSON object, got an array"),
        (
            b'{"input": "caf\xe9"}',
            None,
            "invalid_request",
            "the body is not valid UTF-8 (byte 14): send JSON encoded as UTF-8",
        ),
    ],
)
def test_bodies_that_parsers_read_differently_are_refused(ray_session, raw, param, code, message):
    """A key given twice (which one wins differs between parsers: a proxy and this server must
    not disagree), an unpaired surrogate, NaN, a non-object, non-UTF-8: 400 saying which."""
    from serve.ingress import EmbeddingService
    from serve.options import AppArgs

    svc = EmbeddingService(AppArgs(preset="tiny"), {})
    err = _answer(svc.embeddings, raw)
    assert (err.status, err.param, err.code) == (400, param, code), err.message
    assert err.message == message


# ----------------------------------------------------------------------------- start-up


def _slow_encoder(gate: Path):
    """The real encoder deployment, whose replicas load their model only once `gate` exists:
    a model load as slow as the test needs (pickled by value: a class local to a function)."""
    from serve.encoder import EncoderDeployment

    base = EncoderDeployment.func_or_class

    class GatedEncoder(base):
        def __init__(self, modality: str, **kwargs) -> None:
            deadline = time.monotonic() + 600
            while not gate.exists() and time.monotonic() < deadline:
                time.sleep(0.2)
            super().__init__(modality, **kwargs)

    GatedEncoder.__name__ = GatedEncoder.__qualname__ = "GatedEncoder"
    return GatedEncoder


@pytest.fixture(scope="module")
def gated_app(ray_session, tmp_path_factory):
    """An app whose text encoder waits for a gate file before loading its model: yields
    (url, gate)."""
    from ray import serve

    from serve.app import REPLICA_ENV
    from serve.ingress import Ingress
    from serve.options import AppArgs

    gate = tmp_path_factory.mktemp("gate") / "load-now"
    base = serve_base_url()
    args = AppArgs(
        preset="tiny",
        modalities=["text"],
        retry_after_s=2,
        status_interval_s=1,
        encoder={"num_cpus": 0.1},
        ingress={"num_cpus": 0.1},
    )
    opts = {"num_cpus": 0.1, "runtime_env": {"env_vars": dict(REPLICA_ENV)}}
    encoder = (
        serve.deployment(_slow_encoder(gate))
        .options(name="encoder-text", ray_actor_options=opts, user_config={"max_batch_size": 8})
        .bind("text", preset="tiny")
    )
    app = Ingress.options(name="ingress", ray_actor_options=opts).bind(
        args.model_dump(), {"text": encoder}, None
    )
    serve._run(app, name=APP, route_prefix=PREFIX, _blocking=False)
    try:
        yield base + PREFIX, gate
    finally:
        gate.touch()
        serve.delete(APP)


def test_requests_during_startup_get_503_with_retry_after(gated_app):
    """Before the encoder has loaded its model, a request is answered 503 `starting` with
    Retry-After at once (not held until the model is there), /readyz says 503 at once; once
    the model is loaded the same request is a 200."""
    url, gate = gated_app
    deadline = time.monotonic() + 300
    while True:  # the ingress replica is up (the encoder cannot be: its gate is closed)
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url + "/healthz", timeout=10).status_code == 200:
                break
        assert time.monotonic() < deadline, "the ingress did not start"
        time.sleep(0.5)
    body = {"input": ["a dog"]}
    # No timing is asserted: the model cannot load while the gate is closed, so any answer
    # at all (within the client's timeout) is one not held for the model.
    for _ in range(3):
        r = httpx.post(url + "/v1/embeddings", json=body, timeout=60)
        assert r.status_code == 503, r.text
        assert r.headers["retry-after"] == "2"
        err = r.json()["error"]
        assert err["code"] == "starting" and "encoder-text" in err["message"], err
        ready = httpx.get(url + "/readyz", timeout=60)
        assert ready.status_code == 503 and ready.json()["deployments"]["encoder-text"] is False
    assert not gate.exists()
    gate.touch()
    wait_ready(url, timeout_s=300)
    r = httpx.post(url + "/v1/embeddings", json=body, timeout=60)
    assert r.status_code == 200, r.text
    assert len(r.json()["data"][0]["embedding"]) == 32


# ----------------------------------------------------------------------------- metrics


def documented_metrics() -> list[str]:
    """The metric names of the table in docs/serve.md "Metrics" (first column)."""
    section = doc_section(SERVE_DOC, "## Metrics")
    names = []
    for line in section.splitlines():
        m = re.match(r"^\| `(ray_imagebind_[a-z_]+)`", line)
        if m:
            names.append(m.group(1))
    return names


def exported_names(text: str, prefix: str = "ray_imagebind_") -> set[str]:
    """Names as one queries them: samples, with a histogram's `_bucket`/`_sum`/`_count`
    series under the histogram's name."""
    histograms = set(re.findall(r"^# TYPE (\S+) histogram$", text, re.M))
    out = set()
    for line in text.splitlines():
        if not line.startswith(prefix):
            continue
        name = re.split(r"[{ ]", line, maxsplit=1)[0]
        for suffix in ("_bucket", "_sum", "_count"):
            if name.endswith(suffix) and name.removesuffix(suffix) in histograms:
                name = name.removesuffix(suffix)
        out.add(name)
    return out


def test_documented_metrics_are_exported_under_those_names(gated_app):
    """Every metric docs/serve.md lists is on Ray's metrics port and on the app's /metrics,
    under exactly the listed name, and every `ray_imagebind_*` metric exported is listed."""
    import ray

    url, gate = gated_app
    gate.touch()
    wait_ready(url, timeout_s=300)
    assert httpx.post(url + "/v1/embeddings", json={"input": "count me"}, timeout=60).is_success
    documented = documented_metrics()
    assert len(documented) == len(set(documented)) >= 10, documented
    node = ray.nodes()[0]
    port_url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
    deadline = time.monotonic() + 90  # replicas push their metrics every few seconds
    while True:
        on_port = httpx.get(port_url, timeout=30).text
        app_resp = httpx.get(url + "/metrics", timeout=30)
        assert app_resp.status_code == 200, app_resp.text
        assert app_resp.headers["content-type"].startswith("text/plain")
        on_app = app_resp.text
        if (
            exported_names(on_port) >= set(documented) and exported_names(on_app) >= set(documented)
        ) or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert exported_names(on_port) == set(documented), (exported_names(on_port), documented)
    assert exported_names(on_app) == set(documented)
    assert f'application="{APP}"' in on_app


def test_metrics_route_asks_for_the_key_and_says_when_the_agent_is_down(ray_session):
    """GET /metrics: 401 without the key when auth is on; 503 `metrics_unavailable` naming
    the endpoint when Ray's metrics agent does not answer."""
    from serve.http import APIError
    from serve.ingress import EmbeddingService
    from serve.options import AppArgs

    guarded = EmbeddingService(AppArgs(preset="tiny", api_key="k"), {})
    with pytest.raises(APIError) as e:
        asyncio.run(guarded.metrics(_request({})))
    assert e.value.status == 401
    svc = EmbeddingService(AppArgs(preset="tiny", retry_after_s=3), {})
    svc._metrics_url = f"http://127.0.0.1:{free_port()}/metrics"  # nothing listens there
    with pytest.raises(APIError) as e:
        asyncio.run(svc.metrics(_request({})))
    assert (e.value.status, e.value.code) == (503, "metrics_unavailable")
    assert svc._metrics_url in e.value.message and e.value.headers["Retry-After"] == "3"


def test_metrics_port_is_fixed_in_the_docs_and_cluster_configs():
    """One metrics port (docs/serve.md), given to `ray start` on every node of cluster.yaml,
    exposed and annotated for scraping in deploy/rayservice.yaml."""
    section = doc_section(SERVE_DOC, "## Metrics")
    port = int(re.search(r"--metrics-export-port=(\d+)", section).group(1))
    assert f"localhost:{port}/metrics" in section
    cluster = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in cluster[key] if "ray start" in c]
        assert starts and all(f"--metrics-export-port={port}" in c for c in starts), starts
    manifest = yaml.safe_load((ROOT / "deploy" / "rayservice.yaml").read_text())
    spec = manifest["spec"]["rayClusterConfig"]
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    for g in groups:
        assert g["rayStartParams"]["metrics-export-port"] == str(port)
        pod = g["template"]
        assert pod["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
        assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(port)
        ports = [p for c in pod["spec"]["containers"] for p in c.get("ports", [])]
        assert {"containerPort": port, "name": "metrics"} in ports, ports


# ----------------------------------------------------------------------------- lineage, --json


@pytest.fixture(scope="module")
def reindexed(ray_session, tmp_path_factory):
    """`imagebind-reindex --json` on three captions (tiny, seed 0): (printed dict, root)."""
    from pipelines.cli import reindex_main as main

    base = tmp_path_factory.mktemp("reindex")
    corpus = base / "corpus"
    corpus.mkdir()
    for i, text in enumerate(["a red square", "two dogs playing", "rain on a tin roof"]):
        (corpus / f"c{i}.txt").write_text(text)
    argv = ["--input", str(corpus), "--index-root", str(base / "index"), "--json"]
    for k, v in SMALL_JOB.items():
        argv += ["--set", f"{k}={str(v).lower() if isinstance(v, bool) else v}"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(argv) == 0
    return json.loads(out.getvalue()), base / "index"


def test_reindex_json_fields_are_the_documented_ones(reindexed):
    result, _ = reindexed
    assert result["status"] == "published"
    section = doc_section(ROOT / "docs" / "reindex.md", "### `--json` output")
    documented = re.findall(r"^\| `([a-z_]+)` \|", section, re.M)
    assert documented and len(documented) == len(set(documented))
    assert sorted(documented) == sorted(result), (documented, sorted(result))


def test_models_lineage_is_the_jobs_parquet_metadata(gated_app, reindexed):
    """/v1/models' lineage has the fields the job writes into its Parquet metadata (under
    `imagebind.`), with the same values for the same settings (tiny, random weights, seed 0,
    float32, text); only `device` is the concrete one the replica runs on."""
    import pyarrow.parquet as pq

    url, gate = gated_app
    gate.touch()
    wait_ready(url, timeout_s=300)
    served = httpx.get(url + "/v1/models", timeout=60).json()["data"][0]["lineage"]
    files = sorted((reindexed[1]).rglob("*.parquet"))
    metas = [pq.read_schema(f).metadata or {} for f in files]
    job = next(
        {k.decode().removeprefix("imagebind."): v.decode() for k, v in m.items()}
        for m in metas
        if b"imagebind.preset" in m
    )
    job = {k: v for k, v in job.items() if k in served or k not in ("kinds",)}
    assert {"normalize", "preprocess_version"} <= set(served)
    assert set(served) == set(job), (sorted(served), sorted(job))
    differ = {k for k in served if served[k] != job[k]}
    assert differ <= {"device"}, {k: (served[k], job[k]) for k in differ}


# ----------------------------------------------------------------------------- docs examples


def curl_examples(path: Path) -> list[str]:
    """The curl commands of the bash blocks in `path` (continuation lines joined)."""
    text = path.read_text()
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            cmd = line.split(" #", 1)[0].strip()
            if cmd.startswith("curl "):
                out.append(cmd)
    return out


def test_serve_run_answers_every_documented_curl_example(tmp_path):
    """`serve run serve.app:app preset=tiny` (its config-file form, on a free port), then each
    curl example of README.md and docs/serve.md, as written (only the port changed), from the
    repository root after `python -m pipelines.demo_corpus demo-output/corpus`; each answers
    2xx with a JSON body. Ctrl-C then stops it cleanly: exit 0, and no error-level line,
    traceback or failed task other than the line of Ray's docs/serve.md "Stopping" explains."""
    examples = {p.name: curl_examples(p) for p in (ROOT / "README.md", SERVE_DOC)}
    assert all(examples.values()), examples
    port = free_port()
    config = {
        "http_options": {"host": "127.0.0.1", "port": port},
        "applications": [
            {"name": "default", "import_path": "serve.app:app", "args": {"preset": "tiny"}}
        ],
    }
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
        "PYTHONUNBUFFERED": "1",  # the whole log reaches the file, also if killed
    }
    env.pop("RAY_ADDRESS", None)
    work = tmp_path / "repo"  # the demo corpus where the examples expect it
    work.mkdir()
    subprocess.run(
        [sys.executable, "-m", "pipelines.demo_corpus", str(work / "demo-output" / "corpus")],
        cwd=ROOT,
        env={**env, "PYTHONPATH": str(ROOT)},
        check=True,
    )
    log_path = tmp_path / "serve-run.log"
    with log_path.open("w") as log:
        proc = start_serve_run(path, env, log)
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_ready(url, timeout_s=600)  # a bound, not a timing: shared CI boxes are slow
        except TimeoutError:
            pytest.fail(f"serve run did not become ready:\n{log_path.read_text()[-3000:]}")
        ran = 0
        for doc, cmds in examples.items():
            for cmd in cmds:
                if "localhost:8000" not in cmd or "s3://" in cmd or "Bearer" in cmd:
                    # Another port (direct ingress), a bucket, an app with an API key: examples
                    # of other set-ups than this one.
                    continue
                ran += 1
                run = cmd.replace("localhost:8000", f"127.0.0.1:{port}")
                r = subprocess.run(
                    ["bash", "-c", run + " -w '\\n%{http_code}'"],
                    cwd=work,
                    capture_output=True,
                    text=True,
                    timeout=120,
                )
                assert r.returncode == 0, (doc, cmd, r.stderr)
                body, _, code = r.stdout.rpartition("\n")
                assert code.startswith("2"), (doc, cmd, code, body[:500])
                if "/metrics" in cmd:
                    assert "ray_imagebind_" in body or "ray_serve_" in body, body[:500]
                else:
                    json.loads(body)
        assert ran >= 6, examples
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            rc = proc.wait(timeout=180)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait(timeout=30)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    log = log_path.read_text()
    assert rc == 0, log[-3000:]
    # Ray's own lines docs/serve.md "Stopping" explains are the only alarming ones allowed.
    explained = [
        ln.strip()
        for ln in doc_section(SERVE_DOC, "### Stopping").splitlines()
        if ln.startswith("    (")
    ]
    assert explained
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", ln).strip() for ln in log.splitlines()]
    alarming = [
        ln for ln in lines if re.search(r"\b(ERROR|CRITICAL)\b|Traceback|\bTask \S+ failed\b", ln)
    ]
    assert not [ln for ln in alarming if ln not in explained], alarming[:10]


def test_curl_examples_are_quoted_for_bash():
    """Each example parses as one shell command (a broken continuation would not)."""
    for p in (ROOT / "README.md", SERVE_DOC):
        for cmd in curl_examples(p):
            assert shlex.split(cmd)[0] == "curl"


def test_openapi_lists_the_request_and_response_fields_of_the_json_routes():
    """/openapi.json (and so /docs and /redoc) carries the request body and the 200 response
    of POST /v1/embeddings and /v1/search: the fields of the pydantic models they validate."""
    import serve.schemas as S
    from serve.ingress import api

    doc = api.openapi()
    schemas = doc["components"]["schemas"]
    for path, request, response in (
        ("/v1/embeddings", S.EmbeddingRequest, S.EmbeddingResponse),
        ("/v1/search", S.SearchRequest, S.SearchResponse),
    ):
        op = doc["paths"][path]["post"]
        body = op["requestBody"]["content"]["application/json"]["schema"]
        assert op["requestBody"]["required"] is True
        assert set(body["properties"]) == set(request.model_fields), path
        assert body["additionalProperties"] is False  # unknown fields are refused
        ref = op["responses"]["200"]["content"]["application/json"]["schema"]["$ref"]
        name = ref.rsplit("/", 1)[-1]
        assert set(schemas[name]["properties"]) == set(response.model_fields), path
    assert doc["paths"]["/v1/embeddings"]["post"]["requestBody"]["content"]["application/json"][
        "schema"
    ]["required"] == ["input"]


def test_every_route_has_its_own_openapi_operation_id():
    """No two operations share an id (FastAPI warns "Duplicate Operation ID", and client
    generators fed /openapi.json name two methods alike); the probes' HEAD stays out of it."""
    import warnings

    from fastapi.openapi.utils import get_openapi

    from serve.ingress import api

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        doc = get_openapi(title=api.title, version=api.version, routes=api.routes)
    assert not [str(w.message) for w in caught if "Operation ID" in str(w.message)]
    ids = [op["operationId"] for ops in doc["paths"].values() for op in ops.values()]
    assert len(ids) == len(set(ids)), ids
    for probe in ("/healthz", "/readyz"):  # HEAD: test_routing_and_protocol_errors_use_...
        assert set(doc["paths"][probe]) == {"get"}


def test_the_search_disabled_message_is_quoted_as_the_server_sends_it():
    from serve.http import APIError
    from serve.ingress import IndexClient

    with pytest.raises(APIError) as e:
        IndexClient(None, {}).need()
    assert (e.value.status, e.value.code) == (404, "search_disabled")
    text = " ".join(doc_section(SERVE_DOC, "### `POST /v1/search`").split())
    assert f"`` {e.value.message} ``" in text, e.value.message
