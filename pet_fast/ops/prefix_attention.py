"""prefix_attention: scaled dot-product attention over P trained prefix positions plus the sequence.

Every query attends to the P prefix keys/values and to the sequence's keys/values, as if
``[prefix_k; k]`` and ``[prefix_v; v]`` were concatenated along the key axis; no backend is required
to build that concatenation.

Contract
    q              (B, Hq, L, D) floating
    k, v           (B, Hkv, S, D), Hq % Hkv == 0 (grouped-query attention: query head h reads
                   key/value head h // (Hq // Hkv))
    prefix_k/_v    both None (no prefix), or both (Hkv, P, D) shared by the batch, or (B, Hkv, P, D);
                   P may be 0
    key_padding_mask  None or (B, S) bool, True marks a real key; prefix positions are never masked
    causal         bottom-right aligned: query i (0-based among the L) sees every prefix position and
                   the keys j <= i + (S - L)
    scale          defaults to D ** -0.5
A query row that sees no key at all returns zeros (never NaN) and passes no gradient.
All floating tensors share q's dtype and device; the output has q's shape.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import dispatch
from . import _checks

OP = "prefix_attention"


def check_inputs(q, k, v, prefix_k, prefix_v, key_padding_mask, causal, scale) -> float:
    _checks.tensor("q", q, ndim=4)
    _checks.tensor("k", k, ndim=4)
    _checks.tensor("v", v, ndim=4)
    B, Hq, L, D = q.shape
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"k must have shape (B, Hkv, S, D) = ({B}, Hkv, S, {D}) to match q {tuple(q.shape)}, got {tuple(k.shape)}")
    Hkv, S = k.shape[1], k.shape[2]
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"the number of query heads ({Hq}) must be a multiple of the key/value heads ({Hkv})")
    _checks.shape("v", v, k.shape, "the shape of k")
    if (prefix_k is None) != (prefix_v is None):
        raise ValueError("prefix_k and prefix_v must be given together (or both be None)")
    if prefix_k is not None:
        _checks.tensor("prefix_k", prefix_k)
        _checks.tensor("prefix_v", prefix_v)
        if prefix_k.dim() == 3:
            if prefix_k.shape[0] != Hkv or prefix_k.shape[2] != D:
                raise ValueError(f"prefix_k must have shape (Hkv, P, D) = ({Hkv}, P, {D}) or (B, Hkv, P, D), got {tuple(prefix_k.shape)}")
        elif prefix_k.dim() == 4:
            if prefix_k.shape[0] != B or prefix_k.shape[1] != Hkv or prefix_k.shape[3] != D:
                raise ValueError(f"prefix_k must have shape (B, Hkv, P, D) = ({B}, {Hkv}, P, {D}) or (Hkv, P, D), got {tuple(prefix_k.shape)}")
        else:
            raise ValueError(f"prefix_k must have 3 or 4 dimensions, got shape {tuple(prefix_k.shape)}")
        _checks.shape("prefix_v", prefix_v, prefix_k.shape, "the shape of prefix_k")
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor):
            raise TypeError(f"key_padding_mask must be a torch.Tensor, got {type(key_padding_mask).__name__}")
        if key_padding_mask.dtype != torch.bool:
            raise TypeError(f"key_padding_mask must be a bool tensor (True marks a real key), got dtype {key_padding_mask.dtype}")
        _checks.shape("key_padding_mask", key_padding_mask, (B, S), "(B, S)")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    _checks.same_dtype("q", q, k=k, v=v, prefix_k=prefix_k, prefix_v=prefix_v)
    _checks.same_device("q", q, k=k, v=v, prefix_k=prefix_k, prefix_v=prefix_v, key_padding_mask=key_padding_mask)
    if scale is None:
        return D ** -0.5
    return _checks.real_number("scale", scale)


def allowed_keys(B, L, S, P, key_padding_mask, causal, device) -> torch.Tensor:
    """Bool (B, 1, L, P + S): which key positions each query may attend to."""
    allowed = torch.ones(B, 1, L, P + S, dtype=torch.bool, device=device)
    if key_padding_mask is not None:
        allowed[..., P:] &= key_padding_mask[:, None, None, :]
    if causal:
        i = torch.arange(L, device=device)[:, None]
        j = torch.arange(S, device=device)[None, :]
        allowed[..., P:] &= j <= i + (S - L)
    return allowed


def reference(q, k, v, prefix_k=None, prefix_v=None, key_padding_mask=None, causal=False, scale=None):
    """Eager PyTorch on the concatenated keys: scores in q's dtype, softmax in float32 (float64 for
    float64 inputs). Differentiable through autograd."""
    B, Hq, L, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    scale = D ** -0.5 if scale is None else scale
    if prefix_k is not None and prefix_k.shape[-2] > 0:
        if prefix_k.dim() == 3:
            prefix_k = prefix_k.unsqueeze(0).expand(B, -1, -1, -1)
            prefix_v = prefix_v.unsqueeze(0).expand(B, -1, -1, -1)
        k = torch.cat([prefix_k, k], dim=2)
        v = torch.cat([prefix_v, v], dim=2)
    P = k.shape[2] - S
    group = Hq // Hkv
    if group > 1:
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    scores = (torch.matmul(q, k.transpose(-2, -1)) * scale).to(acc)
    allowed = allowed_keys(B, L, S, P, key_padding_mask, causal, q.device)
    # A finite fill keeps rows with no allowed key free of NaN in forward and backward; such rows are
    # zeroed after the softmax.
    scores = scores.masked_fill(~allowed, torch.finfo(acc).min)
    probs = torch.softmax(scores, dim=-1) * allowed.any(dim=-1, keepdim=True)
    return torch.matmul(probs.to(q.dtype), v)


def describe(q, k, prefix_k, key_padding_mask, causal) -> dict:
    """What the dispatcher sees of a (validated) call."""
    return _checks.info(
        q, batch=q.shape[0], q_heads=q.shape[1], kv_heads=k.shape[1], q_len=q.shape[2], kv_len=k.shape[2],
        head_dim=q.shape[3], prefix_len=0 if prefix_k is None else prefix_k.shape[-2],
        prefix_per_batch=prefix_k is not None and prefix_k.dim() == 4,
        padding=key_padding_mask is not None, causal=causal,
    )


dispatch.register(OP, "eager", reference)


def prefix_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: Optional[torch.Tensor] = None,
    prefix_v: Optional[torch.Tensor] = None,
    *,
    key_padding_mask: Optional[torch.Tensor] = None,
    causal: bool = False,
    scale: Optional[float] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Attention of ``q`` over ``[prefix_k; k]`` / ``[prefix_v; v]``; see the module docstring."""
    scale = check_inputs(q, k, v, prefix_k, prefix_v, key_padding_mask, causal, scale)
    impl = dispatch.select(OP, describe(q, k, prefix_k, key_padding_mask, causal), backend)
    return impl.run(q, k, v, prefix_k, prefix_v, key_padding_mask=key_padding_mask, causal=causal, scale=scale)
