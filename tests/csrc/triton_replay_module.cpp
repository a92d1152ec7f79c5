// A CPU-only module holding the Triton replay programs (csrc/triton_replay.cpp) and the nodes built on them
// (csrc/stacked_fusion_replay.cpp) without their CUDA launcher, so that tests/test_triton_replay.py checks
// the recorded programs' dry runs on the CPU.
#include "bindings.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  register_triton_replay(m);
  register_stacked_fusion_replay(m);
}
