// The CPU-only test module: the C++ of the extension that needs no GPU, built as one translation unit
// (torch's headers parsed once, not once per file) so that the tests build it in one compile. It holds the
// Triton replay programs (csrc/triton_replay.cpp) and the nodes built on them (csrc/stacked_fusion_replay.cpp)
// without their CUDA launcher, and the adapter's C++ autograd node (csrc/bottleneck_adapter_autograd.cpp),
// which tests/test_triton_replay.py, tests/test_stacked_fusion_replay.py and tests/test_adapter_autograd_cpp.py
// check on the CPU (the full extension pet_fast._C builds only where CUDA is).
#include "triton_replay.cpp"
#include "stacked_fusion_replay.cpp"
#include "bottleneck_adapter_autograd.cpp"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  register_triton_replay(m);
  register_stacked_fusion_replay(m);
  register_bottleneck_adapter_autograd(m);
}
