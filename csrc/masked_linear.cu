// Memory-bound serving kernel for masked_linear from bit-packed masks (see masked_linear.h).
//
// Each warp owns ROWS output rows and walks their whole K: per step a lane loads 8 consecutive weights
// of each row (one 16-byte load when K % 8 == 0 and the pointers are aligned) and the byte of mask bits
// that covers them, zeroes the masked weights in registers, and multiplies them with the same 8 columns
// of every token (x is small and stays in L1/L2). Each lane keeps ROWS x TOKENS fp32 partial sums;
// one warp reduction at the end, then bias and the store. The weight and the bits are read once.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "masked_linear.h"

namespace pet_fast {
namespace {

constexpr int kWarps = 4;  // warps per block
constexpr int kLane = 8;   // consecutive columns per lane and step (16 bytes of fp16/bf16)
constexpr int kStep = 32 * kLane;

__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Load 8 columns [k, k + 8) of a row as floats; vec: one 16-byte load (the caller guarantees alignment
// and k + 8 <= K; the flag is uniform across the grid), else element loads with a bound check.
template <typename T>
__device__ __forceinline__ void load8(const T* __restrict__ row, int64_t k, int64_t K, bool vec, float (&out)[kLane]) {
  if (vec) {
    uint4 raw = __ldg(reinterpret_cast<const uint4*>(row + k));
    const T* v = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int j = 0; j < kLane; ++j) out[j] = to_float(v[j]);
  } else {
#pragma unroll
    for (int j = 0; j < kLane; ++j) out[j] = (k + j < K) ? to_float(row[k + j]) : 0.f;
  }
}

template <typename T, int TOKENS, int ROWS, bool MULTI>
__global__ void __launch_bounds__(kWarps * 32)
masked_linear_packed_kernel(const T* __restrict__ x, const T* __restrict__ w, const uint8_t* __restrict__ bits,
                            const T* __restrict__ bias, const int32_t* __restrict__ task_ids, T* __restrict__ y,
                            int n_tokens, int64_t K, int64_t O, int64_t row_bytes, int64_t n_tasks, bool vec) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int64_t row0 = (static_cast<int64_t>(blockIdx.x) * kWarps + warp) * ROWS;
  if (row0 >= O) return;

  float acc[ROWS][TOKENS];
#pragma unroll
  for (int r = 0; r < ROWS; ++r)
#pragma unroll
    for (int t = 0; t < TOKENS; ++t) acc[r][t] = 0.f;

#pragma unroll(TOKENS * ROWS <= 16 ? 2 : 1)
  for (int64_t k = static_cast<int64_t>(lane) * kLane; k < K; k += kStep) {
    float wv[ROWS][kLane];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      const int64_t row = row0 + r;
      if (row < O) {
        load8<T>(w + row * K, k, K, vec, wv[r]);
        if (!MULTI) {
          const unsigned m = __ldg(bits + row * row_bytes + (k >> 3));
#pragma unroll
          for (int j = 0; j < kLane; ++j) wv[r][j] = ((m >> j) & 1u) ? wv[r][j] : 0.f;
        }
      } else {
#pragma unroll
        for (int j = 0; j < kLane; ++j) wv[r][j] = 0.f;
      }
    }
#pragma unroll
    for (int t = 0; t < TOKENS; ++t) {
      if (t < n_tokens) {
        float xv[kLane];
        load8<T>(x + t * K, k, K, vec, xv);
        // MULTI: this token's mask in the stack (ids outside [0, n_tasks): an all-zero mask)
        int64_t task = 0;
        if (MULTI) task = __ldg(task_ids + t);
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
          if (MULTI) {
            const int64_t row = row0 + r;
            const unsigned m = (task >= 0 && task < n_tasks && row < O)
                                   ? __ldg(bits + (task * O + row) * row_bytes + (k >> 3)) : 0u;
#pragma unroll
            for (int j = 0; j < kLane; ++j) acc[r][t] = fmaf(((m >> j) & 1u) ? wv[r][j] : 0.f, xv[j], acc[r][t]);
          } else {
#pragma unroll
            for (int j = 0; j < kLane; ++j) acc[r][t] = fmaf(wv[r][j], xv[j], acc[r][t]);
          }
        }
      }
    }
  }

#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    const int64_t row = row0 + r;
    const float b = (bias != nullptr && row < O) ? to_float(bias[row]) : 0.f;
#pragma unroll
    for (int t = 0; t < TOKENS; ++t) {
      float v = acc[r][t];
#pragma unroll
      for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
      // spread the stores over the lanes: lane (t % 32) writes token t
      if (t < n_tokens && row < O && lane == (t & 31)) y[t * O + row] = from_float<T>(v + b);
    }
  }
}

template <typename T, int TOKENS, int ROWS, bool MULTI>
cudaError_t launch_vec(bool vec, const T* x, const T* w, const uint8_t* bits, const T* bias, const int32_t* ids, T* y,
                       int n, int64_t K, int64_t O, int64_t row_bytes, int64_t n_tasks, cudaStream_t stream) {
  const int64_t rows_per_block = static_cast<int64_t>(kWarps) * ROWS;
  const dim3 grid(static_cast<unsigned>((O + rows_per_block - 1) / rows_per_block));
  const dim3 block(kWarps * 32);
  masked_linear_packed_kernel<T, TOKENS, ROWS, MULTI><<<grid, block, 0, stream>>>(x, w, bits, bias, ids, y, n, K, O,
                                                                                    row_bytes, n_tasks, vec);
  return cudaGetLastError();
}

// Tokens per launch rounded up to 1, 4, 16 or 64 (few instantiations keep the build short); rows per
// warp chosen so that a lane keeps at most 64 fp32 partial sums (and enough 16-byte loads in flight
// for few tokens).
template <typename T, bool MULTI>
cudaError_t launch_tokens(bool vec, const T* x, const T* w, const uint8_t* bits, const T* bias, const int32_t* ids, T* y,
                          int n, int64_t K, int64_t O, int64_t row_bytes, int64_t n_tasks, cudaStream_t stream) {
#define PET_FAST_ML_CASE(TOK, ROWS) \
  return launch_vec<T, TOK, ROWS, MULTI>(vec, x, w, bits, bias, ids, y, n, K, O, row_bytes, n_tasks, stream)
  if (n <= 1) PET_FAST_ML_CASE(1, 4);
  if (n <= 4) PET_FAST_ML_CASE(4, 4);
  if (n <= 16) PET_FAST_ML_CASE(16, 2);
  PET_FAST_ML_CASE(64, 1);
#undef PET_FAST_ML_CASE
}

template <typename T>
cudaError_t launch_typed(const void* x, const void* w, const int32_t* packed, const void* bias, const int32_t* ids,
                         void* y, int64_t n, int64_t K, int64_t O, int64_t n_tasks, cudaStream_t stream) {
  const bool vec = (K % kLane == 0) && (reinterpret_cast<uintptr_t>(x) % 16 == 0) &&
                   (reinterpret_cast<uintptr_t>(w) % 16 == 0);
  const int64_t row_bytes = ((K + 31) / 32) * 4;
  const auto* bits = reinterpret_cast<const uint8_t*>(packed);
  const T* xt = static_cast<const T*>(x);
  const T* wt = static_cast<const T*>(w);
  const T* bt = static_cast<const T*>(bias);
  T* yt = static_cast<T*>(y);
  if (ids != nullptr)
    return launch_tokens<T, true>(vec, xt, wt, bits, bt, ids, yt, static_cast<int>(n), K, O, row_bytes, n_tasks, stream);
  return launch_tokens<T, false>(vec, xt, wt, bits, bt, ids, yt, static_cast<int>(n), K, O, row_bytes, n_tasks, stream);
}

}  // namespace

cudaError_t masked_linear_packed_launch(MaskedLinearDtype dtype, const void* x, const void* weight,
                                        const int32_t* packed, const void* bias, const int32_t* task_ids,
                                        void* y, int64_t n_tokens, int64_t in_features, int64_t out_features,
                                        int64_t n_tasks, cudaStream_t stream) {
  if (n_tokens < 0 || n_tokens > kMaskedLinearMaxTokens || in_features < 0 || out_features < 0)
    return cudaErrorInvalidValue;
  if (n_tokens == 0 || out_features == 0) return cudaSuccess;
  if (dtype == MaskedLinearDtype::kHalf)
    return launch_typed<__half>(x, weight, packed, bias, task_ids, y, n_tokens, in_features, out_features, n_tasks, stream);
  if (dtype == MaskedLinearDtype::kBFloat16)
    return launch_typed<__nv_bfloat16>(x, weight, packed, bias, task_ids, y, n_tokens, in_features, out_features, n_tasks, stream);
  return cudaErrorInvalidValue;
}

}  // namespace pet_fast
