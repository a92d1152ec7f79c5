// Gradients a fused kernel computes (and gradients formed from forward intermediates kept without history) are
// no functions of the op's inputs to autograd. Under create_graph=True (a gradient penalty, say) a second
// differentiation through them would silently treat them as constants. So a backward that runs with grad mode
// on, where a gradient may depend on something that requires grad, hands its results back behind an Error
// node: using them as values is unchanged, differentiating them raises, naming the op. (The Python
// autograd.Functions do the same: pet_fast/ops/_autograd.py refuse_second_order. The eager backend
// differentiates twice.)
#pragma once

#include <memory>
#include <string>

#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/variable.h>

#include "autograd_node.h"

namespace pet_fast_second_order {

inline std::string message(const std::string& op) {
  return "pet_fast: the backward of " + op +
         " ran fused kernels, whose gradients cannot be differentiated again (create_graph=True, e.g. a gradient "
         "penalty); run it under pet_fast.use_backend('eager') for higher-order gradients";
}

inline bool any_requires_grad(const std::vector<at::Tensor>& ts) {
  for (const auto& t : ts)
    if (t.defined() && t.requires_grad()) return true;
  return false;
}

// `out` unchanged outside create_graph (grad mode as the backward started) or when nothing it depends on
// (`depends_on`) requires grad; else aliases of its tensors whose history is one Error node with the edges of
// `depends_on` (so that a second differentiation toward any of them reaches it and raises). The caller
// computes `out` with grad mode off: no graph is built for gradients that could not be differentiated anyway.
inline torch::autograd::variable_list refuse_second_order(torch::autograd::variable_list out, const std::string& op,
                                                          const std::vector<at::Tensor>& depends_on, bool create_graph) {
  if (!create_graph || !any_requires_grad(depends_on)) return out;
  const auto error = pet_fast_autograd::make_node<torch::autograd::Error>(
      message(op), torch::autograd::collect_next_edges(at::TensorList(depends_on)));
  for (auto& t : out) {
    if (t.defined() && t.is_floating_point()) {
      t = t.detach();  // (a gradient may be an incoming one itself: its own history stays)
      torch::autograd::set_history(t, error);
    }
  }
  return out;
}

// A backward's body: `compute()` with grad mode off, its results refused a second differentiation under
// create_graph when they depend on `depends_on` (the saved inputs) or `grad` (the incoming gradient). Outside
// create_graph (every training step) nothing is copied or checked.
template <class Compute>
torch::autograd::variable_list first_order_only(const std::string& op, const std::vector<at::Tensor>& depends_on,
                                                const at::Tensor& grad, Compute&& compute) {
  const bool create_graph = at::GradMode::is_enabled();
  torch::autograd::variable_list out;
  {
    at::AutoGradMode grad_mode(false);
    out = compute();
  }
  if (!create_graph) return out;
  std::vector<at::Tensor> all(depends_on);
  all.push_back(grad);
  return refuse_second_order(std::move(out), op, all, create_graph);
}

}  // namespace pet_fast_second_order
