// Bottleneck adapter forward for few tokens (serving, n <= 64), fp32 / fp16 / bf16.
//
// One launch on sm_90 and later (cluster_kernel), two elsewhere, where eager PyTorch takes five or six:
//   cluster_kernel: one thread-block cluster (up to 16 blocks, co-scheduled by the hardware) does the whole
//     call. Block b owns a slice of the d columns: it computes its slice's share of x @ wd.T for every
//     token and bottleneck row, the cluster sums the shares through distributed shared memory (every block
//     the same sum, in the same order), and each block applies the bias and the activation to its own
//     copy of the hidden and writes y for its slice of channels, for each tile of up to 16 tokens in turn.
//     The hidden never leaves shared memory and no second launch waits on the first; the needs: rows
//     16-byte aligned (d and r multiples of 16 bytes' worth of elements).
//   down_kernel: one block per (bottleneck row j, tile of up to 8 tokens). The block's threads stride
//     over d (16 bytes of the weight row and of each token's x at a time where the rows are 16-byte
//     aligned), each keeping one fp32 partial dot product per token of the tile, then reduce across the
//     block; the first threads write act(a + bd[j]) to the fp32 workspace (n x r floats).
//   up_kernel: one thread per output channel c and tile of up to 16 tokens, the tile's hidden rows in
//     shared memory (read as broadcasts); each thread reads row c of wu once and writes
//     base + s * (h @ wu[c] + bu[c]) for its tokens, consecutive threads writing consecutive channels.
//
// Backward for the same few tokens, three launches, no atomics (every output element has one owner):
//   bwd_hidden_kernel: one block per bottleneck row j, looping over the tokens in tiles of 8:
//     recomputes a = x . wd[j] + bd[j] and dh = sum_c s_c dy[:, c] wu[c, j]; writes h = act(a) and
//     da = dh * act'(a) (fp32 workspace) and dbd[j] = sum_n da.
//   bwd_dx_kernel: one thread per (channel c, tile of 8 tokens): dx = da @ wd (+ dy).
//   bwd_weights_kernel: one thread per (channel c, group of 8 rows j): dwd[j, c] = sum_n da[n, j] x[n, c],
//     dwu[c, j] = sum_n s_c dy[n, c] h[n, j]; threads of the first row group also write dbu[c] and the
//     per-channel partial of d_scaling (recomputing h @ wu[c].T + bu[c]).
// Torch-free: raw pointers, sizes and a stream in (the binding is csrc/bottleneck_adapter_bind.cpp).
#include "bottleneck_adapter.h"

#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <atomic>
#include <cstdlib>
#include <cstring>

namespace pet_fast {
namespace {

constexpr int kTokensPerBlock = 8;
constexpr int kDownThreads = 256;
constexpr int kUpThreads = 64;  // channels per up-projection block
constexpr int kUpTokens = 16;   // tokens per up-projection block (its hidden tile: 16 x r floats, <= 16 KiB)

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

__device__ __forceinline__ float activate(float a, int act) {
  switch (act) {
    case kRelu: return a < 0.f ? 0.f : a;  // NaN stays NaN, as in torch.relu
    case kGelu: return 0.5f * a * (1.f + erff(a * 0.70710678118654752f));
    case kGeluTanh: return 0.5f * a * (1.f + tanhf(0.7978845608028654f * (a + 0.044715f * a * a * a)));
    case kSilu: return a / (1.f + expf(-a));
    case kTanh: return tanhf(a);
    default: return a;
  }
}

__device__ __forceinline__ float activate_grad(float a, int act) {
  switch (act) {
    case kRelu: return a > 0.f ? 1.f : 0.f;
    case kGelu: return 0.5f * (1.f + erff(a * 0.70710678118654752f)) + a * 0.3989422804014327f * expf(-0.5f * a * a);
    case kGeluTanh: {
      const float t = tanhf(0.7978845608028654f * (a + 0.044715f * a * a * a));
      return 0.5f * (1.f + t) + 0.5f * a * (1.f - t * t) * 0.7978845608028654f * (1.f + 0.134145f * a * a);
    }
    case kSilu: {
      const float sg = 1.f / (1.f + expf(-a));
      return sg * (1.f + a * (1.f - sg));
    }
    case kTanh: {
      const float t = tanhf(a);
      return 1.f - t * t;
    }
    default: return 1.f;
  }
}

template <typename T>
__device__ __forceinline__ float scale_at(const T* scale, int scale_mode, float scale_value, int64_t c) {
  return scale_mode == 0 ? scale_value : to_f(scale[scale_mode == 2 ? c : 0]);
}

// 16 bytes of T (8 halves or 4 floats) loaded at once and widened to fp32. The vector forms need every row
// they read to start 16-byte aligned (the launcher checks the pointers and the row lengths).
template <typename T>
struct Vec {
  static constexpr int kN = 16 / static_cast<int>(sizeof(T));
};

template <typename T>
__device__ __forceinline__ void load_vec(const T* __restrict__ p, float* out) {
  const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
  const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int i = 0; i < Vec<T>::kN; ++i) out[i] = to_f(e[i]);
}

// acc[t] += wrow[k, k + VN) . x[t * ld + k, ... + VN) for t < tokens: one 16-byte chunk of a weight row
// against the same chunk of every token's row (1 + tokens loads in flight).
template <typename T, int TOK>
__device__ __forceinline__ void chunk_dots(const T* __restrict__ wrow, const T* __restrict__ x, int64_t ld,
                                           int tokens, int64_t k, float (&acc)[TOK]) {
  constexpr int VN = Vec<T>::kN;
  float w[VN];
  load_vec(wrow + k, w);
#pragma unroll
  for (int t = 0; t < TOK; ++t) {
    if (t < tokens) {
      float xv[VN];
      load_vec(x + t * ld + k, xv);
#pragma unroll
      for (int i = 0; i < VN; ++i) acc[t] += w[i] * xv[i];
    }
  }
}

// The down projection: one block per (bottleneck row j, tile of up to 8 tokens). With VEC, each thread
// takes 16 bytes of the weight row and of every token's x per step, so one step has 1 + 8 loads in flight
// (the scalar form, for rows that are not 16-byte aligned, loads 2 or 4 bytes each).
template <typename T, bool VEC>
__global__ void down_kernel(const T* __restrict__ x, const T* __restrict__ wd, const T* __restrict__ bd,
                            float* __restrict__ hidden, int64_t n, int64_t d, int64_t r, int act) {
  const int64_t j = blockIdx.x;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kTokensPerBlock;
  const int tokens = static_cast<int>(n - n0 < kTokensPerBlock ? n - n0 : kTokensPerBlock);
  float acc[kTokensPerBlock];
#pragma unroll
  for (int t = 0; t < kTokensPerBlock; ++t) acc[t] = 0.f;
  const T* wrow = wd + j * d;
  if constexpr (VEC) {
    constexpr int VN = Vec<T>::kN;
    for (int64_t c = static_cast<int64_t>(threadIdx.x) * VN; c < d; c += static_cast<int64_t>(blockDim.x) * VN)
      chunk_dots<T, kTokensPerBlock>(wrow, x + n0 * d, d, tokens, c, acc);
  } else {
    for (int64_t c = threadIdx.x; c < d; c += blockDim.x) {
      const float w = to_f(wrow[c]);
#pragma unroll
      for (int t = 0; t < kTokensPerBlock; ++t)
        if (t < tokens) acc[t] += w * to_f(x[(n0 + t) * d + c]);
    }
  }
  // Reduce each token's partial sums: within warps by shuffles, then across warps in shared memory.
  __shared__ float partial[kDownThreads / 32][kTokensPerBlock];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int t = 0; t < kTokensPerBlock; ++t) {
    float v = acc[t];
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    if (lane == 0) partial[warp][t] = v;
  }
  __syncthreads();
  if (threadIdx.x < tokens) {
    const int t = threadIdx.x;
    float a = 0.f;
    for (int w = 0; w < kDownThreads / 32; ++w) a += partial[w][t];
    if (bd != nullptr) a += to_f(bd[j]);
    hidden[(n0 + t) * r + j] = activate(a, act);
  }
}

// The up projection: one block per (tile of kUpThreads channels, tile of up to kUpTokens tokens), one
// channel per thread. The tile's hidden rows (fp32, at most kUpTokens x r) are staged in shared memory,
// where every thread of a warp reads the same word (a broadcast); each thread reads its channel's row of
// wu once (16 bytes at a time with VEC) and keeps one sum per token, so the output and the base are read
// and written by consecutive threads (coalesced).
template <typename T, bool VEC>
__global__ void __launch_bounds__(kUpThreads)
up_kernel(const float* __restrict__ hidden, const T* __restrict__ wu, const T* __restrict__ bu,
          const T* __restrict__ scale, int scale_mode, float scale_value, const T* __restrict__ base,
          T* __restrict__ y, int64_t n, int64_t d, int64_t r) {
  __shared__ float sh[kUpTokens * kSmallMaxR];
  const int64_t t0 = static_cast<int64_t>(blockIdx.y) * kUpTokens;
  const int tokens = static_cast<int>(n - t0 < kUpTokens ? n - t0 : kUpTokens);
  const int rr = static_cast<int>(r);
  for (int i = threadIdx.x; i < kUpTokens * rr; i += blockDim.x) {
    const int t = i / rr;
    sh[i] = t < tokens ? hidden[(t0 + t) * r + (i - t * rr)] : 0.f;
  }
  __syncthreads();
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= d) return;  // (no barrier below)
  float acc[kUpTokens];
#pragma unroll
  for (int t = 0; t < kUpTokens; ++t) acc[t] = 0.f;
  const T* wrow = wu + c * r;
  if constexpr (VEC) {
    constexpr int VN = Vec<T>::kN;
    for (int k0 = 0; k0 < rr; k0 += VN) {
      float w[VN];
      load_vec(wrow + k0, w);
#pragma unroll
      for (int t = 0; t < kUpTokens; ++t) {
#pragma unroll
        for (int i = 0; i < VN; ++i) acc[t] += sh[t * rr + k0 + i] * w[i];
      }
    }
  } else {
    for (int k = 0; k < rr; ++k) {
      const float w = to_f(wrow[k]);
#pragma unroll
      for (int t = 0; t < kUpTokens; ++t) acc[t] += sh[t * rr + k] * w;
    }
  }
  const float bias = bu != nullptr ? to_f(bu[c]) : 0.f;
  const float s = scale_at(scale, scale_mode, scale_value, c);
#pragma unroll
  for (int t = 0; t < kUpTokens; ++t) {
    if (t < tokens) {
      const int64_t o = (t0 + t) * d + c;
      y[o] = from_f<T>(to_f(base[o]) + s * (acc[t] + bias));
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// The one-launch form (sm_90+, vector rows; tiles of kClusterTokens tokens). A cluster's blocks are
// scheduled together or not at all, so the barrier between the down and the up projection is
// cluster.sync(), not a second launch, and no block can wait on one that never runs.
constexpr int kClusterThreads = 256;
[[maybe_unused]] constexpr int kClusterTokens = 16;  // (the kernel body, the only user, is sm_90+ code)
constexpr int kClusterMaxBlocks = 16;  // the non-portable cluster size sm_90 allows (8 is portable)
constexpr int64_t kClusterColumns = 128;  // columns per block to aim for (fewer blocks for small d)

template <typename T>
__global__ void __launch_bounds__(kClusterThreads)
cluster_kernel(const T* __restrict__ x, const T* __restrict__ wd, const T* __restrict__ bd, const T* __restrict__ wu,
               const T* __restrict__ bu, const T* __restrict__ scale, int scale_mode, float scale_value,
               const T* __restrict__ base, T* __restrict__ y, int n_total, int64_t d, int r, int64_t slice, int act) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  namespace cg = cooperative_groups;
  constexpr int VN = Vec<T>::kN;
  // partial: one fp32 sum per (token, thread), reduced over the threads that split a dot product;
  // mine: this block's share of the pre-activation hidden (n x r), read by the whole cluster;
  // hidden: act(sum of the shares + bd), this block's copy, read as float4 broadcasts by the up projection.
  __shared__ float partial[kClusterTokens * kClusterThreads];
  __shared__ float mine[kClusterTokens * kSmallMaxR];
  __shared__ __align__(16) float hidden[kClusterTokens * kSmallMaxR];
  cg::cluster_group cluster = cg::this_cluster();
  const int tid = static_cast<int>(threadIdx.x);
  const int64_t c0 = static_cast<int64_t>(cluster.block_rank()) * slice;
  const int cols = c0 < d ? static_cast<int>((d - c0 < slice ? d - c0 : slice)) : 0;  // a multiple of VN

  int rp = 1;
  while (rp < r) rp <<= 1;
  const int q_parts = kClusterThreads / rp;
  int cp = 1;
  while (cp < cols && cp < kClusterThreads) cp <<= 1;
  const int q2_parts = kClusterThreads / cp;
  const int rchunks = r / VN;
  const int blocks = static_cast<int>(cluster.num_blocks());
  // Tiles of up to kClusterTokens tokens, one after another (the shared buffers hold one tile).
  for (int t0 = 0; t0 < n_total; t0 += kClusterTokens) {
    const int n = n_total - t0 < kClusterTokens ? n_total - t0 : kClusterTokens;  // the tile's tokens
    const T* xt = x + static_cast<int64_t>(t0) * d;
    if (t0 > 0) __syncthreads();  // the last tile's up projection has read `partial`
    // Down projection of the slice: thread (q, j) sums row j of wd against every token's x over the chunks
    // q, q + q_parts, ... of VN columns. Threads of a warp share q when r >= 32, so x's loads are broadcasts.
    const int j = tid % rp, q = tid / rp;
    float acc[kClusterTokens];
#pragma unroll
    for (int t = 0; t < kClusterTokens; ++t) acc[t] = 0.f;
    if (j < r) {
      const T* wrow = wd + static_cast<int64_t>(j) * d + c0;
      for (int k = q * VN; k < cols; k += q_parts * VN) chunk_dots<T, kClusterTokens>(wrow, xt + c0, d, n, k, acc);
    }
#pragma unroll
    for (int t = 0; t < kClusterTokens; ++t) partial[t * kClusterThreads + tid] = acc[t];
    __syncthreads();
    for (int i = tid; i < n * r; i += kClusterThreads) {
      const int t = i / r, jj = i - t * r;
      float s = 0.f;
      for (int p = 0; p < q_parts; ++p) s += partial[t * kClusterThreads + p * rp + jj];
      mine[i] = s;
    }
    cluster.sync();  // every block's share is written
    for (int i = tid; i < n * r; i += kClusterThreads) {
      float a = bd != nullptr ? to_f(bd[i % r]) : 0.f;
      for (int b = 0; b < blocks; ++b) a += cluster.map_shared_rank(mine, b)[i];  // same order in every block
      hidden[i] = activate(a, act);
    }
    cluster.sync();  // the hidden is complete, and no block reads another's shared memory after this

    // Up projection of the slice's channels: thread (q, c) sums the r-chunks q, q + q2_parts, ... of
    // h[t] . wu[c0 + c]; with at least as many channels as threads each thread takes whole channels.
    auto dot_chunks = [&](int c, int k_first, int k_step, float* out) {
      const T* wrow = wu + (c0 + c) * static_cast<int64_t>(r);
      for (int k = k_first; k < rchunks; k += k_step) {
        float w[VN];
        load_vec(wrow + k * VN, w);
#pragma unroll
        for (int t = 0; t < kClusterTokens; ++t) {
          if (t < n) {
#pragma unroll
            for (int i = 0; i < VN; i += 4) {
              const float4 h = *reinterpret_cast<const float4*>(&hidden[t * r + k * VN + i]);
              out[t] += h.x * w[i] + h.y * w[i + 1] + h.z * w[i + 2] + h.w * w[i + 3];
            }
          }
        }
      }
    };
    auto store = [&](int t, int c, float v) {
      const int64_t o = static_cast<int64_t>(t0 + t) * d + c0 + c;
      const float b = bu != nullptr ? to_f(bu[c0 + c]) : 0.f;
      y[o] = from_f<T>(to_f(base[o]) + scale_at(scale, scale_mode, scale_value, c0 + c) * (v + b));
    };
    if (q2_parts == 1) {
      for (int c = tid; c < cols; c += kClusterThreads) {
#pragma unroll
        for (int t = 0; t < kClusterTokens; ++t) acc[t] = 0.f;
        dot_chunks(c, 0, 1, acc);
#pragma unroll
        for (int t = 0; t < kClusterTokens; ++t)
          if (t < n) store(t, c, acc[t]);
      }
    } else {
      const int c = tid % cp, q2 = tid / cp;
#pragma unroll
      for (int t = 0; t < kClusterTokens; ++t) acc[t] = 0.f;
      if (c < cols) dot_chunks(c, q2, q2_parts, acc);
#pragma unroll
      for (int t = 0; t < kClusterTokens; ++t) partial[t * kClusterThreads + tid] = acc[t];
      __syncthreads();
      for (int i = tid; i < n * cols; i += kClusterThreads) {  // consecutive threads, consecutive channels
        const int t = i / cols, cc = i - t * cols;
        float s = 0.f;
        for (int p = 0; p < q2_parts; ++p) s += partial[t * kClusterThreads + p * cp + cc];
        store(t, cc, s);
      }
    }
  }
#elif defined(__CUDA_ARCH__)
  __trap();  // never launched: cluster_limit() refuses code built for an older architecture
#endif
}

__host__ __forceinline__ bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// Whether the one-launch form may run (PET_FAST_ADAPTER_CLUSTER=0 or set_small_cluster(false) turn it off).
std::atomic<int> g_cluster_switch{-1};  // -1: not read from the environment yet

bool cluster_switch_on() {
  int v = g_cluster_switch.load(std::memory_order_relaxed);
  if (v < 0) {
    const char* env = std::getenv("PET_FAST_ADAPTER_CLUSTER");
    v = (env != nullptr && std::strcmp(env, "0") == 0) ? 0 : 1;
    int expected = -1;
    g_cluster_switch.compare_exchange_strong(expected, v);
    v = g_cluster_switch.load(std::memory_order_relaxed);
  }
  return v == 1;
}

// The largest cluster (a power of two, <= kClusterMaxBlocks) the device co-schedules for cluster_kernel<T>;
// 0 before sm_90 or when the query fails. Asked once per device and element type.
constexpr int kMaxDevices = 64;

template <typename T>
int cluster_limit(int device) {
  static std::atomic<int> cache[kMaxDevices];  // 0: not asked yet, else the answer + 1
  if (device < 0 || device >= kMaxDevices) return 0;
  const int cached = cache[device].load(std::memory_order_relaxed);
  if (cached > 0) return cached - 1;
  int limit = 0, major = 0;
  cudaFuncAttributes attrs = {};
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess) major = 0;
  if (major >= 9 && cudaFuncGetAttributes(&attrs, cluster_kernel<T>) != cudaSuccess) attrs.ptxVersion = 0;
  (void)cudaGetLastError();  // (either query's failure only means: the two-kernel form)
  // ptxVersion: the architecture the kernel was compiled for (code JIT-compiled from older PTX has no body)
  if (major >= 9 && attrs.ptxVersion >= 90) {
    // beyond 8 blocks a cluster is "non-portable": allowed per kernel, then the device says what fits
    if (cudaFuncSetAttribute(cluster_kernel<T>, cudaFuncAttributeNonPortableClusterSizeAllowed, 1) != cudaSuccess)
      (void)cudaGetLastError();
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(kClusterMaxBlocks);
    cfg.blockDim = dim3(kClusterThreads);
    int size = 0;
    if (cudaOccupancyMaxPotentialClusterSize(&size, cluster_kernel<T>, &cfg) == cudaSuccess) {
      limit = 1;
      while (limit * 2 <= size && limit * 2 <= kClusterMaxBlocks) limit *= 2;
      if (size < 1) limit = 0;
    } else {
      (void)cudaGetLastError();
    }
  }
  cache[device].store(limit + 1, std::memory_order_relaxed);
  return limit;
}

// The cluster size for this call, or 0 where the two-kernel form runs instead.
template <typename T>
int cluster_blocks(const void* x, const void* wd, const void* wu, int64_t n, int64_t d, int64_t r) {
  constexpr int VN = Vec<T>::kN;
  if (n < 1 || n > kSmallMaxTokens || d % VN != 0 || r % VN != 0 || !aligned16(x) || !aligned16(wd) ||
      !aligned16(wu) || !cluster_switch_on())
    return 0;
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  const int limit = cluster_limit<T>(device);
  int blocks = 1;
  while (blocks < limit && static_cast<int64_t>(blocks) * kClusterColumns < d) blocks *= 2;
  return limit > 0 ? blocks : 0;
}

template <typename T>
int launch_cluster(int blocks, const void* x, const void* wd, const void* bd, const void* wu, const void* bu,
                   const void* scale, int scale_mode, float scale_value, const void* base, void* y, int64_t n,
                   int64_t d, int64_t r, int act, cudaStream_t stream) {
  constexpr int VN = Vec<T>::kN;
  const int64_t slice = ((d + blocks - 1) / blocks + VN - 1) / VN * VN;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(static_cast<unsigned>(blocks));
  cfg.blockDim = dim3(kClusterThreads);
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = static_cast<unsigned>(blocks);
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  return static_cast<int>(cudaLaunchKernelEx(
      &cfg, cluster_kernel<T>, static_cast<const T*>(x), static_cast<const T*>(wd), static_cast<const T*>(bd),
      static_cast<const T*>(wu), static_cast<const T*>(bu), static_cast<const T*>(scale), scale_mode, scale_value,
      static_cast<const T*>(base), static_cast<T*>(y), static_cast<int>(n), d, static_cast<int>(r), slice, act));
}

template <typename T>
int launch(const void* x, const void* wd, const void* bd, const void* wu, const void* bu, const void* scale,
           int scale_mode, float scale_value, const void* residual, void* y, float* workspace, int64_t n,
           int64_t d, int64_t r, int act, cudaStream_t stream) {
  constexpr int VN = Vec<T>::kN;
  const T* xt = static_cast<const T*>(x);
  const void* base_ptr = residual != nullptr ? residual : x;
  if (const int blocks = cluster_blocks<T>(x, wd, wu, n, d, r))
    return launch_cluster<T>(blocks, x, wd, bd, wu, bu, scale, scale_mode, scale_value, base_ptr, y, n, d, r, act,
                             stream);
  if (workspace == nullptr) return static_cast<int>(cudaErrorInvalidValue);
  dim3 down_grid(static_cast<unsigned>(r), static_cast<unsigned>((n + kTokensPerBlock - 1) / kTokensPerBlock));
  if (d % VN == 0 && aligned16(x) && aligned16(wd))
    down_kernel<T, true><<<down_grid, kDownThreads, 0, stream>>>(xt, static_cast<const T*>(wd),
                                                                 static_cast<const T*>(bd), workspace, n, d, r, act);
  else
    down_kernel<T, false><<<down_grid, kDownThreads, 0, stream>>>(xt, static_cast<const T*>(wd),
                                                                  static_cast<const T*>(bd), workspace, n, d, r, act);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return static_cast<int>(err);
  dim3 up_grid(static_cast<unsigned>((d + kUpThreads - 1) / kUpThreads),
               static_cast<unsigned>((n + kUpTokens - 1) / kUpTokens));
  const T* base = residual != nullptr ? static_cast<const T*>(residual) : xt;
  if (r % VN == 0 && aligned16(wu))
    up_kernel<T, true><<<up_grid, kUpThreads, 0, stream>>>(workspace, static_cast<const T*>(wu), static_cast<const T*>(bu),
                                                           static_cast<const T*>(scale), scale_mode, scale_value, base,
                                                           static_cast<T*>(y), n, d, r);
  else
    up_kernel<T, false><<<up_grid, kUpThreads, 0, stream>>>(workspace, static_cast<const T*>(wu), static_cast<const T*>(bu),
                                                            static_cast<const T*>(scale), scale_mode, scale_value, base,
                                                            static_cast<T*>(y), n, d, r);
  return static_cast<int>(cudaGetLastError());
}

template <typename T>
__global__ void bwd_hidden_kernel(const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ wd,
                                  const T* __restrict__ bd, const T* __restrict__ wu, const T* __restrict__ scale,
                                  int scale_mode, float scale_value, float* __restrict__ hbuf,
                                  float* __restrict__ dabuf, T* __restrict__ dbd, int64_t n, int64_t d, int64_t r,
                                  int act) {
  const int64_t j = blockIdx.x;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __shared__ float partial[kDownThreads / 32][2 * kTokensPerBlock];
  float dbd_sum = 0.f;  // meaningful in thread 0
  for (int64_t n0 = 0; n0 < n; n0 += kTokensPerBlock) {
    const int tokens = static_cast<int>(n - n0 < kTokensPerBlock ? n - n0 : kTokensPerBlock);
    float acc_a[kTokensPerBlock], acc_dh[kTokensPerBlock];
#pragma unroll
    for (int t = 0; t < kTokensPerBlock; ++t) acc_a[t] = acc_dh[t] = 0.f;
    for (int64_t c = threadIdx.x; c < d; c += blockDim.x) {
      const float w_dn = to_f(wd[j * d + c]);
      const float w_up = to_f(wu[c * r + j]) * scale_at(scale, scale_mode, scale_value, c);
#pragma unroll
      for (int t = 0; t < kTokensPerBlock; ++t) {
        if (t < tokens) {
          acc_a[t] += w_dn * to_f(x[(n0 + t) * d + c]);
          acc_dh[t] += w_up * to_f(dy[(n0 + t) * d + c]);
        }
      }
    }
#pragma unroll
    for (int t = 0; t < kTokensPerBlock; ++t) {
      float va = acc_a[t], vd = acc_dh[t];
      for (int off = 16; off > 0; off >>= 1) {
        va += __shfl_xor_sync(0xffffffffu, va, off);
        vd += __shfl_xor_sync(0xffffffffu, vd, off);
      }
      if (lane == 0) {
        partial[warp][t] = va;
        partial[warp][kTokensPerBlock + t] = vd;
      }
    }
    __syncthreads();
    if (threadIdx.x < tokens) {
      const int t = threadIdx.x;
      float a = 0.f, dh = 0.f;
      for (int w = 0; w < kDownThreads / 32; ++w) {
        a += partial[w][t];
        dh += partial[w][kTokensPerBlock + t];
      }
      if (bd != nullptr) a += to_f(bd[j]);
      const float da = dh * activate_grad(a, act);
      hbuf[(n0 + t) * r + j] = activate(a, act);
      dabuf[(n0 + t) * r + j] = da;
      partial[0][t] = da;  // row 0 of this tile's partial sums is no longer read by other threads
    }
    __syncthreads();
    if (threadIdx.x == 0)
      for (int t = 0; t < tokens; ++t) dbd_sum += partial[0][t];
    __syncthreads();
  }
  if (threadIdx.x == 0 && dbd != nullptr) dbd[j] = from_f<T>(dbd_sum);
}

template <typename T>
__global__ void bwd_dx_kernel(const T* __restrict__ dy, const T* __restrict__ wd, const float* __restrict__ dabuf,
                              T* __restrict__ dx, int add_dy, int64_t n, int64_t d, int64_t r) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kTokensPerBlock;
  if (c >= d) return;
  const int tokens = static_cast<int>(n - n0 < kTokensPerBlock ? n - n0 : kTokensPerBlock);
  float acc[kTokensPerBlock];
#pragma unroll
  for (int t = 0; t < kTokensPerBlock; ++t) acc[t] = 0.f;
  for (int64_t j = 0; j < r; ++j) {
    const float w = to_f(wd[j * d + c]);
#pragma unroll
    for (int t = 0; t < kTokensPerBlock; ++t)
      if (t < tokens) acc[t] += dabuf[(n0 + t) * r + j] * w;
  }
  for (int t = 0; t < tokens; ++t) {
    const int64_t o = (n0 + t) * d + c;
    dx[o] = from_f<T>(acc[t] + (add_dy ? to_f(dy[o]) : 0.f));
  }
}

constexpr int kRowsPerThread = 8;

template <typename T>
__global__ void bwd_weights_kernel(const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ wu,
                                   const T* __restrict__ bu, const T* __restrict__ scale, int scale_mode,
                                   float scale_value, const float* __restrict__ hbuf,
                                   const float* __restrict__ dabuf, T* __restrict__ dwd, T* __restrict__ dwu,
                                   T* __restrict__ dbu, float* __restrict__ ds_partial, int64_t n, int64_t d,
                                   int64_t r) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t j0 = static_cast<int64_t>(blockIdx.y) * kRowsPerThread;
  if (c >= d) return;
  const int rows = static_cast<int>(r - j0 < kRowsPerThread ? r - j0 : kRowsPerThread);
  const float s = scale_at(scale, scale_mode, scale_value, c);
  float acc_wd[kRowsPerThread], acc_wu[kRowsPerThread];
#pragma unroll
  for (int i = 0; i < kRowsPerThread; ++i) acc_wd[i] = acc_wu[i] = 0.f;
  for (int64_t t = 0; t < n; ++t) {
    const float xv = to_f(x[t * d + c]);
    const float gv = s * to_f(dy[t * d + c]);
#pragma unroll
    for (int i = 0; i < kRowsPerThread; ++i) {
      if (i < rows) {
        acc_wd[i] += dabuf[t * r + j0 + i] * xv;
        acc_wu[i] += hbuf[t * r + j0 + i] * gv;
      }
    }
  }
  for (int i = 0; i < rows; ++i) {
    dwd[(j0 + i) * d + c] = from_f<T>(acc_wd[i]);
    dwu[c * r + j0 + i] = from_f<T>(acc_wu[i]);
  }
  if (blockIdx.y != 0) return;
  if (dbu != nullptr || ds_partial != nullptr) {
    const float bias = bu != nullptr ? to_f(bu[c]) : 0.f;
    float sum_g = 0.f, sum_ds = 0.f;
    for (int64_t t = 0; t < n; ++t) {
      const float dyv = to_f(dy[t * d + c]);
      sum_g += s * dyv;
      if (ds_partial != nullptr) {
        float up = bias;
        for (int64_t j = 0; j < r; ++j) up += hbuf[t * r + j] * to_f(wu[c * r + j]);
        sum_ds += dyv * up;
      }
    }
    if (dbu != nullptr) dbu[c] = from_f<T>(sum_g);
    if (ds_partial != nullptr) ds_partial[c] = sum_ds;
  }
}

template <typename T>
int launch_backward(const void* dy, const void* x, const void* wd, const void* bd, const void* wu, const void* bu,
                    const void* scale, int scale_mode, float scale_value, int add_dy, void* dx, void* dwd,
                    void* dbd, void* dwu, void* dbu, float* ds_partial, float* workspace, int64_t n, int64_t d,
                    int64_t r, int act, cudaStream_t stream) {
  const T* dyt = static_cast<const T*>(dy);
  const T* xt = static_cast<const T*>(x);
  const T* st = static_cast<const T*>(scale);
  float* hbuf = workspace;
  float* dabuf = workspace + n * r;
  bwd_hidden_kernel<T><<<static_cast<unsigned>(r), kDownThreads, 0, stream>>>(
      dyt, xt, static_cast<const T*>(wd), static_cast<const T*>(bd), static_cast<const T*>(wu), st, scale_mode,
      scale_value, hbuf, dabuf, static_cast<T*>(dbd), n, d, r, act);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return static_cast<int>(err);
  constexpr int kThreads = 128;
  const unsigned cblocks = static_cast<unsigned>((d + kThreads - 1) / kThreads);
  dim3 dx_grid(cblocks, static_cast<unsigned>((n + kTokensPerBlock - 1) / kTokensPerBlock));
  bwd_dx_kernel<T><<<dx_grid, kThreads, 0, stream>>>(dyt, static_cast<const T*>(wd), dabuf, static_cast<T*>(dx),
                                                     add_dy, n, d, r);
  err = cudaGetLastError();
  if (err != cudaSuccess) return static_cast<int>(err);
  dim3 w_grid(cblocks, static_cast<unsigned>((r + kRowsPerThread - 1) / kRowsPerThread));
  bwd_weights_kernel<T><<<w_grid, kThreads, 0, stream>>>(
      dyt, xt, static_cast<const T*>(wu), static_cast<const T*>(bu), st, scale_mode, scale_value, hbuf, dabuf,
      static_cast<T*>(dwd), static_cast<T*>(dwu), static_cast<T*>(dbu), ds_partial, n, d, r);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

int bottleneck_adapter_forward_small(int dtype, const void* x, const void* wd, const void* bd, const void* wu,
                                     const void* bu, const void* scale, int scale_mode, float scale_value,
                                     const void* residual, void* y, float* workspace, int64_t n, int64_t d,
                                     int64_t r, int act, cudaStream_t stream) {
  if (n < 0 || n > kSmallMaxTokens || r < 1 || r > kSmallMaxR || d < 1 || act < kRelu || act > kIdentity ||
      scale_mode < 0 || scale_mode > 2 || (scale_mode != 0 && scale == nullptr))
    return static_cast<int>(cudaErrorInvalidValue);
  if (n == 0) return static_cast<int>(cudaSuccess);
  switch (dtype) {
    case kAdapterF32:
      return launch<float>(x, wd, bd, wu, bu, scale, scale_mode, scale_value, residual, y, workspace, n, d, r, act, stream);
    case kAdapterF16:
      return launch<__half>(x, wd, bd, wu, bu, scale, scale_mode, scale_value, residual, y, workspace, n, d, r, act, stream);
    case kAdapterBF16:
      return launch<__nv_bfloat16>(x, wd, bd, wu, bu, scale, scale_mode, scale_value, residual, y, workspace, n, d, r, act, stream);
    default:
      return static_cast<int>(cudaErrorInvalidValue);
  }
}

int64_t bottleneck_adapter_forward_small_workspace(int dtype, const void* x, const void* wd, const void* wu,
                                                   int64_t n, int64_t d, int64_t r) {
  int blocks = 0;
  switch (dtype) {
    case kAdapterF32: blocks = cluster_blocks<float>(x, wd, wu, n, d, r); break;
    case kAdapterF16: blocks = cluster_blocks<__half>(x, wd, wu, n, d, r); break;
    case kAdapterBF16: blocks = cluster_blocks<__nv_bfloat16>(x, wd, wu, n, d, r); break;
    default: break;
  }
  return blocks > 0 ? 0 : n * r;
}

bool bottleneck_adapter_set_small_cluster(bool on) {
  const bool was = cluster_switch_on();
  g_cluster_switch.store(on ? 1 : 0, std::memory_order_relaxed);
  return was;
}

int bottleneck_adapter_backward_small(int dtype, const void* dy, const void* x, const void* wd, const void* bd,
                                      const void* wu, const void* bu, const void* scale, int scale_mode,
                                      float scale_value, int add_dy, void* dx, void* dwd, void* dbd, void* dwu,
                                      void* dbu, float* ds_partial, float* workspace, int64_t n, int64_t d,
                                      int64_t r, int act, cudaStream_t stream) {
  if (n < 1 || n > kSmallMaxTokens || r < 1 || r > kSmallMaxR || d < 1 || act < kRelu || act > kIdentity ||
      scale_mode < 0 || scale_mode > 2 || (scale_mode != 0 && scale == nullptr))
    return static_cast<int>(cudaErrorInvalidValue);
  switch (dtype) {
    case kAdapterF32:
      return launch_backward<float>(dy, x, wd, bd, wu, bu, scale, scale_mode, scale_value, add_dy, dx, dwd, dbd, dwu,
                                    dbu, ds_partial, workspace, n, d, r, act, stream);
    case kAdapterF16:
      return launch_backward<__half>(dy, x, wd, bd, wu, bu, scale, scale_mode, scale_value, add_dy, dx, dwd, dbd, dwu,
                                     dbu, ds_partial, workspace, n, d, r, act, stream);
    case kAdapterBF16:
      return launch_backward<__nv_bfloat16>(dy, x, wd, bd, wu, bu, scale, scale_mode, scale_value, add_dy, dx, dwd,
                                            dbd, dwu, dbu, ds_partial, workspace, n, d, r, act, stream);
    default:
      return static_cast<int>(cudaErrorInvalidValue);
  }
}

}  // namespace pet_fast
