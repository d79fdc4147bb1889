"""bnfast.batch_norm: torch.nn.functional.batch_norm on bnfast's kernels."""

from __future__ import annotations

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
    if training and input.dim() == 1 and running_mean is None and running_var is None:
        # torch.batch_norm reads the channel count, size(1), first here.
        raise IndexError(f"batch_norm: input of shape {tuple(input.shape)} has no channel dimension "
                         "(dimension 1 out of range); expected (N, C, *)")
    if training:
        _verify_batch_size(input.size())
    if training and eps <= 0.0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    elif eps < 0.0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")

    if training:
        output, mean, invstd = ops.forward(input, weight, bias, eps)
        if running_mean is not None or running_var is not None:
            if running_mean is None or running_var is None:
                raise RuntimeError("batch_norm: running_mean and running_var must be given together")
            with torch.no_grad():  # statistics, not part of the graph
                ops.update_stats_(running_mean, running_var, mean, invstd, momentum, eps,
                                  input.numel() // input.size(1))
        return output

    if running_mean is None or running_var is None:
        raise RuntimeError("running_mean and running_var must be defined in evaluation mode")
    for name, t in (("running_mean", running_mean), ("running_var", running_var)):
        if input.dim() >= 2 and t.numel() != input.size(1):  # (ndim is the kernel's check)
            raise RuntimeError(f"{name} should contain {input.size(1)} elements not {t.numel()}")
    stats = ops.stats_dtype(input.dtype)
    mean = running_mean.to(stats)
    invstd = torch.rsqrt(running_var.to(stats) + eps)
    return ops.elemt(input, weight, bias, mean, invstd)
