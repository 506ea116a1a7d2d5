// CUDA kernels of the vocab-parallel log-prob / entropy / covariance ops. Torch-free: plain nvcc
// compiles this file (ci/check_cuda_kernels.sh); the ATen side is csrc/cuda/vocab_parallel_cuda.cpp.
//
// One thread block per token row. Threads stride over the row in 16-byte packs (8 bf16/fp16,
// 4 fp32, 2 fp64 columns per load) when the rows are 16-byte aligned, so each op reads the logits
// exactly once; per-thread partial results are combined with warp shuffles and one shared-memory
// step. The stats kernel keeps an online (max, sum exp, sum exp * z) per thread: one exp per
// element, plus a rescale only when a thread's running max grows.
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "kernels/vocab_math.h"
#include "kernels/vocab_parallel_cuda.h"

namespace megatron_rl {
namespace kernels {
namespace {

constexpr int kWarp = 32;
constexpr int kMaxThreads = 512;

template <typename scalar_t>
constexpr int kPackWidth = 16 / static_cast<int>(sizeof(scalar_t));

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <int N, typename T>
__device__ __forceinline__ Pack<T, N> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, N>*>(p);
}

template <int N, typename T>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, N>& pack) {
  *reinterpret_cast<Pack<T, N>*>(p) = pack;
}

// Calls f(j, width) for the column packs [j, j + VEC) of [0, n), strided over the block's threads,
// then for the tail columns one at a time; width is std::integral_constant<int, VEC or 1>.
template <int VEC, typename F>
__device__ __forceinline__ void for_each_pack(int64_t n, F&& f) {
  const int64_t whole = n / VEC * VEC;
  for (int64_t j = int64_t(threadIdx.x) * VEC; j < whole; j += int64_t(blockDim.x) * VEC) {
    f(j, std::integral_constant<int, VEC>{});
  }
  for (int64_t j = whole + threadIdx.x; j < n; j += blockDim.x) f(j, std::integral_constant<int, 1>{});
}

// Adds one scaled logit z to a thread's running moments.
template <typename acc_t>
__device__ __forceinline__ void accumulate(SoftmaxMoments<acc_t>& s, acc_t z) {
  if (z == neg_infinity<acc_t>()) return;  // p = 0; also avoids (-inf) - (-inf) before any finite z
  if (z > s.max) {
    if (s.sum_exp > acc_t(0)) {
      const acc_t shift = s.max - z;
      const acc_t scale = exp_bounded(shift);
      s.sum_exp_z = scale * (s.sum_exp_z + shift * s.sum_exp);
      s.sum_exp *= scale;
    }
    s.max = z;
    s.sum_exp += acc_t(1);  // exp(z - z) = 1, and its (z - max) term is 0
  } else {
    const acc_t shifted = z - s.max;
    const acc_t e = exp_bounded(shifted);
    s.sum_exp += e;
    s.sum_exp_z += e > acc_t(0) ? e * shifted : acc_t(0);
  }
}

template <typename acc_t>
struct SumPair {
  acc_t first, second;
};

template <typename acc_t>
__device__ __forceinline__ SoftmaxMoments<acc_t> combine(const SoftmaxMoments<acc_t>& a,
                                                         const SoftmaxMoments<acc_t>& b) {
  return merge_moments(a, b);
}

template <typename acc_t>
__device__ __forceinline__ SumPair<acc_t> combine(const SumPair<acc_t>& a, const SumPair<acc_t>& b) {
  return SumPair<acc_t>{a.first + b.first, a.second + b.second};
}

template <typename acc_t>
__device__ __forceinline__ SoftmaxMoments<acc_t> shuffle_xor(const SoftmaxMoments<acc_t>& s, int mask) {
  return SoftmaxMoments<acc_t>{__shfl_xor_sync(0xffffffffu, s.max, mask),
                               __shfl_xor_sync(0xffffffffu, s.sum_exp, mask),
                               __shfl_xor_sync(0xffffffffu, s.sum_exp_z, mask)};
}

template <typename acc_t>
__device__ __forceinline__ SumPair<acc_t> shuffle_xor(const SumPair<acc_t>& s, int mask) {
  return SumPair<acc_t>{__shfl_xor_sync(0xffffffffu, s.first, mask),
                        __shfl_xor_sync(0xffffffffu, s.second, mask)};
}

// Combines every thread's value (blockDim.x a multiple of 32); the result is valid in thread 0.
template <typename T>
__device__ __forceinline__ T block_combine(T value, const T& identity) {
  __shared__ T per_warp[kMaxThreads / kWarp];
  for (int mask = kWarp / 2; mask > 0; mask /= 2) value = combine(value, shuffle_xor(value, mask));
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  if (lane == 0) per_warp[warp] = value;
  __syncthreads();
  if (warp == 0) {
    value = lane < static_cast<int>(blockDim.x / kWarp) ? per_warp[lane] : identity;
    for (int mask = kWarp / 2; mask > 0; mask /= 2) value = combine(value, shuffle_xor(value, mask));
  }
  return value;
}

__device__ __forceinline__ int64_t target_column(const int64_t* target, int64_t row, const VocabBlock& b) {
  if (target == nullptr) return -1;
  const int64_t col = target[row] - b.vocab_start;
  return col >= 0 && col < b.valid_cols ? col : -1;
}

template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kMaxThreads)
    logprob_stats_kernel(const scalar_t* __restrict__ logits, const int64_t* __restrict__ target, VocabBlock b,
                         acc_type<scalar_t>* __restrict__ stats) {
  using acc_t = acc_type<scalar_t>;
  const int64_t row = blockIdx.x;
  const scalar_t* x = logits + row * b.row_stride;
  const acc_t inv_t = static_cast<acc_t>(b.inv_temperature);
  const SoftmaxMoments<acc_t> empty{neg_infinity<acc_t>(), acc_t(0), acc_t(0)};
  SoftmaxMoments<acc_t> s = empty;
  for_each_pack<VEC>(b.valid_cols, [&](int64_t j, auto width) {
    constexpr int W = decltype(width)::value;
    const Pack<scalar_t, W> xs = load_pack<W>(x + j);
#pragma unroll
    for (int k = 0; k < W; ++k) accumulate(s, to_acc<acc_t>(xs.v[k]) * inv_t);
  });
  s = block_combine(s, empty);
  if (threadIdx.x == 0) {
    const int64_t col = target_column(target, row, b);
    stats[row] = s.max;
    stats[b.rows + row] = s.sum_exp;
    stats[2 * b.rows + row] = s.sum_exp_z;
    stats[3 * b.rows + row] = col >= 0 ? to_acc<acc_t>(x[col]) * inv_t : acc_t(0);
  }
}

template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kMaxThreads)
    logprob_entropy_backward_kernel(const scalar_t* logits, const int64_t* __restrict__ target,
                                    const acc_type<scalar_t>* __restrict__ lse,
                                    const acc_type<scalar_t>* __restrict__ entropy,
                                    const acc_type<scalar_t>* __restrict__ grad_logprob,
                                    const acc_type<scalar_t>* __restrict__ grad_entropy, VocabBlock b,
                                    scalar_t* grad, int64_t grad_row_stride) {
  // logits and grad are not __restrict__: the in-place op passes the same memory. Each thread
  // loads a pack, then stores the gradient of those columns only, so no element is read after
  // another thread has written it.
  using acc_t = acc_type<scalar_t>;
  const int64_t row = blockIdx.x;
  const scalar_t* x = logits + row * b.row_stride;
  scalar_t* g = grad + row * grad_row_stride;
  const acc_t inv_t = static_cast<acc_t>(b.inv_temperature);
  const acc_t row_lse = lse[row], row_entropy = entropy[row];
  const acc_t g_lp = grad_logprob[row] * inv_t, g_h = grad_entropy[row] * inv_t;
  const int64_t target_col = target_column(target, row, b);
  for_each_pack<VEC>(b.valid_cols, [&](int64_t j, auto width) {
    constexpr int W = decltype(width)::value;
    const Pack<scalar_t, W> xs = load_pack<W>(x + j);
    Pack<scalar_t, W> out;
#pragma unroll
    for (int k = 0; k < W; ++k) {
      const acc_t lp = to_acc<acc_t>(xs.v[k]) * inv_t - row_lse;
      out.v[k] = from_acc<scalar_t>(
          logprob_entropy_grad(lp, exp_bounded(lp), row_entropy, g_lp, g_h, j + k == target_col));
    }
    store_pack<W>(g + j, out);
  });
  for (int64_t j = b.valid_cols + threadIdx.x; j < b.cols; j += blockDim.x) g[j] = from_acc<scalar_t>(acc_t(0));
}

template <typename scalar_t, typename delta_t, int VEC>
__global__ void __launch_bounds__(kMaxThreads)
    covariance_partials_kernel(const scalar_t* __restrict__ logits, const delta_t* __restrict__ delta,
                               int64_t delta_row_stride, const acc_type<scalar_t>* __restrict__ lse,
                               const acc_type<scalar_t>* __restrict__ entropy, VocabBlock b,
                               acc_type<scalar_t>* __restrict__ partials) {
  using acc_t = acc_type<scalar_t>;
  const int64_t row = blockIdx.x;
  const scalar_t* x = logits + row * b.row_stride;
  const delta_t* d = delta + row * delta_row_stride;
  const acc_t inv_t = static_cast<acc_t>(b.inv_temperature);
  const acc_t row_lse = lse[row], row_entropy = entropy[row];
  SumPair<acc_t> sums{acc_t(0), acc_t(0)};
  for_each_pack<VEC>(b.valid_cols, [&](int64_t j, auto width) {
    constexpr int W = decltype(width)::value;
    const Pack<scalar_t, W> xs = load_pack<W>(x + j);
    const Pack<delta_t, W> ds = load_pack<W>(d + j);
#pragma unroll
    for (int k = 0; k < W; ++k) {
      const acc_t lp = to_acc<acc_t>(xs.v[k]) * inv_t - row_lse;
      acc_t cov, mean;
      covariance_terms(lp, exp_bounded(lp), row_entropy, to_acc<acc_t>(ds.v[k]), cov, mean);
      sums.first += cov;
      sums.second += mean;
    }
  });
  sums = block_combine(sums, SumPair<acc_t>{acc_t(0), acc_t(0)});
  if (threadIdx.x == 0) {
    partials[row] = sums.first;
    partials[b.rows + row] = sums.second;
  }
}

// Enough threads for about two packs each, a multiple of the warp size, at most kMaxThreads.
int threads_for(int64_t cols, int pack_width) {
  const int64_t packs = (cols + pack_width - 1) / pack_width;
  int threads = kWarp;
  while (threads < kMaxThreads && 2 * threads < packs) threads *= 2;
  return threads;
}

bool rows_aligned(const void* base, int64_t row_stride, size_t element_size) {
  return reinterpret_cast<uintptr_t>(base) % 16 == 0 && (row_stride * element_size) % 16 == 0;
}

// Runs launch(std::integral_constant<int, width>) with the 16-byte pack width when `aligned`,
// else one column per load; returns the launch error string or nullptr.
template <int kWidth, typename Launch>
const char* launch_with_pack_width(bool aligned, Launch&& launch) {
  if (aligned) launch(std::integral_constant<int, kWidth>{});
  else launch(std::integral_constant<int, 1>{});
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace

const char* launch_logprob_stats(DType dtype, const void* logits, const int64_t* target, const VocabBlock& b,
                                 void* stats, cudaStream_t stream) {
  if (b.rows == 0) return nullptr;
  return dispatch_dtype(dtype, [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    const auto* x = static_cast<const scalar_t*>(logits);
    return launch_with_pack_width<kPackWidth<scalar_t>>(
        rows_aligned(x, b.row_stride, sizeof(scalar_t)), [&](auto width) {
          constexpr int W = decltype(width)::value;
          logprob_stats_kernel<scalar_t, W><<<static_cast<unsigned>(b.rows), threads_for(b.valid_cols, W), 0,
                                              stream>>>(x, target, b, static_cast<acc_type<scalar_t>*>(stats));
        });
  });
}

const char* launch_logprob_entropy_backward(DType dtype, const void* logits, const int64_t* target,
                                            const void* lse, const void* entropy, const void* grad_logprob,
                                            const void* grad_entropy, const VocabBlock& b, void* grad,
                                            int64_t grad_row_stride, cudaStream_t stream) {
  if (b.rows == 0) return nullptr;
  return dispatch_dtype(dtype, [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    using acc_t = acc_type<scalar_t>;
    const auto* x = static_cast<const scalar_t*>(logits);
    auto* g = static_cast<scalar_t*>(grad);
    const bool aligned = rows_aligned(x, b.row_stride, sizeof(scalar_t)) && rows_aligned(g, grad_row_stride, sizeof(scalar_t));
    return launch_with_pack_width<kPackWidth<scalar_t>>(aligned, [&](auto width) {
      constexpr int W = decltype(width)::value;
      logprob_entropy_backward_kernel<scalar_t, W><<<static_cast<unsigned>(b.rows), threads_for(b.cols, W), 0,
                                                     stream>>>(
          x, target, static_cast<const acc_t*>(lse), static_cast<const acc_t*>(entropy),
          static_cast<const acc_t*>(grad_logprob), static_cast<const acc_t*>(grad_entropy), b, g,
          grad_row_stride);
    });
  });
}

const char* launch_covariance_partials(DType dtype, DType delta_dtype, const void* logits, const void* delta,
                                       int64_t delta_row_stride, const void* lse, const void* entropy,
                                       const VocabBlock& b, void* partials, cudaStream_t stream) {
  if (b.rows == 0) return nullptr;
  return dispatch_dtype(dtype, [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    using acc_t = acc_type<scalar_t>;
    const auto* x = static_cast<const scalar_t*>(logits);
    auto run = [&](auto delta_tag) {
      using delta_t = typename decltype(delta_tag)::type;
      const auto* d = static_cast<const delta_t*>(delta);
      // One pack holds the same columns of both tensors: width set by the wider element type.
      constexpr int kWidth = kPackWidth<scalar_t> < kPackWidth<delta_t> ? kPackWidth<scalar_t> : kPackWidth<delta_t>;
      const bool aligned = rows_aligned(x, b.row_stride, sizeof(scalar_t)) &&
                           rows_aligned(d, delta_row_stride, sizeof(delta_t));
      return launch_with_pack_width<kWidth>(aligned, [&](auto width) {
        constexpr int W = decltype(width)::value;
        covariance_partials_kernel<scalar_t, delta_t, W><<<static_cast<unsigned>(b.rows),
                                                           threads_for(b.valid_cols, W), 0, stream>>>(
            x, d, delta_row_stride, static_cast<const acc_t*>(lse), static_cast<const acc_t*>(entropy), b,
            static_cast<acc_t*>(partials));
      });
    };
    return delta_dtype == dtype ? run(tag) : run(TypeTag<float>{});
  });
}

}  // namespace kernels
}  // namespace megatron_rl
