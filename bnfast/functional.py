"""bnfast.batch_norm: torch.nn.functional.batch_norm on bnfast's kernels;
bnfast.batch_norm_act: the same fused with an activation (and a residual)."""

from __future__ import annotations

import functools
import os
import sys
import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import handle_torch_function, has_torch_function_variadic

from bnfast import ops

_ops = torch.ops.bnfast


def _verify_batch_size(size) -> None:
    values = size[0]
    for s in size[2:]:
        values *= s
    if values == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {size}")


def batch_norm(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    r"""Batch normalization over channel dim 1 of input (N, C, *), with
    torch.nn.functional.batch_norm's signature and semantics:

        y = (x - mean) / sqrt(var + eps) * weight + bias

    training=True: mean and var are the batch's (biased var), and when given,
    running_mean / running_var ([C]) are updated in place:
    running = (1 - momentum) * running + momentum * batch stat, with the
    unbiased variance. training=False: the running statistics are used.
    """
    if has_torch_function_variadic(input, running_mean, running_var, weight, bias):
        return handle_torch_function(
            batch_norm, (input, running_mean, running_var, weight, bias), input, running_mean,
            running_var, weight=weight, bias=bias, training=training, momentum=momentum, eps=eps)
    return _batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps, None, 0.0, None)


def batch_norm_act(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    act: str = "relu",
    negative_slope: float = 0.01,
    residual: Optional[Tensor] = None,
    memory_efficient: bool = False,
) -> Tensor:
    r"""Batch normalization fused with an activation, in one pass of bnfast's
    kernels instead of one per operation, with batch_norm's arguments and
    semantics otherwise:

        y = act(batch_norm(input, ...) + residual)

    for act in "identity", "relu", "leaky_relu" (negative_slope), "silu",
    "gelu", "gelu_tanh" (residual: None, a tensor like input, fused, or any
    tensor that broadcasts to the output, added unfused with torch's type
    promotion), and

        y = batch_norm(relu(input), ...)

    for act="pre_relu" (the running statistics are those of relu(input)).
    Equal to the unfused torch.nn.functional ops up to rounding (the fused
    result is rounded once, in the input's dtype).

    memory_efficient=True (training): backward keeps the output (which the
    next layer keeps anyway) instead of the input, and recovers the
    normalized input from it, xhat = (act^-1(y) - residual - bias) / weight,
    as In-Place ABN does but with the same parameters and gradients. Exact for
    act "identity", "leaky_relu" (negative_slope > 0) and "pre_relu" (which
    also keeps the sign of the input, one byte an element) when no weight
    element is zero; otherwise (relu, silu and gelu are not invertible) the
    input is kept as without the mode, with a warning, once. Recovering xhat
    from a rounded y costs precision where |bias| >> |weight| in half or
    bfloat16; it reads the weight on the host (one sync on a GPU) each
    forward.
    """
    _check_act(act)
    _check_residual(act, residual)
    tensors = (input, running_mean, running_var, weight, bias, residual)
    if has_torch_function_variadic(*tensors):
        return handle_torch_function(
            batch_norm_act, tensors, input, running_mean, running_var, weight=weight, bias=bias,
            training=training, momentum=momentum, eps=eps, act=act, negative_slope=negative_slope,
            residual=residual, memory_efficient=memory_efficient)
    return _batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps, act,
                       negative_slope, residual, memory_efficient)


def _check_act(act: str) -> None:
    if act not in ops.ACTIVATIONS:
        raise ValueError(f"bnfast: unknown activation {act!r}; choose from {', '.join(ops.ACTIVATIONS)}")


def _check_residual(act: str, residual: Optional[Tensor]) -> None:
    if residual is not None and act == "pre_relu":
        raise ValueError("bnfast: a residual is added after batch norm, so it cannot be combined with "
                         "act='pre_relu' (batch norm of relu(x))")


def _act_repr(act: str, negative_slope: float, memory_efficient: bool) -> str:
    """The fused part of a fused module's extra_repr."""
    slope = f", negative_slope={negative_slope}" if act == "leaky_relu" else ""
    saving = ", memory_efficient=True" if memory_efficient else ""
    return f", act={act!r}{slope}{saving}"


def _fusable_residual(input: Tensor, residual: Tensor) -> bool:
    """The fused kernels add a residual like the input; any other one is added
    unfused, as torch would, with broadcasting and type promotion."""
    return residual.shape == input.shape and residual.dtype == input.dtype and residual.device == input.device


_UNFUSED_ACTS = {"identity": lambda y, slope: y, "relu": lambda y, slope: F.relu(y),
                 "leaky_relu": lambda y, slope: F.leaky_relu(y, slope), "silu": lambda y, slope: F.silu(y),
                 "gelu": lambda y, slope: F.gelu(y), "gelu_tanh": lambda y, slope: F.gelu(y, approximate="tanh")}


def _batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps,
                act: Optional[str], slope: float, residual: Optional[Tensor],
                memory_efficient: bool = False, num_batches_tracked: Optional[Tensor] = None) -> Tensor:
    """batch_norm (act None) and batch_norm_act: torch.nn.functional.batch_norm's
    checks, in its order, then bnfast's ops. num_batches_tracked: a module's
    step count (training with tracked statistics), += 1 in the op's call
    when it runs, otherwise here, even when a check fails, as the module
    counts the step before F.batch_norm checks its arguments."""
    if residual is not None and act != "pre_relu" and not _fusable_residual(input, residual):
        output = _batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps, None, slope,
                             None, num_batches_tracked=num_batches_tracked)
        return _UNFUSED_ACTS[act](output + residual, slope)
    try:
        _check_batch_norm(input, running_mean, running_var, weight, bias, training, eps)
    except Exception:
        if num_batches_tracked is not None:
            num_batches_tracked.add_(1)
        raise
    if input.numel() == 0:
        if num_batches_tracked is not None:
            num_batches_tracked.add_(1)
        # torch.batch_norm's own shortcut, taken before it looks at any
        # statistic: the (empty) input, scaled and shifted by the first weight
        # and bias, so the graph still reaches them.
        output = F.relu(input) if act == "pre_relu" else input.clone()
        if weight is not None:
            output = output * weight[0]
        if bias is not None:
            output = output + bias[0]
        if act is not None and act != "pre_relu":
            output = _UNFUSED_ACTS[act](output if residual is None else output + residual, slope)
        return output

    if training:
        # The op also updates the running statistics and the step count, when given.
        if act is None:
            return _ops.forward(input, weight, bias, eps, running_mean, running_var, momentum, num_batches_tracked)[0]
        memory_efficient = _memory_saving_possible(act, slope, memory_efficient)
        return _ops.forward_act(input, weight, bias, residual, eps, act, slope, memory_efficient, running_mean,
                                running_var, momentum, num_batches_tracked)[0]

    if act is None:
        return _ops.elemt_running(input, weight, bias, running_mean, running_var, eps)
    stats = ops.stats_dtype(input.dtype)
    mean, invstd = running_mean.to(stats), (running_var.to(stats) + eps).rsqrt_()
    return _ops.elemt_act(input, weight, bias, mean, invstd, residual, act, slope)


def _check_batch_norm(input, running_mean, running_var, weight, bias, training, eps) -> None:
    """The checks torch.nn.functional.batch_norm and torch.batch_norm make
    before computing anything, in their order and with their exception types
    (the input's own dims are the kernels' check)."""
    if training:
        _verify_batch_size(input.size())
    if training and eps <= 0.0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    elif eps < 0.0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")
    if input.numel() == 0:
        # The empty-input shortcut reads the first weight and bias element
        # (torch's IndexError for an empty one, with the reason), and nothing else.
        for t in (weight, bias):
            if t is not None and t.numel() == 0:
                raise IndexError(f"bnfast: input has 0 channels (size of dim 1); batch norm needs at least one, "
                                 f"got size {list(input.shape)}")
        return
    _check_running_stats(input, running_mean, running_var, training)
    if training and input.dim() == 1 and running_mean is None:
        # torch.batch_norm reads the channel count, size(1), first here.
        raise IndexError(f"batch_norm: input of shape {tuple(input.shape)} has no channel dimension "
                         "(dimension 1 out of range); expected (N, C, *)")


def _output_invertible(act: str, slope: float) -> bool:
    """Whether act(z) determines z (csrc/autograd/fused_autograd.cpp keeps the
    same rule, and also needs every weight element finite, non-zero and not
    extreme)."""
    return act in ("identity", "pre_relu") or (act == "leaky_relu" and slope > 0)


_LIBRARY_DIRS = tuple(os.path.dirname(path) + os.sep for path in (torch.__file__, __file__))


def _warn_at_user_code(message: str) -> None:
    """warnings.warn attributed to the first caller outside bnfast and torch
    (the user's functional or module call, not Module.__call__), so it is
    shown once per place in the user's code (Python 3.12's
    skip_file_prefixes, by hand). Not under torch.compile, which cannot trace
    a warning (fullgraph=True would fail): an eager call shows it."""
    if torch.compiler.is_compiling():
        return
    frame, stacklevel = sys._getframe(1), 2
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_LIBRARY_DIRS):
        frame, stacklevel = frame.f_back, stacklevel + 1
    warnings.warn(message, stacklevel=stacklevel)


def _memory_saving_possible(act: str, slope: float, memory_efficient: bool) -> bool:
    """memory_efficient, unless act is not invertible: then False, with a
    warning at the user's call."""
    if memory_efficient and not _output_invertible(act, slope):
        _warn_at_user_code(f"bnfast: memory_efficient=True keeps the batch norm input for backward (saves no "
                           f"memory) with act={act!r}: it is not invertible, so the output does not determine "
                           f"the normalized input (identity, pre_relu and leaky_relu with a positive "
                           f"negative_slope are)")
        return False
    return memory_efficient


def _check_running_stats(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                         training: bool) -> None:
    """torch.batch_norm's checks of the running statistics, in its order and
    with its exception types (the input's own dims are the kernels' check)."""
    for name, t in (("running_mean", running_mean), ("running_var", running_var)):
        if t is not None:
            if input.dim() >= 2 and t.numel() != input.size(1):
                raise RuntimeError(f"{name} should contain {input.size(1)} elements not {t.numel()}")
        elif not training:
            raise RuntimeError(f"{name} must be defined in evaluation mode")
    if (running_mean is None) != (running_var is None):
        raise _one_running_stat_error()(
            "running_mean and running_var must either both be None or neither be None")


@functools.lru_cache(maxsize=None)
def _one_running_stat_error() -> type:
    """The exception type torch.batch_norm raises for a running_mean without
    running_var (or the reverse) in training: ValueError in recent torch,
    RuntimeError in older releases. Asked of torch itself, once."""
    try:
        torch.batch_norm(torch.zeros(2, 1), None, None, torch.zeros(1), None, True, 0.1, 1e-5, False)
    except Exception as error:  # noqa: BLE001 - whichever type torch raises is the answer
        return type(error)
    return RuntimeError
