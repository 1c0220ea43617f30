"""ImageBind: one encoder per modality (stem -> trunk -> head -> post), no cross-modal mixing.

Forward semantics equal the reference's `ImageBindModel.forward` in eval mode:

| key     | accepted input shapes                                  | output        |
|---------|--------------------------------------------------------|---------------|
| vision  | (B,3,H,W) image; (B,S,3,H,W) or (B,S,3,T,H,W) clips     | (B, D)        |
| text    | (B,77) int64 token ids                                 | (B, D)        |
| audio   | (B,1,128,204); (B,S,1,128,204) clips                   | (B, D)        |
| depth   | (B,1,H,W); (B,S,1,H,W) views                           | (B, D)        |
| thermal | (B,1,H,W); (B,S,1,H,W) views                           | (B, D)        |
| imu     | (B,6,2000)                                             | (B, D)        |

A tensor with a clip axis S is encoded as B*S items whose outputs are averaged over S after
normalisation and scaling (so video/audio outputs are shorter than their scale). The raw output
is unit-length for vision and unit-length times a fixed or learned scale for the other
modalities; `normalize=True` returns unit-length vectors for retrieval instead.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import zlib
from collections.abc import Iterable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from imagebind_core.config import EncoderConfig, ImageBindConfig, get_config
from imagebind_core.kinds import Modality
from imagebind_core.layers import LN_EPS, Transformer
from imagebind_core.stems import build_stem

log = logging.getLogger(__name__)

# Per-item rank (without batch or clip axes) -> whether an extra leading axis is a clip axis.
# The reference decides by `ndim >= 5`; we check the exact allowed ranks and explain failures.
_ITEM_RANKS: dict[Modality, tuple[int, ...]] = {
    Modality.VISION: (3,),  # (3,H,W); clips: (S,3,H,W) or (S,3,T,H,W)
    Modality.TEXT: (1,),
    Modality.AUDIO: (3,),
    Modality.DEPTH: (3,),
    Modality.THERMAL: (3,),
    Modality.IMU: (2,),
}


def text_lengths(ids: torch.Tensor) -> torch.Tensor:
    """Token ids (..., L) -> (...,) int64: how many leading tokens determine each text's
    embedding — through its end-of-text token (the first largest id, as the head pools).
    Tokens after it are padding the causal text trunk never lets reach that token."""
    return ids.argmax(dim=-1) + 1


class Head(nn.Module):
    """(N, L, D) tokens -> (N, out): select one token, LayerNorm, bias-free projection."""

    def __init__(self, select: str, dim: int, out_dim: int, device=None, dtype=None) -> None:
        super().__init__()
        self.select = select
        self.norm = nn.LayerNorm(dim, eps=LN_EPS, device=device, dtype=dtype)
        self.proj = nn.Linear(dim, out_dim, bias=False, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        if self.select == "eot":
            # The end-of-text token has the largest id; first occurrence, as the reference.
            x = x[torch.arange(x.shape[0], device=x.device), ids.argmax(dim=-1)]  # (N, D)
        else:
            x = x[:, 0]  # (N, D) cls token
        return self.proj(self.norm(x))


class Post(nn.Module):
    """(N, out) -> (N, out): L2-normalise, then multiply by min(exp(log_scale), max)."""

    def __init__(self, logit_scale: float | None, max_scale: float, device=None, dtype=None):
        super().__init__()
        self.max_scale = max_scale
        if logit_scale is None:
            self.log_logit_scale = None
        else:
            self.register_buffer(
                "log_logit_scale", torch.empty((), device=device, dtype=dtype), persistent=True
            )
            self.init_log_logit_scale = math.log(logit_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(x, dim=-1)
        if self.log_logit_scale is not None:
            x = x * self.log_logit_scale.exp().clamp(max=self.max_scale)
        return x


class Encoder(nn.Module):
    """One modality's tower: model input (N, ...) -> (N, out_embed_dim) reference output."""

    def __init__(self, cfg: EncoderConfig, out_dim: int, device=None, dtype=None) -> None:
        super().__init__()
        D = cfg.trunk.embed_dim
        self.cfg = cfg
        self.stem = build_stem(cfg.stem, D, device, dtype)
        self.trunk = Transformer(cfg.trunk, device, dtype)
        self.head = Head(cfg.head.select, D, out_dim, device, dtype)
        self.post = Post(cfg.post.logit_scale, cfg.post.max_scale, device, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.trunk(self.stem(x))  # (N, L, D)
        return self.post(self.head(tokens, x if self.cfg.head.select == "eot" else None))


class ImageBindModel(nn.Module):
    """The six (or a requested subset of) ImageBind encoders behind one dict-in/dict-out call."""

    def __init__(
        self,
        config: ImageBindConfig,
        modalities: Iterable[Modality | str] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        mods = tuple(Modality) if modalities is None else tuple(Modality(m) for m in modalities)
        if not mods:
            raise ValueError("at least one modality is required")
        self.encoders = nn.ModuleDict(
            {m.value: Encoder(config.encoder(m), config.out_embed_dim, device, dtype) for m in mods}
        )
        self.checkpoint: str | None = None
        self.checkpoint_sha256: str = "random"
        self._compiled: dict[str, nn.Module] = {}

    @property
    def modalities(self) -> tuple[Modality, ...]:
        return tuple(Modality(m) for m in self.encoders)

    @property
    def embed_dim(self) -> int:
        return self.config.out_embed_dim

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def lineage(self) -> dict[str, str]:
        """What produced an embedding: for Parquet metadata, API responses, index versions."""
        from imagebind_core import __version__

        return {
            "preset": self.config.name,
            "checkpoint": self.checkpoint or "random",
            "checkpoint_sha256": self.checkpoint_sha256,
            "dtype": str(self.dtype).removeprefix("torch."),
            "embed_dim": str(self.embed_dim),
            "package_version": __version__,
        }

    def compile(self, **kwargs) -> ImageBindModel:  # type: ignore[override]
        """Compile each encoder with `torch.compile` (optional; CPU or CUDA)."""
        for name, enc in self.encoders.items():
            self._compiled[name] = torch.compile(enc, **kwargs)
        return self

    def encode(
        self, modality: Modality | str, x: torch.Tensor, *, normalize: bool = False
    ) -> torch.Tensor:
        """Encode one modality's batch; see the module docstring for shapes."""
        m = Modality(modality)
        if m.value not in self.encoders:
            raise ValueError(
                f"modality {m.value!r} is not loaded; this model has "
                f"{[x.value for x in self.modalities]}"
            )
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{m.value}: expected a tensor, got {type(x).__name__}")
        item_rank = _ITEM_RANKS[m][0]
        clips = x.ndim == item_rank + 2 or (m == Modality.VISION and x.ndim == item_rank + 3)
        if x.ndim != item_rank + 1 and not clips:
            raise ValueError(f"{m.value}: unexpected input shape {tuple(x.shape)}")
        cfg = self.config.encoder(m)
        if m == Modality.TEXT and cfg.trunk.causal and cfg.head.select == "eot":
            # Drop the columns after the batch's last end-of-text token before the trunk runs.
            # Exact, not an approximation: the trunk is causal, so no position attends to a
            # later one, and the head reads only each row's EOT. Captions are far shorter than
            # 77 tokens (a 10-word caption is 13), and the job's length-sorted batches
            # (pipelines.stages) keep a batch's longest caption close to its others.
            keep = int(text_lengths(x).max()) if x.numel() else x.shape[-1]
            x = x[..., :keep]
        dev = self.device
        if dev.type == "cuda" and x.device.type == "cpu":
            # Host batch -> GPU from pinned memory, asynchronously: the host goes on launching
            # kernels while the copy runs (a plain copy of pageable memory blocks it); the
            # figures are in benchmarks/results/gpu-h200.md. PyTorch's pinned-block cache keeps
            # the buffer alive until the copy is done.
            x = x.pin_memory().to(dev, non_blocking=True)
        if m == Modality.TEXT:
            x = x.to(dev, torch.long)
        else:
            x = x.to(dev, self.dtype)
        if clips:
            B, S = x.shape[:2]
            x = x.reshape(B * S, *x.shape[2:])  # (B*S, ...)
        enc = self._compiled.get(m.value, self.encoders[m.value])
        y = enc(x).float()  # (N, D); float32 out whatever the compute dtype
        if clips:
            y = y.reshape(B, S, -1).mean(dim=1)  # mean after normalise + scale, as the reference
        return F.normalize(y, dim=-1) if normalize else y

    def forward(
        self, inputs: Mapping[str, torch.Tensor], *, normalize: bool = False
    ) -> dict[str, torch.Tensor]:
        """`{modality: batch}` -> `{modality: (B, D) float32}`, in input order."""
        return {k: self.encode(k, v, normalize=normalize) for k, v in inputs.items()}


def _param_generator(seed: int, name: str) -> torch.Generator:
    # Seeded per parameter name: a text-only model gets the same text weights as a full one,
    # and every process/actor of a distributed job builds the same random model.
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)


@torch.no_grad()
def init_random_weights(model: ImageBindModel, seed: int = 0) -> None:
    """Deterministic random weights (CPU float32 draws, then cast) — a test/demo model."""
    for name, p in model.named_parameters():
        g = _param_generator(seed, name)
        leaf = name.rsplit(".", 1)[-1]
        if "norm" in name.split(".")[-2]:  # LayerNorms: norm, norm_1, norm_2, pre_norm
            p.fill_(1.0 if leaf == "weight" else 0.0)
        elif leaf in ("bias", "in_proj_bias"):
            p.zero_()
        elif leaf in ("cls_token", "bias_k", "bias_v"):
            p.copy_(torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5)
        else:  # projections, conv stems, embeddings, positions
            p.copy_(torch.randn(p.shape, generator=g).clamp_(-2, 2) * 0.02)
    for module in model.modules():
        if isinstance(module, Post) and module.log_logit_scale is not None:
            module.log_logit_scale.fill_(module.init_log_logit_scale)


# torch.nn.init functions that module constructors call in `reset_parameters`.
_INIT_FUNCTIONS = (
    "uniform_",
    "normal_",
    "trunc_normal_",
    "constant_",
    "ones_",
    "zeros_",
    "xavier_uniform_",
    "xavier_normal_",
    "kaiming_uniform_",
    "kaiming_normal_",
)
_init_lock = threading.Lock()


@contextlib.contextmanager
def _no_default_init() -> Iterator[None]:
    """Module constructors skip their own random init (as `transformers`' `no_init_weights`).

    Every model here gets its weights from a checkpoint or `init_random_weights`, so torch's
    default init is wasted work — and on meta tensors it runs Python decompositions that
    import sympy and torch._dynamo, a cost paid in every encoder actor's and replica's
    start-up. The patch is process-wide while held, hence the lock; nothing else
    here initialises modules concurrently.
    """
    with _init_lock:
        saved = {name: getattr(nn.init, name) for name in _INIT_FUNCTIONS}
        try:
            for name in _INIT_FUNCTIONS:
                setattr(nn.init, name, lambda tensor, *a, **k: tensor)
            yield
        finally:
            for name, fn in saved.items():
                setattr(nn.init, name, fn)


def build_model(
    config: ImageBindConfig | str = "huge",
    modalities: Iterable[Modality | str] | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    *,
    seed: int | None = 0,
) -> ImageBindModel:
    """Construct a model. `device="meta"` builds without memory; `seed=None` leaves weights
    uninitialised (for loading); otherwise weights are seeded random."""
    cfg = get_config(config)
    with _no_default_init():
        if str(device) == "meta" or seed is None:
            return ImageBindModel(cfg, modalities, device=device, dtype=dtype).eval()
        model = ImageBindModel(cfg, modalities, device="cpu")  # uninitialised, then seeded
    init_random_weights(model, seed)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)
