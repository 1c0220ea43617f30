"""Still images: parity with the reference loader on lossless inputs; formats; limits; errors."""

from __future__ import annotations

import time

import media
import numpy as np
import pytest
import torch
from numerics import assert_inputs_close
from reference_data_shim import reference_data

import imagebind_core.preprocess as P
from imagebind_core.errors import InvalidInput


def reference_image(tmp_path, data: bytes) -> torch.Tensor:
    path = tmp_path / "img"
    path.write_bytes(data)
    return reference_data().load_and_transform_vision_data([str(path)], "cpu")[0]


@pytest.mark.parametrize(
    ("fmt", "size", "mode"),
    [
        ("PNG", (320, 240), "RGB"),  # landscape downscale
        ("PNG", (240, 417), "RGBA"),  # portrait, alpha dropped
        ("PNG", (224, 224), "L"),  # exact size: no resize
        ("PNG", (225, 300), "P"),  # palette, odd crop offset (round half even)
        ("PNG", (150, 97), "I;16"),  # 16-bit grey, upscale
        ("WEBP", (301, 199), "RGB"),  # lossless WebP
        ("BMP", (500, 223), "RGB"),
        ("GIF", (260, 260), "P"),
        ("TIFF", (333, 250), "RGB"),
        ("PNG", (1000, 227), "LA"),  # wide panorama
    ],
)
def test_parity_with_reference(tmp_path, fmt: str, size: tuple[int, int], mode: str) -> None:
    data = media.make_image(fmt, size, mode, seed=size[0] % 7)
    ours = P.preprocess("vision", data)
    ref = reference_image(tmp_path, data)
    assert ours.shape == (3, 224, 224) and ours.dtype == torch.float32
    assert_inputs_close(ours, ref)
    # The compact form the offline job moves between processes expands to the same bits.
    compact = P.preprocess("vision", data, compact=True)
    assert compact.shape == (3, 224, 224) and compact.dtype == torch.uint8
    assert torch.equal(P.expand("vision", compact), ours)
    # The job's call (numpy, no torch): the same bytes.
    array = P.preprocess_array("vision", data)
    assert isinstance(array, np.ndarray) and array.flags.c_contiguous
    assert np.array_equal(array, compact.numpy()) and array.dtype == np.uint8


def test_compact_inputs_batches_options_and_other_kinds() -> None:
    datas = [media.make_image("JPEG", (640 + 37 * i, 480), "RGB", seed=i) for i in range(3)]
    full = torch.stack([P.preprocess("vision", d) for d in datas])
    compact = P.collate([P.preprocess("vision", d, compact=True) for d in datas])
    assert compact.element_size() * compact.nelement() * 4 == full.element_size() * full.nelement()
    assert torch.equal(P.expand("vision", compact), full)  # a batch expands in one call
    assert P.expand("vision", full) is full  # already full: unchanged
    # Options that change the arithmetic must be given to both sides.
    opts = {"mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}
    want = P.preprocess("vision", datas[0], **opts)
    assert torch.equal(
        P.expand("vision", P.preprocess("vision", datas[0], compact=True), **opts), want
    )
    assert not torch.equal(want, full[0])
    # Kinds without a smaller exact form come back as `preprocess` returns them.
    for kind, data in [("text", "a dog"), ("imu", media.make_imu_npy(2000))]:
        x = P.preprocess(kind, data, compact=True)
        assert torch.equal(x, P.preprocess(kind, data)) and P.expand(kind, x) is x
    with pytest.raises(InvalidInput, match="not a supported image"):
        P.preprocess("vision", b"not an image", compact=True)
    # `preprocess_array`: the compact form as numpy, with the same options and errors.
    assert np.array_equal(
        P.preprocess_array("vision", datas[1], size=160),
        P.preprocess("vision", datas[1], compact=True, size=160).numpy(),
    )
    for kind, data in [("text", "a dog"), ("imu", media.make_imu_npy(2000))]:
        assert np.array_equal(P.preprocess_array(kind, data), P.preprocess(kind, data).numpy())
    with pytest.raises(InvalidInput, match=r"item 'x7'.*not a supported image"):
        P.preprocess_array("vision", b"not an image", item_id="x7")
    with pytest.raises(P.PreprocessOptionError):
        P.preprocess_array("vision", datas[0], colour="blue")


def test_jpeg_matches_reference_on_the_same_decoder(tmp_path) -> None:
    data = media.make_image("JPEG", (640, 360), "RGB", quality=90)
    assert_inputs_close(P.preprocess("vision", data), reference_image(tmp_path, data))


def test_decode_image_returns_rgb_and_does_not_touch_input() -> None:
    arr = P.decode_image(media.make_image("PNG", (50, 40), "RGBA"))
    assert arr.shape == (40, 50, 3) and arr.dtype == np.uint8
    before = arr.copy()
    P.preprocess_image(arr)
    assert np.array_equal(arr, before)


def test_gif_first_frame(tmp_path) -> None:
    from PIL import Image

    frames = [Image.fromarray(media.image_array((64, 64), s)).quantize(32) for s in (1, 2)]
    import io

    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    data = buf.getvalue()
    first = io.BytesIO()
    frames[0].save(first, "GIF")
    assert torch.equal(P.preprocess("vision", data), P.preprocess("vision", first.getvalue()))
    assert_inputs_close(P.preprocess("vision", data), reference_image(tmp_path, data))


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty"),
        (media.truncated(media.make_image("JPEG", (320, 240))), "cannot decode"),
        (media.truncated(media.make_image("PNG", (320, 240))), "cannot decode"),
        (media.random_bytes(5000), "not a supported image"),
        (media.png_declaring(30000, 30000), "over the pixel limit"),
        (media.png_declaring(12000, 12000), "144000000 pixels is over the limit"),
        (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", "not a supported image"),
    ],
)
def test_bad_images_raise_invalid_input(data: bytes, reason: str) -> None:
    t = time.monotonic()
    with pytest.raises(InvalidInput, match=reason) as e:
        P.preprocess("vision", data, item_id="img-1")
    assert e.value.modality == "vision" and e.value.item_id == "img-1"
    assert time.monotonic() - t < 5


def test_limits_are_configurable() -> None:
    data = media.make_image("PNG", (300, 200))
    with pytest.raises(InvalidInput, match="60000 pixels is over the limit of 50000"):
        P.preprocess("vision", data, limits=P.Limits(max_pixels=50_000))
    with pytest.raises(InvalidInput, match="over the limit of 100 bytes"):
        P.preprocess("vision", data, limits=P.Limits(max_bytes=100))
