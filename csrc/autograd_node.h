// A new autograd node of type T, held the way the torch it is built against holds nodes: older releases (2.11,
// say) in std::shared_ptr, newer ones (2.13) in c10::intrusive_ptr; Edge::function tells which. The GPU
// machines may carry an older torch than the one CI checks with.
#pragma once

#include <memory>
#include <type_traits>
#include <utility>

#include <torch/csrc/autograd/function.h>

namespace pet_fast_autograd {

template <class T, class... Args>
auto make_node(Args&&... args) {
  using Held = decltype(torch::autograd::Edge::function);
  if constexpr (std::is_same_v<Held, std::shared_ptr<torch::autograd::Node>>) {
    return std::make_shared<T>(std::forward<Args>(args)...);
  } else {
    return c10::make_intrusive<T>(std::forward<Args>(args)...);
  }
}

}  // namespace pet_fast_autograd
