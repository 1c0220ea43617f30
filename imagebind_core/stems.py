"""Per-modality stems: model input -> (N, L, D) tokens (patch/token embedding, cls, positions).

Token grids come from config arithmetic (no dummy forward), so stems build on the meta device.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from imagebind_core.config import StemConfig


def interpolate_pos_embed(
    pos_embed: torch.Tensor, num_patches: int, grid: tuple[int, ...], num_cls: int, image: bool
) -> torch.Tensor:
    """Resample learned positions for an off-nominal token count, as the reference does.

    Only square spatial grids are supported (the reference asserts the same). For a grid with
    several frames and a single image input, the first frame's positions are used.
    """
    n = pos_embed.shape[1] - num_cls
    if n == num_patches:
        return pos_embed
    if len(grid) < 2 or grid[-1] != grid[-2]:
        raise ValueError(
            f"input gives {num_patches} patches but this stem was built for {n} on a "
            f"non-square grid {grid}; positional interpolation needs a square grid"
        )
    cls_pos, patch_pos = pos_embed[:, :num_cls], pos_embed[:, num_cls:]
    if len(grid) == 3 and grid[0] > 1:
        if not image:
            raise ValueError("temporal positional interpolation is not supported")
        patch_pos = patch_pos[:, : grid[1] * grid[2]]  # the first frame's positions
        n = grid[1] * grid[2]
        if n == num_patches:
            return torch.cat([cls_pos, patch_pos], dim=1)
    dim = pos_embed.shape[-1]
    side = int(math.sqrt(n))
    dtype = patch_pos.dtype
    patch_pos = patch_pos.float().reshape(1, side, side, dim).permute(0, 3, 1, 2)
    patch_pos = F.interpolate(
        patch_pos, scale_factor=math.sqrt(num_patches / n), mode="bicubic"
    )  # (1, D, side', side')
    patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, -1, dim).to(dtype)
    return torch.cat([cls_pos, patch_pos], dim=1)


class PatchStem(nn.Module):
    """Images (N, C, H, W) / video (N, C, T, H, W) / spectrograms -> (N, 1 + P, D).

    rgbt (vision): a single frame is repeated to 2 frames, then a bias-free Conv3d with
    kernel = stride = (T, P, P). audio/depth/thermal: a bias-free Conv2d and a LayerNorm
    (eps 1e-5) on the patch tokens. Then the cls token is prepended and positions are added.
    """

    def __init__(self, cfg: StemConfig, dim: int, device=None, dtype=None) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.cfg = cfg
        conv = nn.Conv3d if cfg.kind == "rgbt" else nn.Conv2d
        self.proj = conv(
            cfg.in_channels, dim, cfg.kernel_size, stride=cfg.strides, bias=False, **dd
        )
        self.norm = nn.LayerNorm(dim, **dd) if cfg.stem_norm else None
        self.cls_token = nn.Parameter(torch.empty(1, 1, dim, **dd)) if cfg.cls_token else None
        self.pos_embed = nn.Parameter(torch.empty(1, cfg.num_tokens(), dim, **dd))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        image = x.ndim == 4
        if self.cfg.kind == "rgbt":
            if image:
                x = x.unsqueeze(2)  # (N, C, 1, H, W)
            if x.shape[2] == 1:
                # The reference turns an image into a 2-frame video by repetition.
                x = x.expand(-1, -1, 2, -1, -1)
        x = self.proj(x).flatten(2).transpose(1, 2)  # (N, P, D), row-major over the grid
        if self.norm is not None:
            x = self.norm(x)
        num_patches = x.shape[1]
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # (N, 1+P, D)
        pos = interpolate_pos_embed(
            self.pos_embed, num_patches, self.cfg.grid(), int(self.cls_token is not None), image
        )
        return x + pos


class TextStem(nn.Module):
    """Token ids (N, L) -> (N, L, D): token embedding + learned positions, L <= 77 (the
    model drops padding after the last end-of-text token before the stem)."""

    def __init__(self, cfg: StemConfig, dim: int, device=None, dtype=None) -> None:
        super().__init__()
        # An explicit, uninitialised weight: nn.Embedding's own normal_ init is wasted (weights
        # come from a checkpoint or `init_random_weights`) and, on the meta device, imports
        # torch._dynamo, which every encoder actor would pay for at start-up.
        weight = torch.empty(cfg.vocab_size, dim, device=device, dtype=dtype)
        self.token_embedding = nn.Embedding(cfg.vocab_size, dim, _weight=weight)
        self.pos_embed = nn.Parameter(
            torch.empty(1, cfg.context_length, dim, device=device, dtype=dtype)
        )

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.token_embedding(ids) + self.pos_embed[:, : ids.shape[-1]]


class ImuStem(nn.Module):
    """IMU (N, 6, T) -> (N, 1 + T/8, D): non-overlapping 8-step windows, each flattened
    channel-major to 48 values, a bias-free Linear, LayerNorm (eps 1e-5), cls, positions."""

    def __init__(self, cfg: StemConfig, dim: int, device=None, dtype=None) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.window = cfg.kernel_size[0]
        self.proj = nn.Linear(cfg.in_channels * self.window, dim, bias=False, **dd)
        self.norm = nn.LayerNorm(dim, **dd)
        self.cls_token = nn.Parameter(torch.empty(1, 1, dim, **dd))
        self.pos_embed = nn.Parameter(torch.empty(1, cfg.num_tokens(), dim, **dd))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N = x.shape[0]
        x = x.unfold(-1, self.window, self.window)  # (N, C, W, 8)
        x = x.permute(0, 2, 1, 3).reshape(N, x.shape[2], -1)  # (N, W, C*8) channel-major
        x = self.norm(self.proj(x))
        x = torch.cat([self.cls_token.expand(N, -1, -1), x], dim=1)  # (N, 1+W, D)
        return x + self.pos_embed


def build_stem(cfg: StemConfig, dim: int, device=None, dtype=None) -> nn.Module:
    if cfg.kind == "text":
        return TextStem(cfg, dim, device, dtype)
    if cfg.kind == "imu":
        return ImuStem(cfg, dim, device, dtype)
    return PatchStem(cfg, dim, device, dtype)
