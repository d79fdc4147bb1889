// bnfast::forward on CPU, the fused training forward: the batch statistics
// (one pass over x, see stats_kernel.cpp) then y = (x - mean) * scale + bias (a second
// pass reading x and writing y): 3 tensor passes, the streaming bound.
// bnfast::forward_act, the same with an activation (and residual) applied in
// the second pass, or with relu(x) read in both (csrc/common/activation.h).
// Given running statistics, both then update them (update_stats_kernel.cpp),
// and count the step in num_batches_tracked when given it.
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
#include "update_stats.h"

namespace bnfast {
namespace {

// activation: none for the plain forward.
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_impl(const at::Tensor& input_, const OptionalTensor& weight,
                                                            const OptionalTensor& bias,
                                                            const OptionalTensor& residual_, double eps,
                                                            std::optional<Activation> activation, double slope,
                                                            const RunningStats& running) {
  const auto input = readable(input_);
  const auto residual = readable_optional_as(residual_, input);
  const auto layout = layout_of(input);
  const auto shape = shape_of(input);
  const auto options = input.options().dtype(stats_dtype(input.scalar_type()));
  auto mean = at::empty({shape.channels}, options);
  auto invstd = at::empty({shape.channels}, options);
  auto output = cpu::empty_cached_like(input);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "bnfast::forward", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const int64_t C = shape.channels;
    const auto w = cpu::channel_values<opmath_t>(weight, C, 1);
    const auto b = cpu::channel_values<opmath_t>(bias, C, 0);
    const auto fusion = activation ? std::optional(cpu::make_fusion<scalar_t>(*activation, slope, residual))
                                   : std::nullopt;
    cpu::forward_train<scalar_t>(input.const_data_ptr<scalar_t>(), output.mutable_data_ptr<scalar_t>(), layout,
                                 shape, eps, mean.mutable_data_ptr<opmath_t>(), invstd.mutable_data_ptr<opmath_t>(),
                                 w.data(), b.data(), fusion ? &*fusion : nullptr);
  });
  if (running.given()) {
    auto running_mean = running.mean, running_var = running.var;
    cpu::update_running_stats(running_mean, running_var, mean, invstd, running.momentum, eps,
                              per_channel_count(input));
  }
  if (running.num_batches_tracked.defined()) ++*running.num_batches_tracked.mutable_data_ptr<int64_t>();
  return {output, mean, invstd};
}

}  // namespace

TORCH_LIBRARY_IMPL(bnfast, CPU, m) {
  m.impl("forward", &forward_entry<forward_impl>);
  m.impl("forward_act", &forward_act_entry<forward_impl>);
}

}  // namespace bnfast
