// The fused batch norm + activation ops on backends without fused kernels of
// their own: the plain bnfast ops of that backend and ATen's activations,
// one after the other. Same results as a fused kernel (up to rounding), not
// its speed: every activation is a pass of its own. CPU and CUDA have fused
// kernels of their own for all six ops; the tests compare them with these.
// Registered as CompositeExplicitAutograd, so a backend kernel takes
// precedence, and autograd stays the fused ops' own (csrc/autograd).
#include <ATen/Functions.h>
#include <ATen/TensorOperators.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <tuple>
#include <utility>

#include "activation_aten.h"
#include "checks.h"
#include "layout.h"
#include "op_entries.h"

namespace bnfast {
namespace {

Triple call_forward(const at::Tensor& input, const OptionalTensor& weight, const OptionalTensor& bias, double eps,
                    const OptionalTensor& running_mean, const OptionalTensor& running_var, double momentum,
                    const OptionalTensor& num_batches_tracked) {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("bnfast::forward", "").typed<Triple(
      const at::Tensor&, const OptionalTensor&, const OptionalTensor&, double, const OptionalTensor&,
      const OptionalTensor&, double, const OptionalTensor&)>();
  return op.call(input, weight, bias, eps, running_mean, running_var, momentum, num_batches_tracked);
}

at::Tensor call_elemt(const at::Tensor& input, const OptionalTensor& weight, const OptionalTensor& bias,
                      const at::Tensor& mean, const at::Tensor& invstd) {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("bnfast::elemt", "").typed<at::Tensor(
      const at::Tensor&, const OptionalTensor&, const OptionalTensor&, const at::Tensor&, const at::Tensor&)>();
  return op.call(input, weight, bias, mean, invstd);
}

Triple call_backward(const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& mean,
                     const at::Tensor& invstd, const OptionalTensor& weight) {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("bnfast::backward", "").typed<Triple(
      const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptionalTensor&)>();
  return op.call(grad_out, input, mean, invstd, weight);
}

using Pair = std::tuple<at::Tensor, at::Tensor>;

Pair call_stats(const at::Tensor& input, double eps) {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("bnfast::stats", "").typed<Pair(
      const at::Tensor&, double)>();
  return op.call(input, eps);
}

Pair call_backward_reduce(const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& mean,
                          const at::Tensor& invstd) {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("bnfast::backward_reduce", "").typed<Pair(
      const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&)>();
  return op.call(grad_out, input, mean, invstd);
}

at::Tensor call_backward_elemt(const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& mean,
                               const at::Tensor& invstd, const OptionalTensor& weight, const at::Tensor& mean_dy,
                               const at::Tensor& mean_dy_xmu) {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("bnfast::backward_elemt", "").typed<at::Tensor(
      const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptionalTensor&,
      const at::Tensor&, const at::Tensor&)>();
  return op.call(grad_out, input, mean, invstd, weight, mean_dy, mean_dy_xmu);
}

bool given(const OptionalTensor& t) { return t.has_value() && t->defined(); }

// act(z + residual), in z's dtype.
at::Tensor activate(at::Tensor z, const OptionalTensor& residual, Act act, double slope) {
  if (given(residual)) z = z + *residual;
  return activate_aten(z, act, slope);
}

Triple forward_act(const at::Tensor& input, const OptionalTensor& weight, const OptionalTensor& bias,
                   const OptionalTensor& residual, double eps, c10::string_view act, double slope,
                   bool /*memory_efficient: autograd's concern*/, const OptionalTensor& running_mean,
                   const OptionalTensor& running_var, double momentum, const OptionalTensor& num_batches_tracked) {
  // (Checked as the fused kernels' entries check it: the step counts when a check fails.)
  const auto a = checked_forward_args(input, running_mean, running_var, momentum, num_batches_tracked, [&] {
                   return check_forward_act(input, weight, bias, residual, act);
                 }).first;
  auto [z, mean, invstd] = call_forward(a.pre_relu ? at::relu(input) : input, weight, bias, eps, running_mean,
                                        running_var, momentum, num_batches_tracked);
  return {activate(z, residual, a.act, slope), mean, invstd};
}

at::Tensor elemt_act(const at::Tensor& input, const OptionalTensor& weight, const OptionalTensor& bias,
                     const at::Tensor& mean, const at::Tensor& invstd, const OptionalTensor& residual,
                     c10::string_view act, double slope) {
  const auto a = check_elemt_act(input, weight, bias, mean, invstd, residual, act);
  return activate(call_elemt(a.pre_relu ? at::relu(input) : input, weight, bias, mean, invstd), residual, a.act,
                  slope);
}

// The fused backward ops' pieces: the batch norm's input x (relu(input) for
// pre_relu) and dz = dy * act'(z), z = BN(x) + residual recomputed, in z's dtype.
std::pair<at::Tensor, at::Tensor> bn_input_and_grad_z(const at::Tensor& grad_out, const at::Tensor& input,
                                                      const at::Tensor& mean, const at::Tensor& invstd,
                                                      const OptionalTensor& weight, const OptionalTensor& bias,
                                                      const OptionalTensor& residual, const Activation& a,
                                                      double slope) {
  const auto x = a.pre_relu ? at::relu(input) : input;
  if (a.act == Act::kIdentity) return {x, grad_out};
  auto z = call_elemt(x, weight, bias, mean, invstd);
  if (given(residual)) z = z + *residual;
  return {x, activate_backward_aten(grad_out, z, a.act, slope)};
}

// grad_residual = dz, in the layout the input is read in (as the CPU kernels
// and the fake kernels give it), never an alias of grad_out (an op's outputs
// do not alias its inputs).
at::Tensor grad_residual_of(const at::Tensor& dz, const at::Tensor& grad_out, const at::Tensor& input,
                            const OptionalTensor& residual) {
  if (!given(residual)) return at::empty({0}, input.options());
  auto grad_residual = readable_as(dz, readable(input));
  return grad_residual.is_alias_of(grad_out) ? grad_residual.clone() : grad_residual;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_act(
    const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& mean, const at::Tensor& invstd,
    const OptionalTensor& weight, const OptionalTensor& bias, const OptionalTensor& residual, c10::string_view act,
    double slope) {
  const auto a = check_backward_act(grad_out, input, mean, invstd, weight, bias, residual, act);
  const auto [x, dz] = bn_input_and_grad_z(grad_out, input, mean, invstd, weight, bias, residual, a, slope);
  auto [grad_input, grad_weight, grad_bias] = call_backward(dz, x, mean, invstd, weight);
  if (a.pre_relu) grad_input = at::threshold_backward(grad_input, input, 0);
  return {grad_input, grad_weight, grad_bias, grad_residual_of(dz, grad_out, input, residual)};
}

Pair stats_act(const at::Tensor& input, double eps, c10::string_view act) {
  const auto a = check_stats_act(input, act);
  return call_stats(a.pre_relu ? at::relu(input) : input, eps);
}

Pair backward_reduce_act(const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& mean,
                         const at::Tensor& invstd, const OptionalTensor& weight, const OptionalTensor& bias,
                         const OptionalTensor& residual, c10::string_view act, double slope) {
  const auto a = check_backward_act(grad_out, input, mean, invstd, weight, bias, residual, act);
  const auto [x, dz] = bn_input_and_grad_z(grad_out, input, mean, invstd, weight, bias, residual, a, slope);
  return call_backward_reduce(dz, x, mean, invstd);
}

Pair backward_elemt_act(const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& mean,
                        const at::Tensor& invstd, const OptionalTensor& weight, const OptionalTensor& bias,
                        const OptionalTensor& residual, c10::string_view act, double slope,
                        const at::Tensor& mean_dy, const at::Tensor& mean_dy_xmu) {
  const auto a = check_backward_elemt_act(grad_out, input, mean, invstd, weight, bias, residual, act, mean_dy,
                                          mean_dy_xmu);
  const auto [x, dz] = bn_input_and_grad_z(grad_out, input, mean, invstd, weight, bias, residual, a, slope);
  auto grad_input = call_backward_elemt(dz, x, mean, invstd, weight, mean_dy, mean_dy_xmu);
  if (a.pre_relu) grad_input = at::threshold_backward(grad_input, input, 0);
  return {grad_input, grad_residual_of(dz, grad_out, input, residual)};
}

}  // namespace

TORCH_LIBRARY_IMPL(bnfast, CompositeExplicitAutograd, m) {
  m.impl("forward_act", &forward_act);
  m.impl("elemt_act", &elemt_act);
  m.impl("backward_act", &backward_act);
  m.impl("stats_act", &stats_act);
  m.impl("backward_reduce_act", &backward_reduce_act);
  m.impl("backward_elemt_act", &backward_elemt_act);
}

}  // namespace bnfast
