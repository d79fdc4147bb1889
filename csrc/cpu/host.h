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

// Channels-first reductions sum a channel in chunks of planes, then add the
// chunk sums in order. Both the chunk-parallel path and the per-channel path
// below use this same order, so they give bitwise equal results.
inline int64_t planes_per_chunk(const Shape& shape) {
  return std::max<int64_t>(1, kGrain / std::max<int64_t>(shape.spatial, 1));
}

template <typename scalar_t>
void reduce_channel_cf(const scalar_t* x, const scalar_t* dy, const Shape& shape, int64_t c,
                       at::opmath_type<scalar_t> shift, double* s1, double* s2) {
  const auto& loop = loops<scalar_t>();
  const int64_t step = planes_per_chunk(shape);
  double t1 = 0, t2 = 0;
  for (int64_t n0 = 0; n0 < shape.batch; n0 += step) {
    double p1 = 0, p2 = 0;
    loop.reduce_cf(x, dy, shape.channels, shape.spatial, c, n0, std::min(shape.batch, n0 + step),
                   shift, &p1, &p2);
    t1 += p1;
    t2 += p2;
  }
  *s1 = t1;
  *s2 = t2;
}

// Channels-first work is done one channel per task when there are enough
// channels to keep every thread busy and a channel's data (bytes_per_element
// per element: x, or x and dy) fits in a core's L2 cache: the elementwise pass
// then re-reads it from L2 instead of memory (forward: 2 memory passes instead
// of 3; backward: 3 instead of 5). Performance assumption: >= 512 KiB of L2
// per core, true of current x86-64 server and desktop cores.
constexpr int64_t kChannelCacheBytes = 512 * 1024;

inline bool per_channel_tasks(Layout layout, const Shape& shape, int64_t bytes_per_element) {
  return layout == Layout::kChannelsFirst && shape.channels >= at::get_num_threads() &&
         shape.per_channel() * bytes_per_element <= kChannelCacheBytes;
}

// s1[c], s2[c] = per-channel sums of reduce (see loops.h) over the whole input.
template <typename scalar_t>
void channel_sums(const scalar_t* x, const scalar_t* dy, Layout layout, const Shape& shape,
                  const at::opmath_type<scalar_t>* shift, double* s1, double* s2) {
  using opmath_t = at::opmath_type<scalar_t>;
  const auto& loop = loops<scalar_t>();
  const int64_t C = shape.channels;
  if (layout == Layout::kChannelsFirst) {
    const int64_t N = shape.batch;
    const int64_t step = planes_per_chunk(shape);
    const int64_t chunks = ceil_div(N, step);
    std::vector<double> partial(2 * C * chunks, 0.0);
    at::parallel_for(0, C * chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t c = task / chunks, n0 = (task % chunks) * step;
        loop.reduce_cf(x, dy, C, shape.spatial, c, n0, std::min(N, n0 + step), shift[c],
                       &partial[2 * task], &partial[2 * task + 1]);
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
at::opmath_type<scalar_t> first_element(const scalar_t* x, Layout layout, const Shape& shape,
                                        int64_t c) {
  return static_cast<at::opmath_type<scalar_t>>(
      layout == Layout::kChannelsFirst ? x[c * shape.spatial] : x[c]);
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

// y = (x - mean) * invstd * weight + bias  ==  x * scale + shift.
template <typename opmath_t>
void normalize_coefficients(opmath_t mean, opmath_t invstd, opmath_t weight, opmath_t bias,
                            opmath_t* scale, opmath_t* shift) {
  const double s = static_cast<double>(invstd) * weight;
  *scale = static_cast<opmath_t>(s);
  *shift = static_cast<opmath_t>(bias - mean * s);
}

// dx = (dy - mean_dy - (x - mean) * invstd^2 * mean_dy_xmu) * invstd * weight
//    == dy * r + x * p + q  with
// r = invstd * weight,  p = -r * invstd^2 * mean_dy_xmu,  q = -r * mean_dy - p * mean.
template <typename opmath_t>
void grad_coefficients(opmath_t mean, opmath_t invstd, opmath_t weight, double mean_dy,
                       double mean_dy_xmu, opmath_t* p, opmath_t* q, opmath_t* r) {
  const double is = invstd;
  const double rc = is * weight;
  const double pc = -rc * is * is * mean_dy_xmu;
  *r = static_cast<opmath_t>(rc);
  *p = static_cast<opmath_t>(pc);
  *q = static_cast<opmath_t>(-rc * mean_dy - pc * mean);
}

// out = x * p[c] + q[c] (+ dy * r[c]) over channel c's planes only.
template <typename scalar_t>
void channel_affine_one(const scalar_t* x, const scalar_t* dy, scalar_t* out, const Shape& shape,
                        int64_t c, const at::opmath_type<scalar_t>* p,
                        const at::opmath_type<scalar_t>* q, const at::opmath_type<scalar_t>* r) {
  const auto& loop = loops<scalar_t>();
  for (int64_t n = 0; n < shape.batch; ++n) {
    const int64_t plane = n * shape.channels + c;
    loop.affine_cf(x, dy, out, shape.channels, shape.spatial, plane, plane + 1, p, q, r);
  }
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
  std::vector<opmath_t> shift(padded_channels(C), 0);
  for (int64_t c = 0; c < C; ++c) shift[c] = first_element(x, layout, shape, c);
  std::vector<double> s1(C), s2(C);
  channel_sums<scalar_t>(x, nullptr, layout, shape, shift.data(), s1.data(), s2.data());
  for (int64_t c = 0; c < C; ++c) {
    stats_from_sums(s1[c], s2[c], count, shift[c], eps, &mean[c], &invstd[c]);
  }
}

// y = (x - mean) * invstd * weight + bias.
template <typename scalar_t>
void normalize(const scalar_t* x, scalar_t* out, Layout layout, const Shape& shape,
               const at::opmath_type<scalar_t>* mean, const at::opmath_type<scalar_t>* invstd,
               const at::opmath_type<scalar_t>* weight, const at::opmath_type<scalar_t>* bias) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t C = shape.channels;
  std::vector<opmath_t> scale(padded_channels(C), 0), shift(padded_channels(C), 0);
  for (int64_t c = 0; c < C; ++c) {
    normalize_coefficients(mean[c], invstd[c], weight[c], bias[c], &scale[c], &shift[c]);
  }
  channel_affine<scalar_t>(x, nullptr, out, layout, shape, scale.data(), shift.data(), nullptr);
}

// The training forward: batch statistics, then y. Per-channel tasks keep each
// channel in cache between the two (see per_channel_tasks).
template <typename scalar_t>
void forward_train(const scalar_t* x, scalar_t* out, Layout layout, const Shape& shape,
                   double eps, at::opmath_type<scalar_t>* mean, at::opmath_type<scalar_t>* invstd,
                   const at::opmath_type<scalar_t>* weight, const at::opmath_type<scalar_t>* bias) {
  using opmath_t = at::opmath_type<scalar_t>;
  if (shape.per_channel() == 0 || !per_channel_tasks(layout, shape, sizeof(scalar_t))) {
    batch_stats<scalar_t>(x, layout, shape, eps, mean, invstd);
    if (shape.per_channel() > 0) normalize<scalar_t>(x, out, layout, shape, mean, invstd, weight, bias);
    return;
  }
  const int64_t C = shape.channels;
  std::vector<opmath_t> scale(padded_channels(C), 0), shift(padded_channels(C), 0);
  at::parallel_for(0, C, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const opmath_t k = first_element(x, layout, shape, c);
      double s1, s2;
      reduce_channel_cf<scalar_t>(x, nullptr, shape, c, k, &s1, &s2);
      stats_from_sums(s1, s2, shape.per_channel(), k, eps, &mean[c], &invstd[c]);
      normalize_coefficients(mean[c], invstd[c], weight[c], bias[c], &scale[c], &shift[c]);
      channel_affine_one<scalar_t>(x, nullptr, out, shape, c, scale.data(), shift.data(), nullptr);
    }
  });
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
  const int64_t C = shape.channels;
  const int64_t Cp = padded_channels(C);
  std::vector<opmath_t> p(Cp, 0), q(Cp, 0), r(Cp, 0);
  for (int64_t c = 0; c < C; ++c) {
    grad_coefficients(mean[c], invstd[c], weight[c], mean_dy[c], mean_dy_xmu[c], &p[c], &q[c], &r[c]);
  }
  channel_affine<scalar_t>(x, dy, dx, layout, shape, p.data(), q.data(), r.data());
}

// The training backward: sum_dy, sum_dy_xmu (returned), then dx with
// mean_dy = sum_dy / M, mean_dy_xmu = sum_dy_xmu / M. Per-channel tasks keep
// x and dy of a channel in cache between the two passes.
template <typename scalar_t>
void backward_train(const scalar_t* dy, const scalar_t* x, scalar_t* dx, Layout layout,
                    const Shape& shape, const at::opmath_type<scalar_t>* mean,
                    const at::opmath_type<scalar_t>* invstd, const at::opmath_type<scalar_t>* weight,
                    double* sum_dy, double* sum_dy_xmu) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t C = shape.channels;
  const int64_t count = shape.per_channel();
  if (!per_channel_tasks(layout, shape, 2 * sizeof(scalar_t))) {
    grad_sums<scalar_t>(dy, x, layout, shape, mean, sum_dy, sum_dy_xmu);
    std::vector<double> mean_dy(C), mean_dy_xmu(C);
    for (int64_t c = 0; c < C; ++c) {
      mean_dy[c] = sum_dy[c] / count;
      mean_dy_xmu[c] = sum_dy_xmu[c] / count;
    }
    grad_input<scalar_t>(dy, x, dx, layout, shape, mean, invstd, weight, mean_dy.data(), mean_dy_xmu.data());
    return;
  }
  const int64_t Cp = padded_channels(C);
  std::vector<opmath_t> p(Cp, 0), q(Cp, 0), r(Cp, 0);
  at::parallel_for(0, C, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      reduce_channel_cf<scalar_t>(x, dy, shape, c, mean[c], &sum_dy[c], &sum_dy_xmu[c]);
      grad_coefficients(mean[c], invstd[c], weight[c], sum_dy[c] / count, sum_dy_xmu[c] / count,
                        &p[c], &q[c], &r[c]);
      channel_affine_one<scalar_t>(x, dy, dx, shape, c, p.data(), q.data(), r.data());
    }
  });
}

}  // namespace cpu
}  // namespace bnfast
