// Torch-free CPU kernels of the vocab-parallel ops. Each processes rows [row_begin, row_end) of a
// logits block so the caller can split rows across threads; every pass over a row is an
// `omp simd` loop (vectorised reductions without -ffast-math). A row is read from memory once per
// op: the max pass pulls it into L2 (a 150k-vocab fp32 row is 300 KB per TP=2 shard at most) and
// the exp pass re-reads it from there. The masked selects in these loops vectorise only with
// -fno-trapping-math (setup.py).
#pragma once

#include "kernels/vocab_math.h"

// The extension is built for x86-64-v2 (SSE4) so it loads anywhere; each kernel is also compiled
// for AVX2 (x86-64-v3) and AVX-512 (x86-64-v4), since the exp-heavy loops are compute-bound at 4
// lanes. Which copy runs is the caller's choice (CpuIsa), not the CPU's: the launcher follows
// ATen's CPU capability (ATEN_CPU_CAPABILITY), so one setting pins every numeric path of a run to
// one vector width and its results are bitwise the same on AVX2-only and AVX-512 machines (the
// copies' sums differ in their last bits: the vector width changes their order).
// A kernel is written once as NAME_body, inlined into one copy per instruction set by
// MRL_CPU_KERNEL_COPIES, which also defines NAME(isa, args...) to call the chosen copy.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define MRL_CPU_KERNEL_BODY __attribute__((always_inline)) inline
#define MRL_TARGET_AVX2 __attribute__((target("arch=x86-64-v3")))
#define MRL_TARGET_AVX512 __attribute__((target("arch=x86-64-v4")))
#else
#define MRL_CPU_KERNEL_BODY inline
#define MRL_TARGET_AVX2
#define MRL_TARGET_AVX512
#endif

#define MRL_CPU_KERNEL_COPIES(NAME)                                                          \
  template <typename... Args> MRL_TARGET_AVX512 void NAME##_avx512(Args... args) {           \
    NAME##_body(args...);                                                                    \
  }                                                                                          \
  template <typename... Args> MRL_TARGET_AVX2 void NAME##_avx2(Args... args) {               \
    NAME##_body(args...);                                                                    \
  }                                                                                          \
  template <typename... Args> void NAME##_baseline(Args... args) { NAME##_body(args...); }   \
  template <typename... Args> void NAME(CpuIsa isa, Args... args) {                          \
    switch (isa) {                                                                           \
      case CpuIsa::kAvx512: return NAME##_avx512(args...);                                   \
      case CpuIsa::kAvx2: return NAME##_avx2(args...);                                       \
      default: return NAME##_baseline(args...);                                              \
    }                                                                                        \
  }

namespace megatron_rl {
namespace kernels {

// The vector width the CPU kernels run at (see the top of this file).
enum class CpuIsa : int { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };

inline bool target_column(const int64_t* target, int64_t row, const VocabBlock& b, int64_t& col) {
  if (target == nullptr) return false;
  col = target[row] - b.vocab_start;
  return col >= 0 && col < b.valid_cols;
}

// stats [4, rows]: max z, sum exp(z - max), sum exp(z - max) (z - max), z[target] (0 when the
// target is not in this block); each relative to this block only (merged across blocks later).
template <typename scalar_t>
MRL_CPU_KERNEL_BODY void logprob_stats_cpu_body(const scalar_t* logits, const int64_t* target, const VocabBlock& b,
                       acc_type<scalar_t>* stats, int64_t row_begin, int64_t row_end) {
  using acc_t = acc_type<scalar_t>;
  const acc_t inv_t = static_cast<acc_t>(b.inv_temperature);
  const int64_t n = b.valid_cols;
  for (int64_t r = row_begin; r < row_end; ++r) {
    const scalar_t* x = logits + r * b.row_stride;
    acc_t raw_max = neg_infinity<acc_t>();
#pragma omp simd reduction(max : raw_max)
    for (int64_t j = 0; j < n; ++j) {
      const acc_t v = to_acc<acc_t>(x[j]);
      raw_max = v > raw_max ? v : raw_max;
    }
    // max(x / T) = max(x) / T exactly, since scaling by 1/T > 0 is monotone.
    const acc_t m = raw_max * inv_t;
    acc_t sum_exp = 0, sum_exp_z = 0;
    if (m > neg_infinity<acc_t>()) {
#pragma omp simd reduction(+ : sum_exp, sum_exp_z)
      for (int64_t j = 0; j < n; ++j) {
        const acc_t shifted = to_acc<acc_t>(x[j]) * inv_t - m;
        const acc_t e = exp_bounded(shifted);
        sum_exp += e;
        sum_exp_z += e > acc_t(0) ? e * shifted : acc_t(0);
      }
    }
    int64_t col;
    stats[r] = m;
    stats[b.rows + r] = sum_exp;
    stats[2 * b.rows + r] = sum_exp_z;
    stats[3 * b.rows + r] = target_column(target, r, b, col) ? to_acc<acc_t>(x[col]) * inv_t : acc_t(0);
  }
}
MRL_CPU_KERNEL_COPIES(logprob_stats_cpu)

// grad [rows, cols] (row stride grad_row_stride, logits' dtype) of g_logprob * logprob +
// g_entropy * entropy, recomputing p from the logits and the global lse; padding columns get 0.
// grad may be the logits themselves (in-place backward): each element is read before it is
// written, and the target column's logit is read before the row is overwritten.
template <typename scalar_t>
MRL_CPU_KERNEL_BODY void logprob_entropy_backward_cpu_body(const scalar_t* logits, const int64_t* target,
                                  const acc_type<scalar_t>* lse, const acc_type<scalar_t>* entropy,
                                  const acc_type<scalar_t>* grad_logprob,
                                  const acc_type<scalar_t>* grad_entropy, const VocabBlock& b,
                                  scalar_t* grad, int64_t grad_row_stride, int64_t row_begin,
                                  int64_t row_end) {
  using acc_t = acc_type<scalar_t>;
  const acc_t inv_t = static_cast<acc_t>(b.inv_temperature);
  for (int64_t r = row_begin; r < row_end; ++r) {
    const scalar_t* x = logits + r * b.row_stride;
    scalar_t* g = grad + r * grad_row_stride;
    const acc_t row_lse = lse[r], row_entropy = entropy[r];
    // The 1/T of dz/dlogits is folded into the per-row coefficients.
    const acc_t g_lp = grad_logprob[r] * inv_t, g_h = grad_entropy[r] * inv_t;
    auto grad_of = [&](scalar_t logit, bool is_target) {
      const acc_t lp = to_acc<acc_t>(logit) * inv_t - row_lse;
      return from_acc<scalar_t>(logprob_entropy_grad(lp, exp_bounded(lp), row_entropy, g_lp, g_h, is_target));
    };
    int64_t target_col;
    const bool has_target = target_column(target, r, b, target_col);
    const scalar_t target_logit = has_target ? x[target_col] : scalar_t{};
#pragma omp simd
    for (int64_t j = 0; j < b.valid_cols; ++j) g[j] = grad_of(x[j], false);
    // The target column is redone outside the loop: a 64-bit index compare per element would
    // halve the vector width of the loop.
    if (has_target) g[target_col] = grad_of(target_logit, true);
    for (int64_t j = b.valid_cols; j < b.cols; ++j) g[j] = from_acc<scalar_t>(acc_t(0));
  }
}
MRL_CPU_KERNEL_COPIES(logprob_entropy_backward_cpu)

// partials [2, rows]: sum over this block of p (log p + H) d and of p d, given the global lse and H.
template <typename scalar_t, typename delta_t>
MRL_CPU_KERNEL_BODY void covariance_partials_cpu_body(const scalar_t* logits, const delta_t* delta, int64_t delta_row_stride,
                             const acc_type<scalar_t>* lse, const acc_type<scalar_t>* entropy,
                             const VocabBlock& b, acc_type<scalar_t>* partials, int64_t row_begin,
                             int64_t row_end) {
  using acc_t = acc_type<scalar_t>;
  const acc_t inv_t = static_cast<acc_t>(b.inv_temperature);
  for (int64_t r = row_begin; r < row_end; ++r) {
    const scalar_t* x = logits + r * b.row_stride;
    const delta_t* d = delta + r * delta_row_stride;
    const acc_t row_lse = lse[r], row_entropy = entropy[r];
    acc_t cov = 0, mean = 0;
#pragma omp simd reduction(+ : cov, mean)
    for (int64_t j = 0; j < b.valid_cols; ++j) {
      const acc_t lp = to_acc<acc_t>(x[j]) * inv_t - row_lse;
      acc_t cov_j, mean_j;
      covariance_terms(lp, exp_bounded(lp), row_entropy, to_acc<acc_t>(d[j]), cov_j, mean_j);
      cov += cov_j;
      mean += mean_j;
    }
    partials[r] = cov;
    partials[b.rows + r] = mean;
  }
}
MRL_CPU_KERNEL_COPIES(covariance_partials_cpu)

}  // namespace kernels
}  // namespace megatron_rl
