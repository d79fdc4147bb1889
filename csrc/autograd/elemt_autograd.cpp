// Autograd of bnfast::elemt, the eval-mode forward (the rule is in graph.h):
//   y = (x - mean) * invstd * weight + bias
// First-order gradients, per channel c (sums over the channel's elements):
//   dx      = dy * invstd * weight        (elemt of dy with mean 0: x is not
//                                           read, so a NaN in x stays out of dx)
//   dweight = sum(dy * (x - mean)) * invstd
//   dbias   = sum(dy)
//   dmean   = -sum(dy) * invstd * weight
//   dinvstd = sum(dy * (x - mean)) * weight
// the sums from bnfast::backward_reduce.
// bnfast::elemt_running: elemt with invstd from the running variance (below).
#include <ATen/TensorOperators.h>
#include <torch/library.h>

#include <initializer_list>

#include "calls.h"
#include "composite.h"
#include "graph.h"

namespace bnfast {
namespace autograd {
namespace {

at::Tensor cast_like(const at::Tensor& grad, const at::Tensor& like) {
  return grad.scalar_type() == like.scalar_type() ? grad : grad.to(like.scalar_type());
}

enum Saved { kInput, kWeight, kBias, kMean, kInvstd, kSaved };

struct ElemtBackward : public NodeWithSaved<kSaved> {
  variable_list apply(variable_list&& grads) override {
    const auto input = unpack(kInput), weight = unpack(kWeight), bias = unpack(kBias);
    const auto mean = unpack(kMean), invstd = unpack(kInvstd);
    const auto& grad_out = grads[0];
    bool want[5];
    for (size_t i = 0; i < 5; ++i) want[i] = task_should_compute_output(i);
    variable_list result(5);
    if (!grad_out.defined()) return result;
    if (at::GradMode::is_enabled() || functorch_active() || any_tangent({&grad_out, &input, &weight, &mean, &invstd})) {
      return differentiate_composite(elemt_composite,
                                     {only_if(want[0], input), only_if(want[1], weight), only_if(want[2], bias),
                                      only_if(want[3], mean), only_if(want[4], invstd)},
                                     grads);
    }
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    if (want[0]) {
      // grad_input in the layout torch's eval backward gives it: contiguous on
      // CUDA (native batch_norm_backward allocates it so), the input's
      // suggested memory format on CPU. elemt answers in its input's layout.
      const auto format = input.is_cuda() ? at::MemoryFormat::Contiguous : input.suggest_memory_format();
      result[0] = call_elemt(grad_out.contiguous(format), optional(weight), std::nullopt, at::zeros_like(mean),
                             invstd);
    }
    if (want[1] || want[2] || want[3] || want[4]) {
      auto [sum_dy, sum_dy_xmu] = call_backward_reduce(grad_out, input, mean, invstd);
      const auto w = weight.defined() ? weight.to(mean.scalar_type()) : at::ones_like(mean);
      if (want[1]) result[1] = cast_like(sum_dy_xmu * invstd, weight);
      if (want[2]) result[2] = cast_like(sum_dy, bias);
      if (want[3]) result[3] = -(sum_dy * invstd * w);
      if (want[4]) result[4] = sum_dy_xmu * w;
    }
    return result;
  }
  std::string name() const override { return "BnfastElemtBackward"; }
};

at::Tensor elemt_autograd(const at::Tensor& input, const OptionalTensor& weight_, const OptionalTensor& bias_,
                          const at::Tensor& mean, const at::Tensor& invstd) {
  const at::Tensor weight = weight_.value_or(at::Tensor()), bias = bias_.value_or(at::Tensor());
  if (functorch_active()) return elemt_composite({input, weight, bias, mean, invstd})[0];
  auto y = [&] {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return call_elemt(input, weight_, bias_, mean, invstd);
  }();
  if (requires_grad({&input, &weight, &bias, &mean, &invstd})) {
    auto node = make_node<ElemtBackward>();
    record(node, {&input, &weight, &bias, &mean, &invstd}, {&y});
    node->saved_ = {save_input(input), save_input(weight), save_input(bias), save_input(mean),
                    save_input(invstd)};
  }
  if (any_tangent({&input, &weight, &bias, &mean, &invstd})) {
    const auto x_t = tangent(input);
    set_tangent(y, normalize_tangent(in_stats_dtype(primal(input)), primal(weight), primal(mean), primal(invstd),
                                     x_t.defined() ? in_stats_dtype(x_t) : x_t, tangent(weight), tangent(bias),
                                     tangent(mean), tangent(invstd), input.scalar_type()));
  }
  return y;
}

// bnfast::elemt_running is elemt(input, weight, bias, running_mean,
// 1 / sqrt(running_var + eps)) with the statistics in the stats dtype. Its
// backend kernel computes invstd itself (no ATen ops around it); when a
// gradient, a tangent or a torch.func transform is involved, it is that
// decomposition through the dispatcher instead, so elemt's autograd, forward
// AD and batching rule serve it. The decomposition is also the kernel of the
// backends without one of their own (CompositeExplicitAutograd).
at::Tensor elemt_running_decomposed(const at::Tensor& input, const OptionalTensor& weight,
                                    const OptionalTensor& bias, const at::Tensor& running_mean,
                                    const at::Tensor& running_var, double eps) {
  check_elemt_running(input, weight, bias, running_mean, running_var);
  const auto stats = stats_dtype(input.scalar_type());
  return call_elemt(input, weight, bias, running_mean.to(stats), (running_var.to(stats) + eps).rsqrt());
}

at::Tensor elemt_running_autograd(const at::Tensor& input, const OptionalTensor& weight_,
                                  const OptionalTensor& bias_, const at::Tensor& running_mean,
                                  const at::Tensor& running_var, double eps) {
  const at::Tensor weight = weight_.value_or(at::Tensor()), bias = bias_.value_or(at::Tensor());
  const std::initializer_list<const at::Tensor*> args = {&input, &weight, &bias, &running_mean, &running_var};
  if (functorch_active() || requires_grad(args) || any_tangent(args)) {
    return elemt_running_decomposed(input, weight_, bias_, running_mean, running_var, eps);
  }
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return call_elemt_running(input, weight_, bias_, running_mean, running_var, eps);
}

}  // namespace
}  // namespace autograd

TORCH_LIBRARY_IMPL(bnfast, Autograd, m) {
  m.impl("elemt", &autograd::elemt_autograd);
  m.impl("elemt_running", &autograd::elemt_running_autograd);
}

TORCH_LIBRARY_IMPL(bnfast, CompositeExplicitAutograd, m) {
  m.impl("elemt_running", &autograd::elemt_running_decomposed);
}

}  // namespace bnfast
