// Torch-free host entry points of the CUDA kernels (csrc/cuda/vocab_parallel_kernels.cu), called by
// the ATen launchers in csrc/cuda/vocab_parallel_cuda.cpp. Pointers are device pointers; per-token
// vectors are in the accumulation dtype (double for kFloat64 logits, float otherwise). Each returns
// nullptr on success or the CUDA error string of the launch.
#pragma once

#include <cuda_runtime_api.h>

#include "kernels/vocab_math.h"

namespace megatron_rl {
namespace kernels {

// stats [4, rows] as in logprob_stats_cpu; target may be nullptr.
const char* launch_logprob_stats(DType dtype, const void* logits, const int64_t* target, const VocabBlock& block,
                                 void* stats, cudaStream_t stream);

// grad [rows, cols] in the logits' dtype, rows grad_row_stride elements apart; may be the logits.
const char* launch_logprob_entropy_backward(DType dtype, const void* logits, const int64_t* target,
                                            const void* lse, const void* entropy, const void* grad_logprob,
                                            const void* grad_entropy, const VocabBlock& block, void* grad,
                                            int64_t grad_row_stride, cudaStream_t stream);

// partials [2, rows]; delta_dtype is the logits' dtype or kFloat32.
const char* launch_covariance_partials(DType dtype, DType delta_dtype, const void* logits, const void* delta,
                                       int64_t delta_row_stride, const void* lse, const void* entropy,
                                       const VocabBlock& block, void* partials, cudaStream_t stream);

}  // namespace kernels
}  // namespace megatron_rl
