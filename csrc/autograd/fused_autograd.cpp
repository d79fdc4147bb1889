// Autograd of the fused batch norm + activation ops (the rule is in
// graph.h): forward_act (training) and elemt_act (eval).
//
// forward_act's first-order backward is the fused bnfast::backward_act (dz =
// dy * act'(z) with z recomputed from the input, and grad_residual = dz);
// higher orders, tangents and torch.func go through the composite, as for
// forward. elemt_act, the eval form, differentiates its composite.
//
// forward_act(memory_efficient=True) keeps the output y instead of the input
// (the next layer keeps y anyway, so the input can be freed), as In-Place ABN
// does but without reparametrizing the weight. With w and b the weight and
// bias, r the residual, M the elements per channel:
//   z    = act^-1(y) - r,   xhat = (z - b) / w   (= (x - mean) * invstd)
//   dz   = dy * act'(z),    grad_bias = sum(dz),  grad_weight = sum(dz * xhat)
//   dx   = w * invstd * (dz - grad_bias / M - xhat * grad_weight / M)
//          + grad_mean / M - xhat * invstd^2 * grad_invstd / M
// That needs act invertible (identity; leaky_relu with a positive slope) and
// every |w| finite, non-zero and within the square root of the stats dtype's
// range: the kernel path scales by 1 / w and w^2, which under- or overflow
// outside it (kept_weight_range). pre_relu (y = BN(relu(x)), identity after)
// keeps y and where relu passes the gradient, not x <= 0 (a bool tensor):
// dx = the above for relu(x), 0 where x <= 0. Anything else (relu, silu,
// gelu: z is lost where act is flat or not one-to-one; a zero, non-finite or
// extreme weight element) keeps the input, as without the mode, and warns
// once; so does a traced call (torch.compile), whose weight cannot be read and
// whose partitioner picks what to keep. The backward is made of
// differentiable ATen ops, and y, mean and invstd are saved with their graph,
// so it differentiates again.
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <optional>
#include <string>
#include <utility>

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
  return activate_backward_aten(z_t, z, a.act, slope).to(input.scalar_type());
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

// pre_relu's mask on dx, as torch's relu backward applies it: 0 where x <= 0.
// relu_passes = !(x <= 0) is kept rather than x <= 0 because ATen's
// threshold_backward (grad where relu_passes > 0, else 0) is that exactly,
// NaN gradients included, and with the mask read as uint8 runs several times
// faster on the CPU than masked_fill with a bool mask.
at::Tensor relu_backward(const at::Tensor& grad, const at::Tensor& relu_passes) {
  return at::threshold_backward(grad, relu_passes.view(at::kByte), 0);
}

void relu_backward_(at::Tensor& grad, const at::Tensor& relu_passes) {
  at::threshold_backward_out(grad, grad, relu_passes.view(at::kByte), 0);
}

enum FromOutputSaved {
  kOutput, kReluPasses, kOutWeight, kOutBias, kOutResidual, kOutMean, kOutInvstd, kFromOutputSaved
};

// The gradients of forward_act w.r.t. (input, weight, bias, residual) from
// its output (the formulas at the top of this file), in differentiable ATen
// ops: for create_graph, gradients of the statistics, and half precision
// (whose output, rounded, would rebuild the input with more error than the
// stats dtype adds here).
variable_list backward_from_output(const variable_list& grads, const at::Tensor& y, const at::Tensor& relu_passes,
                                   const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& residual,
                                   const at::Tensor& mean, const at::Tensor& invstd, const Activation& a,
                                   double slope) {
  const auto &grad_out = grads[0], &grad_mean = grads[1], &grad_invstd = grads[2];
  const int64_t dim = y.dim();
  const auto dims = reduce_dims(dim);
  const double count = static_cast<double>(y.numel() / y.size(1));
  const auto y_s = in_stats_dtype(y);
  auto z = a.act == Act::kLeakyRelu ? at::where(y_s > 0, y_s, y_s / slope) : y_s;
  auto dz = grad_out.defined() ? in_stats_dtype(grad_out) : at::zeros_like(y_s);
  // torch's leaky_relu backward: the slope where z <= 0, i.e. where y <= 0.
  if (a.act == Act::kLeakyRelu) dz = at::where(y_s > 0, dz, dz * slope);
  if (residual.defined()) z = z - residual.to(z.scalar_type());
  if (bias.defined()) z = z - per_channel(bias.to(z.scalar_type()), dim);
  const auto xhat = weight.defined() ? z / per_channel(weight.to(z.scalar_type()), dim) : z;
  const auto sum_dz = dz.sum(dims), sum_dz_xhat = (dz * xhat).sum(dims);
  auto scale = invstd;
  if (weight.defined()) scale = scale * weight.to(invstd.scalar_type());
  auto dx = per_channel(scale, dim) *
            (dz - per_channel(sum_dz / count, dim) - xhat * per_channel(sum_dz_xhat / count, dim));
  if (grad_mean.defined()) dx = dx + per_channel(grad_mean / count, dim);
  if (grad_invstd.defined()) dx = dx - xhat * per_channel(invstd * invstd * grad_invstd / count, dim);
  if (a.pre_relu) dx = relu_backward(dx, relu_passes);
  variable_list result(4);
  result[0] = dx.to(y.scalar_type());
  if (weight.defined()) result[1] = sum_dz_xhat.to(weight.scalar_type());
  if (bias.defined()) result[2] = sum_dz.to(bias.scalar_type());
  if (residual.defined()) result[3] = dz.to(residual.scalar_type());
  return result;
}

// The same through bnfast's backward kernels, for first-order gradients of
// the output alone, holding no more full-size temporaries than the backward
// without the mode, where it can:
// * identity and pre_relu without a residual (any dtype): xhat = (y - b) / w
//   is backward's xhat = (x - mean) * invstd with mean := b, invstd := 1 / w,
//   and backward's grad_input scale weight * invstd is w * invstd_batch with
//   weight := w^2 * invstd_batch. bnfast::backward on y with those, then
//   pre_relu's zeros where x <= 0.
// * otherwise (leaky_relu, a residual; float and double): dz from y itself
//   (y > 0 exactly where z > 0) and the input rebuilt in one tensor,
//   x' = xhat / invstd + mean, into the fused backward. (In half precision
//   the rounded output would rebuild x' with too much error: the composite.)
// Returns nothing (undefined) where neither applies.
std::optional<variable_list> backward_from_output_kernel(const at::Tensor& grad_out, const at::Tensor& y,
                                                         const at::Tensor& relu_passes, const at::Tensor& weight,
                                                         const at::Tensor& bias, const at::Tensor& residual,
                                                         const at::Tensor& mean, const at::Tensor& invstd,
                                                         const Activation& a, double slope) {
  const auto dtype = y.scalar_type();
  const bool plain = a.act == Act::kIdentity && !residual.defined();
  if (!plain && dtype != at::kFloat && dtype != at::kDouble) return std::nullopt;
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  variable_list result(4);
  if (plain) {
    const auto stats = invstd.scalar_type();
    const auto w = weight.defined() ? weight.to(stats) : at::ones_like(invstd);
    const auto b = bias.defined() ? bias.to(stats) : at::zeros_like(mean);
    auto [grad_input, grad_weight, grad_bias] = call_backward(grad_out, y, b, w.reciprocal(), w * w * invstd);
    if (a.pre_relu) relu_backward_(grad_input, relu_passes);
    result[0] = grad_input;
    if (weight.defined()) result[1] = grad_weight.to(weight.scalar_type());
    if (bias.defined()) result[2] = grad_bias.to(bias.scalar_type());
    return result;
  }
  const int64_t dim = y.dim();
  const bool leaky = a.act == Act::kLeakyRelu;
  const auto dz = leaky ? at::leaky_relu_backward(grad_out, y, slope, /*self_is_result=*/false) : grad_out;
  auto x = leaky ? at::leaky_relu(y, 1.0 / slope) : y.clone();  // act^-1(y), in y's layout
  if (residual.defined()) x.sub_(residual);
  if (bias.defined()) x.sub_(per_channel(bias.to(x.scalar_type()), dim));
  auto scale = invstd;
  if (weight.defined()) scale = scale * weight.to(invstd.scalar_type());
  x.div_(per_channel(scale, dim)).add_(per_channel(mean, dim));
  auto [grad_input, grad_weight, grad_bias, unused] =
      call_backward_act(dz, x, mean, invstd, optional(weight), optional(bias), std::nullopt, "identity", 0.0);
  result[0] = grad_input;
  if (weight.defined()) result[1] = grad_weight.to(weight.scalar_type());
  if (bias.defined()) result[2] = grad_bias.to(bias.scalar_type());
  if (residual.defined()) result[3] = dz;
  return result;
}

struct ForwardActFromOutputBackward : public NodeWithSaved<kFromOutputSaved> {
  variable_list apply(variable_list&& grads) override {
    if (!grads[0].defined() && !grads[1].defined() && !grads[2].defined()) return variable_list(4);
    const auto y = unpack_output(kOutput);
    const auto a = parse_activation(act_);
    const bool first_order = !at::GradMode::is_enabled() && grads[0].defined() && !grads[1].defined() &&
                             !grads[2].defined() && !any_tangent({&grads[0]}) &&
                             grads[0].scalar_type() == y.scalar_type();
    std::optional<variable_list> kernels;
    if (first_order) {
      kernels = backward_from_output_kernel(grads[0], y, unpack(kReluPasses), unpack(kOutWeight),
                                            unpack(kOutBias), unpack(kOutResidual), unpack_output(kOutMean),
                                            unpack_output(kOutInvstd), a, slope_);
    }
    auto result = kernels ? *std::move(kernels)
                          : backward_from_output(grads, y, unpack(kReluPasses), unpack(kOutWeight),
                                                 unpack(kOutBias), unpack(kOutResidual), unpack_output(kOutMean),
                                                 unpack_output(kOutInvstd), a, slope_);
    for (size_t i = 0; i < 4; ++i) {
      if (!task_should_compute_output(i)) result[i] = at::Tensor();
    }
    return result;
  }
  std::string name() const override { return "BnfastForwardActFromOutputBackward"; }
  double slope_ = 0;
  std::string act_;
};

// Whether t's values cannot be read here: a tracer's tensor (fake,
// functional or meta), as under torch.compile, whose partitioner chooses
// what the compiled graph keeps anyway.
bool values_unknown(const at::Tensor& t) {
  const auto keys = t.key_set();
  return t.is_meta() || keys.has(c10::DispatchKey::Python) || keys.has(c10::DispatchKey::Functionalize);
}

// The |weight| range where the output determines the normalized input
// exactly enough: [sqrt(smallest normal), sqrt(largest)] of the stats dtype,
// so that w^2 (and 1 / w^2) neither flushes to 0 nor overflows. Zero, NaN and
// inf fall outside. bnfast.sync_batchnorm keeps the same range.
std::pair<double, double> kept_weight_range(at::ScalarType input_dtype) {
  if (stats_dtype(input_dtype) == at::kDouble) {
    return {std::sqrt(std::numeric_limits<double>::min()), std::sqrt(std::numeric_limits<double>::max())};
  }
  return {std::sqrt(std::numeric_limits<float>::min()), std::sqrt(std::numeric_limits<float>::max())};
}

// Why memory_efficient cannot recover the normalized input from the output
// (nullptr when it can). Reads the weight: one host sync on a GPU.
const char* output_not_invertible(const Activation& a, double slope, const at::Tensor& input,
                                  const at::Tensor& weight) {
  if (a.act == Act::kLeakyRelu ? slope <= 0 : a.act != Act::kIdentity) {
    return "the activation is not invertible (only identity, pre_relu and leaky_relu with a positive slope are)";
  }
  if (values_unknown(input) || (weight.defined() && values_unknown(weight))) {
    return "the weight cannot be read (traced), so it may have a zero element";
  }
  if (weight.defined()) {
    const auto [low, high] = kept_weight_range(input.scalar_type());
    const auto magnitude = weight.abs();
    if (!magnitude.ge(low).logical_and_(magnitude.le(high)).all().item<bool>()) {
      return "the weight has a zero, non-finite or extreme element (|w| outside the square root of the "
             "stats dtype's range), so the output does not determine the normalized input";
    }
  }
  return nullptr;
}

Triple forward_act_autograd(const at::Tensor& input, const OptionalTensor& weight_, const OptionalTensor& bias_,
                            const OptionalTensor& residual_, double eps, c10::string_view act, double slope,
                            bool memory_efficient, const OptionalTensor& running_mean,
                            const OptionalTensor& running_var, double momentum,
                            const OptionalTensor& num_batches_tracked) {
  const at::Tensor weight = weight_.value_or(at::Tensor()), bias = bias_.value_or(at::Tensor());
  const at::Tensor residual = residual_.value_or(at::Tensor());
  if (functorch_active()) {
    begin_composite_forward(input, running_mean, running_var, num_batches_tracked);
    const auto out = forward_act_composite({input, weight, bias, residual}, eps, parse_activation(act), slope);
    call_update_stats(running_mean, running_var, out[1], out[2], momentum, eps, input);
    return {out[0], out[1], out[2]};
  }
  // (The op checks act, and counts the step if it is wrong.)
  auto [y, mean, invstd] = call_below_autograd({running_mean, running_var, num_batches_tracked}, [&] {
    return call_forward_act(input, weight_, bias_, residual_, eps, act, slope, memory_efficient, running_mean,
                            running_var, momentum, num_batches_tracked);
  });
  const Activation a = parse_activation(act);
  const bool grad = requires_grad({&input, &weight, &bias, &residual});
  const char* not_invertible = grad && memory_efficient ? output_not_invertible(a, slope, input, weight) : nullptr;
  if (not_invertible && !values_unknown(input)) {
    // (bnfast.functional warns about the activation before it gets here, as
    // a Python warning; this reaches callers of the op and zero weights.)
    TORCH_WARN_ONCE("bnfast: memory_efficient=True keeps the batch norm input for backward (saves no memory) "
                    "where ", not_invertible, "; here act='", std::string(act), "'");
  }
  if (grad && memory_efficient && !not_invertible) {
    auto node = make_node<ForwardActFromOutputBackward>();
    record(node, {&input, &weight, &bias, &residual}, {&y, &mean, &invstd});
    // The outputs with their graph (is_output), so the backward differentiates again.
    node->saved_ = {SavedVariable(y, /*is_output=*/true),
                    a.pre_relu ? save_input(input.le(0).logical_not_()) : SavedVariable(),
                    save_input(weight), save_input(bias), save_input(residual),
                    SavedVariable(mean, /*is_output=*/true), SavedVariable(invstd, /*is_output=*/true)};
    node->slope_ = slope;
    node->act_ = std::string(act);
  } else if (grad) {
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

Triple forward_act_inplace(const at::Tensor& input, const OptionalTensor& weight, const OptionalTensor& bias,
                           const OptionalTensor& residual, double eps, c10::string_view act, double slope,
                           bool memory_efficient, const OptionalTensor& running_mean,
                           const OptionalTensor& running_var, double momentum,
                           const OptionalTensor& num_batches_tracked) {
  return call_then_bump_versions({running_mean, running_var, num_batches_tracked}, [&] {
    return call_forward_act(input, weight, bias, residual, eps, act, slope, memory_efficient, running_mean,
                            running_var, momentum, num_batches_tracked);
  });
}

}  // namespace
}  // namespace autograd

TORCH_LIBRARY_IMPL(bnfast, Autograd, m) {
  m.impl("forward_act", &autograd::forward_act_autograd);
  m.impl("elemt_act", &autograd::elemt_act_autograd);
}

TORCH_LIBRARY_IMPL(bnfast, ADInplaceOrView, m) { m.impl("forward_act", &autograd::forward_act_inplace); }

}  // namespace bnfast
