// bnfast::backward_reduce on CUDA (the kernels; the op is in
// backward_reduce.cpp): per-channel sums for the batch-norm backward,
//   sum_dy[c]     = sum_m dy[m, c]
//   sum_dy_xmu[c] = sum_m dy[m, c] * (x[m, c] - mean[c])
// A reduce kernel writes per-block partial sums (float for half/bf16/float,
// double for double), a small second kernel adds them per channel in a fixed
// order (deterministic, no atomics).
// bnfast::backward_reduce_act: the same sums of dz = dy * act'(z) in place of
// dy (z recomputed from x and the residual), over relu(x) for pre_relu.
#include "kernels.cuh"

namespace bnfast {
namespace cuda {
namespace {

template <typename acc>
struct GradFinalize {
  acc* sum_dy;
  acc* sum_dy_xmu;
  __device__ void operator()(int64_t c, const SumPair<acc>& s) const {
    sum_dy[c] = s.a;
    sum_dy_xmu[c] = s.b;
  }
};

// op: a GradReduce over this plan's tensors.
template <typename Op>
cudaError_t reduce_and_finalize(const Op& op, const Plan& plan, void* sum_dy, void* sum_dy_xmu, void* scratch,
                                cudaStream_t stream) {
  using acc = typename Op::acc;
  auto* partials = static_cast<SumPair<acc>*>(scratch);
  const cudaError_t err = launch_reduce(op, partials, plan, plan.reduce_blocks, stream);
  if (err != cudaSuccess) return err;
  return launch_finalize(partials, plan.reduce_blocks, plan.C,
                         GradFinalize<acc>{static_cast<acc*>(sum_dy), static_cast<acc*>(sum_dy_xmu)}, stream);
}

}  // namespace

cudaError_t launch_backward_reduce(DType dtype, const Plan& plan, const void* dy, const void* x,
                                   const void* mean, void* sum_dy, void* sum_dy_xmu, void* scratch,
                                   cudaStream_t stream) {
  return dispatch(dtype, [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    using acc = acc_t<scalar_t>;
    const GradReduce<scalar_t> op{static_cast<const scalar_t*>(dy), static_cast<const scalar_t*>(x),
                                  static_cast<const acc*>(mean)};
    return reduce_and_finalize(op, plan, sum_dy, sum_dy_xmu, scratch, stream);
  });
}

cudaError_t launch_backward_reduce_act(DType dtype, const Plan& plan, const void* dy, const void* x,
                                       const void* mean, const void* invstd, Param weight, Param bias, void* sum_dy,
                                       void* sum_dy_xmu, const ActFusion& fusion, void* scratch, cudaStream_t stream) {
  return dispatch(dtype, [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    using acc = acc_t<scalar_t>;
    const GradReduce<scalar_t, true> op{static_cast<const scalar_t*>(dy), static_cast<const scalar_t*>(x),
                                        static_cast<const acc*>(mean), static_cast<const acc*>(invstd), weight, bias,
                                        act_fields<scalar_t>(fusion)};
    return reduce_and_finalize(op, plan, sum_dy, sum_dy_xmu, scratch, stream);
  });
}

}  // namespace cuda
}  // namespace bnfast
