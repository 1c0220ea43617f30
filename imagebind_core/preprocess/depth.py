"""Depth and thermal maps: single-channel rasters -> (1, 224, 224) float32.

The reference ships no loader for either (reference doc §2.5/§2.6): the model only defines the
tensor. What follows is a documented, configurable, *non-reference* recipe that uses the image
path's geometry (Pillow bicubic short-side resize to 224 on float32 data, centre crop with
round-half-even offsets), so spatial handling matches still images exactly.

Depth follows the only author-provided recipe (SUN RGB-D, I. Misra in Omnivore issue #12):
metric depth d (metres) -> disparity = baseline * focal / d, then Omnivore-style
normalisation: clamp to `max_disparity`, divide by it, then (x - mean) / std. Defaults are
stated in `DepthConfig`; they are assumptions, not published ImageBind constants.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from PIL import Image

from imagebind_core.errors import InvalidInput
from imagebind_core.preprocess.common import (
    DEFAULT_LIMITS,
    NPY_MAGIC,
    Limits,
    as_bytes,
    check_finite,
    check_pixels,
    decoding,
    load_npy,
    replace_config,
)
from imagebind_core.preprocess.image import load_pixels, open_image, resize_center_crop

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DepthConfig:
    """Depth recipe. Units and assumptions:

    Args:
        input: "metric" — values are distances along the optical axis, converted to metres by
            `scale`, then to disparity = baseline_m * focal_px / depth (0 or negative depth =
            no reading -> disparity 0). "disparity" — values already are disparity (in the
            units `max_disparity` refers to), multiplied by `scale`.
        scale: multiplier applied to the stored values. None -> 0.001 for integer arrays
            (16-bit PNGs from Kinect/RealSense/SUN RGB-D store millimetres) and 1.0 for float
            arrays (metres). For "disparity" input None means 1.0.
        baseline_m, focal_px: stereo baseline and focal length of the sensor (defaults: Kinect
            v1, 0.075 m and 518.857901 px, the NYU-Depth v2 intrinsics). RealSense/Xtion: 0.095 m.
        max_disparity, mean, std: normalisation (x.clamp(0, max) / max - mean) / std.
        size: output side.
    """

    input: Literal["metric", "disparity"] = "metric"
    scale: float | None = None
    baseline_m: float = 0.075
    focal_px: float = 518.857901
    max_disparity: float = 75.0
    mean: float = 0.0418
    std: float = 0.0295
    size: int = 224

    def __post_init__(self) -> None:
        if self.input not in ("metric", "disparity"):
            raise ValueError(
                f"DepthConfig.input must be 'metric' or 'disparity', got {self.input!r}"
            )


@dataclass(frozen=True)
class ThermalConfig:
    """Thermal recipe (LLVIP-style single-channel frames), not published by the reference.

    Args:
        sixteen_bit: how 16-bit (radiometric) frames reach [0, 1]: "minmax" stretches each
            frame's own range (how such frames are usually rendered to 8-bit, and what LLVIP's
            8-bit frames look like); "full_range" divides by 65535.
        mean, std: (x - mean) / std after scaling to [0, 1]; defaults leave [0, 1] unchanged
            (no published constants).
        size: output side.
    """

    sixteen_bit: Literal["minmax", "full_range"] = "minmax"
    mean: float = 0.0
    std: float = 1.0
    size: int = 224

    def __post_init__(self) -> None:
        if self.sixteen_bit not in ("minmax", "full_range"):
            raise ValueError(
                f"ThermalConfig.sixteen_bit must be minmax|full_range, got {self.sixteen_bit!r}"
            )


DEPTH = DepthConfig()
THERMAL = ThermalConfig()


def _raster_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """(H, W) of a single-channel raster stored as (H, W), (1, H, W) or (H, W, 1)."""
    if len(shape) == 3 and 1 in (shape[0], shape[-1]):
        return shape[1:] if shape[0] == 1 else shape[:-1]
    return shape


def _load_npy(kind: str, data: bytes, limits: Limits) -> np.ndarray:
    def check(shape: tuple[int, ...]) -> None:  # from the header, before any element is read
        hw = _raster_shape(shape)
        if len(hw) != 2:
            raise InvalidInput(kind, f"expected a 2-D (H, W) array, got shape {shape}")
        check_pixels(kind, hw[1], hw[0], limits)

    arr = load_npy(kind, data, check)
    return arr.reshape(_raster_shape(arr.shape))


def _load_single_channel(kind: str, data: bytes, limits: Limits, allow_rgb: bool) -> np.ndarray:
    """A single-channel raster from .npy or an image file, in its stored dtype."""
    data = as_bytes(kind, data, limits)
    if data.startswith(NPY_MAGIC):
        return _load_npy(kind, data, limits)
    im = open_image(kind, data, limits)
    load_pixels(kind, im)
    with decoding(kind, "image"):
        if im.mode in ("I;16", "I;16B", "I;16L"):
            arr = np.asarray(im).astype(np.uint16)
        elif im.mode in ("I", "F", "L"):
            arr = np.asarray(im)
        elif im.mode == "P" or im.mode in ("LA", "PA"):
            arr = np.asarray(im.convert("L"))
        elif allow_rgb and im.mode in ("RGB", "RGBA", "CMYK", "YCbCr"):
            # LLVIP and many thermal cameras save grey frames as 3-channel JPEGs.
            arr = np.asarray(im.convert("L"))
        else:
            raise InvalidInput(kind, f"expected a single-channel image, got mode {im.mode}")
    return arr


def _map_rows(fn: Callable[[np.ndarray], np.ndarray], arr: np.ndarray) -> np.ndarray:
    """`fn(arr.astype(float64)).astype(float32)` computed over blocks of rows.

    Same numbers (the maths is elementwise, in float64), but the float64 temporaries cover one
    block (~1 M pixels) instead of the whole map: a 100-megapixel depth map needs ~0.5 GB here
    instead of ~5 GB, so a small PNG cannot make a worker swell by gigabytes.
    """
    out = np.empty(arr.shape, np.float32)
    step = max(1, (1 << 20) // max(1, arr.shape[1]))
    for r in range(0, arr.shape[0], step):
        out[r : r + step] = fn(arr[r : r + step].astype(np.float64))
    return out


def _resize_crop_float(arr: np.ndarray, size: int) -> torch.Tensor:
    im = resize_center_crop(Image.fromarray(np.ascontiguousarray(arr, dtype=np.float32), "F"), size)
    return torch.from_numpy(np.array(im, dtype=np.float32))[None]  # (1, size, size)


def decode_depth(data: bytes, limits: Limits = DEFAULT_LIMITS) -> np.ndarray:
    """Decode a depth map: 16/8-bit PNG (or TIFF) or a 2-D .npy array -> (H, W), stored dtype.

    Raises:
        InvalidInput: undecodable, not single-channel, over the pixel limit, or NaN/Inf values.
    """
    arr = _load_single_channel("depth", data, limits, allow_rgb=False)
    check_finite("depth", arr, "depth values")
    return arr


def preprocess_depth(depth: np.ndarray, cfg: DepthConfig = DEPTH) -> torch.Tensor:
    """Depth (H, W) in stored units -> (1, 224, 224) float32 normalised disparity.

    See `DepthConfig` for units; the input array is not modified.
    """
    if depth.ndim != 2:
        raise InvalidInput("depth", f"expected a 2-D (H, W) array, got shape {depth.shape}")
    check_finite("depth", depth, "depth values")
    integer = np.issubdtype(depth.dtype, np.integer)

    def to_disparity(x: np.ndarray) -> np.ndarray:
        if cfg.input == "metric":
            scale = cfg.scale if cfg.scale is not None else (0.001 if integer else 1.0)
            metres = x * scale
            disparity = np.zeros_like(metres)
            valid = metres > 0
            disparity[valid] = cfg.baseline_m * cfg.focal_px / metres[valid]
        else:
            disparity = x * (cfg.scale if cfg.scale is not None else 1.0)
        return np.clip(disparity, 0.0, cfg.max_disparity) / cfg.max_disparity

    t = _resize_crop_float(_map_rows(to_disparity, depth), cfg.size)
    t = (t - cfg.mean) / cfg.std
    check_finite("depth", t, "preprocessed depth")
    return t


def decode_thermal(data: bytes, limits: Limits = DEFAULT_LIMITS) -> np.ndarray:
    """Decode a thermal frame: 8/16-bit grey image (3-channel grey JPEGs are converted to grey
    with Pillow's ITU-R 601 luma) or a 2-D .npy array -> (H, W), stored dtype."""
    arr = _load_single_channel("thermal", data, limits, allow_rgb=True)
    check_finite("thermal", arr, "thermal values")
    return arr


def preprocess_thermal(thermal: np.ndarray, cfg: ThermalConfig = THERMAL) -> torch.Tensor:
    """Thermal (H, W) -> (1, 224, 224) float32: scaled to [0, 1] (uint8 / 255; 16-bit per
    `cfg.sixteen_bit`; float arrays are taken as already in [0, 1], and InvalidInput when
    they are not), image geometry, then (x - mean) / std. The input array is not modified."""
    if thermal.ndim != 2:
        raise InvalidInput("thermal", f"expected a 2-D (H, W) array, got shape {thermal.shape}")
    check_finite("thermal", thermal, "thermal values")
    integer = np.issubdtype(thermal.dtype, np.integer)
    if not integer and thermal.size:
        # A float map is used as it is: values in kelvin or degrees would be embedded as an
        # all-white frame without a word.
        lo, hi = float(thermal.min()), float(thermal.max())
        if lo < 0.0 or hi > 1.0:
            raise InvalidInput(
                "thermal",
                f"float thermal values must lie in [0, 1] (these span {lo:g} to {hi:g}); "
                "scale them to [0, 1], or give integer counts (8-bit, or 16-bit for the "
                "per-frame min-max stretch)",
            )
    lo = hi = 0.0
    if integer and thermal.dtype != np.uint8 and cfg.sixteen_bit != "full_range":
        lo, hi = float(thermal.min()), float(thermal.max())

    def to_unit(x: np.ndarray) -> np.ndarray:
        if thermal.dtype == np.uint8:
            return x / 255.0
        if integer:
            if cfg.sixteen_bit == "full_range":
                return x / 65535.0
            return (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)
        return x

    t = _resize_crop_float(_map_rows(to_unit, thermal), cfg.size)
    t = (t - cfg.mean) / cfg.std
    check_finite("thermal", t, "preprocessed thermal")
    return t


def depth_from_bytes(
    data: bytes, limits: Limits = DEFAULT_LIMITS, **options: object
) -> torch.Tensor:
    """`preprocess("depth", data)`."""
    cfg = replace_config(DEPTH, options, "depth")
    return preprocess_depth(decode_depth(data, limits), cfg)


def thermal_from_bytes(
    data: bytes, limits: Limits = DEFAULT_LIMITS, **options: object
) -> torch.Tensor:
    """`preprocess("thermal", data)`."""
    cfg = replace_config(THERMAL, options, "thermal")
    return preprocess_thermal(decode_thermal(data, limits), cfg)
