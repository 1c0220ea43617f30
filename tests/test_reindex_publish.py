"""Publishing primitives over real HTTP (moto's S3 server) and on a local folder:
conditional writes, the pointer compare-and-swap, the lease lock and retention."""

from __future__ import annotations

import json
import time
import uuid

import pytest

from imagebind_core.index import Pointer, read_pointer
from pipelines.publish import IndexRoot, PublishConflict, version_name
from pipelines.store import PreconditionFailed, open_store


@pytest.fixture(params=["s3", "local"])
def root(request, tmp_path) -> tuple[str, dict]:
    if request.param == "local":
        return str(tmp_path / "idx"), {}
    s3 = request.getfixturevalue("s3_server")
    bucket = f"pub-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(bucket)
    return f"s3://{bucket}/some/index", s3.storage_options


def test_conditional_put_and_delete(root):
    store = open_store(*root)
    assert store.get("k") is None
    e1 = store.put("k", b"one", if_none_match=True)
    with pytest.raises(PreconditionFailed):
        store.put("k", b"two", if_none_match=True)
    assert store.get("k") == (b"one", e1)
    e2 = store.put("k", b"two", if_match=e1)
    with pytest.raises(PreconditionFailed):
        store.put("k", b"three", if_match=e1)  # stale etag
    assert store.get("k")[0] == b"two"
    with pytest.raises(PreconditionFailed):
        store.delete("k", if_match=e1)
    store.delete("k", if_match=e2)
    assert store.get("k") is None
    with pytest.raises(PreconditionFailed):
        store.put("k", b"x", if_match=e2)  # gone


def _stage(ir: IndexRoot, version: int, run: str, parent: str | None) -> Pointer:
    name = version_name(version, run)
    ir.write_record(name, {"version": version, "name": name, "parent_name": parent})
    return Pointer(version, name, "2026-01-01T00:00:00+00:00")


def test_pointer_cas_exactly_one_of_two_publishes(root):
    ir = IndexRoot(*root)
    assert ir.latest() == (None, None)
    p1 = _stage(ir, 1, "aaaa", None)
    ir.publish(p1, None)
    with pytest.raises(PublishConflict):
        ir.publish(_stage(ir, 1, "bbbb", None), None)  # first version exists already
    cur, etag = ir.latest()
    assert cur == p1
    # Two runs staged on the same parent and read the same pointer etag: whichever swaps
    # second must fail and change nothing. (Sequential on purpose: moto's own check-then-put
    # is not atomic under truly simultaneous requests, S3's is.)
    a, b = _stage(ir, 2, "aaaa", p1.name), _stage(ir, 2, "bbbb", p1.name)
    ir.publish(a, etag)
    with pytest.raises(PublishConflict):
        ir.publish(b, etag)
    winner = a.name
    assert read_pointer(*root).name == winner
    assert [r["name"] for r in ir.history()] == [winner, p1.name]


def test_index_root_lease_excludes_and_recovers_a_stale_lock(root):
    """The lease reindex holds on the index root: a second run is refused; an expired lock
    left by a crashed run is recovered."""
    from pipelines.lock import LOCK_KEY, OutputLock, OutputLocked

    with OutputLock(root[0], root[1], ttl_s=60), pytest.raises(OutputLocked):
        OutputLock(root[0], root[1], ttl_s=60).acquire()
    store = open_store(*root)
    stale = {"host": "elsewhere", "pid": 1, "renewed_at": 0, "expires_at": time.time() - 1}
    store.put(LOCK_KEY, json.dumps(stale).encode())
    with OutputLock(root[0], root[1], ttl_s=60):
        assert json.loads(store.get(LOCK_KEY)[0])["host"] != "elsewhere"
    assert store.get(LOCK_KEY) is None


def test_retention_keeps_last_n_and_removes_abandoned_stages(root):
    ir = IndexRoot(*root)
    parent, etag = None, None
    for v in range(1, 5):
        p = _stage(ir, v, "run", parent)
        ir.publish(p, etag)
        parent, etag = p.name, ir.latest()[1]
    _stage(ir, 3, "crashed", "00000002-run")  # abandoned (lost / crashed) stage
    _stage(ir, 5, "inflight", parent)  # a run still staging the next version
    removed = ir.apply_retention(keep=2)
    assert sorted(removed) == ["00000001-run", "00000002-run", "00000003-crashed"]
    assert ir._list_version_names() == ["00000003-run", "00000004-run", "00000005-inflight"]
    assert [r["version"] for r in ir.history()] == [4, 3]
    with pytest.raises(ValueError):
        ir.apply_retention(keep=0)


def test_a_store_without_conditional_writes_is_refused_by_name():
    from pipelines.store import open_store

    with pytest.raises(ValueError, match=r"not on gs://"):
        open_store("gs://bucket/index")
