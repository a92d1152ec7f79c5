"""Prefix-tuning (Li & Liang 2021): P trained key/value vectors per layer."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn


class PrefixEncoder(nn.Module):
    """Produces each layer's ``(prefix_k, prefix_v)``, each ``(num_kv_heads, P, head_dim)`` (or
    ``(B, num_kv_heads, P, head_dim)`` as a broadcast view when ``batch_size`` is given).

    ``projection_dim=None`` trains the prefixes directly (flat). Otherwise the MLP
    re-parametrisation of Li & Liang: an embedding of the P positions (width ``embed_dim``, default
    ``num_kv_heads * head_dim``) -> Linear(embed_dim, projection_dim) -> tanh ->
    Linear(projection_dim, num_layers * 2 * num_kv_heads * head_dim). The last axis of the flat or
    projected vector is ordered (layer, key/value, head, head_dim).
    """

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, prefix_length: int, *,
                 projection_dim: Optional[int] = None, embed_dim: Optional[int] = None, dropout: float = 0.0,
                 init_std: float = 0.02, dtype=None, device=None):
        super().__init__()
        for name, value in (("num_layers", num_layers), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(prefix_length, int) or prefix_length < 0:
            raise ValueError(f"prefix_length must be an int >= 0, got {prefix_length!r}")
        if projection_dim is not None and (not isinstance(projection_dim, int) or projection_dim < 1):
            raise ValueError(f"projection_dim must be None (flat) or a positive int, got {projection_dim!r}")
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.prefix_length = prefix_length
        self.projection_dim = projection_dim
        out_dim = num_layers * 2 * num_kv_heads * head_dim
        kw = dict(dtype=dtype, device=device)
        if projection_dim is None:
            self.prefix = nn.Parameter(torch.randn(prefix_length, out_dim, **kw) * init_std)
        else:
            embed_dim = embed_dim or num_kv_heads * head_dim
            self.embedding = nn.Parameter(torch.randn(prefix_length, embed_dim, **kw) * init_std)
            self.mlp = nn.Sequential(nn.Linear(embed_dim, projection_dim, **kw), nn.Tanh(),
                                     nn.Linear(projection_dim, out_dim, **kw))
        self.dropout = nn.Dropout(dropout)

    def flat(self) -> torch.Tensor:
        """(P, num_layers * 2 * num_kv_heads * head_dim)."""
        if self.projection_dim is None:
            return self.prefix
        return self.mlp(self.embedding)

    def forward(self, batch_size: Optional[int] = None, dtype: Optional[torch.dtype] = None) -> list:
        """A list with one ``(prefix_k, prefix_v)`` per layer."""
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 0):
            raise ValueError(f"batch_size must be None or an int >= 0, got {batch_size!r}")
        if dtype is not None and not isinstance(dtype, torch.dtype):
            raise TypeError(f"dtype must be None or a torch.dtype, got {dtype!r}")
        P = self.prefix_length
        flat = self.dropout(self.flat())
        if dtype is not None:
            flat = flat.to(dtype)
        kv = flat.view(P, self.num_layers, 2, self.num_kv_heads, self.head_dim).permute(1, 2, 3, 0, 4)
        out = []
        for layer in range(self.num_layers):
            pk, pv = kv[layer, 0], kv[layer, 1]
            if batch_size is not None:
                pk = pk.unsqueeze(0).expand(batch_size, -1, -1, -1)
                pv = pv.unsqueeze(0).expand(batch_size, -1, -1, -1)
            out.append((pk, pv))
        return out

    def extra_repr(self) -> str:
        kind = "flat" if self.projection_dim is None else f"mlp({self.projection_dim})"
        return f"layers={self.num_layers}, kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, P={self.prefix_length}, {kind}"
