// bnfast::backward_reduce on CPU: per channel
//   sum_dy = sum(dy),   sum_dy_xmu = sum(dy * (x - mean))
// in one pass over x and dy, accumulated in double (see loops.h).
// bnfast::backward_reduce_act: the same with dz = dy * act'(z) in place of dy
// (z recomputed from x), over relu(x) for pre_relu, as backward_act sums.
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

#include "../common/checks.h"
#include "../common/layout.h"
#include "../common/op_entries.h"
#include "batch_norm.h"
#include "fusion.h"

namespace bnfast {
namespace {

// activation: none for the plain backward_reduce; else dz = dy * act'(z) in
// place of dy (z recomputed from x, the residual and the affine parameters).
std::tuple<at::Tensor, at::Tensor> backward_reduce_impl(const at::Tensor& grad_out_, const at::Tensor& input_,
                                                        const at::Tensor& mean, const at::Tensor& invstd,
                                                        const OptionalTensor& weight, const OptionalTensor& bias,
                                                        const OptionalTensor& residual_,
                                                        std::optional<Activation> activation, double slope) {
  const auto input = readable(input_);
  const auto grad_out = readable_as(grad_out_, input);
  const auto residual = readable_optional_as(residual_, input);
  const auto layout = layout_of(input);
  const auto shape = shape_of(input);
  auto sum_dy = at::empty({shape.channels}, mean.options());
  auto sum_dy_xmu = at::empty({shape.channels}, mean.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "bnfast::backward_reduce", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const int64_t C = shape.channels;
    const auto mu = cpu::channel_values<opmath_t>(mean, C, 0);
    std::vector<double> s1(C, 0.0), s2(C, 0.0);
    if (input.numel() > 0) {
      const auto is = cpu::channel_values<opmath_t>(invstd, C, 0);
      const auto w = cpu::channel_values<opmath_t>(weight, C, 1);
      std::optional<cpu::BackwardFusion<scalar_t>> fusion;
      if (activation) fusion.emplace(*activation, slope, residual, at::Tensor(), bias, is.data(), w.data(), C);
      cpu::grad_sums<scalar_t>(grad_out.const_data_ptr<scalar_t>(), input.const_data_ptr<scalar_t>(),
                               layout, shape, mu.data(), s1.data(), s2.data(), fusion ? fusion->get() : nullptr);
    }
    auto* out1 = sum_dy.mutable_data_ptr<opmath_t>();
    auto* out2 = sum_dy_xmu.mutable_data_ptr<opmath_t>();
    for (int64_t c = 0; c < C; ++c) {
      out1[c] = static_cast<opmath_t>(s1[c]);
      out2[c] = static_cast<opmath_t>(s2[c]);
    }
  });
  return {sum_dy, sum_dy_xmu};
}

}  // namespace

TORCH_LIBRARY_IMPL(bnfast, CPU, m) {
  m.impl("backward_reduce", &backward_reduce_entry<backward_reduce_impl>);
  m.impl("backward_reduce_act", &backward_reduce_act_entry<backward_reduce_impl>);
}

}  // namespace bnfast
