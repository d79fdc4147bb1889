// bnfast::backward_elemt on CPU:
//   dx = (dy - mean_dy - (x - mean) * invstd^2 * mean_dy_xmu) * invstd * weight
// one pass reading x and dy and writing dx (coefficients in host.h grad_input).
// bnfast::backward_elemt_act: the same with dz = dy * act'(z) in place of dy,
// dx masked where x <= 0 for pre_relu and dz written to grad_residual, as
// backward_act's second pass does.
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "../common/checks.h"
#include "../common/layout.h"
#include "batch_norm.h"
#include "fusion.h"
#include "output_cache.h"

namespace bnfast {
namespace {

// activation: none for the plain backward_elemt; else dz in place of dy (as
// backward_reduce_act), written to grad_residual when there is a residual.
// Returns grad_input and grad_residual (an empty tensor without residual).
std::tuple<at::Tensor, at::Tensor> backward_elemt_impl(const at::Tensor& grad_out_, const at::Tensor& input_,
                                                       const at::Tensor& mean, const at::Tensor& invstd,
                                                       const OptionalTensor& weight, const OptionalTensor& bias,
                                                       const OptionalTensor& residual_,
                                                       std::optional<Activation> activation, double slope,
                                                       const at::Tensor& mean_dy, const at::Tensor& mean_dy_xmu) {
  const auto input = readable(input_);
  const auto grad_out = readable_as(grad_out_, input);
  const auto residual = readable_optional_as(residual_, input);
  const auto layout = layout_of(input);
  const auto shape = shape_of(input);
  auto grad_input = cpu::empty_cached_like(input);
  auto grad_residual = residual.defined() ? cpu::empty_cached_like(input) : at::empty({0}, input.options());
  if (input.numel() == 0) return {grad_input, grad_residual};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "bnfast::backward_elemt", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const int64_t C = shape.channels;
    const auto mu = cpu::channel_values<opmath_t>(mean, C, 0);
    const auto is = cpu::channel_values<opmath_t>(invstd, C, 0);
    const auto w = cpu::channel_values<opmath_t>(weight, C, 1);
    const auto mdy = cpu::channel_values<double>(mean_dy, C, 0);
    const auto mdyx = cpu::channel_values<double>(mean_dy_xmu, C, 0);
    std::optional<cpu::BackwardFusion<scalar_t>> fusion;
    if (activation) {
      fusion.emplace(*activation, slope, residual, residual.defined() ? grad_residual : at::Tensor(), bias,
                     is.data(), w.data(), C);
    }
    cpu::grad_input<scalar_t>(grad_out.const_data_ptr<scalar_t>(), input.const_data_ptr<scalar_t>(),
                              grad_input.mutable_data_ptr<scalar_t>(), layout, shape, mu.data(),
                              is.data(), w.data(), mdy.data(), mdyx.data(), fusion ? fusion->get() : nullptr);
  });
  return {grad_input, grad_residual};
}

at::Tensor backward_elemt_cpu(const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& mean,
                              const at::Tensor& invstd, const OptionalTensor& weight, const at::Tensor& mean_dy,
                              const at::Tensor& mean_dy_xmu) {
  check_backward_elemt(grad_out, input, mean, invstd, weight, mean_dy, mean_dy_xmu);
  return std::get<0>(backward_elemt_impl(grad_out, input, mean, invstd, weight, std::nullopt, std::nullopt,
                                         std::nullopt, 0.0, mean_dy, mean_dy_xmu));
}

std::tuple<at::Tensor, at::Tensor> backward_elemt_act_cpu(
    const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& mean, const at::Tensor& invstd,
    const OptionalTensor& weight, const OptionalTensor& bias, const OptionalTensor& residual, c10::string_view act,
    double slope, const at::Tensor& mean_dy, const at::Tensor& mean_dy_xmu) {
  const auto activation = check_backward_elemt_act(grad_out, input, mean, invstd, weight, bias, residual, act,
                                                   mean_dy, mean_dy_xmu);
  return backward_elemt_impl(grad_out, input, mean, invstd, weight, bias, residual, activation, slope, mean_dy,
                             mean_dy_xmu);
}

}  // namespace

TORCH_LIBRARY_IMPL(bnfast, CPU, m) {
  m.impl("backward_elemt", &backward_elemt_cpu);
  m.impl("backward_elemt_act", &backward_elemt_act_cpu);
}

}  // namespace bnfast
