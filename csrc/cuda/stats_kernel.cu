// bnfast::stats on CUDA (the kernels; the op is in stats.cpp): per-channel
// mean and invstd of a batch,
//   mean[c]   = (1/M) sum_m x[m, c]                     M = N * prod(*)
//   invstd[c] = 1 / sqrt((1/M) sum_m (x[m, c] - mean[c])^2 + eps)
// A reduce kernel writes per-block Welford partials, a small second kernel
// merges them per channel in a fixed order (deterministic, no atomics).
// NB: Welford/Chan merging of exact two-pass chunks, never E[x^2] - E[x]^2,
// so the variance stays accurate when |mean| >> std.
// bnfast::stats_act: the same, of relu(x) for pre_relu.
#include "kernels.cuh"

namespace bnfast {
namespace cuda {
namespace {

template <typename acc>
struct StatsFinalize {
  acc* mean;
  acc* invstd;
  acc eps;
  __device__ void operator()(int64_t c, const WelfordState<acc>& s) const {
    mean[c] = s.mean;
    invstd[c] = acc(1) / sqrt(s.m2 / s.n + eps);
  }
};

// kPreRelu: the statistics of relu(x).
template <typename scalar_t, bool kPreRelu>
cudaError_t stats(const Plan& plan, const void* x, void* mean, void* invstd, double eps, void* scratch,
                  cudaStream_t stream) {
  using acc = acc_t<scalar_t>;
  auto* partials = static_cast<WelfordState<acc>*>(scratch);
  const cudaError_t err = launch_reduce(StatsReduce<scalar_t, kPreRelu>{static_cast<const scalar_t*>(x)}, partials,
                                        plan, plan.reduce_blocks, stream);
  if (err != cudaSuccess) return err;
  return launch_finalize(partials, plan.reduce_blocks, plan.C,
                         StatsFinalize<acc>{static_cast<acc*>(mean), static_cast<acc*>(invstd), static_cast<acc>(eps)},
                         stream);
}

}  // namespace

cudaError_t launch_stats(DType dtype, const Plan& plan, const void* x, void* mean, void* invstd, double eps,
                         void* scratch, cudaStream_t stream) {
  return dispatch(dtype, [&](auto tag) {
    return stats<typename decltype(tag)::type, false>(plan, x, mean, invstd, eps, scratch, stream);
  });
}

cudaError_t launch_stats_act(DType dtype, const Plan& plan, const void* x, void* mean, void* invstd, double eps,
                             const ActFusion& fusion, void* scratch, cudaStream_t stream) {
  return dispatch(dtype, [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    return fusion.pre_relu ? stats<scalar_t, true>(plan, x, mean, invstd, eps, scratch, stream)
                           : stats<scalar_t, false>(plan, x, mean, invstd, eps, scratch, stream);
  });
}

}  // namespace cuda
}  // namespace bnfast
