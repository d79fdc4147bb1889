// The launchers of bnfast's CUDA kernels: the interface between the op files
// (csrc/cuda/*.cpp, host C++ with torch: checks, device guard, allocation)
// and the kernels (csrc/cuda/*_kernel.cu, compiled by nvcc).
//
// Nothing here includes torch, and no launcher throws: each returns the CUDA
// error of its launches (cudaSuccess when all were accepted), which the op
// file turns into a torch error. So an exception never starts in, or unwinds
// through, nvcc-compiled code, and the kernels build without torch (the CI
// compile check and a standalone timing harness rely on that).
//
// Tensors are passed as raw pointers in the layout of plan.layout; per-channel
// statistics (mean, invstd, sums) are [C] in the accumulation dtype (float,
// or double for double input). Every launch goes to `stream`.
#pragma once

#include <cuda_runtime_api.h>

#include "../common/activation.h"
#include "plan.h"

namespace bnfast {
namespace cuda {

// A weight or bias: absent (ptr == nullptr: weight 1, bias 0), or [C]
// contiguous in any floating dtype.
struct Param {
  const void* ptr = nullptr;
  DType dtype = DType::kFloat;
};

// The activation of a fused op (csrc/common/activation.h, csrc/cuda/
// activation.cuh): y = act(BN(x) + residual), or y = BN(relu(x)) for
// pre_relu (act identity, no residual then). residual and grad_residual, when
// given, are in the layout of plan.layout like x.
struct ActFusion {
  Act act = Act::kIdentity;
  bool pre_relu = false;
  double slope = 0;                    // leaky_relu's
  const void* residual = nullptr;
  void* grad_residual = nullptr;       // backward: receives dz = dy * act'(z)
};

// The running statistics a training forward also updates, in
// update_stats_'s formula (update_stats_kernel.cu) with correction =
// count / (count - 1): [C] contiguous, in the stats dtype; and the step
// count it increments, when not null.
struct RunningUpdate {
  void* mean = nullptr;
  void* var = nullptr;
  int64_t* num_batches_tracked = nullptr;
  double momentum = 0, eps = 0, correction = 0;
};

// mean, invstd of x. scratch: scratch_bytes(plan, dtype, Reduction::kStats).
cudaError_t launch_stats(DType dtype, const Plan& plan, const void* x, void* mean, void* invstd,
                         double eps, void* scratch, cudaStream_t stream);

// y = (x - mean) * invstd * weight + bias with the batch statistics of x,
// which are also stored, and, given `running`, the running statistics'
// update in the same launches. scratch: as launch_stats.
cudaError_t launch_forward(DType dtype, const Plan& plan, const void* x, void* y, Param weight, Param bias,
                           void* mean, void* invstd, double eps, void* scratch, cudaStream_t stream,
                           const RunningUpdate* running = nullptr);

// y = (x - mean) * invstd * weight + bias with given statistics.
cudaError_t launch_elemt(DType dtype, const Plan& plan, const void* x, void* y, Param weight, Param bias,
                         const void* mean, const void* invstd, cudaStream_t stream);

// launch_forward and launch_elemt with an activation: the statistics of x
// (of relu(x) for pre_relu), y = act(BN(x) + residual) in the same passes.
cudaError_t launch_forward_act(DType dtype, const Plan& plan, const void* x, void* y, Param weight, Param bias,
                               void* mean, void* invstd, double eps, const ActFusion& fusion, void* scratch,
                               cudaStream_t stream, const RunningUpdate* running = nullptr);
cudaError_t launch_elemt_act(DType dtype, const Plan& plan, const void* x, void* y, Param weight, Param bias,
                             const void* mean, const void* invstd, const ActFusion& fusion, cudaStream_t stream);

// sum_dy = sum(dy), sum_dy_xmu = sum(dy * (x - mean)) per channel.
// scratch: scratch_bytes(plan, dtype, Reduction::kGradSums).
cudaError_t launch_backward_reduce(DType dtype, const Plan& plan, const void* dy, const void* x,
                                   const void* mean, void* sum_dy, void* sum_dy_xmu, void* scratch,
                                   cudaStream_t stream);

// dx = (dy - mean_dy - (x - mean) * invstd^2 * mean_dy_xmu) * invstd * weight.
cudaError_t launch_backward_elemt(DType dtype, const Plan& plan, const void* dy, const void* x, void* dx,
                                  const void* mean, const void* invstd, Param weight, const void* mean_dy,
                                  const void* mean_dy_xmu, cudaStream_t stream);

// The fused training backward (count M): the sums of launch_backward_reduce,
// then dx with mean_dy = sum_dy / M, mean_dy_xmu = sum_dy_xmu / M;
// grad_weight = sum_dy_xmu * invstd, grad_bias = sum_dy (accumulation dtype).
// scratch: as launch_backward_reduce.
cudaError_t launch_backward(DType dtype, const Plan& plan, const void* dy, const void* x, void* dx,
                            const void* mean, const void* invstd, Param weight, void* grad_weight,
                            void* grad_bias, void* scratch, cudaStream_t stream);

// launch_backward of launch_forward_act: dz = dy * act'(z) in place of dy in
// both passes, z = (x - mean) * invstd * weight + bias (+ residual)
// recomputed; dz stored to fusion.grad_residual when given. For pre_relu the
// passes read relu(x), and dx is 0 where x <= 0 (NaN x too, as on the CPU).
cudaError_t launch_backward_act(DType dtype, const Plan& plan, const void* dy, const void* x, void* dx,
                                const void* mean, const void* invstd, Param weight, Param bias, void* grad_weight,
                                void* grad_bias, const ActFusion& fusion, void* scratch, cudaStream_t stream);

// The pieces of launch_backward_act for SyncBatchNormAct (its collectives
// sit between them), as launch_stats, launch_backward_reduce and
// launch_backward_elemt are launch_forward's and launch_backward's:
// statistics of relu(x) for pre_relu (of x otherwise); the sums of dz and
// dz * (x - mean); dx from given means of those sums, dz stored to
// fusion.grad_residual when given.
cudaError_t launch_stats_act(DType dtype, const Plan& plan, const void* x, void* mean, void* invstd, double eps,
                             const ActFusion& fusion, void* scratch, cudaStream_t stream);
cudaError_t launch_backward_reduce_act(DType dtype, const Plan& plan, const void* dy, const void* x,
                                       const void* mean, const void* invstd, Param weight, Param bias, void* sum_dy,
                                       void* sum_dy_xmu, const ActFusion& fusion, void* scratch, cudaStream_t stream);
cudaError_t launch_backward_elemt_act(DType dtype, const Plan& plan, const void* dy, const void* x, void* dx,
                                      const void* mean, const void* invstd, Param weight, Param bias,
                                      const void* mean_dy, const void* mean_dy_xmu, const ActFusion& fusion,
                                      cudaStream_t stream);

// In place, channel c of C (stats_dtype: float or double; running statistics
// in any floating dtype, strided):
//   running_mean = (1 - momentum) * running_mean + momentum * mean
//   running_var  = (1 - momentum) * running_var + momentum * (1 / invstd^2 - eps) * correction
cudaError_t launch_update_stats(DType stats_dtype, int64_t C, void* running_mean, DType mean_dtype,
                                int64_t mean_stride, void* running_var, DType var_dtype, int64_t var_stride,
                                const void* mean, const void* invstd, double momentum, double eps,
                                double correction, cudaStream_t stream);

// Statistics of the union of R replicas ([R, C] mean and invstd in
// stats_dtype, counts [R] in double) into [C] out_mean, out_invstd.
cudaError_t launch_gather_stats(DType stats_dtype, int64_t R, int64_t C, const void* mean, const void* invstd,
                                const double* counts, void* out_mean, void* out_invstd, double eps,
                                cudaStream_t stream);

}  // namespace cuda
}  // namespace bnfast
