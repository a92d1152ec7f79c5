// A CPU-only module holding the adapter's C++ autograd node (csrc/bottleneck_adapter_autograd.cpp), so
// that tests/test_adapter_autograd_cpp.py checks it on the CPU against the op's eager reference (the
// full extension pet_fast._C builds only where CUDA is).
#include "bindings.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { register_bottleneck_adapter_autograd(m); }
