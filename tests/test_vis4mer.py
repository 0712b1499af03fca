"""ViS4mer and its attention baseline: every registered variant, schedules, hints, determinism."""
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from vis4mer.model import (
    SelfAttentionBaseline,
    ViS4mer,
    ViS4merConfig,
    create_model,
    list_variants,
    param_groups,
    variant_config,
)
from vis4mer.model.s4 import DiagKernel, NPLRKernel


def expected_params(cfg: ViS4merConfig) -> int:
    """Parameter count written out from the spec's architecture (section 2 and 3)."""
    N, c = cfg.d_state, 2 if cfg.bidirectional else 1
    total = cfg.d_input * cfg.d_model + cfg.d_model if cfg.d_input != cfg.d_model else 0
    D, n = cfg.d_model, cfg.n_layers
    pool = cfg.width_div or [2] * n
    for i in range(n):
        s4 = (D * D + D) + D + D  # output linear, D skip, log_dt
        if cfg.kernel == "nplr":
            s4 += N + 2 * D * N + (c + 1) * D * N  # Lambda (shared), [B, P], [C~.., Q] as (re, im)
        else:
            s4 += 2 * D * (N // 2) + D * N + c * D * N  # log_A_real, A_imag, B, C
        Do = D // pool[i]
        total += 2 * D + s4 + D * Do + Do  # LayerNorm, S4, Linear
        D = Do
    return total + D * cfg.d_output + cfg.d_output


@pytest.mark.parametrize("name", list_variants())
def test_variant_shapes_and_parameter_count(name):
    cfg = variant_config(name)
    model = ViS4mer(cfg).eval()
    assert sum(p.numel() for p in model.parameters()) == expected_params(cfg)
    x = torch.randn(1, min(cfg.l_max, 512), cfg.d_input)  # nplr kernels are generated at l_max anyway
    with torch.no_grad():
        assert model(x).shape == (1, cfg.num_classes)


def test_lvu_default_matches_the_released_model():
    cfg = variant_config("vis4mer_lvu")
    stages = cfg.schedule()
    assert [s["length"] for s in stages] == [11820, 5910, 2955]
    assert [s["width"] for s in stages] + [stages[-1]["width_out"]] == [1024, 512, 256, 128]
    n = sum(p.numel() for p in ViS4mer(cfg).parameters())
    # the released model has 1024*1024 + 1024 more: its input projection, built but never applied
    released = 1024 * 1024 + 1024 + n
    assert n == expected_params(cfg) and released - n == 1_049_600


@pytest.mark.parametrize("name", list_variants())
@pytest.mark.parametrize("kernel,bidirectional", [("nplr", False), ("diag", False), ("nplr", True)])
def test_gradients_reach_every_parameter(name, kernel, bidirectional):
    # the variant's structure at a size that runs in a blink
    cfg = variant_config(name, l_max=96, d_input=48, d_model=32, d_state=8, kernel=kernel,
                         bidirectional=bidirectional, dropout=0.1)
    model = ViS4mer(cfg).train()
    model(torch.randn(2, 96, 48)).sum().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, pname


def test_regression_head_and_depth_zero():
    m = ViS4mer(ViS4merConfig(d_input=16, l_max=20, d_model=16, n_layers=0, task="regression"))
    x = torch.randn(3, 20, 16)
    assert m(x).shape == (3, 1)
    torch.testing.assert_close(m(x), m.decoder(x.mean(1)))  # depth 0: mean-pooled features -> head


@pytest.mark.parametrize("pool,ptype,div", [([3, 2], ["max", "avg"], [1, 4]), ([1, 5], ["avg", "max"], [2, 2])])
def test_custom_pooling_schedule(pool, ptype, div):
    cfg = ViS4merConfig(d_input=32, l_max=60, d_model=32, n_layers=2, d_state=8, pool=pool, pool_type=ptype,
                        width_div=div, num_classes=3)
    m = ViS4mer(cfg)
    s = cfg.schedule()
    assert s[1]["length"] == 60 // pool[0] and s[1]["width"] == 32 // div[0]
    assert m(torch.randn(2, 60, 32)).shape == (2, 3)
    assert sum(p.numel() for p in m.parameters()) == expected_params(cfg)


@pytest.mark.parametrize("kw,match", [
    (dict(l_max=8, n_layers=4), "stage 3: pooling length 1 by 2"),
    (dict(d_model=48, n_layers=5, l_max=1024), "stage 4: width 3 is not divisible by width_div 2"),
    (dict(n_layers=2, pool=[2]), "pool has 1 entries but n_layers=2"),
    (dict(n_layers=1, pool_type=["mean"]), "stage 0: pool_type 'mean'"),
    (dict(task="classification", num_classes=1), "num_classes=1"),
    (dict(dropout=1.0), "dropout"),
])
def test_impossible_schedules_are_refused_naming_the_stage(kw, match):
    with pytest.raises(ValueError, match=match):
        ViS4mer(ViS4merConfig(d_input=16, d_model=kw.pop("d_model", 16), **kw))


def test_same_seed_same_output():
    cfg = variant_config("vis4mer_tiny")
    x = torch.randn(2, cfg.l_max, cfg.d_input)
    outs = []
    for _ in range(2):
        torch.manual_seed(1112)
        m = ViS4mer(cfg).train()
        torch.manual_seed(7)  # dropout masks
        outs.append(m(x))
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    torch.manual_seed(1113)
    assert not torch.allclose(ViS4mer(cfg).eval()(x), outs[0])


@pytest.mark.parametrize("kernel", ["nplr", "diag"])
def test_param_groups_carry_the_ssm_hints(kernel):
    m = create_model("vis4mer_tiny", kernel=kernel)
    groups = param_groups(m, lr=3e-3, weight_decay=0.01)
    names = {id(p): n for n, p in m.named_parameters()}
    assert sum(len(g["params"]) for g in groups) == len(list(m.parameters()))
    ssm = [g for g in groups if g["lr"] == 1e-3 and g["weight_decay"] == 0.0]
    assert len(ssm) == 1
    ssm_names = {names[id(p)].split(".")[-1] for p in ssm[0]["params"]}
    expected = {"Lambda", "BP", "log_dt"} if kernel == "nplr" else {"log_A_real", "A_imag", "B", "log_dt"}
    assert ssm_names == expected
    regular = [g for g in groups if g["lr"] == 3e-3][0]
    expected = {"D", "weight", "bias", "CQ" if kernel == "nplr" else "C"}
    assert {names[id(p)].split(".")[-1] for p in regular["params"]} >= expected
    assert regular["weight_decay"] == 0.01
    torch.optim.AdamW(groups)  # accepted as is


def test_attention_baseline_mirrors_the_stages():
    cfg = ViS4merConfig(d_input=64, l_max=40, d_model=64, n_layers=2, num_classes=5, dropout=0.0)
    torch.manual_seed(0)
    sdpa = SelfAttentionBaseline(cfg, impl="sdpa").eval()
    naive = SelfAttentionBaseline(cfg, impl="naive").eval()
    naive.load_state_dict(sdpa.state_dict())
    x = torch.randn(2, 40, 64)
    torch.testing.assert_close(sdpa(x), naive(x), rtol=1e-4, atol=1e-5)
    assert sdpa(x).shape == (2, 5)
    assert [s.linear.out_features for s in sdpa.stages] == [32, 16]
    with pytest.raises(ValueError, match="impl"):
        SelfAttentionBaseline(cfg, impl="flash3")


def test_model_package_imports_neither_ray_nor_mlflow():
    code = ("import sys, model, model.attention, model.optim; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('ray', 'mlflow', 'orchestrator', 'datasets')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


class _DtypeLog(TorchDispatchMode):
    """Records (op, input dtypes, output dtypes) for every op that runs."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, list[torch.dtype], list[torch.dtype]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, (tuple, list)) else (out,)
        self.calls.append((str(func.overloadpacket), [a.dtype for a in args if isinstance(a, torch.Tensor)],
                           [o.dtype for o in outs if isinstance(o, torch.Tensor)]))
        return out

    def ran(self, *ops: str) -> bool:
        """Every one of `ops` ran at least once."""
        return set(ops) <= {op for op, _, _ in self.calls}

    def dtypes(self, *ops: str) -> set[torch.dtype]:
        return {d for op, ins, outs in self.calls if op in ops for d in ins + outs}


def test_bf16_autocast_keeps_the_kernel_and_the_fft_conv_in_fp32():
    """Under bf16 autocast the S4 kernel and the FFT convolution run in fp32, the rest in bf16, and
    forward+backward stays close to fp32 (vis4mer_tiny, CPU autocast).

    Tolerances (relative, in norm): logits 2e-2 and every gradient but Lambda's and log_dt's 3e-2
    (measured 3e-3 and at most 1.3e-2): bf16 keeps 8 significant bits, so each rounding is within
    2^-9 = 2e-3, and a forward+backward chains a few dozen of them. Lambda's and log_dt's gradients
    are left out: they are sums over all L taps with heavy cancellation (in fp32 already only
    1e-4..3e-3 from float64), so the bf16 rounding of the gradient arriving from the output Linear
    outweighs them, as minibatch noise does in training; they are only checked to be finite."""
    cfg = variant_config("vis4mer_tiny", dropout=0.0)
    torch.manual_seed(0)
    model = ViS4mer(cfg).train()
    x = torch.randn(2, cfg.l_max, cfg.d_input)
    ref = model(x)
    ref.square().sum().backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    seen: dict[str, list[torch.dtype]] = {"kernel": [], "linear": []}
    hooks = [m.register_forward_hook(lambda m, i, o, key=key: seen[key].append(o.dtype))
             for key, cls in (("kernel", (NPLRKernel, DiagKernel)), ("linear", torch.nn.Linear))
             for m in model.modules() if isinstance(m, cls)]
    with _DtypeLog() as log:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        out.float().square().sum().backward()
    for h in hooks:
        h.remove()

    assert set(seen["kernel"]) == {torch.float32} and len(seen["kernel"]) == cfg.n_layers
    assert set(seen["linear"]) == {torch.bfloat16} and out.dtype == torch.bfloat16
    # the kernel (the fused NPLR custom op, forward and backward) and the convolution (the kernel's
    # rfft, then the two FFT custom ops) run whole under the log, their internals inside them: each
    # must have run, on fp32 / complex64 operands only
    kernel_ops = ("vis4mer.nplr_kernel", "vis4mer.nplr_kernel_backward")
    conv_ops = ("aten._fft_r2c", "vis4mer.fft_conv_forward", "vis4mer.fft_conv_backward")
    assert log.ran(*kernel_ops, *conv_ops)
    assert log.dtypes(*kernel_ops) == {torch.float32, torch.complex64}
    assert log.dtypes(*conv_ops, "aten._fft_c2r", "aten._fft_c2c") == {torch.float32, torch.complex64}
    assert log.dtypes("aten.mm", "aten.addmm") == {torch.bfloat16}  # every Linear, forward and backward
    assert log.dtypes("aten.gelu", "aten.gelu_backward") == {torch.bfloat16}

    def rel(a, b):
        return ((a.double() - b.double()).norm() / b.double().norm()).item()

    assert rel(out, ref) <= 2e-2
    for name, p in model.named_parameters():
        assert p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all(), name
        if not name.endswith(("Lambda", "log_dt")):
            assert rel(p.grad, ref_grads[name]) <= 3e-2, (name, rel(p.grad, ref_grads[name]))
