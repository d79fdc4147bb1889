// bnfast::forward on CUDA, the fused training forward, and forward_act (with
// an activation): checks, allocation and launch (the kernels are in
// forward_kernel.cu).
#include <torch/library.h>

#include <limits>
#include <optional>
#include <tuple>

#include "../common/op_entries.h"
#include "ops.h"

namespace bnfast {
namespace {

// activation: none for the plain forward.
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_impl(const at::Tensor& input_, const OptionalTensor& weight,
                                                            const OptionalTensor& bias,
                                                            const OptionalTensor& residual_, double eps,
                                                            std::optional<Activation> activation, double slope,
                                                            const RunningStats& running) {
  c10::cuda::CUDAGuard guard(input_.device());
  const auto input = readable(input_);
  const auto residual = readable_optional_as(residual_, input);
  const auto options = input.options().dtype(stats_dtype(input.scalar_type()));
  auto mean = at::empty({input.size(1)}, options);
  auto invstd = at::empty({input.size(1)}, options);
  auto output = empty_output_like(input);
  if (input.numel() == 0) {  // as on CPU: statistics of an empty batch are NaN
    mean.fill_(std::numeric_limits<double>::quiet_NaN());
    invstd.fill_(std::numeric_limits<double>::quiet_NaN());
    if (running.num_batches_tracked.defined()) running.num_batches_tracked.add_(1);
    return {output, mean, invstd};
  }
  const cuda::ParamTensor w(weight), b(bias);
  const auto plan = cuda::plan_for(input, {&input, &output, &residual});
  auto scratch = cuda::scratch_for(input, plan, cuda::Reduction::kStats);
  const auto dtype = cuda::dtype_of(input.scalar_type());
  const int64_t count = per_channel_count(input);
  // Running statistics in the stats dtype, contiguous (the modules' buffers)
  // are updated by the forward's own kernel, which then also counts the step;
  // others by update_stats_'s, and the step by an add.
  const auto stats = stats_dtype(input.scalar_type());
  const bool update_in_kernel = running.given() && running.mean.scalar_type() == stats &&
                                running.var.scalar_type() == stats && running.mean.is_contiguous() &&
                                running.var.is_contiguous();
  const bool count_in_kernel = update_in_kernel && running.num_batches_tracked.defined();
  const cuda::RunningUpdate update{update_in_kernel ? running.mean.mutable_data_ptr() : nullptr,
                                   update_in_kernel ? running.var.mutable_data_ptr() : nullptr,
                                   count_in_kernel ? running.num_batches_tracked.mutable_data_ptr<int64_t>() : nullptr,
                                   running.momentum, eps, static_cast<double>(count) / static_cast<double>(count - 1)};
  if (activation) {
    cuda::check_launch(cuda::launch_forward_act(dtype, plan, input.const_data_ptr(), output.mutable_data_ptr(),
                                                w.param(), b.param(), mean.mutable_data_ptr(),
                                                invstd.mutable_data_ptr(), eps,
                                                cuda::act_fusion(*activation, slope, residual),
                                                scratch.mutable_data_ptr(), cuda::current_stream(), &update));
  } else {
    cuda::check_launch(cuda::launch_forward(dtype, plan, input.const_data_ptr(), output.mutable_data_ptr(),
                                            w.param(), b.param(), mean.mutable_data_ptr(),
                                            invstd.mutable_data_ptr(), eps, scratch.mutable_data_ptr(),
                                            cuda::current_stream(), &update));
  }
  if (running.given() && !update_in_kernel) {
    auto running_mean = running.mean, running_var = running.var;
    cuda::update_running_stats(running_mean, running_var, mean, invstd, running.momentum, eps, count);
  }
  if (running.num_batches_tracked.defined() && !count_in_kernel) running.num_batches_tracked.add_(1);
  return {output, mean, invstd};
}

}  // namespace

TORCH_LIBRARY_IMPL(bnfast, CUDA, m) {
  m.impl("forward", &forward_entry<forward_impl>);
  m.impl("forward_act", &forward_act_entry<forward_impl>);
}

}  // namespace bnfast
