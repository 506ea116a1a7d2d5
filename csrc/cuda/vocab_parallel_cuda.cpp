// ATen launchers of the vocab-parallel ops on CUDA: check arguments and allocate outputs (shared
// with the CPU launchers, vocab_parallel_args.h), then call the torch-free kernels of
// vocab_parallel_kernels.cu on the current stream of the logits' device.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "kernels/vocab_parallel_cuda.h"
#include "vocab_parallel_args.h"

namespace megatron_rl {
namespace {

void check_launch(const char* error, const char* op) {
  TORCH_CHECK(error == nullptr, op, ": CUDA kernel launch failed: ", error);
}

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

at::Tensor logprob_stats(const at::Tensor& logits, const std::optional<at::Tensor>& target,
                         double inv_temperature, int64_t vocab_start, int64_t valid_cols) {
  const c10::cuda::CUDAGuard device_guard(logits.device());
  StatsCall call = prepare_logprob_stats(logits, target, inv_temperature, vocab_start, valid_cols);
  check_launch(kernels::launch_logprob_stats(call.dtype, logits.const_data_ptr(), call.target, call.block,
                                             call.stats.data_ptr(), current_stream()),
               "megatron_rl::logprob_stats");
  return call.stats;
}

void run_logprob_entropy_backward(const BackwardCall& call, const at::Tensor& logits, const at::Tensor& lse,
                                  const at::Tensor& entropy, const at::Tensor& grad_logprob,
                                  const at::Tensor& grad_entropy, const char* op) {
  check_launch(kernels::launch_logprob_entropy_backward(
                   call.dtype, logits.const_data_ptr(), call.target, lse.const_data_ptr(),
                   entropy.const_data_ptr(), grad_logprob.const_data_ptr(), grad_entropy.const_data_ptr(),
                   call.block, call.grad.data_ptr(), call.grad_row_stride, current_stream()),
               op);
}

at::Tensor logprob_entropy_backward(const at::Tensor& logits, const at::Tensor& target,
                                    const at::Tensor& lse, const at::Tensor& entropy,
                                    const at::Tensor& grad_logprob, const at::Tensor& grad_entropy,
                                    double inv_temperature, int64_t vocab_start, int64_t valid_cols) {
  const c10::cuda::CUDAGuard device_guard(logits.device());
  const BackwardCall call = prepare_logprob_entropy_backward(
      logits, target, lse, entropy, grad_logprob, grad_entropy, inv_temperature, vocab_start, valid_cols, false);
  run_logprob_entropy_backward(call, logits, lse, entropy, grad_logprob, grad_entropy,
                               "megatron_rl::logprob_entropy_backward");
  return call.grad;
}

void logprob_entropy_backward_(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& lse,
                               const at::Tensor& entropy, const at::Tensor& grad_logprob,
                               const at::Tensor& grad_entropy, double inv_temperature, int64_t vocab_start,
                               int64_t valid_cols) {
  const c10::cuda::CUDAGuard device_guard(logits.device());
  const BackwardCall call = prepare_logprob_entropy_backward(
      logits, target, lse, entropy, grad_logprob, grad_entropy, inv_temperature, vocab_start, valid_cols, true);
  run_logprob_entropy_backward(call, logits, lse, entropy, grad_logprob, grad_entropy,
                               "megatron_rl::logprob_entropy_backward_");
}

at::Tensor covariance_partials(const at::Tensor& logits, const at::Tensor& delta, const at::Tensor& lse,
                               const at::Tensor& entropy, double inv_temperature, int64_t valid_cols) {
  const c10::cuda::CUDAGuard device_guard(logits.device());
  CovarianceCall call = prepare_covariance_partials(logits, delta, lse, entropy, inv_temperature, valid_cols);
  check_launch(kernels::launch_covariance_partials(call.dtype, call.delta_dtype, logits.const_data_ptr(),
                                                   delta.const_data_ptr(), call.delta_row_stride,
                                                   lse.const_data_ptr(), entropy.const_data_ptr(), call.block,
                                                   call.partials.data_ptr(), current_stream()),
               "megatron_rl::covariance_partials");
  return call.partials;
}

}  // namespace
}  // namespace megatron_rl

TORCH_LIBRARY_IMPL(megatron_rl, CUDA, m) {
  m.impl("logprob_stats", &megatron_rl::logprob_stats);
  m.impl("logprob_entropy_backward", &megatron_rl::logprob_entropy_backward);
  m.impl("logprob_entropy_backward_", &megatron_rl::logprob_entropy_backward_);
  m.impl("covariance_partials", &megatron_rl::covariance_partials);
}
