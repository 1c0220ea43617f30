"""Import the reference's data loaders (`imagebind.data`) on current libraries, for parity tests.

What the reference's data module needs and what we put in its place (reference doc §7/§9):

* `pkg_resources` (gone from setuptools >= 82): a placeholder whose `resource_filename` uses
  `importlib.resources`.
* `pytorchvideo` (not installed; PyPI 0.1.5 breaks on torchvision >= 0.17, and the reference
  pins an unreleased git commit): placeholder modules providing the four names the loader uses,
  written here from pytorchvideo's documented semantics, independently of the product code:
  `ConstantClipsPerVideoSampler`, `UniformTemporalSubsample`, `ShortSideScale`, and
  `EncodedVideo` — the last decodes *every* frame with PyAV and selects frames the way
  pytorchvideo's decord backend does (duration = frames / average fps; frames
  ceil(fps*start) .. ceil(fps*end) - 1). The rest of the video loader (clip loop, /255,
  normalisation, the three spatial crops, ordering) is the reference's own code.
* `torchaudio.load` (needs TorchCodec on torchaudio 2.9): the reference module's `torchaudio`
  name is pointed at a proxy whose `load` reads the whole file with soundfile (float32,
  channels first — torchaudio's soundfile backend; the same values its other backends give for
  PCM WAV/FLAC), and what libsndfile cannot open (M4A/AAC) with a whole-file PyAV decode
  (torchaudio's FFmpeg backend); every other attribute is the real torchaudio.

Nothing is patched globally: the placeholders only fill module names that do not import, and
the audio proxy is local to the reference data module.
"""

from __future__ import annotations

import importlib
import importlib.resources
import io
import math
import sys
import types
from fractions import Fraction
from typing import Any, NamedTuple

import numpy as np
import soundfile as sf
import torch


class ClipInfo(NamedTuple):
    clip_start_sec: Fraction
    clip_end_sec: Fraction
    clip_index: int
    aug_index: int
    is_last_clip: bool


class ConstantClipsPerVideoSampler:
    """pytorchvideo's sampler: `clips_per_video` clips of `clip_duration` evenly spaced over
    [0, duration - clip_duration] with spacing (duration - clip_duration) / clips_per_video,
    as exact fractions of the float duration."""

    def __init__(self, clip_duration: float, clips_per_video: int, augs_per_clip: int = 1):
        self._clip_duration = Fraction(clip_duration)
        self._clips_per_video = clips_per_video
        self._augs_per_clip = augs_per_clip
        self._current_clip_index = 0
        self._current_aug_index = 0

    def __call__(self, last_clip_time: Any, video_duration: float, annotation: Any) -> ClipInfo:
        max_start = Fraction(max(video_duration - self._clip_duration, 0))
        spacing = Fraction(max_start, self._clips_per_video)
        start = spacing * self._current_clip_index
        clip_index, aug_index = self._current_clip_index, self._current_aug_index
        self._current_aug_index += 1
        if self._current_aug_index >= self._augs_per_clip:
            self._current_clip_index += 1
            self._current_aug_index = 0
        last = (
            self._current_clip_index >= self._clips_per_video
            or spacing * self._current_clip_index > max_start
        )
        if last:
            self._current_clip_index = 0
            self._current_aug_index = 0
        return ClipInfo(start, start + self._clip_duration, clip_index, aug_index, last)


class UniformTemporalSubsample:
    """Pick `num_samples` frames at linspace(0, T-1) (truncated) along dim -3 of (C, T, H, W)."""

    def __init__(self, num_samples: int):
        self.num_samples = num_samples

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[-3]
        idx = torch.linspace(0, t - 1, self.num_samples).clamp(0, t - 1).long()
        return torch.index_select(x, -3, idx)


class ShortSideScale:
    """Bilinear (align_corners=False, no antialias) resize of (C, T, H, W) so the short side is
    `size`; the long side is floor(long / short * size)."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        _, _, h, w = x.shape
        if w < h:
            nh, nw = math.floor(h / w * self.size), self.size
        else:
            nh, nw = self.size, math.floor(w / h * self.size)
        return torch.nn.functional.interpolate(
            x, size=(nh, nw), mode="bilinear", align_corners=False
        )


class EncodedVideo:
    """pytorchvideo's decord-backed video, re-done with a full PyAV decode of every frame."""

    def __init__(self, frames: list[np.ndarray], fps: float):
        self._frames = frames
        self._fps = fps
        self.duration = len(frames) / fps

    @classmethod
    def from_path(cls, path: str, decoder: str = "decord", decode_audio: bool = False, **_: Any):
        import av

        with open(path, "rb") as f:
            data = f.read()
        with av.open(io.BytesIO(data)) as c:
            st = c.streams.video[0]
            fps = float(st.average_rate)
            frames = [fr.to_ndarray(format="rgb24") for fr in c.decode(st)]
        return cls(frames, fps)

    def get_clip(self, start_sec: Fraction, end_sec: Fraction) -> dict[str, torch.Tensor] | None:
        n = len(self._frames)
        a = math.ceil(self._fps * start_sec)
        b = min(math.ceil(self._fps * end_sec), n)
        if a >= b:
            return None
        video = torch.from_numpy(np.stack(self._frames[a:b]))  # (T, H, W, C)
        return {"video": video.permute(3, 0, 1, 2).to(torch.float32)}


def _soundfile_load(path: Any, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, int]:
    try:
        data, sr = sf.read(path, dtype="float32", always_2d=True)
    except sf.LibsndfileError:
        return _pyav_load(path)
    return torch.from_numpy(np.ascontiguousarray(data.T)), sr


def _pyav_load(path: Any) -> tuple[torch.Tensor, int]:
    """Every frame of the first audio stream, converted to planar float32 by FFmpeg."""
    import av

    with av.open(str(path)) as c:
        st = c.streams.audio[0]
        sr = st.codec_context.sample_rate
        to_float = av.AudioResampler(format="fltp", layout=st.codec_context.layout, rate=sr)
        parts = [f.to_ndarray() for fr in c.decode(st) for f in to_float.resample(fr)]
        parts += [f.to_ndarray() for f in to_float.resample(None)]
    return torch.from_numpy(np.concatenate(parts, axis=1).astype(np.float32)), sr


class _TorchaudioProxy(types.ModuleType):
    """The real torchaudio, except `load`, which reads with soundfile."""

    def __init__(self) -> None:
        super().__init__("torchaudio")
        self._real = importlib.import_module("torchaudio")
        self.load = _soundfile_load

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


def _module(name: str, **attrs: Any) -> types.ModuleType:
    m = types.ModuleType(name)
    m.__dict__.update(attrs)
    return m


def _install_placeholders() -> None:
    try:
        import pkg_resources  # noqa: F401
    except ImportError:

        def resource_filename(package: str, resource: str) -> str:
            return str(importlib.resources.files(package) / resource)

        sys.modules["pkg_resources"] = _module("pkg_resources", resource_filename=resource_filename)
    try:
        for name in ("pytorchvideo.data.clip_sampling", "pytorchvideo.data.encoded_video"):
            importlib.import_module(name)
        importlib.import_module("pytorchvideo.transforms")
    except Exception:  # not installed, or the PyPI build that breaks on new torchvision
        for name in [
            k for k in sys.modules if k == "pytorchvideo" or k.startswith("pytorchvideo.")
        ]:
            del sys.modules[name]
        sys.modules["pytorchvideo"] = _module("pytorchvideo")
        sys.modules["pytorchvideo.transforms"] = _module(
            "pytorchvideo.transforms",
            ShortSideScale=ShortSideScale,
            UniformTemporalSubsample=UniformTemporalSubsample,
        )
        sys.modules["pytorchvideo.data"] = _module("pytorchvideo.data")
        sys.modules["pytorchvideo.data.clip_sampling"] = _module(
            "pytorchvideo.data.clip_sampling",
            ConstantClipsPerVideoSampler=ConstantClipsPerVideoSampler,
        )
        sys.modules["pytorchvideo.data.encoded_video"] = _module(
            "pytorchvideo.data.encoded_video", EncodedVideo=EncodedVideo
        )
        sys.modules["pytorchvideo"].transforms = sys.modules["pytorchvideo.transforms"]
        sys.modules["pytorchvideo"].data = sys.modules["pytorchvideo.data"]


_DATA: types.ModuleType | None = None


def reference_data() -> types.ModuleType:
    """The reference's `imagebind.data` module, importable and usable on this stack."""
    global _DATA
    if _DATA is not None:
        return _DATA
    _install_placeholders()
    existing = sys.modules.get("imagebind.data")
    if existing is not None and not hasattr(existing, "load_and_transform_text"):
        del sys.modules["imagebind.data"]  # a model-only placeholder left by another shim
    data = importlib.import_module("imagebind.data")
    data.torchaudio = _TorchaudioProxy()
    _DATA = data
    return data
