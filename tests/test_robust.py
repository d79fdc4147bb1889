"""Robust statistics (large mean, outliers), NaN/Inf propagation, determinism."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import bnfast
from tests import reference as ref
from tests import samples

EPS = 1e-5


def _large_mean_input(device, layout, first_outlier=False):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, 16, 16, generator=g, dtype=torch.float64)
    if first_outlier:  # the first element of each channel (one of bnfast's shift samples) is a 4-sigma sample
        x[0, :, 0, 0] = 4.0
    x = (x + 1e4).float().to(device)
    return x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x


@pytest.mark.parametrize("first_outlier", [False, True], ids=["randn", "outlier_first"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_large_mean_variance(layout, first_outlier, device):
    """x = 1e4 + randn in float32: running_var (unbiased batch variance, momentum 1),
    running_mean and the output are within 2x torch's error against float64 truth."""
    x = _large_mean_input(device, layout, first_outlier)
    mean, var, invstd = ref.stats(x, EPS)
    n = x.numel() // x.size(1)
    results = {}
    for name, fn in (("bnfast", bnfast.batch_norm), ("torch", F.batch_norm)):
        rm = torch.zeros(8, device=device)
        rv = torch.ones(8, device=device)
        y = fn(x, rm, rv, None, None, True, 1.0, EPS)
        results[name] = (y, rm, rv)
    y64 = ref.elemt(x, None, None, mean, invstd)
    (yb, rmb, rvb), (yt, rmt, rvt) = results["bnfast"], results["torch"]
    ref.assert_error_within_torch("running_mean", rmb, rmt, mean, torch.float32)
    ref.assert_error_within_torch("running_var", rvb, rvt, var * n / (n - 1), torch.float32, factor=2.0)
    # invstd straight from the stats op, against torch's saved invstd, with rule 7's 1-ulp floor.
    _, invstd_b = torch.ops.bnfast.stats(x, EPS)
    _, _, invstd_t = torch.ops.aten.native_batch_norm(x, None, None, None, None, True, 0.1, EPS)
    e_b, e_t = ref.max_err(invstd_b, invstd), ref.max_err(invstd_t, invstd)
    assert e_b <= 2 * e_t + ref.ulp_floor(torch.float32, invstd.abs().max().item()), (e_b, e_t)
    ref.assert_error_within_torch("output", yb, yt, y64, torch.float32)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("pre_relu", [False, True], ids=["plain", "pre_relu"])
def test_skewed_channel_invstd(layout, pre_relu, device):
    """A channel that is nearly all 0 (a relu'd activation) but for its first element and one other:
    invstd within 8 ulps (relative) of the float64 truth. A shift taken from the first element alone
    sits far from the mean and loses ~2 digits to cancellation."""
    x = torch.zeros(3, 5, 7, 9, dtype=torch.float64)
    x[0, :, 0, 0] = 0.5223729
    x[2, :, 3, 4] = 0.3141593
    if pre_relu:
        x[1] = -torch.rand(5, 7, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(0))  # relu'd to 0
    x = x.float().to(device)
    x = x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x
    if pre_relu:
        _, _, invstd = torch.ops.bnfast.forward_act(x, None, None, None, EPS, "pre_relu", 0.0)
        truth = ref.stats(F.relu(x.double()), EPS)[2]
    else:
        _, invstd = torch.ops.bnfast.stats(x, EPS)
        truth = ref.stats(x.double(), EPS)[2]
    rel = ((invstd.double().cpu() - truth.cpu()) / truth.cpu()).abs().max().item()
    assert rel <= 8 * torch.finfo(torch.float32).eps, f"invstd relative error {rel:.3e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_constant_channel(dtype, device):
    """Constant data: variance exactly 0 (never negative), invstd = 1/sqrt(eps), output = bias."""
    x = torch.full((4, 3, 5, 5), 3.25, dtype=dtype, device=device)
    w = torch.ones(3, dtype=dtype, device=device)
    b = torch.tensor([0.5, -1.0, 2.0], dtype=dtype, device=device)
    rm = torch.zeros(3, dtype=dtype, device=device)
    rv = torch.ones(3, dtype=dtype, device=device)
    y = bnfast.batch_norm(x, rm, rv, w, b, True, 1.0, EPS)
    mean, invstd = torch.ops.bnfast.stats(x, EPS)
    torch.testing.assert_close(mean, torch.full_like(mean, 3.25))
    torch.testing.assert_close(invstd, torch.full_like(invstd, EPS ** -0.5))
    # torch gets exactly 0; bnfast derives var from the float32 invstd (1/invstd^2 - eps),
    # which leaves ~1e-12. Harmless, but it must be >= 0 and tiny.
    assert (rv >= 0).all() and (rv.float() < 1e-9).all(), rv
    torch.testing.assert_close(y, b.view(1, 3, 1, 1).expand_as(y))


# ----------------------------------------------------------------- NaN / Inf

_SPECIALS = [("nan_middle", float("nan"), (1, 0, 2, 3)), ("nan_first", float("nan"), (0, 1, 0, 0)),
             ("inf_middle", float("inf"), (2, 2, 1, 1)), ("ninf_first", float("-inf"), (0, 0, 0, 0))]


def _special_run(case, device, value, where, training):
    outs = {}
    for name, fn in (("bnfast", bnfast.batch_norm), ("torch", F.batch_norm)):
        x = case.input(device).contiguous()
        x[where] = value
        x = case.arrange(x).requires_grad_(True)
        rm, rv = case.running(device)
        w, b = case.params(device)
        y = fn(x, rm, rv, w, b, training, 0.1, EPS)
        (dx,) = torch.autograd.grad(y, x, case.grad_out(device))
        outs[name] = dict(output=y, running_mean=rm, running_var=rv, grad_input=dx)
    return outs


def _assert_same_specials(outs, labels):
    for label in labels:
        a, t = outs["bnfast"][label], outs["torch"][label]
        assert torch.equal(torch.isnan(a), torch.isnan(t)), f"{label}: NaN mask differs from torch"
        assert torch.equal(torch.isinf(a), torch.isinf(t)), f"{label}: Inf mask differs from torch"
        assert torch.equal(a[torch.isinf(t)], t[torch.isinf(t)]), f"{label}: Inf signs differ"
        fin = torch.isfinite(t)
        torch.testing.assert_close(a[fin], t[fin], rtol=1e-4, atol=1e-4, msg=label)


_SPECIAL_PARAMS = [(k, v, w, l, t) for k, v, w in _SPECIALS for l in ("contiguous", "channels_last") for t in (True, False)]
_SPECIAL_IDS = [f"{k}-{l}-{'train' if t else 'eval'}" for k, v, w, l, t in _SPECIAL_PARAMS]


@pytest.mark.parametrize(("kind", "value", "where", "layout", "training"), [
    pytest.param(*p) for p in _SPECIAL_PARAMS], ids=_SPECIAL_IDS)
def test_nan_inf_forward(kind, value, where, layout, training, device):
    """NaN/Inf in the input: output and running statistics have torch's NaN/Inf masks."""
    outs = _special_run(samples.Case((3, 3, 4, 5), layout, torch.float32), device, value, where, training)
    _assert_same_specials(outs, ("output", "running_mean", "running_var"))


@pytest.mark.parametrize(("kind", "value", "where", "layout", "training"), [
    pytest.param(*p) for p in _SPECIAL_PARAMS], ids=_SPECIAL_IDS)
def test_nan_inf_backward(kind, value, where, layout, training, device):
    """NaN/Inf in the input: grad_input has torch's NaN/Inf mask."""
    outs = _special_run(samples.Case((3, 3, 4, 5), layout, torch.float32), device, value, where, training)
    _assert_same_specials(outs, ("grad_input",))


# ----------------------------------------------------------------- determinism

DET_CASES = [samples.Case(s, l, d)
             for s in ((3, 2, 128, 128), (128, 1024), (64, 8, 16, 16), (130, 24, 3, 3), samples.STREAMING_ROWS)
             for l in samples.layouts_for(s) if l != "strided" for d in (torch.float32, torch.bfloat16)]


def _train_step(case, device, seed=0):
    x = case.input(device, seed=seed, requires_grad=True)
    w, b = (t.requires_grad_(True) for t in case.params(device))
    rm, rv = case.running(device)
    y = bnfast.batch_norm(x, rm, rv, w, b, True, 0.1, EPS)
    grads = torch.autograd.grad(y, (x, w, b), case.grad_out(device))
    return (y, rm, rv) + tuple(grads)


def _assert_bitwise(a, b, what):
    for i, (u, v) in enumerate(zip(a, b)):
        assert u.stride() == v.stride()
        assert torch.equal(u.view(-1) if u.is_contiguous() else u.contiguous().view(-1),
                           v.view(-1) if v.is_contiguous() else v.contiguous().view(-1)), f"{what}: result {i}"


@pytest.mark.parametrize("case", **samples.by_id(DET_CASES))
def test_deterministic_run_to_run(case, device):
    _assert_bitwise(_train_step(case, device), _train_step(case, device), "run to run")


@pytest.mark.parametrize("case", **samples.by_id(DET_CASES))
def test_deterministic_across_thread_counts(case):
    """CPU kernels chunk by shape, not by thread count: 1 vs 2 (vs 4) threads, bitwise."""
    torch.set_num_threads(1)
    one = _train_step(case, "cpu")
    torch.set_num_threads(2)
    two = _train_step(case, "cpu")
    torch.set_num_threads(4)
    four = _train_step(case, "cpu")
    _assert_bitwise(one, two, "1 vs 2 threads")
    _assert_bitwise(one, four, "1 vs 4 threads")
