"""`imagebind_core.io`: one way to turn a URI into bytes, with limits and typed errors."""

from __future__ import annotations

import os
import pickle

import pytest
from listener import Listener, closed_port

import imagebind_core as ibc


def test_read_bytes_local_and_limits(tmp_path):
    p = tmp_path / "a.bin"
    p.write_bytes(b"x" * 100)
    assert ibc.read_bytes(str(p)) == b"x" * 100
    assert ibc.read_bytes(f"file://{p}", max_bytes=100) == b"x" * 100
    with pytest.raises(ibc.InvalidInput, match="over the limit of 99") as e:
        ibc.read_bytes(str(p), max_bytes=99, modality="vision")
    assert e.value.modality == "vision" and e.value.item_id == str(p)
    with pytest.raises(ibc.InvalidInput, match="not found"):
        ibc.read_bytes(str(tmp_path / "missing.jpg"), modality="vision")
    (tmp_path / "empty").write_bytes(b"")
    assert ibc.read_bytes(str(tmp_path / "empty"), max_bytes=0) == b""
    big = tmp_path / "big.bin"
    big.write_bytes(bytes(range(256)) * 8192)  # 2 MiB: more than one read's worth
    assert ibc.read_bytes(str(big), max_bytes=2 << 20) == big.read_bytes()
    status = "/proc/self/status"  # a regular file whose fstat reports 0 bytes
    if os.path.exists(status):
        assert ibc.read_bytes(status).startswith(b"Name:")
        assert len(ibc.read_bytes(status)) > 100
        with pytest.raises(ibc.InvalidInput, match="over the limit of 10 bytes"):
            ibc.read_bytes(status, max_bytes=10)


def test_read_bytes_refuses_what_is_not_a_regular_file_without_waiting(tmp_path):
    """A FIFO (opening it for reading would wait for a writer), a folder and a device that
    never ends are refused at once, each named with the reason; an unreadable file is the
    item's error, not an exception of another type."""
    import threading

    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    cases = {str(fifo): "not a regular file", str(tmp_path): "a folder"}
    if os.path.exists("/dev/zero"):
        cases["/dev/zero"] = "not a regular file"
    caught: dict[str, BaseException] = {}

    def read(uri: str) -> None:
        try:
            ibc.read_bytes(uri, max_bytes=10, modality="vision")
        except BaseException as e:
            caught[uri] = e

    for uri, reason in cases.items():
        t = threading.Thread(target=read, args=(uri,), daemon=True)
        t.start()
        t.join(10)
        assert not t.is_alive(), f"reading {uri} hung"
        e = caught[uri]
        assert isinstance(e, ibc.InvalidInput) and f"cannot read {uri}: {reason}" in str(e), e
    locked = tmp_path / "locked.jpg"
    locked.write_bytes(b"x")
    locked.chmod(0)
    if os.geteuid() != 0:  # root reads it anyway
        with pytest.raises(ibc.InvalidInput, match="Permission denied"):
            ibc.read_bytes(str(locked), modality="vision")


def test_read_bytes_from_s3_over_http(s3_server):
    bucket = s3_server.create_bucket("io-bytes")
    s3_server.client().put_object(Bucket=bucket, Key="k/a.txt", Body=b"hello")
    opts = s3_server.storage_options
    assert ibc.read_bytes(f"s3://{bucket}/k/a.txt", opts) == b"hello"
    with pytest.raises(ibc.InvalidInput, match="over the limit"):
        ibc.read_bytes(f"s3://{bucket}/k/a.txt", opts, max_bytes=4, modality="text")
    with pytest.raises(ibc.InvalidInput, match="not found"):
        ibc.read_bytes(f"s3://{bucket}/k/nope.txt", opts, modality="text")


def test_invalid_input_survives_pickling_across_workers():
    e = ibc.InvalidInput("audio", "header declares 9 hours", "item-7")
    back = pickle.loads(pickle.dumps(e))
    assert (back.modality, back.reason, back.item_id) == (
        "audio",
        "header declares 9 hours",
        "item-7",
    )
    assert str(back) == "invalid audio input (item 'item-7'): header declares 9 hours"
    assert isinstance(back, ValueError)


@pytest.fixture
def listener():
    li = Listener()
    yield li
    li.close()


def test_s3_keys_with_double_colons_are_plain_keys(s3_server, listener):
    """`::` is fsspec's URL-chaining separator, and a legal S3 key character: a URI names one
    object in one store, never a chain that reaches another host."""
    bucket = s3_server.create_bucket("io-colons")
    opts = s3_server.storage_options
    chained = f"p/a::http://127.0.0.1:{listener.port}/x"
    s3 = s3_server.client()
    s3.put_object(Bucket=bucket, Key="p/a::b.txt", Body=b"colons")
    assert ibc.read_bytes(f"s3://{bucket}/p/a::b.txt", opts) == b"colons"
    # Not stored: "not found", and the host named after `::` is never asked.
    with pytest.raises(ibc.InvalidInput, match="not found"):
        ibc.read_bytes(f"s3://{bucket}/{chained}", opts, max_bytes=100, modality="vision")
    # Stored under that very key: those bytes, still without a request to the other host.
    s3.put_object(Bucket=bucket, Key=chained, Body=b"the key")
    assert ibc.read_bytes(f"s3://{bucket}/{chained}", opts, max_bytes=100) == b"the key"
    assert listener.hits == []


def test_unreachable_store_or_missing_credentials_is_store_unavailable(s3_server, monkeypatch):
    """Not the item's fault, so not InvalidInput (which a job records as a bad item and an
    endpoint answers 400): StoreUnavailable naming the store."""
    from imagebind_core.io import s3_storage_options

    dead = f"http://127.0.0.1:{closed_port()}"
    opts = {**s3_storage_options(dead, "us-east-1", "k", "s"), "config_kwargs": _no_retries()}
    with pytest.raises(ibc.StoreUnavailable, match="cannot connect") as e:
        ibc.read_bytes("s3://any/x.png", opts, max_bytes=10, modality="vision")
    assert e.value.store == dead and dead in str(e.value)
    assert not isinstance(e.value, ibc.InvalidInput)
    assert pickle.loads(pickle.dumps(e.value)).store == dead

    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    # A region no other test uses: a new client, which looks for credentials afresh.
    opts = s3_storage_options(s3_server.endpoint_url, "eu-north-1")
    with pytest.raises(ibc.StoreUnavailable, match="no credentials") as e:
        ibc.read_bytes("s3://io-bytes/k/a.txt", opts, modality="text")
    assert e.value.store == s3_server.endpoint_url


def _no_retries() -> dict:
    return {"retries": {"max_attempts": 1, "mode": "standard"}, "connect_timeout": 2}
