"""memory_efficient=True of the fused ops (bnfast.batch_norm_act,
BatchNormAct*d, convert(fuse=True, memory_efficient=True)): backward keeps the
output instead of the input where the normalized input can be recovered from
it, with the same results as without the mode (the suite's numerics rule,
tests/reference.py), gradients to second order, and a fallback that keeps the
input where recovery is impossible. (torch.compile: test_fused_act.py.)"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck, gradgradcheck

import bnfast
from benchmarks.train_cifar import build_model
from tests import reference as ref
from tests import samples
from tests.test_fused_act import EPS, OPS, SLOPE, _FP32, _HALF, unfused

# The variants whose input the output determines (pre_relu also keeps the sign of x).
INVERTIBLE = [("identity", False), ("identity", True), ("leaky_relu", False), ("leaky_relu", True),
              ("pre_relu", False)]
INVERTIBLE_IDS = [f"{a}{'+residual' if r else ''}" for a, r in INVERTIBLE]
MATRIX = [(c, a, r) for c in _FP32 for a, r in INVERTIBLE] + \
    [(c, a, r) for c in _HALF for a, r in (("leaky_relu", True), ("pre_relu", False))]
MATRIX_IDS = [f"{c}-{a}{'+residual' if r else ''}" for c, a, r in MATRIX]


def saving(x, rm, rv, w, b, training, act, residual):
    return bnfast.batch_norm_act(x, rm, rv, w, b, training, 0.1, EPS, act=act, negative_slope=SLOPE,
                                 residual=residual, memory_efficient=True)


class SavedTensors:
    """The storages autograd keeps for backward while the context is open."""

    def __enter__(self):
        self.pointers = set()

        def pack(t):
            self.pointers.add(t.untyped_storage().data_ptr())
            return t
        self._hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)

    def keeps(self, t: torch.Tensor) -> bool:
        return t.untyped_storage().data_ptr() in self.pointers


def _run(fn, case, device, act, with_residual, dtype=None):
    """Output, gradients and running statistics, and whether the input was kept for backward."""
    dtype = dtype or case.dtype
    x = case.input(device).to(dtype).requires_grad_(True)
    w, b = (t.to(dtype).requires_grad_(True) for t in case.params(device))
    rm, rv = (t.to(dtype) for t in case.running(device))
    residual = case.arrange(case.grad_out(device, seed=7).to(dtype)).requires_grad_(True) if with_residual else None
    with SavedTensors() as saved:
        y = fn(x, rm, rv, w, b, True, act, residual)
    leaves = [x, w, b] + ([residual] if with_residual else [])
    grads = torch.autograd.grad(y, leaves, case.grad_out(device).to(dtype))
    return [y, *grads, rm, rv], saved.keeps(x), saved.keeps(y)


@pytest.mark.parametrize(("case", "act", "with_residual"), MATRIX, ids=MATRIX_IDS)
def test_matches_unfused_without_the_input(case, act, with_residual, device):
    (ours, kept_input, kept_output) = _run(saving, case, device, act, with_residual)
    theirs = _run(unfused, case, device, act, with_residual)[0]
    truth = _run(unfused, case, device, act, with_residual, dtype=torch.float64)[0]
    assert not kept_input and kept_output
    names = ["output", "grad_input", "grad_weight", "grad_bias"] + (["grad_residual"] if with_residual else []) \
        + ["running_mean", "running_var"]
    for name, a, b, t in zip(names, ours, theirs, truth):
        assert a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride(), name
        ref.assert_error_within_torch(f"{name} ({act}, memory_efficient)", a, b, t, a.dtype)


@pytest.mark.parametrize("memory_efficient", [False, True], ids=["input_kept", "memory_efficient"])
def test_pre_relu_masks_as_torch(memory_efficient, device):
    """pre_relu's input gradient is exactly 0 where relu clamped, x = 0 and
    x = -0 included, and elsewhere torch's BN(relu(x)) gradient."""
    x = torch.randn(6, 3, 4, 4, device=device, dtype=torch.float64)
    x[0, :, 0, :2] = 0.0
    x[1, :, 1, :2] = -0.0
    x.requires_grad_(True)
    dy = torch.randn_like(x)
    ours = torch.autograd.grad(bnfast.batch_norm_act(x, None, None, training=True, act="pre_relu",
                                                     memory_efficient=memory_efficient), x, dy)[0]
    theirs = torch.autograd.grad(F.batch_norm(F.relu(x), None, None, training=True), x, dy)[0]
    clamped = x.detach() <= 0
    assert torch.equal(ours[clamped], torch.zeros_like(ours[clamped]))
    assert not torch.signbit(ours[clamped]).any()
    torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize(("act", "with_residual"), INVERTIBLE, ids=INVERTIBLE_IDS)
def test_gradcheck(act, with_residual, device):
    """First and second order, through the output and through the batch statistics the op returns."""
    case = samples.Case((3, 2, 3, 2), "channels_last", torch.float64)
    x = case.input(device, requires_grad=True)
    w, b = (t.requires_grad_(True) for t in case.params(device))
    residual = case.grad_out(device, seed=7).requires_grad_(True) if with_residual else None

    def fn(x, w, b, *residual):
        y, mean, invstd = OPS.forward_act(x, w, b, residual[0] if residual else None, EPS, act, SLOPE, True)
        assert y.grad_fn.name() == "BnfastForwardActFromOutputBackward"
        return y, mean, invstd

    inputs = (x, w, b) + ((residual,) if with_residual else ())
    assert gradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)
    assert gradgradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("act", ["relu", "silu", "gelu", "leaky_relu"])
def test_not_invertible_keeps_the_input_and_warns(act, device):
    """relu (flat below 0), silu and gelu (not one-to-one), leaky_relu with a negative slope."""
    case = samples.Case((4, 3, 5), "contiguous", torch.float32)
    slope = -0.5
    x = case.input(device, requires_grad=True)
    w, b = case.params(device)
    with pytest.warns(UserWarning, match=f"act='{act}'.*not invertible"), SavedTensors() as saved:
        y = bnfast.batch_norm_act(x, None, None, w, b, True, act=act, negative_slope=slope, memory_efficient=True)
    assert saved.keeps(x)
    expected = bnfast.batch_norm_act(x, None, None, w, b, True, act=act, negative_slope=slope)
    g = case.grad_out(device)
    torch.testing.assert_close(torch.autograd.grad(y, x, g), torch.autograd.grad(expected, x, g), rtol=0, atol=0)


def test_warning_points_at_the_users_call(device):
    """The fallback warning is attributed to the caller's line, through a
    module call (Module.__call__ and bnfast's frames skipped) and a
    functional one, so it shows once per place in the user's code."""
    x = torch.randn(4, 3, 5, device=device, requires_grad=True)
    module = bnfast.BatchNormAct1d(3, act="silu", memory_efficient=True, device=device)
    for call in (lambda: module(x),
                 lambda: bnfast.batch_norm_act(x, None, None, act="gelu", training=True, memory_efficient=True)):
        with pytest.warns(UserWarning, match="not invertible") as record:
            call()
        assert [w.filename for w in record] == [__file__], [(w.filename, w.lineno) for w in record]


# Weight elements the output cannot be inverted through exactly: 0 (blind to
# xhat), NaN, and magnitudes whose square flushes to 0 or overflows in
# float32 (outside [1.1e-19, 1.8e19]): each gave wrong gradients from the output.
EXTREME_WEIGHTS = [0.0, float("nan"), 1e-20, 1e20]


@pytest.mark.parametrize("weight", EXTREME_WEIGHTS, ids=["zero", "nan", "tiny", "huge"])
def test_extreme_weight_keeps_the_input(weight, device):
    """Such a weight element: the op keeps the input, with the gradients of the mode keeping it."""
    case = samples.Case((4, 3, 5), "contiguous", torch.float32)
    x = case.input(device, requires_grad=True)
    w, b = (t.requires_grad_(True) for t in case.params(device))
    with torch.no_grad():
        w[1] = weight
    with SavedTensors() as saved:
        y = bnfast.batch_norm_act(x, None, None, w, b, True, act="leaky_relu", negative_slope=SLOPE,
                                  memory_efficient=True)
    assert saved.keeps(x) and y.grad_fn.name() == "BnfastForwardActBackward"
    expected = unfused(x, None, None, w, b, True, "leaky_relu", None)
    g = case.grad_out(device)
    for a, e in zip(torch.autograd.grad(y, (x, w, b), g), torch.autograd.grad(expected, (x, w, b), g)):
        torch.testing.assert_close(a, e, equal_nan=True)


def test_output_changed_in_place_is_caught(device):
    x = torch.randn(4, 3, 5, device=device, requires_grad=True)
    y = bnfast.batch_norm_act(x, None, None, training=True, act="identity", memory_efficient=True)
    y.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


@pytest.mark.gpu_smoke
def test_opcheck(device):
    case = samples.Case((3, 4, 3, 2), "channels_last", torch.float32)
    x = case.input(device, requires_grad=True)
    w, b = case.params(device)
    for act, res in (("leaky_relu", case.grad_out(device, seed=7)), ("pre_relu", None), ("relu", None)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # relu's fallback
            torch.library.opcheck(OPS.forward_act.default, (x, w, b, res, EPS, act, SLOPE, True))


def _seed_cnn(device):
    torch.manual_seed(0)
    return build_model("seed", dropout=0.0).to(device)


def test_convert_seed_cnn_keeps_less(device):
    """The seed CNN (Conv -> ReLU -> BN, fused as pre_relu) with memory_efficient: the same
    gradients as plain fusion, fewer bytes kept for backward, and repr/state_dict unchanged."""
    fused = bnfast.convert(_seed_cnn(device), fuse=True)
    saving = bnfast.convert(_seed_cnn(device), fuse=True, memory_efficient=True)
    saving.load_state_dict(fused.state_dict())
    acts = [m for m in saving.modules() if isinstance(m, bnfast.BatchNormAct2d)]
    assert acts and all(m.memory_efficient and m.act == "pre_relu" for m in acts)
    assert "memory_efficient=True" in repr(acts[0])
    x = torch.randn(32, 3, 32, 32, device=device)
    kept, grads = [], []
    for model in (fused, saving):
        sizes = {}

        def pack(t):
            sizes[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = F.cross_entropy(model(x), torch.arange(32, device=device) % 10)
        kept.append(sum(sizes.values()))
        grads.append(torch.autograd.grad(loss, list(model.parameters())))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert kept[1] < 0.9 * kept[0], kept


def test_convert_needs_fuse():
    with pytest.raises(ValueError, match="fuse=True"):
        bnfast.convert(torch.nn.Sequential(torch.nn.BatchNorm1d(3)), memory_efficient=True)
