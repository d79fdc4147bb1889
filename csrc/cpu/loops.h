// The CPU inner loops, compiled once per instruction set (csrc/cpu/isa/) and
// picked at run time, the way ATen's DispatchStub picks its kernels.
//
// NB: the loops see raw pointers and sizes only. The translation units that
// are compiled with -mavx2 / -mavx512* include nothing but at::vec and these
// declarations, so no inline code shared with the baseline objects (Tensor
// methods, std containers, parallel_for) is ever emitted with wide
// instructions; the caller does the threading and owns every buffer.
#pragma once

#include <ATen/OpMathType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cstdint>

#include "../common/activation.h"

namespace bnfast {
namespace cpu {

// What a fused op adds around the plain loops (activations:
// csrc/common/activation.h, applied in opmath precision with torch's
// formulas); a null Fusion* is the plain batch norm. With z = (x - mean) * zp[c] + zq[c] + residual (the
// normalized, scaled, shifted input and the residual):
//   forward / eval:  y = act(z)   (the affine loop's m, p, q are mean, zp, zq)
//   backward:        the reduce sums and the affine step take a = dy * act'(z)
//                    in place of dy, and grad_residual (when given) gets a.
// pre_relu reads the input as relu(x) everywhere (y = BN(relu(x))), and the
// backward's result is masked by x > 0 (act must be identity, no residual).
template <typename scalar_t>
struct Fusion {
  using opmath_t = at::opmath_type<scalar_t>;
  Act act = Act::kIdentity;
  opmath_t slope = 0;
  bool pre_relu = false;
  const scalar_t* residual = nullptr;   // the input's layout and strides
  const opmath_t* zp = nullptr;         // backward: z's coefficients, padded like the loops' m, p, q
  const opmath_t* zq = nullptr;
  scalar_t* grad_residual = nullptr;    // backward: receives a, the input's layout
  // backward: the affine pass may read a back from grad_residual, where the
  // same op's reduction wrote it (set by the fused backward, whose reduction
  // writes it); otherwise it computes a itself.
  bool grad_residual_from_reduce = false;
};

// Two layouts (see csrc/common/layout.h):
//   channels-first: x[(n * C + c) * S + s]
//   channels-last:  x[m * C + c], m = n * S + s
// Every loop takes an optional Fusion (null: the plain batch norm).
template <typename scalar_t>
struct Loops {
  using opmath_t = at::opmath_type<scalar_t>;

  // Per-channel sums with a shift K, for statistics (dy == nullptr) and for
  // the backward reduction (dy given):
  //   a = dy ? dy : (x - K);   s1 += a;   s2 += a * (x - K)
  // Channels-first: planes [plane_begin, plane_end) of the N * C planes (plane
  // p is channel p % C), shifts K[C]; adds into s1[c], s2[c] for the range's
  // channels. scratch: room for 2 * C * kMaxLanes opmath_t, lane_totals for
  // 2 * C * kMaxLanes double (no initial values needed).
  void (*reduce_cf)(const scalar_t* x, const scalar_t* dy, int64_t C, int64_t S,
                    int64_t plane_begin, int64_t plane_end, const opmath_t* shift, double* s1,
                    double* s2, opmath_t* scratch, double* lane_totals, const Fusion<scalar_t>* fusion);
  // Channels-last: rows [m_begin, m_end) of C values each, row_stride apart
  // (C for a whole channels-last tensor), shifts K[C]; adds into s1[C], s2[C].
  // scratch holds kReduceClScratch * padded_channels(C) opmath_t.
  // whole_blocks: rows wider than the loop sums in registers are summed one
  // block of columns at a time over all the rows, else in short tiles of
  // rows, every block per tile; the same bits either way. The callers set it
  // while the op's inputs fit in cache (reads_fit_cache, parallel.h).
  void (*reduce_cl)(const scalar_t* x, const scalar_t* dy, int64_t C, int64_t row_stride, int64_t m_begin,
                    int64_t m_end, const opmath_t* shift, double* s1, double* s2,
                    opmath_t* scratch, const Fusion<scalar_t>* fusion, bool whole_blocks);
  // Per-channel affine map, centred:
  //   out = (x - m[c]) * p[c] + q[c] (+ dy * r[c] when dy given)
  // non_temporal: full vectors of out aligned to their size are written with
  // non-temporal stores (AVX2 and AVX-512 builds; half precision: AVX-512
  // only), the rest with plain ones; the same bits either way. The callers
  // set it past the last-level cache (writes_past_cache, parallel.h).
  // NB: centring before scaling keeps y exact when |mean| >> std; the
  // uncentred x * scale + (bias - mean * scale) loses the low bits of y in
  // the rounding of the large shift.
  // Channels-first: planes [plane_begin, plane_end) of the N * C planes;
  // without dy, planes longer than a vector but no multiple of it are walked
  // as one run of full vectors (a vector where a plane ends mixes two
  // channels' coefficients).
  void (*affine_cf)(const scalar_t* x, const scalar_t* dy, scalar_t* out, int64_t C, int64_t S,
                    int64_t plane_begin, int64_t plane_end, const opmath_t* m, const opmath_t* p,
                    const opmath_t* q, const opmath_t* r, const Fusion<scalar_t>* fusion, bool non_temporal);
  // Channels-last: rows [m_begin, m_end) of C values, row_stride apart (in
  // x, dy and out alike).
  void (*affine_cl)(const scalar_t* x, const scalar_t* dy, scalar_t* out, int64_t C,
                    int64_t row_stride, int64_t m_begin, int64_t m_end, const opmath_t* m,
                    const opmath_t* p, const opmath_t* q, const opmath_t* r, const Fusion<scalar_t>* fusion,
                    bool non_temporal);
};

struct LoopTable {
  const char* isa;
  Loops<float> f32;
  Loops<double> f64;
  Loops<c10::Half> f16;
  Loops<c10::BFloat16> bf16;
};

// One table per instruction set; each is defined in csrc/cpu/isa/loops.cpp
// compiled with that set's flags.
const LoopTable& loop_table_DEFAULT();
#ifdef BNFAST_HAVE_AVX2
const LoopTable& loop_table_AVX2();
#endif
#ifdef BNFAST_HAVE_AVX512
const LoopTable& loop_table_AVX512();
#endif

// The table for this CPU: the widest set both built and supported, capped by
// ATen's own choice (at::get_cpu_capability(), which honours the
// ATEN_CPU_CAPABILITY environment variable). Chosen once.
const LoopTable& loop_table();

template <typename scalar_t> const Loops<scalar_t>& loops();
template <> inline const Loops<float>& loops<float>() { return loop_table().f32; }
template <> inline const Loops<double>& loops<double>() { return loop_table().f64; }
template <> inline const Loops<c10::Half>& loops<c10::Half>() { return loop_table().f16; }
template <> inline const Loops<c10::BFloat16>& loops<c10::BFloat16>() { return loop_table().bf16; }

// Largest vector width over all instruction sets (AVX-512 float: 16 lanes);
// channels-last scratch rows are padded to it.
constexpr int64_t kMaxLanes = 16;
// reduce_cl's scratch, in padded_channels(C) units: partial sums (2) and,
// for float64, their compensation (2).
constexpr int64_t kReduceClScratch = 4;

inline int64_t padded_channels(int64_t C) { return (C + kMaxLanes - 1) / kMaxLanes * kMaxLanes; }

}  // namespace cpu
}  // namespace bnfast
