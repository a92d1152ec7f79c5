// The per-lane part of the masked_linear serving kernel (csrc/masked_linear.cu), shared with a host
// check (tests/csrc/masked_linear_host_check.cpp) that runs it on the CPU for every lane of every warp
// and compares the reduced result with a double-precision reference: the indexing of the weight, the
// mask bytes, the task stack and the tails is thereby tested without a GPU.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#if defined(__CUDACC__)
#define PET_FAST_HD __host__ __device__ __forceinline__
#else
#define PET_FAST_HD inline
#endif

namespace pet_fast {
namespace masked_linear_detail {

constexpr int kLane = 8;             // consecutive columns per lane and step (16 bytes of fp16/bf16)
constexpr int kStep = 32 * kLane;    // columns per warp and step

PET_FAST_HD float to_float(__half v) { return __half2float(v); }
PET_FAST_HD float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
PET_FAST_HD T load(const T* p) {
#if defined(__CUDA_ARCH__)
  return __ldg(p);
#else
  return *p;
#endif
}

struct alignas(16) Vec16 {
  uint32_t w[4];
};

// 8 columns [k, k + 8) of a row as floats; vec: one 16-byte load (the caller guarantees alignment and
// k + 8 <= K; the flag is uniform across the grid), else element loads with a bound check.
template <typename T>
PET_FAST_HD void load8(const T* __restrict__ row, int64_t k, int64_t K, bool vec, float (&out)[kLane]) {
  if (vec) {
    Vec16 raw;
#if defined(__CUDA_ARCH__)
    const uint4 u = __ldg(reinterpret_cast<const uint4*>(row + k));
    raw.w[0] = u.x; raw.w[1] = u.y; raw.w[2] = u.z; raw.w[3] = u.w;
#else
    std::memcpy(&raw, row + k, sizeof(raw));
#endif
    const T* v = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int j = 0; j < kLane; ++j) out[j] = to_float(v[j]);
  } else {
#pragma unroll
    for (int j = 0; j < kLane; ++j) out[j] = (k + j < K) ? to_float(row[k + j]) : 0.f;
  }
}

// Lane `lane`'s partial sums of y[t, row0 + r] for r < ROWS and t < min(TOKENS, n_tokens): the lane
// handles columns lane*8 .. lane*8+7 of every 256-column step. Summed over the 32 lanes they are
// x (W * mask)^T for those rows. bits: the packed mask bytes (row_bytes per row; with MULTI, a stack of
// n_tasks masks of O rows and task_ids per token; ids outside [0, n_tasks) mean an all-zero mask).
template <typename T, int TOKENS, int ROWS, bool MULTI>
PET_FAST_HD void lane_partial_sums(const T* __restrict__ x, const T* __restrict__ w, const uint8_t* __restrict__ bits,
                                   const int32_t* __restrict__ task_ids, int n_tokens, int64_t K, int64_t O,
                                   int64_t row_bytes, int64_t n_tasks, bool vec, int lane, int64_t row0,
                                   float (&acc)[ROWS][TOKENS]) {
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
          const unsigned m = load(bits + row * row_bytes + (k >> 3));
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
        int64_t task = 0;
        if (MULTI) task = load(task_ids + t);
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
          if (MULTI) {
            const int64_t row = row0 + r;
            const unsigned m = (task >= 0 && task < n_tasks && row < O)
                                   ? load(bits + (task * O + row) * row_bytes + (k >> 3)) : 0u;
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
}

// Tokens per launch rounded up to 1, 4, 16 or 64 (few instantiations keep the build short) and rows
// per warp, chosen so that a lane keeps at most 64 fp32 partial sums (and, for few tokens, enough
// 16-byte loads in flight). The host check uses the same choice.
#define PET_FAST_MASKED_LINEAR_SHAPES(CASE) \
  if (n <= 1) CASE(1, 4);                   \
  if (n <= 4) CASE(4, 4);                   \
  if (n <= 16) CASE(16, 2);                 \
  CASE(64, 1);

}  // namespace masked_linear_detail
}  // namespace pet_fast
