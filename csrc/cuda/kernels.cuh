// The two kernel shapes every bnfast CUDA op is built from, and the per-op
// element functors they run.
//
//   reduce:      per-channel partial results of one pass over the tensor,
//                partials[p][c] for p < P blocks along a channel's elements.
//   elementwise: one pass writing out[...] = f(in[...], coef[c]), where the
//                block first gets its channels' coefficients either from [C]
//                tensors or by merging the reduce kernel's partials itself.
// A fused op is reduce + elementwise: 2 launches, no host synchronization,
// no atomics; every block of the second kernel merges the same partials in the
// same order, so all blocks agree and results are deterministic.
//
// The functors of the ops with a fused activation (forward_act, elemt_act,
// backward_act: ActFusion in launch.h) are the plain ones with kFused (or
// kPreRelu) set: the plain instantiations compile as before.
#pragma once

#include <type_traits>

#include "activation.cuh"
#include "device.cuh"

namespace bnfast {
namespace cuda {

// ---------------------------------------------------------------------------
// Reduce functors. cf(): U accesses of V elements of one channel; cl(): U rows
// of V channels each. ctx: the channel's Ctx (the mean, and z's coefficients
// when fused, for the backward; unused for the statistics).

// kPreRelu: the statistics of relu(x) (forward_act's pre_relu).
template <typename scalar_t, bool kPreRelu = false>
struct StatsReduce {
  using acc = acc_t<scalar_t>;
  using Acc = WelfordState<acc>;
  using Ctx = acc;
  const scalar_t* x;
  __device__ Ctx ctx(int64_t) const { return acc(0); }
  template <int N>
  __device__ __forceinline__ static void prepare(acc (&v)[N]) {
    if constexpr (kPreRelu) {
#pragma unroll
      for (int k = 0; k < N; ++k) v[k] = relu_of(v[k]);
    }
  }
  template <int U, int V, typename index_t>
  __device__ __forceinline__ void cf(Acc& a, const index_t (&off)[U], const Ctx&) const {
    acc v[U * V];
#pragma unroll
    for (int u = 0; u < U; ++u) load_vec<V>(x, off[u], &v[u * V]);
    prepare(v);
    welford_add_chunk(a, v);  // one division per U * V elements
  }
  template <int U, int V, typename index_t>
  __device__ __forceinline__ void cl(Acc (&a)[V], const index_t (&off)[U], const Ctx (&)[V]) const {
    acc v[U][V];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      load_vec<V>(x, off[u], v[u]);
      prepare(v[u]);
    }
#pragma unroll
    for (int j = 0; j < V; ++j) {
      acc col[U];
#pragma unroll
      for (int u = 0; u < U; ++u) col[u] = v[u][j];
      welford_add_chunk(a[j], col);
    }
  }
};

// A channel's mean and the coefficients of z = (x - mean) * zp + zq, the
// batch norm's output (zp = invstd * weight, zq = bias).
template <typename acc>
struct ZCoef {
  acc mean, zp, zq;
};

// The activation fields of the fused functors (ActFusion, typed).
template <typename scalar_t>
struct ActFields {
  Act act = Act::kIdentity;
  bool pre_relu = false;
  acc_t<scalar_t> slope = 0;
  const scalar_t* residual = nullptr;

  // v = x as the batch norm reads it: relu(x) for pre_relu.
  template <int N>
  __device__ __forceinline__ void bn_input(acc_t<scalar_t> (&v)[N]) const {
    if (pre_relu) {
#pragma unroll
      for (int k = 0; k < N; ++k) v[k] = relu_of(v[k]);
    }
  }
  // g: dy -> dz = dy * act'(z), z = d * zp + zq + r, element e with the
  // coefficients k[e * k_stride] (a ZCoef or FusedGradCoef).
  template <int N, typename Coef>
  __device__ __forceinline__ void grad_z(acc_t<scalar_t> (&g)[N], const acc_t<scalar_t> (&d)[N],
                                         const acc_t<scalar_t> (&r)[N], const Coef* k, int k_stride) const {
    with_act(act, [&](auto tag) {
      constexpr Act kAct = decltype(tag)::value;
#pragma unroll
      for (int e = 0; e < N; ++e) {
        const Coef& ke = k[e * k_stride];
        g[e] = activate_grad<kAct>(g[e], d[e] * ke.zp + ke.zq + r[e], slope);
      }
    });
  }
  // The residual's values at off (0 without one).
  template <int V, typename index_t>
  __device__ __forceinline__ void load_residual(index_t off, acc_t<scalar_t> (&r)[V]) const {
    if (residual != nullptr) {
      load_vec<V>(residual, off, r);
    } else {
#pragma unroll
      for (int j = 0; j < V; ++j) r[j] = 0;
    }
  }
};

template <typename scalar_t>
ActFields<scalar_t> act_fields(const ActFusion& f) {
  return {f.act, f.pre_relu, static_cast<acc_t<scalar_t>>(f.slope), static_cast<const scalar_t*>(f.residual)};
}

// kFused: backward_act's sums, of dz = dy * act'(z) in place of dy and of
// relu(x) for pre_relu (f).
template <typename scalar_t, bool kFused = false>
struct GradReduce {
  using acc = acc_t<scalar_t>;
  using Acc = SumPair<acc>;
  using Ctx = std::conditional_t<kFused, ZCoef<acc>, acc>;
  const scalar_t* dy;
  const scalar_t* x;
  const acc* mean;
  const acc* invstd = nullptr;  // kFused: z's coefficients, and the activation
  Param weight, bias;
  ActFields<scalar_t> f;

  __device__ Ctx ctx(int64_t c) const {
    if constexpr (kFused) {
      return {mean[c], invstd[c] * load_param<acc>(weight, c, acc(1)), load_param<acc>(bias, c, acc(0))};
    } else {
      return mean[c];
    }
  }
  // g: dy -> dz, v: x -> x - mean (the fused terms of N elements, one Ctx
  // each; r: the residual's values).
  template <int N>
  __device__ __forceinline__ void fused_terms(acc (&g)[N], acc (&v)[N], const acc (&r)[N],
                                              const Ctx* k, int k_stride) const {
    f.bn_input(v);
#pragma unroll
    for (int e = 0; e < N; ++e) v[e] -= k[e * k_stride].mean;
    f.grad_z(g, v, r, k, k_stride);
  }
  template <int U, int V, typename index_t>
  __device__ __forceinline__ void cf(Acc& a, const index_t (&off)[U], const Ctx& m) const {
    acc g[U * V], v[U * V];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      load_vec<V>(dy, off[u], &g[u * V]);
      load_vec<V>(x, off[u], &v[u * V]);
    }
    if constexpr (kFused) {
      acc r[U * V];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        acc ru[V];
        f.template load_residual<V>(off[u], ru);
#pragma unroll
        for (int j = 0; j < V; ++j) r[u * V + j] = ru[j];
      }
      fused_terms(g, v, r, &m, 0);
#pragma unroll
      for (int k = 0; k < U * V; ++k) {
        a.a += g[k];
        a.b += g[k] * v[k];
      }
    } else {
#pragma unroll
      for (int k = 0; k < U * V; ++k) {
        a.a += g[k];
        a.b += g[k] * (v[k] - m);
      }
    }
  }
  template <int U, int V, typename index_t>
  __device__ __forceinline__ void cl(Acc (&a)[V], const index_t (&off)[U], const Ctx (&m)[V]) const {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      acc g[V], v[V];
      load_vec<V>(dy, off[u], g);
      load_vec<V>(x, off[u], v);
      if constexpr (kFused) {
        acc r[V];
        f.template load_residual<V>(off[u], r);
        fused_terms(g, v, r, m, 1);
#pragma unroll
        for (int j = 0; j < V; ++j) {
          a[j].a += g[j];
          a[j].b += g[j] * v[j];
        }
      } else {
#pragma unroll
        for (int j = 0; j < V; ++j) {
          a[j].a += g[j];
          a[j].b += g[j] * (v[j] - m[j]);
        }
      }
    }
  }
};

template <typename Op, int V, typename index_t>
__global__ void __launch_bounds__(kThreads)
    reduce_cf_kernel(Op op, typename Op::Acc* partials, index_t C, Divider<index_t> sv_div, index_t Mv) {
  using Acc = typename Op::Acc;
  const index_t c = blockIdx.x;
  const index_t Sv = sv_div.divisor();
  const index_t stride = static_cast<index_t>(blockDim.y) * gridDim.y;
  const auto m = op.ctx(c);
  auto offset = [&](index_t i) {
    index_t n, s;
    sv_div.divmod(i, n, s);
    return ((n * C + c) * Sv + s) * V;
  };
  Acc a[1] = {Acc{}};
  index_t i = static_cast<index_t>(blockIdx.y) * blockDim.y + threadIdx.y;
  for (; i + (kUnroll - 1) * stride < Mv; i += kUnroll * stride) {
    index_t off[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) off[u] = offset(i + u * stride);
    op.template cf<kUnroll, V>(a[0], off, m);
  }
  for (; i < Mv; i += stride) {
    const index_t off[1] = {offset(i)};
    op.template cf<1, V>(a[0], off, m);
  }
  reduce_y(a);
  if (threadIdx.y == 0) partials[blockIdx.y * C + c] = a[0];
}

template <typename Op, int V, typename index_t>
__global__ void __launch_bounds__(kThreads)
    reduce_cl_kernel(Op op, typename Op::Acc* partials, index_t C, index_t M) {
  using Acc = typename Op::Acc;
  using Ctx = typename Op::Ctx;
  const index_t c0 = (static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x) * V;
  const bool active = c0 < C;
  const index_t stride = static_cast<index_t>(blockDim.y) * gridDim.y;
  Acc a[V];
  Ctx m[V];
#pragma unroll
  for (int j = 0; j < V; ++j) {
    a[j] = Acc{};
    m[j] = active ? op.ctx(c0 + j) : Ctx{};
  }
  if (active) {
    index_t r = static_cast<index_t>(blockIdx.y) * blockDim.y + threadIdx.y;
    for (; r + (kUnroll - 1) * stride < M; r += kUnroll * stride) {
      index_t off[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) off[u] = (r + u * stride) * C + c0;
      op.template cl<kUnroll, V>(a, off, m);
    }
    for (; r < M; r += stride) {
      const index_t off[1] = {r * C + c0};
      op.template cl<1, V>(a, off, m);
    }
  }
  reduce_y(a);
  if (threadIdx.y == 0 && active) {
#pragma unroll
    for (int j = 0; j < V; ++j) partials[blockIdx.y * C + c0 + j] = a[j];
  }
}

// finalize(c, merged) for every channel: the standalone reduce ops' second,
// tiny launch. Block (32, 8).
template <typename Acc, typename Fin>
__global__ void __launch_bounds__(kThreads)
    finalize_kernel(const Acc* partials, int P, int64_t C, Fin fin) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  Acc a[1];
  merge_partials(a, partials, P, C, c, c < C);
  if (threadIdx.y == 0 && c < C) fin(c, a[0]);
}

// ---------------------------------------------------------------------------
// Elementwise functors. coef(c) from [C] tensors, or from_partials(c, merged,
// write) from the reduce kernel's merged result (write: this block also stores
// the op's per-channel outputs).

// kFused: y = act(... + residual), of relu(x) for pre_relu (f).
// kFromPartials: the training forward's functor, whose coefficients may come
// from partials; elemt's (false) has no merge code (load_coefs).
template <typename scalar_t, bool kFused = false, bool kFromPartials = false>
struct ForwardElem {
  using acc = acc_t<scalar_t>;
  using Acc = WelfordState<acc>;
  static constexpr bool kFromPartialsOp = kFromPartials;
  struct Coef {
    acc mean, scale, shift;
  };
  const scalar_t* x;
  scalar_t* y;
  Param weight, bias;
  const acc* mean = nullptr;  // elemt: given statistics
  const acc* invstd = nullptr;
  const Acc* partials = nullptr;  // forward: statistics from the reduce kernel
  int P = 0;
  acc eps = 0;
  acc* mean_out = nullptr;
  acc* invstd_out = nullptr;
  RunningUpdate running;  // forward: what to update (running.mean != nullptr), running statistics in acc
  ActFields<scalar_t> f;

  __device__ Coef make(int64_t c, acc mu, acc is) const {
    return {mu, is * load_param<acc>(weight, c, acc(1)), load_param<acc>(bias, c, acc(0))};
  }
  __device__ Coef coef(int64_t c) const { return make(c, mean[c], invstd[c]); }
  __device__ Coef from_partials(int64_t c, const Acc& s, bool write) const {
    // NB: m2 is a sum of non-negative terms, so the variance needs no clamp.
    const acc is = acc(1) / sqrt(s.m2 / s.n + eps);
    if (write) {  // once per channel
      mean_out[c] = s.mean;
      invstd_out[c] = is;
      if (running.mean != nullptr) {
        update_running(static_cast<acc*>(running.mean)[c], static_cast<acc*>(running.var)[c],
                       static_cast<double>(s.mean), static_cast<double>(is), running);
        if (c == 0 && running.num_batches_tracked != nullptr) ++*running.num_batches_tracked;
      }
    }
    return make(c, s.mean, is);
  }
  // NB: (x - mean) * scale + shift, not x * scale + (shift - mean * scale):
  // the latter cancels catastrophically when |mean| >> std.
  // k_stride: 0 when the V elements share one channel (cf), 1 when element j
  // is channel j (cl).
  template <int V, typename index_t>
  __device__ __forceinline__ void apply(const Coef* k, int k_stride, index_t off) const {
    acc v[V];
    load_vec<V>(x, off, v);
    if constexpr (kFused) f.bn_input(v);
#pragma unroll
    for (int j = 0; j < V; ++j) v[j] = (v[j] - k[j * k_stride].mean) * k[j * k_stride].scale + k[j * k_stride].shift;
    if constexpr (kFused) {
      acc r[V];
      f.template load_residual<V>(off, r);
      with_act(f.act, [&](auto tag) {
        constexpr Act kAct = decltype(tag)::value;
#pragma unroll
        for (int j = 0; j < V; ++j) v[j] = activate<kAct>(v[j] + r[j], f.slope);
      });
    }
    store_vec<V>(y, off, v);
  }
  template <int V, typename index_t>
  __device__ __forceinline__ void cf(const Coef& k, index_t off) const {
    apply<V>(&k, 0, off);
  }
  template <int V, typename index_t>
  __device__ __forceinline__ void cl(const Coef (&k)[V], index_t off) const {
    apply<V>(k, 1, off);
  }
};

// dx = (dy - mean_dy - (x - mean) * k) * s, k = invstd^2 * mean_dy_xmu, s = invstd * w
template <typename acc>
struct GradCoef {
  acc mean, mean_dy, k, s;
};
// ... with dz = dy * act'(z), z = (x - mean) * zp + zq (+ residual), in place of dy.
template <typename acc>
struct FusedGradCoef : GradCoef<acc> {
  acc zp, zq;
};

// kFused: backward_act's dx (GradReduce<scalar_t, true>'s sums), dz stored
// to grad_residual when given; for pre_relu of relu(x), and 0 where x <= 0.
// kFromPartials: as ForwardElem's (the fused backward true, backward_elemt
// false).
template <typename scalar_t, bool kFused = false, bool kFromPartials = false>
struct BackwardElem {
  using acc = acc_t<scalar_t>;
  using Acc = SumPair<acc>;
  static constexpr bool kFromPartialsOp = kFromPartials;
  using Coef = std::conditional_t<kFused, FusedGradCoef<acc>, GradCoef<acc>>;
  static constexpr bool kFusedOp = kFused;  // its reduce: GradReduce<scalar_t, kFusedOp>
  const scalar_t* dy;
  const scalar_t* x;
  scalar_t* dx;
  const acc* mean;
  const acc* invstd;
  Param weight;
  const acc* mean_dy = nullptr;  // backward_elemt: given means
  const acc* mean_dy_xmu = nullptr;
  const Acc* partials = nullptr;  // backward: sums from the reduce kernel
  int P = 0;
  acc count = 0;
  acc* grad_weight = nullptr;
  acc* grad_bias = nullptr;
  Param bias;  // kFused: z's
  ActFields<scalar_t> f;
  scalar_t* grad_residual = nullptr;

  // is * (is * mdyx), not (is * is) * mdyx: memory_efficient's backward passes
  // invstd = 1 / weight, whose square overflows for a tiny weight.
  __device__ Coef make(int64_t c, acc mdy, acc mdyx) const {
    const acc is = invstd[c];
    const acc s = is * load_param<acc>(weight, c, acc(1));
    if constexpr (kFused) {
      return {{mean[c], mdy, is * (is * mdyx), s}, s, load_param<acc>(bias, c, acc(0))};
    } else {
      return {mean[c], mdy, is * (is * mdyx), s};
    }
  }
  __device__ Coef coef(int64_t c) const { return make(c, mean_dy[c], mean_dy_xmu[c]); }
  __device__ Coef from_partials(int64_t c, const Acc& s, bool write) const {
    if (write) {
      grad_weight[c] = s.b * invstd[c];
      grad_bias[c] = s.a;
    }
    return make(c, s.a / count, s.b / count);
  }
  // k_stride as ForwardElem::apply's.
  template <int V, typename index_t>
  __device__ __forceinline__ void apply(const Coef* k, int k_stride, index_t off) const {
    acc g[V], v[V];
    load_vec<V>(dy, off, g);
    load_vec<V>(x, off, v);
    if constexpr (kFused) {
      acc d[V], r[V];
#pragma unroll
      for (int j = 0; j < V; ++j) d[j] = (f.pre_relu ? relu_of(v[j]) : v[j]) - k[j * k_stride].mean;
      f.template load_residual<V>(off, r);
      f.grad_z(g, d, r, k, k_stride);
      if (grad_residual != nullptr) store_vec<V>(grad_residual, off, g);
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const Coef& kj = k[j * k_stride];
        const acc grad = (g[j] - kj.mean_dy - d[j] * kj.k) * kj.s;
        g[j] = f.pre_relu && !(v[j] > acc(0)) ? acc(0) : grad;
      }
    } else {
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const Coef& kj = k[j * k_stride];
        g[j] = (g[j] - kj.mean_dy - (v[j] - kj.mean) * kj.k) * kj.s;
      }
    }
    store_vec<V>(dx, off, g);
  }
  template <int V, typename index_t>
  __device__ __forceinline__ void cf(const Coef& k, index_t off) const {
    apply<V>(&k, 0, off);
  }
  template <int V, typename index_t>
  __device__ __forceinline__ void cl(const Coef (&k)[V], index_t off) const {
    apply<V>(k, 1, off);
  }
};

// finish(the elementwise functor of a forward or backward op), plain when
// fusion is null, else fused with it: one place that picks the functor.
// kFromPartials: the functor of the fused training forward / backward, which
// merges the reduce kernel's partials.
template <bool kFromPartials, typename scalar_t, typename Finish>
cudaError_t with_forward_elem(const scalar_t* x, void* y, Param weight, Param bias, const ActFusion* fusion,
                              Finish&& finish) {
  auto* yp = static_cast<scalar_t*>(y);
  if (fusion == nullptr) return finish(ForwardElem<scalar_t, false, kFromPartials>{x, yp, weight, bias});
  ForwardElem<scalar_t, true, kFromPartials> op{x, yp, weight, bias};
  op.f = act_fields<scalar_t>(*fusion);
  return finish(op);
}
template <bool kFromPartials, typename scalar_t, typename Finish>
cudaError_t with_backward_elem(const scalar_t* dy, const scalar_t* x, void* dx, const acc_t<scalar_t>* mean,
                               const acc_t<scalar_t>* invstd, Param weight, Param bias, const ActFusion* fusion,
                               Finish&& finish) {
  auto* dxp = static_cast<scalar_t*>(dx);
  if (fusion == nullptr) return finish(BackwardElem<scalar_t, false, kFromPartials>{dy, x, dxp, mean, invstd, weight});
  BackwardElem<scalar_t, true, kFromPartials> op{dy, x, dxp, mean, invstd, weight};
  op.bias = bias;
  op.f = act_fields<scalar_t>(*fusion);
  op.grad_residual = static_cast<scalar_t*>(fusion->grad_residual);
  return finish(op);
}

// This thread's coefficients for channels c0 .. c0 + NC - 1. Block-collective
// when they come from partials (every block of the grid merges the same
// partials in the same order; blocks with blockIdx.y == 0 store the outputs).
template <typename Op, int NC, typename index_t>
__device__ __forceinline__ void load_coefs(const Op& op, typename Op::Coef (&k)[NC], index_t C,
                                           index_t c0, bool active) {
  using Coef = typename Op::Coef;
  if constexpr (Op::kFromPartialsOp) {
    if (op.partials != nullptr) {  // uniform across the grid
      __shared__ Coef shared[kThreads];
      typename Op::Acc a[NC];
      merge_partials(a, op.partials, op.P, C, c0, active);
      if (threadIdx.y == 0 && active) {
#pragma unroll
        for (int j = 0; j < NC; ++j) shared[threadIdx.x * NC + j] = op.from_partials(c0 + j, a[j], blockIdx.y == 0);
      }
      __syncthreads();
      if (active) {
#pragma unroll
        for (int j = 0; j < NC; ++j) k[j] = shared[threadIdx.x * NC + j];
      }
      return;
    }
  }
  if (active) {
#pragma unroll
    for (int j = 0; j < NC; ++j) k[j] = op.coef(c0 + j);
  }
}

template <typename Op, int V, typename index_t>
__global__ void __launch_bounds__(kThreads)
    elementwise_cf_kernel(Op op, index_t C, Divider<index_t> sv_div, index_t Mv) {
  const index_t c = blockIdx.x;
  const index_t Sv = sv_div.divisor();
  typename Op::Coef k[1];
  load_coefs(op, k, C, c, true);
  const index_t stride = static_cast<index_t>(blockDim.y) * gridDim.y;
  for (index_t i = static_cast<index_t>(blockIdx.y) * blockDim.y + threadIdx.y; i < Mv; i += stride) {
    index_t n, s;
    sv_div.divmod(i, n, s);
    op.template cf<V>(k[0], ((n * C + c) * Sv + s) * V);
  }
}

template <typename Op, int V, typename index_t>
__global__ void __launch_bounds__(kThreads) elementwise_cl_kernel(Op op, index_t C, index_t M) {
  const index_t c0 = (static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x) * V;
  const bool active = c0 < C;
  typename Op::Coef k[V];
  load_coefs(op, k, C, c0, active);
  if (!active) return;
  const index_t stride = static_cast<index_t>(blockDim.y) * gridDim.y;
  for (index_t r = static_cast<index_t>(blockIdx.y) * blockDim.y + threadIdx.y; r < M; r += stride) {
    op.template cl<V>(k, r * C + c0);
  }
}

// ---------------------------------------------------------------------------
// Host launchers (no torch, no exceptions): each returns the error of its
// launch. `P` is the grid's y extent (blocks along a channel).

template <typename Op>
cudaError_t launch_reduce(const Op& op, typename Op::Acc* partials, const Plan& g, int64_t P,
                          cudaStream_t stream) {
  using scalar_t = std::remove_cv_t<std::remove_pointer_t<decltype(op.x)>>;
  constexpr int kVec = 16 / sizeof(scalar_t);
  const dim3 block(g.bx, g.by);
  const dim3 grid(static_cast<unsigned>(g.ctiles), static_cast<unsigned>(P));
  auto go = [&](auto vec_tag, auto index_tag) {
    constexpr int V = decltype(vec_tag)::value;
    using index_t = decltype(index_tag);
    if (g.layout == Layout::kChannelsFirst) {
      reduce_cf_kernel<Op, V, index_t><<<grid, block, 0, stream>>>(
          op, partials, static_cast<index_t>(g.C), Divider<index_t>(static_cast<index_t>(g.S / V)),
          static_cast<index_t>(g.M / V));
    } else {
      reduce_cl_kernel<Op, V, index_t><<<grid, block, 0, stream>>>(op, partials, static_cast<index_t>(g.C),
                                                                     static_cast<index_t>(g.M));
    }
    return cudaGetLastError();
  };
  using VecTag = std::integral_constant<int, kVec>;
  using OneTag = std::integral_constant<int, 1>;
  if (g.vec == kVec) return g.index32 ? go(VecTag{}, int32_t{}) : go(VecTag{}, int64_t{});
  return g.index32 ? go(OneTag{}, int32_t{}) : go(OneTag{}, int64_t{});
}

template <typename Op>
cudaError_t launch_elementwise(const Op& op, const Plan& g, int64_t P, cudaStream_t stream) {
  using scalar_t = std::remove_cv_t<std::remove_pointer_t<decltype(op.x)>>;
  // A functor built without the merge path would ignore its partials.
  if (!Op::kFromPartialsOp && op.partials != nullptr) return cudaErrorInvalidValue;
  constexpr int kVec = 16 / sizeof(scalar_t);
  const dim3 block(g.bx, g.by);
  const dim3 grid(static_cast<unsigned>(g.ctiles), static_cast<unsigned>(P));
  auto go = [&](auto vec_tag, auto index_tag) {
    constexpr int V = decltype(vec_tag)::value;
    using index_t = decltype(index_tag);
    if (g.layout == Layout::kChannelsFirst) {
      elementwise_cf_kernel<Op, V, index_t><<<grid, block, 0, stream>>>(
          op, static_cast<index_t>(g.C), Divider<index_t>(static_cast<index_t>(g.S / V)),
          static_cast<index_t>(g.M / V));
    } else {
      elementwise_cl_kernel<Op, V, index_t><<<grid, block, 0, stream>>>(op, static_cast<index_t>(g.C),
                                                                          static_cast<index_t>(g.M));
    }
    return cudaGetLastError();
  };
  using VecTag = std::integral_constant<int, kVec>;
  using OneTag = std::integral_constant<int, 1>;
  if (g.vec == kVec) return g.index32 ? go(VecTag{}, int32_t{}) : go(VecTag{}, int64_t{});
  return g.index32 ? go(OneTag{}, int32_t{}) : go(OneTag{}, int64_t{});
}

template <typename Acc, typename Fin>
cudaError_t launch_finalize(const Acc* partials, int64_t P, int64_t C, Fin fin, cudaStream_t stream) {
  const dim3 block(32, kThreads / 32);
  finalize_kernel<Acc, Fin><<<static_cast<unsigned>(ceil_div(C, 32)), block, 0, stream>>>(
      partials, static_cast<int>(P), C, fin);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace bnfast
