// Decode attention over a trained prefix plus a KV cache (no torch headers: CI compiles the .cu alone).
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

namespace pet_fast {

constexpr int kDecodeMaxQueries = 8;    // new tokens per sequence; also the (query head, token) rows of a block
constexpr int kDecodeMaxHeadDim = 256;
// Key positions (prefix plus cache) and split bounds are int in the kernel: these limits keep every sum
// of them (begin + length of a split, chunk starts) below 2**31.
constexpr int kDecodeMaxSplits = 4096;
constexpr long long kDecodeMaxKeys = 2147483647LL - 2 * kDecodeMaxSplits;

enum class DecodeDtype : int { kFloat16 = 0, kBFloat16 = 1 };

// Number of key splits over total_keys = P + S keys, for blocks of up to kDecodeMaxQueries (query head,
// new token) rows that share a key/value head.
int prefix_attention_decode_splits(int batch, int q_heads, int kv_heads, int q_len, int total_keys, int sm_count);

// q (B, Hq, L, D); k, v (B, Hkv, S, D); prefix_k/_v rows of D at prefix + b * prefix_batch_stride
// + h_kv * P * D (batch stride 0 when shared; null when P == 0); out like q. All contiguous.
// key_mask: null or (B, S) bytes, nonzero marks a real key. cache_lens: null or (B) int32, keys j >= len
// are ignored. causal: query i sees cache key j <= i + (len_b - L), len_b = cache_lens[b] or S.
// Workspace: partial_out float (B*Hq*L*num_splits*D), partial_ml float (B*Hq*L*num_splits*2).
cudaError_t prefix_attention_decode(DecodeDtype dtype, const void* q, const void* k, const void* v,
                                    const void* prefix_k, const void* prefix_v, long long prefix_batch_stride,
                                    const uint8_t* key_mask, const int32_t* cache_lens, void* out,
                                    float* partial_out, float* partial_ml, int batch, int q_heads, int kv_heads,
                                    int q_len, int kv_len, int prefix_len, int head_dim, bool causal, float scale,
                                    int num_splits, cudaStream_t stream);

}  // namespace pet_fast
