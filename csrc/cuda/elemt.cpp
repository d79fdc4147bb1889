// bnfast::elemt on CUDA, and elemt_act (with an activation): checks,
// allocation and launch (the kernel is in elemt_kernel.cu).
#include <torch/library.h>

#include <optional>

#include "ops.h"

namespace bnfast {
namespace {

// activation: none for the plain elemt.
at::Tensor elemt_impl(const at::Tensor& input_, const OptionalTensor& weight, const OptionalTensor& bias,
                      const at::Tensor& mean_, const at::Tensor& invstd_, const OptionalTensor& residual_,
                      std::optional<Activation> activation, double slope) {
  c10::cuda::CUDAGuard guard(input_.device());
  const auto input = readable(input_);
  const auto residual = readable_optional_as(residual_, input);
  auto output = empty_output_like(input);
  if (input.numel() == 0) return output;
  const cuda::ParamTensor w(weight), b(bias);
  const auto mean = mean_.contiguous();
  const auto invstd = invstd_.contiguous();
  const auto plan = cuda::plan_for(input, {&input, &output, &residual});
  const auto dtype = cuda::dtype_of(input.scalar_type());
  if (activation) {
    cuda::check_launch(cuda::launch_elemt_act(dtype, plan, input.const_data_ptr(), output.mutable_data_ptr(),
                                              w.param(), b.param(), mean.const_data_ptr(), invstd.const_data_ptr(),
                                              cuda::act_fusion(*activation, slope, residual),
                                              cuda::current_stream()));
  } else {
    cuda::check_launch(cuda::launch_elemt(dtype, plan, input.const_data_ptr(), output.mutable_data_ptr(), w.param(),
                                          b.param(), mean.const_data_ptr(), invstd.const_data_ptr(),
                                          cuda::current_stream()));
  }
  return output;
}

at::Tensor elemt_cuda(const at::Tensor& input, const OptionalTensor& weight, const OptionalTensor& bias,
                      const at::Tensor& mean, const at::Tensor& invstd) {
  check_elemt(input, weight, bias, mean, invstd);
  return elemt_impl(input, weight, bias, mean, invstd, std::nullopt, std::nullopt, 0.0);
}

at::Tensor elemt_act_cuda(const at::Tensor& input, const OptionalTensor& weight, const OptionalTensor& bias,
                          const at::Tensor& mean, const at::Tensor& invstd, const OptionalTensor& residual,
                          c10::string_view act, double slope) {
  const auto activation = check_elemt_act(input, weight, bias, mean, invstd, residual, act);
  return elemt_impl(input, weight, bias, mean, invstd, residual, activation, slope);
}

}  // namespace

TORCH_LIBRARY_IMPL(bnfast, CUDA, m) {
  m.impl("elemt", &elemt_cuda);
  m.impl("elemt_act", &elemt_act_cuda);
}

}  // namespace bnfast
