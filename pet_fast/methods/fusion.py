"""AdapterFusion (Pfeiffer et al. 2021): attention over the outputs of k frozen adapters."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from ..ops import _checks
from ..ops import adapter_fusion as fusion_ops
from .adapter import BottleneckAdapter


def _maybe_cast(t, dtype):
    return None if t is None else t.to(dtype)


class AdapterFusion(nn.Module):
    """The fusion layer of AdapterHub's ``BertFusion``.

    Args mirror AdapterHub's fusion config: ``query``/``key``/``value`` add d x d projections (query
    and key with bias, value without); ``value_initialized`` starts the value projection near the
    identity (1 on the diagonal, 1e-6 elsewhere); ``temperature=True`` starts the softmax temperature
    at 50 and lowers it by 0.05 per training forward down to 1; ``dropout`` applies to the attention
    scores in training (it then runs the eager path, since dropout is not part of the fused op).
    """

    def __init__(self, d_model: int, *, query: bool = True, key: bool = True, value: bool = True,
                 value_initialized: bool = False, temperature: bool = False, residual_before: bool = False,
                 value_before_softmax: bool = True, dropout: float = 0.0, dtype=None, device=None):
        super().__init__()
        if isinstance(d_model, bool) or not isinstance(d_model, int) or d_model < 1:
            raise ValueError(f"d_model must be a positive int, got {d_model!r}")
        kw = dict(dtype=dtype, device=device)
        self.query = nn.Linear(d_model, d_model, **kw) if query else None
        self.key = nn.Linear(d_model, d_model, **kw) if key else None
        self.value = nn.Linear(d_model, d_model, bias=False, **kw) if value else None
        for lin in (self.query, self.key, self.value):
            if lin is not None:
                nn.init.normal_(lin.weight, 0.0, 0.02)
                if lin.bias is not None:
                    nn.init.zeros_(lin.bias)
        if value and value_initialized:
            with torch.no_grad():
                self.value.weight.fill_(1e-6).fill_diagonal_(1.0)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.dropout = dropout
        self.T = 50.0 if temperature else 1.0
        self.reduction = self.T / 1000.0
        self.residual_before = residual_before
        self.value_before_softmax = value_before_softmax

    def _projections(self, dtype) -> dict:
        q, k, v = self.query, self.key, self.value
        return dict(
            w_query=None if q is None else q.weight.to(dtype), b_query=None if q is None else _maybe_cast(q.bias, dtype),
            w_key=None if k is None else k.weight.to(dtype), b_key=None if k is None else _maybe_cast(k.bias, dtype),
            w_value=None if v is None else v.weight.to(dtype), b_value=None,
            residual_before=self.residual_before, value_before_softmax=self.value_before_softmax,
        )

    def _temperature(self) -> float:
        t = self.T
        if self.training:
            self.T = max(self.T - self.reduction, 1.0)
        return t

    def _eager_with_dropout(self, query, values, residual, t, proj):
        # Same as fusion_ops.reference, with dropout on the scores as AdapterHub applies it.
        if proj["residual_before"]:
            values = values + residual.unsqueeze(-2)
        q = self.query(query) if self.query is not None else query
        keys = self.key(values) if self.key is not None else values
        vals = self.value(values) if self.value is not None and self.value_before_softmax else values
        scores = torch.nn.functional.dropout(torch.matmul(keys, q.unsqueeze(-1)).squeeze(-1), self.dropout, True)
        probs = torch.softmax(scores.float() / t, dim=-1).to(query.dtype)
        out = torch.matmul(probs.unsqueeze(-2), vals).squeeze(-2)
        if self.value is not None and not self.value_before_softmax:
            out = self.value(out)
        return out if proj["residual_before"] else out + residual

    def forward(self, query: torch.Tensor, values: torch.Tensor, residual: torch.Tensor, *,
                backend: Optional[str] = None) -> torch.Tensor:
        """Fuse given adapter outputs ``values (..., k, d)``."""
        _checks.tensor("query", query, floating=False)
        t = self._temperature()
        proj = self._projections(query.dtype)
        if self.training and self.dropout > 0:
            return self._eager_with_dropout(query, values, residual, t, proj)
        return fusion_ops.adapter_fusion(query, values, residual, temperature=t, backend=backend, **proj)

    def fuse(self, x: torch.Tensor, query: torch.Tensor, residual: torch.Tensor,
             adapters: Sequence[BottleneckAdapter], *, backend: Optional[str] = None) -> torch.Tensor:
        """Run ``adapters`` on ``x`` and fuse their outputs in one op (the k outputs are not stored
        by fused backends). All adapters must share an activation and a fixed scaling kind."""
        if len(adapters) == 0:
            raise ValueError("adapters must hold at least one BottleneckAdapter")
        if self.training and self.dropout > 0:
            values = torch.stack([a(x, residual=torch.zeros_like(x)) for a in adapters], dim=-2)
            return self.forward(query, values, residual, backend=backend)
        w_down, b_down, w_up, b_up, scaling, activation = stack_adapters(adapters, x.dtype)
        t = self._temperature()
        return fusion_ops.stacked_adapter_fusion(
            x, query, residual, w_down, b_down, w_up, b_up, activation=activation, scaling=scaling,
            temperature=t, backend=backend, **self._projections(query.dtype))


def stack_adapters(adapters: Sequence[BottleneckAdapter], dtype):
    """Stacked (k, r_max, d) / (k, d, r_max) weights, zero-padded where bottleneck sizes differ."""
    acts = {a.activation for a in adapters}
    if len(acts) != 1:
        raise ValueError(f"adapters must share one activation to be fused, got {sorted(acts)}")
    d = adapters[0].d_model
    if any(a.d_model != d for a in adapters):
        raise ValueError("adapters must share d_model to be fused")
    r = max(a.bottleneck for a in adapters)
    ref = adapters[0].w_down
    F = torch.nn.functional
    rows_down, rows_up, bd, bu = [], [], [], []
    for a in adapters:
        pad = r - a.bottleneck
        rows_down.append(F.pad(a.w_down.to(dtype), (0, 0, 0, pad)))
        rows_up.append(F.pad(a.w_up.to(dtype), (0, pad)))
        bd.append(F.pad(a.b_down.to(dtype), (0, pad)) if a.b_down is not None else ref.new_zeros(r, dtype=dtype))
        bu.append(a.b_up.to(dtype) if a.b_up is not None else ref.new_zeros(d, dtype=dtype))
    w_down, w_up = torch.stack(rows_down), torch.stack(rows_up)
    b_down, b_up = torch.stack(bd), torch.stack(bu)
    scales = [a.scaling for a in adapters]
    if all(isinstance(s, float) for s in scales):
        scaling = torch.tensor(scales, dtype=dtype, device=ref.device)
    elif all(isinstance(s, torch.Tensor) and s.dim() == 0 for s in scales):
        scaling = torch.stack([s.to(dtype) for s in scales])
    else:
        raise ValueError("adapters to be fused need scalar scaling (fixed or learned), not per-channel")
    return w_down, b_down, w_up, b_up, scaling, acts.pop()
