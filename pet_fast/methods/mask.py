"""Mask-tuning (Zhao et al. 2020): a frozen linear whose weight is gated by a learned binary mask."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..ops import _checks
from ..ops.masked_linear import masked_linear


class MaskedLinear(nn.Module):
    """``y = x @ (W * 1[scores > threshold]).T + b`` with real-valued scores trained through the
    straight-through estimator.

    The weight and bias are frozen unless ``train_weight`` / ``train_bias``. The scores are float32
    and start at ``init_score`` (default ``threshold + 0.01``), so the first mask keeps every weight.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, threshold: float = 0.0,
                 init_score: Optional[float] = None, train_weight: bool = False, train_bias: bool = False,
                 dtype: Optional[torch.dtype] = None, device=None):
        super().__init__()
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        weight = torch.empty(out_features, in_features, dtype=dtype, device=device)
        nn.init.kaiming_uniform_(weight, a=5 ** 0.5)
        b = torch.zeros(out_features, dtype=dtype, device=device) if bias else None
        self._setup(weight, b, threshold, init_score, train_weight, train_bias)

    def _setup(self, weight, bias, threshold, init_score, train_weight, train_bias):
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
            raise TypeError(f"threshold must be a real number, got {type(threshold).__name__}")
        self.threshold = float(threshold)
        if init_score is None:
            init_score = self.threshold + 0.01
        if isinstance(init_score, bool) or not isinstance(init_score, (int, float)):
            raise TypeError(f"init_score must be a real number, got {type(init_score).__name__}")
        if not init_score > self.threshold:
            raise ValueError(f"init_score ({init_score}) must be > threshold ({self.threshold}) so that the first mask keeps every weight")
        self.weight = nn.Parameter(weight, requires_grad=train_weight)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=train_bias)
        self.scores = nn.Parameter(torch.full(weight.shape, float(init_score), dtype=torch.float32, device=weight.device))

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, threshold: float = 0.0, init_score: Optional[float] = None,
                    train_weight: bool = False, train_bias: bool = False) -> "MaskedLinear":
        """Wrap ``linear``'s weight and bias (shared, not copied) with a mask that keeps every weight."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._setup(linear.weight.data, None if linear.bias is None else linear.bias.data,
                    threshold, init_score, train_weight, train_bias)
        return self

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def mask(self) -> torch.Tensor:
        """The current binary mask (bool, the weight's shape)."""
        return self.scores.detach() > self.threshold

    def forward(self, x: torch.Tensor, *, backend: Optional[str] = None) -> torch.Tensor:
        dt = _checks.tensor("x", x, floating=False).dtype
        bias = None if self.bias is None else self.bias.to(dt)
        return masked_linear(x, self.weight.to(dt), self.scores, bias, threshold=self.threshold, backend=backend)

    @torch.no_grad()
    def merge(self) -> nn.Linear:
        """A plain ``nn.Linear`` with the mask folded into its weight (for inference, no overhead)."""
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.weight.device, dtype=self.weight.dtype)
        out.weight.copy_(self.weight * self.mask().to(self.weight.dtype))
        if self.bias is not None:
            out.bias.copy_(self.bias)
        return out

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, threshold={self.threshold}"
