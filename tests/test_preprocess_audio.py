"""Audio: parity with the reference loader for every codec, rate, length and channel count
(the codec matrix), the mean-subtraction quirk and its per-clip option, limits."""

from __future__ import annotations

import itertools

import media
import numpy as np
import pytest
import torch
from numerics import PREPROC_ATOL, assert_inputs_close
from reference_data_shim import reference_data

import imagebind_core.preprocess as P


def reference_audio(tmp_path, data: bytes, ext: str) -> torch.Tensor:
    path = tmp_path / f"a.{ext}"
    path.write_bytes(data)
    return reference_data().load_and_transform_audio_data([str(path)], "cpu")[0]


@pytest.mark.parametrize(
    ("seconds", "sr", "channels", "fmt"),
    [
        (0.5, 8000, 1, "wav"),  # shorter than a clip: 3 identical padded clips
        (2.0, 8000, 2, "flac"),  # exactly one clip long
        (5.0, 22050, 2, "wav"),  # overlapping clips: the in-place mean leak matters
        (3.3, 44100, 1, "flac"),
        (10.0, 44100, 2, "wav"),
        (12.0, 48000, 1, "wav"),
        (7.0, 48000, 2, "flac"),
        (4.0, 16000, 1, "wav"),  # native rate: no resampling
    ],
)
def test_parity_with_reference(tmp_path, seconds, sr, channels, fmt) -> None:
    make = media.make_wav if fmt == "wav" else media.make_flac
    data = make(seconds, sr, channels, seed=sr % 11)
    ours = P.preprocess("audio", data)
    ref = reference_audio(tmp_path, data, fmt)
    assert ours.shape == (3, 1, 128, 204) and ours.dtype == torch.float32
    assert_inputs_close(ours, ref)


# The codec matrix: every codec x rate x length x channel count against the live reference
# loader (whole-file decode, then the reference's transform).
CODECS = list(media.AUDIO_CODECS)
RATES = [8000, 16000, 22050, 44100, 48000]
SECONDS = [0.5, 3.0, 12.0, 60.0]
MATRIX = list(itertools.product(CODECS, RATES, SECONDS, [1, 2]))
# The sample `make test` runs fast: every codec, each rate, length and channel count in turn.
SAMPLE = [
    (c, RATES[i % len(RATES)], SECONDS[i % 3], 1 + i % 2)  # 60 s files are in the full matrix
    for i, c in enumerate(CODECS)
] + [(c, 48000, 12.0, 2) for c in ("vorbis", "opus", "mp3")]  # where seeks were inexact


def _codec_parity(tmp_path, codec: str, sr: int, seconds: float, channels: int) -> None:
    ext, make = media.AUDIO_CODECS[codec]
    data = make(seconds, sr, channels, sr % 7)
    ours = P.preprocess("audio", data)
    assert_inputs_close(ours, reference_audio(tmp_path, data, ext), f"{codec} {sr} {seconds}s")


@pytest.mark.parametrize(("codec", "sr", "seconds", "channels"), SAMPLE)
def test_codec_parity_sample(tmp_path, codec, sr, seconds, channels) -> None:
    _codec_parity(tmp_path, codec, sr, seconds, channels)


@pytest.mark.slow
def test_codec_parity_full_matrix(tmp_path) -> None:
    """All 320 cases; failures are collected so one run shows the whole picture."""
    bad = []
    for codec, sr, seconds, channels in MATRIX:
        try:
            _codec_parity(tmp_path, codec, sr, seconds, channels)
        except AssertionError as e:
            bad.append(str(e).splitlines()[0])
    assert not bad, f"{len(bad)} of {len(MATRIX)} cases over {PREPROC_ATOL:g}: {bad}"


def test_compressed_codecs_are_not_read_by_seeking(monkeypatch) -> None:
    """libsndfile's Vorbis/Opus/MP3 seeks are approximate: those are decoded whole, in one
    pass from the start; PCM and FLAC keep the read-only-the-clips path."""
    import imagebind_core.preprocess.audio as A

    ranged = []
    real = A._SndfileSource.read

    def spy(self, start, stop):
        ranged.append((start, stop))
        return real(self, start, stop)

    monkeypatch.setattr(A._SndfileSource, "read", spy)
    for codec in ("vorbis", "opus", "mp3"):
        P.preprocess("audio", media.AUDIO_CODECS[codec][1](12.0, 48000, 1, 0))
    assert ranged == []
    P.preprocess("audio", media.make_flac(12.0, 16000, 1))  # 16 kHz: no resampling
    assert ranged and all(b - a < 12 * 16000 for a, b in ranged)


def test_per_clip_option_matches_independent_clips(tmp_path) -> None:
    """'per_clip' equals the reference's own clip function applied to a copy of each clip;
    'reference' differs from it exactly where clips overlap (clips 2 and 3 of a 5 s file)."""
    ref = reference_data()
    data = media.make_wav(5.0, 16000, 2, dc=0.2)
    wave, sr = P.decode_audio(data)
    w = torch.from_numpy(wave)
    expected = []
    for start, end in P.clip_spans(w.shape[1] / 16000, 2, 3):
        clip = w[:, int(start * 16000) : int(end * 16000)].clone()
        mel = ref.waveform2melspec(clip, 16000, 128, 204)
        expected.append((mel - torch.tensor(-4.268)) / torch.tensor(9.138))
    expected = torch.stack(expected)
    per_clip = P.preprocess("audio", data, mean_subtraction="per_clip")
    default = P.preprocess("audio", data)
    assert_inputs_close(per_clip, expected)
    assert_inputs_close(default[0], expected[0])
    assert (default[1:] - expected[1:]).abs().max() > 0.1  # the documented leak
    assert np.array_equal(wave, P.decode_audio(data)[0])  # preprocess did not mutate the input
    P.preprocess_audio(wave, sr)
    assert np.array_equal(wave, P.decode_audio(data)[0])


def test_stereo_uses_channel_zero() -> None:
    left = media.audio_array(3.0, 16000, 2, dc=0.0)
    swapped = left[:, ::-1].copy()
    a = P.preprocess_audio(left.T.copy(), 16000, P.AudioConfig(mean_subtraction="per_clip"))
    b = P.preprocess_audio(swapped.T.copy(), 16000, P.AudioConfig(mean_subtraction="per_clip"))
    mono = P.preprocess_audio(
        left[:, :1].T.copy(), 16000, P.AudioConfig(mean_subtraction="per_clip")
    )
    assert (a - mono).abs().max() < 1e-3 and (a - b).abs().max() > 0.1


@pytest.mark.parametrize("fmt", ["mp3", "m4a", "ogg"])
def test_compressed_formats_close_to_lossless(fmt) -> None:
    make = {"mp3": media.make_mp3, "m4a": media.make_m4a, "ogg": media.make_ogg}[fmt]
    lossy = P.preprocess("audio", make(3.0, 44100, 2))
    wave = media.audio_array(3.0, 44100, 2, dc=0.0).T.copy()
    lossless = P.preprocess_audio(wave, 44100)
    assert torch.isfinite(lossy).all() and lossy.shape == (3, 1, 128, 204)
    # codecs drop inaudible detail and shift by a few ms: compare the bulk of the spectrum
    assert (lossy - lossless).abs().mean() < 0.15


def test_long_files_are_read_only_where_clips_are(monkeypatch) -> None:
    import imagebind_core.preprocess.audio as A

    seconds = A.WHOLE_RESAMPLE_MAX_S + 30  # longer files are resampled around their clips
    data = media.make_flac(seconds, 22050, 2, seed=4)
    read = []
    real = A._SndfileSource.read

    def spy(self, start, stop):
        read.append(stop - start)
        return real(self, start, stop)

    monkeypatch.setattr(A._SndfileSource, "read", spy)
    lazy = P.preprocess("audio", data)
    assert sum(read) < 0.1 * seconds * 22050  # three 2 s clips (+ margins) of the file
    whole = P.preprocess_audio(*P.decode_audio(data))
    assert torch.equal(lazy, whole)


def test_short_resampled_files_take_the_reference_arithmetic(tmp_path) -> None:
    """Up to WHOLE_RESAMPLE_MAX_S the waveform is resampled whole, then clipped, as the
    reference does: its numbers bit for bit on any CPU (12 s at 8 kHz: the codec-matrix case
    whose log-mel moved by 5e-4 on AVX2 when resampled around the clips)."""
    import imagebind_core.preprocess.audio as A

    data = media.make_wav(12.0, 8000, 1, seed=8000 % 7)
    assert A.WHOLE_RESAMPLE_MAX_S >= 12.0
    assert torch.equal(P.preprocess("audio", data), reference_audio(tmp_path, data, "wav"))


def test_mp3_via_libsndfile_is_close_to_ffmpeg() -> None:
    """Two MP3 decoders (mpg123, FFmpeg's) agree to ~2e-6 per sample, not bit for bit; the
    log-mel input then differs most in near-silent mel bins."""
    import imagebind_core.preprocess.audio as A

    data = media.make_mp3(10.0, 44100, 2, seed=5)
    via_mpg123 = P.preprocess("audio", data)
    via_ffmpeg = P.preprocess_audio(*A._decode_pyav(data, P.Limits()))
    assert (via_mpg123 - via_ffmpeg).abs().max() < 1e-2
