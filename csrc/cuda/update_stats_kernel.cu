// bnfast::update_stats_ on CUDA, the running-statistics update (in place):
//   running_mean = (1 - momentum) * running_mean + momentum * mean
//   running_var  = (1 - momentum) * running_var
//                  + momentum * var * count / (count - 1),  var = 1 / invstd^2 - eps
// One thread per channel, arithmetic in double, like the CPU kernel. An empty
// batch (count == 0) leaves the running statistics unchanged (no launch);
// count == 1 gives an infinite or NaN unbiased variance, as in torch.
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "kernels.cuh"

namespace bnfast {
namespace {

using namespace cuda;

// Running stats in any floating dtype, read exactly as double.
template <typename T>
__device__ __forceinline__ double as_double(T v) {
  return static_cast<double>(static_cast<float>(v));  // half, bf16 and float convert exactly
}
__device__ __forceinline__ double as_double(double v) { return v; }

template <typename stat_t, typename rm_t, typename rv_t>
__global__ void update_stats_kernel(rm_t* running_mean, rv_t* running_var, const stat_t* mean,
                                    const stat_t* invstd, double momentum, double eps, double correction,
                                    int64_t C, int64_t rm_stride, int64_t rv_stride) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  const double mu = static_cast<double>(mean[c]);
  const double is = static_cast<double>(invstd[c]);
  const double var = 1.0 / (is * is) - eps;
  rm_t& rm = running_mean[c * rm_stride];
  rv_t& rv = running_var[c * rv_stride];
  rm = static_cast<rm_t>((1 - momentum) * as_double(rm) + momentum * mu);
  rv = static_cast<rv_t>((1 - momentum) * as_double(rv) + momentum * var * correction);
}

template <typename stat_t, typename rm_t, typename rv_t>
void update_stats_impl(rm_t* running_mean, rv_t* running_var, const stat_t* mean, const stat_t* invstd,
                       double momentum, double eps, double correction, int64_t C, int64_t rm_stride,
                       int64_t rv_stride, cudaStream_t stream) {
  update_stats_kernel<stat_t, rm_t, rv_t><<<static_cast<unsigned>(ceil_div(C, kThreads)), kThreads, 0, stream>>>(
      running_mean, running_var, mean, invstd, momentum, eps, correction, C, rm_stride, rv_stride);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void check_running(const at::Tensor& running, const char* name, const at::Tensor& mean) {
  TORCH_CHECK(running.dim() == 1 && running.numel() == mean.numel(), "bnfast: ", name, " should contain ",
              mean.numel(), " elements not ", running.numel());
  TORCH_CHECK(running.device() == mean.device(), "bnfast: ", name, " must be on ", mean.device(), ", got ",
              running.device());
  TORCH_CHECK(at::isFloatingType(running.scalar_type()), "bnfast: ", name, " must be floating point, got ",
              running.scalar_type());
}

void update_stats_cuda(at::Tensor& running_mean, at::Tensor& running_var, const at::Tensor& mean_,
                       const at::Tensor& invstd_, double momentum, double eps, int64_t count) {
  TORCH_CHECK(mean_.dim() == 1 && invstd_.sizes() == mean_.sizes(),
              "bnfast: mean and invstd must be 1-D of the same size, got ", mean_.sizes(), " and ",
              invstd_.sizes());
  TORCH_CHECK(mean_.scalar_type() == at::kFloat || mean_.scalar_type() == at::kDouble,
              "bnfast: mean must be float32 or float64, got ", mean_.scalar_type());
  TORCH_CHECK(invstd_.scalar_type() == mean_.scalar_type(), "bnfast: invstd must be ", mean_.scalar_type(),
              " like mean, got ", invstd_.scalar_type());
  TORCH_CHECK(invstd_.device() == mean_.device(), "bnfast: invstd must be on ", mean_.device(), ", got ",
              invstd_.device());
  check_running(running_mean, "running_mean", mean_);
  check_running(running_var, "running_var", mean_);
  TORCH_CHECK(count >= 0, "bnfast: count must be >= 0, got ", count);
  const int64_t C = mean_.numel();
  if (count == 0 || C == 0) return;
  c10::cuda::CUDAGuard guard(mean_.device());
  const double correction = static_cast<double>(count) / static_cast<double>(count - 1);
  const auto mean = mean_.contiguous();
  const auto invstd = invstd_.contiguous();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(mean.scalar_type(), "bnfast::update_stats_", [&] {
    using stat_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, running_mean.scalar_type(), "bnfast::update_stats_", [&] {
      using rm_t = scalar_t;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, running_var.scalar_type(), "bnfast::update_stats_", [&] {
        using rv_t = scalar_t;
        update_stats_impl<stat_t, rm_t, rv_t>(running_mean.mutable_data_ptr<rm_t>(), running_var.mutable_data_ptr<rv_t>(),
                                              mean.const_data_ptr<stat_t>(), invstd.const_data_ptr<stat_t>(), momentum,
                                              eps, correction, C, running_mean.stride(0),
                                              running_var.stride(0), stream);
      });
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(bnfast, CUDA, m) { m.impl("update_stats_", &update_stats_cuda); }

}  // namespace bnfast
