// bnfast::backward_elemt on CUDA (the kernel; the op is in
// backward_elemt.cpp): grad_input from per-channel means of the sums,
//   dx[m, c] = (dy - mean_dy[c] - (x - mean[c]) * invstd[c]^2 * mean_dy_xmu[c])
//              * invstd[c] * weight[c]
// One elementwise launch, three tensor passes (read dy and x, write dx).
// bnfast::backward_elemt_act: the same with dz = dy * act'(z) in place of dy,
// dz written to grad_residual when there is a residual; for pre_relu of
// relu(x), and dx 0 where x <= 0.
#include "kernels.cuh"

namespace bnfast {
namespace cuda {

namespace {

// fusion null: the plain backward_elemt.
template <typename scalar_t>
cudaError_t backward_elemt(const Plan& plan, const void* dy, const void* x, void* dx, const void* mean,
                           const void* invstd, Param weight, Param bias, const void* mean_dy, const void* mean_dy_xmu,
                           const ActFusion* fusion, cudaStream_t stream) {
  using acc = acc_t<scalar_t>;
  auto finish = [&](auto op) {
    op.mean_dy = static_cast<const acc*>(mean_dy);
    op.mean_dy_xmu = static_cast<const acc*>(mean_dy_xmu);
    return launch_elementwise(op, plan, plan.elementwise_blocks, stream);
  };
  return with_backward_elem</*kFromPartials=*/false>(static_cast<const scalar_t*>(dy), static_cast<const scalar_t*>(x),
                                                     dx, static_cast<const acc*>(mean), static_cast<const acc*>(invstd),
                                                     weight, bias, fusion, finish);
}

}  // namespace

cudaError_t launch_backward_elemt(DType dtype, const Plan& plan, const void* dy, const void* x, void* dx,
                                  const void* mean, const void* invstd, Param weight, const void* mean_dy,
                                  const void* mean_dy_xmu, cudaStream_t stream) {
  return dispatch(dtype, [&](auto tag) {
    return backward_elemt<typename decltype(tag)::type>(plan, dy, x, dx, mean, invstd, weight, Param{}, mean_dy,
                                                        mean_dy_xmu, nullptr, stream);
  });
}

cudaError_t launch_backward_elemt_act(DType dtype, const Plan& plan, const void* dy, const void* x, void* dx,
                                      const void* mean, const void* invstd, Param weight, Param bias,
                                      const void* mean_dy, const void* mean_dy_xmu, const ActFusion& fusion,
                                      cudaStream_t stream) {
  return dispatch(dtype, [&](auto tag) {
    return backward_elemt<typename decltype(tag)::type>(plan, dy, x, dx, mean, invstd, weight, bias, mean_dy,
                                                        mean_dy_xmu, &fusion, stream);
  });
}

}  // namespace cuda
}  // namespace bnfast
