"""`AppArgs`, the typed arguments of the Serve application, and the deployment options in it.

`AppArgs` is what `serve run serve.app:app key=value ...` and the `args:` block of a Serve
config YAML are validated into. Everything an operator can set lives here, so the documentation
of a field and its check sit together.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

import imagebind_core as ibc
from imagebind_core.kinds import Kind, ModelModality
from serve.schemas import ALL_KINDS, MODEL_MODALITIES

PositiveInt = Annotated[int, Field(ge=1)]
# Serve's default interval of autoscaling metric reports (AutoscalingConfig.metrics_interval_s).
SERVE_METRICS_INTERVAL_S = 10.0


class EncoderOptions(BaseModel):
    """Settings of one `encoder-{modality}` deployment.

    The defaults fit a 2-core laptop: a quarter CPU per replica, so that seven deployments and
    the ingress fit in two logical CPUs (Serve asks for 1 CPU per replica by default, which
    leaves autoscaled replicas STARTING forever on small machines).
    """

    model_config = ConfigDict(extra="forbid")

    max_batch_size: PositiveInt = 16
    # 0: a lone request runs at once, yet batches still form under load, because Serve's
    # batcher takes everything that queued while the previous batch computed (the benchmark's
    # batching gain). Where compute is short next to arrival gaps (GPUs), a few ms fill batches.
    batch_wait_timeout_s: float = Field(default=0.0, ge=0.0)
    min_replicas: int = Field(
        default=1,
        ge=0,
        description="0: scale to zero when idle (no replica, no GPU held); the first request "
        "after idling waits up to replica_wait_timeout_s for a replica to start, else 503.",
    )
    max_replicas: PositiveInt = 1
    target_ongoing_requests: float | None = Field(
        default=None,
        gt=0,
        description="Chunks in flight per replica (at a replica or waiting for one) that the "
        "autoscaler aims at, averaged over look_back_period_s: above it replicas are added, "
        "below it removed. None: max_batch_size, i.e. scale up once replicas run full batches "
        "(with one-input requests); lower it for latency, raise it to pack GPUs.",
    )
    upscale_delay_s: float = Field(
        default=30.0, ge=0, description="Load must stay above target this long to add replicas."
    )
    downscale_delay_s: float = Field(
        default=600.0,
        ge=0,
        description="Load must stay below target this long to remove replicas (not the last).",
    )
    downscale_to_zero_delay_s: float | None = Field(
        default=None,
        ge=0,
        description="With min_replicas 0: idle time before the last replica stops; None: "
        "downscale_delay_s.",
    )
    look_back_period_s: float = Field(
        default=30.0,
        gt=0,
        description="Window the autoscaler averages the load over; above metrics_interval_s.",
    )
    metrics_interval_s: float | None = Field(
        default=None,
        gt=0,
        description="How often callers report this deployment's load to Serve's controller "
        "(Serve's 10 s when None). Shorter reacts faster, a scale-up can wait this long; Serve "
        "2.60 marks the field deprecated (a warning) but it is the knob it honours.",
    )
    replica_wait_timeout_s: float = Field(
        default=30.0,
        gt=0,
        description="Longest a chunk waits for a replica to take it (one starting from zero, "
        "or all busy) before the request is answered 503 with Retry-After.",
    )
    num_cpus: float = Field(default=0.25, ge=0)
    num_gpus: float = Field(default=0.0, ge=0)
    memory_bytes: int | None = Field(default=None, ge=0, description="Ray memory request.")
    max_ongoing_requests: PositiveInt = 32
    max_queued_requests: int = Field(
        default=256,
        ge=-1,
        description="Requests (chunks of at most max_batch_size inputs) waiting per caller "
        "beyond max_ongoing_requests; -1 is unbounded (not recommended). Past it: 503.",
    )
    torch_threads: PositiveInt | None = Field(
        default=None, description="torch.set_num_threads in the replica; None keeps Ray's."
    )
    health_check_period_s: float = Field(default=5.0, gt=0)

    def target(self) -> float:
        """`target_ongoing_requests`, or `max_batch_size` when unset."""
        return self.target_ongoing_requests or float(self.max_batch_size)

    @model_validator(mode="after")
    def _check(self) -> EncoderOptions:
        interval = self.metrics_interval_s or SERVE_METRICS_INTERVAL_S
        if self.look_back_period_s <= interval:
            # Serve 2.60 warns and will refuse it: the window would hold under one report.
            raise ValueError(
                f"look_back_period_s ({self.look_back_period_s}) must be above "
                f"metrics_interval_s ({interval})"
            )
        if self.max_replicas < self.min_replicas:
            raise ValueError(
                f"max_replicas ({self.max_replicas}) is below min_replicas ({self.min_replicas})"
            )
        if self.max_ongoing_requests < self.max_batch_size:
            # Serve's batching guide: a replica never sees more than max_ongoing_requests
            # calls at once, so smaller values cap every batch below max_batch_size.
            raise ValueError(
                f"max_ongoing_requests ({self.max_ongoing_requests}) must be at least "
                f"max_batch_size ({self.max_batch_size}) or batches can never fill"
            )
        return self


class IngressOptions(BaseModel):
    """Settings of the HTTP ingress deployment (parsing, decoding, preprocessing)."""

    model_config = ConfigDict(extra="forbid")

    min_replicas: int = Field(default=1, ge=0)
    max_replicas: PositiveInt = 1
    target_ongoing_requests: float = Field(default=16.0, gt=0)
    num_cpus: float = Field(default=0.25, ge=0)
    max_ongoing_requests: PositiveInt = 128
    max_queued_requests: int = Field(default=512, ge=-1)
    preprocess_threads: PositiveInt = Field(
        default=4,
        description="Threads decoding and preprocessing inputs in each ingress replica; they "
        "overlap with encoding, so a model replica never waits on a decoder. A request queues "
        "at most this many of its inputs at a time, so concurrent requests' inputs interleave.",
    )
    max_held_input_bytes: PositiveInt = Field(
        default=1024**3,
        description="Preprocessed inputs each ingress replica holds at once, over all its "
        "requests, from decoding until their vectors are back (a still image 150 KB, an audio "
        "clip 313 KB, a video 18 MB). A request waits, first come first served, until its "
        "inputs fit (within its deadline: else 504); one larger than this runs alone. The "
        "replica's memory grows by about 3x this at most: the batches stacked for the encoders "
        "and their object-store copies come on top (benchmarks/bench_serve_memory.py).",
    )

    @model_validator(mode="after")
    def _check(self) -> IngressOptions:
        if self.max_replicas < self.min_replicas:
            raise ValueError(
                f"max_replicas ({self.max_replicas}) is below min_replicas ({self.min_replicas})"
            )
        return self


def _split_csv(value: Any) -> Any:
    """`a,b,c` from the `serve run` command line -> ["a", "b", "c"]."""
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return value


class AppArgs(BaseModel):
    """Arguments of the application builder `serve.app:app`.

    From the command line: `serve run serve.app:app preset=tiny modalities=text,vision`.
    From a config YAML: the `args:` mapping of the application (nested settings allowed).
    """

    model_config = ConfigDict(extra="forbid")

    # --- model: the same arguments as the offline job's --------------------------------------
    preset: str = Field(default="tiny", description="imagebind_core preset: huge, base, tiny.")
    checkpoint: str | None = Field(
        default=None,
        description="Checkpoint path or fsspec URL (file://, s3://, https://); None: seeded "
        "random weights (tests, demos).",
    )
    sha256: str | None = Field(default=None, description="Expected checkpoint SHA-256.")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] | None = Field(
        default=None,
        description="Encoder dtype; None: float32. auto: bfloat16 on GPU encoders and on CPUs "
        "with AMX / AVX-512 BF16, float32 on other CPUs (resolved when the app is built).",
    )
    device: str | None = Field(
        default=None,
        description="torch device for encoders: cpu, cuda; None picks cuda if "
        "the replica has a GPU, else cpu.",
    )
    seed: int = Field(default=0, description="Seed of random weights (checkpoint=None).")
    model_name: str | None = Field(
        default=None, description="Model id clients send; default imagebind-{preset}."
    )
    modalities: list[Kind] = Field(
        default_factory=lambda: list(ALL_KINDS),
        description="Request kinds to serve (comma-separated on the command line). One "
        "encoder deployment is started per model input they need.",
    )
    # --- deployments -------------------------------------------------------------------------
    encoder: EncoderOptions = Field(
        default_factory=EncoderOptions, description="Settings of every encoder deployment."
    )
    encoders: dict[ModelModality, dict[str, Any]] = Field(
        default_factory=dict,
        description="Per-modality overrides of `encoder`, e.g. {vision: {num_gpus: 0.5}}.",
    )
    ingress: IngressOptions = Field(default_factory=IngressOptions)
    # --- limits and safety -------------------------------------------------------------------
    api_key: str | None = Field(
        default=None, description="Bearer token clients must send; None disables auth."
    )
    api_key_env: str | None = Field(
        default=None,
        description="Name of an environment variable (of the ingress replica) holding the "
        "bearer token; keeps the secret out of config files. Used when api_key is None.",
    )
    max_body_bytes: PositiveInt = Field(default=32 * 1024 * 1024, description="Else 413.")
    body_min_rate: PositiveInt = Field(
        default=32 * 1024,
        description="Bytes/s a request body must keep up after its first 5 s, else 408: a "
        "stalled upload holds an ingress slot that other requests wait for.",
    )
    max_inputs: PositiveInt = Field(default=64, description="Inputs per request, else 400.")
    max_input_bytes: PositiveInt = Field(
        default=16 * 1024 * 1024, description="Decoded bytes of one media input, else 400."
    )
    request_timeout_s: float = Field(
        default=60.0, gt=0, description="Deadline of one request inside the ingress, else 504."
    )
    retry_after_s: float = Field(default=1.0, ge=0, description="Retry-After sent with 503.")
    status_interval_s: float = Field(
        default=5.0,
        gt=0,
        description="How often each ingress replica reads replica counts from Serve's "
        "controller (for /readyz, the imagebind_deployment_replicas gauge).",
    )
    # --- object storage ----------------------------------------------------------------------
    s3_allowed_prefixes: list[str] = Field(
        default_factory=list,
        description="`s3://bucket/prefix/` URIs inputs may name; any other URI is refused "
        "before anything is fetched. Empty: no URI inputs at all.",
    )
    s3_endpoint_url: str | None = None
    s3_region: str | None = None
    s3_anon: bool = False
    s3_connect_timeout_s: float = Field(default=ibc.S3_CONNECT_TIMEOUT_S, gt=0)
    s3_read_timeout_s: float = Field(
        default=ibc.S3_READ_TIMEOUT_S,
        gt=0,
        description="Longest wait for the next bytes of an S3 response.",
    )
    s3_max_attempts: int = Field(
        default=ibc.S3_MAX_ATTEMPTS, ge=1, description="Attempts per S3 request."
    )
    # --- search ------------------------------------------------------------------------------
    index_uri: str | None = Field(
        default=None,
        description="A published index; enables POST /v1/search, the search page and its "
        "media endpoints.",
    )
    search_vectors_cache: str | None = Field(
        default=None,
        description="Local folder where search replicas keep the re-ranking vectors of an "
        "index on object storage (a subfolder per search group), memory-mapped "
        "from there: a replica then holds the pages its queries read instead of every "
        "vector in memory, at the cost of the same bytes of local disk. Empty: in memory. "
        "A local index_uri is always memory-mapped where it is.",
    )
    # --- search page (GET /ui/) --------------------------------------------------------------
    media_local_dirs: list[str] = Field(
        default_factory=list,
        description="Local folders whose files GET /v1/media and /v1/thumbnail may read, for "
        "an index of local files (the demo's); s3:// items are read only under "
        "s3_allowed_prefixes. Empty: no local file is ever served.",
    )
    thumbnail_cache_bytes: int = Field(
        default=64 * 1024 * 1024,
        ge=0,
        description="Bytes of thumbnails each ingress replica keeps (least recently used "
        "dropped first); 0 disables the cache.",
    )
    search_groups: int = Field(
        default=1,
        ge=1,
        description="Search deployments the index shards are spread over (group g serves "
        "shards s with s % search_groups == g); above 1 a `search` fan-out merges them.",
    )

    _split_modalities = field_validator(
        "modalities", "s3_allowed_prefixes", "media_local_dirs", mode="before"
    )(_split_csv)

    @field_validator("media_local_dirs")
    @classmethod
    def _local_dirs(cls, v: list[str]) -> list[str]:
        import os

        out = []
        for d in v:
            if "://" in d and not d.startswith("file://"):
                raise ValueError(f"media_local_dirs: {d!r} is not a local folder")
            # Symlinks resolved here and in each request's path: a link inside cannot point out.
            out.append(os.path.realpath(d.removeprefix("file://")))
        return out

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, v: str) -> str:
        from imagebind_core.config import get_config

        get_config(v)  # raises naming the known presets
        return v

    @field_validator("modalities")
    @classmethod
    def _nonempty(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("serve at least one modality")
        return list(dict.fromkeys(v))  # de-duplicated, order kept

    @field_validator("s3_allowed_prefixes")
    @classmethod
    def _prefixes(cls, v: list[str]) -> list[str]:
        out = []
        for p in v:
            if not p.startswith("s3://") or len(p) <= len("s3://"):
                raise ValueError(f"allowed prefix {p!r} is not an s3://bucket/... URI")
            # A prefix is a folder: `s3://b/x` must not also allow `s3://b/x-secret/...`.
            out.append(p if p.endswith("/") else p + "/")
        return out

    @model_validator(mode="after")
    def _check(self) -> AppArgs:
        for m in self.encoders:
            self.encoder_options(m)  # raises with the field's name on a bad override
        if self.device is not None and self.device.startswith("cuda"):
            for m in self.model_modalities():
                if self.encoder_options(m).num_gpus <= 0:
                    raise ValueError(
                        f"device={self.device!r} but encoder-{m} asks for no GPU (num_gpus=0); "
                        "Ray hides GPUs from replicas that do not request one"
                    )
        return self

    # --- derived -----------------------------------------------------------------------------
    def served_model(self) -> str:
        """The model id of this endpoint."""
        return self.model_name or f"imagebind-{self.preset}"

    def model_modalities(self) -> list[str]:
        """The encoder deployments this app needs, in the model's order."""
        needed = {str(ibc.model_modality(k)) for k in self.modalities}
        return [m for m in MODEL_MODALITIES if m in needed]

    def encoder_options(self, modality: str) -> EncoderOptions:
        """`encoder` with the overrides of `encoders[modality]` applied (validated)."""
        override = self.encoders.get(modality)  # type: ignore[call-overload]
        if not override:
            return self.encoder
        try:
            return EncoderOptions.model_validate({**self.encoder.model_dump(), **override})
        except ValueError as e:
            raise ValueError(f"encoders.{modality}: {e}") from None

    def storage_options(self) -> dict[str, Any]:
        """fsspec options for s3:// inputs and the index (credentials from the AWS chain)."""
        return ibc.s3_storage_options(
            endpoint_url=self.s3_endpoint_url,
            region=self.s3_region,
            anon=self.s3_anon,
            connect_timeout_s=self.s3_connect_timeout_s,
            read_timeout_s=self.s3_read_timeout_s,
            max_attempts=self.s3_max_attempts,
        )
