// bnfast::elemt on CUDA: normalize with given statistics,
//   y[m, c] = (x[m, c] - mean[c]) * invstd[c] * weight[c] + bias[c]
// One elementwise launch, two tensor passes (read x, write y). Per-channel
// coefficients (invstd * weight, bias) are computed once per thread.
// NB: (x - mean) * scale + bias rather than x * scale + (bias - mean * scale),
// which cancels when |mean| >> std.
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
void elemt_impl(const scalar_t* x, scalar_t* y, ParamPtr weight, ParamPtr bias, const acc_t<scalar_t>* mean,
                const acc_t<scalar_t>* invstd, const Geometry& g, int64_t P, cudaStream_t stream) {
  ForwardElem<scalar_t> op{x, y, weight, bias};
  op.mean = mean;
  op.invstd = invstd;
  launch_elementwise(op, g, P, stream);
}

at::Tensor elemt_cuda(const at::Tensor& input_, const c10::optional<at::Tensor>& weight_,
                      const c10::optional<at::Tensor>& bias_, const at::Tensor& mean_,
                      const at::Tensor& invstd_) {
  check_input(input_);
  check_optional_channel_vector(weight_, "weight", input_);
  check_optional_channel_vector(bias_, "bias", input_);
  check_channel_vector(mean_, "mean", input_, /*allow_input_dtype=*/false);
  check_channel_vector(invstd_, "invstd", input_, /*allow_input_dtype=*/false);
  c10::cuda::CUDAGuard guard(input_.device());
  const auto input = readable(input_);
  auto output = empty_output_like(input);
  if (input.numel() == 0) return output;
  const auto weight = channel_param(weight_);
  const auto bias = channel_param(bias_);
  const auto mean = mean_.contiguous();
  const auto invstd = invstd_.contiguous();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "bnfast::elemt", [&] {
    using acc = acc_t<scalar_t>;
    const auto g = make_geometry<scalar_t>(input, {input.const_data_ptr(), output.const_data_ptr()});
    elemt_impl<scalar_t>(input.const_data_ptr<scalar_t>(), output.mutable_data_ptr<scalar_t>(),
                         param_ptr(weight), param_ptr(bias), mean.const_data_ptr<acc>(),
                         invstd.const_data_ptr<acc>(), g, elementwise_splits(g), stream);
  });
  return output;
}

}  // namespace

TORCH_LIBRARY_IMPL(bnfast, CUDA, m) { m.impl("elemt", &elemt_cuda); }

}  // namespace bnfast
