// The CPU inner loops of every bnfast kernel, for one instruction set.
//
// setup.py compiles this file once per set, defining CPU_CAPABILITY (DEFAULT,
// AVX2, AVX512) and the matching -m flags; at::vec::Vectorized then has 8
// (AVX2) or 16 (AVX-512) float lanes. csrc/cpu/loops.h documents the loops;
// the op files (csrc/cpu/*_kernel.cpp) thread them with at::parallel_for.
//
// What they compute, per channel c (a = dy, or x - K for statistics):
//   reduce:  s1 = sum(a),  s2 = sum(a * (x - K))
//   affine:  out = (x - m[c]) * p[c] + q[c] (+ dy * r[c])
//
// NB: sums are accumulated in opmath vectors (float, or double for double
// input) for at most 64 values per lane, then added into double totals. Short float runs keep the rounding error near one ulp of each
// partial sum, and the double totals keep it there over millions of elements;
// together with the shift K (a sample of the channel, or its mean) this avoids
// the catastrophic cancellation of E[x^2] - E[x]^2 when |mean| >> std.
//
// Performance assumption: every loop is memory-bound once the add latency is
// hidden by independent accumulator chains (4 per sum).
//
// NB: nothing from the C++ standard library is instantiated here: an inline
// template compiled with -mavx512f could be the copy the linker keeps for the
// baseline objects too.

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include "../loops.h"

#ifndef CPU_CAPABILITY
#error "compile csrc/cpu/isa/loops.cpp with -DCPU_CAPABILITY=DEFAULT|AVX2|AVX512"
#endif

namespace bnfast {
namespace cpu {
namespace CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;

inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

template <typename T>
inline void zero_fill(T* p, int64_t n) {
  for (int64_t i = 0; i < n; ++i) p[i] = T(0);
}

// Loads and stores of scalar_t as opmath vectors, with masked tails.
template <typename scalar_t, bool reduced = at::vec::is_reduced_floating_point_v<scalar_t>>
struct VecIO {
  using opmath_t = scalar_t;
  using Vec = Vectorized<opmath_t>;
  static constexpr int64_t kLanes = Vec::size();
  static Vec load(const scalar_t* p) { return Vec::loadu(p); }
  static Vec load(const scalar_t* p, int64_t n) { return Vec::loadu(p, n); }
  static void store(scalar_t* p, const Vec& v) { v.store(p); }
  static void store(scalar_t* p, const Vec& v, int64_t n) { v.store(p, n); }
};

template <typename scalar_t>
struct VecIO<scalar_t, true> {
  using opmath_t = float;
  using Vec = Vectorized<float>;
  static constexpr int64_t kLanes = Vec::size();
#if defined(CPU_CAPABILITY_AVX512)
  static __mmask16 tail_mask(int64_t n) { return static_cast<__mmask16>((1u << n) - 1); }
  // v rounded to scalar_t (to nearest even, as torch rounds), 16 lanes.
  static __m256i packed(const Vec& v) {
    return std::is_same<scalar_t, at::BFloat16>::value ? at::vec::CPU_CAPABILITY::cvtfp32_bf16(v)
                                                       : at::vec::CPU_CAPABILITY::cvtfp32_fp16(v);
  }
#endif
  static Vec load(const scalar_t* p) {
    Vec out;
    at::vec::load_to_float<scalar_t>(p, out);
    return out;
  }
  static Vec load(const scalar_t* p, int64_t n) {
#if defined(CPU_CAPABILITY_AVX512)
    // A masked load: copying the tail through a buffer stalls store-to-load
    // forwarding once per call, i.e. per plane on the channels-first path.
    __m512 out;
    at::vec::CPU_CAPABILITY::cvt_to_fp32<scalar_t>(_mm256_maskz_loadu_epi16(tail_mask(n), p), out);
    return out;
#else
    scalar_t buf[kLanes] = {};
    for (int64_t i = 0; i < n; ++i) buf[i] = p[i];
    return load(buf);
#endif
  }
  static void store(scalar_t* p, const Vec& v) {
#if defined(CPU_CAPABILITY_AVX512)
    // One conversion and a plain 256-bit store: the generic path below
    // converts v twice and stores with a mask.
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), packed(v));
#else
    at::vec::convert_from_float<scalar_t>(v, v).store(p, kLanes);
#endif
  }
  static void store(scalar_t* p, const Vec& v, int64_t n) {
#if defined(CPU_CAPABILITY_AVX512)
    _mm256_mask_storeu_epi16(p, tail_mask(n), packed(v));
#else
    at::vec::convert_from_float<scalar_t>(v, v).store(p, n);
#endif
  }
};

// Vector steps before the vector partial sums are folded into the double
// totals. They are spread over kChains independent accumulator chains (to hide
// the add latency), so each lane of each chain sums at most
// kFlushSteps / kChains = 64 values in opmath precision.
constexpr int64_t kChains = 4;
constexpr int64_t kFlushSteps = 256;

template <typename Vec>
double horizontal_sum(const Vec& v) {
  using T = typename Vec::value_type;
  T lanes[Vec::size()];
  v.store(lanes);
  double total = 0;
  for (int64_t i = 0; i < Vec::size(); ++i) total += lanes[i];
  return total;
}

// Accumulators of one reduction: kChains independent (s1, s2) vector pairs
// and their double totals. Kept in a plain struct that never escapes the
// loop functions, so the compiler keeps the vectors in registers.
template <typename Vec>
struct Accumulators {
  Vec s1[kChains], s2[kChains];
  double t1 = 0, t2 = 0;
  int64_t steps = 0;  // vector steps since the last fold
  Accumulators() {
    for (int64_t i = 0; i < kChains; ++i) s1[i] = s2[i] = Vec(0);
  }
  inline void fold() {
    Vec a = s1[0], b = s2[0];
    for (int64_t i = 1; i < kChains; ++i) {
      a = a + s1[i];
      b = b + s2[i];
    }
    t1 += horizontal_sum(a);
    t2 += horizontal_sum(b);
    for (int64_t i = 0; i < kChains; ++i) s1[i] = s2[i] = Vec(0);
    steps = 0;
  }
};

// a = dy ? dy : x - K;  s1 += a;  s2 += a * (x - K)   over p[0, len) (full vectors only).
template <typename scalar_t, bool kHasDy>
inline void accumulate_span(const scalar_t* xp, const scalar_t* dyp, int64_t len,
                            const typename VecIO<scalar_t>::Vec& k,
                            Accumulators<typename VecIO<scalar_t>::Vec>& acc) {
  using IO = VecIO<scalar_t>;
  using Vec = typename IO::Vec;
  constexpr int64_t L = IO::kLanes;
  int64_t s = 0;
  while (s < len) {
    // Up to the next fold, in steps of kChains vectors, then single vectors.
    const int64_t block_end = s + min64((len - s) / L, kFlushSteps - acc.steps) * L;
    for (; s + kChains * L <= block_end; s += kChains * L) {
      for (int64_t i = 0; i < kChains; ++i) {
        const Vec d = IO::load(xp + s + i * L) - k;
        const Vec a = kHasDy ? IO::load(dyp + s + i * L) : d;
        acc.s1[i] = acc.s1[i] + a;
        acc.s2[i] = at::vec::fmadd(a, d, acc.s2[i]);
      }
      acc.steps += kChains;
    }
    for (; s < block_end; s += L) {
      const Vec d = IO::load(xp + s) - k;
      const Vec a = kHasDy ? IO::load(dyp + s) : d;
      acc.s1[0] = acc.s1[0] + a;
      acc.s2[0] = at::vec::fmadd(a, d, acc.s2[0]);
      ++acc.steps;
    }
    if (acc.steps >= kFlushSteps) acc.fold();
  }
}

// Channels-first: planes are visited in memory order (streaming, which the
// hardware prefetchers follow), each plane summed with kChains register chains,
// and the plane's vector sum added into its channel's vector partial sums in
// scratch ([2][C][L]); those are folded into the double totals every
// kPlanesPerFold planes of each channel.
constexpr int64_t kPlanesPerFold = 16;

template <typename scalar_t, bool kHasDy>
void reduce_cf_impl(const scalar_t* x, const scalar_t* dy, int64_t C, int64_t S,
                    int64_t plane_begin, int64_t plane_end, const at::opmath_type<scalar_t>* shift,
                    double* s1, double* s2, at::opmath_type<scalar_t>* scratch,
                    double* lane_totals) {
  using IO = VecIO<scalar_t>;
  using Vec = typename IO::Vec;
  constexpr int64_t L = IO::kLanes;
  const int64_t full = S / L * L;
  const int64_t n_tail = S - full;
  auto* part1 = scratch;
  auto* part2 = scratch + C * L;
  zero_fill(scratch, 2 * C * L);
  zero_fill(lane_totals, 2 * C * L);
  // NB: folding lane by lane into double vectors is one vectorized pass; the
  // horizontal sums (serial, 16 dependent adds per channel) run once per call.
  // Done per fold they cost more than summing 4x4 planes.
  auto fold = [&] {
    for (int64_t i = 0; i < 2 * C * L; ++i) lane_totals[i] += scratch[i];
    zero_fill(scratch, 2 * C * L);
  };
  int64_t planes_since_fold = 0;
  // The channel is tracked incrementally: a 64-bit modulo per plane costs as
  // much as summing a small (4x4) plane.
  int64_t c = plane_begin % C;
  for (int64_t plane = plane_begin; plane < plane_end; ++plane, c = (c + 1 == C) ? 0 : c + 1) {
    const Vec k(shift[c]);
    const scalar_t* xp = x + plane * S;
    const scalar_t* dyp = kHasDy ? dy + plane * S : nullptr;
    Vec sum1, sum2;
    if (full > kChains * L) {
      Accumulators<Vec> acc;
      accumulate_span<scalar_t, kHasDy>(xp, dyp, full, k, acc);
      sum1 = acc.s1[0];
      sum2 = acc.s2[0];
      for (int64_t i = 1; i < kChains; ++i) {
        sum1 = sum1 + acc.s1[i];
        sum2 = sum2 + acc.s2[i];
      }
      s1[c] += acc.t1;  // non-zero only for planes longer than one fold
      s2[c] += acc.t2;
    } else {  // small planes: a few vectors, no chains needed
      sum1 = Vec(0);
      sum2 = Vec(0);
      for (int64_t i = 0; i < full; i += L) {
        const Vec d = IO::load(xp + i) - k;
        const Vec a = kHasDy ? IO::load(dyp + i) : d;
        sum1 = sum1 + a;
        sum2 = at::vec::fmadd(a, d, sum2);
      }
    }
    if (n_tail > 0) {
      // Masked-off lanes must add nothing: zero them in d (x - K is not 0
      // there); a masked load of dy is already 0 there.
      const Vec d = Vec::set(Vec(0), IO::load(xp + full, n_tail) - k, n_tail);
      const Vec a = kHasDy ? IO::load(dyp + full, n_tail) : d;
      sum1 = sum1 + a;
      sum2 = at::vec::fmadd(a, d, sum2);
    }
    (Vec::loadu(part1 + c * L) + sum1).store(part1 + c * L);
    (Vec::loadu(part2 + c * L) + sum2).store(part2 + c * L);
    if (++planes_since_fold == kPlanesPerFold * C) {
      fold();
      planes_since_fold = 0;
    }
  }
  fold();
  for (int64_t c = 0; c < C; ++c) {
    double t1 = 0, t2 = 0;
    for (int64_t l = 0; l < L; ++l) {
      t1 += lane_totals[c * L + l];
      t2 += lane_totals[(C + c) * L + l];
    }
    s1[c] += t1;
    s2[c] += t2;
  }
}

template <typename scalar_t>
void reduce_cf(const scalar_t* x, const scalar_t* dy, int64_t C, int64_t S, int64_t plane_begin,
               int64_t plane_end, const at::opmath_type<scalar_t>* shift, double* s1, double* s2,
               at::opmath_type<scalar_t>* scratch, double* lane_totals) {
  if (dy) {
    reduce_cf_impl<scalar_t, true>(x, dy, C, S, plane_begin, plane_end, shift, s1, s2, scratch,
                                   lane_totals);
  } else {
    reduce_cf_impl<scalar_t, false>(x, dy, C, S, plane_begin, plane_end, shift, s1, s2, scratch,
                                    lane_totals);
  }
}

// Channels-last: the channel vectors of a row are independent chains already;
// kRowsPerStep rows are summed in registers before each update of the
// per-channel partial sums in scratch, which amortizes their loads and stores.
constexpr int64_t kRowsPerStep = 4;
constexpr int64_t kWide = 4;

template <typename scalar_t, bool kHasDy>
void reduce_cl_impl(const scalar_t* x, const scalar_t* dy, int64_t C, int64_t row_stride, int64_t m_begin,
                    int64_t m_end, const at::opmath_type<scalar_t>* shift, double* s1, double* s2,
                    at::opmath_type<scalar_t>* scratch) {
  using IO = VecIO<scalar_t>;
  using Vec = typename IO::Vec;
  using opmath_t = typename IO::opmath_t;
  constexpr int64_t L = IO::kLanes;
  const int64_t Cp = padded_channels(C);
  // NB: float64 partial sums are as wide as the totals, so their run sums
  // would round at every step and lose a few ulps to torch's cascade sums on
  // long channels ((4100, 3, 2, 2): 9 ulps). They are compensated instead
  // (Neumaier): each step's rounding error is kept in res1/res2 and added
  // back at the fold. float/half runs are short enough not to need it.
  constexpr bool kCompensated = std::is_same<opmath_t, double>::value;
  const int64_t scratch_size = (kCompensated ? 4 : 2) * Cp;
  opmath_t* acc1 = scratch;
  opmath_t* acc2 = scratch + Cp;
  opmath_t* res1 = scratch + 2 * Cp;
  opmath_t* res2 = scratch + 3 * Cp;
  zero_fill(scratch, scratch_size);
  // acc[i..i+L) += v, compensated for float64.
  auto accumulate = [&](opmath_t* acc, opmath_t* res, int64_t i, const Vec& v) {
    const Vec total = Vec::loadu(acc + i);
    const Vec sum = total + v;
    if constexpr (kCompensated) {
      const Vec total_is_larger = total.abs() >= v.abs();
      const Vec error = Vec::blendv((v - sum) + total, (total - sum) + v, total_is_larger);
      (Vec::loadu(res + i) + error).store(res + i);
    }
    sum.store(acc + i);
  };
  // The last, partial channel vector reads (and discards) up to L - 1 values
  // past C in acc1/acc2 (padded) but must not read past the row in x/dy.
  auto step = [&](int64_t m0, int64_t rows) {
    int64_t i = 0;
    // kWide channel vectors at a time: their sums are independent chains,
    // interleaved here so the add latency is hidden (one vector at a time,
    // the loop waits on each chain).
    for (; i + kWide * L <= C; i += kWide * L) {
      Vec k[kWide], a_sum[kWide], ad_sum[kWide];
      for (int64_t j = 0; j < kWide; ++j) {
        k[j] = Vec::loadu(shift + i + j * L);
        a_sum[j] = ad_sum[j] = Vec(0);
      }
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t offset = (m0 + r) * row_stride + i;
        for (int64_t j = 0; j < kWide; ++j) {
          const Vec d = IO::load(x + offset + j * L) - k[j];
          const Vec a = kHasDy ? IO::load(dy + offset + j * L) : d;
          a_sum[j] = a_sum[j] + a;
          ad_sum[j] = at::vec::fmadd(a, d, ad_sum[j]);
        }
      }
      for (int64_t j = 0; j < kWide; ++j) {
        accumulate(acc1, res1, i + j * L, a_sum[j]);
        accumulate(acc2, res2, i + j * L, ad_sum[j]);
      }
    }
    for (; i < C; i += L) {
      const int64_t n = min64(L, C - i);
      const Vec k = n == L ? Vec::loadu(shift + i) : Vec::loadu(shift + i, n);
      Vec a_sum(0), ad_sum(0);
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t offset = (m0 + r) * row_stride + i;
        Vec d = (n == L ? IO::load(x + offset) : IO::load(x + offset, n)) - k;
        if (n < L) d = Vec::set(Vec(0), d, n);
        const Vec a = kHasDy ? (n == L ? IO::load(dy + offset) : IO::load(dy + offset, n)) : d;
        a_sum = a_sum + a;
        ad_sum = at::vec::fmadd(a, d, ad_sum);
      }
      accumulate(acc1, res1, i, a_sum);
      accumulate(acc2, res2, i, ad_sum);
    }
  };
  int64_t rows_since_fold = 0;
  auto fold = [&] {
    for (int64_t i = 0; i < C; ++i) {
      s1[i] += kCompensated ? acc1[i] + res1[i] : acc1[i];
      s2[i] += kCompensated ? acc2[i] + res2[i] : acc2[i];
    }
    zero_fill(scratch, scratch_size);
    rows_since_fold = 0;
  };
  int64_t m = m_begin;
  for (; m + kRowsPerStep <= m_end; m += kRowsPerStep) {
    step(m, kRowsPerStep);
    rows_since_fold += kRowsPerStep;
    if (rows_since_fold >= kFlushSteps / kChains) fold();
  }
  if (m < m_end) step(m, m_end - m);
  fold();
}

template <typename scalar_t>
void reduce_cl(const scalar_t* x, const scalar_t* dy, int64_t C, int64_t row_stride, int64_t m_begin, int64_t m_end,
               const at::opmath_type<scalar_t>* shift, double* s1, double* s2,
               at::opmath_type<scalar_t>* scratch) {
  if (dy) {
    reduce_cl_impl<scalar_t, true>(x, dy, C, row_stride, m_begin, m_end, shift, s1, s2, scratch);
  } else {
    reduce_cl_impl<scalar_t, false>(x, dy, C, row_stride, m_begin, m_end, shift, s1, s2, scratch);
  }
}

template <typename scalar_t>
void affine_cf(const scalar_t* x, const scalar_t* dy, scalar_t* out, int64_t C, int64_t S,
               int64_t plane_begin, int64_t plane_end, const at::opmath_type<scalar_t>* m,
               const at::opmath_type<scalar_t>* p, const at::opmath_type<scalar_t>* q,
               const at::opmath_type<scalar_t>* r) {
  using IO = VecIO<scalar_t>;
  using Vec = typename IO::Vec;
  constexpr int64_t L = IO::kLanes;
  int64_t c = plane_begin % C;
  for (int64_t plane = plane_begin; plane < plane_end; ++plane, c = (c + 1 == C) ? 0 : c + 1) {
    const Vec mv(m[c]), pv(p[c]), qv(q[c]);
    const Vec rv(dy ? r[c] : 0);
    const scalar_t* xp = x + plane * S;
    const scalar_t* dyp = dy ? dy + plane * S : nullptr;
    scalar_t* op = out + plane * S;
    int64_t s = 0;
    for (; s + L <= S; s += L) {
      Vec y = at::vec::fmadd(IO::load(xp + s) - mv, pv, qv);
      if (dyp) y = at::vec::fmadd(IO::load(dyp + s), rv, y);
      IO::store(op + s, y);
    }
    if (s < S) {
      const int64_t n_tail = S - s;
      Vec y = at::vec::fmadd(IO::load(xp + s, n_tail) - mv, pv, qv);
      if (dyp) y = at::vec::fmadd(IO::load(dyp + s, n_tail), rv, y);
      IO::store(op + s, y, n_tail);
    }
  }
}

// Channels-last: kRowsPerStep rows per pass over the channel vectors, so each
// coefficient vector loaded serves several rows (the per-channel m, p, q, r
// loads would otherwise outnumber the data loads).
template <typename scalar_t, bool kHasDy>
void affine_cl_impl(const scalar_t* x, const scalar_t* dy, scalar_t* out, int64_t C,
                    int64_t row_stride, int64_t m_begin, int64_t m_end, const at::opmath_type<scalar_t>* m,
                    const at::opmath_type<scalar_t>* p, const at::opmath_type<scalar_t>* q,
                    const at::opmath_type<scalar_t>* r) {
  using IO = VecIO<scalar_t>;
  using Vec = typename IO::Vec;
  constexpr int64_t L = IO::kLanes;
  auto step = [&](int64_t row0, int64_t rows) {
    int64_t i = 0;
    for (; i + L <= C; i += L) {
      const Vec mv = Vec::loadu(m + i), pv = Vec::loadu(p + i), qv = Vec::loadu(q + i);
      const Vec rv = kHasDy ? Vec::loadu(r + i) : Vec(0);
      for (int64_t k = 0; k < rows; ++k) {
        const int64_t offset = (row0 + k) * row_stride + i;
        Vec y = at::vec::fmadd(IO::load(x + offset) - mv, pv, qv);
        if (kHasDy) y = at::vec::fmadd(IO::load(dy + offset), rv, y);
        IO::store(out + offset, y);
      }
    }
    if (i < C) {
      const int64_t n = C - i;
      const Vec mv = Vec::loadu(m + i, n), pv = Vec::loadu(p + i, n), qv = Vec::loadu(q + i, n);
      const Vec rv = kHasDy ? Vec::loadu(r + i, n) : Vec(0);
      for (int64_t k = 0; k < rows; ++k) {
        const int64_t offset = (row0 + k) * row_stride + i;
        Vec y = at::vec::fmadd(IO::load(x + offset, n) - mv, pv, qv);
        if (kHasDy) y = at::vec::fmadd(IO::load(dy + offset, n), rv, y);
        IO::store(out + offset, y, n);
      }
    }
  };
  int64_t row = m_begin;
  for (; row + kRowsPerStep <= m_end; row += kRowsPerStep) step(row, kRowsPerStep);
  if (row < m_end) step(row, m_end - row);
}

template <typename scalar_t>
void affine_cl(const scalar_t* x, const scalar_t* dy, scalar_t* out, int64_t C, int64_t row_stride,
               int64_t m_begin,
               int64_t m_end, const at::opmath_type<scalar_t>* m,
               const at::opmath_type<scalar_t>* p, const at::opmath_type<scalar_t>* q,
               const at::opmath_type<scalar_t>* r) {
  if (dy) {
    affine_cl_impl<scalar_t, true>(x, dy, out, C, row_stride, m_begin, m_end, m, p, q, r);
  } else {
    affine_cl_impl<scalar_t, false>(x, dy, out, C, row_stride, m_begin, m_end, m, p, q, r);
  }
}

template <typename scalar_t>
Loops<scalar_t> make_loops() {
  return {&reduce_cf<scalar_t>, &reduce_cl<scalar_t>, &affine_cf<scalar_t>, &affine_cl<scalar_t>};
}

}  // namespace
}  // namespace CPU_CAPABILITY

#define BNFAST_CONCAT_(a, b) a##b
#define BNFAST_CONCAT(a, b) BNFAST_CONCAT_(a, b)

const LoopTable& BNFAST_CONCAT(loop_table_, CPU_CAPABILITY)() {
  static const LoopTable table{
#define BNFAST_STR_(x) #x
#define BNFAST_STR(x) BNFAST_STR_(x)
      BNFAST_STR(CPU_CAPABILITY),
      CPU_CAPABILITY::make_loops<float>(),
      CPU_CAPABILITY::make_loops<double>(),
      CPU_CAPABILITY::make_loops<c10::Half>(),
      CPU_CAPABILITY::make_loops<c10::BFloat16>(),
  };
  return table;
}

}  // namespace cpu
}  // namespace bnfast
