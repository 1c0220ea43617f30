"""The embedding job's configuration: one pydantic model, loaded from YAML, overridable by flags.

The same file runs on a laptop (local Ray, local folders) and on a cluster (`ray job submit`,
S3): only `input`/`output` URIs and resources change. Every field is documented in
docs/pipelines.md. A bad field raises `ConfigError` with a message naming the field.
"""

from __future__ import annotations

import os
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

import imagebind_core as ibc

Kind = Literal["vision", "video", "text", "audio", "depth", "thermal", "imu"]
KINDS: tuple[str, ...] = ("vision", "video", "text", "audio", "depth", "thermal", "imu")
Format = Literal["auto", "manifest", "webdataset", "files"]
# "auto": bfloat16 on GPU encoders and on CPUs with AMX / AVX-512 BF16, float32 on other CPUs
# (`imagebind_core.checkpoint.auto_dtype`), resolved once by the driver (`JobConfig.encoder`)
# so every actor of a job, and its lineage, carries the same concrete dtype.
DType = Literal["auto", "float32", "bfloat16", "float16"]


class ConfigError(ValueError):
    """A configuration file or flag is invalid; the message names the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class StorageConfig(_Strict):
    """Object-store settings, passed as fsspec `storage_options` to every read and write.

    Credentials left unset fall back to the usual AWS chain (environment variables, profile,
    instance role), which is the recommended way on a cluster: a key set here travels to the
    workers inside task arguments.
    """

    endpoint_url: str | None = None  # MinIO, moto, Ceph, R2 ...: http(s)://host:port
    region: str | None = None
    key: str | None = None
    secret: str | None = None
    anon: bool = False

    def options(self) -> dict[str, Any]:
        """fsspec/s3fs storage options for these settings."""
        return ibc.s3_storage_options(
            endpoint_url=self.endpoint_url,
            region=self.region,
            key=self.key,
            secret=self.secret,
            anon=self.anon,
        )


class FilesConfig(_Strict):
    """`format: files` — a folder, prefix or glob of media files, one item per file."""

    kind: Kind | None = None  # force one kind for every file (default: from the extension)
    # Extra or overriding suffix -> kind mappings, e.g. {".dat": "imu"} (case-insensitive).
    extensions: dict[str, Kind] = Field(default_factory=dict)
    # Files are grouped into shards by a stable hash of their relative path; the shard count is
    # fixed on the first run (recorded in <output>/_job.json) so reruns find the same shards.
    files_per_shard: int = Field(1000, gt=0)


class WebDatasetConfig(_Strict):
    """`format: webdataset` — tar shards as img2dataset / video2dataset write them."""

    # Member kinds to embed (default: every kind found in the first shard). Each kind reads the
    # shard on its own; `[vision]` skips captions.
    kinds: list[Kind] | None = None
    # Suffix (after the sample key) -> kind, overriding the extension rules, e.g.
    # {"caption.txt": "text"}.
    extensions: dict[str, Kind] = Field(default_factory=dict)


# Items per preprocessing task by kind when `preprocess.batch_size` is unset: enough work per
# task that Ray's per-task cost (~10 ms here) is small next to it — a caption tokenizes in
# ~0.1 ms, an image in ~12 ms, a 10 s clip in ~0.4 s — and small enough that a shard splits
# into many tasks (parallel decoding, and encoder actors fed evenly).
DEFAULT_PREPROCESS_BATCH: dict[str, int] = {
    "vision": 16,
    "depth": 16,
    "thermal": 16,
    "video": 2,
    "audio": 8,
    "text": 128,
    "imu": 128,
}

# The same for kinds whose encoder runs on a GPU, which consumes items 10-100x faster: an H200
# runs huge text at ~10k/s in bf16, so a 128-text task would be 13 ms of GPU work and the
# driver would have to dispatch ~80 tasks/s per GPU. These give each encoder task ~50-100 ms
# of H200 work (benchmarks/results/gpu-h200.md) and each preprocessing task 0.1-2 s of CPU.
# Text gets more: a caption tokenizes in ~60 us while Ray's costs per block (a task in each of
# preprocess, encode and write, their (de)serialisation, the driver's bookkeeping) do not
# depend on its rows; 8192 captions spread them thinly (docs/pipelines.md, null encoder).
DEFAULT_PREPROCESS_BATCH_GPU: dict[str, int] = {
    "vision": 64,
    "depth": 64,
    "thermal": 64,
    "video": 4,
    "audio": 32,
    "text": 8192,
    "imu": 1024,
}

# Items per encoder call when `batch_size` is unset. CPU: 32. GPU: at or past the knee of the
# H200's items/s-vs-batch curve in bf16 (vision 64 -> 1371/s, 256 -> 1357/s; text 256 ->
# 9918/s, 1024 -> 10027/s; benchmarks/results/gpu-h200.md), with activations of a few GB at
# most for huge in float32.
DEFAULT_ENCODER_BATCH_CPU = 32
DEFAULT_ENCODER_BATCH_GPU: dict[str, int] = {
    "vision": 128,
    "video": 8,
    "text": 512,
    "audio": 128,
    "depth": 256,
    "thermal": 256,
    "imu": 512,
}


# Fraction of `encoder_defaults.num_gpus` a small encoder's actor asks for when its kind does
# not set `num_gpus` itself: these towers are 1/4 to 1/20 of vision's work per item (huge,
# H200, bf16: depth 13.7k/s, thermal 8.5k/s, audio 2.7k/s against vision 1.4k/s;
# benchmarks/results/gpu-h200.md), so one actor rarely fills a GPU and several share one.
SMALL_ENCODER_GPU_SHARE: dict[str, float] = {
    "audio": 0.25,
    "depth": 0.25,
    "thermal": 0.25,
    "imu": 0.25,
}


class PreprocessConfig(_Strict):
    """Decode + preprocess: stateless CPU tasks in front of the encoders."""

    num_cpus: float = Field(1.0, gt=0)  # logical CPUs per preprocessing task
    # Items per task; None: the kind's default (DEFAULT_PREPROCESS_BATCH, or
    # DEFAULT_PREPROCESS_BATCH_GPU when the kind encodes on a GPU). `batch_sizes` sets one kind.
    batch_size: int | None = Field(None, gt=0)
    batch_sizes: dict[Kind, Annotated[int, Field(gt=0)]] = Field(default_factory=dict)
    read_threads: int = Field(8, gt=0)  # parallel object reads inside one task (latency hiding)
    read_num_cpus: float = Field(0.25, gt=0)  # per shard-reading task (listing/tar streaming)
    # Memory reserved per preprocessing task (Ray scheduling), enough for one batch of decoded
    # media; it also keeps this stage a separate operator from the encoder.
    memory_mb: int = Field(512, gt=0)
    # Overrides of imagebind_core.Limits fields, e.g. {max_bytes: 50000000}.
    limits: dict[str, int | float] = Field(default_factory=dict)
    # Per-kind preprocessing options passed to imagebind_core.preprocess, e.g.
    # {depth: {input: disparity}}.
    options: dict[Kind, dict[str, Any]] = Field(default_factory=dict)

    @field_validator("limits")
    @classmethod
    def _check_limits(cls, v: dict[str, int | float]) -> dict[str, int | float]:
        try:
            ibc.Limits(**v)
        except TypeError as e:
            raise ValueError(f"unknown limit: {e}") from None
        return v

    def make_limits(self) -> Any:
        """The `imagebind_core.Limits` these settings describe."""
        return ibc.Limits(**self.limits)

    def batch_size_for(self, kind: str, gpu: bool = False) -> int:
        """Items per preprocessing task for `kind`: `batch_sizes`, else `batch_size`, else
        the kind's default for an encoder on CPU or (`gpu`) on a GPU."""
        default = (DEFAULT_PREPROCESS_BATCH_GPU if gpu else DEFAULT_PREPROCESS_BATCH)[kind]
        return self.batch_sizes.get(kind) or self.batch_size or default  # type: ignore[call-overload]


class EncoderConfig(_Strict):
    """One encoder actor pool (one per kind present in the job)."""

    # Items per encoder call; None: DEFAULT_ENCODER_BATCH_CPU, or on a GPU the kind's
    # DEFAULT_ENCODER_BATCH_GPU (resolved by `JobConfig.encoder`).
    batch_size: int | None = Field(None, gt=0)
    # Per actor; > 0 puts the model on CUDA (see `device`). In `encoder_defaults` it is the
    # big towers' share (vision, video, text); audio, depth, thermal and IMU actors take
    # SMALL_ENCODER_GPU_SHARE of it unless their kind sets its own.
    num_gpus: float = Field(0.0, ge=0)
    num_cpus: float = Field(1.0, ge=0)  # per actor (logical)
    min_actors: int = Field(1, gt=0)
    # "auto": sized from the cluster when the job starts (`embed.pool_size`): one actor per
    # `num_gpus` of the cluster's GPUs; for CPU encoders one single-threaded actor per core
    # (on CPU, several 1-thread actors are at least as fast as one multi-threaded one),
    # split between kinds.
    max_actors: Annotated[int, Field(gt=0)] | Literal["auto"] = "auto"
    dtype: DType = "float32"
    # Where the model runs: "auto" = CUDA when the actor asks for GPUs (num_gpus > 0), else
    # the CPU. "cpu" keeps it on the CPU even with num_gpus > 0 (the actor still holds its
    # logical GPU share: tests of pool sizing on machines without GPUs).
    device: Literal["auto", "cpu", "cuda"] = "auto"
    torch_threads: int | None = Field(None, gt=0)  # default: max(1, round(num_cpus))
    # Batches queued at one actor while it computes; None: 1 on CPU (an idle actor never waits
    # behind a busy one), 2 on GPU (the next batch is already local when one finishes).
    max_tasks_in_flight: int | None = Field(None, gt=0)

    @property
    def threads(self) -> int:
        """Intra-op threads per actor."""
        return self.torch_threads or max(1, round(self.num_cpus))

    @property
    def model_device(self) -> str:
        """The device the model runs on ("cpu" or "cuda")."""
        if self.device != "auto":
            return self.device
        return "cuda" if self.num_gpus > 0 else "cpu"

    @property
    def concurrent_batches(self) -> int:
        """Calls one actor runs at once: 2 on CUDA (one batch's copy to the device overlaps
        the previous one's compute; the runner computes one at a time), else 1."""
        return 2 if self.model_device == "cuda" else 1

    @property
    def tasks_in_flight(self) -> int:
        """Batches queued per actor (see `max_tasks_in_flight`)."""
        return self.max_tasks_in_flight or (2 if self.num_gpus > 0 else 1)

    @model_validator(mode="after")
    def _check_pool(self) -> EncoderConfig:
        if self.max_actors != "auto" and self.max_actors < self.min_actors:
            raise ValueError(
                f"max_actors ({self.max_actors}) is smaller than min_actors ({self.min_actors})"
            )
        if self.dtype == "float16" and self.model_device != "cuda":
            raise ValueError("dtype float16 needs a GPU (num_gpus > 0); use bfloat16 on CPU")
        if self.device == "cuda" and self.num_gpus == 0:
            raise ValueError("device cuda needs num_gpus > 0 (the actor's share of a GPU)")
        return self


class EncoderOverride(_Strict):
    """Per-kind changes to `encoder_defaults`; unset fields keep the default."""

    batch_size: int | None = Field(None, gt=0)
    num_gpus: float | None = Field(None, ge=0)
    num_cpus: float | None = Field(None, ge=0)
    min_actors: int | None = Field(None, gt=0)
    max_actors: Annotated[int, Field(gt=0)] | Literal["auto"] | None = None
    dtype: DType | None = None
    device: Literal["auto", "cpu", "cuda"] | None = None
    torch_threads: int | None = Field(None, gt=0)
    max_tasks_in_flight: int | None = Field(None, gt=0)


class RayConfig(_Strict):
    """How the job reaches Ray."""

    # None: RAY_ADDRESS if set (ray job submit sets it), else a new local Ray. "local" forces a
    # new local instance; "auto" or host:port joins an existing cluster.
    address: str | None = None
    num_cpus: int | None = Field(None, gt=0)  # logical CPUs of a new local instance
    progress_bars: bool = True  # Ray Data's progress bars on stderr


class DebugConfig(_Strict):
    """Diagnostics used by the crash/resume tests; off by default."""

    trace_path: str | None = None  # local file: one line "<pid> <id>" per item preprocessed
    delay_per_item_s: float = Field(0.0, ge=0)  # sleep per item in preprocessing (slow runs)
    # Encoders that run no model (zero embeddings): the pipeline's own ceiling
    # (benchmarks/bench_pipeline.py --null-encoder). Never for real output.
    null_encoder: bool = False
    actor_trace_path: str | None = None  # local file: one line "<pid> <kind> <GPU ids>" per actor


class JobConfig(_Strict):
    """Everything `imagebind-embed` needs. See docs/pipelines.md for every field."""

    input: str
    output: str
    format: Format = "auto"
    preset: str = "huge"
    checkpoint: str | None = None
    checkpoint_sha256: str | None = None
    seed: int = 0  # random weights only (no checkpoint)
    normalize: bool = True  # unit-length embeddings; False stores the reference's raw output
    storage: StorageConfig = Field(default_factory=StorageConfig)
    files: FilesConfig = Field(default_factory=FilesConfig)
    webdataset: WebDatasetConfig = Field(default_factory=WebDatasetConfig)
    preprocess: PreprocessConfig = Field(default_factory=PreprocessConfig)
    encoder_defaults: EncoderConfig = Field(default_factory=EncoderConfig)
    encoders: dict[Kind, EncoderOverride] = Field(default_factory=dict)
    ray: RayConfig = Field(default_factory=RayConfig)
    lock_ttl_s: float = Field(300.0, gt=0)  # a lock not renewed for this long is stale
    debug: DebugConfig = Field(default_factory=DebugConfig)

    @field_validator("preset")
    @classmethod
    def _check_preset(cls, v: str) -> str:
        if v not in ibc.PRESETS:
            raise ValueError(f"unknown preset {v!r}; choose one of {sorted(ibc.PRESETS)}")
        return v

    @field_validator("input", "output")
    @classmethod
    def _check_uri(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty")
        return v.strip()

    @model_validator(mode="after")
    def _check_encoders(self) -> JobConfig:
        for kind in self.encoders:
            try:
                self.encoder(kind)
            except ValidationError as e:
                msg = "; ".join(err["msg"] for err in e.errors())
                raise ValueError(f"encoders.{kind}: {msg}") from None
        return self

    def encoder(self, kind: str) -> EncoderConfig:
        """The effective encoder settings of `kind`: defaults with its overrides applied."""
        base = self.encoder_defaults.model_dump()
        over = self.encoders.get(kind)  # type: ignore[call-overload]
        if over is None or over.num_gpus is None:
            base["num_gpus"] *= SMALL_ENCODER_GPU_SHARE.get(kind, 1.0)
        if over is not None:
            base.update({k: v for k, v in over.model_dump().items() if v is not None})
        gpu = base["num_gpus"] > 0
        if base["batch_size"] is None:
            base["batch_size"] = (
                DEFAULT_ENCODER_BATCH_GPU[kind] if gpu else DEFAULT_ENCODER_BATCH_CPU
            )
        if base["dtype"] == "auto":
            from imagebind_core.checkpoint import auto_dtype  # torch: only when asked for

            device = base["device"] if base["device"] != "auto" else ("cuda" if gpu else "cpu")
            base["dtype"] = auto_dtype(device)
        return EncoderConfig(**base)

    def model_spec(self, kind: str) -> ibc.ModelSpec:
        """The model `kind` is embedded with: its identity, dtype, device and preprocessing."""
        enc = self.encoder(kind)
        return ibc.ModelSpec(
            preset=self.preset,
            checkpoint=self.checkpoint,
            sha256=self.checkpoint_sha256,
            dtype=enc.dtype,
            device=enc.model_device,
            seed=self.seed,
            normalize=self.normalize,
            options={k: dict(v) for k, v in self.preprocess.options.items()},
            limits=dict(self.preprocess.limits),
            storage_options=self.storage_options() if self.checkpoint else None,
        )

    def preprocess_batch(self, kind: str) -> int:
        """Items per preprocessing task of `kind` (its encoder's device picks the default)."""
        return self.preprocess.batch_size_for(kind, gpu=self.encoder(kind).num_gpus > 0)

    def storage_options(self) -> dict[str, Any]:
        """fsspec storage options for S3 URIs."""
        return self.storage.options()


def _set_dotted(d: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    cur = d
    for k in keys[:-1]:
        nxt = cur.get(k)
        if nxt is None:
            nxt = cur[k] = {}
        elif not isinstance(nxt, dict):
            raise ConfigError(f"{dotted}: {k!r} is not a section")
        cur = nxt
    cur[keys[-1]] = value


def _format_validation_error(e: ValidationError, source: str) -> str:
    lines = [f"invalid configuration ({source}):"]
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "<root>"
        msg = err["msg"]
        if err["type"] == "missing":
            msg = "required field is missing"
        elif err["type"] == "extra_forbidden":
            msg = "unknown field"
        given = err.get("input")
        shown = (
            "" if err["type"] in ("missing",) or isinstance(given, dict) else f" (got {given!r})"
        )
        lines.append(f"  {loc}: {msg}{shown}")
    return "\n".join(lines)


def load_config(
    path: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> JobConfig:
    """Read a YAML config (optional) and apply dotted-key overrides (`encoders.vision.batch_size`).

    Raises:
        ConfigError: unreadable YAML, or any invalid field (named in the message).
    """
    data: dict[str, Any] = {}
    source = path or "flags"
    if path is not None:
        if not os.path.exists(path):
            raise ConfigError(f"config file not found: {path}")
        try:
            with open(path) as f:
                loaded = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of fields")
        data = loaded
    for k, v in (overrides or {}).items():
        if v is not None:
            _set_dotted(data, k, v)
    try:
        return JobConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, source)) from None
