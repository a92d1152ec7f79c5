// The Python module pet_fast._C: collects the bindings of every CUDA op.
#include "bindings.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "pet_fast CUDA kernels";
  m.attr("abi_version") = 1;
  register_prefix_attention(m);
  register_masked_linear(m);
  register_bottleneck_adapter(m);
  register_bottleneck_adapter_autograd(m);
  register_triton_replay(m);
  register_stacked_fusion_replay(m);
}
