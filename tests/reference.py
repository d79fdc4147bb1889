"""An independent float64 reference for batch normalization, written from the
formulas (not from bnfast's composite ops), plus the error-comparison rule the
numerics tests share.

Shapes: x is (N, C, *); per-channel tensors are [C]; M = N * prod(*) is the
number of elements per channel. Everything is computed in float64 with plain
two-pass formulas (mean first, then the mean of squared deviations), which is
exact enough to serve as "the truth" for float32/float16/bfloat16 kernels and a
tight cross-check for float64 ones.

    mean[c]   = sum(x[:, c]) / M
    var[c]    = sum((x[:, c] - mean[c])^2) / M                (biased)
    invstd[c] = 1 / sqrt(var[c] + eps)
    y         = (x - mean) * invstd * w + b
    running   = (1 - momentum) * running + momentum * stat,   stat = mean or var * M / (M - 1)

Training backward, with xhat = (x - mean) * invstd:
    dx = w * invstd * (dy - mean(dy) - xhat * mean(dy * xhat))
    dw = sum(dy * xhat),  db = sum(dy)
Eval backward (statistics are constants):
    dx = dy * w * invstd,  dw = sum(dy * xhat),  db = sum(dy)
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

import os

F64 = torch.float64
_REPORT = bool(os.environ.get("BNFAST_TEST_REPORT_ULPS"))


def _d(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.detach().to(device="cpu", dtype=F64)


def reduce_dims(x: Tensor) -> list:
    return [0] + list(range(2, x.dim()))


def channel_sum(t: Tensor) -> Tensor:
    """Per-channel sums [C] of t (N, C, *), each over one contiguous row of a
    [C, M] copy: torch sums a contiguous row with its cascade, within about an
    ulp, while summing over dims (0, 2, ...) in place can drift by ~10 ulps on
    long channels, too coarse a truth for float64 kernels."""
    return t.transpose(0, 1).reshape(t.size(1), -1).sum(1)


def bcast(v: Tensor, x: Tensor) -> Tensor:
    """[C] -> [1, C, 1, ...]."""
    return v.reshape([1, -1] + [1] * (x.dim() - 2))


def count(x: Tensor) -> int:
    return x.numel() // x.size(1) if x.size(1) else 0


def stats(x: Tensor, eps: float) -> Tuple[Tensor, Tensor, Tensor]:
    """(mean, biased var, invstd), float64 [C]. Empty batch: NaN, as torch's CUDA stats."""
    x = _d(x)
    m = count(x)
    if m == 0:
        nan = torch.full((x.size(1),), float("nan"), dtype=F64)
        return nan, nan.clone(), nan.clone()
    mean = channel_sum(x) / m
    var = channel_sum((x - bcast(mean, x)) ** 2) / m
    return mean, var, 1.0 / torch.sqrt(var + eps)


def elemt(x: Tensor, w: Optional[Tensor], b: Optional[Tensor], mean: Tensor, invstd: Tensor) -> Tensor:
    x, w, b, mean, invstd = map(_d, (x, w, b, mean, invstd))
    y = (x - bcast(mean, x)) * bcast(invstd, x)
    if w is not None:
        y = y * bcast(w, x)
    if b is not None:
        y = y + bcast(b, x)
    return y


def update_stats(running_mean: Tensor, running_var: Tensor, mean: Tensor, var: Tensor,
                 momentum: float, n: int) -> Tuple[Tensor, Tensor]:
    """New (running_mean, running_var) in float64; var is the biased batch variance."""
    rm, rv, mean, var = map(_d, (running_mean, running_var, mean, var))
    if n == 0:
        return rm, rv
    unbiased = var * n / (n - 1) if n > 1 else torch.full_like(var, float("nan"))
    return (1 - momentum) * rm + momentum * mean, (1 - momentum) * rv + momentum * unbiased


def backward_reduce(dy: Tensor, x: Tensor, mean: Tensor) -> Tuple[Tensor, Tensor]:
    """(sum_dy, sum_dy_xmu) in float64."""
    dy, x, mean = map(_d, (dy, x, mean))
    return channel_sum(dy), channel_sum(dy * (x - bcast(mean, x)))


def backward_elemt(dy: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, w: Optional[Tensor],
                   mean_dy: Tensor, mean_dy_xmu: Tensor) -> Tensor:
    dy, x, mean, invstd, w, mean_dy, mean_dy_xmu = map(_d, (dy, x, mean, invstd, w, mean_dy, mean_dy_xmu))
    scale = invstd if w is None else invstd * w
    return (dy - bcast(mean_dy, x) - (x - bcast(mean, x)) * bcast(invstd ** 2 * mean_dy_xmu, x)) * bcast(scale, x)


def batch_norm_train(x: Tensor, w: Optional[Tensor], b: Optional[Tensor], eps: float):
    """(y, mean, var, invstd) of a training forward, float64."""
    mean, var, invstd = stats(x, eps)
    return elemt(x, w, b, mean, invstd), mean, var, invstd


def batch_norm_eval(x: Tensor, running_mean: Tensor, running_var: Tensor, w: Optional[Tensor],
                    b: Optional[Tensor], eps: float) -> Tensor:
    rv = _d(running_var)
    return elemt(x, w, b, _d(running_mean), 1.0 / torch.sqrt(rv + eps))


def batch_norm_train_backward(dy: Tensor, x: Tensor, w: Optional[Tensor], eps: float):
    """(dx, dw, db) of the training forward, float64 (dw/db for w = 1, b = 0 when absent)."""
    dy, x, w = map(_d, (dy, x, w))
    m = count(x)
    if m == 0:
        zeros = torch.zeros(x.size(1), dtype=F64)
        return torch.zeros_like(x), zeros, zeros.clone()
    mean, _, invstd = stats(x, eps)
    xhat = (x - bcast(mean, x)) * bcast(invstd, x)
    scale = invstd if w is None else invstd * w
    sum_dy, sum_dy_xhat = channel_sum(dy), channel_sum(dy * xhat)
    dx = bcast(scale, x) * (dy - bcast(sum_dy / m, x) - xhat * bcast(sum_dy_xhat / m, x))
    return dx, sum_dy_xhat, sum_dy


def batch_norm_eval_backward(dy: Tensor, x: Tensor, running_mean: Tensor, running_var: Tensor,
                             w: Optional[Tensor], eps: float):
    dy, x, rm, rv, w = map(_d, (dy, x, running_mean, running_var, w))
    invstd = 1.0 / torch.sqrt(rv + eps)
    scale = invstd if w is None else invstd * w
    xhat = (x - bcast(rm, x)) * bcast(invstd, x)
    return dy * bcast(scale, x), channel_sum(dy * xhat), channel_sum(dy)


# ----------------------------------------------------------------- comparison

def max_err(actual: Tensor, truth: Tensor) -> float:
    """Max |actual - truth| over elements, NaN-aware: positions must agree on NaN."""
    a, t = _d(actual), _d(truth)
    assert a.shape == t.shape, (a.shape, t.shape)
    if a.numel() == 0:
        return 0.0
    if torch.isfinite(t).all():  # the common case, without masks
        return (a - t).abs().max().item() if torch.isfinite(a).all() else float("inf")
    nan_a, nan_t = torch.isnan(a), torch.isnan(t)
    if not torch.equal(nan_a, nan_t):
        return float("inf")
    ok = ~nan_t
    if not ok.any():
        return 0.0
    inf_t = torch.isinf(t) & ok
    if not torch.equal(a[inf_t], t[inf_t]):
        return float("inf")
    fin = ok & ~inf_t
    if not fin.any():
        return 0.0
    return (a[fin] - t[fin]).abs().max().item()


def ulp_floor(dtype: torch.dtype, scale: float) -> float:
    """One unit in the last place of `dtype` at magnitude `scale`.

    Justification for the floor in the 2x rule: the rule compares bnfast's
    error to twice torch's, which would demand bit-exactness whenever torch
    happens to be exact (error 0, e.g. a float64 result or a tiny tensor that
    rounds the same way). Any kernel that computes in a different (even a
    more accurate) order may differ by the final rounding of the output, which
    is at most one ulp at the output's scale; that is the floor.
    """
    return torch.finfo(dtype).eps * scale


# Floor of the 2x rule, in ulps at the result's scale. fp16/bf16: DESIGN rule 7
# proper, one ulp (see ulp_floor). float32/float64: rule 7 does not bound
# these; torch is often within 1-2 ulps there, so a 2x ratio of two
# rounding-level errors is noise. We allow FULL_PRECISION_FLOOR_ULPS ulps at the
# result's natural scale (the worst case seen over the whole sample set is ~4.3),
# orders of magnitude below any formula, indexing or accumulation-dtype bug.
FULL_PRECISION_FLOOR_ULPS = 8


def floor_ulps(dtype: torch.dtype) -> float:
    return 1.0 if dtype in (torch.float16, torch.bfloat16) else float(FULL_PRECISION_FLOOR_ULPS)


def assert_error_within_torch(name: str, actual: Tensor, torch_result: Tensor, truth: Tensor,
                              dtype: torch.dtype, scale: Optional[float] = None, factor: float = 2.0):
    """DESIGN rule 7: err(bnfast) <= factor * err(torch) + floor_ulps(dtype) ulps at `scale`.

    scale defaults to max |truth|; pass the natural magnitude of a result
    (e.g. |dy| * invstd * |w| for dx) when its truth can be ~0 by cancellation.
    """
    assert actual.shape == truth.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(truth.shape)}"
    if truth.numel() == 0:
        return
    e_bn = max_err(actual, truth)
    e_th = max_err(torch_result, truth)
    if scale is None:
        t = _d(truth)
        t = t[torch.isfinite(t)]
        scale = t.abs().max().item() if t.numel() else 1.0
    floor = floor_ulps(dtype) * ulp_floor(dtype, max(scale, torch.finfo(dtype).tiny))
    bound = factor * e_th + floor
    if _REPORT:
        print(f"ULPREPORT {name} {dtype} need_ulps={(e_bn - factor * e_th) / ulp_floor(dtype, max(scale, 1e-300)):.2f} "
              f"ratio={e_bn / max(e_th, 1e-300):.2f}")
    assert e_bn <= bound, (
        f"{name}: bnfast max error {e_bn:.3e} vs float64 truth exceeds {factor} x torch's "
        f"{e_th:.3e} + floor {floor:.3e} (dtype {dtype})"
    )
