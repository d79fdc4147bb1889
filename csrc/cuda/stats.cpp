// bnfast::stats on CUDA, and stats_act (of relu(x) for pre_relu): checks,
// allocation and launch (the kernels are in stats_kernel.cu).
#include <torch/library.h>

#include <limits>
#include <optional>
#include <tuple>

#include "ops.h"

namespace bnfast {
namespace {

// activation: none for the plain stats.
std::tuple<at::Tensor, at::Tensor> stats_impl(const at::Tensor& input_, double eps,
                                              std::optional<Activation> activation) {
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
  const auto dtype = cuda::dtype_of(input.scalar_type());
  if (activation) {
    cuda::check_launch(cuda::launch_stats_act(dtype, plan, input.const_data_ptr(), mean.mutable_data_ptr(),
                                              invstd.mutable_data_ptr(), eps,
                                              cuda::act_fusion(*activation, 0.0, at::Tensor()),
                                              scratch.mutable_data_ptr(), cuda::current_stream()));
  } else {
    cuda::check_launch(cuda::launch_stats(dtype, plan, input.const_data_ptr(), mean.mutable_data_ptr(),
                                          invstd.mutable_data_ptr(), eps, scratch.mutable_data_ptr(),
                                          cuda::current_stream()));
  }
  return {mean, invstd};
}

std::tuple<at::Tensor, at::Tensor> stats_cuda(const at::Tensor& input, double eps) {
  check_stats(input);
  return stats_impl(input, eps, std::nullopt);
}

std::tuple<at::Tensor, at::Tensor> stats_act_cuda(const at::Tensor& input, double eps, c10::string_view act) {
  return stats_impl(input, eps, check_stats_act(input, act));
}

}  // namespace

TORCH_LIBRARY_IMPL(bnfast, CUDA, m) {
  m.impl("stats", &stats_cuda);
  m.impl("stats_act", &stats_act_cuda);
}

}  // namespace bnfast
