// bnfast::gather_stats on CUDA: checks, allocation and launch (the kernel is
// in gather_stats_kernel.cu).
#include <torch/library.h>

#include <tuple>

#include "ops.h"

namespace bnfast {
namespace {

std::tuple<at::Tensor, at::Tensor> gather_stats_cuda(const at::Tensor& mean_, const at::Tensor& invstd_,
                                                     const at::Tensor& counts_, double eps) {
  check_gather_stats(mean_, invstd_, counts_);
  c10::cuda::CUDAGuard guard(mean_.device());
  const int64_t R = mean_.size(0), C = mean_.size(1);
  auto out_mean = at::empty({C}, mean_.options());
  auto out_invstd = at::empty({C}, mean_.options());
  if (C == 0) return {out_mean, out_invstd};
  const auto mean = mean_.contiguous();
  const auto invstd = invstd_.contiguous();
  const auto counts = counts_.to(at::kDouble).contiguous();  // any dtype; no copy when double already
  cuda::check_launch(cuda::launch_gather_stats(cuda::dtype_of(mean.scalar_type()), R, C, mean.const_data_ptr(),
                                               invstd.const_data_ptr(), counts.const_data_ptr<double>(),
                                               out_mean.mutable_data_ptr(), out_invstd.mutable_data_ptr(), eps,
                                               cuda::current_stream()));
  return {out_mean, out_invstd};
}

}  // namespace

TORCH_LIBRARY_IMPL(bnfast, CUDA, m) { m.impl("gather_stats", &gather_stats_cuda); }

}  // namespace bnfast
