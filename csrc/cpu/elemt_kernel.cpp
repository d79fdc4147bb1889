// bnfast::elemt on CPU: y = (x - mean) * invstd * weight + bias per channel,
// applied as y = (x - mean) * scale + bias with scale = invstd * weight
// (computed in double per channel); one pass reading x and writing y.
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "../common/checks.h"
#include "../common/layout.h"
#include "batch_norm.h"
#include "output_cache.h"

namespace bnfast {
namespace {

at::Tensor elemt_cpu(const at::Tensor& input_, const OptionalTensor& weight,
                     const OptionalTensor& bias, const at::Tensor& mean,
                     const at::Tensor& invstd) {
  check_elemt(input_, weight, bias, mean, invstd);
  const auto input = readable(input_);
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
    const auto is = cpu::channel_values<opmath_t>(invstd, C, 0);
    cpu::normalize<scalar_t>(input.const_data_ptr<scalar_t>(), output.mutable_data_ptr<scalar_t>(),
                             layout, shape, mu.data(), is.data(), w.data(), b.data());
  });
  return output;
}

}  // namespace

TORCH_LIBRARY_IMPL(bnfast, CPU, m) { m.impl("elemt", &elemt_cpu); }

}  // namespace bnfast
