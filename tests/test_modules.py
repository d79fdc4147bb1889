"""bnfast.BatchNorm1d/2d/3d are exact drop-ins for torch.nn.BatchNorm1d/2d/3d,
and bnfast.convert / revert swap them in a model."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
import torch.nn as nn

import bnfast

PAIRS = [(bnfast.BatchNorm1d, nn.BatchNorm1d, (4, 3, 5)), (bnfast.BatchNorm2d, nn.BatchNorm2d, (4, 3, 5, 5)),
         (bnfast.BatchNorm3d, nn.BatchNorm3d, (2, 3, 4, 3, 3))]
PAIR_IDS = ["1d", "2d", "3d"]

CTOR_ARGS = [dict(), dict(eps=1e-3), dict(momentum=None), dict(momentum=0.5), dict(affine=False),
             dict(track_running_stats=False), dict(affine=False, track_running_stats=False),
             dict(dtype=torch.float64), dict(dtype=torch.bfloat16)]


def _buffers_params(m):
    return ({k: (tuple(v.shape), v.dtype, v.device, v.requires_grad) for k, v in m.named_parameters()},
            {k: (None if v is None else (tuple(v.shape), v.dtype, v.device)) for k, v in m._buffers.items()})


@pytest.mark.parametrize("kwargs", CTOR_ARGS, ids=lambda k: "-".join(f"{a}={b}" for a, b in k.items()) or "default")
@pytest.mark.parametrize(("ours", "theirs", "shape"), PAIRS, ids=PAIR_IDS)
def test_constructor_matches_torch(ours, theirs, shape, kwargs, device):
    a, b = ours(3, device=device, **kwargs), theirs(3, device=device, **kwargs)
    for attr in ("num_features", "eps", "momentum", "affine", "track_running_stats", "training"):
        assert getattr(a, attr) == getattr(b, attr), attr
    assert _buffers_params(a) == _buffers_params(b)
    assert list(a.state_dict().keys()) == list(b.state_dict().keys())
    for (k, u), v in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(u, v), k
    assert a._version == b._version
    assert repr(a) == repr(b).replace(theirs.__name__, ours.__name__, 1)
    assert a.extra_repr() == b.extra_repr()
    assert isinstance(a, theirs) and isinstance(a, nn.modules.batchnorm._BatchNorm)


def test_isinstance():
    assert isinstance(bnfast.BatchNorm2d(3), torch.nn.BatchNorm2d)
    assert isinstance(bnfast.BatchNorm1d(3), torch.nn.modules.batchnorm._BatchNorm)
    assert not isinstance(bnfast.BatchNorm2d(3), torch.nn.BatchNorm1d)


def _trained_torch_bn(theirs, shape, device, steps=3):
    m = theirs(3, device=device)
    with torch.no_grad():
        m.weight.uniform_(0.5, 1.5)
        m.bias.uniform_(-1, 1)
    for _ in range(steps):
        m(torch.randn(shape, device=device) * 2 + 1)
    return m


@pytest.mark.parametrize(("ours", "theirs", "shape"), PAIRS, ids=PAIR_IDS)
def test_state_dict_round_trip(ours, theirs, shape, device):
    src = _trained_torch_bn(theirs, shape, device)
    mid = ours(3, device=device)
    mid.load_state_dict(src.state_dict())
    back = theirs(3, device=device)
    back.load_state_dict(mid.state_dict())
    for k, v in src.state_dict().items():
        assert torch.equal(mid.state_dict()[k], v), k
        assert torch.equal(back.state_dict()[k], v), k
    x = torch.randn(shape, device=device)
    src.eval(), mid.eval()
    torch.testing.assert_close(mid(x), src(x))


@pytest.mark.parametrize(("ours", "theirs", "shape"), PAIRS, ids=PAIR_IDS)
def test_old_checkpoint_without_num_batches_tracked(ours, theirs, shape, device):
    """torch's _version < 2 migration: a missing num_batches_tracked loads without error and
    ends up as torch's does (recent torch keeps the module's current value)."""
    src = _trained_torch_bn(theirs, shape, device)
    sd = src.state_dict()
    del sd["num_batches_tracked"]
    sd._metadata[""]["version"] = 1
    a, b = ours(3, device=device), theirs(3, device=device)
    a.num_batches_tracked.fill_(7)
    b.num_batches_tracked.fill_(7)
    a.load_state_dict(sd)  # strict: would raise on a missing key without the migration
    b.load_state_dict(sd)
    assert int(a.num_batches_tracked) == int(b.num_batches_tracked)
    assert torch.equal(a.running_mean, src.running_mean)


@pytest.mark.parametrize(("ours", "theirs", "shape"), PAIRS, ids=PAIR_IDS)
def test_deepcopy_and_pickle(ours, theirs, shape, device):
    m = ours(3, momentum=None, device=device)
    m(torch.randn(shape, device=device))
    for clone in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
        assert type(clone) is ours
        for k, v in m.state_dict().items():
            assert torch.equal(clone.state_dict()[k], v)
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert type(loaded) is ours and loaded.momentum is None
    x = torch.randn(shape, device=device)
    torch.testing.assert_close(loaded(x), copy.deepcopy(m)(x))


WRONG_DIMS = [(bnfast.BatchNorm1d, nn.BatchNorm1d, (4,)), (bnfast.BatchNorm1d, nn.BatchNorm1d, (2, 3, 4, 4)),
              (bnfast.BatchNorm2d, nn.BatchNorm2d, (4, 3, 5)), (bnfast.BatchNorm2d, nn.BatchNorm2d, (1, 2, 3, 3, 3)),
              (bnfast.BatchNorm3d, nn.BatchNorm3d, (4, 3, 5, 5))]


@pytest.mark.parametrize(("ours", "theirs", "shape"), WRONG_DIMS,
                         ids=[f"{o.__name__}-{len(s)}D" for o, _, s in WRONG_DIMS])
def test_input_dimension_errors(ours, theirs, shape, device):
    x = torch.randn(shape, device=device)
    with pytest.raises(Exception) as theirs_err:
        theirs(3, device=device)(x)
    with pytest.raises(type(theirs_err.value)) as ours_err:
        ours(3, device=device)(x)
    assert type(ours_err.value) is type(theirs_err.value) is ValueError
    assert str(ours_err.value) == str(theirs_err.value)


def test_bn2d_3d_input_message(device):
    with pytest.raises(ValueError, match=r"expected 4D input \(got 3D input\)"):
        bnfast.BatchNorm2d(3, device=device)(torch.randn(2, 3, 4, device=device))


@pytest.mark.parametrize(("ours", "theirs", "shape"), PAIRS, ids=PAIR_IDS)
def test_eval_without_running_stats_uses_batch_stats(ours, theirs, shape, device):
    a = ours(3, track_running_stats=False, device=device).eval()
    b = theirs(3, track_running_stats=False, device=device).eval()
    x = torch.randn(shape, device=device) * 3 + 2
    ya = a(x)
    torch.testing.assert_close(ya, b(x))
    torch.testing.assert_close(ya.mean(dim=[0] + list(range(2, x.dim()))), torch.zeros(3, device=device),
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize(("ours", "theirs", "shape"), PAIRS, ids=PAIR_IDS)
def test_module_train_eval_matches_torch(ours, theirs, shape, device):
    torch.manual_seed(1)
    a, b = ours(3, device=device), theirs(3, device=device)
    b.load_state_dict(a.state_dict())
    for _ in range(3):
        x = torch.randn(shape, device=device, requires_grad=True)
        ya, yb = a(x), b(x)
        torch.testing.assert_close(ya, yb)
        ga = torch.autograd.grad(ya.square().sum(), [x, a.weight, a.bias])
        gb = torch.autograd.grad(yb.square().sum(), [x, b.weight, b.bias])
        for u, v in zip(ga, gb):
            torch.testing.assert_close(u, v, atol=1e-5, rtol=1e-4)
    for k, v in b.state_dict().items():
        torch.testing.assert_close(a.state_dict()[k], v)
    a.eval(), b.eval()
    x = torch.randn(shape, device=device)
    torch.testing.assert_close(a(x), b(x))


def _one_value_per_channel(m):
    return m, torch.randn(1, 3)


def _zero_eps(m):
    m.eps = 0.0
    return m, torch.randn(4, 3)


def _wrong_running_mean(m):
    m.running_mean = torch.zeros(4)
    return m, torch.randn(4, 3)


def _wrong_weight(m):
    m.weight = nn.Parameter(torch.ones(4))
    return m, torch.randn(4, 3)


def _wrong_dims(m):
    return m, torch.randn(4, 3, 2, 2)


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
@pytest.mark.parametrize("make", [_one_value_per_channel, _zero_eps, _wrong_running_mean, _wrong_weight, _wrong_dims])
def test_step_count_after_an_error_is_torchs(make, momentum):
    """torch's module counts the step (num_batches_tracked += 1) after checking
    the input's dims and before F.batch_norm checks its arguments; bnfast's op
    counts it in its own call, so every path must agree on the count when a
    check fails, with the same exception type."""
    counts, errors = [], []
    for cls in (bnfast.BatchNorm1d, nn.BatchNorm1d):
        m, x = make(cls(3, momentum=momentum))
        with pytest.raises(Exception) as info:
            m(x)
        counts.append(int(m.num_batches_tracked))
        errors.append(info.type)
    assert counts[0] == counts[1] and errors[0] is errors[1], (counts, errors)


def test_a_counter_the_op_cannot_take_is_counted_as_torch_does():
    """torch's module only adds 1 to num_batches_tracked: a float one (or one
    on another device) still counts, outside the op."""
    counts = []
    for cls in (bnfast.BatchNorm1d, nn.BatchNorm1d):
        m = cls(3)
        m.num_batches_tracked = torch.tensor(2.0)
        m(torch.randn(4, 3))
        counts.append(m.num_batches_tracked)
    assert counts[0].dtype == counts[1].dtype and torch.equal(counts[0], counts[1])


def test_step_count_with_an_unfused_residual(device):
    """A residual that only broadcasts is added unfused, after the plain op,
    which counts the step once."""
    m = bnfast.BatchNormAct2d(3, act="relu", device=device)
    x = torch.randn(4, 3, 2, 2, device=device)
    m(x, torch.ones(3, 1, 1, device=device))
    m(x)
    assert int(m.num_batches_tracked) == 2


class _Positive(nn.Module):
    def forward(self, w):
        return w.abs() + 0.5


def test_parametrized_and_replaced_tensors_are_read_as_torch_reads_them(device):
    """The modules read their parameters and buffers from the module's tables
    (fast), so a parametrized weight (a property, no longer a parameter) and a
    buffer set to None must still be read as torch's BN reads them."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, 5, 5, device=device, requires_grad=True)
    results = []
    for cls in (bnfast.BatchNorm2d, nn.BatchNorm2d):
        m = cls(3, device=device)
        torch.nn.utils.parametrize.register_parametrization(m, "weight", _Positive())
        with torch.no_grad():
            m.parametrizations.weight.original.copy_(torch.tensor([-2.0, 0.5, 3.0]))
        y = m(x)
        grads = torch.autograd.grad(y.square().sum(), [x, m.parametrizations.weight.original])
        m.running_var = None  # torch then uses batch statistics in eval too
        m.running_mean = None
        m.eval()
        results.append((y, *grads, m(x.detach())))
    for ours, theirs in zip(*results):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)


def test_empty_batch_module(device):
    """Empty batch as torch: output empty, running stats unchanged,
    num_batches_tracked incremented, weight/bias grads zero."""
    results = []
    for cls in (bnfast.BatchNorm2d, nn.BatchNorm2d):
        torch.manual_seed(0)
        m = cls(3, device=device)
        with torch.no_grad():
            m.running_mean.fill_(0.25)
            m.running_var.fill_(2.0)
        x = torch.randn(0, 3, 4, 4, device=device, requires_grad=True)
        y = m(x)
        y.sum().backward()
        assert y.shape == (0, 3, 4, 4)
        assert torch.equal(m.running_mean, torch.full((3,), 0.25, device=device))
        assert torch.equal(m.running_var, torch.full((3,), 2.0, device=device))
        assert int(m.num_batches_tracked) == 1
        assert torch.equal(m.weight.grad, torch.zeros(3, device=device))
        assert torch.equal(m.bias.grad, torch.zeros(3, device=device))
        assert x.grad.shape == x.shape
        m.eval()
        assert m(x.detach()).shape == (0, 3, 4, 4)
        results.append(y)
    assert results[0].dtype == results[1].dtype


# ----------------------------------------------------------------- convert / revert

class Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.seq = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                                 nn.Sequential(nn.BatchNorm2d(4, momentum=None)))
        self.sync = nn.SyncBatchNorm(4)


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn_in = nn.BatchNorm2d(3)
        self.inner = Inner()
        self.flat = nn.Flatten()
        self.bn1d = nn.BatchNorm1d(4 * 4 * 4, affine=False)
        self.bn3d = nn.BatchNorm3d(2, track_running_stats=False)


def _bn_modules(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}


def test_convert_revert(device):
    model = Model().to(device=device, dtype=torch.float64)
    model.inner.seq[1].weight.requires_grad_(False)  # a frozen BN
    model.inner.seq[1].bias.requires_grad_(False)
    model.bn_in.eval()  # mixed training flags
    params_before = {n: p for n, p in model.named_parameters()}
    buffers_before = {n: b for n, b in model.named_buffers()}
    before = _bn_modules(model)

    converted = bnfast.convert(model)
    assert converted is model
    after = _bn_modules(model)
    assert after.keys() == before.keys()
    expected = {nn.BatchNorm1d: bnfast.BatchNorm1d, nn.BatchNorm2d: bnfast.BatchNorm2d,
                nn.BatchNorm3d: bnfast.BatchNorm3d, nn.SyncBatchNorm: bnfast.SyncBatchNorm}
    for name, m in after.items():
        assert type(m) is expected[type(before[name])], name
        assert m.training == before[name].training, name
        for attr in ("num_features", "eps", "momentum", "affine", "track_running_stats"):
            assert getattr(m, attr) == getattr(before[name], attr)
    for n, p in model.named_parameters():
        assert p is params_before[n], f"{n}: not the same Parameter object"
        assert p.dtype == torch.float64 and p.device.type == torch.device(device).type
    assert model.inner.seq[1].weight.requires_grad is False and model.inner.seq[3][0].weight.requires_grad
    for n, b in model.named_buffers():
        assert b is buffers_before[n], n
    assert model.bn_in.training is False and model.inner.seq[1].training is True

    reverted = bnfast.revert(model)
    for name, m in _bn_modules(reverted).items():
        assert type(m) is type(before[name]), name
    for n, p in reverted.named_parameters():
        assert p is params_before[n]


def test_convert_single_module_returns_new(device):
    bn = nn.BatchNorm2d(3, device=device)
    new = bnfast.convert(bn)
    assert type(new) is bnfast.BatchNorm2d and new.weight is bn.weight
    assert type(bnfast.revert(new)) is nn.BatchNorm2d


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1, stride=2), nn.BatchNorm2d(8), nn.ReLU())
        self.head = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


@pytest.fixture
def exact_convolutions():
    """Convolutions and matmuls in full float32, with deterministic algorithms:
    the two models' batch norms may differ by rounding, and TF32 (the CUDA
    default for convolutions) would amplify that far past these tolerances."""
    matmul_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled, benchmark=False, deterministic=True,
                                        allow_tf32=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul_tf32


@pytest.mark.gpu_smoke
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_sgd_steps_match_torch(channels_last, device, exact_convolutions):
    torch.manual_seed(0)
    ref_model = SmallCNN().to(device)
    ours = bnfast.convert(copy.deepcopy(ref_model))
    assert sum(isinstance(m, bnfast.BatchNorm2d) for m in ours.modules()) == 2
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    ref_model, ours = ref_model.to(memory_format=fmt), ours.to(memory_format=fmt)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (ref_model, ours)]
    g = torch.Generator().manual_seed(1)
    for step in range(5):
        x = torch.randn(16, 3, 8, 8, generator=g).to(device).contiguous(memory_format=fmt)
        t = torch.randint(0, 10, (16,), generator=g).to(device)
        for m, opt in zip((ref_model, ours), opts):
            opt.zero_grad()
            nn.functional.cross_entropy(m(x), t).backward()
            opt.step()
    for (n, p), q in zip(ref_model.state_dict().items(), ours.state_dict().values()):
        torch.testing.assert_close(q, p, atol=1e-5, rtol=1e-4, msg=n)
    ref_model.eval(), ours.eval()
    x = torch.randn(4, 3, 8, 8, device=device)
    torch.testing.assert_close(ours(x), ref_model(x), atol=1e-5, rtol=1e-4)
