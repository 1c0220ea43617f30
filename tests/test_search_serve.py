"""`POST /v1/search` over HTTP against an index built and published by `imagebind-reindex`
(tiny preset, moto's S3 server): a query made from an item's own bytes finds it first, the
modality filter holds, and a newly published version is answered without a restart."""

from __future__ import annotations

import base64
import time
import uuid

import httpx
import media
import pytest
from helpers.reindex import TEXTS, s3_corpus, s3_settings
from helpers.serve import serve_base_url, wait_ready

from imagebind_core.index import read_pointer
from pipelines.config import load_reindex_config
from pipelines.publish import IndexRoot
from pipelines.reindex import reindex

APP = "search-t"
PREFIX = "/search-t"


def _pic(seed: int) -> bytes:
    return media.make_image("PNG", size=(64, 48), seed=seed)


@pytest.fixture(scope="module")
def setup(ray_session, s3_server):
    from ray import serve

    from serve.app import build_app
    from serve.options import AppArgs

    bucket = s3_server.create_bucket(f"srch-{uuid.uuid4().hex[:8]}")
    corpus = s3_corpus(s3_server, bucket)
    for i, t in enumerate(TEXTS):
        corpus.put(f"txt/cap{i}.txt", t.encode())
    for i in range(3):
        corpus.put(f"img/pic{i}.png", _pic(i))
    root = f"s3://{bucket}/index"
    over = s3_settings(s3_server, corpus, root)
    assert reindex(load_reindex_config(None, over)).status == "published"

    base = serve_base_url()
    args = AppArgs(
        preset="tiny",  # seed 0, like the job: the same model
        modalities=["text", "vision"],
        encoder={"num_cpus": 0.1, "max_batch_size": 4, "max_ongoing_requests": 8},
        ingress={"num_cpus": 0.1, "preprocess_threads": 2},
        s3_endpoint_url=s3_server.endpoint_url,
        s3_region=s3_server.region,
        s3_allowed_prefixes=[f"s3://{bucket}/queries"],
        index_uri=root,
    )
    serve.run(build_app(args), name=APP, route_prefix=PREFIX, blocking=False)
    url = base + PREFIX
    wait_ready(url)
    with httpx.Client(base_url=url, timeout=120) as client:
        yield client, corpus, over, root
    serve.delete(APP)


def search(client: httpx.Client, **body) -> list[dict]:
    r = client.post("/v1/search", json=body)
    assert r.status_code == 200, r.text
    return r.json()["data"]


def test_own_bytes_find_the_item_first(setup):
    client, _, _, _ = setup
    for i, text in enumerate(TEXTS):
        hits = search(client, input=text, modality="text", top_k=3)
        assert hits[0]["id"] == f"txt/cap{i}.txt"
        assert hits[0]["modality"] == "text" and hits[0]["uri"].endswith(f"cap{i}.txt")
        assert hits[0]["score"] == pytest.approx(1.0, abs=1e-3)
    for i in range(3):
        b64 = base64.b64encode(_pic(i)).decode()
        hits = search(client, input=b64, modality="vision", top_k=2)
        assert hits[0]["id"] == f"img/pic{i}.png"


def test_modality_filter_and_raw_vector(setup, s3_server):
    client, _, _, root = setup
    hits = search(client, input=TEXTS[0], modality="text", top_k=8, filter_modality="vision")
    assert len(hits) == 3 and {h["modality"] for h in hits} == {"vision"}
    hits = search(client, input=TEXTS[0], modality="text", top_k=8)
    assert len(hits) == 8 and {h["modality"] for h in hits} == {"vision", "text"}
    storage_options = s3_server.storage_options
    pointer = read_pointer(root, storage_options)
    rows = IndexRoot(root, storage_options).read_rows(pointer.name)
    k = rows.column("id").to_pylist().index("img/pic1.png")
    vec = rows.column("embedding")[k].as_py()
    assert search(client, vector=vec, top_k=1)[0]["id"] == "img/pic1.png"
    r = client.post("/v1/search", json={"vector": vec[:5], "top_k": 1})
    assert r.status_code == 400 and "32" in r.text
    assert (r.json()["error"]["param"], r.json()["error"]["code"]) == ("vector", "invalid_vector")


def test_query_by_s3_uri_whose_key_has_double_colons(setup, s3_server):
    """A query object's key may contain `::` (fsspec's URL-chaining separator): it is read as
    that key, and the chained reading never reaches the host it names."""
    from listener import Listener

    client, corpus, _, _ = setup
    bucket = corpus.root.split("/")[2]
    s3_server.client().put_object(Bucket=bucket, Key="queries/pic::1.png", Body=_pic(1))
    hits = search(client, input=f"s3://{bucket}/queries/pic::1.png", modality="vision", top_k=1)
    assert hits[0]["id"] == "img/pic1.png"
    other = Listener()
    try:
        uri = f"s3://{bucket}/queries/a::http://127.0.0.1:{other.port}/pic.png"
        r = client.post("/v1/search", json={"input": uri, "modality": "vision"})
        assert r.status_code == 400 and "not found" in r.json()["error"]["message"], r.text
        assert other.hits == []
    finally:
        other.close()


def test_huge_vector_components_are_normalised_not_zeroed(setup):
    """1e308 is a finite float64; its square is not. The query must still be the direction
    it points in (here the same as 1.0 everywhere), not a vector of scores 0.0."""
    client, _, _, _ = setup
    ones = search(client, vector=[1.0] * 32, top_k=5)
    huge = search(client, vector=[1e308] * 32, top_k=5)
    tiny = search(client, vector=[1e-310] * 32, top_k=5)  # subnormal: the norm underflows
    assert [h["id"] for h in huge] == [h["id"] for h in ones] == [h["id"] for h in tiny]
    for got in (huge, tiny):
        for a, b in zip(got, ones, strict=True):
            assert a["score"] == pytest.approx(b["score"], abs=1e-6)
    assert any(abs(h["score"]) > 1e-3 for h in ones)


def _info() -> dict:
    from ray import serve

    return serve.get_deployment_handle("search", app_name=APP).info.remote().result()


def test_new_version_is_served_without_restart(setup):
    client, corpus, over, _ = setup
    before = _info()
    query = "a lighthouse at dusk"
    assert search(client, input=query, modality="text", top_k=1)[0]["id"] != "txt/new.txt"
    corpus.put("txt/new.txt", query.encode())
    corpus.rm("txt/cap0.txt")
    r = reindex(load_reindex_config(None, over))
    assert r.status == "published" and r.counts["added"] == 1 and r.counts["deleted"] == 1
    deadline = time.time() + 60
    while True:
        hits = search(client, input=query, modality="text", top_k=8)
        if hits[0]["id"] == "txt/new.txt":
            break
        assert time.time() < deadline, "the endpoint never picked up the new version"
        time.sleep(0.5)
    assert "txt/cap0.txt" not in {h["id"] for h in hits}  # deleted in the new version
    after = _info()
    assert after["version"] == before["version"] + 1 and after["name"] == r.name
    assert after["started_at"] == before["started_at"]  # the same replica, hot-swapped
    assert after["loaded_at"] > before["loaded_at"]
