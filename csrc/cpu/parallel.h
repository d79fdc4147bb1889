// Threading of the per-ISA loops (loops.h) over a whole tensor: the reductions
// and the affine pass, for every layout. Raw pointers and sizes only.
//
// Determinism: work is cut into chunks whose size depends on the shape alone
// (never on the thread count), partial sums are kept per chunk and added in
// a fixed order, so results are bitwise reproducible run to run and across
// thread counts. (The fused channel blocks depend on the thread count, but a
// channel's sums never leave its block.)
//
// Cache order: each thread runs its share of a reduction's chunks last to
// first, and the affine pass that follows (in the two-pass training forward
// and backward) runs its share first to last. at::parallel_for gives thread t
// the t-th equal share of either range, so about the same rows, and the
// affine pass starts on the data the reduction left in that core's cache.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <memory>
#include <numeric>
#include <vector>

#include "../common/shape.h"
#include "loops.h"
#include "tuning.h"

namespace bnfast {
namespace cpu {

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// A channels-first tensor of short planes is also a [N][C * S] row matrix
// whose column j belongs to channel j / S. Read that way, every loop runs over
// whole contiguous rows: a plane of 16 values costs a fixed per-plane overhead
// (broadcasts, partial-sum updates) several times its data, which the row
// loops pay once per row of C * S values. (Longer planes go to the plane
// loops, which walk the forward's planes with a tail as one run of full
// vectors: loops.h, affine_cf.)
inline bool short_planes_as_rows(Layout layout, const Shape& shape) {
  return layout == Layout::kChannelsFirst && shape.spatial < kShortPlane &&
         shape.channels * shape.spatial <= kMaxRowWidth;
}

// A per-channel vector repeated per column of a [rows][C * S] view (padded for
// the row loops' vector tails).
template <typename T>
std::vector<T> per_column(const T* per_channel, int64_t C, int64_t S) {
  std::vector<T> columns;
  columns.reserve(padded_channels(C * S));
  for (int64_t c = 0; c < C; ++c) columns.insert(columns.end(), S, per_channel[c]);
  columns.resize(padded_channels(C * S), T(0));
  return columns;
}

// A fusion (loops.h) as a loop over a view of the tensor sees it. `fusion`
// may be null (the plain batch norm), and then so is the view.
template <typename scalar_t>
class FusionView {
 public:
  using opmath_t = at::opmath_type<scalar_t>;
  // The same fusion, its tensors read from element `offset` on.
  FusionView(const Fusion<scalar_t>* fusion, int64_t offset = 0) {
    if (!fusion) return;
    view_ = *fusion;
    if (view_.residual) view_.residual += offset;
    if (view_.grad_residual) view_.grad_residual += offset;
    active_ = true;
  }
  // For a [rows][C * S] view of short planes: z's coefficients per column.
  FusionView(const Fusion<scalar_t>* fusion, int64_t C, int64_t S) : FusionView(fusion) {
    if (!fusion || !fusion->zp) return;
    zp_ = per_column(fusion->zp, C, S);
    zq_ = per_column(fusion->zq, C, S);
    view_.zp = zp_.data();
    view_.zq = zq_.data();
  }
  FusionView(const FusionView&) = delete;  // view_ may point into zp_ / zq_
  FusionView& operator=(const FusionView&) = delete;
  const Fusion<scalar_t>* get() const { return active_ ? &view_ : nullptr; }
  Fusion<scalar_t>& mutable_view() { return view_; }

 private:
  Fusion<scalar_t> view_;
  bool active_ = false;
  std::vector<opmath_t> zp_, zq_;
};

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
              const at::opmath_type<scalar_t>* shift, double* s1, double* s2, const Fusion<scalar_t>* fusion) {
  using opmath_t = at::opmath_type<scalar_t>;
  const auto& loop = loops<scalar_t>();
  const int64_t rows_per_chunk =
      std::max({ceil_div(kReduceGrain, W), ceil_div(M, kMaxChunks), kMinRowsPerChunk});
  const int64_t chunks = ceil_div(M, rows_per_chunk);
  std::vector<double> partial(2 * W * chunks, 0.0);
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<opmath_t> scratch(kReduceClScratch * padded_channels(W));
    for (int64_t chunk = end - 1; chunk >= begin; --chunk) {  // last first: see "Cache order" above
      const int64_t m0 = chunk * rows_per_chunk;
      const int64_t m1 = std::min(M, m0 + rows_per_chunk);
      double* p = &partial[2 * W * chunk];
      loop.reduce_cl(x, dy, W, W, m0, m1, shift, p, p + W, scratch.data(), fusion);
    }
  });
  add_partials(partial, chunks, W, s1, s2);
}

// s1[c], s2[c] = per-channel sums of reduce (see loops.h) over the whole input.
template <typename scalar_t>
void channel_sums(const scalar_t* x, const scalar_t* dy, Layout layout, const Shape& shape,
                  const at::opmath_type<scalar_t>* shift, double* s1, double* s2,
                  const Fusion<scalar_t>* fusion = nullptr) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t C = shape.channels;
  const int64_t S = shape.spatial;
  if (layout == Layout::kChannelsLast) {
    row_sums<scalar_t>(x, dy, C, shape.per_channel(), shift, s1, s2, fusion);
    return;
  }
  if (short_planes_as_rows(layout, shape)) {
    const auto column_shift = per_column(shift, C, S);
    std::vector<double> column_s1(C * S), column_s2(C * S);
    const FusionView<scalar_t> columns(fusion, C, S);
    row_sums<scalar_t>(x, dy, C * S, shape.batch, column_shift.data(), column_s1.data(),
                       column_s2.data(), columns.get());
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
    // Uninitialized: reduce_cf zeroes the channels it uses.
    const std::unique_ptr<opmath_t[]> scratch(new opmath_t[2 * C * kMaxLanes]);
    const std::unique_ptr<double[]> lane_totals(new double[2 * C * kMaxLanes]);
    for (int64_t task = end - 1; task >= begin; --task) {  // last first: see "Cache order" above
      const int64_t p0 = task * planes_per_task;
      double* p = &partial[2 * C * task];
      loop.reduce_cf(x, dy, C, S, p0, std::min(planes, p0 + planes_per_task), shift, p, p + C,
                     scratch.get(), lane_totals.get(), fusion);
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
                    const at::opmath_type<scalar_t>* r, const Fusion<scalar_t>* fusion = nullptr) {
  const auto& loop = loops<scalar_t>();
  const int64_t C = shape.channels;
  const int64_t S = shape.spatial;
  auto rows = [&](int64_t W, int64_t M, const auto* m, const auto* p, const auto* q, const auto* r,
                  const Fusion<scalar_t>* f) {
    at::parallel_for(0, M, std::max<int64_t>(1, kGrain / W), [&](int64_t begin, int64_t end) {
      loop.affine_cl(x, dy, out, W, W, begin, end, m, p, q, r, f);
    });
  };
  if (layout == Layout::kChannelsLast) {
    rows(C, shape.per_channel(), m, p, q, r, fusion);
  } else if (short_planes_as_rows(layout, shape)) {
    const auto mc = per_column(m, C, S), pc = per_column(p, C, S), qc = per_column(q, C, S);
    const auto rc = dy ? per_column(r, C, S) : decltype(mc){};
    const FusionView<scalar_t> columns(fusion, C, S);
    rows(C * S, shape.batch, mc.data(), pc.data(), qc.data(), dy ? rc.data() : nullptr, columns.get());
  } else {
    const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(S, 1));
    at::parallel_for(0, shape.batch * C, grain, [&](int64_t begin, int64_t end) {
      loop.affine_cf(x, dy, out, C, S, begin, end, m, p, q, r, fusion);
    });
  }
}

// Short planes, both passes fused: a task owns a block of whole channels,
// i.e. a band of columns of the [N][C * S] rows, and runs the reduction and
// then the affine pass over it, so one parallel region does the work of two
// and the band is still in that core's cache for the second pass.

// Channels per block for tensors of elem_bytes per value (per tensor read),
// or 0 when blocks would be too narrow (kMinBlockRowBytes).
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
                          const Coefficients& coefficients, const Fusion<scalar_t>* fusion = nullptr) {
  using opmath_t = at::opmath_type<scalar_t>;
  const auto& loop = loops<scalar_t>();
  const int64_t C = shape.channels, S = shape.spatial, N = shape.batch, W = C * S;
  const int64_t padded = padded_channels(per_block * S);
  at::parallel_for(0, ceil_div(C, per_block), 1, [&](int64_t begin, int64_t end) {
    std::vector<opmath_t> scratch(kReduceClScratch * padded), columns(6 * padded, opmath_t(0));
    std::vector<double> sums(2 * per_block * S);
    opmath_t *m = columns.data(), *p = m + padded, *q = p + padded, *r = q + padded;
    opmath_t *zp = r + padded, *zq = zp + padded;  // a fusion's z coefficients, per column
    for (int64_t block = begin; block < end; ++block) {
      const int64_t c0 = block * per_block, c1 = std::min(C, c0 + per_block);
      const int64_t width = (c1 - c0) * S, col0 = c0 * S;
      FusionView<scalar_t> view(fusion, col0);
      if (fusion && fusion->zp) {
        for (int64_t c = c0; c < c1; ++c) {
          std::fill_n(zp + (c - c0) * S, S, fusion->zp[c]);
          std::fill_n(zq + (c - c0) * S, S, fusion->zq[c]);
        }
        view.mutable_view().zp = zp;
        view.mutable_view().zq = zq;
      }
      for (int64_t c = c0; c < c1; ++c) std::fill_n(m + (c - c0) * S, S, shift[c]);
      std::fill_n(sums.begin(), 2 * width, 0.0);
      loop.reduce_cl(x + col0, dy ? dy + col0 : nullptr, width, W, 0, N, m, sums.data(),
                     sums.data() + width, scratch.data(), view.get());
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
                     dy ? r : nullptr, view.get());
    }
  });
}

}  // namespace cpu
}  // namespace bnfast
