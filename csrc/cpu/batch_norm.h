// The batch-norm algorithms of the CPU op files, over raw pointers: batch
// statistics, normalization, and the fused training forward and backward,
// each choosing its pass structure by layout and shape (parallel.h).
#pragma once

#include <limits>
#include <vector>

#include "channel_math.h"
#include "parallel.h"

namespace bnfast {
namespace cpu {

// mean and invstd of one batch. An empty batch has no statistics: NaN.
// fusion: a pre_relu fusion takes the statistics of relu(x).
template <typename scalar_t>
void batch_stats(const scalar_t* x, Layout layout, const Shape& shape, double eps,
                 at::opmath_type<scalar_t>* mean, at::opmath_type<scalar_t>* invstd,
                 const Fusion<scalar_t>* fusion = nullptr) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t C = shape.channels;
  const int64_t count = shape.per_channel();
  if (count == 0) {
    std::fill(mean, mean + C, std::numeric_limits<opmath_t>::quiet_NaN());
    std::fill(invstd, invstd + C, std::numeric_limits<opmath_t>::quiet_NaN());
    return;
  }
  const auto shift = channel_shifts(x, layout, shape, pre_relu(fusion));
  std::vector<double> s1(C), s2(C);
  channel_sums<scalar_t>(x, nullptr, layout, shape, shift.data(), s1.data(), s2.data(), fusion);
  for (int64_t c = 0; c < C; ++c) {
    stats_from_sums(s1[c], s2[c], count, shift[c], eps, &mean[c], &invstd[c]);
  }
}

// y = (x - mean) * (invstd * weight) + bias, then the fusion's activation.
template <typename scalar_t>
void normalize(const scalar_t* x, scalar_t* out, Layout layout, const Shape& shape,
               const at::opmath_type<scalar_t>* mean, const at::opmath_type<scalar_t>* invstd,
               const at::opmath_type<scalar_t>* weight, const at::opmath_type<scalar_t>* bias,
               const Fusion<scalar_t>* fusion = nullptr) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t Cp = padded_channels(shape.channels);
  std::vector<opmath_t> centre(mean, mean + shape.channels), scale(Cp, 0), shift(bias, bias + shape.channels);
  centre.resize(Cp, 0);
  shift.resize(Cp, 0);
  opmath_t* __restrict scale_out = scale.data();  // a loop the compiler vectorizes
  for (int64_t c = 0; c < shape.channels; ++c) {
    scale_out[c] = static_cast<opmath_t>(static_cast<double>(invstd[c]) * weight[c]);
  }
  channel_affine<scalar_t>(x, nullptr, out, layout, shape, centre.data(), scale.data(), shift.data(),
                           nullptr, fusion);
}

// The training forward: batch statistics (one pass), then y (a second pass;
// from L3 cache when the tensor fits there).
template <typename scalar_t>
void forward_train(const scalar_t* x, scalar_t* out, Layout layout, const Shape& shape,
                   double eps, at::opmath_type<scalar_t>* mean, at::opmath_type<scalar_t>* invstd,
                   const at::opmath_type<scalar_t>* weight, const at::opmath_type<scalar_t>* bias,
                   const Fusion<scalar_t>* fusion = nullptr) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t per_block = fused_channels_per_block<scalar_t>(layout, shape, /*has_dy=*/false);
  if (per_block > 0) {
    const int64_t count = shape.per_channel();
    const auto shift = channel_shifts(x, layout, shape, pre_relu(fusion));
    fused_channel_blocks<scalar_t>(
        x, nullptr, out, shape, per_block, shift.data(),
        [&](int64_t c, double s1, double s2, opmath_t* m, opmath_t* p, opmath_t* q, opmath_t* r) {
          stats_from_sums(s1, s2, count, shift[c], eps, &mean[c], &invstd[c]);
          *m = mean[c];  // as normalize does
          *p = static_cast<opmath_t>(static_cast<double>(invstd[c]) * weight[c]);
          *q = bias[c];
          *r = 0;
        },
        fusion);
    return;
  }
  batch_stats<scalar_t>(x, layout, shape, eps, mean, invstd, fusion);
  if (shape.per_channel() > 0) normalize<scalar_t>(x, out, layout, shape, mean, invstd, weight, bias, fusion);
}

// sum_dy[c] = sum(dy), sum_dy_xmu[c] = sum(dy * (x - mean)), with dy
// through the fusion's activation derivative.
template <typename scalar_t>
void grad_sums(const scalar_t* dy, const scalar_t* x, Layout layout, const Shape& shape,
               const at::opmath_type<scalar_t>* mean, double* sum_dy, double* sum_dy_xmu,
               const Fusion<scalar_t>* fusion = nullptr) {
  std::vector<at::opmath_type<scalar_t>> shift(mean, mean + shape.channels);
  shift.resize(padded_channels(shape.channels), 0);
  channel_sums<scalar_t>(x, dy, layout, shape, shift.data(), sum_dy, sum_dy_xmu, fusion);
}

// dx = (dy - mean_dy - (x - mean) * invstd^2 * mean_dy_xmu) * invstd * weight.
template <typename scalar_t>
void grad_input(const scalar_t* dy, const scalar_t* x, scalar_t* dx, Layout layout,
                const Shape& shape, const at::opmath_type<scalar_t>* mean,
                const at::opmath_type<scalar_t>* invstd, const at::opmath_type<scalar_t>* weight,
                const double* mean_dy, const double* mean_dy_xmu, const Fusion<scalar_t>* fusion = nullptr) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t Cp = padded_channels(shape.channels);
  std::vector<opmath_t> centre(Cp, 0), p(Cp, 0), q(Cp, 0), r(Cp, 0);
  for (int64_t c = 0; c < shape.channels; ++c) {
    centre[c] = mean[c];
    grad_coefficients(invstd[c], weight[c], mean_dy[c], mean_dy_xmu[c], &p[c], &q[c], &r[c]);
  }
  channel_affine<scalar_t>(x, dy, dx, layout, shape, centre.data(), p.data(), q.data(), r.data(), fusion);
}

// The training backward: sum_dy, sum_dy_xmu (returned), then dx with
// mean_dy = sum_dy / M, mean_dy_xmu = sum_dy_xmu / M. A fusion with an
// activation needs its zp, zq set (z_coefficients).
template <typename scalar_t>
void backward_train(const scalar_t* dy, const scalar_t* x, scalar_t* dx, Layout layout,
                    const Shape& shape, const at::opmath_type<scalar_t>* mean,
                    const at::opmath_type<scalar_t>* invstd, const at::opmath_type<scalar_t>* weight,
                    double* sum_dy, double* sum_dy_xmu, const Fusion<scalar_t>* fusion = nullptr) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t C = shape.channels;
  const int64_t count = shape.per_channel();
  const int64_t per_block = fused_channels_per_block<scalar_t>(layout, shape, /*has_dy=*/true);
  if (per_block > 0) {
    fused_channel_blocks<scalar_t>(
        x, dy, dx, shape, per_block, mean,
        [&](int64_t c, double s1, double s2, opmath_t* m, opmath_t* p, opmath_t* q, opmath_t* r) {
          sum_dy[c] = s1;
          sum_dy_xmu[c] = s2;
          *m = mean[c];  // as grad_input does
          grad_coefficients(invstd[c], weight[c], s1 / count, s2 / count, p, q, r);
        },
        fusion);
    return;
  }
  grad_sums<scalar_t>(dy, x, layout, shape, mean, sum_dy, sum_dy_xmu, fusion);
  std::vector<double> mean_dy(C), mean_dy_xmu(C);
  for (int64_t c = 0; c < C; ++c) {
    mean_dy[c] = sum_dy[c] / count;
    mean_dy_xmu[c] = sum_dy_xmu[c] / count;
  }
  grad_input<scalar_t>(dy, x, dx, layout, shape, mean, invstd, weight, mean_dy.data(), mean_dy_xmu.data(),
                       fusion);
}

}  // namespace cpu
}  // namespace bnfast
