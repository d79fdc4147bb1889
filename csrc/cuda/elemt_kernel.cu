// bnfast::elemt on CUDA (the kernel; the op is in elemt.cpp): normalize with
// given statistics,
//   y[m, c] = (x[m, c] - mean[c]) * invstd[c] * weight[c] + bias[c]
// One elementwise launch, two tensor passes (read x, write y). Per-channel
// coefficients (invstd * weight, bias) are computed once per thread.
// NB: (x - mean) * scale + bias rather than x * scale + (bias - mean * scale),
// which cancels when |mean| >> std.
#include "kernels.cuh"

namespace bnfast {
namespace cuda {

cudaError_t launch_elemt(DType dtype, const Plan& plan, const void* x, void* y, Param weight, Param bias,
                         const void* mean, const void* invstd, cudaStream_t stream) {
  return dispatch(dtype, [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    using acc = acc_t<scalar_t>;
    ForwardElem<scalar_t> op{static_cast<const scalar_t*>(x), static_cast<scalar_t*>(y), weight, bias};
    op.mean = static_cast<const acc*>(mean);
    op.invstd = static_cast<const acc*>(invstd);
    return launch_elementwise(op, plan, plan.elementwise_blocks, stream);
  });
}

}  // namespace cuda
}  // namespace bnfast
