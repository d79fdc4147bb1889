// The bnfast op library: every schema, and nothing else.
//
// The op set mirrors ATen's batch-norm building blocks (batch_norm_stats,
// batch_norm_gather_stats_with_counts, batch_norm_elemt,
// batch_norm_backward_reduce, batch_norm_backward_elemt) so that a
// SyncBatchNorm composes from the same pieces torch.nn.SyncBatchNorm uses, plus
// a fused single-device training forward and backward (the fast path).
//
// Conventions shared by every op:
//   * input is (N, C, *) in any memory format; statistics are per channel C.
//   * mean / invstd / sums are "stats" tensors of shape [C] in the input's
//     accumulation dtype: float32 for float16/bfloat16/float32 input, float64
//     for float64 input.
//   * weight / bias are [C], in the input dtype or float32 (mixed precision).
//   * Differentiable ops are functional in their differentiable arguments;
//     the running statistics (and the step count num_batches_tracked) are
//     the only arguments any op mutates (update_stats_, and the training
//     forwards when given them), and the schemas say so with (a!)
//     annotations.
// Kernels are registered per backend in csrc/cpu/*_kernel.cpp and
// csrc/cuda/*.cpp (kernels in csrc/cuda/*_kernel.cu); autograd in
// csrc/autograd; fakes in bnfast/ops.py, batching rules in bnfast/_vmap.py.

#include <Python.h>
#include <torch/library.h>

extern "C" {
// An empty module: importing bnfast._C loads this library, whose static
// initializers register the ops. No pybind11 bindings are needed.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(bnfast, m) {
  // mean[c] and invstd[c] = 1 / sqrt(biased_var[c] + eps) of one batch.
  m.def("stats(Tensor input, float eps) -> (Tensor mean, Tensor invstd)");
  // Merge R per-replica statistics (mean, invstd: [R, C]; counts: [R] element
  // counts per channel) into the statistics of the union.
  m.def(
      "gather_stats(Tensor mean, Tensor invstd, Tensor counts, float eps)"
      " -> (Tensor mean, Tensor invstd)");
  // running_mean = (1 - momentum) * running_mean + momentum * mean
  // running_var  = (1 - momentum) * running_var
  //                + momentum * biased_var * count / (count - 1)
  // where biased_var = 1 / invstd^2 - eps and count = elements per channel.
  m.def(
      "update_stats_(Tensor(a!) running_mean, Tensor(b!) running_var, Tensor mean,"
      " Tensor invstd, float momentum, float eps, SymInt count) -> ()");
  // y = (x - mean) * invstd * weight + bias
  m.def(
      "elemt(Tensor input, Tensor? weight, Tensor? bias, Tensor mean, Tensor invstd)"
      " -> Tensor");
  // elemt with the running statistics (the eval forward in one op):
  // invstd = 1 / sqrt(running_var + eps) per channel in the stats dtype,
  // computed by the kernel. Running statistics of any floating dtype.
  m.def(
      "elemt_running(Tensor input, Tensor? weight, Tensor? bias, Tensor running_mean, Tensor running_var,"
      " float eps) -> Tensor");
  // sum_dy[c] = sum(dy), sum_dy_xmu[c] = sum(dy * (x - mean))
  m.def(
      "backward_reduce(Tensor grad_out, Tensor input, Tensor mean, Tensor invstd)"
      " -> (Tensor sum_dy, Tensor sum_dy_xmu)");
  // dx = (dy - mean_dy - (x - mean) * invstd^2 * mean_dy_xmu) * invstd * weight
  // (mean_dy = sum_dy / count, mean_dy_xmu = sum_dy_xmu / count; the division
  // is the caller's, so counts gathered across replicas stay on the device).
  m.def(
      "backward_elemt(Tensor grad_out, Tensor input, Tensor mean, Tensor invstd,"
      " Tensor? weight, Tensor mean_dy, Tensor mean_dy_xmu) -> Tensor");
  // Fused training forward: stats + elemt in one call, and when running_mean
  // and running_var are given, update_stats_ of them with the batch's
  // statistics and momentum (count = numel / C), as torch's training forward
  // does; num_batches_tracked (a one-element int64 tensor), when given, is
  // incremented, also when the call fails its checks (a module counts the
  // step before its batch norm checks its arguments). One call per training
  // step of a module.
  m.def(
      "forward(Tensor input, Tensor? weight, Tensor? bias, float eps, Tensor(a!)? running_mean=None,"
      " Tensor(b!)? running_var=None, float momentum=0.1, Tensor(c!)? num_batches_tracked=None)"
      " -> (Tensor output, Tensor mean, Tensor invstd)");
  // Fused training backward: backward_reduce + backward_elemt with
  // count = numel / C. grad_weight = sum_dy_xmu * invstd and grad_bias = sum_dy
  // are returned in the stats dtype; the caller casts them to weight's dtype.
  m.def(
      "backward(Tensor grad_out, Tensor input, Tensor mean, Tensor invstd, Tensor? weight)"
      " -> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias)");
  // Batch norm fused with an activation (csrc/common/activation.h):
  //   y = act(BN(x) + residual)   act: identity, relu, leaky_relu (negative
  //                               slope `slope`), silu, gelu, gelu_tanh
  //   y = BN(relu(x))             act = "pre_relu" (no residual)
  // The training forward, as forward: (y, mean, invstd) with the statistics
  // of the batch (of relu(x) for pre_relu), and the running statistics'
  // update and step count when they are given. memory_efficient only changes
  // what autograd keeps for backward: the output (and for pre_relu the sign
  // of x, one byte an element) instead of the input, where the normalized
  // input can be recovered from it exactly (csrc/autograd/fused_autograd.cpp).
  m.def(
      "forward_act(Tensor input, Tensor? weight, Tensor? bias, Tensor? residual, float eps, str act,"
      " float slope, bool memory_efficient=False, Tensor(a!)? running_mean=None, Tensor(b!)? running_var=None,"
      " float momentum=0.1, Tensor(c!)? num_batches_tracked=None) -> (Tensor output, Tensor mean, Tensor invstd)");
  // With given statistics, as elemt (the eval forward).
  m.def(
      "elemt_act(Tensor input, Tensor? weight, Tensor? bias, Tensor mean, Tensor invstd, Tensor? residual,"
      " str act, float slope) -> Tensor");
  // The training backward of forward_act: grad_input, grad_weight and
  // grad_bias (stats dtype) as backward's, with dz = grad_out * act'(z) in
  // place of grad_out (z = BN(x) + residual, recomputed from the input), and
  // grad_residual = dz (an empty tensor when there is no residual).
  m.def(
      "backward_act(Tensor grad_out, Tensor input, Tensor mean, Tensor invstd, Tensor? weight, Tensor? bias,"
      " Tensor? residual, str act, float slope)"
      " -> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias, Tensor grad_residual)");
  // The pieces of a synchronized fused batch norm (bnfast.SyncBatchNormAct),
  // as stats, backward_reduce and backward_elemt are SyncBatchNorm's: the
  // statistics forward_act normalizes with (of relu(input) for pre_relu);
  // backward_reduce's sums and backward_elemt's grad_input with dz in place
  // of grad_out as backward_act takes it (grad_input masked where input <= 0
  // for pre_relu), and grad_residual = dz (an empty tensor without residual).
  m.def("stats_act(Tensor input, float eps, str act) -> (Tensor mean, Tensor invstd)");
  m.def(
      "backward_reduce_act(Tensor grad_out, Tensor input, Tensor mean, Tensor invstd, Tensor? weight,"
      " Tensor? bias, Tensor? residual, str act, float slope) -> (Tensor sum_dy, Tensor sum_dy_xmu)");
  m.def(
      "backward_elemt_act(Tensor grad_out, Tensor input, Tensor mean, Tensor invstd, Tensor? weight,"
      " Tensor? bias, Tensor? residual, str act, float slope, Tensor mean_dy, Tensor mean_dy_xmu)"
      " -> (Tensor grad_input, Tensor grad_residual)");
  // The CPU output cache (csrc/cpu/output_cache.h): free its idle buffers;
  // how many bytes it holds idle.
  m.def("empty_cpu_cache() -> ()");
  m.def("cpu_cache_idle_bytes() -> int");
}
