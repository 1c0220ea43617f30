"""Bytes -> model input tensors for every modality, number for number with the reference loaders.

`preprocess(kind, data)` is the one entry point used by the offline job, the endpoint and the
tests; the per-modality `decode_*` (bytes -> array, where limits are enforced) and
`preprocess_*` (array -> tensor, pure) functions behind it are public too. Modules that pull in
heavy decoders (PyAV, torchaudio) are imported on first use.
"""

from __future__ import annotations

from imagebind_core._lazy import lazy_getattr
from imagebind_core.kinds import KINDS, model_modality
from imagebind_core.preprocess.api import (
    ITEM_SHAPES,
    check_options,
    collate,
    expand,
    infer_kind,
    item_nbytes,
    preprocess,
    preprocess_array,
)
from imagebind_core.preprocess.common import (
    DEFAULT_LIMITS,
    PREPROCESS_VERSION,
    Limits,
    PreprocessOptionError,
)

_LAZY: dict[str, str] = {
    # still images
    "decode_image": "image",
    "preprocess_image": "image",
    "ImageConfig": "image",
    # text
    "tokenize": "text",
    "preprocess_text": "text",
    "preprocess_texts": "text",
    "get_tokenizer": "text",
    "Tokenizer": "text",
    "TextConfig": "text",
    # audio
    "decode_audio": "audio",
    "preprocess_audio": "audio",
    "AudioConfig": "audio",
    # video
    "decode_video": "video",
    "preprocess_video": "video",
    "VideoConfig": "video",
    "video_frame_indices": "video",
    # depth / thermal
    "decode_depth": "depth",
    "preprocess_depth": "depth",
    "DepthConfig": "depth",
    "decode_thermal": "depth",
    "preprocess_thermal": "depth",
    "ThermalConfig": "depth",
    # imu
    "decode_imu": "imu",
    "preprocess_imu": "imu",
    "ImuConfig": "imu",
    # clip sampling shared by audio and video
    "clip_spans": "clips",
}

__all__ = [
    "DEFAULT_LIMITS",
    "ITEM_SHAPES",
    "KINDS",
    "PREPROCESS_VERSION",
    "Limits",
    "PreprocessOptionError",
    "check_options",
    "collate",
    "expand",
    "infer_kind",
    "item_nbytes",
    "model_modality",
    "preprocess",
    "preprocess_array",
    *_LAZY,
]


__getattr__ = lazy_getattr(__name__, _LAZY, globals())


def __dir__() -> list[str]:
    return sorted(__all__)
