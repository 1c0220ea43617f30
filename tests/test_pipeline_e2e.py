"""The embedding job end to end on local Ray: every input format, from a local folder and from
S3 (moto's server over HTTP), with corrupt items mixed in; values equal imagebind_core's.

One Ray Data execution per (format, location): the assertions share it.
"""

from __future__ import annotations

import uuid

import numpy as np
import pyarrow as pa
import pytest
from helpers.pipeline import (
    BUILDERS,
    EMBED_DIM,
    MAX_TEXT_CHARS,
    SMALL_FILES_JOB,
    Writer,
    expected_embeddings,
    read_output,
)
from numerics import assert_embeddings_close

import imagebind_core as ibc
from pipelines.config import load_config
from pipelines.embed import embed_items, run_job
from pipelines.plan import list_items

# SMALL_FILES_JOB (helpers.pipeline) plus this module's text limit.
SMALL = {**SMALL_FILES_JOB, "preprocess.limits": {"max_text_chars": MAX_TEXT_CHARS}}


@pytest.fixture(scope="module")
def tiny_model():
    # All six encoders: the job's one-kind actors must produce the same numbers.
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ibc.load_model(None, "tiny", device="cpu")


@pytest.mark.parametrize("location", ["local", "s3"])
@pytest.mark.parametrize("fmt", ["files", "manifest", "webdataset"])
def test_embed_end_to_end(fmt, location, tmp_path, ray_session, s3_server, tiny_model):
    if location == "s3":
        bucket = s3_server.create_bucket(f"e2e-{fmt}-{uuid.uuid4().hex[:6]}")
        fs = s3_server.filesystem()
        writer = Writer(f"s3://{bucket}/corpus", fs)
        output = f"s3://{bucket}/out"
        storage = {
            "storage.endpoint_url": s3_server.endpoint_url,
            "storage.key": s3_server.key,
            "storage.secret": s3_server.secret,
            "storage.region": s3_server.region,
        }
    else:
        fs = None
        writer = Writer(str(tmp_path / "corpus"))
        output = str(tmp_path / "out")
        storage = {}
    corpus = BUILDERS[fmt](writer)
    cfg = load_config(None, {**SMALL, **storage, "input": corpus.input, "output": output})

    summary = run_job(cfg)

    emb, err, files = read_output(output, fs)
    ids = emb.column("id").to_pylist()
    err_ids = err.column("id").to_pylist()
    # Every item exactly once: good ones embedded, bad ones in _errors, nothing else.
    assert len(ids) == len(set(ids)), "duplicate ids in the embeddings"
    assert sorted(ids) == sorted(corpus.good)
    assert sorted(err_ids) == sorted(corpus.bad)
    assert not set(ids) & set(err_ids)
    assert sum(summary.ok.values()) == len(corpus.good)
    assert sum(summary.errors.values()) == len(corpus.bad)
    assert summary.shards_committed == len(files) == summary.shards_total

    # Types and metadata.
    assert emb.schema.field("embedding").type == pa.list_(pa.float32(), EMBED_DIM)
    meta = {k.decode(): v.decode() for k, v in (emb.schema.metadata or {}).items()}
    assert meta["imagebind.preset"] == "tiny"
    assert meta["imagebind.checkpoint_sha256"] == "random"
    assert meta["imagebind.dtype"] == "float32"
    assert meta["imagebind.preprocess_version"] == str(ibc.PREPROCESS_VERSION)

    # Values: the same as imagebind_core called directly on the same bytes.
    want = expected_embeddings(corpus, tiny_model)
    got = dict(zip(ids, emb.column("embedding").to_pylist(), strict=True))
    kinds = dict(zip(ids, emb.column("modality").to_pylist(), strict=True))
    for id_, (kind, _) in corpus.good.items():
        assert kinds[id_] == kind
        assert_embeddings_close(np.asarray(got[id_]), want[id_])
        assert abs(np.linalg.norm(got[id_]) - 1) < 1e-4

    # Errors carry the reason and the modality as read.
    reasons = dict(zip(err_ids, err.column("error").to_pylist(), strict=True))
    err_kinds = dict(zip(err_ids, err.column("modality").to_pylist(), strict=True))
    for id_, kind in corpus.bad.items():
        assert reasons[id_], f"{id_}: no reason"
        assert err_kinds[id_] == kind
    # Fingerprints are computable from a listing: ETag on S3, size+mtime locally, hash inline.
    fps = dict(zip(ids, emb.column("fingerprint").to_pylist(), strict=True))
    for id_ in ids:
        fp = fps[id_]
        if fmt == "webdataset":
            assert "#" in fp and fp.endswith(id_.split("#", 1)[1])
        elif fmt == "manifest" and isinstance(corpus.good[id_][1], str):
            assert fp.startswith("sha256:")
        else:
            assert fp.startswith("etag:" if location == "s3" else "stat:"), fp
    if fmt == "manifest":
        assert "not found" in reasons["a3"]
        assert "smell" in reasons["a4"]
    if fmt == "files":
        assert corpus.skipped[0] not in ids

    # The listing re-indexing diffs against (no payload read) gives the stored fingerprints.
    listed = list_items(cfg)
    listed_ids = listed.column("id").to_pylist()
    assert len(listed_ids) == len(set(listed_ids)), "the listing repeats ids"
    listed_fp = dict(
        zip(listed.column("id").to_pylist(), listed.column("fingerprint").to_pylist(), strict=True)
    )
    assert {i: listed_fp[i] for i in ids} == fps

    if fmt == "webdataset" and location == "local":
        # Re-indexing's entry point: embed only some listed rows (here two of one shard, one
        # good and one bad) into another output; same ids, same values.
        pick = sorted(ids)[:1] + sorted(corpus.bad)[:1]
        mask = pa.array([i in pick for i in listed.column("id").to_pylist()])
        sub = embed_items(cfg, listed.filter(mask), output=str(tmp_path / "subset"))
        emb2, err2, _ = read_output(str(tmp_path / "subset"))
        assert emb2.column("id").to_pylist() == pick[:1]
        assert err2.column("id").to_pylist() == pick[1:]
        assert_embeddings_close(emb2.column("embedding").to_pylist()[0], want[pick[0]])
        assert sub.shards_committed == 1

    # A rerun finds everything committed and does nothing.
    again = run_job(cfg)
    assert again.shards_committed == 0 and again.shards_skipped == summary.shards_total
    assert read_output(output, fs)[0].num_rows == emb.num_rows


def test_checkpoint_from_s3_is_loaded_verified_and_recorded(tmp_path, ray_session, s3_server):
    """The production path: weights from an object-store checkpoint (here a tiny model with
    seed 1, saved in this package's layout), sha256 in the metadata, raw output on request."""
    import hashlib
    import io as _io
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = ibc.load_model(None, "tiny", device="cpu", seed=1)
    buf = _io.BytesIO()
    torch.save(model.state_dict(), buf)
    bucket = s3_server.create_bucket(f"ckpt-{uuid.uuid4().hex[:6]}")
    fs = s3_server.filesystem()
    fs.pipe(f"{bucket}/tiny.pth", buf.getvalue())
    texts = {"t0": "a cat on a mat", "t1": "rain over the harbour"}
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "m.jsonl").write_text(
        "".join(f'{{"id": "{k}", "modality": "text", "text": "{v}"}}\n' for k, v in texts.items())
    )
    cfg = load_config(
        None,
        {
            **SMALL,
            "input": str(tmp_path / "in"),
            "output": str(tmp_path / "out"),
            "checkpoint": f"s3://{bucket}/tiny.pth",
            "normalize": False,
            "storage.endpoint_url": s3_server.endpoint_url,
            "storage.key": s3_server.key,
            "storage.secret": s3_server.secret,
            "storage.region": s3_server.region,
        },
    )
    run_job(cfg)
    emb, err, _ = read_output(str(tmp_path / "out"))
    assert err.num_rows == 0
    meta = emb.schema.metadata
    assert (
        meta[b"imagebind.checkpoint_sha256"].decode() == hashlib.sha256(buf.getvalue()).hexdigest()
    )
    assert meta[b"imagebind.normalize"] == b"false"
    x = ibc.collate([ibc.preprocess("text", t) for t in texts.values()])
    with torch.inference_mode():
        want = model({"text": x})["text"].numpy()  # raw (not normalised)
    got = dict(zip(emb.column("id").to_pylist(), emb.column("embedding").to_pylist(), strict=True))
    assert_embeddings_close(np.array([got["t0"], got["t1"]]), want)


def test_a_checkpoint_the_encoders_cannot_load_ends_the_run_with_one_sentence(
    tmp_path, ray_session
):
    # With checkpoint_sha256 given the driver does not fetch the checkpoint, so only the
    # encoder actors find that it holds another model's weights: the run ends with their
    # CheckpointError itself (exit status 2 on the command line), not Ray's task error.
    import hashlib

    import torch

    from imagebind_core.errors import CheckpointError

    path = tmp_path / "other.pth"
    torch.save({"head.weight": torch.zeros(2, 2)}, path)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "m.jsonl").write_text('{"id": "t0", "modality": "text", "text": "a"}\n')
    cfg = load_config(
        None,
        {
            **SMALL,
            "input": str(tmp_path / "in"),
            "output": str(tmp_path / "out"),
            "checkpoint": str(path),
            "checkpoint_sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        },
    )
    with pytest.raises(CheckpointError, match="does not match the 'tiny' configuration") as e:
        run_job(cfg)
    assert "Traceback" not in str(e.value) and "RayTaskError" not in str(e.value)
    assert e.value.__cause__ is None
