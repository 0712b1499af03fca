"""The model's configs, plain dataclasses without torch: what ViS4mer and its S4 layer are built from.

Importing this module does not import torch, so configs can be checked where no model is built
(the `vis4mer` CLI validates every trial of a sweep before any Ray work). Bad values raise
ValueError naming the field and what was expected.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

SSM_LR = 1e-3  # the released recipe: SSM parameters at lr 1e-3, no weight decay


@dataclass
class S4Config:
    d_state: int = 64  # N, real state size (N/2 complex modes stored)
    kernel: str = "nplr"  # nplr | diag
    disc: str = "bilinear"  # diag only: zoh | bilinear (nplr is always bilinear)
    init: str = "legs"  # nplr: legs; diag: lin | inv
    dt_min: float = 1e-3
    dt_max: float = 1e-1
    dropout: float = 0.0
    bidirectional: bool = False
    ssm_lr: float | None = SSM_LR

    def validate(self, prefix: str = "") -> None:
        """Raises ValueError naming the field (`prefix` + name: a config that nests this one names its
        own keys, e.g. "model.d_state") and what was expected."""
        p = prefix
        if self.kernel not in ("nplr", "diag"):
            raise ValueError(f"{p}kernel={self.kernel!r}: expected 'nplr' or 'diag'")
        if self.d_state < 2 or self.d_state % 2:
            raise ValueError(f"{p}d_state={self.d_state}: expected an even number >= 2")
        if self.kernel == "diag" and self.disc not in ("zoh", "bilinear"):
            raise ValueError(f"{p}disc={self.disc!r}: expected 'zoh' or 'bilinear'")
        if self.kernel == "diag" and self.init not in ("lin", "inv"):
            raise ValueError(f"{p}init={self.init!r} for the diag kernel: expected 'lin' or 'inv'")
        if self.kernel == "nplr" and self.init != "legs":
            raise ValueError(f"{p}init={self.init!r} for the nplr kernel: expected 'legs'")
        if not 0.0 < self.dt_min <= self.dt_max:
            raise ValueError(f"{p}dt range [{self.dt_min}, {self.dt_max}]: expected 0 < dt_min <= dt_max")


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

    def schedule(self, prefix: str = "") -> list[dict]:
        """Per-stage shapes; raises ValueError naming the first stage that cannot be built (field names
        carry `prefix`, as in `validate`)."""
        p, n = prefix, self.n_layers
        stage = f"{p.rstrip('.')}: stage" if p else "stage"
        if n < 0:
            raise ValueError(f"{p}n_layers={n}: expected >= 0")
        for name in ("pool", "pool_type", "width_div"):
            v = getattr(self, name)
            if v is not None and len(v) != n:
                raise ValueError(f"{p}{name} has {len(v)} entries but {p}n_layers={n}: expected one per stage")
        pool = self.pool or [2] * n
        ptype = self.pool_type or ["avg"] * n
        div = self.width_div or [2] * n
        L, D, out = self.l_max, self.d_model, []
        for i in range(n):
            if pool[i] < 1:
                raise ValueError(f"{stage} {i}: pooling factor {pool[i]}: expected >= 1")
            if ptype[i] not in ("avg", "max"):
                raise ValueError(f"{stage} {i}: pool_type {ptype[i]!r}: expected 'avg' or 'max'")
            if L // pool[i] < 1:
                raise ValueError(
                    f"{stage} {i}: pooling length {L} by {pool[i]} leaves no time step; "
                    "use fewer stages or smaller pooling factors"
                )
            if div[i] < 1 or D % div[i]:
                raise ValueError(f"{stage} {i}: width {D} is not divisible by width_div {div[i]}")
            out.append(dict(length=L, width=D, pool=pool[i], pool_type=ptype[i], width_out=D // div[i]))
            L, D = L // pool[i], D // div[i]
        return out

    def validate(self, prefix: str = "") -> None:
        """Raises ValueError naming the first bad field (`prefix` + its name) and what was expected."""
        p = prefix
        for name in ("d_input", "l_max", "d_model"):
            if getattr(self, name) < 1:
                raise ValueError(f"{p}{name}={getattr(self, name)}: expected a positive integer")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"{p}dropout={self.dropout}: expected 0 <= dropout < 1")
        if self.task not in ("classification", "regression"):
            raise ValueError(f"{p}task={self.task!r}: expected 'classification' or 'regression'")
        if self.task == "classification" and self.num_classes < 2:
            raise ValueError(f"{p}num_classes={self.num_classes}: expected >= 2 for classification")
        self.s4_config().validate(p)
        self.schedule(p)

    @property
    def d_output(self) -> int:
        return self.num_classes if self.task == "classification" else 1

    def to_dict(self) -> dict:
        return asdict(self)
