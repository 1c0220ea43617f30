"""Video: bytes -> only the frames the clips need -> the reference's (15, 3, 2, 224, 224) views.

Reference recipe (`load_and_transform_video_data`, pytorchvideo + decord): duration =
frames / average fps; 5 clips of 2 s from the constant-clips sampler; per clip the first and
last frame of the index range ceil(fps*start) .. ceil(fps*end) - 1 (clipped to the frame
count); /255; bilinear short-side resize to 224 without antialias (long side floored);
CLIP normalisation; three 224x224 crops per clip (left/centre/right, or top/centre/bottom for
portrait frames; centre offset rounded up); clip-major order.

The reference decodes every frame of the file; we index the packets (cheap, no decoding),
map the <= 10 needed frame indices to presentation timestamps, seek to the keyframe before
each and decode only forward to it, and resize each distinct frame once. Frame indices are
positions in presentation order, as decord numbers them, so variable-frame-rate files pick the
same frames the reference would. Display-rotation metadata is ignored, as decord ignores it.
"""

from __future__ import annotations

import bisect
import io
import logging
import math
from dataclasses import dataclass

import numpy as np
import torch

from imagebind_core.errors import InvalidInput
from imagebind_core.preprocess.clips import clip_spans
from imagebind_core.preprocess.common import (
    DEFAULT_LIMITS,
    Deadline,
    Limits,
    as_bytes,
    check_pixels,
    decoding,
    replace_config,
)
from imagebind_core.preprocess.image import CLIP_MEAN, CLIP_STD

logger = logging.getLogger(__name__)

KIND = "video"


@dataclass(frozen=True)
class VideoConfig:
    """The reference's video recipe. `thread_count` is PyAV's decoder threads (0 = FFmpeg's
    choice); it changes speed, never numbers."""

    clip_duration: float = 2
    num_clips: int = 5
    frames_per_clip: int = 2
    num_crops: int = 3
    size: int = 224
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    thread_count: int = 1


VIDEO = VideoConfig()


@dataclass(frozen=True)
class DecodedVideo:
    """The frames a video's clips need, decoded once each.

    Attributes:
        frames: (K, H, W, 3) uint8 RGB, the K distinct frames needed, ascending frame index.
        clip_frames: per clip, `frames_per_clip` positions into `frames`.
        frame_indices: the K frame indices (presentation order) of `frames`.
        num_frames: frames in the stream; fps: average frame rate; duration: num_frames / fps.
    """

    frames: np.ndarray
    clip_frames: tuple[tuple[int, ...], ...]
    frame_indices: tuple[int, ...]
    num_frames: int
    fps: float
    duration: float


def video_frame_indices(num_frames: int, fps: float, cfg: VideoConfig = VIDEO) -> list[list[int]]:
    """Frame indices per clip, exactly as the reference selects them.

    Raises InvalidInput if a clip's frame range is empty (e.g. a zero-frame stream).
    """
    duration = num_frames / fps
    clips = []
    for start, end in clip_spans(duration, cfg.clip_duration, cfg.num_clips):
        a = math.ceil(fps * start)
        b = min(math.ceil(fps * end), num_frames)
        if a >= b:
            raise InvalidInput(
                KIND, f"no frames between {float(start):.3f} s and {float(end):.3f} s"
            )
        t = b - a
        # uniform temporal subsample: linspace(0, t-1) in float32, truncated
        picks = torch.linspace(0, t - 1, cfg.frames_per_clip).clamp(0, t - 1).long().tolist()
        clips.append([a + p for p in picks])
    return clips


def _open_stream(container, limits: Limits):
    if not container.streams.video:
        raise InvalidInput(KIND, "no video stream in the file")
    st = container.streams.video[0]
    cc = st.codec_context
    check_pixels(KIND, cc.width or 0, cc.height or 0, limits)
    return st


def _fps(st) -> float:
    rate = st.average_rate or st.guessed_rate or st.base_rate
    if not rate or rate <= 0:
        raise InvalidInput(KIND, "the video stream has no frame rate")
    return float(rate)


def _demux(container, st, fps: float, limits: Limits, deadline: Deadline) -> list:
    """Every packet of stream `st`, demuxed without decoding, within the frame-count and
    duration limits. Packets are kept: decoding feeds them straight to the decoder, so no
    container seek (and no re-read) is ever needed."""
    packets = []
    for pkt in container.demux(st):
        if pkt.size == 0:
            continue  # demuxer flush packet
        packets.append(pkt)
        if len(packets) > limits.max_video_frames:
            raise InvalidInput(
                KIND, f"more than {limits.max_video_frames} frames (the frame-count limit)"
            )
        if len(packets) % 256 == 0:
            deadline.check()
    n = len(packets)
    if n == 0:
        raise InvalidInput(KIND, "the video stream has no frames")
    if n / fps > limits.max_video_duration_s:
        raise InvalidInput(
            KIND,
            f"duration {n / fps:.1f} s is over the limit of {limits.max_video_duration_s:g} s",
        )
    return packets


def _stack_frames(
    got: dict[int, np.ndarray], needed: list[int], n: int, limits: Limits
) -> np.ndarray:
    """The `needed` frames as one (F, H, W, 3) array: all decoded, all one size, within the
    pixel limit (the decoded size, not only the header's: a stream may change size after it)."""
    missing = [i for i in needed if i not in got]
    if missing:
        raise InvalidInput(
            KIND, f"frames {missing} of {n} could not be decoded (broken or truncated stream)"
        )
    shapes = {got[i].shape for i in needed}
    if len(shapes) != 1:
        raise InvalidInput(KIND, f"frame size changes within the stream: {sorted(shapes)}")
    fh, fw = next(iter(shapes))[:2]
    check_pixels(KIND, fw, fh, limits)
    return np.stack([got[i] for i in needed])


def decode_video(
    data: bytes, limits: Limits = DEFAULT_LIMITS, cfg: VideoConfig = VIDEO
) -> DecodedVideo:
    """Decode only the frames the reference's clips use.

    Raises:
        InvalidInput: empty/undecodable data, no video stream, no frame rate, frames over the
            pixel limit, over the duration/frame-count limits, a broken stream, or decoding
            past `limits.max_decode_s`.
    """
    import av

    data = as_bytes(KIND, data, limits)
    deadline = Deadline(KIND, limits.max_decode_s)
    with decoding(KIND, "video"), av.open(io.BytesIO(data), mode="r") as container:
        st = _open_stream(container, limits)
        fps = _fps(st)
        packets = _demux(container, st, fps, limits, deadline)
        n = len(packets)
        clips = video_frame_indices(n, fps, cfg)
        needed = sorted({i for c in clips for i in c})
        cc = st.codec_context
        cc.thread_count = cfg.thread_count
        got: dict[int, np.ndarray] = {}
        pts = [p.pts for p in packets]
        if None not in pts and len(set(pts)) == n:
            got = _decode_by_index(cc, packets, needed, deadline)
        if len(got) < len(needed):
            # Timestamps missing, duplicated or not matching the decoder's output: decode from
            # the first packet and count output frames, which is what decord's index amounts to.
            got = _decode_sequentially(cc, packets, needed, deadline)
        frames = _stack_frames(got, needed, n, limits)
    pos = {idx: k for k, idx in enumerate(needed)}
    return DecodedVideo(
        frames=frames,
        clip_frames=tuple(tuple(pos[i] for i in c) for c in clips),
        frame_indices=tuple(needed),
        num_frames=n,
        fps=fps,
        duration=n / fps,
    )


def _rgb(frame) -> np.ndarray:
    if frame.is_corrupt:  # FFmpeg concealed decoding errors in this frame
        raise InvalidInput(KIND, f"frame at pts {frame.pts} is corrupt (broken stream)")
    return frame.to_ndarray(format="rgb24")


def _decode_by_index(cc, packets, needed, deadline) -> dict[int, np.ndarray]:
    """Decode the frames at presentation indices `needed` from `packets` (decode order).

    For each target (ascending): if a keyframe lies between the packets already fed and the
    target's packet, flush and restart at that keyframe; otherwise keep feeding forward.
    Packets of frames we do not need are decoded with `skip_frame=NONREF`, so the decoder drops
    non-reference frames (nothing depends on them) instead of reconstructing them: about half of
    the frames of a typical H.264 stream with B-frames.
    """
    order = sorted(range(len(packets)), key=lambda k: packets[k].pts)  # presentation -> decode
    index_of_pts = {packets[order[i]].pts: i for i in needed}
    keys = [k for k, p in enumerate(packets) if p.is_keyframe] or [0]
    got: dict[int, np.ndarray] = {}
    cursor: int | None = None  # next packet (decode order) to feed
    skip_ok = cc.thread_count == 1  # per-packet skip settings are only exact when synchronous

    def take(frames) -> None:
        for f in frames:
            i = index_of_pts.get(f.pts)
            if i is not None and i not in got:
                got[i] = _rgb(f)

    for target in needed:
        if target in got:
            continue
        tpos = order[target]
        kpos = keys[max(bisect.bisect_right(keys, tpos) - 1, 0)]
        if cursor is None or (kpos >= cursor and tpos >= cursor):
            cc.flush_buffers()
            cursor = kpos
        while target not in got and cursor < len(packets):
            deadline.check()
            pkt = packets[cursor]
            if skip_ok:
                cc.skip_frame = "DEFAULT" if pkt.pts in index_of_pts else "NONREF"
            take(cc.decode(pkt))
            cursor += 1
        if target not in got:
            cc.skip_frame = "DEFAULT"
            take(cc.decode(None))  # drain the reorder buffer at the end of the stream
            cursor = None
    cc.skip_frame = "DEFAULT"
    return got


def _decode_sequentially(cc, packets, needed, deadline) -> dict[int, np.ndarray]:
    cc.flush_buffers()
    cc.skip_frame = "DEFAULT"
    want = set(needed)
    last = max(needed)
    got: dict[int, np.ndarray] = {}
    count = 0

    def take(frames) -> None:
        nonlocal count
        for f in frames:
            if count in want:
                got[count] = _rgb(f)
            count += 1

    for pkt in packets:
        deadline.check()
        take(cc.decode(pkt))
        if count > last:
            return got
    take(cc.decode(None))
    return got


def short_side_size(height: int, width: int, size: int) -> tuple[int, int]:
    """(H, W) after pytorchvideo's ShortSideScale: the long side is floor(long/short * size)."""
    if width < height:
        return math.floor(height / width * size), size
    return size, math.floor(width / height * size)


def crop_offsets(height: int, width: int, size: int, num_crops: int = 3) -> list[tuple[int, int]]:
    """(y, x) of the reference's spatial crops: left/centre/right for landscape and square
    frames, top/centre/bottom for portrait; the centre offset is rounded up."""
    y_c = math.ceil((height - size) / 2)
    x_c = math.ceil((width - size) / 2)
    if num_crops == 1:
        return [(y_c, x_c)]
    if height > width:
        return [(0, x_c), (y_c, x_c), (height - size, x_c)]
    return [(y_c, 0), (y_c, x_c), (y_c, width - size)]


def preprocess_video(video: DecodedVideo, cfg: VideoConfig = VIDEO) -> torch.Tensor:
    """Decoded frames -> (clips * crops, 3, frames_per_clip, 224, 224) float32 = (15, 3, 2,
    224, 224) with the reference config. The input is not modified."""
    # (K, H, W, 3) uint8 -> float32 in the same layout, viewed as (K, 3, H, W) channels-last:
    # a straight conversion instead of a transposing copy of ~100 MB for ten 720p frames.
    frames = torch.from_numpy(video.frames).to(torch.float32).permute(0, 3, 1, 2)
    h, w = frames.shape[-2:]
    nh, nw = short_side_size(h, w, cfg.size)
    if nh < cfg.size or nw < cfg.size:
        raise InvalidInput(KIND, f"frame size {w}x{h} cannot be scaled to {cfg.size}")
    frames = torch.nn.functional.interpolate(
        frames, size=(nh, nw), mode="bilinear", align_corners=False
    )
    # The reference divides by 255 before resizing; bilinear weights are linear, so dividing
    # the 224-px result instead changes values by float rounding only (< 1e-6 after
    # normalisation) and touches ~10x less memory.
    frames = frames.contiguous().div_(255.0)
    mean = torch.tensor(cfg.mean, dtype=torch.float32)[:, None, None]
    std = torch.tensor(cfg.std, dtype=torch.float32)[:, None, None]
    frames = frames.sub_(mean).div_(std)  # (K, 3, nh, nw)
    offsets = crop_offsets(nh, nw, cfg.size, cfg.num_crops)
    s = cfg.size
    views = []
    for clip in video.clip_frames:
        clip_t = frames[list(clip)].permute(1, 0, 2, 3)  # (3, T, nh, nw)
        for y, x in offsets:
            views.append(clip_t[:, :, y : y + s, x : x + s])
    return torch.stack(views, dim=0).contiguous()  # (clips*crops, 3, T, s, s)


def video_from_bytes(
    data: bytes, limits: Limits = DEFAULT_LIMITS, **options: object
) -> torch.Tensor:
    """`preprocess("video", data)`: decode the needed frames + preprocess one video."""
    cfg = replace_config(VIDEO, options, KIND)
    return preprocess_video(decode_video(data, limits, cfg), cfg)
