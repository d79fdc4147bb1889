// Autograd of bnfast::stats (the rule is in graph.h): (mean, invstd) of x,
// M elements per channel. First-order gradient:
//   dx = grad_mean / M - grad_invstd * invstd^3 * (x - mean) / M
// (d invstd / d var = -invstd^3 / 2, d var / dx = 2 (x - mean) / M).
#include <torch/library.h>

#include "calls.h"
#include "composite.h"
#include "graph.h"

namespace bnfast {
namespace autograd {
namespace {

enum Saved { kInput, kMean, kInvstd, kSaved };

struct StatsBackward : public NodeWithSaved<kSaved> {
  variable_list apply(variable_list&& grads) override {
    const auto input = unpack(kInput);
    const auto &grad_mean = grads[0], &grad_invstd = grads[1];
    variable_list result(1);
    if (!task_should_compute_output(0) || (!grad_mean.defined() && !grad_invstd.defined())) return result;
    if (at::GradMode::is_enabled() || functorch_active() || any_tangent({&grad_mean, &grad_invstd, &input})) {
      const double eps = eps_;
      return differentiate_composite(
          [eps](const std::vector<at::Tensor>& args) { return stats_composite(args, eps); }, {input}, grads);
    }
    const auto mean = unpack(kMean), invstd = unpack(kInvstd);
    const int64_t dim = input.dim();
    const at::Scalar count(input.sym_numel() / input.sym_size(1));  // symbolic under torch.compile
    const auto x = in_stats_dtype(input);
    auto grad = at::zeros_like(x);
    if (grad_mean.defined()) grad = grad + per_channel(grad_mean, dim) / count;
    if (grad_invstd.defined()) {
      grad = grad - per_channel(grad_invstd * invstd.pow(3), dim) * (x - per_channel(mean, dim)) / count;
    }
    result[0] = grad.to(input.scalar_type());
    return result;
  }
  std::string name() const override { return "BnfastStatsBackward"; }
  double eps_ = 0;
};

Pair stats_autograd(const at::Tensor& input, double eps) {
  if (functorch_active()) {
    const auto out = stats_composite({input}, eps);
    return {out[0], out[1]};
  }
  auto [mean, invstd] = [&] {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return call_stats(input, eps);
  }();
  if (requires_grad({&input})) {
    auto node = make_node<StatsBackward>();
    record(node, {&input}, {&mean, &invstd});
    node->saved_ = {save_input(input), save_output(mean), save_output(invstd)};
    node->eps_ = eps;
  }
  if (any_tangent({&input})) {
    const auto [mean_t, invstd_t] =
        batch_stats_tangent(in_stats_dtype(primal(input)), in_stats_dtype(tangent(input)), mean, invstd);
    set_tangent(mean, mean_t);
    set_tangent(invstd, invstd_t);
  }
  return {mean, invstd};
}

}  // namespace
}  // namespace autograd

TORCH_LIBRARY_IMPL(bnfast, Autograd, m) { m.impl("stats", &autograd::stats_autograd); }

}  // namespace bnfast
