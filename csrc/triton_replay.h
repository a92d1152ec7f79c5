// The recorded Triton launches as a C++ program (see triton_replay.cpp for the why and the layout);
// shared by the autograd nodes built on it (triton_replay.cpp, stacked_fusion_replay.cpp).
#pragma once
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

#include <ATen/TensorSubclassLikeUtils.h>
#include <ATen/autocast_mode.h>

#include "autograd_node.h"
#include "bindings.h"

#ifdef PET_FAST_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda.h>
#include <dlfcn.h>
#endif

// Hidden, like pybind11's own namespace: these types hold pybind11 objects (and were file-local before
// they were shared between two files).
#if defined(__GNUC__)
#define PET_FAST_REPLAY_HIDDEN __attribute__((visibility("hidden")))
#else
#define PET_FAST_REPLAY_HIDDEN
#endif

namespace pet_fast_replay PET_FAST_REPLAY_HIDDEN {

using pet_fast_autograd::make_node;


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

inline const Driver& driver() {
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
inline void ensure_context(const Driver& drv, int device) {
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

  // run() for a node's backward, which must not decline: inputs whose addresses the recorded kernels may
  // not take (e.g. a gradient that is a view) run as fresh contiguous copies.
  std::vector<c10::optional<at::Tensor>> run_or_copy(std::vector<c10::optional<at::Tensor>> inputs, const std::string& who) {
    auto result = run(inputs);
    if (result) return *result;
    for (auto& t : inputs)
      if (t.has_value()) t = t->clone(at::MemoryFormat::Contiguous);
    result = run(inputs);
    TORCH_CHECK(result.has_value(), who, ": the backward program declined fresh copies of its inputs");
    return *result;
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

// Forward-mode AD: the C++ nodes carry no tangents, so calls with a dual tensor take the Python path
// (whose autograd.Function says it has no forward-mode formula) rather than drop the tangent.
inline bool has_forward_grad(const std::vector<c10::optional<at::Tensor>>& inputs) {
  for (const auto& t : inputs)
    if (t.has_value() && t->defined() && t->_fw_grad(/*level=*/0).defined()) return true;
  return false;
}

// What a caller's Python checked when it chose a C++ node for a call (each input's presence, shape, dtype,
// device and requires_grad; grad mode on; deterministic mode and autocast's state as they were), kept so
// that later calls are checked here instead: a caller that repeats one kind of call (a module, once per
// step) then reaches the node in one C++ call. Inputs must be contiguous plain tensors (no subclass, no
// Python dispatch); the constructor refuses others.
class InputGuard {
 public:
  explicit InputGuard(const std::vector<c10::optional<at::Tensor>>& inputs) {
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

  std::vector<Spec> specs_;
  c10::DeviceType device_type_ = c10::DeviceType::CPU;
  bool deterministic_ = false, autocast_ = false;
  at::ScalarType autocast_dtype_ = at::kFloat;
};

}  // namespace pet_fast_replay
