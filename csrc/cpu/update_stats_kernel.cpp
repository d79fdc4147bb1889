// bnfast::update_stats_ on CPU, the running-statistics update (in place),
// also the training forwards' (forward_kernel.cpp):
//   running_mean = (1 - momentum) * running_mean + momentum * mean
//   running_var  = (1 - momentum) * running_var
//                  + momentum * var * count / (count - 1),  var = 1 / invstd^2 - eps
// count is the number of elements per channel the statistics came from. An
// empty batch (count == 0) leaves the running statistics unchanged, as torch
// does; count == 1 gives an infinite or NaN unbiased variance, as in torch.
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <vector>

#include "../common/op_entries.h"
#include "update_stats.h"

namespace bnfast {
namespace cpu {

void update_running_stats(at::Tensor& running_mean, at::Tensor& running_var, const at::Tensor& mean,
                          const at::Tensor& invstd, double momentum, double eps, int64_t count) {
  if (count == 0) return;
  const double correction = static_cast<double>(count) / static_cast<double>(count - 1);
  // Read mean / invstd (float or double, any stride) into double once.
  const int64_t C = mean.numel();
  std::vector<double> mu(C), var(C);
  AT_DISPATCH_FLOATING_TYPES(mean.scalar_type(), "bnfast::update_stats_", [&] {
    const auto m = mean.accessor<scalar_t, 1>();
    const auto is = invstd.accessor<scalar_t, 1>();
    for (int64_t c = 0; c < C; ++c) {
      mu[c] = m[c];
      var[c] = 1.0 / (static_cast<double>(is[c]) * is[c]) - eps;
    }
  });
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, running_mean.scalar_type(), "bnfast::update_stats_", [&] {
    auto rm = running_mean.accessor<scalar_t, 1>();
    for (int64_t c = 0; c < C; ++c) {
      rm[c] = static_cast<scalar_t>((1 - momentum) * static_cast<double>(rm[c]) + momentum * mu[c]);
    }
  });
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, running_var.scalar_type(), "bnfast::update_stats_", [&] {
    auto rv = running_var.accessor<scalar_t, 1>();
    for (int64_t c = 0; c < C; ++c) {
      rv[c] = static_cast<scalar_t>((1 - momentum) * static_cast<double>(rv[c]) +
                                    momentum * var[c] * correction);
    }
  });
}

}  // namespace cpu

TORCH_LIBRARY_IMPL(bnfast, CPU, m) { m.impl("update_stats_", &update_stats_entry<cpu::update_running_stats>); }

}  // namespace bnfast
