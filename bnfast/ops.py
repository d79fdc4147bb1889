"""Python side of the bnfast ops: typed wrappers and fake kernels.

Per op: a typed wrapper (``bnfast.ops.<op>``) and its fake kernel
(``torch.library.register_fake``: shapes, dtypes and strides without data, for
torch.compile and meta tensors). Schemas are in csrc/bnfast.cpp; CPU and CUDA
kernels in csrc/cpu and csrc/cuda; autograd in csrc/autograd.

Shapes: input (N, C, *); per-channel tensors [C]. "Stats" tensors (mean,
invstd, sums) are float32, or float64 for float64 input.

Autograd follows one rule for every op, stated in csrc/autograd/graph.h: the
differentiable ops (stats, forward, elemt, forward_act, elemt_act) have C++
autograd kernels that build the graph the way torch's own ops do (reverse
mode with bnfast kernels, higher orders and forward mode through
differentiable composites, all of it usable under torch.func); elemt_running
decomposes into elemt whenever it is differentiated or transformed; the
others are registered as not differentiable.
Their batching rules for torch.vmap are in bnfast/_vmap.py.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

_ops = torch.ops.bnfast


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of an input dtype: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _is_channels_last_dense(t: Tensor) -> bool:
    """Mirror of csrc/common/layout.h is_channels_last_dense."""
    expected = 1
    for d in [1] + list(range(t.dim() - 1, 1, -1)) + [0]:
        if t.size(d) != 1 and t.stride(d) != expected:
            return False
        expected *= t.size(d)
    return True


def _empty_output_like(input: Tensor) -> Tensor:
    """Mirror of the kernels' output allocation (layout.h readable + empty_like):
    contiguous and dense channels-last inputs keep their strides; others are
    answered in the memory format torch suggests for them, which is also the
    one empty_like's preserve_format picks for non-dense strides."""
    if input.is_contiguous() or (input.dim() in (4, 5) and _is_channels_last_dense(input)):
        return torch.empty_like(input)
    preserved = torch.empty_like(input)
    for fmt, dim in ((torch.channels_last, 4), (torch.channels_last_3d, 5)):
        if input.dim() == dim and preserved.is_contiguous(memory_format=fmt):
            return torch.empty_like(input, memory_format=fmt)
    return torch.empty_like(input, memory_format=torch.contiguous_format)


def _check_devices(input: Tensor, **tensors: Optional[Tensor]) -> None:
    """The kernels' device check, for the fake kernels: tensors on a device
    other than the input's (meta included) must not be silently accepted."""
    for name, t in tensors.items():
        if t is not None and t.device != input.device:
            raise RuntimeError(
                f"bnfast: {name} must be on the input's device {input.device}, got {t.device}")


def _stats_like(input: Tensor) -> Tensor:
    return input.new_empty((input.size(1),), dtype=stats_dtype(input.dtype))


# ---------------------------------------------------------------- stats

def stats(input: Tensor, eps: float) -> Tuple[Tensor, Tensor]:
    """mean[c], invstd[c] = 1 / sqrt(biased var[c] + eps) of input (N, C, *)."""
    return _ops.stats(input, eps)


@torch.library.register_fake("bnfast::stats")
def _stats_fake(input, eps):
    _check_devices(input)
    return _stats_like(input), _stats_like(input)


# ---------------------------------------------------------------- gather_stats

def gather_stats(mean: Tensor, invstd: Tensor, counts: Tensor, eps: float) -> Tuple[Tensor, Tensor]:
    """Merge per-replica stats (mean, invstd: [R, C]; counts: [R]) into global (mean, invstd) [C]."""
    return _ops.gather_stats(mean, invstd, counts, eps)


@torch.library.register_fake("bnfast::gather_stats")
def _gather_stats_fake(mean, invstd, counts, eps):
    _check_devices(mean, invstd=invstd, counts=counts)
    return mean.new_empty((mean.size(1),)), mean.new_empty((mean.size(1),))


# ---------------------------------------------------------------- update_stats_

def update_stats_(running_mean: Tensor, running_var: Tensor, mean: Tensor, invstd: Tensor,
                  momentum: float, eps: float, count: int) -> None:
    """In place: running = (1 - momentum) * running + momentum * batch, with the
    unbiased batch variance (1 / invstd^2 - eps) * count / (count - 1)."""
    _ops.update_stats_(running_mean, running_var, mean, invstd, momentum, eps, count)


@torch.library.register_fake("bnfast::update_stats_")
def _update_stats_fake(running_mean, running_var, mean, invstd, momentum, eps, count):
    _check_devices(mean, running_mean=running_mean, running_var=running_var, invstd=invstd)
    return None


# ---------------------------------------------------------------- elemt

def elemt(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], mean: Tensor, invstd: Tensor) -> Tensor:
    """y = (x - mean[c]) * invstd[c] * weight[c] + bias[c] for x (N, C, *)."""
    return _ops.elemt(input, weight, bias, mean, invstd)


@torch.library.register_fake("bnfast::elemt")
def _elemt_fake(input, weight, bias, mean, invstd):
    _check_devices(input, weight=weight, bias=bias, mean=mean, invstd=invstd)
    return _empty_output_like(input)


def elemt_running(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], running_mean: Tensor,
                  running_var: Tensor, eps: float) -> Tensor:
    """elemt with invstd = 1 / sqrt(running_var + eps) computed in the kernel
    (the eval forward as one op); running statistics of any floating dtype."""
    return _ops.elemt_running(input, weight, bias, running_mean, running_var, eps)


@torch.library.register_fake("bnfast::elemt_running")
def _elemt_running_fake(input, weight, bias, running_mean, running_var, eps):
    _check_devices(input, weight=weight, bias=bias, running_mean=running_mean, running_var=running_var)
    return _empty_output_like(input)


# ---------------------------------------------------------------- backward_reduce / backward_elemt

def backward_reduce(grad_out: Tensor, input: Tensor, mean: Tensor, invstd: Tensor) -> Tuple[Tensor, Tensor]:
    """sum_dy[c] = sum(dy), sum_dy_xmu[c] = sum(dy * (x - mean[c]))."""
    return _ops.backward_reduce(grad_out, input, mean, invstd)


@torch.library.register_fake("bnfast::backward_reduce")
def _backward_reduce_fake(grad_out, input, mean, invstd):
    _check_devices(input, grad_out=grad_out, mean=mean, invstd=invstd)
    return torch.empty_like(mean), torch.empty_like(mean)


def backward_elemt(grad_out: Tensor, input: Tensor, mean: Tensor, invstd: Tensor, weight: Optional[Tensor],
                   mean_dy: Tensor, mean_dy_xmu: Tensor) -> Tensor:
    """dx = (dy - mean_dy - (x - mean) * invstd^2 * mean_dy_xmu) * invstd * weight."""
    return _ops.backward_elemt(grad_out, input, mean, invstd, weight, mean_dy, mean_dy_xmu)


@torch.library.register_fake("bnfast::backward_elemt")
def _backward_elemt_fake(grad_out, input, mean, invstd, weight, mean_dy, mean_dy_xmu):
    _check_devices(input, grad_out=grad_out, mean=mean, invstd=invstd, weight=weight,
                   mean_dy=mean_dy, mean_dy_xmu=mean_dy_xmu)
    return _empty_output_like(input)


# ---------------------------------------------------------------- forward / backward (fused)

def forward(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
            running_mean: Optional[Tensor] = None, running_var: Optional[Tensor] = None,
            momentum: float = 0.1, num_batches_tracked: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """Training forward: (y, mean, invstd) with batch statistics of x (N, C, *);
    given running_mean and running_var ([C]), also update_stats_ of them with
    those statistics (count = N * prod(*)), and given num_batches_tracked (one
    int64 element), += 1, also when the arguments fail their checks (as a
    module counts the step before checking them): a module's training step
    in one call."""
    return _ops.forward(input, weight, bias, eps, running_mean, running_var, momentum, num_batches_tracked)


@torch.library.register_fake("bnfast::forward")
def _forward_fake(input, weight, bias, eps, running_mean=None, running_var=None, momentum=0.1,
                  num_batches_tracked=None):
    _check_devices(input, weight=weight, bias=bias, running_mean=running_mean, running_var=running_var,
                   num_batches_tracked=num_batches_tracked)
    return _empty_output_like(input), _stats_like(input), _stats_like(input)


def backward(grad_out: Tensor, input: Tensor, mean: Tensor, invstd: Tensor,
             weight: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
    """Training backward: (grad_input, grad_weight, grad_bias); the last two in the stats dtype."""
    return _ops.backward(grad_out, input, mean, invstd, weight)


@torch.library.register_fake("bnfast::backward")
def _backward_fake(grad_out, input, mean, invstd, weight):
    _check_devices(input, grad_out=grad_out, mean=mean, invstd=invstd, weight=weight)
    return _empty_output_like(input), torch.empty_like(mean), torch.empty_like(mean)


# ---------------------------------------------------------------- fused activation (forward_act, elemt_act, backward_act)

ACTIVATIONS = ("identity", "relu", "leaky_relu", "silu", "gelu", "gelu_tanh", "pre_relu")


def forward_act(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], residual: Optional[Tensor],
                eps: float, act: str, slope: float, memory_efficient: bool = False,
                running_mean: Optional[Tensor] = None, running_var: Optional[Tensor] = None,
                momentum: float = 0.1, num_batches_tracked: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """Training forward fused with an activation: (y, mean, invstd) with
    y = act(BN(x) + residual), or y = BN(relu(x)) for act="pre_relu".
    memory_efficient: autograd keeps y instead of x where x's normalized value
    can be recovered from y exactly (see bnfast.batch_norm_act). Running
    statistics and num_batches_tracked, when given, are updated as forward's."""
    return _ops.forward_act(input, weight, bias, residual, eps, act, slope, memory_efficient, running_mean,
                            running_var, momentum, num_batches_tracked)


@torch.library.register_fake("bnfast::forward_act")
def _forward_act_fake(input, weight, bias, residual, eps, act, slope, memory_efficient=False, running_mean=None,
                      running_var=None, momentum=0.1, num_batches_tracked=None):
    _check_devices(input, weight=weight, bias=bias, residual=residual, running_mean=running_mean,
                   running_var=running_var, num_batches_tracked=num_batches_tracked)
    return _empty_output_like(input), _stats_like(input), _stats_like(input)


def elemt_act(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], mean: Tensor, invstd: Tensor,
              residual: Optional[Tensor], act: str, slope: float) -> Tensor:
    """elemt fused with an activation: act((x - mean) * invstd * weight + bias + residual)."""
    return _ops.elemt_act(input, weight, bias, mean, invstd, residual, act, slope)


@torch.library.register_fake("bnfast::elemt_act")
def _elemt_act_fake(input, weight, bias, mean, invstd, residual, act, slope):
    _check_devices(input, weight=weight, bias=bias, mean=mean, invstd=invstd, residual=residual)
    return _empty_output_like(input)


def backward_act(grad_out: Tensor, input: Tensor, mean: Tensor, invstd: Tensor, weight: Optional[Tensor],
                 bias: Optional[Tensor], residual: Optional[Tensor], act: str,
                 slope: float) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """forward_act's training backward: (grad_input, grad_weight, grad_bias,
    grad_residual); the middle two in the stats dtype, the last empty without a residual."""
    return _ops.backward_act(grad_out, input, mean, invstd, weight, bias, residual, act, slope)


@torch.library.register_fake("bnfast::backward_act")
def _backward_act_fake(grad_out, input, mean, invstd, weight, bias, residual, act, slope):
    _check_devices(input, grad_out=grad_out, mean=mean, invstd=invstd, weight=weight, bias=bias, residual=residual)
    grad_residual = _empty_output_like(input) if residual is not None else input.new_empty((0,))
    return _empty_output_like(input), torch.empty_like(mean), torch.empty_like(mean), grad_residual


# ---------------------------------------------------------------- SyncBatchNormAct's pieces

def stats_act(input: Tensor, eps: float, act: str) -> Tuple[Tensor, Tensor]:
    """stats of what forward_act normalizes: relu(input) for act="pre_relu", input otherwise."""
    return _ops.stats_act(input, eps, act)


@torch.library.register_fake("bnfast::stats_act")
def _stats_act_fake(input, eps, act):
    _check_devices(input)
    return _stats_like(input), _stats_like(input)


def backward_reduce_act(grad_out: Tensor, input: Tensor, mean: Tensor, invstd: Tensor, weight: Optional[Tensor],
                        bias: Optional[Tensor], residual: Optional[Tensor], act: str,
                        slope: float) -> Tuple[Tensor, Tensor]:
    """backward_reduce's (sum_dy, sum_dy_xmu) with dz = grad_out * act'(z) in
    place of grad_out (z = BN(x) + residual recomputed), over relu(input) for
    pre_relu: the sums backward_act reduces."""
    return _ops.backward_reduce_act(grad_out, input, mean, invstd, weight, bias, residual, act, slope)


@torch.library.register_fake("bnfast::backward_reduce_act")
def _backward_reduce_act_fake(grad_out, input, mean, invstd, weight, bias, residual, act, slope):
    _check_devices(input, grad_out=grad_out, mean=mean, invstd=invstd, weight=weight, bias=bias, residual=residual)
    return torch.empty_like(mean), torch.empty_like(mean)


def backward_elemt_act(grad_out: Tensor, input: Tensor, mean: Tensor, invstd: Tensor, weight: Optional[Tensor],
                       bias: Optional[Tensor], residual: Optional[Tensor], act: str, slope: float, mean_dy: Tensor,
                       mean_dy_xmu: Tensor) -> Tuple[Tensor, Tensor]:
    """backward_elemt's grad_input with dz in place of grad_out (masked where
    input <= 0 for pre_relu), and grad_residual = dz (empty without a residual)."""
    return _ops.backward_elemt_act(grad_out, input, mean, invstd, weight, bias, residual, act, slope, mean_dy,
                                   mean_dy_xmu)


@torch.library.register_fake("bnfast::backward_elemt_act")
def _backward_elemt_act_fake(grad_out, input, mean, invstd, weight, bias, residual, act, slope, mean_dy,
                             mean_dy_xmu):
    _check_devices(input, grad_out=grad_out, mean=mean, invstd=invstd, weight=weight, bias=bias, residual=residual,
                   mean_dy=mean_dy, mean_dy_xmu=mean_dy_xmu)
    grad_residual = _empty_output_like(input) if residual is not None else input.new_empty((0,))
    return _empty_output_like(input), grad_residual
