"""Device JPEG decode (`preprocess.decode: {vision: gpu}`), run on the CPU device: the same
code as on CUDA with device="cpu" (nvJPEG itself needs a GPU: tests/test_gpu.py).

Closeness to the exact CPU path on real photographs and generated images (numerics.py bounds),
which items go to the device and which take the CPU path, per-item fallback and errors, the
lineage, and the job end to end (every item exactly once)."""

from __future__ import annotations

import media
import numpy as np
import pyarrow as pa
import pytest
import torch
from helpers.pipeline import SMALL_JOB, read_output
from numerics import (
    DEVICE_DECODE_MAX_LEVELS,
    DEVICE_DECODE_MEAN_LEVELS,
    assert_embeddings_close,
)

import imagebind_core as ibc
from imagebind_core.preprocess.jpeg import decode_jpegs, device_decodable
from pipelines.config import ConfigError, load_config
from pipelines.embed import run_job
from pipelines.rows import ITEM_SCHEMA, STATUS_ERROR, STATUS_OK
from pipelines.stages import ENCODED_JPEG, EncodeBatch, preprocess_batch


def _pixel_diff(items: list[bytes]) -> torch.Tensor:
    res = decode_jpegs(items, "cpu")
    assert res.rows == list(range(len(items))) and not res.errors and not res.fallbacks
    want = torch.stack([ibc.preprocess("vision", d, compact=True) for d in items])
    assert res.pixels.dtype == torch.uint8 and res.pixels.shape == want.shape
    return (res.pixels.int() - want.int()).abs()


def test_device_decode_is_close_to_the_cpu_path_on_photos():
    photos = media.photo_jpegs(("astronaut", "coffee", "chelsea", "rocket"), long_sides=(512,))
    diff = _pixel_diff(list(photos.values()))
    assert diff.max() <= DEVICE_DECODE_MAX_LEVELS, diff.max()
    assert diff.float().mean() <= DEVICE_DECODE_MEAN_LEVELS, diff.float().mean()


@pytest.mark.parametrize("size", [(320, 240), (240, 320), (224, 224), (100, 80), (1000, 60)])
def test_device_decode_is_close_to_the_cpu_path_on_generated_images(size):
    """Landscape, portrait, already 224 (no resize), upscaled, and very wide."""
    items = [media.make_image("JPEG", size=size, seed=s, quality=92) for s in range(3)]
    diff = _pixel_diff(items)
    assert diff.max() <= DEVICE_DECODE_MAX_LEVELS, diff.max()
    assert diff.float().mean() <= DEVICE_DECODE_MEAN_LEVELS, diff.float().mean()
    if size == (224, 224):  # no resize: the same decoder, the same pixels
        assert diff.max() == 0


def test_only_plain_jpegs_go_to_the_device():
    lim = ibc.Limits()
    assert device_decodable(media.make_image("JPEG"), lim)
    assert not device_decodable(media.make_image("PNG"), lim)
    assert not device_decodable(media.make_image("JPEG", mode="CMYK"), lim)
    assert not device_decodable(media.make_image("JPEG", mode="L"), lim)
    assert not device_decodable(media.make_image("PNG", mode="I;16"), lim)
    assert not device_decodable(media.truncated(media.make_image("JPEG"), 0.9), lim)
    assert not device_decodable(media.random_bytes(), lim)
    # What the CPU path refuses from the header alone is refused here, with its reason.
    small = ibc.Limits(max_pixels=1000)
    with pytest.raises(ibc.InvalidInput, match="over the limit of 1000 pixels"):
        device_decodable(media.make_image("JPEG"), small)
    with pytest.raises(ibc.InvalidInput, match="aspect ratio"):
        device_decodable(media.make_image("JPEG", size=(2100, 100)), lim)
    with pytest.raises(ibc.InvalidInput, match="empty input"):
        device_decodable(b"", lim)


def test_decoder_refusals_fall_back_to_the_cpu_path_one_by_one(monkeypatch):
    """An item the device decoder refuses is decoded by the exact CPU path; one that path
    refuses too is returned with its reason; the others are decoded in the batch."""
    from imagebind_core.preprocess import jpeg

    good = [media.make_image("JPEG", size=(320, 240), seed=s) for s in range(3)]
    corrupt = media.corrupt_jpeg(seed=9)
    refused = good[1]
    real = jpeg._decode_on_device

    def nvjpeg_lacks_one(tensors, device):  # a JPEG variant the device decoder lacks
        out = real(tensors, device)
        return [None if t.numel() == len(refused) else o for t, o in zip(tensors, out, strict=True)]

    monkeypatch.setattr(jpeg, "_decode_on_device", nvjpeg_lacks_one)
    res = decode_jpegs([good[0], refused, corrupt, good[2]], "cpu")
    assert sorted(res.rows) == [0, 1, 3] and res.fallbacks == [1]
    assert list(res.errors) == [2] and "cannot decode" in res.errors[2].reason
    pixels = dict(zip(res.rows, res.pixels, strict=True))
    # The fallback is the exact CPU path.
    assert torch.equal(pixels[1], ibc.preprocess("vision", refused, compact=True))


def _items(datas: dict[str, bytes]) -> pa.Table:
    n = len(datas)
    rows = {f.name: [None] * n for f in ITEM_SCHEMA}
    rows.update(
        id=list(datas),
        modality=["vision"] * n,
        status=[STATUS_OK] * n,
        data=list(datas.values()),
        fingerprint=["x"] * n,
    )
    return pa.table(rows, schema=ITEM_SCHEMA)


def _by_id(table: pa.Table, column: str) -> dict:
    return dict(zip(table.column("id").to_pylist(), table.column(column).to_pylist(), strict=True))


def test_encoder_decodes_jpegs_and_every_other_item_takes_the_cpu_path():
    """preprocess -> encode with decode gpu: plain JPEGs travel as files and are decoded by
    the encoder; PNG, CMYK JPEG, grey JPEG and 16-bit PNG take the exact CPU path; a corrupt
    JPEG fails in the encoder with the CPU path's reason; a truncated one and garbage fail in
    preprocessing as with decode cpu. Every row comes out once."""
    photo = media.photo_jpegs(("chelsea",))["chelsea"]
    corrupt = media.corrupt_jpeg(seed=9)
    datas = {
        "jpeg": media.make_image("JPEG", size=(320, 240), seed=1),
        "photo": photo,
        "png": media.make_image("PNG", seed=2),
        "cmyk": media.make_image("JPEG", mode="CMYK", seed=3),
        "grey": media.make_image("JPEG", mode="L", seed=4),
        "png16": media.make_image("PNG", mode="I;16", seed=5),
        "corrupt": corrupt,
        "truncated": media.truncated(media.make_image("JPEG", seed=6), 0.5),
        "garbage": media.random_bytes(2048, seed=7),
    }
    items = _items(datas)
    pre = preprocess_batch(items, decode={"vision": "gpu"})
    dtypes = _by_id(pre, "tensor_dtype")
    assert {i for i, d in dtypes.items() if d == ENCODED_JPEG} == {"jpeg", "photo", "corrupt"}
    assert all(dtypes[i] == "|u1" for i in ("png", "cmyk", "grey", "png16"))

    model = ibc.build_model("tiny", ["vision"])
    got = EncodeBatch("vision", model=model)(pre)
    assert sorted(got.column("id").to_pylist()) == sorted(datas)  # every row, once
    emb, status, error = (_by_id(got, c) for c in ("embedding", "status", "error"))
    # The block as Ray Data often hands it to the actor, two blocks in one call (a row sliced
    # off): the files and pixels are read where they lie, with the same outcome per row.
    split = EncodeBatch("vision", model=model)(pa.concat_tables([pre.slice(0, 3), pre.slice(3)]))
    for c, want in (("embedding", emb), ("status", status), ("error", error)):
        assert _by_id(split, c) == want, c

    # The default path, for the same items: its errors are the reference reasons.
    cpu = EncodeBatch("vision", model=model)(preprocess_batch(items))
    cpu_err = _by_id(cpu, "error")
    for i in ("corrupt", "truncated", "garbage"):
        assert status[i] == STATUS_ERROR and emb[i] is None
        assert error[i] == cpu_err[i] and error[i], (i, error[i], cpu_err[i])
    # The exact CPU path: the same rows through the default path, in the same batch of four
    # (a CPU matmul's blocking follows the batch, so another batch could move the last bit).
    fallback = ("png", "cmyk", "grey", "png16")
    alone = EncodeBatch("vision", model=model)(
        preprocess_batch(_items({i: datas[i] for i in fallback}))
    )
    alone_emb = _by_id(alone, "embedding")
    for i in fallback:
        assert status[i] == STATUS_OK
        np.testing.assert_array_equal(np.asarray(emb[i]), np.asarray(alone_emb[i]), err_msg=i)
    # Decoded on the device: the model's embedding of the device-decoded pixels.
    res = decode_jpegs([datas["jpeg"], datas["photo"]], "cpu")
    want = model.encode("vision", ibc.expand("vision", res.pixels), normalize=True)
    assert_embeddings_close(np.array([emb["jpeg"], emb["photo"]]), want)


def test_the_null_encoders_stand_in_takes_the_files_it_decodes(tmp_path):
    # bench_feed's stand-in accelerator with `decode: gpu`: the null encoder decodes the JPEG
    # files itself (on the CPU, a tensor), and the stand-in stages and times that batch too.
    datas = {
        "jpeg": media.make_image("JPEG", size=(320, 240), seed=1),
        "png": media.make_image("PNG", seed=2),
    }
    pre = preprocess_batch(_items(datas), decode={"vision": "gpu"})
    assert _by_id(pre, "tensor_dtype")["jpeg"] == ENCODED_JPEG
    log = tmp_path / "busy.log"
    null = {"null_encoder": True, "null_item_s": 0.01, "null_log_path": str(log)}
    got = EncodeBatch("vision", ibc.ModelSpec(preset="tiny"), **null)(pre)
    assert _by_id(got, "status") == {"jpeg": STATUS_OK, "png": STATUS_OK}
    assert sorted(int(line.split()[3]) for line in log.open()) == [1, 1]  # each its batch


def test_decode_setting_is_validated_and_part_of_the_lineage(tmp_path):
    base = {"input": str(tmp_path), "output": str(tmp_path / "o"), "preset": "tiny"}
    cpu = load_config(None, base)
    gpu = load_config(None, {**base, "preprocess.decode": {"vision": "gpu"}})
    assert cpu.model_spec("vision").decode_for("vision") == "cpu"
    assert gpu.model_spec("vision").decode_for("vision") == "gpu"
    # The default's lineage is unchanged (outputs written before keep matching); gpu differs.
    assert '"decode"' not in cpu.model_spec("vision").preprocess_key(["vision", "text"])
    key = gpu.model_spec("vision").preprocess_key(["vision", "text"])
    assert '"decode":{"vision":"gpu"}' in key
    assert ibc.lineage_key(cpu.model_spec("vision").lineage(["vision"])) != ibc.lineage_key(
        gpu.model_spec("vision").lineage(["vision"])
    )
    with pytest.raises(ConfigError, match=r"decode\.text: gpu decoding exists for \['vision'\]"):
        load_config(None, {**base, "preprocess.decode": {"text": "gpu"}})
    with pytest.raises(ConfigError, match="decode"):
        load_config(None, {**base, "preprocess.decode": {"vision": "nvjpeg"}})
    with pytest.raises(ValueError, match="gpu decoding exists"):
        ibc.ModelSpec(preset="tiny", decode={"audio": "gpu"})


def test_job_with_gpu_decode_embeds_every_item_exactly_once(tmp_path, ray_session):
    """The job on CPU with decode gpu: JPEGs decoded by the encoder actors, the rest by
    preprocessing; bad items in _errors with their reasons; every id exactly once."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    good = {}
    for i in range(6):
        fmt, ext = ("JPEG", "jpg") if i % 3 else ("PNG", "png")
        good[f"pic{i}.{ext}"] = media.make_image(fmt, size=(96 + 8 * i, 64), seed=i)
    good["cmyk.jpg"] = media.make_image("JPEG", mode="CMYK", seed=8)
    bad = {
        "cut.jpg": media.truncated(media.make_image("JPEG", seed=9), 0.4),
        "noise.jpg": media.random_bytes(2048, seed=10),
    }
    for name, data in {**good, **bad}.items():
        (corpus / name).write_bytes(data)
    out = str(tmp_path / "out")
    cfg = load_config(
        None,
        {
            **SMALL_JOB,
            "input": str(corpus),
            "output": out,
            "preprocess.decode": {"vision": "gpu"},
        },
    )
    summary = run_job(cfg)
    emb, err, _ = read_output(out, None)
    ids = emb.column("id").to_pylist()
    err_ids = err.column("id").to_pylist()
    assert len(ids) == len(set(ids)) and sorted(ids) == sorted(good)
    assert sorted(err_ids) == sorted(bad) and all(err.column("error").to_pylist())
    assert summary.ok == {"vision": len(good)} and summary.errors == {"vision": len(bad)}
    meta = {k.decode(): v.decode() for k, v in (emb.schema.metadata or {}).items()}
    assert '"decode":{"vision":"gpu"}' in meta["imagebind.preprocess"]
    # The embeddings are those of the device-decoded pixels (JPEGs) or the CPU path.
    model = ibc.build_model("tiny", ["vision"])
    got = dict(zip(ids, emb.column("embedding").to_pylist(), strict=True))
    for name, data in good.items():
        if device_decodable(data):
            x = decode_jpegs([data], "cpu").pixels
        else:
            x = ibc.preprocess("vision", data, compact=True)[None]
        want = model.encode("vision", ibc.expand("vision", x), normalize=True)
        assert_embeddings_close(np.asarray(got[name])[None], want, name)
