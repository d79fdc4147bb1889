"""bnfast.SyncBatchNorm: batch normalization over the union of every rank's
batch (torch.nn.SyncBatchNorm's semantics), on the bnfast ops, on CPU and CUDA.

Training forward on each of the R ranks of a process group, input (N_r, C, *),
M_r = N_r * prod(*) values per channel on rank r:

    mean_r, invstd_r = stats(x_r)                        [C] each, local
    all_gather [mean_r, invstd_r, M_r]                   one [2C + 1] tensor -> [R, 2C + 1]
    mean, invstd = gather_stats(...)                     [C], over M = sum_r M_r values
    y_r = (x_r - mean) * invstd * weight + bias

Backward, with xmu = x - mean:

    sum_dy_r, sum_dy_xmu_r = backward_reduce(dy_r, x_r)  [C] each, local
    all_reduce (sum) [sum_dy_r, sum_dy_xmu_r]            one [2C] tensor
    dx_r = backward_elemt(dy_r, x_r, ..., sum_dy / M, sum_dy_xmu / M)
    grad_weight_r = sum_dy_xmu_r * invstd,  grad_bias_r = sum_dy_r   (local, as torch:
                                                         DDP reduces parameter gradients)

With a fused activation (SyncBatchNormAct) the same steps run through the
_act forms of the ops (stats_act, elemt_act, backward_reduce_act,
backward_elemt_act): y_r = act(BN(x_r) + residual_r) in one pass, and dz =
dy * act'(z) in place of dy in both backward passes, z = BN(x_r) + residual_r
recomputed there (grad_residual = dz); for act="pre_relu" every pass reads
relu(x_r), and the input gradient is masked where x_r <= 0.

SyncBatchNormAct(memory_efficient=True) keeps the output y_r for backward
instead of the input, where the output determines the normalized input (as
bnfast.batch_norm_act's mode: identity, pre_relu, leaky_relu with a positive
slope, every weight element finite, non-zero and not extreme), and runs the
same two backward passes on
z_r = act^-1(y_r) - residual_r = weight * xhat + bias, with bias and
1 / weight in place of mean and invstd, which makes their
(z - mean) * invstd the normalized input xhat, and weight^2 * invstd in
place of weight, which makes backward_elemt's grad_input the input's.

So one small collective per layer in forward and one in backward. The
collectives are issued from Python on the current stream (DESIGN rule 5); the
kernels never see a process group. Counts stay tensors on the input's
device, so on CUDA nothing waits for the stream: the count is read on the host
only where that is free (CPU tensors, in eager mode) and for the error check
of a global count of 1, which only ranks whose own batch has at most one value
per channel make. The training step also compiles with
torch.compile(fullgraph=True), collectives included.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.nn.modules.batchnorm import _BatchNorm

from bnfast import ops
from bnfast.functional import (_UNFUSED_ACTS, _act_repr, _batch_norm, _check_act, _check_residual,
                               _fusable_residual, _memory_saving_possible, _warn_at_user_code)


def _all_gather_stats(packed: Tensor, group, world_size: int) -> Tensor:
    """[n] on every rank -> [world_size, n], row r from rank r of the group."""
    gathered = packed.new_empty((world_size, packed.numel()))
    # all_gather into views of one buffer: no stack afterwards, and every
    # backend (gloo included) and torch version takes a tensor list.
    dist.all_gather(list(gathered.unbind(0)), packed, group=group)
    return gathered


def _all_reduce_sums(packed: Tensor, group) -> None:
    """In place: packed = its sum over the ranks of the group."""
    dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)


def update_running_stats_on_device(running_mean: Tensor, running_var: Tensor, mean: Tensor, invstd: Tensor,
                                   momentum: float, eps: float, count: Tensor) -> None:
    """bnfast.ops.update_stats_ with the count as a 0-dim tensor (elements per
    channel, on mean's device), in torch ops:

        running_mean = (1 - momentum) * running_mean + momentum * mean
        running_var  = (1 - momentum) * running_var + momentum * var * count / (count - 1)

    with var = 1 / invstd^2 - eps, computed in mean's dtype; count == 0 leaves
    both unchanged, as update_stats_ does.
    """
    var = (invstd.pow(-2) - eps) * count / (count - 1)
    empty = count == 0
    for running, batch in ((running_mean, mean), (running_var, var)):
        updated = torch.lerp(running.to(batch.dtype), batch, momentum)
        running.copy_(torch.where(empty, running.to(batch.dtype), updated))


def _update_running_stats(running_mean: Tensor, running_var: Tensor, mean: Tensor, invstd: Tensor,
                          momentum: float, eps: float, count: Tensor) -> None:
    # update_stats_ takes the count as a host integer. Reading it is free on
    # the CPU in eager mode; on a device it would wait for the stream, and
    # under torch.compile it is data-dependent (no full graph).
    if count.device.type == "cpu" and not torch.compiler.is_compiling():
        ops.update_stats_(running_mean, running_var, mean, invstd, momentum, eps, int(count))
    else:
        update_running_stats_on_device(running_mean, running_var, mean, invstd, momentum, eps, count)


def _weight_invertible(weight: Optional[Tensor], input_dtype: torch.dtype) -> bool:
    """Whether every |weight| lies in [sqrt(smallest normal), sqrt(largest)]
    of the stats dtype (the local mode's range, fused_autograd.cpp
    kept_weight_range): then the output determines the normalized input and
    weight^2 neither flushes to 0 nor overflows; zero, NaN and inf fall
    outside. Reads weight on the host (one sync on a GPU, as the local mode);
    under torch.compile, where it cannot be read, False. Called from
    SyncBatchNorm._forward, it warns at the user's call."""
    if weight is None:
        return True
    if torch.compiler.is_compiling():
        return False
    info = torch.finfo(ops.stats_dtype(input_dtype))
    magnitude = weight.abs()
    if not bool(((magnitude >= info.tiny ** 0.5) & (magnitude <= info.max ** 0.5)).all()):
        _warn_at_user_code("bnfast: memory_efficient=True keeps the batch norm input for backward (saves no "
                           "memory) where the weight has a zero, non-finite or extreme element (|w| outside the "
                           "square root of the stats dtype's range), so the output does not determine the "
                           "normalized input")
        return False
    return True


def _normalized_from_output(grad_output: Tensor, output: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                            residual: Optional[Tensor], invstd: Tensor, act: str,
                            slope: float) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dz, z, bias, 1 / weight, weight^2 * invstd): the plain backward's
    (grad_out, input, mean, invstd, weight) that give the fused layer's
    gradients from its output (the module docstring). z and dz are in the
    stats dtype where they are computed from a half-precision output, whose
    rounding would otherwise grow."""
    stats = invstd.dtype
    w = weight.to(stats) if weight is not None else torch.ones_like(invstd)
    b = bias.to(stats) if bias is not None else torch.zeros_like(invstd)
    if act == "leaky_relu" or residual is not None:
        y, dz = output.to(stats), grad_output.to(stats)
        if act == "leaky_relu":  # y > 0 exactly where z > 0
            dz = torch.ops.aten.leaky_relu_backward(dz, y, slope, False)
        z = F.leaky_relu(y, 1.0 / slope) if act == "leaky_relu" else y - residual  # a new tensor either way
        if act == "leaky_relu" and residual is not None:
            z.sub_(residual)
    else:  # identity, pre_relu: z = y
        z, dz = output, grad_output
    return dz, z, b, w.reciprocal(), w * w * invstd


class _SyncBatchNormFunction(torch.autograd.Function):
    """Training forward and backward of SyncBatchNorm and SyncBatchNormAct
    (see the module docstring).

    forward(input (N, C, *), weight [C] | None, bias [C] | None, running_mean [C] | None,
    running_var [C] | None, eps, momentum, group, world_size, act, slope, residual, memory_efficient)
    -> output (N, C, *).
    act None: plain batch norm, with stats / elemt / backward_reduce /
    backward_elemt; else one of ops.ACTIVATIONS, with their _act forms (which
    recompute z = BN(x) + residual where the activation's derivative needs
    it), and residual None or a tensor like input (not with "pre_relu").
    memory_efficient: keep the output for backward instead of the input (the
    module docstring); the caller checks that the output determines the
    normalized input (act, weight) and that a gradient is wanted.
    Every rank of the group must call it, with the same C, dtype and act; N
    may differ, and may be 0.
    """

    @staticmethod
    def forward(ctx, input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                running_mean: Optional[Tensor], running_var: Optional[Tensor], eps: float,
                momentum: float, group, world_size: int, act: Optional[str] = None, slope: float = 0.01,
                residual: Optional[Tensor] = None, memory_efficient: bool = False) -> Tensor:
        channels = input.size(1)
        local_count = input.numel() // channels
        # NaN for an empty batch; its count 0 drops it below.
        mean, invstd = ops.stats(input, eps) if act is None else ops.stats_act(input, eps, act)
        packed = torch.cat([mean, invstd, mean.new_full((1,), local_count)])
        gathered = _all_gather_stats(packed, group, world_size)
        counts = gathered[:, 2 * channels]
        mean, invstd = ops.gather_stats(gathered[:, :channels], gathered[:, channels:2 * channels], counts, eps)
        count = counts.sum()
        # The global count is 1 only if every rank's is at most 1, so every rank
        # that could see it checks it (all raise together) and no other waits.
        if local_count <= 1 and int(count) == 1:
            raise ValueError("Expected more than 1 value per channel when training, got input size "
                             f"{tuple(input.shape)} on this rank and 1 value per channel over the process group")
        if running_mean is not None and running_var is not None:
            _update_running_stats(running_mean, running_var, mean, invstd, momentum, eps, count)
        if act is None:
            output = ops.elemt(input, weight, bias, mean, invstd)
        else:
            output = ops.elemt_act(input, weight, bias, mean, invstd, residual, act, slope)
        ctx.keeps_output = memory_efficient
        if ctx.keeps_output:
            # pre_relu's mask for grad_input: where relu passes the gradient (fused_autograd.cpp's relu_passes).
            relu_passes = input.le(0).logical_not_() if act == "pre_relu" else None
            ctx.save_for_backward(output, weight, bias, residual, mean, invstd, count, relu_passes)
        else:
            ctx.save_for_backward(input, weight, bias, residual, mean, invstd, count, None)
        ctx.group = group
        ctx.act, ctx.slope = act, slope
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.input_dtype = input.dtype
        return output

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: Tensor) -> Tuple[Optional[Tensor], ...]:
        kept, weight, bias, residual, mean, invstd, count, relu_passes = ctx.saved_tensors
        need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
        need_residual = ctx.needs_input_grad[11]
        act, slope = ctx.act, ctx.slope
        grad_input = grad_weight = grad_bias = grad_residual = None
        input, elemt_weight = kept, weight
        if ctx.keeps_output:  # kept is the output: the plain backward over z
            dz, input, mean, invstd, elemt_weight = _normalized_from_output(grad_output, kept, weight, bias,
                                                                            residual, invstd, act, slope)
            grad_output, act = dz, None
        # mean_dy, mean_dy_xmu: the all-reduced sums over the count where the
        # input needs a gradient; zeros otherwise (grad_residual = dz, the one
        # elementwise result then wanted, does not depend on them).
        mean_dy = mean_dy_xmu = torch.zeros_like(mean)
        if need_input or need_weight or need_bias:
            if act is None:
                sum_dy, sum_dy_xmu = ops.backward_reduce(grad_output, input, mean, invstd)
            else:
                sum_dy, sum_dy_xmu = ops.backward_reduce_act(grad_output, input, mean, invstd, weight, bias,
                                                             residual, act, slope)
            if need_weight:
                # An empty batch contributes 0 (its invstd is NaN when every rank's batch is empty).
                grad_weight = (sum_dy_xmu * invstd if input.numel() else sum_dy_xmu).to(weight.dtype)
            if need_bias:
                grad_bias = sum_dy.to(ctx.bias_dtype)
            if need_input:  # the same on every rank, so all of them reduce or none does
                sums = torch.cat([sum_dy, sum_dy_xmu])
                _all_reduce_sums(sums, ctx.group)
                mean_dy, mean_dy_xmu = (sums / count).chunk(2)
        if act is None:
            if need_input:
                grad_input = ops.backward_elemt(grad_output, input, mean, invstd, elemt_weight, mean_dy,
                                                mean_dy_xmu)
            if ctx.keeps_output:
                if grad_input is not None:
                    if relu_passes is not None:
                        grad_input = torch.ops.aten.threshold_backward(grad_input, relu_passes.view(torch.uint8), 0)
                    grad_input = grad_input.to(ctx.input_dtype)
                grad_residual = grad_output.to(ctx.input_dtype) if need_residual else None
        elif need_input or need_residual:
            grad_input, grad_residual = ops.backward_elemt_act(grad_output, input, mean, invstd, weight, bias,
                                                               residual, act, slope, mean_dy, mean_dy_xmu)
            grad_input = grad_input if need_input else None
            grad_residual = grad_residual if need_residual else None
        return (grad_input, grad_weight, grad_bias, None, None, None, None, None, None, None, None, grad_residual,
                None)


class SyncBatchNorm(_BatchNorm):
    __doc__ = (
        "bnfast drop-in for torch.nn.SyncBatchNorm, input (N, C, *), on CPU (gloo) as\n"
        "well as CUDA (NCCL). Same constructor, attributes, state_dict, errors, eval\n"
        "behaviour and convert_sync_batchnorm; statistics are synchronized over\n"
        "process_group (default: the world) in training, and a group of one rank,\n"
        "or no initialized process group, runs the local bnfast.batch_norm.\n\n"
        "Unlike torch.nn.SyncBatchNorm it accepts CPU input with a process group\n"
        "initialized. It subclasses torch's _BatchNorm (as torch.nn.SyncBatchNorm\n"
        "does) rather than torch.nn.SyncBatchNorm itself, because\n"
        "DistributedDataParallel refuses a CPU module holding any instance of\n"
        "torch.nn.SyncBatchNorm (ValueError: SyncBatchNorm layers only work with GPU\n"
        "modules).\n\n"
    ) + (torch.nn.SyncBatchNorm.__doc__ or "")

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True, process_group=None,
                 device=None, dtype=None, **kwargs) -> None:
        # kwargs: the keyword-only arguments of torch's _BatchNorm (bias=, on
        # the torch versions that have it).
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device,
                         dtype=dtype, **kwargs)
        self.process_group = process_group

    # torch's own checks, so the errors are torch's: ValueError for input of
    # fewer than 2 dimensions and for 0 channels.
    _check_input_dim = torch.nn.SyncBatchNorm._check_input_dim
    _check_non_zero_input_channels = torch.nn.SyncBatchNorm._check_non_zero_input_channels

    def _sync_group(self):
        """(group, world size) to synchronize over; world size 1 means local."""
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return None, 1
        group = dist.group.WORLD if self.process_group is None else self.process_group
        # -1 on a rank outside the group: local, as in torch.
        return group, dist.get_world_size(group)

    # The fused activation (SyncBatchNormAct); None for plain batch norm.
    act: Optional[str] = None
    negative_slope: float = 0.01
    memory_efficient: bool = False

    def forward(self, input: Tensor) -> Tensor:
        return self._forward(input, None)

    def _forward(self, input: Tensor, residual: Optional[Tensor]) -> Tensor:
        # torch.nn.SyncBatchNorm.forward's control flow.
        self._check_input_dim(input)
        self._check_non_zero_input_channels(input)
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average
                momentum = 1.0 / float(self.num_batches_tracked)
        # Batch statistics in training, and in eval when there are no buffers;
        # buffers are passed only when they are updated (training and tracked)
        # or used (eval).
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        track = not self.training or self.track_running_stats
        running_mean = self.running_mean if track else None
        running_var = self.running_var if track else None
        group, world_size = self._sync_group()
        if world_size <= 1:
            return _batch_norm(input, running_mean, running_var, self.weight, self.bias, bn_training, momentum,
                               self.eps, self.act, self.negative_slope, residual, self.memory_efficient)
        act, unfused_residual = self.act, None
        if residual is not None and not _fusable_residual(input, residual):  # added after the synchronized BN
            act, unfused_residual, residual = None, residual, None
        # The mode only where a gradient is wanted (as the local mode): no
        # weight read, mask or warning for a no_grad pass. Cheapest tests first.
        memory_efficient = (act is not None and self.memory_efficient and torch.is_grad_enabled() and
                            any(t is not None and t.requires_grad for t in (input, self.weight, self.bias, residual))
                            and _memory_saving_possible(act, self.negative_slope, True) and
                            _weight_invertible(self.weight, input.dtype))
        output = _SyncBatchNormFunction.apply(input, self.weight, self.bias, running_mean, running_var, self.eps,
                                              momentum, group, world_size, act, self.negative_slope, residual,
                                              memory_efficient)
        if unfused_residual is not None:
            output = _UNFUSED_ACTS[self.act](output + unfused_residual, self.negative_slope)
        return output

    @classmethod
    def convert_sync_batchnorm(cls, module: torch.nn.Module, process_group=None) -> torch.nn.Module:
        """torch.nn.SyncBatchNorm.convert_sync_batchnorm, to bnfast's SyncBatchNorm:
        every BatchNorm*D (torch's or bnfast's) and SyncBatchNorm in module
        becomes a bnfast.SyncBatchNorm over process_group (default: the world),
        and every BatchNormAct*d (fused by bnfast.convert or built by hand) a
        bnfast.SyncBatchNormAct with the same activation; each shares the
        layer's parameters, buffers, hooks and other attributes (qconfig...),
        memory_efficient included. Returns module, or a new module if module
        is itself a batch-norm layer."""
        from bnfast.convert import to_sync

        return to_sync(module, process_group)


class SyncBatchNormAct(SyncBatchNorm):
    """bnfast.SyncBatchNorm fused with an activation, as bnfast.BatchNormAct2d
    (and timm's SyncBatchNormAct) is BatchNorm fused with one:
    forward(x, residual=None) = act(SyncBN(x) + residual), or SyncBN(relu(x))
    for act="pre_relu", with the statistics synchronized as SyncBatchNorm's and
    the results of the unfused layers. The state_dict keys are
    SyncBatchNorm's. memory_efficient=True: backward keeps the output instead
    of the input where that is exact, as BatchNormAct2d's mode."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True, process_group=None,
                 act: str = "relu", negative_slope: float = 0.01, memory_efficient: bool = False, device=None,
                 dtype=None, **kwargs) -> None:
        _check_act(act)
        super().__init__(num_features, eps, momentum, affine, track_running_stats, process_group, device=device,
                         dtype=dtype, **kwargs)
        self.act = act
        self.negative_slope = negative_slope
        self.memory_efficient = memory_efficient

    def forward(self, input: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        _check_residual(self.act, residual)
        return self._forward(input, residual)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}{_act_repr(self.act, self.negative_slope, self.memory_efficient)}"
