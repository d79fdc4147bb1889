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

#include <c10/macros/Macros.h>

namespace bnfast {

template <typename T>
struct WelfordState {
  T mean;
  T m2;
  T n;  // a count kept in T: exact up to 2^24 (float), ratios are what matter above
};

template <typename T>
C10_HOST_DEVICE inline WelfordState<T> welford_merge(const WelfordState<T>& a,
                                                     const WelfordState<T>& b) {
  const T n = a.n + b.n;
  if (b.n == T(0)) return a;
  if (a.n == T(0)) return b;
  const T delta = b.mean - a.mean;
  const T nb_over_n = b.n / n;
  return {a.mean + delta * nb_over_n, a.m2 + b.m2 + delta * delta * a.n * nb_over_n, n};
}

// Merge k samples x[0..k) (held by the caller) into a state: their own mean and
// M2 are exact two-pass values, then one Chan merge (one division per k samples).
template <typename T, int K>
C10_HOST_DEVICE inline void welford_add_chunk(WelfordState<T>& s, const T (&x)[K]) {
  T sum = T(0);
#pragma unroll
  for (int i = 0; i < K; ++i) sum += x[i];
  const T m = sum / T(K);
  T m2 = T(0);
#pragma unroll
  for (int i = 0; i < K; ++i) m2 += (x[i] - m) * (x[i] - m);
  s = welford_merge(s, WelfordState<T>{m, m2, T(K)});
}

// invstd = 1 / sqrt(biased variance + eps); variance clamped at 0.
// NB: an empty state (n == 0) yields NaN mean and NaN invstd, as torch's CUDA
// batch_norm_stats does for an empty batch.
}  // namespace bnfast
