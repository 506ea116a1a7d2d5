// Torch-free math shared by the CPU and CUDA kernels of the vocab-parallel log-prob / entropy /
// covariance ops: storage types, conversions, a bounded exp, and the per-row softmax statistics.
//
// Notation (see docs/ops.md): z = logits / T over the valid columns of a row, lse = logsumexp(z)
// over the whole (sharded) vocabulary, p = exp(z - lse), H = -sum p log p.
// A block of columns (one TP shard, or one vocab chunk) is summarised by
//   max = max z,  sum_exp = sum exp(z - max),  sum_exp_z = sum exp(z - max) * (z - max)
// and two summaries merge exactly (online softmax carrying the first moment), which is what lets
// each shard read its logits once and leave the rest to two all-reduces over O(tokens) values.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#if defined(__CUDACC__)
#include <cuda_fp16.h>
#define MRL_HD __host__ __device__ __forceinline__
#else
#define MRL_HD inline
#endif

namespace megatron_rl {
namespace kernels {

// 16-bit storage types with the bit layout of torch's BFloat16 / Half, so ATen data pointers can be
// reinterpreted as these without the kernels depending on torch.
struct bfloat16_t { uint16_t bits; };
struct float16_t { uint16_t bits; };

enum class DType : int { kFloat32 = 0, kFloat64 = 1, kBFloat16 = 2, kFloat16 = 3 };

// fp32 math for every input type except fp64, which keeps fp64 math (gradcheck runs through it).
template <typename scalar_t> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };
template <typename scalar_t> using acc_type = typename AccOf<scalar_t>::type;

// Geometry of one block of logits columns held by this process.
struct VocabBlock {
  int64_t rows;          // tokens
  int64_t cols;          // columns in the block (the TP shard width, or a vocab chunk)
  int64_t row_stride;    // elements between consecutive rows of the logits
  int64_t valid_cols;    // columns [0, valid_cols) are real vocabulary; the rest is padding
  int64_t vocab_start;   // global token id of column 0
  double inv_temperature;
};

MRL_HD float bits_to_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

MRL_HD uint32_t float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
#endif
}

template <typename acc_t> MRL_HD acc_t to_acc(float v) { return static_cast<acc_t>(v); }
template <typename acc_t> MRL_HD acc_t to_acc(double v) { return static_cast<acc_t>(v); }
template <typename acc_t> MRL_HD acc_t to_acc(bfloat16_t v) {
  return static_cast<acc_t>(bits_to_float(static_cast<uint32_t>(v.bits) << 16));
}
template <typename acc_t> MRL_HD acc_t to_acc(float16_t v) {
#if defined(__CUDA_ARCH__)
  // The hardware conversion; the bit trick below would lose half subnormals to fast-math FTZ.
  return static_cast<acc_t>(__half2float(__ushort_as_half(v.bits)));
#else
  // Branch-free half -> float: shift exponent+mantissa into place and rebias with one multiply
  // (2^112 = 2^(127-15)), which also turns half subnormals into the right float; inf/nan get the
  // all-ones float exponent. Vectorises, unlike a table or a branchy conversion.
  const uint32_t h = v.bits;
  const uint32_t magnitude = (h & 0x7fffu) << 13;
  const float scaled = bits_to_float(magnitude) * 5.192296858534828e33f;  // 2^112
  const uint32_t finite_or_special =
      (h & 0x7fffu) >= 0x7c00u ? (magnitude | 0x7f800000u) : float_to_bits(scaled);
  return static_cast<acc_t>(bits_to_float(finite_or_special | ((h & 0x8000u) << 16)));
#endif
}

template <typename scalar_t> MRL_HD scalar_t from_float(float v);
template <> MRL_HD float from_float<float>(float v) { return v; }
template <> MRL_HD double from_float<double>(float v) { return v; }
template <> MRL_HD bfloat16_t from_float<bfloat16_t>(float v) {
  // Round to nearest even, as torch does; NaN stays a quiet NaN.
  // Branch-free so the CPU gradient loops stay vectorised for bf16.
  const uint32_t u = float_to_bits(v);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return bfloat16_t{static_cast<uint16_t>((u & 0x7fffffffu) > 0x7f800000u ? ((u >> 16) | 0x40u) : rounded)};
}
template <> MRL_HD float16_t from_float<float16_t>(float v) {
#if defined(__CUDA_ARCH__)
  return float16_t{__half_as_ushort(__float2half_rn(v))};
#else
  // Round to nearest even float -> half; overflow to inf, underflow through half subnormals.
  const uint32_t u = float_to_bits(v);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return float16_t{static_cast<uint16_t>(sign | 0x7e00u)};
  if (a >= 0x477ff000u) return float16_t{static_cast<uint16_t>(sign | 0x7c00u)};  // >= 65520
  if (a < 0x38800000u) {  // below the smallest normal half (2^-14): add 0.5 to round in float
    const float shifted = bits_to_float(a) + 0.5f;
    return float16_t{static_cast<uint16_t>(sign | (float_to_bits(shifted) - 0x3f000000u))};
  }
  const uint32_t rebased = a - (112u << 23);
  return float16_t{static_cast<uint16_t>(sign | ((rebased + 0xfffu + ((rebased >> 13) & 1u)) >> 13))};
#endif
}
template <typename scalar_t> MRL_HD scalar_t from_acc(float v) { return from_float<scalar_t>(v); }
template <typename scalar_t> MRL_HD scalar_t from_acc(double v) { return static_cast<scalar_t>(v); }

// exp(x) for x <= ~88, exactly 0 for x < -87 (and for -inf: masked logits have zero probability).
// On the CPU this is a branch-free Cody-Waite reduction + degree-6 polynomial (rel. error ~2e-7)
// written so that `omp simd` loops vectorise it, which libm's expf does not at -march=x86-64-v2.
MRL_HD float exp_bounded(float x) {
#if defined(__CUDA_ARCH__)
  return __expf(x);
#else
  // Plain compares instead of fminf/fmaxf, whose NaN rules keep GCC from vectorising them.
  const float xc = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  const float round_magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float n = (xc * 1.44269504088896341f + round_magic) - round_magic;
  const float r = (xc - n * 0.693359375f) - n * -2.12194440e-4f;  // ln2 split hi + lo
  float poly = 1.9875691500e-4f;
  poly = poly * r + 1.3981999507e-3f;
  poly = poly * r + 8.3334519073e-3f;
  poly = poly * r + 4.1665795894e-2f;
  poly = poly * r + 1.6666665459e-1f;
  poly = poly * r + 5.0000001201e-1f;
  const float exp_r = poly * r * r + r + 1.0f;
  const float two_n = bits_to_float(static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23);
  const float result = x < -87.0f ? 0.0f : exp_r * two_n;
  return x == x ? result : x;  // NaN in, NaN out
#endif
}
MRL_HD double exp_bounded(double x) { return exp(x); }

template <typename acc_t> MRL_HD acc_t neg_infinity() {
  return -std::numeric_limits<acc_t>::infinity();
}

// Summary of a block of columns of one row (see the top of this file).
template <typename acc_t>
struct SoftmaxMoments {
  acc_t max;
  acc_t sum_exp;
  acc_t sum_exp_z;
};

// Re-expresses a summary relative to a larger max m (m >= s.max). A summary with no mass (all
// columns -inf, or none) stays zero instead of producing (-inf) - (-inf).
template <typename acc_t>
MRL_HD void rebase_moments(const SoftmaxMoments<acc_t>& s, acc_t m, acc_t& sum_exp, acc_t& sum_exp_z) {
  if (s.sum_exp > acc_t(0)) {
    const acc_t shift = s.max - m;
    const acc_t scale = exp_bounded(shift);
    sum_exp = s.sum_exp * scale;
    sum_exp_z = scale * (s.sum_exp_z + shift * s.sum_exp);
  } else {
    sum_exp = acc_t(0);
    sum_exp_z = acc_t(0);
  }
}

template <typename acc_t>
MRL_HD SoftmaxMoments<acc_t> merge_moments(const SoftmaxMoments<acc_t>& a, const SoftmaxMoments<acc_t>& b) {
  const acc_t m = a.max > b.max ? a.max : b.max;
  acc_t sa, wa, sb, wb;
  rebase_moments(a, m, sa, wa);
  rebase_moments(b, m, sb, wb);
  return SoftmaxMoments<acc_t>{m, sa + sb, wa + wb};
}

// d/dz of (g_logprob * logprob + g_entropy * entropy) for one column, with lp = z - lse:
//   g_logprob * (onehot - p) - g_entropy * p * (lp + H).
// Where p underflows to 0 (lp = -inf for masked logits) the entropy term is 0, not 0 * inf.
template <typename acc_t>
MRL_HD acc_t logprob_entropy_grad(acc_t lp, acc_t p, acc_t entropy, acc_t g_logprob, acc_t g_entropy,
                                  bool is_target) {
  const acc_t entropy_term = p > acc_t(0) ? p * (lp + entropy) : acc_t(0);
  return (is_target ? g_logprob : acc_t(0)) - g_logprob * p - g_entropy * entropy_term;
}

// Contribution of one column to (Cov_p(log p, d), E_p[d]): p (log p + H) d and p d. Centering log p
// by -H (its mean under p) inside the sum avoids the cancellation of E[d log p] - E[d] E[log p].
template <typename acc_t>
MRL_HD void covariance_terms(acc_t lp, acc_t p, acc_t entropy, acc_t d, acc_t& cov, acc_t& mean) {
  cov = p > acc_t(0) ? p * (lp + entropy) * d : acc_t(0);
  mean = p > acc_t(0) ? p * d : acc_t(0);
}

}  // namespace kernels
}  // namespace megatron_rl

namespace megatron_rl {
namespace kernels {

template <typename T> struct TypeTag { using type = T; };

// Calls f(TypeTag<storage type>{}) for a logits dtype: the one place that maps dtypes to the
// kernel templates, shared by the CPU and CUDA launchers.
template <typename F>
decltype(auto) dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat64: return f(TypeTag<double>{});
    case DType::kBFloat16: return f(TypeTag<bfloat16_t>{});
    case DType::kFloat16: return f(TypeTag<float16_t>{});
    case DType::kFloat32:
    default: return f(TypeTag<float>{});
  }
}

}  // namespace kernels
}  // namespace megatron_rl
