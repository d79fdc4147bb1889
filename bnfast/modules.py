"""bnfast.BatchNorm1d/2d/3d: drop-ins for torch.nn.BatchNorm1d/2d/3d.

Each subclasses its torch counterpart and changes only where the math runs, so
the constructor, defaults, parameters, buffers, state_dict keys (and the
_version migration of old checkpoints), extra_repr, input-dimension errors and
isinstance(m, torch.nn.BatchNorm2d) all stay torch's own.
"""

from __future__ import annotations

import torch
from torch import Tensor

from bnfast.functional import batch_norm


class _BatchNormForward:
    def forward(self, input: Tensor) -> Tensor:
        # Same control flow as torch.nn.modules.batchnorm._BatchNorm.forward.
        self._check_input_dim(input)
        exponential_average_factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average
                exponential_average_factor = 1.0 / float(self.num_batches_tracked)
        # Batch statistics in training, and in eval when there are no buffers.
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        # Buffers are passed only when they are updated (training and tracked)
        # or used (eval).
        track = not self.training or self.track_running_stats
        return batch_norm(
            input,
            self.running_mean if track else None,
            self.running_var if track else None,
            self.weight,
            self.bias,
            bn_training,
            exponential_average_factor,
            self.eps,
        )


class BatchNorm1d(_BatchNormForward, torch.nn.BatchNorm1d):
    __doc__ = "bnfast drop-in for torch.nn.BatchNorm1d: input (N, C) or (N, C, L).\n\n" + (torch.nn.BatchNorm1d.__doc__ or "")


class BatchNorm2d(_BatchNormForward, torch.nn.BatchNorm2d):
    __doc__ = "bnfast drop-in for torch.nn.BatchNorm2d: input (N, C, H, W).\n\n" + (torch.nn.BatchNorm2d.__doc__ or "")


class BatchNorm3d(_BatchNormForward, torch.nn.BatchNorm3d):
    __doc__ = "bnfast drop-in for torch.nn.BatchNorm3d: input (N, C, D, H, W).\n\n" + (torch.nn.BatchNorm3d.__doc__ or "")
