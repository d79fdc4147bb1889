// bnfast::backward_elemt on CUDA: checks, allocation and launch (the kernel is
// in backward_elemt_kernel.cu).
#include <torch/library.h>

#include "ops.h"

namespace bnfast {
namespace {

at::Tensor backward_elemt_cuda(const at::Tensor& grad_out_, const at::Tensor& input_, const at::Tensor& mean_,
                               const at::Tensor& invstd_, const OptionalTensor& weight, const at::Tensor& mean_dy_,
                               const at::Tensor& mean_dy_xmu_) {
  check_backward_elemt(grad_out_, input_, mean_, invstd_, weight, mean_dy_, mean_dy_xmu_);
  c10::cuda::CUDAGuard guard(input_.device());
  const auto input = readable(input_);
  const auto grad_out = readable_as(grad_out_, input);
  auto grad_input = empty_output_like(input);
  if (input.numel() == 0) return grad_input;
  const cuda::ParamTensor w(weight);
  const auto mean = mean_.contiguous();
  const auto invstd = invstd_.contiguous();
  const auto mean_dy = mean_dy_.contiguous();
  const auto mean_dy_xmu = mean_dy_xmu_.contiguous();
  const auto plan = cuda::plan_for(input, {&input, &grad_out, &grad_input});
  cuda::check_launch(cuda::launch_backward_elemt(
      cuda::dtype_of(input.scalar_type()), plan, grad_out.const_data_ptr(), input.const_data_ptr(),
      grad_input.mutable_data_ptr(), mean.const_data_ptr(), invstd.const_data_ptr(), w.param(),
      mean_dy.const_data_ptr(), mean_dy_xmu.const_data_ptr(), cuda::current_stream()));
  return grad_input;
}

}  // namespace

TORCH_LIBRARY_IMPL(bnfast, CUDA, m) { m.impl("backward_elemt", &backward_elemt_cuda); }

}  // namespace bnfast
