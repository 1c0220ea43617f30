"""Model configuration: frozen per-level configs and the named presets.

The configs describe architecture only. Preprocessing constants live beside the decoders in
`imagebind_core.preprocess` (they belong to the checkpoint's recipe, not to the network).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from imagebind_core.kinds import Modality

StemKind = Literal["rgbt", "text", "audio", "depth", "thermal", "imu"]


@dataclass(frozen=True)
class TrunkConfig:
    """A pre-norm transformer: `num_blocks` x (attention + 4x MLP)."""

    embed_dim: int
    num_blocks: int
    num_heads: int
    bias_kv: bool = False  # one learned extra key/value token (audio, depth, thermal, IMU)
    causal: bool = False  # causal self-attention (text)
    pre_norm: bool = False  # LayerNorm before the first block (vision's CLIP "ln_pre")
    mlp_ratio: int = 4
    # Train-time stochastic depth rate of the reference; kept so that a reference
    # configuration round-trips, never applied (this package is inference only).
    drop_path: float = 0.0

    def __post_init__(self) -> None:
        if self.embed_dim % self.num_heads:
            raise ValueError(
                f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}"
            )
        if self.num_blocks < 0 or self.embed_dim <= 0:
            raise ValueError("embed_dim must be positive and num_blocks non-negative")


@dataclass(frozen=True)
class StemConfig:
    """Token embedding of one modality. Which fields matter depends on `kind`.

    rgbt:    Conv3d over (C, T, H, W), kernel = stride = `kernel_size` (T, H, W); images are
             repeated to `num_frames` frames first.
    audio:   Conv2d over the (1, mel, time) spectrogram, `kernel_size` (k,k), `stride`.
    depth/thermal: Conv2d over (1, H, W), kernel = stride = `kernel_size`.
    text:    token embedding `vocab_size` x D plus learned positions for `context_length`.
    imu:     non-overlapping windows of `kernel_size` steps over `in_channels` x `length`.
    """

    kind: StemKind
    in_channels: int = 3
    image_size: tuple[int, int] = (224, 224)  # (H, W) for conv stems; (mel, time) for audio
    kernel_size: tuple[int, ...] = (16, 16)
    stride: tuple[int, ...] | None = None  # None: equal to kernel_size
    num_frames: int = 1  # rgbt: frames per clip the positional grid is laid out for
    vocab_size: int = 49408
    context_length: int = 77
    length: int = 2000  # imu: time steps
    stem_norm: bool = False  # LayerNorm (eps 1e-5) over the patch tokens
    cls_token: bool = True

    @property
    def strides(self) -> tuple[int, ...]:
        return self.kernel_size if self.stride is None else self.stride

    def grid(self) -> tuple[int, ...]:
        """Token grid after the stem, from config arithmetic (no dummy forward)."""
        if self.kind == "text":
            return (self.context_length,)
        if self.kind == "imu":
            return (self.length // self.kernel_size[0],)
        if self.kind == "rgbt":
            sizes = (self.num_frames, *self.image_size)
        else:
            sizes = self.image_size
        return tuple(
            (n - k) // s + 1 for n, k, s in zip(sizes, self.kernel_size, self.strides, strict=True)
        )

    def num_patches(self) -> int:
        n = 1
        for g in self.grid():
            n *= g
        return n

    def num_tokens(self) -> int:
        return self.num_patches() + int(self.cls_token)


@dataclass(frozen=True)
class HeadConfig:
    """LayerNorm (eps 1e-6) + token selection + bias-free projection to the joint space."""

    select: Literal["first", "eot"] = "first"  # token 0 (cls) or the EOT token (argmax of ids)


@dataclass(frozen=True)
class PostConfig:
    """L2 normalisation, then multiplication by min(exp(log_scale), max_scale) (None: none)."""

    logit_scale: float | None = None
    max_scale: float = 100.0


@dataclass(frozen=True)
class EncoderConfig:
    stem: StemConfig
    trunk: TrunkConfig
    head: HeadConfig = field(default_factory=HeadConfig)
    post: PostConfig = field(default_factory=PostConfig)


@dataclass(frozen=True)
class ImageBindConfig:
    """All six encoders plus the size of the joint embedding space."""

    name: str
    out_embed_dim: int
    vision: EncoderConfig
    text: EncoderConfig
    audio: EncoderConfig
    depth: EncoderConfig
    thermal: EncoderConfig
    imu: EncoderConfig

    def encoder(self, modality: Modality | str) -> EncoderConfig:
        return getattr(self, Modality(modality).value)

    @classmethod
    def from_reference_kwargs(cls, name: str = "custom", **kw: Any) -> ImageBindConfig:
        """Build from the reference `ImageBindModel(...)` constructor arguments.

        Every argument of the reference constructor is accepted with its reference default, so
        any size the reference can build can be expressed. `imu_kernel_size` is accepted and,
        like in the reference, ignored (the IMU window of 8 steps is hard-wired there).
        """
        unknown = set(kw) - set(REFERENCE_DEFAULTS)
        if unknown:
            raise TypeError(f"unknown reference constructor arguments: {sorted(unknown)}")
        a = {**REFERENCE_DEFAULTS, **kw}
        return cls(
            name=name,
            out_embed_dim=a["out_embed_dim"],
            vision=_vision_from_reference(a),
            text=_text_from_reference(a),
            audio=_audio_from_reference(a),
            depth=_image_like_from_reference(a, "depth", 5.0),
            thermal=_image_like_from_reference(a, "thermal", 10.0),
            imu=_imu_from_reference(a),
        )


# The reference `ImageBindModel(...)` constructor's arguments and defaults.
REFERENCE_DEFAULTS: dict[str, Any] = dict(
    video_frames=2,
    kernel_size=(2, 14, 14),
    audio_kernel_size=16,
    audio_stride=10,
    out_embed_dim=768,
    vision_embed_dim=1024,
    vision_num_blocks=24,
    vision_num_heads=16,
    audio_embed_dim=768,
    audio_num_blocks=12,
    audio_num_heads=12,
    audio_num_mel_bins=128,
    audio_target_len=204,
    audio_drop_path=0.1,
    text_embed_dim=768,
    text_num_blocks=12,
    text_num_heads=12,
    depth_embed_dim=384,
    depth_kernel_size=16,
    depth_num_blocks=12,
    depth_num_heads=8,
    depth_drop_path=0.0,
    thermal_embed_dim=768,
    thermal_kernel_size=16,
    thermal_num_blocks=12,
    thermal_num_heads=12,
    thermal_drop_path=0.0,
    imu_embed_dim=512,
    imu_kernel_size=8,
    imu_num_blocks=6,
    imu_num_heads=8,
    imu_drop_path=0.7,
)


def _vision_from_reference(a: dict[str, Any]) -> EncoderConfig:
    kt = tuple(a["kernel_size"])
    return EncoderConfig(
        stem=StemConfig(kind="rgbt", in_channels=3, kernel_size=kt, num_frames=a["video_frames"]),
        trunk=TrunkConfig(
            a["vision_embed_dim"], a["vision_num_blocks"], a["vision_num_heads"], pre_norm=True
        ),
    )


def _text_from_reference(a: dict[str, Any]) -> EncoderConfig:
    return EncoderConfig(
        stem=StemConfig(kind="text", cls_token=False),
        trunk=TrunkConfig(
            a["text_embed_dim"], a["text_num_blocks"], a["text_num_heads"], causal=True
        ),
        head=HeadConfig(select="eot"),
        post=PostConfig(logit_scale=1 / 0.07),
    )


def _audio_from_reference(a: dict[str, Any]) -> EncoderConfig:
    ak, ast = a["audio_kernel_size"], a["audio_stride"]
    return EncoderConfig(
        stem=StemConfig(
            kind="audio",
            in_channels=1,
            image_size=(a["audio_num_mel_bins"], a["audio_target_len"]),
            kernel_size=(ak, ak),
            stride=(ast, ast),
            stem_norm=True,
        ),
        trunk=TrunkConfig(
            a["audio_embed_dim"],
            a["audio_num_blocks"],
            a["audio_num_heads"],
            bias_kv=True,
            drop_path=a["audio_drop_path"],
        ),
        post=PostConfig(logit_scale=20.0),
    )


def _image_like_from_reference(a: dict[str, Any], kind: StemKind, scale: float) -> EncoderConfig:
    """Depth or thermal: one channel, square patches, `{kind}_*` arguments."""
    k = a[f"{kind}_kernel_size"]
    return EncoderConfig(
        stem=StemConfig(kind=kind, in_channels=1, kernel_size=(k, k), stem_norm=True),
        trunk=TrunkConfig(
            a[f"{kind}_embed_dim"],
            a[f"{kind}_num_blocks"],
            a[f"{kind}_num_heads"],
            bias_kv=True,
            drop_path=a[f"{kind}_drop_path"],
        ),
        post=PostConfig(logit_scale=scale),
    )


def _imu_from_reference(a: dict[str, Any]) -> EncoderConfig:
    return EncoderConfig(
        stem=StemConfig(kind="imu", in_channels=6, kernel_size=(8,), stem_norm=True),
        trunk=TrunkConfig(
            a["imu_embed_dim"],
            a["imu_num_blocks"],
            a["imu_num_heads"],
            bias_kv=True,
            drop_path=a["imu_drop_path"],
        ),
        post=PostConfig(logit_scale=5.0),
    )


# The published imagebind_huge checkpoint (reference `imagebind_huge()`).
HUGE_REFERENCE_KWARGS: dict[str, Any] = dict(
    vision_embed_dim=1280,
    vision_num_blocks=32,
    vision_num_heads=16,
    text_embed_dim=1024,
    text_num_blocks=24,
    text_num_heads=16,
    out_embed_dim=1024,
    audio_drop_path=0.1,
    imu_drop_path=0.7,
)

# The tiny configuration the reference constructor accepts (reference doc §9): for tests and
# the offline demo. Keeps the fixed input sizes (224 px, 77 tokens, 49 408 vocab, 2000 IMU steps).
TINY_REFERENCE_KWARGS: dict[str, Any] = dict(
    out_embed_dim=32,
    vision_embed_dim=64,
    vision_num_blocks=2,
    vision_num_heads=4,
    text_embed_dim=64,
    text_num_blocks=2,
    text_num_heads=4,
    audio_embed_dim=64,
    audio_num_blocks=2,
    audio_num_heads=4,
    audio_drop_path=0.1,
    depth_embed_dim=32,
    depth_num_blocks=1,
    depth_num_heads=2,
    depth_drop_path=0.0,
    thermal_embed_dim=32,
    thermal_num_blocks=1,
    thermal_num_heads=2,
    thermal_drop_path=0.0,
    imu_embed_dim=32,
    imu_num_blocks=1,
    imu_num_heads=2,
    imu_drop_path=0.7,
)

# A mid-size random-weight configuration for benchmarks where `tiny` measures only framework
# overhead and `huge` is too slow for a useful run on a 2-core machine (ViT-B-like towers).
BASE_REFERENCE_KWARGS: dict[str, Any] = dict(
    out_embed_dim=512,
    vision_embed_dim=768,
    vision_num_blocks=12,
    vision_num_heads=12,
    text_embed_dim=512,
    text_num_blocks=12,
    text_num_heads=8,
    audio_embed_dim=384,
    audio_num_blocks=6,
    audio_num_heads=6,
    depth_embed_dim=192,
    depth_num_blocks=6,
    depth_num_heads=3,
    thermal_embed_dim=384,
    thermal_num_blocks=6,
    thermal_num_heads=6,
    imu_embed_dim=256,
    imu_num_blocks=3,
    imu_num_heads=4,
)

HUGE = ImageBindConfig.from_reference_kwargs("huge", **HUGE_REFERENCE_KWARGS)
TINY = ImageBindConfig.from_reference_kwargs("tiny", **TINY_REFERENCE_KWARGS)
BASE = ImageBindConfig.from_reference_kwargs("base", **BASE_REFERENCE_KWARGS)

PRESETS: dict[str, ImageBindConfig] = {"huge": HUGE, "tiny": TINY, "base": BASE}

PresetName = Literal["huge", "tiny", "base"]


def get_config(preset: str | ImageBindConfig) -> ImageBindConfig:
    """Return a preset by name (`huge`, `tiny`, `base`), or pass a config through."""
    if isinstance(preset, ImageBindConfig):
        return preset
    try:
        return PRESETS[preset]
    except KeyError:
        raise ValueError(
            f"unknown preset {preset!r}; choose one of {sorted(PRESETS)} or pass an ImageBindConfig"
        ) from None
