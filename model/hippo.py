"""State-matrix initialisations for the S4 kernels.

* HiPPO-LegS in normal-plus-low-rank (NPLR) form, as ViS4mer's released S4 layer builds it:
  A = V diag(Lambda) V* - P P^T with Re(Lambda) = -1/2, returned in the eigenbasis of the normal
  part, keeping one eigenvalue of each conjugate pair (the one with Im <= 0).
* S4D-Lin and S4D-Inv diagonal initialisations (Gu et al., "On the Parameterization and
  Initialization of Diagonal State Space Models", 2022), same half-of-each-pair convention.

Everything is computed in float64 and returned as complex128; callers cast.
"""
from __future__ import annotations

import math

import torch


def legs_transition(N: int) -> tuple[torch.Tensor, torch.Tensor]:
    """HiPPO-LegS (A, B): A[n, k] = -sqrt(2n+1) sqrt(2k+1) for n > k, -(n+1) on the diagonal."""
    q = torch.arange(N, dtype=torch.float64)
    r = torch.sqrt(2 * q + 1)
    A = -torch.tril(r[:, None] * r[None, :], diagonal=-1) - torch.diag(q + 1)  # (N, N)
    return A, r.clone()  # B[n] = sqrt(2n+1)


def legs_nplr(N: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Lambda (N/2,), P (N/2,), B (N/2,) complex128 such that, over the conjugate-augmented basis,
    A_legs = diag(Lambda_aug) - P_aug P_aug^* with Lambda_aug = [Lambda, conj Lambda]."""
    if N % 2:
        raise ValueError(f"d_state must be even (conjugate pairs), got {N}")
    A, B = legs_transition(N)
    P = torch.sqrt(0.5 + torch.arange(N, dtype=torch.float64))  # rank-1 correction
    AP = A + P[:, None] * P[None, :]  # normal: -1/2 I + skew-symmetric
    # AP = -1/2 I + S with S skew-symmetric, so i*S is Hermitian: eigh gives an orthonormal V
    # (torch.linalg.eig on a normal matrix does not guarantee orthogonal eigenvectors).
    S = AP + 0.5 * torch.eye(N, dtype=torch.float64)
    evals, V = torch.linalg.eigh(-1j * S.to(torch.complex128))  # -iS Hermitian, S = i * (-iS)
    Lam = -0.5 + 1j * evals  # eigenvalues of AP, ascending imaginary part
    keep = torch.argsort(Lam.imag)[: N // 2]  # Im(Lambda) <= 0 half of each pair
    Lam, V = Lam[keep], V[:, keep]
    Vh = V.conj().T
    return Lam, Vh @ P.to(torch.complex128), Vh @ B.to(torch.complex128)


def s4d_init(N: int, kind: str) -> torch.Tensor:
    """Diagonal A (N/2,) complex128 for S4D-Lin ('lin') or S4D-Inv ('inv'), Im(A) <= 0."""
    n = torch.arange(N // 2, dtype=torch.float64)
    if kind == "lin":
        imag = math.pi * n
    elif kind == "inv":
        imag = N / math.pi * (N / (2 * n + 1) - 1)
    else:
        raise ValueError(f"unknown S4D init {kind!r}: expected 'lin' or 'inv'")
    return torch.complex(torch.full_like(n, -0.5), -imag)
