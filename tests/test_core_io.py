"""`imagebind_core.io`: one way to turn a URI into bytes, with limits and typed errors."""

from __future__ import annotations

import pickle

import pytest

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
