"""A re-index of a corpus that only gained shards since the published version lists only the
new shards: the published version's shards are carried by the identity of their files (not
read), when their listing follows from the file alone. Anything else is listed whole: a
changed, removed or stat-listed shard, or a new shard repeating an id the version has."""

from __future__ import annotations

import json
import os

import pytest
from helpers.pipeline import SMALL_JOB
from helpers.reindex import by_id, traced, version_rows

from pipelines.config import load_reindex_config
from pipelines.publish import IndexRoot
from pipelines.reindex import INPUTS_NAME, reindex


def _manifest(path, rows) -> None:
    lines = ["id,modality,text"] + [f"{i},text,{t}" for i, t in rows]
    path.write_text("\n".join(lines) + "\n")


def _same_size_edit(path, old: str, new: str) -> None:
    """Change `path`'s bytes, keeping its size and mtime: its identity (size and mtime on a
    local disk) stays, as for an edit the store cannot see."""
    assert len(old) == len(new)
    st = os.stat(path)
    path.write_text(path.read_text().replace(old, new))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.path.getsize(path) == st.st_size


def _inputs(root: str, name: str) -> dict:
    with open(os.path.join(root, "versions", name, INPUTS_NAME)) as f:
        return json.load(f)


def test_only_new_shards_are_listed_when_the_published_ones_are_unchanged(
    ray_session, tmp_path, caplog
):
    corpus, root, trace = tmp_path / "corpus", str(tmp_path / "index"), str(tmp_path / "t")
    corpus.mkdir()
    _manifest(corpus / "m1.csv", [("a1", "one cat"), ("a2", "two cats"), ("a3", "a dog")])
    over = {
        **SMALL_JOB,
        "input": str(corpus),
        "index.root": root,
        "debug.trace_path": trace,
        "index.keep_versions": 10,
    }
    cfg = load_reindex_config(None, over)
    ir = IndexRoot(root, {})

    r1 = reindex(cfg)
    assert r1.status == "published" and r1.counts["added"] == 3
    assert set(_inputs(root, r1.name)["shards"]) == {"m1"}
    _, rows1 = version_rows(root, {})
    v1 = by_id(rows1)

    # 2. A new manifest; m1's bytes change but not its identity: m1 is not read again (its
    # edited row would otherwise be `changed`).
    _same_size_edit(corpus / "m1.csv", "two cats", "two owls")
    _manifest(corpus / "m2.csv", [("b1", "a red kite"), ("b2", "the sea")])
    seen = len(traced(trace))
    with caplog.at_level("INFO", logger="pipelines.reindex"):
        r2 = reindex(cfg)
    assert r2.status == "published", r2
    assert (r2.counts["added"], r2.counts["changed"], r2.counts["carried"]) == (2, 0, 3)
    assert (r2.counts["deleted"], r2.counts["total"]) == (0, 5)
    assert sorted(traced(trace)[seen:]) == ["b1", "b2"]
    assert ir.read_record(r2.name)["diff"] == "driver, new shards"
    assert "only the 1 new shards were listed" in caplog.text
    assert set(_inputs(root, r2.name)["shards"]) == {"m1", "m2"}
    _, rows2 = version_rows(root, {})
    v2 = by_id(rows2)
    assert {i: v2[i] for i in v1} == v1  # carried bit for bit, a2 included

    # 3. Nothing new: nothing published.
    assert reindex(cfg).status == "unchanged"

    # 4. A new manifest (first in name order) repeating b1 of m2: the whole corpus is listed
    # and planning's rule applies (the first manifest keeps the id); m1's edit is seen now.
    _manifest(corpus / "m0.csv", [("b1", "a red kite"), ("z1", "snow")])
    with caplog.at_level("INFO", logger="pipelines.reindex"):
        r4 = reindex(cfg)
    assert "new manifests list id 'b1', which the published version already has" in caplog.text
    assert ir.read_record(r4.name)["diff"] == "driver"
    assert (r4.counts["added"], r4.counts["changed"], r4.counts["relocated"]) == (1, 1, 1)
    assert r4.counts["total"] == 6
    _, rows4 = version_rows(root, {})
    where = dict(zip(rows4.column("id").to_pylist(), rows4.column("uri").to_pylist(), strict=True))
    assert where["b1"].endswith("m0.csv#0")

    # 5. A new manifest whose row points at a file (no fingerprint: the listing asks the
    # store), appended on Ray Data; it is recorded as one to list again every time.
    (tmp_path / "media").mkdir()
    (tmp_path / "media" / "c.txt").write_text("a caption in a file")
    (corpus / "m3.csv").write_text(f"id,modality,uri\nc1,text,{tmp_path / 'media' / 'c.txt'}\n")
    cfg_ray = load_reindex_config(None, {**over, "index.diff_on_ray_rows": 1})
    r5 = reindex(cfg_ray)
    assert r5.counts["added"] == 1 and r5.counts["carried"] == 6
    assert ir.read_record(r5.name)["diff"] == "ray, new shards"
    shards = _inputs(root, r5.name)["shards"]
    assert shards["m3"] is None and shards["m0"] is not None

    # 6. The file behind m3 changes, m3 does not: the whole corpus is listed, the change seen.
    (tmp_path / "media" / "c.txt").write_text("another caption, longer")
    r6 = reindex(cfg)
    assert r6.status == "published" and r6.counts["changed"] == 1
    assert ir.read_record(r6.name)["diff"] == "driver"

    # 7. A removed manifest: listed whole, its rows deleted.
    (corpus / "m2.csv").unlink()
    r7 = reindex(cfg)
    assert r7.counts["deleted"] == 1 and ir.read_record(r7.name)["diff"] == "driver"  # b2


@pytest.mark.parametrize("flag", ["index.retry_failed", "index.full"])
def test_runs_that_reach_into_every_shard_list_the_whole_corpus(ray_session, tmp_path, flag):
    corpus, root = tmp_path / "corpus", str(tmp_path / "index")
    corpus.mkdir()
    _manifest(corpus / "m1.csv", [("a1", "one cat")])
    over = {**SMALL_JOB, "input": str(corpus), "index.root": root}
    reindex(load_reindex_config(None, over))
    _manifest(corpus / "m2.csv", [("b1", "a kite")])
    r = reindex(load_reindex_config(None, {**over, flag: True}))
    assert r.status == "published"
    assert IndexRoot(root, {}).read_record(r.name)["diff"] == "driver"


def test_a_new_tar_shard_is_listed_alone(ray_session, tmp_path):
    """WebDataset: a tar's ids carry its name, so a new tar cannot repeat a published id; the
    run lists only the new tar."""
    import shutil

    from helpers.pipeline import Writer, webdataset_corpus

    corpus = webdataset_corpus(Writer(str(tmp_path)))
    root = str(tmp_path / "index")
    cfg = load_reindex_config(None, {**SMALL_JOB, "input": corpus.input, "index.root": root})
    r1 = reindex(cfg)
    shards = _inputs(root, r1.name)["shards"]
    assert set(shards) == {"00000", "00001"} and None not in shards.values()
    _, rows = version_rows(root, {})
    _, errors = version_rows(root, {}, errors=True)
    in_00001 = [i for i in rows.column("id").to_pylist() + errors.column("id").to_pylist()]
    in_00001 = [i for i in in_00001 if i.startswith("00001")]
    shutil.copy(os.path.join(corpus.input, "00001.tar"), os.path.join(corpus.input, "00002.tar"))
    r2 = reindex(cfg)
    assert r2.status == "published"
    assert IndexRoot(root, {}).read_record(r2.name)["diff"] == "driver, new shards"
    assert r2.counts["added"] + r2.counts["failed"] == len(in_00001)
    assert r2.counts["carried"] == r1.counts["total"]
    assert r2.counts["failed_kept"] == r1.counts["failed"]
