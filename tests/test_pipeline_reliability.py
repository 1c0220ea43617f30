"""Nothing lost, nothing mixed: commits that never rewrite a committed shard, shard names and
ids that cannot collide, inputs added after a shard was committed, the lock across pid
namespaces, per-item failures of any kind, and what a run leaves behind."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import tarfile
import time
import uuid

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers.pipeline import SMALL_JOB as SMALL
from helpers.pipeline import break_imports, imports_restored, read_output

from pipelines.cli import embed_main as main
from pipelines.config import load_config
from pipelines.embed import run_job
from pipelines.lock import LOCK_KEY, OutputLock, OutputLocked
from pipelines.plan import list_items, plan_job, shard_tasks
from pipelines.readers import read_tasks
from pipelines.rows import (
    ITEM_SCHEMA,
    STATUS_EOS,
    STATUS_ERROR,
    STATUS_OK,
    embedding_type,
    encoded_schema,
)
from pipelines.stages import preprocess_batch
from pipelines.store import Output
from pipelines.writers import commit_shard, write_parts


def _encoded(rows: list[dict], dim: int = 4) -> pa.Table:
    schema = encoded_schema(dim)
    base = {f.name: [r.get(f.name) for r in rows] for f in schema if f.name != "embedding"}
    emb = [r.get("embedding") for r in rows]
    return pa.table({**base, "embedding": pa.array(emb, embedding_type(dim))}, schema=schema)


def _row(i: int, status: str = STATUS_OK, shard: str = "s", dim: int = 4) -> dict:
    return {
        "id": f"x{i}",
        "uri": f"u{i}",
        "modality": "text",
        "shard": shard,
        "branch": "text",
        "status": status,
        "error": "bad" if status == STATUS_ERROR else None,
        "embedding": [float(i)] * dim if status == STATUS_OK else None,
        "fingerprint": f"f{i}",
    }


def _eos(count: int, shard: str = "s") -> dict:
    return {
        "id": f"{shard}#eos",
        "shard": shard,
        "modality": "text",
        "branch": "text",
        "status": STATUS_EOS,
        "count": count,
    }


# ------------------------------------------------------------------ 1: commits are idempotent


def test_a_second_commit_never_rewrites_a_committed_shard(tmp_path):
    out = str(tmp_path / "out")
    block = _encoded([_row(0), _row(1), _row(2, STATUS_ERROR), _eos(3)])
    write_parts(block, out, None, 4)
    first = {"shard": "s", "ok": 2, "errors": 1, "added": False}
    assert commit_shard(out, "s", None, 4, {}) == first
    shard_file, err_file = (
        tmp_path / "out" / "s.parquet",
        tmp_path / "out" / "_errors" / "s.parquet",
    )
    before = (shard_file.read_bytes(), err_file.read_bytes())
    # A retried commit task (its worker died after the parts were removed), or a second driver.
    again = commit_shard(out, "s", None, 4, {})
    assert (shard_file.read_bytes(), err_file.read_bytes()) == before
    assert again == first
    # A retry that finds the parts of a commit that died before removing them: same files.
    write_parts(block, out, None, 4)
    commit_shard(out, "s", None, 4, {})
    assert (shard_file.read_bytes(), err_file.read_bytes()) == before
    assert not (tmp_path / "out" / "_parts" / "s").exists()


def test_committing_a_shard_leaves_the_parts_of_a_nested_shard_alone(tmp_path):
    # Manifests `a.csv` and `a/b.csv` are shards `a` and `a/b`: `_parts/a/b/` is inside
    # `_parts/a/`, and committing `a` must not delete the other shard's work.
    out = str(tmp_path / "out")
    write_parts(_encoded([_row(0, shard="a"), _eos(1, "a")]), out, None, 4)
    write_parts(_encoded([_row(1, shard="a/b")]), out, None, 4)
    commit_shard(out, "a", None, 4, {})
    assert Output(out).part_ids("a/b") == {"x1"}


# ------------------------------------------------------------------ 2: shard names collide


def test_shard_names_that_map_to_the_same_output_are_refused(s3_server, capsys):
    bucket = s3_server.create_bucket(f"clash-{uuid.uuid4().hex[:6]}")
    client = s3_server.client()
    body = b"id,modality,text\nt1,text,hello\n"
    client.put_object(Bucket=bucket, Key="in/x.csv", Body=body)
    client.put_object(Bucket=bucket, Key="in//x.csv", Body=body.replace(b"t1", b"t2"))
    rc = main(
        [
            "--input",
            f"s3://{bucket}/in",
            "--output",
            f"s3://{bucket}/out",
            "--s3-endpoint",
            s3_server.endpoint_url,
            "--preset",
            "tiny",
            "--dry-run",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "in/x.csv" in err and "in//x.csv" in err


# ------------------------------------------------------------------ 5: ids are unique


def _tar(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_webdataset_ids_are_unique_by_construction(tmp_path):
    root = tmp_path / "wds"
    (root / "a").mkdir(parents=True)
    (root / "a.tar").write_bytes(_tar({"b/x.txt": b"outer"}))
    (root / "a" / "b.tar").write_bytes(_tar({"x.txt": b"inner"}))
    (root / "c.tar").write_bytes(_tar({"k.txt": b"plain"}))
    cfg = load_config(None, {"input": str(root), "output": str(tmp_path / "o"), "preset": "tiny"})
    ids = list_items(cfg).column("id").to_pylist()
    assert len(ids) == 3 and len(set(ids)) == 3, ids
    assert "c#k.txt" in ids  # the documented rule: <shard>#<member>
    # The rows the job reads carry the same ids as the listing.
    plan = plan_job(cfg)
    read = []
    for rows in shard_tasks(plan, cfg, plan.shards).values():
        batch = pa.Table.from_pylist(rows)
        for t in read_tasks(batch, str(tmp_path / "o"), None):
            read += [r["id"] for r in t.to_pylist() if r["status"] != STATUS_EOS]
    assert sorted(read) == sorted(ids)


# ------------------------------------------------------------------ 6: the lock and pid namespaces


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_lock_of_a_same_named_host_in_another_pid_namespace_is_not_broken(tmp_path):
    out = str(tmp_path / "out")
    os.makedirs(out)
    # A holder in a container with host networking: same hostname, its own pid namespace, a
    # pid that means nothing here. Its lease is live: a second writer must wait.
    doc = {
        "host": socket.gethostname(),
        "pid": _dead_pid(),
        "pid_ns": "pid:[1]",
        "expires_at": time.time() + 600,
        "renewed_at": time.time(),
    }
    with open(os.path.join(out, LOCK_KEY), "w") as f:
        json.dump(doc, f)
    with pytest.raises(OutputLocked):
        OutputLock(out, ttl_s=60).acquire()
    # A lock that does not say its namespace (an older writer): the pid cannot be judged.
    del doc["pid_ns"]
    with open(os.path.join(out, LOCK_KEY), "w") as f:
        json.dump(doc, f)
    with pytest.raises(OutputLocked):
        OutputLock(out, ttl_s=60).acquire()
    # Our own namespace and a dead pid: recovered at once.
    doc["pid_ns"] = OutputLock(out).doc_base["pid_ns"]
    with open(os.path.join(out, LOCK_KEY), "w") as f:
        json.dump(doc, f)
    OutputLock(out, ttl_s=60).acquire().release()


# ------------------------------------------------------------------ 10: any per-item failure


def test_any_exception_of_an_item_read_becomes_an_error_row():
    rows = [
        {"id": "weird", "uri": "foo://bar/x.jpg", "modality": "vision", "shard": "s"},
        {"id": "ftp", "uri": "ftp://x/y.jpg", "modality": "vision", "shard": "s"},
        {"id": "ok", "uri": None, "modality": "text", "shard": "s", "data": b"hello"},
    ]
    for r in rows:
        r.update(status=STATUS_OK, branch=r["modality"])
    batch = pa.Table.from_pylist(
        [{f.name: r.get(f.name) for f in ITEM_SCHEMA} for r in rows], schema=ITEM_SCHEMA
    )
    out = {r["id"]: r for r in preprocess_batch(batch).to_pylist()}
    assert out["weird"]["status"] == STATUS_ERROR
    assert "foo://bar/x.jpg" in out["weird"]["error"]
    # A scheme fsspec knows but the product does not read (ftp gave fsspec's TypeError).
    assert "unsupported URI scheme 'ftp' in 'ftp://x/y.jpg'" in out["ftp"]["error"]
    assert out["ok"]["status"] == STATUS_OK and out["ok"]["tensor"]


# ------------------------------------------------------------------ jobs on Ray


def _text_files(root, names):
    root.mkdir(parents=True, exist_ok=True)
    for n in names:
        (root / f"{n}.txt").write_text(f"caption {n}")


def _ids(output: str) -> tuple[list[str], list[str]]:
    emb, err, _ = read_output(output)
    return emb.column("id").to_pylist(), err.column("id").to_pylist()


def test_files_and_rows_added_after_a_commit_are_embedded_exactly_once(tmp_path, ray_session):
    corpus, out, trace = tmp_path / "files", tmp_path / "out", tmp_path / "trace.txt"
    _text_files(corpus, ["a", "b"])
    cfg = load_config(
        None,
        {
            **SMALL,
            "input": str(corpus),
            "output": str(out),
            "files.files_per_shard": 100,
            "debug.trace_path": str(trace),
        },
    )
    first = run_job(cfg)
    assert first.shards_committed == 1
    committed = {p: p.read_bytes() for p in out.glob("*.parquet")}
    _text_files(corpus, ["c"])  # lands in the committed shard (one shard)
    trace.unlink()
    second = run_job(cfg)
    emb, _ = _ids(str(out))
    assert sorted(emb) == ["a.txt", "b.txt", "c.txt"]
    assert trace.read_text().split()[1::2] == ["c.txt"], "only the new file is embedded"
    assert second.ok == {"text": 1} and second.shards_extended == 1
    assert {p: p.read_bytes() for p in committed} == committed, "committed files rewritten"
    trace.unlink()
    third = run_job(cfg)  # nothing new
    assert not trace.exists() and third.ok == {} and sorted(_ids(str(out))[0]) == sorted(emb)
    assert not (out / "_parts").exists() and not (out / LOCK_KEY).exists()

    # Rows appended to a committed manifest.
    man, out2 = tmp_path / "man", tmp_path / "out2"
    man.mkdir()
    (man / "m.csv").write_text("id,modality,text\nr1,text,one\n")
    cfg2 = cfg.model_copy(update={"input": str(man), "output": str(out2)})
    run_job(cfg2)
    time.sleep(0.01)
    (man / "m.csv").write_text("id,modality,text\nr1,text,one\nr2,text,two\nr3,smell,x\n")
    trace.unlink()
    again = run_job(cfg2)
    emb, err = _ids(str(out2))
    assert sorted(emb) == ["r1", "r2"] and err == ["r3"]
    assert trace.read_text().split()[1::2] == ["r2"]
    assert again.ok["text"] == 1 and sum(again.ok.values()) == 1
    assert again.shards_extended == 1 and "had new items" in again.format()


def test_a_bad_uri_fails_its_item_not_the_job(tmp_path, ray_session):
    # An unknown scheme, a FIFO (opening it waited for a writer: the job hung), a folder, a
    # device that never ends, and a web host that is down (it stopped the whole job as an
    # unavailable store): each fails its own item, named, and the job completes.
    from helpers.net import free_port

    man, out = tmp_path / "man", tmp_path / "out"
    man.mkdir()
    fifo = tmp_path / "fifo.png"
    os.mkfifo(fifo)
    dead = f"http://127.0.0.1:{free_port()}/a.png"
    bad = {
        "weird": "foo://bar/x.jpg",
        "fifo": str(fifo),
        "folder": str(man),
        "device": "/dev/zero",
        "dead": dead,
    }
    rows = "".join(f"{k},{u},vision,\n" for k, u in bad.items())
    (man / "m.csv").write_text(f"id,uri,modality,text\ngood,,text,fine caption\n{rows}")
    cfg = load_config(None, {**SMALL, "input": str(man), "output": str(out)})
    run_job(cfg)
    emb, err = _ids(str(out))
    assert emb == ["good"] and sorted(err) == sorted(bad)
    errors = pq.read_table(out / "_errors" / "m.parquet").to_pylist()
    for r in errors:
        assert bad[r["id"]] in r["error"], r
    # The dead host's reason is the connection error, not fsspec's bare FileNotFoundError.
    (dead_error,) = [r["error"] for r in errors if r["id"] == "dead"]
    assert "ClientConnectorError: Cannot connect to host" in dead_error, dead_error


def test_an_output_that_refuses_writes_is_named_in_one_sentence(
    tmp_path, ray_session, monkeypatch, capsys, caplog
):
    """A write the output refuses (read-only, full) inside a Ray task ends the run with one
    sentence naming the output and the reason, exit status 1; a lock that cannot be removed
    then is a warning, not a second error raised over the first."""
    import errno

    from pipelines import embed, store

    man, out = tmp_path / "man", tmp_path / "out"
    man.mkdir()
    (man / "m.csv").write_text("id,modality,text\nr1,text,one\n")
    part = f"{out}/_parts/m/.text-0.parquet.1a2b.tmp"

    class TaskError(RuntimeError):  # what Ray raises for a failed task: the cause kept
        cause = OSError(errno.EROFS, "Read-only file system", part)

    def refused(*_a, **_k):
        raise TaskError("ray::MapBatches(write_parts) failed")

    def no_delete(self, key, *, if_match=None):
        raise OSError(errno.EROFS, "Read-only file system", f"{out}/.store.flock")

    monkeypatch.setattr(embed, "build_pipeline", refused)
    monkeypatch.setattr(store._LocalStore, "delete", no_delete)
    flags = [f"--set={k}={v}".replace("False", "false") for k, v in SMALL.items()]
    status = main(["--input", str(man), "--output", str(out), *flags])
    err = capsys.readouterr().err
    assert status == 1, err
    assert (
        f"imagebind-embed: cannot write to the output {out}: Read-only file system ({part})" in err
    )
    assert "Traceback" not in err
    assert any("could not remove the lock" in r.getMessage() for r in caplog.records)
    # A refusal elsewhere (an input file) is not said to be the output's.
    elsewhere = OSError(errno.EACCES, "Permission denied", str(man / "m.csv"))
    assert store.unwritable_error(elsewhere, str(out)) is None
    assert store.unwritable_error(TaskError(), str(out)) is TaskError.cause


@pytest.mark.parametrize("fmt", ["files", "manifest", "webdataset"])
def test_a_resume_drops_parts_of_items_changed_or_gone_since(tmp_path, ray_session, fmt, caplog):
    """Parts an interrupted run wrote are reused only for items the input still holds
    unchanged: an item changed since is embedded again, one gone is not committed, so the
    output equals a clean run's of the input as it is now."""
    corpus, out = tmp_path / "in", tmp_path / "out"
    if fmt == "files":
        _text_files(corpus, ["a", "b", "c"])
    elif fmt == "webdataset":
        corpus.mkdir()
        with tarfile.open(corpus / "s.tar", "w") as tar:
            for key, text in (("a", b"one"), ("b", b"two"), ("c", b"three")):
                info = tarfile.TarInfo(f"{key}.txt")
                info.size = len(text)
                tar.addfile(info, io.BytesIO(text))
    else:
        corpus.mkdir()
        (corpus / "m.csv").write_text(
            "id,modality,text,fingerprint\na,text,one,fa\nb,text,two,fb\nc,text,three,fc\n"
        )
    cfg = load_config(None, {**SMALL, "input": str(corpus), "output": str(out)})
    listed = {r["id"]: r for r in list_items(cfg).to_pylist()}
    a, b = sorted(listed)[:2]
    shard = listed[a]["shard"]

    def part_row(id_: str, fingerprint: str) -> dict:
        return {**_row(0, shard=shard, dim=32), "id": id_, "fingerprint": fingerprint}

    # What an interrupted run left: `a` as it still is, `b` before it changed, and an item
    # that has gone since; each with an embedding no encoder makes.
    rows = [part_row(a, listed[a]["fingerprint"]), part_row(b, "old"), part_row("gone", "g")]
    write_parts(_encoded(rows, 32), str(out), None, 32)
    with caplog.at_level("WARNING", logger="pipelines.progress"):
        summary = run_job(cfg)
    # Said where the user reads the run (the driver's log, not only a Ray worker's), and not
    # counted as reused.
    said = "2 text items embedded by an interrupted run changed or went away since"
    assert any(said in r.getMessage() for r in caplog.records), caplog.text
    assert summary.items_reused == 1
    emb, err, _ = read_output(str(out))
    assert err.num_rows == 0
    got = {r["id"]: r for r in emb.to_pylist()}
    assert sorted(got) == sorted(listed)  # `gone` is not committed
    assert got[a]["embedding"] == [0.0] * 32  # reused
    assert got[b]["embedding"] != [0.0] * 32  # embedded again
    assert {i: got[i]["fingerprint"] for i in got} == {
        i: r["fingerprint"] for i, r in listed.items()
    }
    assert not (out / "_parts").exists()


def test_parts_of_a_shard_that_vanished_are_removed(tmp_path, ray_session):
    # A manifest deleted while the job ran: its parts have no shard to go to any more.
    man, out = tmp_path / "man", tmp_path / "out"
    man.mkdir()
    (man / "m.csv").write_text("id,modality,text\nr1,text,one\n")
    write_parts(_encoded([_row(0, shard="gone", dim=32)], 32), str(out), None, 32)
    cfg = load_config(None, {**SMALL, "input": str(man), "output": str(out)})
    run_job(cfg)
    assert not (out / "_parts").exists()
    assert not (out / LOCK_KEY).exists()
    assert _ids(str(out)) == (["r1"], [])


def test_an_unreachable_store_stops_the_block_instead_of_failing_the_item():
    # Nothing listens on the port: connection refused. The item is not bad; it must not be
    # recorded as a failure (a rerun would never embed it).
    from helpers.net import free_port

    from imagebind_core.errors import StoreUnavailable
    from imagebind_core.io import s3_storage_options

    storage_options = s3_storage_options(
        f"http://127.0.0.1:{free_port()}", "us-east-1", "testing", "testing"
    )
    row = {f.name: None for f in ITEM_SCHEMA}
    row.update(id="x", uri="s3://b/x.png", modality="vision", shard="s", branch="vision")
    row["status"] = STATUS_OK
    batch = pa.Table.from_pylist([row], schema=ITEM_SCHEMA)
    with pytest.raises(StoreUnavailable, match=r"s3://b/x\.png"):
        preprocess_batch(batch, storage_options=storage_options, store_retries=1)


def test_a_store_that_stops_answering_is_given_up_after_the_s3_clients_own_retries():
    # Connections are accepted and nothing ever comes back. The S3 client retries a timed-out
    # request (botocore's attempts, each retried by s3fs); the stage must not retry it again
    # on top (its waits are for refused connections and 5xx): five more rounds of timeouts
    # would hold the run 5x longer (hours at botocore's defaults) before it says anything.
    from listener import Silent

    from imagebind_core.errors import StoreUnavailable
    from imagebind_core.io import s3_storage_options

    store = Silent()
    try:
        endpoint = f"http://127.0.0.1:{store.port}"
        storage_options = s3_storage_options(
            endpoint, "us-east-1", "testing", "testing", read_timeout_s=0.5, max_attempts=2
        )
        row = {f.name: None for f in ITEM_SCHEMA}
        row.update(id="x", uri="s3://b/x.png", modality="vision", shard="s", branch="vision")
        row["status"] = STATUS_OK
        batch = pa.Table.from_pylist([row], schema=ITEM_SCHEMA)
        with pytest.raises(StoreUnavailable, match=r"s3://b/x\.png timed out") as e:
            preprocess_batch(batch, storage_options=storage_options)
        assert e.value.store == endpoint
        # botocore's 2 attempts, each call tried 5 times by s3fs: 10 requests, not 5 x 10.
        assert 2 <= store.accepted <= 10, store.accepted
    finally:
        store.close()


def test_storage_timeouts_and_attempts_reach_the_s3_client():
    cfg = load_config(
        None,
        {
            **SMALL,
            "input": "in",
            "output": "out",
            "storage": {"read_timeout_s": 7, "connect_timeout_s": 3, "max_attempts": 4},
        },
    )
    kw = cfg.storage_options()["config_kwargs"]
    assert (kw["read_timeout"], kw["connect_timeout"]) == (7, 3)
    assert kw["retries"] == {"mode": "standard", "total_max_attempts": 4}


def test_shard_files_are_created_only_if_absent(tmp_path, s3_server):
    bucket = s3_server.create_bucket(f"cia-{uuid.uuid4().hex[:6]}")
    for uri, storage_options in (
        (str(tmp_path / "o"), None),
        (f"s3://{bucket}/o", s3_server.storage_options),
    ):
        out = Output(uri, storage_options)
        path = out.shard_path("s")
        assert out.create_atomic(path, b"first")
        assert not out.create_atomic(path, b"second")  # a second committer loses, writes nothing
        with out.fs.open(path, "rb") as f:
            assert f.read() == b"first"


def test_members_appended_to_a_committed_tar_are_embedded_exactly_once(tmp_path, ray_session):
    wds, out, trace = tmp_path / "wds", tmp_path / "out", tmp_path / "trace.txt"
    wds.mkdir()
    (wds / "00000.tar").write_bytes(_tar({"k0.txt": b"first caption"}))
    cfg = load_config(
        None,
        {**SMALL, "input": str(wds), "output": str(out), "debug.trace_path": str(trace)},
    )
    run_job(cfg)
    committed = (out / "00000.parquet").read_bytes()
    (wds / "00000.tar").write_bytes(_tar({"k0.txt": b"first caption", "k1.txt": b"second"}))
    trace.unlink()
    again = run_job(cfg)
    assert trace.read_text().split()[1::2] == ["00000#k1.txt"]
    assert sorted(_ids(str(out))[0]) == ["00000#k0.txt", "00000#k1.txt"]
    assert (out / "00000.parquet").read_bytes() == committed
    assert again.shards_extended == 1


def test_an_output_with_ids_of_the_old_webdataset_rule_is_not_embedded_again(tmp_path, ray_session):
    # Outputs written before the id rule was `<shard>#<member>` hold `<shard>/<member>` ids
    # and no `_inputs/`: a rerun must recognise those members as committed.
    wds, out, trace = tmp_path / "wds", tmp_path / "out", tmp_path / "trace.txt"
    wds.mkdir()
    (wds / "00000.tar").write_bytes(_tar({"k0.txt": b"first caption"}))
    cfg = load_config(
        None,
        {**SMALL, "input": str(wds), "output": str(out), "debug.trace_path": str(trace)},
    )
    run_job(cfg)
    shard_file = out / "00000.parquet"
    t = pq.read_table(shard_file)
    old = pa.array([i.replace("#", "/", 1) for i in t.column("id").to_pylist()], pa.string())
    pq.write_table(t.set_column(0, t.schema.field(0), old), shard_file)
    for p in (out / "_inputs").iterdir():
        p.unlink()
    trace.unlink()
    again = run_job(cfg)
    assert not trace.exists(), "members committed under the old ids were embedded again"
    assert _ids(str(out))[0] == ["00000/k0.txt"]
    assert again.shards_extended == 0


# ------------------------------------------------- a worker whose imports were interrupted


def _text_batch(ids: list[str]) -> pa.Table:
    rows = []
    for i in ids:
        r = {f.name: None for f in ITEM_SCHEMA}
        r.update(id=i, modality="text", shard="s", branch="text", status=STATUS_OK)
        r["data"] = f"caption {i}".encode()
        rows.append(r)
    return pa.Table.from_pylist(rows, schema=ITEM_SCHEMA)


def test_an_interrupted_import_is_the_processs_fault_not_the_items():
    # What a stopped job leaves on a cluster that outlives it: Ray cancels a preprocessing
    # task with KeyboardInterrupt, here in the middle of importing the text decoder (and
    # torch); every later import of it in that worker fails. Before, each item the worker was
    # given was recorded in `_errors/` as "internal error: RuntimeError: duplicate
    # registrations ..." and never embedded. Now: WorkerBroken (outside Ray, raised; in a Ray
    # worker, the worker exits: the next test).
    import imagebind_core._lazy as lazy
    from imagebind_core.errors import WorkerBroken

    module = "imagebind_core.preprocess.text"

    class Interrupting:
        def find_spec(self, fullname, path=None, target=None):
            if fullname == module:
                raise KeyboardInterrupt
            return None

    with imports_restored(module):
        lazy._interrupted = lazy._broken = None
        sys.modules.pop(module, None)
        sys.meta_path.insert(0, Interrupting())
        with pytest.raises(KeyboardInterrupt):
            lazy.load_module(module)
        assert lazy._interrupted == f"importing {module} was interrupted (KeyboardInterrupt)"
        assert lazy.broken() is None  # an interrupted import alone is not yet a failure
        sys.meta_path.pop(0)
        break_imports(module)
        with pytest.raises(WorkerBroken) as e:
            preprocess_batch(_text_batch(["a", "b"]))
        msg = str(e.value)
        assert msg.startswith(f"this process cannot load {module} (RuntimeError: dup"), msg
        assert f"since importing {module} was interrupted" in msg, msg
        assert lazy.broken() == msg  # what a Serve replica's health check reports


def test_a_worker_that_cannot_import_its_decoders_is_replaced(tmp_path, ray_session):
    # In a Ray worker the same error ends the worker (not the job): Ray runs the task again on
    # a fresh worker, and the items are embedded instead of recorded as failed.
    import ray
    import ray.cloudpickle

    marker = str(tmp_path / "first-attempt-pid")

    @ray.remote(max_retries=1)
    def attempt(batch: pa.Table) -> tuple[int, list[dict]]:
        if not os.path.exists(marker):
            with open(marker, "w") as f:
                f.write(str(os.getpid()))
            break_imports("imagebind_core.preprocess.text")
        out = preprocess_batch(batch)
        return os.getpid(), out.select(["id", "status", "error"]).to_pylist()

    # Workers cannot import the test modules: their functions travel by value.
    here = [sys.modules[__name__], sys.modules[break_imports.__module__]]
    for m in here:
        ray.cloudpickle.register_pickle_by_value(m)
    try:
        pid, rows = ray.get(attempt.remote(_text_batch(["a", "b", "c"])), timeout=180)
    finally:
        for m in here:
            ray.cloudpickle.unregister_pickle_by_value(m)
    with open(marker) as f:
        assert int(f.read()) != pid, "the task was not run again in another worker"
    assert [(r["id"], r["status"], r["error"]) for r in rows] == [
        (i, STATUS_OK, None) for i in "abc"
    ]


def test_a_new_manifest_repeating_a_committed_id_is_the_one_said_to_skip_it(tmp_path, caplog):
    # `d_ws` committed `w2`; then `0_early`, which sorts before it, arrives with `w2` too. The
    # committed row is never retracted, so `0_early`'s `w2` is the one skipped: the warning
    # named `d_ws` (planning's name order) and said nothing of `0_early`.
    from pipelines.plan import reconcile

    corpus, out = tmp_path / "in", tmp_path / "out"
    corpus.mkdir()
    (corpus / "d_ws.csv").write_text("id,modality,text\nw1,text,one\nw2,text,two\n")
    cfg = load_config(None, {**SMALL, "input": str(corpus), "output": str(out)})
    rows = [{**_row(i, shard="d_ws"), "id": f"w{i}"} for i in (1, 2)]
    write_parts(_encoded(rows), str(out), None, 4)
    commit_shard(str(out), "d_ws", None, 4, {}, identity=plan_job(cfg).shards[0].identity)
    (corpus / "0_early.csv").write_text("id,modality,text\nw2,text,steals\nnew0,text,new\n")
    plan = plan_job(cfg)
    output = Output(str(out))
    with caplog.at_level("WARNING", logger="pipelines.plan"):
        new, extended, unchanged = reconcile(plan, output, output.committed_shards(), None)
    said = [r.getMessage() for r in caplog.records if "repeat ids" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith("manifest 0_early: 1 rows repeat ids"), said
    assert "['w2']" in said[0]
    assert [s.name for s in new] == ["0_early"] and new[0].exclude == ["w2"]
    assert new[0].counts == {"text": 1} and [s.name for s in unchanged] == ["d_ws"]
    assert extended == []


def test_a_committed_file_changed_outside_a_run_is_not_trusted_on_a_rerun(tmp_path, caplog):
    """The input record vouches for the committed files' names and sizes: a rerun with the
    input unchanged reads the ids of a shard whose files changed since (cut short: named, not
    skipped; deleted: what it held is embedded again) instead of calling the shard done."""
    import shutil

    from pipelines.embed import _Run
    from pipelines.store import OutputDamaged

    corpus, out = tmp_path / "in", tmp_path / "out"
    corpus.mkdir()
    (corpus / "m.csv").write_text("id,modality,text\nx1,text,one\nx2,text,two\nx3,text,three\n")
    cfg = load_config(None, {**SMALL, "input": str(corpus), "output": str(out)})
    plan = plan_job(cfg)
    rows = [_row(1, shard="m"), _row(2, shard="m"), _row(3, STATUS_ERROR, shard="m")]
    write_parts(_encoded(rows), str(out), None, 4)
    commit_shard(str(out), "m", None, 4, {}, identity=plan.shards[0].identity)
    pristine = tmp_path / "pristine"
    shutil.copytree(out, pristine)

    def rerun() -> list:
        run = _Run(cfg, plan, Output(str(out)), {"imagebind.embed_dim": "4"}, 0.0)
        return [(s.name, s.counts, s.exclude) for s in run.reconcile()]

    assert rerun() == []  # nothing changed: the record is trusted, no id is read

    (out / "_errors" / "m.parquet").unlink()  # x3's failure is gone: x3 is done again
    with caplog.at_level("WARNING", logger="pipelines.store"):
        assert rerun() == [("m", {"text": 1}, ["x1", "x2"])]
    assert "shard m: committed files changed since the shard was committed" in caplog.text
    assert "_errors/m.parquet: " in caplog.text and "-> absent bytes" in caplog.text

    shutil.rmtree(out)
    shutil.copytree(pristine, out)
    with open(out / "m.parquet", "r+b") as f:
        f.truncate(100)
    with pytest.raises(OutputDamaged, match=r"committed file .*/m\.parquet is not readable"):
        rerun()

    shutil.rmtree(out)
    shutil.copytree(pristine, out)
    record = json.loads((out / "_inputs" / "m.json").read_text())
    assert set(record["files"]) == {"m.parquet", "_errors/m.parquet"}
    # A record of an earlier version (no sizes) is trusted as before.
    (out / "_inputs" / "m.json").write_text(json.dumps({"identity": record["identity"]}))
    with open(out / "m.parquet", "r+b") as f:
        f.truncate(100)
    assert rerun() == []
