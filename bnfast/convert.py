"""Swap torch's BatchNorm layers for bnfast's in a model, and back."""

from __future__ import annotations

import torch

from bnfast.modules import BatchNorm1d, BatchNorm2d, BatchNorm3d
from bnfast.sync_batchnorm import SyncBatchNorm

_TO_BNFAST = {
    torch.nn.BatchNorm1d: BatchNorm1d,
    torch.nn.BatchNorm2d: BatchNorm2d,
    torch.nn.BatchNorm3d: BatchNorm3d,
    torch.nn.SyncBatchNorm: SyncBatchNorm,
}
_TO_TORCH = {v: k for k, v in _TO_BNFAST.items()}


def _swap(module: torch.nn.Module, mapping) -> torch.nn.Module:
    cls = mapping.get(type(module))  # exact types: user subclasses stay
    if cls is not None:
        new = cls.__new__(cls)
        # A new module object sharing the old one's state: the same Parameter
        # and buffer tensors (so optimizers built before the swap still work),
        # requires_grad, training flag, hooks, device and dtype.
        new.__dict__.update(module.__dict__)
        module = new
    for name, child in module.named_children():
        swapped = _swap(child, mapping)
        if swapped is not child:
            module._modules[name] = swapped
    return module


def convert(module: torch.nn.Module) -> torch.nn.Module:
    """Return module with every torch.nn.BatchNorm1d/2d/3d and SyncBatchNorm
    replaced, recursively, by bnfast's drop-in (sharing parameters and
    buffers). The module is changed
    in place where a child is replaced; a BN module passed itself is returned
    as a new bnfast module."""
    return _swap(module, _TO_BNFAST)


def revert(module: torch.nn.Module) -> torch.nn.Module:
    """Inverse of convert: bnfast BatchNorm layers back to torch's (for export)."""
    return _swap(module, _TO_TORCH)
