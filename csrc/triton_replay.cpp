// Replaying recorded Triton launches from C++ (pet_fast/kernels/_replay.py records them).
//
// Why: a BERT-base step at batch 32 x 128 is bound by the host, and a Triton launch from Python costs
// the JIT's argument binding and cache lookup, the launcher's Python and the per-argument extraction
// (several microseconds each, several launches per adapter site, 24 sites). A launcher's host logic is a
// pure function of its arguments' shapes, dtypes and flags: for one such key it allocates the same
// buffers and launches the same compiled kernels with the same grids and scalars; only the tensors'
// addresses change. So the first call with a key runs in Python and is recorded as a *program*:
// allocations, launches (the compiled function, grid, block, shared memory and every parameter as a
// slot address plus offset or a constant) and which slots it returns. Later calls run the program here.
//
// Slots: the call's inputs (in the order the recorder got them; absent ones undefined), then constant
// tensors kept by the program (empty carriers whose address only tells a kernel a dtype), then the
// program's allocations. A pointer parameter recorded at a 16-byte aligned address may have been compiled
// with that assumption: replay refuses (returns None, the caller runs Python) if its address is not.
//
// `params` is a dry run of the same code (allocations, parameter values, no launch), and `set_launcher`
// lets the CPU tests run the launches through a Python callable (the recorded kernels under the Triton
// interpreter): they check the recorded programs against the Python launchers. Launching on a GPU needs
// the CUDA build (PET_FAST_CUDA, set by setup.py and the just-in-time build): cuLaunchKernel from the
// driver library.
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>

#include "second_order.h"
#include "triton_replay.h"

namespace pet_fast_replay PET_FAST_REPLAY_HIDDEN {

// An op whose forward and backward launchers both have programs, as one autograd node without Python:
// the forward program runs here, and the node's backward runs the backward program inside the engine.
// bwd_map: for each backward-program input, -1 for the output's gradient, -2 for none, k for forward
// input k (saved). grad_map: for each forward input, -1 for no gradient, -2 for the output's gradient
// itself (e.g. a residual's), k for the backward program's output k. The programs see flat memory: a
// gradient is handed to the engine in its forward input's shape (e.g. (B, L, d) where the program
// computed (B * L, d)).
struct ReplayBackward : public torch::autograd::Node {
  std::string op_name;
  std::shared_ptr<Program> backward;
  std::vector<torch::autograd::SavedVariable> saved;
  std::vector<int64_t> bwd_map, grad_map;
  std::vector<std::vector<int64_t>> input_sizes;  // per forward input with a gradient (else empty)

  std::string name() const override { return op_name; }

  torch::autograd::variable_list apply(torch::autograd::variable_list&& grads) override {
    if (!grads[0].defined()) return torch::autograd::variable_list(grad_map.size());  // the output was not used
    std::vector<at::Tensor> fwd_inputs;
    for (const auto& v : saved) fwd_inputs.push_back(v.unpack());
    return pet_fast_second_order::first_order_only(op_name, fwd_inputs, grads[0],
                                                   [&] { return gradients(grads, fwd_inputs); });
  }

  torch::autograd::variable_list gradients(const torch::autograd::variable_list& grads,
                                           const std::vector<at::Tensor>& fwd_inputs) {
    const size_t n = grad_map.size();
    torch::autograd::variable_list out(n);
    const at::Tensor dy = grads[0].contiguous();
    std::vector<c10::optional<at::Tensor>> inputs;
    for (auto j : bwd_map) {
      if (j == -1) inputs.emplace_back(dy);
      else if (j < 0 || !fwd_inputs[j].defined()) inputs.emplace_back(c10::nullopt);
      else inputs.emplace_back(fwd_inputs[j]);
    }
    const auto result = backward->run_or_copy(std::move(inputs), op_name);
    for (size_t i = 0; i < n; ++i) {
      const int64_t k = grad_map[i];
      at::Tensor g;
      if (k == -2) {
        g = grads[0];
      } else if (k >= 0 && result[k].has_value()) {
        g = *result[k];
      }
      if (g.defined() && !g.sizes().equals(input_sizes[i])) g = g.view(input_sizes[i]);
      out[i] = std::move(g);
    }
    return out;
  }

  void release_variables() override {
    for (auto& v : saved) v.reset_data();
  }
};

// The forward program's first output in the shape of input `out_like` (-1: as the program allocated it),
// with a ReplayBackward node when a gradient is needed; None when the forward program declines the inputs
// (the caller then runs its Python path).
c10::optional<at::Tensor> replay_autograd(const std::shared_ptr<Program>& forward, const std::shared_ptr<Program>& backward,
                                          std::vector<int64_t> bwd_map, std::vector<int64_t> grad_map,
                                          const std::vector<c10::optional<at::Tensor>>& inputs, std::string name,
                                          int64_t out_like) {
  TORCH_CHECK(grad_map.size() == inputs.size(), "triton replay: grad_map needs one entry per input");
  if (has_forward_grad(inputs)) return c10::nullopt;
  TORCH_CHECK(out_like >= -1 && out_like < static_cast<int64_t>(inputs.size()) &&
                  (out_like < 0 || inputs[out_like].has_value()),
              "triton replay: out_like names no input");
  auto result = forward->run(inputs);
  if (!result) return c10::nullopt;
  TORCH_CHECK(!result->empty() && (*result)[0].has_value(), "triton replay: the forward program has no output");
  at::Tensor y = *(*result)[0];
  if (out_like >= 0 && !y.sizes().equals(inputs[out_like]->sizes())) {
    // a fresh tensor, not a view of the program's output: the node below becomes its history
    y = at::_unsafe_view(y, inputs[out_like]->sizes());
  }
  std::vector<at::Tensor> ins;
  for (const auto& t : inputs) ins.push_back(t.has_value() ? *t : at::Tensor());
  if (!torch::autograd::compute_requires_grad(at::TensorList(ins))) return y;
  auto node = make_node<ReplayBackward>();
  node->op_name = std::move(name);
  node->backward = backward;
  node->bwd_map = std::move(bwd_map);
  node->grad_map = std::move(grad_map);
  node->set_next_edges(torch::autograd::collect_next_edges(at::TensorList(ins)));
  // only what the backward program reads (a residual, say, is not kept alive until the backward)
  std::vector<bool> read(ins.size(), false);
  for (auto j : node->bwd_map)
    if (j >= 0) {
      TORCH_CHECK(j < static_cast<int64_t>(ins.size()), "triton replay: bwd_map entry ", j, " out of range");
      read[j] = true;
    }
  for (size_t i = 0; i < ins.size(); ++i) {
    node->saved.emplace_back(read[i] ? ins[i] : at::Tensor(), /*is_output=*/false);
    node->input_sizes.push_back(ins[i].defined() && node->grad_map[i] != -1 ? ins[i].sizes().vec() : std::vector<int64_t>());
  }
  torch::autograd::set_history(y, node);
  return y;
}

// replay_autograd behind an InputGuard (triton_replay.h): the adapter module's repeated calls.
class GuardedReplay {
 public:
  GuardedReplay(std::shared_ptr<Program> forward, std::shared_ptr<Program> backward, std::vector<int64_t> bwd_map,
                std::vector<int64_t> grad_map, const std::vector<c10::optional<at::Tensor>>& inputs, std::string name,
                int64_t out_like)
      : forward_(std::move(forward)), backward_(std::move(backward)), bwd_map_(std::move(bwd_map)),
        grad_map_(std::move(grad_map)), name_(std::move(name)), out_like_(out_like), guard_(inputs) {
    TORCH_CHECK(grad_map_.size() == inputs.size(), "triton replay: grad_map needs one entry per input");
  }

  // The output with its node, or None when a fact differs from the recorded ones (or the forward declines).
  c10::optional<at::Tensor> call(const std::vector<c10::optional<at::Tensor>>& inputs) const {
    if (!guard_.matches(inputs)) return c10::nullopt;
    return replay_autograd(forward_, backward_, bwd_map_, grad_map_, inputs, name_, out_like_);
  }

  bool matches(const std::vector<c10::optional<at::Tensor>>& inputs) const { return guard_.matches(inputs); }

 private:
  std::shared_ptr<Program> forward_, backward_;
  std::vector<int64_t> bwd_map_, grad_map_;
  std::string name_;
  int64_t out_like_;
  InputGuard guard_;
};

}  // namespace pet_fast_replay

void register_triton_replay(pybind11::module_& m) {
  using namespace pet_fast_replay;
  m.def("replay_autograd", &replay_autograd,
        "an op's forward and backward programs as one C++ autograd node (csrc/triton_replay.cpp)",
        pybind11::arg("forward"), pybind11::arg("backward"), pybind11::arg("bwd_map"), pybind11::arg("grad_map"),
        pybind11::arg("inputs"), pybind11::arg("name"), pybind11::arg("out_like") = -1);
  pybind11::class_<GuardedReplay, std::shared_ptr<GuardedReplay>>(
      m, "GuardedReplay", "replay_autograd behind a check of the facts its caller chose it by (csrc/triton_replay.cpp)")
      .def(pybind11::init<std::shared_ptr<Program>, std::shared_ptr<Program>, std::vector<int64_t>, std::vector<int64_t>,
                          const std::vector<c10::optional<at::Tensor>>&, std::string, int64_t>(),
           pybind11::arg("forward"), pybind11::arg("backward"), pybind11::arg("bwd_map"), pybind11::arg("grad_map"),
           pybind11::arg("inputs"), pybind11::arg("name"), pybind11::arg("out_like") = -1)
      .def("__call__", &GuardedReplay::call, pybind11::arg("inputs"))
      .def("matches", &GuardedReplay::matches, pybind11::arg("inputs"));
  pybind11::class_<Program, std::shared_ptr<Program>>(m, "TritonProgram", "recorded Triton launches replayed from C++ (csrc/triton_replay.cpp)")
      .def(pybind11::init<int64_t, std::vector<at::Tensor>, std::vector<std::pair<std::vector<int64_t>, at::ScalarType>>,
                          std::vector<std::tuple<uint64_t, std::vector<int64_t>, int64_t, int64_t,
                                                 std::vector<std::tuple<int64_t, int64_t, int64_t, double>>>>,
                          std::vector<int64_t>>(),
           pybind11::arg("n_inputs"), pybind11::arg("constants"), pybind11::arg("allocs"), pybind11::arg("launches"),
           pybind11::arg("outputs"))
      .def("run", &Program::run, pybind11::arg("inputs"))
      .def("params", &Program::params, pybind11::arg("inputs"))
      .def("set_launcher", &Program::set_launcher, pybind11::arg("launcher"))
      .def_property_readonly("n_launches", &Program::n_launches);
  m.attr("triton_replay_can_launch") =
#ifdef PET_FAST_CUDA
      true;
#else
      false;
#endif
}
