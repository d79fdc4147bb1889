// The argument checks of every op (declared in checks.h).
#include "checks.h"

#include <c10/util/Exception.h>

namespace bnfast {
namespace {

void check_input(const at::Tensor& input) {
  TORCH_CHECK(input.defined(), "bnfast: input is undefined");
  TORCH_CHECK(input.dim() >= 2, "bnfast: expected input of shape (N, C, *) with at least 2 dimensions, got ",
              input.dim(), "D input of size ", input.sizes());
  // IndexError, as torch's batch_norm raises for zero channels (there is no
  // statistic to compute; the kernels' work split also assumes C >= 1).
  TORCH_CHECK_INDEX(input.size(1) > 0,
                    "bnfast: input has 0 channels (size of dim 1); batch norm needs at least one, got size ",
                    input.sizes());
  const auto dtype = input.scalar_type();
  // NotImplementedError, as torch's own batch_norm raises for integer input.
  TORCH_CHECK_NOT_IMPLEMENTED(
      dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
      "bnfast: batch_norm not implemented for '", c10::toString(dtype),
      "' input (expected float32, float64, float16 or bfloat16)");
}

void check_same_device(const at::Tensor& t, const char* name, const at::Tensor& reference,
                       const char* reference_name) {
  TORCH_CHECK(t.device() == reference.device(), "bnfast: ", name, " must be on the ", reference_name,
              "'s device ", reference.device(), ", got ", t.device());
}

// Same shape, dtype and device as input (grad_out against input).
void check_like_input(const at::Tensor& t, const char* name, const at::Tensor& input) {
  TORCH_CHECK(t.defined(), "bnfast: ", name, " is undefined");
  TORCH_CHECK(t.sizes() == input.sizes(), "bnfast: ", name, " must have the input's shape ", input.sizes(),
              ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == input.scalar_type(), "bnfast: ", name, " must have the input's dtype ",
              input.scalar_type(), ", got ", t.scalar_type());
  check_same_device(t, name, input, "input");
}

// A per-channel vector: 1-D with C elements, on the input's device. A
// parameter (weight, bias) may be in the input's dtype or in the stats dtype
// (mixed precision); statistics and sums must be in the stats dtype exactly;
// running statistics may be of any floating dtype (read in the stats dtype,
// as torch's eval path takes them).
enum class Role { kParameter, kStatistic, kRunningStatistic };

void check_channel_vector(const at::Tensor& t, const char* name, const at::Tensor& input, Role role) {
  const int64_t channels = input.size(1);
  TORCH_CHECK(t.defined(), "bnfast: ", name, " is undefined");
  TORCH_CHECK(t.dim() == 1 && t.size(0) == channels, "bnfast: ", name, " should contain ", channels,
              " elements not ", t.numel(), " (shape ", t.sizes(), ")");
  check_same_device(t, name, input, "input");
  const auto expected = stats_dtype(input.scalar_type());
  const auto dtype = t.scalar_type();
  if (role == Role::kRunningStatistic) {
    TORCH_CHECK(at::isFloatingType(dtype), "bnfast: ", name, " must be a floating point tensor, got ", dtype);
  } else if (role == Role::kParameter) {
    TORCH_CHECK(dtype == expected || dtype == input.scalar_type(), "bnfast: ", name, " must be ",
                input.scalar_type(), " (the input's dtype) or ", expected, ", got ", dtype);
  } else {
    TORCH_CHECK(dtype == expected, "bnfast: ", name, " must be ", expected, " for ", input.scalar_type(),
                " input, got ", dtype);
  }
}

void check_parameter(const OptionalTensor& t, const char* name, const at::Tensor& input) {
  if (t.has_value() && t->defined()) check_channel_vector(*t, name, input, Role::kParameter);
}

void check_statistic(const at::Tensor& t, const char* name, const at::Tensor& input) {
  check_channel_vector(t, name, input, Role::kStatistic);
}

// Batch statistics without an input to compare with (update_stats_,
// gather_stats): float32 or float64, and invstd like mean.
void check_stats_pair(const at::Tensor& mean, const at::Tensor& invstd) {
  TORCH_CHECK(mean.scalar_type() == at::kFloat || mean.scalar_type() == at::kDouble,
              "bnfast: mean must be float32 or float64, got ", mean.scalar_type());
  TORCH_CHECK(invstd.sizes() == mean.sizes(), "bnfast: invstd must have mean's shape ", mean.sizes(), ", got ",
              invstd.sizes());
  TORCH_CHECK(invstd.scalar_type() == mean.scalar_type(), "bnfast: invstd must be ", mean.scalar_type(),
              " like mean, got ", invstd.scalar_type());
  check_same_device(invstd, "invstd", mean, "mean");
}

// The residual of a fused op: the input's shape, dtype and device, and only
// with a post-activation.
Activation check_fused(const at::Tensor& input, const OptionalTensor& residual, c10::string_view act) {
  const Activation a = parse_activation(act);
  if (residual.has_value() && residual->defined()) {
    TORCH_CHECK_VALUE(!a.pre_relu, "bnfast: a residual is added after batch norm, so it cannot be combined with "
                                   "act='pre_relu' (batch norm of relu(x))");
    check_like_input(*residual, "residual", input);
  }
  return a;
}

}  // namespace

Activation parse_activation(c10::string_view name) {
  if (name == "identity") return {Act::kIdentity, false};
  if (name == "relu") return {Act::kRelu, false};
  if (name == "leaky_relu") return {Act::kLeakyRelu, false};
  if (name == "silu") return {Act::kSilu, false};
  if (name == "gelu") return {Act::kGelu, false};
  if (name == "gelu_tanh") return {Act::kGeluTanh, false};
  if (name == "pre_relu") return {Act::kIdentity, true};
  C10_THROW_ERROR(ValueError, c10::str("bnfast: unknown activation '", name,
                                       "'; choose from identity, relu, leaky_relu, silu, gelu, gelu_tanh, pre_relu"));
}

void check_stats(const at::Tensor& input) { check_input(input); }

void check_forward(const at::Tensor& input, const OptionalTensor& weight, const OptionalTensor& bias) {
  check_input(input);
  check_parameter(weight, "weight", input);
  check_parameter(bias, "bias", input);
}

void check_running_stats(const at::Tensor& input, const OptionalTensor& running_mean,
                         const OptionalTensor& running_var) {
  const bool has_mean = running_mean.has_value() && running_mean->defined();
  const bool has_var = running_var.has_value() && running_var->defined();
  TORCH_CHECK_VALUE(has_mean == has_var, "bnfast: running_mean and running_var must either both be None or neither be None");
  if (!has_mean) return;
  check_channel_vector(*running_mean, "running_mean", input, Role::kRunningStatistic);
  check_channel_vector(*running_var, "running_var", input, Role::kRunningStatistic);
}

void check_num_batches_tracked(const at::Tensor& input, const OptionalTensor& num_batches_tracked) {
  if (!num_batches_tracked.has_value() || !num_batches_tracked->defined()) return;
  const auto& t = *num_batches_tracked;
  TORCH_CHECK(t.scalar_type() == at::kLong && t.numel() == 1,
              "bnfast: num_batches_tracked must be one int64 element, got ", t.scalar_type(), " of shape ", t.sizes());
  check_same_device(t, "num_batches_tracked", input, "input");
}

void check_elemt(const at::Tensor& input, const OptionalTensor& weight, const OptionalTensor& bias,
                 const at::Tensor& mean, const at::Tensor& invstd) {
  check_forward(input, weight, bias);
  check_statistic(mean, "mean", input);
  check_statistic(invstd, "invstd", input);
}

void check_elemt_running(const at::Tensor& input, const OptionalTensor& weight, const OptionalTensor& bias,
                         const at::Tensor& running_mean, const at::Tensor& running_var) {
  check_forward(input, weight, bias);
  check_channel_vector(running_mean, "running_mean", input, Role::kRunningStatistic);
  check_channel_vector(running_var, "running_var", input, Role::kRunningStatistic);
}

void check_backward_reduce(const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& mean,
                           const at::Tensor& invstd) {
  check_input(input);
  check_like_input(grad_out, "grad_out", input);
  check_statistic(mean, "mean", input);
  check_statistic(invstd, "invstd", input);
}

void check_backward(const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& mean,
                    const at::Tensor& invstd, const OptionalTensor& weight) {
  check_backward_reduce(grad_out, input, mean, invstd);
  check_parameter(weight, "weight", input);
}

void check_backward_elemt(const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& mean,
                          const at::Tensor& invstd, const OptionalTensor& weight,
                          const at::Tensor& mean_dy, const at::Tensor& mean_dy_xmu) {
  check_backward(grad_out, input, mean, invstd, weight);
  check_statistic(mean_dy, "mean_dy", input);
  check_statistic(mean_dy_xmu, "mean_dy_xmu", input);
}

void check_update_stats(const at::Tensor& running_mean, const at::Tensor& running_var,
                        const at::Tensor& mean, const at::Tensor& invstd, int64_t count) {
  TORCH_CHECK(mean.dim() == 1, "bnfast: mean must be 1-D (one value per channel), got shape ", mean.sizes());
  check_stats_pair(mean, invstd);
  for (const auto& [running, name] : {std::pair{&running_mean, "running_mean"}, {&running_var, "running_var"}}) {
    TORCH_CHECK(running->dim() == 1 && running->numel() == mean.numel(), "bnfast: ", name, " should contain ",
                mean.numel(), " elements not ", running->numel());
    check_same_device(*running, name, mean, "mean");
    TORCH_CHECK(at::isFloatingType(running->scalar_type()), "bnfast: ", name, " must be floating point, got ",
                running->scalar_type());
  }
  TORCH_CHECK(count >= 0, "bnfast: count must be >= 0, got ", count);
}

void check_gather_stats(const at::Tensor& mean, const at::Tensor& invstd, const at::Tensor& counts) {
  TORCH_CHECK(mean.dim() == 2, "bnfast: mean must be [replicas, channels], got shape ", mean.sizes());
  check_stats_pair(mean, invstd);
  TORCH_CHECK(counts.dim() == 1 && counts.numel() == mean.size(0), "bnfast: counts must have ", mean.size(0),
              " elements (one per replica), got shape ", counts.sizes());
  check_same_device(counts, "counts", mean, "mean");
}

Activation check_forward_act(const at::Tensor& input, const OptionalTensor& weight, const OptionalTensor& bias,
                             const OptionalTensor& residual, c10::string_view act) {
  check_forward(input, weight, bias);
  return check_fused(input, residual, act);
}

Activation check_elemt_act(const at::Tensor& input, const OptionalTensor& weight, const OptionalTensor& bias,
                           const at::Tensor& mean, const at::Tensor& invstd, const OptionalTensor& residual,
                           c10::string_view act) {
  check_elemt(input, weight, bias, mean, invstd);
  return check_fused(input, residual, act);
}

Activation check_backward_act(const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& mean,
                              const at::Tensor& invstd, const OptionalTensor& weight, const OptionalTensor& bias,
                              const OptionalTensor& residual, c10::string_view act) {
  check_backward(grad_out, input, mean, invstd, weight);
  check_parameter(bias, "bias", input);
  return check_fused(input, residual, act);
}

Activation check_stats_act(const at::Tensor& input, c10::string_view act) {
  check_stats(input);
  return parse_activation(act);
}

Activation check_backward_elemt_act(const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& mean,
                                    const at::Tensor& invstd, const OptionalTensor& weight,
                                    const OptionalTensor& bias, const OptionalTensor& residual, c10::string_view act,
                                    const at::Tensor& mean_dy, const at::Tensor& mean_dy_xmu) {
  const auto a = check_backward_act(grad_out, input, mean, invstd, weight, bias, residual, act);
  check_statistic(mean_dy, "mean_dy", input);
  check_statistic(mean_dy_xmu, "mean_dy_xmu", input);
  return a;
}


}  // namespace bnfast
