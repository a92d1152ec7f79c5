// The bottleneck adapter as one C++ autograd node of ATen ops (cuBLAS products, PyTorch's activation
// kernels): the cuda backend's path beyond the few-token kernels' range.
//
// Why: a BERT-base training step at batch 32 x 128 is bound by the host, and an adapter called through a
// Python autograd.Function costs its Python (argument handling, the Function's entry and its backward
// called back from the autograd engine) at every site of every step. Here the forward is one call from
// Python and the backward runs inside the engine in C++; each product or elementwise op is one ATen call
// from C++. The GPU work is that of eager PyTorch (4 ops forward, about 10 backward), which at these
// sizes takes less time than the host needs to issue it from Python.
//
// Contract (pet_fast/ops/bottleneck_adapter.py): x (n, d) contiguous, w_down (r, d),
// w_up (d, r), biases (r,) / (d,) or undefined, parameters in x's dtype or float32 with half x (used in
// x's dtype, gradients returned in theirs), scaling a tensor of shape () or (d,) or a number, residual
// undefined or (n, d) in x's dtype or float32 (then the sum is float32), add_input: the base is
// residual + x; with a LayerNorm (frozen weight and bias) the adapter reads LayerNorm(x) in the products'
// dtype and the base is x. out = base + scaling * (act(z w_down^T + b_down) w_up^T + b_up), z = x or LN(x).
#include <torch/csrc/autograd/custom_function.h>

#include "bindings.h"
#include "second_order.h"

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The activation codes of the op (CUDA_ACT_CODES in pet_fast/ops/bottleneck_adapter.py).
enum Act : int64_t { kRelu = 0, kGelu = 1, kGeluTanh = 2, kSilu = 3, kTanh = 4, kIdentity = 5 };

at::Tensor act_forward(const at::Tensor& a, int64_t act) {
  switch (act) {
    case kRelu: return at::relu(a);
    case kGelu: return at::gelu(a);
    case kGeluTanh: return at::gelu(a, "tanh");
    case kSilu: return at::silu(a);
    case kTanh: return at::tanh(a);
    case kIdentity: return a;
  }
  TORCH_CHECK(false, "bottleneck_adapter (cuda): unknown activation code ", act);
}

// d act(a) given dh; h = act(a) (relu and tanh read their output, the others their input)
at::Tensor act_backward(const at::Tensor& dh, const at::Tensor& a, const at::Tensor& h, int64_t act) {
  switch (act) {
    case kRelu: return at::threshold_backward(dh, h, 0);
    case kGelu: return at::gelu_backward(dh, a);
    case kGeluTanh: return at::gelu_backward(dh, a, "tanh");
    case kSilu: return at::silu_backward(dh, a);
    case kTanh: return at::tanh_backward(dh, h);
    case kIdentity: return dh;
  }
  TORCH_CHECK(false, "bottleneck_adapter (cuda): unknown activation code ", act);
}

at::Tensor in_dtype(const at::Tensor& t, at::ScalarType dtype) {
  return (!t.defined() || t.scalar_type() == dtype) ? t : t.to(dtype);
}

at::Tensor undefined_if_none(const c10::optional<at::Tensor>& t) { return t.has_value() ? *t : at::Tensor(); }

at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b) {
  return b.defined() ? at::addmm(b, x, w.t()) : at::mm(x, w.t());
}

struct AdapterFunction : public torch::autograd::Function<AdapterFunction> {
  // Inputs: x, w_down, b_down, w_up, b_up, scaling (a tensor, or none: then scaling_value), residual, then
  // scaling_value, activation, add_input, and the LayerNorm's: use_ln, its weight and bias (frozen: no
  // gradient), eps, and the products' dtype (none: x's). Absent optionals are not autograd inputs.
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w_down,
                            const c10::optional<at::Tensor>& b_down_opt, const at::Tensor& w_up,
                            const c10::optional<at::Tensor>& b_up_opt, const c10::optional<at::Tensor>& scaling_opt,
                            const c10::optional<at::Tensor>& residual_opt, double scaling_value, int64_t act,
                            bool add_input, bool use_ln, const c10::optional<at::Tensor>& ln_weight_opt,
                            const c10::optional<at::Tensor>& ln_bias_opt, double ln_eps,
                            c10::optional<at::ScalarType> compute) {
    const at::Tensor b_down = undefined_if_none(b_down_opt), b_up = undefined_if_none(b_up_opt),
                     scaling = undefined_if_none(scaling_opt), residual = undefined_if_none(residual_opt),
                     ln_weight = undefined_if_none(ln_weight_opt), ln_bias = undefined_if_none(ln_bias_opt);
    // which gradients the backward computes (the edges of absent optionals do not exist, so the
    // context's needs_input_grad would be indexed among the present tensors only)
    const auto needs = [](const at::Tensor& t) { return t.defined() && t.requires_grad(); };
    ctx->saved_data["needs"] = std::vector<int64_t>{needs(x), needs(w_down), needs(b_down), needs(w_up), needs(b_up),
                                                    needs(scaling)};
    // the op's dtypes are explicit (the module resolved autocast): no autocast inside
    c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    // the products' dtype: x's, or with the LayerNorm the one given (autocast's, for the float32 stream)
    const auto dt = (use_ln && compute.has_value()) ? *compute : x.scalar_type();
    at::Tensor z = x, mean, rstd;  // z: what the adapter reads, x or LayerNorm(x) in the products' dtype
    if (use_ln) {
      const auto ln = at::native_layer_norm(x, {x.size(1)}, ln_weight, ln_bias, ln_eps);
      z = in_dtype(std::get<0>(ln), dt);
      mean = std::get<1>(ln);
      rstd = std::get<2>(ln);
    }
    const at::Tensor wd = in_dtype(w_down, dt), bd = in_dtype(b_down, dt), wu = in_dtype(w_up, dt),
                     bu = in_dtype(b_up, dt), s = in_dtype(scaling, dt);
    const at::Tensor a = linear(z, wd, bd);
    const at::Tensor h = act_forward(a, act);
    at::Tensor up = linear(h, wu, bu);
    const at::Tensor base = !residual.defined() ? x : (add_input ? residual + x : residual);
    at::Tensor out;
    if (s.defined()) {
      out = base + s * up;
    } else {
      out = at::add(base, up, scaling_value);  // base + scaling_value * up in one kernel
    }
    ctx->save_for_backward({x, wd, wu, bu, s, a, h, z, mean, rstd, ln_weight, ln_bias});
    ctx->saved_data["use_ln"] = use_ln;
    ctx->saved_data["scaling_value"] = scaling_value;
    ctx->saved_data["act"] = act;
    ctx->saved_data["dy_to_x"] = !residual.defined() || add_input;
    ctx->saved_data["has_residual"] = residual.defined();
    ctx->saved_data["dtypes"] = std::vector<int64_t>{
        static_cast<int64_t>(w_down.scalar_type()), static_cast<int64_t>(scaling.defined() ? scaling.scalar_type() : dt)};
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    // (the products below read forward intermediates kept without history: not differentiable again)
    return pet_fast_second_order::first_order_only("bottleneck_adapter (cuda)", {saved.begin(), saved.end()}, grads[0],
                                                   [&] { return gradients(ctx, saved, grads); });
  }

  static variable_list gradients(AutogradContext* ctx, const variable_list& saved, const variable_list& grads) {
    const at::Tensor &x = saved[0], &wd = saved[1], &wu = saved[2], &bu = saved[3], &s = saved[4], &a = saved[5],
                     &h = saved[6], &z = saved[7], &mean = saved[8], &rstd = saved[9], &ln_weight = saved[10],
                     &ln_bias = saved[11];
    const bool use_ln = ctx->saved_data["use_ln"].toBool();
    const double scaling_value = ctx->saved_data["scaling_value"].toDouble();
    const int64_t act = ctx->saved_data["act"].toInt();
    const bool dy_to_x = ctx->saved_data["dy_to_x"].toBool();
    const bool has_residual = ctx->saved_data["has_residual"].toBool();
    const auto dtypes = ctx->saved_data["dtypes"].toIntVector();
    const auto param_dt = static_cast<at::ScalarType>(dtypes[0]);
    const auto scaling_dt = static_cast<at::ScalarType>(dtypes[1]);
    const at::Tensor& g = grads[0];
    const auto dt = z.scalar_type();  // the products'
    const at::Tensor gx = in_dtype(g, dt);  // the gradient of the adapter's branch, in its dtype
    const auto needs = ctx->saved_data["needs"].toIntVector();  // x, w_down, b_down, w_up, b_up, scaling
    const bool need_x = needs[0], need_wd = needs[1], need_bd = needs[2], need_wu = needs[3], need_bu = needs[4],
               need_s = needs[5];
    at::Tensor g_up;  // s * g: the gradient of up
    if (s.defined()) {
      g_up = s.dim() == 0 ? gx * s : gx * s.unsqueeze(0);
    } else {
      g_up = scaling_value == 1.0 ? gx : gx * scaling_value;
    }
    at::Tensor d_wd, d_bd, d_wu, d_bu, d_s, dx;
    if (need_wu || need_s) {
      const at::Tensor m = at::mm(gx.t(), h);  // (d, r) = g^T h, unscaled
      if (need_wu) {
        if (s.defined()) {
          d_wu = s.dim() == 0 ? m * s : m * s.unsqueeze(1);
        } else {
          d_wu = scaling_value == 1.0 ? m : m * scaling_value;
        }
      }
      if (need_s) {  // d s[c] = sum_n g[n, c] up[n, c] = sum_k m[c, k] wu[c, k] + bu[c] sum_n g[n, c]
        const auto acc = at::promote_types(dt, at::kFloat);  // at least float32 (float64 stays float64)
        at::Tensor ds = (m.to(acc) * wu.to(acc)).sum(1);
        if (bu.defined()) ds = ds + bu.to(acc) * gx.to(acc).sum(0);
        d_s = (s.dim() == 0 ? ds.sum() : ds).to(scaling_dt);
      }
    }
    if (need_bu) d_bu = g_up.sum(0);
    if (need_x || need_wd || need_bd) {
      const at::Tensor da = act_backward(at::mm(g_up, wu), a, h, act);  // (n, r)
      if (need_wd) d_wd = at::mm(da.t(), z);
      if (need_bd) d_bd = da.sum(0);
      if (need_x) {
        dx = at::mm(da, wd);  // the gradient of z
        if (use_ln) {  // back through the cast and the LayerNorm (its weight and bias are frozen); the base is x
          dx = std::get<0>(at::native_layer_norm_backward(in_dtype(dx, x.scalar_type()), x, {x.size(1)}, mean, rstd,
                                                          ln_weight, ln_bias, {true, false, false}));
          dx.add_(in_dtype(g, x.scalar_type()));
        } else if (dy_to_x) {
          dx.add_(gx);
        }
      }
    }
    auto as_param = [&](const at::Tensor& t) { return in_dtype(t, param_dt); };
    // gradients of: x, w_down, b_down, w_up, b_up, scaling, residual, scaling_value, act, add_input, and the
    // LayerNorm's arguments (none)
    return {dx, as_param(d_wd), as_param(d_bd), as_param(d_wu), as_param(d_bu), d_s, has_residual ? g : at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

}  // namespace

at::Tensor bottleneck_adapter_composite(const at::Tensor& x, const at::Tensor& w_down,
                                        const c10::optional<at::Tensor>& b_down, const at::Tensor& w_up,
                                        const c10::optional<at::Tensor>& b_up, const c10::optional<at::Tensor>& scaling,
                                        double scaling_value, const c10::optional<at::Tensor>& residual,
                                        int64_t activation, bool add_input, bool use_ln,
                                        const c10::optional<at::Tensor>& ln_weight,
                                        const c10::optional<at::Tensor>& ln_bias, double ln_eps,
                                        c10::optional<at::ScalarType> compute) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "bottleneck_adapter (cuda): x must be a contiguous 2-D tensor");
  TORCH_CHECK(!add_input || residual.has_value(), "bottleneck_adapter (cuda): add_input needs a residual");
  TORCH_CHECK(!use_ln || (!residual.has_value() && !add_input),
              "bottleneck_adapter (cuda): with a LayerNorm the base is x (no residual, no add_input)");
  return AdapterFunction::apply(x, w_down, b_down, w_up, b_up, scaling, residual, scaling_value, activation, add_input,
                                use_ln, ln_weight, ln_bias, ln_eps, compute);
}

void register_bottleneck_adapter_autograd(pybind11::module_& m) {
  m.def("bottleneck_adapter_composite", &bottleneck_adapter_composite,
        "bottleneck adapter as one C++ autograd node of ATen ops (see csrc/bottleneck_adapter_autograd.cpp)",
        pybind11::arg("x"), pybind11::arg("w_down"), pybind11::arg("b_down"), pybind11::arg("w_up"),
        pybind11::arg("b_up"), pybind11::arg("scaling"), pybind11::arg("scaling_value"), pybind11::arg("residual"),
        pybind11::arg("activation"), pybind11::arg("add_input"), pybind11::arg("use_ln") = false,
        pybind11::arg("ln_weight") = pybind11::none(), pybind11::arg("ln_bias") = pybind11::none(),
        pybind11::arg("ln_eps") = 0.0, pybind11::arg("compute") = pybind11::none());
}
