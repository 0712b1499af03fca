"""Both S4 kernels against float64 computations written here: the dense conjugate-augmented
system (matrix powers) for NPLR, the plain recurrence for S4D."""
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import vis4mer.model.fftconv as fcv
import vis4mer.model.s4_kernels as sk
from vis4mer.model.fftconv import fast_fft_length, fft_conv, fft_conv_reference
from vis4mer.model.hippo import legs_nplr, legs_transition, s4d_init
from vis4mer.model.s4 import kernel_diag, kernel_nplr


def log_uniform_dt(H, lo=1e-3, hi=1e-1):
    return torch.exp(torch.rand(H, dtype=torch.float64) * (math.log(hi) - math.log(lo)) + math.log(lo))


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def dense_nplr_kernel(dt, Lam, B, P, C, Q, L):
    """K_l = Re(C^* Abar^l Bbar) over the 64-dim conjugate-augmented system, C = (I - Abar^L)^-* C~."""
    out = []
    for h in range(B.shape[0]):
        lam = Lam if Lam.dim() == 1 else Lam[h]
        aug = lambda t: torch.cat([t, t.conj()])
        A = torch.diag(aug(lam)) - torch.outer(aug(P[h]), aug(Q[h]).conj())
        eye = torch.eye(A.shape[0], dtype=A.dtype)
        inv = torch.linalg.inv(eye - dt[h] / 2 * A)
        Ab, Bb = inv @ (eye + dt[h] / 2 * A), dt[h] * inv @ aug(B[h])
        Cd = torch.linalg.solve((eye - torch.linalg.matrix_power(Ab, L)).conj().T, aug(C[h]))
        x, ks = Bb, []
        for _ in range(L):
            ks.append((Cd.conj() @ x).real)
            x = Ab @ x
        out.append(torch.stack(ks))
    return torch.stack(out)


def recurrence_diag_kernel(dt, A, B, C, L, disc):
    """K_l = 2 Re(sum_n C_n Bbar_n Abar_n^l), by repeated multiplication in float64."""
    dtA = dt[:, None] * A
    if disc == "zoh":
        Ab, Bb = torch.exp(dtA), (torch.exp(dtA) - 1) / A * B
    else:
        Ab, Bb = (1 + dtA / 2) / (1 - dtA / 2), dt[:, None] * B / (1 - dtA / 2)
    x, ks = Bb, []
    for _ in range(L):
        ks.append(2 * (C * x).sum(-1).real)
        x = Ab * x
    return torch.stack(ks, -1)


def test_legs_nplr_is_similar_to_hippo():
    N = 16
    Lam, P, B = legs_nplr(N)
    assert torch.allclose(Lam.real, torch.full((N // 2,), -0.5, dtype=torch.float64))
    assert (Lam.imag <= 0).all()
    # diag(Lambda_aug) - P_aug P_aug^* is A_legs in another basis: A_legs is triangular with
    # eigenvalues -1 .. -N
    aug = lambda t: torch.cat([t, t.conj()])
    A_eig = torch.diag(aug(Lam)) - torch.outer(aug(P), aug(P).conj())
    ev = torch.sort(torch.linalg.eigvals(A_eig).real).values
    A, Bl = legs_transition(N)
    assert torch.allclose(ev, torch.sort(torch.diagonal(A)).values, atol=1e-6)
    # a unitary change of basis keeps norms: B and P split their norm over conjugate pairs
    Pr = torch.sqrt(0.5 + torch.arange(N, dtype=torch.float64))
    assert math.isclose(2 * (B.abs() ** 2).sum().item(), (Bl**2).sum().item(), rel_tol=1e-9)
    assert math.isclose(2 * (P.abs() ** 2).sum().item(), (Pr**2).sum().item(), rel_tol=1e-9)


@pytest.mark.parametrize("L", [1, 2, 15, 16, 63, 100])
@pytest.mark.parametrize("per_channel_lambda", [False, True])
def test_kernel_nplr_matches_dense(L, per_channel_lambda):
    H, N = 3, 64
    Lam, P, B = legs_nplr(N)
    dt = log_uniform_dt(H)
    Bh, Ph = B.expand(H, -1).clone(), P.expand(H, -1).clone()
    # trained parameters drift from the init: perturb everything, Q != P
    Bh = Bh + 0.1 * torch.randn_like(Bh)
    Qh = Ph + 0.1 * torch.randn_like(Ph)
    C = torch.randn(H, N // 2, dtype=torch.complex128)
    lam = Lam + 0.05 * torch.randn(H, N // 2, dtype=torch.complex128) if per_channel_lambda else Lam
    lam = torch.complex(-lam.real.abs(), lam.imag)  # stay stable
    expected = dense_nplr_kernel(dt, lam, Bh, Ph, C, Qh, L)
    got = kernel_nplr(dt.float(), lam.to(torch.cfloat), Bh.to(torch.cfloat), Ph.to(torch.cfloat),
                      C.to(torch.cfloat), Qh.to(torch.cfloat), L)
    assert got.shape == (H, L) and got.dtype == torch.float32
    assert rel_err(got, expected) <= 1e-4


def test_kernel_nplr_several_c_and_float64():
    H, N, L = 2, 16, 33
    Lam, P, B = legs_nplr(N)
    dt = log_uniform_dt(H)
    Bh, Ph = B.expand(H, -1).clone(), P.expand(H, -1).clone()
    C = torch.randn(2, H, N // 2, dtype=torch.complex128)
    got = kernel_nplr(dt, Lam, Bh, Ph, C, Ph, L)
    assert got.shape == (2, H, L)
    for j in range(2):
        assert rel_err(got[j], dense_nplr_kernel(dt, Lam, Bh, Ph, C[j], Ph, L)) <= 1e-10


@pytest.mark.parametrize("disc", ["zoh", "bilinear"])
@pytest.mark.parametrize("init", ["lin", "inv"])
@pytest.mark.parametrize("L", [1, 16, 17, 250])
def test_kernel_diag_matches_recurrence(disc, init, L):
    H, N = 4, 64
    A = s4d_init(N, init).expand(H, -1) + 0.01 * torch.randn(H, N // 2, dtype=torch.complex128)
    A = torch.complex(-A.real.abs(), A.imag)
    B = torch.randn(H, N // 2, dtype=torch.complex128)
    C = torch.randn(H, N // 2, dtype=torch.complex128)
    dt = log_uniform_dt(H)
    expected = recurrence_diag_kernel(dt, A, B, C, L, disc)
    got = kernel_diag(dt.float(), A.to(torch.cfloat), B.to(torch.cfloat), C.to(torch.cfloat), L, disc)
    assert got.shape == (H, L)
    assert rel_err(got, expected) <= 1e-4


@pytest.mark.parametrize("kind,real_cauchy", [("cauchy", True), ("cauchy", False), ("vandermonde", False)])
@pytest.mark.parametrize("H,M,N,G", [(1, 1, 2, 5), (3, 4, 8, 17), (7, 2, 6, 64), (16, 6, 4, 9)])
def test_chunked_contraction_matches_reference(monkeypatch, kind, real_cauchy, H, M, N, G):
    """The memory-bounded fast paths (Cauchy in real and in complex arithmetic, Vandermonde) equal
    their dense twin, values and gradients, over many shapes and chunkings (one channel per chunk
    up to all of them)."""
    monkeypatch.setattr(sk, "REAL_CAUCHY", real_cauchy)
    v = torch.randn(H, M, N, dtype=torch.complex128, requires_grad=True)
    mu = torch.complex(-torch.rand(H, N, dtype=torch.float64) * 0.1,
                       torch.randn(H, N, dtype=torch.float64)).requires_grad_()
    grid = torch.randn(G, dtype=torch.float64) * 3 if kind == "cauchy" else torch.arange(G, dtype=torch.float64)
    ref = sk.contraction_reference(v, mu, grid, kind)
    w = torch.randn_like(ref)
    gv_ref, gmu_ref = torch.autograd.grad((ref * w).real.sum(), (v, mu))
    for elements in (1, N * G * 2, 2**21):
        monkeypatch.setattr(sk, "CHUNK_ELEMENTS", elements)
        out = sk.chunked_contraction(v, mu, grid, kind)
        gv, gmu = torch.autograd.grad((out * w).real.sum(), (v, mu))
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(gv, gv_ref, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(gmu, gmu_ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("real_cauchy", [True, False])
def test_chunked_contraction_gradcheck(monkeypatch, real_cauchy):
    monkeypatch.setattr(sk, "CHUNK_ELEMENTS", 8)
    monkeypatch.setattr(sk, "REAL_CAUCHY", real_cauchy)
    v = torch.randn(3, 2, 4, dtype=torch.complex128, requires_grad=True)
    mu = torch.complex(-torch.rand(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)).requires_grad_()
    for kind, grid in (("cauchy", torch.randn(5, dtype=torch.float64)),
                       ("vandermonde", torch.arange(5.0, dtype=torch.float64))):
        assert torch.autograd.gradcheck(lambda a, b, g=grid, k=kind: sk.chunked_contraction(a, b, g, k), (v, mu))


def test_chunk_size_follows_the_device():
    """One policy (`chunk_elements`): cache-sized chunks on CPU, many of them; a 1 GiB budget on an
    accelerator, a few large ones. No GPU needed: the policy only reads the device type."""
    assert sk.chunk_elements("cpu") == sk.CHUNK_ELEMENTS == 2**20  # 8 MiB of complex64
    assert sk.chunk_elements(torch.device("cuda", 0)) * 8 == sk.ACCELERATOR_CHUNK_BYTES == 2**30
    H, per_channel = 1024, 64 * 5910  # LVU's first stage: N = 64, G = L/2 frequencies

    def chunks(device):
        return math.ceil(H / sk.channels_per_chunk(H, per_channel, device))

    assert chunks("cpu") == 512 and chunks("cuda") == 3
    assert sk.channels_per_chunk(8, 10, "cuda") == 8  # never more than H channels
    assert sk.channels_per_chunk(8, 2**30, "cpu") == 1  # never fewer than one


@pytest.mark.parametrize("kind,real_cauchy", [("cauchy", True), ("cauchy", False), ("vandermonde", False)])
def test_contraction_is_equal_across_chunk_sizes(monkeypatch, kind, real_cauchy):
    """Values and gradients do not depend on the chunking: one channel per chunk, uneven chunks,
    one chunk of all channels (explicit), and each device's default policy."""
    monkeypatch.setattr(sk, "REAL_CAUCHY", real_cauchy)
    H, M, N, G = 7, 3, 6, 29
    v = torch.randn(H, M, N, dtype=torch.complex128, requires_grad=True)
    mu = torch.complex(-torch.rand(H, N, dtype=torch.float64), torch.randn(H, N, dtype=torch.float64))
    mu.requires_grad_()
    grid = torch.randn(G, dtype=torch.float64) * 3 if kind == "cauchy" else torch.arange(G, dtype=torch.float64)
    w = torch.randn(H, M, G, dtype=torch.complex128)

    def run(**kw):
        out = sk.chunked_contraction(v, mu, grid, kind, **kw)
        return (out, *torch.autograd.grad((out * w).real.sum(), (v, mu)))

    one = run(chunk=H)  # a single chunk
    for kw in (dict(chunk=1), dict(chunk=3), dict(chunk=100), {}):
        for a, b in zip(run(**kw), one):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    for elements in (N * G, 2**30):  # default policy: 7 chunks, then 1
        monkeypatch.setattr(sk, "chunk_elements", lambda device, e=elements: e)
        for a, b in zip(run(), one):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("B,H,L,Lk,n", [(1, 1, 1, 1, None), (2, 3, 7, 7, None), (3, 2, 16, 5, None),
                                        (1, 4, 50, 50, 128), (2, 5, 33, 72, 72), (4, 8, 300, 300, None)])
def test_fft_conv_matches_its_plain_twin(dtype, B, H, L, Lk, n):
    """The hand-written backward against autograd through the same FFTs, over many shapes: kernels
    shorter than the signal, a longer FFT than needed, a kernel over all n taps (bidirectional)."""
    u = torch.randn(B, H, L, dtype=dtype, requires_grad=True)
    k = torch.randn(H, Lk, dtype=dtype, requires_grad=True)
    w = torch.randn(B, H, L, dtype=dtype)
    y, y_ref = fft_conv(u, k, n), fft_conv_reference(u, k, n)
    grads = torch.autograd.grad((y * w).sum(), (u, k))
    grads_ref = torch.autograd.grad((y_ref * w).sum(), (u, k))
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    assert y.dtype == dtype
    torch.testing.assert_close(y, y_ref, **tol)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, **tol)
    # a transposed (strided) input, as the S4 layer passes it
    torch.testing.assert_close(fft_conv(u.detach().transpose(1, 2).contiguous().transpose(1, 2), k, n), y, **tol)


@pytest.mark.parametrize("B,H,L", [(1, 1, 1), (2, 3, 7), (1, 4, 50)])
def test_fft_conv_is_linear_convolution(B, H, L):
    u = torch.randn(B, H, L, dtype=torch.float64, requires_grad=True)
    k = torch.randn(H, L, dtype=torch.float64, requires_grad=True)
    y = fft_conv(u, k)
    direct = torch.stack([sum(k[:, s] * u[:, :, t - s] for s in range(t + 1)) for t in range(L)], -1)
    torch.testing.assert_close(y, direct)
    assert torch.autograd.gradcheck(fft_conv, (u, k))


def test_fast_fft_length():
    assert fast_fft_length(2 * 11820) == 24000  # 23640 = 2^3*3*5*197 would be slow
    for n in (1, 7, 97, 1000):
        m = fast_fft_length(n)
        r = m
        for p in (2, 3, 5):
            while r % p == 0:
                r //= p
        assert m >= n and r == 1


def test_kernel_nplr_gradient_matches_dense_autograd():
    """Gradients of the whole NPLR kernel (chunked Cauchy, Woodbury, closed-form Nyquist, irfft)
    against autograd through the float64 dense construction."""
    H, N = 2, 8
    Lam, P, B = legs_nplr(N)
    for L in (10, 11):
        dt = log_uniform_dt(H)
        params = [Lam.clone(), B.expand(H, -1).clone(), P.expand(H, -1).clone(),
                  torch.randn(H, N // 2, dtype=torch.complex128), P.expand(H, -1).clone()]
        params = [p.requires_grad_() for p in params]
        w = torch.randn(H, L, dtype=torch.float64)
        g_fast = torch.autograd.grad((kernel_nplr(dt, *params[:3], params[3], params[4], L) * w).sum(), params)
        dense = dense_nplr_kernel(dt, params[0], params[1], params[2], params[3], params[4], L)
        g_dense = torch.autograd.grad((dense * w).sum(), params)
        for a, b in zip(g_fast, g_dense):
            torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("H,N,L,nc,per_channel_lambda", [
    (1, 2, 1, 1, False), (2, 8, 2, 1, False), (3, 8, 15, 1, True), (3, 16, 16, 2, False),
    (5, 16, 64, 1, True), (4, 64, 101, 2, True), (2, 64, 256, 1, False)])
def test_fused_nplr_kernel_matches_its_plain_twin(monkeypatch, dtype, H, N, L, nc, per_channel_lambda):
    """The fused op (contraction, Woodbury, 2/(1+w), irfft per chunk, hand-written backward) against
    the same steps written out with autograd around the dense contraction: values and gradients,
    odd and even lengths, one and two C~, one channel per chunk and all in one."""
    Lam, P, B = legs_nplr(N)
    cdtype = torch.complex64 if dtype == torch.float32 else torch.complex128
    lam = Lam + 0.05 * torch.randn(H, N // 2, dtype=torch.complex128) if per_channel_lambda else Lam
    lam = torch.complex(-lam.real.abs(), lam.imag)
    params = [log_uniform_dt(H), lam, B.expand(H, -1) + 0.1 * torch.randn(H, N // 2, dtype=torch.complex128),
              P.expand(H, -1).clone(), torch.randn(nc, H, N // 2, dtype=torch.complex128),
              P.expand(H, -1) + 0.1 * torch.randn(H, N // 2, dtype=torch.complex128)]
    params = [p.to(dtype if i == 0 else cdtype).requires_grad_() for i, p in enumerate(params)]
    w = torch.randn(nc, H, L, dtype=dtype)

    def run(**kw):
        K = kernel_nplr(*params, L, **kw)
        return (K, *torch.autograd.grad((K * w).sum(), params))

    ref = run(contraction=sk.contraction_reference)
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-11)
    for elements in (1, 2**30):  # one channel per chunk; all in one
        monkeypatch.setattr(sk, "CHUNK_ELEMENTS", elements)
        got = run()
        assert got[0].shape == (nc, H, L) and got[0].dtype == dtype
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, **tol)


class _PassThrough(TorchDispatchMode):
    """A dispatch mode that changes nothing (as FlopCounterMode or a dtype log do not)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def test_custom_ops_are_unchanged_under_a_dispatch_mode():
    """Under a TorchDispatchMode PyTorch runs a custom op's kernel with the Conjugate and Negative
    dispatch keys excluded, so a lazy `.conj()` inside it is silently dropped (the backward ops
    were off by 100 % that way). Every op, forward and backward, gives the same with a mode active."""
    torch.manual_seed(0)
    H, M, N, G, L = 5, 4, 6, 7, 14
    v = torch.randn(H, M, N, dtype=torch.cfloat)
    mu = torch.complex(-torch.rand(H, N), torch.randn(H, N))
    y = torch.randn(G)
    K, r_rows = sk._nplr_kernel(v, mu, y, torch.randn(H, 1), L, 2)
    u = torch.randn(2, 3, 32)
    Kf = torch.fft.rfft(torch.randn(3, 32))
    fwd_u, U = fcv._forward(u, Kf)
    calls = {
        "contraction": lambda: sk._contraction(v, mu, torch.complex(torch.zeros_like(y), y), "cauchy", 2),
        "contraction_backward": lambda: sk._contraction_backward(
            torch.randn(H, M, G, dtype=torch.cfloat, generator=torch.Generator().manual_seed(1)), v, mu,
            torch.complex(torch.zeros_like(y), y), "cauchy", 2),
        "cauchy_contraction": lambda: sk._cauchy(v, mu, y, 2),
        "cauchy_contraction_backward": lambda: sk._cauchy_backward(
            torch.randn(H, G, M, dtype=torch.cfloat, generator=torch.Generator().manual_seed(2)), v, mu, y, 2),
        "nplr_kernel": lambda: sk._nplr_kernel(v, mu, y, torch.ones(H, 1), L, 2),
        "nplr_kernel_backward": lambda: sk._nplr_kernel_backward(
            torch.randn(K.shape, generator=torch.Generator().manual_seed(3)), v, mu, y, r_rows, L, 2),
        "fft_conv_forward": lambda: fcv._forward(u, Kf),
        "fft_conv_backward": lambda: fcv._backward(torch.randn(2, 3, 32, generator=torch.Generator().manual_seed(4)),
                                                   U, Kf),
    }
    for name, call in calls.items():
        plain = call()
        with _PassThrough():
            moded = call()
        as_tuple = lambda t: t if isinstance(t, tuple) else (t,)
        for a, b in zip(as_tuple(plain), as_tuple(moded)):
            torch.testing.assert_close(b, a, rtol=0, atol=0, msg=name)
