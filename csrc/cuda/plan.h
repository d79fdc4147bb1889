// The plan layer of the CUDA kernels: how a launch covers a tensor (block
// shape, vector width, index width, grid splits) and how much scratch it
// needs. The op files (csrc/cuda/*.cpp) ask for a plan and hand it to a
// launcher; only this file and the kernels read its fields. Plain host C++
// without torch or CUDA headers, so a standalone harness uses it as is.
//
// Every kernel is kThreads threads, shaped (bx, by) with bx a power of two
// <= 32: x runs over channels (channels-last) and is 1 for channels-first,
// y runs over the elements of a channel. A (channel, element) pair of an
// (N, C, *) tensor sits at
//   channels-first [N][C][S]: ((n * C + c) * S + s),   m = n * S + s
//   channels-last  [M][C]:    (m * C + c)
// and is read `vec` elements (16 bytes) at a time when sizes and pointers
// allow: vec consecutive s of one channel (channels-first, S % vec == 0) or vec
// consecutive channels of one row (channels-last, C % vec == 0).
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <limits>

#include "../common/shape.h"

namespace bnfast {
namespace cuda {

enum class DType : int { kFloat, kDouble, kHalf, kBFloat16 };

inline int64_t dtype_bytes(DType t) {
  return t == DType::kDouble ? 8 : t == DType::kFloat ? 4 : 2;
}

// The accumulation dtype: float for half, bfloat16 and float, double for double.
inline int64_t acc_bytes(DType t) { return t == DType::kDouble ? 8 : 4; }

constexpr int kThreads = 256;
constexpr int64_t kMaxGridY = 65535;
// Cap on per-channel partial results of the reduce kernel: every block of the
// elementwise kernel merges them, so they must stay few.
constexpr int64_t kMaxPartials = 256;
// Accesses in flight per thread in the reduce kernels.
constexpr int kUnroll = 4;
// Blocks wanted in flight per multiprocessor: 8 blocks of 256 threads fill
// one (2048 threads).
constexpr int64_t kBlocksPerSM = 8;

struct Plan {
  Layout layout;
  int64_t N, C, S, M;  // M = N * S elements per channel
  int vec;             // elements per access (16 bytes' worth, or 1)
  bool index32;        // every index the kernels form fits in int32
  int bx, by;          // block shape
  int64_t ctiles;      // blocks along x
  int64_t reduce_blocks;       // blocks along y of the reduce kernel (= partials per channel)
  int64_t elementwise_blocks;  // blocks along y of the elementwise kernel
};

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Blocks along y for threads that each take at least `per_thread` accesses,
// bounded by filling the card, kMaxGridY and `cap`.
inline int64_t blocks_along_y(const Plan& p, int64_t per_thread, int64_t cap, int sm_count) {
  const int64_t units = p.layout == Layout::kChannelsFirst ? p.M / p.vec : p.M;  // accesses along y
  const int64_t by_work = ceil_div(units, static_cast<int64_t>(p.by) * per_thread);
  const int64_t by_fill = ceil_div(static_cast<int64_t>(sm_count) * kBlocksPerSM, p.ctiles);
  return std::max<int64_t>(1, std::min({by_work, by_fill, cap, kMaxGridY}));
}

// aligned: every tensor the op reads or writes elementwise starts on a
// 16-byte boundary. Requires shape.numel() > 0.
inline Plan make_plan(DType dtype, Layout layout, const Shape& shape, bool aligned, int sm_count) {
  Plan p;
  p.layout = layout;
  p.N = shape.batch;
  p.C = shape.channels;
  p.S = shape.spatial;
  p.M = shape.per_channel();
  const int full_vec = static_cast<int>(16 / dtype_bytes(dtype));
  const int64_t inner = layout == Layout::kChannelsFirst ? p.S : p.C;
  p.vec = (aligned && inner % full_vec == 0) ? full_vec : 1;
  // Loop indices run up to numel plus a few grid strides (<= 2^27).
  p.index32 = shape.numel() < static_cast<int64_t>(std::numeric_limits<int32_t>::max()) - (int64_t(1) << 27);
  if (layout == Layout::kChannelsLast) {
    const int64_t channel_vectors = ceil_div(p.C, p.vec);
    int bx = 1;
    while (bx < 32 && bx < channel_vectors) bx *= 2;
    p.bx = bx;
    p.ctiles = ceil_div(channel_vectors, bx);
  } else {
    p.bx = 1;
    p.ctiles = p.C;
  }
  p.by = kThreads / p.bx;
  p.reduce_blocks = blocks_along_y(p, 2 * kUnroll, kMaxPartials, sm_count);
  p.elementwise_blocks = blocks_along_y(p, 4, kMaxGridY, sm_count);
  return p;
}

// What a reduce kernel accumulates per channel: Welford states (mean, M2, n)
// for statistics, or two sums (sum_dy, sum_dy_xmu) for the backward.
enum class Reduction { kStats, kGradSums };

// Scratch bytes for the reduce kernel's partial results.
inline size_t scratch_bytes(const Plan& p, DType dtype, Reduction r) {
  const int64_t values = r == Reduction::kStats ? 3 : 2;
  return static_cast<size_t>(p.reduce_blocks * p.C * values * acc_bytes(dtype));
}

}  // namespace cuda
}  // namespace bnfast
