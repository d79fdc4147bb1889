// i / d and i % d for a divisor fixed per launch: multiply-shift for 32-bit
// indices (Granlund and Montgomery, "Division by invariant integers using
// multiplication", 1994), plain division for 64-bit ones.
//
// For d >= 1 let s = ceil(log2 d) and m = floor(2^32 * (2^s - d) / d) + 1;
// then for every 0 <= n < 2^31, n / d = (hi32(n * m) + n) >> s, and the sum
// cannot overflow 32 bits (hi32(n * m) < n). Host-callable too, so the
// identity is tested on the CPU (tests/test_cuda_compile.py).
#pragma once

#include <cstdint>

#ifdef __CUDACC__
#define BNFAST_DIVIDER_FN __host__ __device__ __forceinline__
#else
#define BNFAST_DIVIDER_FN inline
#endif

namespace bnfast {
namespace cuda {

template <typename index_t>
struct Divider {
  explicit Divider(index_t divisor) : d(divisor) {}
  BNFAST_DIVIDER_FN void divmod(index_t i, index_t& q, index_t& r) const {
    q = i / d;
    r = i - q * d;
  }
  BNFAST_DIVIDER_FN index_t divisor() const { return d; }
  index_t d;
};

template <>
struct Divider<int32_t> {
  explicit Divider(int32_t divisor) : d(static_cast<uint32_t>(divisor)) {
    while (s < 32 && (uint64_t(1) << s) < d) ++s;
    m = static_cast<uint32_t>(((uint64_t(1) << 32) * ((uint64_t(1) << s) - d)) / d + 1);
  }
  // i in [0, 2^31).
  BNFAST_DIVIDER_FN void divmod(int32_t i, int32_t& q, int32_t& r) const {
    const uint32_t n = static_cast<uint32_t>(i);
#ifdef __CUDA_ARCH__
    const uint32_t hi = __umulhi(n, m);
#else
    const uint32_t hi = static_cast<uint32_t>((static_cast<uint64_t>(n) * m) >> 32);
#endif
    q = static_cast<int32_t>((hi + n) >> s);
    r = i - q * static_cast<int32_t>(d);
  }
  BNFAST_DIVIDER_FN int32_t divisor() const { return static_cast<int32_t>(d); }
  uint32_t d;
  uint32_t m = 0;
  uint32_t s = 0;
};

}  // namespace cuda
}  // namespace bnfast
