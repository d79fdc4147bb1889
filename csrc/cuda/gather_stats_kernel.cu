// bnfast::gather_stats on CUDA (the kernel; the op is in gather_stats.cpp):
// statistics of the union of R replicas, Chan's parallel merge over r in
// order, one thread per channel:
//   var_r = 1 / invstd[r, c]^2 - eps,   M2_r = var_r * n_r
//   (n, mean, M2) <- merge((n, mean, M2), (n_r, mean[r, c], M2_r))  for n_r > 0
//   invstd[c] = 1 / sqrt(M2 / n + eps)
// Replicas with count <= 0 contribute nothing; if all do, mean and invstd are
// NaN (as on CPU). Arithmetic in double, the CPU kernel's function
// (csrc/common/welford.h merge_replica_stats), so both backends agree.
#include "kernels.cuh"

namespace bnfast {
namespace cuda {
namespace {

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

}  // namespace

cudaError_t launch_gather_stats(DType stats_dtype, int64_t R, int64_t C, const void* mean, const void* invstd,
                                const double* counts, void* out_mean, void* out_invstd, double eps,
                                cudaStream_t stream) {
  return dispatch_acc(stats_dtype, [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    gather_stats_kernel<scalar_t><<<static_cast<unsigned>(ceil_div(C, kThreads)), kThreads, 0, stream>>>(
        static_cast<const scalar_t*>(mean), static_cast<const scalar_t*>(invstd), counts,
        static_cast<scalar_t*>(out_mean), static_cast<scalar_t*>(out_invstd), R, C, eps);
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace bnfast
