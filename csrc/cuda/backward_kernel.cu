// bnfast::backward on CUDA (the kernels; the op is in backward.cpp), the
// fused training backward (count M = numel / C):
//   sum_dy[c]     = sum_m dy,   sum_dy_xmu[c] = sum_m dy * (x - mean[c])
//   dx[m, c]      = (dy - sum_dy/M - (x - mean) * invstd^2 * sum_dy_xmu/M) * invstd * weight
//   grad_weight[c] = sum_dy_xmu * invstd,   grad_bias[c] = sum_dy   (stats dtype)
// Two launches, five tensor passes: a reduce kernel writes per-block partial
// sums, then the elementwise kernel's blocks each add their channels' partials
// (fixed order: every block agrees, results are deterministic) and write dx;
// blocks with blockIdx.y == 0 store grad_weight and grad_bias.
// bnfast::backward_act: the same with dz = dy * act'(z) in place of dy, z
// recomputed from x (and the residual) in both passes, dz written to
// grad_residual when there is a residual; for pre_relu, the sums over
// relu(x) and dx 0 where x <= 0.
#include "kernels.cuh"

namespace bnfast {
namespace cuda {

namespace {

// fusion null: the plain backward.
template <typename scalar_t>
cudaError_t backward(const Plan& plan, const scalar_t* dy, const scalar_t* x, void* dx, const void* mean,
                     const void* invstd, Param weight, Param bias, void* grad_weight, void* grad_bias,
                     const ActFusion* fusion, void* scratch, cudaStream_t stream) {
  using acc = acc_t<scalar_t>;
  auto* partials = static_cast<SumPair<acc>*>(scratch);
  const auto* mu = static_cast<const acc*>(mean);
  const auto* is = static_cast<const acc*>(invstd);
  auto run = [&](auto reduce, auto op) {
    const cudaError_t err = launch_reduce(reduce, partials, plan, plan.reduce_blocks, stream);
    if (err != cudaSuccess) return err;
    op.partials = partials;
    op.P = static_cast<int>(plan.reduce_blocks);
    op.count = static_cast<acc>(plan.M);
    op.grad_weight = static_cast<acc*>(grad_weight);
    op.grad_bias = static_cast<acc*>(grad_bias);
    return launch_elementwise(op, plan, plan.elementwise_blocks, stream);
  };
  return with_backward_elem</*kFromPartials=*/true>(dy, x, dx, mu, is, weight, bias, fusion, [&](auto op) {
    return run(GradReduce<scalar_t, decltype(op)::kFusedOp>{dy, x, mu, is, weight, bias, op.f}, op);
  });
}

}  // namespace

cudaError_t launch_backward(DType dtype, const Plan& plan, const void* dy, const void* x, void* dx,
                            const void* mean, const void* invstd, Param weight, void* grad_weight,
                            void* grad_bias, void* scratch, cudaStream_t stream) {
  return dispatch(dtype, [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    return backward(plan, static_cast<const scalar_t*>(dy), static_cast<const scalar_t*>(x), dx, mean, invstd,
                    weight, Param{}, grad_weight, grad_bias, nullptr, scratch, stream);
  });
}

cudaError_t launch_backward_act(DType dtype, const Plan& plan, const void* dy, const void* x, void* dx,
                                const void* mean, const void* invstd, Param weight, Param bias, void* grad_weight,
                                void* grad_bias, const ActFusion& fusion, void* scratch, cudaStream_t stream) {
  return dispatch(dtype, [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    return backward(plan, static_cast<const scalar_t*>(dy), static_cast<const scalar_t*>(x), dx, mean, invstd,
                    weight, bias, grad_weight, grad_bias, &fusion, scratch, stream);
  });
}

}  // namespace cuda
}  // namespace bnfast
