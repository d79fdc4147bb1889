// Helpers shared by the C++ autograd of bnfast's ops (csrc/autograd/*.cpp).
//
// Double backward: a first-order backward runs bnfast kernels. When a
// backward must itself be differentiable (create_graph, i.e. grad mode on
// inside backward) or gets gradients the kernels do not take, the op is
// recomputed from differentiable ATen ops (its "composite") and that graph is
// differentiated: differentiate_composite.
#pragma once

#include <ATen/core/Tensor.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/custom_function.h>

#include <functional>
#include <vector>

namespace bnfast {

using OptionalTensor = c10::optional<at::Tensor>;
using torch::autograd::variable_list;

inline OptionalTensor optional(const at::Tensor& t) {
  return t.defined() ? OptionalTensor(t) : c10::nullopt;
}

// [C] -> [1, C, 1, ...], broadcastable against an input of `dim` dimensions.
inline at::Tensor per_channel(const at::Tensor& t, int64_t dim) {
  std::vector<int64_t> shape(dim, 1);
  shape[1] = -1;
  return t.view(shape);
}

// Accumulation dtype of an input: float64 for float64, else float32.
inline at::ScalarType stats_type(const at::Tensor& input) {
  return input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// (x - mean) * invstd * weight + bias from differentiable ATen ops, for x
// already in the stats dtype (the kernels' math); weight and bias optional.
inline at::Tensor normalize_composite(const at::Tensor& x, const at::Tensor& weight,
                                      const at::Tensor& bias, const at::Tensor& mean,
                                      const at::Tensor& invstd) {
  const int64_t dim = x.dim();
  auto y = (x - per_channel(mean, dim)) * per_channel(invstd, dim);
  if (weight.defined()) y = y * per_channel(weight, dim);
  if (bias.defined()) y = y + per_channel(bias, dim);
  return y;
}

// Per tensor argument, whether its gradient is needed. The context's
// needs_input_grad counts only the tensors that were given (an optional weight
// or bias may be None), so undefined entries are skipped and get false.
inline std::vector<bool> needs_grad(torch::autograd::AutogradContext* ctx,
                                    const std::vector<at::Tensor>& tensors) {
  std::vector<bool> needed(tensors.size(), false);
  size_t given = 0;
  for (size_t i = 0; i < tensors.size(); ++i) {
    if (tensors[i].defined()) needed[i] = ctx->needs_input_grad(given++);
  }
  return needed;
}

// Gradients w.r.t. `inputs` (undefined entries are skipped) of
// composite(inputs) for the output gradients `grads` (one per output,
// undefined for none), as a graph when grad mode is on (create_graph). One
// entry per input; undefined where the input does not require grad.
inline variable_list differentiate_composite(
    const std::function<std::vector<at::Tensor>(const std::vector<at::Tensor>&)>& composite,
    const std::vector<at::Tensor>& inputs, const variable_list& grads) {
  const bool create_graph = at::GradMode::is_enabled();
  std::vector<at::Tensor> wrt;
  for (const auto& t : inputs) {
    if (t.defined() && t.requires_grad()) wrt.push_back(t);
  }
  variable_list result(inputs.size());
  if (wrt.empty()) return result;
  variable_list outputs, grad_outputs;
  {
    at::AutoGradMode enable_grad(true);
    const auto recomputed = composite(inputs);
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

}  // namespace bnfast
