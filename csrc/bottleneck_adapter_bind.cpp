// Torch side of the bottleneck adapter CUDA kernels: checks, allocation, stream, dtype mapping.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include <string>
#include <vector>

#include "bindings.h"
#include "bottleneck_adapter.h"

namespace {

int dtype_code(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return pet_fast::kAdapterF32;
    case at::kHalf: return pet_fast::kAdapterF16;
    case at::kBFloat16: return pet_fast::kAdapterBF16;
    default: TORCH_CHECK(false, "bottleneck_adapter (cuda): dtype must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
  return -1;
}

const void* opt_ptr(const c10::optional<at::Tensor>& t, const at::Tensor& x, const char* name) {
  if (!t.has_value()) return nullptr;
  TORCH_CHECK(t->is_cuda() && t->device() == x.device(), "bottleneck_adapter (cuda): ", name, " must be on ", x.device());
  TORCH_CHECK(t->scalar_type() == x.scalar_type(), "bottleneck_adapter (cuda): ", name, " must have x's dtype");
  TORCH_CHECK(t->is_contiguous(), "bottleneck_adapter (cuda): ", name, " must be contiguous");
  return t->data_ptr();
}

// x (..., d) with at most kSmallMaxTokens rows, w_down (r, d), w_up (d, r), all contiguous; returns y shaped like x.
at::Tensor forward_small(const at::Tensor& x, const at::Tensor& w_down, const c10::optional<at::Tensor>& b_down,
                         const at::Tensor& w_up, const c10::optional<at::Tensor>& b_up,
                         const c10::optional<at::Tensor>& scaling, double scaling_value,
                         const c10::optional<at::Tensor>& residual, int64_t activation) {
  // x: (..., d), read as rows of d (a serving call passes its (batch, tokens, d) input as it is: no view op)
  TORCH_CHECK(x.is_cuda() && x.dim() >= 1 && x.is_contiguous(), "bottleneck_adapter (cuda): x must be a contiguous CUDA tensor");
  const int64_t d = x.size(-1), r = w_down.size(0);
  TORCH_CHECK(d >= 1, "bottleneck_adapter (cuda): x's last dimension must not be empty");
  const int64_t n = x.numel() / d;
  TORCH_CHECK(w_down.dim() == 2 && w_down.size(1) == d && w_up.dim() == 2 && w_up.size(0) == d && w_up.size(1) == r,
              "bottleneck_adapter (cuda): w_down must be (r, d) and w_up (d, r)");
  TORCH_CHECK(n <= pet_fast::kSmallMaxTokens, "bottleneck_adapter (cuda): at most ", pet_fast::kSmallMaxTokens, " tokens, got ", n);
  TORCH_CHECK(r <= pet_fast::kSmallMaxR, "bottleneck_adapter (cuda): r must be <= ", pet_fast::kSmallMaxR, ", got ", r);
  const c10::optional<at::Tensor> wd_opt(w_down), wu_opt(w_up);
  opt_ptr(wd_opt, x, "w_down");
  opt_ptr(wu_opt, x, "w_up");
  int scale_mode = 0;
  if (scaling.has_value()) {
    TORCH_CHECK(scaling->dim() == 0 || (scaling->dim() == 1 && scaling->size(0) == d),
                "bottleneck_adapter (cuda): scaling must have shape () or (d,)");
    scale_mode = scaling->dim() == 0 ? 1 : 2;
  }
  if (residual.has_value()) TORCH_CHECK(residual->sizes() == x.sizes(), "bottleneck_adapter (cuda): residual must be shaped like x");
  const c10::cuda::CUDAGuard guard(x.device());
  const int dtype = dtype_code(x);
  at::Tensor y = at::empty_like(x);
  if (n == 0) return y;
  // the hidden's workspace, where the two-kernel form runs (none for the one-launch form)
  const int64_t floats = pet_fast::bottleneck_adapter_forward_small_workspace(dtype, x.data_ptr(), w_down.data_ptr(),
                                                                              w_up.data_ptr(), n, d, r);
  at::Tensor hidden = floats > 0 ? at::empty({floats}, x.options().dtype(at::kFloat)) : at::Tensor();
  const int err = pet_fast::bottleneck_adapter_forward_small(
      dtype, x.data_ptr(), w_down.data_ptr(), opt_ptr(b_down, x, "b_down"), w_up.data_ptr(),
      opt_ptr(b_up, x, "b_up"), opt_ptr(scaling, x, "scaling"), scale_mode, static_cast<float>(scaling_value),
      opt_ptr(residual, x, "residual"), y.data_ptr(), floats > 0 ? hidden.data_ptr<float>() : nullptr, n, d, r,
      static_cast<int>(activation), c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == 0, "bottleneck_adapter (cuda) launch failed: ", cudaGetErrorString(static_cast<cudaError_t>(err)));
  return y;
}

// Gradients for the same few tokens: [dx, dw_down, db_down or empty, dw_up, db_up or empty,
// per-channel float32 partials of d_scaling (d values) or empty]. The residual's gradient is dy.
std::vector<at::Tensor> backward_small(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& w_down,
                                       const c10::optional<at::Tensor>& b_down, const at::Tensor& w_up,
                                       const c10::optional<at::Tensor>& b_up, const c10::optional<at::Tensor>& scaling,
                                       double scaling_value, bool has_residual, int64_t activation, bool need_ds) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 2 && x.is_contiguous(), "bottleneck_adapter (cuda): x must be a contiguous 2-D CUDA tensor");
  TORCH_CHECK(dy.sizes() == x.sizes() && dy.is_contiguous() && dy.scalar_type() == x.scalar_type() && dy.device() == x.device(),
              "bottleneck_adapter (cuda): dy must be contiguous and shaped like x, with x's dtype and device");
  const int64_t n = x.size(0), d = x.size(1), r = w_down.size(0);
  TORCH_CHECK(w_down.dim() == 2 && w_down.size(1) == d && w_up.dim() == 2 && w_up.size(0) == d && w_up.size(1) == r,
              "bottleneck_adapter (cuda): w_down must be (r, d) and w_up (d, r)");
  TORCH_CHECK(n >= 1 && n <= pet_fast::kSmallMaxTokens, "bottleneck_adapter (cuda): 1 to ", pet_fast::kSmallMaxTokens, " tokens, got ", n);
  TORCH_CHECK(r <= pet_fast::kSmallMaxR, "bottleneck_adapter (cuda): r must be <= ", pet_fast::kSmallMaxR, ", got ", r);
  const c10::optional<at::Tensor> wd_opt(w_down), wu_opt(w_up);
  opt_ptr(wd_opt, x, "w_down");
  opt_ptr(wu_opt, x, "w_up");
  int scale_mode = 0;
  if (scaling.has_value()) {
    TORCH_CHECK(scaling->dim() == 0 || (scaling->dim() == 1 && scaling->size(0) == d),
                "bottleneck_adapter (cuda): scaling must have shape () or (d,)");
    scale_mode = scaling->dim() == 0 ? 1 : 2;
  }
  const c10::cuda::CUDAGuard guard(x.device());
  // Every returned tensor has its own storage, the empty ones included: the results become the outputs
  // of a torch.library custom op, which must not alias one another.
  at::Tensor dx = at::empty_like(x);
  at::Tensor dwd = at::empty_like(w_down);
  at::Tensor dwu = at::empty_like(w_up);
  at::Tensor dbd = b_down.has_value() ? at::empty_like(*b_down) : at::empty({0}, x.options());
  at::Tensor dbu = b_up.has_value() ? at::empty_like(*b_up) : at::empty({0}, x.options());
  const bool want_ds = need_ds && scaling.has_value();
  at::Tensor ds = want_ds ? at::empty({d}, x.options().dtype(at::kFloat)) : at::empty({0}, x.options().dtype(at::kFloat));
  at::Tensor workspace = at::empty({2 * n * r}, x.options().dtype(at::kFloat));
  const int err = pet_fast::bottleneck_adapter_backward_small(
      dtype_code(x), dy.data_ptr(), x.data_ptr(), w_down.data_ptr(), opt_ptr(b_down, x, "b_down"), w_up.data_ptr(),
      opt_ptr(b_up, x, "b_up"), opt_ptr(scaling, x, "scaling"), scale_mode, static_cast<float>(scaling_value),
      has_residual ? 0 : 1, dx.data_ptr(), dwd.data_ptr(), b_down.has_value() ? dbd.data_ptr() : nullptr,
      dwu.data_ptr(), b_up.has_value() ? dbu.data_ptr() : nullptr, want_ds ? ds.data_ptr<float>() : nullptr,
      workspace.data_ptr<float>(), n, d, r, static_cast<int>(activation), c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == 0, "bottleneck_adapter (cuda) backward launch failed: ", cudaGetErrorString(static_cast<cudaError_t>(err)));
  return {dx, dwd, dbd, dwu, dbu, ds};
}

}  // namespace

void register_bottleneck_adapter(pybind11::module_& m) {
  m.def("bottleneck_adapter_forward_small", &forward_small,
        "Bottleneck adapter forward for at most 64 tokens (x, w_down, b_down, w_up, b_up, scaling, scaling_value, "
        "residual, activation code)",
        pybind11::arg("x"), pybind11::arg("w_down"), pybind11::arg("b_down"), pybind11::arg("w_up"),
        pybind11::arg("b_up"), pybind11::arg("scaling"), pybind11::arg("scaling_value"), pybind11::arg("residual"),
        pybind11::arg("activation"));
  m.def("bottleneck_adapter_small_form",
        [](const at::Tensor& x, const at::Tensor& w_down, const at::Tensor& w_up) -> std::string {
          TORCH_CHECK(x.is_cuda() && x.dim() >= 1 && x.size(-1) >= 1, "bottleneck_adapter (cuda): x must be a CUDA tensor");
          const c10::cuda::CUDAGuard guard(x.device());
          const int64_t d = x.size(-1), n = x.numel() / d, r = w_down.size(0);
          return pet_fast::bottleneck_adapter_forward_small_workspace(dtype_code(x), x.data_ptr(), w_down.data_ptr(),
                                                                      w_up.data_ptr(), n, d, r) == 0 && n > 0
                     ? "cluster"
                     : "two kernels";
        },
        "Which form bottleneck_adapter_forward_small takes for these inputs on their device: 'cluster' (one "
        "launch) or 'two kernels'",
        pybind11::arg("x"), pybind11::arg("w_down"), pybind11::arg("w_up"));
  m.def("bottleneck_adapter_set_small_cluster", &pet_fast::bottleneck_adapter_set_small_cluster,
        "Allow (True) or forbid the one-launch few-token forward process-wide; returns the previous setting",
        pybind11::arg("on"));
  m.def("bottleneck_adapter_backward_small", &backward_small,
        "Gradients of bottleneck_adapter_forward_small: [dx, dw_down, db_down, dw_up, db_up, d_scaling partials]",
        pybind11::arg("dy"), pybind11::arg("x"), pybind11::arg("w_down"), pybind11::arg("b_down"), pybind11::arg("w_up"),
        pybind11::arg("b_up"), pybind11::arg("scaling"), pybind11::arg("scaling_value"), pybind11::arg("has_residual"),
        pybind11::arg("activation"), pybind11::arg("need_ds"));
}
