// bnfast::backward on CUDA (the kernels; the op is in backward.cpp), the
// fused training backward (count M = numel / C):
//   sum_dy[c]     = sum_m dy,   sum_dy_xmu[c] = sum_m dy * (x - mean[c])
//   dx[m, c]      = (dy - sum_dy/M - (x - mean) * invstd^2 * sum_dy_xmu/M) * invstd * weight
//   grad_weight[c] = sum_dy_xmu * invstd,   grad_bias[c] = sum_dy   (stats dtype)
// Two launches, five tensor passes: a reduce kernel writes per-block partial
// sums, then the elementwise kernel's blocks each add their channels' partials
// (fixed order: every block agrees, results are deterministic) and write dx;
// blocks with blockIdx.y == 0 store grad_weight and grad_bias.
#include "kernels.cuh"

namespace bnfast {
namespace cuda {

cudaError_t launch_backward(DType dtype, const Plan& plan, const void* dy, const void* x, void* dx,
                            const void* mean, const void* invstd, Param weight, void* grad_weight,
                            void* grad_bias, void* scratch, cudaStream_t stream) {
  return dispatch(dtype, [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    using acc = acc_t<scalar_t>;
    auto* partials = static_cast<SumPair<acc>*>(scratch);
    const auto* dyp = static_cast<const scalar_t*>(dy);
    const auto* xp = static_cast<const scalar_t*>(x);
    const auto* mu = static_cast<const acc*>(mean);
    const cudaError_t err = launch_reduce(GradReduce<scalar_t>{dyp, xp, mu}, partials, plan, plan.reduce_blocks, stream);
    if (err != cudaSuccess) return err;
    BackwardElem<scalar_t> op{dyp, xp, static_cast<scalar_t*>(dx), mu, static_cast<const acc*>(invstd), weight};
    op.partials = partials;
    op.P = static_cast<int>(plan.reduce_blocks);
    op.count = static_cast<acc>(plan.M);
    op.grad_weight = static_cast<acc*>(grad_weight);
    op.grad_bias = static_cast<acc*>(grad_bias);
    return launch_elementwise(op, plan, plan.elementwise_blocks, stream);
  });
}

}  // namespace cuda
}  // namespace bnfast
