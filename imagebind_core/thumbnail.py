"""Thumbnails of indexed items: bytes of an image or a video -> a small JPEG.

What a person looking at an index sees (the Serve app's search page asks for them, see
docs/serve.md). Decoding goes through the same guarded paths as preprocessing: the image's
declared size is checked against `Limits.max_pixels` before any pixel is decoded, only
Pillow's allow-listed formats are opened, and a video is read for its first decodable frame
only, with the frame size checked from the stream header.
"""

from __future__ import annotations

import io

from imagebind_core.errors import InvalidInput
from imagebind_core.preprocess.common import DEFAULT_LIMITS, Limits, check_pixels, decoding

# The longest side a thumbnail may be asked for: bounds the work and the bytes of one answer.
MAX_THUMBNAIL_SIDE = 1024
# The kinds a thumbnail is made for (depth/thermal maps are images too: shown as they are).
THUMBNAIL_KINDS = ("vision", "video", "depth", "thermal")
# Packets read in search of a first decodable video frame before giving up.
_MAX_VIDEO_PACKETS = 300


def make_thumbnail(
    data: bytes, modality: str, max_side: int = 256, limits: Limits = DEFAULT_LIMITS
) -> bytes:
    """A JPEG whose longer side is at most `max_side` pixels (aspect ratio kept, never
    enlarged) of an image, or of the first frame of a video.

    Raises:
        InvalidInput: `max_side` outside 1..MAX_THUMBNAIL_SIDE, a modality that has no
            picture, or data that is not a decodable image/video within `limits`.
    """
    if not 1 <= int(max_side) <= MAX_THUMBNAIL_SIDE:
        raise InvalidInput(modality, f"thumbnail size must be in [1, {MAX_THUMBNAIL_SIDE}]")
    if modality not in THUMBNAIL_KINDS:
        raise InvalidInput(modality, f"no thumbnail for {modality!r} items ({THUMBNAIL_KINDS})")
    im = _video_frame(data, limits) if modality == "video" else _image(modality, data, limits)
    with decoding(modality, "thumbnail"):
        im.thumbnail((max_side, max_side))
        if im.mode != "RGB":
            im = im.convert("RGB")
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def _image(kind: str, data: bytes, limits: Limits):
    from imagebind_core.preprocess.image import load_pixels, open_image

    im = open_image(kind, data, limits)
    # JPEG: let the decoder scale down by up to 8x while decoding (fewer pixels to decode).
    im.draft("RGB", (MAX_THUMBNAIL_SIDE, MAX_THUMBNAIL_SIDE))
    load_pixels(kind, im)
    return im


def _video_frame(data: bytes, limits: Limits):
    import av

    kind = "video"
    if not data:
        raise InvalidInput(kind, "empty input")
    with decoding(kind, "video"), av.open(io.BytesIO(data), mode="r") as container:
        if not container.streams.video:
            raise InvalidInput(kind, "no video stream in the file")
        st = container.streams.video[0]
        check_pixels(kind, st.codec_context.width or 0, st.codec_context.height or 0, limits)
        for n, packet in enumerate(container.demux(st)):
            if n >= _MAX_VIDEO_PACKETS:
                break
            for frame in packet.decode():
                check_pixels(kind, frame.width, frame.height, limits)
                return frame.to_image()
    raise InvalidInput(kind, "no decodable frame in the video stream")
