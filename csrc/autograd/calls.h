// The bnfast ops as the autograd kernels call them: through the dispatcher,
// below the Autograd key (typed handles, looked up once).
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>

#include <tuple>

#include "../common/checks.h"

namespace bnfast {
namespace autograd {

using Pair = std::tuple<at::Tensor, at::Tensor>;

template <typename Signature>
c10::TypedOperatorHandle<Signature> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

inline Triple call_forward(const at::Tensor& input, const OptionalTensor& weight, const OptionalTensor& bias,
                           double eps, const OptionalTensor& running_mean, const OptionalTensor& running_var,
                           double momentum, const OptionalTensor& num_batches_tracked) {
  static const auto op =
      op_handle<Triple(const at::Tensor&, const OptionalTensor&, const OptionalTensor&, double, const OptionalTensor&,
                       const OptionalTensor&, double, const OptionalTensor&)>("bnfast::forward");
  return op.call(input, weight, bias, eps, running_mean, running_var, momentum, num_batches_tracked);
}

inline void call_update_stats(at::Tensor& running_mean, at::Tensor& running_var, const at::Tensor& mean,
                              const at::Tensor& invstd, double momentum, double eps, int64_t count) {
  static const auto op = op_handle<void(at::Tensor&, at::Tensor&, const at::Tensor&, const at::Tensor&, double,
                                        double, c10::SymInt)>("bnfast::update_stats_");
  op.call(running_mean, running_var, mean, invstd, momentum, eps, c10::SymInt(count));
}

// Where a training forward runs as its composite (under torch.func): before
// it, what the op's entry does first (op_entries.h), the step counted (also
// when the running statistics then fail their checks) and the running
// statistics checked; after it, their update by the op update_stats_.
inline void begin_composite_forward(const at::Tensor& input, const OptionalTensor& running_mean,
                                    const OptionalTensor& running_var, const OptionalTensor& num_batches_tracked) {
  check_num_batches_tracked(input, num_batches_tracked);
  if (num_batches_tracked.has_value() && num_batches_tracked->defined()) num_batches_tracked->add_(1);
  check_running_stats(input, running_mean, running_var);
}

inline void call_update_stats(const OptionalTensor& running_mean, const OptionalTensor& running_var,
                              const at::Tensor& mean, const at::Tensor& invstd, double momentum, double eps,
                              const at::Tensor& input) {
  if (!running_mean.has_value() || !running_mean->defined()) return;
  at::Tensor rm = *running_mean, rv = *running_var;
  call_update_stats(rm, rv, mean, invstd, momentum, eps, per_channel_count(input));
}

inline Triple call_backward(const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& mean,
                            const at::Tensor& invstd, const OptionalTensor& weight) {
  static const auto op = op_handle<Triple(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                          const at::Tensor&, const OptionalTensor&)>("bnfast::backward");
  return op.call(grad_out, input, mean, invstd, weight);
}

inline at::Tensor call_elemt(const at::Tensor& input, const OptionalTensor& weight, const OptionalTensor& bias,
                             const at::Tensor& mean, const at::Tensor& invstd) {
  static const auto op = op_handle<at::Tensor(const at::Tensor&, const OptionalTensor&, const OptionalTensor&,
                                              const at::Tensor&, const at::Tensor&)>("bnfast::elemt");
  return op.call(input, weight, bias, mean, invstd);
}

inline at::Tensor call_elemt_running(const at::Tensor& input, const OptionalTensor& weight,
                                     const OptionalTensor& bias, const at::Tensor& running_mean,
                                     const at::Tensor& running_var, double eps) {
  static const auto op =
      op_handle<at::Tensor(const at::Tensor&, const OptionalTensor&, const OptionalTensor&, const at::Tensor&,
                           const at::Tensor&, double)>("bnfast::elemt_running");
  return op.call(input, weight, bias, running_mean, running_var, eps);
}

inline Pair call_backward_reduce(const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& mean,
                                 const at::Tensor& invstd) {
  static const auto op = op_handle<Pair(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                        const at::Tensor&)>("bnfast::backward_reduce");
  return op.call(grad_out, input, mean, invstd);
}

inline Triple call_forward_act(const at::Tensor& input, const OptionalTensor& weight, const OptionalTensor& bias,
                               const OptionalTensor& residual, double eps, c10::string_view act, double slope,
                               bool memory_efficient, const OptionalTensor& running_mean,
                               const OptionalTensor& running_var, double momentum,
                               const OptionalTensor& num_batches_tracked) {
  static const auto op =
      op_handle<Triple(const at::Tensor&, const OptionalTensor&, const OptionalTensor&, const OptionalTensor&, double,
                       c10::string_view, double, bool, const OptionalTensor&, const OptionalTensor&, double,
                       const OptionalTensor&)>("bnfast::forward_act");
  return op.call(input, weight, bias, residual, eps, act, slope, memory_efficient, running_mean, running_var,
                 momentum, num_batches_tracked);
}

inline at::Tensor call_elemt_act(const at::Tensor& input, const OptionalTensor& weight, const OptionalTensor& bias,
                                 const at::Tensor& mean, const at::Tensor& invstd, const OptionalTensor& residual,
                                 c10::string_view act, double slope) {
  static const auto op =
      op_handle<at::Tensor(const at::Tensor&, const OptionalTensor&, const OptionalTensor&, const at::Tensor&,
                           const at::Tensor&, const OptionalTensor&, c10::string_view, double)>("bnfast::elemt_act");
  return op.call(input, weight, bias, mean, invstd, residual, act, slope);
}

inline Quad call_backward_act(const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& mean,
                              const at::Tensor& invstd, const OptionalTensor& weight, const OptionalTensor& bias,
                              const OptionalTensor& residual, c10::string_view act, double slope) {
  static const auto op =
      op_handle<Quad(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                     const OptionalTensor&, const OptionalTensor&, const OptionalTensor&, c10::string_view, double)>(
          "bnfast::backward_act");
  return op.call(grad_out, input, mean, invstd, weight, bias, residual, act, slope);
}

inline Pair call_stats(const at::Tensor& input, double eps) {
  static const auto op = op_handle<Pair(const at::Tensor&, double)>("bnfast::stats");
  return op.call(input, eps);
}

}  // namespace autograd
}  // namespace bnfast
