// A fused op's Fusion (loops.h) from its arguments, for the CPU op files.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>

#include <utility>
#include <vector>

#include "../common/checks.h"
#include "channel_math.h"
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

// A fused backward op's Fusion: make_fusion's, with the coefficients of
// z = BN(x) (zp, zq, z_coefficients) when the activation's derivative reads z.
template <typename scalar_t>
class BackwardFusion {
 public:
  using opmath_t = at::opmath_type<scalar_t>;
  BackwardFusion(const Activation& activation, double slope, const at::Tensor& residual,
                 const at::Tensor& grad_residual, const OptionalTensor& bias, const opmath_t* invstd,
                 const opmath_t* weight, int64_t C)
      : fusion_(make_fusion<scalar_t>(activation, slope, residual, grad_residual)) {
    if (activation.act == Act::kIdentity) return;
    const auto b = channel_values<opmath_t>(bias, C, 0);
    z_ = z_coefficients(invstd, weight, b.data(), C);
    fusion_.zp = z_.first.data();
    fusion_.zq = z_.second.data();
  }
  BackwardFusion(const BackwardFusion&) = delete;  // fusion_ points into z_
  BackwardFusion& operator=(const BackwardFusion&) = delete;
  const Fusion<scalar_t>* get() const { return &fusion_; }
  // For an op whose reduction writes grad_residual before its affine pass (Fusion).
  void set_grad_residual_from_reduce(bool from_reduce) { fusion_.grad_residual_from_reduce = from_reduce; }

 private:
  Fusion<scalar_t> fusion_;
  std::pair<std::vector<opmath_t>, std::vector<opmath_t>> z_;
};

}  // namespace cpu
}  // namespace bnfast
