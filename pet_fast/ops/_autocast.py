"""The dtype a call's matrix products run in under autocast, shared by the ops and the methods that
resolve autocast themselves (the fused kernels do not see autocast: their callers cast explicitly)."""
from __future__ import annotations

import torch

# device types with an autocast state (others, e.g. meta in `pet-fast info`, have none to ask about)
AUTOCAST_DEVICES = ("cuda", "cpu", "xpu", "mps")
# whether autocast is on for any device type, in one call (0.3 us on the CPU against 2 us for the checks
# below); a private function of torch, so looked up with a fallback and not called in traced code. It does
# not count MPS's autocast (checked on torch 2.13), so MPS tensors take the full checks.
_ANY_AUTOCAST = getattr(torch._C, "_is_any_autocast_enabled", None)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """autocast's dtype for ``x``'s device type when autocast is on there, as F.linear would compute in;
    ``x``'s own dtype otherwise, and for float64 and non-floating tensors (which autocast leaves alone)."""
    if _ANY_AUTOCAST is not None and not torch.compiler.is_compiling() and not _ANY_AUTOCAST() and not x.is_mps:
        return x.dtype  # autocast off on every device, as in serving: one check (host time per op call)
    dev = x.device.type
    if (dev in AUTOCAST_DEVICES and torch.is_autocast_enabled(dev) and x.is_floating_point()
            and x.dtype != torch.float64):
        return torch.get_autocast_dtype(dev)
    return x.dtype
