"""Both jobs' configuration: pydantic models, loaded from YAML, overridable by flags.

`JobConfig` is everything `imagebind-embed` needs (`load_config`); a re-index config is the
same fields plus an `index:` section (`IndexSettings`, `load_reindex_config`). Both are read
by one loader (`read_config_file`, then `build_config` with the dotted-key overrides of the
flags). The same file runs on a laptop (local Ray, local folders) and on a cluster (`ray job
submit`, S3): only `input`/`output` URIs and resources change. Every field is documented in
docs/pipelines.md and docs/reindex.md. A bad field raises `ConfigError` with a message naming
the field and where its value came from.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

import imagebind_core as ibc
from imagebind_core.index import IndexOptions, join_uri
from imagebind_core.kinds import Kind
from imagebind_core.preprocess import PreprocessOptionError

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

    endpoint_url: str | None = Field(None, pattern=r"^https?://[^/\s]+")
    """MinIO, moto, Ceph, R2 ...: http(s)://host:port."""
    region: str | None = None
    key: str | None = None
    secret: str | None = None
    anon: bool = False
    # Each S3 request: seconds to connect, longest wait for the next bytes of a response, and
    # attempts (the first included). They bound how long a store that stops answering holds
    # one operation: about 5 x max_attempts x read_timeout_s (s3fs retries each timed-out call).
    connect_timeout_s: float = Field(ibc.S3_CONNECT_TIMEOUT_S, gt=0)
    read_timeout_s: float = Field(ibc.S3_READ_TIMEOUT_S, gt=0)
    max_attempts: int = Field(ibc.S3_MAX_ATTEMPTS, ge=1)

    def options(self) -> dict[str, Any]:
        """fsspec/s3fs storage options for these settings."""
        return ibc.s3_storage_options(**self.model_dump())


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
# task that Ray's fixed cost per task is small next to it (a caption tokenizes far faster than
# an image decodes, and a clip is slower still), and small enough that a shard splits into
# many tasks (parallel decoding, and encoder actors fed evenly). Per-item preprocessing times:
# benchmarks/bench_preprocess.py, benchmarks/results/preprocess-cpu-2core.txt.
DEFAULT_PREPROCESS_BATCH: dict[str, int] = {
    "vision": 16,
    "depth": 16,
    "thermal": 16,
    "video": 2,
    "audio": 8,
    "text": 128,
    "imu": 128,
}

# The same for kinds whose encoder runs on a GPU, which consumes items far faster than a CPU
# one: small tasks would leave each GPU task milliseconds of work and the driver dispatching
# tasks faster than it can. These give each encoder task tens of milliseconds of GPU work and
# each preprocessing task about a second of CPU (GPU rates: benchmarks/results/gpu-h200.md).
# Text gets more: a caption tokenizes in microseconds while Ray's costs per block (a task in
# each of preprocess, encode and write, their (de)serialisation, the driver's bookkeeping) do
# not depend on its rows; thousands of captions per block spread them thinly.
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
# items/s-vs-batch curve of an H200 in bf16 (benchmarks/results/gpu-h200.md), with
# activations of a few GB at most for huge in float32.
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
# not set `num_gpus` itself: these towers do a fraction of vision's work per item
# (benchmarks/results/gpu-h200.md), so one actor rarely fills a GPU and several share one.
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
    # Shard-reading tasks at once per kind; "auto": `resources.read_concurrency`.
    read_concurrency: Annotated[int, Field(gt=0)] | Literal["auto"] = "auto"
    # Memory reserved per preprocessing task (Ray scheduling), enough for one batch of decoded
    # media; it also keeps this stage a separate operator from the encoder.
    memory_mb: int = Field(512, gt=0)
    # Overrides of imagebind_core.Limits fields, e.g. {max_bytes: 50000000}.
    limits: dict[str, int | float] = Field(default_factory=dict)
    # Per-kind preprocessing options passed to imagebind_core.preprocess, e.g.
    # {depth: {input: disparity}}.
    options: dict[Kind, dict[str, Any]] = Field(default_factory=dict)
    # Where each kind is decoded: "cpu" (default) in these tasks, the exact path; "gpu" (vision
    # only): JPEG files travel as bytes and the encoder actor decodes, resizes and crops them
    # on its device (nvJPEG on CUDA); other files take the CPU path. See docs/pipelines.md.
    decode: dict[Kind, Literal["cpu", "gpu"]] = Field(default_factory=dict)
    # Import the decoders (and build the tokenizer) in the worker processes that will
    # preprocess, as soon as Ray is up, without waiting for it (`pipelines.warmup`). Off by
    # default: on 2 cores it cost CPU without a shorter start-up
    # (benchmarks/results/warmup-cpu-2core.txt); not measured on a GPU node yet.
    warm_workers: bool = False

    @field_validator("decode")
    @classmethod
    def _check_decode(cls, v: dict[str, str]) -> dict[str, str]:
        for kind, where in v.items():
            if where == "gpu" and kind not in ibc.DEVICE_DECODE_KINDS:
                raise ValueError(
                    f"decode.{kind}: gpu decoding exists for {list(ibc.DEVICE_DECODE_KINDS)} only"
                )
        return v

    @field_validator("options")
    @classmethod
    def _check_options(cls, v: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        # Here, not per item: a bad option would fail every item of its kind into _errors/
        # and the job would still exit 0 (its output then refuses the corrected config).
        for kind, opts in v.items():
            try:
                ibc.preprocess.check_options(kind, opts)
            except PreprocessOptionError as e:
                raise ValueError(str(e)) from None
        return v

    @field_validator("limits")
    @classmethod
    def _check_limits(cls, v: dict[str, int | float]) -> dict[str, int | float]:
        try:
            ibc.Limits(**v)
        except TypeError as e:
            raise ValueError(f"unknown limit: {e}") from None
        return v

    def batch_size_for(self, kind: str, gpu: bool = False) -> int:
        """Items per preprocessing task for `kind`: `batch_sizes`, else `batch_size`, else
        the kind's default for an encoder on CPU or (`gpu`) on a GPU."""
        default = (DEFAULT_PREPROCESS_BATCH_GPU if gpu else DEFAULT_PREPROCESS_BATCH)[kind]
        return self.batch_sizes.get(kind) or self.batch_size or default  # type: ignore[call-overload]


class EncoderPoolConfig(_Strict):
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
    # "auto": sized from the cluster when the job starts (`resources.pool_size`): one actor per
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
    # Batches sent to one actor at a time; None: 1 on CPU (an idle actor never waits behind a
    # busy one), on a GPU two per call the actor runs at once: a CUDA actor runs two, and two
    # more wait at the actor, so the GPU has work while Ray Data sends the next ones (a
    # stand-in accelerator kept busier: benchmarks/results/feed-standin-2core.md).
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
        """Batches sent to one actor at a time (see `max_tasks_in_flight`)."""
        return self.max_tasks_in_flight or (2 * self.concurrent_batches if self.num_gpus > 0 else 1)

    @model_validator(mode="after")
    def _check_pool(self) -> EncoderPoolConfig:
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
    # Ray Data's progress bars; "auto": drawn when stderr is a terminal, off otherwise (the
    # job's own progress lines, `progress_interval_s`, are logged either way).
    progress_bars: bool | Literal["auto"] = "auto"
    # Arrow's allocator in the driver and in this job's Ray workers (`pipelines.embed.ensure_ray`).
    # None: ARROW_DEFAULT_MEMORY_POOL if set, else jemalloc (mimalloc, pyarrow's default, grows
    # large string buffers by copying: benchmarks/results/arrow-memory-pool-2core.md).
    arrow_memory_pool: Literal["jemalloc", "mimalloc", "system"] | None = None

    def bars(self) -> bool:
        """Whether Ray Data draws its progress bars in this process."""
        return sys.stderr.isatty() if self.progress_bars == "auto" else self.progress_bars


class DebugConfig(_Strict):
    """Diagnostics used by the crash/resume tests; off by default."""

    trace_path: str | None = None  # local file: one line "<pid> <id>" per item preprocessed
    delay_per_item_s: float = Field(0.0, ge=0)  # sleep per item in preprocessing (slow runs)
    # Encoders that run no model (zero embeddings): the pipeline's own ceiling
    # (benchmarks/bench_pipeline.py --null-encoder). Never for real output.
    null_encoder: bool = False
    # With null_encoder: each model batch also holds its actor's one compute slot for this
    # many seconds per item, asleep (no CPU), after copying the batch into a host buffer as a
    # CUDA actor stages it: a stand-in for an accelerator of known speed, to measure how well
    # the pipeline feeds one (benchmarks/bench_feed.py).
    null_encoder_item_s: float = Field(0.0, ge=0)
    # Local file: one line "<pid> <start> <end> <items>" per stand-in batch (its busy time).
    null_encoder_log_path: str | None = None
    actor_trace_path: str | None = None  # local file: one line "<pid> <kind> <GPU ids>" per actor
    # Local file: encoder actors start loading the model only once it is not empty, then append
    # "load <kind>" (with trace_path the same file: proves reads overlap the model load).
    load_gate_path: str | None = None
    # Local file: worker warm-up tasks start only once it is not empty (up to 300 s), so a
    # test can prove that the job never waits for them.
    warm_gate_path: str | None = None

    @model_validator(mode="after")
    def _check_stand_in(self) -> DebugConfig:
        # The stand-in is part of the null encoder: alone, it would silently do nothing.
        if not self.null_encoder:
            for name in ("null_encoder_item_s", "null_encoder_log_path"):
                if getattr(self, name):
                    raise ValueError(f"{name} needs null_encoder: true")
        return self


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
    encoder_defaults: EncoderPoolConfig = Field(default_factory=EncoderPoolConfig)
    encoders: dict[Kind, EncoderOverride] = Field(default_factory=dict)
    ray: RayConfig = Field(default_factory=RayConfig)
    lock_ttl_s: float = Field(300.0, gt=0)  # a lock not renewed for this long is stale
    # Seconds between the job's progress lines (items read, preprocessed, embedded, committed).
    progress_interval_s: float = Field(10.0, gt=0)
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

    def encoder(self, kind: str) -> EncoderPoolConfig:
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
        return EncoderPoolConfig(**base)

    def model_spec(self, kind: str) -> ibc.ModelSpec:
        """The model `kind` is embedded with: its identity, dtype, device and preprocessing."""
        enc = self.encoder(kind)
        return ibc.ModelSpec(
            preset=self.preset,
            checkpoint=self.checkpoint,
            checkpoint_sha256=self.checkpoint_sha256,
            dtype=enc.dtype,
            device=enc.model_device,
            seed=self.seed,
            normalize=self.normalize,
            options={k: dict(v) for k, v in self.preprocess.options.items()},
            limits=dict(self.preprocess.limits),
            decode=dict(self.preprocess.decode),
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


# Parts of a pydantic error location that name a union member or a dict key's check rather than
# a field (`max_actors.constrained-int`, `max_actors.literal['auto']`, `batch_sizes.x.[key]`).
_PYDANTIC_TAG = re.compile(r"^(\[key\]|constrained-\w+|\w+(-\w+)*\[.*\]|int|float|str|bool|none)$")
# Ready-to-use settings a message can point at, by the kind of value a field holds.
_EXAMPLES: dict[str, str] = {
    "preprocess.batch_sizes": "preprocess.batch_sizes.text=2",
    "preprocess.limits": "preprocess.limits.max_bytes=50000000",
    "preprocess.options": "preprocess.options.depth.input=disparity",
    "files.extensions": "files.extensions.dat=imu",
    "webdataset.extensions": "webdataset.extensions.caption.txt=text",
    "encoders": "encoders.vision.batch_size=64",
}


def _user_message(err: Any) -> str:
    """One pydantic error in a user's terms (no type or validator names)."""
    kind, ctx = err["type"], err.get("ctx") or {}
    if kind == "missing":
        return "required field is missing"
    if kind == "literal_error":
        expected = str(ctx.get("expected", ""))
        if " or " not in expected:
            return f"must be {expected}"
        return f"must be one of {expected}".replace(" or ", ", ")
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        op = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<"}.get(kind, "<=")
        bound = next(iter(ctx.values()), "")
        return f"must be a number {op} {bound}"
    if kind in ("int_parsing", "int_type", "int_from_float"):
        return "must be a whole number"
    if kind in ("float_parsing", "float_type"):
        return "must be a number"
    if kind in ("bool_parsing", "bool_type"):
        return "must be true or false"
    if kind in ("string_type",):
        return "must be a string"
    if kind in ("dict_type", "model_type", "model_attributes_type"):
        return "must be a section of fields (a mapping)"
    if kind == "list_type":
        return "must be a list"
    msg = str(err["msg"])
    return msg.removeprefix("Value error, ")


def _field_names(model: Any, loc: tuple[str, ...]) -> list[str]:
    """The fields of the section at `loc` of the pydantic `model` (empty if not a section)."""
    for part in loc:
        if getattr(model, "__origin__", None) is dict:  # `part` is a key: go to the values
            model = model.__args__[1]
            continue
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        model = field.annotation
        members = getattr(model, "__args__", ())
        if getattr(model, "__origin__", None) is not dict and members:  # X | None
            model = next((a for a in members if hasattr(a, "model_fields")), model)
    return sorted(getattr(model, "model_fields", {}))


def _describe_errors(
    e: ValidationError, prefix: tuple[str, ...] = (), model: Any = None
) -> dict[str, list[str]]:
    """Field path -> what is wrong with it (union members' messages merged, the value once)."""
    out: dict[str, list[str]] = {}
    given: dict[str, str] = {}
    for err in e.errors():
        loc = prefix + tuple(str(p) for p in err["loc"] if not _PYDANTIC_TAG.match(str(p)))
        name = ".".join(loc) or "<root>"
        if err["type"] == "extra_forbidden":
            known = _field_names(model or JobConfig, loc[len(prefix) : -1])
            close = difflib.get_close_matches(loc[-1], known, n=1)
            msg = "unknown field" + (f"; did you mean {close[0]!r}?" if close else "")
            if known and not close:
                msg += f" (fields: {', '.join(known)})"
        else:
            msg = _user_message(err)
            if err["type"] != "missing" and not isinstance(err.get("input"), dict):
                given[name] = f" (got {err.get('input')!r})"
        if err["type"] in ("dict_type", "model_type") or err["loc"][-1:] == ("[key]",):
            example = next((x for k, x in _EXAMPLES.items() if name.startswith(k)), None)
            if example:
                msg += f"; set one key at a time, e.g. --set {example}"
        msgs = out.setdefault(name, [])
        if msg not in msgs:
            msgs.append(msg)
    return {name: [" or ".join(msgs) + given.get(name, "")] for name, msgs in out.items()}


def _origin(name: str, path: str | None, sources: Mapping[str, str]) -> str:
    """Where the value of field `name` came from: a flag, or the config file."""
    for key, flag in sources.items():
        if name == key or name.startswith(key + ".") or key.startswith(name + "."):
            return flag
    return path or "the defaults"


def format_validation_error(
    e: ValidationError,
    path: str | None,
    sources: Mapping[str, str] | None = None,
    prefix: tuple[str, ...] = (),
    model: Any = None,
) -> str:
    """A validation error as one line per bad field, each naming where its value came from
    (`path` or the flag in `sources`, a map of dotted key -> flag). `model` (default
    `JobConfig`) validated the section at `prefix`: its fields are suggested for a typo."""
    lines = ["invalid configuration:"]
    for name, msgs in _describe_errors(e, prefix, model).items():
        where = _origin(name, path, sources or {})
        lines.append(f"  {name}: {msgs[0]} [from {where}]")
    return "\n".join(lines)


def read_config_file(path: str) -> dict[str, Any]:
    """The mapping of fields in a YAML config file; ConfigError if it is not one."""
    if not os.path.exists(path):
        raise ConfigError(f"config file not found: {path}")
    try:
        with open(path) as f:
            loaded = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    except (IsADirectoryError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not a YAML config file: {e}") from None
    if loaded is None:
        loaded = {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of fields")
    return loaded


def build_config(
    data: dict[str, Any],
    overrides: Mapping[str, Any] | None = None,
    path: str | None = None,
    sources: Mapping[str, str] | None = None,
) -> JobConfig:
    """`data` (a config file's fields) with dotted-key `overrides` applied, validated.

    `path` and `sources` (dotted key -> the flag that set it) name where a bad value came
    from in the error. Raises ConfigError.
    """
    data = dict(data)
    for k, v in (overrides or {}).items():
        if v is not None:
            _set_dotted(data, k, v)
    try:
        return JobConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, path, sources)) from None


def load_config(
    path: str | None = None,
    overrides: dict[str, Any] | None = None,
    sources: Mapping[str, str] | None = None,
) -> JobConfig:
    """Read a YAML config (optional) and apply dotted-key overrides (`encoders.vision.batch_size`).

    `sources` maps override keys to the flag that set them, for error messages.

    Raises:
        ConfigError: unreadable YAML, or any invalid field (named in the message, with where
            its value came from).
    """
    data = read_config_file(path) if path is not None else {}
    return build_config(data, overrides, path, sources)


# ----------------------------------------------------------------------------- re-index


class MilvusSettings(BaseModel):
    """`index.milvus`: the optional Milvus sink (`pipelines.milvus_sink`); absent = off."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    uri: str = Field(min_length=1)
    """Milvus server URI: `http://host:19530`, `https://…` (Zilliz Cloud), `unix:/path.sock`."""
    collection: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,200}$")
    """Collection the sink owns (letters, digits, `_`; not starting with a digit); created
    on the first run, with a side collection `<collection>_imagebind_state`."""
    token: str | None = Field(None, repr=False)
    """`user:password` or an API key; null: no authentication."""
    batch_size: int = Field(1000, ge=1, le=100_000)
    """Rows per upsert request."""
    index_type: str = Field("AUTOINDEX", pattern=r"^[A-Z_]+$")
    """The vector index the sink creates (`AUTOINDEX`: the server's choice; `FLAT`: exact)."""


class IndexSettings(BaseModel):
    """The `index:` section of a re-index config (the rest is an `imagebind-embed` config)."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    root: str
    """Index root URI: a local folder or s3://bucket/prefix."""
    keep_versions: int = Field(3, ge=1)
    """Published versions retention keeps."""
    lock_ttl_s: float = Field(600.0, gt=0)
    """Lease of the re-index lock; renewed every third of it."""
    retry_failed: bool = False
    """Retry items that failed in the parent although unchanged."""
    full: bool = False
    """Re-embed everything this run."""
    allow_empty: bool = False
    """Publish an empty version when the input exists but holds no items (every item deleted).
    Off by default: an emptied folder or prefix is more often a mistake than a corpus, and
    publishing it would empty the index."""
    flat_threshold: int = Field(20_000, ge=1)
    """Modalities with fewer vectors get an exact flat index."""
    pq_threshold: int = Field(200_000, ge=1)
    """Modalities with at least this many vectors get IVF-PQ (below: IVF-Flat)."""
    nlist: int | None = Field(None, ge=1)
    """IVF lists (default ~4 sqrt(n))."""
    nprobe: int = Field(32, ge=1)
    """IVF lists searched per query."""
    diff_on_ray_rows: int = Field(1_000_000, ge=0)
    """Parents with at least this many rows (failures included) are diffed on Ray
    Data, so the driver never holds their rows; smaller ones on the driver.
    0: always on Ray Data."""
    diff_partitions: int | None = Field(None, ge=1)
    """Hash partitions of the Ray Data diff (default one per 2 million rows, at least 2)."""
    pq_m: int = Field(64, ge=1)
    """IVF-PQ code bytes per vector."""
    rerank: Annotated[int, Field(ge=0)] | Literal["auto"] = "auto"
    """IVF-PQ: re-score rerank x top_k candidates with stored float vectors (0: off, no float
    vectors stored). "auto": each IVF-PQ modality's depth is measured when its index is built
    (the smallest reaching `recall_target` on the index's own vectors) and kept by updates."""
    recall_target: float = Field(0.95, gt=0, le=1)
    """The recall@10 against exact search that `rerank: auto` chooses its depth for."""
    shards: int = Field(1, ge=1)
    """Index shards (by id hash)."""
    retrain_growth: float = Field(4.0, gt=1)
    """Rebuild (retrain) an IVF modality when its size leaves [trained / g, trained * g]."""
    retrain_drift: float = Field(0.05, ge=0)
    """Rebuild an IVF modality when the vectors added since training fit its coarse quantizer
    worse, by more than this mean cosine, than vectors held out of its training did."""
    max_segments: int = Field(8, ge=1)
    """Merge an index shard's newest segments when an update would leave it more segments."""
    compact_deleted: float = Field(0.25, ge=0, le=1)
    """Merge all of a shard's segments when more than this fraction of it is deleted."""
    compact_rows: bool = True
    """Compact the root's rows and failures Lance datasets after each run's commit, where
    due (small fragments merged by size tier, half-deleted fragments rewritten); false:
    leave them as appended (e.g. when you compact them yourself)."""
    milvus: MilvusSettings | None = None
    """Apply each version's change to a Milvus collection after the publish; null: off."""

    def index_options(self) -> IndexOptions:
        """The `imagebind_core.index.IndexOptions` these settings describe (the fields of both
        with the same name; IndexOptions' others keep their defaults)."""
        names = [
            f.name for f in dataclasses.fields(IndexOptions) if f.name in type(self).model_fields
        ]
        return IndexOptions(**{n: getattr(self, n) for n in names})


@dataclass(frozen=True)
class ReindexConfig:
    """The embedding job's settings (`JobConfig`; its `output` is set per version) + `index`."""

    job: JobConfig
    index: IndexSettings


def load_reindex_config(
    path: str | None = None,
    overrides: dict[str, Any] | None = None,
    sources: Mapping[str, str] | None = None,
) -> ReindexConfig:
    """Read a YAML re-index config: `imagebind-embed` fields plus an `index:` section.

    `overrides` are dotted keys as for `pipelines.config.load_config`; keys under `index.` go
    to the index section; `sources` maps them to the flag that set them (for error messages).
    `output` may be omitted (each version's folder is the job's output). Raises ConfigError
    naming the bad field and where its value came from.
    """
    data = read_config_file(path) if path is not None else {}
    index = dict(data.pop("index", None) or {})
    job_over: dict[str, Any] = {}
    for k, v in (overrides or {}).items():
        if v is None:
            continue
        if k.startswith("index."):
            index[k[len("index.") :]] = v
        else:
            job_over[k] = v
    try:
        settings = IndexSettings.model_validate(index)
    except ValidationError as e:
        msg = format_validation_error(e, path, sources, prefix=("index",), model=IndexSettings)
        raise ConfigError(msg) from None
    data.setdefault("output", join_uri(settings.root, "versions", "_unused"))
    return ReindexConfig(build_config(data, job_over, path, sources), settings)
