"""Bad arguments raise the same exception type as torch.nn.functional.batch_norm,
with a message that names the problem."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import bnfast

OPS = torch.ops.bnfast


def _both_raise(device, fn_args, match=None, training=True):
    """Call torch and bnfast with the same arguments; return the two exceptions."""
    errors = []
    for fn in (F.batch_norm, bnfast.batch_norm):
        args, kwargs = fn_args()
        with pytest.raises(Exception) as info:
            fn(*args, **kwargs)
        errors.append(info.value)
    theirs, ours = errors
    assert type(ours) is type(theirs), f"bnfast raised {type(ours).__name__}: {ours}; torch {type(theirs).__name__}"
    if match is not None:
        assert match in str(ours), f"{match!r} not in bnfast's message: {ours}"
    return theirs, ours


def _x(device, shape=(4, 3, 5), dtype=torch.float32):
    return torch.randn(shape, device=device).to(dtype)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", [(5,), (3,), ()], ids=["1D_5", "1D_3", "0D"])
def test_wrong_ndim(shape, training, device):
    """With running stats (the module path): torch raises RuntimeError (or IndexError for 0-D
    in training); bnfast must raise the same type and name the problem."""
    theirs, ours = _both_raise(device, lambda: (
        (_x(device, shape), torch.zeros(3, device=device), torch.ones(3, device=device)), dict(training=training)))
    if isinstance(ours, RuntimeError):
        assert "at least 2 dimensions" in str(ours)


@pytest.mark.parametrize("shape", [(5,), (3,)], ids=["1D_5", "1D_3"])
def test_wrong_ndim_training_no_running_stats(shape, device):
    """torch raises IndexError here (it reads size(1) first); so does bnfast,
    with a message naming the missing channel dimension."""
    _, ours = _both_raise(device, lambda: ((_x(device, shape), None, None), dict(training=True)))
    assert isinstance(ours, IndexError) and "no channel dimension" in str(ours)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("which", ["weight", "bias"])
def test_param_channel_mismatch(which, training, device):
    def args():
        kw = {which: torch.ones(4, device=device), "training": training}
        return (_x(device), torch.zeros(3, device=device), torch.ones(3, device=device)), kw
    _, ours = _both_raise(device, args, match=f"{which} should contain 3 elements")
    assert isinstance(ours, RuntimeError)


@pytest.mark.parametrize("which", ["running_mean", "running_var"])
@pytest.mark.parametrize("training", [
    pytest.param(True, id="train"),
    pytest.param(False, id="eval")])
def test_running_stats_channel_mismatch(which, training, device):
    def args():
        rm, rv = torch.zeros(3, device=device), torch.ones(3, device=device)
        if which == "running_mean":
            rm = torch.zeros(4, device=device)
        else:
            rv = torch.ones(4, device=device)
        return (_x(device), rm, rv), dict(training=training)
    _, ours = _both_raise(device, args, match=f"{which} should contain 3 elements")
    assert isinstance(ours, RuntimeError)


@pytest.mark.parametrize("shape", [(1, 3), (1, 3, 1), (1, 3, 1, 1), (1, 3, 1, 1, 1)])
def test_one_value_per_channel_in_training(shape, device):
    _both_raise(device, lambda: ((_x(device, shape), None, None), dict(training=True)),
                match="Expected more than 1 value per channel when training")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", [(4, 0), (2, 0, 3, 3), (2, 0, 40, 40)])
def test_zero_channels(shape, training, device):
    def args():
        empty = torch.zeros(0, device=device)
        return (_x(device, shape), empty, empty + 1, empty + 1, empty), dict(training=training)
    _both_raise(device, args, match="0 channels")


@pytest.mark.parametrize("op", ["stats", "forward", "elemt", "elemt_running"])
def test_zero_channels_ops_directly(op, device):
    x, empty = _x(device, (2, 0, 3, 3)), torch.zeros(0, device=device)
    call = {"stats": lambda: bnfast.ops.stats(x, 1e-5), "forward": lambda: bnfast.ops.forward(x, None, None, 1e-5),
            "elemt": lambda: bnfast.ops.elemt(x, None, None, empty, empty),
            "elemt_running": lambda: bnfast.ops.elemt_running(x, None, None, empty, empty, 1e-5)}[op]
    with pytest.raises(IndexError, match="0 channels"):
        call()


def test_one_value_per_channel_ok_in_eval(device):
    x = _x(device, (1, 3))
    rm, rv = torch.zeros(3, device=device), torch.ones(3, device=device)
    torch.testing.assert_close(bnfast.batch_norm(x, rm, rv), F.batch_norm(x, rm, rv))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.uint8, torch.bool])
def test_integer_dtype(dtype, training, device):
    def args():
        x = torch.ones(4, 3, 2, device=device, dtype=dtype)
        return (x, torch.zeros(3, device=device), torch.ones(3, device=device)), dict(training=training)
    theirs, ours = _both_raise(device, args)
    assert isinstance(ours, NotImplementedError)
    assert "not implemented for" in str(ours)


@pytest.mark.parametrize("what", ["weight", "running_stats", "running_stats_eval"])
def test_tensors_on_different_devices(what, device):
    """A second device is simulated with 'meta' (works with a single real device)."""
    def args():
        x = _x(device)
        rm, rv = torch.zeros(3, device=device), torch.ones(3, device=device)
        kw = dict(training=what != "running_stats_eval")
        if what == "weight":
            kw["weight"] = torch.ones(3, device="meta")
        else:
            rm, rv = rm.to("meta"), rv.to("meta")
        return (x, rm, rv), kw
    _, ours = _both_raise(device, args)
    assert isinstance(ours, RuntimeError)


def test_tensors_on_different_devices_ops_directly(device):
    """The ops themselves (not the Python wrapper) check devices: a meta weight with a real input."""
    x = _x(device)
    with pytest.raises(RuntimeError):
        torch.ops.bnfast.forward(x, torch.ones(3, device="meta"), None, 1e-5)


@pytest.mark.parametrize("eps", [0.0, -1e-5])
def test_eps_not_positive_in_training(eps, device):
    _both_raise(device, lambda: ((_x(device), None, None), dict(training=True, eps=eps)),
                match="eps must be positive")


def test_eps_negative_in_eval(device):
    _both_raise(device, lambda: ((_x(device), torch.zeros(3, device=device), torch.ones(3, device=device)),
                                 dict(training=False, eps=-1.0)), match="eps must be non-negative")


def test_eval_without_running_stats(device):
    _both_raise(device, lambda: ((_x(device), None, None), dict(training=False)),
                match="must be defined in evaluation mode")


def test_grad_out_shape_mismatch_in_ops(device):
    x = _x(device)
    mean, invstd = torch.ops.bnfast.stats(x, 1e-5)
    with pytest.raises(RuntimeError, match="grad_out"):
        torch.ops.bnfast.backward(torch.randn(4, 3, 6, device=device), x, mean, invstd, None)


def test_stats_dtype_mismatch_in_ops(device):
    x = _x(device, dtype=torch.bfloat16)
    mean = torch.zeros(3, dtype=torch.bfloat16, device=device)  # must be float32 for bf16 input
    with pytest.raises(RuntimeError, match="mean must be"):
        torch.ops.bnfast.elemt(x, None, None, mean, torch.ones(3, device=device))


@pytest.mark.parametrize("requires_grad", [False, True], ids=["kernel", "decomposition"])
def test_elemt_running_bad_statistics(requires_grad, device):
    """The one-op eval forward names the running statistic that is wrong, on
    its kernel and on its differentiable decomposition alike."""
    x = _x(device).requires_grad_(requires_grad)
    good = torch.ones(3, device=device)
    with pytest.raises(RuntimeError, match="running_var should contain 3 elements not 4"):
        torch.ops.bnfast.elemt_running(x, None, None, good, torch.ones(4, device=device), 1e-5)
    with pytest.raises(RuntimeError, match="running_mean must be a floating point tensor, got Long"):
        torch.ops.bnfast.elemt_running(x, None, None, torch.ones(3, dtype=torch.long, device=device), good, 1e-5)


@pytest.mark.parametrize("which", ["running_mean", "running_var"])
def test_one_running_stat_in_training(which, device):
    """Only one of the two running statistics: torch's exception type (ValueError in torch >= 2.13)."""
    def args():
        rm, rv = torch.zeros(3, device=device), torch.ones(3, device=device)
        return (_x(device), rm if which == "running_mean" else None, rv if which == "running_var" else None), \
            dict(training=True)
    _both_raise(device, args, match="running_mean and running_var must either both be None or neither be None")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("stats", ["empty_stats", "no_stats", "mismatched_stats"])
def test_empty_input_returns_empty(stats, dtype, training, device):
    """An empty input (1-D (0,) included) gives torch's empty result, whatever
    the statistics: torch.batch_norm returns before it looks at them."""
    x = torch.empty(0, dtype=dtype, device=device)
    running = {"empty_stats": (torch.empty(0, dtype=dtype, device=device),) * 2, "no_stats": (None, None),
               "mismatched_stats": (torch.zeros(5, dtype=dtype, device=device),) * 2}[stats]
    for shape in ((0,), (0, 3), (0, 3, 4, 4)):
        x = torch.empty(shape, dtype=dtype, device=device)
        theirs = F.batch_norm(x, *running, training=training)
        ours = bnfast.batch_norm(x, *running, training=training)
        assert ours.shape == theirs.shape and ours.dtype == theirs.dtype and ours.stride() == theirs.stride()


@pytest.mark.parametrize("op", ["backward", "backward_reduce", "backward_elemt", "gather_stats"])
def test_not_differentiable_ops_raise_on_backward(op, device):
    """The backward pieces and gather_stats are not differentiable: backpropagating into them
    raises instead of silently leaving the inputs without gradient."""
    x = torch.randn(4, 3, 5, device=device, requires_grad=True)
    dy = torch.randn(4, 3, 5, device=device)
    mean, invstd = (t.detach() for t in OPS.stats(x.detach(), 1e-5))
    out = {"backward": lambda: OPS.backward(dy, x, mean, invstd, None)[0],
           "backward_reduce": lambda: OPS.backward_reduce(dy, x, mean, invstd)[1],
           "backward_elemt": lambda: OPS.backward_elemt(dy, x, mean, invstd, None, mean, invstd),
           "gather_stats": lambda: OPS.gather_stats(x[:2, :, 0], x[2:, :, 0].abs() + 1, torch.ones(2), 1e-5)[0],
           }[op]()
    with pytest.raises(RuntimeError, match=f"bnfast::{op}"):
        out.sum().backward()


def test_update_stats_bumps_versions_and_ignores_graph(device):
    """The running statistics are buffers outside the graph, as torch's: the update takes the
    statistics' values whatever graph they carry, and bumps the buffers' version counters."""
    x = torch.randn(4, 3, device=device, requires_grad=True)
    mean, invstd = OPS.stats(x, 1e-5)
    rm, rv = torch.zeros(3, device=device), torch.ones(3, device=device)
    versions = rm._version, rv._version
    OPS.update_stats_(rm, rv, mean, invstd, 0.1, 1e-5, 4)
    assert rm._version > versions[0] and rv._version > versions[1]
    assert not rm.requires_grad and not rv.requires_grad
    torch.testing.assert_close(rm, 0.1 * mean.detach())


@pytest.mark.gpu_smoke
def test_error_matrix_survives_in_a_subprocess(device):
    """Every test of this file on this device, in a child process: a crash (a
    signal; the CUDA kernels once segfaulted on bad input) reads as a failure
    here instead of a dead test worker."""
    env = dict(os.environ, BNFAST_TEST_DEVICES=device)
    command = [sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
               "-k", "not subprocess"]
    proc = subprocess.run(command, cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True,
                          timeout=600)
    how = f"killed by signal {-proc.returncode}" if proc.returncode < 0 else f"exit status {proc.returncode}"
    assert proc.returncode == 0, f"the error matrix on {device} ended with {how}:\n{proc.stdout[-6000:]}{proc.stderr[-3000:]}"
