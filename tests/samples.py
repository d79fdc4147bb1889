"""The one sample generator every numerics / opcheck / gradcheck test draws from.

A Case is (shape, layout, dtype), chosen at collection time (so it can be a
pytest parameter with a readable id) and materialized on a device with
deterministic values. Layouts:

    contiguous        plain row-major (N, C, *)
    channels_last     4-D torch.channels_last
    channels_last_3d  5-D torch.channels_last_3d
    nlc               3-D channels-last: a contiguous (N, L, C) tensor permuted to (N, C, L)
    strided           non-contiguous: every other element of the last dim of a wider tensor

Values are drawn in float64 (x = offset[c] + scale[c] * randn) and then
rounded to the case dtype, so the float64 reference sees exactly the values
the kernel sees.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence, Tuple

import pytest
import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
LOW_PRECISION = (torch.bfloat16, torch.float16)

_DTYPE_NAMES = {torch.float32: "f32", torch.float64: "f64", torch.bfloat16: "bf16", torch.float16: "f16"}

def cpu_constants() -> dict:
    """The CPU path's tuning constants (csrc/cpu/tuning.h, and the fold length of
    csrc/cpu/isa/loops.cpp): the shapes below whose point is a code path are
    derived from the values that decide it, so they keep hitting it."""
    root = Path(__file__).resolve().parents[1] / "csrc" / "cpu"
    text = (root / "tuning.h").read_text() + (root / "isa" / "loops.cpp").read_text()
    values = {}
    for name, value in re.findall(r"constexpr int64_t (k\w+) = ([0-9<\s]+);", text):
        base, _, shift = value.partition("<<")
        values[name] = int(base) << int(shift or 0)
    return values


CPU = cpu_constants()
# rows summed in opmath before a fold into double (channels-last float sums fold every
# kRowsPerFold rows)
_FOLD_ROWS = CPU["kFlushSteps"] // CPU["kChains"]

# Code-path shapes (see csrc/cpu/parallel.h):
# two channels-last row chunks (kReduceGrain / 512 rows each), the second partial
ROW_CHUNKS = (CPU["kReduceGrain"] // 512 * 3 // 2, 512)
# channels-last rows one channel wider than the loops keep in registers on AVX-512
# (kRowVectors float32 vectors): the reductions in two blocks of columns, each over all
# the rows (the tiles of rows of larger inputs: test_numerics.py,
# test_row_block_walks_sum_alike), the affine pass by steps, a one-lane tail
WIDE_ROWS = (3, CPU["kRowVectors"] * 16 + 1, 2, 3)
# channels-last rows of 200 float32 channels (too wide for registers), as many as make the
# forward's affine pass stream more than kCacheResidentBytes as one task (one thread) but
# not as two: rows walked one at a time against several per step
STREAMING_ROWS = (CPU["kCacheResidentBytes"] * 3 // 2 // (200 * 4 * 2) // 4, 200, 2, 2)
# more than kGrain elements per channel: several work chunks per channel in both layouts;
# a channel too long for a block of kMinRunPlanes, so the reductions walk planes in memory
# order
LONG_CHANNELS = (CPU["kGrain"] // (96 * 128) + 1, 1, 96, 128)
# planes of 2 * kShortPlane - 1 values, rows wider than kMaxRowWidth: the channels-first
# plane loops of every pass, with a vector tail
PLANE_LOOPS = (3, CPU["kMaxRowWidth"] // 63 + 1, 7, (2 * CPU["kShortPlane"] - 1) // 7)
# planes of a length that is no multiple of the vector width: the reductions' and the
# backward affine pass's plane loops, the forward's affine pass as one run of vectors
# (planes ending mid-vector); the reductions in runs of planes of at least kMinRunPlanes
# channels
FLAT_PLANES = (4, 6, 7, 5)
# short planes longer than a vector but no multiple of it (rows of 120 values): every pass by rows
ODD_SHORT_PLANES = (4, 6, 4, 5)
# short planes read as [N][C * S] rows in 3 row chunks (stats; elemt takes these planes of
# whole vectors by plane); the backward's passes fused in channel blocks, a partial last one
# (and the float64 forward's: 1 MiB)
SHORT_PLANES = (2 * (CPU["kReduceGrain"] // (64 * 16)) + 2, 64, 4, 4)
# short planes of float32 just filling kCacheResidentBytes: the training forward's passes
# fused; row chunks of ceil(kReduceGrain / 304) rows, no whole number of folds
FUSED_FORWARD = (CPU["kCacheResidentBytes"] // (19 * 16 * 4) + 1, 19, 4, 4)
# short planes with rows wider than kMaxRowWidth: plane loops instead
WIDE_SHORT_PLANES = (2, CPU["kMaxRowWidth"] // 8 + 52, 2, 4)
# short planes whose blocks of whole channels stay under kMinBlockRowBytes per row: the
# two-pass fallback of the fused blocks; one row chunk of 64 folds (float64 accuracy)
FUSED_FALLBACK = (64 * _FOLD_ROWS + 4, 3, 2, 2)
# as above, ending in a partial fold
PARTIAL_FOLD = (17 * _FOLD_ROWS + 12, 3, 1, 2)
# vector-aligned: planes of 64 and 32 channels, multiples of every vector width
ALIGNED = (4, 32, 8, 8)
# planes of whole vectors (float32) and batches of kMinBandRows: the reductions by bands of
# whole channels, in every dtype but float64
BANDS = (CPU["kMinBandRows"], 5, 8, 8)
# as above, one channel: bands of a single plane
NARROW_BANDS = (CPU["kMinBandRows"], 1, 4, 8)
# channels-last rows wider than kAffineBlockBytes of float32 coefficients: the affine pass
# in three blocks of columns (float64: five), the last one partial and with a vector tail
ROW_BLOCKS = (9, 2 * CPU["kAffineBlockBytes"] // 4 + 5)
# more channels than a channels-first reduction task has planes (kReduceGrain values):
# each task sums a subset of the channels, the second one wrapping past the last channel
MANY_CHANNELS = (2, CPU["kReduceGrain"] // 64 + 100, 8, 8)

# (shape, why it is here)
SHAPES: Tuple[Tuple[Tuple[int, ...], str], ...] = (
    (ROW_CHUNKS, "BatchNorm1d (N, C), wide: two row chunks of the channels-last path, many lanes"),
    ((16, 5), "BatchNorm1d (N, C), small"),
    (ROW_BLOCKS, "BatchNorm1d (N, C), rows in several blocks of columns, the last partial"),
    ((4, 5, 9), "BatchNorm1d (N, C, L)"),
    (FLAT_PLANES, "BatchNorm2d; planes of 35: reductions by plane, the forward's affine pass as one run"),
    (ODD_SHORT_PLANES, "short planes of 20: every pass by rows"),
    ((2, 3, 4, 5, 3), "BatchNorm3d"),
    ((5, 1, 4, 4), "C = 1"),
    ((2, 3), "N * HW = 2, 2-D"),
    ((1, 3, 2, 1), "N * HW = 2, 4-D with a size-1 dim"),
    ((7, 13), "sizes not a multiple of 8 or 16"),
    ((3, 13, 7, 5), "odd sizes, 4-D"),
    ((2, 1000, 3), "large C"),
    (WIDE_ROWS, "channels-last rows one channel too wide for registers: blocks of columns, a tail"),
    (LONG_CHANNELS, "more than kGrain elements per channel: several work chunks per channel"),
    (PLANE_LOOPS, "the channels-first plane loops of every pass, with a vector tail"),
    (SHORT_PLANES, "short planes as rows in 3 chunks; the backward in fused channel blocks, a partial last one"),
    (WIDE_SHORT_PLANES, "short planes too wide to read as rows: plane loops"),
    (ALIGNED, "vector-aligned: planes of 64 and 32 channels, multiples of every vector width"),
    (MANY_CHANNELS, "channels-first reduction tasks of fewer planes than C, one wrapping past the last channel"),
    (BANDS, "the reductions by bands of whole channels (all but float64)"),
    (NARROW_BANDS, "bands of a single plane"),
    (FUSED_FALLBACK, "the fused blocks' two-pass fallback; one row chunk of 64 folds, float64 accuracy"),
    (PARTIAL_FOLD, "long short-plane channels ending in a partial fold"),
    ((0, 3, 4, 4), "empty batch"),
)


def layouts_for(shape: Sequence[int]) -> Tuple[str, ...]:
    dim = len(shape)
    extra = {3: ("nlc",), 4: ("channels_last",), 5: ("channels_last_3d",)}.get(dim, ())
    return ("contiguous",) + extra + ("strided",)


@dataclasses.dataclass(frozen=True)
class Case:
    shape: Tuple[int, ...]
    layout: str
    dtype: torch.dtype

    def __str__(self) -> str:
        return f"{'x'.join(map(str, self.shape))}-{self.layout}-{_DTYPE_NAMES[self.dtype]}"

    @property
    def channels(self) -> int:
        return self.shape[1]

    @property
    def count(self) -> int:
        n = 1
        for i, s in enumerate(self.shape):
            if i != 1:
                n *= s
        return n

    @property
    def empty(self) -> bool:
        return math.prod(self.shape) == 0

    @property
    def low_precision(self) -> bool:
        return self.dtype in LOW_PRECISION

    def _values(self, seed: int, offset_range: float = 2.0) -> Tensor:
        g = torch.Generator().manual_seed(seed)
        c = self.channels
        offset = (torch.rand(c, generator=g, dtype=torch.float64) * 2 - 1) * offset_range
        scale = torch.rand(c, generator=g, dtype=torch.float64) * 1.5 + 0.5
        x = torch.randn(self.shape, generator=g, dtype=torch.float64)
        view = [1, -1] + [1] * (len(self.shape) - 2)
        return x * scale.view(view) + offset.view(view)

    def arrange(self, values: Tensor) -> Tensor:
        """values (any layout, right dtype/device) in this case's memory layout."""
        if self.layout == "contiguous":
            return values.contiguous()
        if self.layout == "channels_last":
            return values.contiguous(memory_format=torch.channels_last)
        if self.layout == "channels_last_3d":
            return values.contiguous(memory_format=torch.channels_last_3d)
        if self.layout == "nlc":
            return values.permute(0, 2, 1).contiguous().permute(0, 2, 1)
        if self.layout == "strided":
            wide = list(values.shape)
            wide[-1] *= 2
            big = torch.full(wide, float("nan"), dtype=values.dtype, device=values.device)
            big[..., ::2] = values
            out = big[..., ::2]
            assert out.numel() == 0 or not out.is_contiguous() or out.size(-1) <= 1
            return out
        raise ValueError(self.layout)

    def input(self, device="cpu", seed: int = 0, requires_grad: bool = False, offset_range: float = 2.0) -> Tensor:
        x = self.arrange(self._values(seed, offset_range).to(dtype=self.dtype, device=device))
        return x.requires_grad_(requires_grad)

    def grad_out(self, device="cpu", seed: int = 1) -> Tensor:
        g = torch.Generator().manual_seed(seed + 1000)
        dy = torch.randn(self.shape, generator=g, dtype=torch.float64) + 0.5
        return self.arrange(dy.to(dtype=self.dtype, device=device))

    def params(self, device="cpu", dtype: Optional[torch.dtype] = None, seed: int = 2):
        """(weight, bias) [C] in dtype (default: the input dtype)."""
        g = torch.Generator().manual_seed(seed)
        c = self.channels
        w = torch.rand(c, generator=g, dtype=torch.float64) * 1.5 + 0.25
        b = torch.randn(c, generator=g, dtype=torch.float64)
        dtype = dtype or self.dtype
        return w.to(dtype=dtype, device=device), b.to(dtype=dtype, device=device)

    def running(self, device="cpu", dtype: Optional[torch.dtype] = None, seed: int = 3):
        """(running_mean, running_var) [C], not the defaults, so updates are visible."""
        g = torch.Generator().manual_seed(seed)
        c = self.channels
        rm = torch.randn(c, generator=g, dtype=torch.float64) * 0.5
        rv = torch.rand(c, generator=g, dtype=torch.float64) + 0.5
        dtype = dtype or self.dtype
        return rm.to(dtype=dtype, device=device), rv.to(dtype=dtype, device=device)


def cases(dtypes: Iterable[torch.dtype] = FLOAT_DTYPES, shapes: Optional[Iterable[Tuple[int, ...]]] = None,
          layouts: Optional[Iterable[str]] = None, include_empty: bool = True,
          max_numel: Optional[int] = None) -> list:
    """All (shape, layout, dtype) cases, filtered."""
    shapes = [s for s, _ in SHAPES] if shapes is None else list(shapes)
    out = []
    for shape in shapes:
        if not include_empty and math.prod(shape) == 0:
            continue
        if max_numel is not None and math.prod(shape) > max_numel:
            continue
        for layout in layouts_for(shape):
            if layouts is not None and layout not in layouts:
                continue
            for dtype in dtypes:
                out.append(Case(tuple(shape), layout, dtype))
    return out


ALL = cases()

# The GPU smoke tier (marker gpu_smoke, benchmarks/gpu_check.sh): every test
# that takes one of these cases (tests/conftest.py marks them): vector-aligned,
# an odd tail, short planes and an empty batch, contiguous and channels_last,
# in the three dtypes of training.
SMOKE_SHAPES = (ALIGNED, (3, 13, 7, 5), SHORT_PLANES, (0, 3, 4, 4))
SMOKE_CASES = frozenset(cases(dtypes=(torch.float32, torch.bfloat16, torch.float16), shapes=SMOKE_SHAPES,
                              layouts=("contiguous", "channels_last")))


def small_cases(dtypes=FLOAT_DTYPES, max_numel: int = 200) -> list:
    """Cases small enough for opcheck / gradcheck."""
    return cases(dtypes=dtypes, max_numel=max_numel)


def by_id(items: Sequence[Case], smoke: Iterable[Case] = ()) -> dict:
    """Parametrize over cases with readable ids; `smoke` ones join the GPU smoke tier."""
    smoke = set(smoke)
    return {"argvalues": [pytest.param(c, marks=pytest.mark.gpu_smoke) if c in smoke else c for c in items],
            "ids": [str(c) for c in items]}
