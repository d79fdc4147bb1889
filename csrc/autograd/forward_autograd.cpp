// Autograd of bnfast::forward, the fused training forward, registered in C++
// under the Autograd key (the other ops register theirs in bnfast/ops.py).
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
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

namespace bnfast {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptionalTensor = c10::optional<at::Tensor>;
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

OptionalTensor optional(const at::Tensor& t) { return t.defined() ? OptionalTensor(t) : c10::nullopt; }

// [C] -> [1, C, 1, ...], broadcastable against input.
at::Tensor per_channel(const at::Tensor& t, int64_t dim) {
  std::vector<int64_t> shape(dim, 1);
  shape[1] = -1;
  return t.view(shape);
}

// The forward from differentiable ATen ops: the same math as the kernels
// (statistics in float32, or float64 for float64 input; biased variance).
std::vector<at::Tensor> composite_forward(const at::Tensor& input, const at::Tensor& weight,
                                          const at::Tensor& bias, double eps) {
  const int64_t dim = input.dim();
  std::vector<int64_t> dims{0};
  for (int64_t d = 2; d < dim; ++d) dims.push_back(d);
  const auto x = input.to(input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
  const auto mean = x.mean(dims);
  const auto invstd = at::rsqrt(at::var(x, dims, /*unbiased=*/false) + eps);
  auto y = (x - per_channel(mean, dim)) * per_channel(invstd, dim);
  if (weight.defined()) y = y * per_channel(weight, dim);
  if (bias.defined()) y = y + per_channel(bias, dim);
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
    // needs_input_grad counts only the tensors that were given (weight and
    // bias may be None).
    const bool need_input = ctx->needs_input_grad(0);
    const bool need_weight = weight.defined() && ctx->needs_input_grad(1);
    const bool need_bias = bias.defined() && ctx->needs_input_grad(weight.defined() ? 2 : 1);

    if (at::GradMode::is_enabled() || grad_mean.defined() || grad_invstd.defined()) {
      return composite_backward(input, weight, bias, ctx->saved_data["eps"].toDouble(), grads);
    }
    if (!grad_out.defined()) return {at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
    auto [grad_input, grad_weight, grad_bias] =
        call_backward(grad_out, input, mean, invstd, optional(weight));
    // The op returns grad_weight / grad_bias in the stats dtype.
    return {need_input ? grad_input : at::Tensor(),
            need_weight ? grad_weight.to(weight.scalar_type()) : at::Tensor(),
            need_bias ? grad_bias.to(bias.scalar_type()) : at::Tensor(), at::Tensor()};
  }

 private:
  // Gradients of composite_forward for the given output gradients, as a
  // graph when grad mode is on (create_graph).
  static variable_list composite_backward(const at::Tensor& input, const at::Tensor& weight,
                                          const at::Tensor& bias, double eps,
                                          const variable_list& grads) {
    const bool create_graph = at::GradMode::is_enabled();
    const std::vector<at::Tensor> inputs{input, weight, bias};
    std::vector<at::Tensor> wrt;
    for (const auto& t : inputs) {
      if (t.defined() && t.requires_grad()) wrt.push_back(t);
    }
    variable_list result(4);
    if (wrt.empty()) return result;
    variable_list outputs, grad_outputs;
    {
      at::AutoGradMode enable_grad(true);
      const auto recomputed = composite_forward(input, weight, bias, eps);
      for (size_t i = 0; i < recomputed.size(); ++i) {
        // An output that does not depend on wrt (mean when only weight
        // requires grad) contributes nothing.
        if (grads[i].defined() && recomputed[i].requires_grad()) {
          outputs.push_back(recomputed[i]);
          grad_outputs.push_back(grads[i]);
        }
      }
    }
    if (outputs.empty()) return result;
    const auto found = torch::autograd::grad(outputs, wrt, grad_outputs, /*retain_graph=*/create_graph,
                                             create_graph, /*allow_unused=*/true);
    size_t next = 0;
    for (size_t i = 0; i < inputs.size(); ++i) {
      if (inputs[i].defined() && inputs[i].requires_grad()) result[i] = found[next++];
    }
    return result;
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
