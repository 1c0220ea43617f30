"""Limits, the preprocessing version, and the helpers every decoder shares.

Every decoder funnels failures into `InvalidInput`: the libraries underneath (Pillow, PyAV,
libsndfile, numpy) raise a zoo of exception types for bad bytes, and a worker that embeds
millions of items must turn each of them into one row in an errors table, never a crash.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from imagebind_core.errors import InvalidInput

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

# Bump when any default preprocessing output changes numerically: re-indexing keys on it.
PREPROCESS_VERSION = "1"


@dataclass(frozen=True)
class Limits:
    """Hard limits applied to every item before and while it is decoded.

    Every field is enforced; an item over a limit raises `InvalidInput` naming the limit.

    Args:
        max_bytes: encoded size of one item.
        max_pixels: decoded width x height of one image, depth/thermal map or video frame,
            checked from the header before any pixel is decoded (decompression bombs).
        max_aspect_ratio: long side / short side of one image, depth/thermal map or video
            frame, checked with `max_pixels`. The short side is scaled to 224 before the
            centre crop, so the resized raster grows with the ratio, not with the pixel count:
            a 100000x1 PNG of 370 bytes would be resized to 22,400,000x224. At the default
            (20:1, wider than phone and stitched panoramas, which run 2:1 to ~10:1) the
            resized long side is at most 4,480 pixels.
        max_audio_duration_s: declared or decoded audio duration. The reference resamples the
            whole waveform, so memory grows with duration (48 kHz stereo: ~0.4 MB/s).
        max_video_duration_s: video duration (frames / average fps).
        max_video_frames: frames in the video stream (counted from the container's packets).
        max_text_chars: characters of one text, before cleaning.
        max_imu_samples: time steps of one IMU recording, before resampling.
        max_sample_rate: audio sample rate in Hz.
        max_channels: audio channels.
        max_resample_filter: values of the filter that resamples audio to 16 kHz
            (`torchaudio.functional.resample`, as the reference: new/g x (sr/g + 2 x width),
            g = gcd of the rates), checked from the header. The filter grows with
            sr x 16000 / g^2: the usual rates need under 0.2M values, 44,056 Hz 11M, but a
            rate that shares few factors with 16 kHz (16,001 Hz: 256M values, ~4 GB and 20 s
            for one file) would cost gigabytes.
        max_decode_s: wall-clock budget for the frame/packet loops of one item (checked
            between frames; a single libav call cannot be interrupted).
    """

    max_bytes: int = 512 * 1024 * 1024
    max_pixels: int = 100_000_000
    max_aspect_ratio: float = 20.0
    max_audio_duration_s: float = 600.0
    max_video_duration_s: float = 3600.0
    max_video_frames: int = 500_000
    max_text_chars: int = 20_000
    max_imu_samples: int = 1_000_000
    max_sample_rate: int = 768_000
    max_channels: int = 64
    max_resample_filter: int = 16_000_000
    max_decode_s: float = 120.0

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, int | float) or v <= 0:
                raise ValueError(f"Limits.{f.name} must be a positive number, got {v!r}")

    def replace(self, **changes: Any) -> Limits:
        """A copy with some limits changed."""
        return dataclasses.replace(self, **changes)


DEFAULT_LIMITS = Limits()


def as_bytes(kind: str, data: Any, limits: Limits) -> bytes:
    """`data` as bytes, refusing empty or oversized input."""
    if isinstance(data, memoryview | bytearray):
        data = bytes(data)
    if not isinstance(data, bytes):
        raise InvalidInput(kind, f"expected encoded bytes, got {type(data).__name__}")
    if len(data) == 0:
        raise InvalidInput(kind, "empty input (0 bytes)")
    if len(data) > limits.max_bytes:
        raise InvalidInput(
            kind, f"input is {len(data)} bytes, over the limit of {limits.max_bytes} bytes"
        )
    return data


def check_pixels(kind: str, width: int, height: int, limits: Limits) -> None:
    """Refuse a raster whose declared size is empty, over `limits.max_pixels`, or more
    elongated than `limits.max_aspect_ratio` (its short-side resize would be huge)."""
    if width <= 0 or height <= 0:
        raise InvalidInput(kind, f"declared size {width}x{height} is empty")
    if width * height > limits.max_pixels:
        raise InvalidInput(
            kind,
            f"declared size {width}x{height} = {width * height} pixels is over the limit of "
            f"{limits.max_pixels} pixels",
        )
    long, short = max(width, height), min(width, height)
    if long > limits.max_aspect_ratio * short:
        raise InvalidInput(
            kind,
            f"declared size {width}x{height} has an aspect ratio of {long / short:.4g}:1, over "
            f"the limit of {limits.max_aspect_ratio:g}:1 (max_aspect_ratio)",
        )


def check_finite(kind: str, x: np.ndarray | torch.Tensor, what: str = "values") -> None:
    """Refuse NaN or Inf: they would silently poison an embedding."""
    ok = bool(np.isfinite(x).all()) if isinstance(x, np.ndarray) else bool(x.isfinite().all())
    if not ok:
        raise InvalidInput(kind, f"{what} contain NaN or Inf")


@contextlib.contextmanager
def decoding(kind: str, what: str) -> Iterator[None]:
    """Turn any library failure inside the block into `InvalidInput(kind, ...)`.

    `MemoryError` is included: an allocation that fails for one item must not end the worker.
    """
    try:
        yield
    except InvalidInput:
        raise
    except (Exception, MemoryError) as e:
        raise InvalidInput(kind, f"cannot decode {what}: {library_reason(e)}") from e


# Exceptions that are a decoder's own bug tripped by odd data (PyAV reading a stream it has no
# codec for: `'NoneType' object has no attribute 'sample_rate'`): their text means nothing to
# the sender of the file.
_INTERNAL_ERRORS = (AttributeError, TypeError, KeyError, IndexError, NameError, AssertionError)
DAMAGED = "the file is damaged or in a format that cannot be read"


def library_reason(e: BaseException) -> str:
    """What a decoding library's exception says about the input, in the sender's terms.

    FFmpeg's errors (PyAV) lose their errno and the `'<none>'` file name (`[Errno 1094995529]
    Invalid data found when processing input: '<none>'` -> the file is damaged or in a format
    that cannot be read); internal errors of a library (`_INTERNAL_ERRORS`) say the same, not
    their Python text. Other messages (Pillow's, libsndfile's, numpy's) are kept: they name
    what is wrong with the data."""
    if type(e).__module__.split(".")[0] == "av":  # PyAV's FFmpegError and its subclasses
        if type(e).__name__ == "InvalidDataError":
            return DAMAGED
        strerror = getattr(e, "strerror", None)
        return f"{DAMAGED} (FFmpeg: {strerror})" if strerror else DAMAGED
    if isinstance(e, MemoryError):
        return "not enough memory to decode it"
    if type(e).__module__.split(".")[0] == "soundfile" and str(e).startswith("Internal "):
        # libsndfile's own failure on a cut-short file (`Internal psf_fseek() failed.`)
        return f"{DAMAGED} (libsndfile: {str(e).strip()})"
    if isinstance(e, _INTERNAL_ERRORS):
        return DAMAGED
    return str(e).strip() or type(e).__name__


NPY_MAGIC = b"\x93NUMPY"


def load_npy(
    kind: str, data: bytes, check_shape: Callable[[tuple[int, ...]], None] | None = None
) -> np.ndarray:
    """A real numeric `.npy` array, its header checked before any element is read: the
    declared shape and dtype must account for exactly the bytes the file holds, so memory is
    bounded by the file's size (`np.load` allocates what the header declares: a 168-byte file
    declaring (60000, 60000) float64 asked for 27 GiB), and `check_shape(shape)` runs first
    (a caller's limits). Not pickled objects, not complex, not strings."""
    buf = io.BytesIO(data)
    with decoding(kind, ".npy header"):
        version = np.lib.format.read_magic(buf)
        if version not in ((1, 0), (2, 0)):  # 3.0 only adds UTF-8 field names
            raise ValueError(f"unsupported .npy format version {version[0]}.{version[1]}")
        read_header = getattr(np.lib.format, f"read_array_header_{version[0]}_0")
        shape, _, dtype = read_header(buf)
    if (
        dtype.hasobject
        or not np.issubdtype(dtype, np.number)
        or np.issubdtype(dtype, np.complexfloating)
    ):
        raise InvalidInput(kind, f"expected a real numeric array, got dtype {dtype}")
    declared = math.prod(shape) * dtype.itemsize
    held = len(data) - buf.tell()
    if declared != held:
        raise InvalidInput(
            kind,
            f".npy header declares shape {shape} of {dtype} ({declared:,} bytes of data), "
            f"the file holds {held:,}",
        )
    if check_shape is not None:
        check_shape(shape)
    with decoding(kind, ".npy array"):
        return np.load(io.BytesIO(data), allow_pickle=False)


class Deadline:
    """A wall-clock budget checked between frames/packets of one item."""

    def __init__(self, kind: str, seconds: float) -> None:
        self.kind = kind
        self.seconds = seconds
        self.end = time.monotonic() + seconds

    def check(self) -> None:
        """Raise `InvalidInput` once the budget is spent."""
        if time.monotonic() > self.end:
            raise InvalidInput(
                self.kind, f"decoding took longer than the limit of {self.seconds:g} s"
            )


class PreprocessOptionError(TypeError):
    """An option passed to `preprocess` that the modality does not have, or an invalid value:
    a caller's programming error, not bad input data."""


def replace_config(cfg: Any, options: dict[str, Any], kind: str) -> Any:
    """`cfg` with `options` applied as field overrides; unknown names or invalid values raise
    `PreprocessOptionError` (a TypeError)."""
    if not options:
        return cfg
    names = {f.name for f in dataclasses.fields(cfg)}
    unknown = sorted(set(options) - names)
    if unknown:
        raise PreprocessOptionError(
            f"unknown {kind} preprocessing option(s) {unknown}; known: {sorted(names)}"
        )
    try:
        return dataclasses.replace(cfg, **options)
    except ValueError as e:
        raise PreprocessOptionError(f"invalid {kind} preprocessing option: {e}") from None
