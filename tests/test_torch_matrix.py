"""bnfast against torch over torch's own batch-norm test matrix: the OpInfo
samples of torch.nn.functional.batch_norm and the ModuleInfo samples and
error inputs of torch.nn.BatchNorm1d/2d/3d (torch.testing._internal), run
through both implementations side by side: outputs, running statistics,
gradients, forward-mode tangents, state dicts and exception types."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch.testing._internal.common_methods_invocations import op_db
from torch.testing._internal.common_modules import module_db

import bnfast
from tests import reference as ref

OPINFO = next(o for o in op_db if o.name == "nn.functional.batch_norm" and not o.variant_test_name)
MODULE_INFOS = {m.module_cls: m for m in module_db if m.module_cls in bnfast.convert.__globals__["_TO_BNFAST"]}
DTYPES = [pytest.param(d, id=str(d).removeprefix("torch.")) for d in
          (torch.float32, torch.float64, torch.bfloat16, torch.float16)]


def _clone(value):
    if not isinstance(value, torch.Tensor):
        return value
    return value.detach().clone().requires_grad_(value.requires_grad)


def _grad_out(out):
    """The same output gradient in every run (not ones: they make the input
    gradient of a training batch norm exactly zero, all cancellation)."""
    return torch.randn(out.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def _run_functional(fn, sample):
    """fn on copies of the sample: its output, its tensor arguments after the
    call (running statistics are updated in place), the gradients of its
    leaves, and the float64 truth of each (tests/reference.py)."""
    args = [_clone(a) for a in (sample.input, *sample.args)]
    out = fn(*args, **sample.kwargs)
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    dy = _grad_out(out)
    grads = torch.autograd.grad(out, leaves, dy.to(out.device, out.dtype)) if leaves else ()
    return [out, *[a for a in args if isinstance(a, torch.Tensor)], *grads]


def _truth(sample):
    """What _run_functional returns, from the float64 formulas."""
    x, (rm, rv, w, b) = sample.input, sample.args[:4]
    training = sample.kwargs.get("training", False)
    momentum, eps = sample.kwargs.get("momentum", 0.1), sample.kwargs.get("eps", 1e-5)
    dy = _grad_out(x)
    if training:
        out, mean, var, _ = ref.batch_norm_train(x, w, b, eps)
        grads = ref.batch_norm_train_backward(dy, x, w, eps)
        if rm is not None:
            rm, rv = ref.update_stats(rm, rv, mean, var, momentum, ref.count(x))
    else:
        out = ref.batch_norm_eval(x, rm, rv, w, b, eps)
        grads = ref.batch_norm_eval_backward(dy, x, rm, rv, w, eps)
    given = [t for t in (x, rm, rv, w, b) if t is not None]
    leaves = [g for t, g in zip((x, w, b), grads) if t is not None and t.requires_grad]
    return [out, *given, *leaves]


@pytest.mark.parametrize("dtype", DTYPES)
def test_opinfo_samples(dtype, device):
    """Every result within the suite's rule of torch's: bnfast's error against
    the float64 truth at most twice torch's, plus a rounding floor."""
    for sample in OPINFO.sample_inputs(device, dtype, requires_grad=True):
        theirs = _run_functional(F.batch_norm, sample)
        ours = _run_functional(bnfast.batch_norm, sample)
        where = f"{tuple(sample.input.shape)} {sample.kwargs}"
        assert len(ours) == len(theirs), where
        if sample.input.numel() == 0:  # torch's shortcut: nothing to compute, compared exactly
            for a, b in zip(ours, theirs):
                torch.testing.assert_close(a, b, msg=where)
            continue
        for i, (a, b, t) in enumerate(zip(ours, theirs, _truth(sample))):
            ref.assert_error_within_torch(f"result {i} of {where}", a, b, t, a.dtype)


def test_opinfo_samples_forward_ad(device):
    """Tangents w.r.t. input, weight and bias of every float64 sample."""
    for sample in OPINFO.sample_inputs(device, torch.float64, requires_grad=False):
        results = []
        for fn in (F.batch_norm, bnfast.batch_norm):
            args = [_clone(a) for a in (sample.input, *sample.args)]
            with fwAD.dual_level():
                duals = [fwAD.make_dual(a, torch.full_like(a, 0.5) + i) if i in (0, 3, 4) and a is not None else a
                         for i, a in enumerate(args)]
                results.append(fwAD.unpack_dual(fn(*duals, **sample.kwargs)).tangent)
        torch.testing.assert_close(results[1], results[0], msg=f"{tuple(sample.input.shape)} {sample.kwargs}")


def _module_pair(torch_cls, constructor_input, device, dtype):
    theirs = torch_cls(*constructor_input.args, **constructor_input.kwargs).to(device, dtype)
    ours = bnfast.convert(copy.deepcopy(theirs))
    assert type(ours).__module__ == "bnfast.modules"
    return theirs, ours


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("torch_cls", list(MODULE_INFOS), ids=lambda c: c.__name__)
def test_moduleinfo_samples(torch_cls, training, device):
    info = MODULE_INFOS[torch_cls]
    for dtype in info.dtypes:
        for sample in info.module_inputs_func(info, device=device, dtype=dtype, requires_grad=True,
                                              training=training):
            theirs, ours = _module_pair(torch_cls, sample.constructor_input, device, dtype)
            results = []
            for module in (theirs, ours):
                module.train(training)
                x = _clone(sample.forward_input.args[0])
                out = module(x)
                leaves = [x] + [p for p in module.parameters()]
                grads = torch.autograd.grad(out, leaves, torch.ones_like(out), allow_unused=True)
                results.append((out, grads, module.state_dict()))
            (out_t, grads_t, state_t), (out_b, grads_b, state_b) = results
            where = f"{torch_cls.__name__}({sample.desc}) {dtype}"
            torch.testing.assert_close(out_b, out_t, msg=lambda m: f"{where} output: {m}")
            for a, b in zip(grads_b, grads_t):
                assert (a is None) == (b is None), where
                if a is not None:
                    torch.testing.assert_close(a, b, msg=lambda m: f"{where} grad: {m}")
            assert state_b.keys() == state_t.keys(), where
            for key in state_t:
                torch.testing.assert_close(state_b[key], state_t[key], msg=lambda m: f"{where} {key}: {m}")


@pytest.mark.parametrize("torch_cls", list(MODULE_INFOS), ids=lambda c: c.__name__)
def test_moduleinfo_error_inputs(torch_cls, device):
    info = MODULE_INFOS[torch_cls]
    for error in info.module_error_inputs_func(info, device=device, dtype=torch.float32, requires_grad=False,
                                               training=True):
        sample = error.module_error_input
        theirs, ours = _module_pair(torch_cls, sample.constructor_input, device, torch.float32)
        for module in (theirs, ours):
            with pytest.raises(error.error_type, match=error.error_regex):
                module(*sample.forward_input.args, **sample.forward_input.kwargs)
