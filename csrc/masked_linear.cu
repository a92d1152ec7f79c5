// Memory-bound serving kernel for masked_linear from bit-packed masks (see masked_linear.h).
//
// Each warp owns ROWS output rows and walks their whole K: per step a lane loads 8 consecutive weights
// of each row (one 16-byte load when K % 8 == 0 and the pointers are aligned) and the byte of mask bits
// that covers them, zeroes the masked weights in registers, and multiplies them with the same 8 columns
// of every token (x is small and stays in L1/L2). Each lane keeps ROWS x TOKENS fp32 partial sums
// (masked_linear_lane.cuh); one warp reduction at the end, then bias and the store. The weight and the
// bits are read once.
#include "masked_linear.h"
#include "masked_linear_lane.cuh"

namespace pet_fast {
namespace {

using namespace masked_linear_detail;

constexpr int kWarps = 4;  // warps per block

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

template <typename T, int TOKENS, int ROWS, bool MULTI>
__global__ void __launch_bounds__(kWarps * 32)
masked_linear_packed_kernel(const T* __restrict__ x, const T* __restrict__ w, const uint8_t* __restrict__ bits,
                            const T* __restrict__ bias, const int32_t* __restrict__ task_ids, T* __restrict__ y,
                            int n_tokens, int64_t K, int64_t O, int64_t row_bytes, int64_t n_tasks, bool vec) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int64_t row0 = (static_cast<int64_t>(blockIdx.x) * kWarps + warp) * ROWS;
  if (row0 >= O) return;  // the whole warp leaves together, so the shuffles below stay full-warp

  float acc[ROWS][TOKENS];
  lane_partial_sums<T, TOKENS, ROWS, MULTI>(x, w, bits, task_ids, n_tokens, K, O, row_bytes, n_tasks, vec, lane,
                                            row0, acc);
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
cudaError_t launch_shape(bool vec, const T* x, const T* w, const uint8_t* bits, const T* bias, const int32_t* ids,
                         T* y, int n, int64_t K, int64_t O, int64_t row_bytes, int64_t n_tasks, cudaStream_t stream) {
  const int64_t rows_per_block = static_cast<int64_t>(kWarps) * ROWS;
  const dim3 grid(static_cast<unsigned>((O + rows_per_block - 1) / rows_per_block));
  const dim3 block(kWarps * 32);
  masked_linear_packed_kernel<T, TOKENS, ROWS, MULTI><<<grid, block, 0, stream>>>(x, w, bits, bias, ids, y, n, K, O,
                                                                                    row_bytes, n_tasks, vec);
  return cudaGetLastError();
}

template <typename T, bool MULTI>
cudaError_t launch_tokens(bool vec, const T* x, const T* w, const uint8_t* bits, const T* bias, const int32_t* ids, T* y,
                          int n, int64_t K, int64_t O, int64_t row_bytes, int64_t n_tasks, cudaStream_t stream) {
#define PET_FAST_ML_CASE(TOK, ROWS) \
  return launch_shape<T, TOK, ROWS, MULTI>(vec, x, w, bits, bias, ids, y, n, K, O, row_bytes, n_tasks, stream)
  PET_FAST_MASKED_LINEAR_SHAPES(PET_FAST_ML_CASE)
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
