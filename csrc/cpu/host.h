// Host-side building blocks shared by the CPU op files: threading of the
// per-ISA loops (csrc/cpu/loops.h) over a whole tensor, and the per-channel
// coefficient math. Everything here sees raw pointers and sizes only.
//
// Threading and determinism: work is cut into chunks whose size depends on the
// shape alone (never on the thread count), partial sums are kept per chunk and
// added in a fixed order, so results are bitwise reproducible run to run and
// across thread counts.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

#include "../common/layout.h"
#include "loops.h"

namespace bnfast {
namespace cpu {

// Elements per chunk of elementwise work: large enough to amortize a task,
// small enough to split the seed CNN's smallest layer (128x64x4x4) across cores.
constexpr int64_t kGrain = 32768;
// Reductions keep [chunks][2][C] partial sums in double, zeroed and added up
// serially, so their chunks are larger: a chunk holds at least
// kReduceGrain elements (and, channels-last, kMinRowsPerChunk rows, so the
// partial sums stay small next to the data) and there are at most kMaxChunks.
constexpr int64_t kReduceGrain = 1 << 16;
constexpr int64_t kMaxChunks = 64;
constexpr int64_t kMinRowsPerChunk = 64;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Channels-first planes shorter than this are read as rows instead (see
// short_planes_as_rows), up to a row width whose per-column coefficients and
// partial sums stay in L2. Measured on 2 cores (fwd / bwd, us): 128x128x3x3
// 80 / 93 as planes, 28 / 39 as rows; 128x64x4x4 35 / 37 vs 26 / 35;
// 128x64x6x6 64 / 85 vs 59 / 103; 128x64x7x7 73 / 112 vs 97 / 129.
constexpr int64_t kShortPlane = 32;
constexpr int64_t kMaxRowWidth = 1 << 14;

// A channels-first tensor of short planes is also a [N][C * S] row matrix
// whose column j belongs to channel j / S. Read that way, every loop runs over
// whole contiguous rows: a plane of 16 values costs a fixed per-plane overhead
// (broadcasts, partial-sum updates) several times its data, which the row
// loops pay once per row of C * S values.
inline bool short_planes_as_rows(Layout layout, const Shape& shape) {
  return layout == Layout::kChannelsFirst && shape.spatial < kShortPlane &&
         shape.channels * shape.spatial <= kMaxRowWidth;
}

// A per-channel vector repeated per column of a [rows][C * S] view (padded for
// the row loops' vector tails).
template <typename T>
std::vector<T> per_column(const T* per_channel, int64_t C, int64_t S) {
  std::vector<T> columns(padded_channels(C * S), T(0));
  for (int64_t c = 0; c < C; ++c) std::fill_n(columns.begin() + c * S, S, per_channel[c]);
  return columns;
}

// s1, s2 = the per-task partial sums [tasks][2][n] added in task order (a
// fixed order: results do not depend on which thread ran which task).
inline void add_partials(const std::vector<double>& partial, int64_t tasks, int64_t n, double* s1,
                         double* s2) {
  std::fill(s1, s1 + n, 0.0);
  std::fill(s2, s2 + n, 0.0);
  for (int64_t task = 0; task < tasks; ++task) {
    const double* p = &partial[2 * n * task];
    for (int64_t j = 0; j < n; ++j) {
      s1[j] += p[j];
      s2[j] += p[n + j];
    }
  }
}

// Sums of reduce over rows [M][W] (channels-last; or short planes with W = C * S).
template <typename scalar_t>
void row_sums(const scalar_t* x, const scalar_t* dy, int64_t W, int64_t M,
              const at::opmath_type<scalar_t>* shift, double* s1, double* s2) {
  using opmath_t = at::opmath_type<scalar_t>;
  const auto& loop = loops<scalar_t>();
  const int64_t rows_per_chunk =
      std::max({ceil_div(kReduceGrain, W), ceil_div(M, kMaxChunks), kMinRowsPerChunk});
  const int64_t chunks = ceil_div(M, rows_per_chunk);
  std::vector<double> partial(2 * W * chunks, 0.0);
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<opmath_t> scratch(kReduceClScratch * padded_channels(W));
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      const int64_t m0 = chunk * rows_per_chunk;
      const int64_t m1 = std::min(M, m0 + rows_per_chunk);
      double* p = &partial[2 * W * chunk];
      loop.reduce_cl(x, dy, W, W, m0, m1, shift, p, p + W, scratch.data());
    }
  });
  add_partials(partial, chunks, W, s1, s2);
}

// s1[c], s2[c] = per-channel sums of reduce (see loops.h) over the whole input.
template <typename scalar_t>
void channel_sums(const scalar_t* x, const scalar_t* dy, Layout layout, const Shape& shape,
                  const at::opmath_type<scalar_t>* shift, double* s1, double* s2) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t C = shape.channels;
  const int64_t S = shape.spatial;
  if (layout == Layout::kChannelsLast) {
    row_sums<scalar_t>(x, dy, C, shape.per_channel(), shift, s1, s2);
    return;
  }
  if (short_planes_as_rows(layout, shape)) {
    const auto column_shift = per_column(shift, C, S);
    std::vector<double> column_s1(C * S), column_s2(C * S);
    row_sums<scalar_t>(x, dy, C * S, shape.batch, column_shift.data(), column_s1.data(),
                       column_s2.data());
    for (int64_t c = 0; c < C; ++c) {
      s1[c] = std::accumulate(&column_s1[c * S], &column_s1[(c + 1) * S], 0.0);
      s2[c] = std::accumulate(&column_s2[c * S], &column_s2[(c + 1) * S], 0.0);
    }
    return;
  }
  // Tasks are ranges of planes in memory order; each keeps [2][C] partial
  // sums (only the channels it touches are non-zero).
  const auto& loop = loops<scalar_t>();
  const int64_t planes = shape.batch * C;
  const int64_t planes_per_task =
      std::max(ceil_div(kReduceGrain, std::max<int64_t>(S, 1)), ceil_div(planes, kMaxChunks));
  const int64_t tasks = ceil_div(planes, planes_per_task);
  std::vector<double> partial(2 * C * tasks, 0.0);
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    std::vector<opmath_t> scratch(2 * C * kMaxLanes);
    std::vector<double> lane_totals(2 * C * kMaxLanes);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t p0 = task * planes_per_task;
      double* p = &partial[2 * C * task];
      loop.reduce_cf(x, dy, C, S, p0, std::min(planes, p0 + planes_per_task), shift, p, p + C,
                     scratch.data(), lane_totals.data());
    }
  });
  add_partials(partial, tasks, C, s1, s2);
}

// out = (x - m[c]) * p[c] + q[c] (+ dy * r[c]) over the whole input; m, p, q,
// r are padded to padded_channels(C).
template <typename scalar_t>
void channel_affine(const scalar_t* x, const scalar_t* dy, scalar_t* out, Layout layout,
                    const Shape& shape, const at::opmath_type<scalar_t>* m,
                    const at::opmath_type<scalar_t>* p, const at::opmath_type<scalar_t>* q,
                    const at::opmath_type<scalar_t>* r) {
  const auto& loop = loops<scalar_t>();
  const int64_t C = shape.channels;
  const int64_t S = shape.spatial;
  auto rows = [&](int64_t W, int64_t M, const auto* m, const auto* p, const auto* q, const auto* r) {
    at::parallel_for(0, M, std::max<int64_t>(1, kGrain / W), [&](int64_t begin, int64_t end) {
      loop.affine_cl(x, dy, out, W, W, begin, end, m, p, q, r);
    });
  };
  if (layout == Layout::kChannelsLast) {
    rows(C, shape.per_channel(), m, p, q, r);
  } else if (short_planes_as_rows(layout, shape)) {
    const auto mc = per_column(m, C, S), pc = per_column(p, C, S), qc = per_column(q, C, S);
    const auto rc = dy ? per_column(r, C, S) : decltype(mc){};
    rows(C * S, shape.batch, mc.data(), pc.data(), qc.data(), dy ? rc.data() : nullptr);
  } else {
    const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(S, 1));
    at::parallel_for(0, shape.batch * C, grain, [&](int64_t begin, int64_t end) {
      loop.affine_cf(x, dy, out, C, S, begin, end, m, p, q, r);
    });
  }
}

// Short planes, both passes fused: a task owns a block of whole channels,
// i.e. a band of columns of the [N][C * S] rows, and runs the reduction and
// then the affine pass over it, so one parallel region does the work of two
// and the band is still in that core's cache for the second pass. Used when a
// block of at least kMinBlockRowBytes per row fits in kChannelBlockBytes
// (below that, strided reads of short row segments waste cache lines).
constexpr int64_t kChannelBlockBytes = 256 << 10;
constexpr int64_t kMinBlockRowBytes = 256;
constexpr int64_t kMinSplitElements = 8192;

// Channels per block for tensors of elem_bytes per value (per tensor read),
// or 0 when blocks would be too narrow.
inline int64_t channels_per_block(Layout layout, const Shape& shape, int64_t elem_bytes) {
  if (!short_planes_as_rows(layout, shape) || shape.per_channel() == 0) return 0;
  const int64_t C = shape.channels, row_bytes = shape.spatial * elem_bytes;
  const int64_t widest = std::min(C, kChannelBlockBytes / (shape.per_channel() * elem_bytes));
  if (widest * row_bytes < kMinBlockRowBytes) return 0;
  // Equal blocks, as many as a multiple of the thread count (three blocks on
  // two cores take as long as four), unless that makes them too narrow or
  // the tensor is too small to be worth a second thread. This depends on the
  // thread count, but results do not: a channel's sums never leave its block.
  int64_t blocks = ceil_div(C, widest);
  if (shape.numel() >= kMinSplitElements) {
    const int64_t threads = at::get_num_threads();
    const int64_t narrowest = ceil_div(kMinBlockRowBytes, row_bytes);
    blocks = std::max(blocks, std::min(ceil_div(blocks, threads) * threads, C / narrowest));
  }
  return ceil_div(C, blocks);
}

// reduce (see loops.h) per channel with shifts K[C], then
// out = (x - m) * p + q (+ dy * r) with channel c's m, p, q, r from
// coefficients(c, s1[c], s2[c], &m, &p, &q, &r), block by block.
template <typename scalar_t, typename Coefficients>
void fused_channel_blocks(const scalar_t* x, const scalar_t* dy, scalar_t* out, const Shape& shape,
                          int64_t per_block, const at::opmath_type<scalar_t>* shift,
                          const Coefficients& coefficients) {
  using opmath_t = at::opmath_type<scalar_t>;
  const auto& loop = loops<scalar_t>();
  const int64_t C = shape.channels, S = shape.spatial, N = shape.batch, W = C * S;
  const int64_t padded = padded_channels(per_block * S);
  at::parallel_for(0, ceil_div(C, per_block), 1, [&](int64_t begin, int64_t end) {
    std::vector<opmath_t> scratch(kReduceClScratch * padded), columns(4 * padded, opmath_t(0));
    std::vector<double> sums(2 * per_block * S);
    opmath_t *m = columns.data(), *p = m + padded, *q = p + padded, *r = q + padded;
    for (int64_t block = begin; block < end; ++block) {
      const int64_t c0 = block * per_block, c1 = std::min(C, c0 + per_block);
      const int64_t width = (c1 - c0) * S, col0 = c0 * S;
      for (int64_t c = c0; c < c1; ++c) std::fill_n(m + (c - c0) * S, S, shift[c]);
      std::fill_n(sums.begin(), 2 * width, 0.0);
      loop.reduce_cl(x + col0, dy ? dy + col0 : nullptr, width, W, 0, N, m, sums.data(),
                     sums.data() + width, scratch.data());
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t k = (c - c0) * S;
        const double s1 = std::accumulate(&sums[k], &sums[k + S], 0.0);
        const double s2 = std::accumulate(&sums[width + k], &sums[width + k + S], 0.0);
        opmath_t mc, pc, qc, rc;
        coefficients(c, s1, s2, &mc, &pc, &qc, &rc);
        std::fill_n(m + k, S, mc);
        std::fill_n(p + k, S, pc);
        std::fill_n(q + k, S, qc);
        std::fill_n(r + k, S, rc);
      }
      loop.affine_cl(x + col0, dy ? dy + col0 : nullptr, out + col0, width, W, 0, N, m, p, q,
                     dy ? r : nullptr);
    }
  });
}

// A per-channel vector (weight, bias, mean...) read as opmath_t whatever its
// floating dtype and stride; `fallback` where the tensor is absent.
template <typename opmath_t>
std::vector<opmath_t> channel_values(const c10::optional<at::Tensor>& t, int64_t C,
                                     opmath_t fallback) {
  std::vector<opmath_t> values(C, fallback);
  if (!(t.has_value() && t->defined())) return values;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t->scalar_type(), "channel_values", [&] {
    const auto a = t->accessor<scalar_t, 1>();
    for (int64_t c = 0; c < C; ++c) values[c] = static_cast<opmath_t>(a[c]);
  });
  return values;
}

// The shift K[c] for statistics: the channel's first element. Any sample of
// the channel is within a few standard deviations of its mean, which is all
// the shifted sums need to stay free of cancellation. NB: an infinite or NaN
// first element would poison every x - K; any finite shift is correct, so 0.
template <typename scalar_t>
at::opmath_type<scalar_t> first_element(const scalar_t* x, Layout layout, const Shape& shape,
                                        int64_t c) {
  const auto k = static_cast<at::opmath_type<scalar_t>>(
      layout == Layout::kChannelsFirst ? x[c * shape.spatial] : x[c]);
  return std::isfinite(k) ? k : at::opmath_type<scalar_t>(0);
}

// K[c] = first_element for every channel, padded for the row loops.
template <typename scalar_t>
std::vector<at::opmath_type<scalar_t>> channel_shifts(const scalar_t* x, Layout layout,
                                                      const Shape& shape) {
  std::vector<at::opmath_type<scalar_t>> shift(padded_channels(shape.channels), 0);
  for (int64_t c = 0; c < shape.channels; ++c) shift[c] = first_element(x, layout, shape, c);
  return shift;
}

// Per-channel math, in double. Every path (chunked or per-channel tasks) goes
// through these, so they agree bitwise.

// mean and invstd from the shifted sums s1 = sum(x - K), s2 = sum((x - K)^2).
template <typename opmath_t>
void stats_from_sums(double s1, double s2, int64_t count, opmath_t shift, double eps,
                     opmath_t* mean, opmath_t* invstd) {
  const double mean_shifted = s1 / count;
  // NB: s2 / count - mean_shifted^2 is a difference of two O(var) terms (the
  // shift keeps mean_shifted within a few std), so it cannot cancel
  // catastrophically; clamp the last-ulp negative results of constant data.
  const double var = std::max(s2 / count - mean_shifted * mean_shifted, 0.0);
  *mean = static_cast<opmath_t>(static_cast<double>(shift) + mean_shifted);
  *invstd = static_cast<opmath_t>(1.0 / std::sqrt(var + eps));
}

// dx = (dy - mean_dy - (x - mean) * invstd^2 * mean_dy_xmu) * invstd * weight
//    == (x - mean) * p + q + dy * r  with
// r = invstd * weight,  p = -r * invstd^2 * mean_dy_xmu,  q = -r * mean_dy.
template <typename opmath_t>
void grad_coefficients(opmath_t invstd, opmath_t weight, double mean_dy, double mean_dy_xmu,
                       opmath_t* p, opmath_t* q, opmath_t* r) {
  const double is = invstd;
  const double rc = is * weight;
  *r = static_cast<opmath_t>(rc);
  *p = static_cast<opmath_t>(-rc * is * is * mean_dy_xmu);
  *q = static_cast<opmath_t>(-rc * mean_dy);
}

// mean and invstd of one batch. An empty batch has no statistics: NaN.
template <typename scalar_t>
void batch_stats(const scalar_t* x, Layout layout, const Shape& shape, double eps,
                 at::opmath_type<scalar_t>* mean, at::opmath_type<scalar_t>* invstd) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t C = shape.channels;
  const int64_t count = shape.per_channel();
  if (count == 0) {
    std::fill(mean, mean + C, std::numeric_limits<opmath_t>::quiet_NaN());
    std::fill(invstd, invstd + C, std::numeric_limits<opmath_t>::quiet_NaN());
    return;
  }
  const auto shift = channel_shifts(x, layout, shape);
  std::vector<double> s1(C), s2(C);
  channel_sums<scalar_t>(x, nullptr, layout, shape, shift.data(), s1.data(), s2.data());
  for (int64_t c = 0; c < C; ++c) {
    stats_from_sums(s1[c], s2[c], count, shift[c], eps, &mean[c], &invstd[c]);
  }
}

// y = (x - mean) * (invstd * weight) + bias.
template <typename scalar_t>
void normalize(const scalar_t* x, scalar_t* out, Layout layout, const Shape& shape,
               const at::opmath_type<scalar_t>* mean, const at::opmath_type<scalar_t>* invstd,
               const at::opmath_type<scalar_t>* weight, const at::opmath_type<scalar_t>* bias) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t Cp = padded_channels(shape.channels);
  std::vector<opmath_t> centre(Cp, 0), scale(Cp, 0), shift(Cp, 0);
  for (int64_t c = 0; c < shape.channels; ++c) {
    centre[c] = mean[c];
    scale[c] = static_cast<opmath_t>(static_cast<double>(invstd[c]) * weight[c]);
    shift[c] = bias[c];
  }
  channel_affine<scalar_t>(x, nullptr, out, layout, shape, centre.data(), scale.data(), shift.data(),
                           nullptr);
}

// The training forward: batch statistics (one pass), then y (a second pass;
// from L3 cache when the tensor fits there).
template <typename scalar_t>
void forward_train(const scalar_t* x, scalar_t* out, Layout layout, const Shape& shape,
                   double eps, at::opmath_type<scalar_t>* mean, at::opmath_type<scalar_t>* invstd,
                   const at::opmath_type<scalar_t>* weight, const at::opmath_type<scalar_t>* bias) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t per_block = channels_per_block(layout, shape, sizeof(scalar_t));
  if (per_block > 0) {
    const int64_t count = shape.per_channel();
    const auto shift = channel_shifts(x, layout, shape);
    fused_channel_blocks<scalar_t>(
        x, nullptr, out, shape, per_block, shift.data(),
        [&](int64_t c, double s1, double s2, opmath_t* m, opmath_t* p, opmath_t* q, opmath_t* r) {
          stats_from_sums(s1, s2, count, shift[c], eps, &mean[c], &invstd[c]);
          *m = mean[c];  // as normalize does
          *p = static_cast<opmath_t>(static_cast<double>(invstd[c]) * weight[c]);
          *q = bias[c];
          *r = 0;
        });
    return;
  }
  batch_stats<scalar_t>(x, layout, shape, eps, mean, invstd);
  if (shape.per_channel() > 0) normalize<scalar_t>(x, out, layout, shape, mean, invstd, weight, bias);
}

// sum_dy[c] = sum(dy), sum_dy_xmu[c] = sum(dy * (x - mean)).
template <typename scalar_t>
void grad_sums(const scalar_t* dy, const scalar_t* x, Layout layout, const Shape& shape,
               const at::opmath_type<scalar_t>* mean, double* sum_dy, double* sum_dy_xmu) {
  std::vector<at::opmath_type<scalar_t>> shift(mean, mean + shape.channels);
  shift.resize(padded_channels(shape.channels), 0);
  channel_sums<scalar_t>(x, dy, layout, shape, shift.data(), sum_dy, sum_dy_xmu);
}

// dx = (dy - mean_dy - (x - mean) * invstd^2 * mean_dy_xmu) * invstd * weight.
template <typename scalar_t>
void grad_input(const scalar_t* dy, const scalar_t* x, scalar_t* dx, Layout layout,
                const Shape& shape, const at::opmath_type<scalar_t>* mean,
                const at::opmath_type<scalar_t>* invstd, const at::opmath_type<scalar_t>* weight,
                const double* mean_dy, const double* mean_dy_xmu) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t Cp = padded_channels(shape.channels);
  std::vector<opmath_t> centre(Cp, 0), p(Cp, 0), q(Cp, 0), r(Cp, 0);
  for (int64_t c = 0; c < shape.channels; ++c) {
    centre[c] = mean[c];
    grad_coefficients(invstd[c], weight[c], mean_dy[c], mean_dy_xmu[c], &p[c], &q[c], &r[c]);
  }
  channel_affine<scalar_t>(x, dy, dx, layout, shape, centre.data(), p.data(), q.data(), r.data());
}

// The training backward: sum_dy, sum_dy_xmu (returned), then dx with
// mean_dy = sum_dy / M, mean_dy_xmu = sum_dy_xmu / M.
template <typename scalar_t>
void backward_train(const scalar_t* dy, const scalar_t* x, scalar_t* dx, Layout layout,
                    const Shape& shape, const at::opmath_type<scalar_t>* mean,
                    const at::opmath_type<scalar_t>* invstd, const at::opmath_type<scalar_t>* weight,
                    double* sum_dy, double* sum_dy_xmu) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t C = shape.channels;
  const int64_t count = shape.per_channel();
  const int64_t per_block = channels_per_block(layout, shape, 2 * sizeof(scalar_t));
  if (per_block > 0) {
    fused_channel_blocks<scalar_t>(
        x, dy, dx, shape, per_block, mean,
        [&](int64_t c, double s1, double s2, opmath_t* m, opmath_t* p, opmath_t* q, opmath_t* r) {
          sum_dy[c] = s1;
          sum_dy_xmu[c] = s2;
          *m = mean[c];  // as grad_input does
          grad_coefficients(invstd[c], weight[c], s1 / count, s2 / count, p, q, r);
        });
    return;
  }
  grad_sums<scalar_t>(dy, x, layout, shape, mean, sum_dy, sum_dy_xmu);
  std::vector<double> mean_dy(C), mean_dy_xmu(C);
  for (int64_t c = 0; c < C; ++c) {
    mean_dy[c] = sum_dy[c] / count;
    mean_dy_xmu[c] = sum_dy_xmu[c] / count;
  }
  grad_input<scalar_t>(dy, x, dx, layout, shape, mean, invstd, weight, mean_dy.data(), mean_dy_xmu.data());
}

}  // namespace cpu
}  // namespace bnfast
