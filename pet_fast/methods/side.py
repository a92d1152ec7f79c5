"""Side-tuning (Zhang et al. 2020): a small trained side network blended with a frozen base."""
from __future__ import annotations

import math
from typing import Callable, Optional, Union

import torch
from torch import nn


class SideTuning(nn.Module):
    """``alpha * base(*args) + (1 - alpha) * side(*args)``.

    The base is frozen and run in eval mode under ``torch.no_grad()``: no graph, no saved activations.
    ``alpha`` is a number in [0, 1] (fixed), ``"learned"`` (``sigmoid`` of a trained logit, starting at
    ``alpha_init``), or a callable ``schedule(step) -> float`` evaluated at the number of training
    forwards so far (the side-tuning curriculum). ``base_output`` / ``side_output`` pick the tensor out
    of a module's output (e.g. ``lambda out: out.logits``); by default the output itself.
    """

    def __init__(self, base: nn.Module, side: nn.Module, alpha: Union[float, str, Callable[[int], float]] = 0.5, *,
                 alpha_init: float = 0.5, base_output: Optional[Callable] = None, side_output: Optional[Callable] = None):
        super().__init__()
        if not isinstance(base, nn.Module) or not isinstance(side, nn.Module):
            raise TypeError("base and side must be nn.Modules")
        self.base = base
        self.side = side
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.base.eval()
        self.alpha_logit = None
        self.schedule = None
        if isinstance(alpha, str):
            if alpha != "learned":
                raise ValueError(f"alpha must be a number in [0, 1], 'learned' or a callable, got {alpha!r}")
            if not 0.0 < alpha_init < 1.0:
                raise ValueError(f"alpha_init must be in (0, 1), got {alpha_init}")
            self.alpha_logit = nn.Parameter(torch.tensor(math.log(alpha_init / (1 - alpha_init))))
        elif callable(alpha):
            self.schedule = alpha
        else:
            if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
                raise ValueError(f"alpha must be a number in [0, 1], 'learned' or a callable, got {alpha!r}")
            self.fixed_alpha = float(alpha)
        self.steps = 0
        self.base_output = base_output or (lambda out: out)
        self.side_output = side_output or (lambda out: out)

    def train(self, mode: bool = True):
        super().train(mode)
        self.base.eval()  # the base never trains (dropout and batch-norm statistics stay frozen)
        return self

    def alpha(self):
        if self.alpha_logit is not None:
            return torch.sigmoid(self.alpha_logit)
        if self.schedule is not None:
            value = float(self.schedule(self.steps))
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"the alpha schedule returned {value} at step {self.steps}, outside [0, 1]")
            return value
        return self.fixed_alpha

    def base_forward(self, *args, **kwargs) -> torch.Tensor:
        with torch.no_grad():
            return self.base_output(self.base(*args, **kwargs))

    def blend(self, base_out: torch.Tensor, side_out: torch.Tensor) -> torch.Tensor:
        a = self.alpha()
        if isinstance(a, torch.Tensor):
            a = a.to(side_out.dtype)
        return a * base_out.to(side_out.dtype) + (1 - a) * side_out

    def forward(self, *args, **kwargs) -> torch.Tensor:
        base_out = self.base_forward(*args, **kwargs)
        out = self.blend(base_out, self.side_output(self.side(*args, **kwargs)))
        if self.training:
            self.steps += 1
        return out
