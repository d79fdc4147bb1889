// bnfast::backward on CUDA, the fused training backward, and backward_act
// (with an activation): checks, allocation and launch (the kernels are in
// backward_kernel.cu).
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "../common/op_entries.h"
#include "ops.h"

namespace bnfast {
namespace {

// activation: none for the plain backward. grad_residual: empty unless a residual is given.
Quad backward_impl(const at::Tensor& grad_out_, const at::Tensor& input_, const at::Tensor& mean_,
                   const at::Tensor& invstd_, const OptionalTensor& weight, const OptionalTensor& bias,
                   const OptionalTensor& residual_, std::optional<Activation> activation, double slope) {
  c10::cuda::CUDAGuard guard(input_.device());
  const auto input = readable(input_);
  const auto grad_out = readable_as(grad_out_, input);
  const auto residual = readable_optional_as(residual_, input);
  auto grad_input = empty_output_like(input);
  auto grad_weight = at::empty({input.size(1)}, mean_.options());
  auto grad_bias = at::empty({input.size(1)}, mean_.options());
  auto grad_residual = residual.defined() ? empty_output_like(input) : at::empty({0}, input.options());
  if (input.numel() == 0) {  // as on CPU: an empty batch contributes nothing
    grad_weight.zero_();
    grad_bias.zero_();
    return {grad_input, grad_weight, grad_bias, grad_residual};
  }
  const cuda::ParamTensor w(weight), b(bias);
  const auto mean = mean_.contiguous();
  const auto invstd = invstd_.contiguous();
  const auto plan = cuda::plan_for(input, {&input, &grad_out, &grad_input, &residual, &grad_residual});
  auto scratch = cuda::scratch_for(input, plan, cuda::Reduction::kGradSums);
  const auto dtype = cuda::dtype_of(input.scalar_type());
  if (activation) {
    auto fusion = cuda::act_fusion(*activation, slope, residual);
    if (residual.defined()) fusion.grad_residual = grad_residual.mutable_data_ptr();
    cuda::check_launch(cuda::launch_backward_act(
        dtype, plan, grad_out.const_data_ptr(), input.const_data_ptr(), grad_input.mutable_data_ptr(),
        mean.const_data_ptr(), invstd.const_data_ptr(), w.param(), b.param(), grad_weight.mutable_data_ptr(),
        grad_bias.mutable_data_ptr(), fusion, scratch.mutable_data_ptr(), cuda::current_stream()));
  } else {
    cuda::check_launch(cuda::launch_backward(
        dtype, plan, grad_out.const_data_ptr(), input.const_data_ptr(), grad_input.mutable_data_ptr(),
        mean.const_data_ptr(), invstd.const_data_ptr(), w.param(), grad_weight.mutable_data_ptr(),
        grad_bias.mutable_data_ptr(), scratch.mutable_data_ptr(), cuda::current_stream()));
  }
  return {grad_input, grad_weight, grad_bias, grad_residual};
}

}  // namespace

TORCH_LIBRARY_IMPL(bnfast, CUDA, m) {
  m.impl("backward", &backward_entry<backward_impl>);
  m.impl("backward_act", &backward_act_entry<backward_impl>);
}

}  // namespace bnfast
