// bnfast::gather_stats on CPU: merge R replicas' statistics (mean_r, invstd_r
// over count_r elements per channel) into those of their union, by Chan's
// pairwise formula in double:
//   n = n_a + n_b,  delta = mean_b - mean_a
//   mean = mean_a + delta * n_b / n
//   M2   = M2_a + M2_b + delta^2 * n_a * n_b / n,   M2_r = count_r * var_r
// with var_r = 1 / invstd_r^2 - eps. Replicas with count 0 are skipped.
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "../common/checks.h"
#include "../common/welford.h"

#include <cmath>
#include <limits>
#include <tuple>

namespace bnfast {
namespace {

std::tuple<at::Tensor, at::Tensor> gather_stats_cpu(const at::Tensor& mean, const at::Tensor& invstd,
                                                     const at::Tensor& counts, double eps) {
  check_gather_stats(mean, invstd, counts);
  const int64_t R = mean.size(0), C = mean.size(1);
  const auto mean_d = mean.to(at::kDouble).contiguous();
  const auto invstd_d = invstd.to(at::kDouble).contiguous();
  const auto counts_d = counts.to(at::kDouble).contiguous();
  const double* mu = mean_d.const_data_ptr<double>();
  const double* inv = invstd_d.const_data_ptr<double>();
  const double* n = counts_d.const_data_ptr<double>();
  auto out_mean = at::empty({C}, mean.options());
  auto out_invstd = at::empty({C}, mean.options());
  AT_DISPATCH_FLOATING_TYPES(mean.scalar_type(), "bnfast::gather_stats", [&] {
    auto* om = out_mean.mutable_data_ptr<scalar_t>();
    auto* oi = out_invstd.mutable_data_ptr<scalar_t>();
    for (int64_t c = 0; c < C; ++c) {
      double m, is;
      merge_replica_stats(mu, inv, n, R, C, c, eps, &m, &is);
      om[c] = static_cast<scalar_t>(m);
      oi[c] = static_cast<scalar_t>(is);
    }
  });
  return {out_mean, out_invstd};
}

}  // namespace

TORCH_LIBRARY_IMPL(bnfast, CPU, m) { m.impl("gather_stats", &gather_stats_cpu); }

}  // namespace bnfast
