"""torch.compile: every registered variant compiles, forward and backward, in one graph (no graph
break), and matches eager in fp32; the S4 kernels' custom ops and the FFT convolution on their own.

The whole file takes well under a minute on 2 cores, cold. What keeps it there:

* Each variant keeps its structure (stages, pooling, state size, kernel, head) but runs at a reduced
  width (d_model = d_input = 16) and a short length with the same parity at every stage as its own
  l_max (LVU: 11820 -> 5910 -> 2955, even, even, odd: 236 -> 118 -> 59), since the NPLR kernel
  takes another path for even lengths (the Nyquist frequency). vis4mer_tiny runs as is.
* Backends: inductor (what `torch.compile(model)` uses) for vis4mer_tiny, 2 stages, the same kinds of
  ops as every variant (S4 blocks, pooling, LayerNorm, GELU, dropout, the head). The 3-stage variants
  go through "aot_eager": the same Dynamo trace, fake-tensor propagation through the custom ops, and
  the AOTAutograd joint graph and partition, run by eager kernels; vis4mer_lvu also through inductor
  (the 3-stage structure, ~60 s of C++ builds cold on 2 cores at any size: once, not per variant).
* dynamic=False: one static graph per test, no recompilation for symbolic shapes.
"""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch._inductor.config as inductor_config

import vis4mer.model.s4_kernels as sk
from vis4mer.model import ViS4mer, list_variants, variant_config
from vis4mer.model.fftconv import fft_conv, fft_conv_reference

TOL = 1e-4
CASES = [(name, "inductor" if name == "vis4mer_tiny" else "aot_eager") for name in list_variants()]
CASES.append(("vis4mer_lvu", "inductor"))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def step(model: torch.nn.Module, x: torch.Tensor, call=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Forward (through `call`, the compiled model, when given) and backward of a fixed loss; the
    seed fixes the dropout masks (the same for every dtype, and for inductor with fallback_random)."""
    torch.manual_seed(1)
    out = (model if call is None else call)(x)
    out.square().sum().backward()
    return out.detach(), {n: p.grad for n, p in model.named_parameters()}


def assert_matches(got, ref, ref64, what: str) -> None:
    """Within TOL of eager (relative, in norm). A few gradients are less accurate than that in fp32
    itself (log_dt: a sum over all L taps with heavy cancellation, 1e-4 to 3e-3 from float64 in
    eager, and varying by that much with the summation order, e.g. MKL's thread count); for those,
    the compiled one must be no further from float64 than a few times eager's own error."""
    err = rel(got, ref)
    if err <= TOL:
        return
    err64, eager64 = rel(got, ref64), rel(ref, ref64)
    assert err64 <= 3 * eager64, f"{what}: {err:.2e} from eager; {err64:.2e} from float64 (eager: {eager64:.2e})"


def short_length(cfg, at_least: int = 128) -> int:
    """The shortest length >= at_least whose lengths at every stage have the parities of cfg's."""
    def parities(L):
        return [s["length"] % 2 for s in dataclasses.replace(cfg, l_max=L).schedule()]

    return next(L for L in range(min(at_least, cfg.l_max), cfg.l_max + 1) if parities(L) == parities(cfg.l_max))


@pytest.mark.parametrize("name,backend", CASES)
def test_compiled_model_matches_eager(name, backend):
    torch._dynamo.reset()  # each test's compilation on its own (and caches not grown across tests)
    cfg = variant_config(name)
    if name != "vis4mer_tiny":
        cfg = variant_config(name, d_model=16, d_input=16, l_max=short_length(cfg))
    assert [s["length"] % 2 for s in cfg.schedule()] == [s["length"] % 2 for s in variant_config(name).schedule()]
    torch.manual_seed(0)
    model = ViS4mer(cfg).train()  # with its dropout
    x = torch.randn(2, cfg.l_max, cfg.d_input)
    compiled = copy.deepcopy(model)
    out, grads = step(model, x)
    out64, grads64 = step(copy.deepcopy(model).double(), x.double())
    with inductor_config.patch(fallback_random=True):  # eager's RNG: the same dropout masks
        got, got_grads = step(compiled, x, torch.compile(compiled, backend=backend, fullgraph=True, dynamic=False))
    assert got.shape == (2, cfg.num_classes)
    assert_matches(got, out, out64, "logits")
    for pname, g in got_grads.items():
        assert g is not None and torch.isfinite(g).all(), pname
        assert_matches(g, grads[pname], grads64[pname], pname)


@pytest.mark.parametrize("kind,real_cauchy", [("cauchy", True), ("cauchy", False), ("vandermonde", False)])
def test_contraction_ops_compile(monkeypatch, kind, real_cauchy):
    """The chunked contractions inside a compiled graph (as opaque custom ops, by their fake
    implementations), values and gradients equal to eager."""
    monkeypatch.setattr(sk, "REAL_CAUCHY", real_cauchy)
    v = torch.randn(5, 3, 8, dtype=torch.cfloat, requires_grad=True)
    mu = torch.complex(-torch.rand(5, 8), torch.randn(5, 8)).requires_grad_()
    grid = torch.randn(11) * 3 if kind == "cauchy" else torch.arange(11.0)

    def f(v, mu):
        return torch.view_as_real(sk.chunked_contraction(v, mu, grid, kind, chunk=2)).square().sum()

    ref = torch.autograd.grad(f(v, mu), (v, mu))
    got = torch.autograd.grad(torch.compile(f, backend="aot_eager", fullgraph=True)(v, mu), (v, mu))
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("op", ["contraction", "cauchy_contraction", "nplr_kernel"])
def test_custom_ops_pass_opcheck(op):
    """torch.library.opcheck: schema, fake (meta) implementation against the real one (shapes,
    strides, dtypes), autograd registration, and AOTAutograd tracing, static and dynamic."""
    v = torch.randn(4, 2, 6, dtype=torch.cdouble, requires_grad=True)
    mu = torch.complex(-torch.rand(4, 6, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64))
    mu.requires_grad_()
    if op == "contraction":
        y = torch.randn(7, dtype=torch.float64)
        for kind, grid in (("cauchy", torch.complex(torch.zeros_like(y), y)),
                           ("vandermonde", torch.arange(7.0, dtype=torch.float64))):
            torch.library.opcheck(torch.ops.vis4mer.contraction, (v, mu, grid, kind, 3))
    elif op == "cauchy_contraction":
        torch.library.opcheck(torch.ops.vis4mer.cauchy_contraction, (v, mu, torch.randn(7, dtype=torch.float64), 3))
    else:  # one C~: v holds 2(c+1) = 4 rows, [B, P] x [C~, Q]
        v = torch.randn(4, 4, 6, dtype=torch.cdouble, requires_grad=True)  # c = 1
        for L in (12, 13):
            y = torch.randn(L // 2 + 1 - (L % 2 == 0), dtype=torch.float64)
            k_nyq = torch.randn(4, 1, dtype=torch.float64, requires_grad=True)
            torch.library.opcheck(torch.ops.vis4mer.nplr_kernel, (v, mu, y, k_nyq, L, 3))


def test_fft_conv_compiles():
    """The FFT convolution traced into a graph (its hand-written backward included) equals eager
    and its plain twin."""
    u = torch.randn(2, 3, 40, requires_grad=True)
    k = torch.randn(3, 40, requires_grad=True)
    w = torch.randn(2, 3, 40)

    def loss(conv, u, k):
        return (conv(u, k) * w).sum()

    ref = torch.autograd.grad(loss(fft_conv_reference, u, k), (u, k))
    compiled = torch.compile(lambda u, k: loss(fft_conv, u, k), backend="aot_eager", fullgraph=True)
    got = torch.autograd.grad(compiled(u, k), (u, k))
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
