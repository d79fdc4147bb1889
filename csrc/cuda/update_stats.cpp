// bnfast::update_stats_ on CUDA: checks and launch (the kernel is in
// update_stats_kernel.cu); the launch is also the training forwards'
// (forward.cpp). An empty batch (count == 0) leaves the running statistics
// unchanged, as on CPU.
#include <torch/library.h>

#include "../common/op_entries.h"
#include "ops.h"

namespace bnfast {
namespace cuda {

void update_running_stats(at::Tensor& running_mean, at::Tensor& running_var, const at::Tensor& mean_,
                          const at::Tensor& invstd_, double momentum, double eps, int64_t count) {
  const int64_t C = mean_.numel();
  if (count == 0 || C == 0) return;
  c10::cuda::CUDAGuard guard(mean_.device());
  const double correction = static_cast<double>(count) / static_cast<double>(count - 1);
  const auto mean = mean_.contiguous();
  const auto invstd = invstd_.contiguous();
  check_launch(launch_update_stats(
      dtype_of(mean.scalar_type()), C, running_mean.mutable_data_ptr(),
      dtype_of(running_mean.scalar_type()), running_mean.stride(0), running_var.mutable_data_ptr(),
      dtype_of(running_var.scalar_type()), running_var.stride(0), mean.const_data_ptr(),
      invstd.const_data_ptr(), momentum, eps, correction, current_stream()));
}

}  // namespace cuda

TORCH_LIBRARY_IMPL(bnfast, CUDA, m) { m.impl("update_stats_", &update_stats_entry<cuda::update_running_stats>); }

}  // namespace bnfast
