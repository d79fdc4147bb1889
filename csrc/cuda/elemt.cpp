// bnfast::elemt on CUDA: checks, allocation and launch (the kernel is in
// elemt_kernel.cu).
#include <torch/library.h>

#include "ops.h"

namespace bnfast {
namespace {

at::Tensor elemt_cuda(const at::Tensor& input_, const OptionalTensor& weight, const OptionalTensor& bias,
                      const at::Tensor& mean_, const at::Tensor& invstd_) {
  check_elemt(input_, weight, bias, mean_, invstd_);
  c10::cuda::CUDAGuard guard(input_.device());
  const auto input = readable(input_);
  auto output = empty_output_like(input);
  if (input.numel() == 0) return output;
  const cuda::ParamTensor w(weight), b(bias);
  const auto mean = mean_.contiguous();
  const auto invstd = invstd_.contiguous();
  const auto plan = cuda::plan_for(input, {&input, &output});
  cuda::check_launch(cuda::launch_elemt(cuda::dtype_of(input.scalar_type()), plan, input.const_data_ptr(),
                                        output.mutable_data_ptr(), w.param(), b.param(), mean.const_data_ptr(),
                                        invstd.const_data_ptr(), cuda::current_stream()));
  return output;
}

}  // namespace

TORCH_LIBRARY_IMPL(bnfast, CUDA, m) { m.impl("elemt", &elemt_cuda); }

}  // namespace bnfast
