// How a kernel sees an (N, C, *) input in memory.
//
// Two layouts are handled natively, without copying the input:
//   * kChannelsFirst: contiguous NC(D)HW, viewed as [N][C][S] with S = prod(*).
//   * kChannelsLast:  channels_last (4-D) / channels_last_3d (5-D), and any
//     contiguous input whose spatial size is 1 (NC, NC11...), viewed as [M][C]
//     rows with M = N * S.
// Any other strides are made contiguous once, as torch's memory formats do
// (a channels-last 3-D (N, C, L) tensor is read, and answered, contiguous).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>

namespace bnfast {

enum class Layout { kChannelsFirst, kChannelsLast };

struct Shape {
  int64_t batch;     // N
  int64_t channels;  // C
  int64_t spatial;   // S = prod of the dims after C (1 for 2-D input)
  int64_t numel() const { return batch * channels * spatial; }
  int64_t per_channel() const { return batch * spatial; }  // M = N * S
};

inline Shape shape_of(const at::Tensor& input) {
  Shape s{input.size(0), input.size(1), 1};
  for (int64_t d = 2; d < input.dim(); ++d) s.spatial *= input.size(d);
  return s;
}

// Strides of a dense channels-last tensor: C innermost, then the spatial dims
// in order, then N. Checked directly so size-1 dims never confuse it.
inline bool is_channels_last_dense(const at::Tensor& t) {
  const int64_t dim = t.dim();
  int64_t expected = 1;
  auto matches = [&](int64_t d) {
    if (t.size(d) != 1 && t.stride(d) != expected) return false;
    expected *= t.size(d);
    return true;
  };
  if (!matches(1)) return false;
  for (int64_t d = dim - 1; d >= 2; --d) {
    if (!matches(d)) return false;
  }
  return matches(0);
}

inline Layout layout_of(const at::Tensor& contiguous_or_channels_last) {
  const auto& t = contiguous_or_channels_last;
  if (shape_of(t).spatial == 1) return Layout::kChannelsLast;
  return t.is_contiguous() ? Layout::kChannelsFirst : Layout::kChannelsLast;
}

// The input as the kernels read it: itself when it is contiguous or dense
// channels-last, otherwise a contiguous copy (made once).
inline at::Tensor readable(const at::Tensor& t) {
  if (t.is_contiguous()) return t;
  if ((t.dim() == 4 || t.dim() == 5) && is_channels_last_dense(t)) return t;
  return t.contiguous();
}

// A second tensor (grad_out) read in the same layout as the input it pairs with.
inline at::Tensor readable_as(const at::Tensor& t, const at::Tensor& readable_input) {
  if (layout_of(readable_input) == Layout::kChannelsFirst) return t.contiguous();
  if (is_channels_last_dense(t)) return t;
  auto copy = at::empty_like(readable_input);  // dense channels-last strides
  copy.copy_(t);
  return copy;
}

// The output, allocated in the layout the input is read in.
inline at::Tensor empty_output_like(const at::Tensor& readable_input) {
  return at::empty_like(readable_input, at::MemoryFormat::Preserve);
}

}  // namespace bnfast
