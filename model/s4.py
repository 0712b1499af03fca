"""The S4 layer as ViS4mer uses it, with two kernels chosen by config.

Block (spec section 3):  y = causal_conv(K, u) + D*u  ->  GELU  ->  Dropout2d  ->  Linear(H -> H)

Kernels (each an nn.Module with `forward(L) -> (c, H, L)` and `recurrence() -> (Abar, Bbar, C, out)`):
* ``nplr``: ViS4mer's own. HiPPO-LegS as diag(Lambda) - P Q^*, bilinear, Lambda shared by all
  channels, C~ trained directly (so the kernel is tied to ``l_max``).
* ``diag``: S4D, ZOH or bilinear, S4D-Lin or S4D-Inv.

Convolution mode is an FFT convolution zero-padded to 2L (linear, not circular). Recurrent mode
(`default_state`, `step`) runs the same SSM one step at a time in constant memory; over a sequence
no longer than the kernel it equals the convolution exactly.

Parameters with optimiser hints carry a `_optim` dict ({"lr": .., "weight_decay": ..}), as in
state-spaces/s4; `model.optim.param_groups` turns them into AdamW groups.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from vis4mer.model.config import S4Config
from vis4mer.model.fftconv import fast_fft_length, fft_conv
from vis4mer.model.hippo import legs_nplr, s4d_init
from vis4mer.model.s4_kernels import discretize_diag, kernel_diag, kernel_nplr

__all__ = ["S4", "S4Config", "kernel_nplr", "kernel_diag", "ChannelDropout"]

def _hint(p: nn.Parameter, lr: float | None) -> nn.Parameter:
    p._optim = {"weight_decay": 0.0} | ({"lr": lr} if lr is not None else {})
    return p


def _c(x: torch.Tensor) -> torch.Tensor:
    """Stored (..., 2) real view -> complex."""
    return torch.view_as_complex(x)


def _init_log_dt(H: int, cfg: S4Config) -> torch.Tensor:
    lo, hi = math.log(cfg.dt_min), math.log(cfg.dt_max)
    return torch.rand(H) * (hi - lo) + lo  # dt log-uniform in [dt_min, dt_max]


class NPLRKernel(nn.Module):
    """ViS4mer's kernel: Lambda (N/2, shared), [B, P] and [C~.., Q] per channel, log_dt."""

    def __init__(self, H: int, l_max: int, cfg: S4Config, channels: int = 1):
        super().__init__()
        half = cfg.d_state // 2
        Lam, P, B = legs_nplr(cfg.d_state)
        self.H, self.l_max, self.channels = H, l_max, channels
        self.Lambda = _hint(nn.Parameter(torch.view_as_real(Lam.to(torch.cfloat)).clone()), cfg.ssm_lr)  # (N/2, 2)
        BP = torch.stack([B, P]).to(torch.cfloat)[:, None, :].expand(2, H, half)  # (2, H, N/2)
        self.BP = _hint(nn.Parameter(torch.view_as_real(BP).clone()), cfg.ssm_lr)
        C = torch.randn(channels, H, half, dtype=torch.cfloat)  # C~: complex normal
        CQ = torch.cat([C, BP[1:2]])  # Q = P at init: (channels + 1, H, N/2)
        self.CQ = nn.Parameter(torch.view_as_real(CQ).clone())  # global lr / weight decay
        self.log_dt = _hint(nn.Parameter(_init_log_dt(H, cfg)), cfg.ssm_lr)

    def params(self):
        BP, CQ = _c(self.BP), _c(self.CQ)
        return torch.exp(self.log_dt), _c(self.Lambda), BP[0], BP[1], CQ[:-1], CQ[-1]

    def forward(self, L: int) -> torch.Tensor:
        if L > self.l_max:
            raise ValueError(
                f"sequence length {L} exceeds this nplr layer's l_max={self.l_max} "
                "(its trained C~ is tied to l_max); build the model with a larger l_max"
            )
        dt, Lam, B, P, C, Q = self.params()
        return kernel_nplr(dt, Lam, B, P, C, Q, self.l_max)[..., :L]  # (c, H, L)

    @torch.no_grad()
    def recurrence(self):
        """Dense conjugate-augmented recurrence (float64): Abar (H, N, N), Bbar (H, N), C (c, H, N)
        with K_l = Re(C^* Abar^l Bbar), where C = (I - Abar^l_max)^-* C~."""
        dt, Lam, B, P, Ct, Q = (t.detach().to(torch.complex128 if t.is_complex() else torch.float64)
                                for t in self.params())
        H, half = B.shape
        aug = lambda t: torch.cat([t, t.conj()], -1)
        A = torch.diag_embed(aug(Lam.expand(H, half))) - aug(P)[:, :, None] * aug(Q).conj()[:, None, :]
        eye = torch.eye(2 * half, dtype=A.dtype)
        inv = torch.linalg.inv(eye - dt[:, None, None] / 2 * A)
        Abar = inv @ (eye + dt[:, None, None] / 2 * A)
        Bbar = dt[:, None] * (inv @ aug(B)[..., None])[..., 0]
        AL = torch.linalg.matrix_power(Abar, self.l_max)
        M = (eye - AL).conj().transpose(-1, -2)  # (H, N, N)
        C = torch.linalg.solve(M.unsqueeze(0), aug(Ct)[..., None])[..., 0]  # (c, H, N)
        return Abar, Bbar, C, "re"


class DiagKernel(nn.Module):
    """S4D: A = -exp(log_A_real) + i A_imag, B, C (N/2 complex each, per channel), log_dt."""

    def __init__(self, H: int, l_max: int, cfg: S4Config, channels: int = 1):
        super().__init__()
        half = cfg.d_state // 2
        A = s4d_init(cfg.d_state, cfg.init).to(torch.cfloat)
        self.H, self.l_max, self.channels, self.disc = H, l_max, channels, cfg.disc
        self.log_A_real = _hint(nn.Parameter(torch.log(-A.real).repeat(H, 1)), cfg.ssm_lr)  # (H, N/2)
        self.A_imag = _hint(nn.Parameter(A.imag.repeat(H, 1)), cfg.ssm_lr)
        self.B = _hint(nn.Parameter(torch.view_as_real(torch.ones(H, half, dtype=torch.cfloat)).clone()), cfg.ssm_lr)
        self.C = nn.Parameter(torch.view_as_real(torch.randn(channels, H, half, dtype=torch.cfloat)).clone())
        self.log_dt = _hint(nn.Parameter(_init_log_dt(H, cfg)), cfg.ssm_lr)

    def params(self):
        A = torch.complex(-torch.exp(self.log_A_real), self.A_imag)
        return torch.exp(self.log_dt), A, _c(self.B), _c(self.C)

    def forward(self, L: int) -> torch.Tensor:
        dt, A, B, C = self.params()
        return kernel_diag(dt, A, B, C, L, self.disc)  # (c, H, L)

    @torch.no_grad()
    def recurrence(self):
        dt, A, B, C = (t.detach().to(torch.complex128 if t.is_complex() else torch.float64) for t in self.params())
        Abar, Bbar, _ = discretize_diag(dt, A, B, self.disc)
        return Abar, Bbar, C, "2re"  # diagonal: Abar (H, N/2)


class ChannelDropout(nn.Module):
    """Dropout2d semantics on (B, L, H): zeroes whole channels for all time steps."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = torch.empty(x.shape[0], 1, x.shape[-1], device=x.device, dtype=x.dtype).bernoulli_(1 - self.p)
        return x * keep.div_(1 - self.p)  # scale the (B, 1, H) mask, not the whole (B, L, H) tensor


class S4(nn.Module):
    """S4 block on (B, L, H) inputs.  H channels, each an independent SSM of state size d_state."""

    def __init__(self, H: int, l_max: int, cfg: S4Config | None = None):
        super().__init__()
        cfg = cfg or S4Config()
        cfg.validate()
        self.H, self.l_max, self.cfg = H, l_max, cfg
        channels = 2 if cfg.bidirectional else 1
        kernel_cls = NPLRKernel if cfg.kernel == "nplr" else DiagKernel
        self.kernel = kernel_cls(H, l_max, cfg, channels)
        self.D = nn.Parameter(torch.randn(H))
        self.dropout = ChannelDropout(cfg.dropout)
        self.output_linear = nn.Linear(H, H)
        self._recurrence = None

    def conv_kernel(self, L: int, n: int) -> torch.Tensor:
        """Real kernel for a length-n circular FFT convolution (n >= 2L): (H, L) causal taps, or
        (H, n) with the second kernel reversed on the circular lags -L..-1 (bidirectional)."""
        k = self.kernel(L)  # (c, H, L)
        if self.cfg.bidirectional:
            # as state-spaces/s4: tap n-m holds k1[m-1], i.e. lag -m (anti-causal)
            return F.pad(k[0], (0, n - L)) + F.pad(k[1].flip(-1), (n - L, 0))
        return k[0]

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        """u: (B, L, H) -> (B, L, H).

        Under autocast the kernel and the FFT convolution run in fp32 (autocast off: the kernel's
        Cauchy denominators and slow decays, and a convolution summing L terms, need fp32); the
        rest follows autocast, the convolution's output cast to its dtype (bf16) at once, so that
        GELU, dropout and the output Linear read and write half the bytes."""
        L = u.shape[1]
        n = fast_fft_length(2 * L)  # zero padding to >= 2L: linear, not circular, convolution
        dtype = torch.get_autocast_dtype(u.device.type) if torch.is_autocast_enabled(u.device.type) else u.dtype
        with torch.autocast(u.device.type, enabled=False):
            k = self.conv_kernel(L, n)  # (H, L) or (H, n), fp32
            # the D skip is the kernel's lag-0 tap: conv(u, k + D delta) = conv(u, k) + D u, without
            # two more passes over (B, H, L) each way
            k = torch.cat([k[:, :1] + self.D[:, None], k[:, 1:]], 1)
            # (B, H, L): u enters as a transposed view; the FFT's zero padding makes it contiguous
            y = fft_conv(u.transpose(1, 2), k, n)
        y = F.gelu(y.to(dtype)).transpose(1, 2)  # (B, L, H)
        return self.output_linear(self.dropout(y))

    # --- recurrent mode ---------------------------------------------------------------------

    def setup_step(self) -> None:
        """Cache the discrete recurrence (call again after the parameters change)."""
        if self.cfg.bidirectional:
            raise ValueError("a bidirectional S4 layer is not causal and has no recurrent mode")
        self._recurrence = self.kernel.recurrence()

    def default_state(self, batch: int, device=None) -> torch.Tensor:
        if self._recurrence is None:
            self.setup_step()
        n = self._recurrence[1].shape[-1]
        return torch.zeros(batch, self.H, n, dtype=torch.complex128, device=device)

    def step(self, u_t: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One time step: u_t (B, H) -> y_t (B, H); state (B, H, n) complex128."""
        if self._recurrence is None:
            self.setup_step()
        Abar, Bbar, C, out = self._recurrence
        u64 = u_t.to(torch.float64)
        if Abar.dim() == 3:  # dense (nplr): x = Abar x + Bbar u
            state = torch.einsum("hij,bhj->bhi", Abar, state) + Bbar * u64[..., None]
        else:  # diagonal
            state = Abar * state + Bbar * u64[..., None]
        y = (C[0].conj() * state).sum(-1).real if out == "re" else 2 * (C[0] * state).sum(-1).real
        y = (y + u64 * self.D.to(torch.float64)).to(u_t.dtype)
        y = F.gelu(y)
        return self.output_linear(self.dropout(y.unsqueeze(1))).squeeze(1), state
