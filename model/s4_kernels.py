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
backward that recomputes each chunk, so forward and backward both stay within a fixed budget.
`contraction_reference` is its plain twin (dense, plain autograd), used by the tests.
"""
from __future__ import annotations

import math

import torch

# Complex elements of F materialised at once (per chunk): 2**20 complex64 = 8 MiB, cache-sized
# chunks measured fastest on CPU (smaller chunks cost per-call overhead, larger ones bandwidth).
CHUNK_ELEMENTS = 2**20
# The Cauchy contraction in real arithmetic (`_ChunkedCauchy`); False selects its complex twin.
REAL_CAUCHY = True


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


class _ChunkedContraction(torch.autograd.Function):
    """out[h, m, g] = sum_n v[h, m, n] F(mu[h, n], grid[g]) without materialising (H, N, G).

    F is generated into one reused buffer per call: fresh 8 MiB allocations per chunk cost page
    faults that showed up as a large share of the kernel's time on CPU."""

    @staticmethod
    def forward(ctx, v, mu, grid, kind, chunk):
        ctx.save_for_backward(v, mu, grid)
        ctx.kind, ctx.chunk = kind, chunk
        H, M, N = v.shape
        out = torch.empty(H, M, grid.shape[0], dtype=v.dtype, device=v.device)
        buf = torch.empty(min(chunk, H), N, grid.shape[0], dtype=v.dtype, device=v.device)
        for s in range(0, H, chunk):
            F = _basis(kind, mu[s : s + chunk], grid, buf[: min(chunk, H - s)])  # (c, N, G)
            torch.bmm(v[s : s + chunk], F, out=out[s : s + chunk])  # (c, M, N) @ (c, N, G)
        return out

    @staticmethod
    def backward(ctx, g):
        # Holomorphic in v and mu: PyTorch's convention is grad_in = conj(d out / d in) * grad_out.
        v, mu, grid = ctx.saved_tensors
        kind, chunk = ctx.kind, ctx.chunk
        H, M, N = v.shape
        gc = g.conj()  # conj(grad), small: (H, M, G)
        gv = torch.empty_like(v)
        gmu = torch.empty_like(mu)
        buf = torch.empty(min(chunk, H), 2 * N, grid.shape[0], dtype=v.dtype, device=v.device)
        for s in range(0, H, chunk):
            sl = slice(s, s + chunk)
            c = min(chunk, H - s)
            F = _basis(kind, mu[sl], grid, buf[:c, :N])  # recomputed: (c, N, G)
            _basis_derivative(kind, F, grid, buf[:c, N:])  # dF/dmu: (c, N, G)
            # sum_g g conj([F, dF]) = conj(sum_g conj(g) [F, dF]): the small operand carries the
            # conjugation (a conjugated F would be copied)
            both = torch.einsum("cmg,cng->cmn", gc[sl], buf[:c]).conj()  # (c, M, 2N)
            gv[sl] = both[..., :N]
            gmu[sl] = (v[sl].conj() * both[..., N:]).sum(1)
        return gv, gmu, None, None, None


class _ChunkedCauchy(torch.autograd.Function):
    """The Cauchy contraction out[h, g, m] = sum_n v[h, m, n] / (i y_g - mu[h, n]) in real arithmetic.

    With mu = a + ib, d = y - b and den = 1 / (a^2 + d^2):   1 / (i y - mu) = -a den - i d den,
    so out = (-a v) @ den + (-i v) @ (d den): one real matmul of the real basis [den; d den]
    (2N, G) with a (2N, 2M) coefficient matrix: the same bytes as the complex (N, G) Cauchy matrix,
    made by four vectorised real ops instead of a complex subtraction and reciprocal. The backward
    needs F^2 as well: Re F^2 = 2 a^2 den^2 - den, Im F^2 = 2 a d den^2, so the basis grows to
    [den; d den; den^2; d den^2].

    Layout: the output is (H, G, M) complex, laid out as the real matmul writes it, (H, G, [m, re|im]),
    so that no complex tensor is assembled from real and imaginary halves on the way out, nor split
    on the way back (each a 200 MB copy at LVU's first stage). `_ChunkedContraction(kind="cauchy")`
    is its complex-arithmetic twin; the tests hold both to the dense reference."""

    @staticmethod
    def forward(ctx, v, mu, y, chunk):
        ctx.save_for_backward(v, mu, y)
        ctx.chunk = chunk
        H, M, N = v.shape
        a, b = mu.real.contiguous(), mu.imag.contiguous()  # (H, N)
        p = -a.unsqueeze(1) * v  # (H, M, N)
        W_re = torch.cat([p.real, v.imag], -1)  # (H, M, 2N): Re(out) = W_re @ [den; d den]
        W_im = torch.cat([p.imag, -v.real], -1)  # Im(out) = W_im @ [den; d den]
        W = torch.stack([W_re, W_im], 2).view(H, 2 * M, 2 * N)  # rows [m, re|im]
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

    @staticmethod
    def backward(ctx, g):
        # PyTorch's convention for holomorphic maps: grad_v = sum_g g conj(F), grad_mu = sum_m
        # conj(v) sum_g g conj(F^2); the sums over g are real matmuls of [Re g, Im g] with the basis.
        v, mu, y = ctx.saved_tensors
        chunk = ctx.chunk
        H, M, N = v.shape
        a, b = mu.real.contiguous(), mu.imag.contiguous()
        gr = torch.view_as_real(g.contiguous()).view(H, y.shape[0], 2 * M)  # (H, G, [m, re|im])
        Q = torch.empty(H, 2 * M, 4 * N, dtype=a.dtype, device=a.device)
        buf = torch.empty(min(chunk, H), 4 * N, y.shape[0], dtype=a.dtype, device=a.device)
        for s in range(0, H, chunk):
            c = min(chunk, H - s)
            _cauchy_basis(a[s : s + c], b[s : s + c], y, buf[:c], derivative=True)  # (c, 4N, G)
            torch.bmm(gr[s : s + c].transpose(1, 2), buf[:c].transpose(1, 2), out=Q[s : s + c])  # (c, 2M, 4N)
        Q = Q.view(H, M, 2, 4, N)
        Q1, Q2, Q3, Q4 = torch.complex(Q[:, :, 0], Q[:, :, 1]).unbind(2)  # (H, M, N): g @ each basis
        a_ = a.unsqueeze(1)
        gv = -a_ * Q1 + 1j * Q2
        gmu = (v.conj() * (2 * a_ * a_ * Q3 - Q1 - 2j * a_ * Q4)).sum(1)
        return gv, gmu, None, None


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


def chunked_contraction(v: torch.Tensor, mu: torch.Tensor, grid: torch.Tensor, kind: str) -> torch.Tensor:
    """out[h, m, g] = sum_n v[h, m, n] F(mu[h, n], grid[g]).

    v (H, M, N) complex, mu (H, N) complex, grid (G,) real -> (H, M, G) complex, where
    F = 1 / (i grid - mu) for kind="cauchy" and F = exp(mu grid) for kind="vandermonde".
    """
    if kind not in ("cauchy", "vandermonde"):
        raise ValueError(f"unknown contraction {kind!r}: expected 'cauchy' or 'vandermonde'")
    per_channel = mu.shape[-1] * grid.shape[0]
    chunk = max(1, CHUNK_ELEMENTS // max(per_channel, 1))
    if kind == "cauchy" and REAL_CAUCHY:
        y = grid.to(device=v.device, dtype=v.real.dtype)
        return _ChunkedCauchy.apply(v, mu, y, chunk).transpose(1, 2)  # a view: (H, G, M) in memory
    return _ChunkedContraction.apply(v, mu, _grid(grid, kind, v), kind, chunk)


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


def kernel_nplr(dt, Lambda, B, P, C, Q, L: int, contraction=chunked_contraction) -> torch.Tensor:
    """ViS4mer's S4 kernel (bilinear NPLR), exact for every L.

    dt (H,) real; Lambda (N/2,) or (H, N/2) complex; B, P, Q (H, N/2) complex; C: the trained
    C~ = C (I - Abar^L), shape (H, N/2) or (c, H, N/2) complex.  Returns (H, L) or (c, H, L) real.

    With w_k = exp(-2 pi i k/L), z_k = 2(1-w_k)/(1+w_k), b = [B, P], c = [C~.., Q],
    r_ij(k) = dt sum_{n, conjugate pairs} b_i conj(c_j) / (z_k - dt Lambda_n)
    Khat(k) = 2/(1+w_k) (r_0j - r_0Q r_1j / (1 + r_1Q)),  K = irfft(Khat, L).
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
    r = contraction(v_aug, mu_aug, y_finite, "cauchy")  # (H, 2(c+1), K')
    # unbind, not indexing: its backward is one stack instead of a zero-filled copy per slice; over
    # the last dim of (H, K', 2(c+1)), the chunked contraction's memory layout, so that stack is too
    r = r.transpose(1, 2).unbind(-1)
    r0, r1 = r[: nc + 1], r[nc + 1 :]  # rows b = B and b = P; in each, columns C~.., then Q
    # Woodbury for the rank-1 term
    w = torch.reciprocal(1 + r1[nc])  # once, not one complex division per C~ (and two more per backward)
    k_hat = torch.stack([r0[j] - r0[nc] * w * r1[j] for j in range(nc)], 1)  # (H, c, K')
    two_over_1pw = torch.complex(torch.ones_like(y_finite), y_finite / 2)  # 2/(1+w) = 1 + z/2
    k_hat = k_hat * two_over_1pw
    if even:
        # w = -1: 2/(1+w) r_00 -> dt/2 * sum over both halves of v_00 = dt Re(sum_n B conj(C~));
        # the Woodbury term vanishes there (it is O(1/z)).
        v00 = (B.unsqueeze(0) * Cs.conj()).sum(-1).real  # (c, H)
        k_nyq = (dt[None, :] * v00).transpose(0, 1).unsqueeze(-1).to(k_hat.dtype)  # (H, c, 1)
        k_hat = torch.cat([k_hat, k_nyq], -1)
    K = torch.fft.irfft(k_hat, n=L)  # (H, c, L)
    K = K.transpose(0, 1)  # (c, H, L)
    return K[0] if single else K


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
