// Torch side of the masked_linear serving kernel (csrc/masked_linear.cu): checks, layout, stream.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <optional>

#include "bindings.h"
#include "masked_linear.h"

namespace {

// y (N, O) = x (N, K) (weight * unpack(packed))^T + bias. packed: (O, ceil(K/32)) int32, or with
// task_ids (N,) a stack (T, O, ceil(K/32)) and one task per row of x.
at::Tensor masked_linear_packed(const at::Tensor& x_in, const at::Tensor& weight_in, const at::Tensor& packed_in,
                                const std::optional<at::Tensor>& bias_in, const std::optional<at::Tensor>& task_ids_in) {
  TORCH_CHECK(x_in.is_cuda() && weight_in.is_cuda() && packed_in.is_cuda(),
              "masked_linear_packed: x, weight and packed must be CUDA tensors");
  TORCH_CHECK(x_in.dim() == 2, "masked_linear_packed: x must be 2-D (tokens, in_features), got ", x_in.dim(), " dims");
  TORCH_CHECK(weight_in.dim() == 2, "masked_linear_packed: weight must be 2-D");
  const auto dtype = x_in.scalar_type();
  TORCH_CHECK(dtype == at::kHalf || dtype == at::kBFloat16,
              "masked_linear_packed: x must be float16 or bfloat16, got ", dtype);
  TORCH_CHECK(weight_in.scalar_type() == dtype, "masked_linear_packed: weight must have x's dtype");
  TORCH_CHECK(packed_in.scalar_type() == at::kInt, "masked_linear_packed: packed must be int32");
  const int64_t n = x_in.size(0), k = x_in.size(1), o = weight_in.size(0);
  TORCH_CHECK(weight_in.size(1) == k, "masked_linear_packed: weight must have shape (out_features, ", k, ")");
  TORCH_CHECK(n <= pet_fast::kMaskedLinearMaxTokens, "masked_linear_packed: at most ",
              pet_fast::kMaskedLinearMaxTokens, " tokens, got ", n);
  const int64_t words = (k + 31) / 32;
  const bool multi = task_ids_in.has_value();
  int64_t n_tasks = 1;
  if (multi) {
    TORCH_CHECK(packed_in.dim() == 3 && packed_in.size(1) == o && packed_in.size(2) == words,
                "masked_linear_packed: with task_ids, packed must have shape (T, ", o, ", ", words, ")");
    n_tasks = packed_in.size(0);
    TORCH_CHECK(task_ids_in->is_cuda() && task_ids_in->dim() == 1 && task_ids_in->size(0) == n,
                "masked_linear_packed: task_ids must be a CUDA tensor of shape (", n, ",)");
    TORCH_CHECK(task_ids_in->scalar_type() == at::kInt || task_ids_in->scalar_type() == at::kLong,
                "masked_linear_packed: task_ids must be int32 or int64, got ", task_ids_in->scalar_type());
  } else {
    TORCH_CHECK(packed_in.dim() == 2 && packed_in.size(0) == o && packed_in.size(1) == words,
                "masked_linear_packed: packed must have shape (", o, ", ", words, ")");
  }
  at::Tensor bias;
  if (bias_in.has_value()) {
    bias = bias_in->contiguous();
    TORCH_CHECK(bias.is_cuda() && bias.scalar_type() == dtype && bias.dim() == 1 && bias.size(0) == o,
                "masked_linear_packed: bias must be a CUDA tensor of x's dtype and shape (", o, ",)");
  }
  // one device: a kernel reading another GPU's memory (no peer access) would fault the context
  for (const at::Tensor* t : {&weight_in, &packed_in}) {
    TORCH_CHECK(t->device() == x_in.device(), "masked_linear_packed: weight and packed must be on x's device (",
                x_in.device(), "), got ", t->device());
  }
  TORCH_CHECK(!bias.defined() || bias.device() == x_in.device(), "masked_linear_packed: bias must be on x's device (",
              x_in.device(), "), got ", bias.device());
  TORCH_CHECK(!multi || task_ids_in->device() == x_in.device(), "masked_linear_packed: task_ids must be on x's device (",
              x_in.device(), "), got ", task_ids_in->device());
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor weight = weight_in.contiguous();
  const at::Tensor packed = packed_in.contiguous();
  at::Tensor task_ids;
  // int64 ids outside [0, T) map to -1 (an all-zero mask, as masked_linear.h promises) before narrowing:
  // 2^32 + 1 must not wrap to task 1
  if (multi) {
    const at::Tensor& ids = *task_ids_in;
    task_ids = (ids.scalar_type() == at::kLong ? at::where((ids >= 0) & (ids < n_tasks), ids, -1) : ids)
                   .to(at::kInt).contiguous();
  }
  at::Tensor y = at::empty({n, o}, x.options());
  if (n == 0 || o == 0) return y;
  const auto code = dtype == at::kHalf ? pet_fast::MaskedLinearDtype::kHalf : pet_fast::MaskedLinearDtype::kBFloat16;
  // split-K partials (float32), sized by the kernel's plan for this device; from the caching allocator
  const int64_t ws_bytes = pet_fast::masked_linear_packed_workspace_bytes(n, k, o, multi);
  TORCH_CHECK(ws_bytes >= 0, "masked_linear_packed: invalid sizes");
  at::Tensor workspace;
  if (ws_bytes > 0) workspace = at::empty({(ws_bytes + 3) / 4}, x.options().dtype(at::kFloat));
  const cudaError_t err = pet_fast::masked_linear_packed_launch(
      code, x.data_ptr(), weight.data_ptr(), packed.data_ptr<int32_t>(), bias.defined() ? bias.data_ptr() : nullptr,
      multi ? task_ids.data_ptr<int32_t>() : nullptr, y.data_ptr(), n, k, o, n_tasks,
      workspace.defined() ? workspace.data_ptr() : nullptr, ws_bytes,
      at::cuda::getCurrentCUDAStream(x.device().index()).stream());
  TORCH_CHECK(err == cudaSuccess, "masked_linear_packed: kernel launch failed: ", cudaGetErrorString(err));
  return y;
}

}  // namespace

void register_masked_linear(pybind11::module_& m) {
  m.def("masked_linear_packed", &masked_linear_packed,
        "y = x (weight * unpack(packed))^T + bias for at most 64 tokens; with task_ids, packed is a stack of "
        "task masks and row i of x uses packed[task_ids[i]]",
        pybind11::arg("x"), pybind11::arg("weight"), pybind11::arg("packed"), pybind11::arg("bias") = pybind11::none(),
        pybind11::arg("task_ids") = pybind11::none());
  m.def("masked_linear_set_mma_min_tokens", &pet_fast::masked_linear_set_mma_min_tokens,
        "Single masks with fewer tokens take the fp32 kernel (default 2; negative restores it); returns the "
        "previous value",
        pybind11::arg("tokens"));
}
