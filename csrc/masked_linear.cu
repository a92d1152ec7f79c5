// Memory-bound serving kernels for masked_linear from bit-packed masks (see masked_linear.h); the work
// split and the per-lane code are in masked_linear_lane.cuh. Single mask (two tokens or more): tensor
// cores (mma.m16n8k16, fp32 accumulate) on the weight tile masked in registers; per-token masks and one
// token: fp32 FMAs, the mask chosen per token. Both read the weight and the bits once per group of 16
// tokens (so once for N <= 16), 16 bytes at a time with the next step's loads in flight, and x from global
// memory once per block into shared memory. With a split K, a second small kernel sums the fp32 partials
// of the chunks in a fixed order and adds the bias.
#include "masked_linear.h"
#include "masked_linear_lane.cuh"

#include <atomic>

namespace pet_fast {
namespace {

using namespace masked_linear_detail;

template <int V, int S>
__device__ __forceinline__ void rs_stage(float* v, int lane) {
  float send[rs_half(V, S)], recv[rs_half(V, S)];
  rs_send<V, S>(v, lane, send);
#pragma unroll
  for (int i = 0; i < rs_half(V, S); ++i) recv[i] = __shfl_xor_sync(0xffffffffu, send[i], 16 >> S);
  rs_keep<V, S>(v, lane, recv);
}

template <typename T, int TOKENS, bool MULTI, bool VEC>
__global__ void __launch_bounds__(kThreads, blocks_per_sm(TOKENS))
masked_linear_packed_kernel(const T* __restrict__ x, const T* __restrict__ w, const uint8_t* __restrict__ bits,
                            const T* __restrict__ bias, const int32_t* __restrict__ task_ids, T* __restrict__ y,
                            float* __restrict__ ws, int64_t n, int64_t K, int64_t O, int64_t row_bytes,
                            int64_t n_tasks, Plan plan) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ int64_t stask[TOKENS];
  T* sx = reinterpret_cast<T*>(smem_raw);
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const BlockPos pos = block_pos(blockIdx.x, plan.groups, plan.splits);
  const int64_t t0 = static_cast<int64_t>(pos.group) * TOKENS;
  const int64_t k0 = pos.split * plan.kc;
  constexpr int R = rows_for(TOKENS, MULTI);
  constexpr int V = R * TOKENS;
  Vec16 raw[R];
  unsigned m[R];
  // the first pass's first weights are in flight while x is staged
  first_loads<T, R, MULTI, VEC>(w, bits, K, O, row_bytes, lane, warp_row0(pos.tile, plan.rows_per_block, R, 0, warp),
                                k0, raw, m);
  stage_x<T, TOKENS, MULTI, VEC>(x, task_ids, sx, stask, n, t0, K, k0, plan.kc, plan.kc, n_tasks, O, row_bytes,
                                 threadIdx.x);
  __syncthreads();

  for (int pass = 0; pass < plan.passes; ++pass) {
    const int64_t row0 = warp_row0(pos.tile, plan.rows_per_block, R, pass, warp);
    if (row0 >= O) break;  // uniform over the warp, so the shuffles below stay full-warp
    if (pass > 0) first_loads<T, R, MULTI, VEC>(w, bits, K, O, row_bytes, lane, row0, k0, raw, m);
    float acc[V];
    lane_chunk_sums<T, TOKENS, MULTI, VEC>(sx, stask, w, bits, K, O, row_bytes, lane, row0, k0, plan.kc, raw, m, acc);
    rs_stage<V, 0>(acc, lane);
    rs_stage<V, 1>(acc, lane);
    rs_stage<V, 2>(acc, lane);
    rs_stage<V, 3>(acc, lane);
    rs_stage<V, 4>(acc, lane);
    if (rs_writer(V, lane)) {
#pragma unroll
      for (int j = 0; j < rs_count(V); ++j)
        store_entry<T, TOKENS>(acc[j], rs_index(V, lane, j), bias, y, ws, n, O, row0, t0, pos.split, plan.splits);
    }
  }
}

// D += A B for one m16n8k16 tile (fp32 accumulate); sm_80 and later (the launcher checks the device)
template <typename T>
__device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]);

template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
  __trap();
#endif
}

template <>
__device__ __forceinline__ void mma16816<__half>(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
  __trap();
#endif
}

// Single-mask kernel on tensor cores (see masked_linear_lane.cuh): warp w of a block owns rows
// tile * 128 + 16 w .. + 15 over one K chunk; NT n tiles of 8 tokens. The weight and bits stream with
// the next 128 columns' loads in flight; x comes from shared memory.
template <typename T, int NT, bool VEC>
__global__ void __launch_bounds__(kThreads, 2)
masked_linear_mma_kernel(const T* __restrict__ x, const T* __restrict__ w, const uint8_t* __restrict__ bits,
                         const T* __restrict__ bias, T* __restrict__ y, float* __restrict__ ws, int64_t n, int64_t K,
                         int64_t O, int64_t row_bytes, Plan plan) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sx = reinterpret_cast<T*>(smem_raw);
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const BlockPos pos = block_pos(blockIdx.x, plan.groups, plan.splits);
  const int64_t t0 = static_cast<int64_t>(pos.group) * 8 * NT;
  const int64_t k0 = pos.split * plan.kc;
  const int64_t ldx = plan_ldx(plan);
  const int64_t row0 = pos.tile * plan.rows_per_block + static_cast<int64_t>(warp) * kMmaRows;
  MmaStep cur;
  mma_load<T, VEC>(w, bits, K, O, row_bytes, row0, k0, lane, cur);  // in flight while x is staged
  stage_x<T, 8 * NT, false, VEC>(x, nullptr, sx, nullptr, n, t0, K, k0, plan.kc, ldx, 1, O, row_bytes, threadIdx.x);
  __syncthreads();
  if (row0 >= O) return;  // whole warps; no barrier follows

  float acc[NT][4];
#pragma unroll
  for (int j = 0; j < NT; ++j)
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[j][i] = 0.f;
  const int64_t subs = plan.kc / (32 * kMmaSub);
#pragma unroll 1
  for (int64_t s = 0; s < subs; ++s) {
    const int64_t cb = s * 32 * kMmaSub;
    MmaStep next;
    if (s + 1 < subs) mma_load<T, VEC>(w, bits, K, O, row_bytes, row0, k0 + cb + 32 * kMmaSub, lane, next);
#pragma unroll
    for (int u = 0; u < kMmaSub; ++u) {
      uint32_t a[2][4];
      mma_a_frag(cur, u, 0, a[0]);
      mma_a_frag(cur, u, 1, a[1]);
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        uint32_t b[2][2];
        mma_b_frags(sx, ldx, cb, u, j, lane, b);
        mma16816<T>(acc[j], a[0], b[0]);
        mma16816<T>(acc[j], a[1], b[1]);
      }
    }
    if (s + 1 < subs) cur = next;
  }
#pragma unroll
  for (int j = 0; j < NT; ++j)
#pragma unroll
    for (int i = 0; i < 4; ++i)
      store_entry<T, 1>(acc[j][i], 0, bias, y, ws, n, O, row0 + mma_c_row(lane, i), t0 + mma_c_token(lane, j, i),
                        pos.split, plan.splits);
}

template <typename T>
__global__ void __launch_bounds__(256) masked_linear_finish_kernel(const float* __restrict__ ws,
                                                                   const T* __restrict__ bias, T* __restrict__ y,
                                                                   int64_t n, int64_t O, int64_t splits) {
  const int64_t total = n * O;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    finish_entry<T>(i, ws, bias, y, n, O, splits);
}

int device_sms() {
  static int cached[64] = {};
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return 132;
  if (dev >= 0 && dev < 64 && cached[dev] > 0) return cached[dev];
  int sms = 0;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || sms <= 0) sms = 132;
  if (dev >= 0 && dev < 64) cached[dev] = sms;
  return sms;
}

template <typename T>
cudaError_t launch_finish(const Plan& plan, const T* bias, T* y, const float* ws, int64_t n, int64_t O,
                          cudaStream_t stream) {
  if (plan.splits == 1) return cudaSuccess;
  int64_t blocks = (n * O + 255) / 256;
  const int64_t cap = static_cast<int64_t>(device_sms()) * 8;
  if (blocks > cap) blocks = cap;
  masked_linear_finish_kernel<T><<<static_cast<unsigned>(blocks), 256, 0, stream>>>(ws, bias, y, n, O, plan.splits);
  return cudaGetLastError();
}

template <typename T, int TOKENS, bool MULTI>
cudaError_t launch_shape(const Plan& plan, bool vec, const T* x, const T* w, const uint8_t* bits, const T* bias,
                         const int32_t* ids, T* y, float* ws, int64_t n, int64_t K, int64_t O, int64_t row_bytes,
                         int64_t n_tasks, cudaStream_t stream) {
  const size_t smem = static_cast<size_t>(TOKENS) * plan_ldx(plan) * sizeof(T);
  if (vec)
    masked_linear_packed_kernel<T, TOKENS, MULTI, true><<<static_cast<unsigned>(plan.blocks), kThreads, smem, stream>>>(
        x, w, bits, bias, ids, y, ws, n, K, O, row_bytes, n_tasks, plan);
  else
    masked_linear_packed_kernel<T, TOKENS, MULTI, false><<<static_cast<unsigned>(plan.blocks), kThreads, smem, stream>>>(
        x, w, bits, bias, ids, y, ws, n, K, O, row_bytes, n_tasks, plan);
  const cudaError_t err = cudaGetLastError();
  return err != cudaSuccess ? err : launch_finish<T>(plan, bias, y, ws, n, O, stream);
}

template <typename T, int NT>
cudaError_t launch_mma(const Plan& plan, bool vec, const T* x, const T* w, const uint8_t* bits, const T* bias, T* y,
                       float* ws, int64_t n, int64_t K, int64_t O, int64_t row_bytes, cudaStream_t stream) {
  const size_t smem = static_cast<size_t>(8 * NT) * plan_ldx(plan) * sizeof(T);
  if (vec)
    masked_linear_mma_kernel<T, NT, true><<<static_cast<unsigned>(plan.blocks), kThreads, smem, stream>>>(
        x, w, bits, bias, y, ws, n, K, O, row_bytes, plan);
  else
    masked_linear_mma_kernel<T, NT, false><<<static_cast<unsigned>(plan.blocks), kThreads, smem, stream>>>(
        x, w, bits, bias, y, ws, n, K, O, row_bytes, plan);
  const cudaError_t err = cudaGetLastError();
  return err != cudaSuccess ? err : launch_finish<T>(plan, bias, y, ws, n, O, stream);
}

template <typename T, bool MULTI>
cudaError_t launch_tokens(const Plan& plan, bool vec, const T* x, const T* w, const uint8_t* bits, const T* bias,
                          const int32_t* ids, T* y, float* ws, int64_t n, int64_t K, int64_t O, int64_t row_bytes,
                          int64_t n_tasks, cudaStream_t stream) {
#define PET_FAST_ML_CASE(TOK) \
  return launch_shape<T, TOK, MULTI>(plan, vec, x, w, bits, bias, ids, y, ws, n, K, O, row_bytes, n_tasks, stream)
  PET_FAST_MASKED_LINEAR_TOKENS(PET_FAST_ML_CASE)
#undef PET_FAST_ML_CASE
}

template <typename T>
cudaError_t launch_typed(const Plan& plan, const void* x, const void* w, const int32_t* packed, const void* bias,
                         const int32_t* ids, void* y, float* ws, int64_t n, int64_t K, int64_t O, int64_t n_tasks,
                         cudaStream_t stream) {
  const bool vec = (K % kLane == 0) && (reinterpret_cast<uintptr_t>(x) % 16 == 0) &&
                   (reinterpret_cast<uintptr_t>(w) % 16 == 0);
  const int64_t row_bytes = ((K + 31) / 32) * 4;
  const auto* bits = reinterpret_cast<const uint8_t*>(packed);
  const T* xt = static_cast<const T*>(x);
  const T* wt = static_cast<const T*>(w);
  const T* bt = static_cast<const T*>(bias);
  T* yt = static_cast<T*>(y);
  if (ids != nullptr)
    return launch_tokens<T, true>(plan, vec, xt, wt, bits, bt, ids, yt, ws, n, K, O, row_bytes, n_tasks, stream);
  if (plan.mma) {
    if (plan.tokens <= 8) return launch_mma<T, 1>(plan, vec, xt, wt, bits, bt, yt, ws, n, K, O, row_bytes, stream);
    return launch_mma<T, 2>(plan, vec, xt, wt, bits, bt, yt, ws, n, K, O, row_bytes, stream);
  }
  return launch_tokens<T, false>(plan, vec, xt, wt, bits, bt, ids, yt, ws, n, K, O, row_bytes, n_tasks, stream);
}

// mma.m16n8k16 with bf16/fp16 inputs needs compute capability 8.0
bool device_has_mma() {
  static int cached[64] = {};  // 0 unknown, 1 yes, 2 no
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return false;
  if (dev >= 0 && dev < 64 && cached[dev] != 0) return cached[dev] == 1;
  int major = 0;
  const bool yes = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) == cudaSuccess && major >= 8;
  if (dev >= 0 && dev < 64) cached[dev] = yes ? 1 : 2;
  return yes;
}

std::atomic<int> g_mma_min_tokens{kMmaMinTokens};

Plan plan_for(int64_t n, int64_t K, int64_t O, bool per_token_masks) {
  return make_plan(n, K, O, device_sms(), !per_token_masks && device_has_mma(), per_token_masks,
                   g_mma_min_tokens.load(std::memory_order_relaxed));
}

bool valid_sizes(int64_t n, int64_t K, int64_t O) {
  return n >= 0 && n <= kMaskedLinearMaxTokens && K >= 0 && O >= 0;
}

}  // namespace

int masked_linear_set_mma_min_tokens(int tokens) {
  return g_mma_min_tokens.exchange(tokens < 0 ? kMmaMinTokens : tokens, std::memory_order_relaxed);
}

int64_t masked_linear_packed_workspace_bytes(int64_t n_tokens, int64_t in_features, int64_t out_features,
                                             bool per_token_masks) {
  if (!valid_sizes(n_tokens, in_features, out_features)) return -1;
  if (n_tokens == 0 || out_features == 0) return 0;
  const Plan plan = plan_for(n_tokens, in_features, out_features, per_token_masks);
  return plan_workspace_floats(plan, n_tokens, out_features) * static_cast<int64_t>(sizeof(float));
}

cudaError_t masked_linear_packed_launch(MaskedLinearDtype dtype, const void* x, const void* weight,
                                        const int32_t* packed, const void* bias, const int32_t* task_ids,
                                        void* y, int64_t n_tokens, int64_t in_features, int64_t out_features,
                                        int64_t n_tasks, void* workspace, int64_t workspace_bytes,
                                        cudaStream_t stream) {
  if (!valid_sizes(n_tokens, in_features, out_features)) return cudaErrorInvalidValue;
  if (n_tokens == 0 || out_features == 0) return cudaSuccess;
  const Plan plan = plan_for(n_tokens, in_features, out_features, task_ids != nullptr);
  const int64_t need = plan_workspace_floats(plan, n_tokens, out_features) * static_cast<int64_t>(sizeof(float));
  if (need > 0 && (workspace == nullptr || workspace_bytes < need)) return cudaErrorInvalidValue;
  if (plan.blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  float* ws = static_cast<float*>(workspace);
  if (dtype == MaskedLinearDtype::kHalf)
    return launch_typed<__half>(plan, x, weight, packed, bias, task_ids, y, ws, n_tokens, in_features, out_features,
                                n_tasks, stream);
  if (dtype == MaskedLinearDtype::kBFloat16)
    return launch_typed<__nv_bfloat16>(plan, x, weight, packed, bias, task_ids, y, ws, n_tokens, in_features,
                                       out_features, n_tasks, stream);
  return cudaErrorInvalidValue;
}

}  // namespace pet_fast
