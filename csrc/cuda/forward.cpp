// bnfast::forward on CUDA, the fused training forward: checks, allocation and
// launch (the kernels are in forward_kernel.cu).
#include <torch/library.h>

#include <limits>
#include <tuple>

#include "ops.h"

namespace bnfast {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_cuda(const at::Tensor& input_, const OptionalTensor& weight,
                                                            const OptionalTensor& bias, double eps) {
  check_forward(input_, weight, bias);
  c10::cuda::CUDAGuard guard(input_.device());
  const auto input = readable(input_);
  const auto options = input.options().dtype(stats_dtype(input.scalar_type()));
  auto mean = at::empty({input.size(1)}, options);
  auto invstd = at::empty({input.size(1)}, options);
  auto output = empty_output_like(input);
  if (input.numel() == 0) {  // as on CPU: statistics of an empty batch are NaN
    mean.fill_(std::numeric_limits<double>::quiet_NaN());
    invstd.fill_(std::numeric_limits<double>::quiet_NaN());
    return {output, mean, invstd};
  }
  const cuda::ParamTensor w(weight), b(bias);
  const auto plan = cuda::plan_for(input, {&input, &output});
  auto scratch = cuda::scratch_for(input, plan, cuda::Reduction::kStats);
  cuda::check_launch(cuda::launch_forward(cuda::dtype_of(input.scalar_type()), plan, input.const_data_ptr(),
                                          output.mutable_data_ptr(), w.param(), b.param(), mean.mutable_data_ptr(),
                                          invstd.mutable_data_ptr(), eps, scratch.mutable_data_ptr(),
                                          cuda::current_stream()));
  return {output, mean, invstd};
}

}  // namespace

TORCH_LIBRARY_IMPL(bnfast, CUDA, m) { m.impl("forward", &forward_cuda); }

}  // namespace bnfast
