// bnfast::forward on CPU, the fused training forward: the batch statistics
// (one pass over x, see stats_kernel.cpp) then y = (x - mean) * scale + bias (a second
// pass reading x and writing y): 3 tensor passes, the streaming bound.
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <tuple>

#include "../common/checks.h"
#include "../common/layout.h"
#include "batch_norm.h"
#include "output_cache.h"

namespace bnfast {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_cpu(
    const at::Tensor& input_, const OptionalTensor& weight,
    const OptionalTensor& bias, double eps) {
  check_forward(input_, weight, bias);
  const auto input = readable(input_);
  const auto layout = layout_of(input);
  const auto shape = shape_of(input);
  const auto options = input.options().dtype(stats_dtype(input.scalar_type()));
  auto mean = at::empty({shape.channels}, options);
  auto invstd = at::empty({shape.channels}, options);
  auto output = cpu::empty_cached_like(input);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "bnfast::forward", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const int64_t C = shape.channels;
    const scalar_t* x = input.const_data_ptr<scalar_t>();
    auto* mu = mean.mutable_data_ptr<opmath_t>();
    auto* is = invstd.mutable_data_ptr<opmath_t>();
    const auto w = cpu::channel_values<opmath_t>(weight, C, 1);
    const auto b = cpu::channel_values<opmath_t>(bias, C, 0);
    cpu::forward_train<scalar_t>(x, output.mutable_data_ptr<scalar_t>(), layout, shape, eps, mu, is,
                                 w.data(), b.data());
  });
  return {output, mean, invstd};
}

}  // namespace

TORCH_LIBRARY_IMPL(bnfast, CPU, m) { m.impl("forward", &forward_cpu); }

}  // namespace bnfast
