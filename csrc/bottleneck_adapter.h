// Torch-free launchers of the bottleneck adapter CUDA kernels (csrc/bottleneck_adapter.cu).
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

namespace pet_fast {

// Element types of the tensors passed as void pointers.
enum AdapterDType : int { kAdapterF32 = 0, kAdapterF16 = 1, kAdapterBF16 = 2 };
// Activations, in the order of kernels/bottleneck_adapter.py ACT_CODES.
enum AdapterAct : int { kRelu = 0, kGelu = 1, kGeluTanh = 2, kSilu = 3, kTanh = 4, kIdentity = 5 };
// Scaling: 0 = the number scale_value, 1 = one value at scale[0], 2 = one value per channel scale[d].

// Largest token count and bottleneck width the few-token forward takes.
constexpr int64_t kSmallMaxTokens = 64;
constexpr int64_t kSmallMaxR = 256;

// y = base + s * (act(x @ wd.T + bd) @ wu.T + bu), base = residual or x.
// x, residual, y: (n, d) row-major; wd (r, d); wu (d, r); bd (r) / bu (d) / residual may be null.
// workspace: bottleneck_adapter_forward_small_workspace(...) floats (the hidden; none, and null allowed,
// where the one-launch form runs on the current device). Returns a cudaError_t (cudaSuccess = 0);
// cudaErrorInvalidValue when n > kSmallMaxTokens, r > kSmallMaxR, the dtype/activation/scale mode is
// unknown or a needed workspace is null.
int bottleneck_adapter_forward_small(int dtype, const void* x, const void* wd, const void* bd, const void* wu,
                                     const void* bu, const void* scale, int scale_mode, float scale_value,
                                     const void* residual, void* y, float* workspace, int64_t n, int64_t d,
                                     int64_t r, int act, cudaStream_t stream);

// Floats of workspace bottleneck_adapter_forward_small needs for this call on the current device: 0 where
// the one-launch form (sm_90+, 16-byte aligned rows) takes it, else n * r.
int64_t bottleneck_adapter_forward_small_workspace(int dtype, const void* x, const void* wd, const void* wu,
                                                   int64_t n, int64_t d, int64_t r);

// Allows (default; PET_FAST_ADAPTER_CLUSTER=0 in the environment disallows) or forbids the one-launch form
// process-wide; returns the previous setting. For tests and for comparing the two forms.
bool bottleneck_adapter_set_small_cluster(bool on);

// Gradients of bottleneck_adapter_forward_small for the same n <= kSmallMaxTokens, r <= kSmallMaxR:
// dx (n, d) (dy added when add_dy, i.e. when the residual is x), dwd (r, d), dbd (r) or null,
// dwu (d, r), dbu (d) or null, all of x's dtype; ds_partial: d floats, per channel
// dy * (h @ wu.T + bu) summed over tokens (the caller sums it for a scalar scaling), or null.
// workspace: 2 * n * r floats. Returns a cudaError_t.
int bottleneck_adapter_backward_small(int dtype, const void* dy, const void* x, const void* wd, const void* bd,
                                      const void* wu, const void* bu, const void* scale, int scale_mode,
                                      float scale_value, int add_dy, void* dx, void* dwd, void* dbd, void* dwu,
                                      void* dbu, float* ds_partial, float* workspace, int64_t n, int64_t d,
                                      int64_t r, int act, cudaStream_t stream);

}  // namespace pet_fast
