// The running-statistics update on CPU, shared by update_stats_ and the
// training forwards (update_stats_kernel.cpp has the formula). The arguments
// are checked by the caller.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace bnfast {
namespace cpu {

void update_running_stats(at::Tensor& running_mean, at::Tensor& running_var, const at::Tensor& mean,
                          const at::Tensor& invstd, double momentum, double eps, int64_t count);

}  // namespace cpu
}  // namespace bnfast
