"""Still images: bytes -> RGB uint8 array -> the reference's (3, 224, 224) CLIP-normalised tensor.

The resize is Pillow's bicubic on the uint8 image (antialiased on downscale), exactly what the
reference gets from torchvision's `Resize` on a PIL image; a tensor-side bicubic would differ
by several grey levels. Geometry helpers here are shared by depth and thermal.

torch is imported only by the functions that return tensors: a job's preprocessing worker
(`image_pixels_array`) decodes, resizes and crops with Pillow and numpy, and starts without it.
"""

from __future__ import annotations

import functools
import io
import logging
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from imagebind_core.errors import InvalidInput
from imagebind_core.preprocess.common import (
    DEFAULT_LIMITS,
    Limits,
    as_bytes,
    check_pixels,
    decoding,
    replace_config,
)

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

# Pillow plugins we open. An explicit list keeps e.g. EPS (which shells out to Ghostscript)
# and exotic formats out of a server's attack surface. (Camera MPO files open as JPEG.)
IMAGE_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")

CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ImageConfig:
    """The reference's still-image recipe (`load_and_transform_vision_data`)."""

    size: int = 224
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD


IMAGE = ImageConfig()


@functools.cache
def _init_plugins() -> None:
    # Pillow registers only its five most common plugins eagerly; `formats=` needs ours loaded.
    Image.init()


def open_image(kind: str, data: bytes, limits: Limits) -> Image.Image:
    """Open (not decode) `data` with Pillow and check the declared size against the limits.

    Pillow reads only the header here; pixels are decoded by `.load()`/`.convert()`, after the
    pixel-count check, so a 30000x30000 PNG of a few kilobytes costs nothing.
    """
    data = as_bytes(kind, data, limits)
    _init_plugins()
    with decoding(kind, "image"), warnings.catch_warnings():
        # We enforce our own pixel limit; Pillow's bomb warning/error must not pre-empt it.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            im = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
        except Image.UnidentifiedImageError:
            raise InvalidInput(
                kind, f"not a supported image (expected one of {', '.join(IMAGE_FORMATS)})"
            ) from None
        except Image.DecompressionBombError as e:
            # Pillow's own guard (2 x its MAX_IMAGE_PIXELS) fires inside open() for headers far
            # beyond any sane limit; ours below covers everything smaller.
            raise InvalidInput(kind, f"declared size is over the pixel limit ({e})") from None
    check_pixels(kind, im.width, im.height, limits)
    return im


def load_pixels(kind: str, im: Image.Image) -> None:
    """Decode the pixels of an opened image, wrapping truncation/corruption errors."""
    with decoding(kind, f"{im.format or 'image'} pixels"), warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        im.load()


def _decode_rgb(data: bytes, limits: Limits) -> Image.Image:
    im = open_image("vision", data, limits)
    load_pixels("vision", im)
    with decoding("vision", "image"):
        return im if im.mode == "RGB" else im.convert("RGB")  # convert() would copy RGB


def decode_image(data: bytes, limits: Limits = DEFAULT_LIMITS) -> np.ndarray:
    """Decode an encoded image into an RGB uint8 array of shape (H, W, 3).

    JPEG, PNG (8/16-bit, palette, alpha), WebP, BMP, GIF (first frame) and TIFF (first page).
    Colour conversion is Pillow's `convert("RGB")`, as in the reference: alpha is dropped (not
    composited), palette and grey are expanded, EXIF orientation is not applied, and 16-bit
    grey values are clipped to 255 (not rescaled) — the reference's numbers, quirks included.

    Raises:
        InvalidInput: empty, unsupported, truncated, corrupt, or over `limits.max_pixels`.
    """
    return np.asarray(_decode_rgb(data, limits))


def resized_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(W, H) after scaling the short side to `size`: the long side is truncated, as
    torchvision's `Resize(int)` does (int(size * long / short) in Python floats)."""
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def resize_center_crop(im: Image.Image, size: int) -> Image.Image:
    """Pillow bicubic short-side resize to `size`, then a centre crop of `size` x `size`.

    Same arithmetic as torchvision's `Resize(size, BICUBIC)` + `CenterCrop(size)` on a PIL image:
    no resize when the size already matches; crop offsets round half to even (Python `round`).
    Works for any Pillow mode that supports bicubic (L, RGB, F, I).
    """
    im = _resized(im, size)
    top, left = _crop_offsets(im, size)
    return im.crop((left, top, left + size, top + size))


def _resized(im: Image.Image, size: int) -> Image.Image:
    w, h = resized_size(im.width, im.height, size)
    if (w, h) != (im.width, im.height):
        im = im.resize((w, h), Image.Resampling.BICUBIC)
    return im


def _crop_offsets(im: Image.Image, size: int) -> tuple[int, int]:
    """(top, left) of torchvision's `CenterCrop(size)` (offsets round half to even)."""
    return round((im.height - size) / 2.0), round((im.width - size) / 2.0)


def preprocess_image(image: np.ndarray, cfg: ImageConfig = IMAGE) -> torch.Tensor:
    """RGB uint8 (H, W, 3) -> reference model input (3, 224, 224) float32.

    Bicubic short-side resize, centre crop, /255, per-channel (x - mean) / std.
    The input array is not modified.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise InvalidInput("vision", f"expected an RGB uint8 (H, W, 3) array, got {image.shape}")
    return _to_model_input(Image.fromarray(image, "RGB"), cfg)


def _pixels(im: Image.Image, cfg: ImageConfig) -> np.ndarray:
    """Resize + centre crop: (3, size, size) uint8, the last exact integer stage.

    The crop is a slice of the resized pixels, copied once into channel-first order: the same
    bytes as `resize_center_crop` + a (3, H, W) copy, without Pillow's crop and the two further
    copies that `np.array(im)` and `.contiguous()` made.
    """
    im = _resized(im, cfg.size)
    top, left = _crop_offsets(im, cfg.size)
    hwc = np.asarray(im)  # a read-only view of one copy of the resized pixels
    crop = hwc[top : top + cfg.size, left : left + cfg.size].transpose(2, 0, 1)
    return np.ascontiguousarray(crop, dtype=np.uint8)


def normalize_pixels(x: torch.Tensor, cfg: ImageConfig = IMAGE) -> torch.Tensor:
    """uint8 pixels (3, H, W) or (B, 3, H, W), on any device -> the model input in float32:
    /255 then per-channel (x - mean) / std, the reference's order of operations, so the result
    is bit for bit the one `preprocess("vision", ...)` returns."""
    import torch

    x = x.to(torch.float32).div(255)
    mean = torch.tensor(cfg.mean, dtype=torch.float32, device=x.device)[:, None, None]
    std = torch.tensor(cfg.std, dtype=torch.float32, device=x.device)[:, None, None]
    return x.sub_(mean).div_(std)


def _to_model_input(im: Image.Image, cfg: ImageConfig) -> torch.Tensor:
    import torch

    return normalize_pixels(torch.from_numpy(_pixels(im, cfg)), cfg)


def image_pixels_from_bytes(
    data: bytes, limits: Limits = DEFAULT_LIMITS, **options: object
) -> torch.Tensor:
    """`preprocess("vision", data, compact=True)`: the resized, cropped uint8 pixels — a quarter
    of the float32 input's bytes, for moving items between processes or machines. Finish with
    `expand_pixels` (or `imagebind_core.expand`) where the model runs."""
    import torch

    return torch.from_numpy(image_pixels_array(data, limits, **options))


def image_pixels_array(
    data: bytes, limits: Limits = DEFAULT_LIMITS, **options: object
) -> np.ndarray:
    """`image_pixels_from_bytes` as a numpy array (the same bytes), without importing torch."""
    cfg = replace_config(IMAGE, options, "vision")
    return _pixels(_decode_rgb(data, limits), cfg)


def expand_pixels(x: torch.Tensor, **options: object) -> torch.Tensor:
    """Compact still-image input (uint8) -> model input, with the same `options` as its
    preprocessing (a different `mean`/`std` must be given to both)."""
    import torch

    if x.dtype != torch.uint8:
        raise ValueError(f"expected compact uint8 pixels, got {x.dtype}")
    return normalize_pixels(x, replace_config(IMAGE, options, "vision"))


def image_from_bytes(
    data: bytes, limits: Limits = DEFAULT_LIMITS, **options: object
) -> torch.Tensor:
    """`preprocess("vision", data)`: decode + preprocess one still image (the decoded PIL image
    goes straight to the resize, without a round trip through an array)."""
    cfg = replace_config(IMAGE, options, "vision")
    return _to_model_input(_decode_rgb(data, limits), cfg)
