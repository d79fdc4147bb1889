"""Every instruction-set build of the CPU loops (csrc/cpu/isa/) is exercised:
bnfast follows torch's CPU capability, which ATEN_CPU_CAPABILITY caps, so each
build runs in a subprocess with that variable set and is checked against a
float64 reference over dtypes, layouts and odd shapes."""

import os
import subprocess
import sys

import pytest
import torch

from tests import samples

CHECK = r"""
import torch, bnfast
torch.manual_seed(0)
worst = 0.0
# (9, 30) .. (7, 128): rows of 30 to 128 channels, the register loops' vector counts with and without a tail
for shape in [(2, 3), (5, 7, 13), (4, 3, 7, 9), (3, 17, 4, 4), (2, 5, 3, 4, 6), (64, 40), (9, 30), (5, 84), (7, 100), (7, 128)]:
    for dtype, tol in [(torch.float32, 1e-4), (torch.float64, 1e-10), (torch.bfloat16, 5e-2), (torch.float16, 1e-2)]:
        for channels_last in [False, True]:
            x = torch.randn(shape, dtype=torch.float64) * 3 + 2
            xs = x.to(dtype)
            if channels_last and xs.dim() in (4, 5):
                xs = xs.contiguous(memory_format=torch.channels_last if xs.dim() == 4 else torch.channels_last_3d)
            dy = torch.randn(shape, dtype=torch.float64).to(dtype)
            y, mean, invstd = torch.ops.bnfast.forward(xs, None, None, 1e-5)
            dx = torch.ops.bnfast.backward(dy, xs, mean, invstd, None)[0]
            xr = xs.double().requires_grad_()
            yr = torch.nn.functional.batch_norm(xr, None, None, training=True, eps=1e-5)
            (dxr,) = torch.autograd.grad(yr, xr, dy.double())
            err = max((y.double() - yr).abs().max().item(), (dx.double() - dxr).abs().max().item())
            assert err <= tol * max(1.0, dxr.abs().max().item()), (shape, dtype, channels_last, err)
            worst = max(worst, err)
# Affine passes past kNonTemporalBytes (this build's non-temporal stores, where it has
# them; tests/test_numerics.py covers half precision, whose are AVX-512's): each sample's
# output equals the op over that sample alone, which stores plainly.
for dtype in (torch.float32, torch.float64):
    n = NON_TEMPORAL_BYTES // (2 * dtype.itemsize * 64 * 11 * 11) + 1
    for memory_format in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(n, 64, 11, 11, dtype=dtype).contiguous(memory_format=memory_format)
        dy = torch.randn(n, 64, 11, 11, dtype=dtype).contiguous(memory_format=memory_format)
        mean, invstd = torch.ops.bnfast.stats(x, 1e-5)
        terms = (mean, invstd, None, torch.full_like(mean, 0.1), torch.full_like(mean, 0.2))
        y = torch.ops.bnfast.elemt(x, None, None, mean, invstd)
        dx = torch.ops.bnfast.backward_elemt(dy, x, *terms)
        for i in (0, n // 2, n - 1):
            assert torch.equal(y[i:i + 1], torch.ops.bnfast.elemt(x[i:i + 1], None, None, mean, invstd)), (dtype, i)
            assert torch.equal(dx[i:i + 1], torch.ops.bnfast.backward_elemt(dy[i:i + 1], x[i:i + 1], *terms)), (dtype, i)
print(torch.backends.cpu.get_cpu_capability(), worst)
"""


def _supported():
    # torch's own capability is the widest this CPU (and torch) supports.
    widest = torch.backends.cpu.get_cpu_capability()
    order = ["DEFAULT", "AVX2", "AVX512"]
    return order[: order.index(widest) + 1] if widest in order else ["DEFAULT"]


@pytest.mark.parametrize("capability", ["DEFAULT", "AVX2", "AVX512"])
def test_isa_build(capability):
    if capability not in _supported():
        pytest.skip(f"this CPU (or torch build) does not run {capability}")
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability.lower())
    check = f"NON_TEMPORAL_BYTES = {samples.CPU['kNonTemporalBytes']}\n" + CHECK
    out = subprocess.run([sys.executable, "-c", check], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-4000:]
    used, _ = out.stdout.split()
    assert used == capability
