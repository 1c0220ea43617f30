"""The shared encoder runner and the job's batch transport, without Ray.

- The compact transport (one contiguous buffer per block, uint8 pixels, int32 token ids
  through the end-of-text token) gives the embeddings of the float path, per kind.
- The job's encoder actor and the endpoint's replica run the same `EncoderRunner` and give
  the same vectors for the same inputs.
- `ModelSpec` names everything that changes a vector; the job refuses to add to an output
  written by another spec, and re-indexing re-embeds when it changes.
"""

from __future__ import annotations

import itertools
import threading

import media
import numpy as np
import pyarrow as pa
import pytest
import torch
from numerics import assert_embeddings_close

import imagebind_core as ibc
from pipelines.rows import ITEM_SCHEMA, STATUS_ERROR, STATUS_OK
from pipelines.stages import (
    EncodeBatch,
    batch_arrays,
    compact_input,
    preprocess_batch,
    tensor_columns,
    token_columns,
)


def items(kind: str) -> list[bytes]:
    return {
        "vision": [media.make_image("JPEG", (320 + 16 * i, 240), seed=i) for i in range(3)],
        "video": [media.make_video(2, 10, (160, 120))],
        "text": [b"a dog", b"two dogs playing on a beach at dusk", b"", b"<|endoftext|> x"],
        "audio": [media.make_flac(2.0, 16000, 1), media.make_wav(1.0, 22050, 2, seed=1)],
        "depth": [media.make_depth_png((160, 120), seed=i) for i in range(2)],
        "thermal": [media.make_gray_png((160, 120), seed=i) for i in range(2)],
        "imu": [media.make_imu_npy(2000, seed=i) for i in range(2)],
    }[kind]


def block(kind: str, data: list[bytes], bad: bool = True) -> pa.Table:
    """Item rows of `kind`; with `bad`, a corrupt item and a row rejected upstream mixed in."""
    n = len(data) + (2 if bad else 0)
    rows = {f.name: [None] * n for f in ITEM_SCHEMA}
    extra = [media.random_bytes(300, seed=9), None] if bad else []
    rows.update(
        id=[f"{kind}{i}" for i in range(n)],
        modality=[kind] * n,
        status=[STATUS_OK] * (n - 1) + [STATUS_ERROR if bad else STATUS_OK],
        error=[None] * (n - 1) + ["rejected while reading" if bad else None],
        data=[*data, *extra],
        fingerprint=["x"] * n,
    )
    if kind == "text" and bad:  # any bytes are a text: the "corrupt" row is rejected upstream
        rows["data"][len(data)] = None
        rows["status"][len(data)] = STATUS_ERROR
    return pa.table(rows, schema=ITEM_SCHEMA)


@pytest.mark.parametrize("kind", ["vision", "video", "text", "audio", "depth", "thermal", "imu"])
def test_compact_transport_gives_the_float_paths_embeddings(kind):
    data = items(kind)
    model = ibc.build_model("tiny", [ibc.model_modality(kind)])
    pre = preprocess_batch(block(kind, data))
    got = EncodeBatch(kind, model=model)(pre)
    by_id = dict(
        zip(got.column("id").to_pylist(), got.column("embedding").to_pylist(), strict=True)
    )
    full = torch.stack([ibc.preprocess(kind, d) for d in data])  # the float path
    want = model.encode(ibc.model_modality(kind), full, normalize=True).numpy()
    for i, w in enumerate(want):
        g = np.asarray(by_id[f"{kind}{i}"], np.float32)
        assert np.abs(g - w).max() <= 1e-6 * np.linalg.norm(w), kind
    status = dict(zip(got.column("id").to_pylist(), got.column("status").to_pylist(), strict=True))
    assert [status[f"{kind}{i}"] for i in range(len(data))] == [STATUS_OK] * len(data)
    assert by_id[f"{kind}{len(data) + 1}"] is None  # the row rejected upstream: no vector
    if kind != "text":
        assert status[f"{kind}{len(data)}"] == STATUS_ERROR  # the corrupt item
        assert by_id[f"{kind}{len(data)}"] is None

    # Smallest exact forms: uint8 pixels; token ids as int32 without their padding, and the
    # ids the encoder receives equal the tokenizer's, up to where only padding follows.
    ok = pre.filter(pa.compute.equal(pre.column("status"), STATUS_OK))
    dtypes = set(ok.column("tensor_dtype").to_pylist())
    assert dtypes == {{"vision": "|u1", "text": "<i4"}.get(kind, "<f4")}
    if kind == "text":
        ((_idx, x),) = batch_arrays(ok, range(ok.num_rows), pad=True)
        tok = {i: ibc.preprocess("text", d).numpy() for i, d in enumerate(data)}
        ids = [int(r.removeprefix("text")) for r in ok.column("id").to_pylist()]
        want_ids = np.stack([tok[i] for i in ids])
        assert x.dtype == np.int32 and x.shape[1] < want_ids.shape[1]
        np.testing.assert_array_equal(x, want_ids[:, : x.shape[1]])
        assert not want_ids[:, x.shape[1] :].any()  # only padding was left behind


def test_batch_arrays_views_runs_and_groups_shapes():
    a, b, c = (np.arange(6, dtype=np.float32).reshape(2, 3) + k for k in range(3))
    d = np.ones((4, 3), np.float32)
    tensor, shape, dtype = tensor_columns([a, None, b, d, c])
    t = pa.table({"tensor": tensor, "tensor_shape": shape, "tensor_dtype": dtype})
    assert t.column("tensor").null_count == 1
    groups = batch_arrays(t, [0, 2, 3, 4])
    assert [idx for idx, _ in groups] == [[0, 2, 4], [3]]
    np.testing.assert_array_equal(groups[0][1], np.stack([a, b, c]))  # gathered (3 is between)
    np.testing.assert_array_equal(groups[1][1], d[None])
    # Rows 0 and 2 are neighbours in the buffer (the null row adds no bytes): a view of it.
    ((idx, x),) = batch_arrays(t, [0, 2])
    buf = np.frombuffer(t.column("tensor").chunk(0).buffers()[2], np.uint8)
    assert idx == [0, 2] and np.shares_memory(x, buf)
    np.testing.assert_array_equal(x, np.stack([a, b]))
    # Token rows of different lengths: one batch, zero-padded to the longest.
    ids = [np.array([5, 49407], np.int32), np.array([7, 8, 9, 49407], np.int32)]
    tensor, shape, dtype = tensor_columns(ids)
    t = pa.table({"tensor": tensor, "tensor_shape": shape, "tensor_dtype": dtype})
    ((idx, x),) = batch_arrays(t, [0, 1], pad=True)
    np.testing.assert_array_equal(x, [[5, 49407, 0, 0], [7, 8, 9, 49407]])
    assert batch_arrays(t, [0, 1]) != []  # unpadded: one group per length
    assert len(batch_arrays(t, [0, 1])) == 2


def test_batch_arrays_of_joined_blocks_are_views_of_each_block():
    # Ray Data hands the actor two or more blocks as one table (one chunk each). Their rows are
    # viewed where they lie, not joined into a new buffer first: a `RowParts` of one view per
    # block, equal to the rows of the blocks joined.
    rng = np.random.default_rng(0)
    rows = [rng.integers(0, 255, (3, 4, 5), np.uint8) for _ in range(7)]
    blocks = []
    for part in (rows[:3], [None, *rows[3:5]], rows[5:]):
        tensor, shape, dtype = tensor_columns(part)
        blocks.append(pa.table({"tensor": tensor, "tensor_shape": shape, "tensor_dtype": dtype}))
    joined = pa.concat_tables(blocks)
    assert joined.column("tensor").num_chunks == 3
    ok = [0, 1, 2, 4, 5, 6, 7]  # row 3 is the null one
    ((idx, x),) = batch_arrays(joined, ok)
    assert idx == ok and isinstance(x, ibc.RowParts) and len(x.parts) == 3
    assert x.shape == (7, 3, 4, 5) and x.dtype == np.uint8 and len(x) == 7
    want = np.stack(rows)
    np.testing.assert_array_equal(x.join(), want)
    for part, b in zip(x.parts, blocks, strict=True):
        assert np.shares_memory(
            part, np.frombuffer(b.column("tensor").chunk(0).buffers()[2], np.uint8)
        )
    # The same rows from the blocks combined into one buffer: the same arrays.
    ((_, one),) = batch_arrays(joined.combine_chunks(), ok)
    assert isinstance(one, np.ndarray)
    np.testing.assert_array_equal(one, want)
    # A subset across blocks, and a block's rows sliced by Ray Data (an offset into a chunk).
    ((idx, x),) = batch_arrays(joined, [1, 5, 6])
    np.testing.assert_array_equal(np.asarray(x), want[[1, 4, 5]])
    sliced = pa.concat_tables([blocks[0].slice(1), blocks[2].slice(0, 1)])
    ((idx, x),) = batch_arrays(sliced, [0, 1, 2])
    np.testing.assert_array_equal(x.join(), want[[1, 2, 5]])
    # Rows of another shape between them: one batch per shape, each a view or its parts.
    odd = np.ones((2, 2), np.uint8)
    tensor, shape, dtype = tensor_columns([rows[0], odd, rows[1]])
    mixed = pa.concat_tables(
        [blocks[2], pa.table({"tensor": tensor, "tensor_shape": shape, "tensor_dtype": dtype})]
    )
    groups = batch_arrays(mixed, [0, 1, 2, 3, 4])
    assert [g[0] for g in groups] == [[0, 1, 2, 4], [3]]
    np.testing.assert_array_equal(np.asarray(groups[0][1]), np.stack([*rows[5:], rows[0], rows[1]]))
    np.testing.assert_array_equal(groups[1][1], odd[None])


def test_row_parts_slice_like_the_joined_array():
    rng = np.random.default_rng(1)
    parts = [rng.standard_normal((n, 3)).astype(np.float32) for n in (2, 5, 1, 3)]
    x, want = ibc.RowParts(parts), np.concatenate(parts)
    for a in range(-12, 13):
        for b in [*range(-12, 13), None]:
            got = x[a:b]
            np.testing.assert_array_equal(np.asarray(got), want[a:b], err_msg=f"{a}:{b}")
            assert np.asarray(got).shape == want[a:b].shape
    assert isinstance(x[2:6], np.ndarray) and np.shares_memory(x[2:6], parts[1])  # one part
    out = np.empty_like(want)
    assert x.join(out=out) is out
    np.testing.assert_array_equal(out, want)
    with pytest.raises(ValueError, match="parts differ"):
        ibc.RowParts([parts[0], parts[1].astype(np.float64)])
    with pytest.raises(TypeError):
        x[::2]


def test_an_actor_call_over_joined_blocks_embeds_as_over_one_block():
    # What the job's actor gets most often: two preprocessed blocks in one call. The runner
    # joins their views once (CPU) and the vectors are those of the same rows in one block.
    data = items("vision") * 2
    pre = [preprocess_batch(block("vision", data[:3])), preprocess_batch(block("vision", data[3:]))]
    joined = pa.concat_tables(pre)
    assert joined.column("tensor").num_chunks == 2
    actor = EncodeBatch("vision", ibc.ModelSpec(preset="tiny", device="cpu"), batch_size=4)
    got, one = actor(joined), actor(joined.combine_chunks())
    assert got.column("status").to_pylist() == one.column("status").to_pylist()
    assert got.column("status").to_pylist().count(STATUS_OK) == 6
    vectors = got.column("embedding").to_pylist()
    assert sum(v is not None for v in vectors) == 6
    assert vectors == one.column("embedding").to_pylist()  # the same floats, bit for bit
    # The runner given the parts stages the joined batch (CPU: one array).
    runner = actor.runner
    ((_, x),) = batch_arrays(joined, [0, 1, 2, 5, 6, 7])
    assert isinstance(x, ibc.RowParts)
    np.testing.assert_array_equal(runner.stage("vision", x).x.numpy(), x.join())
    np.testing.assert_array_equal(runner.encode("vision", x), runner.encode("vision", x.join()))


def test_the_null_encoders_stand_in_computes_one_batch_at_a_time_and_logs_it(tmp_path):
    # bench_feed's stand-in accelerator: each model batch holds the actor's one compute slot
    # for its items times `null_item_s`, whichever thread calls (a GPU actor runs two calls
    # at once), and the log holds every batch; the rows come out as the null encoder's.
    data = items("vision") * 2
    pre = [preprocess_batch(block("vision", data[:3])), preprocess_batch(block("vision", data[3:]))]
    joined = pa.concat_tables(pre)
    log = tmp_path / "busy.log"
    kw = {"batch_size": 2, "null_encoder": True}
    actor = EncodeBatch(
        "vision", ibc.ModelSpec(preset="tiny"), **kw, null_item_s=0.05, null_log_path=str(log)
    )
    outs: list[pa.Table] = []
    calls = [threading.Thread(target=lambda: outs.append(actor(joined))) for _ in range(2)]
    for t in calls:
        t.start()
    for t in calls:
        t.join()
    plain = EncodeBatch("vision", ibc.ModelSpec(preset="tiny"), **kw)(joined)
    for out in outs:
        assert out.to_pylist() == plain.to_pylist()
    ok = plain.column("status").to_pylist().count(STATUS_OK)
    spans = sorted((float(a), float(b), int(n)) for _, a, b, n in map(str.split, log.open()))
    assert sum(n for *_, n in spans) == 2 * ok  # every embedded row of both calls, once
    assert all(n <= 2 for *_, n in spans)  # in model batches
    # Unix times (the log is read beside a job's): a millisecond's leeway for clock slew.
    for a, b, n in spans:
        assert b - a >= n * 0.05 - 1e-3
    for (_, b, _), (a, _, _) in itertools.pairwise(spans):
        assert a >= b - 1e-3  # one batch at a time


def test_token_columns_equal_the_per_row_transport():
    # A text block's columns built at once equal those of its rows one by one (the same
    # bytes, shapes and dtypes; null rows where no tensor), and so do the encoder's batches.
    texts = ["a dog", "", "two dogs playing on a beach " * 20, "<|endoftext|> x", "b"]
    tok = torch.stack([ibc.preprocess("text", t, compact=True) for t in texts]).numpy()
    present = np.array([True, True, False, True, True])
    tok[2] = 7  # a row without a tensor: its values are never read
    got = token_columns(tok, present)
    want = tensor_columns(
        [
            compact_input("text", torch.from_numpy(r)) if p else None
            for r, p in zip(tok, present, strict=True)
        ]
    )
    for g, w in zip(got, want, strict=True):
        assert g.type == w.type and g.to_pylist() == w.to_pylist()
    t = pa.table(dict(zip(["tensor", "tensor_shape", "tensor_dtype"], got, strict=True)))
    ((idx, x),) = batch_arrays(t, [0, 1, 3, 4], pad=True)
    assert idx == [0, 1, 3, 4] and x.dtype == np.int32
    np.testing.assert_array_equal(x, tok[[0, 1, 3, 4], : x.shape[1]])
    assert not tok[[0, 1, 3, 4], x.shape[1] :].any()


def test_job_actor_and_endpoint_replica_run_the_same_runner():
    from serve.encoder import EncodeCall, EncoderCore

    spec = ibc.ModelSpec(preset="tiny", device="cpu")
    job = EncodeBatch("vision", spec)
    endpoint = EncoderCore("vision", preset="tiny", device="cpu")
    assert isinstance(job.runner, ibc.EncoderRunner)
    assert isinstance(endpoint.runner, ibc.EncoderRunner)
    data = items("vision")
    got = job(preprocess_batch(block("vision", data, bad=False)))
    job_emb = np.array(got.column("embedding").to_pylist(), np.float32)
    x = np.stack([ibc.preprocess("vision", d, compact=True).numpy() for d in data])
    (served,) = endpoint.encode([EncodeCall(x, normalize=True)])
    np.testing.assert_array_equal(job_emb, served)
    assert (
        job.runner.lineage()["checkpoint_sha256"] == endpoint.info()["lineage"]["checkpoint_sha256"]
    )


def test_runner_loads_in_the_background_and_overlaps_safely():
    spec = ibc.ModelSpec(preset="tiny", device="cpu")
    runner = ibc.EncoderRunner(spec, "text", background=True)
    x = ibc.collate([ibc.preprocess("text", t) for t in ["a", "a dog", "the red car"]]).numpy()
    want = ibc.build_model("tiny", ["text"]).encode("text", torch.from_numpy(x), normalize=True)
    assert_embeddings_close(runner.encode("text", x), want.numpy())
    assert runner.loaded
    # Two batches in flight from one thread, and two callers at once: the same vectors.
    batches = [("text", x[:1]), ("text", x[1:]), ("text", x)]
    outs = list(runner.encode_all(batches))
    assert_embeddings_close(np.concatenate(outs[:2]), outs[2], "batched vs split")
    results: dict[int, np.ndarray] = {}

    def call(k: int) -> None:
        results[k] = runner.encode("text", x)

    threads = [threading.Thread(target=call, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k in range(4):
        np.testing.assert_array_equal(results[k], results[0])
    # A load that fails in the background fails the first batch, with the load's error.
    broken = ibc.EncoderRunner(
        ibc.ModelSpec(preset="tiny", checkpoint="/nonexistent/w.pth"), "text", background=True
    )
    with pytest.raises(Exception, match="nonexistent"):
        broken.encode("text", x)
    # ... and in the job's actor it fails the call (the job), not each item as an error row.
    actor = EncodeBatch("text", ibc.ModelSpec(preset="tiny", checkpoint="/nonexistent/w.pth"))
    with pytest.raises(Exception, match="nonexistent"):
        actor(preprocess_batch(block("text", [b"a dog"], bad=False)))


def test_spec_lineage_names_everything_that_changes_a_vector():
    base = ibc.ModelSpec(preset="tiny")
    key = ibc.lineage_key(base.lineage())
    assert key["checkpoint_sha256"] == "random" and key["seed"] == "0"
    changed = {
        "dtype": ibc.ModelSpec(preset="tiny", dtype="bfloat16"),
        "seed": ibc.ModelSpec(preset="tiny", seed=7),
        "normalize": ibc.ModelSpec(preset="tiny", normalize=False),
        "options": ibc.ModelSpec(preset="tiny", options={"audio": {"mean_subtraction": "x"}}),
        "limits": ibc.ModelSpec(preset="tiny", limits={"max_text_chars": 100}),
    }
    for what, spec in changed.items():
        assert ibc.lineage_key(spec.lineage()) != key, what
    # Not a vector's identity: the device, limits spelled at their default values, and the
    # options of kinds a job does not embed.
    same = [
        ibc.ModelSpec(preset="tiny", device="cuda"),
        ibc.ModelSpec(preset="tiny", limits={"max_text_chars": ibc.Limits().max_text_chars}),
    ]
    for spec in same:
        assert ibc.lineage_key(spec.lineage()) == key
    audio_opts = changed["options"]
    assert ibc.lineage_key(audio_opts.lineage(kinds=["text"])) == ibc.lineage_key(
        base.lineage(kinds=["text"])
    )
    # With a checkpoint the seed does not matter.
    ck = dict(checkpoint="/w.pth", checkpoint_sha256="ab")
    assert ibc.lineage_key(ibc.ModelSpec(preset="tiny", **ck).lineage()) == ibc.lineage_key(
        ibc.ModelSpec(preset="tiny", seed=3, **ck).lineage()
    )
    merged = ibc.merge_lineage(
        {
            "vision": ibc.ModelSpec(preset="tiny", dtype="bfloat16").lineage(),
            "text": base.lineage(),
        }
    )
    assert merged["dtype"] == "text=float32,vision=bfloat16" and merged["preset"] == "tiny"
    with pytest.raises(ValueError, match="unknown"):
        ibc.ModelSpec(preset="tiny", limits={"max_nothing": 1})
