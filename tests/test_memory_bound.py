"""The S4 kernels never materialise the (H, N, L) Cauchy tensor: LVU's first stage (H=1024, N=64,
L=11820) runs forward and backward within a small multiple of its activations. The dense tensor
alone would be 3.1 GB (complex64), and autograd would keep several of them."""
import subprocess
import sys

CODE = r"""
import os, resource, torch
from vis4mer.model.s4 import S4
def rss():
    with open(f"/proc/{os.getpid()}/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmRSS:"))
torch.manual_seed(0)
layer = S4(1024, l_max=11820)
u = torch.randn(1, 11820, 1024, requires_grad=True)
base = rss()
layer(u).square().mean().backward()
assert all(p.grad is not None for p in layer.parameters())
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base)
"""


def test_lvu_first_stage_forward_backward_is_memory_bounded():
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    peak = int(out.stdout.strip().splitlines()[-1])
    assert peak < 1.5 * 2**30, f"peak {peak / 2**30:.2f} GiB above baseline"
