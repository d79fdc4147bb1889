// bnfast::backward on CUDA, the fused training backward (count M = numel / C):
//   sum_dy[c]     = sum_m dy,   sum_dy_xmu[c] = sum_m dy * (x - mean[c])
//   dx[m, c]      = (dy - sum_dy/M - (x - mean) * invstd^2 * sum_dy_xmu/M) * invstd * weight
//   grad_weight[c] = sum_dy_xmu * invstd,   grad_bias[c] = sum_dy   (stats dtype)
// Two launches, five tensor passes: a reduce kernel writes per-block partial
// sums, then the elementwise kernel's blocks each add their channels' partials
// (fixed order: every block agrees, results are deterministic) and write dx;
// blocks with blockIdx.y == 0 store grad_weight and grad_bias.
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "../common/checks.h"
#include "kernels.cuh"

namespace bnfast {
namespace {

using namespace cuda;

template <typename scalar_t>
void backward_impl(const scalar_t* dy, const scalar_t* x, scalar_t* dx, const acc_t<scalar_t>* mean,
                   const acc_t<scalar_t>* invstd, ParamPtr weight, acc_t<scalar_t>* grad_weight,
                   acc_t<scalar_t>* grad_bias, SumPair<acc_t<scalar_t>>* partials, const Geometry& g, int64_t P,
                   int64_t P2, cudaStream_t stream) {
  launch_reduce(GradReduce<scalar_t>{dy, x, mean}, partials, g, P, stream);
  BackwardElem<scalar_t> op{dy, x, dx, mean, invstd, weight};
  op.partials = partials;
  op.P = static_cast<int>(P);
  op.count = static_cast<acc_t<scalar_t>>(g.M);
  op.grad_weight = grad_weight;
  op.grad_bias = grad_bias;
  launch_elementwise(op, g, P2, stream);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cuda(const at::Tensor& grad_out_,
                                                             const at::Tensor& input_,
                                                             const at::Tensor& mean_,
                                                             const at::Tensor& invstd_,
                                                             const c10::optional<at::Tensor>& weight_) {
  check_input(input_);
  check_like_input(grad_out_, "grad_out", input_);
  check_channel_vector(mean_, "mean", input_, /*allow_input_dtype=*/false);
  check_channel_vector(invstd_, "invstd", input_, /*allow_input_dtype=*/false);
  check_optional_channel_vector(weight_, "weight", input_);
  c10::cuda::CUDAGuard guard(input_.device());
  const auto input = readable(input_);
  const auto grad_out = readable_as(grad_out_, input);
  const auto shape = shape_of(input);
  auto grad_input = empty_output_like(input);
  auto grad_weight = at::empty({shape.channels}, mean_.options());
  auto grad_bias = at::empty({shape.channels}, mean_.options());
  if (input.numel() == 0) {  // as on CPU: an empty batch contributes nothing
    grad_weight.zero_();
    grad_bias.zero_();
    return {grad_input, grad_weight, grad_bias};
  }
  const auto weight = channel_param(weight_);
  const auto mean = mean_.contiguous();
  const auto invstd = invstd_.contiguous();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "bnfast::backward", [&] {
    using acc = acc_t<scalar_t>;
    const auto g = make_geometry<scalar_t>(
        input, {input.const_data_ptr(), grad_out.const_data_ptr(), grad_input.const_data_ptr()});
    const int64_t P = reduce_splits(g), P2 = elementwise_splits(g);
    auto partials = partials_buffer<SumPair<acc>>(input, P, g.C);
    backward_impl<scalar_t>(grad_out.const_data_ptr<scalar_t>(), input.const_data_ptr<scalar_t>(),
                            grad_input.mutable_data_ptr<scalar_t>(), mean.const_data_ptr<acc>(),
                            invstd.const_data_ptr<acc>(), param_ptr(weight), grad_weight.mutable_data_ptr<acc>(),
                            grad_bias.mutable_data_ptr<acc>(),
                            reinterpret_cast<SumPair<acc>*>(partials.mutable_data_ptr()), g, P, P2, stream);
  });
  return {grad_input, grad_weight, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(bnfast, CUDA, m) { m.impl("backward", &backward_cuda); }

}  // namespace bnfast
