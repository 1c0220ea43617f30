"""A re-index whose parent has a key snapshot (`pipelines.keys`) diffs each shard where it is
listed and joins only what differs: its diff equals the whole-corpus diff on Ray Data, the
version holds what a whole diff would give, each version's snapshot holds exactly what the
version holds, a snapshot that does not describe its version is not used, and retention keeps
the snapshot files that kept versions use."""

from __future__ import annotations

import os
import uuid

import pyarrow as pa
import pyarrow.compute as pc
import pytest
from helpers.pipeline import SMALL_JOB, Writer
from helpers.reindex import by_id, traced, version_rows

from pipelines import keys as ks
from pipelines.config import load_reindex_config
from pipelines.formats import PlanError
from pipelines.lineage import lineage_key
from pipelines.plan import list_items
from pipelines.publish import IndexRoot
from pipelines.reindex import _list_and_diff, _read_parent, reindex


def _manifest(corpus: Writer, name: str, rows: list[tuple[str, str]]) -> None:
    lines = ["id,modality,text"] + [f"{i},text,{t}" for i, t in rows]
    corpus.put(name, ("\n".join(lines) + "\n").encode())


def _cfg(corpus: str, root: str, trace: str, **extra):
    over = {
        **SMALL_JOB,
        "input": corpus,
        "index.root": root,
        "debug.trace_path": trace,
        "index.keep_versions": 10,
        "index.diff_on_ray_rows": 0,
        **extra,
    }
    return load_reindex_config(None, over)


def _snapshot(root: str, name: str, so: dict) -> dict:
    return IndexRoot(root, so).read_inputs(name)["keys"]


def _check_version(cfg, root: str, so: dict) -> str:
    """The published version holds exactly the corpus's listing, and its snapshot exactly the
    (shard, id, digest) of each listed item. Returns the version's name."""
    listing = list_items(cfg.job)
    name, rows = version_rows(root, so)
    _, errors = version_rows(root, so, errors=True)
    held = rows.column("id").to_pylist() + (errors.column("id").to_pylist() if errors else [])
    assert sorted(held) == sorted(listing.column("id").to_pylist())
    want = {
        (i, f, u)
        for i, f, u in zip(
            *(listing.column(c).to_pylist() for c in ("id", "fingerprint", "uri")), strict=True
        )
    }
    got = set(zip(*(rows.column(c).to_pylist() for c in ("id", "fingerprint", "uri")), strict=True))
    assert got <= want
    rec = _snapshot(root, name, so)
    assert rec["rows"] == listing.num_rows
    expected = set(
        zip(
            listing.column("shard").to_pylist(),
            listing.column("id").to_pylist(),
            ks.digests(listing).to_pylist(),
            strict=True,
        )
    )
    found = set()
    for shard in rec["bases"]:
        pairs = ks.shard_pairs(root, rec, shard, so)
        found |= {
            (shard, i, h)
            for i, h in zip(*(pairs.column(c).to_pylist() for c in ("id", "h")), strict=True)
        }
    assert found == expected
    return name


def _both_diffs(cfg, root: str, so: dict):
    """The next run's diff by shard and the whole-corpus diff, against the published version."""
    ir = IndexRoot(root, so)
    parent = _read_parent(cfg, ir, lineage_key(cfg.job))
    stage = ir.stage(parent.version + 1)
    listed, by_shard = _list_and_diff(cfg, ir, parent, stage)
    assert listed.diff is not None, "the snapshot was not used"
    parent.inputs = {k: v for k, v in parent.inputs.items() if k != "keys"}
    stage2 = ir.stage(parent.version + 1)
    listed2, whole = _list_and_diff(cfg, ir, parent, stage2)
    assert listed2.diff is None
    stage.discard()
    stage2.discard()
    return by_shard, whole


def _summary(d) -> dict:
    embed = sorted(zip(d.to_embed.column("id").to_pylist(), d.classes, strict=True))
    moved = sorted(zip(*(d.moved.column(c).to_pylist() for c in ("id", "new_uri")), strict=True))
    counts = {
        k: getattr(d, k)
        for k in ("added", "changed", "deleted", "retried", "reembedded", "relocated")
    }
    counts |= {"carried": d.carried_rows, "failed_kept": d.failed_kept}
    return {
        "embed": embed,
        "drop": sorted(d.drop_ids.to_pylist()),
        "moved": moved,
        "counts": counts,
        "to_embed_uris": sorted(d.to_embed.column("uri").to_pylist()),
    }


def test_diff_by_shard_equals_the_whole_diff_run_after_run(ray_session, tmp_path, monkeypatch):
    corpus = Writer(str(tmp_path / "corpus"))
    root, trace = str(tmp_path / "index"), str(tmp_path / "trace")
    _manifest(corpus, "m1.csv", [(f"a{i}", f"apple {i}") for i in range(1, 6)])
    _manifest(corpus, "m2.csv", [(f"b{i}", f"banana {i}") for i in range(1, 5)])
    _manifest(corpus, "m3.csv", [(f"c{i}", f"cherry {i}") for i in range(1, 4)])
    cfg = _cfg(corpus.root, root, trace)
    ir = IndexRoot(root, {})

    r1 = reindex(cfg)
    assert r1.status == "published" and r1.counts["added"] == 12
    assert ir.read_record(r1.name)["diff"] == "driver"  # the first version: no parent rows
    _check_version(cfg, root, {})
    rec1 = _snapshot(root, r1.name, {})
    assert set(rec1["bases"]) == {"m1", "m2", "m3"} and rec1["deltas"] == []
    _, rows1 = version_rows(root, {})
    v1 = by_id(rows1)

    # 2. In m1 a2 changes, a3 goes (a4 and a5 move up a row: relocated), a6 comes; b4 moves
    # from m2 to m3 (relocated); a new manifest m4.
    _manifest(corpus, "m1.csv", [("a1", "apple 1"), ("a2", "apple two"), ("a4", "apple 4"),
                                 ("a5", "apple 5"), ("a6", "apple 6")])  # fmt: skip
    _manifest(corpus, "m2.csv", [(f"b{i}", f"banana {i}") for i in range(1, 4)])
    _manifest(
        corpus, "m3.csv", [(f"c{i}", f"cherry {i}") for i in range(1, 4)] + [("b4", "banana 4")]
    )
    _manifest(corpus, "m4.csv", [("d1", "date 1"), ("d2", "date 2")])
    by_shard, whole = _both_diffs(cfg, root, {})
    assert _summary(by_shard) == _summary(whole)
    s = _summary(by_shard)
    assert s["embed"] == [("a2", "changed"), ("a6", "added"), ("d1", "added"), ("d2", "added")]
    assert s["drop"] == ["a2", "a3"] and s["counts"]["deleted"] == 1
    assert [i for i, _ in s["moved"]] == ["a4", "a5", "b4"]

    seen = len(traced(trace))
    r2 = reindex(cfg)
    assert r2.status == "published", r2
    assert ir.read_record(r2.name)["diff"] == "ray, by shard"
    assert sorted(traced(trace)[seen:]) == ["a2", "a6", "d1", "d2"]
    assert (r2.counts["carried"], r2.counts["relocated"], r2.counts["total"]) == (10, 3, 14)
    _check_version(cfg, root, {})
    rec2 = _snapshot(root, r2.name, {})
    # The unchanged shard's base is the parent's; the changed ones are amended by one delta
    # of their changes (a2, a3 gone, a4, a5, a6, b4 twice); the new shard has its own base.
    assert rec2["bases"]["m2"] == rec1["bases"]["m2"] and rec2["bases"]["m1"] == rec1["bases"]["m1"]
    assert rec2["bases"]["m4"]["file"].startswith(f"versions/{r2.name}/")
    assert len(rec2["deltas"]) == 1 and rec2["delta_rows"] == 7
    _, rows2 = version_rows(root, {})
    v2 = by_id(rows2)
    for i in set(v1) - {"a2", "a3"}:
        assert v2[i] == v1[i], f"{i} not carried bit-identically"

    # 3. m2 is gone; c1 changes. Then nothing changes: nothing is published.
    corpus.rm("m2.csv")
    _manifest(corpus, "m3.csv", [("c1", "cherry one"), ("c2", "cherry 2"), ("c3", "cherry 3"),
                                 ("b4", "banana 4")])  # fmt: skip
    by_shard, whole = _both_diffs(cfg, root, {})
    assert _summary(by_shard) == _summary(whole)
    r3 = reindex(cfg)
    assert (r3.counts["deleted"], r3.counts["changed"], r3.counts["total"]) == (3, 1, 11)
    name3 = _check_version(cfg, root, {})
    assert "m2" not in _snapshot(root, name3, {})["bases"]
    assert reindex(cfg).status == "unchanged"
    assert sorted(os.listdir(os.path.join(root, "versions"))) == sorted(
        [r1.name, r2.name, r3.name]
    )  # the unchanged run's stage folder went

    # 4. When the deltas are due a compaction, every shard gets a new base.
    monkeypatch.setattr(ks, "COMPACT_FRACTION", 0.0)
    _manifest(corpus, "m4.csv", [("d1", "date one"), ("d2", "date 2")])
    by_shard, whole = _both_diffs(cfg, root, {})
    assert _summary(by_shard) == _summary(whole)
    r4 = reindex(cfg)
    assert r4.counts["changed"] == 1
    name4 = _check_version(cfg, root, {})
    rec4 = _snapshot(root, name4, {})
    assert rec4["deltas"] == [] and rec4["delta_rows"] == 0
    assert {b["file"].split("/")[1] for b in rec4["bases"].values()} == {r4.name}


def test_a_snapshot_that_does_not_describe_its_version_is_not_used(
    ray_session, tmp_path, caplog, monkeypatch
):
    corpus = Writer(str(tmp_path / "corpus"))
    root, trace = str(tmp_path / "index"), str(tmp_path / "trace")
    _manifest(corpus, "m1.csv", [("a1", "apple 1"), ("a2", "apple 2")])
    _manifest(corpus, "m2.csv", [("b1", "banana 1")])
    cfg = _cfg(corpus.root, root, trace)
    r1 = reindex(cfg)
    assert r1.status == "published"
    # The snapshot claims an item the version does not hold, as the corpus gains it.
    _manifest(corpus, "m1.csv", [("a1", "apple 1"), ("a2", "apple 2"), ("a9", "apple 9")])
    listing = list_items(cfg.job)
    m1 = listing.filter(pc.equal(listing.column("shard"), "m1"))
    rec = _snapshot(root, r1.name, {})
    ks.write_base(m1, os.path.join(root, rec["bases"]["m1"]["file"]), {})
    with caplog.at_level("WARNING", logger="pipelines.reindex"):
        r2 = reindex(cfg)
    assert "key snapshot cannot be used" in caplog.text
    assert "does not describe its version" in caplog.text
    assert r2.status == "published" and r2.counts["added"] == 1
    assert IndexRoot(root, {}).read_record(r2.name)["diff"] == "ray"
    _check_version(cfg, root, {})
    # A snapshot file lost outside a run: the same.
    os.remove(os.path.join(root, _snapshot(root, r2.name, {})["bases"]["m2"]["file"]))
    _manifest(corpus, "m2.csv", [("b1", "banana one")])
    caplog.clear()
    with caplog.at_level("WARNING", logger="pipelines.reindex"):
        r3 = reindex(cfg)
    assert "key snapshot cannot be used" in caplog.text and "FileNotFoundError" in caplog.text
    assert r3.status == "published" and r3.counts["changed"] == 1
    _check_version(cfg, root, {})

    # A run that fails while it lists leaves no stage folder behind (its snapshot files).
    real = ks.diff_shards
    versions = os.path.join(root, "versions")

    def fail(*a, **k):
        real(*a, **k)
        assert len(os.listdir(versions)) == 4  # the stage holds the delta it wrote
        raise RuntimeError("listing failed")

    monkeypatch.setattr(ks, "diff_shards", fail)
    _manifest(corpus, "m1.csv", [("a1", "apple one"), ("a2", "apple 2"), ("a9", "apple 9")])
    with pytest.raises(RuntimeError, match="listing failed"):
        reindex(cfg)
    assert sorted(os.listdir(os.path.join(root, "versions"))) == sorted([r1.name, r2.name, r3.name])


def test_ids_repeated_across_or_within_manifests(ray_session, tmp_path, caplog):
    """Without repeats, a run does not read the manifests on the driver before its tasks list
    them; a repeat across manifests that appears then is found, and the run plans the whole
    corpus, which keeps the id's first manifest, as a whole diff does. A repeat inside a
    manifest is said, and its first row kept."""
    corpus = Writer(str(tmp_path / "corpus"))
    root, trace = str(tmp_path / "index"), str(tmp_path / "trace")
    _manifest(corpus, "m1.csv", [("a1", "apple 1"), ("a2", "apple 2")])
    _manifest(corpus, "m2.csv", [("b1", "banana 1")])
    cfg = _cfg(corpus.root, root, trace)
    ir = IndexRoot(root, {})
    r1 = reindex(cfg)
    assert _snapshot(root, r1.name, {})["repeats"] is False
    # m2 repeats a1 (m1 keeps it) and gains b2.
    _manifest(corpus, "m2.csv", [("b1", "banana 1"), ("a1", "apple again"), ("b2", "banana 2")])
    with caplog.at_level("WARNING"):
        r2 = reindex(cfg)
    assert "ids repeated across manifests" in caplog.text
    assert (r2.counts["added"], r2.counts["changed"], r2.counts["carried"]) == (1, 0, 3)
    assert ir.read_record(r2.name)["diff"] == "ray"
    _check_version(cfg, root, {})
    assert _snapshot(root, r2.name, {})["repeats"] is True
    # With repeats known, the manifests are planned first, and diffed by shard.
    _manifest(corpus, "m1.csv", [("a1", "apple 1"), ("a2", "apple two")])
    r3 = reindex(cfg)
    assert r3.counts["changed"] == 1 and ir.read_record(r3.name)["diff"] == "ray, by shard"
    _check_version(cfg, root, {})
    # The repeat gone, the next runs go back to not planning first; a repeat inside a
    # manifest is said and skipped there.
    _manifest(corpus, "m2.csv", [("b1", "banana 1"), ("b2", "banana 2")])
    r4 = reindex(cfg)
    assert ir.read_record(r4.name)["diff"] == "ray, by shard"
    assert _snapshot(root, r4.name, {})["repeats"] is False
    _manifest(corpus, "m2.csv", [("b1", "banana 1"), ("b2", "banana 2"), ("b1", "again")])
    _manifest(corpus, "m1.csv", [("a1", "apple 1"), ("a2", "apple 2")])
    caplog.clear()
    with caplog.at_level("WARNING"):
        r5 = reindex(cfg)
    assert "manifest m2: 1 rows repeat an id of an earlier row" in caplog.text
    assert r5.counts["changed"] == 1 and ir.read_record(r5.name)["diff"] == "ray, by shard"
    assert _snapshot(root, r5.name, {})["repeats"] is True
    _check_version(cfg, root, {})
    # Unplanned runs record each manifest's identity, as planned ones do: a corpus that then
    # only gains a manifest lists only it.
    assert all(v is not None for v in ir.read_inputs(r5.name)["shards"].values())
    _manifest(corpus, "m3.csv", [("c1", "cherry 1")])
    r6 = reindex(cfg)
    assert ir.read_record(r6.name)["diff"] == "ray, new shards"
    _check_version(cfg, root, {})


def test_retention_keeps_the_snapshot_files_kept_versions_use(ray_session, tmp_path):
    corpus = Writer(str(tmp_path / "corpus"))
    root, trace = str(tmp_path / "index"), str(tmp_path / "trace")
    _manifest(corpus, "m1.csv", [(f"a{i}", f"apple {i}") for i in range(1, 31)])
    _manifest(corpus, "m2.csv", [(f"b{i}", f"banana {i}") for i in range(1, 31)])
    cfg = _cfg(corpus.root, root, trace, **{"index.keep_versions": 2})
    r1 = reindex(cfg)
    for k in range(2, 5):  # versions 2-4 amend version 1's bases with deltas
        _manifest(
            corpus,
            "m1.csv",
            [("a1", f"apple {k}")] + [(f"a{i}", f"apple {i}") for i in range(2, 31)],
        )
        r = reindex(cfg)
        assert r.status == "published" and r.counts["changed"] == 1
    versions = os.path.join(root, "versions")
    # Version 1 is gone (no record), its bases stay: versions 3 and 4 use them.
    assert not os.path.exists(os.path.join(versions, r1.name, "version.json"))
    rec = _snapshot(root, r.name, {})
    for b in rec["bases"].values():
        assert b["file"].startswith(f"versions/{r1.name}/")
        assert os.path.exists(os.path.join(root, b["file"]))
    for d in rec["deltas"][-2:]:
        assert os.path.exists(os.path.join(root, d))
    _manifest(
        corpus, "m2.csv", [("b1", "banana one")] + [(f"b{i}", f"banana {i}") for i in range(2, 31)]
    )
    r5 = reindex(cfg)
    assert r5.counts["changed"] == 1
    assert IndexRoot(root, {}).read_record(r5.name)["diff"] == "ray, by shard"
    _check_version(cfg, root, {})


def test_diff_by_shard_on_s3(ray_session, s3_server, tmp_path):
    """The snapshot's files are written and read on the object store."""
    bucket = s3_server.create_bucket(f"rk-{uuid.uuid4().hex[:8]}")
    corpus = Writer(f"s3://{bucket}/corpus", s3_server.filesystem())
    root = f"s3://{bucket}/index"
    _manifest(corpus, "m1.csv", [("a1", "apple 1"), ("a2", "apple 2")])
    _manifest(corpus, "m2.csv", [("b1", "banana 1"), ("b2", "banana 2")])
    so = s3_server.storage_options
    cfg = _cfg(
        corpus.root,
        root,
        str(tmp_path / "trace"),
        **{
            "storage.endpoint_url": s3_server.endpoint_url,
            "storage.key": s3_server.key,
            "storage.secret": s3_server.secret,
        },
    )
    assert reindex(cfg).status == "published"
    _manifest(corpus, "m2.csv", [("b1", "banana 1"), ("b2", "banana two"), ("b3", "banana 3")])
    r2 = reindex(cfg)
    assert (r2.counts["changed"], r2.counts["added"], r2.counts["carried"]) == (1, 1, 3)
    assert IndexRoot(root, so).read_record(r2.name)["diff"] == "ray, by shard"
    _check_version(cfg, root, so)
    assert reindex(cfg).status == "unchanged"


@pytest.mark.parametrize("n", [0, 3])
def test_compare_shard(n):
    """Matched, unmatched, gone and repeated rows of one shard, without Ray."""
    listing = pa.table(
        {
            "id": ["x", "y", "z", "y"],
            "fingerprint": ["1", "2", "3", "9"],
            "uri": ["u1", "u2", "u3", "u2"],
            "modality": ["text"] * 4,
            "_repeat": [False, False, False, True],
        }
    )
    parent = pa.table(
        {"id": ["x", "y", "w"][:n], "h": ks.digests(listing).take([0, 2, 1])[:n]},
        schema=ks.BASE_SCHEMA,
    )
    unmatched, gone, matched = ks.compare_shard(listing, parent if n else None, "s", "_repeat")
    if n == 0:
        assert unmatched.num_rows == 4 and len(gone) == 0 and matched == 0
    else:  # x matches; y's digest is z's (changed); w is gone; the repeat never matches
        assert matched == 1
        assert unmatched.column("id").to_pylist() == ["y", "z", "y"]
        assert gone.to_pylist() == ["w"]


def test_diff_by_shard_of_tars(ray_session, tmp_path, caplog):
    """WebDataset: a changed tar (its members' fingerprints carry the tar's identity), a member
    name repeated inside a tar (the first member kept, the repeat said), a removed and a new
    tar; the diff by shard equals the whole diff."""
    from helpers.pipeline import _tar

    corpus = Writer(str(tmp_path / "wds"))
    root, trace = str(tmp_path / "index"), str(tmp_path / "trace")
    corpus.put("00000.tar", _tar([("k1.txt", b"one"), ("k2.txt", b"two")]))
    corpus.put("00001.tar", _tar([("k3.txt", b"three")]))
    cfg = _cfg(corpus.root, root, trace)
    ir = IndexRoot(root, {})
    assert reindex(cfg).status == "published"
    corpus.put("00000.tar", _tar([("k1.txt", b"uno"), ("k2.txt", b"two"), ("k1.txt", b"again")]))
    corpus.put("00002.tar", _tar([("k4.txt", b"four")]))
    caplog.clear()
    with caplog.at_level("WARNING"):
        by_shard, whole = _both_diffs(cfg, root, {})
    assert "repeat the id of an earlier item of their shard" in caplog.text
    assert _summary(by_shard) == _summary(whole)
    r2 = reindex(cfg)
    assert ir.read_record(r2.name)["diff"] == "ray, by shard"
    assert (r2.counts["added"], r2.counts["changed"], r2.counts["carried"]) == (1, 2, 1)
    _check_version(cfg, root, {})
    corpus.rm("00001.tar")
    by_shard, whole = _both_diffs(cfg, root, {})
    assert _summary(by_shard) == _summary(whole)
    r3 = reindex(cfg)
    assert (r3.counts["deleted"], r3.counts["total"]) == (1, 3)
    assert ir.read_record(r3.name)["diff"] == "ray, by shard"
    _check_version(cfg, root, {})


def test_only_the_change_reaches_the_driver(ray_session, tmp_path):
    """60,000 items in six manifests, 12 changed and 3 deleted: the shards match the rest
    where they are listed, and what comes back to the driver is the change."""
    import numpy as np
    import pyarrow.parquet as pq

    from pipelines.plan import input_sources, list_shard, manifest_specs
    from pipelines.tables import ROWS_TABLE, Pin, VersionTable

    n, per = 60_000, 10_000
    root = str(tmp_path)
    ids = pa.array([f"i{i:06d}" for i in range(n)])
    uris = pa.array([f"/corpus/i{i:06d}.jpg" for i in range(n)])
    changed = np.arange(n) % 5000 == 7
    deleted = np.arange(n) % 20000 == 11
    os.makedirs(f"{root}/corpus")
    for k, s in enumerate(range(0, n, per)):
        keep = pa.array(~deleted[s : s + per])
        part = pa.table(
            {
                "id": ids.slice(s, per),
                "uri": uris.slice(s, per),
                "modality": pa.repeat(pa.scalar("vision"), per),
                "fingerprint": pa.array(np.where(changed[s : s + per], "g", "f")),
            }
        )
        pq.write_table(part.filter(keep), f"{root}/corpus/m{k}.parquet")
    cfg = load_reindex_config(None, {"input": f"{root}/corpus", "index.root": f"{root}/index"})
    plan = manifest_specs(cfg.job, input_sources(cfg.job)[1])
    # The parent: every item with fingerprint "f", as rows and as a snapshot of each manifest.
    parent = pa.table(
        {
            "id": ids,
            "uri": uris,
            "modality": pa.repeat(pa.scalar("vision"), n),
            "fingerprint": pa.repeat(pa.scalar("f"), n),
        }
    )
    table = VersionTable(f"{root}/rows", ROWS_TABLE, None)
    table.commit(None, None, parent.to_batches(), parent.schema, "parent")
    bases = {}
    for k, shard in enumerate(plan.shards):
        rel = f"snap/{ks.base_name(shard.name)}"
        ks.write_base(parent.slice(k * per, per), f"{root}/{rel}", None)
        bases[shard.name] = {"file": rel, "since": 0}
    assert list_shard(plan.shards[0], cfg.job).num_rows == per - 1
    snap = {**ks.new_record(bases, [], n, 0), "kinds": ["vision"]}
    pin = Pin(table.uri, table.open("parent").version)
    got = ks.diff_shards(
        cfg.job, plan, snap, root, {}, (pin, None), (n, 0), "out", lambda k: None, unplanned=True
    )
    assert (got.diff.changed, got.diff.deleted, got.diff.carried_rows) == (12, 3, n - 15)
    assert sorted(got.diff.to_embed.column("id").to_pylist()) == sorted(
        ids.filter(pa.array(changed)).to_pylist()
    )
    assert (got.matched, got.returned) == (n - 15, 15)
    # The new version's snapshot: the parent's bases, amended by one delta of the change.
    assert got.record["bases"] == bases and got.record["delta_rows"] == 15
    delta = pq.read_table(f"{root}/out/delta.parquet")
    assert delta.num_rows == 15 and delta["h"].null_count == 3


def test_a_bad_manifest_is_named(ray_session, tmp_path):
    """A manifest that cannot be read fails the run with its name, as when it is planned on
    the driver, though the run diffs by shard and its tasks are the first to read it."""
    corpus = Writer(str(tmp_path / "corpus"))
    root, trace = str(tmp_path / "index"), str(tmp_path / "trace")
    _manifest(corpus, "m1.csv", [("a1", "apple 1")])
    _manifest(corpus, "m2.csv", [("b1", "banana 1")])
    cfg = _cfg(corpus.root, root, trace)
    assert reindex(cfg).status == "published"
    corpus.put("m2.csv", b"id,kind\nb1,text\n")  # no `modality`, no `uri` or `text`
    with pytest.raises(PlanError, match="m2") as err:
        reindex(cfg)
    assert "RayTaskError" not in type(err.value).__name__
