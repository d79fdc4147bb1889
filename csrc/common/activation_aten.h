// The fused ops' activations (activation.h) from ATen's own activation ops:
// what the composites (csrc/autograd/composite.h) and the backends without
// fused kernels (fused_act_fallback.cpp) compute. Kept out of activation.h,
// which the per-ISA CPU loops include.
#pragma once

#include <ATen/Functions.h>

#include "activation.h"

namespace bnfast {

// act(z).
inline at::Tensor activate_aten(const at::Tensor& z, Act act, double slope) {
  switch (act) {
    case Act::kRelu: return at::relu(z);
    case Act::kLeakyRelu: return at::leaky_relu(z, slope);
    case Act::kSilu: return at::silu(z);
    case Act::kGelu: return at::gelu(z, "none");
    case Act::kGeluTanh: return at::gelu(z, "tanh");
    default: return z;
  }
}

// act'(z) * dz, from ATen's activation backwards (differentiable themselves).
inline at::Tensor activate_backward_aten(const at::Tensor& dz, const at::Tensor& z, Act act, double slope) {
  switch (act) {
    case Act::kRelu: return at::threshold_backward(dz, z, 0);
    case Act::kLeakyRelu: return at::leaky_relu_backward(dz, z, slope, /*self_is_result=*/false);
    case Act::kSilu: return at::silu_backward(dz, z);
    case Act::kGelu: return at::gelu_backward(dz, z, "none");
    case Act::kGeluTanh: return at::gelu_backward(dz, z, "tanh");
    default: return dz;
  }
}

}  // namespace bnfast
