// The stacked AdapterFusion core (pet_fast/ops/adapter_fusion.py, triton backend) as one C++ autograd node
// once both of its launchers have recorded programs (kernels/_replay.py).
//
// Why: an AdapterFusion layer's core ran as a Python autograd.Function whose forward and backward cost
// about 100 us of host time per layer on the CPU (saving eleven tensors, the backward's matmuls and
// casts, the launchers' keys), and a BERT-base step is bound by the host. Here the forward program runs
// the per-token kernel (ctx, a, p) and ATen adds the value projection; the node's backward forms
// dctx = dout @ Wv in float32, the projection's own gradients, and runs the backward program: the same
// operations, in the same order and dtypes, as _core_forward / _core_grad, without Python.
//
// Inputs (Python order): x, qk, w_down, b_down, w_up, b_up, scaling, residual, w_value, b_value, q, w_key, b_qk,
// score_mask, t0; absent ones undefined. The forward program takes (x, qk, w_down, b_down, w_up, b_up, scaling, b_qk)
// and, with a score mask, (score_mask, t0) after them, and returns (ctx, a, p); the backward program takes (dctx,
// x, qk, w_down, b_down, w_up, b_up, scaling, a, p, b_qk) and, with a score mask, score_mask after them, and
// returns (dx, dqk, dWd, dbd, dWu, dbu, d_scaling, dt0).
//
// For fp16/bf16 the caller may pass q and w_key instead of qk: the node then forms qk = q @ w_key in float32
// itself (adapter_fusion.py's _qk_f32), keeps q rather than qk for the backward (half the bytes: the
// float32 qk is N x d x 4 per layer) and forms it again there, then dq and dWk from dqk as _qk_grads does.
// b_qk (qk's bias: the folded query-key product's, adapter_fusion.py's b_query_key) goes to both programs,
// whose kernels add it as they read qk; its gradient is the column sum of dqk (rounded to q's dtype where the
// node forms qk). Where q is x itself (the same tensor: the folded product at a site whose query is the
// adapters' input), x gets one gradient, dx + dq formed by one addmm, where autograd would add the two after
// a separate product. A score mask (dropout on the scores) is kept for the backward program, which also returns
// the gradient of t0 (the score term the adapters share; formed by the caller, which differentiates it).
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>

#include "second_order.h"
#include "triton_replay.h"

namespace pet_fast_replay PET_FAST_REPLAY_HIDDEN {

enum FusionInput : size_t { kX = 0, kQk, kWd, kBd, kWu, kBu, kScaling, kResidual, kWv, kBv, kQ, kWk, kBqk, kSm, kT0, kFusionInputs };

// a @ b with a float32 result for fp16/bf16 operands, as adapter_fusion.py's _matmul_f32.
static at::Tensor matmul_f32(const at::Tensor& a, const at::Tensor& b) {
  if (a.scalar_type() == at::kFloat || a.scalar_type() == at::kDouble) return a.matmul(b.to(a.scalar_type()));
  if (a.is_cuda() && b.scalar_type() == a.scalar_type()) {
    try {
      return at::mm(a, b, at::kFloat);
    } catch (const c10::Error&) {  // (as the Python: the float32 operands below)
    }
  }
  return a.to(at::kFloat).matmul(b.to(at::kFloat));
}

struct StackedFusionBackward : public torch::autograd::Node {
  std::shared_ptr<Program> backward;
  std::vector<torch::autograd::SavedVariable> saved;  // the inputs the backward reads (kFusionInputs slots)
  // the forward's own tensors (no history), saved as variables too: saved-tensor hooks see them (gradient
  // checkpointing frees them until the recomputation, offloading moves them)
  torch::autograd::SavedVariable a_saved, p_saved, pre_saved;
  bool need_ds = false, need_weights = false, has_residual = false, has_bv = false;
  bool residual_grad = false, wv_grad = false, bv_grad = false, q_grad = false, wk_grad = false, bqk_grad = false;
  bool q_is_x = false;  // q passed as x itself: dq added to dx by the product (one addmm), none returned for q
  bool t0_grad = false;

  std::string name() const override { return "StackedFusionCoreBackward"; }

  torch::autograd::variable_list apply(torch::autograd::variable_list&& grads) override {
    if (!grads[0].defined()) return torch::autograd::variable_list(kFusionInputs);
    std::vector<at::Tensor> in;
    for (const auto& v : saved) in.push_back(v.unpack());
    return pet_fast_second_order::first_order_only("stacked_adapter_fusion", in, grads[0],
                                                   [&] { return gradients(grads, in); });
  }

  // (`in`: the unpacked saved inputs; qk is formed into it where the node keeps q)
  torch::autograd::variable_list gradients(const torch::autograd::variable_list& grads, std::vector<at::Tensor>& in) {
    torch::autograd::variable_list out(kFusionInputs);
    const at::Tensor a = a_saved.unpack(), p = p_saved.unpack(), pre = pre_saved.unpack();
    at::Tensor dout = grads[0], dctx;
    const at::Tensor& wv = in[kWv];
    if (wv.defined()) {
      dout = dout.to(pre.scalar_type());
      dctx = matmul_f32(dout, wv);
      if (has_residual && residual_grad) out[kResidual] = dctx.to(dout.scalar_type());
      if (wv_grad) out[kWv] = dout.t().matmul(pre).to(wv.scalar_type());
      if (has_bv && bv_grad) out[kBv] = dout.sum(0).to(wv.scalar_type());
    } else {
      dctx = dout;
    }
    const bool with_q = in[kQ].defined();
    if (with_q) in[kQk] = matmul_f32(in[kQ], in[kWk]);  // the forward's qk, formed again (same op, same bits)
    std::vector<c10::optional<at::Tensor>> bin;
    bin.emplace_back(dctx.contiguous());
    for (size_t i : {kX, kQk, kWd, kBd, kWu, kBu, kScaling})
      bin.emplace_back(in[i].defined() ? c10::optional<at::Tensor>(in[i]) : c10::nullopt);
    bin.emplace_back(a);
    bin.emplace_back(p);
    bin.emplace_back(in[kBqk].defined() ? c10::optional<at::Tensor>(in[kBqk]) : c10::nullopt);
    if (in[kSm].defined()) bin.emplace_back(in[kSm]);
    const auto result = backward->run_or_copy(std::move(bin), name());
    auto get = [&](size_t k) { return result[k].has_value() ? *result[k] : at::Tensor(); };
    out[kX] = get(0);
    if (with_q) {  // as adapter_fusion.py's _qk_grads
      const at::Tensor& q = in[kQ];
      const at::Tensor& wk = in[kWk];
      const at::Tensor g = get(1).to(q.scalar_type());
      if (q_is_x && out[kX].defined()) {
        if (q_grad) out[kX] = at::addmm(out[kX], g, wk.t().to(g.scalar_type()));
      } else if (q_grad) {
        out[kQ] = g.matmul(wk.t().to(g.scalar_type()));
      }
      if (wk_grad) out[kWk] = q.t().matmul(g).to(wk.scalar_type());
      if (bqk_grad) out[kBqk] = g.sum(0).to(in[kBqk].scalar_type());
    } else {
      out[kQk] = get(1);
      if (bqk_grad) out[kBqk] = out[kQk].sum(0).to(in[kBqk].scalar_type());
    }
    if (need_weights) {
      out[kWd] = get(2);
      if (in[kBd].defined()) out[kBd] = get(3);
      out[kWu] = get(4);
      if (in[kBu].defined()) out[kBu] = get(5);
    }
    if (need_ds) out[kScaling] = get(6);
    if (t0_grad) out[kT0] = get(7);
    return out;
  }

  void release_variables() override {
    for (auto& v : saved) v.reset_data();
    a_saved.reset_data();
    p_saved.reset_data();
    pre_saved.reset_data();
  }
};

// The core's output (the fused context, or its value projection), with a StackedFusionBackward node when a
// gradient is needed; None when the forward program declines the inputs (the caller runs the Function).
static c10::optional<at::Tensor> stacked_fusion_autograd(const std::shared_ptr<Program>& forward,
                                                  const std::shared_ptr<Program>& backward,
                                                  const std::vector<c10::optional<at::Tensor>>& inputs, bool need_ds,
                                                  bool need_weights) {
  TORCH_CHECK(inputs.size() == kFusionInputs, "stacked fusion replay: expected ", static_cast<int64_t>(kFusionInputs),
              " inputs, got ", inputs.size());
  if (has_forward_grad(inputs)) return c10::nullopt;
  std::vector<at::Tensor> ins;
  for (const auto& t : inputs) ins.push_back(t.has_value() ? *t : at::Tensor());
  std::vector<c10::optional<at::Tensor>> fin(inputs.begin(), inputs.begin() + kResidual);
  const bool with_q = ins[kQ].defined();
  TORCH_CHECK(with_q == ins[kWk].defined() && with_q != ins[kQk].defined(),
              "stacked fusion replay: pass qk, or q and w_key");
  if (with_q) {
    const at::NoGradGuard no_grad;
    fin[kQk] = matmul_f32(ins[kQ], ins[kWk]);
  }
  fin.push_back(inputs[kBqk]);
  if (ins[kSm].defined()) {
    fin.push_back(inputs[kSm]);
    fin.push_back(inputs[kT0]);
  }
  auto result = forward->run(fin);
  if (!result) return c10::nullopt;
  TORCH_CHECK(result->size() == 3 && (*result)[0] && (*result)[1] && (*result)[2],
              "stacked fusion replay: the forward program returns (ctx, a, p)");
  at::Tensor ctx = *(*result)[0], out, pre;
  {
    const at::NoGradGuard no_grad;  // the node below is the only history
    if (ins[kWv].defined()) {
      pre = ins[kResidual].defined() ? ctx + ins[kResidual] : ctx;
      out = at::linear(pre, ins[kWv], ins[kBv].defined() ? c10::optional<at::Tensor>(ins[kBv]) : c10::nullopt);
    } else {
      out = ctx;
    }
  }
  if (!torch::autograd::compute_requires_grad(at::TensorList(ins))) return out;
  auto node = make_node<StackedFusionBackward>();
  node->backward = backward;
  node->a_saved = torch::autograd::SavedVariable(*(*result)[1], /*is_output=*/false);
  node->p_saved = torch::autograd::SavedVariable(*(*result)[2], /*is_output=*/false);
  node->pre_saved = torch::autograd::SavedVariable(pre, /*is_output=*/false);
  node->need_ds = need_ds;
  node->need_weights = need_weights;
  node->has_residual = ins[kResidual].defined();
  node->has_bv = ins[kBv].defined();
  node->residual_grad = ins[kResidual].defined() && ins[kResidual].requires_grad();
  node->wv_grad = ins[kWv].defined() && ins[kWv].requires_grad();
  node->bv_grad = ins[kBv].defined() && ins[kBv].requires_grad();
  node->q_grad = with_q && ins[kQ].requires_grad();
  node->q_is_x = with_q && ins[kQ].is_same(ins[kX]);
  node->wk_grad = with_q && ins[kWk].requires_grad();
  node->bqk_grad = ins[kBqk].defined() && ins[kBqk].requires_grad();
  node->t0_grad = ins[kT0].defined() && ins[kT0].requires_grad();
  node->set_next_edges(torch::autograd::collect_next_edges(at::TensorList(ins)));
  for (size_t i = 0; i < kFusionInputs; ++i)  // the residual, b_value and t0 are never read
    node->saved.emplace_back(i == kResidual || i == kBv || i == kT0 ? at::Tensor() : ins[i], /*is_output=*/false);
  torch::autograd::set_history(out, node);
  return out;
}

// stacked_fusion_autograd behind an InputGuard (triton_replay.h): an AdapterFusion module's repeated calls
// (ops/adapter_fusion.py ReplayedStackedCall). The node runs with autocast off, as the op runs it.
class GuardedStackedFusion {
 public:
  GuardedStackedFusion(std::shared_ptr<Program> forward, std::shared_ptr<Program> backward,
                       const std::vector<c10::optional<at::Tensor>>& inputs, bool need_ds, bool need_weights)
      : forward_(std::move(forward)), backward_(std::move(backward)), need_ds_(need_ds), need_weights_(need_weights),
        guard_(inputs) {
    TORCH_CHECK(inputs.size() == kFusionInputs, "stacked fusion replay: expected ", static_cast<int64_t>(kFusionInputs),
                " inputs, got ", inputs.size());
  }

  // The core's output with its node, or None when a fact differs from the recorded ones (or the forward declines).
  c10::optional<at::Tensor> call(const std::vector<c10::optional<at::Tensor>>& inputs) const {
    if (!guard_.matches(inputs)) return c10::nullopt;
    const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    return stacked_fusion_autograd(forward_, backward_, inputs, need_ds_, need_weights_);
  }

  bool matches(const std::vector<c10::optional<at::Tensor>>& inputs) const { return guard_.matches(inputs); }

 private:
  std::shared_ptr<Program> forward_, backward_;
  bool need_ds_, need_weights_;
  InputGuard guard_;
};

}  // namespace pet_fast_replay

void register_stacked_fusion_replay(pybind11::module_& m) {
  m.def("stacked_fusion_autograd", &pet_fast_replay::stacked_fusion_autograd,
        "the stacked AdapterFusion core's recorded programs as one C++ autograd node (csrc/stacked_fusion_replay.cpp)",
        pybind11::arg("forward"), pybind11::arg("backward"), pybind11::arg("inputs"), pybind11::arg("need_ds"),
        pybind11::arg("need_weights"));
  pybind11::class_<pet_fast_replay::GuardedStackedFusion, std::shared_ptr<pet_fast_replay::GuardedStackedFusion>>(
      m, "GuardedStackedFusion",
      "stacked_fusion_autograd behind a check of the facts its caller chose it by (csrc/stacked_fusion_replay.cpp)")
      .def(pybind11::init<std::shared_ptr<pet_fast_replay::Program>, std::shared_ptr<pet_fast_replay::Program>,
                          const std::vector<c10::optional<at::Tensor>>&, bool, bool>(),
           pybind11::arg("forward"), pybind11::arg("backward"), pybind11::arg("inputs"), pybind11::arg("need_ds"),
           pybind11::arg("need_weights"))
      .def("__call__", &pet_fast_replay::GuardedStackedFusion::call, pybind11::arg("inputs"))
      .def("matches", &pet_fast_replay::GuardedStackedFusion::matches, pybind11::arg("inputs"));
}
