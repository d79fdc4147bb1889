// A cache for the large CPU output buffers of the bnfast kernels (y, dx).
//
// Why: freed large buffers go back to glibc, which returns them to the OS, so
// the next training step's buffers are fresh pages and every first touch is a
// page fault, which costs more than writing the data (the README's "CPU
// output cache" section has the measurement). Like torch's CUDA caching
// allocator, bnfast keeps freed output buffers of >= 256 KiB for reuse: a
// few hundred KiB fault too once glibc has handed large blocks back, as the
// kernel benchmark's small cases after its large ones showed. Idle cached
// memory is capped by BNFAST_CPU_CACHE_MB (default 1024; 0 turns the cache
// off) and released by bnfast.empty_cache().
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace bnfast {
namespace cpu {

// An uninitialized CPU tensor with like's sizes, strides and dtype; large ones
// come from the cache.
at::Tensor empty_cached_like(const at::Tensor& like);

// Frees every idle cached buffer.
void empty_output_cache();

// Bytes held idle in the cache.
int64_t output_cache_idle_bytes();

}  // namespace cpu
}  // namespace bnfast
