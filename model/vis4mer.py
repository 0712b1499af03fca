"""ViS4mer: a multi-scale S4 decoder over frozen-Transformer video features (spec section 2).

    x: (B, L, d_input)
    input projection only when d_input != d_model
    for each stage i (width D_i, length L_i):
        x = x + Dropout2d(S4(LayerNorm(x)))          # prenorm, residual around the S4 only
        x = Pool_i(x)                                # over time, factor f_i, avg|max, drops a remainder
        x = GELU(Linear(D_i -> D_i / r_i)(x))        # per position
    x = mean over time -> Linear(-> num_classes or 1)

The pooling schedule (factor, type and width reduction per stage) is what sweeps vary; with the
defaults (factor 2, avg, reduction 2, 3 stages, d_model 1024) the structure and parameter count
are the released model's, minus its never-applied input projection.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from vis4mer.model.config import ViS4merConfig
from vis4mer.model.s4 import S4, ChannelDropout


class S4Residual(nn.Module):
    """x + Dropout2d(S4(LayerNorm(x))) (prenorm) or LayerNorm(x + Dropout2d(S4(x)))."""

    def __init__(self, width: int, length: int, cfg: ViS4merConfig):
        super().__init__()
        self.prenorm = cfg.prenorm
        self.norm = nn.LayerNorm(width)
        self.s4 = S4(width, length, cfg.s4_config())
        self.dropout = ChannelDropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, L, D) -> (B, L, D)
        if self.prenorm:
            return x + self.dropout(self.s4(self.norm(x)))
        return self.norm(x + self.dropout(self.s4(x)))


class Stage(nn.Module):
    """A sequence mixer block, then time pooling and a width-reducing Linear + GELU."""

    def __init__(self, block: nn.Module, width: int, width_out: int, pool: int, pool_type: str):
        super().__init__()
        self.block = block
        self.pool, self.pool_type = pool, pool_type
        self.linear = nn.Linear(width, width_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block(x)  # (B, L, D)
        if self.pool > 1:
            pool = F.avg_pool1d if self.pool_type == "avg" else F.max_pool1d
            x = pool(x.transpose(1, 2), self.pool).transpose(1, 2)  # (B, L // f, D)
        return F.gelu(self.linear(x))  # (B, L // f, D / r)


BlockFactory = Callable[[int, int, ViS4merConfig], nn.Module]  # (width, length, cfg) -> block


class ViS4mer(nn.Module):
    def __init__(self, cfg: ViS4merConfig, block: BlockFactory = S4Residual):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        # The released code builds this Linear even when d_input == d_model and never applies it.
        self.encoder = nn.Linear(cfg.d_input, cfg.d_model) if cfg.d_input != cfg.d_model else nn.Identity()
        stages = cfg.schedule()
        self.stages = nn.ModuleList(
            Stage(block(s["width"], s["length"], cfg), s["width"], s["width_out"], s["pool"], s["pool_type"])
            for s in stages
        )
        d_last = stages[-1]["width_out"] if stages else cfg.d_model
        self.decoder = nn.Linear(d_last, cfg.d_output)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, L, d_input) -> logits (B, num_classes) or predictions (B, 1)."""
        if x.dim() != 3 or x.shape[-1] != self.cfg.d_input:
            raise ValueError(f"input of shape {tuple(x.shape)}: expected (batch, length, {self.cfg.d_input})")
        x = self.encoder(x)
        for stage in self.stages:
            x = stage(x)
        return self.decoder(x.mean(dim=1))  # (B, D_last) -> (B, d_output)


# --- named variants (timm style) --------------------------------------------------------------

VARIANTS: dict[str, ViS4merConfig] = {
    # LVU: 60 one-second frames x 197 ViT-L/16 tokens of 1024
    "vis4mer_lvu": ViS4merConfig(d_input=1024, l_max=60 * 197, num_classes=4),
    # Breakfast / COIN: 64 Video Swin-B segments x 49 tokens of 1024
    "vis4mer_breakfast": ViS4merConfig(d_input=1024, l_max=64 * 49, num_classes=10),
    "vis4mer_coin": ViS4merConfig(d_input=1024, l_max=64 * 49, num_classes=180),
    # small, for demos and tests on CPU
    "vis4mer_tiny": ViS4merConfig(d_input=64, l_max=256, d_model=64, n_layers=2, d_state=16, num_classes=2),
}


def list_variants() -> list[str]:
    return sorted(VARIANTS)


def variant_config(name: str, **overrides) -> ViS4merConfig:
    if name not in VARIANTS:
        raise KeyError(f"unknown model variant {name!r}: expected one of {', '.join(list_variants())}")
    return replace(VARIANTS[name], **overrides)


def create_model(name: str, **overrides) -> ViS4mer:
    return ViS4mer(variant_config(name, **overrides))
