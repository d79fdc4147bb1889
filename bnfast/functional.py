"""bnfast.batch_norm: torch.nn.functional.batch_norm on bnfast's kernels."""

from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor
from torch.overrides import handle_torch_function, has_torch_function_variadic

from bnfast import ops


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
    if training:
        _verify_batch_size(input.size())
    if training and eps <= 0.0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    elif eps < 0.0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")
    if input.numel() == 0:
        # torch.batch_norm's own shortcut, taken before it looks at any
        # statistic: the (empty) input, scaled and shifted by the first weight
        # and bias, so the graph still reaches them. (torch's IndexError for an
        # empty weight or bias, with the reason.)
        for t in (weight, bias):
            if t is not None and t.numel() == 0:
                raise IndexError(f"bnfast: input has 0 channels (size of dim 1); batch norm needs at least one, "
                                 f"got size {list(input.shape)}")
        output = input.clone()
        if weight is not None:
            output = output * weight[0]
        if bias is not None:
            output = output + bias[0]
        return output
    _check_running_stats(input, running_mean, running_var, training)

    if training:
        if input.dim() == 1 and running_mean is None:
            # torch.batch_norm reads the channel count, size(1), first here.
            raise IndexError(f"batch_norm: input of shape {tuple(input.shape)} has no channel dimension "
                             "(dimension 1 out of range); expected (N, C, *)")
        output, mean, invstd = ops.forward(input, weight, bias, eps)
        if running_mean is not None:
            with torch.no_grad():  # statistics, not part of the graph
                ops.update_stats_(running_mean, running_var, mean, invstd, momentum, eps,
                                  input.numel() // input.size(1))
        return output

    stats = ops.stats_dtype(input.dtype)
    mean = running_mean.to(stats)
    invstd = torch.rsqrt(running_var.to(stats) + eps)
    return ops.elemt(input, weight, bias, mean, invstd)


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
