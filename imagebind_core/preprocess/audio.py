"""Audio: bytes -> waveform -> the reference's (3, 1, 128, 204) log-mel clips.

Reference recipe (`load_and_transform_audio_data`): resample the whole waveform to 16 kHz with
`torchaudio.functional.resample` defaults; three 2 s clips from the constant-clips sampler; per
clip subtract the clip mean *in place* (see `AudioConfig.mean_subtraction`), Kaldi fbank of
channel 0 (128 mel bins, 25 ms Hann windows, 10 ms hop, no dither), zero-pad or cut to 204
frames, then (x + 4.268) / 9.138.

Decoding: WAV/FLAC/Ogg/AIFF/MP3 through libsndfile (soundfile) — the same float values
torchaudio gives for PCM; M4A/AAC and anything else (or anything libsndfile rejects) through
PyAV (FFmpeg, what current torchaudio decodes with). Only PCM (WAV/AIFF/...) and FLAC are read
by sample ranges (their seeks are sample-accurate), unless they must be resampled and last at
most `WHOLE_RESAMPLE_MAX_S` (then resampled whole, as the reference does);
Vorbis, Opus and MP3 are decoded whole from the start, as the reference loader does, because
libsndfile's seeks in them land near, not on, the requested sample.
"""

from __future__ import annotations

import io
import logging
import math
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np
import soundfile as sf
import torch
import torchaudio

from imagebind_core.errors import InvalidInput
from imagebind_core.preprocess.clips import clip_spans
from imagebind_core.preprocess.common import (
    DAMAGED,
    DEFAULT_LIMITS,
    Deadline,
    Limits,
    as_bytes,
    check_finite,
    decoding,
    replace_config,
)

logger = logging.getLogger(__name__)

KIND = "audio"


@dataclass(frozen=True)
class AudioConfig:
    """The reference's audio recipe, plus the one switch for its mean-subtraction quirk.

    Args:
        mean_subtraction: "reference" (default) reproduces the reference's numbers: clips are
            views of one shared waveform and each clip's mean is subtracted from it in place,
            so for 2-8 s files (overlapping clips) later clips see samples already shifted by
            earlier clips' means — a step inside the clip. Indexes built with the reference
            carry these numbers. "per_clip" subtracts each clip's own mean from a copy (what
            the recipe intends); it differs only where clips overlap.
    """

    sample_rate: int = 16000
    clip_duration: float = 2
    num_clips: int = 3
    num_mel_bins: int = 128
    target_length: int = 204
    frame_length_ms: float = 25
    frame_shift_ms: float = 10
    mean: float = -4.268
    std: float = 9.138
    mean_subtraction: Literal["reference", "per_clip"] = "reference"

    def __post_init__(self) -> None:
        if self.mean_subtraction not in ("reference", "per_clip"):
            raise ValueError(
                f"mean_subtraction must be 'reference' or 'per_clip', got {self.mean_subtraction!r}"
            )


AUDIO = AudioConfig()

# Containers libsndfile reads; everything else goes to PyAV.
_SNDFILE_MAGIC = (b"RIFF", b"RF64", b"fLaC", b"OggS", b"FORM")


def _looks_like_mp3(data: bytes) -> bool:
    """An ID3 tag or an MPEG audio frame sync at the start. libsndfile (mpg123) decodes MP3 to
    within 2e-6 of FFmpeg with the same length (decoded whole: see `_SndfileSource.seekable`)."""
    return data[:3] == b"ID3" or (len(data) > 1 and data[0] == 0xFF and data[1] & 0xE0 == 0xE0)


def _riff_chunks(data: bytes) -> Iterator[tuple[bytes, int, int]]:
    """(tag, payload offset, declared size) of each chunk of a RIFF/RF64 WAVE file, in order,
    as far as the bytes present go; nothing for other data."""
    if len(data) < 12 or data[8:12] != b"WAVE" or data[:4] not in (b"RIFF", b"RF64"):
        return
    pos = 12
    while pos + 8 <= len(data):
        (size,) = struct.unpack("<I", data[pos + 4 : pos + 8])
        yield data[pos : pos + 4], pos + 8, size
        pos += 8 + size + (size & 1)


def _wav_declared_vs_present(data: bytes) -> tuple[int, int] | None:
    """(declared, present) byte sizes of a RIFF/WAVE file's `data` chunk, or None when the
    header does not say (not WAV, streaming placeholder sizes 0 / 0xFFFFFFFF, RF64 without
    ds64). libsndfile silently clamps a lying size to the bytes present, so we read the header
    ourselves to refuse truncated files and headers that claim hours of audio."""
    ds64_data: int | None = None
    for tag, at, size in _riff_chunks(data):
        if tag == b"ds64" and at + 24 <= len(data):
            (ds64_data,) = struct.unpack("<Q", data[at + 8 : at + 16])
        if tag == b"data":
            if size == 0xFFFFFFFF and ds64_data is not None:
                size = ds64_data
            if size in (0, 0xFFFFFFFF):
                return None
            return size, len(data) - at
    return None


def _wav_channels_and_rate(data: bytes) -> tuple[int, int] | None:
    """(channels, sample rate) from a WAVE file's `fmt ` chunk, or None. Read here because a
    decoder that refuses the header (libsndfile: 65535 channels) hands the file on to one
    that reports 0 channels, and the error must name what the file declares."""
    for tag, at, _ in _riff_chunks(data):
        if tag == b"fmt " and at + 8 <= len(data):
            channels, rate = struct.unpack("<HI", data[at + 2 : at + 8])
            return channels, rate
    return None


def _wav_bits_per_sample(data: bytes) -> int | None:
    """Bits per sample from a WAVE file's `fmt ` chunk, or None."""
    for tag, at, _ in _riff_chunks(data):
        if tag == b"fmt " and at + 16 <= len(data):
            (bits,) = struct.unpack("<H", data[at + 14 : at + 16])
            return bits
    return None


def _check_stream(sr: int, channels: int, declared_frames: int | None, limits: Limits) -> None:
    if sr <= 0 or sr > limits.max_sample_rate:
        raise InvalidInput(KIND, f"sample rate {sr} Hz outside 1..{limits.max_sample_rate} Hz")
    if channels <= 0 or channels > limits.max_channels:
        raise InvalidInput(KIND, f"{channels} channels outside 1..{limits.max_channels}")
    if declared_frames is not None and declared_frames / sr > limits.max_audio_duration_s:
        raise InvalidInput(
            KIND,
            f"declared duration {declared_frames / sr:.1f} s is over the limit of "
            f"{limits.max_audio_duration_s:g} s",
        )


class _SndfileSource:
    """An opened, validated libsndfile stream that reads sample ranges on demand.

    PCM and FLAC files are not decoded whole (unless they must be resampled and last at most
    `WHOLE_RESAMPLE_MAX_S`): only the sample ranges the three clips need (plus the
    resampler's margin) are read. Other codecs are `seekable = False` and are read whole
    (`read_all`).
    """

    def __init__(self, data: bytes, limits: Limits) -> None:
        sizes = _wav_declared_vs_present(data)
        with decoding(KIND, "audio"):
            self.f = sf.SoundFile(io.BytesIO(data))
        f = self.f
        self.sr, self.channels = f.samplerate, f.channels
        if sizes is not None:
            declared, present = sizes
            frame_bytes = _frame_bytes(f.subtype, self.channels)
            declared_frames = declared // frame_bytes if frame_bytes else f.frames
            _check_stream(self.sr, self.channels, declared_frames, limits)
            if frame_bytes and declared - present >= frame_bytes:
                raise InvalidInput(
                    KIND,
                    f"WAV header declares {declared_frames} samples "
                    f"({declared_frames / self.sr:.2f} s) but the file holds "
                    f"{present // frame_bytes} ({present / frame_bytes / self.sr:.2f} s): "
                    "truncated file or lying header",
                )
        _check_stream(self.sr, self.channels, f.frames, limits)
        if f.frames <= 0:
            raise InvalidInput(KIND, "no audio samples in the file")
        self.frames = f.frames
        # Sample-accurate seeks: uncompressed PCM and FLAC (seek table + frame-exact decode).
        # libsndfile's Vorbis, Opus and MP3 seeks are approximate (decoder pre-roll, the MP3
        # bit reservoir), so reading clips by ranges there does not give the reference's
        # numbers (docs/preprocessing.md has the measured differences).
        self.seekable = f.subtype in _SUBTYPE_BYTES

    def read_all(self) -> np.ndarray:
        """Every sample, decoded in one pass from the start: float32 (channels, n).

        Rewinds first, as `soundfile.read` does: mpg123 decodes the first frames of a stream it
        has only probed 1 ulp differently from a stream restarted at sample 0.
        """
        with decoding(KIND, "audio"):
            self.f.seek(0)
            a = self.f.read(dtype="float32", always_2d=True)
        if len(a) == 0:
            raise InvalidInput(KIND, "no audio samples decoded")
        a = np.ascontiguousarray(a.T)
        check_finite(KIND, a, "audio samples")
        return a

    def read(self, start: int, stop: int) -> np.ndarray:
        """Samples [start, stop) as float32 (channels, stop - start)."""
        with decoding(KIND, "audio"):
            self.f.seek(start)
            a = self.f.read(stop - start, dtype="float32", always_2d=True)
        if len(a) < stop - start:
            raise InvalidInput(
                KIND,
                f"header declares {self.frames} samples but decoding stops at {start + len(a)} "
                "(truncated file)",
            )
        a = np.ascontiguousarray(a.T)
        check_finite(KIND, a, "audio samples")
        return a

    def close(self) -> None:
        self.f.close()


_SUBTYPE_BYTES = {
    "PCM_S8": 1,
    "PCM_U8": 1,
    "PCM_16": 2,
    "PCM_24": 3,
    "PCM_32": 4,
    "FLOAT": 4,
    "DOUBLE": 8,
    "ULAW": 1,
    "ALAW": 1,
}


def _frame_bytes(subtype: str, channels: int) -> int | None:
    b = _SUBTYPE_BYTES.get(subtype)
    return b * channels if b else None


def _decode_pyav(data: bytes, limits: Limits) -> tuple[np.ndarray, int]:
    import av

    deadline = Deadline(KIND, limits.max_decode_s)
    with decoding(KIND, "audio"), av.open(io.BytesIO(data), mode="r") as container:
        if not container.streams.audio:
            raise InvalidInput(KIND, "no audio stream in the file")
        st = container.streams.audio[0]
        if st.codec_context is None:  # FFmpeg found a stream but has no decoder for it
            raise InvalidInput(KIND, f"{DAMAGED} (no decoder for its audio stream)")
        sr = st.codec_context.sample_rate or st.rate
        channels = st.codec_context.channels
        declared = None
        if st.duration is not None and st.time_base is not None:
            declared = int(float(st.duration * st.time_base) * sr)
        elif container.duration is not None:
            declared = int(container.duration / 1_000_000 * sr)
        _check_stream(sr or 0, channels or 0, declared, limits)
        max_frames = int(limits.max_audio_duration_s * sr) + 1
        chunks: list[np.ndarray] = []
        total = 0
        resampler = None
        for frame in container.decode(st):
            deadline.check()
            if frame.format.name != "fltp":
                # Format conversion only (same rate and layout): int samples -> float [-1, 1].
                if resampler is None:
                    resampler = av.AudioResampler(
                        format="fltp", layout=frame.layout.name, rate=frame.sample_rate
                    )
                frames = resampler.resample(frame)
            else:
                frames = [frame]
            for fr in frames:
                arr = fr.to_ndarray()  # (channels, samples) for planar float
                chunks.append(arr)
                total += arr.shape[1]
            if total > max_frames:
                raise InvalidInput(
                    KIND,
                    f"decoded duration exceeds the limit of {limits.max_audio_duration_s:g} s",
                )
        if resampler is not None:
            for fr in resampler.resample(None):
                chunks.append(fr.to_ndarray())
    if not chunks or sum(c.shape[1] for c in chunks) == 0:
        raise InvalidInput(KIND, "no audio samples decoded")
    return np.ascontiguousarray(np.concatenate(chunks, axis=1), dtype=np.float32), sr


def decode_audio(data: bytes, limits: Limits = DEFAULT_LIMITS) -> tuple[np.ndarray, int]:
    """Decode encoded audio into (waveform float32 (channels, samples) in [-1, 1], sample rate).

    WAV, FLAC, Ogg/Vorbis/Opus, AIFF, MP3 via libsndfile; M4A/AAC and other FFmpeg formats
    (or files libsndfile rejects) via PyAV. Declared sizes are checked before decoding (a WAV
    header that claims more data than the file holds, or hours of audio, is refused without
    reading samples).

    Raises:
        InvalidInput: empty, undecodable, truncated, no audio stream, over the duration /
            sample-rate / channel limits, or NaN/Inf samples.
    """
    src = _open_source(data, limits)
    if isinstance(src, _SndfileSource):
        try:
            return src.read(0, src.frames), src.sr
        finally:
            src.close()
    return src


def _open_source(data: bytes, limits: Limits) -> _SndfileSource | tuple[np.ndarray, int]:
    """A lazily read libsndfile source, or a whole (waveform, rate) decoded by PyAV."""
    data = as_bytes(KIND, data, limits)
    declared = _wav_channels_and_rate(data)
    if declared is not None:
        _check_stream(declared[1], declared[0], None, limits)
    if _wav_bits_per_sample(data) == 0:
        raise InvalidInput(KIND, "the WAV header declares 0 bits per sample")
    if data[:4] in _SNDFILE_MAGIC or _looks_like_mp3(data):
        try:
            src = _SndfileSource(data, limits)
        except InvalidInput as e:
            if not e.reason.startswith("cannot decode"):
                raise
            # e.g. an Ogg codec libsndfile lacks: let FFmpeg try
        else:
            if src.seekable:
                return src
            try:
                return src.read_all(), src.sr
            finally:
                src.close()
    wave, sr = _decode_pyav(data, limits)
    if wave.shape[1] == 0:
        raise InvalidInput(KIND, "no audio samples decoded")
    check_finite(KIND, wave, "audio samples")
    return wave, sr


def preprocess_audio(
    waveform: np.ndarray | torch.Tensor,
    sample_rate: int,
    cfg: AudioConfig = AUDIO,
    limits: Limits = DEFAULT_LIMITS,
) -> torch.Tensor:
    """Waveform (channels, samples) at `sample_rate` -> (3, 1, 128, 204) float32 model input.

    The input is not modified. Raises InvalidInput if a clip is shorter than one 25 ms frame,
    or if resampling from `sample_rate` needs a filter over `limits.max_resample_filter`.
    """
    wave = torch.as_tensor(waveform, dtype=torch.float32)
    if wave.ndim != 2 or wave.shape[1] == 0:
        raise InvalidInput(
            KIND, f"expected a (channels, samples) waveform, got {tuple(wave.shape)}"
        )
    return _clip_features(wave.shape[1], sample_rate, lambda a, b: wave[:, a:b], cfg, limits)


def resampled_length(n: int, orig_sr: int, new_sr: int) -> int:
    """Length of `torchaudio.functional.resample`'s output for `n` input samples (its own
    arithmetic: ceil in float32 of the gcd-reduced ratio)."""
    if orig_sr == new_sr:
        return n
    g = math.gcd(orig_sr, new_sr)
    o, w = orig_sr // g, new_sr // g
    return int(torch.ceil(torch.as_tensor(w * n / o)).long())


def _filter_width(o: int, w: int) -> int:
    """Half-width (input samples) of torchaudio's default resampling filter for the
    gcd-reduced rates `o` -> `w` (lowpass_filter_width 6, rolloff 0.99)."""
    return math.ceil(6 * o / (min(o, w) * 0.99))


def resample_filter_size(orig_sr: int, new_sr: int) -> int:
    """Values of the filter `torchaudio.functional.resample(x, orig_sr, new_sr)` builds:
    (new/g, 1, orig/g + 2 x width), g the rates' gcd; 0 when no resampling is needed."""
    if orig_sr == new_sr:
        return 0
    g = math.gcd(orig_sr, new_sr)
    o, w = orig_sr // g, new_sr // g
    return w * (o + 2 * _filter_width(o, w))


def _check_resample(sr: int, new_sr: int, limits: Limits) -> None:
    size = resample_filter_size(sr, new_sr)
    if size > limits.max_resample_filter:
        raise InvalidInput(
            KIND,
            f"sample rate {sr} Hz cannot be resampled to {new_sr} Hz within the limits: the "
            f"exact resampling filter (as the reference builds it) would hold {size:,} values, "
            f"over max_resample_filter ({limits.max_resample_filter:,}); rates sharing few "
            "factors with it cost gigabytes. Re-encode the file at a common rate (8, 16, 22.05, "
            "44.1 or 48 kHz)",
        )


def _resampled_range(
    read: Callable[[int, int], np.ndarray | torch.Tensor],
    n_in: int,
    sr: int,
    new_sr: int,
    a: int,
    b: int,
) -> torch.Tensor:
    """Output samples [a, b) of `torchaudio.functional.resample(whole, sr, new_sr)`, computed
    from only the input range they depend on.

    The resampler is a strided convolution: output block i (new/g samples) reads input
    [i*o - width, i*o + o + width) with o = sr/g and zero padding beyond the ends. Resampling a
    segment that starts on a block boundary and carries that margin reproduces those outputs
    (up to float summation order), so a 10-minute file costs the same as 6 s of audio.
    """
    if sr == new_sr:
        return torch.as_tensor(read(a, b), dtype=torch.float32).clone()
    g = math.gcd(sr, new_sr)
    o, w = sr // g, new_sr // g
    width = _filter_width(o, w)
    margin = -(-width // o) + 1  # blocks
    i0, i1 = a // w, (b - 1) // w
    s = max(0, (i0 - margin) * o)
    e = min(n_in, (i1 + 1 + margin) * o + width)
    seg = torch.as_tensor(read(s, e), dtype=torch.float32)
    y = torchaudio.functional.resample(seg, orig_freq=sr, new_freq=new_sr)
    off = (s // o) * w
    if y.shape[1] < b - off:  # cannot happen with the margins above; keep the exact path
        y = torchaudio.functional.resample(
            torch.as_tensor(read(0, n_in), dtype=torch.float32), orig_freq=sr, new_freq=new_sr
        )
        off = 0
    return y[:, a - off : b - off]


# Sources up to this long (seconds) are resampled whole, as the reference does; longer ones
# only around their clips (`_resampled_range`).
WHOLE_RESAMPLE_MAX_S = 120.0


def _clip_features(
    n_in: int,
    sr: int,
    read: Callable[[int, int], np.ndarray | torch.Tensor],
    cfg: AudioConfig,
    limits: Limits,
) -> torch.Tensor:
    """The reference's clip loop over a source of `n_in` samples at `sr`, read by ranges."""
    new_sr = cfg.sample_rate
    _check_resample(sr, new_sr, limits)
    n = resampled_length(n_in, sr, new_sr)
    min_len = int(new_sr * cfg.frame_length_ms / 1000)
    spans = []
    for start, end in clip_spans(n / new_sr, cfg.clip_duration, cfg.num_clips):
        a, b = int(start * new_sr), min(int(end * new_sr), n)
        if b - a < min_len:
            raise InvalidInput(
                KIND,
                f"audio is {n / new_sr * 1000:.1f} ms long; at least {cfg.frame_length_ms:g} ms "
                "(one analysis frame) is needed",
            )
        spans.append((a, b))
    # Overlapping clips share one buffer, like the reference's views of one waveform (the
    # in-place mean subtraction then leaks between them exactly as there).
    groups: list[list[int]] = []
    for a, b in sorted(spans):
        if groups and a < groups[-1][1]:
            groups[-1][1] = max(groups[-1][1], b)
        else:
            groups.append([a, b])
    if sr != new_sr and n_in <= WHOLE_RESAMPLE_MAX_S * sr:
        # The reference's own arithmetic: the whole waveform resampled once, then sliced. The
        # range path below equals it only up to float summation order, and on AVX2 CPUs that
        # order moved the log-mel of bins above an 8 kHz source's Nyquist (rounding noise,
        # amplified by the log) by up to 5e-4; a file this short costs little whole.
        whole = torchaudio.functional.resample(
            torch.as_tensor(read(0, n_in), dtype=torch.float32), orig_freq=sr, new_freq=new_sr
        )
        buffers = [(ga, whole[:, ga:gb]) for ga, gb in groups]
    else:
        buffers = [(ga, _resampled_range(read, n_in, sr, new_sr, ga, gb)) for ga, gb in groups]
    mean = torch.tensor(cfg.mean, dtype=torch.float32)
    std = torch.tensor(cfg.std, dtype=torch.float32)
    out = []
    for a, b in spans:
        ga, buf = next((ga, buf) for ga, buf in reversed(buffers) if ga <= a)
        if cfg.mean_subtraction == "reference":
            clip = buf[:, a - ga : b - ga]  # a view: the subtraction below leaks into later clips
        else:
            clip = buf[:, a - ga : b - ga].clone()
        clip -= clip.mean()
        fbank = torchaudio.compliance.kaldi.fbank(
            clip,
            htk_compat=True,
            sample_frequency=new_sr,
            use_energy=False,
            window_type="hanning",
            num_mel_bins=cfg.num_mel_bins,
            dither=0.0,
            frame_length=cfg.frame_length_ms,
            frame_shift=cfg.frame_shift_ms,
        ).T  # (mel, frames)
        pad = cfg.target_length - fbank.shape[1]
        if pad > 0:
            fbank = torch.nn.functional.pad(fbank, (0, pad), value=0.0)
        elif pad < 0:
            fbank = fbank[:, : cfg.target_length]
        out.append(((fbank - mean) / std).unsqueeze(0))  # (1, mel, time)
    x = torch.stack(out, dim=0)  # (clips, 1, mel, time)
    check_finite(KIND, x, "log-mel features")
    return x


def audio_from_bytes(
    data: bytes, limits: Limits = DEFAULT_LIMITS, **options: object
) -> torch.Tensor:
    """`preprocess("audio", data)`: decode + preprocess one audio file."""
    cfg = replace_config(AUDIO, options, KIND)
    src = _open_source(data, limits)
    if isinstance(src, _SndfileSource):
        try:
            return _clip_features(src.frames, src.sr, src.read, cfg, limits)
        finally:
            src.close()
    wave, sr = src
    return preprocess_audio(wave, sr, cfg, limits)
