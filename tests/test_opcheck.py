"""torch.library.opcheck on every bnfast op (schema, fake kernel, autograd
registration, AOT dispatch), with samples from tests/samples.py: contiguous and
channels_last, float32 / float64 / bfloat16, with and without weight (each
dtype and layout with both). Inputs require grad (but bfloat16 ones), so the
autograd registration is exercised: a differentiable op's kernel, or a
not-differentiable op's explicit one."""

from __future__ import annotations

import pytest
import torch

from tests import samples

EPS = 1e-5
OPS = torch.ops.bnfast

OPCHECK_CASES = [samples.Case(s, l, d) for s in ((3, 4, 3, 2), (5, 3)) for l in samples.layouts_for(s)
                 if l in ("contiguous", "channels_last") for d in (torch.float32, torch.float64, torch.bfloat16)]


def _sd(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _opcheck(op, args):
    torch.library.opcheck(op, args)


def _opcheck_not_differentiable(op, args):
    """Every check on inputs without grad; the autograd registration (an
    explicit kernel, not the warning fallback) with the same inputs requiring
    grad. (Differentiating through AOT dispatch is what the op refuses.)"""
    detached = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
    torch.library.opcheck(op, detached)
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_autograd_registration"))


# With and without weight alternate over the cases, so every dtype and every
# layout meets both: pairwise, not the full product, as a fake kernel's dtype,
# layout and optional-weight rules do not depend on one another.
WEIGHTED_CASES = [(case, i % 2 == 0) for i, case in enumerate(OPCHECK_CASES)]
WEIGHTED = {"argnames": ("case", "with_weight"),
            "argvalues": [pytest.param(c, w, marks=[pytest.mark.gpu_smoke] if i < 2 else [])
                          for i, (c, w) in enumerate(WEIGHTED_CASES)],
            "ids": [f"{'weight' if w else 'no_weight'}-{c}" for c, w in WEIGHTED_CASES]}


def _inputs(case, device, with_weight, requires_grad=True):
    x = case.input(device, requires_grad=requires_grad and case.dtype != torch.bfloat16)
    w, b = case.params(device)
    if not with_weight:
        w = b = None
    elif requires_grad:
        w.requires_grad_(True)
        b.requires_grad_(True)
    mean, invstd = (t.detach() for t in OPS.stats(x.detach(), EPS))
    return x, w, b, mean, invstd


@pytest.mark.parametrize("case", **samples.by_id(OPCHECK_CASES, smoke=OPCHECK_CASES[:1]))
def test_opcheck_stats(case, device):
    _opcheck(OPS.stats.default, (case.input(device, requires_grad=True), EPS))


@pytest.mark.parametrize(**WEIGHTED)
def test_opcheck_elemt(case, device, with_weight):
    x, w, b, mean, invstd = _inputs(case, device, with_weight)
    _opcheck(OPS.elemt.default, (x, w, b, mean, invstd))
    # stats as differentiable inputs too (SyncBN differentiates through them)
    _opcheck(OPS.elemt.default, (x, w, b, mean.requires_grad_(True), invstd.requires_grad_(True)))


@pytest.mark.parametrize(**WEIGHTED)
def test_opcheck_elemt_running(case, device, with_weight):
    x, w, b, mean, invstd = _inputs(case, device, with_weight)
    running_var = invstd.detach() ** -2
    _opcheck(OPS.elemt_running.default, (x, w, b, mean.detach(), running_var, EPS))
    # running statistics as differentiable inputs too: the decomposition's gradients
    _opcheck(OPS.elemt_running.default, (x, w, b, mean.detach().requires_grad_(True),
                                         running_var.requires_grad_(True), EPS))


@pytest.mark.parametrize(**WEIGHTED)
def test_opcheck_forward(case, device, with_weight):
    x, w, b, _, _ = _inputs(case, device, with_weight)
    _opcheck(OPS.forward.default, (x, w, b, EPS))
    # With the running statistics and step count it updates in place (the
    # statistics' dtype need not be the input's): the schema's mutation
    # annotations, the fake and AOT dispatch (auto_functionalized).
    running = torch.float32 if with_weight else case.dtype
    rm = torch.randn(case.channels, dtype=running, device=device)
    rv = torch.rand(case.channels, dtype=running, device=device) + 0.5
    _opcheck(OPS.forward.default, (x, w, b, EPS, rm, rv, 0.3, torch.tensor(5, device=device)))


@pytest.mark.parametrize(**WEIGHTED)
def test_opcheck_backward_ops(case, device, with_weight):
    x, w, _, mean, invstd = _inputs(case, device, with_weight)
    dy = case.grad_out(device).requires_grad_(x.requires_grad)
    sd = _sd(case.dtype)
    _opcheck_not_differentiable(OPS.backward_reduce.default, (dy, x, mean, invstd))
    mean_dy = torch.randn(case.channels, dtype=sd, device=device)
    mean_dy_xmu = torch.randn(case.channels, dtype=sd, device=device)
    _opcheck_not_differentiable(OPS.backward_elemt.default, (dy, x, mean, invstd, w, mean_dy, mean_dy_xmu))
    _opcheck_not_differentiable(OPS.backward.default, (dy, x, mean, invstd, w))


@pytest.mark.parametrize("running_dtype", [pytest.param(torch.float32, marks=pytest.mark.gpu_smoke), torch.float64,
                                           torch.bfloat16], ids=["f32", "f64", "bf16"])
def test_opcheck_update_stats(running_dtype, device):
    sd = torch.float64 if running_dtype == torch.float64 else torch.float32
    rm = torch.randn(4, dtype=running_dtype, device=device)
    rv = torch.rand(4, dtype=running_dtype, device=device) + 0.5
    mean = torch.randn(4, dtype=sd, device=device, requires_grad=True)
    invstd = (torch.rand(4, dtype=sd, device=device) + 0.5).requires_grad_(True)
    _opcheck_not_differentiable(OPS.update_stats_.default, (rm.clone(), rv.clone(), mean, invstd, 0.1, EPS, 10))


@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, marks=pytest.mark.gpu_smoke), torch.float64],
                         ids=["f32", "f64"])
def test_opcheck_gather_stats(dtype, device):
    mean = torch.randn(3, 4, dtype=dtype, device=device, requires_grad=True)
    invstd = (torch.rand(3, 4, dtype=dtype, device=device) + 0.5).requires_grad_(True)
    counts = torch.tensor([4.0, 0.0, 7.0], dtype=dtype, device=device)
    _opcheck_not_differentiable(OPS.gather_stats.default, (mean, invstd, counts, EPS))


def test_weighted_cases_are_pairwise():
    """Every dtype and every layout of the opcheck samples meets both weight settings."""
    for key in (lambda c: c.dtype, lambda c: (len(c.shape), c.layout)):
        seen = {}
        for case, with_weight in WEIGHTED_CASES:
            seen.setdefault(key(case), set()).add(with_weight)
        assert all(v == {True, False} for v in seen.values()), seen


def test_fake_tensor_shapes_match_real(device):
    """The fakes promise what the kernels return (dtype, shape, strides), incl. channels_last."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    for case in OPCHECK_CASES:
        x = case.input(device)
        w, b = case.params(device)
        real = OPS.forward(x, w, b, EPS)
        with FakeTensorMode() as mode:
            fx = mode.from_tensor(x)
            fake = OPS.forward(fx, mode.from_tensor(w), mode.from_tensor(b), EPS)
        for r, f in zip(real, fake):
            assert r.dtype == f.dtype and r.shape == f.shape and r.stride() == f.stride(), (case, r.stride(), f.stride())
