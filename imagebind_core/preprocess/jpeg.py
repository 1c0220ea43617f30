"""Still images decoded where the model runs: JPEG bytes -> uint8 (3, 224, 224) on its device.

The opt-in alternative to the exact CPU path (`image_pixels_from_bytes`), used by the offline
job's `preprocess.decode: {vision: gpu}`:

- `device_decodable` (preprocessing, CPU): reads only the header (Pillow, no pixels) and checks
  it against the same `Limits` as the CPU path. 8-bit three-component JPEGs go on as bytes;
  everything else (PNG and the other formats, CMYK/YCCK and grey JPEGs, MPO) takes the exact
  CPU path there and then.
- `decode_jpegs` (encoder, its device): one `torchvision.io.decode_jpeg(list, device=...)` call
  for the batch (nvJPEG on CUDA, libjpeg-turbo on the CPU), then per group of equal sizes the
  short-side resize (bicubic, antialiased, in float32), the centre crop and the rounding back to
  uint8 on the device; `imagebind_core.expand` normalises as for the CPU path. An item the
  device decoder refuses falls back to the exact CPU path, alone; one that fails that too is
  returned with the CPU path's `InvalidInput`.

Not bit-exact: Pillow's bicubic rounds to uint8 between its horizontal and vertical passes and
nvJPEG's IDCT and chroma upsampling differ from libjpeg-turbo's by a grey level here and there.
The pixels stay within a few grey levels of the CPU path and the embeddings within the cosine
similarities in benchmarks/results/gpu-decode-cpu.md (docs/preprocessing.md).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from imagebind_core.errors import InvalidInput
from imagebind_core.preprocess.common import DEFAULT_LIMITS, Limits, as_bytes, replace_config
from imagebind_core.preprocess.image import (
    IMAGE,
    image_pixels_from_bytes,
    open_image,
    resized_size,
)

logger = logging.getLogger(__name__)

JPEG_MAGIC = b"\xff\xd8\xff"  # start-of-image marker + the next marker's prefix
JPEG_END = b"\xff\xd9"  # end-of-image marker


def device_decodable(data: Any, limits: Limits = DEFAULT_LIMITS) -> bool:
    """Whether `data` can be decoded by `decode_jpegs` on the model's device: an 8-bit
    three-component (YCbCr or RGB) JPEG that ends with its end-of-image marker and whose
    declared size is within `limits`.

    Reads the header only (tens of microseconds). False for anything else the CPU path may
    decode; raises `InvalidInput` for what the CPU path refuses whatever its format (empty,
    over `max_bytes`, a declared size over `max_pixels` or `max_aspect_ratio`, not an image).
    """
    data = as_bytes("vision", data, limits)
    if not data.startswith(JPEG_MAGIC):
        return False
    if data.rfind(JPEG_END, max(0, len(data) - 64)) < 0:
        # No end-of-image marker at the end: a truncated file (or one with a long trailer).
        # The CPU path gives its verdict, whatever the device decoder would make of it.
        return False
    im = open_image("vision", data, limits)  # header only: limits checked, no pixels decoded
    # Pillow opens 12-bit JPEGs as "I;16"/refuses them, CMYK/YCCK as "CMYK", grey as "L";
    # MPO (camera multi-picture files) are left to the CPU path's first-frame rule.
    return im.format == "JPEG" and im.mode == "RGB"


@dataclass
class DecodedBatch:
    """`decode_jpegs`' result.

    Attributes:
        pixels: (len(rows), 3, size, size) uint8 on the device, in `rows` order.
        rows: indices into the input of the items decoded (on the device or by the fallback).
        errors: index -> the CPU path's `InvalidInput` for items neither path decodes.
        fallbacks: indices the device refused that the exact CPU path decoded.
    """

    pixels: torch.Tensor
    rows: list[int]
    errors: dict[int, InvalidInput] = field(default_factory=dict)
    fallbacks: list[int] = field(default_factory=list)


def _as_tensor(data: Any) -> torch.Tensor:
    a = np.frombuffer(data, np.uint8)
    with warnings.catch_warnings():
        # Read-only bytes: decode_jpeg never writes its input.
        warnings.filterwarnings("ignore", "The given NumPy array is not writable")
        return torch.from_numpy(a)


def _decode_on_device(
    tensors: list[torch.Tensor], device: torch.device
) -> list[torch.Tensor | None]:
    """(3, H, W) uint8 per item on `device`, None where the decoder refuses the item."""
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        out = decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device)
        return list(out)
    except Exception as e:  # one bad item fails the batched call: isolate it
        logger.debug("batched JPEG decode failed (%s); decoding one by one", e)
    res: list[torch.Tensor | None] = []
    for t in tensors:
        try:
            res.append(decode_jpeg(t, mode=ImageReadMode.RGB, device=device))
        except Exception:
            res.append(None)
    return res


def resize_crop_batch(images: Sequence[torch.Tensor], size: int) -> torch.Tensor:
    """(3, H, W) uint8 images (any sizes, one device) -> (B, 3, size, size) uint8: the CPU
    path's short-side resize and centre crop (`resize_center_crop`) in float32 on the
    images' device, bicubic with antialiasing (Pillow's filter on downscale), rounded to uint8.
    Images of one size are resized in one call."""
    import torch.nn.functional as F

    device = images[0].device
    out = torch.empty((len(images), 3, size, size), dtype=torch.uint8, device=device)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, im in enumerate(images):
        groups.setdefault((int(im.shape[1]), int(im.shape[2])), []).append(i)
    for (h, w), idx in groups.items():
        x = torch.stack([images[i] for i in idx])
        nw, nh = resized_size(w, h, size)
        if (nw, nh) != (w, h):
            x = F.interpolate(
                x.float(), size=(nh, nw), mode="bicubic", align_corners=False, antialias=True
            )
            x = x.round_().clamp_(0, 255)
        top = round((nh - size) / 2.0)
        left = round((nw - size) / 2.0)
        out[idx] = x[..., top : top + size, left : left + size].to(torch.uint8)
    return out


def decode_jpegs(
    datas: Sequence[Any],
    device: torch.device | str = "cpu",
    limits: Limits = DEFAULT_LIMITS,
    **options: Any,
) -> DecodedBatch:
    """Decode, resize and crop a batch of JPEG files on `device` into compact pixels.

    Args:
        datas: the encoded files (bytes, memoryview or uint8 arrays), normally those for which
            `device_decodable` said True.
        device: where to decode and resize ("cuda": nvJPEG; "cpu": libjpeg-turbo).
        limits, options: as for `preprocess("vision", ...)` (the fallback uses them; `size`
            sets the crop).

    Returns:
        A `DecodedBatch`; finish its pixels with `imagebind_core.expand("vision", ...)`.
    """
    cfg = replace_config(IMAGE, options, "vision")
    dev = torch.device(device)
    out = DecodedBatch(torch.empty((0, 3, cfg.size, cfg.size), dtype=torch.uint8, device=dev), [])
    if not datas:
        return out
    with torch.inference_mode():
        decoded = _decode_on_device([_as_tensor(d) for d in datas], dev)
        out.rows = [i for i, im in enumerate(decoded) if im is not None]
        parts = [resize_crop_batch([decoded[i] for i in out.rows], cfg.size)] if out.rows else []
        for i in [i for i, im in enumerate(decoded) if im is None]:
            # The device decoder refused it (a JPEG variant nvJPEG lacks, or a corrupt file):
            # the exact CPU path decides, with its own reason if it fails too.
            try:
                px = image_pixels_from_bytes(bytes(datas[i]), limits, **options)
            except InvalidInput as e:
                out.errors[i] = e
                continue
            parts.append(px[None].to(dev))
            out.rows.append(i)
            out.fallbacks.append(i)
        if parts:
            out.pixels = torch.cat(parts) if len(parts) > 1 else parts[0]
    return out


__all__ = [
    "JPEG_MAGIC",
    "DecodedBatch",
    "decode_jpegs",
    "device_decodable",
    "resize_crop_batch",
]
