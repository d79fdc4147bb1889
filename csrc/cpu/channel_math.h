// Per-channel values and math shared by the CPU op files: parameters read as
// opmath, the shifts of the statistics, statistics from shifted sums, and the
// coefficients of the input gradient.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <utility>
#include <vector>

#include "../common/shape.h"
#include "loops.h"

namespace bnfast {
namespace cpu {

// A per-channel vector (weight, bias, mean...) read as opmath_t whatever its
// floating dtype and stride; `fallback` where the tensor is absent.
template <typename opmath_t>
std::vector<opmath_t> channel_values(const std::optional<at::Tensor>& t, int64_t C,
                                     opmath_t fallback) {
  std::vector<opmath_t> values(C, fallback);
  if (!(t.has_value() && t->defined())) return values;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t->scalar_type(), "channel_values", [&] {
    const auto a = t->accessor<scalar_t, 1>();
    for (int64_t c = 0; c < C; ++c) values[c] = static_cast<opmath_t>(a[c]);
  });
  return values;
}

// The shift K[c] for statistics: the mean of up to kShiftSamples elements
// spread evenly over the channel (as the loops read them: relu'd for a
// pre_relu fusion). The shifted sums lose about (|K - mean| / std)^2 of
// their relative precision to cancellation. One sample can sit far out in a
// skewed channel (a relu'd channel that is nearly all 0 but for one sample of
// 0.5), the mean of several rarely does. NB: infinite and NaN samples are
// skipped (they would poison every x - K); any finite shift is correct.
constexpr int64_t kShiftSamples = 8;

// K[c] for every channel, padded for the row loops. Sample j of every
// channel sits at the same index m_j = n * S + s, so its offsets are found
// once per sample (no division per channel) and, channels-last, read as one
// row.
template <typename scalar_t>
std::vector<at::opmath_type<scalar_t>> channel_shifts(const scalar_t* x, Layout layout, const Shape& shape,
                                                      bool relu = false) {
  const int64_t M = shape.per_channel(), S = shape.spatial, C = shape.channels;
  const int64_t samples = std::min(kShiftSamples, M);
  std::vector<double> sum(C, 0.0);
  std::vector<int64_t> finite(C, 0);
  for (int64_t j = 0; j < samples; ++j) {
    const int64_t m = j * M / samples;
    // Offset of channel c: base + c * stride.
    const int64_t base = layout == Layout::kChannelsFirst ? m / S * C * S + m % S : m * C;
    const int64_t stride = layout == Layout::kChannelsFirst ? S : 1;
    for (int64_t c = 0; c < C; ++c) {
      double v = static_cast<double>(x[base + c * stride]);
      if (relu && v < 0) v = 0;
      if (std::isfinite(v)) {
        sum[c] += v;
        ++finite[c];
      }
    }
  }
  std::vector<at::opmath_type<scalar_t>> shift(padded_channels(C), 0);
  for (int64_t c = 0; c < C; ++c) {
    shift[c] = static_cast<at::opmath_type<scalar_t>>(finite[c] ? sum[c] / finite[c] : 0.0);
  }
  return shift;
}

template <typename scalar_t>
bool pre_relu(const Fusion<scalar_t>* fusion) {
  return fusion && fusion->pre_relu;
}

// A fusion's z coefficients for the backward (loops.h): zp = invstd * weight
// and zq = bias per channel, computed as the forward's affine step computed
// them, so z comes out bitwise the same; padded for the row loops.
template <typename opmath_t>
std::pair<std::vector<opmath_t>, std::vector<opmath_t>> z_coefficients(const opmath_t* invstd,
                                                                         const opmath_t* weight,
                                                                         const opmath_t* bias, int64_t C) {
  std::vector<opmath_t> zp(padded_channels(C), 0), zq(padded_channels(C), 0);
  for (int64_t c = 0; c < C; ++c) {
    zp[c] = static_cast<opmath_t>(static_cast<double>(invstd[c]) * weight[c]);
    zq[c] = bias[c];
  }
  return {std::move(zp), std::move(zq)};
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

}  // namespace cpu
}  // namespace bnfast
