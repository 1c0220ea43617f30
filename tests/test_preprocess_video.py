"""Video: the reference's sampling semantics, checked against the reference's own video loader
running on a test-side full-decode EncodedVideo (see reference_data_shim); codecs and
containers; VFR; rotation; edge cases; only the needed frames are decoded."""

from __future__ import annotations

import io
from fractions import Fraction

import av
import media
import numpy as np
import pytest
import torch
from numerics import assert_inputs_close
from reference_data_shim import reference_data

import imagebind_core.preprocess as P
import imagebind_core.preprocess.video as V
from imagebind_core.errors import InvalidInput


def reference_video(tmp_path, data: bytes) -> torch.Tensor:
    path = tmp_path / "v.bin"
    path.write_bytes(data)
    return reference_data().load_and_transform_video_data([str(path)], "cpu")[0]


@pytest.mark.parametrize(
    "kw",
    [
        dict(seconds=1, fps=15, size=(320, 240)),  # shorter than a clip: 5 clips at 0
        dict(seconds=3, fps=15, size=(240, 320)),  # portrait: top/centre/bottom crops
        dict(seconds=11, fps=10, size=(320, 180), gop=25),  # several GOPs: seeks
        dict(seconds=3, fps=24, size=(256, 256), codec="libvpx-vp9", container="webm"),
        dict(seconds=2.5, fps=12, size=(300, 226), codec="mpeg4", container="matroska"),
        dict(
            seconds=4,
            fps=Fraction(30000, 1001),
            size=(320, 240),
            container="mov",
            options={"bf": "3", "x264-params": "keyint=30:scenecut=0:b-pyramid=normal"},
        ),
    ],
    ids=["1s", "3s-portrait", "11s-gop25", "vp9-webm", "mpeg4-mkv", "ntsc-mov-bpyramid"],
)
def test_parity_with_reference_semantics(tmp_path, kw) -> None:
    data = media.make_video(**kw)
    ours = P.preprocess("video", data)
    assert ours.shape == (15, 3, 2, 224, 224) and ours.dtype == torch.float32
    assert_inputs_close(ours, reference_video(tmp_path, data))


def test_frame_indices_follow_the_reference_sampler() -> None:
    # reference doc example: 7 s at 15 fps -> (0,29), (15,44), (30,59), (45,74), (60,89)
    assert P.video_frame_indices(105, 15.0) == [[0, 29], [15, 44], [30, 59], [45, 74], [60, 89]]
    # <= 2 s: five identical clips over all frames
    assert P.video_frame_indices(15, 15.0) == [[0, 14]] * 5


def test_decodes_only_what_the_clips_need(monkeypatch) -> None:
    data = media.make_video(11, 10, (160, 120), gop=10)
    fed = []
    real = V._decode_by_index

    def spy(cc, packets, needed, deadline):
        class Counting:
            def __init__(self, cc):
                self.cc = cc

            def __getattr__(self, k):
                return getattr(self.cc, k)

            def __setattr__(self, k, v):
                if k == "cc":
                    object.__setattr__(self, k, v)
                else:
                    setattr(self.cc, k, v)

            def decode(self, pkt):
                fed.append(pkt)
                return self.cc.decode(pkt)

        return real(Counting(cc), packets, needed, deadline)

    monkeypatch.setattr(V, "_decode_by_index", spy)
    decoded = P.decode_video(data)
    assert decoded.frames.shape[0] == len(decoded.frame_indices) == 10
    assert decoded.num_frames == 110
    assert len(fed) < 0.7 * 110  # GOPs without a needed frame are never fed


def _vfr_video() -> bytes:
    """An H.264 MP4 whose frame intervals alternate 40 ms / 80 ms (variable frame rate)."""
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        st = out.add_stream("libx264", rate=25)
        st.width, st.height = 256, 192
        st.pix_fmt = "yuv420p"
        st.codec_context.time_base = Fraction(1, 1000)
        st.codec_context.options = {"preset": "veryfast"}
        t = 0
        for i in range(60):
            f = av.VideoFrame.from_ndarray(media.video_frame(i, (256, 192), 25.0), format="rgb24")
            f.pts = t
            f.time_base = Fraction(1, 1000)
            t += 40 if i % 2 == 0 else 80
            for p in st.encode(f):
                out.mux(p)
        for p in st.encode(None):
            out.mux(p)
    return buf.getvalue()


def test_variable_frame_rate_picks_frames_by_index_like_the_reference(tmp_path) -> None:
    data = _vfr_video()
    assert_inputs_close(P.preprocess("video", data), reference_video(tmp_path, data))


def test_rotation_metadata_is_ignored_like_the_reference() -> None:
    plain = media.make_video(2, 10, (320, 240))
    rotated = media.with_display_rotation(plain, 90)
    with av.open(io.BytesIO(rotated)) as c:
        assert next(c.decode(video=0)).rotation == 90  # the metadata is really there
    assert torch.equal(P.preprocess("video", plain), P.preprocess("video", rotated))


def test_video_with_audio_track_and_single_frame(tmp_path) -> None:
    data = media.make_video(2, 10, (240, 240), audio=True)
    assert_inputs_close(P.preprocess("video", data), reference_video(tmp_path, data))
    one = media.make_video(0.1, 10, (320, 240))
    assert P.decode_video(one).num_frames == 1
    assert_inputs_close(P.preprocess("video", one), reference_video(tmp_path, one))


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda: media.make_m4a(1.0), "no video stream"),
        (lambda: media.corrupt_video(media.make_video(3, 15)), "cannot decode|corrupt|broken"),
        (lambda: media.truncated(media.make_video(3, 15), 0.3), "cannot decode|no frames|broken"),
        (lambda: media.random_bytes(20000), "cannot decode"),
        (lambda: b"not a video at all\n" * 500, "cannot decode"),
    ],
    ids=["audio-only", "broken-stream", "truncated", "random-bytes", "text-as-video"],
)
def test_bad_videos_raise_invalid_input(make, reason) -> None:
    with pytest.raises(InvalidInput, match=reason) as e:
        P.preprocess("video", make(), item_id="v")
    assert e.value.modality == "video" and e.value.item_id == "v"


def test_video_limits() -> None:
    data = media.make_video(3, 10, (320, 240))
    with pytest.raises(InvalidInput, match="over the limit of 2 s"):
        P.preprocess("video", data, limits=P.Limits(max_video_duration_s=2))
    with pytest.raises(InvalidInput, match="frame-count limit"):
        P.preprocess("video", data, limits=P.Limits(max_video_frames=20))
    with pytest.raises(InvalidInput, match="over the limit of 10000 pixels"):
        P.preprocess("video", data, limits=P.Limits(max_pixels=10_000))
    assert np.isfinite(P.preprocess("video", data).numpy()).all()
