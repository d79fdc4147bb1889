// The registered entry points of the ops that come in a plain and a fused
// (_act) form: forward, backward and backward_reduce. Each backend has one
// impl per op taking the fused form's arguments (the plain form passes
// std::nullopt for those it lacks); the entries check the arguments
// (checks.h) and call it, the same on every backend:
//   m.impl("forward", &forward_entry<forward_impl>);
#pragma once

#include <ATen/core/Tensor.h>

#include <c10/util/string_view.h>

#include <optional>
#include <tuple>
#include <utility>

#include "checks.h"

namespace bnfast {

// What a training forward updates after computing the batch statistics: the
// running statistics (update_stats_'s update, with momentum) and the step
// count num_batches_tracked (incremented); each none when undefined.
struct RunningStats {
  at::Tensor mean, var;
  double momentum = 0;
  at::Tensor num_batches_tracked;
  bool given() const { return mean.defined(); }
};

// checks(), then the running statistics, checked. A given
// num_batches_tracked is incremented even when the checks fail, as a module
// counts the step before its batch norm checks the arguments.
template <typename Checks>
auto checked_forward_args(const at::Tensor& input, const OptionalTensor& running_mean,
                          const OptionalTensor& running_var, double momentum,
                          const OptionalTensor& num_batches_tracked, Checks&& checks) {
  check_num_batches_tracked(input, num_batches_tracked);
  const at::Tensor steps = num_batches_tracked.value_or(at::Tensor());
  try {
    auto result = checks();
    check_running_stats(input, running_mean, running_var);
    return std::pair{result, RunningStats{running_mean.value_or(at::Tensor()), running_var.value_or(at::Tensor()),
                                          momentum, steps}};
  } catch (...) {
    if (steps.defined()) steps.add_(1);
    throw;
  }
}

// impl(input, weight, bias, residual, eps, activation, slope, running) -> (output, mean, invstd)
template <auto impl>
Triple forward_entry(const at::Tensor& input, const OptionalTensor& weight, const OptionalTensor& bias, double eps,
                     const OptionalTensor& running_mean, const OptionalTensor& running_var, double momentum,
                     const OptionalTensor& num_batches_tracked) {
  const auto [activation, running] =
      checked_forward_args(input, running_mean, running_var, momentum, num_batches_tracked, [&] {
        check_forward(input, weight, bias);
        return std::optional<Activation>();
      });
  return impl(input, weight, bias, std::nullopt, eps, activation, 0.0, running);
}

template <auto impl>
Triple forward_act_entry(const at::Tensor& input, const OptionalTensor& weight, const OptionalTensor& bias,
                         const OptionalTensor& residual, double eps, c10::string_view act, double slope,
                         bool /*memory_efficient: autograd's concern*/, const OptionalTensor& running_mean,
                         const OptionalTensor& running_var, double momentum,
                         const OptionalTensor& num_batches_tracked) {
  const auto [activation, running] = checked_forward_args(
      input, running_mean, running_var, momentum, num_batches_tracked,
      [&] { return std::optional<Activation>(check_forward_act(input, weight, bias, residual, act)); });
  return impl(input, weight, bias, residual, eps, activation, slope, running);
}

// impl(running_mean, running_var, mean, invstd, momentum, eps, count): the
// update itself, also the training forwards' (their impls call it).
template <auto impl>
void update_stats_entry(at::Tensor& running_mean, at::Tensor& running_var, const at::Tensor& mean,
                        const at::Tensor& invstd, double momentum, double eps, int64_t count) {
  check_update_stats(running_mean, running_var, mean, invstd, count);
  impl(running_mean, running_var, mean, invstd, momentum, eps, count);
}

// impl(grad_out, input, mean, invstd, weight, bias, residual, activation, slope)
//   -> (grad_input, grad_weight, grad_bias, grad_residual)
template <auto impl>
Triple backward_entry(const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& mean,
                      const at::Tensor& invstd, const OptionalTensor& weight) {
  check_backward(grad_out, input, mean, invstd, weight);
  auto [grad_input, grad_weight, grad_bias, no_residual] =
      impl(grad_out, input, mean, invstd, weight, std::nullopt, std::nullopt, std::nullopt, 0.0);
  return {std::move(grad_input), std::move(grad_weight), std::move(grad_bias)};
}

template <auto impl>
Quad backward_act_entry(const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& mean,
                        const at::Tensor& invstd, const OptionalTensor& weight, const OptionalTensor& bias,
                        const OptionalTensor& residual, c10::string_view act, double slope) {
  const auto activation = check_backward_act(grad_out, input, mean, invstd, weight, bias, residual, act);
  return impl(grad_out, input, mean, invstd, weight, bias, residual, activation, slope);
}

// impl(grad_out, input, mean, invstd, weight, bias, residual, activation, slope) -> (sum_dy, sum_dy_xmu)
template <auto impl>
std::tuple<at::Tensor, at::Tensor> backward_reduce_entry(const at::Tensor& grad_out, const at::Tensor& input,
                                                         const at::Tensor& mean, const at::Tensor& invstd) {
  check_backward_reduce(grad_out, input, mean, invstd);
  return impl(grad_out, input, mean, invstd, std::nullopt, std::nullopt, std::nullopt, std::nullopt, 0.0);
}

template <auto impl>
std::tuple<at::Tensor, at::Tensor> backward_reduce_act_entry(const at::Tensor& grad_out, const at::Tensor& input,
                                                             const at::Tensor& mean, const at::Tensor& invstd,
                                                             const OptionalTensor& weight, const OptionalTensor& bias,
                                                             const OptionalTensor& residual, c10::string_view act,
                                                             double slope) {
  const auto activation = check_backward_act(grad_out, input, mean, invstd, weight, bias, residual, act);
  return impl(grad_out, input, mean, invstd, weight, bias, residual, activation, slope);
}

}  // namespace bnfast
