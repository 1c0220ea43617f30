"""Re-index versions as Lance versions (`pipelines.tables`), on a local index root, tiny preset.

A new version keeps the parent's data files and writes only its change; retention frees the
files only removed versions used while the kept ones stay readable; a parent published in the
Parquet layout (`data/carried/`) is read the old way once and its child is written to Lance;
a commit that another writer's commit slipped into is refused and leaves the pin as it was.
"""

from __future__ import annotations

import json
import os
import shutil

import media
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from helpers.pipeline import SMALL_FILES_JOB as SMALL
from helpers.pipeline import Writer
from helpers.reindex import by_id, version_rows

from imagebind_core.index import INDEX_DIR, VectorIndex, index_files
from pipelines import tables
from pipelines.config import load_reindex_config
from pipelines.publish import IndexRoot, data_pins
from pipelines.reindex import reindex
from pipelines.tables import FAILURES_TABLE, ROWS_TABLE, ForeignCommit, VersionTable, read_pin

CAPTIONS = [f"caption number {i} about {w}" for i, w in enumerate("abcdefghijkl")]


def _corpus(folder) -> Writer:
    c = Writer(str(folder))
    for i, t in enumerate(CAPTIONS):
        c.put(f"txt/cap{i:02d}.txt", t.encode())
    c.put("img/broken.png", media.random_bytes(512, seed=3))  # fails to decode
    return c


def _cfg(corpus: Writer, root: str, **extra):
    over = {**SMALL, "input": corpus.root, "index.root": root, "index.keep_versions": 2, **extra}
    return load_reindex_config(None, over)


def _data_files(root: str) -> dict[str, int]:
    """The rows dataset's data files: name -> bytes."""
    folder = os.path.join(root, ROWS_TABLE, "data")
    return {f: os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)}


def _fragments(root: str, version: int) -> dict[str, int]:
    """The data files of a Lance version of the rows dataset -> rows written in them."""
    ds = VersionTable(root, ROWS_TABLE, None).open(version)
    out = {}
    for frag in ds.get_fragments():
        meta = frag.metadata
        for f in meta.files:
            out[os.path.basename(f.path)] = meta.physical_rows
    return out


def _pins(root: str, name: str):
    return data_pins(IndexRoot(root).read_record(name), root)


def test_versions_share_unchanged_files_and_retention_frees_removed_ones(ray_session, tmp_path):
    corpus = _corpus(tmp_path / "corpus")
    root = str(tmp_path / "index")
    r1 = reindex(_cfg(corpus, root))
    assert r1.status == "published" and r1.counts["total"] == 12 and r1.counts["failed"] == 1
    rows_pin, fail_pin = _pins(root, r1.name)
    assert rows_pin.uri == os.path.join(root, ROWS_TABLE)
    assert fail_pin.uri == os.path.join(root, FAILURES_TABLE)
    files1 = _data_files(root)
    v1 = by_id(version_rows(root, {})[1])

    # One caption changed, one added, one deleted: the new Lance version holds the parent's
    # data files unchanged and writes exactly the 2 embedded rows in new ones.
    corpus.put("txt/cap03.txt", b"a different caption")
    corpus.put("txt/cap99.txt", b"a new caption")
    corpus.rm("txt/cap07.txt")
    r2 = reindex(_cfg(corpus, root))
    assert r2.status == "published" and r2.parent_name == r1.name
    assert (r2.counts["carried"], r2.counts["failed_kept"], r2.counts["total"]) == (10, 1, 12)
    files2 = _data_files(root)
    assert {f: files2[f] for f in files1} == files1  # the parent's files: same names, same bytes
    pin2 = _pins(root, r2.name)[0]
    frags = _fragments(root, pin2.version)
    assert set(files1) <= set(frags)  # still referenced by the new version (not rewritten)
    new = {f: n for f, n in frags.items() if f not in files1}
    assert sum(new.values()) == 2, new
    # (12 tiny rows: the files' fixed overhead dominates; the row counts above are the proof.)
    written = sum(files2[f] for f in new)
    assert written < sum(files1.values()), (written, files1)
    # A deletion file for the fragment that lost rows (changed and deleted ids).
    ds = VersionTable(root, ROWS_TABLE, None).open(pin2.version)
    assert any(f.metadata.deletion_file is not None for f in ds.get_fragments())
    name2, rows2 = version_rows(root, {})
    v2 = by_id(rows2)
    assert name2 == r2.name and len(v2) == rows2.num_rows == 12
    carried = set(v1) - {"txt/cap03.txt", "txt/cap07.txt"}
    assert set(v2) == carried | {"txt/cap03.txt", "txt/cap99.txt"}
    for i in carried:
        assert v2[i] == v1[i], f"{i} not carried bit-identically"
    # The parent's pinned version is still what it was.
    assert by_id(IndexRoot(root).read_rows(r1.name)) == v1
    assert IndexRoot(root).read_rows(r2.name, errors=True).column("id").to_pylist() == [
        "img/broken.png"
    ]

    # A full re-embed writes a fresh Lance version; one more change; keep_versions = 2 drops
    # versions 1 and 2: their tags and Lance versions go, and the files only they used.
    # Version 2's vector index references version 1's index segment rather than copying it.
    ir = IndexRoot(root)
    index1 = os.path.join(ir.version_uri(r1.name), INDEX_DIR)
    index2 = os.path.join(ir.version_uri(r2.name), INDEX_DIR)
    shared = [p for p in index_files(index2) if p.startswith(index1 + os.sep)]
    assert os.path.isdir(os.path.join(index1, "shard-00000"))
    assert os.path.join(index1, "shard-00000") in shared
    r3 = reindex(_cfg(corpus, root, **{"index.full": True}))
    assert r3.status == "published" and r3.counts["reembedded"] == 12
    assert r3.removed == [r1.name]  # version 2 still uses the files version 1 wrote
    assert set(files1) <= set(_data_files(root))
    # Version 1 is gone (record and everything else) but the index files version 2 uses.
    left1 = {os.path.join(d, f) for d, _, fs in os.walk(ir.version_uri(r1.name)) for f in fs}
    assert left1 and all(any(f.startswith(p) for p in shared) for f in left1)
    index_v2 = VectorIndex.load(index2)
    assert index_v2.count == ir.read_rows(r2.name).num_rows
    for row in ir.read_rows(r2.name).to_pylist()[:4]:
        assert index_v2.search(row["embedding"], 1)[0]["id"] == row["id"]
    corpus.put("txt/cap00.txt", b"yet another caption")
    r4 = reindex(_cfg(corpus, root))
    assert r4.status == "published" and r4.counts["changed"] == 1
    assert r4.removed == [r2.name]
    assert not os.path.exists(ir.version_uri(r1.name))  # nothing kept uses version 1 now
    table = VersionTable(root, ROWS_TABLE, None)
    tags = set(table.open().tags.list())
    assert tags == {r3.name, r4.name}
    live = {v["version"] for v in table.open().versions()}
    assert rows_pin.version not in live and pin2.version not in live
    left = _data_files(root)
    assert not set(files1) & set(left), "files only removed versions used were not freed"
    assert set(left) == set(_fragments(root, _pins(root, r3.name)[0].version)) | set(
        _fragments(root, _pins(root, r4.name)[0].version)
    )
    # The kept versions are readable at their pins.
    assert IndexRoot(root).read_rows(r3.name).num_rows == 12
    rows4 = IndexRoot(root).read_rows(r4.name)
    assert rows4.num_rows == 12 and pc.count_distinct(rows4["id"]).as_py() == 12


def test_a_parquet_parent_is_read_once_and_its_child_written_to_lance(ray_session, tmp_path):
    corpus = _corpus(tmp_path / "corpus")
    root = str(tmp_path / "index")
    r1 = reindex(_cfg(corpus, root))
    assert r1.status == "published"
    v1 = by_id(version_rows(root, {})[1])
    # Make version 1 a version of the Parquet layout: its rows are the Parquet files of its
    # data/ folder (all under data/embedded/, a first version), its record pins nothing.
    ir = IndexRoot(root)
    rec = ir.read_record(r1.name)
    del rec["data"]
    ir.write_record(r1.name, rec)
    for name in (ROWS_TABLE, FAILURES_TABLE):
        shutil.rmtree(os.path.join(root, name))
    assert by_id(ir.read_rows(r1.name)) == v1

    corpus.put("txt/cap05.txt", b"changed once more")
    corpus.put("txt/cap42.txt", b"added once more")
    r2 = reindex(_cfg(corpus, root))
    assert r2.status == "published"
    assert {k: r2.counts[k] for k in ("added", "changed", "carried", "failed_kept", "total")} == {
        "added": 1,
        "changed": 1,
        "carried": 11,
        "failed_kept": 1,
        "total": 13,
    }
    rec2 = ir.read_record(r2.name)
    assert rec2["data"]["format"] == "lance"
    assert json.dumps(rec2["data"]["rows"]["uri"]).endswith(f'{ROWS_TABLE}"')
    v2 = by_id(version_rows(root, {})[1])
    for i in set(v1) - {"txt/cap05.txt"}:
        assert v2[i] == v1[i], f"{i} not carried bit-identically"
    assert ir.read_rows(r2.name, errors=True).column("id").to_pylist() == ["img/broken.png"]
    # The next run starts from the Lance version: nothing changed, nothing published.
    assert reindex(_cfg(corpus, root)).status == "unchanged"


def test_an_index_root_works_from_any_folder_and_after_a_move(ray_session, tmp_path, monkeypatch):
    """A relative `--index-root` records absolute pins, and readers find the tables under the
    root they were given, whatever the record says: a later run from another folder, and a
    root moved elsewhere, read their parent."""
    corpus = _corpus(tmp_path / "corpus")
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    r1 = reindex(_cfg(corpus, "index"))
    assert r1.status == "published"
    root = str(tmp_path / "cwd" / "index")
    pin = IndexRoot(root).read_record(r1.name)["data"]["rows"]
    assert pin["uri"] == f"{root}/{ROWS_TABLE}"  # absolute
    v1 = by_id(IndexRoot(root).read_rows(r1.name))

    monkeypatch.chdir(tmp_path)
    corpus.put("txt/cap03.txt", b"changed from elsewhere")
    r2 = reindex(_cfg(corpus, "cwd/index"))
    assert r2.status == "published" and r2.counts["changed"] == 1

    moved = str(tmp_path / "moved")
    shutil.move(root, moved)
    # the records still name the old place; the moved root is read where it is now
    assert not os.path.exists(IndexRoot(moved).read_record(r2.name)["data"]["rows"]["uri"])
    v2 = by_id(IndexRoot(moved).read_rows(r2.name))
    assert {i: v2[i] for i in v1 if i != "txt/cap03.txt"} == {
        i: v1[i] for i in v1 if i != "txt/cap03.txt"
    }
    assert reindex(_cfg(corpus, moved)).status == "unchanged"


def test_a_foreign_commit_between_base_and_result_aborts_and_the_pin_stays(tmp_path, monkeypatch):
    import lance

    table = VersionTable(str(tmp_path), ROWS_TABLE, None)
    rows = pa.table({"id": ["a", "b"], "x": [1, 2]})
    pin = table.commit(None, None, rows.to_batches(), rows.schema, "v1")
    real = lance.write_dataset

    def another_writer_first(data, uri, *args, **kwargs):
        real(pa.table({"id": ["z"], "x": [9]}), table.uri, mode="append")
        return real(data, uri, *args, **kwargs)

    monkeypatch.setattr(lance, "write_dataset", another_writer_first)
    new = pa.table({"id": ["c"], "x": [3]})
    with pytest.raises(ForeignCommit, match="another writer committed"):
        table.commit(pin, pa.array(["a"]), new.to_batches(), None, "v2")
    monkeypatch.undo()
    assert "v2" not in table.open().tags.list()
    assert read_pin(pin, None)["id"].to_pylist() == ["a", "b"]
    # The next commit from the pin restores it first: neither the foreign row nor the failed
    # run's rows are in it.
    pin3 = table.commit(pin, pa.array(["a"]), new.to_batches(), None, "v3")
    assert sorted(read_pin(pin3, None)["id"].to_pylist()) == ["b", "c"]


def _tiers(ds) -> dict[int, int]:
    """Fragments below the compaction target per size tier."""
    out: dict[int, int] = {}
    for f in ds.get_fragments():
        live = f.count_rows()
        if 0 < live < tables.COMPACT_TARGET_ROWS:
            out[tables._tier(live)] = out.get(tables._tier(live), 0) + 1
    return out


def test_commits_compact_small_fragments_in_tiers_and_keep_every_pin(tmp_path, monkeypatch):
    # Each run appends a small fragment. Without compaction 30 runs leave 31 fragments; the
    # tiered merges keep fewer than FAN_IN + 1 per size tier, each row rewritten a few times,
    # and every version reads exactly the rows it was committed with.
    monkeypatch.setattr(tables, "COMPACT_FAN_IN", 4)
    monkeypatch.setattr(tables, "COMPACT_TARGET_ROWS", 256)
    table = VersionTable(str(tmp_path), ROWS_TABLE, None)
    first = pa.table({"id": [f"base{i}" for i in range(300)], "x": list(range(300))})
    pins = [(table.commit(None, None, first.to_batches(), first.schema, "v0"), first)]
    want = first
    for run in range(1, 31):
        new = pa.table({"id": [f"r{run}-{i}" for i in range(3)], "x": [run] * 3})
        pin = table.commit(pins[-1][0], None, new.to_batches(), None, f"v{run}")
        want = pa.concat_tables([want, new])
        pins.append((pin, want))
        ds = table.open(pin.version)
        assert all(n <= 4 for n in _tiers(ds).values()), (run, _tiers(ds))
    assert len(table.open().get_fragments()) < 12  # 31 without compaction
    for pin, rows in pins:  # every version, merged or not, reads its own rows
        assert read_pin(pin, None).sort_by("id").equals(rows.sort_by("id"))


def test_a_fragment_mostly_deleted_is_rewritten_without_its_deleted_rows(tmp_path):
    table = VersionTable(str(tmp_path), ROWS_TABLE, None)
    rows = pa.table({"id": [f"a{i}" for i in range(100)], "x": list(range(100))})
    pin = table.commit(None, None, rows.to_batches(), rows.schema, "v1")
    few = pa.array([f"a{i}" for i in range(10)])  # 10 %: a deletion file stays
    pin2 = table.commit(pin, few, iter(()), None, "v2")
    (frag,) = table.open(pin2.version).get_fragments()
    assert frag.metadata.deletion_file.num_deleted_rows == 10
    more = pa.array([f"a{i}" for i in range(10, 40)])  # 40 %: still a deletion file
    pin3 = table.commit(pin2, more, iter(()), None, "v3")
    (frag,) = table.open(pin3.version).get_fragments()
    assert frag.metadata.deletion_file.num_deleted_rows == 40
    many = pa.array([f"a{i}" for i in range(40, 55)])  # 55 % deleted: rewritten
    pin4 = table.commit(pin3, many, iter(()), None, "v4")
    (frag,) = table.open(pin4.version).get_fragments()
    assert frag.metadata.deletion_file is None and frag.metadata.physical_rows == 45
    assert read_pin(pin4, None).equals(rows.slice(55))
    assert read_pin(pin3, None).equals(rows.slice(40))
    assert read_pin(pin2, None).equals(rows.slice(10))  # the older version is unchanged


def test_a_foreign_commit_during_compaction_aborts(tmp_path, monkeypatch):
    import lance
    from lance.dataset import DatasetOptimizer

    monkeypatch.setattr(tables, "COMPACT_FAN_IN", 2)
    table = VersionTable(str(tmp_path), ROWS_TABLE, None)
    rows = pa.table({"id": ["a", "b"], "x": [1, 2]})
    pin = table.commit(None, None, rows.to_batches(), rows.schema, "v1")
    real = DatasetOptimizer.compact_files

    def another_writer_first(self, **kwargs):
        lance.write_dataset(pa.table({"id": ["z"], "x": [9]}), table.uri, mode="append")
        return real(self, **kwargs)

    monkeypatch.setattr(DatasetOptimizer, "compact_files", another_writer_first)
    new = pa.table({"id": ["c", "d"], "x": [3, 4]})  # two fragments of 2 rows: a merge is due
    with pytest.raises(ForeignCommit, match="while this run compacted"):
        table.commit(pin, None, new.to_batches(), None, "v2")
    assert "v2" not in table.open().tags.list()


@pytest.mark.parametrize("compact", [True, False])
def test_a_run_compacts_its_rows_unless_told_not_to(ray_session, tmp_path, monkeypatch, compact):
    # With every small fragment in one tier and a fan-in of 2, the second run's append makes a
    # merge due (the first version's fragment and its own); `index.compact_rows: false` leaves
    # them as appended. The rows are the same either way.
    monkeypatch.setattr(tables, "COMPACT_FAN_IN", 2)
    monkeypatch.setattr(tables, "_tier", lambda rows: 0)
    corpus = _corpus(tmp_path / "corpus")
    root = str(tmp_path / "index")
    cfg = _cfg(corpus, root, **{"index.compact_rows": compact})
    assert reindex(cfg).status == "published"
    corpus.put("txt/cap99.txt", b"a new caption")
    r2 = reindex(cfg)
    assert r2.status == "published" and r2.counts["added"] == 1
    ds = VersionTable(root, ROWS_TABLE, None).open(_pins(root, r2.name)[0].version)
    assert len(ds.get_fragments()) == (1 if compact else 2)
    assert ds.count_rows() == r2.counts["total"] == 13  # 12 captions + the new one


def test_a_damaged_published_version_is_named_not_a_traceback(ray_session, tmp_path):
    """LATEST, a version record or a table file emptied or deleted outside a run: every later
    run stops with one sentence naming what it could not read (it gave the reader's traceback,
    a different one for each)."""
    from pipelines.store import OutputDamaged

    corpus = _corpus(tmp_path / "corpus")
    good = str(tmp_path / "good")
    r1 = reindex(_cfg(corpus, good))
    assert r1.status == "published"

    def emptied(rel: str):
        def damage(root: str) -> None:
            with open(os.path.join(root, rel), "w"):
                pass

        return damage

    def latest_names_nothing(root: str) -> None:
        path = os.path.join(root, "LATEST")
        with open(path) as f:
            doc = json.load(f)
        with open(path, "w") as f:
            json.dump({**doc, "name": "00000009-deadbeefdead"}, f)

    def rows_data_deleted(root: str) -> None:
        for name in os.listdir(os.path.join(root, ROWS_TABLE, "data")):
            os.remove(os.path.join(root, ROWS_TABLE, "data", name))

    damages = {
        "LATEST": emptied("LATEST"),
        "00000009-deadbeefdead": latest_names_nothing,
        "version.json": emptied(os.path.join("versions", r1.name, "version.json")),
        ".lance": rows_data_deleted,
    }
    for k, (named, damage) in enumerate(damages.items()):
        root = str(tmp_path / f"damaged{k}")
        shutil.copytree(good, root)
        damage(root)
        with pytest.raises(OutputDamaged) as e:
            reindex(_cfg(corpus, root))
        msg = str(e.value)
        assert msg.startswith(f"index root {root}: the published version cannot be read"), msg
        assert named in msg and "restore" in msg, msg


def test_a_damaged_parent_index_is_rebuilt_from_the_rows(ray_session, tmp_path, caplog):
    """The parent's index files changed outside a run (the rows intact): that version's index
    is built from its rows, with a warning, instead of failing after the embedding or sharing
    the damage. A file whose size is not the one recorded is caught before the update reads
    anything (the reason names it); one garbled in place fails where the update reads it."""
    corpus = _corpus(tmp_path / "corpus")
    root = str(tmp_path / "index")
    r1 = reindex(_cfg(corpus, root))

    def faiss_files(name: str) -> tuple[str, list[str]]:
        index = os.path.join(IndexRoot(root).version_uri(name), INDEX_DIR)
        found = [os.path.join(d, f) for d, _, fs in os.walk(index) for f in fs if ".faiss" in f]
        assert found
        return index, found

    # Garbled in place, same size: read when a deletion compacts the shard's segments.
    index1, damaged = faiss_files(r1.name)
    for p in damaged:
        size = os.path.getsize(p)
        with open(p, "r+b") as f:
            f.write(b"\0" * size)
    corpus.put("txt/cap05.txt", b"a caption changed after the damage")
    with caplog.at_level("WARNING", logger="pipelines.reindex"):
        r2 = reindex(_cfg(corpus, root, **{"index.compact_deleted": 0}))
    assert r2.status == "published" and r2.counts["changed"] == 1
    warned = [r.getMessage() for r in caplog.records if r.name == "pipelines.reindex"]
    record = IndexRoot(root).read_record(r2.name)
    assert any(f"the parent version's index at {index1} could not be read" in w for w in warned), (
        warned,
        record["index"],
    )
    assert "the parent's index could not be read" in json.dumps(record["index"])

    # Cut short: the recorded sizes say so before anything is read.
    index2, damaged = faiss_files(r2.name)
    for p in damaged:
        with open(p, "r+b") as f:
            f.truncate(5)
    corpus.put("txt/cap05.txt", b"a caption changed again, after more damage")
    with caplog.at_level("WARNING", logger="imagebind_core.index"):
        r3 = reindex(_cfg(corpus, root))
    record = IndexRoot(root).read_record(r3.name)
    assert record["index"]["mode"] == "built", record["index"]
    assert record["index"]["reason"].startswith(f"parent index damaged ({index2}"), record["index"]
    assert "is 5 bytes" in record["index"]["reason"]
    assert f"the parent index at {index2} is damaged" in caplog.text
    for name, parent_index in ((r2.name, index1), (r3.name, index2)):
        path = os.path.join(IndexRoot(root).version_uri(name), INDEX_DIR)
        assert not [p for p in index_files(path) if p.startswith(parent_index + os.sep)]
    path2 = os.path.join(IndexRoot(root).version_uri(r3.name), INDEX_DIR)
    index2 = VectorIndex.load(path2)
    rows = IndexRoot(root).read_rows(r3.name)
    assert index2.count == rows.num_rows
    for row in rows.to_pylist():
        assert index2.search(row["embedding"], 1)[0]["id"] == row["id"]
