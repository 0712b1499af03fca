"""S4 convolution kernels as plain functions of explicit parameters.

Conventions (../shared/spec/vis4mer-model.md, section 3), shared by both kernels so that anyone can
compare them with another implementation:

* state size N real = N/2 complex modes; only one half of each conjugate pair is stored (Im <= 0
  for the diagonal initialisations); the kernels include the conjugate half (the factor 2 Re);
* no D (skip) term in K;
* dt is per channel, shape (H,); the output is (H, L) real (or (C, H, L) for several C).

Memory: the dense Cauchy / Vandermonde tensors are (H, N, L) complex: 3 GB at ViS4mer's first
stage (H=1024, N=64, L=11820). They are never materialised whole. `chunked_contraction` computes
out[h, m, g] = sum_n v[h, m, n] * F(mu[h, n], grid[g]) a few channels at a time, with a hand-written
backward that recomputes each chunk, so forward and backward both stay within a fixed budget; how
many channels a chunk holds depends on the device (`chunk_elements`). `kernel_nplr` runs the whole
NPLR kernel (the contraction, the Woodbury step, the inverse FFT) as one such chunked operator.
Forward and backward are torch.library custom ops, so that torch.compile takes them whole, in fp32
also under autocast. Every fast path has a plain twin the tests hold it to: `contraction_reference`
(dense, plain autograd) for the contractions, `kernel_nplr(..., contraction=...)` (the steps
written out, autograd around them) for the fused kernel.
"""
from __future__ import annotations

import math

import torch

# --------------------------------------------------------------------------------------------
# Chunk sizes: the one place they are chosen
# --------------------------------------------------------------------------------------------

# CPU: elements of F materialised at once (per chunk), 2**20 complex64 = 8 MiB. Cache-sized chunks
# measured fastest on CPU (smaller chunks cost per-call overhead, larger ones bandwidth).
CHUNK_ELEMENTS = 2**20
# Accelerators (CUDA, ...): a memory budget instead, F's bytes per chunk. A GPU runs a batched
# matmul at speed only when it is large, and every chunk costs a handful of kernel launches, so a
# few large chunks are best; 1 GiB keeps the contraction's transient memory far below the
# activations (LVU's first stage, H=1024 N=64 G=5910: F is 3.1 GB, so 3 chunks, with a 1 GiB
# buffer forward and a 2 GiB one backward, where it holds F and its derivative).
ACCELERATOR_CHUNK_BYTES = 2**30
# The Cauchy contraction in real arithmetic (`cauchy_contraction`); False selects its complex twin.
REAL_CAUCHY = True


def chunk_elements(device: torch.device | str) -> int:
    """Complex elements of F (or twice as many reals) generated at once on `device`."""
    if torch.device(device).type == "cpu":
        return CHUNK_ELEMENTS
    return ACCELERATOR_CHUNK_BYTES // 8  # complex64


def channels_per_chunk(H: int, per_channel: int, device: torch.device | str) -> int:
    """Channels per chunk for H channels of `per_channel` elements of F each (N * G)."""
    return max(1, min(H, chunk_elements(device) // max(per_channel, 1)))


def _basis(kind: str, mu: torch.Tensor, grid: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """F(mu, grid): (h, n) x (g,) -> (h, n, g), written into `out` when given.

    cauchy:      F = 1 / (grid - mu)   with grid = i*y_k (complex), the frequency nodes
    vandermonde: F = exp(mu * grid)    with grid = l (real), the time steps
    """
    mu = mu.unsqueeze(-1)
    if kind == "cauchy":
        F = torch.sub(grid, mu, out=out) if out is not None else grid - mu
        return F.reciprocal_()
    # exp(mu l) = e^{Re(mu) l} (cos + i sin)(Im(mu) l): real exp/cos/sin are vectorised on CPU,
    # complex exp is ~50x slower there
    mag = torch.exp(mu.real * grid)
    phase = mu.imag * grid
    F = torch.complex(mag * torch.cos(phase), mag * torch.sin(phase))
    return out.copy_(F) if out is not None else F


def _basis_derivative(kind: str, F: torch.Tensor, grid: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """dF/dmu given F: F**2 for Cauchy, grid * F for Vandermonde."""
    return torch.mul(F, F if kind == "cauchy" else grid, out=out) if out is not None else (
        F * F if kind == "cauchy" else F * grid)


# --------------------------------------------------------------------------------------------
# The chunked contractions as torch.library custom ops
#
# Each is an opaque operator to torch.compile: a fake (meta) implementation gives its output
# shapes, `register_autograd` its backward (itself a custom op, so that a compiled backward calls
# it as one node too), `register_autocast` keeps it in fp32 under bf16 autocast (the kernel needs
# fp32: its Cauchy denominators and long decays lose the kernel's tail in bf16). The chunk loops
# stay eager inside: traced, they would unroll into hundreds of nodes.
# --------------------------------------------------------------------------------------------


# _CONJ_NOTE: inside the custom ops' bodies (and the helpers they call) conjugates are physical
# (`torch.conj_physical`), never `.conj()`'s lazy views. Under a TorchDispatchMode (FlopCounterMode,
# a dtype log), PyTorch runs a custom op's kernel with the Conjugate and Negative dispatch keys
# excluded, so a lazy conjugate's bit is silently ignored by the ops that read it, and the
# gradients come out wrong (tests/test_s4_kernels.py holds every op to its result without a mode).


def _fp32_under_autocast(op) -> None:
    for device_type in ("cpu", "cuda"):
        torch.library.register_autocast(op, device_type, torch.float32)


@torch.library.custom_op("vis4mer::contraction", mutates_args=())
def _contraction(v: torch.Tensor, mu: torch.Tensor, grid: torch.Tensor, kind: str, chunk: int) -> torch.Tensor:
    """out[h, m, g] = sum_n v[h, m, n] F(mu[h, n], grid[g]) in complex arithmetic, `chunk`
    channels at a time: v (H, M, N), mu (H, N), grid (G,) complex -> (H, M, G) complex.

    F is generated into one reused buffer per call: fresh 8 MiB allocations per chunk cost page
    faults that showed up as a large share of the kernel's time on CPU."""
    H, M, N = v.shape
    out = torch.empty(H, M, grid.shape[0], dtype=v.dtype, device=v.device)
    buf = torch.empty(min(chunk, H), N, grid.shape[0], dtype=v.dtype, device=v.device)
    for s in range(0, H, chunk):
        F = _basis(kind, mu[s : s + chunk], grid, buf[: min(chunk, H - s)])  # (c, N, G)
        torch.bmm(v[s : s + chunk], F, out=out[s : s + chunk])  # (c, M, N) @ (c, N, G)
    return out


@_contraction.register_fake
def _(v, mu, grid, kind, chunk):
    return v.new_empty(v.shape[0], v.shape[1], grid.shape[0])


@torch.library.custom_op("vis4mer::contraction_backward", mutates_args=())
def _contraction_backward(g: torch.Tensor, v: torch.Tensor, mu: torch.Tensor, grid: torch.Tensor, kind: str,
                          chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    # Holomorphic in v and mu: PyTorch's convention is grad_in = conj(d out / d in) * grad_out.
    H, M, N = v.shape
    gc = torch.conj_physical(g)  # conj(grad), small: (H, M, G); physical: see _CONJ_NOTE
    gv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    gmu = torch.empty(mu.shape, dtype=mu.dtype, device=mu.device)
    buf = torch.empty(min(chunk, H), 2 * N, grid.shape[0], dtype=v.dtype, device=v.device)
    for s in range(0, H, chunk):
        sl = slice(s, s + chunk)
        c = min(chunk, H - s)
        F = _basis(kind, mu[sl], grid, buf[:c, :N])  # recomputed: (c, N, G)
        _basis_derivative(kind, F, grid, buf[:c, N:])  # dF/dmu: (c, N, G)
        # sum_g g conj([F, dF]) = conj(sum_g conj(g) [F, dF]): the small operand carries the
        # conjugation (a conjugated F would be copied)
        both = torch.conj_physical(torch.einsum("cmg,cng->cmn", gc[sl], buf[:c]))  # (c, M, 2N)
        gv[sl] = both[..., :N]
        gmu[sl] = (torch.conj_physical(v[sl]) * both[..., N:]).sum(1)
    return gv, gmu


@_contraction_backward.register_fake
def _(g, v, mu, grid, kind, chunk):
    return v.new_empty(v.shape), mu.new_empty(mu.shape)


def _contraction_setup(ctx, inputs, output):
    v, mu, grid, kind, chunk = inputs
    ctx.save_for_backward(v, mu, grid)
    ctx.kind, ctx.chunk = kind, chunk


def _contraction_grad(ctx, g):
    v, mu, grid = ctx.saved_tensors
    gv, gmu = _contraction_backward(g, v, mu, grid, ctx.kind, ctx.chunk)
    return gv, gmu, None, None, None


_contraction.register_autograd(_contraction_grad, setup_context=_contraction_setup)


@torch.library.custom_op("vis4mer::cauchy_contraction", mutates_args=())
def _cauchy(v: torch.Tensor, mu: torch.Tensor, y: torch.Tensor, chunk: int) -> torch.Tensor:
    """The Cauchy contraction out[h, g, m] = sum_n v[h, m, n] / (i y_g - mu[h, n]) in real arithmetic:
    v (H, M, N), mu (H, N) complex, y (G,) real -> (H, G, M) complex, `chunk` channels at a time.

    With mu = a + ib, d = y - b and den = 1 / (a^2 + d^2):   1 / (i y - mu) = -a den - i d den,
    so out = (-a v) @ den + (-i v) @ (d den): one real matmul of the real basis [den; d den]
    (2N, G) with a (2N, 2M) coefficient matrix: the same bytes as the complex (N, G) Cauchy matrix,
    made by four vectorised real ops instead of a complex subtraction and reciprocal. The backward
    needs F^2 as well: Re F^2 = 2 a^2 den^2 - den, Im F^2 = 2 a d den^2, so the basis grows to
    [den; d den; den^2; d den^2].

    Layout: the output is (H, G, M) complex, laid out as the real matmul writes it, (H, G, [m, re|im]),
    so that no complex tensor is assembled from real and imaginary halves on the way out, nor split
    on the way back (each a 200 MB copy at LVU's first stage). `_contraction(kind="cauchy")` is its
    complex-arithmetic twin; the tests hold both to the dense reference."""
    H, M, N = v.shape
    a, b = mu.real.contiguous(), mu.imag.contiguous()  # (H, N)
    W = _cauchy_coefficients(v, a)  # (H, 2M, 2N)
    G = y.shape[0]
    out = torch.empty(H, G, 2 * M, dtype=a.dtype, device=a.device)
    buf = torch.empty(min(chunk, H), 2 * N, G, dtype=a.dtype, device=a.device)
    res = torch.empty(min(chunk, H), 2 * M, G, dtype=a.dtype, device=a.device)
    for s in range(0, H, chunk):
        c = min(chunk, H - s)
        _cauchy_basis(a[s : s + c], b[s : s + c], y, buf[:c], derivative=False)  # (c, 2N, G)
        # (c, 2M, 2N) @ (c, 2N, G): BLAS is ~5x slower writing the (G, 2M) transpose directly
        torch.bmm(W[s : s + c], buf[:c], out=res[:c])
        out[s : s + c].copy_(res[:c].transpose(1, 2))  # a cache-sized transpose
    return torch.view_as_complex(out.view(H, G, M, 2))  # (H, G, M)


@_cauchy.register_fake
def _(v, mu, y, chunk):
    return v.new_empty(v.shape[0], y.shape[0], v.shape[1])


@torch.library.custom_op("vis4mer::cauchy_contraction_backward", mutates_args=())
def _cauchy_backward(g: torch.Tensor, v: torch.Tensor, mu: torch.Tensor, y: torch.Tensor,
                     chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    # PyTorch's convention for holomorphic maps: grad_v = sum_g g conj(F), grad_mu = sum_m
    # conj(v) sum_g g conj(F^2); the sums over g are real matmuls of [Re g, Im g] with the basis.
    H, M, N = v.shape
    G = y.shape[0]
    a, b = mu.real.contiguous(), mu.imag.contiguous()
    gr = torch.view_as_real(g.resolve_conj().contiguous()).view(H, G, 2 * M)  # (H, G, [m, re|im])
    Q = torch.empty(H, 2 * M, 4 * N, dtype=a.dtype, device=a.device)
    buf = torch.empty(min(chunk, H), 4 * N, G, dtype=a.dtype, device=a.device)
    for s in range(0, H, chunk):
        c = min(chunk, H - s)
        _cauchy_basis(a[s : s + c], b[s : s + c], y, buf[:c], derivative=True)  # (c, 4N, G)
        torch.bmm(gr[s : s + c].transpose(1, 2), buf[:c].transpose(1, 2), out=Q[s : s + c])  # (c, 2M, 4N)
    return _cauchy_grads(Q, v, a)


@_cauchy_backward.register_fake
def _(g, v, mu, y, chunk):
    return v.new_empty(v.shape), mu.new_empty(mu.shape)


def _cauchy_setup(ctx, inputs, output):
    v, mu, y, chunk = inputs
    ctx.save_for_backward(v, mu, y)
    ctx.chunk = chunk


def _cauchy_grad(ctx, g):
    v, mu, y = ctx.saved_tensors
    gv, gmu = _cauchy_backward(g, v, mu, y, ctx.chunk)
    return gv, gmu, None, None


_cauchy.register_autograd(_cauchy_grad, setup_context=_cauchy_setup)
for _op in (_contraction, _contraction_backward, _cauchy, _cauchy_backward):
    _fp32_under_autocast(_op)


def _cauchy_coefficients(v: torch.Tensor, a: torch.Tensor, interleaved: bool = True) -> torch.Tensor:
    """W (H, 2M, 2N) real: [Re; Im] sum_n v[m, n] / (i y - mu_n) = W @ [den; d den], rows
    [m, re|im] (interleaved) or [re|im, m]."""
    H, M, N = v.shape
    p = -a.unsqueeze(1) * v  # (H, M, N)
    W_re = torch.cat([p.real, v.imag], -1)  # (H, M, 2N): Re(out) = W_re @ [den; d den]
    W_im = torch.cat([p.imag, -v.real], -1)  # Im(out) = W_im @ [den; d den]
    if interleaved:
        return torch.stack([W_re, W_im], 2).view(H, 2 * M, 2 * N)
    return torch.cat([W_re, W_im], 1)


def _cauchy_grads(Q: torch.Tensor, v: torch.Tensor, a: torch.Tensor,
                  interleaved: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad v, grad mu) from Q (H, 2M, 4N): the incoming gradient's [Re; Im] rows ([m, re|im] or
    [re|im, m], as in `_cauchy_coefficients`) contracted over the frequencies with the basis
    [den; d den; den^2; d den^2]."""
    H, M, N = v.shape
    Q = Q.view(H, M, 2, 4, N) if interleaved else Q.view(H, 2, M, 4, N).transpose(1, 2)
    Q1, Q2, Q3, Q4 = torch.complex(Q[:, :, 0], Q[:, :, 1]).unbind(2)  # (H, M, N): g @ each basis
    a_ = a.unsqueeze(1)
    gv = -a_ * Q1 + 1j * Q2
    gmu = (torch.conj_physical(v) * (2 * a_ * a_ * Q3 - Q1 - 2j * a_ * Q4)).sum(1)
    return gv, gmu


def _cauchy_basis(a: torch.Tensor, b: torch.Tensor, y: torch.Tensor, out: torch.Tensor, derivative: bool) -> None:
    """Writes [den; d den] (or, with derivative, [den; d den; den^2; d den^2]) into out (c, kN, G),
    with d = y - b and den = 1 / (a^2 + d^2); a, b (c, N)."""
    N = a.shape[-1]
    den, dd = out[:, :N], out[:, N : 2 * N]
    torch.sub(y, b.unsqueeze(-1), out=dd)  # d
    torch.addcmul((a * a).unsqueeze(-1), dd, dd, out=den).reciprocal_()  # den
    dd.mul_(den)  # d den
    if derivative:
        torch.mul(den, den, out=out[:, 2 * N : 3 * N])
        torch.mul(dd, den, out=out[:, 3 * N :])


def _grid(grid: torch.Tensor, kind: str, like: torch.Tensor) -> torch.Tensor:
    grid = grid.to(device=like.device, dtype=like.real.dtype)
    return torch.complex(torch.zeros_like(grid), grid) if kind == "cauchy" else grid


def chunked_contraction(v: torch.Tensor, mu: torch.Tensor, grid: torch.Tensor, kind: str,
                        chunk: int | None = None) -> torch.Tensor:
    """out[h, m, g] = sum_n v[h, m, n] F(mu[h, n], grid[g]).

    v (H, M, N) complex, mu (H, N) complex, grid (G,) real -> (H, M, G) complex, where
    F = 1 / (i grid - mu) for kind="cauchy" and F = exp(mu grid) for kind="vandermonde".
    `chunk`: channels generated at once (default: `channels_per_chunk` for v's device).
    """
    if kind not in ("cauchy", "vandermonde"):
        raise ValueError(f"unknown contraction {kind!r}: expected 'cauchy' or 'vandermonde'")
    chunk = chunk or channels_per_chunk(v.shape[0], mu.shape[-1] * grid.shape[0], v.device)
    if kind == "cauchy" and REAL_CAUCHY:
        y = grid.to(device=v.device, dtype=v.real.dtype)
        return _cauchy(v, mu, y, chunk).transpose(1, 2)  # a view: (H, G, M) in memory
    return _contraction(v, mu, _grid(grid, kind, v), kind, chunk)


def contraction_reference(v: torch.Tensor, mu: torch.Tensor, grid: torch.Tensor, kind: str) -> torch.Tensor:
    """Plain twin of `chunked_contraction`: dense (H, N, G) tensor, autograd end to end."""
    return torch.einsum("hmn,hng->hmg", v, _basis(kind, mu, _grid(grid, kind, v)))


# --------------------------------------------------------------------------------------------
# NPLR (ViS4mer's kernel): bilinear discretisation of A = diag(Lambda) - P Q^*, Cauchy + Woodbury
# --------------------------------------------------------------------------------------------


def frequency_nodes(L: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """y_k with z_k = 2 (1 - w_k) / (1 + w_k) = i y_k, w_k = exp(-2 pi i k / L), k = 0 .. L//2.

    For even L the last node (w = -1) is infinite; it is returned as 0 and handled separately.
    """
    k = torch.arange(L // 2 + 1, dtype=torch.float64)
    y = 2 * torch.tan(math.pi * k / L)  # (1 - e^{-i t}) / (1 + e^{-i t}) = i tan(t / 2)
    if L % 2 == 0:
        y[-1] = 0.0
    return y.to(device=device, dtype=dtype)


def kernel_nplr(dt, Lambda, B, P, C, Q, L: int, contraction=None) -> torch.Tensor:
    """ViS4mer's S4 kernel (bilinear NPLR), exact for every L.

    dt (H,) real; Lambda (N/2,) or (H, N/2) complex; B, P, Q (H, N/2) complex; C: the trained
    C~ = C (I - Abar^L), shape (H, N/2) or (c, H, N/2) complex.  Returns (H, L) or (c, H, L) real.

    With w_k = exp(-2 pi i k/L), z_k = 2(1-w_k)/(1+w_k), b = [B, P], c = [C~.., Q],
    r_ij(k) = dt sum_{n, conjugate pairs} b_i conj(c_j) / (z_k - dt Lambda_n)
    Khat(k) = 2/(1+w_k) (r_0j - r_0Q r_1j / (1 + r_1Q)),  K = irfft(Khat, L).

    `contraction` None: all of it (Cauchy contraction, Woodbury, 2/(1+w), irfft) in one chunked
    custom op, `nplr_kernel`; a contraction function (`chunked_contraction`, `contraction_reference`):
    the same steps written out with plain autograd around it, the fused op's twin.
    """
    single = C.dim() == 2
    Cs = C.unsqueeze(0) if single else C  # (c, H, N/2)
    nc = Cs.shape[0]
    H, half = B.shape
    Lam = Lambda.expand(H, half) if Lambda.dim() == 1 else Lambda
    dt = dt.to(B.real.dtype)
    mu = dt[:, None] * Lam  # (H, N/2)
    mu_aug = torch.cat([mu, mu.conj()], -1)  # (H, N): both halves of each conjugate pair
    b = torch.stack([B, P], 1)  # (H, 2, N/2)
    c = torch.cat([Cs.transpose(0, 1), Q.unsqueeze(1)], 1)  # (H, c+1, N/2)
    v = b[:, :, None, :] * c[:, None, :, :].conj()  # (H, 2, c+1, N/2)
    v = v.reshape(H, 2 * (nc + 1), half) * dt[:, None, None]  # dt folded in: r = dt * sum(...)
    v_aug = torch.cat([v, v.conj()], -1)  # (H, 2(c+1), N)

    y = frequency_nodes(L, device=B.device, dtype=B.real.dtype)
    even = L % 2 == 0
    y_finite = y[:-1] if even else y
    if even:
        # w = -1: 2/(1+w) r_00 -> dt/2 * sum over both halves of v_00 = dt Re(sum_n B conj(C~));
        # the Woodbury term vanishes there (it is O(1/z)).
        v00 = (B.unsqueeze(0) * Cs.conj()).sum(-1).real  # (c, H)
        k_nyq = (dt[None, :] * v00).transpose(0, 1)  # (H, c)
    else:
        k_nyq = y.new_zeros(H, nc)  # unused: an odd length has no Nyquist frequency
    if contraction is None:
        chunk = channels_per_chunk(H, 2 * half * y_finite.shape[0], v_aug.device)
        K, _ = _nplr_kernel(v_aug, mu_aug, y_finite, k_nyq, L, chunk)  # (H, c, L)
    else:
        r = contraction(v_aug, mu_aug, y_finite, "cauchy")  # (H, 2(c+1), K')
        # unbind, not indexing: its backward is one stack instead of a zero-filled copy per slice;
        # over the last dim of (H, K', 2(c+1)), the chunked contraction's memory layout, so that
        # stack is too
        k_hat = _woodbury(r.transpose(1, 2).unbind(-1), nc)  # (H, c, K')
        k_hat = k_hat * torch.complex(torch.ones_like(y_finite), y_finite / 2)  # 2/(1+w) = 1 + z/2
        if even:
            k_hat = torch.cat([k_hat, k_nyq.unsqueeze(-1).to(k_hat.dtype)], -1)
        K = torch.fft.irfft(k_hat, n=L)  # (H, c, L)
    K = K.transpose(0, 1)  # (c, H, L)
    return K[0] if single else K


def _woodbury(r: tuple[torch.Tensor, ...], nc: int) -> torch.Tensor:
    """r: the 2(c+1) rows r_0j.., r_0Q, r_1j.., r_1Q, each (h, K') -> (h, c, K'):
    r_0j - r_0Q r_1j / (1 + r_1Q), the rank-1 term by Woodbury."""
    r0, r1 = r[: nc + 1], r[nc + 1 :]
    w = torch.reciprocal(1 + r1[nc])  # once, not one complex division per C~ (and two more per backward)
    r0Qw = r0[nc] * w
    return torch.stack([r0[j] - r0Qw * r1[j] for j in range(nc)], 1)


def _woodbury_backward(g: torch.Tensor, r: torch.Tensor, nc: int) -> torch.Tensor:
    """The gradient of `_woodbury` (holomorphic: grad_r = sum_j g_j conj(d k_j / d r)): g (h, c, K'),
    r (h, 2(c+1), K') -> (h, 2(c+1), K')."""
    r0Q, r1j, r1Q = r[:, nc], r[:, nc + 1 : -1], r[:, -1]  # (r_0j: its derivatives do not involve it)
    w = torch.reciprocal(1 + r1Q)
    r0Qw = r0Q * w
    out = torch.empty_like(r)
    out[:, :nc] = g  # d k_j / d r_0j = 1
    conj = torch.conj_physical  # see _CONJ_NOTE
    out[:, nc] = -(g * conj(w.unsqueeze(1) * r1j)).sum(1)  # d k_j / d r_0Q = -w r_1j
    out[:, nc + 1 : -1] = -g * conj(r0Qw).unsqueeze(1)  # d k_j / d r_1j = -r_0Q w
    out[:, -1] = (g * conj(r0Qw * w).unsqueeze(1) * conj(r1j)).sum(1)  # d k_j / d r_1Q = r_0Q w^2 r_1j
    return out


# The Woodbury step runs on blocks of this many chunks: on a single chunk (2 channels on CPU) its
# dozen small ops cost more in per-call overhead than in arithmetic; a block's operands (~6 MB
# at LVU's first stage) still stay in cache.
BLOCK_CHUNKS = 16


@torch.library.custom_op("vis4mer::nplr_kernel", mutates_args=())
def _nplr_kernel(v: torch.Tensor, mu: torch.Tensor, y: torch.Tensor, k_nyq: torch.Tensor, L: int,
                 chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The NPLR kernel from `kernel_nplr`'s operands: v (H, 2(c+1), N) and mu (H, N) conjugate-
    augmented, y (G,) the finite frequency nodes, k_nyq (H, c) the Nyquist frequency's value (used
    for even L) -> K (H, c, L) real, and the Cauchy contraction r as real rows (H, 2(2c+2), G),
    [re|im, m], an output only so that the backward can use it (its gradient is never formed).

    The real-arithmetic Cauchy contraction (as `_cauchy`, `chunk` channels at a time), then per
    block of chunks the Woodbury step and the factor 2/(1+w), then one inverse FFT: the dozen
    (H, G) complex temporaries of the written-out steps (48 MB each at LVU's first stage), and
    their autograd's as many again, never exist."""
    H, M, N = v.shape
    nc, G = M // 2 - 1, y.shape[0]
    a, b = mu.real.contiguous(), mu.imag.contiguous()
    W = _cauchy_coefficients(v, a, interleaved=False)  # (H, 2M, 2N), rows [re|im, m]
    factor = torch.complex(torch.ones_like(y), y / 2)  # 2/(1+w) = 1 + z/2
    buf = torch.empty(min(chunk, H), 2 * N, G, dtype=a.dtype, device=a.device)
    r_rows = torch.empty(H, 2 * M, G, dtype=a.dtype, device=a.device)
    k_hat = torch.empty(H, nc, L // 2 + 1, dtype=v.dtype, device=v.device)  # K' finite, [+ Nyquist]
    block = chunk * BLOCK_CHUNKS
    for s0 in range(0, H, block):
        for s in range(s0, min(s0 + block, H), chunk):
            c = min(chunk, H - s)
            _cauchy_basis(a[s : s + c], b[s : s + c], y, buf[:c], derivative=False)  # (c, 2N, G)
            torch.bmm(W[s : s + c], buf[:c], out=r_rows[s : s + c])  # (c, 2M, G)
        r = _complex_rows(r_rows[s0 : s0 + block])  # (cb, M, G)
        torch.mul(_woodbury(r.unbind(1), nc), factor, out=k_hat[s0 : s0 + block, :, :G])
    if G < k_hat.shape[-1]:
        k_hat[..., G] = k_nyq
    return torch.fft.irfft(k_hat, n=L), r_rows


@_nplr_kernel.register_fake
def _(v, mu, y, k_nyq, L, chunk):
    H, M, _ = v.shape
    return y.new_empty(H, M // 2 - 1, L), y.new_empty(H, 2 * M, y.shape[0])


def _complex_rows(rows: torch.Tensor) -> torch.Tensor:
    """(h, 2M, G) real rows [re|im, m] -> (h, M, G) complex (two blocks of whole rows: vectorised,
    where the interleaved [m, re|im] rows cost 5x as much)."""
    M = rows.shape[1] // 2
    return torch.complex(rows[:, :M], rows[:, M:])


@torch.library.custom_op("vis4mer::nplr_kernel_backward", mutates_args=())
def _nplr_kernel_backward(gK: torch.Tensor, v: torch.Tensor, mu: torch.Tensor, y: torch.Tensor,
                          r_rows: torch.Tensor, L: int, chunk: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    H, M, N = v.shape
    nc, G = M // 2 - 1, y.shape[0]
    a, b = mu.real.contiguous(), mu.imag.contiguous()
    # the inverse FFT's adjoint, as autograd's: rfft / L, doubling the frequencies that stand for two
    g_hat = torch.fft.rfft(gK) / L  # (H, c, L//2+1)
    g_hat[..., 1 : L - L // 2] *= 2
    g_nyq = g_hat[..., G].real.contiguous() if G < g_hat.shape[-1] else gK.new_zeros(H, nc)
    g_hat = g_hat[..., :G] * torch.complex(torch.ones_like(y), -y / 2)  # times conj(2/(1+w))
    Q = torch.empty(H, 2 * M, 4 * N, dtype=a.dtype, device=a.device)
    buf = torch.empty(min(chunk, H), 4 * N, G, dtype=a.dtype, device=a.device)
    block = chunk * BLOCK_CHUNKS
    for s0 in range(0, H, block):
        g_r = _woodbury_backward(g_hat[s0 : s0 + block], _complex_rows(r_rows[s0 : s0 + block]), nc)
        g_rows = torch.cat([g_r.real, g_r.imag], 1)  # (cb, 2M, G), rows [re|im, m]
        for s in range(s0, min(s0 + block, H), chunk):
            c = min(chunk, H - s)
            _cauchy_basis(a[s : s + c], b[s : s + c], y, buf[:c], derivative=True)  # (c, 4N, G)
            torch.bmm(g_rows[s - s0 : s - s0 + c], buf[:c].transpose(1, 2), out=Q[s : s + c])  # (c, 2M, 4N)
    return (*_cauchy_grads(Q, v, a, interleaved=False), g_nyq)


@_nplr_kernel_backward.register_fake
def _(gK, v, mu, y, r_rows, L, chunk):
    return v.new_empty(v.shape), mu.new_empty(mu.shape), y.new_empty(v.shape[0], v.shape[1] // 2 - 1)


def _nplr_setup(ctx, inputs, output):
    v, mu, y, k_nyq, L, chunk = inputs
    ctx.set_materialize_grads(False)  # r_rows' gradient: None, not a zero-filled tensor
    ctx.save_for_backward(v, mu, y, output[1])
    ctx.L, ctx.chunk = L, chunk


def _nplr_grad(ctx, gK, _):
    v, mu, y, r_rows = ctx.saved_tensors
    gv, gmu, g_nyq = _nplr_kernel_backward(gK, v, mu, y, r_rows, ctx.L, ctx.chunk)
    return gv, gmu, None, g_nyq, None, None


_nplr_kernel.register_autograd(_nplr_grad, setup_context=_nplr_setup)
for _op in (_nplr_kernel, _nplr_kernel_backward):
    _fp32_under_autocast(_op)


# --------------------------------------------------------------------------------------------
# Diagonal (S4D): K_l = 2 Re(sum_n C_n Bbar_n Abar_n^l)
# --------------------------------------------------------------------------------------------


def discretize_diag(dt, A, B, disc: str):
    """(Abar, Bbar, log Abar) for ZOH or bilinear; dt (H,), A and B (H, N/2)."""
    dtA = dt[:, None].to(A.real.dtype) * A
    if disc == "zoh":
        Abar = torch.exp(dtA)
        return Abar, (Abar - 1) / A * B, dtA
    if disc == "bilinear":
        denom = 1 - dtA / 2
        Abar = (1 + dtA / 2) / denom
        return Abar, dt[:, None] * B / denom, torch.log(Abar)
    raise ValueError(f"unknown discretisation {disc!r}: expected 'zoh' or 'bilinear'")


def kernel_diag(dt, A, B, C, L: int, disc: str = "zoh", contraction=chunked_contraction) -> torch.Tensor:
    """S4D kernel. dt (H,) real; A, B (H, N/2) complex; C (H, N/2) or (c, H, N/2) complex.
    Returns (H, L) or (c, H, L) real: K_l = 2 Re(sum_n C_n Bbar_n Abar_n^l)."""
    single = C.dim() == 2
    Cs = C.unsqueeze(0) if single else C
    _, Bbar, logA = discretize_diag(dt, A, B, disc)
    v = (Cs * Bbar.unsqueeze(0)).transpose(0, 1)  # (H, c, N/2)
    grid = torch.arange(L, device=A.device, dtype=A.real.dtype)
    K = 2 * contraction(v, logA, grid, "vandermonde").real  # (H, c, L)
    K = K.transpose(0, 1)
    return K[0] if single else K
