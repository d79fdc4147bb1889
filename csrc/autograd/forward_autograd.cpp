// Autograd of bnfast::forward, the fused training forward (the rule is in
// graph.h): (y, mean, invstd) = forward(x, weight, bias, eps).
//
// Reverse mode, first order with only grad_y: the fused bnfast::backward op
// (also what torch.compile traces into the backward graph). grad_mean /
// grad_invstd, create_graph or tangents in the backward: the composite.
// The running statistics it updates when given are outside the graph.
#include <torch/library.h>

#include <tuple>

#include "composite.h"
#include "graph.h"
#include "calls.h"

namespace bnfast {
namespace autograd {
namespace {

enum Saved { kInput, kWeight, kBias, kMean, kInvstd, kSaved };

struct ForwardBackward : public NodeWithSaved<kSaved> {
  variable_list apply(variable_list&& grads) override {
    const auto input = unpack(kInput), weight = unpack(kWeight), bias = unpack(kBias);
    const auto mean = unpack(kMean), invstd = unpack(kInvstd);
    const auto &grad_out = grads[0], &grad_mean = grads[1], &grad_invstd = grads[2];
    const bool want[3] = {task_should_compute_output(0), task_should_compute_output(1),
                          task_should_compute_output(2)};
    if (at::GradMode::is_enabled() || functorch_active() || grad_mean.defined() || grad_invstd.defined() ||
        any_tangent({&grad_out, &input, &weight})) {
      const double eps = eps_;
      return differentiate_composite(
          [eps](const std::vector<at::Tensor>& args) { return forward_composite(args, eps); },
          {only_if(want[0], input), only_if(want[1], weight), only_if(want[2], bias)}, grads);
    }
    variable_list result(3);
    if (!grad_out.defined()) return result;
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [grad_input, grad_weight, grad_bias] = call_backward(grad_out, input, mean, invstd, optional(weight));
    // The op returns grad_weight / grad_bias in the stats dtype.
    if (want[0]) result[0] = grad_input;
    if (want[1]) result[1] = grad_weight.to(weight.scalar_type());
    if (want[2]) result[2] = grad_bias.to(bias.scalar_type());
    return result;
  }
  std::string name() const override { return "BnfastForwardBackward"; }
  double eps_ = 0;
};

Triple forward_autograd(const at::Tensor& input, const OptionalTensor& weight_, const OptionalTensor& bias_,
                        double eps, const OptionalTensor& running_mean, const OptionalTensor& running_var,
                        double momentum, const OptionalTensor& num_batches_tracked) {
  const at::Tensor weight = weight_.value_or(at::Tensor()), bias = bias_.value_or(at::Tensor());
  if (functorch_active()) {
    begin_composite_forward(input, running_mean, running_var, num_batches_tracked);
    const auto out = forward_composite({input, weight, bias}, eps);
    call_update_stats(running_mean, running_var, out[1], out[2], momentum, eps, input);
    return {out[0], out[1], out[2]};
  }
  auto [y, mean, invstd] = call_below_autograd({running_mean, running_var, num_batches_tracked}, [&] {
    return call_forward(input, weight_, bias_, eps, running_mean, running_var, momentum, num_batches_tracked);
  });
  if (requires_grad({&input, &weight, &bias})) {
    auto node = make_node<ForwardBackward>();
    record(node, {&input, &weight, &bias}, {&y, &mean, &invstd});
    node->saved_ = {save_input(input), save_input(weight), save_input(bias), save_output(mean),
                    save_output(invstd)};
    node->eps_ = eps;
  }
  if (any_tangent({&input, &weight, &bias})) {
    const auto x = in_stats_dtype(primal(input));
    const auto x_t = tangent(input);
    const auto x_t_stats = x_t.defined() ? in_stats_dtype(x_t) : at::zeros_like(x);
    const auto [mean_t, invstd_t] = batch_stats_tangent(x, x_t_stats, mean, invstd);
    set_tangent(y, normalize_tangent(x, primal(weight), mean, invstd, x_t_stats, tangent(weight), tangent(bias),
                                     mean_t, invstd_t, input.scalar_type()));
    set_tangent(mean, mean_t);
    set_tangent(invstd, invstd_t);
  }
  return {y, mean, invstd};
}

Triple forward_inplace(const at::Tensor& input, const OptionalTensor& weight, const OptionalTensor& bias, double eps,
                       const OptionalTensor& running_mean, const OptionalTensor& running_var, double momentum,
                       const OptionalTensor& num_batches_tracked) {
  return call_then_bump_versions({running_mean, running_var, num_batches_tracked}, [&] {
    return call_forward(input, weight, bias, eps, running_mean, running_var, momentum, num_batches_tracked);
  });
}

}  // namespace
}  // namespace autograd

TORCH_LIBRARY_IMPL(bnfast, Autograd, m) { m.impl("forward", &autograd::forward_autograd); }

TORCH_LIBRARY_IMPL(bnfast, ADInplaceOrView, m) { m.impl("forward", &autograd::forward_inplace); }

}  // namespace bnfast
