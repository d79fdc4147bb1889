// Autograd of bnfast::forward, the fused training forward, registered in C++
// under the Autograd key (as is elemt's, csrc/autograd/elemt_autograd.cpp;
// the other ops register theirs in bnfast/ops.py).
//
// Why C++ for this op: it is the training hot path, and the Python
// register_autograd wrapper costs about 10 us per forward and 6 us per
// backward (2-core EPYC), as much as the kernels themselves on the seed CNN's
// 128x64x4x4 layer. In C++ the overhead is about torch's own BatchNorm's.
//
// Gradients, with (y, mean, invstd) = forward(x, weight, bias, eps):
//   * grad_y only, first order (the common case): the fused bnfast::backward
//     op, which is also what torch.compile traces into the backward graph.
//   * grad_mean / grad_invstd given, or create_graph (grad mode on inside the
//     backward, for double backward): the forward is recomputed from ATen ops
//     (composite_forward) and differentiated by autograd, which gives a graph
//     that can itself be differentiated again.
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
using Triple = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

Triple call_forward(const at::Tensor& input, const OptionalTensor& weight,
                    const OptionalTensor& bias, double eps) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("bnfast::forward", "")
                             .typed<Triple(const at::Tensor&, const OptionalTensor&,
                                           const OptionalTensor&, double)>();
  return op.call(input, weight, bias, eps);
}

Triple call_backward(const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& mean,
                     const at::Tensor& invstd, const OptionalTensor& weight) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("bnfast::backward", "")
                             .typed<Triple(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                           const at::Tensor&, const OptionalTensor&)>();
  return op.call(grad_out, input, mean, invstd, weight);
}

// The forward from differentiable ATen ops: the same math as the kernels
// (statistics in float32, or float64 for float64 input; biased variance).
std::vector<at::Tensor> composite_forward(const std::vector<at::Tensor>& args, double eps) {
  const auto &input = args[0], &weight = args[1], &bias = args[2];
  const int64_t dim = input.dim();
  std::vector<int64_t> dims{0};
  for (int64_t d = 2; d < dim; ++d) dims.push_back(d);
  const auto x = input.to(stats_type(input));
  const auto mean = x.mean(dims);
  const auto invstd = at::rsqrt(at::var(x, dims, /*unbiased=*/false) + eps);
  const auto y = normalize_composite(x, weight, bias, mean, invstd);
  return {y.to(input.scalar_type()), mean, invstd};
}

class ForwardFunction : public torch::autograd::Function<ForwardFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input,
                               const OptionalTensor& weight, const OptionalTensor& bias,
                               double eps) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [output, mean, invstd] = call_forward(input, weight, bias, eps);
    ctx->save_for_backward({input, weight.value_or(at::Tensor()), bias.value_or(at::Tensor()),
                            mean, invstd});
    ctx->saved_data["eps"] = eps;
    ctx->set_materialize_grads(false);
    return {output, mean, invstd};
  }

  // One gradient per forward argument (input, weight, bias, eps).
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto &input = saved[0], &weight = saved[1], &bias = saved[2];
    const auto &mean = saved[3], &invstd = saved[4];
    const auto &grad_out = grads[0], &grad_mean = grads[1], &grad_invstd = grads[2];

    if (at::GradMode::is_enabled() || grad_mean.defined() || grad_invstd.defined()) {
      const double eps = ctx->saved_data["eps"].toDouble();
      auto result = differentiate_composite(
          [eps](const std::vector<at::Tensor>& args) { return composite_forward(args, eps); },
          {input, weight, bias}, grads);
      result.emplace_back();  // eps
      return result;
    }
    if (!grad_out.defined()) return {at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
    const auto need = needs_grad(ctx, {input, weight, bias});
    auto [grad_input, grad_weight, grad_bias] =
        call_backward(grad_out, input, mean, invstd, optional(weight));
    // The op returns grad_weight / grad_bias in the stats dtype.
    return {need[0] ? grad_input : at::Tensor(),
            need[1] ? grad_weight.to(weight.scalar_type()) : at::Tensor(),
            need[2] ? grad_bias.to(bias.scalar_type()) : at::Tensor(), at::Tensor()};
  }
};

Triple forward_autograd(const at::Tensor& input, const OptionalTensor& weight,
                        const OptionalTensor& bias, double eps) {
  auto outputs = ForwardFunction::apply(input, weight, bias, eps);
  return {outputs[0], outputs[1], outputs[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(bnfast, Autograd, m) { m.impl("forward", &forward_autograd); }

}  // namespace bnfast
