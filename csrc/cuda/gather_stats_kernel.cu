// bnfast::gather_stats on CUDA: statistics of the union of R replicas,
// Chan's parallel merge over r in order, one thread per channel:
//   var_r = 1 / invstd[r, c]^2 - eps,   M2_r = var_r * n_r
//   (n, mean, M2) <- merge((n, mean, M2), (n_r, mean[r, c], M2_r))  for n_r > 0
//   invstd[c] = 1 / sqrt(M2 / n + eps)
// Replicas with count <= 0 contribute nothing; if all do, mean and invstd are
// NaN (as on CPU). Arithmetic in double, the CPU kernel's operations in its order.
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>
#include <tuple>

#include "kernels.cuh"

namespace bnfast {
namespace {

using namespace cuda;

template <typename scalar_t>
__global__ void gather_stats_kernel(const scalar_t* mean, const scalar_t* invstd, const double* counts,
                                    scalar_t* out_mean, scalar_t* out_invstd, int64_t R, int64_t C,
                                    double eps) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  double m, is;
  merge_replica_stats(mean, invstd, counts, R, C, c, eps, &m, &is);
  out_mean[c] = static_cast<scalar_t>(m);
  out_invstd[c] = static_cast<scalar_t>(is);
}

template <typename scalar_t>
void gather_stats_impl(const scalar_t* mean, const scalar_t* invstd, const double* counts, scalar_t* out_mean,
                       scalar_t* out_invstd, int64_t R, int64_t C, double eps, cudaStream_t stream) {
  gather_stats_kernel<scalar_t><<<static_cast<unsigned>(ceil_div(C, kThreads)), kThreads, 0, stream>>>(
      mean, invstd, counts, out_mean, out_invstd, R, C, eps);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> gather_stats_cuda(const at::Tensor& mean_, const at::Tensor& invstd_,
                                                     const at::Tensor& counts_, double eps) {
  TORCH_CHECK(mean_.dim() == 2, "bnfast: mean must be [replicas, channels], got shape ", mean_.sizes());
  TORCH_CHECK(invstd_.sizes() == mean_.sizes(), "bnfast: invstd must have mean's shape ", mean_.sizes(),
              ", got ", invstd_.sizes());
  TORCH_CHECK(mean_.scalar_type() == at::kFloat || mean_.scalar_type() == at::kDouble,
              "bnfast: mean must be float32 or float64, got ", mean_.scalar_type());
  TORCH_CHECK(invstd_.scalar_type() == mean_.scalar_type(), "bnfast: invstd must be ", mean_.scalar_type(),
              " like mean, got ", invstd_.scalar_type());
  TORCH_CHECK(counts_.dim() == 1 && counts_.numel() == mean_.size(0), "bnfast: counts must have ",
              mean_.size(0), " elements (one per replica), got shape ", counts_.sizes());
  TORCH_CHECK(invstd_.device() == mean_.device() && counts_.device() == mean_.device(),
              "bnfast: mean, invstd and counts must be on one device, got ", mean_.device(), ", ",
              invstd_.device(), " and ", counts_.device());
  c10::cuda::CUDAGuard guard(mean_.device());
  const int64_t R = mean_.size(0), C = mean_.size(1);
  auto out_mean = at::empty({C}, mean_.options());
  auto out_invstd = at::empty({C}, mean_.options());
  if (C == 0) return {out_mean, out_invstd};
  const auto mean = mean_.contiguous();
  const auto invstd = invstd_.contiguous();
  const auto counts = counts_.to(at::kDouble).contiguous();  // any dtype; no-op when double already
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(mean.scalar_type(), "bnfast::gather_stats", [&] {
    gather_stats_impl<scalar_t>(mean.const_data_ptr<scalar_t>(), invstd.const_data_ptr<scalar_t>(),
                                counts.const_data_ptr<double>(), out_mean.mutable_data_ptr<scalar_t>(),
                                out_invstd.mutable_data_ptr<scalar_t>(), R, C, eps, stream);
  });
  return {out_mean, out_invstd};
}

}  // namespace

TORCH_LIBRARY_IMPL(bnfast, CUDA, m) { m.impl("gather_stats", &gather_stats_cuda); }

}  // namespace bnfast
