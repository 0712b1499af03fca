"""Linear (non-circular) FFT convolution of a long signal with a per-channel kernel.

`fft_conv(u, k)` zero-pads to a 5-smooth FFT length n >= 2L (2L itself can have a large prime
factor: LVU's 2 * 11820 = 2^3 * 3 * 5 * 197, which makes FFTs ~2x slower), and has a hand-written
backward made of real FFTs (autograd's rfft backward goes through complex c2c transforms).
"""
from __future__ import annotations

import functools

import torch


@functools.cache
def fast_fft_length(n: int) -> int:
    """Smallest m >= n whose only prime factors are 2, 3 and 5."""
    m = n
    while True:
        r = m
        for p in (2, 3, 5):
            while r % p == 0:
                r //= p
        if r == 1:
            return m
        m += 1


class _FFTConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, k, n):
        U = torch.fft.rfft(u, n=n)  # (B, H, n/2+1)
        Kf = torch.fft.rfft(k, n=n)  # (H, n/2+1)
        ctx.save_for_backward(U, Kf)
        ctx.L, ctx.Lk, ctx.n = u.shape[-1], k.shape[-1], n
        return torch.fft.irfft(U * Kf, n=n)[..., : u.shape[-1]]

    @staticmethod
    def backward(ctx, g):
        U, Kf = ctx.saved_tensors
        G = torch.fft.rfft(g, n=ctx.n)  # (B, H, n/2+1); g is zero beyond L
        gu = gk = None
        if ctx.needs_input_grad[0]:
            gu = torch.fft.irfft(G * Kf.conj(), n=ctx.n)[..., : ctx.L]  # correlation with k
        if ctx.needs_input_grad[1]:
            gk = torch.fft.irfft((G * U.conj()).sum(0), n=ctx.n)[..., : ctx.Lk]  # correlation with u
        return gu, gk, None


def fft_conv(u: torch.Tensor, k: torch.Tensor, n: int | None = None) -> torch.Tensor:
    """u (B, H, L), k (H, Lk) -> (B, H, L): y_t = sum_s k_{(t - s) mod n} u_s.

    With Lk <= L and n >= 2L this is the causal linear convolution. A kernel laid out over all n
    taps (anti-causal taps at the end, as the bidirectional S4 does) needs Lk == n.
    """
    L = u.shape[-1]
    n = n or fast_fft_length(2 * L)
    return _FFTConv.apply(u, k, n)
