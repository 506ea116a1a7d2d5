// ATen launchers of the vocab-parallel ops on CPU: split rows across torch's intra-op threads and
// run the torch-free kernels of kernels/vocab_parallel_cpu.h (arguments checked and outputs
// allocated by vocab_parallel_args.h, shared with the CUDA launchers).
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <torch/library.h>

#include <algorithm>

#include "kernels/vocab_parallel_cpu.h"
#include "vocab_parallel_args.h"

namespace megatron_rl {
namespace {

// The kernels' vector width follows ATen's CPU capability (ATEN_CPU_CAPABILITY, else the best the
// CPU has), so that pinning it pins the extension too (kernels/vocab_parallel_cpu.h says why).
kernels::CpuIsa kernel_isa() {
  static const kernels::CpuIsa isa = [] {
    const std::string capability = at::get_cpu_capability();
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
    if (capability == "AVX512" && __builtin_cpu_supports("x86-64-v4")) return kernels::CpuIsa::kAvx512;
    if (capability != "DEFAULT" && __builtin_cpu_supports("x86-64-v3")) return kernels::CpuIsa::kAvx2;
#endif
    return kernels::CpuIsa::kBaseline;
  }();
  return isa;
}

// Rows per task: enough columns per task (~64k) to amortise scheduling on short rows.
int64_t row_grain(const kernels::VocabBlock& b) {
  return std::max<int64_t>(1, 65536 / std::max<int64_t>(b.cols, 1));
}

at::Tensor logprob_stats(const at::Tensor& logits, const std::optional<at::Tensor>& target,
                         double inv_temperature, int64_t vocab_start, int64_t valid_cols) {
  StatsCall call = prepare_logprob_stats(logits, target, inv_temperature, vocab_start, valid_cols);
  kernels::dispatch_dtype(call.dtype, [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    auto* out = static_cast<kernels::acc_type<scalar_t>*>(call.stats.data_ptr());
    at::parallel_for(0, call.block.rows, row_grain(call.block), [&](int64_t begin, int64_t end) {
      kernels::logprob_stats_cpu(kernel_isa(), typed<scalar_t>(logits), call.target, call.block, out, begin, end);
    });
  });
  return call.stats;
}

// Writes the gradient into call.grad (a new tensor, or the logits for the in-place op).
void run_logprob_entropy_backward(const BackwardCall& call, const at::Tensor& logits, const at::Tensor& lse,
                                  const at::Tensor& entropy, const at::Tensor& grad_logprob,
                                  const at::Tensor& grad_entropy) {
  kernels::dispatch_dtype(call.dtype, [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    using acc_t = kernels::acc_type<scalar_t>;
    auto* out = static_cast<scalar_t*>(call.grad.data_ptr());
    at::parallel_for(0, call.block.rows, row_grain(call.block), [&](int64_t begin, int64_t end) {
      kernels::logprob_entropy_backward_cpu(kernel_isa(), typed<scalar_t>(logits), call.target, typed<acc_t>(lse),
                                            typed<acc_t>(entropy), typed<acc_t>(grad_logprob),
                                            typed<acc_t>(grad_entropy), call.block, out, call.grad_row_stride,
                                            begin, end);
    });
  });
}

at::Tensor logprob_entropy_backward(const at::Tensor& logits, const at::Tensor& target,
                                    const at::Tensor& lse, const at::Tensor& entropy,
                                    const at::Tensor& grad_logprob, const at::Tensor& grad_entropy,
                                    double inv_temperature, int64_t vocab_start, int64_t valid_cols) {
  const BackwardCall call = prepare_logprob_entropy_backward(
      logits, target, lse, entropy, grad_logprob, grad_entropy, inv_temperature, vocab_start, valid_cols, false);
  run_logprob_entropy_backward(call, logits, lse, entropy, grad_logprob, grad_entropy);
  return call.grad;
}

void logprob_entropy_backward_(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& lse,
                               const at::Tensor& entropy, const at::Tensor& grad_logprob,
                               const at::Tensor& grad_entropy, double inv_temperature, int64_t vocab_start,
                               int64_t valid_cols) {
  const BackwardCall call = prepare_logprob_entropy_backward(
      logits, target, lse, entropy, grad_logprob, grad_entropy, inv_temperature, vocab_start, valid_cols, true);
  run_logprob_entropy_backward(call, logits, lse, entropy, grad_logprob, grad_entropy);
}

at::Tensor covariance_partials(const at::Tensor& logits, const at::Tensor& delta, const at::Tensor& lse,
                               const at::Tensor& entropy, double inv_temperature, int64_t valid_cols) {
  CovarianceCall call = prepare_covariance_partials(logits, delta, lse, entropy, inv_temperature, valid_cols);
  kernels::dispatch_dtype(call.dtype, [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    using acc_t = kernels::acc_type<scalar_t>;
    auto* out = static_cast<acc_t*>(call.partials.data_ptr());
    auto run = [&](auto delta_tag) {
      using delta_t = typename decltype(delta_tag)::type;
      at::parallel_for(0, call.block.rows, row_grain(call.block), [&](int64_t begin, int64_t end) {
        kernels::covariance_partials_cpu(kernel_isa(), typed<scalar_t>(logits), typed<delta_t>(delta), call.delta_row_stride,
                                         typed<acc_t>(lse), typed<acc_t>(entropy), call.block, out, begin, end);
      });
    };
    if (call.delta_dtype == call.dtype) run(tag);
    else run(kernels::TypeTag<float>{});
  });
  return call.partials;
}

}  // namespace
}  // namespace megatron_rl

// Which copy of the CPU kernels runs ("avx512", "avx2" or "baseline"): what a run reports beside
// ATen's capability, and what tests/unit/test_ops.py checks follows ATEN_CPU_CAPABILITY.
TORCH_LIBRARY_FRAGMENT(megatron_rl, m) {
  m.def("cpu_kernel_isa() -> str", [] {
    switch (megatron_rl::kernel_isa()) {
      case megatron_rl::kernels::CpuIsa::kAvx512: return std::string("avx512");
      case megatron_rl::kernels::CpuIsa::kAvx2: return std::string("avx2");
      default: return std::string("baseline");
    }
  });
}

TORCH_LIBRARY_IMPL(megatron_rl, CPU, m) {
  m.impl("logprob_stats", &megatron_rl::logprob_stats);
  m.impl("logprob_entropy_backward", &megatron_rl::logprob_entropy_backward);
  m.impl("logprob_entropy_backward_", &megatron_rl::logprob_entropy_backward_);
  m.impl("covariance_partials", &megatron_rl::covariance_partials);
}
