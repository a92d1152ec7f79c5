"""bottleneck_adapter: the residual bottleneck of Houlsby and Pfeiffer adapters.

    out = base + scaling * (act(x @ w_down.T + b_down) @ w_up.T + b_up),  base = x if residual is None

Contract
    x         (..., d) floating; leading dimensions are flattened into tokens (N may be 0)
    w_down    (r, d), r >= 1          b_down  (r,) or None
    w_up      (d, r)                  b_up    (d,) or None
    activation  one of ACTIVATIONS (aliases: swish -> silu, gelu_new -> gelu_tanh)
    scaling   a Python number, or a tensor of shape () or (d,) (may require grad)
    residual  None or a tensor shaped like x
All tensors share x's dtype and device. The output has x's shape and dtype.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F

from .. import dispatch
from . import _checks, activations

OP = "bottleneck_adapter"


def check_inputs(x, w_down, b_down, w_up, b_up, activation, scaling, residual) -> tuple:
    """Validate a call; returns (canonical activation, scaling)."""
    _checks.tensor("x", x, min_ndim=1)
    _checks.tensor("w_down", w_down, ndim=2)
    _checks.tensor("w_up", w_up, ndim=2)
    d = x.shape[-1]
    r = w_down.shape[0]
    if w_down.shape[1] != d:
        raise ValueError(f"w_down must have shape (r, d) = (r, {d}) to match x's last dimension, got {tuple(w_down.shape)}")
    if r < 1:
        raise ValueError("w_down must have at least one row (bottleneck size r >= 1)")
    _checks.shape("w_up", w_up, (d, r), "(d, r) with r = w_down.shape[0]")
    if b_down is not None:
        _checks.tensor("b_down", b_down, ndim=1)
        _checks.shape("b_down", b_down, (r,))
    if b_up is not None:
        _checks.tensor("b_up", b_up, ndim=1)
        _checks.shape("b_up", b_up, (d,))
    if residual is not None:
        _checks.tensor("residual", residual)
        _checks.shape("residual", residual, x.shape, "the shape of x")
    if isinstance(scaling, torch.Tensor):
        _checks.tensor("scaling", scaling)
        if scaling.shape not in (torch.Size([]), torch.Size([d])):
            raise ValueError(f"scaling must be a number or a tensor of shape () or ({d},), got {tuple(scaling.shape)}")
    else:
        scaling = _checks.real_number("scaling", scaling)
    tensors = dict(w_down=w_down, b_down=b_down, w_up=w_up, b_up=b_up, residual=residual,
                   scaling=scaling if isinstance(scaling, torch.Tensor) else None)
    _checks.same_dtype("x", x, **tensors)
    _checks.same_device("x", x, **tensors)
    return activations.canonical(activation), scaling


def reference(x, w_down, b_down, w_up, b_up, activation="relu", scaling=1.0, residual=None):
    """Eager PyTorch, differentiable through autograd; the definition every backend must match."""
    h = activations.apply(activations.canonical(activation), F.linear(x, w_down, b_down))
    up = F.linear(h, w_up, b_up)
    base = x if residual is None else residual
    return base + scaling * up


def describe(x, w_down, activation, scaling, residual) -> dict:
    """What the dispatcher sees of a (validated) call."""
    return _checks.info(x, d=x.shape[-1], r=w_down.shape[0], n=x.numel() // max(x.shape[-1], 1), activation=activation,
                        per_channel_scaling=isinstance(scaling, torch.Tensor) and scaling.dim() == 1,
                        residual=residual is not None)


dispatch.register(OP, "eager", reference)


def bottleneck_adapter(
    x: torch.Tensor,
    w_down: torch.Tensor,
    b_down: Optional[torch.Tensor],
    w_up: torch.Tensor,
    b_up: Optional[torch.Tensor],
    *,
    activation: str = "relu",
    scaling: Union[float, torch.Tensor] = 1.0,
    residual: Optional[torch.Tensor] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """``(x if residual is None else residual) + scaling * (act(x @ w_down.T + b_down) @ w_up.T + b_up)``.

    See the module docstring for the contract. ``backend`` overrides the dispatcher's choice
    (``"eager"``, ``"triton"``, ``"cuda"`` or ``"auto"``).
    """
    activation, scaling = check_inputs(x, w_down, b_down, w_up, b_up, activation, scaling, residual)
    impl = dispatch.select(OP, describe(x, w_down, activation, scaling, residual), backend)
    return impl.run(x, w_down, b_down, w_up, b_up, activation=activation, scaling=scaling, residual=residual)
