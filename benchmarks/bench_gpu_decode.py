"""Device JPEG decode (`preprocess.decode: {vision: gpu}`) against the exact CPU path.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_gpu_decode.py                 # tiny, base
    PYTHONPATH=. .venv/bin/python benchmarks/bench_gpu_decode.py --presets huge  # slow on CPU
    PYTHONPATH=. .venv/bin/python benchmarks/bench_gpu_decode.py --device cuda   # nvJPEG

Real photographs: the colour photos scikit-image ships offline in `skimage.data` (astronaut,
coffee, chelsea, rocket, hubble_deep_field, immunohistochemistry, retina, the two motorcycle
stereo views), each as a JPEG (the three shipped as JPEG keep their own bytes; the PNGs are
encoded at quality 90) at its own size and resized so the long side is 512 and 1024 (an
img2dataset-like size and a larger one). For each: the compact pixels of both paths (max and
mean absolute difference in grey levels) and the embeddings of both (cosine similarity; mean
and minimum) for every preset asked. Random weights (no checkpoint is reachable offline): the
similarities describe how the model's input changes, measured through an untrained encoder.

Then decode throughput on one CPU thread, process CPU time: the exact CPU path
(`preprocess("vision", data, compact=True)`: Pillow decode + uint8 bicubic + crop), and the
device path run on the CPU (`decode_jpegs(batch, "cpu")`: torchvision's libjpeg-turbo decode +
float32 bicubic + crop), batches of 64 photos of the 512 size.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import media

import imagebind_core as ibc
from imagebind_core.preprocess.jpeg import decode_jpegs, device_decodable


def compare(items: dict[str, bytes], presets: list[str], device: str) -> None:
    names = list(items)
    datas = [items[n] for n in names]
    assert all(device_decodable(d) for d in datas)
    cpu = torch.stack([ibc.preprocess("vision", d, compact=True) for d in datas])
    res = decode_jpegs(datas, device)
    assert res.rows == list(range(len(datas))) and not res.fallbacks, res
    dev = res.pixels.cpu()
    diff = (dev.int() - cpu.int()).abs()
    print(f"{len(datas)} photos, decoded on {device}")
    print(
        f"pixels: max |diff| {diff.max().item()} grey levels, mean {diff.float().mean():.3f}; "
        f"per photo max {[int(d.max()) for d in diff]}"
    )
    for preset in presets:
        model = ibc.build_model(preset, ["vision"], device=device)
        with torch.inference_mode():
            a = torch.cat(
                [
                    model.encode("vision", ibc.expand("vision", cpu[i : i + 8], device))
                    for i in range(0, len(datas), 8)
                ]
            )
            b = torch.cat(
                [
                    model.encode("vision", ibc.expand("vision", res.pixels[i : i + 8], device))
                    for i in range(0, len(datas), 8)
                ]
            )
        cos = torch.nn.functional.cosine_similarity(a.double(), b.double()).cpu().numpy()
        worst = names[int(cos.argmin())]
        print(
            f"{preset:6s} cosine(device decode, CPU path): mean {cos.mean():.7f}, "
            f"min {cos.min():.7f} ({worst}); 1 - cosine max {1 - cos.min():.2e}"
        )
        del model


def throughput(items: dict[str, bytes], budget: float) -> None:
    torch.set_num_threads(1)
    base = [d for n, d in items.items() if n.endswith("@512")]
    batch = (base * (64 // len(base) + 1))[:64]

    def cpu_path() -> None:
        for d in batch:
            ibc.preprocess("vision", d, compact=True)

    def device_path() -> None:
        decode_jpegs(batch, "cpu")

    for name, fn in (("CPU path (Pillow)", cpu_path), ("device path on CPU", device_path)):
        fn()
        best = 0.0
        end = time.perf_counter() + budget
        while time.perf_counter() < end:
            t = time.process_time()
            fn()
            best = max(best, len(batch) / (time.process_time() - t))
        print(f"{name:20s} {best:8.1f} images/s (one thread, process CPU time)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", nargs="*", default=["tiny", "base"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--budget", type=float, default=5.0, help="seconds per throughput side")
    args = p.parse_args()
    torch.manual_seed(0)
    items = media.photo_jpegs(long_sides=(512, 1024))
    compare(items, args.presets, args.device)
    throughput(items, args.budget)


if __name__ == "__main__":
    main()
