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
#include <cstring>
#include <vector>

#include <ATen/TensorSubclassLikeUtils.h>
#include <ATen/autocast_mode.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>

#include "bindings.h"

#ifdef PET_FAST_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda.h>
#include <dlfcn.h>
#endif

namespace {

// Parameter kinds (pet_fast/kernels/_replay.py KINDS)
enum Kind : int64_t { kPtr = 0, kPtrAligned = 1, kI32 = 2, kI64 = 3, kU32 = 4, kU64 = 5, kF32 = 6, kF64 = 7, kNull = 8 };

struct Param {
  int64_t kind;
  int64_t slot;    // kPtr*: the slot
  int64_t value;   // kPtr*: byte offset into the slot; integers: the value
  double fvalue;   // floats
};

struct Launch {
  uint64_t function;  // CUfunction of the compiled kernel (kept loaded by the recorder's reference)
  int64_t grid[3];
  int64_t threads;
  int64_t shared;
  std::vector<Param> params;
};

struct Alloc {
  std::vector<int64_t> shape;
  at::ScalarType dtype;
};

#ifdef PET_FAST_CUDA
using LaunchFn = CUresult (*)(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned,
                              CUstream, void**, void**);

using CtxGetCurrentFn = CUresult (*)(CUcontext*);
using CtxSetCurrentFn = CUresult (*)(CUcontext);
using PrimaryCtxRetainFn = CUresult (*)(CUcontext*, CUdevice);

// The driver's entry points, looked up once (the library torch already loaded).
struct Driver {
  LaunchFn launch;
  CtxGetCurrentFn ctx_get_current;
  CtxSetCurrentFn ctx_set_current;
  PrimaryCtxRetainFn primary_ctx_retain;
};

const Driver& driver() {
  static const Driver d = [] {
    void* lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_NOLOAD);
    if (lib == nullptr) lib = dlopen("libcuda.so.1", RTLD_NOW);
    TORCH_CHECK(lib != nullptr, "triton replay: cannot open libcuda.so.1");
    auto sym = [lib](const char* name) {
      void* f = dlsym(lib, name);
      TORCH_CHECK(f != nullptr, "triton replay: ", name, " not found in libcuda.so.1");
      return f;
    };
    return Driver{reinterpret_cast<LaunchFn>(sym("cuLaunchKernel")),
                  reinterpret_cast<CtxGetCurrentFn>(sym("cuCtxGetCurrent")),
                  reinterpret_cast<CtxSetCurrentFn>(sym("cuCtxSetCurrent")),
                  reinterpret_cast<PrimaryCtxRetainFn>(sym("cuDevicePrimaryCtxRetain"))};
  }();
  return d;
}

// A thread that has only used the runtime API (e.g. the autograd engine's device thread) may have no
// current driver context: bind the device's primary context, the one torch and Triton use.
void ensure_context(const Driver& drv, int device) {
  CUcontext ctx = nullptr;
  TORCH_CHECK(drv.ctx_get_current(&ctx) == CUDA_SUCCESS, "triton replay: cuCtxGetCurrent failed");
  if (ctx != nullptr) return;
  TORCH_CHECK(drv.primary_ctx_retain(&ctx, static_cast<CUdevice>(device)) == CUDA_SUCCESS,
              "triton replay: cuDevicePrimaryCtxRetain failed");
  TORCH_CHECK(drv.ctx_set_current(ctx) == CUDA_SUCCESS, "triton replay: cuCtxSetCurrent failed");
}
#endif

class Program {
 public:
  Program(int64_t n_inputs, std::vector<at::Tensor> constants, std::vector<std::pair<std::vector<int64_t>, at::ScalarType>> allocs,
          std::vector<std::tuple<uint64_t, std::vector<int64_t>, int64_t, int64_t, std::vector<std::tuple<int64_t, int64_t, int64_t, double>>>> launches,
          std::vector<int64_t> outputs)
      : n_inputs_(n_inputs), constants_(std::move(constants)), outputs_(std::move(outputs)) {
    for (auto& a : allocs) allocs_.push_back(Alloc{a.first, a.second});
    const int64_t n_slots = n_inputs_ + static_cast<int64_t>(constants_.size() + allocs_.size());
    for (auto& l : launches) {
      Launch out;
      out.function = std::get<0>(l);
      const auto& grid = std::get<1>(l);
      TORCH_CHECK(grid.size() == 3, "triton replay: a grid has 3 dimensions");
      for (int i = 0; i < 3; ++i) out.grid[i] = grid[i];
      out.threads = std::get<2>(l);
      out.shared = std::get<3>(l);
      for (auto& p : std::get<4>(l)) {
        Param q{std::get<0>(p), std::get<1>(p), std::get<2>(p), std::get<3>(p)};
        TORCH_CHECK(q.kind >= kPtr && q.kind <= kNull, "triton replay: unknown parameter kind ", q.kind);
        if (q.kind == kPtr || q.kind == kPtrAligned)
          TORCH_CHECK(q.slot >= 0 && q.slot < n_slots, "triton replay: parameter slot ", q.slot, " out of range");
        out.params.push_back(q);
      }
      launches_.push_back(std::move(out));
    }
    for (auto s : outputs_) TORCH_CHECK(s >= -1 && s < n_slots, "triton replay: output slot ", s, " out of range");
  }

  // The outputs, or None when an input's address breaks an alignment the kernels may assume.
  c10::optional<std::vector<c10::optional<at::Tensor>>> run(const std::vector<c10::optional<at::Tensor>>& inputs) {
    std::vector<at::Tensor> slots;
    int64_t dev = -1;
    if (!prepare(inputs, slots, dev)) return c10::nullopt;
    if (launcher_) {  // the tests' launcher: launch i on these slots (CPU, Triton interpreter)
      pybind11::gil_scoped_acquire gil;  // (also called from the autograd engine's threads)
      std::vector<c10::optional<at::Tensor>> view;
      for (const auto& t : slots) view.push_back(t.defined() ? c10::optional<at::Tensor>(t) : c10::nullopt);
      for (size_t i = 0; i < launches_.size(); ++i) launcher_(i, view);
      return collect(slots);
    }
#ifdef PET_FAST_CUDA
    const c10::cuda::CUDAGuard guard(slots[dev].device());
    const CUstream stream = c10::cuda::getCurrentCUDAStream().stream();
    const Driver& drv = driver();
    ensure_context(drv, slots[dev].device().index());
    std::vector<uint64_t> cells;
    std::vector<void*> ptrs;
    for (const auto& l : launches_) {
      if (l.grid[0] * l.grid[1] * l.grid[2] == 0) continue;
      fill(l, slots, cells, ptrs);
      const CUresult rc = drv.launch(reinterpret_cast<CUfunction>(l.function), static_cast<unsigned>(l.grid[0]),
                                 static_cast<unsigned>(l.grid[1]), static_cast<unsigned>(l.grid[2]),
                                 static_cast<unsigned>(l.threads), 1, 1, static_cast<unsigned>(l.shared), stream,
                                 ptrs.data(), nullptr);
      TORCH_CHECK(rc == CUDA_SUCCESS, "triton replay: cuLaunchKernel failed with CUresult ", static_cast<int>(rc));
    }
    return collect(slots);
#else
    TORCH_CHECK(false, "triton replay: this build has no CUDA launcher (dry runs, or a launcher set by the tests)");
#endif
  }

  // Tests only: a Python callable launcher(i, slots) that runs launch i instead of cuLaunchKernel.
  void set_launcher(pybind11::object launcher) {
    launcher_ = launcher.is_none() ? pybind11::object() : std::move(launcher);
  }

  // A program can die on a thread without the GIL (with the last autograd node holding it, inside the
  // engine): the tests' launcher is released under the GIL, or left alone once Python is gone.
  ~Program() {
    if (!launcher_) return;
    if (Py_IsInitialized()) {
      pybind11::gil_scoped_acquire gil;
      launcher_ = pybind11::object();
    } else {
      launcher_.release();
    }
  }

  // Dry run: (outputs, per launch the parameter values as 64-bit integers or floats), or None as run().
  c10::optional<std::pair<std::vector<c10::optional<at::Tensor>>, std::vector<std::vector<pybind11::object>>>> params(
      const std::vector<c10::optional<at::Tensor>>& inputs) {
    std::vector<at::Tensor> slots;
    int64_t dev = -1;
    if (!prepare(inputs, slots, dev)) return c10::nullopt;
    std::vector<std::vector<pybind11::object>> out;
    for (const auto& l : launches_) {
      std::vector<pybind11::object> values;
      for (const auto& p : l.params) {
        if (p.kind == kF32 || p.kind == kF64) {
          values.push_back(pybind11::float_(p.fvalue));
        } else if (p.kind == kPtr || p.kind == kPtrAligned) {
          values.push_back(pybind11::int_(address(slots, p)));
        } else if (p.kind == kNull) {
          values.push_back(pybind11::none());
        } else {
          values.push_back(pybind11::int_(p.value));
        }
      }
      out.push_back(std::move(values));
    }
    return std::make_pair(collect(slots), std::move(out));
  }

  int64_t n_launches() const { return static_cast<int64_t>(launches_.size()); }

 private:
  static uint64_t address(const std::vector<at::Tensor>& slots, const Param& p) {
    const at::Tensor& t = slots[p.slot];
    return reinterpret_cast<uint64_t>(t.data_ptr()) + static_cast<uint64_t>(p.value);
  }

  // Slots for this call, after the inputs' checks (count, the alignment recorded pointers need).
  bool prepare(const std::vector<c10::optional<at::Tensor>>& inputs, std::vector<at::Tensor>& slots, int64_t& dev) const {
    TORCH_CHECK(static_cast<int64_t>(inputs.size()) == n_inputs_, "triton replay: expected ", n_inputs_,
                " inputs, got ", inputs.size());
    slots.clear();
    slots.reserve(n_inputs_ + constants_.size() + allocs_.size());
    dev = -1;
    for (const auto& t : inputs) {
      if (t.has_value() && t->defined() && dev < 0) dev = static_cast<int64_t>(slots.size());
      slots.push_back(t.has_value() ? *t : at::Tensor());
    }
    TORCH_CHECK(dev >= 0, "triton replay: no input tensor");
    for (const auto& l : launches_) {
      for (const auto& p : l.params) {
        if (p.kind != kPtr && p.kind != kPtrAligned) continue;
        if (p.slot >= n_inputs_) continue;  // constants and allocations: as recorded
        TORCH_CHECK(slots[p.slot].defined(), "triton replay: input ", p.slot, " is absent but a kernel reads it");
        if (p.kind == kPtrAligned && address(slots, p) % 16 != 0) return false;
      }
    }
    for (const auto& c : constants_) slots.push_back(c);
    const auto device = slots[dev].device();
    for (const auto& a : allocs_) slots.push_back(at::empty(a.shape, at::TensorOptions().dtype(a.dtype).device(device)));
    return true;
  }

  // Each parameter in its own 8-byte cell, as cuLaunchKernel reads them through kernelParams.
  static void fill(const Launch& l, const std::vector<at::Tensor>& slots, std::vector<uint64_t>& cells,
                   std::vector<void*>& ptrs) {
    cells.assign(l.params.size(), 0);
    ptrs.resize(l.params.size());
    for (size_t i = 0; i < l.params.size(); ++i) {
      const Param& p = l.params[i];
      void* cell = &cells[i];
      switch (p.kind) {
        case kPtr:
        case kPtrAligned: cells[i] = address(slots, p); break;
        case kI32: { const int32_t v = static_cast<int32_t>(p.value); std::memcpy(cell, &v, sizeof(v)); break; }
        case kU32: { const uint32_t v = static_cast<uint32_t>(p.value); std::memcpy(cell, &v, sizeof(v)); break; }
        case kI64:
        case kU64: { const int64_t v = p.value; std::memcpy(cell, &v, sizeof(v)); break; }
        case kF32: { const float v = static_cast<float>(p.fvalue); std::memcpy(cell, &v, sizeof(v)); break; }
        case kF64: { const double v = p.fvalue; std::memcpy(cell, &v, sizeof(v)); break; }
        case kNull: cells[i] = 0; break;
      }
      ptrs[i] = cell;
    }
  }

  std::vector<c10::optional<at::Tensor>> collect(const std::vector<at::Tensor>& slots) const {
    std::vector<c10::optional<at::Tensor>> out;
    for (auto s : outputs_) out.push_back(s < 0 ? c10::optional<at::Tensor>() : c10::optional<at::Tensor>(slots[s]));
    return out;
  }

  int64_t n_inputs_;
  std::vector<at::Tensor> constants_;
  std::vector<Alloc> allocs_;
  std::vector<Launch> launches_;
  std::vector<int64_t> outputs_;
  pybind11::object launcher_;  // null unless the tests set one (no Python reference otherwise)
};

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
    const size_t n = grad_map.size();
    torch::autograd::variable_list out(n);
    if (!grads[0].defined()) return out;  // the output was not used: no gradients
    const at::Tensor dy = grads[0].contiguous();
    std::vector<at::Tensor> fwd_inputs;
    for (const auto& v : saved) fwd_inputs.push_back(v.unpack());
    std::vector<c10::optional<at::Tensor>> inputs;
    for (auto j : bwd_map) {
      if (j == -1) inputs.emplace_back(dy);
      else if (j < 0 || !fwd_inputs[j].defined()) inputs.emplace_back(c10::nullopt);
      else inputs.emplace_back(fwd_inputs[j]);
    }
    auto result = backward->run(inputs);
    if (!result) {  // an address the recorded kernels may not take (e.g. dy a view): fresh copies do
      for (auto& t : inputs)
        if (t.has_value()) t = t->clone(at::MemoryFormat::Contiguous);
      result = backward->run(inputs);
      TORCH_CHECK(result.has_value(), op_name, ": the backward program declined fresh copies of its inputs");
    }
    for (size_t i = 0; i < n; ++i) {
      const int64_t k = grad_map[i];
      at::Tensor g;
      if (k == -2) {
        g = grads[0];
      } else if (k >= 0 && (*result)[k].has_value()) {
        g = *(*result)[k];
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
  auto node = c10::make_intrusive<ReplayBackward>();
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

// replay_autograd behind a guard: the facts a caller's Python checked when it chose this node (each input's
// presence, shape, dtype, device and requires_grad; grad mode on; deterministic mode and autocast's state as
// they were), checked here per call instead. A caller that repeats one kind of call (an adapter module in
// every step) then reaches the node with one C++ call; any difference returns None and the caller runs its
// Python path. Inputs must be contiguous plain tensors (no subclass, no Python dispatch).
class GuardedReplay {
 public:
  GuardedReplay(std::shared_ptr<Program> forward, std::shared_ptr<Program> backward, std::vector<int64_t> bwd_map,
                std::vector<int64_t> grad_map, const std::vector<c10::optional<at::Tensor>>& inputs, std::string name,
                int64_t out_like)
      : forward_(std::move(forward)), backward_(std::move(backward)), bwd_map_(std::move(bwd_map)),
        grad_map_(std::move(grad_map)), name_(std::move(name)), out_like_(out_like) {
    TORCH_CHECK(grad_map_.size() == inputs.size(), "triton replay: grad_map needs one entry per input");
    for (const auto& t : inputs) {
      Spec s;
      s.defined = t.has_value() && t->defined();
      if (s.defined) {
        TORCH_CHECK(plain(*t), "triton replay: a guarded call takes contiguous plain tensors");
        s.dtype = t->scalar_type();
        s.device = t->device();
        s.requires_grad = t->requires_grad();
        s.sizes = t->sizes().vec();
        if (device_type_ == c10::DeviceType::CPU && s.device.type() != c10::DeviceType::CPU) device_type_ = s.device.type();
      }
      specs_.push_back(std::move(s));
    }
    deterministic_ = at::globalContext().deterministicAlgorithms();
    autocast_ = at::autocast::is_autocast_enabled(device_type_);
    autocast_dtype_ = at::autocast::get_autocast_dtype(device_type_);
  }

  // The output with its node, or None when a fact differs from the recorded ones (or the forward declines).
  c10::optional<at::Tensor> call(const std::vector<c10::optional<at::Tensor>>& inputs) const {
    if (!matches(inputs)) return c10::nullopt;
    return replay_autograd(forward_, backward_, bwd_map_, grad_map_, inputs, name_, out_like_);
  }

  bool matches(const std::vector<c10::optional<at::Tensor>>& inputs) const {
    if (inputs.size() != specs_.size() || !at::GradMode::is_enabled()) return false;
    if (at::globalContext().deterministicAlgorithms() != deterministic_) return false;
    if (at::autocast::is_autocast_enabled(device_type_) != autocast_) return false;
    if (autocast_ && at::autocast::get_autocast_dtype(device_type_) != autocast_dtype_) return false;
    for (size_t i = 0; i < inputs.size(); ++i) {
      const Spec& s = specs_[i];
      const bool defined = inputs[i].has_value() && inputs[i]->defined();
      if (defined != s.defined) return false;
      if (!defined) continue;
      const at::Tensor& t = *inputs[i];
      if (t.scalar_type() != s.dtype || t.device() != s.device || t.requires_grad() != s.requires_grad ||
          !t.sizes().equals(s.sizes) || !plain(t))
        return false;
    }
    return true;
  }

 private:
  struct Spec {
    bool defined = false;
    at::ScalarType dtype = at::kFloat;
    c10::Device device = c10::Device(c10::DeviceType::CPU);
    bool requires_grad = false;
    std::vector<int64_t> sizes;
  };

  static bool plain(const at::Tensor& t) {
    return t.is_contiguous() && !at::isTensorSubclassLike(t) && t.layout() == at::kStrided;
  }

  std::shared_ptr<Program> forward_, backward_;
  std::vector<int64_t> bwd_map_, grad_map_;
  std::string name_;
  int64_t out_like_;
  std::vector<Spec> specs_;
  c10::DeviceType device_type_ = c10::DeviceType::CPU;
  bool deterministic_ = false, autocast_ = false;
  at::ScalarType autocast_dtype_ = at::kFloat;
};

}  // namespace

void register_triton_replay(pybind11::module_& m) {
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
