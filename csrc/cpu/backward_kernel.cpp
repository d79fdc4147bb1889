// bnfast::backward on CPU, the fused training backward. With M = N * S:
//   sum_dy = sum(dy), sum_dy_xmu = sum(dy * (x - mean))          (pass 1: x, dy)
//   dx = (dy - sum_dy / M - (x - mean) * invstd^2 * sum_dy_xmu / M)
//        * invstd * weight                                          (pass 2: x, dy -> dx)
//   grad_weight = sum_dy_xmu * invstd,   grad_bias = sum_dy
// 5 tensor passes, the streaming bound; the sums stay in double.
// bnfast::backward_act: the same with dz = dy * act'(z) in place of dy, z
// recomputed from x (and the residual) in both passes, dz written to
// grad_residual when there is a residual; for pre_relu, the sums over
// relu(x) and dx masked by x > 0.
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "../common/checks.h"
#include "../common/layout.h"
#include "../common/op_entries.h"
#include "batch_norm.h"
#include "fusion.h"
#include "output_cache.h"

namespace bnfast {
namespace {

// activation: none for the plain backward. grad_residual: empty unless a residual is given.
Quad backward_impl(const at::Tensor& grad_out_, const at::Tensor& input_, const at::Tensor& mean,
                   const at::Tensor& invstd, const OptionalTensor& weight, const OptionalTensor& bias,
                   const OptionalTensor& residual_, std::optional<Activation> activation, double slope) {
  const auto input = readable(input_);
  const auto grad_out = readable_as(grad_out_, input);
  const auto residual = readable_optional_as(residual_, input);
  const auto layout = layout_of(input);
  const auto shape = shape_of(input);
  auto grad_input = cpu::empty_cached_like(input);
  auto grad_weight = at::empty({shape.channels}, mean.options());
  auto grad_bias = at::empty({shape.channels}, mean.options());
  auto grad_residual = residual.defined() ? cpu::empty_cached_like(input) : at::empty({0}, input.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "bnfast::backward", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const int64_t C = shape.channels;
    const int64_t count = shape.per_channel();
    const auto mu = cpu::channel_values<opmath_t>(mean, C, 0);
    const auto is = cpu::channel_values<opmath_t>(invstd, C, 0);
    std::vector<double> sum_dy(C, 0.0), sum_dy_xmu(C, 0.0);
    auto* gw = grad_weight.mutable_data_ptr<opmath_t>();
    auto* gb = grad_bias.mutable_data_ptr<opmath_t>();
    if (count == 0) {  // an empty batch contributes nothing (invstd is NaN)
      std::fill(gw, gw + C, opmath_t(0));
      std::fill(gb, gb + C, opmath_t(0));
      return;
    }
    const auto w = cpu::channel_values<opmath_t>(weight, C, 1);
    std::optional<cpu::BackwardFusion<scalar_t>> fusion;
    if (activation) {
      fusion.emplace(*activation, slope, residual, residual.defined() ? grad_residual : at::Tensor(), bias,
                     is.data(), w.data(), C);
      fusion->set_grad_residual_from_reduce(true);  // its reduction writes dz there
    }
    cpu::backward_train<scalar_t>(grad_out.const_data_ptr<scalar_t>(), input.const_data_ptr<scalar_t>(),
                                  grad_input.mutable_data_ptr<scalar_t>(), layout, shape, mu.data(), is.data(),
                                  w.data(), sum_dy.data(), sum_dy_xmu.data(), fusion ? fusion->get() : nullptr);
    for (int64_t c = 0; c < C; ++c) {
      gw[c] = static_cast<opmath_t>(sum_dy_xmu[c] * is[c]);
      gb[c] = static_cast<opmath_t>(sum_dy[c]);
    }
  });
  return {grad_input, grad_weight, grad_bias, grad_residual};
}

}  // namespace

TORCH_LIBRARY_IMPL(bnfast, CPU, m) {
  m.impl("backward", &backward_entry<backward_impl>);
  m.impl("backward_act", &backward_act_entry<backward_impl>);
}

}  // namespace bnfast
