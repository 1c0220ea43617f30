"""The one encoder runner: a model's identity (`ModelSpec`) -> loaded model -> batched encode.

The offline job's encoder actors (`pipelines.stages.EncodeBatch`) and the endpoint's encoder
replicas (`serve.encoder.EncoderCore`) are thin wrappers over `EncoderRunner`; neither runs a
model any other way. One batch goes through two steps:

- `stage`: host array -> the model's device. On CUDA the batch is copied once into pinned
  memory and from there to the device on a side stream, so the copy of the next batch runs
  while the previous one computes; on the CPU it is a zero-copy view. A batch that arrives
  in pieces (`RowParts`: views of several received blocks) is copied piece by piece into
  the pinned buffer, not joined first; on the CPU it is joined once.
- `finish`: wait for the batch's copy, expand compact inputs on the device (uint8 pixels ->
  normalised floats, `imagebind_core.expand`), encode, return float32 (B, D) on the host.

`encode_all` keeps two batches in flight from one thread (the next batch's copy is issued
before the current batch's result is awaited); callers that run batches from two threads (a
Ray actor with two concurrent calls) get the same overlap from `stage` running outside the
compute lock. On the CPU both degrade to plain synchronous calls.

`ModelSpec` spells once everything that changes a vector: preset, checkpoint and its sha256,
dtype, seed (random weights), normalisation, preprocessing options and limits, and the
preprocessing version. `lineage()` is what the job writes into Parquet metadata and its job
record and what re-indexing compares (`lineage_key`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from imagebind_core.config import get_config
from imagebind_core.kinds import Modality, check_kind, model_modality
from imagebind_core.preprocess.api import expand
from imagebind_core.preprocess.common import PREPROCESS_VERSION, Limits

if TYPE_CHECKING:
    import torch

    from imagebind_core.model import ImageBindModel
    from imagebind_core.preprocess.jpeg import DecodedBatch

logger = logging.getLogger(__name__)

# Where items are decoded (`ModelSpec.decode`): "cpu", the exact path in preprocessing, or
# "gpu", on the encoder's device (`imagebind_core.preprocess.jpeg`) for these kinds.
DECODERS: tuple[str, ...] = ("cpu", "gpu")
DEVICE_DECODE_KINDS: tuple[str, ...] = ("vision",)

# Lineage fields whose change changes vectors: a job refuses to add to an output written with
# other values, and re-indexing re-embeds everything when one changes. `seed` counts only for
# random weights (a checkpoint's vectors do not depend on it). The device is recorded but not
# compared: the same weights on another device differ by rounding only (tests/test_gpu.py).
LINEAGE_KEYS: tuple[str, ...] = (
    "preset",
    "checkpoint_sha256",
    "dtype",
    "embed_dim",
    "normalize",
    "preprocess_version",
    "preprocess",
)


def _canonical_limits(limits: Mapping[str, Any]) -> dict[str, float]:
    """The overrides of `Limits` that differ from the defaults (validated), sorted."""
    try:
        full = dataclasses.asdict(Limits(**dict(limits)))
    except TypeError as e:
        raise ValueError(f"unknown limit: {e}") from None
    default = dataclasses.asdict(Limits())
    return {k: full[k] for k in sorted(full) if full[k] != default[k]}


@dataclass(frozen=True)
class ModelSpec:
    """Everything that decides an embedding's numbers, in one place.

    Args:
        preset: model size ("huge", "base", "tiny").
        checkpoint: weights URI; None builds seeded random weights.
        checkpoint_sha256: the checkpoint's expected sha256 (verified while loading), or None.
        dtype: compute dtype name ("float32", "bfloat16", "float16"); outputs are float32.
        device: "cpu", "cuda", "cuda:N", or None/"auto" (CUDA when available).
        seed: the random weights' seed (no checkpoint).
        normalize: unit-length outputs (the default of `encode`).
        options: per-kind preprocessing options (`imagebind_core.preprocess(**options)`).
        limits: overrides of `imagebind_core.Limits` fields.
        decode: per-kind decoder, "cpu" (default: the exact CPU path) or "gpu" (vision only:
            JPEG files decoded, resized and cropped on the model's device by
            `EncoderRunner.decode_jpegs`; not bit-exact, see docs/preprocessing.md).
        storage_options: fsspec options for reading the checkpoint (not part of the lineage).
    """

    preset: str = "huge"
    checkpoint: str | None = None
    checkpoint_sha256: str | None = None
    dtype: str = "float32"
    device: str | None = None
    seed: int = 0
    normalize: bool = True
    options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    limits: Mapping[str, float] = field(default_factory=dict)
    decode: Mapping[str, str] = field(default_factory=dict)
    storage_options: Mapping[str, Any] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        get_config(self.preset)  # unknown preset: fail here, with the known names
        for kind in self.options:
            check_kind(kind)
        _canonical_limits(self.limits)
        for kind, where in self.decode.items():
            if where not in DECODERS:
                raise ValueError(f"decode.{kind}: {where!r} is not one of {list(DECODERS)}")
            if where == "gpu" and check_kind(kind) not in DEVICE_DECODE_KINDS:
                raise ValueError(
                    f"decode.{kind}: gpu decoding exists for {list(DEVICE_DECODE_KINDS)} only"
                )

    @property
    def embed_dim(self) -> int:
        return get_config(self.preset).out_embed_dim

    def options_for(self, kind: str) -> dict[str, Any]:
        """This kind's preprocessing options (also what `expand` needs)."""
        return dict(self.options.get(check_kind(kind), {}))

    def make_limits(self) -> Limits:
        return Limits(**dict(self.limits))

    def decode_for(self, kind: str) -> str:
        """Where `kind` is decoded: "cpu" or "gpu" (the model's device)."""
        return self.decode.get(check_kind(kind), "cpu")

    def preprocess_key(self, kinds: Iterable[str] | None = None) -> str:
        """Canonical JSON of the preprocessing settings that change inputs: limits that differ
        from the defaults, the options of `kinds` and their decoders other than "cpu"
        (default: every kind with options or a decoder)."""
        wanted = (
            set(self.options) | set(self.decode)
            if kinds is None
            else {check_kind(k) for k in kinds}
        )
        opts = {
            k: dict(sorted(self.options[k].items())) for k in sorted(wanted) if k in self.options
        }
        opts = {k: v for k, v in opts.items() if v}
        key: dict[str, Any] = {"limits": _canonical_limits(self.limits), "options": opts}
        # Only a non-default decoder is named: the key of the exact CPU path stays as it is.
        on_device = sorted(k for k in wanted if self.decode.get(k, "cpu") != "cpu")
        if on_device:
            key["decode"] = {k: self.decode[k] for k in on_device}
        return json.dumps(
            key,
            sort_keys=True,
            separators=(",", ":"),
            default=str,
        )

    def lineage(
        self, kinds: Iterable[str] | None = None, checkpoint_sha256: str | None = None
    ) -> dict[str, str]:
        """What produces this spec's embeddings, as str -> str (Parquet metadata, records).

        `checkpoint_sha256` is the hash actually loaded or computed, when known; otherwise the
        expected one, or "random" without a checkpoint.
        """
        from imagebind_core import __version__

        expected = self.checkpoint_sha256
        sha = checkpoint_sha256 or (expected.lower() if expected else None)
        if self.checkpoint is None:
            sha = "random"
        return {
            "preset": self.preset,
            "checkpoint": self.checkpoint or "random",
            "checkpoint_sha256": sha or "unknown",
            "dtype": self.dtype,
            "device": self.device or "auto",
            "seed": str(self.seed),
            "embed_dim": str(self.embed_dim),
            "normalize": str(self.normalize).lower(),
            "package_version": __version__,
            "preprocess_version": str(PREPROCESS_VERSION),
            "preprocess": self.preprocess_key(kinds),
        }

    def load(self, modalities: Sequence[Modality | str]) -> ImageBindModel:
        """Load (or build, without a checkpoint) the model for `modalities`."""
        from imagebind_core.checkpoint import load_model

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # random weights: the caller's entry point warns
            return load_model(
                self.checkpoint,
                self.preset,
                modalities=list(modalities),
                device=self.device,
                dtype=self.dtype,
                sha256=self.checkpoint_sha256,
                storage_options=dict(self.storage_options) if self.storage_options else None,
                seed=self.seed,
            )


def lineage_key(lineage: Mapping[str, str]) -> dict[str, str]:
    """The fields of a lineage (`ModelSpec.lineage`, optionally with an "imagebind." prefix)
    that must stay equal for two embeddings to be comparable (LINEAGE_KEYS; plus the seed
    when the weights are random)."""
    flat = {k.removeprefix("imagebind."): v for k, v in lineage.items()}
    key = {k: flat.get(k, "") for k in LINEAGE_KEYS}
    if key["checkpoint_sha256"] == "random":
        key["seed"] = flat.get("seed", "")
    return key


def merge_lineage(per_kind: Mapping[str, Mapping[str, str]]) -> dict[str, str]:
    """One lineage for several kinds: a field equal for all keeps its value; one that differs
    (e.g. a per-kind dtype) becomes "kind=value,..." in kind order."""
    kinds = sorted(per_kind)
    if not kinds:
        return {}
    out: dict[str, str] = {}
    for k in per_kind[kinds[0]]:
        values = {kind: per_kind[kind][k] for kind in kinds}
        uniq = set(values.values())
        out[k] = uniq.pop() if len(uniq) == 1 else ",".join(f"{a}={b}" for a, b in values.items())
    return out


@dataclass
class Staged:
    """One batch on its way to the model: the device tensor, and on CUDA the copy's event and
    the pinned host buffer (kept alive until the copy is done)."""

    kind: str
    x: torch.Tensor
    event: Any = None
    host: Any = None


class RowParts:
    """A batch of rows, (B, ...) of one dtype, held as consecutive parts: arrays of the same
    row shape whose concatenation along the first axis is the batch.

    A batch assembled from several received blocks (Ray Data joins its blocks into one call
    without copying them) is a view of each block's buffer. Joining those views first and
    then copying the result into pinned memory would copy every byte twice; `stage` copies
    the parts straight into the pinned buffer instead, and on the CPU joins them once.
    Slicing rows (`x[a:b]`) gives a view where the rows lie in one part.
    """

    __slots__ = ("_starts", "dtype", "parts", "shape")

    def __init__(self, parts: Sequence[np.ndarray]) -> None:
        if not parts:
            raise ValueError("RowParts needs at least one part")
        row, dtype = parts[0].shape[1:], parts[0].dtype
        for p in parts:
            if p.shape[1:] != row or p.dtype != dtype:
                raise ValueError(f"parts differ: {p.shape[1:]} {p.dtype} against {row} {dtype}")
        self.parts = list(parts)
        self._starts = np.concatenate([[0], np.cumsum([len(p) for p in self.parts])])
        self.shape = (int(self._starts[-1]), *row)
        self.dtype = dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: slice) -> np.ndarray | RowParts:
        """Rows `rows` (a slice of step 1): a view of one part, or the parts they span."""
        if not isinstance(rows, slice) or rows.step not in (None, 1):
            raise TypeError("RowParts takes row slices of step 1 only")
        a, b, _ = rows.indices(len(self))
        b = max(a, b)
        out = []
        for p, s in zip(self.parts, self._starts[:-1].tolist(), strict=True):
            lo, hi = max(a - s, 0), min(b - s, len(p))
            if lo < hi:
                out.append(p[lo:hi])
        if not out:
            return self.parts[0][:0]
        return out[0] if len(out) == 1 else RowParts(out)

    def join(self, out: np.ndarray | None = None) -> np.ndarray:
        """The batch as one array (written into `out` when given: one copy of each part)."""
        return np.concatenate(self.parts, out=out)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        x = self.join()
        return x if dtype is None else x.astype(dtype, copy=False)


# Half-precision compute dtypes: an overflow in them is worth naming to the user.
HALF_DTYPES = ("float16", "bfloat16")


def non_finite_rows(y: np.ndarray) -> list[int]:
    """The rows of an encoder's (B, D) output that hold NaN or Inf."""
    return [int(i) for i in np.flatnonzero(~np.isfinite(y).all(axis=1))]


def overflow_reason(dtype: str | None = None) -> str:
    """Why an input whose embedding came out non-finite is refused, in a user's terms.

    Finite inputs make a finite embedding unless their values are too large for the model's
    arithmetic: squares and sums inside the model (its normalisation layers) overflow to Inf,
    and Inf becomes NaN. Not a bug of the model: the input's values must be scaled down.
    `dtype` is the model's compute dtype; it is named only when it is a half-precision one.
    """
    reason = (
        "its values are too large for the model: the encoder's arithmetic overflowed to "
        "non-finite values (scale the values down)"
    )
    if dtype in HALF_DTYPES:
        reason += f"; the model computes in {dtype}"
        if dtype == "float16":
            reason += " (largest value 65504)"
    return reason


class EncoderRunner:
    """Runs one modality's encoder over compact batches; the model is loaded once.

    Args:
        spec: the model's identity and preprocessing settings.
        modality: the encoder to load ("vision" also runs video).
        model: an already built model (tests, single process); skips loading.
        background: start loading in a thread and return at once; the first encode waits for
            it (a Ray actor is then ready, and receives its first blocks, while it loads).
        before_load: called in the loading thread before the weights load (a test hook that
            holds the load back; what it raises is the load's error).
    """

    def __init__(
        self,
        spec: ModelSpec,
        modality: Modality | str,
        *,
        model: ImageBindModel | None = None,
        background: bool = False,
        before_load: Callable[[], None] | None = None,
    ) -> None:
        self.spec = spec
        self._before_load = before_load
        self.modality = Modality(modality)
        self._model = model
        self._error: BaseException | None = None
        self._lock = threading.Lock()  # one batch computes at a time
        self._copy_stream: Any = None
        self._thread: threading.Thread | None = None
        if model is None:
            if background:
                self._thread = threading.Thread(
                    target=self._load, name=f"load-{self.modality}", daemon=True
                )
                self._thread.start()
            else:
                self._load()
                self.model  # noqa: B018 - raise a load error here, not on the first batch

    def _load(self) -> None:
        try:
            if self._before_load is not None:
                self._before_load()
            model = self.spec.load([self.modality])
            if model.device.type == "cuda":
                import torch

                torch.cuda.init()  # the CUDA context, here rather than in the first batch
            self._model = model
        except BaseException as e:  # re-raised by `model` in the caller's thread
            self._error = e

    @property
    def model(self) -> ImageBindModel:
        """The loaded model; waits for a background load, re-raising its error."""
        if self._thread is not None:
            self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._model is not None
        return self._model

    @property
    def loaded(self) -> bool:
        return self._model is not None

    @property
    def embed_dim(self) -> int:
        return self.spec.embed_dim if self._model is None else int(self._model.embed_dim)

    @property
    def device(self) -> torch.device:
        """The model's device (waits for a background load)."""
        return self.model.device

    def decode_jpegs(self, datas: Sequence[Any]) -> DecodedBatch:
        """JPEG files -> compact still-image pixels on the model's device, ready for
        `stage("vision", ...)`; with the spec's limits and vision options. Items the device
        refuses take the exact CPU path, alone (`imagebind_core.preprocess.jpeg.decode_jpegs`)."""
        from imagebind_core.preprocess.jpeg import decode_jpegs

        return decode_jpegs(
            datas, self.device, self.spec.make_limits(), **self.spec.options_for("vision")
        )

    def lineage(self) -> dict[str, str]:
        """The spec's lineage with what the loaded model reports (sha256, dtype, device)."""
        m = self.model
        lin = self.spec.lineage(checkpoint_sha256=m.checkpoint_sha256)
        lin.update(m.lineage())
        lin["device"] = str(m.device)
        return lin

    def stage(self, kind: str, x: np.ndarray | RowParts | torch.Tensor) -> Staged:
        """Start moving one batch (B, ...) of `kind` to the model's device (no compute)."""
        import torch

        check_kind(kind)
        if model_modality(kind) != self.modality:
            raise ValueError(f"{kind} batches do not run on the {self.modality} encoder")
        dev = self.model.device
        parts = x if isinstance(x, RowParts) else None
        if parts is not None and dev.type != "cuda":
            x, parts = parts.join(), None  # the model needs one array: the one copy
        if parts is None:
            if isinstance(x, np.ndarray):
                with warnings.catch_warnings():
                    # A read-only view of a received block: the model never writes its input.
                    warnings.filterwarnings("ignore", "The given NumPy array is not writable")
                    t = torch.from_numpy(np.ascontiguousarray(x))
            else:
                t = x
            if dev.type != "cuda" or t.device.type == "cuda":
                return Staged(kind, t)
        if self._copy_stream is None:
            self._copy_stream = torch.cuda.Stream(dev)
        # One copy into pinned memory, then an asynchronous copy on the side stream: the
        # compute stream keeps running the previous batch meanwhile.
        if parts is not None:
            dtype = torch.from_numpy(np.empty(0, parts.dtype)).dtype
            host = torch.empty(parts.shape, dtype=dtype, pin_memory=True)
            parts.join(out=host.numpy())  # each part copied once, into the pinned buffer
        else:
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            host.copy_(t)
        with torch.cuda.stream(self._copy_stream):
            xd = host.to(dev, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self._copy_stream)
        return Staged(kind, xd, event, host)

    def finish(self, staged: Staged, normalize: bool | None = None) -> np.ndarray:
        """Encode a staged batch: (B, D) float32 on the host."""
        import torch

        model = self.model
        norm = self.spec.normalize if normalize is None else normalize
        with self._lock, torch.inference_mode():
            x = staged.x
            if staged.event is not None:
                stream = torch.cuda.current_stream(x.device)
                stream.wait_event(staged.event)
                x.record_stream(stream)  # allocated on the copy stream, used on this one
            x = expand(staged.kind, x, model.device, **self.spec.options_for(staged.kind))
            y = model.encode(self.modality, x, normalize=norm)
            return y.float().cpu().numpy()  # (B, D); waits for the batch

    def encode(
        self, kind: str, x: np.ndarray | RowParts | torch.Tensor, normalize: bool | None = None
    ) -> np.ndarray:
        """One batch of `kind`, synchronously: (B, ...) -> (B, D) float32."""
        return self.finish(self.stage(kind, x), normalize)

    def encode_all(
        self,
        batches: Iterable[tuple[str, np.ndarray | RowParts | torch.Tensor]],
        normalize: bool | None = None,
    ) -> Iterator[np.ndarray]:
        """Encode batches in order with the next batch's copy in flight while one computes
        (on CUDA; on the CPU this is `encode` in a loop). Yields (B, D) float32 per batch."""
        it = iter(batches)
        nxt = next(it, None)
        pending = self.stage(*nxt) if nxt is not None else None
        while pending is not None:
            nxt = next(it, None)
            following = self.stage(*nxt) if nxt is not None else None
            yield self.finish(pending, normalize)
            pending = following


__all__ = [
    "DECODERS",
    "DEVICE_DECODE_KINDS",
    "HALF_DTYPES",
    "LINEAGE_KEYS",
    "EncoderRunner",
    "ModelSpec",
    "RowParts",
    "Staged",
    "lineage_key",
    "merge_lineage",
    "non_finite_rows",
    "overflow_reason",
]
