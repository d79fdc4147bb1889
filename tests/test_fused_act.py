"""Batch norm fused with an activation (bnfast.batch_norm_act, BatchNormAct*d,
the ops forward_act / elemt_act / backward_act), against the unfused torch
ops it replaces: act(F.batch_norm(x) + residual) and F.batch_norm(relu(x)).

Numerics follow the suite's rule (tests/reference.py): bnfast's error against
the float64 truth (the unfused ops in float64) at most twice torch's unfused
error at the same dtype, plus a rounding floor; then gradients to second
order, forward-mode AD and torch.func, opcheck, torch.compile, modules and
errors.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck, gradgradcheck

import bnfast
from tests import reference as ref
from tests import samples

EPS = 1e-5
SLOPE = 0.2
OPS = torch.ops.bnfast
UNFUSED = {"identity": lambda y: y, "relu": F.relu, "leaky_relu": lambda y: F.leaky_relu(y, SLOPE),
           "silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda y: F.gelu(y, approximate="tanh")}
ACTS = list(UNFUSED) + ["pre_relu"]
# Every activation with and without a residual (pre_relu takes none).
VARIANTS = [(a, r) for a in ACTS for r in (False, True) if not (r and a == "pre_relu")]
VARIANT_IDS = [f"{a}{'+residual' if r else ''}" for a, r in VARIANTS]
# Every variant on float32 over the loops' paths (plane loops, short planes as
# rows, fused blocks in the backward and, from 1 MiB, the forward, channels-last
# rows, (N, C)); half precision on the
# activations' kinds (clamp, smooth, pre-activation). float64 is the truth
# here; gradcheck covers it.
_FP32 = samples.cases(dtypes=(torch.float32,), shapes=[samples.FLAT_PLANES, samples.SHORT_PLANES, samples.ROW_BLOCKS,
                                                      samples.PLANE_LOOPS], layouts=("contiguous", "channels_last")) \
    + samples.cases(dtypes=(torch.float32,), shapes=[samples.FUSED_FORWARD], layouts=("contiguous",))
_HALF = samples.cases(dtypes=(torch.bfloat16, torch.float16), shapes=[samples.FLAT_PLANES, samples.SHORT_PLANES],
                      layouts=("contiguous", "channels_last"))
MATRIX = [(c, a, r) for c in _FP32 for a, r in VARIANTS] + \
    [(c, a, r) for c in _HALF for a, r in (("relu", True), ("silu", False), ("pre_relu", False))]
MATRIX_IDS = [f"{c}-{a}{'+residual' if r else ''}" for c, a, r in MATRIX]


def unfused(x, rm, rv, w, b, training, act, residual):
    if act == "pre_relu":
        return F.batch_norm(F.relu(x), rm, rv, w, b, training, 0.1, EPS)
    y = F.batch_norm(x, rm, rv, w, b, training, 0.1, EPS)
    return UNFUSED[act](y if residual is None else y + residual)


def fused(x, rm, rv, w, b, training, act, residual):
    return bnfast.batch_norm_act(x, rm, rv, w, b, training, 0.1, EPS, act=act, negative_slope=SLOPE,
                                 residual=residual)


def _run(fn, case, device, training, act, with_residual, dtype=None):
    """Output, input / weight / bias / residual gradients and running statistics, in `dtype` (the case's)."""
    dtype = dtype or case.dtype
    x = case.input(device).to(dtype).requires_grad_(True)
    w, b = (t.to(dtype).requires_grad_(True) for t in case.params(device))
    rm, rv = (t.to(dtype) for t in case.running(device))
    residual = case.arrange(case.grad_out(device, seed=7).to(dtype)).requires_grad_(True) if with_residual else None
    y = fn(x, rm, rv, w, b, training, act, residual)
    leaves = [x, w, b] + ([residual] if with_residual else [])
    grads = torch.autograd.grad(y, leaves, case.grad_out(device).to(dtype))
    return [y, *grads, rm, rv]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(("case", "act", "with_residual"), MATRIX, ids=MATRIX_IDS)
def test_matches_unfused(case, act, with_residual, training, device):
    ours = _run(fused, case, device, training, act, with_residual)
    theirs = _run(unfused, case, device, training, act, with_residual)
    truth = _run(unfused, case, device, training, act, with_residual, dtype=torch.float64)
    names = ["output", "grad_input", "grad_weight", "grad_bias"] + (["grad_residual"] if with_residual else []) \
        + ["running_mean", "running_var"]
    for name, a, b, t in zip(names, ours, theirs, truth):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        ref.assert_error_within_torch(f"{name} ({act})", a, b, t, a.dtype)


@pytest.mark.parametrize("with_residual", [False, True], ids=["relu", "relu+residual"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", samples.cases(dtypes=(torch.float32, torch.bfloat16),
                                               shapes=[samples.SHORT_PLANES, samples.FLAT_PLANES],
                                               layouts=("contiguous", "channels_last")), ids=str)
def test_relu_drops_grad_where_clamped(case, with_residual, training, device):
    """relu's backward takes nothing of grad_out where relu clamped (torch's
    threshold_backward gives exactly 0 there): NaN and inf in those places
    give bitwise the gradients that zeros give."""
    x = case.input(device)
    w, b = case.params(device)
    rm, rv = case.running(device)
    residual = case.arrange(case.grad_out(device, seed=7)) if with_residual else None
    with torch.no_grad():  # clearly clamped: fused and unfused round z differently near 0
        clamped = unfused(x, rm.clone(), rv.clone(), w, b, training, "identity", residual) < -0.05
    assert clamped.any() and not clamped.all()
    grad_out = case.grad_out(device)
    zeroed, poisoned = grad_out.clone(), grad_out.clone()
    zeroed[clamped] = 0
    poison = torch.tensor([float("nan"), float("inf"), -float("inf")], device=device, dtype=grad_out.dtype)
    poisoned[clamped] = poison[torch.arange(int(clamped.sum()), device=device) % 3]
    results = []
    for g in (poisoned, zeroed):
        leaves = [t.clone().requires_grad_(True) for t in (x, w, b) + ((residual,) if with_residual else ())]
        y = fused(leaves[0], rm.clone(), rv.clone(), leaves[1], leaves[2], training, "relu",
                  leaves[3] if with_residual else None)
        results.append(torch.autograd.grad(y, leaves, g))
    for name, ours, clean in zip(["grad_input", "grad_weight", "grad_bias", "grad_residual"], *results):
        assert torch.isfinite(ours).all(), name
        assert torch.equal(ours, clean), name


@pytest.mark.parametrize(("act", "with_residual"), VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradcheck(act, with_residual, training, device):
    case = samples.Case((3, 2, 3, 2), "channels_last", torch.float64)
    x = case.input(device, requires_grad=True)
    w, b = (t.requires_grad_(True) for t in case.params(device))
    residual = case.grad_out(device, seed=7).requires_grad_(True) if with_residual else None
    rm, rv = case.running(device)

    def fn(x, w, b, *residual):
        return fused(x, rm.clone(), rv.clone(), w, b, training, act, residual[0] if residual else None)

    inputs = (x, w, b) + ((residual,) if with_residual else ())
    assert gradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)
    assert gradgradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("act", ["relu", "silu", "pre_relu"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_forward_ad_and_torch_func(act, training, device):
    """Tangents (dual tensors and torch.func.jvp) and torch.func.grad equal the unfused ops'."""
    case = samples.Case((4, 3, 5), "contiguous", torch.float64)
    x, t = case.input(device), case.grad_out(device)
    w, b = case.params(device)
    rm, rv = case.running(device)
    with_stats = (None, None) if training else (rm, rv)

    def f(impl):
        return lambda x: impl(x, *with_stats, w, b, training, act, None)
    jvps = [torch.func.jvp(f(impl), (x,), (t,)) for impl in (unfused, fused)]
    torch.testing.assert_close(jvps[1], jvps[0])
    grads = [torch.func.grad(lambda x: f(impl)(x).pow(3).sum())(x) for impl in (unfused, fused)]
    torch.testing.assert_close(grads[1], grads[0])
    import torch.autograd.forward_ad as fwAD
    with fwAD.dual_level():
        tangents = [fwAD.unpack_dual(f(impl)(fwAD.make_dual(x, t))).tangent for impl in (unfused, fused)]
    torch.testing.assert_close(tangents[1], tangents[0])


# ----------------------------------------------------------------- SyncBatchNormAct's pieces

COMPOSITE = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)


@pytest.mark.parametrize(("case", "act", "with_residual"), MATRIX, ids=MATRIX_IDS)
def test_split_ops_are_backward_act(case, act, with_residual, device):
    _check_split_ops(case, act, with_residual, device)


@pytest.mark.gpu_smoke
@pytest.mark.parametrize(("act", "with_residual"), [("relu", True), ("pre_relu", False), ("silu", False)],
                         ids=["relu+residual", "pre_relu", "silu"])
def test_split_ops_smoke(act, with_residual, device):
    _check_split_ops(samples.Case((8, 4, 3, 5), "channels_last", torch.float32), act, with_residual, device)


def _check_split_ops(case, act, with_residual, device):
    """stats_act, backward_reduce_act and backward_elemt_act (SyncBatchNormAct's
    pieces, with its all_reduce between the last two) give forward_act's
    statistics and backward_act's results: the statistics and the sums
    bitwise on the CPU (on CUDA up to the order the partial sums are merged
    in), grad_input and grad_residual up to the rounding of mean_dy to the
    stats dtype. The composite fallbacks (CompositeExplicitAutograd), run here
    on the device's plain ops, give the same up to rounding."""
    x, dy = case.input(device), case.grad_out(device)
    if case.layout == "channels_last":  # a gradient in another layout than the input's
        dy = dy.contiguous()
    w, b = case.params(device)
    residual = case.arrange(case.grad_out(device, seed=7)) if with_residual else None
    _, mean, invstd = OPS.forward_act(x, w, b, residual, EPS, act, SLOPE)
    grad_input, grad_weight, grad_bias, grad_residual = OPS.backward_act(dy, x, mean, invstd, w, b, residual, act,
                                                                         SLOPE)
    count = x.numel() // x.shape[1]
    kernels = (OPS.stats_act.default, OPS.backward_reduce_act.default, OPS.backward_elemt_act.default)
    runs = [lambda op, *args: op(*args)]
    if case.dtype != torch.bfloat16 and case.dtype != torch.float16:  # (the composites round z to the input dtype)
        runs.append(lambda op, *args: op.redispatch(COMPOSITE, *args))
    for run in runs:
        stats = run(kernels[0], x, EPS, act)
        sums = run(kernels[1], dy, x, mean, invstd, w, b, residual, act, SLOPE)
        dx, dr = run(kernels[2], dy, x, mean, invstd, w, b, residual, act, SLOPE, sums[0] / count, sums[1] / count)
        exact = device == "cpu" and run is runs[0]
        compare = torch.equal if exact else lambda a, e: torch.allclose(a, e, rtol=1e-5, atol=1e-6 * count)
        assert compare(stats[0], mean) and compare(stats[1], invstd)
        assert compare(sums[0], grad_bias)
        torch.testing.assert_close(sums[1] * invstd, grad_weight, rtol=1e-5, atol=1e-6 * count)
        assert dx.stride() == grad_input.stride() == x.stride()
        assert dr.shape == grad_residual.shape and (not with_residual or dr.stride() == x.stride())
        # (mean_dy's rounding moves grad_input by a few ulps of its largest value)
        scale = 8 * torch.finfo(case.dtype).eps * grad_input.abs().max().item()
        torch.testing.assert_close(dx, grad_input, rtol=0, atol=scale)
        torch.testing.assert_close(dr, grad_residual)


def test_split_ops_errors_and_not_differentiable(device):
    x = torch.randn(4, 3, 5, device=device, requires_grad=True)
    mean, invstd = (t.detach() for t in OPS.stats(x.detach(), EPS))
    dy, zeros = torch.randn(4, 3, 5, device=device), torch.zeros(3, device=device)
    with pytest.raises(ValueError, match="unknown activation"):
        OPS.stats_act(x, EPS, "tanh")
    with pytest.raises(ValueError, match="pre_relu"):
        OPS.backward_reduce_act(dy, x, mean, invstd, None, None, torch.randn_like(dy), "pre_relu", 0.0)
    with pytest.raises(RuntimeError, match="mean_dy"):
        OPS.backward_elemt_act(dy, x, mean, invstd, None, None, None, "relu", 0.0, zeros[:2], zeros)
    for result in (OPS.stats_act(x, EPS, "pre_relu")[0],
                   OPS.backward_reduce_act(dy, x, mean, invstd, None, None, None, "relu", 0.0)[0],
                   OPS.backward_elemt_act(dy, x, mean, invstd, None, None, None, "relu", 0.0, zeros, zeros)[0]):
        with pytest.raises(RuntimeError, match="bnfast::(stats|backward_reduce|backward_elemt)_act"):
            result.sum().backward()


@pytest.fixture
def no_vmap_fallback():
    """vmap raises for an op without a batching rule instead of looping over the samples."""
    torch._C._functorch._set_vmap_fallback_enabled(False)
    try:
        yield
    finally:
        torch._C._functorch._set_vmap_fallback_enabled(True)


def test_vmap_batching_rules(device, no_vmap_fallback):
    """The fused ops' batching rules: vmap over 3 problems equals the ops on
    each problem, and takes no per-sample fallback (disabled here: it raises)."""
    g = torch.Generator().manual_seed(0)
    shape = (3, 4, 3, 5)  # 3 problems of (4, 3, 5)

    def rand(*size, offset=0.0):
        return (torch.randn(*size, generator=g) + offset).to(device)

    x, dy, r = rand(*shape), rand(*shape), rand(*shape)
    w, b, md, mdx = rand(3, 3, offset=1.0), rand(3, 3), rand(3, 3), rand(3, 3)
    mean, invstd = (torch.stack(t) for t in zip(*(OPS.stats(x[i], EPS) for i in range(3))))
    calls = {
        "forward_act": (lambda x, w, b, r: OPS.forward_act(x, w, b, r, EPS, "silu", SLOPE), (x, w, b, r)),
        "elemt_act": (lambda x, w, b, m, s, r: OPS.elemt_act(x, w, b, m, s, r, "relu", SLOPE),
                      (x, w, b, mean, invstd, r)),
        "backward_act": (lambda dy, x, m, s, w, b, r: OPS.backward_act(dy, x, m, s, w, b, r, "leaky_relu", SLOPE),
                         (dy, x, mean, invstd, w, b, r)),
        "backward_act, no residual": (lambda dy, x, m, s, w, b: OPS.backward_act(dy, x, m, s, w, b, None, "gelu",
                                                                                 SLOPE), (dy, x, mean, invstd, w, b)),
        "stats_act": (lambda x: OPS.stats_act(x, EPS, "pre_relu"), (x,)),
        "backward_reduce_act": (lambda dy, x, m, s, w, b, r: OPS.backward_reduce_act(dy, x, m, s, w, b, r, "relu",
                                                                                     SLOPE),
                                (dy, x, mean, invstd, w, b, r)),
        "backward_elemt_act": (lambda dy, x, m, s, w, b, r, md, mdx: OPS.backward_elemt_act(
            dy, x, m, s, w, b, r, "silu", SLOPE, md, mdx), (dy, x, mean, invstd, w, b, r, md, mdx)),
        "backward_elemt_act, no residual": (lambda dy, x, m, s, w, b, md, mdx: OPS.backward_elemt_act(
            dy, x, m, s, w, b, None, "pre_relu", SLOPE, md, mdx), (dy, x, mean, invstd, w, b, md, mdx)),
    }
    for name, (fn, args) in calls.items():
        batched = torch.vmap(fn)(*args)
        looped = [fn(*(a[i] for a in args)) for i in range(3)]
        for k, out in enumerate(batched if isinstance(batched, tuple) else (batched,)):
            each = [o[k] if isinstance(o, tuple) else o for o in looped]
            torch.testing.assert_close(out, torch.stack(each), msg=f"{name}, output {k}")


@pytest.mark.gpu_smoke
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_opcheck(dtype, device):
    case = samples.Case((3, 4, 3, 2), "channels_last", dtype)
    x = case.input(device, requires_grad=dtype == torch.float32)
    w, b = case.params(device)
    residual = case.grad_out(device, seed=7)
    mean, invstd = (t.detach() for t in OPS.stats(x.detach(), EPS))
    running_mean, running_var = torch.zeros(4, device=device), torch.ones(4, device=device)
    for act, res in (("relu", residual), ("gelu", None), ("pre_relu", None)):
        torch.library.opcheck(OPS.forward_act.default, (x, w, b, res, EPS, act, SLOPE))
        torch.library.opcheck(OPS.forward_act.default,
                              (x, w, b, res, EPS, act, SLOPE, False, running_mean, running_var, 0.1))
        torch.library.opcheck(OPS.elemt_act.default, (x, w, b, mean, invstd, res, act, SLOPE))
        torch.library.opcheck(OPS.backward_act.default,
                              (case.grad_out(device), x.detach(), mean, invstd, w, b, res, act, SLOPE))
        torch.library.opcheck(OPS.stats_act.default, (x.detach(), EPS, act))
        torch.library.opcheck(OPS.backward_reduce_act.default,
                              (case.grad_out(device), x.detach(), mean, invstd, w, b, res, act, SLOPE))
        torch.library.opcheck(OPS.backward_elemt_act.default,
                              (case.grad_out(device), x.detach(), mean, invstd, w, b, res, act, SLOPE, mean, invstd))
        if x.requires_grad:  # their explicit not-differentiable autograd kernels
            for op, args in ((OPS.stats_act.default, (x, EPS, act)),
                             (OPS.backward_reduce_act.default, (case.grad_out(device), x, mean, invstd, w, b, res, act,
                                                                SLOPE))):
                torch.library.opcheck(op, args, test_utils=("test_schema", "test_autograd_registration"))


@pytest.mark.gpu_smoke
@pytest.mark.parametrize("options", [{"act": "silu"}, {"act": "leaky_relu", "memory_efficient": True}],
                         ids=["silu", "leaky_relu-memory_efficient"])
def test_compile_fullgraph(options, device):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), bnfast.BatchNormAct2d(8, **options)).to(device)
    compiled = torch.compile(copy.deepcopy(model), backend="aot_eager", fullgraph=True)
    x = torch.randn(4, 3, 8, 8, device=device)
    outs = [m(x) for m in (model, compiled)]
    torch.testing.assert_close(outs[1], outs[0])
    grads = [torch.autograd.grad(o.square().sum(), list(m.parameters())) for o, m in zip(outs, (model, compiled))]
    # (memory_efficient: the compiled graph keeps what its partitioner picks,
    # so its backward rounds differently; the conv bias gradient is 0 up to rounding)
    tolerance = {"rtol": 1e-4, "atol": 1e-4} if options.get("memory_efficient") else {}
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, **tolerance)


@pytest.mark.parametrize(("ours", "theirs", "shape"), [(bnfast.BatchNormAct1d, torch.nn.BatchNorm1d, (8, 4)),
                                                       (bnfast.BatchNormAct2d, torch.nn.BatchNorm2d, (8, 4, 3, 3)),
                                                       (bnfast.BatchNormAct3d, torch.nn.BatchNorm3d, (4, 4, 2, 3, 3))])
def test_modules(ours, theirs, shape, device):
    """BatchNormAct*d: torch's BatchNorm*d state (a checkpoint loads into either), isinstance,
    repr, and the unfused module's results over train and eval steps, with a residual."""
    torch.manual_seed(0)
    plain = theirs(4).to(device)
    act = ours(4, act="leaky_relu", negative_slope=SLOPE).to(device)
    act.load_state_dict(plain.state_dict())
    assert act.state_dict().keys() == plain.state_dict().keys() and isinstance(act, theirs)
    assert "act='leaky_relu', negative_slope=0.2" in repr(act)
    for training in (True, True, False):
        plain.train(training), act.train(training)
        x, residual = torch.randn(shape, device=device), torch.randn(shape, device=device)
        torch.testing.assert_close(act(x, residual), F.leaky_relu(plain(x) + residual, SLOPE))
    plain.load_state_dict(act.state_dict())
    for key, value in act.state_dict().items():
        torch.testing.assert_close(plain.state_dict()[key], value)


def test_errors(device):
    x = torch.randn(4, 3, 5, device=device)
    with pytest.raises(ValueError, match="unknown activation"):
        bnfast.batch_norm_act(x, None, None, training=True, act="tanh")
    with pytest.raises(ValueError, match="unknown activation"):
        bnfast.BatchNormAct1d(3, act="tanh")
    with pytest.raises(ValueError, match="pre_relu"):
        bnfast.batch_norm_act(x, None, None, training=True, act="pre_relu", residual=torch.randn_like(x))
    with pytest.raises(ValueError, match="unknown activation"):
        OPS.forward_act(x, None, None, None, EPS, "tanh", 0.0)
    with pytest.raises(RuntimeError, match="residual must have the input's shape"):
        OPS.forward_act(x, None, None, torch.randn(4, 3, 6, device=device), EPS, "relu", 0.0)
    with pytest.raises(ValueError, match="pre_relu"):
        OPS.forward_act(x, None, None, torch.randn_like(x), EPS, "pre_relu", 0.0)


def test_fused_backward_is_not_differentiable(device):
    x = torch.randn(4, 3, 5, device=device, requires_grad=True)
    mean, invstd = (t.detach() for t in OPS.stats(x.detach(), EPS))
    grad_input = OPS.backward_act(torch.randn(4, 3, 5, device=device), x, mean, invstd, None, None, None, "relu",
                                  0.0)[0]
    with pytest.raises(RuntimeError, match="bnfast::backward_act"):
        grad_input.sum().backward()
