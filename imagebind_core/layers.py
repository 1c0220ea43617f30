"""The transformer shared by all six trunks: pre-norm blocks of SDPA attention + GELU MLP.

Parameter names follow `nn.MultiheadAttention` (`in_proj_weight`, `in_proj_bias`, `out_proj`,
`bias_k`, `bias_v`) so the reference trunk weights load unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from imagebind_core.config import TrunkConfig

# The reference's block/head LayerNorms use eps 1e-6; its stem LayerNorms use PyTorch's 1e-5.
LN_EPS = 1e-6


class Attention(nn.Module):
    """(B, L, D) -> (B, L, D) multi-head self-attention through SDPA.

    With `bias_kv`, one learned key and one learned value vector (in projected space) are
    appended as an extra last key/value position (the reference's `add_bias_kv=True`).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        bias_kv: bool = False,
        causal: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.num_heads = num_heads
        self.causal = causal
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim, **dd))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * dim, **dd))
        self.out_proj = nn.Linear(dim, dim, **dd)
        if bias_kv:
            self.bias_k = nn.Parameter(torch.empty(1, 1, dim, **dd))
            self.bias_v = nn.Parameter(torch.empty(1, 1, dim, **dd))
        else:
            self.bias_k = self.bias_v = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        H = self.num_heads
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.expand(B, 1, D)], dim=1)  # (B, L+1, D)
            v = torch.cat([v, self.bias_v.expand(B, 1, D)], dim=1)
        q = q.view(B, L, H, D // H).transpose(1, 2)  # (B, H, L, Dh)
        k = k.view(B, k.shape[1], H, D // H).transpose(1, 2)  # (B, H, Lk, Dh)
        v = v.view(B, v.shape[1], H, D // H).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)  # (B, H, L, Dh)
        y = y.transpose(1, 2).reshape(B, L, D)
        return self.out_proj(y)


class Mlp(nn.Module):
    """(B, L, D) -> (B, L, D): Linear(D, rD) -> exact GELU -> Linear(rD, D)."""

    def __init__(self, dim: int, hidden: int, device=None, dtype=None) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, device=device, dtype=dtype)
        self.fc2 = nn.Linear(hidden, dim, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm_1(x)), then x + mlp(norm_2(x))."""

    def __init__(self, cfg: TrunkConfig, device=None, dtype=None) -> None:
        super().__init__()
        D = cfg.embed_dim
        self.attn = Attention(D, cfg.num_heads, cfg.bias_kv, cfg.causal, device, dtype)
        self.norm_1 = nn.LayerNorm(D, eps=LN_EPS, device=device, dtype=dtype)
        self.mlp = Mlp(D, cfg.mlp_ratio * D, device, dtype)
        self.norm_2 = nn.LayerNorm(D, eps=LN_EPS, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm_1(x))
        return x + self.mlp(self.norm_2(x))


class Transformer(nn.Module):
    """(B, L, D) tokens -> (B, L, D): optional pre-LayerNorm, then `num_blocks` blocks.

    The reference's stochastic depth (`cfg.drop_path`) is a training-time regulariser and is
    not applied: this is an inference package, outputs equal the reference in eval mode.
    """

    def __init__(self, cfg: TrunkConfig, device=None, dtype=None) -> None:
        super().__init__()
        self.pre_norm = (
            nn.LayerNorm(cfg.embed_dim, eps=LN_EPS, device=device, dtype=dtype)
            if cfg.pre_norm
            else None
        )
        self.blocks = nn.ModuleList(Block(cfg, device, dtype) for _ in range(cfg.num_blocks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pre_norm is not None:
            x = self.pre_norm(x)
        for block in self.blocks:
            x = block(x)
        return x
