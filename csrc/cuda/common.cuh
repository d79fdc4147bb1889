// Device and launch helpers shared by the CUDA kernel files.
//
// Every kernel here is 256 threads, shaped (bx, by) with bx a power of two
// <= 32: x runs over channels (channels-last) and is 1 for channels-first,
// y runs over the elements of a channel. A (channel, element) pair of an
// (N, C, *) tensor sits at
//   channels-first [N][C][S]: ((n * C + c) * S + s),   m = n * S + s
//   channels-last  [M][C]:    (m * C + c)
// and is read V elements (16 bytes) at a time when sizes and pointers allow:
// V consecutive s of one channel (channels-first, S % V == 0) or V consecutive
// channels of one row (channels-last, C % V == 0).
#pragma once

#include <ATen/AccumulateType.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/detail/IntegerDivider.cuh>
#include <c10/cuda/CUDAException.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <limits>

#include "../common/layout.h"
#include "../common/welford.h"

namespace bnfast {
namespace cuda {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int64_t kMaxGridY = 65535;
// Cap on per-channel partial results of the first (reduce) kernel: every
// block of the second kernel merges these, so they must stay few.
constexpr int64_t kMaxPartials = 256;

template <typename T>
using acc_t = at::acc_type<T, /*is_cuda=*/true>;  // float for half/bf16/float, double for double

template <typename T, int V>
struct alignas(sizeof(T) * V) Vec {
  T v[V];
};

template <int V, typename T, typename A, typename I>
__device__ __forceinline__ void load_vec(const T* p, I off, A* out) {
  const auto vec = *reinterpret_cast<const Vec<T, V>*>(p + off);
#pragma unroll
  for (int j = 0; j < V; ++j) out[j] = static_cast<A>(vec.v[j]);
}

template <int V, typename T, typename A, typename I>
__device__ __forceinline__ void store_vec(T* p, I off, const A* in) {
  Vec<T, V> vec;
#pragma unroll
  for (int j = 0; j < V; ++j) vec.v[j] = static_cast<T>(in[j]);
  *reinterpret_cast<Vec<T, V>*>(p + off) = vec;
}

// Sum of two values per channel (backward_reduce: sum_dy, sum_dy_xmu).
template <typename T>
struct SumPair {
  T a;
  T b;
};

template <typename T>
__device__ __forceinline__ SumPair<T> merge(const SumPair<T>& x, const SumPair<T>& y) {
  return {x.a + y.a, x.b + y.b};
}
template <typename T>
__device__ __forceinline__ WelfordState<T> merge(const WelfordState<T>& x, const WelfordState<T>& y) {
  return welford_merge(x, y);
}
template <typename T>
__device__ __forceinline__ SumPair<T> shfl_down(const SumPair<T>& x, int offset) {
  return {__shfl_down_sync(0xffffffffu, x.a, offset), __shfl_down_sync(0xffffffffu, x.b, offset)};
}
template <typename T>
__device__ __forceinline__ WelfordState<T> shfl_down(const WelfordState<T>& x, int offset) {
  return {__shfl_down_sync(0xffffffffu, x.mean, offset), __shfl_down_sync(0xffffffffu, x.m2, offset),
          __shfl_down_sync(0xffffffffu, x.n, offset)};
}

// Merge a[] across threadIdx.y (for each threadIdx.x); the result is valid in
// the threads with threadIdx.y == 0. Block-collective (all threads call it).
// The merge order depends only on the block shape, so results are
// deterministic run to run.
template <typename Acc, int NC>
__device__ __forceinline__ void reduce_y(Acc (&a)[NC]) {
  __shared__ alignas(16) unsigned char raw[kWarps * 32 * NC * sizeof(Acc)];
  Acc* smem = reinterpret_cast<Acc*>(raw);
  const int bx = blockDim.x;
  const int tid = threadIdx.x + threadIdx.y * bx;
  const int lane = tid & 31, warp = tid >> 5;
  // Lanes of one warp with the same threadIdx.x are bx apart.
  for (int offset = 16; offset >= bx; offset >>= 1) {
#pragma unroll
    for (int j = 0; j < NC; ++j) a[j] = merge(a[j], shfl_down(a[j], offset));
  }
  if (lane < bx) {  // lane == threadIdx.x here
#pragma unroll
    for (int j = 0; j < NC; ++j) smem[(warp * 32 + lane) * NC + j] = a[j];
  }
  __syncthreads();
  if (threadIdx.y == 0) {  // warp 0, lane == threadIdx.x
#pragma unroll
    for (int j = 0; j < NC; ++j) {
      Acc r = smem[threadIdx.x * NC + j];
      for (int w = 1; w < kWarps; ++w) r = merge(r, smem[(w * 32 + threadIdx.x) * NC + j]);
      a[j] = r;
    }
  }
  __syncthreads();
}

// Merge partials[p][c] over p for channels c0 .. c0 + NC - 1 (the caller's),
// threadIdx.y striding over p; valid where threadIdx.y == 0. Block-collective.
template <typename Acc, int NC, typename index_t>
__device__ __forceinline__ void merge_partials(Acc (&a)[NC], const Acc* partials, int P, index_t C,
                                               index_t c0, bool active) {
#pragma unroll
  for (int j = 0; j < NC; ++j) a[j] = Acc{};
  if (active) {
    for (int p = threadIdx.y; p < P; p += blockDim.y) {
#pragma unroll
      for (int j = 0; j < NC; ++j) a[j] = merge(a[j], partials[p * C + c0 + j]);
    }
  }
  reduce_y(a);
}

// i / d and i % d: multiply-shift for 32-bit indices, plain division for 64.
template <typename index_t>
struct Divider {
  explicit Divider(index_t d) : d(d) {}
  __device__ __forceinline__ void divmod(index_t i, index_t& q, index_t& r) const {
    q = i / d;
    r = i - q * d;
  }
  __device__ __forceinline__ index_t d_value() const { return d; }
  index_t d;
};
template <>
struct Divider<int32_t> {
  explicit Divider(int32_t d) : div(static_cast<unsigned int>(d)) {}
  __device__ __forceinline__ void divmod(int32_t i, int32_t& q, int32_t& r) const {
    const auto dm = div.divmod(static_cast<unsigned int>(i));
    q = static_cast<int32_t>(dm.div);
    r = static_cast<int32_t>(dm.mod);
  }
  __device__ __forceinline__ int32_t d_value() const { return static_cast<int32_t>(div.divisor); }
  at::cuda::detail::IntDivider<unsigned int> div;
};

// A weight or bias: absent (default value), or [C] in float32/64, half, bf16.
struct ParamPtr {
  enum Kind : int { kNone, kFloat, kDouble, kHalf, kBFloat16 };
  const void* ptr = nullptr;
  int kind = kNone;
};

template <typename A>
__device__ __forceinline__ A load_param(ParamPtr p, int64_t c, A dflt) {
  switch (p.kind) {
    case ParamPtr::kFloat: return static_cast<A>(static_cast<const float*>(p.ptr)[c]);
    case ParamPtr::kDouble: return static_cast<A>(static_cast<const double*>(p.ptr)[c]);
    case ParamPtr::kHalf: return static_cast<A>(static_cast<float>(static_cast<const c10::Half*>(p.ptr)[c]));
    case ParamPtr::kBFloat16:
      return static_cast<A>(static_cast<float>(static_cast<const c10::BFloat16*>(p.ptr)[c]));
    default: return dflt;
  }
}

// ---------------------------------------------------------------------------
// Host side.

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Multiprocessor count of the current device, cached per device (a cheap
// attribute query; no synchronization, safe under graph capture).
inline int sm_count() {
  constexpr int kMaxDevices = 64;
  static int cache[kMaxDevices] = {0};
  int dev = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  if (dev < kMaxDevices && cache[dev] > 0) return cache[dev];
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  if (dev < kMaxDevices) cache[dev] = sms;
  return sms;
}

// Blocks wanted in flight: 8 blocks of 256 threads fill an SM (2048 threads).
inline int64_t target_blocks() { return static_cast<int64_t>(sm_count()) * 8; }

inline ParamPtr param_ptr(const at::Tensor& t) {
  ParamPtr p;
  if (!t.defined()) return p;
  p.ptr = t.const_data_ptr();
  switch (t.scalar_type()) {
    case at::kFloat: p.kind = ParamPtr::kFloat; break;
    case at::kDouble: p.kind = ParamPtr::kDouble; break;
    case at::kHalf: p.kind = ParamPtr::kHalf; break;
    case at::kBFloat16: p.kind = ParamPtr::kBFloat16; break;
    default: TORCH_CHECK(false, "bnfast: unsupported parameter dtype ", t.scalar_type());
  }
  return p;
}

// A [C] parameter as the kernels read it (contiguous), or undefined.
inline at::Tensor channel_param(const c10::optional<at::Tensor>& t) {
  if (!(t.has_value() && t->defined())) return at::Tensor();
  return t->contiguous();
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// How one launch covers the tensor. vec: elements per access (1 or 16 bytes).
struct Geometry {
  Layout layout;
  int64_t N, C, S, M;  // M = N * S elements per channel
  int vec;
  bool index32;
  // Channels-last block shape.
  int bx, by;
  int64_t ctiles;  // channels-last: blocks along x
};

// Geometry of input (read as layout_of(input)); ptrs: every tensor base
// pointer the kernel will touch with vector accesses.
template <typename scalar_t>
Geometry make_geometry(const at::Tensor& input, std::initializer_list<const void*> ptrs) {
  Geometry g;
  const Shape s = shape_of(input);
  g.layout = layout_of(input);
  g.N = s.batch;
  g.C = s.channels;
  g.S = s.spatial;
  g.M = s.per_channel();
  constexpr int kVec = 16 / sizeof(scalar_t);
  bool ok = true;
  for (const void* p : ptrs) ok = ok && aligned16(p);
  const int64_t inner = g.layout == Layout::kChannelsFirst ? g.S : g.C;
  g.vec = (ok && inner % kVec == 0) ? kVec : 1;
  // Loop indices run up to numel plus a few grid strides (<= 2^27).
  g.index32 = s.numel() < static_cast<int64_t>(std::numeric_limits<int32_t>::max()) - (int64_t(1) << 27);
  if (g.layout == Layout::kChannelsLast) {
    const int64_t cv = ceil_div(g.C, g.vec);
    int bx = 1;
    while (bx < 32 && bx < cv) bx *= 2;
    g.bx = bx;
    g.by = kThreads / bx;
    g.ctiles = ceil_div(cv, bx);
  } else {
    g.bx = 1;
    g.by = kThreads;
    g.ctiles = g.C;
  }
  return g;
}

// Blocks along y (over a channel's elements) for a kernel whose threads each
// take at least `per_thread` accesses; also bounded by kMaxGridY and `cap`.
inline int64_t splits(const Geometry& g, int64_t per_thread, int64_t cap) {
  const int64_t units = g.layout == Layout::kChannelsFirst ? g.M / g.vec : g.M;  // accesses along y
  const int64_t by_work = ceil_div(units, static_cast<int64_t>(g.by) * per_thread);
  const int64_t by_fill = ceil_div(target_blocks(), g.ctiles);
  return std::max<int64_t>(1, std::min({by_work, by_fill, cap, kMaxGridY}));
}

}  // namespace cuda
}  // namespace bnfast
