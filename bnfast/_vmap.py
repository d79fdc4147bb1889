"""Batching rules (torch.vmap) of the bnfast ops.

vmap over an op with batch size B is the op over B independent problems of C
channels, i.e. one problem of B * C channels: an input (N, C, *) batched to
(B, N, C, *) is run as (N, B * C, *), and per-channel tensors [C] as [B * C]
(batched ones flattened, unbatched ones repeated B times). Outputs are
unflattened back, batched at dim 0. One kernel launch for the whole batch,
no per-sample loop.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

_ops = torch.ops.bnfast


def _input(t: Tensor, bdim: Optional[int], batch: int) -> Tensor:
    """(B, N, C, *) batched at bdim, or (N, C, *) unbatched -> (N, B * C, *)."""
    if bdim is None:
        return t.unsqueeze(1).expand(t.size(0), batch, *t.shape[1:]).flatten(1, 2)
    return t.movedim(bdim, 1).flatten(1, 2)


def _channels(t: Optional[Tensor], bdim: Optional[int], batch: int) -> Optional[Tensor]:
    """[C] -> [B * C] (repeated), or batched (B, C) at bdim -> [B * C]."""
    if t is None:
        return None
    if bdim is None:
        return t.repeat(batch)
    return t.movedim(bdim, 0).flatten()


def _rows(t: Tensor, bdim: Optional[int], batch: int) -> Tensor:
    """[R, C] (gather_stats' per-replica statistics) -> [R, B * C]."""
    if bdim is None:
        return t.repeat(1, batch)
    return t.movedim(bdim, 1).flatten(1, 2)


def _unbatch_input(y: Tensor, batch: int) -> Tensor:
    """(N, B * C, *) -> (B, N, C, *)."""
    return y.unflatten(1, (batch, -1)).movedim(1, 0)


def _unbatch_channels(t: Tensor, batch: int) -> Tensor:
    """[B * C] -> (B, C)."""
    return t.view(batch, -1)


@torch.library.register_vmap("bnfast::stats")
def _stats_vmap(info, in_dims, input, eps):
    mean, invstd = _ops.stats(_input(input, in_dims[0], info.batch_size), eps)
    return (_unbatch_channels(mean, info.batch_size), _unbatch_channels(invstd, info.batch_size)), (0, 0)


def _update_running_stats(running_mean: Optional[Tensor], running_var: Optional[Tensor], stat_dims, mean: Tensor,
                          invstd: Tensor, momentum: float, eps: float, count: int) -> None:
    """update_stats_ of B buffers each (batched at stat_dims) from [B * C]
    statistics; nothing without buffers."""
    if (running_mean is None) != (running_var is None):
        raise ValueError("bnfast: running_mean and running_var must either both be None or neither be None")
    if running_mean is None:
        return
    if stat_dims[0] is None or stat_dims[1] is None:
        # As torch's batch_norm under vmap: one running buffer cannot take B updates.
        raise RuntimeError(
            "bnfast: batch norm got a batched tensor as input while the running_mean or running_var, which "
            "will be updated in place, were not batched. Batch them too (one buffer per vmapped sample), or "
            "use track_running_stats=False / eval mode.")
    buffers = [running_mean.movedim(stat_dims[0], 0), running_var.movedim(stat_dims[1], 0)]  # (B, C) views
    # Flat [B * C] views update the buffers in place; a strided buffer is
    # updated through a flat copy and written back.
    flat = [t.view(-1) if t.is_contiguous() else t.flatten() for t in buffers]
    _ops.update_stats_(flat[0], flat[1], mean, invstd, momentum, eps, count)
    for buffer, updated in zip(buffers, flat):
        if not buffer.is_contiguous():
            buffer.copy_(updated.view(buffer.shape))


def _count_step(num_batches_tracked: Optional[Tensor]) -> None:
    """The step count of a vmapped training forward, first, as the modules
    count it: one step for the whole batch when unbatched, one per sample's
    counter when batched."""
    if num_batches_tracked is not None:
        num_batches_tracked.add_(1)


def _count(x: Tensor) -> int:
    """Elements per channel of (N, B * C, *): the statistics' count."""
    return x.numel() // x.size(1) if x.size(1) else 0


@torch.library.register_vmap("bnfast::forward")
def _forward_vmap(info, in_dims, input, weight, bias, eps, running_mean=None, running_var=None, momentum=0.1,
                  num_batches_tracked=None):
    b = info.batch_size
    _count_step(num_batches_tracked)
    x = _input(input, in_dims[0], b)
    y, mean, invstd = _ops.forward(x, _channels(weight, in_dims[1], b), _channels(bias, in_dims[2], b), eps)
    _update_running_stats(running_mean, running_var, in_dims[4:6], mean, invstd, momentum, eps, _count(x))
    return (_unbatch_input(y, b), _unbatch_channels(mean, b), _unbatch_channels(invstd, b)), (0, 0, 0)


@torch.library.register_vmap("bnfast::elemt")
def _elemt_vmap(info, in_dims, input, weight, bias, mean, invstd):
    b = info.batch_size
    y = _ops.elemt(_input(input, in_dims[0], b), _channels(weight, in_dims[1], b), _channels(bias, in_dims[2], b),
                   _channels(mean, in_dims[3], b), _channels(invstd, in_dims[4], b))
    return _unbatch_input(y, b), 0


@torch.library.register_vmap("bnfast::elemt_running")
def _elemt_running_vmap(info, in_dims, input, weight, bias, running_mean, running_var, eps):
    b = info.batch_size
    y = _ops.elemt_running(_input(input, in_dims[0], b), _channels(weight, in_dims[1], b),
                           _channels(bias, in_dims[2], b), _channels(running_mean, in_dims[3], b),
                           _channels(running_var, in_dims[4], b), eps)
    return _unbatch_input(y, b), 0


@torch.library.register_vmap("bnfast::backward_reduce")
def _backward_reduce_vmap(info, in_dims, grad_out, input, mean, invstd):
    b = info.batch_size
    sum_dy, sum_dy_xmu = _ops.backward_reduce(_input(grad_out, in_dims[0], b), _input(input, in_dims[1], b),
                                              _channels(mean, in_dims[2], b), _channels(invstd, in_dims[3], b))
    return (_unbatch_channels(sum_dy, b), _unbatch_channels(sum_dy_xmu, b)), (0, 0)


@torch.library.register_vmap("bnfast::backward_elemt")
def _backward_elemt_vmap(info, in_dims, grad_out, input, mean, invstd, weight, mean_dy, mean_dy_xmu):
    b = info.batch_size
    dx = _ops.backward_elemt(_input(grad_out, in_dims[0], b), _input(input, in_dims[1], b),
                             _channels(mean, in_dims[2], b), _channels(invstd, in_dims[3], b),
                             _channels(weight, in_dims[4], b), _channels(mean_dy, in_dims[5], b),
                             _channels(mean_dy_xmu, in_dims[6], b))
    return _unbatch_input(dx, b), 0


@torch.library.register_vmap("bnfast::backward")
def _backward_vmap(info, in_dims, grad_out, input, mean, invstd, weight):
    b = info.batch_size
    dx, dw, db = _ops.backward(_input(grad_out, in_dims[0], b), _input(input, in_dims[1], b),
                               _channels(mean, in_dims[2], b), _channels(invstd, in_dims[3], b),
                               _channels(weight, in_dims[4], b))
    return (_unbatch_input(dx, b), _unbatch_channels(dw, b), _unbatch_channels(db, b)), (0, 0, 0)


@torch.library.register_vmap("bnfast::gather_stats")
def _gather_stats_vmap(info, in_dims, mean, invstd, counts, eps):
    b = info.batch_size
    if in_dims[2] is not None:  # per-sample counts: the merge weights differ, merge sample by sample
        counts = counts.movedim(in_dims[2], 0)
        mean = mean.movedim(in_dims[0], 0) if in_dims[0] is not None else mean.expand(b, *mean.shape)
        invstd = invstd.movedim(in_dims[1], 0) if in_dims[1] is not None else invstd.expand(b, *invstd.shape)
        merged = [_ops.gather_stats(mean[i], invstd[i], counts[i], eps) for i in range(b)]
        return (torch.stack([m for m, _ in merged]), torch.stack([s for _, s in merged])), (0, 0)
    m, s = _ops.gather_stats(_rows(mean, in_dims[0], b), _rows(invstd, in_dims[1], b), counts, eps)
    return (_unbatch_channels(m, b), _unbatch_channels(s, b)), (0, 0)


@torch.library.register_vmap("bnfast::update_stats_")
def _update_stats_vmap(info, in_dims, running_mean, running_var, mean, invstd, momentum, eps, count):
    b = info.batch_size
    _update_running_stats(running_mean, running_var, in_dims[0:2], _channels(mean, in_dims[2], b),
                          _channels(invstd, in_dims[3], b), momentum, eps, count)
    return None, None


# The fused ops (activation, residual) and SyncBatchNormAct's pieces: a
# residual is batched like the input, the activation and slope are shared.

def _residual(t: Optional[Tensor], bdim: Optional[int], batch: int) -> Optional[Tensor]:
    return None if t is None else _input(t, bdim, batch)


@torch.library.register_vmap("bnfast::forward_act")
def _forward_act_vmap(info, in_dims, input, weight, bias, residual, eps, act, slope, memory_efficient=False,
                      running_mean=None, running_var=None, momentum=0.1, num_batches_tracked=None):
    b = info.batch_size
    _count_step(num_batches_tracked)
    x = _input(input, in_dims[0], b)
    y, mean, invstd = _ops.forward_act(x, _channels(weight, in_dims[1], b), _channels(bias, in_dims[2], b),
                                       _residual(residual, in_dims[3], b), eps, act, slope, memory_efficient)
    _update_running_stats(running_mean, running_var, in_dims[8:10], mean, invstd, momentum, eps, _count(x))
    return (_unbatch_input(y, b), _unbatch_channels(mean, b), _unbatch_channels(invstd, b)), (0, 0, 0)


@torch.library.register_vmap("bnfast::elemt_act")
def _elemt_act_vmap(info, in_dims, input, weight, bias, mean, invstd, residual, act, slope):
    b = info.batch_size
    y = _ops.elemt_act(_input(input, in_dims[0], b), _channels(weight, in_dims[1], b), _channels(bias, in_dims[2], b),
                       _channels(mean, in_dims[3], b), _channels(invstd, in_dims[4], b),
                       _residual(residual, in_dims[5], b), act, slope)
    return _unbatch_input(y, b), 0


def _backward_act_args(in_dims, b: int, grad_out, input, mean, invstd, weight, bias, residual) -> tuple:
    """backward_act's leading arguments (its split forms' too), batched."""
    return (_input(grad_out, in_dims[0], b), _input(input, in_dims[1], b), _channels(mean, in_dims[2], b),
            _channels(invstd, in_dims[3], b), _channels(weight, in_dims[4], b), _channels(bias, in_dims[5], b),
            _residual(residual, in_dims[6], b))


def _unbatch_residual_grad(grad_residual: Tensor, batch: int) -> Tensor:
    """grad_residual: like the input, or empty (no residual): batched either way."""
    if grad_residual.dim() == 1:
        return grad_residual.new_empty((batch, 0))
    return _unbatch_input(grad_residual, batch)


@torch.library.register_vmap("bnfast::backward_act")
def _backward_act_vmap(info, in_dims, grad_out, input, mean, invstd, weight, bias, residual, act, slope):
    b = info.batch_size
    dx, dw, db, dr = _ops.backward_act(*_backward_act_args(in_dims, b, grad_out, input, mean, invstd, weight, bias,
                                                          residual), act, slope)
    return ((_unbatch_input(dx, b), _unbatch_channels(dw, b), _unbatch_channels(db, b),
             _unbatch_residual_grad(dr, b)), (0, 0, 0, 0))


@torch.library.register_vmap("bnfast::stats_act")
def _stats_act_vmap(info, in_dims, input, eps, act):
    mean, invstd = _ops.stats_act(_input(input, in_dims[0], info.batch_size), eps, act)
    return (_unbatch_channels(mean, info.batch_size), _unbatch_channels(invstd, info.batch_size)), (0, 0)


@torch.library.register_vmap("bnfast::backward_reduce_act")
def _backward_reduce_act_vmap(info, in_dims, grad_out, input, mean, invstd, weight, bias, residual, act, slope):
    b = info.batch_size
    sum_dy, sum_dy_xmu = _ops.backward_reduce_act(
        *_backward_act_args(in_dims, b, grad_out, input, mean, invstd, weight, bias, residual), act, slope)
    return (_unbatch_channels(sum_dy, b), _unbatch_channels(sum_dy_xmu, b)), (0, 0)


@torch.library.register_vmap("bnfast::backward_elemt_act")
def _backward_elemt_act_vmap(info, in_dims, grad_out, input, mean, invstd, weight, bias, residual, act, slope,
                             mean_dy, mean_dy_xmu):
    b = info.batch_size
    dx, dr = _ops.backward_elemt_act(
        *_backward_act_args(in_dims, b, grad_out, input, mean, invstd, weight, bias, residual), act, slope,
        _channels(mean_dy, in_dims[9], b), _channels(mean_dy_xmu, in_dims[10], b))
    return (_unbatch_input(dx, b), _unbatch_residual_grad(dr, b)), (0, 0)
