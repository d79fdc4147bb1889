// bnfast::backward_elemt on CUDA, and backward_elemt_act (with an
// activation): checks, allocation and launch (the kernel is in
// backward_elemt_kernel.cu).
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "ops.h"

namespace bnfast {
namespace {

// activation: none for the plain backward_elemt. grad_residual: empty unless a residual is given.
std::tuple<at::Tensor, at::Tensor> backward_elemt_impl(const at::Tensor& grad_out_, const at::Tensor& input_,
                                                       const at::Tensor& mean_, const at::Tensor& invstd_,
                                                       const OptionalTensor& weight, const OptionalTensor& bias,
                                                       const OptionalTensor& residual_, const at::Tensor& mean_dy_,
                                                       const at::Tensor& mean_dy_xmu_,
                                                       std::optional<Activation> activation, double slope) {
  c10::cuda::CUDAGuard guard(input_.device());
  const auto input = readable(input_);
  const auto grad_out = readable_as(grad_out_, input);
  const auto residual = readable_optional_as(residual_, input);
  auto grad_input = empty_output_like(input);
  auto grad_residual = residual.defined() ? empty_output_like(input) : at::empty({0}, input.options());
  if (input.numel() == 0) return {grad_input, grad_residual};
  const cuda::ParamTensor w(weight), b(bias);
  const auto mean = mean_.contiguous();
  const auto invstd = invstd_.contiguous();
  const auto mean_dy = mean_dy_.contiguous();
  const auto mean_dy_xmu = mean_dy_xmu_.contiguous();
  const auto plan = cuda::plan_for(input, {&input, &grad_out, &grad_input, &residual, &grad_residual});
  const auto dtype = cuda::dtype_of(input.scalar_type());
  if (activation) {
    auto fusion = cuda::act_fusion(*activation, slope, residual);
    if (residual.defined()) fusion.grad_residual = grad_residual.mutable_data_ptr();
    cuda::check_launch(cuda::launch_backward_elemt_act(
        dtype, plan, grad_out.const_data_ptr(), input.const_data_ptr(), grad_input.mutable_data_ptr(),
        mean.const_data_ptr(), invstd.const_data_ptr(), w.param(), b.param(), mean_dy.const_data_ptr(),
        mean_dy_xmu.const_data_ptr(), fusion, cuda::current_stream()));
  } else {
    cuda::check_launch(cuda::launch_backward_elemt(
        dtype, plan, grad_out.const_data_ptr(), input.const_data_ptr(), grad_input.mutable_data_ptr(),
        mean.const_data_ptr(), invstd.const_data_ptr(), w.param(), mean_dy.const_data_ptr(),
        mean_dy_xmu.const_data_ptr(), cuda::current_stream()));
  }
  return {grad_input, grad_residual};
}

at::Tensor backward_elemt_cuda(const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& mean,
                               const at::Tensor& invstd, const OptionalTensor& weight, const at::Tensor& mean_dy,
                               const at::Tensor& mean_dy_xmu) {
  check_backward_elemt(grad_out, input, mean, invstd, weight, mean_dy, mean_dy_xmu);
  return std::get<0>(backward_elemt_impl(grad_out, input, mean, invstd, weight, std::nullopt, std::nullopt, mean_dy,
                                         mean_dy_xmu, std::nullopt, 0.0));
}

std::tuple<at::Tensor, at::Tensor> backward_elemt_act_cuda(const at::Tensor& grad_out, const at::Tensor& input,
                                                           const at::Tensor& mean, const at::Tensor& invstd,
                                                           const OptionalTensor& weight, const OptionalTensor& bias,
                                                           const OptionalTensor& residual, c10::string_view act,
                                                           double slope, const at::Tensor& mean_dy,
                                                           const at::Tensor& mean_dy_xmu) {
  const auto activation = check_backward_elemt_act(grad_out, input, mean, invstd, weight, bias, residual, act, mean_dy,
                                                   mean_dy_xmu);
  return backward_elemt_impl(grad_out, input, mean, invstd, weight, bias, residual, mean_dy, mean_dy_xmu, activation,
                             slope);
}

}  // namespace

TORCH_LIBRARY_IMPL(bnfast, CUDA, m) {
  m.impl("backward_elemt", &backward_elemt_cuda);
  m.impl("backward_elemt_act", &backward_elemt_act_cuda);
}

}  // namespace bnfast
