"""The one entry point: `preprocess(kind, data)` -> one item's model input; plus batching."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from imagebind_core._lazy import load_module
from imagebind_core.errors import InvalidInput
from imagebind_core.kinds import Kind, check_kind
from imagebind_core.preprocess.common import (
    DEFAULT_LIMITS,
    Limits,
    PreprocessOptionError,
    replace_config,
)

if TYPE_CHECKING:  # torch loads with the first decoder: listing and writing tasks never pay it
    import numpy as np
    import torch

logger = logging.getLogger(__name__)

# kind -> (module, function taking (data, limits, **options), the kind's default config that
# options override). Imported on first use so that e.g. a text-only worker never imports PyAV.
_HANDLERS: dict[str, tuple[str, str, str]] = {
    "vision": ("imagebind_core.preprocess.image", "image_from_bytes", "IMAGE"),
    "video": ("imagebind_core.preprocess.video", "video_from_bytes", "VIDEO"),
    "text": ("imagebind_core.preprocess.text", "text_from_data", "TEXT"),
    "audio": ("imagebind_core.preprocess.audio", "audio_from_bytes", "AUDIO"),
    "depth": ("imagebind_core.preprocess.depth", "depth_from_bytes", "DEPTH"),
    "thermal": ("imagebind_core.preprocess.depth", "thermal_from_bytes", "THERMAL"),
    "imu": ("imagebind_core.preprocess.imu", "imu_from_bytes", "IMU"),
}

# Shape of one preprocessed item, without the batch axis.
ITEM_SHAPES: dict[str, tuple[int, ...]] = {
    "vision": (3, 224, 224),
    "video": (15, 3, 2, 224, 224),
    "text": (77,),
    "audio": (3, 1, 128, 204),
    "depth": (1, 224, 224),
    "thermal": (1, 224, 224),
    "imu": (6, 2000),
}


def item_nbytes(kind: str, compact: bool = False) -> int:
    """Bytes of one preprocessed item of `kind` as `preprocess` returns it: token ids as int64,
    a still image's pixels as uint8 when `compact`, every other input float32."""
    n = math.prod(ITEM_SHAPES[kind])
    if kind == "text":
        return 8 * n
    return n if compact and kind in _COMPACT else 4 * n


def _handler(kind: str) -> Callable[..., torch.Tensor]:
    mod, fn, _ = _HANDLERS[kind]
    return getattr(load_module(mod), fn)


# Kinds whose input has a smaller exact form for transport: kind -> (module, compact
# preprocessing into numpy (no torch), expansion). Still images only: every other kind's last
# integer stage is far from its input (video and depth/thermal resize in floating point, audio
# is a spectrogram).
_COMPACT: dict[str, tuple[str, str, str]] = {
    "vision": ("imagebind_core.preprocess.image", "image_pixels_array", "expand_pixels"),
}


def preprocess(
    kind: Kind | str,
    data: bytes | str,
    *,
    item_id: str | None = None,
    limits: Limits | None = None,
    compact: bool = False,
    **options: Any,
) -> torch.Tensor:
    """Decode and preprocess one item into the model's input tensor (no batch axis).

    Args:
        kind: "vision" (still image), "video", "text", "audio", "depth", "thermal" or "imu".
        data: the encoded bytes (a file's content); for text also a `str`.
        item_id: named in the error if the item is bad.
        limits: hard limits (`Limits()` by default).
        compact: return the smallest exact form of the input, for moving it to another
            process or machine: still images as uint8 (3,224,224) pixels after resize and crop
            (a quarter of the bytes); other kinds unchanged. `expand(kind, x)` then gives,
            on any device, exactly what `compact=False` returns.
        **options: per-modality config overrides, e.g. `mean_subtraction="per_clip"` for audio,
            `input="disparity"` for depth (see docs/preprocessing.md); unknown names or
            invalid values raise `PreprocessOptionError` (a TypeError).

    Returns:
        vision (3,224,224) float32; video (15,3,2,224,224) float32; text (77,) int64;
        audio (3,1,128,204) float32; depth/thermal (1,224,224) float32; imu (6,2000) float32.

    Raises:
        InvalidInput: empty, corrupt, mislabelled or over-limit data, naming `item_id`.
    """
    k = check_kind(kind)
    if compact and k in _COMPACT:
        import torch

        return torch.from_numpy(
            preprocess_array(k, data, item_id=item_id, limits=limits, **options)
        )
    return _call(k, _handler(k), data, item_id, limits, options)


def preprocess_array(
    kind: Kind | str,
    data: bytes | str,
    *,
    item_id: str | None = None,
    limits: Limits | None = None,
    **options: Any,
) -> np.ndarray:
    """`preprocess(kind, data, compact=True)` as a numpy array: the form an item travels in
    between processes. The same values and errors; still images are decoded, resized and
    cropped without torch, so a process that only preprocesses them never imports it (~1-1.5
    CPU-s and ~270 MB of private memory per worker process)."""
    k = check_kind(kind)
    if k in _COMPACT:
        mod, name, _ = _COMPACT[k]
        return _call(k, getattr(load_module(mod), name), data, item_id, limits, options)
    return preprocess(k, data, item_id=item_id, limits=limits, compact=True, **options).numpy()


def _call(
    k: str,
    fn: Callable[..., Any],
    data: bytes | str,
    item_id: str | None,
    limits: Limits | None,
    options: dict[str, Any],
) -> Any:
    """`fn(data, limits, **options)` with every failure but a bad option as InvalidInput
    naming `item_id`."""
    try:
        return fn(data, limits or DEFAULT_LIMITS, **options)
    except InvalidInput as e:
        raise e.with_id(item_id) from e.__cause__
    except PreprocessOptionError:
        raise
    except (Exception, MemoryError) as e:
        logger.exception("unexpected error preprocessing %s item %r", k, item_id)
        raise InvalidInput(k, f"{type(e).__name__}: {e}", item_id) from e


def check_options(kind: Kind | str, options: dict[str, Any]) -> None:
    """Raise `PreprocessOptionError` if `preprocess(kind, ..., **options)` would, whatever the
    item (an unknown name, an invalid value): a job checks its configuration with this before
    it reads anything, rather than failing every item of the kind."""
    k = check_kind(kind)
    mod, _, config = _HANDLERS[k]
    replace_config(getattr(load_module(mod), config), dict(options), k)


def expand(kind: Kind | str, x: torch.Tensor, device: Any = None, **options: Any) -> torch.Tensor:
    """A compact input (one item or a batch, `preprocess(..., compact=True)`) -> the model
    input, computed on `device` (default: the tensor's own) — give the model's device, so the
    smaller form is what travels. Inputs that are already full (any kind whose compact form is
    the full one, or a float image) are returned as they are, wherever they are. `options` must
    be those given to `preprocess`."""
    k = check_kind(kind)
    if k not in _COMPACT or x.is_floating_point():
        return x
    mod, _, name = _COMPACT[k]
    if device is not None:
        x = x.to(device)
    return getattr(load_module(mod), name)(x, **options)


def collate(items: Sequence[torch.Tensor]) -> torch.Tensor:
    """Stack preprocessed items of one kind into a batch (a new leading axis).

    The clip axis of video (15 views) and audio (3 clips) is kept: (B, 15, 3, 2, 224, 224),
    (B, 3, 1, 128, 204). Images and videos cannot share a batch (different shapes).

    Raises:
        ValueError: no items, or items of different shapes/dtypes.
    """
    import torch

    if len(items) == 0:
        raise ValueError("collate needs at least one item")
    first = items[0]
    for i, t in enumerate(items):
        if t.shape != first.shape or t.dtype != first.dtype:
            raise ValueError(
                f"cannot batch item {i} of shape {tuple(t.shape)} {t.dtype} with item 0 of "
                f"shape {tuple(first.shape)} {first.dtype}: one kind per batch"
            )
    return torch.stack(list(items), dim=0)


_EXTENSIONS: dict[str, str] = {
    **dict.fromkeys(
        ("jpg", "jpeg", "jpe", "jfif", "png", "webp", "bmp", "gif", "tif", "tiff", "mpo"),
        "vision",
    ),
    **dict.fromkeys(
        ("mp4", "m4v", "mov", "mkv", "webm", "avi", "mpg", "mpeg", "ts", "3gp", "ogv", "wmv"),
        "video",
    ),
    **dict.fromkeys(("wav", "wave", "flac", "ogg", "oga", "opus", "mp3", "m4a", "aac"), "audio"),
    **dict.fromkeys(("txt", "text"), "text"),
}
# Raster formats a depth/thermal map can come in, and array formats an IMU/depth recording can.
_DEPTH_EXT = {"png", "tif", "tiff", "npy"}
_THERMAL_EXT = {"png", "jpg", "jpeg", "tif", "tiff", "bmp", "webp"}
_IMU_EXT = {"npy", "csv", "json"}


def infer_kind(path_or_name: str) -> str | None:
    """Media kind from a file name, path or URI (query strings ignored), or None if unknown.

    Plain extensions: images -> "vision", videos -> "video", audio -> "audio", ".txt" ->
    "text". Depth, thermal and IMU share container formats with other kinds, so they are named
    by a second suffix: "x.depth.png", "x.depth.npy", "x.thermal.png", "x.imu.npy",
    "x.imu.csv", "x.imu.json". A bare ".npy", ".csv" or ".json" is ambiguous -> None.
    """
    name = urlsplit(path_or_name).path if "://" in path_or_name else path_or_name
    name = name.replace("\\", "/").rsplit("/", 1)[-1].lower()
    parts = name.split(".")
    if len(parts) < 2:
        return None
    ext = parts[-1]
    tag = parts[-2] if len(parts) >= 3 else ""
    if tag == "depth" and ext in _DEPTH_EXT:
        return "depth"
    if tag == "thermal" and ext in _THERMAL_EXT:
        return "thermal"
    if tag == "imu" and ext in _IMU_EXT:
        return "imu"
    return _EXTENSIONS.get(ext)
