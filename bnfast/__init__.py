"""bnfast: fast, exact batch normalization for PyTorch.

Importing the package loads the compiled library (bnfast._C), which registers
the ops under torch.ops.bnfast.
"""

import torch  # noqa: F401  (loads libtorch, which bnfast._C links against)

from bnfast import _C  # noqa: F401  (registers torch.ops.bnfast.*)
from bnfast import ops  # noqa: F401  (fake kernels)
from bnfast import _vmap  # noqa: F401  (batching rules)
from bnfast.convert import convert, revert
from bnfast.functional import batch_norm, batch_norm_act
from bnfast.modules import BatchNorm1d, BatchNorm2d, BatchNorm3d, BatchNormAct1d, BatchNormAct2d, BatchNormAct3d
from bnfast.sync_batchnorm import SyncBatchNorm, SyncBatchNormAct

__version__ = "0.1.0"
__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "BatchNormAct1d", "BatchNormAct2d", "BatchNormAct3d",
           "SyncBatchNorm", "SyncBatchNormAct", "batch_norm", "batch_norm_act", "convert", "revert", "empty_cache"]


def empty_cache() -> None:
    """Free the idle buffers of bnfast's CPU output cache (large y / grad_input
    buffers kept for reuse, at most BNFAST_CPU_CACHE_MB MiB; see README)."""
    torch.ops.bnfast.empty_cpu_cache()
