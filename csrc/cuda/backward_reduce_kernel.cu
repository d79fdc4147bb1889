// bnfast::backward_reduce on CUDA: per-channel sums for the batch-norm backward,
//   sum_dy[c]     = sum_m dy[m, c]
//   sum_dy_xmu[c] = sum_m dy[m, c] * (x[m, c] - mean[c])
// A reduce kernel writes per-block partial sums (float for half/bf16/float,
// double for double), a small second kernel adds them per channel in a fixed
// order (deterministic, no atomics).
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

template <typename acc>
struct GradFinalize {
  acc* sum_dy;
  acc* sum_dy_xmu;
  __device__ void operator()(int64_t c, const SumPair<acc>& s) const {
    sum_dy[c] = s.a;
    sum_dy_xmu[c] = s.b;
  }
};

template <typename scalar_t>
void backward_reduce_impl(const scalar_t* dy, const scalar_t* x, const acc_t<scalar_t>* mean,
                          acc_t<scalar_t>* sum_dy, acc_t<scalar_t>* sum_dy_xmu,
                          SumPair<acc_t<scalar_t>>* partials, const Geometry& g, int64_t P,
                          cudaStream_t stream) {
  using acc = acc_t<scalar_t>;
  launch_reduce(GradReduce<scalar_t>{dy, x, mean}, partials, g, P, stream);
  launch_finalize(partials, P, g.C, GradFinalize<acc>{sum_dy, sum_dy_xmu}, stream);
}

std::tuple<at::Tensor, at::Tensor> backward_reduce_cuda(const at::Tensor& grad_out_, const at::Tensor& input_,
                                                        const at::Tensor& mean_, const at::Tensor& invstd) {
  check_input(input_);
  check_like_input(grad_out_, "grad_out", input_);
  check_channel_vector(mean_, "mean", input_, /*allow_input_dtype=*/false);
  check_channel_vector(invstd, "invstd", input_, /*allow_input_dtype=*/false);
  c10::cuda::CUDAGuard guard(input_.device());
  const auto input = readable(input_);
  const auto grad_out = readable_as(grad_out_, input);
  const auto shape = shape_of(input);
  auto sum_dy = at::empty({shape.channels}, mean_.options());
  auto sum_dy_xmu = at::empty({shape.channels}, mean_.options());
  if (input.numel() == 0) {  // sums over an empty batch
    sum_dy.zero_();
    sum_dy_xmu.zero_();
    return {sum_dy, sum_dy_xmu};
  }
  const auto mean = mean_.contiguous();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "bnfast::backward_reduce", [&] {
    using acc = acc_t<scalar_t>;
    const auto g = make_geometry<scalar_t>(input, {input.const_data_ptr(), grad_out.const_data_ptr()});
    const int64_t P = reduce_splits(g);
    auto partials = partials_buffer<SumPair<acc>>(input, P, g.C);
    backward_reduce_impl<scalar_t>(grad_out.const_data_ptr<scalar_t>(), input.const_data_ptr<scalar_t>(),
                                   mean.const_data_ptr<acc>(), sum_dy.mutable_data_ptr<acc>(),
                                   sum_dy_xmu.mutable_data_ptr<acc>(),
                                   reinterpret_cast<SumPair<acc>*>(partials.mutable_data_ptr()), g, P, stream);
  });
  return {sum_dy, sum_dy_xmu};
}

}  // namespace

TORCH_LIBRARY_IMPL(bnfast, CUDA, m) { m.impl("backward_reduce", &backward_reduce_cuda); }

}  // namespace bnfast
