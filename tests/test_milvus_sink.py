"""The Milvus sink (`index.milvus`, pipelines.milvus_sink) against milvus-lite 2.5 — Milvus'
own C++ engine (segcore/knowhere) as one local process, here on a unix socket.

A re-index of a local caption-and-picture corpus, tiny preset: after a first version, an
add/change/rename/delete round and an unchanged rerun, the collection's rows equal the
published version's rows (ids, float32 vectors bit for bit, uri, modality, fingerprint), and a
top-k query on the exact (FLAT) collection returns the built-in index's ids. A sink that fails
half-way leaves the version published (exit status 4) and the next run brings Milvus up to
date; a sink that missed a version catches up; a collection the sink did not create is left
alone; bad `index.milvus` settings are refused naming the field.
"""

from __future__ import annotations

import os
import uuid

import media
import numpy as np
import pyarrow as pa
import pytest
from helpers.milvus import milvus_lite, milvus_lite_lib
from helpers.pipeline import SMALL_FILES_JOB, Writer
from helpers.reindex import TEXTS, by_id, version_rows

from imagebind_core.index import load_latest
from pipelines import milvus_sink
from pipelines.config import ConfigError, MilvusSettings, load_reindex_config
from pipelines.milvus_sink import STATE_SUFFIX, MilvusSinkError, sync_version
from pipelines.reindex import reindex

pymilvus = pytest.importorskip("pymilvus")


@pytest.fixture(scope="module")
def milvus_uri():
    if milvus_lite_lib() is None:
        pytest.skip("milvus-lite 2.x is not installed (pip install '.[milvus]')")
    with milvus_lite() as uri:
        yield uri


@pytest.fixture
def client(milvus_uri):
    """A client whose every call opens and closes its connection: a connection left idle
    during a Ray run is dropped by the server (gRPC "too many pings"), and pymilvus shares
    one connection per URI with the sink's client."""

    class PerCall:
        def __getattr__(self, name):
            def call(*args, **kwargs):
                c = pymilvus.MilvusClient(uri=milvus_uri)
                try:
                    return getattr(c, name)(*args, **kwargs)
                finally:
                    c.close()

            return call

    return PerCall()


def _collection() -> str:
    return f"ib_{uuid.uuid4().hex[:10]}"


def _engine_rows(client, name: str) -> dict[str, dict]:
    got = client.query(
        name,
        filter='id != ""',
        output_fields=["id", "embedding", "uri", "modality", "fingerprint"],
        limit=16384,
        consistency_level="Strong",
    )
    return {r["id"]: r for r in got}


def _assert_engine_equals_version(client, name: str, root: str) -> pa.Table:
    """The collection holds exactly the published version's rows; returns them."""
    _, rows = version_rows(root, None)
    want = by_id(rows)
    got = _engine_rows(client, name)
    assert sorted(got) == sorted(want)
    for r in rows.to_pylist():
        e = got[r["id"]]
        assert np.asarray(e["embedding"], np.float32).tobytes() == want[r["id"]], r["id"]
        assert (e["uri"], e["modality"], e["fingerprint"]) == (
            r["uri"],
            r["modality"],
            r["fingerprint"],
        )
    return rows


def _held(client, name: str) -> str:
    got = client.query(
        name + STATE_SUFFIX, ids=[name], output_fields=["version"], consistency_level="Strong"
    )
    return got[0]["version"]


def _config(corpus: Writer, root: str, milvus: dict | None):
    over = {**SMALL_FILES_JOB, "input": corpus.root, "index.root": root}
    if milvus is not None:
        over["index.milvus"] = milvus
    return load_reindex_config(None, over)


def _corpus(tmp_path) -> Writer:
    c = Writer(str(tmp_path / "corpus"))
    for i, t in enumerate(TEXTS):
        c.put(f"txt/cap{i}.txt", t.encode())
    for i in range(3):
        c.put(f"img/pic{i}.png", media.make_image("PNG", size=(64, 48), seed=i))
    return c


def test_collection_follows_versions_and_answers_as_the_index(
    ray_session, milvus_uri, client, tmp_path
):
    name = _collection()
    corpus = _corpus(tmp_path)
    root = str(tmp_path / "index")
    sink = {"uri": milvus_uri, "collection": name, "index_type": "FLAT", "batch_size": 3}
    cfg = _config(corpus, root, sink)

    # 1. First version: a full load.
    r1 = reindex(cfg)
    assert r1.status == "published" and r1.exit_status == 0, r1
    assert r1.milvus["status"] == "loaded" and r1.milvus["upserted"] == 8, r1.milvus
    _assert_engine_equals_version(client, name, root)
    assert _held(client, name) == r1.name

    # 2. Add, change, relocate and delete: the version's change applied.
    corpus.put("txt/cap5.txt", b"a brand new caption")
    corpus.put("txt/cap0.txt", b"a red square, rewritten")
    os.rename(corpus.uri("img/pic2.png"), corpus.uri("img/moved.png"))
    corpus.rm("txt/cap1.txt")
    corpus.rm("img/pic1.png")
    r2 = reindex(cfg)
    assert r2.status == "published" and r2.exit_status == 0, r2
    assert r2.milvus["status"] == "applied", r2.milvus
    assert r2.milvus["held_before"] == r1.name
    # cap5 and img/moved.png added (a renamed file is a new id), cap0 changed
    assert (
        r2.milvus["upserted"] == r2.counts["added"] + r2.counts["changed"] + r2.counts["relocated"]
    )
    assert r2.milvus["deleted"] == r2.counts["deleted"] > 0
    rows = _assert_engine_equals_version(client, name, root)
    assert _held(client, name) == r2.name

    # 3. Unchanged rerun: nothing published, the collection already current.
    r3 = reindex(cfg)
    assert r3.status == "unchanged" and r3.milvus["status"] == "current", r3
    assert r3.milvus["upserted"] == r3.milvus["deleted"] == 0
    _assert_engine_equals_version(client, name, root)

    # 4. Top-k on the exact collection = the built-in index's top-k (exact: flat below
    # index.flat_threshold), for every row's own vector.
    _, index = load_latest(root)
    emb = np.asarray(rows.column("embedding").combine_chunks().flatten(), np.float32)
    emb = emb.reshape(rows.num_rows, -1)
    k = 4
    res = client.search(
        name, data=[e for e in emb], limit=k, output_fields=["id"], consistency_level="Strong"
    )
    for q, hits in zip(emb, res, strict=True):
        ours = index.search(q, k)
        assert [h["id"] for h in hits] == [h["id"] for h in ours]
        np.testing.assert_allclose(
            [h["distance"] for h in hits], [h["score"] for h in ours], rtol=1e-5, atol=1e-5
        )


def test_failed_sink_keeps_the_version_and_the_next_run_catches_up(
    ray_session, milvus_uri, client, tmp_path, monkeypatch
):
    name = _collection()
    corpus = _corpus(tmp_path)
    root = str(tmp_path / "index")
    sink = {"uri": milvus_uri, "collection": name, "batch_size": 2}
    r1 = reindex(_config(corpus, root, sink))
    assert r1.milvus["status"] == "loaded", r1.milvus

    # The sink dies after upserting, before deleting: the version stands, the run says so.
    corpus.put("txt/cap6.txt", b"one more")
    corpus.rm("txt/cap2.txt")

    def boom(self, ids):
        raise ConnectionError("injected: connection reset")

    monkeypatch.setattr(milvus_sink._Sink, "_delete", boom)
    r2 = reindex(_config(corpus, root, sink))
    monkeypatch.undo()
    assert r2.status == "published" and r2.exit_status == 4, r2
    assert r2.milvus["status"] == "failed", r2.milvus
    assert "injected" in r2.milvus["message"] and r2.milvus["uri"] == milvus_uri
    assert "milvus" in r2.format() and "failed" in r2.format()
    assert version_rows(root, None)[0] == r2.name  # published all the same
    assert _held(client, name) == r1.name  # the half-applied change is not recorded

    # The next run publishes nothing and loads the collection to the current version.
    r3 = reindex(_config(corpus, root, sink))
    assert r3.status == "unchanged" and r3.exit_status == 0, r3
    assert r3.milvus["status"] == "loaded" and r3.milvus["deleted"] == 1, r3.milvus
    _assert_engine_equals_version(client, name, root)
    assert _held(client, name) == r2.name

    # A version published without the sink is missed; the next run with it catches up.
    corpus.put("txt/cap7.txt", b"published while the sink was off")
    assert reindex(_config(corpus, root, None)).status == "published"
    corpus.rm("txt/cap7.txt")
    r5 = reindex(_config(corpus, root, sink))
    assert r5.status == "published" and r5.milvus["status"] == "loaded", r5.milvus
    _assert_engine_equals_version(client, name, root)


def _rows(ids: list[str], dim: int, seed: int = 0) -> pa.Table:
    v = np.random.default_rng(seed).standard_normal((len(ids), dim)).astype(np.float32)
    return pa.table(
        {
            "id": ids,
            "uri": [f"file:///{i}" for i in ids],
            "modality": ["text"] * len(ids),
            "fingerprint": ["f"] * len(ids),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(v.ravel()), dim),
        }
    )


def test_foreign_collection_refused_and_embedding_size_change_recreates(milvus_uri, client):
    settings = MilvusSettings(uri=milvus_uri, collection=_collection())
    schema = pymilvus.MilvusClient.create_schema(auto_id=False)
    schema.add_field("pk", pymilvus.DataType.INT64, is_primary=True)
    schema.add_field("v", pymilvus.DataType.FLOAT_VECTOR, dim=4)
    client.create_collection(settings.collection, schema=schema)
    r = sync_version(
        settings, version="1-a", parent=None, rows=lambda: _rows(["a"], 4), upsert_ids=None,
        delete_ids=None, dim=4,
    )  # fmt: skip
    assert r.status == "failed" and "not one this sink created" in r.message, r
    assert client.describe_collection(settings.collection)["fields"][0]["name"] == "pk"

    own = MilvusSettings(uri=milvus_uri, collection=_collection())
    args = {"parent": None, "upsert_ids": None, "delete_ids": None}
    r1 = sync_version(own, version="1-a", rows=lambda: _rows(["a", "b"], 4), dim=4, **args)
    assert r1.status == "loaded" and r1.upserted == 2, r1
    r2 = sync_version(own, version="2-b", rows=lambda: _rows(["c"], 8, 1), dim=8, **args)
    assert r2.status == "loaded", r2
    got = _engine_rows(client, own.collection)
    assert sorted(got) == ["c"] and len(got["c"]["embedding"]) == 8
    # The change of a version whose parent the collection does not hold is not applied.
    r3 = sync_version(
        own, version="4-d", parent="3-c", rows=lambda: _rows(["c", "d"], 8, 1),
        upsert_ids=["d"], delete_ids=[], dim=8,
    )  # fmt: skip
    assert r3.status == "loaded" and r3.held_before == "2-b", r3
    assert sorted(_engine_rows(client, own.collection)) == ["c", "d"]
    with pytest.raises(MilvusSinkError, match="lack the column"):
        list(milvus_sink._batches(_rows(["x"], 4).drop(["uri"]), 10, 4))


@pytest.mark.parametrize(
    ("milvus", "needle"),
    [
        ({"collection": "c"}, "index.milvus.uri"),
        ({"uri": "http://127.0.0.1:19530", "collection": "1bad-name"}, "index.milvus.collection"),
        ({"uri": "http://h:1", "collection": "c", "batch_size": 0}, "index.milvus.batch_size"),
        ({"uri": "http://h:1", "collection": "c", "colection": "x"}, "index.milvus.colection"),
    ],
)
def test_bad_milvus_settings_name_the_field(tmp_path, milvus, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_reindex_config(
            None, {"input": str(tmp_path), "index.root": str(tmp_path), "index.milvus": milvus}
        )
