"""The entry point and its helpers: kinds, options, collate, infer_kind, model_modality, the
corrupt-input set (each -> InvalidInput quickly), and bytes -> tiny model == reference loader
-> reference tiny model."""

from __future__ import annotations

import time
import tracemalloc

import media
import numpy as np
import pytest
import torch
from numerics import assert_embeddings_close
from reference_data_shim import reference_data

import imagebind_core as ibc
import imagebind_core.preprocess as P
from imagebind_core.errors import InvalidInput


def test_public_names() -> None:
    for name in ("preprocess", "model_modality", "collate", "infer_kind", "Limits"):
        assert callable(getattr(P, name))
    assert isinstance(P.PREPROCESS_VERSION, str) and P.PREPROCESS_VERSION
    for name in P.__all__:
        assert getattr(P, name) is not None
    # the package-level entry point delegates to the same function
    assert torch.equal(ibc.preprocess("text", "a dog"), P.preprocess("text", "a dog"))


def test_model_modality_and_unknown_kind() -> None:
    assert P.model_modality("video") is ibc.Modality.VISION
    for k in ("vision", "text", "audio", "depth", "thermal", "imu"):
        assert P.model_modality(k) is ibc.Modality(k)
    with pytest.raises(InvalidInput, match="unknown modality"):
        P.preprocess("smell", b"x")
    with pytest.raises(TypeError, match="unknown audio preprocessing option"):
        P.preprocess("audio", media.make_wav(1.0), mean_subtract="x")
    with pytest.raises(P.PreprocessOptionError, match="mean_subtraction must be"):
        P.preprocess("audio", media.make_wav(1.0), mean_subtraction="x")


def test_collate_keeps_clip_axis_and_refuses_mixed_shapes() -> None:
    a = P.preprocess("audio", media.make_wav(2.5))
    assert P.collate([a, a]).shape == (2, 3, 1, 128, 204)
    img = P.preprocess("vision", media.make_image("PNG", (64, 48)))
    assert P.collate([img]).shape == (1, 3, 224, 224)
    with pytest.raises(ValueError, match="one kind per batch"):
        P.collate([img, torch.zeros(15, 3, 2, 224, 224)])
    with pytest.raises(ValueError, match="at least one"):
        P.collate([])


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("photo.JPG", "vision"),
        ("s3://bucket/a/b/frame.webp?versionId=3", "vision"),
        ("clip.mp4", "video"),
        ("x.MKV", "video"),
        ("song.flac", "audio"),
        ("voice.m4a", "audio"),
        ("caption.txt", "text"),
        ("scene.depth.png", "depth"),
        ("scene.depth.npy", "depth"),
        ("cam.thermal.jpg", "thermal"),
        ("walk.imu.csv", "imu"),
        ("walk.imu.json", "imu"),
        ("array.npy", None),
        ("table.csv", None),
        ("README", None),
        ("archive.tar.gz", None),
    ],
)
def test_infer_kind(name, kind) -> None:
    assert P.infer_kind(name) == kind


def test_outputs_never_alias_or_mutate_inputs() -> None:
    arr = media.image_array((300, 200))
    before = arr.copy()
    P.preprocess_image(arr)
    assert np.array_equal(arr, before)


# ------------------------------------------------------------------ the corrupt-input set

CORRUPT = [
    ("vision", lambda: media.truncated(media.make_image("JPEG", (640, 480)), 0.4)),
    ("vision", lambda: b""),
    ("vision", lambda: media.random_bytes(8192, 1)),  # "x.jpg" full of noise
    ("vision", lambda: media.png_declaring(30000, 30000)),
    ("audio", lambda: b""),
    ("audio", lambda: media.wav_with_declared_length(16000 * 60)),  # header lies about length
    ("audio", lambda: media.wav_with_declared_length(16000 * 3600 * 5)),  # declares hours
    ("audio", lambda: media.random_bytes(8192, 2)),  # "x.wav" full of noise
    ("audio", lambda: media.truncated(media.make_flac(3.0), 0.5)),
    ("audio", lambda: media.make_wav(0.01)),  # shorter than one 25 ms analysis frame
    ("audio", lambda: media.make_video(1, 10, (64, 64))),  # no audio stream
    ("video", lambda: media.corrupt_video(media.make_video(3, 15, (160, 120)))),
    ("video", lambda: b""),
    ("video", lambda: media.random_bytes(8192, 3)),
    ("imu", lambda: media.make_npy(np.full((2000, 6), np.inf, np.float32))),
    ("imu", lambda: media.make_npy(np.ones((2000, 7), np.float32))),
    ("depth", lambda: media.make_npy(np.full((64, 64), np.nan, np.float32))),
    ("depth", lambda: media.png_declaring(20000, 20000)),
    ("thermal", lambda: media.truncated(media.make_gray_png(bits=16), 0.5)),
    ("text", lambda: b"caf\xe9 au lait \xc3\x28"),
    ("text", lambda: "x" * 50_000),
]


@pytest.mark.parametrize(
    ("kind", "make"), CORRUPT, ids=[f"{k}-{i}" for i, (k, _) in enumerate(CORRUPT)]
)
def test_corrupt_input_gives_invalid_input_quickly(kind, make) -> None:
    data = make()
    tracemalloc.start()
    t = time.monotonic()
    with pytest.raises(InvalidInput) as e:
        P.preprocess(kind, data, item_id="item-7")
    elapsed = time.monotonic() - t
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert e.value.modality == kind and e.value.item_id == "item-7"
    assert e.value.reason and "item-7" in str(e.value)
    assert elapsed < 10, f"took {elapsed:.1f} s"
    assert peak < 200 * 2**20, f"peak Python allocation {peak / 2**20:.0f} MiB"


def _wav_with_zero_bits_per_sample() -> bytes:
    wav = bytearray(media.make_wav(1.0))
    fmt = wav.index(b"fmt ") + 8
    wav[fmt + 14 : fmt + 16] = b"\0\0"  # bits per sample
    return bytes(wav)


# Text of a library's internals that a reason must never carry (PyAV/FFmpeg's errno and file
# name, a Python error tripped inside a decoder).
INTERNAL_TEXT = ("Errno", "<none>", "NoneType", "has no attribute", "object is not")


@pytest.mark.parametrize(
    ("kind", "make"),
    [*CORRUPT, ("audio", _wav_with_zero_bits_per_sample), ("audio", lambda: b"OggS" + b"x" * 999)],
)
def test_corrupt_input_reasons_are_in_the_senders_terms(kind, make) -> None:
    """A corrupt file's reason says what is wrong with it, not a decoder's internal text
    (`[Errno 1094995529] Invalid data found when processing input: '<none>'`, `'NoneType'
    object has no attribute 'sample_rate'`)."""
    with pytest.raises(InvalidInput) as e:
        P.preprocess(kind, make())
    assert not any(t in e.value.reason for t in INTERNAL_TEXT), e.value.reason


def test_corrupt_media_reasons_say_what_is_wrong() -> None:
    with pytest.raises(InvalidInput) as e:
        P.preprocess("audio", _wav_with_zero_bits_per_sample())
    assert e.value.reason == "the WAV header declares 0 bits per sample", e.value.reason
    damaged = "the file is damaged or in a format that cannot be read"
    for kind in ("audio", "video"):
        with pytest.raises(InvalidInput) as e:
            P.preprocess(kind, media.random_bytes(8192, 2))
        assert e.value.reason == f"cannot decode {kind}: {damaged}", e.value.reason
    # A FLAC cut short inside its header: libsndfile's own failure, said as damage.
    with pytest.raises(InvalidInput) as e:
        P.preprocess("audio", media.make_flac(seconds=3.0, sr=44100)[:89])
    assert e.value.reason.startswith(f"cannot decode audio: {damaged} (libsndfile: "), e.value


def test_lying_wav_header_message_names_both_lengths() -> None:
    with pytest.raises(InvalidInput, match=r"declares 960000 samples .* holds 16000"):
        P.preprocess("audio", media.wav_with_declared_length(16000 * 60))
    with pytest.raises(InvalidInput, match="over the limit of 600 s"):
        P.preprocess("audio", media.wav_with_declared_length(16000 * 3600 * 5))


def test_a_wav_header_out_of_limits_is_named_as_declared() -> None:
    """libsndfile refuses these headers and FFmpeg, tried next, reports 0 channels: the error
    must say what the file declares."""
    with pytest.raises(InvalidInput, match=r"65535 channels outside 1\.\.64"):
        P.preprocess("audio", media.wav_declaring_format(65535))
    with pytest.raises(InvalidInput, match=r"sample rate 0 Hz outside"):
        P.preprocess("audio", media.wav_declaring_format(1, sr=0))
    with pytest.raises(InvalidInput, match=r"3 channels outside 1\.\.2"):
        P.preprocess("audio", media.wav_declaring_format(3), limits=P.Limits(max_channels=2))


def test_audio_duration_limit_while_decoding() -> None:
    with pytest.raises(InvalidInput, match=r"(over|exceeds) the limit of 2 s"):
        P.preprocess("audio", media.make_mp3(3.0), limits=P.Limits(max_audio_duration_s=2))
    with pytest.raises(InvalidInput, match="over the limit of 2 s"):
        P.preprocess("audio", media.make_wav(3.0), limits=P.Limits(max_audio_duration_s=2))


def test_limits_validate() -> None:
    with pytest.raises(ValueError, match="positive"):
        P.Limits(max_bytes=0)
    assert P.Limits().replace(max_pixels=5).max_pixels == 5


# ------------------------------------------------------------------ end to end with the model


def test_bytes_to_tiny_model_equals_reference_loader_to_reference_model(tmp_path) -> None:
    from reference_shim import build_reference_tiny

    ref_model, our_model = build_reference_tiny(seed=3, tmp_path=tmp_path)
    ref_data = reference_data()
    img, wav, vid = (
        media.make_image("PNG", (320, 240)),
        media.make_wav(4.0, 44100, 2),
        media.make_video(3, 10, (320, 240)),
    )
    files = {}
    for name, data in (("i.png", img), ("a.wav", wav), ("v.mp4", vid)):
        (tmp_path / name).write_bytes(data)
        files[name] = str(tmp_path / name)
    texts = ["a dog on the beach", "<|endoftext|> &amp; ÉMOJI 🐶"]
    ref_inputs = {
        "vision": ref_data.load_and_transform_vision_data([files["i.png"]], "cpu"),
        "text": ref_data.load_and_transform_text(texts, "cpu"),
        "audio": ref_data.load_and_transform_audio_data([files["a.wav"]], "cpu"),
    }
    ours_inputs = {
        "vision": P.collate([P.preprocess("vision", img)]),
        "text": P.collate([P.preprocess("text", t) for t in texts]),
        "audio": P.collate([P.preprocess("audio", wav)]),
    }
    with torch.inference_mode():
        ref_out = ref_model(ref_inputs)
        our_out = our_model(ours_inputs)
        ref_video = ref_model(
            {"vision": ref_data.load_and_transform_video_data([files["v.mp4"]], "cpu")}
        )
        our_video = our_model({P.model_modality("video"): P.collate([P.preprocess("video", vid)])})
    for k in ref_inputs:
        assert_embeddings_close(our_out[k], ref_out[k], k)
    assert_embeddings_close(our_video["vision"], ref_video["vision"])


def test_item_nbytes_is_what_preprocess_returns_for_every_kind():
    # The endpoint reserves memory for a request's inputs from this before decoding them.
    from imagebind_core.preprocess import ITEM_SHAPES, item_nbytes, preprocess

    samples = {
        "text": "a photo of a dog",
        "vision": media.make_image(size=(96, 80), seed=1),
        "video": media.make_video(seconds=1.0, size=(64, 48)),
        "audio": media.make_wav(seconds=2.0, seed=1),
        "depth": media.make_depth_png(size=(96, 80), seed=1),
        "thermal": media.make_gray_png(size=(96, 80), bits=8, seed=1),
        "imu": media.make_imu_npy(seed=1),
    }
    assert set(samples) == set(ITEM_SHAPES)
    for kind, data in samples.items():
        for compact in (False, True):
            got = preprocess(kind, data, compact=compact).numpy().nbytes
            assert item_nbytes(kind, compact=compact) == got, (kind, compact)
    assert item_nbytes("video") == 15 * 3 * 2 * 224 * 224 * 4
    assert item_nbytes("vision", compact=True) * 4 == item_nbytes("vision")
