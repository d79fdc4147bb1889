// bnfast::stats on CUDA: checks, allocation and launch (the kernels are in
// stats_kernel.cu).
#include <torch/library.h>

#include <limits>
#include <tuple>

#include "ops.h"

namespace bnfast {
namespace {

std::tuple<at::Tensor, at::Tensor> stats_cuda(const at::Tensor& input_, double eps) {
  check_stats(input_);
  c10::cuda::CUDAGuard guard(input_.device());
  const auto input = readable(input_);
  const auto options = input.options().dtype(stats_dtype(input.scalar_type()));
  auto mean = at::empty({input.size(1)}, options);
  auto invstd = at::empty({input.size(1)}, options);
  if (input.numel() == 0) {  // as on CPU: statistics of an empty batch are NaN
    mean.fill_(std::numeric_limits<double>::quiet_NaN());
    invstd.fill_(std::numeric_limits<double>::quiet_NaN());
    return {mean, invstd};
  }
  const auto plan = cuda::plan_for(input, {&input});
  auto scratch = cuda::scratch_for(input, plan, cuda::Reduction::kStats);
  cuda::check_launch(cuda::launch_stats(cuda::dtype_of(input.scalar_type()), plan, input.const_data_ptr(),
                                        mean.mutable_data_ptr(), invstd.mutable_data_ptr(), eps,
                                        scratch.mutable_data_ptr(), cuda::current_stream()));
  return {mean, invstd};
}

}  // namespace

TORCH_LIBRARY_IMPL(bnfast, CUDA, m) { m.impl("stats", &stats_cuda); }

}  // namespace bnfast
