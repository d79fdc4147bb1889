// How a kernel sees an (N, C, *) input, as plain numbers: shared by the CPU
// loops, the CUDA kernels and the host code, and free of torch headers so the
// CUDA kernels compile without them (csrc/cuda/launch.h).
//
// Two layouts are handled natively, without copying the input:
//   * kChannelsFirst: contiguous NC(D)HW, viewed as [N][C][S] with S = prod(*).
//   * kChannelsLast:  channels_last (4-D) / channels_last_3d (5-D), and any
//     contiguous input whose spatial size is 1 (NC, NC11...), viewed as [M][C]
//     rows with M = N * S.
#pragma once

#include <cstdint>

namespace bnfast {

enum class Layout : int { kChannelsFirst, kChannelsLast };

struct Shape {
  int64_t batch;     // N
  int64_t channels;  // C
  int64_t spatial;   // S = prod of the dims after C (1 for 2-D input)
  int64_t numel() const { return batch * channels * spatial; }
  int64_t per_channel() const { return batch * spatial; }  // M = N * S
};

}  // namespace bnfast
