"""The search page's endpoints without a browser: `GET /v1/index`, `/v1/media`, `/v1/thumbnail`,
`POST /v1/search` by id, the page's static files, and the index's by-id lookups.

The ingress logic (`EmbeddingService`) runs against a `SearchIndexCore` over a small index
published by `pipelines.publish` into a temporary folder, through a stand-in handle, with no
Ray; the browser test (test_search_page_browser.py) runs the whole app.
"""

from __future__ import annotations

import asyncio
import io
import json
import os

import media
import numpy as np
import pytest
from PIL import Image

from imagebind_core.index import Pointer, VectorIndex, join_uri
from pipelines.publish import IndexRoot

DIM = 8


class _Method:
    def __init__(self, fn) -> None:
        self.fn = fn

    def remote(self, *args):
        async def call():
            return self.fn(*args)

        return call()


class CoreHandle:
    """The `SearchIndex` deployment's methods over a `SearchIndexCore`, without Serve."""

    def __init__(self, core) -> None:
        self.search = _Method(core.search_sync)
        self.similar = _Method(core.similar_sync)
        self.item = _Method(core.item_sync)
        self.info = _Method(core.info_sync)


def publish(root: str, items: list[tuple[str, str, str]], version: int = 1) -> np.ndarray:
    """Publish an index of `(id, uri, modality)` rows with random vectors; the vectors."""
    vecs = np.random.default_rng(version).normal(size=(len(items), DIM)).astype(np.float32)
    index = VectorIndex.build(*zip(*items, strict=True), vecs)
    ir = IndexRoot(root)
    name = f"{version:08d}-test"
    index.save(join_uri(ir.version_uri(name), "index"))
    ir.write_record(name, {"version": version, "name": name, "counts": {"added": len(items)}})
    _, etag = ir.latest()
    ir.publish(Pointer(version, name, "2026-01-01T00:00:00+00:00"), etag)
    return vecs


@pytest.fixture
def corpus(tmp_path):
    media_dir = tmp_path / "media"
    media_dir.mkdir()
    (media_dir / "pic.png").write_bytes(media.make_image("PNG", size=(320, 240)))
    (media_dir / "clip.mp4").write_bytes(media.make_video(seconds=1.0, size=(160, 120)))
    (media_dir / "broken.png").write_bytes(media.truncated(media.make_image("PNG"), 0.3))
    (media_dir / "cap.txt").write_text("a red kite over the dunes")
    (media_dir / "tone.wav").write_bytes(media.make_wav(seconds=0.5))
    outside = tmp_path / "secret.png"
    outside.write_bytes(media.make_image("PNG", seed=3))
    (media_dir / "link.png").symlink_to(outside)
    items = [
        ("pic", str(media_dir / "pic.png"), "vision"),
        ("clip", str(media_dir / "clip.mp4"), "video"),
        ("broken", str(media_dir / "broken.png"), "vision"),
        ("gone", str(media_dir / "gone.png"), "vision"),
        ("cap", f"file://{media_dir}/cap.txt", "text"),
        ("tone", str(media_dir / "tone.wav"), "audio"),
        ("outside", str(outside), "vision"),
        ("link", str(media_dir / "link.png"), "vision"),
        ("remote", "s3://bucket/other/x.png", "vision"),
    ]
    root = str(tmp_path / "index")
    vecs = publish(root, items)
    return {"root": root, "media": str(media_dir), "items": items, "vecs": vecs}


def service(corpus, **args):
    from serve.ingress import EmbeddingService
    from serve.options import AppArgs
    from serve.search import SearchIndexCore

    core = SearchIndexCore(corpus["root"], poll_interval_s=0)
    settings = {
        "preset": "tiny",
        "index_uri": corpus["root"],
        "media_local_dirs": [corpus["media"]],
        "s3_allowed_prefixes": ["s3://bucket/allowed/"],
        **args,
    }
    app_args = AppArgs(**settings)
    return EmbeddingService(app_args, {}, CoreHandle(core)), core


def request(path: str = "/", key: str | None = None, body: bytes = b""):
    from starlette.requests import Request

    headers = [(b"content-type", b"application/json")]
    if key:
        headers.append((b"authorization", f"Bearer {key}".encode()))

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    scope = {"type": "http", "method": "GET", "path": path, "headers": headers}
    return Request({**scope, "query_string": b""}, receive)


def call(coro):
    """Run a service coroutine: (status, headers, body) of its response or its APIError."""
    from serve.http import APIError

    try:
        r = asyncio.run(coro)
    except APIError as e:
        return e.status, e.headers, e.message
    return r.status_code, r.headers, r.body


# --------------------------------------------------------------------------- the index


def test_items_and_stored_vectors_by_id_flat_and_ivf():
    rng = np.random.default_rng(0)
    n = 80
    vecs = rng.normal(size=(n, DIM)).astype(np.float32)
    ids = [f"i{k}" for k in range(n)]
    kinds = ["vision" if k % 2 else "text" for k in range(n)]
    for threshold in (10_000, 10):  # exact flat parts, then IVF parts
        index = VectorIndex.build(
            ids, [f"/m/{i}" for i in ids], kinds, vecs, flat_threshold=threshold
        )
        assert {p.kind for p in index.parts.values()} == {"flat" if threshold > n else "ivf"}
        for k in (0, 7, 79):
            got = index.vector_of(f"i{k}")
            want = vecs[k] / np.linalg.norm(vecs[k])
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
            assert index.item(f"i{k}") == {"id": f"i{k}", "uri": f"/m/i{k}", "modality": kinds[k]}
            hits = index.search(got, 3)
            assert hits[0]["id"] == f"i{k}" and hits[0]["score"] == pytest.approx(1.0, abs=1e-5)
        assert index.vector_of("nope") is None and index.item("nope") is None


def test_search_by_id_is_more_like_this(corpus):
    svc, core = service(corpus)

    def search(body: dict):
        return call(svc.search(request("/v1/search", body=json.dumps(body).encode())))

    status, _, body = search({"id": "pic", "top_k": 3})
    hits = json.loads(body)["data"]
    assert status == 200 and hits[0]["id"] == "pic"
    assert hits[0]["score"] == pytest.approx(1.0, abs=1e-5)
    # the same hits as a search with the item's stored vector
    assert [h["id"] for h in hits] == [h["id"] for h in core.search_sync(corpus["vecs"][0], 3)]
    status, _, body = search({"id": "pic", "top_k": 5, "filter_modality": "text"})
    assert status == 200 and [h["id"] for h in json.loads(body)["data"]] == ["cap"]
    status, _, msg = search({"id": "nope"})
    assert status == 404 and "nope" in msg
    status, _, msg = search({"id": "pic", "input": "a dog"})
    assert status == 400 and msg.startswith("give exactly one of"), msg  # no pydantic prefix


# --------------------------------------------------------------------------- version


def test_index_info_names_the_version_and_its_counts(corpus):
    svc, _ = service(corpus)
    status, _, body = call(svc.page.index_info(request("/v1/index")))
    info = json.loads(body)
    assert status == 200 and info["version"] == 1 and info["name"] == "00000001-test"
    assert info["count"] == 9 and info["modalities"]["vision"] == 6
    assert info["counts"] == {"added": 9}


# --------------------------------------------------------------------------- media


def test_media_of_published_items_only_with_allow_lists(corpus):
    svc, _ = service(corpus)

    def media_of(item_id: str):
        return call(svc.page.media(request("/v1/media"), item_id))

    status, headers, body = media_of("pic")
    assert status == 200 and headers["content-type"] == "image/png"
    with open(os.path.join(corpus["media"], "pic.png"), "rb") as f:
        assert body == f.read()
    assert (
        headers["x-content-type-options"] == "nosniff"
        and "sandbox" in headers["content-security-policy"]
    )
    status, headers, body = media_of("cap")  # a file:// URI inside the folder
    assert status == 200 and body == b"a red kite over the dunes"
    assert headers["content-type"].startswith("text/plain")
    assert media_of("tone")[1]["content-type"].startswith("audio/")
    # not in the published version: 404, whatever is on disk
    status, _, msg = media_of("../secret.png")
    assert status == 404 and "no item" in msg
    # in the index but outside the allow-lists: a file outside the folder, a symlink that
    # leads out of it, an s3:// URI outside the prefixes
    for item_id in ("outside", "link", "remote"):
        status, _, msg = media_of(item_id)
        assert status == 403 and "not under an allowed" in msg, item_id
    # in the index and allowed, but gone from the store
    status, _, msg = media_of("gone")
    assert status == 404 and "not found" in msg
    status, _, _ = media_of("")
    assert status == 400


def test_media_and_thumbnails_answer_504_past_the_deadline(corpus):
    """A media read that does not finish (a stuck store, a FIFO) answers 504 within the
    request's deadline, as the API's routes do."""
    import threading

    svc, _ = service(corpus, request_timeout_s=0.3)
    release = threading.Event()

    def stuck(item):
        release.wait(30)
        raise AssertionError("released")

    svc.inputs.read_media = stuck
    try:
        for route in (svc.page.media(request("/v1/media"), "pic"),
                      svc.page.thumbnail(request("/v1/thumbnail"), "pic", 64)):  # fmt: skip
            status, _, msg = call(route)
            assert status == 504 and "timed out after 0.3 s" in msg, (status, msg)
    finally:
        release.set()
    del svc.inputs.read_media  # the store answers again: so does the route
    status, _, _ = call(svc.page.media(request("/v1/media"), "pic"))
    assert status == 200


def test_media_allow_list_rules(corpus):
    svc, _ = service(corpus)
    d = corpus["media"]
    assert svc.inputs.media_allowed(f"{d}/pic.png") and svc.inputs.media_allowed(
        f"file://{d}/pic.png"
    )
    assert svc.inputs.media_allowed("s3://bucket/allowed/a/b.png")
    for uri in (
        f"{d}/../secret.png",  # resolved before the check
        f"{d}-sibling/pic.png",  # a folder is not a string prefix
        "s3://bucket/allowed/../other/x.png",
        "s3://bucket/allowedx/x.png",
        "https://example.com/x.png",
        "/etc/passwd",
    ):
        assert not svc.inputs.media_allowed(uri), uri
    # no folder configured: no local file at all
    svc, _ = service(corpus, media_local_dirs=[])
    assert not svc.inputs.media_allowed(f"{d}/pic.png")


def test_a_link_swapped_in_after_the_check_is_not_followed(corpus, tmp_path, monkeypatch):
    # The check (`media_allowed`) resolves links; a writer of the corpus then swaps the file,
    # or a folder above it, for a link out of the media folders before the read. The read
    # opened the unresolved path and served the outside file (345 of 1,500 racing requests
    # in an adversarial run). Now it opens component by component, never following a link.
    import os

    import imagebind_core as ibc

    svc, _ = service(corpus)
    d = corpus["media"]
    secret = tmp_path / "outside"
    secret.mkdir()
    (secret / "cap.txt").write_text("TOP SECRET")
    os.makedirs(f"{d}/sub")
    (tmp_path / "media" / "sub" / "cap.txt").write_text("inside")
    item = {"uri": f"{d}/sub/cap.txt", "modality": "text"}
    assert svc.inputs.media_allowed(item["uri"])
    assert svc.inputs.read_media(item) == b"inside"
    os.replace(f"{d}/sub", f"{d}/sub-moved")
    os.symlink(secret, f"{d}/sub")  # a folder above the file, now a link out
    os.symlink(secret / "cap.txt", f"{d}/cap2.txt")  # a file, a link out
    link_out = {"uri": f"file://{d}/cap2.txt", "modality": "text"}
    for it in (item, link_out):  # swapped before the read resolves the path: refused
        with pytest.raises(ibc.InvalidInput, match="not inside media_local_dirs"):
            svc.inputs.read_media(it)
    # Swapped after the path was resolved (the race): paths resolve to themselves here, so
    # only the component-by-component open stands between the read and the outside file.
    with monkeypatch.context() as mp:
        mp.setattr(os.path, "realpath", lambda p: p)
        for it in (item, link_out):
            with pytest.raises(ibc.InvalidInput, match="cannot read it"):
                svc.inputs.read_media(it)
        # Through the route, with a check that passed before the swap: 404, not the bytes.
        mp.setattr(svc.inputs, "media_allowed", lambda uri: True)
        status, _, msg = call(svc.page.media(request("/v1/media"), "link"))
        assert status == 404 and "cannot read it" in msg, (status, msg)
    # A link inside the folder to a file inside it is still served; a NUL byte is refused.
    os.symlink(f"{d}/pic.png", f"{d}/alias.png")
    got = svc.inputs.read_media({"uri": f"{d}/alias.png", "modality": "vision"})
    assert got == (tmp_path / "media" / "pic.png").read_bytes()
    assert not svc.inputs.media_allowed(f"{d}/pic\0.png")


def test_media_and_thumbnails_ask_for_the_key(corpus):
    svc, _ = service(corpus, api_key="sesame")
    for key in (None, "wrong"):
        assert call(svc.page.media(request("/v1/media", key), "pic"))[0] == 401
        assert call(svc.page.thumbnail(request("/v1/thumbnail", key), "pic", 64))[0] == 401
        assert call(svc.page.index_info(request("/v1/index", key)))[0] == 401
        # 401 before anything else: an unknown id does not tell what the index holds
        assert call(svc.page.media(request("/v1/media", key), "nope"))[0] == 401
    assert call(svc.page.media(request("/v1/media", "sesame"), "pic"))[0] == 200
    assert call(svc.page.thumbnail(request("/v1/thumbnail", "sesame"), "pic", 64))[0] == 200


def test_no_index_no_media():
    from serve.ingress import EmbeddingService
    from serve.options import AppArgs

    svc = EmbeddingService(AppArgs(preset="tiny"), {})
    status, _, msg = call(svc.page.media(request("/v1/media"), "pic"))
    assert status == 404 and "index_uri" in msg
    assert call(svc.page.index_info(request("/v1/index")))[0] == 404


# --------------------------------------------------------------------------- thumbnails


def test_thumbnails_are_bounded_jpegs_of_images_and_video_frames(corpus):
    svc, _ = service(corpus)
    for item_id, size, want in (
        ("pic", 100, (100, 75)),
        ("clip", 64, (64, 48)),
        ("pic", 512, (320, 240)),
    ):
        status, headers, body = call(svc.page.thumbnail(request(), item_id, size))
        assert status == 200 and headers["content-type"] == "image/jpeg", (item_id, body[:200])
        im = Image.open(io.BytesIO(body))
        assert im.format == "JPEG" and im.size == want  # aspect kept, never enlarged
    for size in (0, 15, 1025):
        status, _, msg = call(svc.page.thumbnail(request(), "pic", size))
        assert status == 400 and "size" in msg
    status, _, msg = call(svc.page.thumbnail(request(), "cap", 64))
    assert status == 400 and "of modality text" in msg
    assert call(svc.page.thumbnail(request(), "nope", 64))[0] == 404
    assert call(svc.page.thumbnail(request(), "outside", 64))[0] == 403


def test_bad_or_missing_media_give_the_placeholder(corpus):
    svc, _ = service(corpus)
    from serve.media import UI_DIR

    with open(os.path.join(UI_DIR, "placeholder.svg"), "rb") as f:
        placeholder = f.read()
    for item_id, reason in (("broken", "cannot decode"), ("gone", "not found")):
        status, headers, body = call(svc.page.thumbnail(request(), item_id, 64))
        assert status == 200 and headers["content-type"] == "image/svg+xml"
        assert body == placeholder and reason in headers["x-placeholder"]
        assert headers["cache-control"] == "no-store"
    assert len(svc.page.thumbnails) == 0  # placeholders are never cached
    # fixed in place: the next request makes the real thumbnail
    with open(os.path.join(corpus["media"], "gone.png"), "wb") as f:
        f.write(media.make_image("PNG", size=(64, 64)))
    status, headers, _ = call(svc.page.thumbnail(request(), "gone", 64))
    assert status == 200 and headers["content-type"] == "image/jpeg"


def test_thumbnail_cache_is_used_and_bounded(corpus, tmp_path):
    svc, _ = service(corpus)
    _, _, first = call(svc.page.thumbnail(request(), "pic", 128))
    os.remove(os.path.join(corpus["media"], "pic.png"))
    status, headers, again = call(svc.page.thumbnail(request(), "pic", 128))
    assert status == 200 and again == first  # from the cache: the file is gone
    assert headers["content-type"] == "image/jpeg"

    # A cache of a few thumbnails' bytes keeps the most recently used, within its bound.
    d = tmp_path / "many"
    d.mkdir()
    items = []
    for k in range(8):
        (d / f"{k}.png").write_bytes(media.make_image("PNG", size=(200, 150), seed=k))
        items.append((f"p{k}", str(d / f"{k}.png"), "vision"))
    small = {"root": str(tmp_path / "idx2"), "media": str(d)}
    publish(small["root"], items)
    one = len(call(service(small)[0].page.thumbnail(request(), "p0", 200))[2])
    bound = int(3.5 * one)
    svc, _ = service(small, thumbnail_cache_bytes=bound)
    sizes = []
    for k in range(8):
        status, _, body = call(svc.page.thumbnail(request(), f"p{k}", 200))
        assert status == 200
        sizes.append(len(body))
        assert svc.page.thumbnails.currsize <= bound
    assert 1 <= len(svc.page.thumbnails) < 8
    assert (1, "p7", 200) in svc.page.thumbnails and (1, "p0", 200) not in svc.page.thumbnails
    # 0 turns the cache off
    svc, _ = service(small, thumbnail_cache_bytes=0)
    assert (
        call(svc.page.thumbnail(request(), "p1", 200))[0] == 200 and len(svc.page.thumbnails) == 0
    )


def test_make_thumbnail_refuses_what_it_cannot_show():
    from imagebind_core import InvalidInput
    from imagebind_core.thumbnail import make_thumbnail

    with pytest.raises(InvalidInput, match="pixel"):
        make_thumbnail(media.png_declaring(30000, 30000), "vision")
    with pytest.raises(InvalidInput, match="no thumbnail"):
        make_thumbnail(b"abc", "audio")
    with pytest.raises(InvalidInput):
        make_thumbnail(media.random_bytes(), "video")


# --------------------------------------------------------------------------- the page's files


def test_page_files_and_nothing_else():
    from serve.http import APIError
    from serve.media import ui_file

    page = ui_file("index.html")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
    # what docs/serve.md says: media only from blob: URLs (and the page's own placeholder)
    directives = dict(d.strip().split(" ", 1) for d in csp.split(";"))
    assert directives["img-src"] == "'self' blob:" and directives["media-src"] == "'self' blob:"
    html = page.body.decode()
    # no CDN: every script, style and image the page names is one of its own files
    assert "http://" not in html and "https://" not in html
    assert 'src="app.js"' in html and 'href="app.css"' in html
    assert ui_file("app.js").headers["content-type"].startswith("text/javascript")
    for name in ("../ingress.py", "ingress.py", "", "%2e%2e/schemas.py"):
        with pytest.raises(APIError) as e:
            ui_file(name)
        assert e.value.status == 404


def test_page_files_are_package_data():
    import tomllib

    with open(os.path.join(os.path.dirname(__file__), "..", "pyproject.toml"), "rb") as f:
        data = tomllib.load(f)["tool"]["setuptools"]["package-data"]["serve"]
    import fnmatch

    from serve.media import UI_DIR, UI_FILES

    for name in UI_FILES:
        assert os.path.isfile(os.path.join(UI_DIR, name))
        assert any(fnmatch.fnmatch(f"ui/{name}", pat) for pat in data), name
