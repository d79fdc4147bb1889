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
#include <vector>

#include "../common/layout.h"
#include "loops.h"

namespace bnfast {
namespace cpu {

// Elements per chunk of work: large enough to amortize a task, small enough
// to split the seed CNN's smallest layer (128x64x4x4) across cores.
constexpr int64_t kGrain = 32768;
// Channels-last partial sums are [chunks][2][C] doubles; cap the chunk count.
constexpr int64_t kMaxRowChunks = 64;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// s1[c], s2[c] = per-channel sums of reduce (see loops.h) over the whole input.
template <typename scalar_t>
void channel_sums(const scalar_t* x, const scalar_t* dy, Layout layout, const Shape& shape,
                  const at::opmath_type<scalar_t>* shift, double* s1, double* s2) {
  using opmath_t = at::opmath_type<scalar_t>;
  const auto& loop = loops<scalar_t>();
  const int64_t C = shape.channels;
  if (layout == Layout::kChannelsFirst) {
    const int64_t N = shape.batch, S = shape.spatial;
    const int64_t planes_per_chunk = std::max<int64_t>(1, kGrain / std::max<int64_t>(S, 1));
    const int64_t chunks = ceil_div(N, planes_per_chunk);
    std::vector<double> partial(2 * C * chunks, 0.0);
    at::parallel_for(0, C * chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t c = task / chunks, chunk = task % chunks;
        const int64_t n0 = chunk * planes_per_chunk;
        const int64_t n1 = std::min(N, n0 + planes_per_chunk);
        loop.reduce_cf(x, dy, C, S, c, n0, n1, shift[c], &partial[2 * task], &partial[2 * task + 1]);
      }
    });
    for (int64_t c = 0; c < C; ++c) {
      double t1 = 0, t2 = 0;
      for (int64_t chunk = 0; chunk < chunks; ++chunk) {
        t1 += partial[2 * (c * chunks + chunk)];
        t2 += partial[2 * (c * chunks + chunk) + 1];
      }
      s1[c] = t1;
      s2[c] = t2;
    }
  } else {
    const int64_t M = shape.per_channel();
    const int64_t rows_per_chunk =
        std::max(ceil_div(kGrain, C), ceil_div(M, kMaxRowChunks));
    const int64_t chunks = ceil_div(M, rows_per_chunk);
    std::vector<double> partial(2 * C * chunks, 0.0);
    at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
      std::vector<opmath_t> scratch(2 * padded_channels(C));
      for (int64_t chunk = begin; chunk < end; ++chunk) {
        const int64_t m0 = chunk * rows_per_chunk;
        const int64_t m1 = std::min(M, m0 + rows_per_chunk);
        double* p = &partial[2 * C * chunk];
        loop.reduce_cl(x, dy, C, m0, m1, shift, p, p + C, scratch.data());
      }
    });
    std::fill(s1, s1 + C, 0.0);
    std::fill(s2, s2 + C, 0.0);
    for (int64_t chunk = 0; chunk < chunks; ++chunk) {
      const double* p = &partial[2 * C * chunk];
      for (int64_t c = 0; c < C; ++c) {
        s1[c] += p[c];
        s2[c] += p[C + c];
      }
    }
  }
}

// out = x * p[c] + q[c] (+ dy * r[c]) over the whole input.
template <typename scalar_t>
void channel_affine(const scalar_t* x, const scalar_t* dy, scalar_t* out, Layout layout,
                    const Shape& shape, const at::opmath_type<scalar_t>* p,
                    const at::opmath_type<scalar_t>* q, const at::opmath_type<scalar_t>* r) {
  const auto& loop = loops<scalar_t>();
  const int64_t C = shape.channels;
  if (layout == Layout::kChannelsFirst) {
    const int64_t S = shape.spatial;
    const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(S, 1));
    at::parallel_for(0, shape.batch * C, grain, [&](int64_t begin, int64_t end) {
      loop.affine_cf(x, dy, out, C, S, begin, end, p, q, r);
    });
  } else {
    const int64_t grain = std::max<int64_t>(1, kGrain / C);
    at::parallel_for(0, shape.per_channel(), grain, [&](int64_t begin, int64_t end) {
      loop.affine_cl(x, dy, out, C, begin, end, p, q, r);
    });
  }
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
// the shifted sums need to stay free of cancellation.
template <typename scalar_t>
std::vector<at::opmath_type<scalar_t>> first_elements(const scalar_t* x, Layout layout,
                                                      const Shape& shape) {
  std::vector<at::opmath_type<scalar_t>> shift(padded_channels(shape.channels), 0);
  if (shape.per_channel() == 0) return shift;
  for (int64_t c = 0; c < shape.channels; ++c) {
    shift[c] = static_cast<at::opmath_type<scalar_t>>(
        layout == Layout::kChannelsFirst ? x[c * shape.spatial] : x[c]);
  }
  return shift;
}

// mean and invstd of one batch. An empty batch has no statistics: NaN.
template <typename scalar_t>
void batch_stats(const scalar_t* x, Layout layout, const Shape& shape, double eps,
                 at::opmath_type<scalar_t>* mean, at::opmath_type<scalar_t>* invstd) {
  const int64_t C = shape.channels;
  const int64_t count = shape.per_channel();
  if (count == 0) {
    std::fill(mean, mean + C, std::numeric_limits<double>::quiet_NaN());
    std::fill(invstd, invstd + C, std::numeric_limits<double>::quiet_NaN());
    return;
  }
  const auto shift = first_elements(x, layout, shape);
  std::vector<double> s1(C), s2(C);
  channel_sums<scalar_t>(x, nullptr, layout, shape, shift.data(), s1.data(), s2.data());
  for (int64_t c = 0; c < C; ++c) {
    const double mean_shifted = s1[c] / count;
    // NB: s2 / count - mean_shifted^2 is a difference of two O(var) terms
    // (the shift keeps mean_shifted within a few std), so it cannot cancel
    // catastrophically; clamp the last-ulp negative results of constant data.
    const double var = std::max(s2[c] / count - mean_shifted * mean_shifted, 0.0);
    mean[c] = static_cast<double>(shift[c]) + mean_shifted;
    invstd[c] = 1.0 / std::sqrt(var + eps);
  }
}

// y = (x - mean) * invstd * weight + bias, as y = x * scale + shift.
template <typename scalar_t>
void normalize(const scalar_t* x, scalar_t* out, Layout layout, const Shape& shape,
               const at::opmath_type<scalar_t>* mean, const at::opmath_type<scalar_t>* invstd,
               const at::opmath_type<scalar_t>* weight, const at::opmath_type<scalar_t>* bias) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t C = shape.channels;
  std::vector<opmath_t> scale(padded_channels(C), 0), shift(padded_channels(C), 0);
  for (int64_t c = 0; c < C; ++c) {
    const double s = static_cast<double>(invstd[c]) * weight[c];
    scale[c] = static_cast<opmath_t>(s);
    shift[c] = static_cast<opmath_t>(bias[c] - mean[c] * s);
  }
  channel_affine<scalar_t>(x, nullptr, out, layout, shape, scale.data(), shift.data(), nullptr);
}

// sum_dy[c] = sum(dy), sum_dy_xmu[c] = sum(dy * (x - mean)).
template <typename scalar_t>
void grad_sums(const scalar_t* dy, const scalar_t* x, Layout layout, const Shape& shape,
               const at::opmath_type<scalar_t>* mean, double* sum_dy, double* sum_dy_xmu) {
  std::vector<at::opmath_type<scalar_t>> shift(mean, mean + shape.channels);
  shift.resize(padded_channels(shape.channels), 0);
  channel_sums<scalar_t>(x, dy, layout, shape, shift.data(), sum_dy, sum_dy_xmu);
}

// dx = (dy - mean_dy - (x - mean) * invstd^2 * mean_dy_xmu) * invstd * weight,
// as dx = dy * r + x * p + q with
//   r = invstd * weight,  p = -r * invstd^2 * mean_dy_xmu,  q = -r * mean_dy - p * mean.
template <typename scalar_t>
void grad_input(const scalar_t* dy, const scalar_t* x, scalar_t* dx, Layout layout,
                const Shape& shape, const at::opmath_type<scalar_t>* mean,
                const at::opmath_type<scalar_t>* invstd, const at::opmath_type<scalar_t>* weight,
                const double* mean_dy, const double* mean_dy_xmu) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t C = shape.channels;
  const int64_t Cp = padded_channels(C);
  std::vector<opmath_t> p(Cp, 0), q(Cp, 0), r(Cp, 0);
  for (int64_t c = 0; c < C; ++c) {
    const double is = invstd[c];
    const double rc = is * weight[c];
    const double pc = -rc * is * is * mean_dy_xmu[c];
    r[c] = static_cast<opmath_t>(rc);
    p[c] = static_cast<opmath_t>(pc);
    q[c] = static_cast<opmath_t>(-rc * mean_dy[c] - pc * mean[c]);
  }
  channel_affine<scalar_t>(x, dy, dx, layout, shape, p.data(), q.data(), r.data());
}

}  // namespace cpu
}  // namespace bnfast
