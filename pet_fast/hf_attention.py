"""A transformers attention implementation that runs :func:`pet_fast.prefix_attention` with each
layer's trained prefix.

transformers (4.48 and later, 5.x included) looks up the attention function of a model by the name
in ``config._attn_implementation`` (``ALL_ATTENTION_FUNCTIONS``) and builds the attention mask with
the function of the same name in ``ALL_MASK_ATTENTION_FUNCTIONS``. This module registers both under
:data:`NAME`:

* the **mask function** does not build a dense mask when it does not have to: for a plain causal or
  bidirectional mask (also a sliding window wider than the keys) whose keys start at position 0, it
  returns the 2-D boolean padding mask ``(B, S)`` (True = real key) or ``None`` when nothing is
  padded (an all-True mask included, looked at once per forward as transformers' sdpa_mask does);
  anything else (packed sequences, custom overlays, static caches, sliding windows while
  torch.compile traces) gets the dense 4-D boolean mask of ``sdpa_mask``.
* the **attention function** reads the layer's prefix from the attention module (attribute
  :data:`ATTR`, a :class:`LayerPrefix` set by the prefix method) and calls
  ``pet_fast.prefix_attention(q, k, v, prefix_k, prefix_v, key_padding_mask=..., causal=...)``:
  causal is the module's ``is_causal`` (bottom-right aligned, so it also holds while decoding with a
  KV cache), grouped-query attention is passed through (the op reads ``Hkv`` heads), and the prefix
  is never written into the cache (it is added at every call). Attention dropout in training is the
  op's ``dropout_p`` (over prefix and sequence weights alike, as on the concatenated keys). With a
  dense 4-D mask it concatenates the prefix and runs ``scaled_dot_product_attention`` with the mask
  extended by the always visible prefix columns.
* a layer with no active prefix (no prefix task active, or a module the method did not touch) runs
  the model's **original** implementation (``eager`` or ``sdpa``, remembered when the method is
  attached), with the 2-D padding mask turned back into the mask that implementation expects.
  So a model configured with either keeps its numbers when no prefix task is active.

The returned attention weights are ``None`` whenever a prefix is applied (``output_attentions`` is
not supported with a prefix).
"""
from __future__ import annotations

import sys
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .ops._autocast import compute_dtype

NAME = "pet_fast_prefix"
ATTR = "_pet_fast_prefix"
# On the model's other attention modules (cross-attention, modules the method did not take): the implementation
# the model had, which they keep running.
ORIGINAL_ATTR = "_pet_fast_original_attention"

_REGISTERED = False


class LayerPrefix:
    """What one attention module needs: a function ``source(dtype, batch_size)`` returning its prefix
    ``(prefix_k, prefix_v)`` in that dtype (each ``(Hkv, P, D)``, or ``(B, Hkv, P, D)`` views broadcast
    over the batch), or None when no prefix is active; the name of the model's original attention
    implementation; whether attention dropout is kept in training."""

    def __init__(self, source: Callable, original: str = "sdpa", keep_dropout: bool = True):
        self.source = source
        self.original = original
        self._keep_dropout = keep_dropout

    def __setstate__(self, state):
        # unpickled in another process (torch.load of a whole prefix-tuned model): the model names NAME as its
        # attention implementation, which transformers knows only once registered
        self.__dict__.update(state)
        register()

    @property
    def keep_dropout(self) -> bool:
        """The source's answer (``source.keep_dropout()``: its active tasks' settings), else the one given."""
        fn = getattr(self.source, "keep_dropout", None)
        return self._keep_dropout if fn is None else fn()

    def prefix(self, dtype, batch_size: Optional[int] = None):
        return self.source(dtype, batch_size)

    def batch_views(self, dtype, batch_size: int):
        """``(prefix_k, prefix_v)`` as (B, Hkv, P, D) views broadcast over the batch when the source keeps
        them at hand for this forward (``source.batch_views``), else None."""
        fn = getattr(self.source, "batch_views", None)
        return None if fn is None else fn(dtype, batch_size)


def layer_prefix(module: nn.Module) -> Optional[LayerPrefix]:
    return module.__dict__.get(ATTR)


def set_layer_prefix(module: nn.Module, lp: LayerPrefix) -> None:
    # A plain attribute (not a submodule, not in the state dict).
    module.__dict__[ATTR] = lp


# --------------------------------------------------------------------------------------------------
# masks


# transformers' modules, imported once by register(), outside any compiled region: torch.compile in
# torch 2.11 cannot trace an import through transformers' lazy top-level module ("Bad import result").
_TRANSFORMERS: dict = {}


def _masking_utils():
    mu = _TRANSFORMERS.get("masking_utils")
    if mu is None:
        from transformers import masking_utils as mu
    return mu


def _mask_kind(mask_function) -> Optional[str]:
    """'causal', 'bidirectional' or 'sliding' for transformers' plain mask functions, else None."""
    mu = _masking_utils()

    if mask_function is mu.causal_mask_function:
        return "causal"
    if mask_function is mu.bidirectional_mask_function:
        return "bidirectional"
    # sliding_window_causal_mask_function(w) == and_masks(sliding_window_overlay(w), causal_mask_function);
    # recognised by the code objects (torch.compile traces these attribute reads; not __qualname__)
    # (the code objects are looked up by register(), outside any compiled region). torch.compile
    # cannot read the closure of a function made inside the compiled region: there, sliding-window
    # masks take the dense path.
    if torch.compiler.is_compiling() or _SLIDING_CODE is None:
        return None
    cells = getattr(mask_function, "__closure__", None) or ()
    if getattr(mask_function, "__code__", None) is _AND_CODE and len(cells) == 1:
        parts = cells[0].cell_contents
        if (isinstance(parts, tuple) and len(parts) == 2 and parts[1] is mu.causal_mask_function
                and getattr(parts[0], "__code__", None) is _SLIDING_CODE):
            return "sliding"
    return None


_SLIDING_CODE = None
_AND_CODE = None


def _call_args(fn, args, kwargs) -> dict:
    if not args:
        return dict(kwargs)
    from . import models

    bound = models.signature(fn).bind_partial(*args, **kwargs).arguments
    extra = bound.pop("kwargs", {})
    bound.update(extra)
    return bound


def prefix_mask(*args, **kwargs):
    """Mask function registered under :data:`NAME` (see the module docstring). Takes the arguments
    transformers passes to ``sdpa_mask`` (``q_length``/``q_offset`` in 5.x, ``cache_position`` in
    older releases) and hands them unchanged to ``sdpa_mask`` when it must build a dense mask."""
    mu = _masking_utils()

    a = _call_args(mu.sdpa_mask, args, kwargs)
    mask_function = a.get("mask_function") or mu.causal_mask_function
    attention_mask = a.get("attention_mask")
    kv_length, kv_offset = a.get("kv_length"), a.get("kv_offset", 0)
    q_length, q_offset = a.get("q_length"), a.get("q_offset")
    cache_position = a.get("cache_position")
    if cache_position is not None and q_length is None:
        q_length = cache_position.shape[0]
        if q_offset is None and not torch.compiler.is_compiling() and cache_position.numel():
            q_offset = int(cache_position[0])
    if q_offset is None and cache_position is None:
        q_offset = 0
    kind = _mask_kind(mask_function)
    # A static cache's decoding steps give q_offset as a 0-d tensor (no host sync); its value is then not read.
    offset_tensor = isinstance(q_offset, torch.Tensor) and q_offset.dim() == 0 and not q_offset.is_floating_point()
    plain_ints = all(isinstance(x, int) for x in (kv_offset, kv_length, q_length)) and (
        isinstance(q_offset, int) or offset_tensor)
    fast = kind is not None and not a.get("use_vmap", False) and plain_ints and kv_offset == 0
    one_query = False
    if fast and kind != "bidirectional":
        # bottom-right causal alignment needs the queries to be the last q_length keys
        aligned = not offset_tensor and q_offset + q_length == kv_length
        if kind == "sliding":
            local_size = a.get("local_size")
            fast = aligned and isinstance(local_size, int) and kv_length <= local_size
        else:
            # One new token over a static cache (unfilled slots after it): bottom-right alignment lets the
            # query see every key, so the keys it may see (0..q_offset) become part of the padding mask.
            one_query = not aligned and q_length == 1
            fast = aligned or one_query
    elif offset_tensor:
        fast = False  # (bidirectional masks with a tensor offset: transformers' own mask)
    if fast and one_query:
        seen = torch.arange(kv_length, device=a.get("device") or getattr(attention_mask, "device", None)) <= q_offset
        if attention_mask is None:
            return seen[None].expand(a.get("batch_size") or 1, kv_length)
        mask = attention_mask.to(torch.bool)
        if mask.shape[-1] < kv_length:
            mask = F.pad(mask, (0, kv_length - mask.shape[-1]))
        return mask[:, :kv_length] & seen[None]
    if fast:
        if attention_mask is None:
            return None
        mask = attention_mask.to(torch.bool)
        if mask.shape[-1] < kv_length:
            mask = F.pad(mask, (0, kv_length - mask.shape[-1]))
        mask = mask[:, :kv_length]
        # Nothing padded: no mask, as transformers' sdpa_mask does (one look at the mask per forward, a
        # device sync the model's own sdpa path pays too). A padding mask, even all True, sends SDPA off
        # its flash kernel and costs mask ops in every layer. Kept while compiling or tracing (no
        # data-dependent branch there).
        if not (torch.compiler.is_compiling() or torch.jit.is_tracing()) and bool(mask.all()):
            return None
        return mask
    a["allow_is_causal_skip"] = False
    a["allow_is_bidirectional_skip"] = False
    return mu.sdpa_mask(**a)


def _allowed(B, L, S, key_padding_mask, causal, device) -> Optional[torch.Tensor]:
    """Bool (B|1, 1, L, S) from the 2-D padding mask and bottom-right causality (None: all allowed)."""
    allowed = None
    if key_padding_mask is not None:
        allowed = key_padding_mask[:, None, None, :].expand(B, 1, L, S)
    if causal:
        i = torch.arange(L, device=device)[:, None]
        j = torch.arange(S, device=device)[None, :]
        tri = (j <= i + (S - L))[None, None]
        allowed = tri if allowed is None else allowed & tri
    return allowed


def _is_causal(module, kwargs) -> bool:
    c = kwargs.get("is_causal")
    if c is None:  # (transformers' rule: a module that does not say is causal)
        c = getattr(module, "is_causal", True)
    return bool(c)


# --------------------------------------------------------------------------------------------------
# attention


def _original_function(module: nn.Module, name: str) -> Callable:
    if name == "eager":
        fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
        if fn is None:
            raise ValueError(f"{type(module).__name__}: no eager_attention_forward in {type(module).__module__}")
        return fn
    functions = _TRANSFORMERS.get("attention_functions")
    if functions is None:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS as functions
    return functions[name]


def _run_original(module, lp, query, key, value, attention_mask, scaling, dropout, **kwargs):
    name = lp.original if lp is not None else module.__dict__.get(ORIGINAL_ATTR, "sdpa")
    fn = _original_function(module, name)
    B, L, S = query.shape[0], query.shape[2], key.shape[2]
    causal = _is_causal(module, kwargs)
    if attention_mask is None or attention_mask.dim() == 2:
        # our compact format back into what the original implementation expects
        causal = causal and L > 1
        if attention_mask is None and (not causal or (name == "sdpa" and L == S)):
            # sdpa applies is_causal itself when queries and keys coincide; without causality nothing
            # is needed. (sdpa's is_causal is top-left aligned, so L < S needs an explicit mask.)
            mask = None
        else:
            mask = _allowed(B, L, S, attention_mask, causal, query.device)
    else:
        mask = attention_mask
    if mask is not None and mask.dtype == torch.bool and name == "eager":
        mask = torch.zeros(mask.shape, dtype=query.dtype, device=query.device).masked_fill(
            ~mask, torch.finfo(query.dtype).min)
    return fn(module, query, key, value, mask, scaling=scaling, dropout=dropout, **kwargs)


def _dense(query, key, value, pk, pv, attention_mask, causal, scaling, dropout):
    """Concatenated prefix + SDPA with an explicit mask (4-D masks, attention dropout)."""
    B, Hq, L, D = query.shape
    Hkv, S, P = key.shape[1], key.shape[2], pk.shape[-2]
    if pk.dim() == 3:
        pk, pv = pk.unsqueeze(0).expand(B, -1, -1, -1), pv.unsqueeze(0).expand(B, -1, -1, -1)
    k = torch.cat([pk, key], dim=2)
    v = torch.cat([pv, value], dim=2)
    if Hq != Hkv:
        k = k.repeat_interleave(Hq // Hkv, dim=1)
        v = v.repeat_interleave(Hq // Hkv, dim=1)
    if attention_mask is not None and attention_mask.dim() == 4:
        m = attention_mask
        if m.dtype == torch.bool:
            pre = torch.ones(*m.shape[:-1], P, dtype=torch.bool, device=m.device)
        else:
            m = m.to(query.dtype)
            pre = torch.zeros(*m.shape[:-1], P, dtype=m.dtype, device=m.device)
        mask = torch.cat([pre, m], dim=-1)
    else:
        allowed = _allowed(B, L, S, attention_mask, causal, query.device)
        if allowed is None:
            mask = None
        else:
            pre = torch.ones(*allowed.shape[:-1], P, dtype=torch.bool, device=query.device)
            mask = torch.cat([pre, allowed], dim=-1)
    return F.scaled_dot_product_attention(query, k, v, attn_mask=mask, dropout_p=dropout, scale=scaling)


def prefix_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: Optional[torch.Tensor], scaling: Optional[float] = None,
                             dropout: float = 0.0, **kwargs):
    """Attention function registered under :data:`NAME` (see the module docstring).

    ``query`` (B, Hq, L, D), ``key``/``value`` (B, Hkv, S, D) as transformers passes them (after
    RoPE and after the cache update); returns ``(output (B, L, Hq, D), None)``.
    """
    from .ops.prefix_attention import attend_impl

    lp = layer_prefix(module)
    if lp is None:
        return _run_original(module, lp, query, key, value, attention_mask, scaling, dropout, **kwargs)
    # Under autocast, autocast's dtype: SDPA would run in it anyway, and projections and RoPE may leave q,
    # k, v in float32 (transformers 5.17's RoPE does), which would send the prefix, its concatenation and
    # the kernels to float32 and the mask to a per-layer conversion. Else q's dtype.
    target = compute_dtype(query)
    prefix = lp.prefix(target)  # per layer (Hkv, P, D), shared by the batch
    if prefix is None:
        return _run_original(module, lp, query, key, value, attention_mask, scaling, dropout, **kwargs)
    if query.dtype != target or key.dtype != target or value.dtype != target:
        query, key, value = query.to(target), key.to(target), value.to(target)
    for unsupported in ("softcap", "s_aux"):  # (inject refuses such models; a model that passes them anyway)
        if kwargs.get(unsupported) is not None:
            raise ValueError(f"prefix attention does not apply {unsupported!r} (attention logit softcapping, attention "
                             f"sinks), which {type(module).__name__} passes: its output would be computed without it")
    pk, pv = prefix
    if (pk.shape[-1] != key.shape[-1] or pv.shape[-1] != value.shape[-1] or pk.shape[-3] != key.shape[1]
            or pv.shape[-3] != value.shape[1]):  # (the op's checks are skipped below: this one is not by construction)
        raise ValueError(f"the prefix of {type(module).__name__} has {pk.shape[-3]} heads of width {pk.shape[-1]} "
                         f"(keys) and {pv.shape[-1]} (values), but its keys have {key.shape[1]} heads of width "
                         f"{key.shape[-1]} and its values width {value.shape[-1]}: prefix tuning sizes every layer "
                         f"alike (not for attention such as DeepSeek's MLA or layers of other head widths)")
    if pk.dtype != target or pv.dtype != target:  # the source gives them in target already, as a rule
        pk, pv = pk.to(target), pv.to(target)
    causal = _is_causal(module, kwargs)
    use_dropout = dropout > 0.0 and (lp.keep_dropout if lp is not None else True)
    B = query.shape[0]
    p_drop = float(dropout) if use_dropout else 0.0
    if attention_mask is not None and attention_mask.dim() != 2:
        pk, pv = _batch_views(lp, target, B, pk, pv)
        out = _dense(query, key, value, pk, pv, attention_mask, causal, scaling, p_drop)
    else:
        kpm = None if attention_mask is None else attention_mask.to(torch.bool)
        # the arguments are right by construction (module docstring): the op's checks are skipped
        scale = query.shape[-1] ** -0.5 if scaling is None else float(scaling)
        impl = attend_impl(query, key, value, pk, pv, kpm, causal, dropout_p=p_drop, scale=scale)
        if impl.backend == "eager":
            pk, pv = _batch_views(lp, target, B, pk, pv)
        out = impl.run(query, key, value, pk, pv, key_padding_mask=kpm, causal=causal, scale=scale, dropout_p=p_drop)
    # the kernels' output is (B, L, H, D) memory (transposed back with no copy), the eager path's is not
    return out.transpose(1, 2).contiguous(), None


def _batch_views(lp: LayerPrefix, dtype, batch_size: int, pk, pv):
    """For the paths that concatenate the prefix to every sequence's keys (eager SDPA, the dense path): the
    prefix as (B, Hkv, P, D) views broadcast over the batch, views of the same tensor as the shared one, so
    that its gradient is summed over the batch once for all layers rather than in every layer. The
    kernels read the shared prefix itself (a batch view would cost them a select and its zero-filled
    gradient per layer)."""
    if batch_size <= 1 or pk.dim() != 3:
        return pk, pv
    views = lp.batch_views(dtype, batch_size)
    if views is None or views[0].dtype != pk.dtype:
        return pk, pv
    return views


def register() -> None:
    """Register :data:`NAME` with transformers' attention and mask interfaces (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    global _SLIDING_CODE, _AND_CODE
    from transformers import masking_utils as mu
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    _TRANSFORMERS.update(masking_utils=mu, attention_functions=ALL_ATTENTION_FUNCTIONS)

    _SLIDING_CODE = mu.sliding_window_overlay(1).__code__
    _AND_CODE = mu.and_masks(mu.causal_mask_function).__code__
    AttentionInterface.register(NAME, prefix_attention_forward)
    AttentionMaskInterface.register(NAME, prefix_mask)
    _REGISTERED = True


def current_implementation(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    name = getattr(config, "_attn_implementation", None)
    return name or "eager"


def disable(model: nn.Module, modules, original: str) -> None:
    """Undo :func:`enable` and the layer prefixes set on ``modules``: the model runs ``original`` again."""
    for m in modules:
        m.__dict__.pop(ATTR, None)
    for m in model.modules():
        m.__dict__.pop(ORIGINAL_ATTR, None)
    if current_implementation(model) != NAME:
        return
    setter = getattr(model, "set_attn_implementation", None)
    if setter is not None:
        setter(original)
    if current_implementation(model) != original:
        model.config._attn_implementation = original


def enable(model: nn.Module) -> str:
    """Switch ``model`` to :data:`NAME`; returns the implementation it had before (its fallback)."""
    register()
    original = current_implementation(model)
    if original == NAME:
        return original
    if original not in ("eager", "sdpa"):
        raise ValueError(
            f"prefix tuning runs on models configured with attn_implementation 'eager' or 'sdpa'; this model uses "
            f"{original!r}. Load it with attn_implementation='sdpa' (or 'eager')")
    for m in model.modules():
        if "Attention" in type(m).__name__:
            m.__dict__[ORIGINAL_ATTR] = original
    setter = getattr(model, "set_attn_implementation", None)
    if setter is not None:
        setter(NAME)
    if current_implementation(model) != NAME:
        model.config._attn_implementation = NAME
    return original
