// Device-side building blocks of the CUDA kernels (kernels.cuh): element
// types and their conversions, 16-byte vector loads and stores, the
// per-channel accumulators and their block-wide merges. No torch headers.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "../common/welford.h"
#include "divider.h"
#include "launch.h"

namespace bnfast {
namespace cuda {

constexpr int kWarps = kThreads / 32;

// The accumulation type of an element type: float for __half, __nv_bfloat16
// and float, double for double.
template <typename T>
struct Accumulate {
  using type = T;
};
template <>
struct Accumulate<__half> {
  using type = float;
};
template <>
struct Accumulate<__nv_bfloat16> {
  using type = float;
};
template <typename T>
using acc_t = typename Accumulate<T>::type;

// Element <-> accumulation type. NB: float to half / bfloat16 rounds to
// nearest even, as torch's conversions do.
__device__ __forceinline__ float widen(__half v) { return __half2float(v); }
__device__ __forceinline__ float widen(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float widen(float v) { return v; }
__device__ __forceinline__ double widen(double v) { return v; }

template <typename T>
__device__ __forceinline__ T narrow(acc_t<T> v) {
  return static_cast<T>(v);
}
template <>
__device__ __forceinline__ __half narrow<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 narrow<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// One channel's running-statistics update, in double, stored through the
// accumulation type for half / bfloat16 statistics (update_stats_'s formula,
// shared by its kernel and the training forward's):
//   rm = (1 - momentum) * rm + momentum * mean
//   rv = (1 - momentum) * rv + momentum * (1 / invstd^2 - eps) * correction
template <typename rm_t, typename rv_t>
__device__ __forceinline__ void update_running(rm_t& rm, rv_t& rv, double mean, double invstd,
                                               const RunningUpdate& u) {
  const double var = 1.0 / (invstd * invstd) - u.eps;
  const double m = u.momentum;
  rm = narrow<rm_t>(static_cast<acc_t<rm_t>>((1 - m) * static_cast<double>(widen(rm)) + m * mean));
  rv = narrow<rv_t>(static_cast<acc_t<rv_t>>((1 - m) * static_cast<double>(widen(rv)) + m * var * u.correction));
}

// The element type of a DType, for dispatching a launcher on it:
// dispatch(dtype, [&](auto tag) { using T = typename decltype(tag)::type; ... }).
template <typename T>
struct TypeTag {
  using type = T;
};
template <typename F>
cudaError_t dispatch(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat: return f(TypeTag<float>{});
    case DType::kDouble: return f(TypeTag<double>{});
    case DType::kHalf: return f(TypeTag<__half>{});
    case DType::kBFloat16: return f(TypeTag<__nv_bfloat16>{});
  }
  return cudaErrorInvalidValue;
}

// As dispatch, over the accumulation dtypes (float, double) only.
template <typename F>
cudaError_t dispatch_acc(DType dtype, F&& f) {
  if (dtype == DType::kFloat) return f(TypeTag<float>{});
  if (dtype == DType::kDouble) return f(TypeTag<double>{});
  return cudaErrorInvalidValue;
}

template <typename T, int V>
struct alignas(sizeof(T) * V) Vec {
  T v[V];
};

template <int V, typename T, typename A, typename I>
__device__ __forceinline__ void load_vec(const T* p, I off, A* out) {
  const auto vec = *reinterpret_cast<const Vec<T, V>*>(p + off);
#pragma unroll
  for (int j = 0; j < V; ++j) out[j] = static_cast<A>(widen(vec.v[j]));
}

template <int V, typename T, typename A, typename I>
__device__ __forceinline__ void store_vec(T* p, I off, const A* in) {
  Vec<T, V> vec;
#pragma unroll
  for (int j = 0; j < V; ++j) vec.v[j] = narrow<T>(in[j]);
  *reinterpret_cast<Vec<T, V>*>(p + off) = vec;
}

// A weight or bias value as A; dflt where the parameter is absent.
template <typename A>
__device__ __forceinline__ A load_param(Param p, int64_t c, A dflt) {
  if (p.ptr == nullptr) return dflt;
  switch (p.dtype) {
    case DType::kFloat: return static_cast<A>(static_cast<const float*>(p.ptr)[c]);
    case DType::kDouble: return static_cast<A>(static_cast<const double*>(p.ptr)[c]);
    case DType::kHalf: return static_cast<A>(widen(static_cast<const __half*>(p.ptr)[c]));
    case DType::kBFloat16: return static_cast<A>(widen(static_cast<const __nv_bfloat16*>(p.ptr)[c]));
  }
  return dflt;
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

}  // namespace cuda
}  // namespace bnfast
