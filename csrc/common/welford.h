// Welford / Chan statistics merge, usable from host and device code.
//
// A WelfordState summarises n samples by their mean and M2 = sum (x - mean)^2.
// Chan et al.'s parallel merge of (n_a, mean_a, M2_a) and (n_b, mean_b, M2_b):
//   n     = n_a + n_b
//   delta = mean_b - mean_a
//   mean  = mean_a + delta * n_b / n
//   M2    = M2_a + M2_b + delta^2 * n_a * n_b / n
// NB: unlike sum(x^2) - n * mean^2, no term grows with mean^2, so the variance
// stays accurate when |mean| >> std. The merge is not associative in floating
// point: callers merge in a fixed order so results are deterministic.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

// Callable from host and device code; no torch headers, so the CUDA kernels
// can include this file (csrc/cuda/launch.h).
#ifdef __CUDACC__
#define BNFAST_HOST_DEVICE __host__ __device__
#else
#define BNFAST_HOST_DEVICE
#endif

namespace bnfast {

template <typename T>
struct WelfordState {
  T mean;
  T m2;
  T n;  // a count kept in T: exact up to 2^24 (float), ratios are what matter above
};

template <typename T>
BNFAST_HOST_DEVICE inline WelfordState<T> welford_merge(const WelfordState<T>& a,
                                                     const WelfordState<T>& b) {
  if (b.n == T(0)) return a;  // an empty side (count 0) contributes nothing
  if (a.n == T(0)) return b;
  const T n = a.n + b.n;
  const T delta = b.mean - a.mean;
  const T nb_over_n = b.n / n;
  // NB: with an infinite mean on either side, mean_a + delta * n_b / n gives
  // inf + (-inf) = NaN when the infinite side is a, so the result would depend
  // on the merge order. The weighted average keeps +-inf (NaN for +inf with
  // -inf), as the plain sum (the CPU kernels) and torch's CUDA kernels do.
  // (delta - delta == 0 is false exactly when delta is infinite or NaN.)
  const T mean = (delta - delta == T(0)) ? a.mean + delta * nb_over_n
                                         : a.mean * (a.n / n) + b.mean * nb_over_n;
  return {mean, a.m2 + b.m2 + delta * delta * a.n * nb_over_n, n};
}

// Merge k samples x[0..k) (held by the caller) into a state: their own mean and
// M2 are exact two-pass values, then one Chan merge (one division per k samples).
template <typename T, int K>
BNFAST_HOST_DEVICE inline void welford_add_chunk(WelfordState<T>& s, const T (&x)[K]) {
  T sum = T(0);
#pragma unroll
  for (int i = 0; i < K; ++i) sum += x[i];
  const T m = sum / T(K);
  T m2 = T(0);
#pragma unroll
  for (int i = 0; i < K; ++i) m2 += (x[i] - m) * (x[i] - m);
  s = welford_merge(s, WelfordState<T>{m, m2, T(K)});
}

// gather_stats for channel c: Chan's merge, in double, of R replicas'
// (mean, invstd) ([R, C], var_r = 1 / invstd_r^2 - eps) over counts[r]
// elements each, skipping replicas with count <= 0. No data at all gives NaN.
// One function for the CPU and CUDA kernels, so both backends agree to the bit.
template <typename in_t, typename count_t>
BNFAST_HOST_DEVICE inline void merge_replica_stats(const in_t* mean, const in_t* invstd,
                                                const count_t* counts, int64_t R, int64_t C,
                                                int64_t c, double eps, double* out_mean,
                                                double* out_invstd) {
  double total = 0, m = 0, m2 = 0;
  for (int64_t r = 0; r < R; ++r) {
    const double nr = static_cast<double>(counts[r]);
    if (nr <= 0) continue;
    const double is = static_cast<double>(invstd[r * C + c]);
    const double var_r = 1.0 / (is * is) - eps;
    const double merged = total + nr;
    const double delta = static_cast<double>(mean[r * C + c]) - m;
    m += delta * nr / merged;
    m2 += var_r * nr + delta * delta * total * nr / merged;
    total = merged;
  }
  if (total == 0) {
    *out_mean = *out_invstd = std::numeric_limits<double>::quiet_NaN();
  } else {
    *out_mean = m;
    *out_invstd = 1.0 / ::sqrt(m2 / total + eps);
  }
}

}  // namespace bnfast
