"""Each torch.ops.bnfast op called directly, against the float64 reference.

Tolerances: results in the stats dtype (float32 / float64) are compared with
a few ulps of that dtype at the result's natural scale; results in the input
dtype (elemt, backward_elemt) with 2 ulps of the input dtype at their natural
scale (one for the final rounding, one for float32 opmath intermediates).
"""

from __future__ import annotations

import pytest
import torch

from tests import reference as ref
from tests import samples

EPS = 1e-5
OPS = torch.ops.bnfast

CASES = samples.cases(include_empty=False)
# Short planes whose training forward fuses its passes, in row chunks that end mid-fold:
# the fused and separate sums must still agree bitwise.
REDUCE_CASES = CASES + [samples.Case(samples.FUSED_FORWARD, "contiguous", dt) for dt in (torch.float32, torch.float64)]
# Without weight and bias only in float32: that branch of the kernels does not depend on the dtype.
AFFINE_CASES = [(c, True) for c in CASES] + [(c, False) for c in CASES if c.dtype == torch.float32]
AFFINE_IDS = [f"{c}-{'affine' if a else 'no_affine'}" for c, a in AFFINE_CASES]


def _stats_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def assert_ulps(name, actual, truth, dtype, scale, ulps):
    err = ref.max_err(actual, truth)
    bound = ulps * ref.ulp_floor(dtype, scale)
    assert err <= bound, f"{name}: max error {err:.3e} > {ulps} ulp ({bound:.3e}) of {dtype} at scale {scale:.3e}"


def _exact_stats(case, x):
    mean, var, invstd = ref.stats(x, EPS)
    sd = _stats_dtype(case.dtype)
    return mean, var, invstd, mean.to(sd).to(x.device), invstd.to(sd).to(x.device)


@pytest.mark.parametrize("case", **samples.by_id(REDUCE_CASES))
def test_stats(case, device):
    x = case.input(device)
    mean, invstd = OPS.stats(x, EPS)
    # The fused forward's statistics are these, bitwise (the same kernel math);
    # its output and gradients are tested through batch_norm (test_numerics).
    _, fwd_mean, fwd_invstd = OPS.forward(x, None, None, EPS)
    assert torch.equal(fwd_mean, mean) and torch.equal(fwd_invstd, invstd)
    sd = _stats_dtype(case.dtype)
    assert mean.dtype == invstd.dtype == sd and mean.shape == invstd.shape == (case.channels,)
    assert mean.device == x.device
    m64, v64, i64 = ref.stats(x, EPS)
    spread = (x.double().cpu() - ref.bcast(m64, x)).abs().amax(ref.reduce_dims(x))
    # Mean: a few ulps at max |x|; invstd: relative (it is 1/sqrt of a var).
    assert_ulps("mean", mean, m64, sd, (m64.abs() + spread).max().item(), 4)
    rel = ((invstd.double().cpu() - i64) / i64).abs().max().item()
    assert rel <= 32 * torch.finfo(sd).eps, f"invstd relative error {rel:.3e}"


@pytest.mark.parametrize("case", **samples.by_id(samples.cases(dtypes=(torch.float32, torch.float64),
                                                               include_empty=False)))
def test_stats_invstd_precision(case, device, request):
    """Stricter: invstd within 8 (float32) / 16 (float64) ulps, relative, of the truth. (The one-pass
    shifted variance loses a few bits when the shift is far from the mean; see test_robust.)"""
    x = case.input(device)
    _, invstd = OPS.stats(x, EPS)
    i64 = ref.stats(x, EPS)[2]
    rel = ((invstd.double().cpu() - i64) / i64).abs().max().item()
    ulps = 8 if case.dtype == torch.float32 else 16
    assert rel <= ulps * torch.finfo(invstd.dtype).eps, f"invstd relative error {rel:.3e}"


@pytest.mark.parametrize("with_empty", [False, True], ids=["3_replicas", "with_empty_replica"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_gather_stats(dtype, with_empty, device):
    """Split a batch into uneven replicas: gathered stats == stats of the whole."""
    x = samples.Case((11, 5, 3, 4), "contiguous", dtype).input(device)
    sizes = [2, 0, 6, 3] if with_empty else [2, 6, 3]
    parts = torch.split(x, sizes, dim=0)
    means, invstds, counts = [], [], []
    for p in parts:
        if p.size(0) == 0:  # an empty replica sends placeholders with count 0
            means.append(torch.zeros(5, dtype=dtype, device=device))
            invstds.append(torch.ones(5, dtype=dtype, device=device))
        else:
            m, i = OPS.stats(p, EPS)
            means.append(m)
            invstds.append(i)
        counts.append(p.numel() // p.size(1))
    counts_t = torch.tensor(counts, dtype=dtype, device=device)
    mean, invstd = OPS.gather_stats(torch.stack(means), torch.stack(invstds), counts_t, EPS)
    m64, _, i64 = ref.stats(x, EPS)
    assert mean.dtype == invstd.dtype == dtype and mean.shape == (5,)
    tol = dict(rtol=8 * torch.finfo(dtype).eps, atol=8 * torch.finfo(dtype).eps)
    torch.testing.assert_close(mean.double().cpu(), m64, **tol)
    torch.testing.assert_close(invstd.double().cpu(), i64, **tol)
    whole_m, whole_i = OPS.stats(x, EPS)
    torch.testing.assert_close(mean, whole_m, **tol)
    torch.testing.assert_close(invstd, whole_i, **tol)


def test_gather_stats_all_empty_is_nan(device):
    mean, invstd = OPS.gather_stats(torch.zeros(2, 3, device=device), torch.ones(2, 3, device=device),
                                    torch.zeros(2, device=device), EPS)
    assert torch.isnan(mean).all() and torch.isnan(invstd).all()


@pytest.mark.parametrize("running_dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16],
                         ids=["f32", "f64", "bf16", "f16"])
@pytest.mark.parametrize(("momentum", "count"), [(0.1, 12), (0.5, 2), (1.0, 7), (0.0, 5), (0.3, 0)])
def test_update_stats(momentum, count, running_dtype, device):
    sd = torch.float64 if running_dtype == torch.float64 else torch.float32
    g = torch.Generator().manual_seed(0)
    rm = torch.randn(6, generator=g, dtype=torch.float64)
    rv = torch.rand(6, generator=g, dtype=torch.float64) + 0.5
    mean = torch.randn(6, generator=g, dtype=torch.float64)
    var = torch.rand(6, generator=g, dtype=torch.float64) + 0.1
    invstd = 1.0 / torch.sqrt(var + EPS)
    rm_t, rv_t = rm.to(device, running_dtype, copy=True), rv.to(device, running_dtype, copy=True)
    out = OPS.update_stats_(rm_t, rv_t, mean.to(device, sd), invstd.to(device, sd), momentum, EPS, count)
    assert out is None
    # truth from the values the op actually received
    var_in = 1.0 / invstd.to(sd).double() ** 2 - EPS
    e_rm, e_rv = ref.update_stats(rm.to(running_dtype).double(),
                                  rv.to(running_dtype).double(), mean.to(sd).double(), var_in, momentum, count)
    assert rm_t.dtype == rv_t.dtype == running_dtype
    if count == 0:
        assert torch.equal(rm_t.cpu(), rm.to(running_dtype)) and torch.equal(rv_t.cpu(), rv.to(running_dtype))
        return
    fin = torch.finfo(running_dtype)
    torch.testing.assert_close(rm_t.double().cpu(), e_rm, rtol=fin.eps, atol=fin.eps * 4)
    torch.testing.assert_close(rv_t.double().cpu(), e_rv, rtol=fin.eps, atol=fin.eps * 4)


def test_update_stats_count_one_is_inf_or_nan(device):
    """count == 1: the unbiased variance divides by 0, as torch's (inf/nan, no crash)."""
    rm, rv = torch.zeros(2, device=device), torch.ones(2, device=device)
    OPS.update_stats_(rm, rv, torch.zeros(2, device=device), torch.ones(2, device=device), 0.1, EPS, 1)
    assert not torch.isfinite(rv).any()


@pytest.mark.gpu_smoke
@pytest.mark.parametrize("running_dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("op", ["forward", "forward_act"])
@pytest.mark.parametrize(("shape", "memory_format"), [((6, 5, 3, 2), torch.contiguous_format),
                                                      ((6, 5, 3, 2), torch.channels_last),
                                                      ((6, 16, 3, 2), torch.channels_last),
                                                      ((0, 5, 3, 2), torch.contiguous_format)],
                         ids=["batch", "batch_channels_last", "vectors_channels_last", "empty_batch"])
def test_training_forward_updates_running_stats(shape, memory_format, op, running_dtype, device):
    """Given running statistics, a training forward updates them as
    update_stats_ does with its batch statistics (count = N * H * W; none for
    an empty batch), in the same call, with the same outputs, and bumps their
    version counters (buffers outside the graph)."""
    x = torch.randn(shape, device=device).contiguous(memory_format=memory_format)
    C = shape[1]  # 16: CUDA's channels-last kernels then take whole vectors of channels
    w, b = torch.rand(C, device=device) + 0.5, torch.randn(C, device=device)

    def run(*running):
        if op == "forward":
            return OPS.forward(x, w, b, EPS, *running)
        return OPS.forward_act(x, w, b, None, EPS, "pre_relu", 0.0, False, *running)

    rm = torch.randn(C, device=device, dtype=running_dtype)
    rv = torch.rand(C, device=device, dtype=running_dtype) + 0.5
    expected_rm, expected_rv = rm.clone(), rv.clone()
    y, mean, invstd = run()
    OPS.update_stats_(expected_rm, expected_rv, mean, invstd, 0.3, EPS, x.numel() // C)
    versions = rm._version, rv._version
    out = run(rm, rv, 0.3)
    for got, want in zip(out, (y, mean, invstd)):
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
    # (CUDA's forward kernel updates float32 buffers itself, in the same formula: within an ulp.)
    ulp = dict(rtol=torch.finfo(running_dtype).eps, atol=0)
    torch.testing.assert_close(rm, expected_rm, **ulp)
    torch.testing.assert_close(rv, expected_rv, **ulp)
    assert rm._version > versions[0] and rv._version > versions[1]


@pytest.mark.gpu_smoke
@pytest.mark.parametrize("op", ["forward", "forward_act"])
@pytest.mark.parametrize("running", ["float32", "bfloat16", "none"])
@pytest.mark.parametrize("batch", [6, 0], ids=["batch", "empty_batch"])
def test_training_forward_counts_the_step(batch, running, op, device):
    """num_batches_tracked += 1 per call, with or without running statistics
    (CUDA counts it in the kernel that updates float32 ones), on an empty
    batch too; and also when the call fails its checks (as a module counts the
    step first), but not when num_batches_tracked itself is invalid."""
    x = torch.randn(batch, 3, 4, device=device)
    stats = () if running == "none" else (torch.zeros(3, device=device, dtype=getattr(torch, running)),
                                          torch.ones(3, device=device, dtype=getattr(torch, running)))

    def call(input, *running_stats, steps):
        if op == "forward":
            return OPS.forward(input, None, None, EPS, *running_stats, num_batches_tracked=steps)
        return OPS.forward_act(input, None, None, None, EPS, "relu", 0.0, False, *running_stats,
                               num_batches_tracked=steps)

    steps = torch.tensor(41, device=device)
    call(x, *stats, steps=steps)
    call(x, *stats, steps=steps)
    assert steps.item() == 43
    with pytest.raises(RuntimeError, match="should contain 3 elements not 4"):
        call(x, torch.zeros(4, device=device), torch.ones(4, device=device), steps=steps)
    assert steps.item() == 44
    wrong = torch.tensor(1.0, device=device)
    with pytest.raises(RuntimeError, match="num_batches_tracked must be one int64 element"):
        call(x, *stats, steps=wrong)
    assert wrong.item() == 1.0


def test_training_forward_running_stats_errors(device):
    x = torch.randn(4, 3, 2, device=device)
    rm, rv = torch.zeros(3, device=device), torch.ones(3, device=device)
    with pytest.raises(ValueError, match="running_mean and running_var must either both be None"):
        OPS.forward(x, None, None, EPS, rm, None)
    with pytest.raises(RuntimeError, match="running_var should contain 3 elements not 4"):
        OPS.forward(x, None, None, EPS, rm, torch.ones(4, device=device))
    with pytest.raises(RuntimeError, match="running_mean must be a floating point tensor"):
        OPS.forward_act(x, None, None, None, EPS, "relu", 0.0, False, torch.zeros(3, dtype=torch.long, device=device),
                        rv)
    assert torch.equal(rm, torch.zeros(3, device=device)) and torch.equal(rv, torch.ones(3, device=device))


@pytest.mark.parametrize(("case", "affine"), AFFINE_CASES, ids=AFFINE_IDS)
def test_elemt(case, affine, device):
    x = case.input(device)
    w, b = case.params(device) if affine else (None, None)
    _, _, i64, mean, invstd = _exact_stats(case, x)
    y = OPS.elemt(x, w, b, mean, invstd)
    assert y.dtype == case.dtype and y.shape == x.shape and y.device == x.device
    truth = ref.elemt(x, w, b, mean, invstd)
    wmax = 1.0 if w is None else w.double().abs().max().item()
    bmax = 0.0 if b is None else b.double().abs().max().item()
    xs = (x.double().abs().max().item() + mean.double().abs().max().item()) * invstd.double().max().item()
    assert_ulps("elemt", y, truth, case.dtype, truth.abs().max().item(), 2) if case.low_precision else \
        assert_ulps("elemt", y, truth, case.dtype, xs * wmax + bmax, 4)


@pytest.mark.parametrize(("case", "affine"), AFFINE_CASES, ids=AFFINE_IDS)
def test_elemt_running(case, affine, device):
    """The eval forward in one op: bitwise elemt with invstd computed from the
    running variance by the ATen ops the stats dtype rounds in, and within
    elemt's tolerance of the float64 result; running statistics in the input's
    dtype, float32 and float64 alike."""
    x = case.input(device)
    w, b = case.params(device) if affine else (None, None)
    sd = _stats_dtype(case.dtype)
    gen = torch.Generator().manual_seed(3)
    rm64 = torch.randn(case.channels, generator=gen, dtype=torch.float64)
    rv64 = torch.rand(case.channels, generator=gen, dtype=torch.float64) * 4 + 0.1
    for running_dtype in dict.fromkeys((case.dtype, torch.float32, torch.float64)):
        rm, rv = rm64.to(device, running_dtype), rv64.to(device, running_dtype)
        y = OPS.elemt_running(x, w, b, rm, rv, EPS)
        assert y.dtype == case.dtype and y.shape == x.shape and y.stride() == OPS.elemt(
            x, w, b, rm.to(sd), rv.to(sd)).stride()
        decomposed = OPS.elemt(x, w, b, rm.to(sd), (rv.to(sd) + EPS).rsqrt())
        torch.testing.assert_close(y, decomposed, rtol=0, atol=0, equal_nan=True)
    y = OPS.elemt_running(x, w, b, rm64.to(device), rv64.to(device), EPS)
    truth = ref.elemt(x, w, b, rm64, 1.0 / torch.sqrt(rv64 + EPS))
    wmax = 1.0 if w is None else w.double().abs().max().item()
    bmax = 0.0 if b is None else b.double().abs().max().item()
    xs = (x.double().abs().max().item() + rm64.abs().max().item()) * (1.0 / torch.sqrt(rv64 + EPS)).max().item()
    assert_ulps("elemt_running", y, truth, case.dtype, truth.abs().max().item(), 2) if case.low_precision else \
        assert_ulps("elemt_running", y, truth, case.dtype, xs * wmax + bmax, 4)


@pytest.mark.parametrize("case", **samples.by_id(REDUCE_CASES))
def test_backward_reduce(case, device):
    x = case.input(device)
    dy = case.grad_out(device)
    _, _, _, mean, invstd = _exact_stats(case, x)
    sum_dy, sum_dy_xmu = OPS.backward_reduce(dy, x, mean, invstd)
    sd = _stats_dtype(case.dtype)
    assert sum_dy.dtype == sum_dy_xmu.dtype == sd and sum_dy.shape == (case.channels,)
    if device == "cpu":
        # The fused backward reduces the same way (csrc/cpu/parallel.h), bitwise.
        _, _, fused_sum_dy = OPS.backward(dy, x, mean, invstd, None)
        assert torch.equal(fused_sum_dy, sum_dy)
    t_dy, t_dyx = ref.backward_reduce(dy, x, mean)
    dims = ref.reduce_dims(x)
    dy64, x64 = dy.double().cpu(), x.double().cpu()
    s1 = dy64.abs().sum(dims).max().item()
    s2 = (dy64 * (x64 - ref.bcast(mean.double().cpu(), x64))).abs().sum(dims).max().item()
    assert_ulps("sum_dy", sum_dy, t_dy, sd, s1, 2)
    assert_ulps("sum_dy_xmu", sum_dy_xmu, t_dyx, sd, s2, 2)


@pytest.mark.parametrize(("case", "affine"), AFFINE_CASES, ids=AFFINE_IDS)
def test_backward_elemt(case, affine, device):
    x = case.input(device)
    dy = case.grad_out(device)
    w = case.params(device)[0] if affine else None
    _, _, _, mean, invstd = _exact_stats(case, x)
    sd = _stats_dtype(case.dtype)
    g = torch.Generator().manual_seed(5)
    mean_dy = torch.randn(case.channels, generator=g, dtype=torch.float64).to(device, sd)
    mean_dy_xmu = torch.randn(case.channels, generator=g, dtype=torch.float64).to(device, sd)
    dx = OPS.backward_elemt(dy, x, mean, invstd, w, mean_dy, mean_dy_xmu)
    assert dx.dtype == case.dtype and dx.shape == x.shape
    truth = ref.backward_elemt(dy, x, mean, invstd, w, mean_dy, mean_dy_xmu)
    wmax = 1.0 if w is None else w.double().abs().max().item()
    i = invstd.double().abs().max().item()
    xm = (x.double() - ref.bcast(mean.double(), x)).abs().max().item()
    natural = (dy.double().abs().max().item() + mean_dy.double().abs().max().item()
               + xm * i * i * mean_dy_xmu.double().abs().max().item()) * i * wmax
    assert_ulps("backward_elemt", dx, truth, case.dtype, natural, 4)


