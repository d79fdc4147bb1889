// The composites of bnfast's differentiable ops: the same math as the
// kernels (statistics in the stats dtype, biased variance), from
// differentiable ATen ops. graph.h says when they are used: for gradients
// that must themselves be differentiable, and for forward-mode tangents.
#pragma once

#include <ATen/Functions.h>
#include <ATen/TensorOperators.h>
#include <torch/csrc/autograd/autograd.h>

#include <functional>
#include <utility>
#include <vector>

#include "../common/activation_aten.h"
#include "../common/checks.h"

namespace bnfast {
namespace autograd {

using torch::autograd::variable_list;

inline OptionalTensor optional(const at::Tensor& t) { return t.defined() ? OptionalTensor(t) : std::nullopt; }

// [C] -> [1, C, 1, ...], broadcastable against an input of `dim` dimensions.
inline at::Tensor per_channel(const at::Tensor& t, int64_t dim) {
  std::vector<int64_t> shape(dim, 1);
  shape[1] = -1;
  return t.view(shape);
}

// The dims a statistic reduces over: all but the channel dim 1.
inline std::vector<int64_t> reduce_dims(int64_t dim) {
  std::vector<int64_t> dims{0};
  for (int64_t d = 2; d < dim; ++d) dims.push_back(d);
  return dims;
}

inline at::Tensor in_stats_dtype(const at::Tensor& t) { return t.to(stats_dtype(t.scalar_type())); }

// mean and invstd = 1 / sqrt(biased var + eps) of x (already in the stats dtype).
inline std::pair<at::Tensor, at::Tensor> batch_stats_composite(const at::Tensor& x, double eps) {
  const auto dims = reduce_dims(x.dim());
  return {x.mean(dims), at::rsqrt(at::var(x, dims, /*unbiased=*/false) + eps)};
}

// (x - mean) * invstd * weight + bias for x in the stats dtype; weight and
// bias optional.
inline at::Tensor normalize_composite(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                      const at::Tensor& mean, const at::Tensor& invstd) {
  const int64_t dim = x.dim();
  auto y = (x - per_channel(mean, dim)) * per_channel(invstd, dim);
  if (weight.defined()) y = y * per_channel(weight, dim);
  if (bias.defined()) y = y + per_channel(bias, dim);
  return y;
}

// bnfast::forward: (y, mean, invstd) of (input, weight, bias).
inline std::vector<at::Tensor> forward_composite(const std::vector<at::Tensor>& args, double eps) {
  const auto &input = args[0], &weight = args[1], &bias = args[2];
  const auto x = in_stats_dtype(input);
  const auto [mean, invstd] = batch_stats_composite(x, eps);
  return {normalize_composite(x, weight, bias, mean, invstd).to(input.scalar_type()), mean, invstd};
}

// bnfast::elemt: y of (input, weight, bias, mean, invstd).
inline std::vector<at::Tensor> elemt_composite(const std::vector<at::Tensor>& args) {
  const auto &input = args[0], &weight = args[1], &bias = args[2], &mean = args[3], &invstd = args[4];
  return {normalize_composite(in_stats_dtype(input), weight, bias, mean, invstd).to(input.scalar_type())};
}

// bnfast::stats: (mean, invstd) of input.
inline std::vector<at::Tensor> stats_composite(const std::vector<at::Tensor>& args, double eps) {
  const auto [mean, invstd] = batch_stats_composite(in_stats_dtype(args[0]), eps);
  return {mean, invstd};
}

// The input as a fused op reads it, in the stats dtype: relu(x) for pre_relu.
inline at::Tensor fused_input(const at::Tensor& input, const Activation& a) {
  const auto x = in_stats_dtype(input);
  return a.pre_relu ? at::relu(x) : x;
}

// act(normalize(x) + residual) for x in the stats dtype, in input_dtype.
inline at::Tensor fused_output(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                               const at::Tensor& residual, const at::Tensor& mean, const at::Tensor& invstd,
                               const Activation& a, double slope, at::ScalarType input_dtype) {
  auto z = normalize_composite(x, weight, bias, mean, invstd);
  if (residual.defined()) z = z + residual.to(z.scalar_type());
  return activate_aten(z, a.act, slope).to(input_dtype);
}

// bnfast::forward_act: (y, mean, invstd) of (input, weight, bias, residual).
inline std::vector<at::Tensor> forward_act_composite(const std::vector<at::Tensor>& args, double eps,
                                                     const Activation& a, double slope) {
  const auto x = fused_input(args[0], a);
  const auto [mean, invstd] = batch_stats_composite(x, eps);
  return {fused_output(x, args[1], args[2], args[3], mean, invstd, a, slope, args[0].scalar_type()), mean, invstd};
}

// bnfast::elemt_act: y of (input, weight, bias, mean, invstd, residual).
inline std::vector<at::Tensor> elemt_act_composite(const std::vector<at::Tensor>& args, const Activation& a,
                                                   double slope) {
  return {fused_output(fused_input(args[0], a), args[1], args[2], args[5], args[3], args[4], a, slope,
                       args[0].scalar_type())};
}

using Composite = std::function<std::vector<at::Tensor>(const std::vector<at::Tensor>&)>;

// Gradients w.r.t. `inputs` (undefined entries skipped) of composite(inputs)
// for the output gradients `grads` (one per output, undefined for none), as
// a graph when grad mode is on (create_graph). One entry per input;
// undefined where the input does not require grad.
inline variable_list differentiate_composite(const Composite& composite, const std::vector<at::Tensor>& inputs,
                                             const variable_list& grads) {
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

// Forward-mode tangents, from the derivatives of the composites written out
// with differentiable ATen ops (so they nest and can be differentiated
// again). Undefined tangents are zero. Per channel, with M elements,
// xc = x - mean and s = invstd:
//   mean' = mean(x'),   s' = -s^3 * mean(xc * x')        (training statistics)
//   y'    = (x' - mean') * s * w + xc * (s' * w + s * w') + b'

// (mean', invstd') of batch statistics, for x and x' in the stats dtype.
inline std::pair<at::Tensor, at::Tensor> batch_stats_tangent(const at::Tensor& x, const at::Tensor& x_t,
                                                             const at::Tensor& mean, const at::Tensor& invstd) {
  const auto dims = reduce_dims(x.dim());
  const auto xc = x - per_channel(mean, x.dim());
  return {x_t.mean(dims), -invstd.pow(3) * (xc * x_t).mean(dims)};
}

// y' of y = (x - mean) * invstd * weight + bias; x in the stats dtype, the
// result in out_dtype.
inline at::Tensor normalize_tangent(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& mean,
                                    const at::Tensor& invstd, const at::Tensor& x_t, const at::Tensor& weight_t,
                                    const at::Tensor& bias_t, const at::Tensor& mean_t,
                                    const at::Tensor& invstd_t, at::ScalarType out_dtype) {
  const int64_t dim = x.dim();
  const auto w = weight.defined() ? per_channel(weight, dim) : at::ones_like(per_channel(invstd, dim));
  const auto s = per_channel(invstd, dim);
  const auto xc = x - per_channel(mean, dim);
  auto y_t = at::zeros_like(x);
  if (x_t.defined()) y_t = y_t + x_t * s * w;
  if (mean_t.defined()) y_t = y_t - per_channel(mean_t, dim) * s * w;
  if (invstd_t.defined()) y_t = y_t + xc * per_channel(invstd_t, dim) * w;
  if (weight_t.defined()) y_t = y_t + xc * s * per_channel(weight_t, dim);
  if (bias_t.defined()) y_t = y_t + per_channel(bias_t, dim);
  return y_t.to(out_dtype);
}

}  // namespace autograd
}  // namespace bnfast
