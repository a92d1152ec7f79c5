"""masked_linear: a linear layer whose weight is masked by learned scores (mask-tuning).

    y = x @ (weight * M).T + bias,   M = 1[scores > threshold]

Gradients (straight-through estimator for the hard threshold):
    dx       = dy @ (weight * M)
    d_scores = (dy^T x) * weight          (in scores' dtype)
    d_weight = (dy^T x) * M               (only when weight requires grad)
    d_bias   = dy summed over tokens

Contract
    x        (..., in_features) floating; leading dimensions are tokens (N may be 0)
    weight   (out_features, in_features), x's dtype and device
    scores   (out_features, in_features), any floating dtype (usually float32), x's device
    bias     (out_features,) or None, x's dtype
    threshold a real number
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .. import dispatch
from . import _checks

OP = "masked_linear"


def check_inputs(x, weight, scores, bias, threshold) -> float:
    _checks.tensor("x", x, min_ndim=1)
    _checks.tensor("weight", weight, ndim=2)
    _checks.tensor("scores", scores, ndim=2)
    out_f, in_f = weight.shape
    if x.shape[-1] != in_f:
        raise ValueError(f"x's last dimension must equal weight.shape[1] = {in_f}, got x of shape {tuple(x.shape)}")
    _checks.shape("scores", scores, weight.shape, "the shape of weight")
    if bias is not None:
        _checks.tensor("bias", bias, ndim=1)
        _checks.shape("bias", bias, (out_f,))
    _checks.same_dtype("x", x, weight=weight, bias=bias)
    _checks.same_device("x", x, weight=weight, scores=scores, bias=bias)
    return _checks.real_number("threshold", threshold)


class _StraightThroughMask(torch.autograd.Function):
    """Forward: the hard mask 1[scores > threshold] in ``dtype``. Backward: the gradient of the mask,
    passed to the scores unchanged (the straight-through estimator)."""

    @staticmethod
    def forward(ctx, scores, threshold, dtype):
        ctx.scores_dtype = scores.dtype
        return (scores > threshold).to(dtype)

    @staticmethod
    def backward(ctx, grad_mask):
        return grad_mask.to(ctx.scores_dtype), None, None


def straight_through_mask(scores: torch.Tensor, threshold: float, dtype: torch.dtype) -> torch.Tensor:
    return _StraightThroughMask.apply(scores, threshold, dtype)


def reference(x, weight, scores, bias=None, threshold=0.0):
    """Eager PyTorch: masks the weight once, then ``F.linear``. Autograd gives the STE gradients."""
    mask = straight_through_mask(scores, threshold, weight.dtype)
    return F.linear(x, weight * mask, bias)


def describe(x, weight, scores, bias) -> dict:
    """What the dispatcher sees of a (validated) call."""
    return _checks.info(x, scores_dtype=scores.dtype, n=x.numel() // max(x.shape[-1], 1), in_features=weight.shape[1],
                        out_features=weight.shape[0], bias=bias is not None, weight_grad=weight.requires_grad)


dispatch.register(OP, "eager", reference)


def masked_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    scores: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    threshold: float = 0.0,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """``x @ (weight * (scores > threshold)).T + bias`` with straight-through gradients to ``scores``.

    See the module docstring for the contract and the gradients.
    """
    threshold = check_inputs(x, weight, scores, bias, threshold)
    impl = dispatch.select(OP, describe(x, weight, scores, bias), backend)
    return impl.run(x, weight, scores, bias, threshold=threshold)
