"""imagebind_core: the ImageBind model and preprocessing in pure PyTorch (no Ray).

The one source of truth for "bytes of modality X -> tensor -> embedding":

    import imagebind_core as ibc
    model = ibc.load_model("s3://bucket/imagebind_huge.pth", modalities=["text"])
    x = ibc.collate([ibc.preprocess("text", "a dog")])
    emb = model({"text": x}, normalize=True)["text"]   # (1, 1024), unit length

Importing this package loads no weights, no vocabulary and touches no network, and it does not
import torch: the model and checkpoint modules load on first use of their names (Ray tasks that
only list, read or write files start without paying for torch).
"""

from __future__ import annotations

import types
from typing import TYPE_CHECKING, Any

# Decoder libraries (PIL, PyAV, torchaudio) are imported by the preprocessing modules on first
# use, so this stays cheap.
from imagebind_core import preprocess as _preprocess_pkg
from imagebind_core._lazy import lazy_getattr
from imagebind_core.config import (
    BASE,
    HUGE,
    PRESETS,
    TINY,
    EncoderConfig,
    HeadConfig,
    ImageBindConfig,
    PostConfig,
    StemConfig,
    TrunkConfig,
    get_config,
)
from imagebind_core.errors import (
    CheckpointError,
    ImageBindError,
    InvalidInput,
    StoreUnavailable,
    WorkerBroken,
)
from imagebind_core.io import (
    S3_CONNECT_TIMEOUT_S,
    S3_MAX_ATTEMPTS,
    S3_READ_TIMEOUT_S,
    read_bytes,
    s3_storage_options,
)
from imagebind_core.kinds import (
    ALL_MODALITIES,
    KINDS,
    Kind,
    Modality,
    ModelModality,
    check_kind,
    model_modality,
)
from imagebind_core.preprocess import (
    PREPROCESS_VERSION,
    Limits,
    collate,
    expand,
    infer_kind,
)
from imagebind_core.runner import (
    DECODERS,
    DEVICE_DECODE_KINDS,
    LINEAGE_KEYS,
    EncoderRunner,
    ModelSpec,
    RowParts,
    lineage_key,
    merge_lineage,
    non_finite_rows,
    overflow_reason,
)

__version__ = "0.1.0"

# Names whose modules import torch: loaded on first attribute access (PEP 562).
_LAZY = {
    "check_checkpoint": "checkpoint",
    "fetch_checkpoint": "checkpoint",
    "load_checkpoint": "checkpoint",
    "load_model": "checkpoint",
    "map_reference_state_dict": "checkpoint",
    "verify_checkpoint": "checkpoint",
    "Encoder": "model",
    "ImageBindModel": "model",
    "build_model": "model",
    "text_lengths": "model",
}

if TYPE_CHECKING:
    from imagebind_core.checkpoint import (
        check_checkpoint,
        fetch_checkpoint,
        load_checkpoint,
        load_model,
        map_reference_state_dict,
        verify_checkpoint,
    )
    from imagebind_core.model import Encoder, ImageBindModel, build_model, text_lengths


__getattr__ = lazy_getattr(__name__, _LAZY, globals())


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


class _CallableModule(types.ModuleType):
    """Makes the `imagebind_core.preprocess` subpackage callable as the entry point
    `imagebind_core.preprocess(kind, data, **options)` while it stays an importable package
    (`import imagebind_core.preprocess.audio` keeps working)."""

    def __call__(self, kind: str, data: Any, **options: Any) -> Any:
        return self.preprocess(kind, data, **options)


_preprocess_pkg.__class__ = _CallableModule
preprocess = _preprocess_pkg

__all__ = [
    "ALL_MODALITIES",
    "BASE",
    "DECODERS",
    "DEVICE_DECODE_KINDS",
    "HUGE",
    "KINDS",
    "LINEAGE_KEYS",
    "PREPROCESS_VERSION",
    "PRESETS",
    "S3_CONNECT_TIMEOUT_S",
    "S3_MAX_ATTEMPTS",
    "S3_READ_TIMEOUT_S",
    "TINY",
    "CheckpointError",
    "Encoder",
    "EncoderConfig",
    "EncoderRunner",
    "HeadConfig",
    "ImageBindConfig",
    "ImageBindError",
    "ImageBindModel",
    "InvalidInput",
    "Kind",
    "Limits",
    "Modality",
    "ModelModality",
    "ModelSpec",
    "PostConfig",
    "RowParts",
    "StemConfig",
    "StoreUnavailable",
    "TrunkConfig",
    "WorkerBroken",
    "build_model",
    "check_checkpoint",
    "check_kind",
    "collate",
    "expand",
    "fetch_checkpoint",
    "get_config",
    "infer_kind",
    "lineage_key",
    "load_checkpoint",
    "load_model",
    "map_reference_state_dict",
    "merge_lineage",
    "model_modality",
    "non_finite_rows",
    "overflow_reason",
    "preprocess",
    "read_bytes",
    "s3_storage_options",
    "text_lengths",
    "verify_checkpoint",
]
