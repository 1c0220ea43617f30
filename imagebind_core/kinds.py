"""The vocabulary of inputs: the six model modalities and the seven kinds of media items.

A *modality* is one of the model's inputs (one encoder each). A *kind* is what an item is:
the six modalities plus `video`, which the vision encoder embeds (its clips averaged, as in the
reference). Rows, requests and configs name kinds; the model is keyed by modalities.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Literal, get_args

from imagebind_core.errors import InvalidInput


class Modality(StrEnum):
    """The six model inputs, named as the reference names its dict keys."""

    VISION = "vision"
    TEXT = "text"
    AUDIO = "audio"
    DEPTH = "depth"
    THERMAL = "thermal"
    IMU = "imu"


ALL_MODALITIES: tuple[Modality, ...] = tuple(Modality)
# The same six as a type, for pydantic fields keyed by modality.
ModelModality = Literal["vision", "text", "audio", "depth", "thermal", "imu"]

Kind = Literal["vision", "video", "text", "audio", "depth", "thermal", "imu"]
KINDS: tuple[str, ...] = get_args(Kind)

if get_args(ModelModality) != tuple(m.value for m in Modality):  # pragma: no cover
    raise AssertionError("ModelModality and Modality name different inputs")


def check_kind(kind: str) -> str:
    """`kind` as a plain lower-case string, or `InvalidInput` naming the known kinds."""
    k = str(kind.value if isinstance(kind, Modality) else kind).lower()
    if k not in KINDS:
        raise InvalidInput(str(kind), f"unknown modality {kind!r}; expected one of {list(KINDS)}")
    return k


def model_modality(kind: Kind | str) -> Modality:
    """The model input that embeds a kind: "video" -> Modality.VISION, the others themselves."""
    k = check_kind(kind)
    return Modality.VISION if k == "video" else Modality(k)


__all__ = [
    "ALL_MODALITIES",
    "KINDS",
    "Kind",
    "Modality",
    "ModelModality",
    "check_kind",
    "model_modality",
]
