// Checks csrc/cuda/divider.h on the host: Divider<int32_t>::divmod equals
// integer division over edge and random numerators in [0, 2^31) for divisors
// the kernels meet (plane sizes) and extremes. Prints the first mismatches;
// exit status 1 when there is any. Run by tests/test_cuda_compile.py.
#include <cstdint>
#include <cstdio>
#include <random>

#include "cuda/divider.h"

int main() {
  std::mt19937_64 rng(0);
  int mismatches = 0;
  const int32_t divisors[] = {1,    2,     3,       4,       5,         7,          9,          16,
                              25,   49,    100,     169,     784,       900,        3136,       12544,
                              65535, 65536, 1 << 20, 1000003, (1 << 30) + 1, 2147483646, 2147483647};
  for (const int32_t d : divisors) {
    const bnfast::cuda::Divider<int32_t> div(d);
    auto check = [&](int32_t n) {
      int32_t q, r;
      div.divmod(n, q, r);
      if (q != n / d || r != n % d) {
        if (mismatches++ < 10) std::printf("d=%d n=%d: got q=%d r=%d\n", d, n, q, r);
      }
    };
    for (int32_t n = 0; n < 70000; ++n) check(n);
    for (int32_t n = 2147483647 - 70000; n < 2147483647; ++n) check(n);
    check(2147483647);
    for (int i = 0; i < 100000; ++i) check(static_cast<int32_t>(rng() & 0x7fffffff));
  }
  std::printf("%d mismatches\n", mismatches);
  return mismatches == 0 ? 0 : 1;
}
