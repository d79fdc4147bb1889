// bnfast::stats on CUDA: per-channel mean and invstd of a batch,
//   mean[c]   = (1/M) sum_m x[m, c]                     M = N * prod(*)
//   invstd[c] = 1 / sqrt((1/M) sum_m (x[m, c] - mean[c])^2 + eps)
// A reduce kernel writes per-block Welford partials, a small second kernel
// merges them per channel in a fixed order (deterministic, no atomics).
// NB: Welford/Chan merging of exact two-pass chunks, never E[x^2] - E[x]^2,
// so the variance stays accurate when |mean| >> std.
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>
#include <tuple>

#include "../common/checks.h"
#include "kernels.cuh"

namespace bnfast {
namespace {

using namespace cuda;

template <typename acc>
struct StatsFinalize {
  acc* mean;
  acc* invstd;
  acc eps;
  __device__ void operator()(int64_t c, const WelfordState<acc>& s) const {
    mean[c] = s.mean;
    invstd[c] = acc(1) / sqrt(s.m2 / s.n + eps);
  }
};

template <typename scalar_t>
void stats_impl(const scalar_t* x, acc_t<scalar_t>* mean, acc_t<scalar_t>* invstd, double eps,
                WelfordState<acc_t<scalar_t>>* partials, const Geometry& g, int64_t P, cudaStream_t stream) {
  using acc = acc_t<scalar_t>;
  launch_reduce(StatsReduce<scalar_t>{x}, partials, g, P, stream);
  launch_finalize(partials, P, g.C, StatsFinalize<acc>{mean, invstd, static_cast<acc>(eps)}, stream);
}

std::tuple<at::Tensor, at::Tensor> stats_cuda(const at::Tensor& input_, double eps) {
  check_input(input_);
  c10::cuda::CUDAGuard guard(input_.device());
  const auto input = readable(input_);
  const auto shape = shape_of(input);
  const auto options = input.options().dtype(stats_dtype(input.scalar_type()));
  auto mean = at::empty({shape.channels}, options);
  auto invstd = at::empty({shape.channels}, options);
  if (input.numel() == 0) {  // as on CPU: statistics of an empty batch are NaN
    mean.fill_(std::numeric_limits<double>::quiet_NaN());
    invstd.fill_(std::numeric_limits<double>::quiet_NaN());
    return {mean, invstd};
  }
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "bnfast::stats", [&] {
    using acc = acc_t<scalar_t>;
    const auto g = make_geometry<scalar_t>(input, {input.const_data_ptr()});
    const int64_t P = reduce_splits(g);
    auto partials = partials_buffer<WelfordState<acc>>(input, P, g.C);
    stats_impl<scalar_t>(input.const_data_ptr<scalar_t>(), mean.mutable_data_ptr<acc>(),
                         invstd.mutable_data_ptr<acc>(), eps,
                         reinterpret_cast<WelfordState<acc>*>(partials.mutable_data_ptr()), g, P, stream);
  });
  return {mean, invstd};
}

}  // namespace

TORCH_LIBRARY_IMPL(bnfast, CUDA, m) { m.impl("stats", &stats_cuda); }

}  // namespace bnfast
