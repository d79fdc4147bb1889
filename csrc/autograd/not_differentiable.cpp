// The ops outside the differentiable set (graph.h).
//
// The backward pieces (backward, backward_act, backward_reduce,
// backward_elemt, backward_reduce_act, backward_elemt_act) are themselves
// gradients (their derivatives, the double backward, come from the
// differentiable ops' composites); gather_stats and stats_act are pieces of
// SyncBatchNorm's and SyncBatchNormAct's forward, which differentiate it as a
// whole. Backpropagating into any of them, or pushing a forward-mode tangent
// through one, raises "derivative for bnfast::<op> is not implemented" rather
// than leaving a gradient silently missing.
//
// update_stats_ writes the running statistics, buffers outside the graph
// (graph.h).
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/library.h>

#include "calls.h"
#include "graph.h"

namespace bnfast {
namespace autograd {
namespace {

void update_stats_autograd(at::Tensor& running_mean, at::Tensor& running_var, const at::Tensor& mean,
                           const at::Tensor& invstd, double momentum, double eps, int64_t count) {
  at::AutoDispatchBelowAutograd below_autograd;
  call_update_stats(running_mean, running_var, mean, invstd, momentum, eps, count);
}

void update_stats_inplace(at::Tensor& running_mean, at::Tensor& running_var, const at::Tensor& mean,
                          const at::Tensor& invstd, double momentum, double eps, int64_t count) {
  {
    at::AutoDispatchBelowADInplaceOrView below_inplace;
    call_update_stats(running_mean, running_var, mean, invstd, momentum, eps, count);
  }
  bump_versions({running_mean, running_var});
}

}  // namespace
}  // namespace autograd

TORCH_LIBRARY_IMPL(bnfast, Autograd, m) {
  for (const char* op : {"backward", "backward_act", "backward_reduce", "backward_elemt", "gather_stats",
                         "stats_act", "backward_reduce_act", "backward_elemt_act"}) {
    m.impl(op, torch::autograd::autogradNotImplementedFallback());
  }
  m.impl("update_stats_", &autograd::update_stats_autograd);
}

TORCH_LIBRARY_IMPL(bnfast, ADInplaceOrView, m) { m.impl("update_stats_", &autograd::update_stats_inplace); }

}  // namespace bnfast
