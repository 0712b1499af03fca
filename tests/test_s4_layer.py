"""The S4 block: convolution mode against recurrent mode, causality, length limits."""
import pytest
import torch

from vis4mer.model.s4 import S4, S4Config

CONFIGS = {
    "nplr": S4Config(d_state=16, kernel="nplr"),
    "diag-zoh-lin": S4Config(d_state=16, kernel="diag", disc="zoh", init="lin"),
    "diag-bilinear-inv": S4Config(d_state=16, kernel="diag", disc="bilinear", init="inv"),
}


def randomize(layer: S4):
    """Random parameters (not just the init) so that the check covers trained layers."""
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name.endswith(("log_dt", "Lambda", "log_A_real")):
                continue
            p.add_(0.1 * torch.randn_like(p))


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("L", [17, 32])
def test_convolution_equals_recurrence(name, L):
    H, B = 5, 2
    layer = S4(H, l_max=L, cfg=CONFIGS[name]).eval()
    randomize(layer)
    u = torch.randn(B, L, H)
    with torch.no_grad():
        y_conv = layer(u)
        state = layer.default_state(B)
        ys = []
        for t in range(L):
            y_t, state = layer.step(u[:, t], state)
            ys.append(y_t)
    y_step = torch.stack(ys, 1)
    assert ((y_conv - y_step).norm() / y_conv.norm()).item() <= 1e-4


@pytest.mark.parametrize("name", CONFIGS)
def test_causal(name):
    H, L, t = 4, 40, 23
    layer = S4(H, l_max=L, cfg=CONFIGS[name]).eval()
    u = torch.randn(1, L, H)
    u2 = u.clone()
    u2[:, t + 1 :] = torch.randn(1, L - t - 1, H) * 10
    with torch.no_grad():
        y, y2 = layer(u), layer(u2)
    torch.testing.assert_close(y[:, : t + 1], y2[:, : t + 1], rtol=0, atol=1e-5)
    assert (y[:, t + 1 :] - y2[:, t + 1 :]).abs().max() > 1e-2  # and later outputs do change


@pytest.mark.parametrize("kernel", ["nplr", "diag"])
def test_bidirectional_sees_the_future_and_has_no_step(kernel):
    H, L, t = 4, 40, 23
    layer = S4(H, l_max=L, cfg=S4Config(d_state=16, kernel=kernel, init="legs" if kernel == "nplr" else "lin",
                                        bidirectional=True)).eval()
    u = torch.randn(1, L, H)
    u2 = u.clone()
    u2[:, t + 1 :] += 1.0
    with torch.no_grad():
        assert (layer(u)[:, :t] - layer(u2)[:, :t]).abs().max() > 1e-4
    with pytest.raises(ValueError, match="bidirectional"):
        layer.default_state(1)


def test_nplr_refuses_sequences_longer_than_l_max():
    layer = S4(4, l_max=16, cfg=S4Config(d_state=8))
    with pytest.raises(ValueError, match="exceeds .* l_max=16"):
        layer(torch.randn(1, 17, 4))
    assert layer(torch.randn(1, 9, 4)).shape == (1, 9, 4)  # shorter is fine: kernel truncated


def test_channel_dropout_drops_whole_channels():
    layer = S4(8, l_max=32, cfg=S4Config(d_state=8, dropout=0.5)).train()
    from vis4mer.model.s4 import ChannelDropout
    d = ChannelDropout(0.5).train()
    x = torch.ones(4, 32, 8)
    y = d(x)
    # every (batch, channel) column is either all zero or all 2
    cols = y.transpose(1, 2).reshape(-1, 32)
    assert all(bool((c == 0).all() or (c == 2).all()) for c in cols)
    assert layer(torch.randn(2, 32, 8)).shape == (2, 32, 8)


@pytest.mark.parametrize("bad,match", [
    (dict(kernel="fft"), "kernel"),
    (dict(d_state=7), "d_state"),
    (dict(kernel="diag", disc="euler", init="lin"), "disc"),
    (dict(kernel="diag", init="legs"), "init"),
])
def test_invalid_config(bad, match):
    with pytest.raises(ValueError, match=match):
        S4(4, 8, S4Config(**bad))
