// Autograd of the fused batch norm + activation ops (the rule is in
// graph.h): forward_act (training) and elemt_act (eval).
//
// forward_act's first-order backward is the fused bnfast::backward_act (dz =
// dy * act'(z) with z recomputed from the input, and grad_residual = dz);
// higher orders, tangents and torch.func go through the composite, as for
// forward. elemt_act, the eval form, differentiates its composite.
#include <torch/library.h>

#include <string>

#include "calls.h"
#include "composite.h"
#include "graph.h"

namespace bnfast {
namespace autograd {
namespace {

// act'(z) * z' of y = act(normalize(x) + residual), given x and its tangent
// x_t in the stats dtype (as the op reads x: relu'd for pre_relu) and the
// tangents of the statistics; in the input's dtype.
at::Tensor fused_tangent(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
                         const at::Tensor& residual, const at::Tensor& mean, const at::Tensor& invstd,
                         const at::Tensor& x, const at::Tensor& x_t, const at::Tensor& mean_t,
                         const at::Tensor& invstd_t, const Activation& a, double slope) {
  const auto stats = x.scalar_type();
  auto z_t = normalize_tangent(x, primal(weight), mean, invstd, x_t, tangent(weight), tangent(bias), mean_t, invstd_t,
                               stats);
  auto z = normalize_composite(x, primal(weight), primal(bias), mean, invstd);
  if (residual.defined()) {
    z = z + primal(residual).to(stats);
    if (tangent(residual).defined()) z_t = z_t + tangent(residual).to(stats);
  }
  return activate_tangent(z_t, z, a.act, slope).to(input.scalar_type());
}

// x and x' as a fused op reads the input: relu(x) and x' masked by x > 0 for pre_relu.
std::pair<at::Tensor, at::Tensor> fused_input_and_tangent(const at::Tensor& input, const Activation& a) {
  auto x = in_stats_dtype(primal(input));
  auto x_t = tangent(input).defined() ? in_stats_dtype(tangent(input)) : at::zeros_like(x);
  if (a.pre_relu) {
    x_t = at::threshold_backward(x_t, x, 0);
    x = at::relu(x);
  }
  return {x, x_t};
}

enum ForwardSaved { kInput, kWeight, kBias, kResidual, kMean, kInvstd, kForwardSaved };

struct ForwardActBackward : public NodeWithSaved<kForwardSaved> {
  variable_list apply(variable_list&& grads) override {
    const auto input = unpack(kInput), weight = unpack(kWeight), bias = unpack(kBias);
    const auto residual = unpack(kResidual), mean = unpack(kMean), invstd = unpack(kInvstd);
    const auto &grad_out = grads[0], &grad_mean = grads[1], &grad_invstd = grads[2];
    bool want[4];
    for (size_t i = 0; i < 4; ++i) want[i] = task_should_compute_output(i);
    if (at::GradMode::is_enabled() || functorch_active() || grad_mean.defined() || grad_invstd.defined() ||
        any_tangent({&grad_out, &input, &weight, &residual})) {
      const double eps = eps_, slope = slope_;
      const Activation a = parse_activation(act_);
      return differentiate_composite(
          [&](const std::vector<at::Tensor>& args) { return forward_act_composite(args, eps, a, slope); },
          {only_if(want[0], input), only_if(want[1], weight), only_if(want[2], bias), only_if(want[3], residual)},
          grads);
    }
    variable_list result(4);
    if (!grad_out.defined()) return result;
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [grad_input, grad_weight, grad_bias, grad_residual] = call_backward_act(
        grad_out, input, mean, invstd, optional(weight), optional(bias), optional(residual), act_, slope_);
    if (want[0]) result[0] = grad_input;
    if (want[1]) result[1] = grad_weight.to(weight.scalar_type());  // the op's are in the stats dtype
    if (want[2]) result[2] = grad_bias.to(bias.scalar_type());
    if (want[3]) result[3] = grad_residual;
    return result;
  }
  std::string name() const override { return "BnfastForwardActBackward"; }
  double eps_ = 0, slope_ = 0;
  std::string act_;
};

Triple forward_act_autograd(const at::Tensor& input, const OptionalTensor& weight_, const OptionalTensor& bias_,
                            const OptionalTensor& residual_, double eps, c10::string_view act, double slope) {
  const at::Tensor weight = weight_.value_or(at::Tensor()), bias = bias_.value_or(at::Tensor());
  const at::Tensor residual = residual_.value_or(at::Tensor());
  const Activation a = parse_activation(act);
  if (functorch_active()) {
    const auto out = forward_act_composite({input, weight, bias, residual}, eps, a, slope);
    return {out[0], out[1], out[2]};
  }
  auto [y, mean, invstd] = [&] {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return call_forward_act(input, weight_, bias_, residual_, eps, act, slope);
  }();
  if (requires_grad({&input, &weight, &bias, &residual})) {
    auto node = make_node<ForwardActBackward>();
    record(node, {&input, &weight, &bias, &residual}, {&y, &mean, &invstd});
    node->saved_ = {save_input(input), save_input(weight), save_input(bias), save_input(residual),
                    save_output(mean), save_output(invstd)};
    node->eps_ = eps;
    node->slope_ = slope;
    node->act_ = std::string(act);
  }
  if (any_tangent({&input, &weight, &bias, &residual})) {
    const auto [x, x_t] = fused_input_and_tangent(input, a);
    const auto [mean_t, invstd_t] = batch_stats_tangent(x, x_t, mean, invstd);
    set_tangent(y, fused_tangent(input, weight, bias, residual, mean, invstd, x, x_t, mean_t, invstd_t, a, slope));
    set_tangent(mean, mean_t);
    set_tangent(invstd, invstd_t);
  }
  return {y, mean, invstd};
}

enum ElemtSaved { kElemtInput, kElemtWeight, kElemtBias, kElemtMean, kElemtInvstd, kElemtResidual, kElemtSaved };

struct ElemtActBackward : public NodeWithSaved<kElemtSaved> {
  variable_list apply(variable_list&& grads) override {
    std::vector<at::Tensor> inputs(kElemtSaved);
    for (size_t i = 0; i < kElemtSaved; ++i) inputs[i] = only_if(task_should_compute_output(i), unpack(i));
    const Activation a = parse_activation(act_);
    const double slope = slope_;
    if (!grads[0].defined()) return variable_list(kElemtSaved);
    return differentiate_composite(
        [&](const std::vector<at::Tensor>& args) { return elemt_act_composite(args, a, slope); }, inputs, grads);
  }
  std::string name() const override { return "BnfastElemtActBackward"; }
  double slope_ = 0;
  std::string act_;
};

at::Tensor elemt_act_autograd(const at::Tensor& input, const OptionalTensor& weight_, const OptionalTensor& bias_,
                              const at::Tensor& mean, const at::Tensor& invstd, const OptionalTensor& residual_,
                              c10::string_view act, double slope) {
  const at::Tensor weight = weight_.value_or(at::Tensor()), bias = bias_.value_or(at::Tensor());
  const at::Tensor residual = residual_.value_or(at::Tensor());
  const Activation a = parse_activation(act);
  if (functorch_active()) return elemt_act_composite({input, weight, bias, mean, invstd, residual}, a, slope)[0];
  auto y = [&] {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return call_elemt_act(input, weight_, bias_, mean, invstd, residual_, act, slope);
  }();
  if (requires_grad({&input, &weight, &bias, &mean, &invstd, &residual})) {
    auto node = make_node<ElemtActBackward>();
    record(node, {&input, &weight, &bias, &mean, &invstd, &residual}, {&y});
    node->saved_ = {save_input(input), save_input(weight), save_input(bias), save_input(mean), save_input(invstd),
                    save_input(residual)};
    node->slope_ = slope;
    node->act_ = std::string(act);
  }
  if (any_tangent({&input, &weight, &bias, &mean, &invstd, &residual})) {
    const auto [x, x_t] = fused_input_and_tangent(input, a);
    set_tangent(y, fused_tangent(input, weight, bias, residual, primal(mean), primal(invstd), x, x_t, tangent(mean),
                                 tangent(invstd), a, slope));
  }
  return y;
}

}  // namespace
}  // namespace autograd

TORCH_LIBRARY_IMPL(bnfast, Autograd, m) {
  m.impl("forward_act", &autograd::forward_act_autograd);
  m.impl("elemt_act", &autograd::elemt_act_autograd);
}

}  // namespace bnfast
