// bnfast::backward_reduce on CUDA, and backward_reduce_act (with an
// activation): checks, allocation and launch (the kernels are in
// backward_reduce_kernel.cu).
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "../common/op_entries.h"
#include "ops.h"

namespace bnfast {
namespace {

// activation: none for the plain backward_reduce (which reads no invstd,
// weight, bias or residual).
std::tuple<at::Tensor, at::Tensor> backward_reduce_impl(const at::Tensor& grad_out_, const at::Tensor& input_,
                                                        const at::Tensor& mean_, const at::Tensor& invstd_,
                                                        const OptionalTensor& weight, const OptionalTensor& bias,
                                                        const OptionalTensor& residual_,
                                                        std::optional<Activation> activation, double slope) {
  c10::cuda::CUDAGuard guard(input_.device());
  const auto input = readable(input_);
  const auto grad_out = readable_as(grad_out_, input);
  const auto residual = readable_optional_as(residual_, input);
  auto sum_dy = at::empty({input.size(1)}, mean_.options());
  auto sum_dy_xmu = at::empty({input.size(1)}, mean_.options());
  if (input.numel() == 0) {  // sums over an empty batch
    sum_dy.zero_();
    sum_dy_xmu.zero_();
    return {sum_dy, sum_dy_xmu};
  }
  const auto mean = mean_.contiguous();
  const auto plan = cuda::plan_for(input, {&input, &grad_out, &residual});
  auto scratch = cuda::scratch_for(input, plan, cuda::Reduction::kGradSums);
  const auto dtype = cuda::dtype_of(input.scalar_type());
  if (activation) {
    const auto invstd = invstd_.contiguous();
    const cuda::ParamTensor w(weight), b(bias);
    cuda::check_launch(cuda::launch_backward_reduce_act(
        dtype, plan, grad_out.const_data_ptr(), input.const_data_ptr(), mean.const_data_ptr(),
        invstd.const_data_ptr(), w.param(), b.param(), sum_dy.mutable_data_ptr(), sum_dy_xmu.mutable_data_ptr(),
        cuda::act_fusion(*activation, slope, residual), scratch.mutable_data_ptr(), cuda::current_stream()));
  } else {
    cuda::check_launch(cuda::launch_backward_reduce(
        dtype, plan, grad_out.const_data_ptr(), input.const_data_ptr(), mean.const_data_ptr(),
        sum_dy.mutable_data_ptr(), sum_dy_xmu.mutable_data_ptr(), scratch.mutable_data_ptr(), cuda::current_stream()));
  }
  return {sum_dy, sum_dy_xmu};
}

}  // namespace

TORCH_LIBRARY_IMPL(bnfast, CUDA, m) {
  m.impl("backward_reduce", &backward_reduce_entry<backward_reduce_impl>);
  m.impl("backward_reduce_act", &backward_reduce_act_entry<backward_reduce_impl>);
}

}  // namespace bnfast
