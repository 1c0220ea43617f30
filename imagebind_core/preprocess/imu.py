"""IMU: 6-channel recordings (.npy, .csv, JSON) -> (6, 2000) float32.

The reference ships no loader (reference doc §2.7); the model needs exactly 6 x 2000
(accelerometer xyz, gyroscope xyz; Ego4D, 5 s windows). Channel order is taken as given; no
unit conversion or normalisation is applied (none is published).

Length policy (`ImuConfig.length_policy`):
  * "pad_crop" (default): keep the time scale — take the first 2000 samples of a longer
    recording; right-pad a shorter one by repeating its last sample (zeros would be a fake
    "0 g, no rotation" reading).
  * "resample": linearly interpolate the whole recording onto 2000 evenly spaced points (for
    recordings of a known 5 s window at another rate).
"""

from __future__ import annotations

import csv
import io
import json
import logging
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from imagebind_core.errors import InvalidInput
from imagebind_core.preprocess.common import (
    DEFAULT_LIMITS,
    NPY_MAGIC,
    Limits,
    as_bytes,
    check_finite,
    decoding,
    load_npy,
    replace_config,
)

logger = logging.getLogger(__name__)

KIND = "imu"


@dataclass(frozen=True)
class ImuConfig:
    """IMU window: `channels` x `length` samples, filled per `length_policy` (module doc)."""

    channels: int = 6
    length: int = 2000
    length_policy: Literal["pad_crop", "resample"] = "pad_crop"

    def __post_init__(self) -> None:
        if self.length_policy not in ("pad_crop", "resample"):
            raise ValueError(f"length_policy must be pad_crop|resample, got {self.length_policy!r}")


IMU = ImuConfig()


def _orient(arr: np.ndarray, channels: int) -> np.ndarray:
    """(channels, T) from (channels, T) or (T, channels); (channels, channels) is read as
    (channels, T), the model's layout."""
    if arr.ndim != 2 or channels not in arr.shape:
        raise InvalidInput(
            KIND, f"expected a ({channels}, T) or (T, {channels}) array, got shape {arr.shape}"
        )
    return arr if arr.shape[0] == channels else arr.T


def _parse_csv(text: str) -> np.ndarray:
    rows = [r for r in csv.reader(io.StringIO(text)) if any(c.strip() for c in r)]
    if not rows:
        raise InvalidInput(KIND, "empty CSV")
    header = None
    try:
        [float(c) for c in rows[0]]
    except ValueError:
        header, rows = rows[0], rows[1:]
    if header is not None and len(header) == 7 and "time" in header[0].strip().lower():
        rows = [r[1:] for r in rows]  # a leading timestamp column
    try:
        return np.array([[float(c) for c in r] for r in rows], dtype=np.float64)
    except ValueError as e:
        raise InvalidInput(KIND, f"non-numeric CSV value: {e}") from None


def _parse_json(text: str) -> np.ndarray:
    obj = json.loads(text)
    if isinstance(obj, dict):
        for key in ("imu", "data", "samples", "values"):
            if key in obj:
                obj = obj[key]
                break
        else:
            raise InvalidInput(KIND, "JSON object has none of the keys imu/data/samples/values")
    try:
        return np.array(obj, dtype=np.float64)
    except (ValueError, TypeError) as e:
        raise InvalidInput(KIND, f"JSON is not a rectangular numeric array: {e}") from None


def decode_imu(data: bytes, limits: Limits = DEFAULT_LIMITS, channels: int = 6) -> np.ndarray:
    """Decode an IMU recording (.npy, CSV with optional header/timestamp column, JSON array of
    rows or of channels, optionally under key imu/data/samples/values) -> (channels, T) float32.

    Raises:
        InvalidInput: undecodable, wrong shape, NaN/Inf values, over `limits.max_imu_samples`.
    """
    data = as_bytes(KIND, data, limits)
    if data.startswith(NPY_MAGIC):
        arr = load_npy(KIND, data)
    else:
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError:
            raise InvalidInput(KIND, "not a .npy array and not UTF-8 text (CSV/JSON)") from None
        stripped = text.lstrip()
        with decoding(KIND, "JSON" if stripped[:1] in "[{" else "CSV"):
            arr = _parse_json(text) if stripped[:1] in "[{" else _parse_csv(text)
    arr = _orient(np.asarray(arr), channels)
    if arr.shape[1] == 0:
        raise InvalidInput(KIND, "the recording has no samples")
    if arr.shape[1] > limits.max_imu_samples:
        raise InvalidInput(
            KIND, f"{arr.shape[1]} samples, over the limit of {limits.max_imu_samples}"
        )
    check_finite(KIND, arr, "IMU values")
    return np.ascontiguousarray(arr, dtype=np.float32)


def preprocess_imu(imu: np.ndarray, cfg: ImuConfig = IMU) -> torch.Tensor:
    """(channels, T) -> (6, 2000) float32 per `cfg.length_policy`. The input is not modified."""
    arr = _orient(np.asarray(imu), cfg.channels).astype(np.float32)
    check_finite(KIND, arr, "IMU values")
    t = arr.shape[1]
    n = cfg.length
    if t == 0:
        raise InvalidInput(KIND, "the recording has no samples")
    if t == n:
        out = arr.copy()
    elif cfg.length_policy == "pad_crop":
        out = arr[:, :n] if t > n else np.concatenate([arr, np.repeat(arr[:, -1:], n - t, 1)], 1)
    else:
        src = np.linspace(0.0, 1.0, t) if t > 1 else np.zeros(1)
        dst = np.linspace(0.0, 1.0, n)
        out = np.stack([np.interp(dst, src, ch) for ch in arr.astype(np.float64)]).astype(
            np.float32
        )
    return torch.from_numpy(np.ascontiguousarray(out))


def imu_from_bytes(data: bytes, limits: Limits = DEFAULT_LIMITS, **options: object) -> torch.Tensor:
    """`preprocess("imu", data)`."""
    cfg = replace_config(IMU, options, KIND)
    return preprocess_imu(decode_imu(data, limits, cfg.channels), cfg)
