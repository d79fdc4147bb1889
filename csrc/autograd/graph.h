// How bnfast's ops join the autograd graph (the one rule, for every op):
//
// * A differentiable op (forward, elemt, stats, forward_act, elemt_act) has
//   a C++ kernel under the Autograd key, written as torch's own generated
//   kernels are: its outputs are computed below autograd; when an input
//   requires grad, a Node records the inputs and becomes the outputs'
//   grad_fn; when an input carries a forward-mode tangent, the outputs get
//   theirs. A Node, not a
//   torch::autograd::Function, which cannot coexist with torch.func, and no
//   Python, which costs as much as the kernels on small layers.
// * Under a torch.func transform (grad, jvp, vmap, and their nestings) the
//   op returns its composite instead (the same math from differentiable ATen
//   ops, composite.h), which every transform level handles op by op: exact
//   for any nesting, as fast as ATen's composites.
// * Its backward runs bnfast kernels for first-order gradients. It
//   differentiates the op's composite (the same math from differentiable ATen
//   ops, composite.h) instead when the backward must itself be differentiable
//   (create_graph, i.e. grad mode on inside it), when it gets gradients the
//   kernels do not take, when a tangent flows through it (forward over
//   reverse), or under a torch.func transform; any further order of
//   derivative goes through the composite. Forward-mode tangents always come
//   from the composites.
// * The other ops (backward, backward_act, backward_reduce, backward_elemt,
//   gather_stats, and SyncBatchNormAct's pieces stats_act,
//   backward_reduce_act, backward_elemt_act) are not differentiable and say
//   so: backpropagating through them raises.
// * The running statistics (written by update_stats_, and by forward and
//   forward_act when given them) are buffers outside the graph: they are
//   updated with the batch statistics' values, whatever graph or tangent
//   those carry, and their version counters are bumped under the
//   ADInplaceOrView key (bump_versions), so a graph that saved one notices.
// * vmap: every op has a batching rule (bnfast/_vmap.py).
// * elemt_running (the eval forward in one op) records no Node: with a
//   gradient, a tangent or a transform involved it is its decomposition into
//   elemt, which follows this rule (elemt_autograd.cpp).
// * The one exception: forward_act(memory_efficient=True) saves its outputs
//   with their graph instead of its input, and its backward (from the
//   output, in bnfast kernels or differentiable ATen ops) is differentiated
//   itself for higher orders (fused_autograd.cpp).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/csrc/autograd/variable.h>

#include <array>
#include <initializer_list>
#include <mutex>
#include <optional>
#include <memory>
#include <type_traits>

namespace bnfast {
namespace autograd {

using torch::autograd::Node;
using torch::autograd::SavedVariable;
using torch::autograd::variable_list;

// The graph's pointer to a Node: std::shared_ptr<Node> up to torch 2.12,
// c10::intrusive_ptr<Node> from torch 2.13 on.
using NodePtr = decltype(torch::autograd::Edge::function);

// A new Node of type T, owned the way this torch owns nodes.
template <typename T>
auto make_node() {
  if constexpr (std::is_same_v<NodePtr, std::shared_ptr<Node>>) {
    // deleteNode (found by argument-dependent lookup, so only where it
    // exists) frees long chains of nodes without deep recursion.
    return std::shared_ptr<T>(new T(), [](T* node) { deleteNode(node); });
  } else {
    return c10::make_intrusive<T>();
  }
}

// Whether a gradient is needed for any of these tensors.
inline bool requires_grad(std::initializer_list<const at::Tensor*> tensors) {
  if (!at::GradMode::is_enabled()) return false;
  for (const at::Tensor* t : tensors) {
    if (t->defined() && t->requires_grad()) return true;
  }
  return false;
}

// The forward-mode tangent of t (undefined when it has none).
inline at::Tensor tangent(const at::Tensor& t) {
  return t.defined() ? t._fw_grad(/*level=*/0) : at::Tensor();
}

// Whether a torch.func transform (grad, jvp, vmap...) is active: its levels
// carry tangents and batch dims the kernels cannot see, so the composites
// stand in for the kernels.
inline bool functorch_active() {
  return c10::impl::tls_is_dispatch_key_included(c10::DispatchKey::FuncTorchDynamicLayerFrontMode);
}

inline bool any_tangent(std::initializer_list<const at::Tensor*> tensors) {
  for (const at::Tensor* t : tensors) {
    if (tangent(*t).defined()) return true;
  }
  return false;
}

// t without its tangent (the primal of a dual tensor): what forward-mode
// formulas read, so their result carries no tangent of its own.
inline at::Tensor primal(const at::Tensor& t) { return t.defined() ? t._fw_primal(/*level=*/0) : t; }

// t where its gradient is wanted, else detached (its value still counts).
inline at::Tensor only_if(bool wanted, const at::Tensor& t) { return wanted || !t.defined() ? t : t.detach(); }

inline void set_tangent(const at::Tensor& output, const at::Tensor& t) {
  if (t.defined()) output._set_fw_grad(t, /*level=*/0, /*is_inplace_op=*/false);
}

// The graph for outputs of `node`, whose next edges are the gradient edges of
// `inputs` (in the op's argument order; undefined ones get none).
inline void record(const NodePtr& node, std::initializer_list<const at::Tensor*> inputs,
                   std::initializer_list<const at::Tensor*> outputs) {
  torch::autograd::edge_list edges;
  for (const at::Tensor* t : inputs) {
    edges.push_back(t->defined() ? torch::autograd::impl::gradient_edge(*t) : torch::autograd::Edge());
  }
  node->set_next_edges(std::move(edges));
  for (const at::Tensor* t : outputs) torch::autograd::set_history(*t, node);
}

// A Node holding N saved tensors, released once a backward no longer needs
// them (retain_graph=False).
template <size_t N>
struct NodeWithSaved : public Node {
  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto& s : saved_) s.reset_data();
  }
  at::Tensor unpack(size_t i) const { return saved_[i].unpack(); }
  // An output saved with its graph (SavedVariable(t, /*is_output=*/true)),
  // whose grad_fn is this node: the saved variable holds no reference to it.
  at::Tensor unpack_output(size_t i) { return saved_[i].unpack(getptr()); }
  std::array<SavedVariable, N> saved_;
};

// Saved for backward (version-checked, and through saved-tensor hooks): an
// input as it is, so higher-order gradients reach its own graph; an output
// of the op detached, so the Node keeps its value and no cycle through itself.
inline SavedVariable save_input(const at::Tensor& t) { return SavedVariable(t, /*is_output=*/false); }
inline SavedVariable save_output(const at::Tensor& t) { return SavedVariable(t.detach(), /*is_output=*/false); }

// After an op below ADInplaceOrView wrote them in place: the version
// counters of the running statistics (undefined ones are not given).
inline void bump_versions(std::initializer_list<at::Tensor> written) {
  for (const at::Tensor& t : written) {
    if (t.defined()) torch::autograd::impl::bump_version(t);
  }
}

// A training forward's buffers (running statistics, step count): what it
// writes in place when given.
struct Buffers {
  const std::optional<at::Tensor>&running_mean, &running_var, &num_batches_tracked;
  bool given() const {
    for (const auto* t : {&running_mean, &running_var, &num_batches_tracked}) {
      if (t->has_value() && (*t)->defined()) return true;
    }
    return false;
  }
};

// The op below Autograd: through its ADInplaceOrView kernel when it writes
// buffers (that kernel bumps their versions), past it otherwise (one
// dispatch fewer on the plain path).
template <typename Call>
auto call_below_autograd(const Buffers& buffers, Call&& call) {
  if (buffers.given()) {
    at::AutoDispatchBelowAutograd below_autograd;
    return call();
  }
  at::AutoDispatchBelowADInplaceOrView below_inplace;
  return call();
}

// The ADInplaceOrView kernel of a training forward: the op below this key,
// then the written buffers' versions bumped.
template <typename Call>
auto call_then_bump_versions(const Buffers& buffers, Call&& call) {
  auto result = [&] {
    at::AutoDispatchBelowADInplaceOrView below_inplace;
    return call();
  }();
  bump_versions({buffers.running_mean.value_or(at::Tensor()), buffers.running_var.value_or(at::Tensor()),
                 buffers.num_batches_tracked.value_or(at::Tensor())});
  return result;
}

}  // namespace autograd
}  // namespace bnfast
