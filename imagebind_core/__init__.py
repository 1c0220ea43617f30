"""imagebind_core: the ImageBind model and preprocessing in pure PyTorch (no Ray).

The one source of truth for "bytes of modality X -> tensor -> embedding":

    import imagebind_core as ibc
    model = ibc.load_model("s3://bucket/imagebind_huge.pth", modalities=["text"])
    x = ibc.collate([ibc.preprocess("text", "a dog")])
    emb = model({"text": x}, normalize=True)["text"]   # (1, 1024), unit length

Importing this package loads no weights, no vocabulary and touches no network.
"""

from __future__ import annotations

from typing import Any

from imagebind_core.checkpoint import (
    fetch_checkpoint,
    load_checkpoint,
    load_model,
    map_reference_state_dict,
)
from imagebind_core.config import (
    ALL_MODALITIES,
    BASE,
    HUGE,
    PRESETS,
    TINY,
    EncoderConfig,
    HeadConfig,
    ImageBindConfig,
    Modality,
    PostConfig,
    StemConfig,
    TrunkConfig,
    get_config,
)
from imagebind_core.errors import CheckpointError, ImageBindError, InvalidInput
from imagebind_core.io import read_bytes, s3_storage_options
from imagebind_core.model import Encoder, ImageBindModel, build_model

__version__ = "0.1.0"

# Preprocessing is imported on first use (it pulls in PIL, PyAV, the tokenizer module ...).
_PREPROCESS_NAMES = (
    "preprocess",
    "model_modality",
    "collate",
    "infer_kind",
    "Limits",
    "PREPROCESS_VERSION",
)


def __getattr__(name: str) -> Any:
    if name in _PREPROCESS_NAMES:
        from imagebind_core import preprocess as _pp

        return getattr(_pp, name)
    raise AttributeError(f"module 'imagebind_core' has no attribute {name!r}")


__all__ = [
    "ALL_MODALITIES",
    "BASE",
    "HUGE",
    "PRESETS",
    "TINY",
    "CheckpointError",
    "Encoder",
    "EncoderConfig",
    "HeadConfig",
    "ImageBindConfig",
    "ImageBindError",
    "ImageBindModel",
    "InvalidInput",
    "Modality",
    "PostConfig",
    "StemConfig",
    "TrunkConfig",
    "build_model",
    "fetch_checkpoint",
    "get_config",
    "load_checkpoint",
    "load_model",
    "map_reference_state_dict",
    "read_bytes",
    "s3_storage_options",
    *_PREPROCESS_NAMES,
]
