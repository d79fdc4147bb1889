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
// and backward) runs its share first to last. Where both cut the tensor in
// memory order (channels-last rows, channels-first planes in tasks),
// at::parallel_for gives thread t the t-th equal share of either range, so
// about the same data, and the affine pass starts on what the reduction left
// in that core's cache.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <memory>
#include <numeric>
#include <optional>
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

// The affine pass (channel_affine) reads short planes as rows too, except
// those of whole vectors without dy (the forward and eval): there the plane
// loop's per-plane broadcasts cost no more than the rows' per-column loads of
// m, p, q, and it needs no per-column buffers
// (python -m benchmarks.kernels --cases seed_bn3 r18_s4 --phases fwd_eval).
inline bool affine_planes_as_rows(Layout layout, const Shape& shape, bool has_dy) {
  return short_planes_as_rows(layout, shape) && (has_dy || shape.spatial % kMaxLanes != 0);
}

// Bytes an op moves over `tensors` tensors of numel values each.
template <typename scalar_t>
int64_t op_bytes(int64_t numel, int64_t tensors) {
  return numel * static_cast<int64_t>(sizeof(scalar_t)) * tensors;
}

// Whether an affine pass over the whole shape moves more than
// kNonTemporalBytes (x and out, and dy with it): its output is then written
// with non-temporal stores (loops.h, affine_cf).
template <typename scalar_t>
bool writes_past_cache(const Shape& shape, bool has_dy) {
  return op_bytes<scalar_t>(shape.numel(), has_dy ? 3 : 2) > kNonTemporalBytes;
}

// Whether a reduction over numel values reads at most kWholeBlockBytes (x,
// and dy with it): its wide rows are then summed block by block over each
// task's rows (loops.h, reduce_cl).
template <typename scalar_t>
bool reads_fit_cache(int64_t numel, bool has_dy) {
  return op_bytes<scalar_t>(numel, has_dy ? 2 : 1) <= kWholeBlockBytes;
}

// Channels-first planes shorter than kBandPlane (other than those read as
// rows) of a half-precision tensor, or of a float32 one when they are a whole
// number of vectors: the reductions read bands of whole channels, i.e. bands
// of columns of the [N][C * S] rows, with the row loops. There the plane loops pay
// their per-plane bookkeeping (and in half precision a masked, converted
// tail) on a few vectors; float32 planes with a tail keep them, as the
// forward walks those as one run of vectors (affine_cf). A band's per-column
// work is amortized over its N rows: small batches keep the plane loops.
template <typename scalar_t>
bool planes_in_bands(Layout layout, const Shape& shape) {
  if (layout != Layout::kChannelsFirst || shape.spatial >= kBandPlane || shape.batch < kMinBandRows ||
      short_planes_as_rows(layout, shape)) {
    return false;
  }
  const bool half = !std::is_same<scalar_t, at::opmath_type<scalar_t>>::value;
  return half || (std::is_same<scalar_t, float>::value && shape.spatial % kMaxLanes == 0);
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

// A fusion (loops.h) as the row loops see it over channels [c0, c1) of the
// [N][C * S] rows of channels-first planes: its tensors read from column
// c0 * S on, z's coefficients per column. `fusion` may be null (the plain
// batch norm), and then so is the view.
template <typename scalar_t>
class FusionView {
 public:
  using opmath_t = at::opmath_type<scalar_t>;
  FusionView(const Fusion<scalar_t>* fusion, int64_t c0, int64_t c1, int64_t S) {
    if (!fusion) return;
    view_ = *fusion;
    active_ = true;
    if (view_.residual) view_.residual += c0 * S;
    if (view_.grad_residual) view_.grad_residual += c0 * S;
    if (!fusion->zp) return;
    zp_ = per_column(fusion->zp + c0, c1 - c0, S);
    zq_ = per_column(fusion->zq + c0, c1 - c0, S);
    view_.zp = zp_.data();
    view_.zq = zq_.data();
  }
  FusionView(const FusionView&) = delete;  // view_ may point into zp_ / zq_
  FusionView& operator=(const FusionView&) = delete;
  const Fusion<scalar_t>* get() const { return active_ ? &view_ : nullptr; }

 private:
  Fusion<scalar_t> view_;
  bool active_ = false;
  std::vector<opmath_t> zp_, zq_;
};

// Rows per chunk of a reduction over rows [M][W] (row_sums): a chunk holds
// at least kReduceGrain values and kMinRowsPerChunk rows, and there are at
// most kMaxChunks.
inline int64_t row_chunk(int64_t W, int64_t M) {
  return std::max({ceil_div(kReduceGrain, W), ceil_div(M, kMaxChunks), kMinRowsPerChunk});
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

// A band of whole channels [c0, c1) of a channels-first tensor: columns
// [c0 * S, c1 * S) of its [N][C * S] rows, with the per-column buffers of the
// row loops for bands of up to max_channels channels. A channel's sums are
// its columns' sums over all N rows, then its S columns added in order, so
// they do not depend on the band around it (nor on the thread count).
template <typename scalar_t>
class ChannelBand {
 public:
  using opmath_t = at::opmath_type<scalar_t>;
  ChannelBand(const Shape& shape, int64_t max_channels)
      : C_(shape.channels), S_(shape.spatial), N_(shape.batch),
        padded_(padded_channels(max_channels * shape.spatial)),
        scratch_(new opmath_t[kReduceClScratch * padded_]), columns_(new opmath_t[4 * padded_]),
        sums_(new double[4 * max_channels * shape.spatial]) {}

  // Channels [c0, c1), of an op with this fusion (null: none).
  void select(int64_t c0, int64_t c1, const Fusion<scalar_t>* fusion) {
    c0_ = c0;
    c1_ = c1;
    view_.reset();
    view_.emplace(fusion, c0, c1, S_);
  }
  // reduce (loops.h) over the band with shifts K[C], then
  // per_channel(c, s1[c], s2[c]) for each channel in order.
  template <typename PerChannel>
  void reduce(const scalar_t* x, const scalar_t* dy, const opmath_t* shift, PerChannel&& per_channel) {
    for (int64_t c = c0_; c < c1_; ++c) std::fill_n(column(kM, c), S_, shift[c]);
    const int64_t width = (c1_ - c0_) * S_, col0 = c0_ * S_;
    std::fill_n(sums_.get(), 2 * width, 0.0);
    // In the chunks of rows that row_sums cuts the whole [N][C * S] rows
    // into, each summed from zero and added in order: so a short plane's
    // sums in a band equal those of the separate reductions, bitwise.
    const int64_t rows = row_chunk(C_ * S_, N_);
    double* chunk = sums_.get() + 2 * width;
    for (int64_t m0 = 0; m0 < N_; m0 += rows) {
      std::fill_n(chunk, 2 * width, 0.0);
      loops<scalar_t>().reduce_cl(x + col0, dy ? dy + col0 : nullptr, width, C_ * S_, m0, std::min(N_, m0 + rows),
                                  column(kM, c0_), chunk, chunk + width, scratch_.get(), fusion(),
                                  reads_fit_cache<scalar_t>(N_ * C_ * S_, dy != nullptr));
      for (int64_t i = 0; i < 2 * width; ++i) sums_[i] += chunk[i];
    }
    for (int64_t c = c0_; c < c1_; ++c) {
      const auto* s1 = &sums_[(c - c0_) * S_];
      const auto* s2 = s1 + width;
      per_channel(c, std::accumulate(s1, s1 + S_, 0.0), std::accumulate(s2, s2 + S_, 0.0));
    }
  }
  // Channel c's affine coefficients, for affine().
  void set_coefficients(int64_t c, opmath_t m, opmath_t p, opmath_t q, opmath_t r) {
    std::fill_n(column(kM, c), S_, m);
    std::fill_n(column(kP, c), S_, p);
    std::fill_n(column(kQ, c), S_, q);
    std::fill_n(column(kR, c), S_, r);
  }
  // out = (x - m) * p + q (+ dy * r) over the band (the fusion's activation
  // too), with every channel's set_coefficients.
  void affine(const scalar_t* x, const scalar_t* dy, scalar_t* out, bool non_temporal) {
    const int64_t col0 = c0_ * S_;
    loops<scalar_t>().affine_cl(x + col0, dy ? dy + col0 : nullptr, out + col0, (c1_ - c0_) * S_, C_ * S_, 0, N_,
                                column(kM, c0_), column(kP, c0_), column(kQ, c0_),
                                dy ? column(kR, c0_) : nullptr, fusion(), non_temporal);
  }

 private:
  enum Column { kM, kP, kQ, kR };  // the per-column coefficient buffers
  opmath_t* column(Column which, int64_t c) { return columns_.get() + which * padded_ + (c - c0_) * S_; }
  const Fusion<scalar_t>* fusion() const { return view_->get(); }

  int64_t C_, S_, N_, padded_;
  // Uninitialized: the loops zero their scratch, and read the columns (with
  // masked tails) and sums only where they were written.
  std::unique_ptr<opmath_t[]> scratch_, columns_;
  std::unique_ptr<double[]> sums_;
  int64_t c0_ = 0, c1_ = 0;
  std::optional<FusionView<scalar_t>> view_;  // the selected band's
};

// Blocks of whole channels: bands of columns of the [N][C * S] rows
// (ChannelBand) for short planes and planes_in_bands, else runs of planes
// (PlaneRuns). The reductions over planes_in_bands and runs of planes walk
// them block by block, and training over short planes runs both its passes
// in them (fused_channel_blocks).

// Channels per block of short planes (bands of columns) or of longer ones
// outside planes_in_bands (runs of planes), when each pass reads `tensors`
// tensors of scalar_t, or 0 when blocks would be too narrow (bands:
// kMinBlockRowBytes; runs of planes: kMinRunPlanes, each run being one call
// of the plane loops). planes_in_bands reduce in bands of their own width
// (channel_sums).
template <typename scalar_t>
int64_t channels_per_block(Layout layout, const Shape& shape, int64_t tensors) {
  const bool bands = short_planes_as_rows(layout, shape);
  const bool plane_runs = layout == Layout::kChannelsFirst && !bands && !planes_in_bands<scalar_t>(layout, shape);
  if (!(bands || plane_runs) || shape.per_channel() == 0) return 0;
  const int64_t elem_bytes = tensors * static_cast<int64_t>(sizeof(scalar_t));
  const int64_t C = shape.channels, row_bytes = shape.spatial * elem_bytes;
  const int64_t widest = std::min(C, kChannelBlockBytes / (shape.per_channel() * elem_bytes));
  if (bands ? widest * row_bytes < kMinBlockRowBytes : widest < kMinRunPlanes) return 0;
  // Equal blocks, as many as a multiple of the thread count (three blocks on
  // two cores take as long as four), unless that makes them too narrow or
  // the tensor is too small to be worth a second thread. This depends on the
  // thread count, but results do not: a channel's sums never leave its block.
  int64_t blocks = ceil_div(C, widest);
  if (shape.numel() >= kMinSplitElements) {
    const int64_t threads = at::get_num_threads();
    const int64_t narrowest = bands ? ceil_div(kMinBlockRowBytes, row_bytes) : kMinRunPlanes;
    blocks = std::max(blocks, std::min(ceil_div(blocks, threads) * threads, C / narrowest));
  }
  return ceil_div(C, blocks);
}

// A block of whole channels [c0, c1) of a channels-first tensor as, in
// sample n, the run of planes [n * C + c0, n * C + c1), reduced by the plane
// loops run by run; ChannelBand's reduction interface. A channel's sums are
// its planes' sums added in sample order, so they do not depend on the
// channels around it (nor on the thread count).
template <typename scalar_t>
class PlaneRuns {
 public:
  using opmath_t = at::opmath_type<scalar_t>;
  explicit PlaneRuns(const Shape& shape)
      : C_(shape.channels), S_(shape.spatial), N_(shape.batch),
        scratch_(new opmath_t[2 * C_ * kMaxLanes]), lane_totals_(new double[2 * C_ * kMaxLanes]),
        s1_(C_), s2_(C_) {}

  // Channels [c0, c1), of an op with this fusion (null: none).
  void select(int64_t c0, int64_t c1, const Fusion<scalar_t>* fusion) {
    c0_ = c0;
    c1_ = c1;
    fusion_ = fusion;
  }
  // reduce (loops.h) over the block with shifts K[C], then
  // per_channel(c, s1[c], s2[c]) for each channel in order.
  template <typename PerChannel>
  void reduce(const scalar_t* x, const scalar_t* dy, const opmath_t* shift, PerChannel&& per_channel) {
    std::fill(&s1_[c0_], &s1_[c0_] + (c1_ - c0_), 0.0);
    std::fill(&s2_[c0_], &s2_[c0_] + (c1_ - c0_), 0.0);
    for (int64_t n = 0; n < N_; ++n) {
      loops<scalar_t>().reduce_cf(x, dy, C_, S_, n * C_ + c0_, n * C_ + c1_, shift, s1_.data(), s2_.data(),
                                  scratch_.get(), lane_totals_.get(), fusion_);
    }
    for (int64_t c = c0_; c < c1_; ++c) per_channel(c, s1_[c], s2_[c]);
  }

 private:
  int64_t C_, S_, N_;
  // Uninitialized: reduce_cf zeroes the channels it uses.
  std::unique_ptr<opmath_t[]> scratch_;
  std::unique_ptr<double[]> lane_totals_;
  std::vector<double> s1_, s2_;
  int64_t c0_ = 0, c1_ = 0;
  const Fusion<scalar_t>* fusion_ = nullptr;
};

// reduce over channels [0, C) in blocks of per_block (ChannelBand or
// PlaneRuns, made by make_block()): s1[c], s2[c] for every channel.
template <typename scalar_t, typename MakeBlock>
void block_sums(const scalar_t* x, const scalar_t* dy, int64_t C, int64_t per_block, const MakeBlock& make_block,
                const at::opmath_type<scalar_t>* shift, double* s1, double* s2, const Fusion<scalar_t>* fusion) {
  at::parallel_for(0, ceil_div(C, per_block), 1, [&](int64_t begin, int64_t end) {
    auto block = make_block();
    for (int64_t b = begin; b < end; ++b) {
      block.select(b * per_block, std::min(C, (b + 1) * per_block), fusion);
      block.reduce(x, dy, shift, [&](int64_t c, double t1, double t2) {
        s1[c] = t1;
        s2[c] = t2;
      });
    }
  });
}

// Sums of reduce over rows [M][W] (channels-last; or short planes with W = C * S).
template <typename scalar_t>
void row_sums(const scalar_t* x, const scalar_t* dy, int64_t W, int64_t M,
              const at::opmath_type<scalar_t>* shift, double* s1, double* s2, const Fusion<scalar_t>* fusion,
              bool whole_blocks) {
  using opmath_t = at::opmath_type<scalar_t>;
  const auto& loop = loops<scalar_t>();
  const int64_t rows_per_chunk = row_chunk(W, M);
  const int64_t chunks = ceil_div(M, rows_per_chunk);
  std::vector<double> partial(2 * W * chunks, 0.0);
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<opmath_t> scratch(kReduceClScratch * padded_channels(W));
    for (int64_t chunk = end - 1; chunk >= begin; --chunk) {  // last first: see "Cache order" above
      const int64_t m0 = chunk * rows_per_chunk;
      const int64_t m1 = std::min(M, m0 + rows_per_chunk);
      double* p = &partial[2 * W * chunk];
      loop.reduce_cl(x, dy, W, W, m0, m1, shift, p, p + W, scratch.data(), fusion, whole_blocks);
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
  const bool whole_blocks = reads_fit_cache<scalar_t>(shape.numel(), dy != nullptr);
  if (layout == Layout::kChannelsLast) {
    row_sums<scalar_t>(x, dy, C, shape.per_channel(), shift, s1, s2, fusion, whole_blocks);
    return;
  }
  if (short_planes_as_rows(layout, shape)) {
    const auto column_shift = per_column(shift, C, S);
    std::vector<double> column_s1(C * S), column_s2(C * S);
    const FusionView<scalar_t> columns(fusion, 0, C, S);
    row_sums<scalar_t>(x, dy, C * S, shape.batch, column_shift.data(), column_s1.data(),
                       column_s2.data(), columns.get(), whole_blocks);
    for (int64_t c = 0; c < C; ++c) {
      s1[c] = std::accumulate(&column_s1[c * S], &column_s1[(c + 1) * S], 0.0);
      s2[c] = std::accumulate(&column_s2[c * S], &column_s2[(c + 1) * S], 0.0);
    }
    return;
  }
  if (planes_in_bands<scalar_t>(layout, shape)) {
    // Bands of about kReduceGrain values, at most kMaxRowWidth columns wide.
    const int64_t per_band = std::max<int64_t>(
        1, std::min(ceil_div(kReduceGrain, std::max<int64_t>(shape.per_channel(), 1)), kMaxRowWidth / S));
    block_sums(x, dy, C, per_band, [&] { return ChannelBand<scalar_t>(shape, per_band); }, shift, s1, s2, fusion);
    return;
  }
  // Blocks of channels, run of planes by run (PlaneRuns).
  if (const int64_t per_block = channels_per_block<scalar_t>(layout, shape, dy ? 2 : 1)) {
    block_sums(x, dy, C, per_block, [&] { return PlaneRuns<scalar_t>(shape); }, shift, s1, s2, fusion);
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
  const bool non_temporal = writes_past_cache<scalar_t>(shape, dy != nullptr);
  auto rows = [&](int64_t W, int64_t M, const auto* m, const auto* p, const auto* q, const auto* r,
                  const Fusion<scalar_t>* f) {
    at::parallel_for(0, M, std::max<int64_t>(1, kGrain / W), [&](int64_t begin, int64_t end) {
      loop.affine_cl(x, dy, out, W, W, begin, end, m, p, q, r, f, non_temporal);
    });
  };
  if (layout == Layout::kChannelsLast) {
    rows(C, shape.per_channel(), m, p, q, r, fusion);
  } else if (affine_planes_as_rows(layout, shape, dy != nullptr)) {
    const auto mc = per_column(m, C, S), pc = per_column(p, C, S), qc = per_column(q, C, S);
    const auto rc = dy ? per_column(r, C, S) : decltype(mc){};
    const FusionView<scalar_t> columns(fusion, 0, C, S);
    rows(C * S, shape.batch, mc.data(), pc.data(), qc.data(), dy ? rc.data() : nullptr, columns.get());
  } else {
    const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(S, 1));
    at::parallel_for(0, shape.batch * C, grain, [&](int64_t begin, int64_t end) {
      loop.affine_cf(x, dy, out, C, S, begin, end, m, p, q, r, fusion, non_temporal);
    });
  }
}

// Whether training runs its two passes fused, in blocks of channels_per_block
// (fused_channel_blocks), or as a reduction then an affine pass: fused over
// short planes read as rows only, where one parallel region does the work of
// two and a block is still in its core's cache for the second pass; in the
// forward, which reads x alone, only when x fills at least one core's cache
// (kCacheResidentBytes), below which the separate passes find it in cache
// too. Bands of longer planes and runs of planes were slower fused than as
// two passes (python -m benchmarks.kernels --cases r18_s3 r50_s3 r50_s3_mid
// r50_s4 seed_bn3 --formats nchw --phases fwd_train bwd). Returns the
// channels per block, or 0 for two passes.
template <typename scalar_t>
int64_t fused_channels_per_block(Layout layout, const Shape& shape, bool has_dy) {
  if (!short_planes_as_rows(layout, shape) ||
      (!has_dy && op_bytes<scalar_t>(shape.numel(), 1) < kCacheResidentBytes)) {
    return 0;
  }
  return channels_per_block<scalar_t>(layout, shape, has_dy ? 2 : 1);
}

// Short planes, per fused_channels_per_block: reduce (see loops.h) per
// channel with shifts K[C], then out = (x - m) * p + q (+ dy * r) with
// channel c's m, p, q, r from coefficients(c, s1[c], s2[c], &m, &p, &q, &r),
// band by band of per_block channels.
template <typename scalar_t, typename Coefficients>
void fused_channel_blocks(const scalar_t* x, const scalar_t* dy, scalar_t* out, const Shape& shape,
                          int64_t per_block, const at::opmath_type<scalar_t>* shift,
                          const Coefficients& coefficients, const Fusion<scalar_t>* fusion = nullptr) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t C = shape.channels;
  const bool non_temporal = writes_past_cache<scalar_t>(shape, dy != nullptr);
  at::parallel_for(0, ceil_div(C, per_block), 1, [&](int64_t begin, int64_t end) {
    ChannelBand<scalar_t> band(shape, per_block);
    for (int64_t b = begin; b < end; ++b) {
      band.select(b * per_block, std::min(C, (b + 1) * per_block), fusion);
      band.reduce(x, dy, shift, [&](int64_t c, double s1, double s2) {
        opmath_t m, p, q, r;
        coefficients(c, s1, s2, &m, &p, &q, &r);
        band.set_coefficients(c, m, p, q, r);
      });
      band.affine(x, dy, out, non_temporal);
    }
  });
}

}  // namespace cpu
}  // namespace bnfast
