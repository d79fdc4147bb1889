// bnfast::backward on CUDA, the fused training backward: checks, allocation
// and launch (the kernels are in backward_kernel.cu).
#include <torch/library.h>

#include <tuple>

#include "ops.h"

namespace bnfast {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cuda(const at::Tensor& grad_out_, const at::Tensor& input_,
                                                             const at::Tensor& mean_, const at::Tensor& invstd_,
                                                             const OptionalTensor& weight) {
  check_backward(grad_out_, input_, mean_, invstd_, weight);
  c10::cuda::CUDAGuard guard(input_.device());
  const auto input = readable(input_);
  const auto grad_out = readable_as(grad_out_, input);
  auto grad_input = empty_output_like(input);
  auto grad_weight = at::empty({input.size(1)}, mean_.options());
  auto grad_bias = at::empty({input.size(1)}, mean_.options());
  if (input.numel() == 0) {  // as on CPU: an empty batch contributes nothing
    grad_weight.zero_();
    grad_bias.zero_();
    return {grad_input, grad_weight, grad_bias};
  }
  const cuda::ParamTensor w(weight);
  const auto mean = mean_.contiguous();
  const auto invstd = invstd_.contiguous();
  const auto plan = cuda::plan_for(input, {&input, &grad_out, &grad_input});
  auto scratch = cuda::scratch_for(input, plan, cuda::Reduction::kGradSums);
  cuda::check_launch(cuda::launch_backward(
      cuda::dtype_of(input.scalar_type()), plan, grad_out.const_data_ptr(), input.const_data_ptr(),
      grad_input.mutable_data_ptr(), mean.const_data_ptr(), invstd.const_data_ptr(), w.param(),
      grad_weight.mutable_data_ptr(), grad_bias.mutable_data_ptr(), scratch.mutable_data_ptr(),
      cuda::current_stream()));
  return {grad_input, grad_weight, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(bnfast, CUDA, m) { m.impl("backward", &backward_cuda); }

}  // namespace bnfast
