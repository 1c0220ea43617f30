"""Inputs crafted to cost far more than their size: refused (or bounded) fast, with the reason.

Aspect-ratio bombs: the short side is scaled to 224, so a 100000x1 PNG of 69 bytes would be
resized to 22,400,000x224 (tens of GB) although it has only 100,000 pixels. Long words: BPE is
quadratic in the word's length, but only the tokens that fit in the context reach the model.
"""

from __future__ import annotations

import io
import math
import random
import sys
import time

import media
import numpy as np
import pytest
import torch
from numerics import assert_inputs_close
from PIL import Image
from reference_data_shim import reference_data

import imagebind_core.preprocess as P
from imagebind_core.errors import InvalidInput
from imagebind_core.preprocess import text as text_mod
from imagebind_core.preprocess.common import Limits

# Generous against a busy 2-core box; the unbounded paths take 5-50 s and GBs on these inputs.
FAST_S = 1.0


def _refused_fast(kind: str, data: bytes, needle: str = "aspect ratio") -> InvalidInput:
    t0 = time.perf_counter()
    with pytest.raises(InvalidInput) as e:
        P.preprocess(kind, data)
    assert time.perf_counter() - t0 < FAST_S
    assert e.value.modality == kind and needle in e.value.reason, e.value.reason
    return e.value


@pytest.mark.parametrize(
    ("kind", "size"),
    [
        ("vision", (100_000, 1)),
        ("vision", (20_000, 1)),
        ("vision", (1, 20_000)),
        ("depth", (100_000, 1)),
        ("thermal", (2, 5_000)),
    ],
)
def test_aspect_ratio_bomb_images_are_refused_from_the_header(kind, size) -> None:
    # A valid PNG (not only a header): a few hundred bytes, under every pixel and byte limit.
    mode = {"vision": "RGB", "depth": "I;16", "thermal": "L"}[kind]
    buf = io.BytesIO()
    Image.new(mode, size).save(buf, format="PNG")
    data = buf.getvalue()
    assert len(data) < 1000
    err = _refused_fast(kind, data)
    assert f"{size[0]}x{size[1]}" in err.reason and "max_aspect_ratio" in err.reason


def test_aspect_ratio_bomb_arrays_are_refused() -> None:
    for kind in ("depth", "thermal"):
        arr = np.ones((1, 50_000), np.float32) if kind == "depth" else np.ones((3, 300), np.uint8)
        _refused_fast(kind, media.make_npy(arr))


def test_aspect_ratio_bomb_video_is_refused_before_decoding() -> None:
    data = media.make_video(seconds=1.0, fps=10, size=(1024, 2))
    assert len(data) < 20_000
    err = _refused_fast("video", data)
    assert "1024x2" in err.reason


def test_panoramas_within_the_ratio_still_work(tmp_path) -> None:
    limits = Limits()
    assert limits.max_aspect_ratio == 20
    # A 12:1 stitched panorama and a strip exactly at the limit are embedded as usual, with
    # the same numbers as the reference's transform (no special path for wide images).
    for size in ((1440, 120), (2000, 100), (100, 2000)):
        png = media.make_image(size=size, fmt="PNG")
        x = P.preprocess("vision", png)
        assert x.shape == (3, 224, 224)
        path = tmp_path / f"pano-{size[0]}x{size[1]}.png"
        path.write_bytes(png)
        ref = reference_data().load_and_transform_vision_data([str(path)], "cpu")[0]
        assert_inputs_close(x, ref, f"{size} panorama")
    assert P.preprocess("depth", media.make_depth_png(size=(1200, 100))).shape == (1, 224, 224)
    assert P.preprocess("video", media.make_video(seconds=1, size=(640, 64))).shape[0] == 15
    # Just over the limit is refused; a caller can raise the limit deliberately.
    wide = media.make_image(size=(2002, 100), fmt="PNG")
    _refused_fast("vision", wide)
    x = P.preprocess("vision", wide, limits=limits.replace(max_aspect_ratio=21))
    assert x.shape == (3, 224, 224)
    with pytest.raises(ValueError, match="max_aspect_ratio"):
        Limits(max_aspect_ratio=0)


# --------------------------------------------------------------------------- text


def _letters(n: int, seed: int, alphabet: str = "abcdefghijklmnopqrstuvwxyz") -> str:
    rng = random.Random(seed)
    return "".join(rng.choice(alphabet) for _ in range(n))


def test_a_huge_word_costs_what_fits_in_the_context() -> None:
    P.tokenize("warm up")
    word = _letters(20_000, 0)  # under max_text_chars; 2.6 s of CPU when merged whole
    t0 = time.process_time()
    ids = P.tokenize(word)
    assert time.process_time() - t0 < 0.2
    assert ids[0, 0] == 49406 and ids[0, 76] == 49407 and (ids[0, 1:76] != 0).all()
    # A text of many long words costs no more: tokens past the context are never computed.
    t0 = time.process_time()
    P.tokenize(" ".join(_letters(3_000, s) for s in range(6)))
    assert time.process_time() - t0 < 0.2


@pytest.mark.parametrize(
    "word",
    [
        _letters(2_000, 1),
        _letters(1_500, 2, "aeiou"),
        _letters(1_500, 3, "ab"),
        "ha" * 800,
        "x" * 3_000,
        "!?" * 700,
        _letters(1_200, 4, "aeiouéèçàüß"),
        _letters(600, 5, "中文日本語のテキスト한국어"),
    ],
    ids=["random", "vowels", "ab", "haha", "xxx", "symbols", "accents", "cjk"],
)
def test_long_words_keep_the_reference_ids(word) -> None:
    text = f"a photo of {word} and more"
    tok = text_mod.Tokenizer()
    full = tok.frame(tok.encode(text))  # every word merged whole: the reference's algorithm
    assert P.tokenize(text)[0, : len(full)].tolist() == full
    if len(word) <= 2_000:  # the reference itself is quadratic: only on the shorter ones
        ref = reference_data().load_and_transform_text([text], "cpu")[0]
        assert P.tokenize(text)[0].tolist() == ref.tolist()


def test_the_bpe_memo_is_bounded_in_bytes(monkeypatch) -> None:
    cap = 256 * 1024
    monkeypatch.setattr(text_mod, "MEMO_MAX_BYTES", cap)
    tok = text_mod.Tokenizer()
    words = [_letters(200, 100 + s) for s in range(1_000)]  # ~1 MB of memo if kept
    for w in words:
        ids = tok.encode(w)
        assert ids == tok.encode(w)
    held = sum(sys.getsizeof(k) + sys.getsizeof(v) for k, v in tok._cache.items())
    assert held <= cap
    # Long words are never memoised, however many.
    tok2 = text_mod.Tokenizer()
    for s in range(20):
        tok2.encode(_letters(5_000, s), max_tokens=75)
    assert max(len(k) for k in tok2._cache) <= text_mod.LONG_WORD_SYMBOLS


@pytest.mark.parametrize("sr", [16001, 96001, 8001])
def test_audio_at_a_rate_that_needs_a_huge_resampling_filter_is_refused_fast(sr) -> None:
    # torchaudio's (the reference's) resampler builds a filter of (16000/g) x (sr/g + ...)
    # values, g = gcd(sr, 16000): 256M values (~4 GB, 20 s) for 16,001 Hz, 1.5G for 96,001 Hz,
    # from a 3 s WAV of 100 KB within every other limit.
    data = media.make_wav(seconds=3.0, sr=sr, channels=1)
    e = _refused_fast("audio", data, needle="max_resample_filter")
    assert f"sample rate {sr} Hz" in e.reason
    # The library entry point that takes a decoded waveform checks it too.
    wave, rate = P.decode_audio(data)
    with pytest.raises(InvalidInput, match="max_resample_filter"):
        P.preprocess_audio(wave, rate)


@pytest.mark.parametrize("sr", [8000, 11025, 22050, 32000, 44100, 44056, 47952, 48000, 192000])
def test_usual_audio_rates_fit_the_resampling_filter_limit(sr) -> None:
    from torchaudio.functional.functional import _get_sinc_resample_kernel

    from imagebind_core.preprocess.audio import resample_filter_size

    # The size the check computes is the filter torchaudio builds (its private helper, called
    # here only to pin the formula to the library's).
    kernel, _ = _get_sinc_resample_kernel(sr, 16000, math.gcd(sr, 16000), dtype=torch.float32)
    assert resample_filter_size(sr, 16000) == kernel.numel()
    assert resample_filter_size(sr, 16000) <= Limits().max_resample_filter
    x = P.preprocess("audio", media.make_wav(seconds=2.5, sr=sr, channels=1))
    assert x.shape == (3, 1, 128, 204)


@pytest.mark.parametrize("kind", ["depth", "thermal", "imu"])
def test_npy_headers_are_checked_before_any_element_is_allocated(kind) -> None:
    # np.load allocates what the header declares: 168 bytes declaring (60000, 60000) float64
    # asked for 27 GiB (a MemoryError, or with overcommit an allocation far past the file).
    e = _refused_fast(kind, media.npy_declaring((60000, 60000)), needle="header declares")
    assert "(60000, 60000)" in e.reason and "the file holds 40" in e.reason
    # A file cut short, and one with bytes after its data: the same check.
    whole = media.make_npy(np.ones((8, 6), np.float32))
    for data in (whole[:-4], whole + b"\0" * 8):
        _refused_fast(kind, data, needle="header declares")
    # Objects and complex numbers are refused from the header too.
    _refused_fast(kind, media.npy_declaring((2, 2), "|O"), needle="real numeric array")
    _refused_fast(kind, media.npy_declaring((2, 2), "<c8", b"\0" * 32), needle="real numeric")


@pytest.mark.parametrize("kind", ["depth", "thermal"])
def test_npy_rasters_are_held_to_max_pixels_from_the_header(kind) -> None:
    data = media.npy_declaring((1, 4000, 4000), "|u1", b"\0" * 16_000_000)
    limits = Limits(max_pixels=1_000_000)
    t0 = time.perf_counter()
    with pytest.raises(InvalidInput, match="4000x4000") as e:
        P.preprocess(kind, data, limits=limits)
    assert time.perf_counter() - t0 < FAST_S and e.value.modality == kind
    x = P.preprocess(kind, media.make_npy(np.ones((1, 40, 30), np.float32) / 2))
    assert x.shape == (1, 224, 224)
