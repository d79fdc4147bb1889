// Host side shared by the CUDA op files (csrc/cuda/*.cpp): from tensors to the
// launchers' plain arguments (launch.h), and from their errors back to torch.
// Compiled by the host compiler only; the kernels never see a tensor.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include <initializer_list>

#include "../common/checks.h"
#include "../common/layout.h"
#include "launch.h"

namespace bnfast {
namespace cuda {

inline DType dtype_of(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::kFloat;
    case at::kDouble: return DType::kDouble;
    case at::kHalf: return DType::kHalf;
    case at::kBFloat16: return DType::kBFloat16;
    default: TORCH_CHECK(false, "bnfast: no CUDA kernels for dtype ", t);
  }
}

// Multiprocessor count of the current device, cached per device (a cheap
// attribute query; no synchronization, safe under graph capture).
inline int sm_count() {
  constexpr int kMaxDevices = 64;
  static int cache[kMaxDevices] = {0};
  const int dev = c10::cuda::current_device();
  if (dev < kMaxDevices && cache[dev] > 0) return cache[dev];
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  if (dev < kMaxDevices) cache[dev] = sms;
  return sms;
}

// The plan for an op over input (read in layout_of(input)) that reads and
// writes `tensors` elementwise (undefined or empty ones: absent, as an
// optional residual). Requires input.numel() > 0.
inline Plan plan_for(const at::Tensor& input, std::initializer_list<const at::Tensor*> tensors) {
  bool aligned = true;
  for (const at::Tensor* t : tensors) {
    const bool absent = !t->defined() || t->numel() == 0;
    aligned = aligned && (absent || reinterpret_cast<uintptr_t>(t->const_data_ptr()) % 16 == 0);
  }
  return make_plan(dtype_of(input.scalar_type()), layout_of(input), shape_of(input), aligned, sm_count());
}

// A weight or bias as the kernels read it (contiguous); absent when not given.
struct ParamTensor {
  explicit ParamTensor(const OptionalTensor& t) {
    if (t.has_value() && t->defined()) tensor = t->contiguous();
  }
  Param param() const {
    Param p;
    if (tensor.defined()) {
      p.ptr = tensor.const_data_ptr();
      p.dtype = dtype_of(tensor.scalar_type());
    }
    return p;
  }
  at::Tensor tensor;
};

// A fused op's activation for the launchers; residual: undefined, or read
// in the input's layout (readable_optional_as).
inline ActFusion act_fusion(const Activation& activation, double slope, const at::Tensor& residual) {
  ActFusion f;
  f.act = activation.act;
  f.pre_relu = activation.pre_relu;
  f.slope = slope;
  if (residual.defined()) f.residual = residual.const_data_ptr();
  return f;
}

// Scratch for a reduce kernel's partial results, from the caching allocator.
inline at::Tensor scratch_for(const at::Tensor& input, const Plan& plan, Reduction r) {
  const auto bytes = static_cast<int64_t>(scratch_bytes(plan, dtype_of(input.scalar_type()), r));
  return at::empty({bytes}, input.options().dtype(at::kByte));
}

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// A launcher's result as a torch error (CUDA errors raise RuntimeError).
inline void check_launch(cudaError_t err) { C10_CUDA_CHECK(err); }

// update_stats_ without its checks (update_stats.cpp), also the training
// forwards' running-statistics update.
void update_running_stats(at::Tensor& running_mean, at::Tensor& running_var, const at::Tensor& mean,
                          const at::Tensor& invstd, double momentum, double eps, int64_t count);

}  // namespace cuda
}  // namespace bnfast
