// A fused op's Fusion (loops.h) from its arguments, for the CPU op files.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>

#include "../common/checks.h"
#include "loops.h"

namespace bnfast {
namespace cpu {

// The activation and residual (read in the input's layout: readable_as) of
// a fused op; grad_residual for the backward.
template <typename scalar_t>
Fusion<scalar_t> make_fusion(const Activation& activation, double slope, const at::Tensor& residual,
                             const at::Tensor& grad_residual = at::Tensor()) {
  Fusion<scalar_t> f;
  f.act = activation.act;
  f.pre_relu = activation.pre_relu;
  f.slope = static_cast<at::opmath_type<scalar_t>>(slope);
  if (residual.defined()) f.residual = residual.const_data_ptr<scalar_t>();
  if (grad_residual.defined()) f.grad_residual = grad_residual.mutable_data_ptr<scalar_t>();
  return f;
}

}  // namespace cpu
}  // namespace bnfast
