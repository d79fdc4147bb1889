"""gradcheck and gradgradcheck in float64 (small shapes), through
bnfast.batch_norm (training and eval, with weight/bias, channels_last) and
through the ops stats, elemt and forward directly."""

from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

import bnfast
from tests import samples

EPS = 1e-5
OPS = torch.ops.bnfast

GRAD_CASES = [samples.Case((3, 2, 3, 2), "contiguous", torch.float64),
              samples.Case((3, 2, 3, 2), "channels_last", torch.float64),
              samples.Case((4, 3), "contiguous", torch.float64),
              samples.Case((2, 3, 4), "nlc", torch.float64)]


def _leaves(case, device, affine=True):
    x = case.input(device, requires_grad=True)
    if not affine:
        return x, None, None
    w, b = case.params(device)
    return x, w.requires_grad_(True), b.requires_grad_(True)


def _check(fn, inputs):
    assert gradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)
    assert gradgradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_affine"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", **samples.by_id(GRAD_CASES, smoke=GRAD_CASES[:1]))
def test_batch_norm(case, training, affine, device):
    x, w, b = _leaves(case, device, affine)
    rm, rv = case.running(device)

    def fn(x, *wb):
        # fresh running stats per call: gradcheck calls fn many times
        return bnfast.batch_norm(x, rm.clone(), rv.clone(), *wb, training=training, momentum=0.1, eps=EPS)

    _check(fn, (x, w, b) if affine else (x,))


@pytest.mark.parametrize("case", **samples.by_id(GRAD_CASES, smoke=GRAD_CASES[:1]))
def test_stats_op(case, device):
    x = case.input(device, requires_grad=True)
    _check(lambda x: OPS.stats(x, EPS), (x,))


@pytest.mark.parametrize("case", **samples.by_id(GRAD_CASES, smoke=GRAD_CASES[:1]))
def test_elemt_op(case, device):
    x, w, b = _leaves(case, device)
    mean, invstd = OPS.stats(x.detach(), EPS)
    _check(lambda *a: OPS.elemt(*a), (x, w, b, mean.requires_grad_(True), invstd.requires_grad_(True)))


@pytest.mark.parametrize("case", **samples.by_id(GRAD_CASES, smoke=GRAD_CASES[:1]))
def test_forward_op(case, device):
    """All three outputs (y, mean, invstd) carry gradients."""
    x, w, b = _leaves(case, device)
    _check(lambda *a: OPS.forward(*a, EPS), (x, w, b))
    _check(lambda x: OPS.forward(x, None, None, EPS), (x,))


@pytest.mark.parametrize("case", **samples.by_id(GRAD_CASES))
def test_forward_op_partial_inputs(case, device):
    """Gradients land on the right arguments when weight or bias is None or
    does not require grad (the C++ autograd counts only the tensors given)."""
    x, w, b = _leaves(case, device)
    _check(lambda x, w: OPS.forward(x, w, None, EPS), (x, w))
    _check(lambda x, b: OPS.forward(x, None, b, EPS), (x, b))
    _check(lambda x, b: OPS.forward(x, w.detach(), b, EPS), (x, b))
    _check(lambda w, b: OPS.forward(x.detach(), w, b, EPS)[0], (w, b))


@pytest.mark.parametrize("case", **samples.by_id(GRAD_CASES))
def test_elemt_op_partial_inputs(case, device):
    """As for forward: elemt's C++ autograd with weight or bias None or not
    requiring grad, and with only the statistics requiring grad."""
    x, w, b = _leaves(case, device)
    mean, invstd = (t.requires_grad_(True) for t in OPS.stats(x.detach(), EPS))
    _check(lambda x, w, m, i: OPS.elemt(x, w, None, m, i), (x, w, mean, invstd))
    _check(lambda x, b, i: OPS.elemt(x, None, b, mean.detach(), i), (x, b, invstd))
    _check(lambda b, m: OPS.elemt(x.detach(), w.detach(), b, m, invstd.detach()), (b, mean))
    _check(lambda m, i: OPS.elemt(x.detach(), None, None, m, i), (mean, invstd))
