// bnfast::backward_elemt on CUDA (the kernel; the op is in
// backward_elemt.cpp): grad_input from per-channel means of the sums,
//   dx[m, c] = (dy - mean_dy[c] - (x - mean[c]) * invstd[c]^2 * mean_dy_xmu[c])
//              * invstd[c] * weight[c]
// One elementwise launch, three tensor passes (read dy and x, write dx).
#include "kernels.cuh"

namespace bnfast {
namespace cuda {

cudaError_t launch_backward_elemt(DType dtype, const Plan& plan, const void* dy, const void* x, void* dx,
                                  const void* mean, const void* invstd, Param weight, const void* mean_dy,
                                  const void* mean_dy_xmu, cudaStream_t stream) {
  return dispatch(dtype, [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    using acc = acc_t<scalar_t>;
    BackwardElem<scalar_t> op{static_cast<const scalar_t*>(dy), static_cast<const scalar_t*>(x),
                              static_cast<scalar_t*>(dx), static_cast<const acc*>(mean),
                              static_cast<const acc*>(invstd), weight};
    op.mean_dy = static_cast<const acc*>(mean_dy);
    op.mean_dy_xmu = static_cast<const acc*>(mean_dy_xmu);
    return launch_elementwise(op, plan, plan.elementwise_blocks, stream);
  });
}

}  // namespace cuda
}  // namespace bnfast
