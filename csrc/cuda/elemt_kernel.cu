// bnfast::elemt on CUDA (the kernel; the op is in elemt.cpp): normalize with
// given statistics,
//   y[m, c] = (x[m, c] - mean[c]) * invstd[c] * weight[c] + bias[c]
// One elementwise launch, two tensor passes (read x, write y). Per-channel
// coefficients (invstd * weight, bias) are computed once per thread.
// NB: (x - mean) * scale + bias rather than x * scale + (bias - mean * scale),
// which cancels when |mean| >> std.
// bnfast::elemt_act: y = act(... + residual), of relu(x) for pre_relu.
#include "kernels.cuh"

namespace bnfast {
namespace cuda {

namespace {

// fusion null: the plain elemt.
template <typename scalar_t>
cudaError_t elemt(const Plan& plan, const scalar_t* x, void* y, Param weight, Param bias, const void* mean,
                  const void* invstd, const ActFusion* fusion, cudaStream_t stream) {
  using acc = acc_t<scalar_t>;
  auto finish = [&](auto op) {
    op.mean = static_cast<const acc*>(mean);
    op.invstd = static_cast<const acc*>(invstd);
    return launch_elementwise(op, plan, plan.elementwise_blocks, stream);
  };
  return with_forward_elem</*kFromPartials=*/false>(x, y, weight, bias, fusion, finish);
}

}  // namespace

cudaError_t launch_elemt(DType dtype, const Plan& plan, const void* x, void* y, Param weight, Param bias,
                         const void* mean, const void* invstd, cudaStream_t stream) {
  return dispatch(dtype, [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    return elemt(plan, static_cast<const scalar_t*>(x), y, weight, bias, mean, invstd, nullptr, stream);
  });
}

cudaError_t launch_elemt_act(DType dtype, const Plan& plan, const void* x, void* y, Param weight, Param bias,
                             const void* mean, const void* invstd, const ActFusion& fusion, cudaStream_t stream) {
  return dispatch(dtype, [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    return elemt(plan, static_cast<const scalar_t*>(x), y, weight, bias, mean, invstd, &fusion, stream);
  });
}

}  // namespace cuda
}  // namespace bnfast
