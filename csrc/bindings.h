// Each op's binding file (csrc/<op>_bind.cpp) defines one register function; bindings.cpp calls them.
// The .cu files stay free of torch headers so that CI can compile them with nvcc alone.
#pragma once
#include <torch/extension.h>

// void register_<op>(pybind11::module_& m);   (one line per op, added with its kernel)
void register_prefix_attention(pybind11::module_& m);
void register_masked_linear(pybind11::module_& m);
void register_bottleneck_adapter(pybind11::module_& m);
void register_bottleneck_adapter_autograd(pybind11::module_& m);
void register_triton_replay(pybind11::module_& m);
void register_stacked_fusion_replay(pybind11::module_& m);
