// bnfast::forward on CUDA (the kernels; the op is in forward.cpp), the fused
// training forward:
//   mean[c]   = (1/M) sum_m x[m, c]                     M = N * prod(*)
//   invstd[c] = 1 / sqrt((1/M) sum_m (x[m, c] - mean[c])^2 + eps)
//   y[m, c]   = (x[m, c] - mean[c]) * invstd[c] * weight[c] + bias[c]
// Two launches, three tensor passes: a reduce kernel writes per-block Welford
// partials (P per channel), then the elementwise kernel's blocks each merge
// their channels' partials (in a fixed order, so every block agrees) and
// normalize; blocks with blockIdx.y == 0 store mean and invstd, and update
// the running statistics when asked to (once per channel).
// NB: per-thread statistics are Welford/Chan merges of exact two-pass chunks,
// never E[x^2] - E[x]^2, so |mean| >> std does not cancel.
// Performance assumption: the second read of x hits L2 when the tensor fits
// in it.
// bnfast::forward_act: the same with relu(x) read in both passes (pre_relu),
// or y = act(... + residual) in the second.
#include "kernels.cuh"

namespace bnfast {
namespace cuda {

namespace {

// fusion null: the plain forward.
template <typename scalar_t>
cudaError_t forward(const Plan& plan, const scalar_t* x, void* y, Param weight, Param bias, void* mean,
                    void* invstd, double eps, const ActFusion* fusion, void* scratch, cudaStream_t stream,
                    const RunningUpdate* running) {
  using acc = acc_t<scalar_t>;
  auto* partials = static_cast<WelfordState<acc>*>(scratch);
  const cudaError_t err = fusion && fusion->pre_relu
                              ? launch_reduce(StatsReduce<scalar_t, true>{x}, partials, plan, plan.reduce_blocks, stream)
                              : launch_reduce(StatsReduce<scalar_t>{x}, partials, plan, plan.reduce_blocks, stream);
  if (err != cudaSuccess) return err;
  auto finish = [&](auto op) {
    op.partials = partials;
    op.P = static_cast<int>(plan.reduce_blocks);
    op.eps = static_cast<acc>(eps);
    op.mean_out = static_cast<acc*>(mean);
    op.invstd_out = static_cast<acc*>(invstd);
    if (running) op.running = *running;
    return launch_elementwise(op, plan, plan.elementwise_blocks, stream);
  };
  return with_forward_elem</*kFromPartials=*/true>(x, y, weight, bias, fusion, finish);
}

}  // namespace

cudaError_t launch_forward(DType dtype, const Plan& plan, const void* x, void* y, Param weight, Param bias,
                           void* mean, void* invstd, double eps, void* scratch, cudaStream_t stream,
                           const RunningUpdate* running) {
  return dispatch(dtype, [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    return forward(plan, static_cast<const scalar_t*>(x), y, weight, bias, mean, invstd, eps, nullptr, scratch,
                   stream, running);
  });
}

cudaError_t launch_forward_act(DType dtype, const Plan& plan, const void* x, void* y, Param weight, Param bias,
                               void* mean, void* invstd, double eps, const ActFusion& fusion, void* scratch,
                               cudaStream_t stream, const RunningUpdate* running) {
  return dispatch(dtype, [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    return forward(plan, static_cast<const scalar_t*>(x), y, weight, bias, mean, invstd, eps, &fusion, scratch,
                   stream, running);
  });
}

}  // namespace cuda
}  // namespace bnfast
