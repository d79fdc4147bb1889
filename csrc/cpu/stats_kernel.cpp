// bnfast::stats on CPU: per-channel mean and invstd = 1 / sqrt(var + eps) of
// one batch, var the biased variance over N and the spatial dims.
//
// With K[c] a sample of channel c and d = x - K, over M = N * S elements:
//   mean = K + sum(d) / M,   var = sum(d^2) / M - (sum(d) / M)^2
// computed in one pass (see host.h batch_stats for why this is stable).
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <tuple>

#include "../common/checks.h"
#include "../common/layout.h"
#include "batch_norm.h"

namespace bnfast {
namespace {

std::tuple<at::Tensor, at::Tensor> stats_cpu(const at::Tensor& input_, double eps) {
  check_stats(input_);
  const auto input = readable(input_);
  const auto layout = layout_of(input);
  const auto shape = shape_of(input);
  const auto options = input.options().dtype(stats_dtype(input.scalar_type()));
  auto mean = at::empty({shape.channels}, options);
  auto invstd = at::empty({shape.channels}, options);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "bnfast::stats", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    cpu::batch_stats<scalar_t>(input.const_data_ptr<scalar_t>(), layout, shape, eps,
                               mean.mutable_data_ptr<opmath_t>(), invstd.mutable_data_ptr<opmath_t>());
  });
  return {mean, invstd};
}

}  // namespace

TORCH_LIBRARY_IMPL(bnfast, CPU, m) { m.impl("stats", &stats_cpu); }

}  // namespace bnfast
