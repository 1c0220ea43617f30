"""Depth, thermal and IMU recipes (no reference loader exists): formats agree with each other,
the documented arithmetic holds, policies behave as documented, bad arrays are refused."""

from __future__ import annotations

import io

import media
import numpy as np
import pytest
import torch
from PIL import Image

import imagebind_core.preprocess as P
from imagebind_core.errors import InvalidInput


def test_depth_png_and_npy_agree_and_follow_the_recipe() -> None:
    png = P.preprocess("depth", media.make_depth_png(bits=16))
    npy_m = P.preprocess("depth", media.make_depth_npy(metres=True))
    npy_mm = P.preprocess("depth", media.make_depth_npy(metres=False))
    assert png.shape == (1, 224, 224) and png.dtype == torch.float32
    assert torch.equal(png, npy_mm)
    assert (png - npy_m).abs().max() < 1e-3  # mm->m in float32 vs exact
    # The recipe by hand on a constant 2 m map: 0.075 * 518.857901 / 2 = 19.457 px disparity.
    flat = np.full((300, 400), 2000, np.uint16)
    x = P.preprocess_depth(flat)
    expect = (min(0.075 * 518.857901 / 2.0, 75.0) / 75.0 - 0.0418) / 0.0295
    assert torch.allclose(x, torch.full_like(x, expect), atol=1e-4)
    # holes (0) become disparity 0, never Inf
    holes = flat.copy()
    holes[:, :200] = 0
    assert torch.isfinite(P.preprocess_depth(holes)).all()


def test_depth_disparity_input_and_geometry() -> None:
    disp = np.tile(np.linspace(0, 80, 640, dtype=np.float32), (480, 1))
    x = P.preprocess_depth(disp, P.DepthConfig(input="disparity", mean=0.0, std=1.0))
    # landscape 640x480 -> 298x224, centre crop at x=37: column j holds clip(disp)/75
    cols = np.clip(np.linspace(0, 80, 298), 0, 75) / 75
    assert abs(float(x[0, 112, 100]) - cols[37 + 100]) < 0.01
    assert float(x.max()) <= 1.0 + 1e-6
    with pytest.raises(TypeError, match="unknown depth preprocessing option"):
        P.preprocess("depth", media.make_depth_png(), units="mm")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_depth_nan_inf_refused(bad) -> None:
    arr = np.ones((100, 100), np.float32)
    arr[5, 5] = bad
    with pytest.raises(InvalidInput, match="NaN or Inf"):
        P.preprocess("depth", media.make_npy(arr))


def test_depth_wrong_shapes_and_pickles_refused() -> None:
    with pytest.raises(InvalidInput, match="2-D"):
        P.preprocess("depth", media.make_npy(np.ones((3, 10, 10), np.float32)))
    with pytest.raises(InvalidInput, match="single-channel"):
        P.preprocess("depth", media.make_image("PNG", (64, 64), "RGB"))
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(InvalidInput, match="expected a real numeric array, got dtype object"):
        P.preprocess("depth", buf.getvalue())


def test_thermal_8_and_16_bit() -> None:
    t8 = P.preprocess("thermal", media.make_gray_png(bits=8))
    t16 = P.preprocess("thermal", media.make_gray_png(bits=16))
    assert t8.shape == t16.shape == (1, 224, 224)
    assert float(t16.min()) >= 0.0 and float(t16.max()) <= 1.0
    assert (t8 - t16).abs().mean() < 0.02  # same scene, per-frame stretch ~= 8-bit rendering
    # 3-channel grey JPEG (how LLVIP stores thermal frames) is accepted as grey
    grey = np.asarray(Image.open(io.BytesIO(media.make_gray_png(bits=8))))
    buf = io.BytesIO()
    Image.fromarray(np.dstack([grey] * 3)).save(buf, "PNG")
    assert torch.allclose(P.preprocess("thermal", buf.getvalue()), t8, atol=1e-6)
    full = P.preprocess("thermal", media.make_gray_png(bits=16), sixteen_bit="full_range")
    assert float(full.max()) <= 1.0 and not torch.equal(full, t16)


def test_a_float_thermal_map_must_already_be_in_the_unit_range() -> None:
    rng = np.random.default_rng(1)
    unit = rng.random((40, 30), dtype=np.float32)
    unit[0, 0], unit[0, 1] = 0.0, 1.0  # the bounds themselves are in range
    buf = io.BytesIO()
    np.save(buf, unit)
    assert P.preprocess("thermal", buf.getvalue()).shape == (1, 224, 224)
    for bad, span in ((unit * 300.0 + 250.0, "250 to 550"), (unit - 0.5, "-0.5 to 0.5")):
        buf = io.BytesIO()
        np.save(buf, bad.astype(np.float64))
        with pytest.raises(InvalidInput, match=f"must lie in \\[0, 1\\] \\(these span {span}\\)"):
            P.preprocess("thermal", buf.getvalue())
    # Integer maps are scaled as before, whatever their range.
    assert P.preprocess_thermal((unit * 30000).astype(np.uint16)).shape == (1, 224, 224)


def test_large_maps_are_converted_in_row_blocks_with_the_same_numbers() -> None:
    # 1500 x 1200: the float64 maths runs over two row blocks (~1 M pixels each); the result
    # must be the whole-array float64 computation cast once to float32, exactly.
    rng = np.random.default_rng(0)
    depth = rng.integers(0, 9000, size=(1500, 1200)).astype(np.uint16)
    depth[:10] = 0  # holes in the first block
    x = depth.astype(np.float64) * 0.001
    disp = np.zeros_like(x)
    disp[x > 0] = 0.075 * 518.857901 / x[x > 0]
    want = np.clip(disp, 0.0, 75.0) / 75.0
    got = P.preprocess_depth(depth, P.DepthConfig(mean=0.0, std=1.0))
    ref = P.depth._resize_crop_float(want.astype(np.float32), 224)
    assert torch.equal(got, ref)

    therm = rng.integers(100, 30000, size=(1500, 1200)).astype(np.uint16)
    lo, hi = float(therm.min()), float(therm.max())
    unit = ((therm.astype(np.float64) - lo) / (hi - lo)).astype(np.float32)
    got = P.preprocess_thermal(therm)
    assert torch.equal(got, P.depth._resize_crop_float(unit, 224))


def test_imu_formats_agree() -> None:
    ref = torch.from_numpy(media.imu_array(2000).T.copy())
    for data in (
        media.make_imu_npy(),
        media.make_imu_npy(channels_first=True),
        media.make_imu_csv(),
        media.make_imu_csv(header=False),
        media.make_imu_csv(timestamp=True),
        media.make_imu_json(),
        media.make_imu_json(channels_first=True),
        b'{"imu": ' + media.make_imu_json() + b"}",
    ):
        x = P.preprocess("imu", data)
        assert x.shape == (6, 2000) and x.dtype == torch.float32
        assert torch.allclose(x, ref, atol=1e-6)


def test_imu_length_policies() -> None:
    short = media.imu_array(500)
    x = P.preprocess("imu", media.make_npy(short))
    assert torch.equal(x[:, :500], torch.from_numpy(short.T.copy()))
    assert torch.equal(x[:, 1999], x[:, 499])  # padded with the last sample
    long = media.imu_array(3000)
    assert torch.equal(
        P.preprocess("imu", media.make_npy(long)), torch.from_numpy(long[:2000].T.copy())
    )
    r = P.preprocess("imu", media.make_npy(long), length_policy="resample")
    assert torch.allclose(r[:, 0], torch.from_numpy(long[0])) and torch.allclose(
        r[:, -1], torch.from_numpy(long[-1])
    )
    lin = np.stack([np.linspace(0, 1, 4000)] * 6, 1)
    assert torch.allclose(
        P.preprocess("imu", media.make_npy(lin), length_policy="resample")[0],
        torch.linspace(0, 1, 2000, dtype=torch.float64).float(),
        atol=1e-6,
    )


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (media.make_npy(np.ones((2000, 5), np.float32)), "expected a \\(6, T\\)"),
        (media.make_npy(np.ones((2, 6, 100), np.float32)), "expected a \\(6, T\\)"),
        (media.make_npy(np.full((2000, 6), np.nan, np.float32)), "NaN or Inf"),
        (b"1,2,3,4,5,inf\n" * 10, "NaN or Inf"),
        (b"1,2,3,4,5,x\n" * 10, "non-numeric"),
        (b"[[1,2,3],[4,5]]", "rectangular|cannot decode"),
        (b"\xff\xfe\x00garbage", "not a .npy array and not UTF-8"),
        (media.make_npy(np.ones((0, 6), np.float32)), "no samples"),
    ],
)
def test_bad_imu_refused(data, reason) -> None:
    with pytest.raises(InvalidInput, match=reason):
        P.preprocess("imu", data, item_id="imu-1")


def test_imu_sample_limit() -> None:
    with pytest.raises(InvalidInput, match="over the limit of 1000"):
        P.preprocess("imu", media.make_imu_npy(2000), limits=P.Limits(max_imu_samples=1000))
