// The fused ops' activations on the device (csrc/common/activation.h), in
// the accumulation type, with the CPU loops' definitions (csrc/cpu/isa/
// loops.cpp: activate, activate_derivative, Terms::dz), which are torch's:
//   relu(z)        z <= 0 ? 0 : z (NaN stays NaN, as torch.relu)
//   leaky_relu(z)  z > 0 ? z : z * slope
//   silu(z)        z / (1 + exp(-z))
//   gelu(z)        z / 2 * (1 + erf(z / sqrt 2))
//   gelu_tanh(z)   z / 2 * (1 + tanh(sqrt(2 / pi) * (z + 0.044715 z^3)))
// and the gradient dy * act'(z), where relu's is a mask (dy where z > 0,
// else 0) and leaky_relu's derivative is slope at 0 and for NaN.
//
// The activation is a run-time value, the same for the whole grid: with_act
// switches on it once per vector access, and the element loop inside is
// compiled per activation.
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <type_traits>

#include "../common/activation.h"

namespace bnfast {
namespace cuda {

template <Act kAct>
using ActTag = std::integral_constant<Act, kAct>;

// f(ActTag<act>{}), the activation as a compile-time constant.
template <typename F>
__device__ __forceinline__ void with_act(Act act, F&& f) {
  switch (act) {
    case Act::kRelu: f(ActTag<Act::kRelu>{}); break;
    case Act::kLeakyRelu: f(ActTag<Act::kLeakyRelu>{}); break;
    case Act::kSilu: f(ActTag<Act::kSilu>{}); break;
    case Act::kGelu: f(ActTag<Act::kGelu>{}); break;
    case Act::kGeluTanh: f(ActTag<Act::kGeluTanh>{}); break;
    default: f(ActTag<Act::kIdentity>{}); break;
  }
}

// The float or double overload of each math function.
template <typename A>
__device__ __forceinline__ A exp_of(A v) {
  if constexpr (std::is_same_v<A, float>) return expf(v); else return exp(v);
}
template <typename A>
__device__ __forceinline__ A erf_of(A v) {
  if constexpr (std::is_same_v<A, float>) return erff(v); else return erf(v);
}
template <typename A>
__device__ __forceinline__ A tanh_of(A v) {
  if constexpr (std::is_same_v<A, float>) return tanhf(v); else return tanh(v);
}

// relu that keeps NaN (pre_relu's input, and the relu activation).
template <typename A>
__device__ __forceinline__ A relu_of(A v) {
  return v <= A(0) ? A(0) : v;
}

template <Act kAct, typename A>
__device__ __forceinline__ A activate(A z, A slope) {
  if constexpr (kAct == Act::kRelu) {
    return relu_of(z);
  } else if constexpr (kAct == Act::kLeakyRelu) {
    return z > A(0) ? z : z * slope;
  } else if constexpr (kAct == Act::kSilu) {
    return z / (A(1) + exp_of(-z));
  } else if constexpr (kAct == Act::kGelu) {
    return z * A(0.5) * (A(1) + erf_of(z * A(M_SQRT1_2)));
  } else if constexpr (kAct == Act::kGeluTanh) {
    const A beta = A(M_SQRT2 * M_2_SQRTPI * 0.5), kappa = A(0.044715);
    return A(0.5) * z * (A(1) + tanh_of(beta * (z + kappa * z * z * z)));
  } else {
    return z;
  }
}

// dy * act'(z).
template <Act kAct, typename A>
__device__ __forceinline__ A activate_grad(A dy, A z, A slope) {
  if constexpr (kAct == Act::kRelu) {
    return z > A(0) ? dy : A(0);
  } else if constexpr (kAct == Act::kLeakyRelu) {
    return z > A(0) ? dy : dy * slope;
  } else if constexpr (kAct == Act::kSilu) {
    const A sigmoid = A(1) / (A(1) + exp_of(-z));
    return dy * (sigmoid * (A(1) + z * (A(1) - sigmoid)));
  } else if constexpr (kAct == Act::kGelu) {
    const A alpha = A(M_2_SQRTPI * M_SQRT1_2 * 0.5);
    const A cdf = A(0.5) * (A(1) + erf_of(z * A(M_SQRT1_2)));
    const A pdf = exp_of(A(-0.5) * z * z) * alpha;
    return dy * (cdf + z * pdf);
  } else if constexpr (kAct == Act::kGeluTanh) {
    const A beta = A(M_SQRT2 * M_2_SQRTPI * 0.5), kappa = A(0.044715);
    const A z2 = z * z;
    const A t = tanh_of(beta * (z + kappa * z2 * z));
    return dy * (A(0.5) * (A(1) + t) + A(0.5) * z * (A(1) - t * t) * beta * (A(1) + A(3) * kappa * z2));
  } else {
    return dy;
  }
}

}  // namespace cuda
}  // namespace bnfast
