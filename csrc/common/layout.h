// The layouts the kernels read (csrc/common/shape.h) and how a tensor is
// brought into one of them.
// Any strides other than contiguous and dense channels-last are copied once
// into one of them (a channels-last 3-D (N, C, L) tensor is read, and
// answered, contiguous, as torch's CPU kernel and cuDNN answer it).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>

#include <optional>

#include "shape.h"

namespace bnfast {

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
// channels-last, otherwise a copy (made once) in the memory format torch
// suggests for its strides, the format torch's batch_norm answers in then.
inline at::Tensor readable(const at::Tensor& t) {
  if (t.is_contiguous()) return t;
  if ((t.dim() == 4 || t.dim() == 5) && is_channels_last_dense(t)) return t;
  return t.contiguous(t.suggest_memory_format());
}

// A second tensor (grad_out) read in the same layout as the input it pairs with.
inline at::Tensor readable_as(const at::Tensor& t, const at::Tensor& readable_input) {
  if (layout_of(readable_input) == Layout::kChannelsFirst) return t.contiguous();
  if (is_channels_last_dense(t)) return t;
  auto copy = at::empty_like(readable_input);  // dense channels-last strides
  copy.copy_(t);
  return copy;
}

// An optional second tensor (a residual) read as readable_as reads one;
// undefined when absent.
inline at::Tensor readable_optional_as(const std::optional<at::Tensor>& t, const at::Tensor& readable_input) {
  return t.has_value() && t->defined() ? readable_as(*t, readable_input) : at::Tensor();
}

// The output, allocated in the layout the input is read in.
inline at::Tensor empty_output_like(const at::Tensor& readable_input) {
  return at::empty_like(readable_input, at::MemoryFormat::Preserve);
}

}  // namespace bnfast
