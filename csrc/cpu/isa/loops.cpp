// The CPU inner loops of every bnfast kernel, for one instruction set.
//
// setup.py compiles this file once per set, defining CPU_CAPABILITY (DEFAULT,
// AVX2, AVX512) and the matching -m flags; at::vec::Vectorized then has 8
// (AVX2) or 16 (AVX-512) float lanes. csrc/cpu/loops.h documents the loops;
// the op files (csrc/cpu/*_kernel.cpp) thread them with at::parallel_for.
//
// What they compute, per channel c (a = dy, or x - K for statistics):
//   reduce:  s1 = sum(a),  s2 = sum(a * (x - K))
//   affine:  out = x * p[c] + q[c] (+ dy * r[c])
//
// NB: sums are accumulated in opmath vectors (float, or double for double
// input) for at most kFlushIters vector steps per lane, then added into double
// totals. Short float runs keep the rounding error near one ulp of each
// partial sum, and the double totals keep it there over millions of elements;
// together with the shift K (a sample of the channel, or its mean) this avoids
// the catastrophic cancellation of E[x^2] - E[x]^2 when |mean| >> std.
//
// Performance assumption: every loop is memory-bound; one vector of
// accumulators per sum is enough to keep up with memory on this class of CPU.

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
  static Vec load(const scalar_t* p) {
    Vec out;
    at::vec::load_to_float<scalar_t>(p, out);
    return out;
  }
  static Vec load(const scalar_t* p, int64_t n) {
    scalar_t buf[kLanes] = {};
    for (int64_t i = 0; i < n; ++i) buf[i] = p[i];
    return load(buf);
  }
  static void store(scalar_t* p, const Vec& v) {
    at::vec::convert_from_float<scalar_t>(v, v).store(p, kLanes);
  }
  static void store(scalar_t* p, const Vec& v, int64_t n) {
    at::vec::convert_from_float<scalar_t>(v, v).store(p, n);
  }
};

// Vector steps per lane before partial sums are added into the double totals.
constexpr int64_t kFlushIters = 64;

template <typename Vec>
double horizontal_sum(const Vec& v) {
  using T = typename Vec::value_type;
  T lanes[Vec::size()];
  v.store(lanes);
  double total = 0;
  for (int64_t i = 0; i < Vec::size(); ++i) total += lanes[i];
  return total;
}

template <typename scalar_t>
void reduce_cf(const scalar_t* x, const scalar_t* dy, int64_t C, int64_t S, int64_t c,
               int64_t n_begin, int64_t n_end, at::opmath_type<scalar_t> shift, double* s1,
               double* s2) {
  using IO = VecIO<scalar_t>;
  using Vec = typename IO::Vec;
  constexpr int64_t L = IO::kLanes;
  const Vec k(shift);
  const Vec zero(0);
  Vec acc1(0), acc2(0);
  int64_t iters = 0;
  double t1 = 0, t2 = 0;
  auto flush = [&] {
    t1 += horizontal_sum(acc1);
    t2 += horizontal_sum(acc2);
    acc1 = zero;
    acc2 = zero;
    iters = 0;
  };
  for (int64_t n = n_begin; n < n_end; ++n) {
    const int64_t offset = (n * C + c) * S;
    const scalar_t* xp = x + offset;
    const scalar_t* dyp = dy ? dy + offset : nullptr;
    int64_t s = 0;
    for (; s + L <= S; s += L) {
      const Vec d = IO::load(xp + s) - k;
      const Vec a = dyp ? IO::load(dyp + s) : d;
      acc1 = acc1 + a;
      acc2 = at::vec::fmadd(a, d, acc2);
      if (++iters == kFlushIters) flush();
    }
    if (s < S) {
      const int64_t n_tail = S - s;
      // Masked-off lanes must add nothing: zero them in a (x - K is not 0 there).
      const Vec d = Vec::set(zero, IO::load(xp + s, n_tail) - k, n_tail);
      const Vec a = dyp ? IO::load(dyp + s, n_tail) : d;
      acc1 = acc1 + a;
      acc2 = at::vec::fmadd(a, d, acc2);
      if (++iters == kFlushIters) flush();
    }
  }
  flush();
  *s1 += t1;
  *s2 += t2;
}

template <typename scalar_t>
void reduce_cl(const scalar_t* x, const scalar_t* dy, int64_t C, int64_t m_begin, int64_t m_end,
               const at::opmath_type<scalar_t>* shift, double* s1, double* s2,
               at::opmath_type<scalar_t>* scratch) {
  using IO = VecIO<scalar_t>;
  using Vec = typename IO::Vec;
  using opmath_t = typename IO::opmath_t;
  constexpr int64_t L = IO::kLanes;
  const int64_t Cp = padded_channels(C);
  opmath_t* acc1 = scratch;
  opmath_t* acc2 = scratch + Cp;
  const Vec zero(0);
  auto clear = [&] {
    for (int64_t i = 0; i < 2 * Cp; ++i) scratch[i] = 0;
  };
  auto flush = [&] {
    for (int64_t i = 0; i < C; ++i) {
      s1[i] += acc1[i];
      s2[i] += acc2[i];
    }
    clear();
  };
  clear();
  int64_t rows = 0;
  for (int64_t m = m_begin; m < m_end; ++m) {
    const scalar_t* xp = x + m * C;
    const scalar_t* dyp = dy ? dy + m * C : nullptr;
    int64_t i = 0;
    for (; i + L <= C; i += L) {
      const Vec d = IO::load(xp + i) - Vec::loadu(shift + i);
      const Vec a = dyp ? IO::load(dyp + i) : d;
      (Vec::loadu(acc1 + i) + a).store(acc1 + i);
      at::vec::fmadd(a, d, Vec::loadu(acc2 + i)).store(acc2 + i);
    }
    if (i < C) {
      const int64_t n_tail = C - i;
      const Vec d = Vec::set(zero, IO::load(xp + i, n_tail) - Vec::loadu(shift + i, n_tail), n_tail);
      const Vec a = dyp ? IO::load(dyp + i, n_tail) : d;
      // The scratch rows are padded to a whole vector, so full stores are safe.
      (Vec::loadu(acc1 + i) + a).store(acc1 + i);
      at::vec::fmadd(a, d, Vec::loadu(acc2 + i)).store(acc2 + i);
    }
    if (++rows == kFlushIters) {
      flush();
      rows = 0;
    }
  }
  flush();
}

template <typename scalar_t>
void affine_cf(const scalar_t* x, const scalar_t* dy, scalar_t* out, int64_t C, int64_t S,
               int64_t plane_begin, int64_t plane_end, const at::opmath_type<scalar_t>* p,
               const at::opmath_type<scalar_t>* q, const at::opmath_type<scalar_t>* r) {
  using IO = VecIO<scalar_t>;
  using Vec = typename IO::Vec;
  constexpr int64_t L = IO::kLanes;
  for (int64_t plane = plane_begin; plane < plane_end; ++plane) {
    const int64_t c = plane % C;
    const Vec pv(p[c]), qv(q[c]);
    const Vec rv(dy ? r[c] : 0);
    const scalar_t* xp = x + plane * S;
    const scalar_t* dyp = dy ? dy + plane * S : nullptr;
    scalar_t* op = out + plane * S;
    int64_t s = 0;
    for (; s + L <= S; s += L) {
      Vec y = at::vec::fmadd(IO::load(xp + s), pv, qv);
      if (dyp) y = at::vec::fmadd(IO::load(dyp + s), rv, y);
      IO::store(op + s, y);
    }
    if (s < S) {
      const int64_t n_tail = S - s;
      Vec y = at::vec::fmadd(IO::load(xp + s, n_tail), pv, qv);
      if (dyp) y = at::vec::fmadd(IO::load(dyp + s, n_tail), rv, y);
      IO::store(op + s, y, n_tail);
    }
  }
}

template <typename scalar_t>
void affine_cl(const scalar_t* x, const scalar_t* dy, scalar_t* out, int64_t C, int64_t m_begin,
               int64_t m_end, const at::opmath_type<scalar_t>* p,
               const at::opmath_type<scalar_t>* q, const at::opmath_type<scalar_t>* r) {
  using IO = VecIO<scalar_t>;
  using Vec = typename IO::Vec;
  constexpr int64_t L = IO::kLanes;
  for (int64_t m = m_begin; m < m_end; ++m) {
    const scalar_t* xp = x + m * C;
    const scalar_t* dyp = dy ? dy + m * C : nullptr;
    scalar_t* op = out + m * C;
    int64_t i = 0;
    for (; i + L <= C; i += L) {
      Vec y = at::vec::fmadd(IO::load(xp + i), Vec::loadu(p + i), Vec::loadu(q + i));
      if (dyp) y = at::vec::fmadd(IO::load(dyp + i), Vec::loadu(r + i), y);
      IO::store(op + i, y);
    }
    if (i < C) {
      const int64_t n_tail = C - i;
      Vec y = at::vec::fmadd(IO::load(xp + i, n_tail), Vec::loadu(p + i, n_tail),
                             Vec::loadu(q + i, n_tail));
      if (dyp) y = at::vec::fmadd(IO::load(dyp + i, n_tail), Vec::loadu(r + i, n_tail), y);
      IO::store(op + i, y, n_tail);
    }
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
