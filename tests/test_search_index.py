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


def _rerank_table(ids: list[str], emb: np.ndarray):
    import pyarrow as pa

    return pa.table(
        {
            "id": pa.array(ids, pa.string()),
            "uri": pa.array([f"s3://corpus/{i}" for i in ids], pa.string()),
            "modality": pa.array(["vision"] * len(ids), pa.string()),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), emb.shape[1]),
        }
    )


def _hits(index: VectorIndex, queries: np.ndarray) -> list:
    return [[(h["id"], h["score"]) for h in index.search(q.tolist(), 10)] for q in queries]


def test_object_store_vectors_are_copied_once_mapped_and_pruned(s3_server, tmp_path):
    """With `vectors_cache`, an index on S3 maps its re-ranking vectors from local copies: the
    same answers as holding them in memory; a version that shares a segment with its parent
    reuses that copy; a truncated copy is fetched again; pruning keeps what a loaded version
    maps and deletes the rest (and stale partial downloads). The search core prunes after a
    swap."""
    import os
    import time

    from imagebind_core.index import IndexOptions, prune_vectors_cache, update_index

    bucket = s3_server.create_bucket(f"vc-{uuid.uuid4().hex[:8]}")
    so = s3_server.storage_options
    opts = IndexOptions(flat_threshold=100, pq_threshold=200, pq_m=8, nprobe=4, rerank=4)
    n, dim = 1200, 16
    emb = clustered(n + 100, dim, clusters=8, seed=11)
    ids = [f"item-{i:05d}" for i in range(n + 100)]
    t1 = _rerank_table(ids[:n], emb[:n])
    ir = IndexRoot(f"s3://{bucket}/root", so)
    names = [version_name(v, uuid.uuid4().hex[:6]) for v in (1, 2)]
    v1, v2 = (f"{ir.version_uri(name)}/{INDEX_DIR}" for name in names)
    update_index(v1, parent_uri=None, upserts=t1, deletes=[], all_rows=lambda: t1,
                 options=opts, storage_options=so)  # fmt: skip
    new = _rerank_table(ids[n:], emb[n:])
    r = update_index(v2, parent_uri=v1, upserts=new, deletes=ids[:50], all_rows=None,
                     options=opts, storage_options=so)  # fmt: skip
    assert r.mode == "updated"
    queries = clustered(20, dim, clusters=8, seed=12)
    cache = str(tmp_path / "cache")

    def copies() -> dict[str, int]:
        return {f: os.stat(os.path.join(cache, f)).st_ino for f in sorted(os.listdir(cache))}

    def mapped(index: VectorIndex) -> list[str]:
        return [
            p.vectors.filename
            for sh in index.shards.values()
            for seg in sh.segments
            for p in seg.parts.values()
        ]

    one = VectorIndex.load(v1, so, vectors_cache=cache)
    assert all(isinstance(f, str) and f.startswith(cache) for f in mapped(one))
    assert _hits(one, queries) == _hits(VectorIndex.load(v1, so), queries)
    first = copies()
    assert len(first) == len(mapped(one)) == 1

    two = VectorIndex.load(v2, so, vectors_cache=cache)
    assert _hits(two, queries) == _hits(VectorIndex.load(v2, so), queries)
    second = copies()
    assert len(second) == 2 and all(second[f] == ino for f, ino in first.items())  # reused

    shared = os.path.join(cache, next(iter(first)))
    # A torn copy in its place (a copy by other means that crashed): a new file, not the one
    # `one` and `two` map (truncating a mapped file would fault their reads).
    with open(shared, "rb") as f:
        head = f.read(1000)
    with open(shared + ".torn", "wb") as f:
        f.write(head)
    os.replace(shared + ".torn", shared)
    again = VectorIndex.load(v2, so, vectors_cache=cache)
    assert os.path.getsize(shared) > 1000
    assert _hits(again, queries) == _hits(two, queries)

    stray = os.path.join(cache, "0" * 32 + ".vectors.npy")
    old_part, new_part = f"{stray}.1-2.part", f"{stray}.3-4.part"
    for p in (stray, old_part, new_part):
        open(p, "wb").close()
    os.utime(old_part, (time.time() - 7200, time.time() - 7200))
    gone = prune_vectors_cache(cache, [again])
    assert sorted(gone) == sorted([stray, old_part])
    assert set(os.listdir(cache)) == set(second) | {os.path.basename(new_part)}
    assert _hits(again, queries) == _hits(two, queries)

    # The search core: a root on S3 served from the cache, pruned after each swap.
    from serve.search import SearchIndexCore

    def publish(version: int) -> None:
        pointer, etag = ir.latest()
        name = names[version - 1]
        ir.write_record(name, {"version": version, "parent_name": pointer and pointer.name})
        ir.publish(Pointer(version, name, "2026-01-01T00:00:00+00:00"), etag)

    publish(1)
    core_cache = str(tmp_path / "core")
    core = SearchIndexCore(ir.root, so, poll_interval_s=0, keep_previous_s=0,
                           vectors_cache=core_cache)  # fmt: skip
    assert len(os.listdir(core_cache)) == 1
    publish(2)
    assert core.refresh()
    assert len(os.listdir(core_cache)) == 2  # the new segment's copy; the previous kept
    assert core.search_sync(queries[0].tolist(), 10) == two.search(queries[0].tolist(), 10)
    core.refresh()  # the previous version's grace is over
    assert len(os.listdir(core_cache)) == 2  # both still used by the loaded version


def test_segment_ids_are_read_only_where_asked(tmp_path):
    """An update reads the ids of a segment's re-embedded rows (to rule out a label clash)
    a row group at a time, from the row groups that hold them: the same ids, in order."""
    import fsspec
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from imagebind_core.index import _segment_ids_at

    seg = tmp_path / "seg"
    seg.mkdir()
    ids = [f"id{i:03d}" for i in range(20)]
    pq.write_table(pa.table({"id": ids, "label": list(range(20))}), seg / "rows.parquet",
                   row_group_size=3)  # fmt: skip
    fs = fsspec.filesystem("file")
    for rows in ([], [0], [2, 3], [5, 6, 7, 19], list(range(20))):
        got = _segment_ids_at(fs, str(tmp_path), {"path": "seg"}, np.array(rows, np.int64))
        assert got == [ids[r] for r in rows]
