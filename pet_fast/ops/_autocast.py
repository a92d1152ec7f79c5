"""The dtype a call's matrix products run in under autocast, shared by the ops and the methods that
resolve autocast themselves (the fused kernels do not see autocast: their callers cast explicitly)."""
from __future__ import annotations

import torch

# device types with an autocast state (others, e.g. meta in `pet-fast info`, have none to ask about)
AUTOCAST_DEVICES = ("cuda", "cpu", "xpu", "mps")


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """autocast's dtype for ``x``'s device type when autocast is on there, as F.linear would compute in;
    ``x``'s own dtype otherwise, and for float64 and non-floating tensors (which autocast leaves alone)."""
    dev = x.device.type
    if (dev in AUTOCAST_DEVICES and x.is_floating_point() and x.dtype != torch.float64
            and torch.is_autocast_enabled(dev)):
        return torch.get_autocast_dtype(dev)
    return x.dtype
