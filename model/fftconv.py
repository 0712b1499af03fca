"""Linear (non-circular) FFT convolution of a long signal with a per-channel kernel.

`fft_conv(u, k)` zero-pads to a 5-smooth FFT length n >= 2L (2L itself can have a large prime
factor: LVU's 2 * 11820 = 2^3 * 3 * 5 * 197, which makes FFTs ~2x slower), and has a hand-written
backward made of real FFTs (autograd's rfft backward goes through complex c2c transforms).
`fft_conv_reference` is its plain twin (the same product through autograd's own FFT backward).

It always runs in fp32, also under bf16 autocast: bf16 FFTs are not supported on CPU (and on CUDA
only for powers of two), and a long convolution sums thousands of terms.

Under torch.compile the two FFT halves run as custom ops and the autograd.Function around them
is traced (see `_FFTConv`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from vis4mer.model.s4_kernels import chunk_elements


def fast_fft_length(n: int) -> int:
    """Smallest m >= n whose only prime factors are 2, 3 and 5.

    Not cached: torch.compile traces it (skipping, with a warning, any cache wrapper), and the
    search takes well under a millisecond (the 5-smooth numbers are dense: 23640 -> 24000)."""
    m = n
    while True:
        r = m
        for p in (2, 3, 5):
            while r % p == 0:
                r //= p
        if r == 1:
            return m
        m += 1


# The two FFT-heavy halves are custom ops (opaque to torch.compile, run as written here), each
# taking and returning contiguous (B, H, n) rows: `needs_exact_strides` makes inductor write their
# inputs in exactly the eager layout. Traced as ATen FFT ops instead, inductor fused the zero
# padding with the transpose before it and wrote the padded input time-strided, which the FFT
# then copied back (a 0.4 s transposing copy per step at LVU's first stage, batch 4).
#
# Both work through the channels in blocks (`_block_channels`): a block's spectra stay in cache
# between the transform, the product and the inverse transform, and only the outputs are ever
# whole. Unblocked, the (B, H, n/2+1) complex temporaries (0.4 GB each at LVU's first stage,
# batch 4) cost a pass over memory each and, being fresh allocations, as much again in page faults:
# 0.47 s forward and 0.67 s backward there, against 0.18 and 0.25 s with the memory reused.
_CONTIGUOUS_ROWS = (torch.Tag.needs_exact_strides,)


def _block_channels(B: int, H: int, F: int, device: torch.device) -> int:
    """Channels per block: B x block x F complex spectra within the contraction's chunk budget
    (cache-sized on CPU; on an accelerator, all channels at once: one launch per step)."""
    return max(1, min(H, chunk_elements(device) // max(B * F, 1)))


@torch.library.custom_op("vis4mer::fft_conv_forward", mutates_args=(), tags=_CONTIGUOUS_ROWS)
def _forward(u: torch.Tensor, Kf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """u (B, H, n) zero-padded, Kf (H, n/2+1) -> y (B, H, n) circular convolution, U = rfft(u)."""
    B, H, n = u.shape
    U = torch.empty(B, H, n // 2 + 1, dtype=Kf.dtype, device=u.device)
    y = torch.empty_like(u)
    step = _block_channels(B, H, n // 2 + 1, u.device)
    for h in range(0, H, step):
        Ub = torch.fft.rfft(u[:, h : h + step])  # (B, h, n/2+1)
        U[:, h : h + step] = Ub
        y[:, h : h + step] = torch.fft.irfft(Ub.mul_(Kf[h : h + step]), n=n)
    return y, U


@_forward.register_fake
def _(u, Kf):
    B, H, n = u.shape
    return u.new_empty(B, H, n), Kf.new_empty(B, H, n // 2 + 1)


@torch.library.custom_op("vis4mer::fft_conv_backward", mutates_args=(), tags=_CONTIGUOUS_ROWS)
def _backward(g: torch.Tensor, U: torch.Tensor, Kf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """g (B, H, n), zero beyond L -> (gu (B, H, n), gk (H, n)): the correlations of g with k and u."""
    B, H, n = g.shape
    gu = torch.empty_like(g)
    gk = g.new_empty(H, n)
    step = _block_channels(B, H, n // 2 + 1, g.device)
    for h in range(0, H, step):
        G = torch.fft.rfft(g[:, h : h + step])  # (B, h, n/2+1)
        # physical conjugates, not lazy views: see vis4mer.model.s4_kernels._CONJ_NOTE
        gk[h : h + step] = torch.fft.irfft((G * torch.conj_physical(U[:, h : h + step])).sum(0), n=n)
        gu[:, h : h + step] = torch.fft.irfft(G.mul_(torch.conj_physical(Kf[h : h + step])), n=n)
    return gu, gk


@_backward.register_fake
def _(g, U, Kf):
    return g.new_empty(g.shape), g.new_empty(g.shape[1:])


class _FFTConv(torch.autograd.Function):
    """Traced by torch.compile (the FFT halves inside are custom ops): the zero padding and the
    layout change of the input fuse into the kernel that produces it, and the spectrum U is saved
    for the backward (a custom op with its own autograd can save only its inputs and outputs,
    which would cost one more FFT per backward)."""

    @staticmethod
    def forward(ctx, u, k, n):
        L = u.shape[-1]
        Kf = torch.fft.rfft(k, n=n)  # (H, n/2+1)
        # u may be a strided view (the S4 layer passes its (B, L, H) input transposed): the zero
        # padding copies it into contiguous (B, H, n) rows, so the transpose costs no pass of its own
        y, U = _forward(F.pad(u, (0, n - L)), Kf)
        ctx.save_for_backward(U, Kf)
        ctx.L, ctx.Lk, ctx.n = L, k.shape[-1], n
        return y[..., :L]

    @staticmethod
    def backward(ctx, g):
        U, Kf = ctx.saved_tensors
        gu, gk = _backward(F.pad(g, (0, ctx.n - ctx.L)), U, Kf)
        return gu[..., : ctx.L], gk[..., : ctx.Lk], None


def fft_conv(u: torch.Tensor, k: torch.Tensor, n: int | None = None) -> torch.Tensor:
    """u (B, H, L), k (H, Lk) -> (B, H, L) fp32: y_t = sum_s k_{(t - s) mod n} u_s.

    With Lk <= L and n >= 2L this is the causal linear convolution. A kernel laid out over all n
    taps (anti-causal taps at the end, as the bidirectional S4 does) needs Lk == n.
    """
    L = u.shape[-1]
    n = n or fast_fft_length(2 * L)
    with torch.autocast(u.device.type, enabled=False):
        return _FFTConv.apply(_at_least_fp32(u), _at_least_fp32(k), n)


def _at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype in (torch.float32, torch.float64) else t.float()  # float64 stays (the gradchecks)


def fft_conv_reference(u: torch.Tensor, k: torch.Tensor, n: int | None = None) -> torch.Tensor:
    """Plain twin of `fft_conv`: the same FFT product, differentiated by autograd."""
    L = u.shape[-1]
    n = n or fast_fft_length(2 * L)
    return torch.fft.irfft(torch.fft.rfft(u, n=n) * torch.fft.rfft(k, n=n), n=n)[..., :L]
