// Argument checks shared by the CPU and CUDA kernels. Every message names the
// argument and what is wrong with it, in torch's words where torch has them.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

namespace bnfast {

// The accumulation ("stats") dtype of an input: float64 for float64 input,
// float32 for every other floating input (float32, float16, bfloat16).
inline at::ScalarType stats_dtype(at::ScalarType input_dtype) {
  return input_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_input(const at::Tensor& input, const char* name = "input") {
  TORCH_CHECK(input.defined(), "bnfast: ", name, " is undefined");
  TORCH_CHECK(input.dim() >= 2, "bnfast: expected ", name,
              " of shape (N, C, *) with at least 2 dimensions, got ", input.dim(),
              "D input of size ", input.sizes());
  // IndexError, as torch's batch_norm raises for zero channels (there is no
  // statistic to compute; the kernels' work split also assumes C >= 1).
  TORCH_CHECK_INDEX(input.size(1) > 0, "bnfast: ", name,
                    " has 0 channels (size of dim 1); batch norm needs at least one, got size ",
                    input.sizes());
  const auto dtype = input.scalar_type();
  // NotImplementedError, as torch's own batch_norm raises for integer input.
  TORCH_CHECK_NOT_IMPLEMENTED(dtype == at::kFloat || dtype == at::kDouble ||
                                  dtype == at::kHalf || dtype == at::kBFloat16,
                              "bnfast: batch_norm not implemented for '", c10::toString(dtype),
                              "' ", name, " (expected float32, float64, float16 or bfloat16)");
}

// Same shape, dtype and device as input (grad_out against input).
inline void check_like_input(const at::Tensor& t, const char* name, const at::Tensor& input) {
  TORCH_CHECK(t.defined(), "bnfast: ", name, " is undefined");
  TORCH_CHECK(t.sizes() == input.sizes(), "bnfast: ", name, " must have the input's shape ",
              input.sizes(), ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == input.scalar_type(), "bnfast: ", name,
              " must have the input's dtype ", input.scalar_type(), ", got ", t.scalar_type());
  TORCH_CHECK(t.device() == input.device(), "bnfast: ", name,
              " must be on the input's device ", input.device(), ", got ", t.device());
}

// A per-channel vector: 1-D with C elements, floating, on the input's device.
// allow_input_dtype: it may be in the input's dtype or float32 (weight, bias,
// running statistics); otherwise it must be in the stats dtype exactly.
inline void check_channel_vector(const at::Tensor& t, const char* name, const at::Tensor& input,
                                 bool allow_input_dtype) {
  const int64_t channels = input.size(1);
  TORCH_CHECK(t.defined(), "bnfast: ", name, " is undefined");
  TORCH_CHECK(t.dim() == 1 && t.size(0) == channels, "bnfast: ", name, " should contain ",
              channels, " elements not ", t.numel(), " (shape ", t.sizes(), ")");
  TORCH_CHECK(t.device() == input.device(), "bnfast: ", name,
              " must be on the input's device ", input.device(), ", got ", t.device());
  const auto expected = stats_dtype(input.scalar_type());
  const auto dtype = t.scalar_type();
  if (allow_input_dtype) {
    TORCH_CHECK(dtype == expected || dtype == input.scalar_type(), "bnfast: ", name,
                " must be ", input.scalar_type(), " (the input's dtype) or ", expected,
                ", got ", dtype);
  } else {
    TORCH_CHECK(dtype == expected, "bnfast: ", name, " must be ", expected, " for ",
                input.scalar_type(), " input, got ", dtype);
  }
}

inline void check_optional_channel_vector(const c10::optional<at::Tensor>& t, const char* name,
                                          const at::Tensor& input) {
  if (t.has_value() && t->defined()) {
    check_channel_vector(*t, name, input, /*allow_input_dtype=*/true);
  }
}

inline bool has_value(const c10::optional<at::Tensor>& t) {
  return t.has_value() && t->defined();
}

}  // namespace bnfast
