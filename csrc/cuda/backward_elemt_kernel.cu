// bnfast::backward_elemt on CUDA: grad_input from per-channel means of the sums,
//   dx[m, c] = (dy - mean_dy[c] - (x - mean[c]) * invstd[c]^2 * mean_dy_xmu[c])
//              * invstd[c] * weight[c]
// One elementwise launch, three tensor passes (read dy and x, write dx).
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../common/checks.h"
#include "kernels.cuh"

namespace bnfast {
namespace {

using namespace cuda;

template <typename scalar_t>
void backward_elemt_impl(const scalar_t* dy, const scalar_t* x, scalar_t* dx, const acc_t<scalar_t>* mean,
                         const acc_t<scalar_t>* invstd, ParamPtr weight, const acc_t<scalar_t>* mean_dy,
                         const acc_t<scalar_t>* mean_dy_xmu, const Geometry& g, int64_t P,
                         cudaStream_t stream) {
  BackwardElem<scalar_t> op{dy, x, dx, mean, invstd, weight};
  op.mean_dy = mean_dy;
  op.mean_dy_xmu = mean_dy_xmu;
  launch_elementwise(op, g, P, stream);
}

at::Tensor backward_elemt_cuda(const at::Tensor& grad_out_, const at::Tensor& input_, const at::Tensor& mean_,
                               const at::Tensor& invstd_, const c10::optional<at::Tensor>& weight_,
                               const at::Tensor& mean_dy_, const at::Tensor& mean_dy_xmu_) {
  check_input(input_);
  check_like_input(grad_out_, "grad_out", input_);
  check_channel_vector(mean_, "mean", input_, /*allow_input_dtype=*/false);
  check_channel_vector(invstd_, "invstd", input_, /*allow_input_dtype=*/false);
  check_optional_channel_vector(weight_, "weight", input_);
  check_channel_vector(mean_dy_, "mean_dy", input_, /*allow_input_dtype=*/false);
  check_channel_vector(mean_dy_xmu_, "mean_dy_xmu", input_, /*allow_input_dtype=*/false);
  c10::cuda::CUDAGuard guard(input_.device());
  const auto input = readable(input_);
  const auto grad_out = readable_as(grad_out_, input);
  auto grad_input = empty_output_like(input);
  if (input.numel() == 0) return grad_input;
  const auto weight = channel_param(weight_);
  const auto mean = mean_.contiguous();
  const auto invstd = invstd_.contiguous();
  const auto mean_dy = mean_dy_.contiguous();
  const auto mean_dy_xmu = mean_dy_xmu_.contiguous();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "bnfast::backward_elemt", [&] {
    using acc = acc_t<scalar_t>;
    const auto g = make_geometry<scalar_t>(
        input, {input.const_data_ptr(), grad_out.const_data_ptr(), grad_input.const_data_ptr()});
    backward_elemt_impl<scalar_t>(grad_out.const_data_ptr<scalar_t>(), input.const_data_ptr<scalar_t>(),
                                  grad_input.mutable_data_ptr<scalar_t>(), mean.const_data_ptr<acc>(),
                                  invstd.const_data_ptr<acc>(), param_ptr(weight), mean_dy.const_data_ptr<acc>(),
                                  mean_dy_xmu.const_data_ptr<acc>(), g, elementwise_splits(g), stream);
  });
  return grad_input;
}

}  // namespace

TORCH_LIBRARY_IMPL(bnfast, CUDA, m) { m.impl("backward_elemt", &backward_elemt_cuda); }

}  // namespace bnfast
