"""`rerank: auto` (imagebind_core.index): an IVF-PQ index measures, when it is built, the
re-ranking depth its searches need to reach `recall_target`, keeps it through updates, and
searches at it. No Ray needed here."""

from __future__ import annotations

import json
import logging

import numpy as np
import pyarrow as pa
import pytest

from imagebind_core.index import (
    RERANK_LEVELS,
    UNCALIBRATED_RERANK,
    IndexOptions,
    VectorIndex,
    read_index_meta,
    update_index,
)

DIM = 64
# IVF-PQ from 200 vectors on; 8 code bytes for 64 dimensions, so PQ scores alone rank the
# near neighbours of these tight clusters poorly and a useful depth is well above 1.
PQ = {"flat_threshold": 100, "pq_threshold": 200, "pq_m": 8, "nprobe": 16}
CENTRES = np.random.default_rng(0).standard_normal((50, DIM))


def mixture(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = CENTRES[rng.integers(0, len(CENTRES), n)] + 0.3 * rng.standard_normal((n, DIM))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def table(ids: list[str], emb: np.ndarray) -> pa.Table:
    return pa.table(
        {
            "id": pa.array(ids, pa.string()),
            "uri": pa.array([f"/corpus/{i}" for i in ids], pa.string()),
            "modality": pa.array(["vision"] * len(ids), pa.string()),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), DIM),
        }
    )


def recall_at(index: VectorIndex, emb: np.ndarray, queries: np.ndarray, k: int = 10) -> float:
    """Mean recall@k of `index.search` (its own depths) against exact search of `emb`
    (whose row i is the item `i{i}`)."""
    total = 0.0
    for q in queries:
        truth = set(np.argsort(-(emb @ q))[:k].tolist())
        got = {int(h["id"][1:]) for h in index.search(q, k, "vision")}
        total += len(got & truth) / k
    return total / len(queries)


@pytest.fixture(scope="module")
def corpus() -> tuple[list[str], np.ndarray]:
    n = 20_000
    return [f"i{i}" for i in range(n)], mixture(n, seed=1)


def test_auto_measures_the_depth_that_reaches_the_target_and_searches_at_it(corpus):
    ids, emb = corpus
    index = VectorIndex.build(ids, ids, ["vision"] * len(ids), emb, **PQ)
    assert index.options.rerank == "auto"  # the default
    t = index.training["vision"]
    assert t["kind"] == "ivfpq"
    assert t["rerank"] in RERANK_LEVELS and t["rerank_queries"] == 100
    assert t["rerank_recall"] >= index.options.recall_target
    assert index.rerank_depths == {"vision": t["rerank"]}
    # Fresh queries of the same mixture (not stored items), exact answers by brute force:
    # the measured depth holds on them. Each estimate is a mean of per-query recalls in
    # [0, 1] whose standard deviation near a 0.95 mean is at most sqrt(0.95 x 0.05) = 0.22:
    # standard errors <= 0.022 (100 queries) and <= 0.016 (these 200), <= 0.027 for their
    # difference; 0.08 below the target is 3 of those.
    queries = mixture(200, seed=2)
    assert recall_at(index, emb, queries) >= index.options.recall_target - 0.08
    # PQ scores alone are far from it on this data: the depth adapted to it, and the
    # default search uses it (a fixed depth of 1 finds less).
    assert t["rerank"] > 1
    shallow = VectorIndex.build(ids, ids, ["vision"] * len(ids), emb, **PQ, rerank=1)
    assert "rerank" not in shallow.training["vision"]  # a fixed depth is not measured
    assert recall_at(shallow, emb, queries) < index.options.recall_target - 0.08


def test_a_target_out_of_reach_takes_the_deepest_level_and_says_so(corpus, caplog):
    ids, emb = corpus
    ids, emb = ids[:5000], emb[:5000]
    with caplog.at_level(logging.WARNING, logger="imagebind_core.index"):
        index = VectorIndex.build(
            ids, ids, ["vision"] * len(ids), emb, **{**PQ, "nprobe": 1}, recall_target=1.0
        )
    t = index.training["vision"]
    assert t["rerank"] == RERANK_LEVELS[-1] and t["rerank_recall"] < 1.0
    assert "below the recall_target" in caplog.text and "nprobe" in caplog.text


def test_a_saved_index_keeps_its_depth_through_updates_and_measures_a_missing_one(corpus, tmp_path):
    ids, emb = corpus
    ids, emb = ids[:8000], emb[:8000]
    opts = IndexOptions(**PQ)
    v1, v2, v3 = (str(tmp_path / v) for v in ("v1", "v2", "v3"))
    base = table(ids, emb)
    r = update_index(
        v1, parent_uri=None, upserts=base.slice(0, 0), deletes=[], all_rows=lambda: base,
        options=opts,
    )  # fmt: skip
    assert r.mode == "built"
    built = read_index_meta(v1)["training"]["vision"]
    assert built["rerank"] in RERANK_LEVELS and built["rerank_queries"] == 100
    assert VectorIndex.load(v1).rerank_depths == {"vision": built["rerank"]}

    up = table([f"new{i}" for i in range(50)], mixture(50, seed=3))
    r = update_index(v2, parent_uri=v1, upserts=up, deletes=ids[:50], all_rows=None, options=opts)
    assert r.mode == "updated", r.reason
    kept = read_index_meta(v2)["training"]["vision"]
    assert {k: kept[k] for k in ("rerank", "rerank_recall")} == {
        k: built[k] for k in ("rerank", "rerank_recall")
    }

    # An index written before `rerank: auto` records no depth: searched at
    # UNCALIBRATED_RERANK until an update measures one.
    meta_file = tmp_path / "v2" / "meta.json"
    meta = json.loads(meta_file.read_text())
    for key in ("rerank", "rerank_recall", "rerank_queries"):
        del meta["training"]["vision"][key]
    meta_file.write_text(json.dumps(meta))
    assert VectorIndex.load(v2).rerank_depths == {"vision": UNCALIBRATED_RERANK}
    up2 = table([f"more{i}" for i in range(20)], mixture(20, seed=4))
    r = update_index(v3, parent_uri=v2, upserts=up2, deletes=[], all_rows=None, options=opts)
    assert r.mode == "updated", r.reason
    measured = read_index_meta(v3)["training"]["vision"]
    assert measured["rerank"] in RERANK_LEVELS and measured["rerank_queries"] == 100
    assert VectorIndex.load(v3).rerank_depths == {"vision": measured["rerank"]}


@pytest.mark.parametrize(
    "bad, field",
    [
        ({"rerank": "fast"}, "rerank"),
        ({"rerank": True}, "rerank"),
        ({"recall_target": 0}, "recall_target"),
        ({"recall_target": "high"}, "recall_target"),
    ],
)
def test_bad_rerank_options_are_named(bad, field):
    with pytest.raises(ValueError, match=field):
        IndexOptions(**bad)


def test_the_reindex_config_takes_auto_or_a_depth():
    from pipelines.config import ConfigError, load_reindex_config

    def opts(**index):
        over = {"input": "/in", "index.root": "/idx", **{f"index.{k}": v for k, v in index.items()}}
        return load_reindex_config(None, over).index.index_options()

    assert opts().rerank == "auto" and opts().recall_target == 0.95
    assert opts(rerank=50).rerank == 50
    assert opts(rerank="auto", recall_target=0.9).recall_target == 0.9
    for bad in ({"rerank": "deep"}, {"rerank": -1}, {"recall_target": 1.5}):
        with pytest.raises(ConfigError, match=r"index\.(rerank|recall_target)"):
            opts(**bad)


def test_an_index_built_on_an_object_store_measures_its_depth(corpus, s3_server):
    """The build writes to S3 (moto's server, real HTTP); the calibration searches a local
    copy of the re-ranking vectors and records the depth in the meta.json on S3."""
    import uuid

    ids, emb = corpus
    rows = table(ids[:3000], emb[:3000])
    bucket = s3_server.create_bucket(f"rr-{uuid.uuid4().hex[:8]}")
    uri, so = f"s3://{bucket}/v1", s3_server.storage_options
    r = update_index(
        uri, parent_uri=None, upserts=rows.slice(0, 0), deletes=[], all_rows=lambda: rows,
        options=IndexOptions(**PQ), storage_options=so,
    )  # fmt: skip
    assert r.mode == "built"
    t = read_index_meta(uri, so)["training"]["vision"]
    assert t["rerank"] in RERANK_LEVELS and t["rerank_queries"] == 100
    assert t["rerank_recall"] >= 0.95
    assert VectorIndex.load(uri, so).rerank_depths == {"vision": t["rerank"]}


def test_a_failed_measurement_leaves_the_index_whole_and_the_next_update_measures(
    corpus, tmp_path, monkeypatch, caplog
):
    """The measurement follows a build that may have taken an hour: when it fails, the build
    stands, the depth is unrecorded (searched at UNCALIBRATED_RERANK) and said, and the next
    update measures it."""
    ids, emb = corpus
    rows = table(ids[:3000], emb[:3000])
    opts = IndexOptions(**PQ)
    v1, v2 = str(tmp_path / "v1"), str(tmp_path / "v2")
    real = VectorIndex.calibrate_rerank

    def broken(self, *a, **k):
        raise OSError("No space left on device")

    monkeypatch.setattr(VectorIndex, "calibrate_rerank", broken)
    with caplog.at_level(logging.WARNING, logger="imagebind_core.index"):
        r = update_index(
            v1, parent_uri=None, upserts=rows.slice(0, 0), deletes=[], all_rows=lambda: rows,
            options=opts,
        )  # fmt: skip
    assert r.mode == "built"
    assert "could not measure the re-ranking depth (OSError: No space left" in caplog.text
    assert "rerank" not in read_index_meta(v1)["training"]["vision"]
    index = VectorIndex.load(v1)
    assert index.rerank_depths == {"vision": UNCALIBRATED_RERANK}
    assert index.search(emb[0], 1, "vision")[0]["id"] == ids[0]

    monkeypatch.setattr(VectorIndex, "calibrate_rerank", real)
    up = table(["new0"], mixture(1, seed=5))
    r = update_index(v2, parent_uri=v1, upserts=up, deletes=[], all_rows=None, options=opts)
    assert r.mode == "updated", r.reason
    assert read_index_meta(v2)["training"]["vision"]["rerank"] in RERANK_LEVELS
