"""Write the small demo corpus that `make demo` embeds: `python -m pipelines.demo_corpus DIR`.

Deterministic (same bytes on every call, so a rerun of the demo finds nothing new to do) and
generated rather than stored, so that no media binaries live in git: a few PNG/JPEG pictures,
captions as .txt files and a WAV tone (three kinds: three encoder pools, a light demo). Files
whose content is unchanged are not rewritten (their mtimes, hence fingerprints, stay put).
"""

from __future__ import annotations

import argparse
import io
import os
import sys

import numpy as np

CAPTIONS = {
    "captions/sunrise.txt": "a sunrise over a calm sea",
    "captions/dog.txt": "a dog running on the beach",
    "captions/city.txt": "a city street at night with neon lights",
    "captions/forest.txt": "a quiet forest path in autumn",
}


def _picture(seed: int, size: tuple[int, int] = (256, 192)) -> np.ndarray:
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    r = 127.5 + 127.5 * np.sin(xx / (9.0 + seed) + seed)
    g = 255.0 * yy / (h - 1)
    b = 127.5 + 127.5 * np.cos((xx + yy) / (13.0 + 2 * seed))
    disc = (xx - w * (0.3 + 0.1 * seed)) ** 2 + (yy - h / 2) ** 2 < (h / 4) ** 2
    img = np.stack([r, g, b], -1)
    img[disc] = 255 - img[disc]
    return img.clip(0, 255).astype(np.uint8)


def _encode_image(arr: np.ndarray, fmt: str) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _wav(seconds: float = 2.0, sr: int = 16000, freq: float = 440.0) -> bytes:
    import soundfile as sf

    t = np.arange(int(seconds * sr)) / sr
    x = 0.4 * np.sin(2 * np.pi * freq * t) + 0.1 * np.sin(2 * np.pi * 3 * freq * t)
    buf = io.BytesIO()
    sf.write(buf, x.astype(np.float32), sr, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def demo_files() -> dict[str, bytes]:
    """Relative path -> bytes of every demo file."""
    files = {
        "images/sunrise.png": _encode_image(_picture(0), "PNG"),
        "images/dog.jpg": _encode_image(_picture(1), "JPEG"),
        "images/city.png": _encode_image(_picture(2), "PNG"),
        "images/forest.jpg": _encode_image(_picture(3), "JPEG"),
        "audio/tone.wav": _wav(),
    }
    files.update({k: v.encode() for k, v in CAPTIONS.items()})
    return files


def write_demo_corpus(root: str) -> list[str]:
    """Write the demo corpus under `root`; returns the paths written or found up to date."""
    out = []
    for rel, data in sorted(demo_files().items()):
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            with open(path, "rb") as f:
                same = f.read() == data
        except FileNotFoundError:
            same = False
        if not same:
            with open(path, "wb") as f:
                f.write(data)
        out.append(path)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("root", nargs="?", default="demo-output/corpus")
    args = p.parse_args(argv)
    paths = write_demo_corpus(args.root)
    print(f"demo corpus: {len(paths)} files under {args.root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
