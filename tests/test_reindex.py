"""Incremental re-indexing end to end on local Ray and moto's S3 server (real HTTP), tiny preset.

One corpus goes through a first build, a no-op rerun, an add/modify/delete round and a model
change; the assertions count the items the job's preprocessing stage really processed (its
trace file, one line per item sent to the encoder), compare carried rows bit for bit, and
check the version records. Separate tests kill a run during publish and race two runs.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid

import media
import numpy as np
import pyarrow as pa
import pytest
from helpers.pipeline import SMALL_FILES_JOB as SMALL
from helpers.reindex import (
    TEXTS,
    by_id,
    config,
    make_corpus,
    s3_corpus,
    s3_settings,
    traced,
    version_rows,
)

import imagebind_core as ibc
from imagebind_core.index import (
    INDEX_DIR,
    VectorIndex,
    join_uri,
    load_latest,
    read_pointer,
)
from pipelines.config import load_reindex_config
from pipelines.diff import diff_listing
from pipelines.lineage import lineage_changes, lineage_key
from pipelines.publish import PAUSE_ENV, IndexRoot, data_pins
from pipelines.reindex import reindex


def test_incremental_reindex_round_trip(ray_session, s3_server, tmp_path):
    bucket = s3_server.create_bucket(f"ri-{uuid.uuid4().hex[:8]}")
    storage_options = s3_server.storage_options
    corpus = make_corpus(s3_server, bucket)
    root = f"s3://{bucket}/index"
    trace = str(tmp_path / "trace.txt")
    cfg = config(s3_server, corpus, root, trace)

    # 1. First build: everything embedded once, the broken picture recorded as failed.
    r1 = reindex(cfg)
    assert r1.status == "published" and r1.version == 1, r1
    assert r1.full_reason == "first version"
    assert r1.counts == {
        "added": 8,
        "changed": 0,
        "deleted": 0,
        "carried": 0,
        "relocated": 0,
        "failed": 1,
        "failed_kept": 0,
        "reembedded": 0,
        "retried": 0,
        "total": 8,
    }
    assert sorted(traced(trace)) == sorted(
        [f"txt/cap{i}.txt" for i in range(5)]
        + [f"img/pic{i}.png" for i in range(3)]
        + ["img/broken.png"]
    )
    name1, rows1 = version_rows(root, storage_options)
    v1 = by_id(rows1)
    rec1 = IndexRoot(root, storage_options).read_record(name1)
    assert rec1["parent"] is None and rec1["lineage_key"]["preset"] == "tiny"
    assert rec1["lineage_key"]["preprocess_version"] == str(ibc.PREPROCESS_VERSION)

    # The published vector index: an item's own embedding finds it first; filter works.
    index = VectorIndex.load(join_uri(root, "versions", name1, INDEX_DIR), storage_options)
    for id_, raw in v1.items():
        assert index.search(np.frombuffer(raw, np.float32), 1)[0]["id"] == id_
    q = np.frombuffer(v1["txt/cap0.txt"], np.float32)
    assert {h["modality"] for h in index.search(q, 8, "vision")} == {"vision"}

    # 2. No change (the broken file included): nothing embedded, nothing published.
    n_traced = len(traced(trace))
    r2 = reindex(cfg)
    assert r2.status == "unchanged" and r2.name == name1
    assert len(traced(trace)) == n_traced
    assert read_pointer(root, storage_options).name == name1

    # 3. Modify one caption, add a picture, delete a caption.
    corpus.put("txt/cap1.txt", b"three dogs sleeping")
    corpus.put("img/pic9.png", media.make_image("PNG", size=(64, 48), seed=9))
    corpus.rm("txt/cap4.txt")
    r3 = reindex(cfg)
    assert r3.status == "published" and r3.version == 2 and r3.parent_name == name1
    assert r3.full_reason is None
    assert r3.counts == {
        "added": 1,
        "changed": 1,
        "deleted": 1,
        "carried": 6,
        "relocated": 0,
        "failed": 0,
        "failed_kept": 1,
        "reembedded": 0,
        "retried": 0,
        "total": 8,
    }
    # Exactly the changed items went through the encoder again.
    assert sorted(traced(trace)[n_traced:]) == ["img/pic9.png", "txt/cap1.txt"]
    name2, rows2 = version_rows(root, storage_options)
    v2 = by_id(rows2)
    assert "txt/cap4.txt" not in v2  # deleted
    carried = set(v1) - {"txt/cap1.txt", "txt/cap4.txt"}
    assert len(carried) == 6
    for id_ in carried:
        assert v2[id_] == v1[id_], f"{id_} not carried bit-identically"
    assert v2["txt/cap1.txt"] != v1["txt/cap1.txt"]
    rec2 = IndexRoot(root, storage_options).read_record(name2)
    assert rec2["parent_name"] == name1 and rec2["counts"] == r3.counts
    index2 = VectorIndex.load(join_uri(root, "versions", name2, INDEX_DIR), storage_options)
    assert index2.count == 8
    assert "txt/cap4.txt" not in {h["id"] for h in index2.search(q, 100)}

    # 4. A model change (other random weights) re-embeds everything.
    n_traced = len(traced(trace))
    cfg_b = config(s3_server, corpus, root, trace, seed=1)
    r4 = reindex(cfg_b)
    assert r4.status == "published" and r4.version == 3
    assert "seed: '0' -> '1'" in r4.full_reason
    assert r4.counts["reembedded"] == 8 and r4.counts["carried"] == 0
    assert r4.counts["total"] == 8 and r4.counts["failed"] == 1  # the broken file again
    assert len(traced(trace)) - n_traced == 9
    _, rows4 = version_rows(root, storage_options)
    v4 = by_id(rows4)
    assert all(v4[i] != v2[i] for i in v2)
    # Retention (keep 2): version 1 is gone, 2 and 3 remain.
    assert r4.removed == [name1]
    assert [r["version"] for r in IndexRoot(root, storage_options).history()] == [3, 2]

    # 5. A preprocessing change (a limit no item reaches) re-embeds everything too.
    n_traced = len(traced(trace))
    cfg_c = config(s3_server, corpus, root, trace, seed=1, **{"preprocess.limits.max_bytes": 10**7})
    r5 = reindex(cfg_c)
    assert r5.status == "published" and "preprocess:" in r5.full_reason
    assert r5.counts["reembedded"] == 8 and r5.counts["carried"] == 0
    assert len(traced(trace)) - n_traced == 9


def test_diff_and_lineage_rules():
    def table(ids, fps, kinds=None, uris=None, **extra):
        return pa.table(
            {
                "id": ids,
                "fingerprint": fps,
                "modality": kinds or ["text"] * len(ids),
                "uri": uris or [f"/c/{i}" for i in ids],
                **extra,
            }
        )

    listing = table(["a", "b", "c", "e"], ["1", "2x", "3", "5"])
    parent = table(["a", "b", "d"], ["1", "2", "4"], v=[1, 2, 4])
    errors = table(["e", "gone"], ["5", "9"])
    d = diff_listing(listing, parent, errors)
    assert d.to_embed.column("id").to_pylist() == ["b", "c"]
    assert d.classes == ["changed", "added"]
    # d (a row) and "gone" (a failure) are no longer listed: both are deletions.
    assert (d.added, d.changed, d.deleted, d.retried, d.relocated) == (1, 1, 2, 0, 0)
    assert d.carried.column("v").to_pylist() == [1]
    assert d.carried_errors.column("id").to_pylist() == ["e"]
    d = diff_listing(listing, parent, errors, retry_failed=True)
    assert d.to_embed.column("id").to_pylist() == ["b", "c", "e"]
    d = diff_listing(listing, parent, errors, full=True)
    assert d.classes == ["reembedded", "changed", "added", "retried"] and d.carried.num_rows == 0
    with pytest.raises(ValueError, match="'a' more than once"):
        diff_listing(table(["a", "a"], ["1", "1"]), None, None)

    # Same bytes relabelled as another modality: re-embedded. Same bytes at a new uri (a moved
    # corpus): carried with the new uri, and the version is not "unchanged".
    moved = table(["a", "b", "e"], ["1", "2", "5"], ["thermal", "text", "text"], None)
    moved = moved.set_column(3, "uri", pa.array(["/c/a", "/new/b", "/new/e"]))
    d = diff_listing(moved, parent.filter(pa.array([True, True, False])), errors.slice(0, 1))
    assert d.to_embed.column("id").to_pylist() == ["a"] and d.classes == ["changed"]
    assert d.carried.column("uri").to_pylist() == ["/new/b"] and d.relocated == 2
    assert d.carried_errors.column("uri").to_pylist() == ["/new/e"]
    assert not d.empty
    # Everything deleted (an allowed empty listing): all parent rows and failures go.
    d = diff_listing(listing.slice(0, 0), parent, errors)
    assert d.deleted == 5 and d.carried.num_rows == 0 and not d.empty
    key = {"preset": "tiny", "preprocess_version": "1"}
    assert lineage_changes(key, dict(key)) == []
    # Everything that changes a vector is in the key: preprocessing options and limits too.
    base = load_reindex_config(None, {"input": "/c", "index.root": "/i", "preset": "tiny"})
    for change in (
        {"preprocess.options": {"audio": {"mean_subtraction": "per_clip"}}},
        {"preprocess.limits": {"max_text_chars": 100}},
        {"encoder_defaults.dtype": "bfloat16"},
        {"seed": 3},
    ):
        other = load_reindex_config(
            None, {"input": "/c", "index.root": "/i", "preset": "tiny", **change}
        )
        assert lineage_changes(lineage_key(base.job), lineage_key(other.job)), change
    assert lineage_changes(key, {**key, "preprocess_version": "2"}) == [
        "preprocess_version: '1' -> '2'"
    ]


def test_bad_config_names_the_field(capsys):
    from pipelines.cli import reindex_main as main
    from pipelines.config import ConfigError

    assert main(["--index-root", "/tmp/nowhere"]) == 2  # no input
    assert "input" in capsys.readouterr().err

    with pytest.raises(ConfigError, match=r"index\.root"):
        load_reindex_config(None, {"input": "/tmp/x"})
    with pytest.raises(ConfigError, match=r"index\.keep_versions"):
        load_reindex_config(
            None, {"input": "/tmp/x", "index.root": "/tmp/i", "index.keep_versions": 0}
        )


# ----------------------------------------------------------------------------- crash / race


def _cli(cfg_over: dict, ray_address: str, pause: str) -> subprocess.Popen:
    """`python -m pipelines.reindex` in a subprocess, joined to the test's Ray cluster, pausing
    just before it swaps the pointer (PAUSE_ENV)."""
    args = [sys.executable, "-m", "pipelines.reindex", "--ray-address", ray_address]
    for k, v in cfg_over.items():
        args += ["--set", f"{k}={v}"]
    env = {**os.environ, PAUSE_ENV: pause}
    return subprocess.Popen(
        args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _wait_for(path: str, proc: subprocess.Popen, timeout: float = 240.0) -> None:
    deadline = time.time() + timeout
    while not os.path.exists(path):
        if proc.poll() is not None:
            raise AssertionError(f"run exited early ({proc.returncode}):\n{proc.stdout.read()}")
        assert time.time() < deadline, "the run never reached the publish point"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def published(ray_session, s3_server):
    """A corpus with a published version, shared by the crash and race tests (each adds one
    caption and checks what it publishes relative to the version it found)."""
    bucket = s3_server.create_bucket(f"rc-{uuid.uuid4().hex[:8]}")
    corpus = s3_corpus(s3_server, bucket)
    for i, t in enumerate(TEXTS[:3]):
        corpus.put(f"txt/cap{i}.txt", t.encode())
    root = f"s3://{bucket}/index"
    over = s3_settings(s3_server, corpus, root, **{"index.lock_ttl_s": 60})
    assert reindex(load_reindex_config(None, over)).status == "published"
    yield over, root, corpus


def test_crash_during_publish_keeps_previous_version(published, ray_session, s3_server, tmp_path):
    over, root, corpus = published
    storage_options = s3_server.storage_options
    before = read_pointer(root, storage_options)
    corpus.put("txt/new.txt", b"a new caption")
    pause = str(tmp_path / "pause")
    proc = _cli(over, ray_session.get_runtime_context().gcs_address, pause)
    try:
        _wait_for(pause, proc)
        # The new version is fully staged; the run is about to swap the pointer. Kill it.
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert read_pointer(root, storage_options) == before  # readers still get the previous version
    _, rows = version_rows(root, storage_options)
    assert "txt/new.txt" not in rows.column("id").to_pylist()
    # The dead run had committed its rows to Lance: they exist after the published pin, and
    # nobody reads them.
    ir = IndexRoot(root, storage_options)
    pin = data_pins(ir.read_record(before.name), ir.root)[0]
    assert pin.uri == f"{root}/rows.lance"
    rows_table = ir.tables()[0]
    assert rows_table.open().latest_version > pin.version
    assert "txt/new.txt" in rows_table.open().to_table(columns=["id"])["id"].to_pylist()
    # The rerun recovers the dead run's lock and completes from the published pin (not on top
    # of the dead run's commits: no row twice); its orphan stage is cleaned up.
    r = reindex(load_reindex_config(None, over))
    assert r.status == "published" and r.version == before.version + 1, r
    assert r.counts["added"] == 1 and r.counts["carried"] == 3
    _, rows = version_rows(root, storage_options)
    assert len(set(rows.column("id").to_pylist())) == rows.num_rows == r.counts["total"] == 4
    names = ir._list_version_names()
    assert names == [before.name, r.name]
    assert set(rows_table.open().tags.list()) == {before.name, r.name}


def test_two_concurrent_runs_exactly_one_publishes(published, ray_session, s3_server, tmp_path):
    over, root, corpus = published
    storage_options = s3_server.storage_options
    before = read_pointer(root, storage_options)
    corpus.put("txt/other.txt", b"another caption")
    pause = str(tmp_path / "pause")
    proc = _cli(over, ray_session.get_runtime_context().gcs_address, pause)
    try:
        _wait_for(pause, proc)
        # Run B starts while A holds the lease: it must not publish.
        rb = reindex(load_reindex_config(None, over))
        assert rb.status == "locked"
        assert rb.message.startswith(f"index root {root} is being written by another run")
        assert read_pointer(root, storage_options) == before
        with open(pause + ".go", "w"):
            pass
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    after = read_pointer(root, storage_options)
    assert after.version == before.version + 1
    assert IndexRoot(root, storage_options).read_record(after.name)["counts"]["added"] == 1


def test_unreadable_shard_is_kept_as_a_failure_and_an_emptied_corpus_needs_consent(
    ray_session, tmp_path
):
    from helpers.pipeline import Writer, webdataset_corpus

    from pipelines.formats import EmptyInput

    corpus = webdataset_corpus(Writer(str(tmp_path)))
    root = str(tmp_path / "index")
    cfg = load_reindex_config(None, {**SMALL, "input": corpus.input, "index.root": root})
    assert reindex(cfg).status == "published"
    # Shard 00000 is cut short: its readable members stay, the rest is one failure row.
    shard = os.path.join(corpus.input, "00000.tar")
    with open(shard, "r+b") as f:
        f.truncate(1200)
    second = reindex(cfg)
    assert second.status == "published" and second.counts["failed"] >= 1
    _, errors = version_rows(root, {}, errors=True)
    assert any(i.startswith("00000#unreadable-") for i in errors.column("id").to_pylist())
    # Nothing changed since: nothing is published (the failure is kept, not retried).
    third = reindex(cfg)
    assert third.status == "unchanged", (third.counts, third.message)

    # Every item deleted: refused unless asked for, then an empty version.
    for name in os.listdir(corpus.input):
        os.remove(os.path.join(corpus.input, name))
    with pytest.raises(EmptyInput, match="allow-empty"):
        reindex(cfg)
    cfg = load_reindex_config(
        None, {**SMALL, "input": corpus.input, "index.root": root, "index.allow_empty": True}
    )
    emptied = reindex(cfg)
    assert emptied.status == "published" and emptied.counts["total"] == 0
    assert emptied.counts["deleted"] > 0
    _, index = load_latest(root, {})
    assert index.search([1.0] * 32, 5) == []


def test_store_trouble_is_one_sentence_and_an_emptied_prefix_can_be_published(
    ray_session, s3_server, tmp_path, capsys
):
    """Before a run: a missing output bucket and an unreachable endpoint are named in one
    sentence (exit 2 and 1), an endpoint without a scheme is a config error; and an S3 prefix
    whose objects were all deleted (a prefix without objects does not exist) still publishes
    an empty version with --allow-empty."""
    from helpers.net import free_port
    from helpers.pipeline import Writer

    from pipelines.cli import embed_main, reindex_main

    bucket = s3_server.create_bucket(f"em-{uuid.uuid4().hex[:8]}")
    corpus = Writer(f"s3://{bucket}/in", s3_server.filesystem())
    corpus.put("a.txt", b"one caption")
    corpus.put("b.txt", b"another caption")
    store = [
        f"--s3-endpoint={s3_server.endpoint_url}",
        *[f"--set={k}={v}".replace("False", "false") for k, v in SMALL.items()],
    ]
    code = embed_main(["--input", corpus.root, "--output", "s3://no-such-bucket/x", *store])
    err = capsys.readouterr().err
    assert code == 2 and "output s3://no-such-bucket/x: " in err and "Traceback" not in err, err
    gone = f"http://127.0.0.1:{free_port()}"
    code = reindex_main(
        ["--input", corpus.root, "--index-root", str(tmp_path / "ix"), "--s3-endpoint", gone]
    )
    err = capsys.readouterr().err
    assert code == 1 and f"object store {gone} is unavailable: input {corpus.root}" in err, err
    assert "Traceback" not in err
    code = embed_main(["--input", corpus.root, "--output", "x", "--s3-endpoint", "127.0.0.1:9"])
    err = capsys.readouterr().err
    assert code == 2 and "endpoint_url" in err and "Traceback" not in err, err

    root = f"s3://{bucket}/index"
    cfg = config(s3_server, corpus, root, str(tmp_path / "trace"))
    assert reindex(cfg).status == "published"
    s3_server.filesystem().rm(f"{bucket}/in", recursive=True)
    code = reindex_main(["--input", corpus.root, "--index-root", root, *store])
    err = capsys.readouterr().err
    assert code == 2 and "allow-empty" in err, err
    emptied = reindex(
        config(s3_server, corpus, root, str(tmp_path / "t2"), **{"index.allow_empty": True})
    )
    assert emptied.status == "published" and emptied.counts["deleted"] == 2
    assert emptied.counts["total"] == 0
