"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2021): the module around the
``bottleneck_adapter`` op."""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import nn

from ..ops import _checks, activations
from ..ops.bottleneck_adapter import bottleneck_adapter

INITS = ("bert", "identity")


class BottleneckAdapter(nn.Module):
    """``residual + s * up(act(down(x)))`` with a d -> r -> d bottleneck.

    Args:
        d_model: width d of the hidden states.
        bottleneck: bottleneck size r.
        activation: see ``pet_fast.ops.activations.ACTIVATIONS``.
        scaling: a number (fixed), ``"learned"`` (one trained scalar, starting at 1) or
            ``"channel"`` (one trained factor per channel, starting at 1).
        init: ``"bert"`` (AdapterHub's default: weights ~ N(0, 0.02), biases 0) or ``"identity"``
            (down ~ Kaiming-uniform, up and biases 0: the adapter starts as the identity map).
        bias: whether the projections have biases.
    Parameters live in float32 (or the dtype given); the forward casts them to the input's dtype so
    the module works under autocast and in half precision.
    """

    def __init__(self, d_model: int, bottleneck: int, *, activation: str = "relu",
                 scaling: Union[float, str] = 1.0, init: str = "bert", bias: bool = True,
                 dtype: Optional[torch.dtype] = None, device=None):
        super().__init__()
        if not isinstance(d_model, int) or d_model < 1:
            raise ValueError(f"d_model must be a positive int, got {d_model!r}")
        if not isinstance(bottleneck, int) or bottleneck < 1:
            raise ValueError(f"bottleneck must be a positive int, got {bottleneck!r}")
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        self.activation = activations.canonical(activation)
        kw = dict(dtype=dtype, device=device)
        self.w_down = nn.Parameter(torch.empty(bottleneck, d_model, **kw))
        self.w_up = nn.Parameter(torch.empty(d_model, bottleneck, **kw))
        self.b_down = nn.Parameter(torch.zeros(bottleneck, **kw)) if bias else None
        self.b_up = nn.Parameter(torch.zeros(d_model, **kw)) if bias else None
        if isinstance(scaling, str):
            if scaling == "learned":
                self.scaling = nn.Parameter(torch.ones((), **kw))
            elif scaling == "channel":
                self.scaling = nn.Parameter(torch.ones(d_model, **kw))
            else:
                raise ValueError(f"scaling must be a number, 'learned' or 'channel', got {scaling!r}")
        else:
            if isinstance(scaling, bool) or not isinstance(scaling, (int, float)):
                raise TypeError(f"scaling must be a number, 'learned' or 'channel', got {type(scaling).__name__}")
            self.scaling = float(scaling)
        self.init = init
        self.reset_parameters()

    @property
    def d_model(self) -> int:
        return self.w_down.shape[1]

    @property
    def bottleneck(self) -> int:
        return self.w_down.shape[0]

    def reset_parameters(self) -> None:
        with torch.no_grad():
            if self.init == "bert":
                self.w_down.normal_(0.0, 0.02)
                self.w_up.normal_(0.0, 0.02)
            else:
                nn.init.kaiming_uniform_(self.w_down, a=math.sqrt(5))
                self.w_up.zero_()
            for b in (self.b_down, self.b_up):
                if b is not None:
                    b.zero_()

    def _cast(self, t, dtype):
        return None if t is None else t.to(dtype)

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None, *, backend: Optional[str] = None) -> torch.Tensor:
        dt = _checks.tensor("x", x, floating=False).dtype
        scaling = self.scaling.to(dt) if isinstance(self.scaling, torch.Tensor) else self.scaling
        return bottleneck_adapter(x, self.w_down.to(dt), self._cast(self.b_down, dt), self.w_up.to(dt),
                                  self._cast(self.b_up, dt), activation=self.activation, scaling=scaling,
                                  residual=residual, backend=backend)

    def extra_repr(self) -> str:
        s = self.scaling if isinstance(self.scaling, float) else f"learned{tuple(self.scaling.shape)}"
        return f"d_model={self.d_model}, bottleneck={self.bottleneck}, activation={self.activation}, scaling={s}"
