// Argument checks of every op, one function per op, shared by the CPU and
// CUDA kernels (defined once, in checks.cpp, compiled by the host compiler:
// no exception is ever thrown from nvcc-compiled code). Every message names
// the argument and what is wrong with it, in torch's words where torch has
// them, and raises torch's exception type for the same mistake.
#pragma once

#include <ATen/core/Tensor.h>

#include <c10/util/string_view.h>

#include <optional>
#include <tuple>

#include "activation.h"

namespace bnfast {

using OptionalTensor = std::optional<at::Tensor>;
using Triple = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using Quad = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// The accumulation ("stats") dtype of an input: float64 for float64 input,
// float32 for every other floating input (float32, float16, bfloat16). Mean,
// invstd and the per-channel sums of every op are in this dtype.
inline at::ScalarType stats_dtype(at::ScalarType input_dtype) {
  return input_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

// Elements per channel of an input (N, C, *): the count of its statistics.
inline int64_t per_channel_count(const at::Tensor& input) {
  return input.size(1) == 0 ? 0 : input.numel() / input.size(1);
}

// A fused op's activation, from its schema's act string (activation.h):
// ValueError naming the choices for an unknown one.
struct Activation {
  Act act;
  bool pre_relu;
};
Activation parse_activation(c10::string_view name);

void check_stats(const at::Tensor& input);
void check_forward(const at::Tensor& input, const OptionalTensor& weight, const OptionalTensor& bias);
// The training forwards' running statistics: both or neither (ValueError, as
// torch), each C values of a floating dtype on the input's device.
void check_running_stats(const at::Tensor& input, const OptionalTensor& running_mean,
                         const OptionalTensor& running_var);
// A training forward's num_batches_tracked: one int64 element on the input's
// device.
void check_num_batches_tracked(const at::Tensor& input, const OptionalTensor& num_batches_tracked);
void check_elemt(const at::Tensor& input, const OptionalTensor& weight, const OptionalTensor& bias,
                 const at::Tensor& mean, const at::Tensor& invstd);
void check_elemt_running(const at::Tensor& input, const OptionalTensor& weight, const OptionalTensor& bias,
                         const at::Tensor& running_mean, const at::Tensor& running_var);
void check_backward_reduce(const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& mean,
                           const at::Tensor& invstd);
void check_backward_elemt(const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& mean,
                          const at::Tensor& invstd, const OptionalTensor& weight,
                          const at::Tensor& mean_dy, const at::Tensor& mean_dy_xmu);
void check_backward(const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& mean,
                    const at::Tensor& invstd, const OptionalTensor& weight);
void check_update_stats(const at::Tensor& running_mean, const at::Tensor& running_var,
                        const at::Tensor& mean, const at::Tensor& invstd, int64_t count);
void check_gather_stats(const at::Tensor& mean, const at::Tensor& invstd, const at::Tensor& counts);
// The fused ops: the plain op's checks, a residual like the input (post
// activations only) and the activation's name; returns the activation.
Activation check_forward_act(const at::Tensor& input, const OptionalTensor& weight, const OptionalTensor& bias,
                             const OptionalTensor& residual, c10::string_view act);
Activation check_elemt_act(const at::Tensor& input, const OptionalTensor& weight, const OptionalTensor& bias,
                           const at::Tensor& mean, const at::Tensor& invstd, const OptionalTensor& residual,
                           c10::string_view act);
Activation check_backward_act(const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& mean,
                              const at::Tensor& invstd, const OptionalTensor& weight, const OptionalTensor& bias,
                              const OptionalTensor& residual, c10::string_view act);
// The synchronized fused pieces: stats' checks and an activation (no
// residual); backward_act's (backward_reduce_act), and mean_dy, mean_dy_xmu
// (backward_elemt_act).
Activation check_stats_act(const at::Tensor& input, c10::string_view act);
Activation check_backward_elemt_act(const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& mean,
                                    const at::Tensor& invstd, const OptionalTensor& weight,
                                    const OptionalTensor& bias, const OptionalTensor& residual, c10::string_view act,
                                    const at::Tensor& mean_dy, const at::Tensor& mean_dy_xmu);

}  // namespace bnfast
