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

from dataclasses import asdict, dataclass, replace
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.s4 import S4, ChannelDropout, S4Config


@dataclass
class ViS4merConfig:
    d_input: int = 1024  # feature dim of the frozen encoder
    l_max: int = 11820  # tokens per example (LVU: 60 s x 197)
    d_model: int = 1024
    n_layers: int = 3  # number of stages; 0 = mean-pooled features straight into the head
    d_state: int = 64
    kernel: str = "nplr"  # nplr (ViS4mer) | diag (S4D)
    disc: str = "bilinear"  # diag only
    init: str | None = None  # nplr: legs; diag: lin (default) | inv
    bidirectional: bool = False
    dropout: float = 0.2
    prenorm: bool = True
    # pooling schedule, one entry per stage (None: the ViS4mer default for every stage)
    pool: list[int] | None = None  # time pooling factor (default 2)
    pool_type: list[str] | None = None  # avg | max (default avg)
    width_div: list[int] | None = None  # width reduction divisor (default 2)
    task: str = "classification"  # classification | regression
    num_classes: int = 4  # ignored for regression (1 output)

    def s4_config(self) -> S4Config:
        init = self.init or ("legs" if self.kernel == "nplr" else "lin")
        return S4Config(d_state=self.d_state, kernel=self.kernel, disc=self.disc, init=init,
                        dropout=self.dropout, bidirectional=self.bidirectional)

    def schedule(self) -> list[dict]:
        """Per-stage shapes; raises ValueError naming the first stage that cannot be built."""
        n = self.n_layers
        if n < 0:
            raise ValueError(f"n_layers={n}: expected >= 0")
        for name in ("pool", "pool_type", "width_div"):
            v = getattr(self, name)
            if v is not None and len(v) != n:
                raise ValueError(f"{name} has {len(v)} entries but n_layers={n}: expected one per stage")
        pool = self.pool or [2] * n
        ptype = self.pool_type or ["avg"] * n
        div = self.width_div or [2] * n
        L, D, out = self.l_max, self.d_model, []
        for i in range(n):
            if pool[i] < 1:
                raise ValueError(f"stage {i}: pooling factor {pool[i]}: expected >= 1")
            if ptype[i] not in ("avg", "max"):
                raise ValueError(f"stage {i}: pool_type {ptype[i]!r}: expected 'avg' or 'max'")
            if L // pool[i] < 1:
                raise ValueError(
                    f"stage {i}: pooling length {L} by {pool[i]} leaves no time step; "
                    "use fewer stages or smaller pooling factors"
                )
            if div[i] < 1 or D % div[i]:
                raise ValueError(f"stage {i}: width {D} is not divisible by width_div {div[i]}")
            out.append(dict(length=L, width=D, pool=pool[i], pool_type=ptype[i], width_out=D // div[i]))
            L, D = L // pool[i], D // div[i]
        return out

    def validate(self) -> None:
        for name in ("d_input", "l_max", "d_model"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: expected a positive integer")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout}: expected 0 <= dropout < 1")
        if self.task not in ("classification", "regression"):
            raise ValueError(f"task={self.task!r}: expected 'classification' or 'regression'")
        if self.task == "classification" and self.num_classes < 2:
            raise ValueError(f"num_classes={self.num_classes}: expected >= 2 for classification")
        self.s4_config().validate()
        self.schedule()

    @property
    def d_output(self) -> int:
        return self.num_classes if self.task == "classification" else 1

    def to_dict(self) -> dict:
        return asdict(self)


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
