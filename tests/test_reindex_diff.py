"""The re-index diff on Ray Data (`pipelines.diff.diff_on_ray`, over Parquet files or a pinned
Lance version): the same answer as the driver diff, the driver holding only the change while
the diff and the Lance commit run, and a full run on S3 with it."""

from __future__ import annotations

import os
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import ray.data
from helpers.pipeline import Writer, _tar, files_corpus, manifest_corpus, webdataset_corpus
from helpers.reindex import by_id, config, make_corpus, traced, version_rows
from pyarrow.fs import LocalFileSystem

import pipelines.diff as pdiff
from pipelines.config import load_config
from pipelines.diff import diff_listing, diff_on_ray, relocate
from pipelines.formats import PlanError
from pipelines.plan import REPEAT, list_items, list_items_on_ray, plan_job
from pipelines.reindex import reindex
from pipelines.rows import LISTING_SCHEMA
from pipelines.tables import Pin, VersionTable, read_pin


def _rows(ids, fps, dim, seed, kinds=None, uris=None):
    rng = np.random.default_rng(seed)
    vec = rng.standard_normal((len(ids), dim), dtype=np.float32)
    return pa.table(
        {
            "id": pa.array(ids, pa.string()),
            "uri": pa.array(uris or [f"/c/{i}" for i in ids], pa.string()),
            "modality": pa.array(kinds or ["text"] * len(ids), pa.string()),
            "fingerprint": pa.array(fps, pa.string()),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vec.reshape(-1)), dim),
        }
    )


def _write_parent(folder, rows: pa.Table, errors: pa.Table | None, files: int):
    os.makedirs(folder / "_errors", exist_ok=True)
    step = -(-rows.num_rows // files)
    row_files = []
    for k in range(files):
        p = str(folder / f"part-{k}.parquet")
        pq.write_table(rows.slice(k * step, step), p)
        row_files.append(p)
    err_files = []
    if errors is not None:
        p = str(folder / "_errors" / "e.parquet")
        pq.write_table(errors, p)
        err_files.append(p)
    return row_files, err_files


def _to_lance(folder, name: str, table: pa.Table) -> Pin:
    import lance

    uri = str(folder / name)
    return Pin(uri, lance.write_dataset(table, uri).version)


def _carry(table: pa.Table, drop_ids: pa.Array, moved: pa.Table) -> pa.Table:
    """The parent rows a diff keeps: not dropped, relocated ones with their new uri."""
    return relocate(table.filter(pc.invert(pc.is_in(table["id"], value_set=drop_ids))), moved)


@pytest.mark.parametrize(
    ("full", "source"), [(False, "parquet"), (True, "parquet"), (False, "lance")]
)
def test_ray_diff_equals_driver_diff(ray_session, tmp_path, full, source):
    parent = _rows(["a", "b", "d", "m", "k"], ["1", "2", "4", "6", "7"], 8, seed=0)
    parent = parent.set_column(2, "modality", pa.array(["text"] * 4 + ["vision"]))
    errors = pa.table({"id": ["e", "gone", "f"], "uri": ["/c/e", "/c/g", "/c/f"],
                       "fingerprint": ["5", "9", "8"], "error": ["bad", "bad", "bad"]})  # fmt: skip
    # a same, b changed, c added, d deleted, m moved, k relabelled, e failed again (kept),
    # f failed with a new fingerprint (retried), gone deleted.
    listing = pa.table(
        {
            "id": ["a", "b", "c", "m", "k", "e", "f"],
            "uri": ["/c/a", "/c/b", "/c/c", "/new/m", "/c/k", "/new/e", "/c/f"],
            "modality": ["text"] * 4 + ["thermal", "text", "text"],
            "fingerprint": ["1", "2x", "3", "6", "7", "5", "8x"],
        }
    )
    row_files, err_files = _write_parent(tmp_path / "parent", parent, errors, files=2)
    if source == "lance":
        row_files = _to_lance(tmp_path, "rows.lance", parent)
        err_files = _to_lance(tmp_path, "failures.lance", errors)
    want = diff_listing(listing, parent, errors, full=full)
    got = diff_on_ray(listing, row_files, err_files, LocalFileSystem(), full=full, num_partitions=3)
    for k in ("added", "changed", "deleted", "retried", "reembedded", "relocated"):
        assert getattr(got, k) == getattr(want, k), k
    assert got.carried_rows == want.carried.num_rows
    assert got.failed_kept == want.carried_errors.num_rows
    assert got.to_embed.equals(want.to_embed) and got.classes == want.classes
    if not full:
        assert want.classes == ["changed", "added", "changed", "retried"]
        assert (want.deleted, want.relocated, got.carried_rows, got.failed_kept) == (2, 2, 2, 1)
    # The driver diff's ids to drop and relocations are the Ray diff's.
    assert got.drop_ids.sort().equals(want.drop_ids.sort())
    assert got.moved.sort_by("id").equals(want.moved.sort_by("id"))
    # The same listing as a Ray dataset (never on the driver): the same diff; the rows to
    # embed come back whole, through the join, in (shard, id) order.
    listed = _as_listing(listing)
    on_ray = diff_on_ray(
        ray.data.from_arrow([listed.slice(0, 3), listed.slice(3)]), row_files, err_files,
        LocalFileSystem(), full=full, num_partitions=3,
    )  # fmt: skip
    for k in ("added", "changed", "deleted", "retried", "reembedded", "relocated"):
        assert getattr(on_ray, k) == getattr(want, k), k
    assert (on_ray.carried_rows, on_ray.failed_kept) == (got.carried_rows, got.failed_kept)
    assert on_ray.to_embed.schema.equals(LISTING_SCHEMA)
    expect = listed.filter(pc.is_in(listed["id"], want.to_embed["id"]))
    expect = expect.sort_by([("shard", "ascending"), ("id", "ascending")])
    assert on_ray.to_embed.equals(expect)
    why = dict(zip(want.to_embed["id"].to_pylist(), want.classes, strict=True))
    assert on_ray.classes == [why[i] for i in expect["id"].to_pylist()]
    assert on_ray.drop_ids.sort().equals(want.drop_ids.sort())
    assert on_ray.moved.sort_by("id").equals(want.moved.sort_by("id"))
    carried = _carry(parent, got.drop_ids, got.moved).sort_by("id")
    kept = _carry(errors, got.drop_ids, got.moved).sort_by("id")
    if full:
        assert carried.num_rows == 0 and kept.num_rows == 0  # nothing survives
        return
    # Bit-identical rows, relocated uris updated, the kept failure carried with its new uri.
    assert carried.equals(want.carried.sort_by("id"))
    assert carried.column("uri").to_pylist() == ["/c/a", "/new/m"]
    assert kept.equals(want.carried_errors.sort_by("id"))
    assert kept.column("uri").to_pylist() == ["/new/e"]


def _as_listing(t: pa.Table) -> pa.Table:
    """`t` with LISTING_SCHEMA's columns (nulls where `t` has none, a few set)."""
    n = t.num_rows
    extra = {
        "shard": pa.array(["s1", "s0"] * (n // 2) + ["s0"] * (n % 2)),
        "source": pa.array([f"/m/{i % 3}.parquet" for i in range(n)]),
        "size": pa.array(range(n)),
    }
    return pa.table(
        [t[f.name] if f.name in t.column_names else extra.get(f.name, pa.nulls(n, f.type))
         for f in LISTING_SCHEMA],
        schema=LISTING_SCHEMA,
    )  # fmt: skip


def test_listing_on_ray_equals_the_driver_listing(ray_session, tmp_path):
    # Ray tasks list the shards (manifests read, objects stat'ed, tar headers read): the rows
    # are the driver's, none missing, none repeated, bad rows listed with their error.
    w = Writer(str(tmp_path))
    for corpus in (manifest_corpus(w), webdataset_corpus(w), files_corpus(w)):
        cfg = load_config(None, {"input": corpus.input, "output": str(tmp_path / "o")})
        want = list_items(cfg).sort_by("id")
        started: list = []  # the caller starts Ray for the plan's kinds (here: already up)
        got = pa.concat_tables(pdiff._collect(list_items_on_ray(cfg, start_ray=started.append)))
        assert not pc.any(got[REPEAT]).as_py()  # no id repeats inside a shard here
        assert want.num_rows > 2 and got.drop_columns([REPEAT]).sort_by("id").equals(want)
        assert started == [plan_job(cfg).kinds] and started[0]


def test_a_repeat_inside_a_shard_is_skipped_however_the_join_splits_it(
    ray_session, tmp_path, caplog
):
    # A tar holding two members of one name lists one id twice. As in the embedding job, the
    # first member is the item and the later one is skipped with a warning, on the driver's
    # listing and on Ray's. There the shard's listing task flags the second row, where the
    # whole shard is at hand, so the worker that classifies it drops it even when the two rows
    # reach it in different blocks (Ray's join streams a partition as several blocks).
    w = Writer(str(tmp_path))
    w.put("wds/00000.tar", _tar([("k1.txt", b"one"), ("k2.txt", b"two"), ("k1.txt", b"again")]))
    cfg = load_config(None, {"input": w.uri("wds"), "output": str(tmp_path / "o")})
    said = "1 listed items repeat the id of an earlier item of their shard"
    with caplog.at_level("WARNING"):
        listing = list_items(cfg)
    assert said in caplog.text and "'00000#k1.txt'" in caplog.text
    assert listing["id"].to_pylist() == ["00000#k1.txt", "00000#k2.txt"]
    assert listing["size"].to_pylist() == [3, 3]  # k1 is the first member ("one"), not "again"
    d = diff_listing(listing, None, None)
    assert (d.added, sorted(d.to_embed["id"].to_pylist())) == (2, ["00000#k1.txt", "00000#k2.txt"])

    listed = list_items_on_ray(cfg, start_ray=lambda kinds: None)
    rows = pa.concat_tables(pdiff._collect(listed))
    assert rows[REPEAT].to_pylist() == [False, False, True]
    caplog.clear()
    with caplog.at_level("WARNING"):
        got = diff_on_ray(listed, None, None, LocalFileSystem(), num_partitions=2)
    assert said in caplog.text and "'00000#k1.txt'" in caplog.text
    assert got.added == 2 and got.to_embed.num_rows == 2
    first = got.to_embed.filter(pc.equal(got.to_embed["id"], "00000#k1.txt"))
    assert first["size"].to_pylist() == [3]  # the first member's row
    # The two rows of the id in different blocks of one partition, as the join may hand them:
    keys = pdiff._listing_keys_batch(rows)
    joined = keys.join(pdiff._RIGHT.empty_table(), "id", join_type="full outer")
    joined = joined.sort_by([("x_repeat", "ascending")])
    blocks = [joined.slice(0, 2), joined.slice(2)]  # k1 (first row) | k1 (flagged)
    assert [b["id"].to_pylist().count("00000#k1.txt") for b in blocks] == [1, 1]
    out = [pdiff._classify_batch(b, full=False, retry_failed=False) for b in blocks]
    assert [o.filter(pc.equal(o["action"], pdiff.SKIPPED))["id"].to_pylist() for o in out] == [
        [],
        ["00000#k1.txt"],
    ]
    assert [sorted(o.filter(pc.equal(o["action"], "added"))["id"].to_pylist()) for o in out] == [
        ["00000#k1.txt", "00000#k2.txt"],
        [],
    ]


def test_ray_diff_refuses_a_repeated_id(ray_session, tmp_path):
    # A table listing is checked on the driver; a Ray dataset without listing-task flags
    # (`REPEAT`) block by block (here each partition is one block); the error names the id as
    # the driver diff does.
    parent = _rows(["a", "b"], ["1", "2"], 8, seed=0)
    row_files = _to_lance(tmp_path, "rows.lance", parent)
    listing = pa.table(
        {
            "id": ["a", "b", "c", "b", "d"],
            "uri": ["/c/a", "/c/b", "/c/c", "/c/b2", "/c/d"],
            "modality": ["text"] * 5,
            "fingerprint": ["1", "2", "3", "2x", "4"],
        }
    )
    for parts in (1, 3):
        with pytest.raises(PlanError, match="'b' more than once"):
            diff_on_ray(listing, row_files, None, LocalFileSystem(), num_partitions=parts)
    on_ray = ray.data.from_arrow([_as_listing(listing.slice(0, 2)), _as_listing(listing.slice(2))])
    with pytest.raises(PlanError, match="'b' more than once"):
        diff_on_ray(on_ray, row_files, None, LocalFileSystem(), num_partitions=2)
    got = diff_on_ray(listing.slice(0, 3), row_files, None, LocalFileSystem(), num_partitions=3)
    assert (got.added, got.carried_rows) == (1, 2)


def _peak_rss_reset() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM, the peak resident set, to the current RSS


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(field)


def test_ray_diff_driver_holds_only_the_change(ray_session, tmp_path, monkeypatch):
    """A parent of 24k rows x 1024 float32 (~100 MB) against a driver budget of a quarter of
    that: the driver receives only the rows of the change, and its peak RSS grows by less
    than the budget while the diff runs over the parent's Lance version and the new version
    (the parent minus the dropped ids) is committed."""
    n, dim, files = 24_000, 1024, 8
    ids = [f"i{k:06d}" for k in range(n)]
    parent = _rows(ids, ["f"] * n, dim, seed=1)
    table = VersionTable(str(tmp_path), "rows.lance", None)
    pin = table.commit(None, None, parent.to_batches(max_chunksize=n // files), parent.schema, "v1")
    parent_bytes = parent.nbytes
    del parent
    changed, deleted, added = ids[:100], set(ids[100:150]), [f"new{k}" for k in range(50)]
    keep = [i for i in ids if i not in deleted]
    listing = pa.table(
        {
            "id": keep + added,
            "uri": [f"/c/{i}" for i in keep + added],
            "modality": ["text"] * (len(keep) + len(added)),
            "fingerprint": ["g" if i in changed[:100] else "f" for i in keep] + ["f"] * 50,
        }
    )
    received: list[pa.Table] = []
    collect = pdiff._collect

    def spy(ds):
        out = collect(ds)
        received.extend(out)
        return out

    monkeypatch.setattr(pdiff, "_collect", spy)
    # Warm-up on a small input: Ray Data's, polars' and the join's one-time imports and
    # worker start are not what this test bounds.
    # Lance's first open, delete and commit likewise (on a throwaway dataset).
    diff_on_ray(listing.slice(0, 10), pin, None, LocalFileSystem(), num_partitions=2)
    scratch = VersionTable(str(tmp_path), "scratch.lance", None)
    small = _rows(ids[:100], ["f"] * 100, dim, seed=2)
    scratch.commit(
        scratch.commit(None, None, small.to_batches(), small.schema, "a"),
        pa.array(ids[:5]),
        [],
        None,
        "b",
    )
    received.clear()
    _peak_rss_reset()
    base = _rss_kb("VmRSS")
    d = diff_on_ray(listing, pin, None, LocalFileSystem(), num_partitions=4, parent_count=n)
    new = table.commit(pin, d.drop_ids, [], None, "v2")
    growth = (_rss_kb("VmHWM") - base) * 1024
    assert (d.changed, d.deleted, d.added, d.carried_rows) == (100, 50, 50, n - 150)
    got = sum(t.num_rows for t in received)
    # Two summary rows a block (carried, failed_kept) plus the 200 rows of the change.
    assert got <= 200 + 8 * 64, got
    assert all("embedding" not in t.column_names for t in received)
    assert d.carried is None and d.to_embed.num_rows == 150
    assert growth < parent_bytes / 4, (growth, parent_bytes)
    out = read_pin(new, None, columns=["id"])
    assert out.num_rows == n - 150 and read_pin(pin, None, columns=["id"]).num_rows == n
    assert set(out.column("id").to_pylist()) == set(keep) - set(changed)


def test_reindex_with_the_diff_on_ray(ray_session, s3_server, tmp_path):
    """End to end on S3 with `index.diff_on_ray_rows: 0`: counts, nothing unchanged
    re-embedded, carried rows bit-identical, the kept failure carried, the record says so."""
    bucket = s3_server.create_bucket(f"rd-{uuid.uuid4().hex[:8]}")
    corpus = make_corpus(s3_server, bucket)
    root = f"s3://{bucket}/index"
    trace = str(tmp_path / "trace.txt")
    cfg = config(s3_server, corpus, root, trace, **{"index.diff_on_ray_rows": 0})
    storage_options = s3_server.storage_options
    r1 = reindex(cfg)
    assert r1.status == "published" and r1.counts["failed"] == 1
    _, v1 = version_rows(root, storage_options)
    v1 = by_id(v1)
    corpus.put("txt/cap1.txt", b"a changed caption")
    corpus.rm("txt/cap4.txt")
    corpus.put("txt/cap9.txt", b"a new caption")
    before = len(traced(trace))
    r2 = reindex(cfg)
    assert r2.status == "published"
    assert {k: r2.counts[k] for k in ("added", "changed", "deleted", "carried", "failed_kept")} == {
        "added": 1,
        "changed": 1,
        "deleted": 1,
        "carried": 6,
        "failed_kept": 1,
    }
    assert sorted(traced(trace)[before:]) == ["txt/cap1.txt", "txt/cap9.txt"]
    name, rows = version_rows(root, storage_options)
    v2 = by_id(rows)
    carried = set(v1) - {"txt/cap1.txt", "txt/cap4.txt"}
    assert set(v2) == carried | {"txt/cap1.txt", "txt/cap9.txt"}
    for i in carried:
        assert v2[i] == v1[i], f"{i} not carried bit-identically"
    from pipelines.publish import IndexRoot

    assert IndexRoot(root, storage_options).read_record(name)["diff"] == "ray"
    assert reindex(cfg).status == "unchanged"
