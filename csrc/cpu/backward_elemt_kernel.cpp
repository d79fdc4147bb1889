// bnfast::backward_elemt on CPU:
//   dx = (dy - mean_dy - (x - mean) * invstd^2 * mean_dy_xmu) * invstd * weight
// one pass reading x and dy and writing dx (coefficients in host.h grad_input).
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "../common/checks.h"
#include "../common/layout.h"
#include "batch_norm.h"
#include "output_cache.h"

namespace bnfast {
namespace {

at::Tensor backward_elemt_cpu(const at::Tensor& grad_out_, const at::Tensor& input_,
                              const at::Tensor& mean, const at::Tensor& invstd,
                              const OptionalTensor& weight, const at::Tensor& mean_dy,
                              const at::Tensor& mean_dy_xmu) {
  check_backward_elemt(grad_out_, input_, mean, invstd, weight, mean_dy, mean_dy_xmu);
  const auto input = readable(input_);
  const auto grad_out = readable_as(grad_out_, input);
  const auto layout = layout_of(input);
  const auto shape = shape_of(input);
  auto grad_input = cpu::empty_cached_like(input);
  if (input.numel() == 0) return grad_input;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "bnfast::backward_elemt", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const int64_t C = shape.channels;
    const auto mu = cpu::channel_values<opmath_t>(mean, C, 0);
    const auto is = cpu::channel_values<opmath_t>(invstd, C, 0);
    const auto w = cpu::channel_values<opmath_t>(weight, C, 1);
    const auto mdy = cpu::channel_values<double>(mean_dy, C, 0);
    const auto mdyx = cpu::channel_values<double>(mean_dy_xmu, C, 0);
    cpu::grad_input<scalar_t>(grad_out.const_data_ptr<scalar_t>(), input.const_data_ptr<scalar_t>(),
                              grad_input.mutable_data_ptr<scalar_t>(), layout, shape, mu.data(),
                              is.data(), w.data(), mdy.data(), mdyx.data());
  });
  return grad_input;
}

}  // namespace

TORCH_LIBRARY_IMPL(bnfast, CPU, m) { m.impl("backward_elemt", &backward_elemt_cpu); }

}  // namespace bnfast
