"""The vector index (exactness, modality filter, persistence on S3 over HTTP, bad input) and the
search core's hot swap to a newly published version. No Ray needed here."""

from __future__ import annotations

import uuid

import numpy as np
import pytest

from imagebind_core.errors import InvalidInput
from imagebind_core.index import INDEX_DIR, Pointer, VectorIndex, load_latest
from pipelines.publish import IndexRoot, version_name


def clustered(n: int, dim: int, clusters: int, seed: int) -> np.ndarray:
    """Unit vectors around a few centres: structure like real embeddings, unlike pure noise."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim))
    x = centres[rng.integers(0, clusters, n)] + 0.3 * rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def rows(n: int, mods: list[str]) -> tuple[list[str], list[str], list[str]]:
    ids = [f"item-{i:05d}" for i in range(n)]
    return ids, [f"s3://corpus/{i}" for i in ids], [mods[i % len(mods)] for i in range(n)]


@pytest.mark.parametrize("flat_threshold", [10**9, 50], ids=["flat", "ivf"])
def test_every_item_finds_itself_first(flat_threshold):
    n, dim = 600, 32
    emb = clustered(n, dim, clusters=8, seed=1)
    ids, uris, mods = rows(n, ["vision", "text", "audio"])
    index = VectorIndex.build(ids, uris, mods, emb, flat_threshold=flat_threshold, nprobe=1)
    assert {p.kind for p in index.parts.values()} == ({"flat"} if flat_threshold > n else {"ivf"})
    for i in range(0, n, 7):
        hits = index.search(emb[i].tolist(), 5)
        assert hits[0]["id"] == ids[i], i
        assert hits[0]["uri"] == uris[i] and hits[0]["modality"] == mods[i]
        assert hits[0]["score"] == pytest.approx(1.0, abs=1e-5)
        assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)


def test_modality_filter_and_merge_match_brute_force():
    n, dim = 300, 16
    emb = clustered(n, dim, clusters=4, seed=2)
    ids, uris, mods = rows(n, ["vision", "text", "audio"])
    index = VectorIndex.build(ids, uris, mods, emb)
    q = clustered(1, dim, clusters=1, seed=3)[0]
    scores = emb @ q
    for filt in (None, "text", "audio"):
        hits = index.search(q.tolist(), 10, filt)
        keep = [i for i in range(n) if filt is None or mods[i] == filt]
        expect = sorted(keep, key=lambda i: -scores[i])[:10]
        assert [h["id"] for h in hits] == [ids[i] for i in expect]
        assert all(filt is None or h["modality"] == filt for h in hits)
    assert index.search(q.tolist(), 10, "imu") == []  # known modality, no items
    assert len(index.search(q.tolist(), 1000)) == n  # top_k above count returns all


def test_scores_do_not_depend_on_the_query_scale():
    emb = clustered(50, 16, clusters=3, seed=5)
    index = VectorIndex.build(*rows(50, ["text"]), emb)
    q = emb[7].astype(np.float64)
    want = index.search(q.tolist(), 5)
    for scale in (1e38, 1e-30, 3.0):  # float32 would overflow / underflow the norm
        got = index.search((q * scale).tolist(), 5)
        assert [h["id"] for h in got] == [h["id"] for h in want], scale
        assert [h["score"] for h in got] == pytest.approx([h["score"] for h in want], abs=1e-6)
    assert want[0]["score"] == pytest.approx(1.0, abs=1e-5)


def test_bad_queries_are_named():
    emb = clustered(20, 8, clusters=2, seed=4)
    index = VectorIndex.build(*rows(20, ["text"]), emb)
    for vector, top_k, mod, field in [
        ([0.1] * 7, 3, None, "vector"),
        ([0.0] * 8, 3, None, "vector"),
        ([float("nan")] * 8, 3, None, "vector"),
        ([0.1] * 8, 0, None, "top_k"),
        ([0.1] * 8, 5000, None, "top_k"),
        ([0.1] * 8, 3, "smell", "modality"),
        (["a"] * 8, 3, None, "vector"),
    ]:
        with pytest.raises(InvalidInput) as e:
            index.search(vector, top_k, mod)
        assert e.value.modality == field


def test_save_load_roundtrip_on_s3(s3_server):
    bucket = s3_server.create_bucket(f"vi-{uuid.uuid4().hex[:8]}")
    n, dim = 400, 24
    emb = clustered(n, dim, clusters=6, seed=5)
    ids, uris, mods = rows(n, ["vision", "depth"])
    index = VectorIndex.build(ids, uris, mods, emb, flat_threshold=100)
    uri = f"s3://{bucket}/v/{INDEX_DIR}"
    index.save(uri, s3_server.storage_options)
    back = VectorIndex.load(uri, s3_server.storage_options)
    assert back.count == n and back.dim == dim
    assert {m: (p.kind, p.count) for m, p in back.parts.items()} == {
        "vision": ("ivf", 200),
        "depth": ("ivf", 200),
    }
    for i in (0, 1, 199, 399):
        assert back.search(emb[i].tolist(), 3) == index.search(emb[i].tolist(), 3)
    with pytest.raises(FileNotFoundError, match=r"meta\.json"):
        VectorIndex.load(f"s3://{bucket}/nothing", s3_server.storage_options)


def _publish(ir: IndexRoot, version: int, emb: np.ndarray, ids: list[str]) -> Pointer:
    pointer, etag = ir.latest()
    name = version_name(version, uuid.uuid4().hex[:6])
    VectorIndex.build(ids, ids, ["text"] * len(ids), emb).save(
        f"{ir.version_uri(name)}/{INDEX_DIR}", ir.storage_options
    )
    ir.write_record(name, {"version": version, "parent_name": pointer and pointer.name})
    new = Pointer(version, name, "2026-01-01T00:00:00+00:00")
    ir.publish(new, etag)
    return new


def test_search_core_hot_swaps_to_a_new_version(s3_server):
    from serve.search import IndexNotReady, SearchIndexCore

    bucket = s3_server.create_bucket(f"swap-{uuid.uuid4().hex[:8]}")
    root = f"s3://{bucket}/idx"
    ir = IndexRoot(root, s3_server.storage_options)
    core = SearchIndexCore(root, s3_server.storage_options, poll_interval_s=0.2)
    try:
        with pytest.raises(IndexNotReady):
            core.search_sync([1.0] * 8, 1)
        assert core.info_sync()["version"] is None
        emb1 = clustered(10, 8, clusters=2, seed=6)
        _publish(ir, 1, emb1, [f"a{i}" for i in range(10)])
        _wait(lambda: core.info_sync()["version"] == 1)
        assert core.search_sync(emb1[3].tolist(), 1)[0]["id"] == "a3"
        emb2 = clustered(12, 8, clusters=2, seed=7)
        p2 = _publish(ir, 2, emb2, [f"b{i}" for i in range(12)])
        _wait(lambda: core.info_sync()["version"] == 2)
        info = core.info_sync()
        assert (info["name"], info["count"], info["modalities"]) == (p2.name, 12, {"text": 12})
        assert core.search_sync(emb2[5].tolist(), 1)[0]["id"] == "b5"
        # load_latest agrees with what the core serves
        pointer, index = load_latest(root, s3_server.storage_options)
        assert pointer == p2 and index.count == 12
    finally:
        core.close()


def _wait(cond, timeout: float = 20.0) -> None:
    import time

    deadline = time.time() + timeout
    while not cond():
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)
