// Autograd of bnfast::elemt, y = (x - mean) * invstd * weight + bias,
// registered in C++ under the Autograd key.
//
// Why C++ for this op: it is the eval-mode forward, and the Python
// register_autograd wrapper cost about 6 us per call even under no_grad
// (2-core EPYC), as much as the kernel on the seed CNN's 128x64x4x4 layer,
// which made bnfast's eval forward slower than torch's on small tensors.
//
// Gradients, per channel c (sums over every element of the channel):
//   dx      = dy * invstd * weight        (elemt of dy with mean 0: x is not
//                                           read, so a NaN in x stays out of dx)
//   dweight = sum(dy * (x - mean)) * invstd
//   dbias   = sum(dy)
//   dmean   = -sum(dy) * invstd * weight
//   dinvstd = sum(dy * (x - mean)) * weight
// the sums from bnfast::backward_reduce. Under create_graph the composite
// below is differentiated instead (csrc/autograd/composite.h).
#include <ATen/Functions.h>
#include <ATen/TensorOperators.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "composite.h"

namespace bnfast {
namespace {

using torch::autograd::AutogradContext;

at::Tensor call_elemt(const at::Tensor& input, const OptionalTensor& weight,
                      const OptionalTensor& bias, const at::Tensor& mean, const at::Tensor& invstd) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("bnfast::elemt", "")
                             .typed<at::Tensor(const at::Tensor&, const OptionalTensor&,
                                               const OptionalTensor&, const at::Tensor&,
                                               const at::Tensor&)>();
  return op.call(input, weight, bias, mean, invstd);
}

std::tuple<at::Tensor, at::Tensor> call_backward_reduce(const at::Tensor& grad_out,
                                                        const at::Tensor& input,
                                                        const at::Tensor& mean,
                                                        const at::Tensor& invstd) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("bnfast::backward_reduce", "")
                             .typed<std::tuple<at::Tensor, at::Tensor>(
                                 const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                 const at::Tensor&)>();
  return op.call(grad_out, input, mean, invstd);
}

// elemt from differentiable ATen ops, in the stats dtype as the kernels.
std::vector<at::Tensor> composite_elemt(const std::vector<at::Tensor>& args) {
  const auto &input = args[0], &weight = args[1], &bias = args[2];
  const auto &mean = args[3], &invstd = args[4];
  const auto x = input.to(stats_type(input));
  return {normalize_composite(x, weight, bias, mean, invstd).to(input.scalar_type())};
}

at::Tensor cast_like(const at::Tensor& grad, const at::Tensor& like) {
  return grad.scalar_type() == like.scalar_type() ? grad : grad.to(like.scalar_type());
}

class ElemtFunction : public torch::autograd::Function<ElemtFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input,
                               const OptionalTensor& weight, const OptionalTensor& bias,
                               const at::Tensor& mean, const at::Tensor& invstd) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto output = call_elemt(input, weight, bias, mean, invstd);
    ctx->save_for_backward({input, weight.value_or(at::Tensor()), bias.value_or(at::Tensor()),
                            mean, invstd});
    ctx->set_materialize_grads(false);
    return {output};
  }

  // One gradient per forward argument (input, weight, bias, mean, invstd).
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto &input = saved[0], &weight = saved[1], &bias = saved[2];
    const auto &mean = saved[3], &invstd = saved[4];
    const auto& grad_out = grads[0];
    variable_list result(5);
    if (!grad_out.defined()) return result;
    if (at::GradMode::is_enabled()) {  // create_graph: a differentiable backward
      return differentiate_composite(composite_elemt, {input, weight, bias, mean, invstd}, grads);
    }
    const auto need = needs_grad(ctx, {input, weight, bias, mean, invstd});
    if (need[0]) {
      result[0] = call_elemt(grad_out, optional(weight), c10::nullopt, at::zeros_like(mean), invstd);
    }
    if (need[1] || need[2] || need[3] || need[4]) {
      auto [sum_dy, sum_dy_xmu] = call_backward_reduce(grad_out, input, mean, invstd);
      const auto w = weight.defined() ? weight.to(mean.scalar_type()) : at::ones_like(mean);
      if (need[1]) result[1] = cast_like(sum_dy_xmu * invstd, weight);
      if (need[2]) result[2] = cast_like(sum_dy, bias);
      if (need[3]) result[3] = -(sum_dy * invstd * w);
      if (need[4]) result[4] = sum_dy_xmu * w;
    }
    return result;
  }
};

at::Tensor elemt_autograd(const at::Tensor& input, const OptionalTensor& weight,
                          const OptionalTensor& bias, const at::Tensor& mean,
                          const at::Tensor& invstd) {
  return ElemtFunction::apply(input, weight, bias, mean, invstd)[0];
}

}  // namespace

TORCH_LIBRARY_IMPL(bnfast, Autograd, m) { m.impl("elemt", &elemt_autograd); }

}  // namespace bnfast
