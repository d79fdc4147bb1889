// bnfast::update_stats_ on CUDA (the kernel; the op is in update_stats.cpp):
// the running-statistics update, in place, one thread per channel,
//   running_mean = (1 - momentum) * running_mean + momentum * mean
//   running_var  = (1 - momentum) * running_var + momentum * var * correction
// with var = 1 / invstd^2 - eps and correction = count / (count - 1), in
// double (the CPU kernel's operations in its order), stored through float
// for half / bfloat16 running statistics as on CPU.
#include "kernels.cuh"

namespace bnfast {
namespace cuda {
namespace {

template <typename T>
__device__ __forceinline__ double as_double(T v) {
  return static_cast<double>(widen(v));
}

template <typename T>
__device__ __forceinline__ T from_double(double v) {
  return narrow<T>(static_cast<acc_t<T>>(v));
}

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
  rm = from_double<rm_t>((1 - momentum) * as_double(rm) + momentum * mu);
  rv = from_double<rv_t>((1 - momentum) * as_double(rv) + momentum * var * correction);
}

}  // namespace

cudaError_t launch_update_stats(DType stats_dtype, int64_t C, void* running_mean, DType mean_dtype,
                                int64_t mean_stride, void* running_var, DType var_dtype, int64_t var_stride,
                                const void* mean, const void* invstd, double momentum, double eps,
                                double correction, cudaStream_t stream) {
  return dispatch_acc(stats_dtype, [&](auto stat_tag) {
    using stat_t = typename decltype(stat_tag)::type;
    return dispatch(mean_dtype, [&](auto rm_tag) {
      using rm_t = typename decltype(rm_tag)::type;
      return dispatch(var_dtype, [&](auto rv_tag) {
        using rv_t = typename decltype(rv_tag)::type;
        update_stats_kernel<stat_t, rm_t, rv_t>
            <<<static_cast<unsigned>(ceil_div(C, kThreads)), kThreads, 0, stream>>>(
                static_cast<rm_t*>(running_mean), static_cast<rv_t*>(running_var),
                static_cast<const stat_t*>(mean), static_cast<const stat_t*>(invstd), momentum, eps,
                correction, C, mean_stride, var_stride);
        return cudaGetLastError();
      });
    });
  });
}

}  // namespace cuda
}  // namespace bnfast
