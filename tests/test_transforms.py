"""Forward-mode AD and the torch.func transforms through bnfast, against
torch's own batch norm and, where torch itself is wrong, against an ATen
composite written here (the formulas of tests/reference.py with autograd):

* dual tensors (torch.autograd.forward_ad) through the modules, train and eval;
* torch.func.jvp, grad, vjp, vmap, per-sample gradients (vmap of grad), and
  second derivatives by every nesting (jacrev/jacfwd of jacrev/jacfwd, and
  forward-over-reverse with plain autograd);
* torch's restrictions, with torch's errors: a module training with tracked
  statistics under grad, unbatched running statistics under vmap in training;
* the batching rule of every op called directly.
"""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch.func import grad, jacfwd, jacrev, jvp, vjp, vmap

import bnfast
from tests import reference as ref

EPS = 1e-5
OPS = torch.ops.bnfast
F64 = torch.float64


def _close(a, b, atol=1e-10, rtol=1e-8):
    torch.testing.assert_close(a, b, atol=atol, rtol=rtol)


@pytest.fixture
def data(device):
    g = torch.Generator().manual_seed(0)
    def r(*shape, positive=False):
        t = torch.rand(*shape, generator=g, dtype=F64) + 0.5 if positive else torch.randn(*shape, generator=g, dtype=F64)
        return t.to(device)
    return dict(x=r(4, 3, 5), t=r(4, 3, 5), w=r(3), b=r(3), tw=r(3), tb=r(3), rm=r(3), rv=r(3, positive=True),
                xb=r(2, 4, 3, 5))


def _bn(impl, training, data, x=None, w=None, b=None):
    """batch_norm of impl (F or bnfast): training without running statistics, or eval with them."""
    x = data["x"] if x is None else x
    w = data["w"] if w is None else w
    b = data["b"] if b is None else b
    if training:
        return impl.batch_norm(x, None, None, w, b, training=True, eps=EPS)
    return impl.batch_norm(x, data["rm"], data["rv"], w, b, training=False, eps=EPS)


def _composite(training, data, x, w, b):
    """Batch norm from differentiable ATen ops: the independent truth for nested transforms."""
    dims = ref.reduce_dims(x)
    if training:
        mean, var = x.mean(dims, keepdim=True), x.var(dims, unbiased=False, keepdim=True)
    else:
        mean, var = ref.bcast(data["rm"], x), ref.bcast(data["rv"], x)
    return (x - mean) * torch.rsqrt(var + EPS) * ref.bcast(w, x) + ref.bcast(b, x)


IMPLS = {"torch": F, "bnfast": bnfast}
MODES = [pytest.param(True, id="train"), pytest.param(False, id="eval")]


@pytest.mark.parametrize("training", MODES)
def test_dual_tensors_through_modules(training, device, data):
    """Forward AD with dual tensors through BatchNorm1d, as torch's: tangent, output, running stats."""
    results = []
    for cls in (torch.nn.BatchNorm1d, bnfast.BatchNorm1d):
        torch.manual_seed(0)
        m = cls(3).to(device, F64)
        with torch.no_grad():
            m.weight.copy_(data["w"]), m.bias.copy_(data["b"])
            m.running_mean.copy_(data["rm"]), m.running_var.copy_(data["rv"])
        m.train(training)
        with fwAD.dual_level():
            y = m(fwAD.make_dual(data["x"], data["t"]))
            primal, tangent = fwAD.unpack_dual(y)
        results.append((primal, tangent, m.running_mean, m.running_var))
    for theirs, ours in zip(*results):
        _close(ours, theirs)


@pytest.mark.parametrize("training", MODES)
def test_func_jvp(training, device, data):
    args, tangents = (data["x"], data["w"], data["b"]), (data["t"], data["tw"], data["tb"])
    outs = [jvp(lambda x, w, b: _bn(impl, training, data, x, w, b), args, tangents) for impl in IMPLS.values()]
    _close(outs[1][0], outs[0][0])
    _close(outs[1][1], outs[0][1])


@pytest.mark.parametrize("training", MODES)
def test_func_grad_and_vjp(training, device, data):
    def loss(impl):
        return lambda x, w, b: _bn(impl, training, data, x, w, b).pow(3).sum()
    args = (data["x"], data["w"], data["b"])
    theirs, ours = (grad(loss(impl), argnums=(0, 1, 2))(*args) for impl in IMPLS.values())
    for a, b in zip(ours, theirs):
        _close(a, b)
    (_, pullback_t), (_, pullback_b) = (vjp(lambda x: _bn(impl, training, data, x), data["x"])
                                        for impl in IMPLS.values())
    _close(pullback_b(data["t"])[0], pullback_t(data["t"])[0])


@pytest.mark.parametrize("nesting", ["jacrev_jacrev", "jacfwd_jacrev", "jacrev_jacfwd", "jacfwd_jacfwd",
                                     "grad_grad"])
@pytest.mark.parametrize("training", MODES)
def test_second_derivatives(nesting, training, device, data):
    """Hessians of a cubic loss by every nesting of transforms, against the
    ATen composite's (torch's own jacfwd(jacfwd) of training batch norm is
    off, so the composite is the truth here)."""
    x = data["x"][:2, :, :2].contiguous()
    def loss(fn):
        return lambda x: fn(x).pow(3).sum()
    ours = loss(lambda x: _bn(bnfast, training, data, x))
    truth = loss(lambda x: _composite(training, data, x, data["w"], data["b"]))
    outer, _, inner = nesting.partition("_")
    transforms = {"jacrev": jacrev, "jacfwd": jacfwd, "grad": grad}
    if nesting == "grad_grad":
        hessian = lambda f: grad(lambda x: grad(f)(x).sum())
    else:
        hessian = lambda f: transforms[outer](transforms[inner](f))
    _close(hessian(ours)(x), hessian(truth)(x))


@pytest.mark.parametrize("training", MODES)
def test_forward_over_reverse_with_autograd(training, device, data):
    """A Hessian-vector product with plain autograd and dual tensors."""
    def hvp(fn):
        x = data["x"].clone().requires_grad_(True)
        with fwAD.dual_level():
            dual = fwAD.make_dual(x, data["t"])
            g, = torch.autograd.grad(fn(dual).pow(3).sum(), dual, create_graph=True)
            return fwAD.unpack_dual(g).tangent
    _close(hvp(lambda x: _bn(bnfast, training, data, x)), hvp(lambda x: _bn(F, training, data, x)))


@pytest.mark.parametrize("training", MODES)
def test_func_vmap(training, device, data):
    """vmap over a batch of problems (batched input, shared or batched weight), in_dims 0 and 1."""
    xb = data["xb"]
    wb = data["w"].expand(2, 3) * torch.tensor([[1.0], [2.0]], dtype=F64, device=device)
    for in_dims, x_arg in ((0, xb), (1, xb.movedim(0, 1))):
        outs = [vmap(lambda x: _bn(impl, training, data, x), in_dims=in_dims)(x_arg) for impl in IMPLS.values()]
        _close(outs[1], outs[0])
    outs = [vmap(lambda x, w: _bn(impl, training, data, x, w))(xb, wb) for impl in IMPLS.values()]
    _close(outs[1], outs[0])


def test_per_sample_gradients(device, data):
    """vmap(grad(...)): one gradient per vmapped problem."""
    outs = [vmap(grad(lambda x: _bn(impl, True, data, x).pow(2).sum()))(data["xb"]) for impl in IMPLS.values()]
    _close(outs[1], outs[0])


def test_vmap_training_with_batched_running_stats(device, data):
    """Each vmapped problem updates its own running statistics, as torch's."""
    results = []
    for impl in IMPLS.values():
        rm, rv = data["rm"].repeat(2, 1), data["rv"].repeat(2, 1)
        y = vmap(lambda x, m, v: impl.batch_norm(x, m, v, data["w"], data["b"], training=True, momentum=0.3))(
            data["xb"], rm, rv)
        results.append((y, rm, rv))
    for a, b in zip(*results):
        _close(b, a)


def test_vmap_fused_training_with_batched_running_stats(device, data):
    """forward_act's batching rule updates each problem's running statistics,
    as the op does sample by sample."""
    def step(x, m, v):
        return bnfast.batch_norm_act(x, m, v, data["w"], data["b"], training=True, momentum=0.3, act="pre_relu")
    rm, rv = data["rm"].repeat(2, 1), data["rv"].repeat(2, 1)
    y = vmap(step)(data["xb"], rm, rv)
    for i in range(2):
        m, v = data["rm"].clone(), data["rv"].clone()
        _close(y[i], step(data["xb"][i], m, v))
        _close(rm[i], m)
        _close(rv[i], v)


def test_restrictions_match_torch(device, data):
    """Where torch's batch norm fails under torch.func, bnfast fails with the same exception type."""
    def errors(fn):
        caught = []
        for impl_cls, impl in ((torch.nn.BatchNorm1d, F), (bnfast.BatchNorm1d, bnfast)):
            with pytest.raises(Exception) as info:
                fn(impl_cls, impl)
            caught.append(info.value)
        assert type(caught[1]) is type(caught[0]), (caught[1], caught[0])
        return caught[1]
    x = data["x"]
    # A module in training with tracked statistics: its step count, a captured
    # tensor updated in place (bnfast's op counts it outside transforms only).
    modules = {cls: cls(3).to(device, F64) for cls in (torch.nn.BatchNorm1d, bnfast.BatchNorm1d)}
    err = errors(lambda cls, _: grad(lambda x: modules[cls](x).sum())(x))
    assert "in-place operation" in str(err)
    assert [int(m.num_batches_tracked) for m in modules.values()] == [0, 0]
    # One built inside the transform: its initialization's .data writes.
    errors(lambda cls, _: grad(lambda x: cls(3).to(device, F64)(x).sum())(x))
    # Unbatched running statistics cannot take a vmapped batch's updates.
    err = errors(lambda _, impl: vmap(lambda x: impl.batch_norm(x, data["rm"], data["rv"], training=True))(data["xb"]))
    assert "running_mean or running_var" in str(err)


def _per_sample(op, batched_args, in_dims):
    """Reference batching: the op on each vmapped sample, stacked."""
    size = next(a.size(d) for a, d in zip(batched_args, in_dims) if d is not None)
    outs = [op(*[a.select(d, i) if d is not None else a for a, d in zip(batched_args, in_dims)]) for i in range(size)]
    if isinstance(outs[0], tuple):
        return tuple(torch.stack(parts) for parts in zip(*outs))
    return torch.stack(outs)


def test_op_batching_rules(device, data):
    """Every op vmapped directly (inference mode keeps the differentiable ops
    on their batching rules too) equals the op sample by sample."""
    B, x, dy = 2, data["xb"], data["xb"].flip(-1)
    mean = torch.stack([OPS.stats(x[i], EPS)[0] for i in range(B)])
    invstd = torch.stack([OPS.stats(x[i], EPS)[1] for i in range(B)])
    w, b = data["w"], data["b"]
    cases = {
        "stats": (lambda x: OPS.stats(x, EPS), (x,), (0,)),
        "forward": (lambda x, w: OPS.forward(x, w, b, EPS), (x, w.repeat(B, 1)), (0, 0)),
        "elemt": (lambda x, m, s: OPS.elemt(x, w, b, m, s), (x, mean, invstd), (0, 0, 0)),
        "elemt_unbatched_input": (lambda x, m, s: OPS.elemt(x, w, b, m, s), (x[0], mean, invstd), (None, 0, 0)),
        "elemt_running": (lambda x, m, v: OPS.elemt_running(x, w, b, m, v, EPS), (x, mean, invstd), (0, 0, 0)),
        "backward_reduce": (lambda g, x, m, s: OPS.backward_reduce(g, x, m, s), (dy, x, mean, invstd), (0, 0, 0, 0)),
        "backward_elemt": (lambda g, x, m, s: OPS.backward_elemt(g, x, m, s, w, m * 0.1, s * 0.2),
                           (dy, x, mean, invstd), (0, 0, 0, 0)),
        "backward": (lambda g, x, m, s: OPS.backward(g, x, m, s, w), (dy, x, mean, invstd), (0, 0, 0, 0)),
        "gather_stats": (lambda m, s: OPS.gather_stats(m, s, torch.tensor([3.0, 5.0], device=device), EPS),
                         (torch.stack([mean, mean * 2]).movedim(0, 1), torch.stack([invstd, invstd]).movedim(0, 1)),
                         (0, 0)),
    }
    with torch.inference_mode():
        for name, (op, args, in_dims) in cases.items():
            got = vmap(op, in_dims=in_dims)(*args)
            want = _per_sample(op, args, in_dims)
            for g_, w_ in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
                _close(g_, w_, atol=1e-12, rtol=1e-12)


def test_update_stats_batching_rule(device, data):
    """update_stats_ vmapped over batched buffers (contiguous and strided) updates each in place."""
    mean = torch.randn(2, 3, dtype=F64, device=device)
    invstd = torch.rand(2, 3, dtype=F64, device=device) + 0.5
    for strided in (False, True):
        rm = torch.zeros(3, 2, dtype=F64, device=device).t() if strided else torch.zeros(2, 3, dtype=F64, device=device)
        rv = torch.ones_like(rm)
        want_m, want_v = rm.clone(), rv.clone()
        for i in range(2):
            OPS.update_stats_(want_m[i], want_v[i], mean[i], invstd[i], 0.1, EPS, 7)
        vmap(lambda m, v, mu, s: OPS.update_stats_(m, v, mu, s, 0.1, EPS, 7), out_dims=None)(rm, rv, mean, invstd)
        _close(rm, want_m, atol=0, rtol=0)
        _close(rv, want_v, atol=0, rtol=0)
