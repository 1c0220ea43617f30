"""CUDA checks: the same inputs give the same embeddings on a GPU as on the CPU.

Marker `gpu`; skipped where no CUDA device is visible, so CI (CPU only) never runs them. Run
on a GPU machine with `python -m pytest -m gpu tests/test_gpu.py`. Parity with the reference
itself is proven on the CPU (tests/test_model_parity.py, never skipped); these tests carry it
to the GPU: float32 on CUDA against float32 on the CPU, and the low-precision dtypes against
float32 on CUDA, for every modality, from real decoded media.
"""

from __future__ import annotations

import media
import pytest
import torch
import torch.nn.functional as F

import imagebind_core as ibc

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

MODALITIES = ("vision", "text", "audio", "depth", "thermal", "imu")


@pytest.fixture(scope="module")
def batches() -> dict[str, torch.Tensor]:
    """Each encoder's input, decoded and preprocessed from generated media (video too)."""
    items = {
        "vision": [media.make_image("JPEG", (640, 480), seed=s) for s in range(3)],
        "video": [media.make_video(2, 10, (320, 240))],
        "text": ["a dog on a beach", "", "<|endoftext|> twice <|endoftext|>"],
        "audio": [media.make_flac(3.0, 44100, 2), media.make_mp3(1.0, 16000, 1)],
        "depth": [media.make_depth_png((320, 240))],
        "thermal": [media.make_gray_png((320, 240))],
        "imu": [media.make_imu_npy(2000)],
    }
    return {k: torch.stack([ibc.preprocess(k, v) for v in vs]) for k, vs in items.items()}


def encoder_of(kind: str) -> str:
    return "vision" if kind == "video" else kind


@pytest.fixture(scope="module")
def cpu_model():
    return ibc.build_model("tiny", MODALITIES, device="cpu")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@torch.inference_mode()
def test_cuda_float32_matches_cpu(batches, cpu_model):
    torch.backends.cudnn.allow_tf32 = False  # the conv stems: full float32, as on the CPU
    try:
        gpu = ibc.build_model("tiny", MODALITIES, device="cuda")
        for kind, x in batches.items():
            want = cpu_model.encode(encoder_of(kind), x)
            got = gpu.encode(encoder_of(kind), x.cuda()).cpu()
            assert got.dtype == torch.float32 and got.shape == want.shape
            assert rel_err(got, want) < 1e-4, kind
    finally:
        torch.backends.cudnn.allow_tf32 = True


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@torch.inference_mode()
def test_low_precision_close_to_float32(batches, dtype):
    full = ibc.load_model(None, preset="tiny", device="cuda")
    low = ibc.load_model(None, preset="tiny", device="cuda", dtype=dtype)
    assert low.dtype == getattr(torch, dtype) and low.lineage()["dtype"] == dtype
    for kind, x in batches.items():
        want = full.encode(encoder_of(kind), x, normalize=True)
        got = low.encode(encoder_of(kind), x, normalize=True)  # host tensor in, cast on device
        assert got.dtype == torch.float32 and torch.isfinite(got).all(), kind
        assert F.cosine_similarity(got, want).min().item() > 0.999, kind


@torch.inference_mode()
def test_auto_device_is_cuda_and_compile_agrees(batches):
    model = ibc.load_model(None, preset="tiny", modalities=["vision"], device="auto")
    assert model.device.type == "cuda"
    x = batches["vision"]
    eager = model.encode("vision", x)
    model.compile()
    compiled = model.encode("vision", x)
    assert rel_err(compiled, eager) < 1e-3


def test_compact_images_expand_on_cuda_to_the_same_input():
    """The job and the app expand compact image pixels on the encoder's device."""
    data = media.make_image("JPEG", (640, 480), seed=5)
    compact = ibc.preprocess("vision", data, compact=True)
    got = ibc.expand("vision", compact, "cuda")
    assert got.is_cuda and torch.equal(got.cpu(), ibc.preprocess("vision", data))


def test_runner_on_cuda_pins_overlaps_and_matches_the_cpu():
    """The shared runner's CUDA path: pinned copies on a side stream, the next batch's copy in
    flight while one computes, compact pixels expanded on the device — the CPU's vectors."""
    import numpy as np

    data = [media.make_image("JPEG", (640, 480), seed=s) for s in range(4)]
    compact = np.stack([ibc.preprocess("vision", d, compact=True).numpy() for d in data])
    cpu = ibc.EncoderRunner(ibc.ModelSpec(preset="tiny", device="cpu"), "vision")
    gpu = ibc.EncoderRunner(ibc.ModelSpec(preset="tiny", device="cuda"), "vision", background=True)
    staged = gpu.stage("vision", compact)
    assert staged.x.is_cuda and staged.host.is_pinned() and staged.event is not None
    torch.backends.cudnn.allow_tf32 = False
    try:
        want = cpu.encode("vision", compact)
        got = gpu.finish(staged)
        assert np.abs(got - want).max() < 1e-4
        outs = list(gpu.encode_all([("vision", compact[:2]), ("vision", compact[2:])]))
        assert np.abs(np.concatenate(outs) - want).max() < 1e-4
        # A batch in pieces (the views of two received blocks) is copied piece by piece
        # into one pinned buffer: the bytes of the joined batch, the same vectors.
        parts = ibc.RowParts([compact[:1], compact[1:3], compact[3:]])
        staged = gpu.stage("vision", parts)
        assert staged.host.is_pinned() and torch.equal(staged.host, torch.from_numpy(compact))
        assert np.abs(gpu.finish(staged) - gpu.encode("vision", compact)).max() <= 1e-6
        text = ibc.collate([ibc.preprocess("text", t) for t in ["a dog", "a cat"]]).numpy()
        t_cpu = ibc.EncoderRunner(ibc.ModelSpec(preset="tiny", device="cpu"), "text")
        t_gpu = ibc.EncoderRunner(ibc.ModelSpec(preset="tiny", device="cuda"), "text")
        x32 = text.astype("int32")  # the job's transport form
        assert np.abs(t_gpu.encode("text", x32) - t_cpu.encode("text", text)).max() < 1e-4
    finally:
        torch.backends.cudnn.allow_tf32 = True


def test_nvjpeg_decode_is_close_to_the_cpu_path_and_falls_back_per_item():
    """`preprocess.decode: {vision: gpu}` on CUDA: nvJPEG + resize on the device against the
    exact CPU path on real photos; the issue's target (cosine >= 0.999 mean) on the base
    preset. A corrupt JPEG gets the CPU path's error, the others decode in the batch."""
    from imagebind_core.preprocess.jpeg import decode_jpegs

    photos = list(media.photo_jpegs(long_sides=(512,)).values())
    res = decode_jpegs([*photos, media.corrupt_jpeg()], "cuda")
    assert res.pixels.device.type == "cuda" and res.rows == list(range(len(photos)))
    assert list(res.errors) == [len(photos)] and "cannot decode" in res.errors[len(photos)].reason
    cpu = torch.stack([ibc.preprocess("vision", d, compact=True) for d in photos]).cuda()
    diff = (res.pixels.int() - cpu.int()).abs().float()
    print(f"nvJPEG pixels vs CPU path: max {diff.max().item():.0f}, mean {diff.mean():.3f}")
    model = ibc.build_model("base", ["vision"], device="cuda")
    with torch.inference_mode():
        a = model.encode("vision", ibc.expand("vision", cpu))
        b = model.encode("vision", ibc.expand("vision", res.pixels))
    cos = F.cosine_similarity(a.double(), b.double())
    print(f"cosine: mean {cos.mean():.7f}, min {cos.min():.7f}")
    assert cos.mean() >= 0.999
