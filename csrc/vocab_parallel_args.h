// Argument checking and output allocation shared by the CPU and CUDA launchers of the
// vocab-parallel ops, so each launcher only picks threads/streams and calls its kernels.
#pragma once

#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <optional>

#include "kernels/vocab_math.h"

namespace megatron_rl {

inline kernels::DType kernel_dtype(at::ScalarType t, const char* op) {
  switch (t) {
    case at::kFloat: return kernels::DType::kFloat32;
    case at::kDouble: return kernels::DType::kFloat64;
    case at::kBFloat16: return kernels::DType::kBFloat16;
    case at::kHalf: return kernels::DType::kFloat16;
    default: TORCH_CHECK(false, op, ": unsupported dtype ", t, " (float32, float64, bfloat16, float16)");
  }
}

// fp32 math and outputs for every input dtype but fp64.
inline at::ScalarType acc_dtype(const at::Tensor& logits) {
  return logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// A 2-D [rows, cols] logits block with unit column stride (rows may be strided).
inline kernels::VocabBlock vocab_block(const at::Tensor& logits, double inv_temperature,
                                       int64_t vocab_start, int64_t valid_cols, const char* op) {
  TORCH_CHECK(logits.dim() == 2, op, ": logits must be 2-D [tokens, vocab_block], got ", logits.sizes());
  TORCH_CHECK(logits.size(1) <= 1 || logits.stride(1) == 1, op, ": logits columns must be contiguous");
  TORCH_CHECK(inv_temperature > 0 && std::isfinite(inv_temperature), op,
              ": temperature must be positive and finite");
  TORCH_CHECK(valid_cols >= 0 && valid_cols <= logits.size(1), op, ": valid_cols=", valid_cols,
              " outside [0, ", logits.size(1), "]");
  kernel_dtype(logits.scalar_type(), op);
  return kernels::VocabBlock{logits.size(0), logits.size(1),
                             logits.size(0) > 1 ? logits.stride(0) : logits.size(1), valid_cols,
                             vocab_start, inv_temperature};
}

// A per-token vector [rows] that the kernels read: contiguous, on the logits' device, of `dtype`.
inline void check_row_vector(const at::Tensor& v, const at::Tensor& logits, at::ScalarType dtype,
                             const char* name, const char* op) {
  TORCH_CHECK(v.dim() == 1 && v.size(0) == logits.size(0), op, ": ", name, " must be [", logits.size(0),
              "], got ", v.sizes());
  TORCH_CHECK(v.scalar_type() == dtype, op, ": ", name, " must be ", dtype, ", got ", v.scalar_type());
  TORCH_CHECK(v.is_contiguous(), op, ": ", name, " must be contiguous");
  TORCH_CHECK(v.device() == logits.device(), op, ": ", name, " is on ", v.device(), ", logits on ",
              logits.device());
}

inline const int64_t* target_ptr(const std::optional<at::Tensor>& target, const at::Tensor& logits,
                                 const char* op) {
  if (!target.has_value()) return nullptr;
  check_row_vector(*target, logits, at::kLong, "target", op);
  return target->const_data_ptr<int64_t>();
}

// Checked arguments and the allocated output of one op call, ready for a device's kernels.
struct StatsCall {
  kernels::VocabBlock block;
  kernels::DType dtype;
  const int64_t* target;  // nullptr: no target column
  at::Tensor stats;       // [4, rows], accumulation dtype
};

inline StatsCall prepare_logprob_stats(const at::Tensor& logits, const std::optional<at::Tensor>& target,
                                       double inv_temperature, int64_t vocab_start, int64_t valid_cols) {
  const char* op = "megatron_rl::logprob_stats";
  const kernels::VocabBlock b = vocab_block(logits, inv_temperature, vocab_start, valid_cols, op);
  return StatsCall{b, kernel_dtype(logits.scalar_type(), op), target_ptr(target, logits, op),
                   at::empty({4, b.rows}, logits.options().dtype(acc_dtype(logits)))};
}

struct BackwardCall {
  kernels::VocabBlock block;
  kernels::DType dtype;
  const int64_t* target;
  at::Tensor grad;          // [rows, cols], logits' dtype: a new contiguous tensor, or the logits
  int64_t grad_row_stride;  // elements between rows of grad
};

// inplace: the gradient overwrites the logits (callers whose logits are dead after the backward);
// otherwise it goes to a new contiguous tensor.
inline BackwardCall prepare_logprob_entropy_backward(const at::Tensor& logits, const at::Tensor& target,
                                                     const at::Tensor& lse, const at::Tensor& entropy,
                                                     const at::Tensor& grad_logprob,
                                                     const at::Tensor& grad_entropy, double inv_temperature,
                                                     int64_t vocab_start, int64_t valid_cols, bool inplace) {
  const char* op = inplace ? "megatron_rl::logprob_entropy_backward_" : "megatron_rl::logprob_entropy_backward";
  const kernels::VocabBlock b = vocab_block(logits, inv_temperature, vocab_start, valid_cols, op);
  const at::ScalarType acc = acc_dtype(logits);
  check_row_vector(lse, logits, acc, "lse", op);
  check_row_vector(entropy, logits, acc, "entropy", op);
  check_row_vector(grad_logprob, logits, acc, "grad_logprob", op);
  check_row_vector(grad_entropy, logits, acc, "grad_entropy", op);
  if (inplace) {
    // Rows that share memory would be written by one row and read by another.
    TORCH_CHECK(at::has_internal_overlap(logits) != at::MemOverlap::Yes, op,
                ": logits have overlapping rows; they cannot hold the gradient in place");
    return BackwardCall{b, kernel_dtype(logits.scalar_type(), op), target_ptr(target, logits, op), logits,
                        b.row_stride};
  }
  return BackwardCall{b, kernel_dtype(logits.scalar_type(), op), target_ptr(target, logits, op),
                      at::empty({b.rows, b.cols}, logits.options()), b.cols};
}

struct CovarianceCall {
  kernels::VocabBlock block;
  kernels::DType dtype;
  kernels::DType delta_dtype;  // the logits' dtype or float32
  int64_t delta_row_stride;
  at::Tensor partials;  // [2, rows], accumulation dtype
};

inline CovarianceCall prepare_covariance_partials(const at::Tensor& logits, const at::Tensor& delta,
                                                  const at::Tensor& lse, const at::Tensor& entropy,
                                                  double inv_temperature, int64_t valid_cols) {
  const char* op = "megatron_rl::covariance_partials";
  const kernels::VocabBlock b = vocab_block(logits, inv_temperature, 0, valid_cols, op);
  TORCH_CHECK(delta.sizes() == logits.sizes(), op, ": delta ", delta.sizes(), " vs logits ", logits.sizes());
  TORCH_CHECK(delta.size(1) <= 1 || delta.stride(1) == 1, op, ": delta columns must be contiguous");
  TORCH_CHECK(delta.device() == logits.device(), op, ": delta and logits on different devices");
  // delta is read either in the logits' dtype or in fp32 (a logits difference kept in fp32).
  TORCH_CHECK(delta.scalar_type() == logits.scalar_type() || delta.scalar_type() == at::kFloat, op,
              ": delta must have the logits' dtype or float32, got ", delta.scalar_type());
  const at::ScalarType acc = acc_dtype(logits);
  check_row_vector(lse, logits, acc, "lse", op);
  check_row_vector(entropy, logits, acc, "entropy", op);
  return CovarianceCall{b, kernel_dtype(logits.scalar_type(), op), kernel_dtype(delta.scalar_type(), op),
                        delta.size(0) > 1 ? delta.stride(0) : delta.size(1),
                        at::empty({2, b.rows}, logits.options().dtype(acc))};
}

template <typename T>
const T* typed(const at::Tensor& t) {
  return static_cast<const T*>(t.const_data_ptr());
}

}  // namespace megatron_rl
