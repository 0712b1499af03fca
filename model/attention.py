"""The pure self-attention counterpart of ViS4mer, for the efficiency comparison.

Same stages, widths, pooling and head as `ViS4mer`; each S4 residual is replaced by a pre-norm
Transformer block: x + MHSA(LN(x)), then x + MLP(LN(x)). Two attention implementations:

* ``sdpa``:  torch.nn.functional.scaled_dot_product_attention (fused / memory-efficient kernels);
* ``naive``: softmax(Q K^T / sqrt(d)) V written out, materialising the (L, L) scores as in 2022.
"""
from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from vis4mer.model.vis4mer import ViS4mer, ViS4merConfig


class SelfAttention(nn.Module):
    def __init__(self, width: int, n_heads: int, impl: str):
        super().__init__()
        if impl not in ("sdpa", "naive"):
            raise ValueError(f"impl={impl!r}: expected 'sdpa' or 'naive'")
        if width % n_heads:
            raise ValueError(f"width {width} is not divisible by {n_heads} heads")
        self.n_heads, self.impl = n_heads, impl
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4)  # 3 x (B, h, L, d)
        if self.impl == "sdpa":
            y = F.scaled_dot_product_attention(q, k, v)
        else:
            att = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])  # (B, h, L, L)
            y = att.softmax(dim=-1) @ v  # (B, h, L, d)
        return self.proj(y.transpose(1, 2).reshape(B, L, D))


class AttentionResidual(nn.Module):
    """Pre-norm Transformer block: x + Drop(MHSA(LN(x))); x + Drop(MLP(LN(x)))."""

    def __init__(self, width: int, length: int, cfg: ViS4merConfig, impl: str = "sdpa",
                 head_dim: int = 64, mlp_ratio: int = 4):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = SelfAttention(width, max(1, width // head_dim), impl)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_ratio * width), nn.GELU(), nn.Linear(mlp_ratio * width, width))
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.norm1(x)))
        return x + self.drop(self.mlp(self.norm2(x)))


class SelfAttentionBaseline(ViS4mer):
    """ViS4mer's stages with attention in place of S4 (the kernel-related config fields are unused)."""

    def __init__(self, cfg: ViS4merConfig, impl: str = "sdpa", head_dim: int = 64, mlp_ratio: int = 4):
        super().__init__(cfg, block=partial(AttentionResidual, impl=impl, head_dim=head_dim, mlp_ratio=mlp_ratio))
        self.impl = impl
