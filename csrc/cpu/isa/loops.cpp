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
// hidden by independent accumulator chains (4 per sum, or one per channel
// vector of a channels-last row summed in registers), and the per-element
// helpers (BNFAST_ELEMENT) are inlined: with every variant of every loop in
// one file, GCC's inlining budget otherwise runs out and leaves some of them
// as calls per vector.
//
// NB: no function of the C++ standard library is instantiated here (its
// types, such as std::integer_sequence, emit no code): an inline template
// compiled with -mavx512f could be the copy the linker keeps for the
// baseline objects too.

// GCC 12 reports the undefined pass-through operands of the AVX-512
// conversion intrinsics as "may be used uninitialized" in every inlined copy:
// thousands of false positives that would hide a real warning.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/macros/Macros.h>

#include <type_traits>
#include <utility>

#include "../loops.h"
#include "../tuning.h"

#ifndef CPU_CAPABILITY
#error "compile csrc/cpu/isa/loops.cpp with -DCPU_CAPABILITY=DEFAULT|AVX2|AVX512"
#endif

namespace bnfast {
namespace cpu {
namespace CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;

#define BNFAST_ELEMENT C10_ALWAYS_INLINE
// The same for the lambdas of unrolled().
#if defined(__GNUC__)
#define BNFAST_LAMBDA_ELEMENT __attribute__((always_inline))
#else
#define BNFAST_LAMBDA_ELEMENT
#endif

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
  BNFAST_ELEMENT static Vec load(const scalar_t* p) { return Vec::loadu(p); }
  BNFAST_ELEMENT static Vec load(const scalar_t* p, int64_t n) { return Vec::loadu(p, n); }
  BNFAST_ELEMENT static void store(scalar_t* p, const Vec& v) { v.store(p); }
  BNFAST_ELEMENT static void store(scalar_t* p, const Vec& v, int64_t n) { v.store(p, n); }
  // A non-temporal store of a full vector; p is aligned to the vector's size.
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  static constexpr bool kHasNonTemporalStore = true;
  BNFAST_ELEMENT static void store_non_temporal(scalar_t* p, const Vec& v) {
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (std::is_same<scalar_t, float>::value) _mm512_stream_ps(p, v); else _mm512_stream_pd(p, v);
#else
    if constexpr (std::is_same<scalar_t, float>::value) _mm256_stream_ps(p, v); else _mm256_stream_pd(p, v);
#endif
  }
#else
  static constexpr bool kHasNonTemporalStore = false;
#endif
};

template <typename scalar_t>
struct VecIO<scalar_t, true> {
  using opmath_t = float;
  using Vec = Vectorized<float>;
  static constexpr int64_t kLanes = Vec::size();
#if defined(CPU_CAPABILITY_AVX512)
  BNFAST_ELEMENT static __mmask16 tail_mask(int64_t n) { return static_cast<__mmask16>((1u << n) - 1); }
  // v rounded to scalar_t (to nearest even, as torch rounds), 16 lanes.
  BNFAST_ELEMENT static __m256i packed(const Vec& v) {
    return std::is_same<scalar_t, at::BFloat16>::value ? at::vec::CPU_CAPABILITY::cvtfp32_bf16(v)
                                                       : at::vec::CPU_CAPABILITY::cvtfp32_fp16(v);
  }
#endif
  BNFAST_ELEMENT static Vec load(const scalar_t* p) {
    Vec out;
    at::vec::load_to_float<scalar_t>(p, out);
    return out;
  }
  BNFAST_ELEMENT static Vec load(const scalar_t* p, int64_t n) {
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
  BNFAST_ELEMENT static void store(scalar_t* p, const Vec& v) {
#if defined(CPU_CAPABILITY_AVX512)
    // One conversion and a plain 256-bit store: the generic path below
    // converts v twice and stores with a mask.
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), packed(v));
#else
    at::vec::convert_from_float<scalar_t>(v, v).store(p, kLanes);
#endif
  }
  BNFAST_ELEMENT static void store(scalar_t* p, const Vec& v, int64_t n) {
#if defined(CPU_CAPABILITY_AVX512)
    _mm256_mask_storeu_epi16(p, tail_mask(n), packed(v));
#else
    at::vec::convert_from_float<scalar_t>(v, v).store(p, n);
#endif
  }
  // As above: 16 values, 32 bytes, p aligned to 32.
#if defined(CPU_CAPABILITY_AVX512)
  static constexpr bool kHasNonTemporalStore = true;
  BNFAST_ELEMENT static void store_non_temporal(scalar_t* p, const Vec& v) {
    _mm256_stream_si256(reinterpret_cast<__m256i*>(p), packed(v));
  }
#else
  static constexpr bool kHasNonTemporalStore = false;
#endif
};

// f(std::integral_constant<int64_t, i>{}) for i = 0 .. kCount - 1, unrolled
// in the source: arrays of vectors indexed by those constants are split into
// registers by GCC's early scalar replacement, which runs before `#pragma GCC
// unroll` would make a loop's indices constant (with the pragma, the sums of
// reduce_rows_in_registers were stored to the stack every row).
// (std::integer_sequence is a type only; nothing of it is emitted.)
template <typename F, int64_t... kIndex>
BNFAST_ELEMENT void unrolled_over(F& f, std::integer_sequence<int64_t, kIndex...>) {
  (f(std::integral_constant<int64_t, kIndex>{}), ...);
}
template <int64_t kCount, typename F>
BNFAST_ELEMENT void unrolled(F&& f) {
  unrolled_over(f, std::make_integer_sequence<int64_t, kCount>{});
}

// f(std::integral_constant<int64_t, count>{}) for a run-time count in
// [1, kMax]: one instantiation per count, so that a loop over count vectors
// has no run-time test per vector (with tests in the row loop, GCC stored
// register sums to the stack every row).
template <int64_t kMax, typename F>
BNFAST_ELEMENT void with_count(int64_t count, F&& f) {
  if constexpr (kMax > 1) {
    if (count < kMax) return with_count<kMax - 1>(count, f);
  }
  f(std::integral_constant<int64_t, kMax>{});
}

// f(vectors, tail) for a row of `width` lanes in vectors of kLanes, at most
// kMax of them: vectors = its vector count, tail = whether the last one is
// partial, both compile-time constants (std::integral_constant,
// std::bool_constant), as the register loops take them.
template <int64_t kMax, int64_t kLanes, typename F>
BNFAST_ELEMENT void with_row_shape(int64_t width, F&& f) {
  with_count<kMax>((width + kLanes - 1) / kLanes, [&](auto vectors) BNFAST_LAMBDA_ELEMENT {
    if (width % kLanes == 0) {
      f(vectors, std::false_type{});
    } else {
      f(vectors, std::true_type{});
    }
  });
}

// Vector steps before the vector partial sums are folded into the double
// totals. They are spread over kChains independent accumulator chains (to hide
// the add latency), so each lane of each chain sums at most
// kFlushSteps / kChains = 64 values in opmath precision.
constexpr int64_t kChains = 4;
constexpr int64_t kFlushSteps = 256;

// total[i] += v[i] for the first n lanes, in double: the fold of float run
// sums into their totals. Whole vectors convert with vector instructions:
// GCC left the lane loop scalar in some instantiations, and the fold then
// cost as much as the rows between folds. Exact either way.
BNFAST_ELEMENT void add_to_totals(const Vectorized<float>& v, double* total, int64_t n) {
#if defined(CPU_CAPABILITY_AVX512)
  if (n == Vectorized<float>::size()) {
    const __m512 f = v;
    const __m512d lo = _mm512_cvtps_pd(_mm512_castps512_ps256(f));
    const __m512d hi = _mm512_cvtps_pd(_mm512_extractf32x8_ps(f, 1));
    _mm512_storeu_pd(total, _mm512_add_pd(_mm512_loadu_pd(total), lo));
    _mm512_storeu_pd(total + 8, _mm512_add_pd(_mm512_loadu_pd(total + 8), hi));
    return;
  }
#elif defined(CPU_CAPABILITY_AVX2)
  if (n == Vectorized<float>::size()) {
    const __m256 f = v;
    const __m256d lo = _mm256_cvtps_pd(_mm256_castps256_ps128(f));
    const __m256d hi = _mm256_cvtps_pd(_mm256_extractf128_ps(f, 1));
    _mm256_storeu_pd(total, _mm256_add_pd(_mm256_loadu_pd(total), lo));
    _mm256_storeu_pd(total + 4, _mm256_add_pd(_mm256_loadu_pd(total + 4), hi));
    return;
  }
#endif
  float lanes[Vectorized<float>::size()];
  v.store(lanes);
  for (int64_t i = 0; i < n; ++i) total[i] += lanes[i];
}

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
  BNFAST_ELEMENT Accumulators() {
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

// ---------------------------------------------------------------------------
// The fused ops' activations (loops.h Act), on opmath vectors, with the
// formulas of torch's own CPU kernels (so a fused op equals BN then the
// activation up to BN's own rounding).
//
// Each loop is compiled per Variant: the plain batch norm, or a fusion with
// its activation fixed at compile time (a switch on the activation inside the
// element loop is not hoisted out of it, and costs more than the arithmetic
// it selects). relu, the commonest, is split by whether a residual is added
// (kAddRelu), so that BN -> relu compiles without the residual's run-time
// tests; the other activations test for it at run time.
enum class Variant { kPlain, kIdentity, kRelu, kAddRelu, kLeakyRelu, kSilu, kGelu, kGeluTanh, kPreRelu };

constexpr Act act_of(Variant v) {
  switch (v) {
    case Variant::kRelu: return Act::kRelu;
    case Variant::kAddRelu: return Act::kRelu;
    case Variant::kLeakyRelu: return Act::kLeakyRelu;
    case Variant::kSilu: return Act::kSilu;
    case Variant::kGelu: return Act::kGelu;
    case Variant::kGeluTanh: return Act::kGeluTanh;
    default: return Act::kIdentity;
  }
}

template <Act kAct, typename Vec>
BNFAST_ELEMENT Vec activate(const Vec& z, const Vec& slope) {
  using T = typename Vec::value_type;
  if constexpr (kAct == Act::kRelu) {
    return at::vec::clamp_min(z, Vec(0));  // keeps NaN, as torch.relu
  } else if constexpr (kAct == Act::kLeakyRelu) {
    return Vec::blendv(z * slope, z, z > Vec(0));
  } else if constexpr (kAct == Act::kSilu) {
    return z / (Vec(1) + z.neg().exp());
  } else if constexpr (kAct == Act::kGelu) {
    return z * Vec(T(0.5)) * (Vec(1) + (z * Vec(T(M_SQRT1_2))).erf());
  } else if constexpr (kAct == Act::kGeluTanh) {
    const T beta = T(M_SQRT2 * M_2_SQRTPI * 0.5), kappa = T(0.044715);
    const Vec inner = Vec(beta) * (z + Vec(kappa) * z * z * z);
    return Vec(T(0.5)) * z * (Vec(1) + inner.tanh());
  } else {
    return z;
  }
}

// d act / dz at z, for every activation but relu (Terms::dz masks dy for
// it). NB: leaky_relu' is slope at z == 0 and for NaN, as torch's backward
// (which tests z > 0) gives it.
template <Act kAct, typename Vec>
BNFAST_ELEMENT Vec activate_derivative(const Vec& z, const Vec& slope) {
  using T = typename Vec::value_type;
  static_assert(kAct != Act::kRelu, "relu's gradient is a mask (Terms::dz)");
  if constexpr (kAct == Act::kLeakyRelu) {
    return Vec::blendv(slope, Vec(1), z > Vec(0));
  } else if constexpr (kAct == Act::kSilu) {
    const Vec sigmoid = Vec(1) / (Vec(1) + z.neg().exp());
    return sigmoid * (Vec(1) + z * (Vec(1) - sigmoid));
  } else if constexpr (kAct == Act::kGelu) {
    const T alpha = T(M_2_SQRTPI * M_SQRT1_2 * 0.5);
    const Vec cdf = Vec(T(0.5)) * (Vec(1) + (z * Vec(T(M_SQRT1_2))).erf());
    const Vec pdf = (Vec(T(-0.5)) * z * z).exp() * Vec(alpha);
    return cdf + z * pdf;
  } else if constexpr (kAct == Act::kGeluTanh) {
    const T beta = T(M_SQRT2 * M_2_SQRTPI * 0.5), kappa = T(0.044715);
    const Vec z2 = z * z;
    const Vec t = (Vec(beta) * (z + Vec(kappa) * z2 * z)).tanh();
    const Vec left = Vec(T(0.5)) * z;
    return Vec(T(0.5)) * (Vec(1) + t) + left * (Vec(1) - t * t) * Vec(beta) * (Vec(1) + Vec(3 * kappa) * z2);
  } else {
    return Vec(1);
  }
}

// Loads of x, dy and the residual at one element offset of the current
// channel(s): a full vector, or the first n lanes (n < L) of a tail.
template <typename scalar_t>
struct Lanes {
  using IO = VecIO<scalar_t>;
  using Vec = typename IO::Vec;
  int64_t n;  // lanes used; IO::kLanes for a full vector
  BNFAST_ELEMENT Vec load(const scalar_t* p) const { return n == IO::kLanes ? IO::load(p) : IO::load(p, n); }
  BNFAST_ELEMENT void store(scalar_t* p, const Vec& v) const { n == IO::kLanes ? IO::store(p, v) : IO::store(p, v, n); }
  // v with the lanes from n on zeroed. A compare and blend, not Vec::set:
  // its switch on n made GCC keep the register-resident row sums of
  // reduce_rows_in_registers in memory, stored every row.
  BNFAST_ELEMENT Vec zero_past_tail(const Vec& v) const {
    using opmath_t = typename IO::opmath_t;
    return Vec::blendv(Vec(0), v, Vec::arange(0, 1) < Vec(static_cast<opmath_t>(n)));
  }
};

// Where an affine loop writes. With non_temporal (loops.h), full vectors
// whose address is aligned to their size bypass the caches, without the read
// of the line they overwrite; tails, unaligned vectors, builds without such
// stores and every store without non_temporal are plain (the loops store a
// head plainly where that aligns the rest: lanes_to_alignment). Non-temporal
// stores are weakly ordered: fence() orders them before what the caller does
// next.
template <typename scalar_t>
struct Output {
  using IO = VecIO<scalar_t>;
  using Vec = typename IO::Vec;
  static constexpr uintptr_t kVectorBytes = IO::kLanes * sizeof(scalar_t);
  scalar_t* data;
  bool non_temporal;
  // Bytes from the last vector-aligned address up to data + offset.
  BNFAST_ELEMENT uintptr_t past_alignment(int64_t offset) const {
    return reinterpret_cast<uintptr_t>(data + offset) % kVectorBytes;
  }
  BNFAST_ELEMENT void store(const Lanes<scalar_t>& part, int64_t offset, const Vec& v) const {
    scalar_t* p = data + offset;
    if constexpr (IO::kHasNonTemporalStore) {
      if (non_temporal && part.n == IO::kLanes && past_alignment(offset) == 0) {
        IO::store_non_temporal(p, v);
        return;
      }
    }
    part.store(p, v);
  }
  // The head of a run of n values from offset: the values up to the next
  // vector-aligned address (at most n), which the loops store as one partial
  // vector, plainly, so that the run's full vectors all stream. Only with
  // non-temporal stores of vectors a whole cache line long (float32 and
  // float64 on AVX-512); else 0: already aligned, plain stores, or vectors of
  // half a line (half precision; AVX2), where no gain was measured.
  BNFAST_ELEMENT int64_t lanes_to_alignment(int64_t offset, int64_t n) const {
    if constexpr (IO::kHasNonTemporalStore && kVectorBytes % kCacheLineBytes == 0) {
      const uintptr_t past = past_alignment(offset);
      if (non_temporal && past != 0) return min64(n, static_cast<int64_t>((kVectorBytes - past) / sizeof(scalar_t)));
    }
    return 0;
  }
  void fence() const {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
    if (non_temporal) _mm_sfence();
#endif
  }
};

// The per-element terms of every loop, for the channel (channels-first
// plane) or channel vector (channels-last) at hand. Variant::kPlain is the
// plain batch norm, and compiles to it; the others read the Fusion.
template <typename scalar_t, bool kHasDy, Variant kVariant>
struct Terms {
  using IO = VecIO<scalar_t>;
  using Vec = typename IO::Vec;
  static constexpr bool kFused = kVariant != Variant::kPlain;
  static constexpr bool kPreRelu = kVariant == Variant::kPreRelu;
  static constexpr Act kAct = act_of(kVariant);
  static constexpr bool kActive = kAct != Act::kIdentity;  // an activation after BN
  // Variants without a residual by construction: kRelu (see Variant), and
  // pre_relu (a residual is added after BN; the op checks refuse one). Their
  // loops are compiled without the residual's run-time tests, which
  // otherwise keep the reductions' sums out of registers.
  static constexpr bool kMayHaveResidual = kFused && !kPreRelu && kVariant != Variant::kRelu;
  const scalar_t* x;
  const scalar_t* dy;
  const Fusion<scalar_t>* f;
  // The fusion's tensors, copied out of *f: loads through f in the element
  // loops are not hoisted (the compiler cannot rule out that out aliases *f).
  const scalar_t* residual = nullptr;
  scalar_t* grad_residual = nullptr;
  bool grad_residual_from_reduce = false;
  Vec zp, zq, slope;  // fused: z's coefficients (backward) and leaky_relu's slope

  BNFAST_ELEMENT Terms(const scalar_t* x_, const scalar_t* dy_, const Fusion<scalar_t>* f_) : x(x_), dy(dy_), f(f_) {
    if constexpr (kFused) slope = Vec(f->slope);
    if constexpr (kMayHaveResidual) {
      residual = f->residual;
      grad_residual = f->grad_residual;
      grad_residual_from_reduce = f->grad_residual_from_reduce;
    }
  }
  // Per-channel z coefficients: broadcast (channels-first) or loaded (channels-last).
  BNFAST_ELEMENT void set_z(const typename IO::opmath_t* zp_, const typename IO::opmath_t* zq_, int64_t i, int64_t n,
             bool broadcast) {
    if constexpr (!(kHasDy && kActive)) return;
    if (broadcast) {
      zp = Vec(zp_[i]);
      zq = Vec(zq_[i]);
    } else {
      zp = n == IO::kLanes ? Vec::loadu(zp_ + i) : Vec::loadu(zp_ + i, n);
      zq = n == IO::kLanes ? Vec::loadu(zq_ + i) : Vec::loadu(zq_ + i, n);
    }
  }
  // x as the loops read it: relu(x) for pre_relu.
  BNFAST_ELEMENT Vec input(const Lanes<scalar_t>& l, int64_t o) const {
    const Vec v = l.load(x + o);
    return kPreRelu ? at::vec::clamp_min(v, Vec(0)) : v;
  }
  // With a residual, grad_residual is the fused backward's dz = dy * act'(z):
  // the reduction (the first pass) writes it, and the affine pass reads it
  // back in place of dy and the residual (when the fusion says the same op's
  // reduction wrote it), one stream fewer than recomputing it. Only where
  // scalar_t is the opmath type: a rounded half-precision dz would change the
  // result.
  static constexpr bool kReuseGrad = kMayHaveResidual && std::is_same<scalar_t, typename IO::opmath_t>::value;
  // dy times act'(z) for a fused activation (d = x - mean), from dy and the
  // residual.
  BNFAST_ELEMENT Vec dz(const Lanes<scalar_t>& l, int64_t o, const Vec& d) const {
    Vec a = l.load(dy + o);
    if constexpr (kActive) {
      Vec z = at::vec::fmadd(d, zp, zq);
      if (kMayHaveResidual && residual) z = z + l.load(residual + o);
      if constexpr (kAct == Act::kRelu) {
        // dy where z > 0, else +0: torch's threshold_backward, with a mask
        // instead of a multiply by relu'(z) (fewer instructions in the
        // backward's hottest loops, and no -0 or NaN where dy is negative or
        // not finite and z <= 0).
        a = a & (z > Vec(0));
      } else {
        a = a * activate_derivative<kAct>(z, slope);
      }
    }
    return a;
  }
  // dz for the affine pass; stored to grad_residual when asked (unless the
  // reduction of the same op did).
  BNFAST_ELEMENT Vec grad(const Lanes<scalar_t>& l, int64_t o, const Vec& d) const {
    if (kReuseGrad && grad_residual && grad_residual_from_reduce) return l.load(grad_residual + o);
    const Vec a = dz(l, o, d);
    if (kMayHaveResidual && grad_residual) l.store(grad_residual + o, a);
    return a;
  }
  // The reduction's terms: d = x - K, a = dz (K is the mean then) or d.
  // Lanes past n are zeroed in d (a masked load of dy is 0 there already).
  BNFAST_ELEMENT void reduce(const Lanes<scalar_t>& l, int64_t o, const Vec& k, Vec& a, Vec& d) const {
    d = input(l, o) - k;
    if (l.n < IO::kLanes) d = l.zero_past_tail(d);
    if (kHasDy) {
      a = dz(l, o, d);
      if (kReuseGrad && grad_residual) l.store(grad_residual + o, a);
    } else {
      a = d;
    }
  }
  // The affine step: (x - m) * p + q, then act (+ residual) forward, or
  // + grad * r backward (masked by x > 0 for pre_relu).
  BNFAST_ELEMENT Vec affine(const Lanes<scalar_t>& l, int64_t o, const Vec& m, const Vec& p, const Vec& q, const Vec& r) const {
    const Vec d = input(l, o) - m;
    Vec y = at::vec::fmadd(d, p, q);
    if (kHasDy) {
      y = at::vec::fmadd(grad(l, o, d), r, y);
      if constexpr (kPreRelu) y = Vec::blendv(Vec(0), y, l.load(x + o) > Vec(0));
    } else if constexpr (kFused) {
      if (kMayHaveResidual && residual) y = y + l.load(residual + o);
      y = activate<kAct>(y, slope);
    }
    return y;
  }
};

// a = dy ? dy : x - K;  s1 += a;  s2 += a * (x - K)   over p[0, len) (full vectors only).
template <typename scalar_t, bool kHasDy, Variant kVariant>
inline void accumulate_span(const Terms<scalar_t, kHasDy, kVariant>& t, int64_t base, int64_t len,
                            const typename VecIO<scalar_t>::Vec& k,
                            Accumulators<typename VecIO<scalar_t>::Vec>& acc) {
  using IO = VecIO<scalar_t>;
  using Vec = typename IO::Vec;
  constexpr int64_t L = IO::kLanes;
  const Lanes<scalar_t> full{L};
  int64_t s = 0;
  while (s < len) {
    // Up to the next fold, in steps of kChains vectors, then single vectors.
    // The chains are named locals in the loops, so they stay in registers
    // (as acc's arrays, GCC kept them on the stack: a store-to-load
    // round trip on every vector's dependency chain).
    const int64_t block_end = s + min64((len - s) / L, kFlushSteps - acc.steps) * L;
    Vec a0 = acc.s1[0], a1 = acc.s1[1], a2 = acc.s1[2], a3 = acc.s1[3];
    Vec b0 = acc.s2[0], b1 = acc.s2[1], b2 = acc.s2[2], b3 = acc.s2[3];
    static_assert(kChains == 4, "the chains below are written out");
    const int64_t steps_before = s;
    for (; s + kChains * L <= block_end; s += kChains * L) {
      Vec a, d;
      t.reduce(full, base + s, k, a, d);
      a0 = a0 + a;
      b0 = at::vec::fmadd(a, d, b0);
      t.reduce(full, base + s + L, k, a, d);
      a1 = a1 + a;
      b1 = at::vec::fmadd(a, d, b1);
      t.reduce(full, base + s + 2 * L, k, a, d);
      a2 = a2 + a;
      b2 = at::vec::fmadd(a, d, b2);
      t.reduce(full, base + s + 3 * L, k, a, d);
      a3 = a3 + a;
      b3 = at::vec::fmadd(a, d, b3);
    }
    for (; s < block_end; s += L) {
      Vec a, d;
      t.reduce(full, base + s, k, a, d);
      a0 = a0 + a;
      b0 = at::vec::fmadd(a, d, b0);
    }
    acc.s1[0] = a0, acc.s1[1] = a1, acc.s1[2] = a2, acc.s1[3] = a3;
    acc.s2[0] = b0, acc.s2[1] = b1, acc.s2[2] = b2, acc.s2[3] = b3;
    acc.steps += (s - steps_before) / L;
    if (acc.steps >= kFlushSteps) acc.fold();
  }
}

// Channels-first: planes are visited in memory order (streaming, which the
// hardware prefetchers follow), each plane summed with kChains register chains,
// and the plane's vector sum added into its channel's vector partial sums in
// scratch ([2][C][L]); those are folded into the double totals every
// kPlanesPerFold planes of each channel. Only the range's channels are
// zeroed, folded and summed: a range of fewer than C planes (each task of a
// tensor with many channels) would otherwise pay for all C channels' partial
// sums, more than for its own data when C is large.
constexpr int64_t kPlanesPerFold = 16;

template <typename scalar_t, bool kHasDy, Variant kVariant>
void reduce_cf_impl(const scalar_t* x, const scalar_t* dy, int64_t C, int64_t S,
                    int64_t plane_begin, int64_t plane_end, const at::opmath_type<scalar_t>* shift,
                    double* s1, double* s2, at::opmath_type<scalar_t>* scratch,
                    double* lane_totals, const Fusion<scalar_t>* fusion) {
  using IO = VecIO<scalar_t>;
  using Vec = typename IO::Vec;
  constexpr int64_t L = IO::kLanes;
  const int64_t full = S / L * L;
  const int64_t n_tail = S - full;
  auto* part1 = scratch;
  auto* part2 = scratch + C * L;
  // The range's channels: one run from its first plane's channel, or two
  // when that run wraps past C - 1. f(begin, end) per run.
  const int64_t first_channel = plane_begin % C;
  const int64_t last_channel = first_channel + min64(C, plane_end - plane_begin);
  auto for_channel_runs = [&](auto&& f) {
    f(first_channel, min64(last_channel, C));
    if (last_channel > C) f(int64_t(0), last_channel - C);
  };
  // Both halves ([2][C][L]) of buffer over channels [c0, c1).
  auto zero_channels = [&](auto* buffer, int64_t c0, int64_t c1) {
    zero_fill(buffer + c0 * L, (c1 - c0) * L);
    zero_fill(buffer + (C + c0) * L, (c1 - c0) * L);
  };
  for_channel_runs([&](int64_t c0, int64_t c1) {
    zero_channels(scratch, c0, c1);
    zero_channels(lane_totals, c0, c1);
  });
  // NB: folding lane by lane into double vectors is one vectorized pass; the
  // horizontal sums (serial, 16 dependent adds per channel) run once per call.
  // Done per fold they cost more than summing 4x4 planes.
  auto fold = [&] {
    for_channel_runs([&](int64_t c0, int64_t c1) {
      for (int64_t half = 0; half < 2; ++half) {
        const int64_t begin = (half * C + c0) * L, end = (half * C + c1) * L;
        for (int64_t i = begin; i < end; ++i) lane_totals[i] += scratch[i];
      }
      zero_channels(scratch, c0, c1);
    });
  };
  Terms<scalar_t, kHasDy, kVariant> t(x, dy, fusion);
  const Lanes<scalar_t> lanes{L};
  int64_t planes_since_fold = 0;
  // The channel is tracked incrementally: a 64-bit modulo per plane costs as
  // much as summing a small (4x4) plane.
  int64_t c = first_channel;
  for (int64_t plane = plane_begin; plane < plane_end; ++plane, c = (c + 1 == C) ? 0 : c + 1) {
    const Vec k(shift[c]);
    if constexpr (kVariant != Variant::kPlain) t.set_z(fusion->zp, fusion->zq, c, L, /*broadcast=*/true);
    const int64_t base = plane * S;
    Vec sum1, sum2;
    if (full > kChains * L) {
      Accumulators<Vec> acc;
      accumulate_span(t, base, full, k, acc);
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
        Vec a, d;
        t.reduce(lanes, base + i, k, a, d);
        sum1 = sum1 + a;
        sum2 = at::vec::fmadd(a, d, sum2);
      }
    }
    if (n_tail > 0) {
      Vec a, d;
      t.reduce(Lanes<scalar_t>{n_tail}, base + full, k, a, d);
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
  for_channel_runs([&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      double t1 = 0, t2 = 0;
      for (int64_t l = 0; l < L; ++l) {
        t1 += lane_totals[c * L + l];
        t2 += lane_totals[(C + c) * L + l];
      }
      s1[c] += t1;
      s2[c] += t2;
    }
  });
}

// Channels-last sums in scratch (float64, and a fused backward with an
// activation): the channel vectors of a row are independent chains already;
// kRowsPerStep rows are summed in registers before each update of the
// per-channel partial sums in scratch, which amortizes their loads and stores.
constexpr int64_t kRowsPerStep = 4;
// The widest block of columns of affine_cl, in bytes of one coefficient.
constexpr int64_t kAffineBlockBytes = 4096;
constexpr int64_t kWide = 4;
// Channel vectors of a row whose three affine coefficients (m, p, q), or
// whose shift and two sums (reduce_cl), fit in the vector registers, with
// room for the loop's own. The affine pass with dy (a fourth coefficient, r)
// and half-precision rows (conversions) take as many: the few coefficients
// GCC then reloads from the stack every row cost less than affine_cl_impl's
// steps over the row (backward_elemt and bfloat16 elemt at 96-128 channels;
// the figures are in the commit message).
// (tests/samples.py reads the last definition, AVX-512's.)
#if !defined(CPU_CAPABILITY_AVX512)
constexpr int64_t kRowVectors = 4;  // 12 of 16 ymm registers
#else
constexpr int64_t kRowVectors = 8;  // 24 of 32 zmm registers
#endif

// Channels-last float sums: each lane sums its rows in row order, from zero
// after each fold into the double totals, kRowsPerFold rows at most (a
// shorter run than the channels-first chains', as one sequential sum is less
// accurate: tests/test_robust.py). Both channels-last loops below add in this
// order, so a column's sums never depend on the row's width (a band's, which
// follows the thread count) nor on the loop that summed it.
constexpr int64_t kRowsPerFold = 16;
static_assert(kRowsPerFold % kRowsPerStep == 0, "reduce_cl_impl folds after whole steps");

// Channels-last, the sums of columns [c0, c0 + width) of rows [m_begin,
// m_end) in registers (kVectors channel vectors, kTail: the last one
// partial), added into s1[c0 + i], s2[c0 + i]: rows are summed in memory
// order.
template <int64_t kVectors, bool kTail, typename scalar_t, bool kHasDy, Variant kVariant>
void reduce_rows_in_registers(const Terms<scalar_t, kHasDy, kVariant>& t, int64_t c0, int64_t width,
                              int64_t row_stride, int64_t m_begin, int64_t m_end,
                              const at::opmath_type<scalar_t>* shift, double* s1, double* s2) {
  using IO = VecIO<scalar_t>;
  using Vec = typename IO::Vec;  // float lanes: float64 sums are compensated elsewhere
  constexpr int64_t L = IO::kLanes;
  const int64_t last = kTail ? width - (kVectors - 1) * L : L;  // lanes of the last vector
  shift += c0;
  s1 += c0;
  s2 += c0;
  Vec k[kVectors], a_sum[kVectors], ad_sum[kVectors];
  unrolled<kVectors>([&](auto index) BNFAST_LAMBDA_ELEMENT {
    constexpr int64_t v = decltype(index)::value;
    k[v] = Vec::loadu(shift + v * L, v + 1 == kVectors ? last : L);
    a_sum[v] = ad_sum[v] = Vec(0);
  });
  for (int64_t row = m_begin; row < m_end;) {
    const int64_t fold_end = min64(m_end, row + kRowsPerFold);
    for (; row < fold_end; ++row) {
      const int64_t base = row * row_stride + c0;
      unrolled<kVectors>([&](auto index) BNFAST_LAMBDA_ELEMENT {
        constexpr int64_t v = decltype(index)::value;
        const Lanes<scalar_t> part{v + 1 == kVectors ? last : L};
        Vec a, d;
        t.reduce(part, base + v * L, k[v], a, d);
        a_sum[v] = a_sum[v] + a;
        ad_sum[v] = at::vec::fmadd(a, d, ad_sum[v]);
      });
    }
    unrolled<kVectors>([&](auto index) BNFAST_LAMBDA_ELEMENT {
      constexpr int64_t v = decltype(index)::value;
      const int64_t n = v + 1 == kVectors ? last : L;
      add_to_totals(a_sum[v], s1 + v * L, n);
      add_to_totals(ad_sum[v], s2 + v * L, n);
      a_sum[v] = ad_sum[v] = Vec(0);
    });
  }
}

template <typename scalar_t, bool kHasDy, Variant kVariant>
void reduce_cl_impl(const scalar_t* x, const scalar_t* dy, int64_t C, int64_t row_stride, int64_t m_begin,
                    int64_t m_end, const at::opmath_type<scalar_t>* shift, double* s1, double* s2,
                    at::opmath_type<scalar_t>* scratch, const Fusion<scalar_t>* fusion, bool whole_blocks) {
  using IO = VecIO<scalar_t>;
  using Vec = typename IO::Vec;
  using opmath_t = typename IO::opmath_t;
  constexpr int64_t L = IO::kLanes;
  const int64_t Cp = padded_channels(C);
  // NB: float64 partial sums are as wide as the totals, so their run sums
  // would round at every step and lose a few ulps to torch's cascade sums on
  // long channels. They are compensated instead (Neumaier): each step's
  // rounding error is kept in res1/res2 and added back at the fold.
  // float/half runs are short enough not to need it.
  constexpr bool kCompensated = std::is_same<opmath_t, double>::value;
  if (C <= 0) return;
  // Sums in registers (reduce_rows_in_registers). Not in float64, whose sums
  // are compensated below; nor for a fused backward, whose z coefficients
  // live in Terms, one channel vector's at a time.
  if constexpr (!kCompensated && !(kHasDy && Terms<scalar_t, kHasDy, kVariant>::kActive)) {
    const Terms<scalar_t, kHasDy, kVariant> t(x, dy, fusion);
    // Rows that fit are summed whole, in memory order. Wider ones are cut
    // into blocks of columns (of one width, but the last), each summed over
    // all the rows (whole_blocks, loops.h) or in tiles of kRowsPerFold rows,
    // block by block. Either way each column is folded every kRowsPerFold
    // rows from m_begin, so its sums are added in the same order whatever
    // the width and the walk. Faster than the scratch loop below, whose
    // steps load and store the partial sums (figures in the commit message).
    const int64_t blocks = (C + kRowVectors * L - 1) / (kRowVectors * L);
    const int64_t block = ((C + blocks - 1) / blocks + L - 1) / L * L;
    const int64_t tile = blocks == 1 || whole_blocks ? m_end - m_begin : kRowsPerFold;
    for (int64_t m0 = m_begin; m0 < m_end; m0 += tile) {
      const int64_t m1 = min64(m_end, m0 + tile);
      for (int64_t c0 = 0; c0 < C; c0 += block) {
        const int64_t width = min64(block, C - c0);
        with_row_shape<kRowVectors, L>(width, [&](auto vectors, auto tail) BNFAST_LAMBDA_ELEMENT {
          reduce_rows_in_registers<decltype(vectors)::value, decltype(tail)::value>(t, c0, width, row_stride, m0,
                                                                                   m1, shift, s1, s2);
        });
      }
    }
    return;
  }
  const int64_t scratch_size = (kCompensated ? 4 : 2) * Cp;
  opmath_t* acc1 = scratch;
  opmath_t* acc2 = scratch + Cp;
  opmath_t* res1 = scratch + 2 * Cp;
  opmath_t* res2 = scratch + 3 * Cp;
  zero_fill(scratch, scratch_size);
  // A step's sums: float ones continue the run in acc (see kRowsPerFold);
  // float64 ones start from zero and are added to acc with compensation.
  auto start = [&](const opmath_t* acc, int64_t i) { return kCompensated ? Vec(0) : Vec::loadu(acc + i); };
  auto finish = [&](opmath_t* acc, opmath_t* res, int64_t i, const Vec& v) {
    if constexpr (kCompensated) {
      const Vec total = Vec::loadu(acc + i);
      const Vec sum = total + v;
      const Vec total_is_larger = total.abs() >= v.abs();
      const Vec error = Vec::blendv((v - sum) + total, (total - sum) + v, total_is_larger);
      (Vec::loadu(res + i) + error).store(res + i);
      sum.store(acc + i);
    } else {
      v.store(acc + i);
    }
  };
  // One Terms per channel vector of a wide step (each has its own z coefficients).
  Terms<scalar_t, kHasDy, kVariant> terms[kWide] = {{x, dy, fusion}, {x, dy, fusion}, {x, dy, fusion}, {x, dy, fusion}};
  const Lanes<scalar_t> lanes{L};
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
        if constexpr (kVariant != Variant::kPlain) terms[j].set_z(fusion->zp, fusion->zq, i + j * L, L, /*broadcast=*/false);
        a_sum[j] = start(acc1, i + j * L);
        ad_sum[j] = start(acc2, i + j * L);
      }
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t offset = (m0 + r) * row_stride + i;
        for (int64_t j = 0; j < kWide; ++j) {
          Vec a, d;
          terms[j].reduce(lanes, offset + j * L, k[j], a, d);
          a_sum[j] = a_sum[j] + a;
          ad_sum[j] = at::vec::fmadd(a, d, ad_sum[j]);
        }
      }
      for (int64_t j = 0; j < kWide; ++j) {
        finish(acc1, res1, i + j * L, a_sum[j]);
        finish(acc2, res2, i + j * L, ad_sum[j]);
      }
    }
    for (; i < C; i += L) {
      const Lanes<scalar_t> part{min64(L, C - i)};
      const Vec k = part.n == L ? Vec::loadu(shift + i) : Vec::loadu(shift + i, part.n);
      if constexpr (kVariant != Variant::kPlain) terms[0].set_z(fusion->zp, fusion->zq, i, part.n, /*broadcast=*/false);
      Vec a_sum = start(acc1, i), ad_sum = start(acc2, i);
      for (int64_t r = 0; r < rows; ++r) {
        Vec a, d;
        terms[0].reduce(part, (m0 + r) * row_stride + i, k, a, d);
        a_sum = a_sum + a;
        ad_sum = at::vec::fmadd(a, d, ad_sum);
      }
      finish(acc1, res1, i, a_sum);
      finish(acc2, res2, i, ad_sum);
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
    if (rows_since_fold >= (kCompensated ? kFlushSteps / kChains : kRowsPerFold)) fold();
  }
  if (m < m_end) step(m, m_end - m);
  fold();
}

template <typename scalar_t, bool kHasDy, Variant kVariant>
void affine_cf_impl(const scalar_t* x, const scalar_t* dy, Output<scalar_t> out, int64_t C, int64_t S,
                    int64_t plane_begin, int64_t plane_end, const at::opmath_type<scalar_t>* m,
                    const at::opmath_type<scalar_t>* p, const at::opmath_type<scalar_t>* q,
                    const at::opmath_type<scalar_t>* r, const Fusion<scalar_t>* fusion) {
  using IO = VecIO<scalar_t>;
  using Vec = typename IO::Vec;
  constexpr int64_t L = IO::kLanes;
  Terms<scalar_t, kHasDy, kVariant> t(x, dy, fusion);
  const Lanes<scalar_t> lanes{L};
  int64_t c = plane_begin % C;
  if constexpr (!kHasDy) {
    if (S > L && S % L != 0) {
      // Forward, planes with a tail: the planes are one contiguous run of
      // values, walked in full vectors; in a vector where plane c ends, its
      // first `left` lanes take c's coefficients and the rest the next
      // channel's (S > L: never a third), selected by a lane compare rather
      // than a branch on `left`. No per-plane tail. Each element is computed
      // as the plane loop below computes it. (Planes of whole vectors keep
      // the plane loop, which measured faster on them in bfloat16.)
      using opmath_t = at::opmath_type<scalar_t>;
      const Vec lane = Vec::arange(0, 1);
      const int64_t end = plane_end * S;
      int64_t next = (c + 1 == C) ? 0 : c + 1;
      Vec mv(m[c]), pv(p[c]), qv(q[c]), mn(m[next]), pn(p[next]), qn(q[next]);
      int64_t left = S;  // values of plane c from o on
      int64_t o = plane_begin * S;
      // The l.n values from o: plane c's, or (where c ends in them) its and
      // the next channel's.
      auto step = [&](const Lanes<scalar_t>& l) BNFAST_LAMBDA_ELEMENT {
        if (left >= l.n) {
          out.store(l, o, t.affine(l, o, mv, pv, qv, Vec(0)));
        } else {
          const Vec in_plane = lane < Vec(static_cast<opmath_t>(left));
          out.store(l, o, t.affine(l, o, Vec::blendv(mn, mv, in_plane), Vec::blendv(pn, pv, in_plane),
                                  Vec::blendv(qn, qv, in_plane), Vec(0)));
        }
        o += l.n;
        left -= l.n;
        if (left <= 0) {  // plane c ended: -left values of the next one were used
          left += S;
          next = (next + 1 == C) ? 0 : next + 1;
          mv = mn, pv = pn, qv = qn;
          mn = Vec(m[next]), pn = Vec(p[next]), qn = Vec(q[next]);
        }
      };
      // Streaming, a head up to the first aligned address (lanes_to_alignment;
      // shorter than a vector, so inside plane c, as S > L).
      const int64_t head = out.lanes_to_alignment(o, end - o);
      if (head > 0) step(Lanes<scalar_t>{head});
      while (o < end) {
        // Full vectors strictly inside plane c: no boundary, no tail.
        const int64_t inside = std::min((left - 1) / L, (end - o) / L);
        for (int64_t k = 0; k < inside; ++k, o += L) out.store(lanes, o, t.affine(lanes, o, mv, pv, qv, Vec(0)));
        left -= inside * L;
        if (o >= end) break;
        // The vector where plane c ends (or the last, partial one of the run).
        step(Lanes<scalar_t>{min64(L, end - o)});
      }
      return;
    }
  }
  for (int64_t plane = plane_begin; plane < plane_end; ++plane, c = (c + 1 == C) ? 0 : c + 1) {
    const Vec mv(m[c]), pv(p[c]), qv(q[c]);
    const Vec rv(kHasDy ? r[c] : 0);
    if constexpr (kVariant != Variant::kPlain) t.set_z(fusion->zp, fusion->zq, c, L, /*broadcast=*/true);
    const int64_t base = plane * S;
    // The n (< L) values from base + s, as a partial vector.
    auto partial = [&](int64_t s, int64_t n) BNFAST_LAMBDA_ELEMENT {
      const Lanes<scalar_t> part{n};
      out.store(part, base + s, t.affine(part, base + s, mv, pv, qv, rv));
    };
    int64_t s = out.lanes_to_alignment(base, S);  // streaming: a head, as above
    if (s > 0) partial(0, s);
    for (; s + L <= S; s += L) out.store(lanes, base + s, t.affine(lanes, base + s, mv, pv, qv, rv));
    if (s < S) partial(s, S - s);
  }
}

// Channels-last, a row's coefficients in registers (rows of kVectors
// channel vectors, C channels; kTail: the last one partial): rows are walked
// in memory order and no coefficient is reloaded.
template <int64_t kVectors, bool kTail, typename scalar_t, bool kHasDy, Variant kVariant>
void affine_rows_in_registers(const Terms<scalar_t, kHasDy, kVariant>& terms, Output<scalar_t> out, int64_t C,
                              int64_t row_stride, int64_t m_begin, int64_t m_end,
                              const at::opmath_type<scalar_t>* m, const at::opmath_type<scalar_t>* p,
                              const at::opmath_type<scalar_t>* q, const at::opmath_type<scalar_t>* r) {
  using IO = VecIO<scalar_t>;
  using Vec = typename IO::Vec;
  constexpr int64_t L = IO::kLanes;
  const int64_t last = kTail ? C - (kVectors - 1) * L : L;  // lanes of the last vector
  // A local copy: through the reference, GCC reloaded t.x and t.dy after
  // every store to out (which it cannot prove does not alias *terms).
  const auto t = terms;
  Vec mv[kVectors], pv[kVectors], qv[kVectors], rv[kVectors];
  unrolled<kVectors>([&](auto index) BNFAST_LAMBDA_ELEMENT {
    constexpr int64_t v = decltype(index)::value;
    const int64_t n = v + 1 == kVectors ? last : L;
    mv[v] = Vec::loadu(m + v * L, n), pv[v] = Vec::loadu(p + v * L, n), qv[v] = Vec::loadu(q + v * L, n);
    rv[v] = kHasDy ? Vec::loadu(r + v * L, n) : Vec(0);
  });
  for (int64_t row = m_begin; row < m_end; ++row) {
    const int64_t base = row * row_stride;
    unrolled<kVectors>([&](auto index) BNFAST_LAMBDA_ELEMENT {
      constexpr int64_t v = decltype(index)::value;
      const Lanes<scalar_t> part{v + 1 == kVectors ? last : L};
      out.store(part, base + v * L, t.affine(part, base + v * L, mv[v], pv[v], qv[v], rv[v]));
    });
  }
}

// Channels-last: rows of channel vectors with per-channel coefficients.
// Rows short enough keep their coefficients in registers. Longer ones are
// walked several rows at a time, channel vector by channel vector, so each
// coefficient vector loaded serves several rows (the m, p, q, r loads would
// otherwise outnumber the data loads), while the task stays in cache; beyond
// kCacheResidentBytes that order makes each row a run of a few cache lines,
// too short for the hardware prefetchers, and the loop waited on memory:
// there rows are walked one at a time (in memory order, or block of columns
// by block for rows wider than kAffineBlockBytes).
template <typename scalar_t, bool kHasDy, Variant kVariant>
void affine_cl_impl(const scalar_t* x, const scalar_t* dy, Output<scalar_t> out, int64_t C,
                    int64_t row_stride, int64_t m_begin, int64_t m_end, const at::opmath_type<scalar_t>* m,
                    const at::opmath_type<scalar_t>* p, const at::opmath_type<scalar_t>* q,
                    const at::opmath_type<scalar_t>* r, const Fusion<scalar_t>* fusion) {
  using IO = VecIO<scalar_t>;
  using Vec = typename IO::Vec;
  using T = Terms<scalar_t, kHasDy, kVariant>;
  constexpr int64_t L = IO::kLanes;
  if (C <= 0) return;
  T t(x, dy, fusion);
  // A fused backward's z coefficients live in Terms, one channel vector's at
  // a time; every other loop's coefficients are m, p, q (and r with dy).
  if constexpr (!(kHasDy && T::kActive)) {
    if (C <= kRowVectors * L) {
      with_row_shape<kRowVectors, L>(C, [&](auto vectors, auto tail) BNFAST_LAMBDA_ELEMENT {
        affine_rows_in_registers<decltype(vectors)::value, decltype(tail)::value>(t, out, C, row_stride, m_begin,
                                                                                 m_end, m, p, q, r);
      });
      return;
    }
  }
  auto step = [&](int64_t row0, int64_t rows, int64_t i_begin, int64_t i_end) {
    for (int64_t i = i_begin; i < i_end; i += L) {
      const Lanes<scalar_t> part{min64(L, i_end - i)};
      auto coef = [&](const at::opmath_type<scalar_t>* v) { return part.n == L ? Vec::loadu(v + i) : Vec::loadu(v + i, part.n); };
      const Vec mv = coef(m), pv = coef(p), qv = coef(q);
      const Vec rv = kHasDy ? coef(r) : Vec(0);
      if constexpr (kVariant != Variant::kPlain) t.set_z(fusion->zp, fusion->zq, i, part.n, /*broadcast=*/false);
      for (int64_t k = 0; k < rows; ++k) {
        const int64_t offset = (row0 + k) * row_stride + i;
        out.store(part, offset, t.affine(part, offset, mv, pv, qv, rv));
      }
    }
  };
  const int64_t streams = kHasDy ? 3 : 2;
  const bool cache_resident =
      (m_end - m_begin) * C * static_cast<int64_t>(sizeof(scalar_t)) * streams <= kCacheResidentBytes;
  // In cache, with dy, a row has three streams (x, dy, out): two rows per
  // step, as four (twelve lines in flight, all in one L1 set when the row
  // stride is a multiple of 4 KiB) ran slower on the short-plane backward
  // blocks (python -m benchmarks.kernels --cases seed_bn3 r18_s4 --phases bwd).
  // A fused forward also takes two: with four, its per-row x, out and
  // residual pointers no longer fit in registers and spill in the inner loop
  // (--cases seed_bn3 --fusions relu add_relu pre_relu --phases fwd_train).
  // The plain forward takes kRowsPerStep rows, but two when rows of float32
  // or float64 lie a multiple of 4 KiB apart: then every row's lines fall in
  // the same L1 set, and four rows' x and out lines next to m, p, q evict
  // each other. A half-precision vector reads half a line, and four rows
  // measured faster there.
  const bool rows_share_sets = sizeof(scalar_t) >= sizeof(float) &&
                               row_stride * static_cast<int64_t>(sizeof(scalar_t)) % 4096 == 0;
  // Rows wider than kAffineBlockBytes of one coefficient run in equal blocks
  // of columns, each over all the rows: a block's coefficients (m, p, q, r
  // and z's) stay in L1 from row to row instead of coming from L2 at every
  // step (fp32 rows of 4096 channels: --cases mlp --phases fwd_eval).
  constexpr int64_t max_block = kAffineBlockBytes / static_cast<int64_t>(sizeof(at::opmath_type<scalar_t>));
  const int64_t blocks = (C + max_block - 1) / max_block;
  const int64_t block = ((C + blocks - 1) / blocks + L - 1) / L * L;
  for (int64_t i0 = 0; i0 < C; i0 += block) {
    const int64_t i1 = min64(C, i0 + block);
    // Constant row counts, so that step's row loop is unrolled.
    int64_t row = m_begin;
    if (!cache_resident) {
      for (; row < m_end; ++row) step(row, 1, i0, i1);
    } else {
      if constexpr (!kHasDy && kVariant == Variant::kPlain) {
        if (!rows_share_sets) {
          for (; row + kRowsPerStep <= m_end; row += kRowsPerStep) step(row, kRowsPerStep, i0, i1);
        }
      }
      for (; row + 2 <= m_end; row += 2) step(row, 2, i0, i1);
    }
    if (row < m_end) step(row, m_end - row, i0, i1);
  }
}

// The exported loops: dispatch on dy (reduction for the backward, or
// statistics; grad or forward affine step) and on the fusion's variant.
template <typename scalar_t>
Variant variant_of(const Fusion<scalar_t>* fusion) {
  if (!fusion) return Variant::kPlain;
  if (fusion->pre_relu) return Variant::kPreRelu;
  switch (fusion->act) {
    case Act::kRelu: return fusion->residual || fusion->grad_residual ? Variant::kAddRelu : Variant::kRelu;
    case Act::kLeakyRelu: return Variant::kLeakyRelu;
    case Act::kSilu: return Variant::kSilu;
    case Act::kGelu: return Variant::kGelu;
    case Act::kGeluTanh: return Variant::kGeluTanh;
    default: return Variant::kIdentity;
  }
}

#define BNFAST_DISPATCH_VARIANT(impl, has_dy, ...)                                              \
  switch (variant_of(fusion)) {                                                                 \
    case Variant::kPlain: return impl<scalar_t, has_dy, Variant::kPlain>(__VA_ARGS__);          \
    case Variant::kIdentity: return impl<scalar_t, has_dy, Variant::kIdentity>(__VA_ARGS__);    \
    case Variant::kRelu: return impl<scalar_t, has_dy, Variant::kRelu>(__VA_ARGS__);            \
    case Variant::kAddRelu: return impl<scalar_t, has_dy, Variant::kAddRelu>(__VA_ARGS__);      \
    case Variant::kLeakyRelu: return impl<scalar_t, has_dy, Variant::kLeakyRelu>(__VA_ARGS__);  \
    case Variant::kSilu: return impl<scalar_t, has_dy, Variant::kSilu>(__VA_ARGS__);            \
    case Variant::kGelu: return impl<scalar_t, has_dy, Variant::kGelu>(__VA_ARGS__);            \
    case Variant::kGeluTanh: return impl<scalar_t, has_dy, Variant::kGeluTanh>(__VA_ARGS__);    \
    case Variant::kPreRelu: return impl<scalar_t, has_dy, Variant::kPreRelu>(__VA_ARGS__);      \
  }

#define BNFAST_DISPATCH_LOOP(impl, ...)                 \
  if (dy) {                                             \
    BNFAST_DISPATCH_VARIANT(impl, true, __VA_ARGS__)    \
  } else {                                              \
    BNFAST_DISPATCH_VARIANT(impl, false, __VA_ARGS__)   \
  }

template <typename scalar_t>
void reduce_cf(const scalar_t* x, const scalar_t* dy, int64_t C, int64_t S, int64_t plane_begin,
               int64_t plane_end, const at::opmath_type<scalar_t>* shift, double* s1, double* s2,
               at::opmath_type<scalar_t>* scratch, double* lane_totals, const Fusion<scalar_t>* fusion) {
  BNFAST_DISPATCH_LOOP(reduce_cf_impl, x, dy, C, S, plane_begin, plane_end, shift, s1, s2, scratch, lane_totals,
                       fusion)
}

template <typename scalar_t>
void reduce_cl(const scalar_t* x, const scalar_t* dy, int64_t C, int64_t row_stride, int64_t m_begin, int64_t m_end,
               const at::opmath_type<scalar_t>* shift, double* s1, double* s2,
               at::opmath_type<scalar_t>* scratch, const Fusion<scalar_t>* fusion, bool whole_blocks) {
  BNFAST_DISPATCH_LOOP(reduce_cl_impl, x, dy, C, row_stride, m_begin, m_end, shift, s1, s2, scratch, fusion,
                       whole_blocks)
}

template <typename scalar_t>
void affine_cf(const scalar_t* x, const scalar_t* dy, scalar_t* out, int64_t C, int64_t S,
               int64_t plane_begin, int64_t plane_end, const at::opmath_type<scalar_t>* m,
               const at::opmath_type<scalar_t>* p, const at::opmath_type<scalar_t>* q,
               const at::opmath_type<scalar_t>* r, const Fusion<scalar_t>* fusion, bool non_temporal) {
  const Output<scalar_t> output{out, non_temporal};
  // The dispatch returns from its function: a lambda's, so the fence runs.
  [&] { BNFAST_DISPATCH_LOOP(affine_cf_impl, x, dy, output, C, S, plane_begin, plane_end, m, p, q, r, fusion) }();
  output.fence();
}

template <typename scalar_t>
void affine_cl(const scalar_t* x, const scalar_t* dy, scalar_t* out, int64_t C, int64_t row_stride,
               int64_t m_begin, int64_t m_end, const at::opmath_type<scalar_t>* m,
               const at::opmath_type<scalar_t>* p, const at::opmath_type<scalar_t>* q,
               const at::opmath_type<scalar_t>* r, const Fusion<scalar_t>* fusion, bool non_temporal) {
  const Output<scalar_t> output{out, non_temporal};
  [&] { BNFAST_DISPATCH_LOOP(affine_cl_impl, x, dy, output, C, row_stride, m_begin, m_end, m, p, q, r, fusion) }();
  output.fence();
}

#undef BNFAST_DISPATCH_LOOP
#undef BNFAST_DISPATCH_VARIANT
#undef BNFAST_ELEMENT

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
