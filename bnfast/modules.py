"""bnfast.BatchNorm1d/2d/3d: drop-ins for torch.nn.BatchNorm1d/2d/3d, and
bnfast.BatchNormAct1d/2d/3d: the same fused with an activation.

Each subclasses its torch counterpart and changes only where the math runs, so
the constructor, defaults, parameters, buffers, state_dict keys (and the
_version migration of old checkpoints), extra_repr, input-dimension errors and
isinstance(m, torch.nn.BatchNorm2d) all stay torch's own.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from bnfast.functional import _act_repr, _batch_norm, _check_act


_MISSING = object()


def _tensor_attribute(module: torch.nn.Module, table: dict, name: str) -> Optional[Tensor]:
    """module.<name> for a parameter or buffer: read from its table, without
    Module.__getattr__'s search (the bulk of a small layer's Python time),
    unless it is not registered there (a parametrization's property, say)."""
    value = table.get(name, _MISSING)
    return getattr(module, name) if value is _MISSING else value


def _op_can_count(num_batches_tracked: Tensor, input: Tensor) -> bool:
    """Whether the forward op can count the step: the counter torch creates
    (one int64 element) on the input's device, outside torch.func transforms.
    Otherwise it is counted here, with torch's module's own add_: a counter
    of another dtype or device (say one a checkpoint without it left on the
    CPU) counts, and a transform refuses a captured counter as it refuses
    torch's."""
    return (num_batches_tracked.dtype == torch.int64 and num_batches_tracked.device == input.device
            and num_batches_tracked.numel() == 1 and not torch._C._are_functorch_transforms_active())


class _BatchNormForward:
    # The fused activation (BatchNormAct*d); None for plain batch norm.
    act: Optional[str] = None
    negative_slope: float = 0.01
    memory_efficient: bool = False

    def forward(self, input: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        # Same control flow as torch.nn.modules.batchnorm._BatchNorm.forward.
        self._check_input_dim(input)
        buffers = self._buffers
        running_mean = _tensor_attribute(self, buffers, "running_mean")
        running_var = _tensor_attribute(self, buffers, "running_var")
        exponential_average_factor = 0.0 if self.momentum is None else self.momentum
        # The step count, incremented by the training forward op (or, where
        # that is not reached, by _batch_norm) unless the cumulative average
        # needs its new value first.
        step_count = None
        if self.training and self.track_running_stats:
            num_batches_tracked = _tensor_attribute(self, buffers, "num_batches_tracked")
            if num_batches_tracked is not None:
                if self.momentum is not None and _op_can_count(num_batches_tracked, input):
                    step_count = num_batches_tracked
                else:
                    num_batches_tracked.add_(1)
                    if self.momentum is None:  # cumulative moving average
                        exponential_average_factor = 1.0 / float(num_batches_tracked)
        # Batch statistics in training, and in eval when there are no buffers.
        bn_training = self.training or (running_mean is None and running_var is None)
        # Buffers are passed only when they are updated (training and tracked)
        # or used (eval).
        track = not self.training or self.track_running_stats
        params = self._parameters
        return _batch_norm(
            input,
            running_mean if track else None,
            running_var if track else None,
            _tensor_attribute(self, params, "weight"),
            _tensor_attribute(self, params, "bias"),
            bn_training,
            exponential_average_factor,
            self.eps,
            self.act,
            self.negative_slope,
            residual,
            self.memory_efficient,
            step_count,
        )


class BatchNorm1d(_BatchNormForward, torch.nn.BatchNorm1d):
    __doc__ = "bnfast drop-in for torch.nn.BatchNorm1d: input (N, C) or (N, C, L).\n\n" + (torch.nn.BatchNorm1d.__doc__ or "")


class BatchNorm2d(_BatchNormForward, torch.nn.BatchNorm2d):
    __doc__ = "bnfast drop-in for torch.nn.BatchNorm2d: input (N, C, H, W).\n\n" + (torch.nn.BatchNorm2d.__doc__ or "")


class BatchNorm3d(_BatchNormForward, torch.nn.BatchNorm3d):
    __doc__ = "bnfast drop-in for torch.nn.BatchNorm3d: input (N, C, D, H, W).\n\n" + (torch.nn.BatchNorm3d.__doc__ or "")


class _BatchNormAct:
    """Batch norm fused with an activation, as timm's BatchNormAct2d names it:
    forward(x, residual=None) = act(BN(x) + residual), or BN(relu(x)) for
    act="pre_relu". The parameters, buffers and state_dict keys are the plain
    BatchNorm*d's, so a checkpoint loads into either. memory_efficient=True:
    backward keeps the output instead of the input where that is exact
    (bnfast.batch_norm_act says when)."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1, affine: bool = True,
                 track_running_stats: bool = True, act: str = "relu", negative_slope: float = 0.01,
                 memory_efficient: bool = False, device=None, dtype=None) -> None:
        _check_act(act)
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.act = act
        self.negative_slope = negative_slope
        self.memory_efficient = memory_efficient

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}{_act_repr(self.act, self.negative_slope, self.memory_efficient)}"


class BatchNormAct1d(_BatchNormAct, BatchNorm1d):
    """bnfast.BatchNorm1d fused with an activation: input (N, C) or (N, C, L)."""


class BatchNormAct2d(_BatchNormAct, BatchNorm2d):
    """bnfast.BatchNorm2d fused with an activation: input (N, C, H, W)."""


class BatchNormAct3d(_BatchNormAct, BatchNorm3d):
    """bnfast.BatchNorm3d fused with an activation: input (N, C, D, H, W)."""
