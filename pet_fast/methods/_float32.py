"""Task modules whose parameters stay float32 (float64) when the model is cast to float16/bfloat16.

Mask scores, prefix encoders and side networks are created in float32 also in a half-precision model (mask
scores rounded to half precision land on the threshold; the others train in float32 as master weights). A
``model.half()`` or ``model.to(torch.bfloat16)`` after inject reaches them through ``nn.Module._apply``:
:func:`keeping_float32` turns its function into one that moves their floating tensors (and gradients) without
casting them, so that a task cast with the model computes as one attached to a half-precision model, and as
it does when loaded back onto one.
"""
from __future__ import annotations

import torch
from torch import nn

_HALF = (torch.float16, torch.bfloat16)


def keeping_float32(module: nn.Module, fn):
    """``fn`` for ``module._apply``, or where ``fn`` casts float32/float64 tensors to float16/bfloat16, a
    function that moves floating tensors to ``fn``'s device only (other tensors go through ``fn``)."""
    ref = next((t for t in module.parameters() if t.dtype in (torch.float32, torch.float64)), None)
    if ref is None:
        return fn
    target = fn(torch.zeros((), dtype=ref.dtype, device=ref.device))  # where fn sends such a tensor
    if target.dtype not in _HALF:
        return fn

    def moved(t):
        return t.to(device=target.device) if t.is_floating_point() else fn(t)

    return moved
