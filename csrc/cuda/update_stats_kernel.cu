// bnfast::update_stats_ on CUDA (the kernel; the op is in update_stats.cpp):
// the running-statistics update, in place, one thread per channel
// (device.cuh update_running: the CPU kernel's operations in its order, in
// double, stored through float for half / bfloat16 running statistics as on
// CPU), with correction = count / (count - 1).
#include "kernels.cuh"

namespace bnfast {
namespace cuda {
namespace {

template <typename stat_t, typename rm_t, typename rv_t>
__global__ void update_stats_kernel(rm_t* running_mean, rv_t* running_var, const stat_t* mean,
                                    const stat_t* invstd, RunningUpdate update, int64_t C, int64_t rm_stride,
                                    int64_t rv_stride) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  update_running(running_mean[c * rm_stride], running_var[c * rv_stride], static_cast<double>(mean[c]),
                 static_cast<double>(invstd[c]), update);
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
                static_cast<const stat_t*>(mean), static_cast<const stat_t*>(invstd),
                RunningUpdate{nullptr, nullptr, nullptr, momentum, eps, correction}, C, mean_stride, var_stride);
        return cudaGetLastError();
      });
    });
  });
}

}  // namespace cuda
}  // namespace bnfast
