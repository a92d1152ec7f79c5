// Serving kernel of masked_linear: y = x (W * unpack(bits))^T + b for few tokens (N <= 64), and its
// multitask form where each token picks its mask from a stack. Torch-free so that CI can compile it.
#pragma once
#include <cstdint>

#include <cuda_runtime.h>

namespace pet_fast {

enum class MaskedLinearDtype : int { kHalf = 0, kBFloat16 = 1 };

constexpr int kMaskedLinearMaxTokens = 64;

// Bytes of float32 scratch that masked_linear_packed_launch needs for these sizes on the current device
// (split-K partials; 0 when it needs none), or -1 for invalid sizes. per_token_masks: task_ids given.
int64_t masked_linear_packed_workspace_bytes(int64_t n_tokens, int64_t in_features, int64_t out_features,
                                             bool per_token_masks);

// x (n_tokens, in_features), weight (out_features, in_features), y (n_tokens, out_features): contiguous,
// of `dtype`. bias (out_features,) or nullptr. packed: int32 words, ceil(in_features / 32) per row,
// bit b of word w = mask of column 32 w + b (least significant bit first); one (out_features, words)
// mask when task_ids is nullptr, else a stack of n_tasks of them and task_ids (n_tokens,) int32 picks
// one per token (ids outside [0, n_tasks) give an all-zero mask). n_tokens <= kMaskedLinearMaxTokens.
// workspace: at least masked_linear_packed_workspace_bytes(...) bytes of device memory (16-byte aligned;
// may be nullptr when that is 0), used by this launch's kernels on `stream` only. Run on the current device.
cudaError_t masked_linear_packed_launch(MaskedLinearDtype dtype, const void* x, const void* weight,
                                        const int32_t* packed, const void* bias, const int32_t* task_ids,
                                        void* y, int64_t n_tokens, int64_t in_features, int64_t out_features,
                                        int64_t n_tasks, void* workspace, int64_t workspace_bytes,
                                        cudaStream_t stream);

// Single masks with fewer tokens than this take the fp32 kernel, the others tensor cores where the device
// has them (default 2: one token takes the fp32 kernel). A negative value restores the default. Returns the
// previous value. Process-wide; for comparing the two kernels (benchmarks/check_masked_linear_serving.py).
int masked_linear_set_mma_min_tokens(int tokens);

}  // namespace pet_fast
