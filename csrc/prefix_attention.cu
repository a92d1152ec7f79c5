// Decode attention of 1..8 new query tokens per sequence over [prefix; KV cache], split over the key
// length (split-K) and merged by log-sum-exp. The prefix is read from its own tensor (batch stride 0
// when shared), never copied into the cache. fp16/bf16 in, fp32 softmax and accumulation.
//
// Kernel 1, one block per (split, group of up to 8 query rows of one key/value head, batch), 4 warps.
// The rows are (query head, new token) pairs of the heads that share the key/value head (GQA), so a
// key/value row is read once for all of them. For each chunk of 64 keys of its split:
//   (a) each warp takes keys in turn; lanes hold slices of the key row and reduce q . k_j for all the
//       block's rows at once, so every key row is loaded once per block;
//   (b) one warp per query row updates the running max and sum (online softmax, natural exp);
//   (c) each thread owns head-dim columns and adds p_ij * v_j[d] for all rows: each value row is
//       loaded once, coalesced.
// Kernel 2, one block per (new token, q head, batch): merges the splits' (max, sum, partial output).
#include "prefix_attention.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>

namespace pet_fast {
namespace {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kChunk = 64;
constexpr int kColsPerThread = kDecodeMaxHeadDim / kThreads;  // 2
constexpr int kLanesElems = kDecodeMaxHeadDim / 32;           // 8
constexpr int kKeysInFlight = 4;  // key (or value) rows a warp (or thread) loads before using them

__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}
__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
decode_split_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                    const T* __restrict__ pk, const T* __restrict__ pv, long long pk_bstride,
                    const uint8_t* __restrict__ key_mask, const int32_t* __restrict__ cache_lens,
                    float* __restrict__ part_o, float* __restrict__ part_ml, int Hq, int Hkv, int L, int S, int P,
                    int D, bool causal, float scale, int splits) {
  const int split = blockIdx.x, b = blockIdx.z;
  const int G = Hq / Hkv;                                              // query heads per key/value head
  const int groups = (G * L + kDecodeMaxQueries - 1) / kDecodeMaxQueries;  // row groups per key/value head
  const int hk = blockIdx.y / groups;
  const int row0 = (blockIdx.y % groups) * kDecodeMaxQueries;          // first (head, token) row of this block
  const int nrows = min(kDecodeMaxQueries, G * L - row0);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int T_total = P + S;
  const int per_split = (T_total + splits - 1) / splits;
  const int k_begin = min(T_total, split * per_split);
  const int k_end = min(T_total, k_begin + per_split);
  const int len_b = cache_lens ? min(max(cache_lens[b], 0), S) : S;
  const int causal_shift = len_b - L;

  __shared__ float q_s[kDecodeMaxQueries * kDecodeMaxHeadDim];
  __shared__ float s_s[kDecodeMaxQueries * kChunk];
  __shared__ float m_s[kDecodeMaxQueries], l_s[kDecodeMaxQueries], alpha_s[kDecodeMaxQueries];
  __shared__ int tok_s[kDecodeMaxQueries];         // each row's new-token index (for causality)
  __shared__ long long qrow_s[kDecodeMaxQueries];  // each row's index in q / out, (b * Hq + h) * L + i
  __shared__ bool valid_s[kChunk];  // padded or out-of-length cache slots may hold anything: never read them

  if (tid < nrows) {
    const int g = row0 + tid;
    tok_s[tid] = g % L;
    qrow_s[tid] = ((long long)b * Hq + (long long)hk * G + g / L) * L + g % L;
  }
  __syncthreads();
  for (int x = tid; x < nrows * D; x += kThreads) q_s[x] = to_float(q[qrow_s[x / D] * D + x % D]) * scale;
  if (tid < kDecodeMaxQueries) {
    m_s[tid] = -INFINITY;
    l_s[tid] = 0.f;
  }
  const T* k_seq = k + ((long long)b * Hkv + hk) * S * D;
  const T* v_seq = v + ((long long)b * Hkv + hk) * S * D;
  const T* k_pre = pk ? pk + (long long)b * pk_bstride + (long long)hk * P * D : nullptr;
  const T* v_pre = pv ? pv + (long long)b * pk_bstride + (long long)hk * P * D : nullptr;

  float acc[kDecodeMaxQueries][kColsPerThread];
#pragma unroll
  for (int i = 0; i < kDecodeMaxQueries; ++i)
#pragma unroll
    for (int c = 0; c < kColsPerThread; ++c) acc[i][c] = 0.f;
  __syncthreads();

  for (int c0 = k_begin; c0 < k_end; c0 += kChunk) {
    const int c_n = min(kChunk, k_end - c0);
    // (a) scores. A warp takes kKeysInFlight keys at a time and loads all their slices before any
    // reduction, so that several row loads are in flight per warp instead of one.
    for (int t0 = warp * kKeysInFlight; t0 < c_n; t0 += kWarps * kKeysInFlight) {
      float kr[kKeysInFlight][kLanesElems];
      bool ok_key[kKeysInFlight];
#pragma unroll
      for (int u = 0; u < kKeysInFlight; ++u) {
        const int t = t0 + u;
        const int key = c0 + t;
        const bool is_prefix = key < P;
        const int j = key - P;
        bool key_ok = t < c_n;
        if (key_ok && !is_prefix) key_ok = j < len_b && (key_mask == nullptr || key_mask[(long long)b * S + j] != 0);
        ok_key[u] = key_ok;
        const T* krow = is_prefix ? k_pre + (long long)key * D : k_seq + (long long)j * D;
#pragma unroll
        for (int e = 0; e < kLanesElems; ++e) {
          const int d = lane + 32 * e;
          kr[u][e] = (key_ok && d < D) ? to_float(krow[d]) : 0.f;
        }
      }
#pragma unroll
      for (int u = 0; u < kKeysInFlight; ++u) {
        const int t = t0 + u;
        if (t >= c_n) break;
        const int key = c0 + t;
        const bool is_prefix = key < P;
        const int j = key - P;
        if (lane == 0) valid_s[t] = ok_key[u];
#pragma unroll
        for (int i = 0; i < kDecodeMaxQueries; ++i) {
          if (i < nrows) {
            float part = 0.f;
#pragma unroll
            for (int e = 0; e < kLanesElems; ++e) {
              const int d = lane + 32 * e;
              if (d < D) part += q_s[i * D + d] * kr[u][e];
            }
            part = warp_sum(part);
            const bool ok = ok_key[u] && (is_prefix || !causal || j <= tok_s[i] + causal_shift);
            if (lane == 0) s_s[i * kChunk + t] = ok ? part : -INFINITY;
          }
        }
      }
    }
    __syncthreads();
    // (b) online softmax per query row
    for (int i = warp; i < nrows; i += kWarps) {
      float mx = -INFINITY;
      for (int t = lane; t < c_n; t += 32) mx = fmaxf(mx, s_s[i * kChunk + t]);
      mx = warp_max(mx);
      const float m_old = m_s[i];
      const float m_new = fmaxf(m_old, mx);
      const float m_safe = m_new == -INFINITY ? 0.f : m_new;
      float sum = 0.f;
      for (int t = lane; t < c_n; t += 32) {
        const float p = __expf(s_s[i * kChunk + t] - m_safe);
        s_s[i * kChunk + t] = p;
        sum += p;
      }
      sum = warp_sum(sum);
      __syncwarp();
      if (lane == 0) {
        const float alpha = __expf(m_old - m_safe);
        l_s[i] = l_s[i] * alpha + sum;
        m_s[i] = m_new;
        alpha_s[i] = alpha;
      }
    }
    __syncthreads();
    // (c) weighted values, kKeysInFlight value rows loaded before they are used (a chain of one load
    // per key would leave each thread waiting on memory latency key after key).
#pragma unroll
    for (int c = 0; c < kColsPerThread; ++c) {
      const int d = tid + c * kThreads;
      if (d < D) {
#pragma unroll
        for (int i = 0; i < kDecodeMaxQueries; ++i)
          if (i < nrows) acc[i][c] *= alpha_s[i];
        for (int t0 = 0; t0 < c_n; t0 += kKeysInFlight) {
          float vv[kKeysInFlight];
#pragma unroll
          for (int u = 0; u < kKeysInFlight; ++u) {
            const int t = t0 + u;
            const int key = c0 + t;
            vv[u] = 0.f;
            if (t < c_n && valid_s[t])
              vv[u] = key < P ? to_float(v_pre[(long long)key * D + d]) : to_float(v_seq[(long long)(key - P) * D + d]);
          }
#pragma unroll
          for (int u = 0; u < kKeysInFlight; ++u) {
            if (t0 + u < c_n) {  // s_s past c_n holds stale values
#pragma unroll
              for (int i = 0; i < kDecodeMaxQueries; ++i)
                if (i < nrows) acc[i][c] += s_s[i * kChunk + t0 + u] * vv[u];
            }
          }
        }
      }
    }
    __syncthreads();
  }

#pragma unroll
  for (int i = 0; i < kDecodeMaxQueries; ++i) {
    if (i < nrows) {
      const long long row = qrow_s[i] * splits + split;
#pragma unroll
      for (int c = 0; c < kColsPerThread; ++c) {
        const int d = tid + c * kThreads;
        if (d < D) part_o[row * D + d] = acc[i][c];
      }
      if (tid == 0) {
        part_ml[row * 2] = m_s[i];
        part_ml[row * 2 + 1] = l_s[i];
      }
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
decode_merge_kernel(const float* __restrict__ part_o, const float* __restrict__ part_ml, T* __restrict__ out, int Hq,
                    int L, int D, int splits) {
  const int i = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const long long row = ((long long)b * Hq + h) * L + i;
  const float* ml = part_ml + row * splits * 2;
  float m = -INFINITY;
  for (int s = 0; s < splits; ++s) m = fmaxf(m, ml[2 * s]);
  float denom = 0.f;
  if (m != -INFINITY)
    for (int s = 0; s < splits; ++s) denom += ml[2 * s + 1] * __expf(ml[2 * s] - m);
  for (int d = threadIdx.x; d < D; d += kThreads) {
    float o = 0.f;
    if (denom > 0.f) {
      for (int s = 0; s < splits; ++s) {
        const float w = __expf(ml[2 * s] - m);  // exp(-inf) = 0 for empty splits
        if (w > 0.f) o += w * part_o[(row * splits + s) * D + d];
      }
      o /= denom;
    }
    out[row * D + d] = from_float<T>(o);
  }
}

template <typename T>
cudaError_t launch(const void* q, const void* k, const void* v, const void* pk, const void* pv, long long pk_bstride,
                   const uint8_t* key_mask, const int32_t* cache_lens, void* out, float* part_o, float* part_ml, int B,
                   int Hq, int Hkv, int L, int S, int P, int D, bool causal, float scale, int splits,
                   cudaStream_t stream) {
  const int groups = ((Hq / Hkv) * L + kDecodeMaxQueries - 1) / kDecodeMaxQueries;
  dim3 grid1(splits, Hkv * groups, B);
  decode_split_kernel<T><<<grid1, kThreads, 0, stream>>>(
      static_cast<const T*>(q), static_cast<const T*>(k), static_cast<const T*>(v), static_cast<const T*>(pk),
      static_cast<const T*>(pv), pk_bstride, key_mask, cache_lens, part_o, part_ml, Hq, Hkv, L, S, P, D, causal, scale,
      splits);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  dim3 grid2(L, Hq, B);
  decode_merge_kernel<T><<<grid2, kThreads, 0, stream>>>(part_o, part_ml, static_cast<T*>(out), Hq, L, D, splits);
  return cudaGetLastError();
}

}  // namespace

int prefix_attention_decode_splits(int batch, int q_heads, int kv_heads, int q_len, int total_keys, int sm_count) {
  const int groups = kv_heads > 0 ? ((q_heads / kv_heads) * q_len + kDecodeMaxQueries - 1) / kDecodeMaxQueries : 1;
  const int blocks = batch * kv_heads * groups;
  const int target = 8 * (sm_count > 0 ? sm_count : 132);  // several 4-warp blocks per SM hide load latency
  int splits = blocks > 0 ? (target + blocks - 1) / blocks : 1;
  const int max_by_keys = (total_keys + kChunk - 1) / kChunk;  // at least one chunk of keys per split
  if (splits > max_by_keys) splits = max_by_keys;
  if (splits > 128) splits = 128;
  return splits < 1 ? 1 : splits;
}

cudaError_t prefix_attention_decode(DecodeDtype dtype, const void* q, const void* k, const void* v,
                                    const void* prefix_k, const void* prefix_v, long long prefix_batch_stride,
                                    const uint8_t* key_mask, const int32_t* cache_lens, void* out,
                                    float* partial_out, float* partial_ml, int batch, int q_heads, int kv_heads,
                                    int q_len, int kv_len, int prefix_len, int head_dim, bool causal, float scale,
                                    int num_splits, cudaStream_t stream) {
  if (q_len < 1 || q_len > kDecodeMaxQueries || head_dim < 1 || head_dim > kDecodeMaxHeadDim || kv_heads < 1 ||
      q_heads % kv_heads != 0 || num_splits < 1 || batch < 1 || batch > 65535 ||
      (long long)kv_heads * (((q_heads / kv_heads) * q_len + kDecodeMaxQueries - 1) / kDecodeMaxQueries) > 65535)
    return cudaErrorInvalidValue;
  if (prefix_len > 0 && (prefix_k == nullptr || prefix_v == nullptr)) return cudaErrorInvalidValue;
  if (prefix_len < 0 || kv_len < 0 || static_cast<long long>(prefix_len) + kv_len > kDecodeMaxKeys ||
      num_splits > kDecodeMaxSplits)
    return cudaErrorInvalidValue;
  if (dtype == DecodeDtype::kFloat16)
    return launch<__half>(q, k, v, prefix_k, prefix_v, prefix_batch_stride, key_mask, cache_lens, out, partial_out,
                          partial_ml, batch, q_heads, kv_heads, q_len, kv_len, prefix_len, head_dim, causal, scale,
                          num_splits, stream);
  return launch<__nv_bfloat16>(q, k, v, prefix_k, prefix_v, prefix_batch_stride, key_mask, cache_lens, out,
                               partial_out, partial_ml, batch, q_heads, kv_heads, q_len, kv_len, prefix_len, head_dim,
                               causal, scale, num_splits, stream);
}

}  // namespace pet_fast
