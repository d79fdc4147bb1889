// bnfast::elemt on CPU: y = (x - mean) * invstd * weight + bias per channel,
// applied as y = (x - mean) * scale + bias with scale = invstd * weight
// (computed in double per channel); one pass reading x and writing y.
// bnfast::elemt_running: the same with invstd from the running variance.
// bnfast::elemt_act: the same with an activation (and residual), or with
// relu(x) read (csrc/common/activation.h).
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <cmath>
#include <optional>

#include "../common/checks.h"
#include "../common/layout.h"
#include "batch_norm.h"
#include "fusion.h"
#include "output_cache.h"

namespace bnfast {
namespace {

// activation: none for the plain elemt. var_eps: set when `invstd` holds the
// running variance, then invstd = 1 / sqrt(var + eps) in opmath, rounded as
// the ATen ops (to, add, rsqrt) of the stats dtype round it.
at::Tensor elemt_impl(const at::Tensor& input_, const OptionalTensor& weight, const OptionalTensor& bias,
                      const at::Tensor& mean, const at::Tensor& invstd, const OptionalTensor& residual_,
                      std::optional<Activation> activation, double slope, std::optional<double> var_eps = std::nullopt) {
  const auto input = readable(input_);
  const auto residual = readable_optional_as(residual_, input);
  const auto layout = layout_of(input);
  const auto shape = shape_of(input);
  auto output = cpu::empty_cached_like(input);
  if (input.numel() == 0) return output;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "bnfast::elemt", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const int64_t C = shape.channels;
    const auto w = cpu::channel_values<opmath_t>(weight, C, 1);
    const auto b = cpu::channel_values<opmath_t>(bias, C, 0);
    const auto mu = cpu::channel_values<opmath_t>(mean, C, 0);
    auto is = cpu::channel_values<opmath_t>(invstd, C, 0);
    if (var_eps) {
      for (auto& v : is) v = opmath_t(1) / std::sqrt(v + static_cast<opmath_t>(*var_eps));
    }
    const auto fusion = activation ? std::optional(cpu::make_fusion<scalar_t>(*activation, slope, residual))
                                   : std::nullopt;
    cpu::normalize<scalar_t>(input.const_data_ptr<scalar_t>(), output.mutable_data_ptr<scalar_t>(), layout, shape,
                             mu.data(), is.data(), w.data(), b.data(), fusion ? &*fusion : nullptr);
  });
  return output;
}

at::Tensor elemt_cpu(const at::Tensor& input, const OptionalTensor& weight, const OptionalTensor& bias,
                     const at::Tensor& mean, const at::Tensor& invstd) {
  check_elemt(input, weight, bias, mean, invstd);
  return elemt_impl(input, weight, bias, mean, invstd, std::nullopt, std::nullopt, 0.0);
}

at::Tensor elemt_running_cpu(const at::Tensor& input, const OptionalTensor& weight, const OptionalTensor& bias,
                             const at::Tensor& running_mean, const at::Tensor& running_var, double eps) {
  check_elemt_running(input, weight, bias, running_mean, running_var);
  return elemt_impl(input, weight, bias, running_mean, running_var, std::nullopt, std::nullopt, 0.0, eps);
}

at::Tensor elemt_act_cpu(const at::Tensor& input, const OptionalTensor& weight, const OptionalTensor& bias,
                         const at::Tensor& mean, const at::Tensor& invstd, const OptionalTensor& residual,
                         c10::string_view act, double slope) {
  const auto activation = check_elemt_act(input, weight, bias, mean, invstd, residual, act);
  return elemt_impl(input, weight, bias, mean, invstd, residual, activation, slope);
}

}  // namespace

TORCH_LIBRARY_IMPL(bnfast, CPU, m) {
  m.impl("elemt", &elemt_cpu);
  m.impl("elemt_running", &elemt_running_cpu);
  m.impl("elemt_act", &elemt_act_cpu);
}

}  // namespace bnfast
