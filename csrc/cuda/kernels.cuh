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
#pragma once

#include <type_traits>

#include "device.cuh"

namespace bnfast {
namespace cuda {

// ---------------------------------------------------------------------------
// Reduce functors. cf(): U accesses of V elements of one channel; cl(): U rows
// of V channels each. ctx: the channel's mean (backward) or unused (stats).

template <typename scalar_t>
struct StatsReduce {
  using acc = acc_t<scalar_t>;
  using Acc = WelfordState<acc>;
  const scalar_t* x;
  __device__ acc ctx(int64_t) const { return acc(0); }
  template <int U, int V, typename index_t>
  __device__ __forceinline__ void cf(Acc& a, const index_t (&off)[U], acc) const {
    acc v[U * V];
#pragma unroll
    for (int u = 0; u < U; ++u) load_vec<V>(x, off[u], &v[u * V]);
    welford_add_chunk(a, v);  // one division per U * V elements
  }
  template <int U, int V, typename index_t>
  __device__ __forceinline__ void cl(Acc (&a)[V], const index_t (&off)[U], const acc (&)[V]) const {
    acc v[U][V];
#pragma unroll
    for (int u = 0; u < U; ++u) load_vec<V>(x, off[u], v[u]);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      acc col[U];
#pragma unroll
      for (int u = 0; u < U; ++u) col[u] = v[u][j];
      welford_add_chunk(a[j], col);
    }
  }
};

template <typename scalar_t>
struct GradReduce {
  using acc = acc_t<scalar_t>;
  using Acc = SumPair<acc>;
  const scalar_t* dy;
  const scalar_t* x;
  const acc* mean;
  __device__ acc ctx(int64_t c) const { return mean[c]; }
  template <int U, int V, typename index_t>
  __device__ __forceinline__ void cf(Acc& a, const index_t (&off)[U], acc m) const {
    acc g[U * V], v[U * V];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      load_vec<V>(dy, off[u], &g[u * V]);
      load_vec<V>(x, off[u], &v[u * V]);
    }
#pragma unroll
    for (int k = 0; k < U * V; ++k) {
      a.a += g[k];
      a.b += g[k] * (v[k] - m);
    }
  }
  template <int U, int V, typename index_t>
  __device__ __forceinline__ void cl(Acc (&a)[V], const index_t (&off)[U], const acc (&m)[V]) const {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      acc g[V], v[V];
      load_vec<V>(dy, off[u], g);
      load_vec<V>(x, off[u], v);
#pragma unroll
      for (int j = 0; j < V; ++j) {
        a[j].a += g[j];
        a[j].b += g[j] * (v[j] - m[j]);
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
  using acc = typename Op::acc;
  const index_t c0 = (static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x) * V;
  const bool active = c0 < C;
  const index_t stride = static_cast<index_t>(blockDim.y) * gridDim.y;
  Acc a[V];
  acc m[V];
#pragma unroll
  for (int j = 0; j < V; ++j) {
    a[j] = Acc{};
    m[j] = active ? op.ctx(c0 + j) : acc(0);
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

template <typename scalar_t>
struct ForwardElem {
  using acc = acc_t<scalar_t>;
  using Acc = WelfordState<acc>;
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

  __device__ Coef make(int64_t c, acc mu, acc is) const {
    return {mu, is * load_param<acc>(weight, c, acc(1)), load_param<acc>(bias, c, acc(0))};
  }
  __device__ Coef coef(int64_t c) const { return make(c, mean[c], invstd[c]); }
  __device__ Coef from_partials(int64_t c, const Acc& s, bool write) const {
    // NB: m2 is a sum of non-negative terms, so the variance needs no clamp.
    const acc is = acc(1) / sqrt(s.m2 / s.n + eps);
    if (write) {
      mean_out[c] = s.mean;
      invstd_out[c] = is;
    }
    return make(c, s.mean, is);
  }
  // NB: (x - mean) * scale + shift, not x * scale + (shift - mean * scale):
  // the latter cancels catastrophically when |mean| >> std.
  template <int V, typename index_t>
  __device__ __forceinline__ void cf(const Coef& k, index_t off) const {
    acc v[V];
    load_vec<V>(x, off, v);
#pragma unroll
    for (int j = 0; j < V; ++j) v[j] = (v[j] - k.mean) * k.scale + k.shift;
    store_vec<V>(y, off, v);
  }
  template <int V, typename index_t>
  __device__ __forceinline__ void cl(const Coef (&k)[V], index_t off) const {
    acc v[V];
    load_vec<V>(x, off, v);
#pragma unroll
    for (int j = 0; j < V; ++j) v[j] = (v[j] - k[j].mean) * k[j].scale + k[j].shift;
    store_vec<V>(y, off, v);
  }
};

template <typename scalar_t>
struct BackwardElem {
  using acc = acc_t<scalar_t>;
  using Acc = SumPair<acc>;
  // dx = (dy - mean_dy - (x - mean) * k) * s, k = invstd^2 * mean_dy_xmu, s = invstd * w
  struct Coef {
    acc mean, mean_dy, k, s;
  };
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

  __device__ Coef make(int64_t c, acc mdy, acc mdyx) const {
    const acc is = invstd[c];
    return {mean[c], mdy, is * is * mdyx, is * load_param<acc>(weight, c, acc(1))};
  }
  __device__ Coef coef(int64_t c) const { return make(c, mean_dy[c], mean_dy_xmu[c]); }
  __device__ Coef from_partials(int64_t c, const Acc& s, bool write) const {
    if (write) {
      grad_weight[c] = s.b * invstd[c];
      grad_bias[c] = s.a;
    }
    return make(c, s.a / count, s.b / count);
  }
  template <int V, typename index_t>
  __device__ __forceinline__ void cf(const Coef& k, index_t off) const {
    acc g[V], v[V];
    load_vec<V>(dy, off, g);
    load_vec<V>(x, off, v);
#pragma unroll
    for (int j = 0; j < V; ++j) g[j] = (g[j] - k.mean_dy - (v[j] - k.mean) * k.k) * k.s;
    store_vec<V>(dx, off, g);
  }
  template <int V, typename index_t>
  __device__ __forceinline__ void cl(const Coef (&k)[V], index_t off) const {
    acc g[V], v[V];
    load_vec<V>(dy, off, g);
    load_vec<V>(x, off, v);
#pragma unroll
    for (int j = 0; j < V; ++j) g[j] = (g[j] - k[j].mean_dy - (v[j] - k[j].mean) * k[j].k) * k[j].s;
    store_vec<V>(dx, off, g);
  }
};

// This thread's coefficients for channels c0 .. c0 + NC - 1. Block-collective
// when they come from partials (every block of the grid merges the same
// partials in the same order; blocks with blockIdx.y == 0 store the outputs).
template <typename Op, int NC, typename index_t>
__device__ __forceinline__ void load_coefs(const Op& op, typename Op::Coef (&k)[NC], index_t C,
                                           index_t c0, bool active) {
  using Coef = typename Op::Coef;
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
  } else if (active) {
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
