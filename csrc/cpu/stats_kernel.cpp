// bnfast::stats on CPU: per-channel mean and invstd = 1 / sqrt(var + eps) of
// one batch, var the biased variance over N and the spatial dims.
//
// With K[c] a sample of channel c and d = x - K, over M = N * S elements:
//   mean = K + sum(d) / M,   var = sum(d^2) / M - (sum(d) / M)^2
// computed in one pass (see host.h batch_stats for why this is stable).
// bnfast::stats_act: the same over relu(x) for act = "pre_relu".
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "../common/checks.h"
#include "../common/layout.h"
#include "batch_norm.h"
#include "fusion.h"

namespace bnfast {
namespace {

// pre_relu: the statistics of relu(input), read through the loops' fusion.
std::tuple<at::Tensor, at::Tensor> stats_impl(const at::Tensor& input_, double eps, bool pre_relu) {
  const auto input = readable(input_);
  const auto layout = layout_of(input);
  const auto shape = shape_of(input);
  const auto options = input.options().dtype(stats_dtype(input.scalar_type()));
  auto mean = at::empty({shape.channels}, options);
  auto invstd = at::empty({shape.channels}, options);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "bnfast::stats", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const auto fusion = pre_relu ? std::optional(cpu::make_fusion<scalar_t>({Act::kIdentity, true}, 0.0, at::Tensor()))
                                 : std::nullopt;
    cpu::batch_stats<scalar_t>(input.const_data_ptr<scalar_t>(), layout, shape, eps,
                               mean.mutable_data_ptr<opmath_t>(), invstd.mutable_data_ptr<opmath_t>(),
                               fusion ? &*fusion : nullptr);
  });
  return {mean, invstd};
}

std::tuple<at::Tensor, at::Tensor> stats_cpu(const at::Tensor& input, double eps) {
  check_stats(input);
  return stats_impl(input, eps, false);
}

std::tuple<at::Tensor, at::Tensor> stats_act_cpu(const at::Tensor& input, double eps, c10::string_view act) {
  return stats_impl(input, eps, check_stats_act(input, act).pre_relu);
}

}  // namespace

TORCH_LIBRARY_IMPL(bnfast, CPU, m) {
  m.impl("stats", &stats_cpu);
  m.impl("stats_act", &stats_act_cpu);
}

}  // namespace bnfast
