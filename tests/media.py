"""Generators of test media, shared by every test module: encoded bytes made on the fly.

Nothing here is downloaded or stored; every maker is deterministic for a given seed. Real
photographs come from the ones scikit-image ships in its wheel (`photo_jpegs`). Content is
made "interesting" (gradients, edges, noise, motion, a per-frame signature) so that a wrong
resize, crop, frame choice or channel order changes the numbers a test compares.
"""

from __future__ import annotations

import io
import json
import struct
import zlib
from fractions import Fraction

import numpy as np
import soundfile as sf
from PIL import Image

# ----------------------------------------------------------------------------- images


def image_array(size: tuple[int, int] = (320, 240), seed: int = 0) -> np.ndarray:
    """A (H, W, 3) uint8 picture of size (W, H): gradients, a disc, stripes and some noise."""
    w, h = size
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    r = 255 * xx / max(w - 1, 1)
    g = 255 * yy / max(h - 1, 1)
    b = 127.5 + 127.5 * np.sin(xx / 7.0 + seed) * np.cos(yy / 11.0)
    disc = (xx - w * 0.6) ** 2 + (yy - h * 0.4) ** 2 < (min(w, h) * 0.2) ** 2
    img = np.stack([r, g, b], axis=-1)
    img[disc] = (255 - img[disc]) * 0.8
    img[:, :: max(w // 16, 2)] = 0
    img += rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def make_image(
    fmt: str = "PNG",
    size: tuple[int, int] = (320, 240),
    mode: str = "RGB",
    seed: int = 0,
    **save: object,
) -> bytes:
    """Encode a test picture of `size` (W, H) in Pillow `mode` as `fmt` (PNG, JPEG, WEBP, BMP,
    GIF, TIFF). Modes: RGB, RGBA, L, LA, P, I;16 (16-bit grey), 1, CMYK."""
    rgb = image_array(size, seed)
    if mode == "RGB":
        im = Image.fromarray(rgb, "RGB")
    elif mode == "RGBA":
        alpha = np.linspace(0, 255, size[0], dtype=np.uint8)[None, :].repeat(size[1], 0)
        im = Image.fromarray(np.dstack([rgb, alpha]), "RGBA")
    elif mode == "I;16":
        grey = rgb.astype(np.uint16).sum(-1) * 85  # spans 0..65025
        im = Image.fromarray(grey.astype(np.uint16))
    elif mode == "P":
        im = Image.fromarray(rgb, "RGB").quantize(64)
    else:
        im = Image.fromarray(rgb, "RGB").convert(mode)
    buf = io.BytesIO()
    if fmt.upper() == "WEBP" and "lossless" not in save:
        save["lossless"] = True
    im.save(buf, format=fmt, **save)
    return buf.getvalue()


def make_gray_png(size: tuple[int, int] = (320, 240), bits: int = 16, seed: int = 0) -> bytes:
    """A single-channel 8- or 16-bit PNG with a smooth ramp plus detail (thermal-like)."""
    a = image_array(size, seed).astype(np.float64).mean(-1) / 255.0
    if bits == 16:
        arr = (a * 60000 + 2000).astype(np.uint16)
    else:
        arr = (a * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def depth_array_mm(size: tuple[int, int] = (320, 240), seed: int = 0) -> np.ndarray:
    """A (H, W) uint16 depth map in millimetres (0.5-8 m ramp with objects, a few 0 holes)."""
    w, h = size
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    depth = 500 + 7500 * (yy / max(h - 1, 1)) ** 2
    box = (abs(xx - w / 2) < w / 6) & (abs(yy - h / 2) < h / 5)
    depth[box] = 1200
    depth += rng.normal(0, 5, depth.shape)
    depth[rng.random(depth.shape) < 0.01] = 0  # sensor holes
    return np.clip(depth, 0, 65535).astype(np.uint16)


def make_depth_png(size: tuple[int, int] = (320, 240), bits: int = 16, seed: int = 0) -> bytes:
    """A depth PNG: 16-bit millimetres, or 8-bit (depth scaled into 0..255)."""
    d = depth_array_mm(size, seed)
    arr = d if bits == 16 else (d.astype(np.float64) / 8000 * 255).clip(0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def make_npy(arr: np.ndarray) -> bytes:
    """`arr` in .npy format."""
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def npy_declaring(shape: tuple[int, ...], dtype: str = "<f8", data: bytes = b"\0" * 40) -> bytes:
    """A .npy file whose header declares `shape` of `dtype` but holds only `data`."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": dtype, "fortran_order": False, "shape": shape}
    )
    return buf.getvalue() + data


def make_depth_npy(size: tuple[int, int] = (320, 240), seed: int = 0, metres: bool = True) -> bytes:
    """A float32 depth map in metres (or uint16 millimetres) as .npy."""
    d = depth_array_mm(size, seed)
    return make_npy(d.astype(np.float32) / 1000 if metres else d)


def png_declaring(width: int = 30000, height: int = 30000) -> bytes:
    """A tiny PNG whose header declares `width` x `height` pixels (a decompression bomb's
    header); its image data is only a few bytes."""

    def chunk(tag: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body))
            + tag
            + body
            + struct.pack(">I", zlib.crc32(tag + body) & 0xFFFFFFFF)
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


# ----------------------------------------------------------------------------- audio


def audio_array(
    seconds: float = 3.0, sr: int = 16000, channels: int = 1, seed: int = 0, dc: float = 0.05
) -> np.ndarray:
    """(samples, channels) float32 in [-1, 1]: chirp + tones + noise, different per channel,
    with a DC offset (which makes the reference's mean-subtraction quirk visible)."""
    n = max(round(seconds * sr), 1)
    rng = np.random.default_rng(seed)
    t = np.arange(n) / sr
    out = []
    for c in range(channels):
        f0 = 220.0 * (c + 1)
        chirp = np.sin(2 * np.pi * (f0 * t + 300 * t**2 / max(seconds, 1e-3)))
        tone = 0.3 * np.sin(2 * np.pi * (1000 + 370 * c) * t)
        env = 0.5 + 0.5 * np.sin(2 * np.pi * 0.7 * t + c)
        x = 0.45 * chirp * env + tone * 0.5 + 0.05 * rng.standard_normal(n) + dc * (1 + c)
        out.append(x)
    return np.clip(np.stack(out, axis=1), -1, 1).astype(np.float32)


def _sf_bytes(arr: np.ndarray, sr: int, fmt: str, subtype: str | None) -> bytes:
    buf = io.BytesIO()
    # In blocks: libsndfile 1.2.2's Vorbis encoder crashes on one minute of audio in one write.
    with sf.SoundFile(buf, "w", sr, arr.shape[1], subtype, format=fmt) as f:
        for i in range(0, len(arr), 1 << 15):
            f.write(arr[i : i + (1 << 15)])
    return buf.getvalue()


def make_wav(
    seconds: float = 3.0,
    sr: int = 16000,
    channels: int = 1,
    seed: int = 0,
    subtype: str = "PCM_16",
    dc: float = 0.05,
) -> bytes:
    """A WAV file (PCM_16 by default; PCM_24, FLOAT, ... via `subtype`)."""
    return _sf_bytes(audio_array(seconds, sr, channels, seed, dc), sr, "WAV", subtype)


def make_flac(
    seconds: float = 3.0, sr: int = 16000, channels: int = 1, seed: int = 0, dc: float = 0.05
) -> bytes:
    """A 16-bit FLAC file."""
    return _sf_bytes(audio_array(seconds, sr, channels, seed, dc), sr, "FLAC", "PCM_16")


def make_ogg(seconds: float = 3.0, sr: int = 44100, channels: int = 2, seed: int = 0) -> bytes:
    """An Ogg/Vorbis file."""
    return _sf_bytes(audio_array(seconds, sr, channels, seed, 0.0), sr, "OGG", "VORBIS")


def _av_audio(arr: np.ndarray, sr: int, container: str, codec: str, bit_rate: int) -> bytes:
    import av

    buf = io.BytesIO()
    channels = arr.shape[1]
    with av.open(buf, "w", format=container) as out:
        st = out.add_stream(codec, rate=sr, layout="stereo" if channels == 2 else "mono")
        st.bit_rate = bit_rate
        fmt = st.codec_context.format.name  # the encoder's sample format, e.g. fltp / s16p
        planar = arr.T.copy()  # (channels, samples)
        step = 4096
        for i in range(0, planar.shape[1], step):
            chunk = planar[:, i : i + step]
            if fmt.startswith("s16"):
                data = (np.clip(chunk, -1, 1) * 32767).astype(np.int16)
            elif fmt.startswith("s32"):
                data = (np.clip(chunk, -1, 1) * 2147483647).astype(np.int32)
            else:
                data = chunk.astype(np.float32)
            if not fmt.endswith("p"):
                data = data.T.reshape(1, -1)
            frame = av.AudioFrame.from_ndarray(
                np.ascontiguousarray(data), format=fmt, layout=st.layout.name
            )
            frame.sample_rate = sr
            frame.pts = i
            frame.time_base = Fraction(1, sr)
            for p in st.encode(frame):
                out.mux(p)
        for p in st.encode(None):
            out.mux(p)
    return buf.getvalue()


def make_mp3(seconds: float = 3.0, sr: int = 44100, channels: int = 2, seed: int = 0) -> bytes:
    """An MP3 file (LAME through libsndfile)."""
    return _sf_bytes(audio_array(seconds, sr, channels, seed, 0.0), sr, "MP3", "MPEG_LAYER_III")


def make_m4a(seconds: float = 3.0, sr: int = 44100, channels: int = 2, seed: int = 0) -> bytes:
    """An M4A (AAC in MP4) file."""
    return _av_audio(audio_array(seconds, sr, channels, seed, 0.0), sr, "ipod", "aac", 192000)


# Opus codes at 8, 12, 16, 24 or 48 kHz only; other rates are taken at the next supported one.
OPUS_RATES = (8000, 12000, 16000, 24000, 48000)


def make_opus(seconds: float = 3.0, sr: int = 48000, channels: int = 2, seed: int = 0) -> bytes:
    """An Ogg/Opus file (libopus through libsndfile) at the lowest Opus rate >= `sr`."""
    rate = next((r for r in OPUS_RATES if r >= sr), 48000)
    return _sf_bytes(audio_array(seconds, rate, channels, seed, 0.0), rate, "OGG", "OPUS")


# codec -> (file extension, maker(seconds, sr, channels, seed) -> bytes)
AUDIO_CODECS = {
    "wav16": ("wav", lambda s, r, c, k: make_wav(s, r, c, k, "PCM_16", 0.0)),
    "wav24": ("wav", lambda s, r, c, k: make_wav(s, r, c, k, "PCM_24", 0.0)),
    "wavfloat": ("wav", lambda s, r, c, k: make_wav(s, r, c, k, "FLOAT", 0.0)),
    "flac": ("flac", lambda s, r, c, k: make_flac(s, r, c, k, 0.0)),
    "vorbis": ("ogg", make_ogg),
    "opus": ("opus", make_opus),
    "mp3": ("mp3", make_mp3),
    "m4a": ("m4a", make_m4a),
}


def wav_with_declared_length(
    declared_samples: int, seconds: float = 1.0, sr: int = 16000, channels: int = 1
) -> bytes:
    """A PCM_16 WAV whose header declares `declared_samples` frames while the body holds
    `seconds` of audio (a truncated or lying file)."""
    data = make_wav(seconds, sr, channels)
    pos = data.index(b"data")
    size = min(declared_samples * 2 * channels, 0xFFFFFFFE)
    riff = min(size + pos, 0xFFFFFFFE)
    body = bytearray(data)
    body[4:8] = struct.pack("<I", riff)
    body[pos + 4 : pos + 8] = struct.pack("<I", size)
    return bytes(body)


def wav_declaring_format(channels: int, sr: int = 16000) -> bytes:
    """A one-second mono PCM_16 WAV whose `fmt ` chunk is rewritten to declare `channels`
    channels at `sr` Hz (the samples stay as written)."""
    body = bytearray(make_wav(1.0, 16000, 1))
    at = body.index(b"fmt ") + 8
    body[at + 2 : at + 8] = struct.pack("<HI", channels, sr)
    return bytes(body)


# ----------------------------------------------------------------------------- video


def video_frame(i: int, size: tuple[int, int], fps: float) -> np.ndarray:
    """Frame `i` (H, W, 3) uint8: a gradient background, a square that moves with time and a
    frame-number-dependent tint, so a wrong frame index changes the numbers."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    t = i / fps
    bg = np.stack(
        [
            (xx * 255 // max(w - 1, 1)),
            (yy * 255 // max(h - 1, 1)),
            np.full_like(xx, (i * 37) % 256),
        ],
        axis=-1,
    ).astype(np.uint8)
    s = max(min(w, h) // 5, 4)
    x0 = int((w - s) * (0.5 + 0.5 * np.sin(1.3 * t)))
    y0 = int((h - s) * (0.5 + 0.5 * np.cos(0.9 * t)))
    bg[y0 : y0 + s, x0 : x0 + s] = (255, 255 - (i * 11) % 256, (i * 5) % 256)
    return bg


def make_video(
    seconds: float = 3.0,
    fps: int | Fraction = 15,
    size: tuple[int, int] = (320, 240),
    codec: str = "libx264",
    container: str = "mp4",
    gop: int | None = None,
    pix_fmt: str = "yuv420p",
    rotate: int | None = None,
    audio: bool = False,
    options: dict[str, str] | None = None,
) -> bytes:
    """Encode `seconds` of synthetic video at `fps` and `size` (W, H) with PyAV.

    codec/container e.g. libx264/mp4, libvpx-vp9/webm, mpeg4/mkv, libx264/mov. `gop` sets the
    keyframe interval (the encoder's default otherwise); `rotate` writes display-rotation
    matrix (by remuxing); `audio` adds a silent AAC track.
    """
    import av

    n = round(seconds * float(fps))
    buf = io.BytesIO()
    with av.open(buf, "w", format=container) as out:
        st = out.add_stream(codec, rate=Fraction(fps))
        st.width, st.height = size
        st.pix_fmt = pix_fmt
        if gop is not None:
            st.codec_context.gop_size = gop
        opts = dict(options or {})
        if codec == "libx264":
            opts.setdefault("preset", "veryfast")
            opts.setdefault("crf", "20")
        if codec.startswith("libvpx"):
            opts.setdefault("deadline", "realtime")
            opts.setdefault("cpu-used", "8")
        st.codec_context.options = opts
        ast = out.add_stream("aac", rate=16000, layout="mono") if audio else None
        for i in range(n):
            frame = av.VideoFrame.from_ndarray(video_frame(i, size, float(fps)), format="rgb24")
            frame.pts = i
            frame.time_base = 1 / Fraction(fps)
            for p in st.encode(frame):
                out.mux(p)
        for p in st.encode(None):
            out.mux(p)
        if ast is not None:
            sr = 16000
            for k in range(0, int(seconds * sr), 1024):
                af = av.AudioFrame.from_ndarray(
                    np.zeros((1, 1024), np.float32), format="fltp", layout="mono"
                )
                af.sample_rate = sr
                af.pts = k
                for p in ast.encode(af):
                    out.mux(p)
            for p in ast.encode(None):
                out.mux(p)
    if rotate is not None:
        return with_display_rotation(buf.getvalue(), rotate, container)
    return buf.getvalue()


def with_display_rotation(data: bytes, degrees: int, container: str = "mp4") -> bytes:
    """`data` remuxed (same packets, no re-encode) with a display-rotation matrix."""
    import av

    buf = io.BytesIO()
    with av.open(io.BytesIO(data)) as src, av.open(buf, "w", format=container) as out:
        ist = src.streams.video[0]
        ost = out.add_stream_from_template(ist)
        ost.set_display_rotation(degrees)
        for p in src.demux(ist):
            if p.dts is None:
                continue
            p.stream = ost
            out.mux(p)
    return buf.getvalue()


def corrupt_video(data: bytes, seed: int = 0, fraction: float = 0.5) -> bytes:
    """`data` with the second half of its bytes (the frame payload of a small MP4 sits
    mostly there) overwritten by random bytes: container parses, stream is broken."""
    rng = np.random.default_rng(seed)
    b = bytearray(data)
    start = int(len(b) * (1 - fraction))
    end = len(b) - 2048 if len(b) - 2048 > start else len(b)
    b[start:end] = rng.integers(0, 256, end - start, dtype=np.uint8).tobytes()
    return bytes(b)


# ----------------------------------------------------------------------------- IMU


def imu_array(n: int = 2000, seed: int = 0) -> np.ndarray:
    """(n, 6) float32 IMU recording: accelerometer xyz (m/s^2, gravity on z) + gyro xyz (rad/s)."""
    rng = np.random.default_rng(seed)
    t = np.arange(n) / 400.0
    acc = np.stack(
        [np.sin(2 * np.pi * 1.5 * t), np.cos(2 * np.pi * 0.7 * t), 9.81 + 0.3 * np.sin(t)], 1
    )
    gyro = np.stack([0.2 * np.sin(3 * t), 0.1 * np.cos(5 * t), 0.05 * t / max(t[-1], 1)], 1)
    return (np.concatenate([acc, gyro], 1) + 0.01 * rng.standard_normal((n, 6))).astype(np.float32)


def make_imu_npy(n: int = 2000, seed: int = 0, channels_first: bool = False) -> bytes:
    """IMU as .npy, (n, 6) or (6, n)."""
    a = imu_array(n, seed)
    return make_npy(a.T.copy() if channels_first else a)


def make_imu_csv(
    n: int = 2000, seed: int = 0, header: bool = True, timestamp: bool = False
) -> bytes:
    """IMU as CSV rows of 6 values (optionally with a header and a leading timestamp column)."""
    a = imu_array(n, seed)
    lines = []
    if header:
        cols = ["acc_x", "acc_y", "acc_z", "gyro_x", "gyro_y", "gyro_z"]
        lines.append(",".join((["timestamp"] if timestamp else []) + cols))
    for i, row in enumerate(a):
        vals = [f"{v:.9g}" for v in row]
        lines.append(",".join(([f"{i / 400.0:.6f}"] if timestamp else []) + vals))
    return ("\n".join(lines) + "\n").encode()


def make_imu_json(n: int = 2000, seed: int = 0, channels_first: bool = False) -> bytes:
    """IMU as a JSON array of arrays, (n, 6) or (6, n)."""
    a = imu_array(n, seed)
    a = a.T if channels_first else a
    return json.dumps([[float(v) for v in row] for row in a]).encode()


# Colour photographs shipped inside scikit-image's wheel (`skimage.data`, no download).
PHOTOS: tuple[str, ...] = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "motorcycle_left",
    "motorcycle_right",
)


def _jpeg(im: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def photo_jpegs(
    names: tuple[str, ...] = PHOTOS, long_sides: tuple[int, ...] = ()
) -> dict[str, bytes]:
    """name -> JPEG bytes of real photographs from `skimage.data`: the files shipped as JPEG
    keep their own bytes, the PNGs are encoded at quality 90. For each size in `long_sides`
    also "name@size": the photo resized (Lanczos) to that long side, as a JPEG."""
    import os

    import skimage.data as data

    folder = os.path.dirname(data.__file__)
    out: dict[str, bytes] = {}
    for name in names:
        path = os.path.join(folder, f"{name}.jpg")
        if os.path.exists(path):
            with open(path, "rb") as f:
                out[name] = f.read()
        elif name.startswith("motorcycle_"):
            left, right, _ = data.stereo_motorcycle()
            out[name] = _jpeg(Image.fromarray(left if name.endswith("left") else right))
        else:
            out[name] = _jpeg(Image.fromarray(getattr(data, name)()).convert("RGB"))
        im = Image.open(io.BytesIO(out[name])).convert("RGB")
        for long in long_sides:
            scale = long / max(im.size)
            size = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
            out[f"{name}@{long}"] = _jpeg(im.resize(size, Image.Resampling.LANCZOS))
    return out


# ----------------------------------------------------------------------------- corrupt input


def truncated(data: bytes, keep: float = 0.5) -> bytes:
    """The first `keep` fraction of `data`."""
    return data[: max(1, int(len(data) * keep))]


def corrupt_jpeg(seed: int = 0) -> bytes:
    """A JPEG whose header is sound (Pillow opens it, size and mode readable, end marker in
    place) but whose first Huffman table is bogus (every code-length count 255): every
    decoder refuses it when it decodes the pixels."""
    data = bytearray(make_image("JPEG", seed=seed))
    at = data.index(b"\xff\xc4")  # DHT: marker, length (2), class/id (1), 16 counts
    data[at + 5 : at + 21] = b"\xff" * 16
    return bytes(data)


def random_bytes(n: int = 4096, seed: int = 0) -> bytes:
    """`n` random bytes (name them x.jpg / x.wav / x.mp4 to get a mislabelled file)."""
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()
