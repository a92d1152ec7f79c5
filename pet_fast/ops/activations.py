"""Activation names accepted by the adapter ops, and their eager definitions."""
from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "silu", "tanh", "identity")
# Other names in common use for the same functions (AdapterHub says "swish" and "gelu_new").
ALIASES = {"swish": "silu", "gelu_new": "gelu_tanh", "linear": "identity", "none": "identity"}


def canonical(name) -> str:
    if not isinstance(name, str):
        raise TypeError(f"activation must be a string, one of {ACTIVATIONS}, got {type(name).__name__}")
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS} (or aliases {sorted(ALIASES)}), got {name!r}")
    return key


def apply(name: str, h: torch.Tensor) -> torch.Tensor:
    if name == "relu":
        return F.relu(h)
    if name == "gelu":
        return F.gelu(h)
    if name == "gelu_tanh":
        return F.gelu(h, approximate="tanh")
    if name == "silu":
        return F.silu(h)
    if name == "tanh":
        return torch.tanh(h)
    return h
