// bnfast::backward_reduce on CUDA: checks, allocation and launch (the kernels
// are in backward_reduce_kernel.cu).
#include <torch/library.h>

#include <tuple>

#include "ops.h"

namespace bnfast {
namespace {

std::tuple<at::Tensor, at::Tensor> backward_reduce_cuda(const at::Tensor& grad_out_, const at::Tensor& input_,
                                                        const at::Tensor& mean_, const at::Tensor& invstd) {
  check_backward_reduce(grad_out_, input_, mean_, invstd);
  c10::cuda::CUDAGuard guard(input_.device());
  const auto input = readable(input_);
  const auto grad_out = readable_as(grad_out_, input);
  auto sum_dy = at::empty({input.size(1)}, mean_.options());
  auto sum_dy_xmu = at::empty({input.size(1)}, mean_.options());
  if (input.numel() == 0) {  // sums over an empty batch
    sum_dy.zero_();
    sum_dy_xmu.zero_();
    return {sum_dy, sum_dy_xmu};
  }
  const auto mean = mean_.contiguous();
  const auto plan = cuda::plan_for(input, {&input, &grad_out});
  auto scratch = cuda::scratch_for(input, plan, cuda::Reduction::kGradSums);
  cuda::check_launch(cuda::launch_backward_reduce(
      cuda::dtype_of(input.scalar_type()), plan, grad_out.const_data_ptr(), input.const_data_ptr(),
      mean.const_data_ptr(), sum_dy.mutable_data_ptr(), sum_dy_xmu.mutable_data_ptr(), scratch.mutable_data_ptr(),
      cuda::current_stream()));
  return {sum_dy, sum_dy_xmu};
}

}  // namespace

TORCH_LIBRARY_IMPL(bnfast, CUDA, m) { m.impl("backward_reduce", &backward_reduce_cuda); }

}  // namespace bnfast
