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
    dropout_p      attention dropout in [0, 1): each weight of the softmax (prefix and sequence keys
                   alike) is dropped with this probability and the kept ones are scaled by
                   1 / (1 - dropout_p), as ``scaled_dot_product_attention(dropout_p=...)`` does; applied
                   whenever it is > 0 (pass 0 outside training, as transformers' layers do). The draws come
                   from torch's generator of q's device (``torch.manual_seed`` reproduces them); the
                   backends draw differently, so only their distributions agree.
A query row that sees no key at all returns zeros (never NaN) and passes no gradient.
All floating tensors share q's dtype and device; the output has q's shape. Under autocast (q not in its
dtype, nor float64) every backend computes in autocast's dtype and returns it, as SDPA does there: the
floating inputs are cast once (their gradients come back through the casts). The triton backend reads q,
k, v in any layout whose last dim is contiguous (the (B, L, H, D) memory of projections in place) and
returns the output, and q, k, v's gradients, as (B, H, L, D) views of (B, L, H, D) memory, which an
attention layer transposes back with no copy.

Backends
    eager   :func:`sdpa`: the prefix concatenated onto the keys/values and one call of
            ``torch.nn.functional.scaled_dot_product_attention`` with no mask when there is no padding
            and no causality (or ``is_causal`` where L == S and P == 0), else a broadcast bool mask;
            any device and dtype, differentiable through autograd. :func:`reference` (scores and a
            dense mask materialised, softmax in float32) stays the definition every backend is
            tested against; it is not dispatched to. One difference: SDPA adds its mask to the
            scores, so a NaN or inf in a key that a query may not see (padding, causality) may still
            reach that query's row, where the reference and the kernels keep it hidden. A NaN or inf
            in such a value reaches the row in both (a probability of 0 times it); the kernels never
            read it.
    triton  pet_fast/kernels/prefix_attention.py behind the custom ops ``pet_fast::prefix_attention_fwd``
            / ``_bwd`` (torch.compile sees one node each, no graph break; eager calls take the same
            functions through an autograd.Function, ops/_autograd.py): flash-attention forward and
            backward that read the prefix from its own tensor and skip padded keys; fp32/fp16/bf16,
            head_dim <= 256, scale > 0 (the kernels scale the row max of the raw scores, as flash
            attention does; the eager backend takes any real scale); forward and backward; dropout drawn
            in the kernels (Philox, one seed per call from torch's generator, drawn again in the
            backward: no mask is stored). Calls that need a gradient, without dropout, padding or GQA,
            non-causal or causal with L == S, head_dim % 8 == 0, fp16/bf16 on CUDA, take the merged path
            instead (``pet_fast::prefix_attention_merged_fwd`` / ``_bwd``,
            kernels/prefix_attention_merge.py): torch's cuDNN attention (where a one-time probe
            shows it matches) or flash attention, forward and backward, over the sequence and a Triton
            kernel for the prefix, merged through their log-sum-exps (exact: the backward called with
            the merged output and log-sum-exp gives the joint softmax's sequence gradients).
    cuda    csrc/prefix_attention.cu behind ``pet_fast::prefix_attention_decode``: 1..8 new tokens per
            sequence over [prefix; cache], split over the keys and merged by log-sum-exp; fp16/bf16,
            head_dim <= 256, forward only (refuses calls that need a gradient, and dropout).
auto follows measured timings where a GPU run left a table (prefix_attention_timings.json, one order per
kind of call: "fwd" when no gradient is needed, "fwd+bwd" when one is, "fwd+bwd, no padding" when one is
and nothing is masked (the triton backend's flash-merge path), "fwd+bwd, dropout" when one is with
attention dropout (these two follow the "fwd+bwd" order when the table has no such entry), "decode" for
at most 8 queries without a gradient), else takes triton, then eager, and the decode kernel last (see
:func:`preference`).
The shipped table (H100, bf16, benchmarks/results/h100-2026-11-27c/call2) puts triton first for the
forward and for decode, and eager (SDPA) first for forward+backward, with or without padding, where its
summed time over the benchmark's shapes was lower.
"""
from __future__ import annotations

import functools
import threading
from typing import Optional

import torch
import torch.nn.functional as F

from .. import dispatch
from . import _autograd, _checks, _timings
from ._autocast import compute_dtype

OP = "prefix_attention"


def check_dropout(dropout_p) -> float:
    p = _checks.real_number("dropout_p", dropout_p)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {p}")
    return p


def check_inputs(q, k, v, prefix_k, prefix_v, key_padding_mask, causal, scale) -> float:
    _checks.tensor("q", q, ndim=4)
    _checks.tensor("k", k, ndim=4)
    _checks.tensor("v", v, ndim=4)
    B, Hq, L, D = q.shape
    if D == 0:
        raise ValueError(f"q must have a head dimension D >= 1 (its last), got shape {tuple(q.shape)}")
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


def reference(q, k, v, prefix_k=None, prefix_v=None, key_padding_mask=None, causal=False, scale=None,
              dropout_p=0.0, dropout_keep=None):
    """Eager PyTorch on the concatenated keys: scores in q's dtype, softmax in float32 (float64 for
    float64 inputs). Differentiable through autograd. With ``dropout_p`` > 0, ``dropout_keep`` (bool,
    broadcastable to (B, Hq, L, P + S)) says which weights are kept: they are scaled by
    1 / (1 - dropout_p), the others zeroed (the kernels' draws come from
    ``pet_fast.kernels.prefix_attention.dropout_keep``)."""
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
    if dropout_p > 0:
        if dropout_keep is None:
            raise ValueError("reference: dropout_p > 0 needs dropout_keep (which weights are kept)")
        probs = probs * dropout_keep / (1.0 - dropout_p)
    return torch.matmul(probs.to(q.dtype), v)


def describe(q, k, prefix_k, key_padding_mask, causal, v=None, prefix_v=None, dropout_p=0.0, scale=None) -> dict:
    """What the dispatcher sees of a (validated) call (``scale`` None: the default, D ** -0.5)."""
    grad = _checks.needs_grad(q, k, v, prefix_k, prefix_v)
    return _checks.info(
        q, batch=q.shape[0], q_heads=q.shape[1], kv_heads=k.shape[1], q_len=q.shape[2], kv_len=k.shape[2],
        head_dim=q.shape[3], prefix_len=0 if prefix_k is None else prefix_k.shape[-2],
        prefix_per_batch=prefix_k is not None and prefix_k.dim() == 4,
        padding=key_padding_mask is not None, causal=causal, requires_grad=grad, dropout=dropout_p > 0,
        positive_scale=scale is None or scale > 0,
    )


def _sdpa_takes_enable_gqa() -> bool:
    """Whether the installed torch's SDPA has ``enable_gqa`` (torch >= 2.5); asked once, at import."""
    try:
        import inspect

        return "enable_gqa" in inspect.signature(F.scaled_dot_product_attention).parameters
    except (TypeError, ValueError):  # a builtin without a signature: try it on a tiny input
        pass
    try:
        t = torch.zeros(1, 2, 1, 1)
        F.scaled_dot_product_attention(t, t[:, :1], t[:, :1], enable_gqa=True)
        return True
    except (TypeError, RuntimeError):
        return False


_SDPA_GQA = _sdpa_takes_enable_gqa()


_SDPA_GQA_WITH_MASK = dispatch.torch_at_least(2, 11)  # the release it was measured on (below)


def _sdpa_gqa(device_type: str, dtype, masked: bool = False) -> bool:
    """Whether :func:`sdpa` passes ``enable_gqa`` rather than repeating the key/value heads: fp16/bf16
    on CUDA without a mask (the flash kernel's case), and with a mask from torch 2.11 on. Measured on
    an H100 (torch 2.11, bf16, benchmarks/results/h100-2026-11-27b/call2):
    concatenation + SDPA with a padding mask and ``enable_gqa`` took 378.6 us forward and 1309.6 us
    forward+backward at B8 H16/4 L1024 D128 P30, and 271 / 1765 us decoding B32 H32/8 D128 over caches
    of 512 / 4096, against 554.0, 1434.0, 662 and 4537 us with the heads repeated. The CPU's flash
    kernel has no GQA (enable_gqa sends it to the math path), and fp32 on CUDA, or a mask on older
    torch (where enable_gqa with a mask may take the math path), are unmeasured: they repeat."""
    if masked and not _SDPA_GQA_WITH_MASK:
        return False
    return _SDPA_GQA and device_type == "cuda" and dtype in (torch.float16, torch.bfloat16)


def _sdpa_masks(B, L, S, P, key_padding_mask, causal, device):
    """(attn_mask, rows) for :func:`sdpa`, decided from the arguments only (no look at tensor values).

    ``attn_mask``: None, or a bool mask broadcastable to (B, 1, L, P + S) (True = attend), as small as
    the call allows: (B, 1, 1, P + S) for padding alone, (1, 1, L, P + S) for causality alone.
    ``rows``: None when every query row sees at least one key (always so with P > 0); else a bool
    mask broadcastable to (B, 1, L, 1) of the rows that do. Such rows are given every key in
    ``attn_mask`` (SDPA may return NaN for a row with none) and zeroed afterwards."""
    seq = None  # which of the S sequence keys each query may see
    if key_padding_mask is not None:
        seq = key_padding_mask[:, None, None, :]
    if causal:
        i = torch.arange(L, device=device)[:, None]
        j = torch.arange(S, device=device)[None, :]
        tri = (j <= i + (S - L))[None, None]
        seq = tri if seq is None else seq & tri
    # rows with no key at all are possible only without a prefix, and only with padding, with no keys,
    # or with causality and more queries than keys (bottom-right alignment)
    if not (P == 0 and (key_padding_mask is not None or S == 0 or (causal and L > S))):
        rows = None
    else:
        if seq is None:  # S == 0 and no prefix: no row sees anything
            seq = torch.ones(1, 1, 1, S, dtype=torch.bool, device=device)
        rows = seq.any(dim=-1, keepdim=True)
        seq = seq | ~rows
    if seq is None or P == 0:
        return seq, rows
    prefix_cols = torch.ones(*seq.shape[:-1], P, dtype=torch.bool, device=device)
    return torch.cat([prefix_cols, seq], dim=-1), rows


_MASK_ALIGN = 16  # elements: the row stride of an additive mask (SDPA's memory-efficient kernel wants 8)


def _additive_mask(mask: torch.Tensor, dtype) -> torch.Tensor:
    """The bool mask (True = attend) as the additive mask SDPA makes of it (0 where True, -inf where
    False, in ``dtype``), laid out with rows ``_MASK_ALIGN``-aligned: a view of the first
    ``mask.shape[-1]`` columns of a wider buffer.

    SDPA turns a bool mask into this float mask on every call (``where`` over the whole mask, in
    every layer), and on CUDA its memory-efficient kernel copies a mask whose row stride is not a
    multiple of 8 into a padded one, again per call (P + S is rarely aligned: 1044 at P=20, S=1024).
    Built here once per forward (:func:`_sdpa_masks_reused`), neither happens per layer. Same values
    as SDPA's own conversion, so the same results (tests/test_prefix_attention_sdpa.py checks bits)."""
    n = mask.shape[-1]
    width = n + (-n) % _MASK_ALIGN
    out = torch.zeros(*mask.shape[:-1], width, dtype=dtype, device=mask.device).narrow(-1, 0, n)
    return out.masked_fill_(~mask, float("-inf"))


def _additive_dtype(q: torch.Tensor):
    """The dtype in which :func:`sdpa` passes its mask as an additive one, or None (bool mask): q's
    floating dtype, unless autocast would run SDPA in another (then SDPA would cast the mask per call;
    the bool mask is left to SDPA)."""
    if not q.is_floating_point() or compute_dtype(q) != q.dtype:
        return None
    return q.dtype


# (key_padding_mask, facts, masks) of this thread's last masked call of sdpa: per thread, since grad and
# inference modes are per thread (masks built under inference_mode must not reach another thread's graph)
_LAST_MASKS = threading.local()


def _sdpa_masks_reused(B, L, S, P, key_padding_mask, causal, device, additive=None):
    """:func:`_sdpa_masks`, reusing the last call's masks when the arguments are the same: every layer
    of a model's forward passes the same padding mask object, so the masks are built once per forward
    rather than once per layer. With ``additive`` (a dtype) the attention mask comes back as
    :func:`_additive_mask` of it (converted once per forward too). The padding mask's version counter
    catches changes in place; while torch.compile traces (it fuses the mask ops anyway), under
    inference_mode and for inference tensors (no version counter; masks that no graph may save) the
    masks are built every time. The cache is per thread."""
    def build():
        mask, rows = _sdpa_masks(B, L, S, P, key_padding_mask, causal, device)
        if mask is not None and additive is not None:
            mask = _additive_mask(mask, additive)
        return mask, rows

    if torch.compiler.is_compiling() or torch.is_inference_mode_enabled() or (
            key_padding_mask is not None and key_padding_mask.is_inference()):
        return build()
    facts = (B, L, S, P, causal, device, additive, None if key_padding_mask is None else key_padding_mask._version)
    last = getattr(_LAST_MASKS, "value", None)
    if last is not None and last[0] is key_padding_mask and last[1] == facts:
        return last[2]
    masks = build()
    _LAST_MASKS.value = (key_padding_mask, facts, masks)
    return masks


def sdpa(q, k, v, prefix_k=None, prefix_v=None, key_padding_mask=None, causal=False, scale=None, dropout_p=0.0):
    """The eager backend (same signature and contract as :func:`reference`): the prefix concatenated
    onto the keys and values, then ``torch.nn.functional.scaled_dot_product_attention``.

    No mask is built without padding and causality, so SDPA may take its flash kernel; causal without
    padding and prefix with L == S is SDPA's ``is_causal`` (its top-left alignment is bottom-right
    there); anything else passes a mask, built once per forward (:func:`_sdpa_masks_reused`) as the
    additive float mask SDPA would make of a bool one (:func:`_additive_mask`: no conversion and no
    realignment of the mask in every layer), or bool under autocast to another dtype. Grouped-query attention uses SDPA's
    ``enable_gqa`` for fp16/bf16 on CUDA (with a mask from torch 2.11 on; see :func:`_sdpa_gqa`), else
    repeats the key/value heads. Rows that see no
    key are zeros with no gradient, as the contract says (SDPA alone would give NaN there on some
    devices). ``dropout_p`` is SDPA's own. Plain torch ops only: autograd, every dtype,
    torch.compile(fullgraph=True)."""
    B, Hq, L, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    scale = D ** -0.5 if scale is None else float(scale)
    P = 0 if prefix_k is None else prefix_k.shape[-2]
    if P > 0:
        if prefix_k.dim() == 3:
            prefix_k = prefix_k.unsqueeze(0).expand(B, -1, -1, -1)
            prefix_v = prefix_v.unsqueeze(0).expand(B, -1, -1, -1)
        k = torch.cat([prefix_k, k], dim=2)
        v = torch.cat([prefix_v, v], dim=2)
    # an `if`, not a bool expression: under torch.compile with dynamic shapes the comparisons are
    # SymBools, which a branch turns into guards but SDPA's is_causal argument refuses
    use_is_causal = False
    if causal and key_padding_mask is None and P == 0 and L == S and S > 0:
        use_is_causal = True
    if use_is_causal or (key_padding_mask is None and not causal and P + S > 0):
        mask, rows = None, None  # what _sdpa_masks gives, without its look-up
    else:
        mask, rows = _sdpa_masks_reused(B, L, S, P, key_padding_mask, causal, q.device, _additive_dtype(q))
    group = Hq // Hkv
    extra = {}
    if group > 1:
        if _sdpa_gqa(q.device.type, q.dtype, mask is not None):
            extra["enable_gqa"] = True
        else:
            k = k.repeat_interleave(group, dim=1)
            v = v.repeat_interleave(group, dim=1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=use_is_causal,
                                         scale=scale, **extra)
    if rows is not None:
        out = torch.where(rows, out, out.new_zeros(()))
    return out


dispatch.register(OP, "eager", sdpa)


# ---------------------------------------------------------------------------------------------------
# Fused path: the Triton kernels behind torch.library custom ops, so that torch.compile sees one opaque
# node per direction (no graph break) and autograd reaches q, k, v and the prefix.

MAX_HEAD_DIM = 256  # the kernels pad D to a power of two up to this
DECODE_MAX_Q_LEN = 8
DECODE_MAX_KEYS = 2 ** 31 - 1 - 2 * 4096  # kDecodeMaxKeys of csrc/prefix_attention.h (int key positions)


@functools.cache  # imported once: no import statement per launch
def _kernels():
    from ..kernels import prefix_attention as kernels

    return kernels


def _empty_prefix(prefix):
    return prefix is None or prefix.shape[-2] == 0


def _fused_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_k: Optional[torch.Tensor],
                   prefix_v: Optional[torch.Tensor], key_padding_mask: Optional[torch.Tensor], causal: bool,
                   scale: float, dropout_p: float, seed: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse): out (B, Hq, L, D) in (B, L, Hq, D) memory, lse (B, Hq, L) float32 (natural log, +inf on
    rows that see no key). ``seed`` (int64, one element) when dropout_p > 0: the backward draws from it again."""
    return _kernels().forward(q, k, v, prefix_k, prefix_v, key_padding_mask, causal, scale, dropout_p=dropout_p,
                              seed=seed)


def _blhd_like(t: torch.Tensor) -> torch.Tensor:
    """An empty tensor of ``t``'s (B, H, L, D) shape in (B, L, H, D) memory: the layout of the kernels'
    outputs and of q, k and v's gradients (an attention layer transposes them back with no copy)."""
    B, H, L, D = t.shape
    return t.new_empty(B, L, H, D).transpose(1, 2)


def _fused_forward_fake(q, k, v, prefix_k, prefix_v, key_padding_mask, causal, scale, dropout_p, seed):
    return _blhd_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)


def _fused_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    prefix_k: Optional[torch.Tensor], prefix_v: Optional[torch.Tensor],
                    key_padding_mask: Optional[torch.Tensor], out: torch.Tensor, lse: torch.Tensor, causal: bool,
                    scale: float, dropout_p: float, seed: Optional[torch.Tensor]
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, d_prefix_k, d_prefix_v); the prefix gradients are empty tensors without a prefix."""
    dq, dk, dv, dpk, dpv = _kernels().backward(grad_out, q, k, v, prefix_k, prefix_v, key_padding_mask, out, lse,
                                               causal, scale, dropout_p=dropout_p, seed=seed)
    if dpk is None:
        dpk, dpv = q.new_empty(0), q.new_empty(0)
    return dq, dk, dv, dpk, dpv


def _fused_backward_fake(grad_out, q, k, v, prefix_k, prefix_v, key_padding_mask, out, lse, causal, scale,
                         dropout_p=0.0, seed=None):
    cf = torch.contiguous_format
    if prefix_k is None:
        dpk, dpv = q.new_empty(0), q.new_empty(0)
    else:
        dpk, dpv = torch.empty_like(prefix_k, memory_format=cf), torch.empty_like(prefix_v, memory_format=cf)
    return _blhd_like(q), _blhd_like(k), _blhd_like(v), dpk, dpv


def _lse_without_gradient(ctx, lse: torch.Tensor) -> None:
    """The log-sum-exp output is the backward's input, never differentiated: marked so, and gradients are
    not materialised, so autograd does not fill a zero gradient for it in every layer's backward (a launch
    each on a GPU); the backward then gets None for an output that took no part in the loss."""
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)


def _fused_setup_context(ctx, inputs, output):
    q, k, v, prefix_k, prefix_v, key_padding_mask, causal, scale, dropout_p, seed = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, prefix_k, prefix_v, key_padding_mask, out, lse, seed)
    ctx.causal, ctx.scale, ctx.dropout_p = causal, scale, dropout_p
    _lse_without_gradient(ctx, lse)


def _fused_autograd_backward(ctx, grad_out, grad_lse):
    if grad_out is None:  # the output took no part in what is differentiated
        return (None,) * 10
    q, k, v, prefix_k, prefix_v, key_padding_mask, out, lse, seed = ctx.saved_tensors
    dq, dk, dv, dpk, dpv = FUSED_BACKWARD.within(ctx)(grad_out, q, k, v, prefix_k, prefix_v, key_padding_mask, out,
                                                      lse, ctx.causal, ctx.scale, ctx.dropout_p, seed)
    if prefix_k is None:
        dpk = dpv = None
    return dq, dk, dv, dpk, dpv, None, None, None, None, None


# Custom ops for compiled code (one opaque node per direction, no graph break); eager calls take the same
# functions through an autograd.Function, which costs far less host time (see ops/_autograd.py).
FUSED_BACKWARD = _autograd.custom_op("prefix_attention_bwd", _fused_backward, fake=_fused_backward_fake)
FUSED_FORWARD = _autograd.custom_op("prefix_attention_fwd", _fused_forward, fake=_fused_forward_fake,
                                    autograd=(_fused_autograd_backward, _fused_setup_context))


def _canonical_prefix(prefix_k, prefix_v):
    """None for an absent or empty prefix; a (B, Hkv, P, D) view broadcast over the batch (stride 0)
    becomes the shared (Hkv, P, D) tensor, so the kernels read it once per head and sum its gradient."""
    if _empty_prefix(prefix_k):
        return None, None
    if prefix_k.dim() == 4 and prefix_k.shape[0] > 1 and prefix_k.stride(0) == 0 and prefix_v.stride(0) == 0:
        return prefix_k[0], prefix_v[0]
    return prefix_k, prefix_v


# ---------------------------------------------------------------------------------------------------
# Merged path: torch's cuDNN or flash attention over the sequence, a Triton kernel for the prefix, merged through
# the log-sum-exps (pet_fast/kernels/prefix_attention_merge.py), forward and backward. The triton backend
# takes it for calls that need a gradient and that it covers (:func:`merged_reasons`).

_MERGED_CUDA_DTYPES = (torch.float16, torch.bfloat16)
# On the CPU only the interpreter runs it (tests); bf16 is left out there, the interpreter computes it wrong.
_MERGED_CPU_DTYPES = (torch.float32, torch.float16)


def merged_reasons(q, k, prefix_k, key_padding_mask, causal) -> list:
    """Why the merged path cannot take a call (empty: it can), from the arguments' metadata only."""
    B, Hq, L, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    why = []
    if key_padding_mask is not None:
        why.append("a key padding mask (torch's flash kernel takes none)")
    if Hq != Hkv:
        why.append(f"grouped-query attention ({Hq} query heads over {Hkv} key/value heads)")
    if causal and L != S:
        why.append(f"causal with q_len {L} != kv_len {S} (flash's causal mask is top-left aligned)")
    if L == 0 or S == 0 or B * Hq == 0:
        why.append("an empty batch, head or sequence")
    if D % 8 != 0 or not 8 <= D <= MAX_HEAD_DIM:
        why.append(f"head_dim {D} is not a multiple of 8 in 8..{MAX_HEAD_DIM}")
    if prefix_k is not None and prefix_k.dim() == 4 and prefix_k.shape[0] != B:
        why.append("a prefix batch that is not q's")
    why += _grid_reasons(B, Hq)
    if q.device.type == "cuda":
        if q.dtype not in _MERGED_CUDA_DTYPES:
            why.append(f"dtype {q.dtype} on CUDA (torch's flash kernel takes fp16/bf16)")
        elif dispatch.device_capability(q.device)[0] < 8:
            why.append("a GPU older than sm80 (torch's flash kernel needs Ampere or newer)")
    elif q.device.type == "cpu":
        if q.dtype not in _MERGED_CPU_DTYPES:
            why.append(f"dtype {q.dtype} on the CPU (the interpreter's tests run fp32/fp16)")
    else:
        why.append(f"device {q.device.type}")
    return why


@functools.cache  # imported once: no import statement per launch
def _merge_kernels():
    from ..kernels import prefix_attention_merge as kernels

    return kernels


def _merged_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_k: Optional[torch.Tensor],
                    prefix_v: Optional[torch.Tensor], causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) of the joint softmax: out contiguous like q, lse (B, H, L) float32 natural log."""
    return _merge_kernels().forward(q, k, v, prefix_k, prefix_v, causal, scale)


def _merged_forward_fake(q, k, v, prefix_k, prefix_v, causal, scale):
    return _blhd_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)


def _merged_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     prefix_k: Optional[torch.Tensor], prefix_v: Optional[torch.Tensor], out: torch.Tensor,
                     lse: torch.Tensor, causal: bool,
                     scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, d_prefix_k, d_prefix_v); the prefix gradients are empty tensors without a prefix."""
    dq, dk, dv, dpk, dpv = _merge_kernels().backward(grad_out, q, k, v, prefix_k, prefix_v, out, lse, causal, scale)
    if dpk is None:
        dpk, dpv = q.new_empty(0), q.new_empty(0)
    return dq, dk, dv, dpk, dpv


def _merged_backward_fake(grad_out, q, k, v, prefix_k, prefix_v, out, lse, causal, scale):
    return _fused_backward_fake(grad_out, q, k, v, prefix_k, prefix_v, None, out, lse, causal, scale)


def _merged_setup_context(ctx, inputs, output):
    q, k, v, prefix_k, prefix_v, causal, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, prefix_k, prefix_v, out, lse)
    ctx.causal, ctx.scale = causal, scale
    _lse_without_gradient(ctx, lse)


def _merged_autograd_backward(ctx, grad_out, grad_lse):
    if grad_out is None:  # the output took no part in what is differentiated
        return (None,) * 7
    q, k, v, prefix_k, prefix_v, out, lse = ctx.saved_tensors
    dq, dk, dv, dpk, dpv = MERGED_BACKWARD.within(ctx)(grad_out, q, k, v, prefix_k, prefix_v, out, lse,
                                                       ctx.causal, ctx.scale)
    if prefix_k is None:
        dpk = dpv = None
    return dq, dk, dv, dpk, dpv, None, None


MERGED_BACKWARD = _autograd.custom_op("prefix_attention_merged_bwd", _merged_backward, fake=_merged_backward_fake)
MERGED_FORWARD = _autograd.custom_op("prefix_attention_merged_fwd", _merged_forward, fake=_merged_forward_fake,
                                     autograd=(_merged_autograd_backward, _merged_setup_context))


def merged(q, k, v, prefix_k=None, prefix_v=None, key_padding_mask=None, causal=False, scale=None):
    """The merged path alone (same signature as :func:`reference`): ``torch.ops.pet_fast.prefix_attention_merged_fwd``;
    raises ValueError for a call that :func:`merged_reasons` refuses. For tests and benchmarks; the
    triton backend (:func:`fused`) routes to it by itself."""
    why = merged_reasons(q, k, prefix_k, key_padding_mask, causal)
    if why:
        raise ValueError("prefix_attention: the merged path cannot take this call: " + "; ".join(why))
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    prefix_k, prefix_v = _canonical_prefix(prefix_k, prefix_v)
    return MERGED_FORWARD(q, k, v, prefix_k, prefix_v, causal, scale)[0]


def dropout_seed(device) -> torch.Tensor:
    """The seed of one call's dropout draws (int64, one element on ``device``), from torch's generator of
    that device and nothing else (``torch.manual_seed`` reproduces it): under torch.compile an op of the
    graph, under CUDA graphs a kernel that each replay runs again."""
    return torch.randint(2 ** 62, (1,), dtype=torch.int64, device=device)


def _own(q, k, v, prefix_k, prefix_v, key_padding_mask, causal, scale, dropout_p):
    """``pet_fast::prefix_attention_fwd``'s output, with a new :func:`dropout_seed` under dropout."""
    seed = dropout_seed(q.device) if dropout_p > 0 else None
    return FUSED_FORWARD(q, k, v, prefix_k, prefix_v, key_padding_mask, causal, scale, float(dropout_p), seed)[0]


def own_kernels(q, k, v, prefix_k=None, prefix_v=None, key_padding_mask=None, causal=False, scale=None,
                dropout_p=0.0):
    """The flash-style Triton kernels of kernels/prefix_attention.py for every call, forward and backward
    (``torch.ops.pet_fast.prefix_attention_fwd``); same signature as :func:`sdpa`."""
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    prefix_k, prefix_v = _canonical_prefix(prefix_k, prefix_v)
    return _own(q, k, v, prefix_k, prefix_v, key_padding_mask, causal, scale, dropout_p)


def fused(q, k, v, prefix_k=None, prefix_v=None, key_padding_mask=None, causal=False, scale=None, dropout_p=0.0):
    """The triton backend (same signature as :func:`sdpa`). Calls that need a gradient, without dropout, and
    that :func:`merged_reasons` accepts take the merged path (torch's cuDNN or flash attention over the
    sequence plus the Triton prefix merge, ``pet_fast::prefix_attention_merged_fwd``); every other call, and
    every forward-only call, takes the flash-style Triton kernels (``pet_fast::prefix_attention_fwd``)."""
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    prefix_k, prefix_v = _canonical_prefix(prefix_k, prefix_v)
    if dropout_p == 0 and _checks.needs_grad(q, k, v, prefix_k, prefix_v) and not merged_reasons(
            q, k, prefix_k, key_padding_mask, causal):
        return MERGED_FORWARD(q, k, v, prefix_k, prefix_v, causal, scale)[0]
    return _own(q, k, v, prefix_k, prefix_v, key_padding_mask, causal, scale, dropout_p)


# Why the Triton kernels (and torch's flash attention in the merged path) need scale > 0.
POSITIVE_SCALE = ("the kernels take the row max of the unscaled scores and apply the scale to it, as flash "
                  "attention does, which holds for a scale > 0 only; the eager backend takes any scale")

# The Triton kernels' grids put the heads and the batch on CUDA's second and third grid dimensions.
MAX_GRID_YZ = 65535


def _grid_reasons(batch: int, q_heads: int) -> list:
    return [f"{name} {n} > {MAX_GRID_YZ} (the kernels' grid holds it in a dimension of at most {MAX_GRID_YZ})"
            for name, n in (("batch", batch), ("q_heads", q_heads)) if n > MAX_GRID_YZ]


def triton_reasons(info) -> list:
    why = dispatch.triton_reasons(info)
    if not 1 <= info["head_dim"] <= MAX_HEAD_DIM:
        why.append(f"head_dim {info['head_dim']} is outside 1..{MAX_HEAD_DIM} (the kernels hold a padded row of D)")
    if not info.get("positive_scale", True):
        why.append(f"scale <= 0 ({POSITIVE_SCALE})")
    return why + _grid_reasons(info["batch"], info["q_heads"])


dispatch.register(OP, "triton", fused, triton_reasons)


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
    dropout_p: float = 0.0,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Attention of ``q`` over ``[prefix_k; k]`` / ``[prefix_v; v]``; see the module docstring."""
    if isinstance(q, torch.Tensor):
        dt = compute_dtype(q)
        if dt != q.dtype:  # under autocast every backend computes (and returns) as SDPA would there
            q, k, v, prefix_k, prefix_v = (t.to(dt) if isinstance(t, torch.Tensor) and t.is_floating_point() else t
                                           for t in (q, k, v, prefix_k, prefix_v))

    def resolve():
        s = check_inputs(q, k, v, prefix_k, prefix_v, key_padding_mask, causal, scale)
        p = check_dropout(dropout_p)
        return (s, p), describe(q, k, prefix_k, key_padding_mask, causal, v, prefix_v, p, s)

    sig = _checks.signature(q, k, v, prefix_k, prefix_v, key_padding_mask, causal, scale, dropout_p)
    (scale, p), impl = dispatch.plan(OP, sig, backend, resolve)
    return impl.run(q, k, v, prefix_k, prefix_v, key_padding_mask=key_padding_mask, causal=causal, scale=scale,
                    dropout_p=p)


def attend_impl(q, k, v, prefix_k, prefix_v, key_padding_mask, causal: bool, backend=None,
                dropout_p: float = 0.0, scale: Optional[float] = None) -> dispatch.Impl:
    """The backend :func:`attend` takes for these arguments (its ``.backend`` names it, ``.run`` runs it
    with :func:`sdpa`'s signature)."""
    sig = _checks.signature(q, k, v, prefix_k, prefix_v, key_padding_mask, causal, dropout_p > 0,
                            scale is None or scale > 0)
    if sig is not None:  # (its own plans: prefix_attention's keep what its checks returned, these keep none)
        sig = ("attend",) + sig
    _, impl = dispatch.plan(OP, sig, backend, lambda: (
        None, describe(q, k, prefix_k, key_padding_mask, causal, v, prefix_v, dropout_p, scale)))
    return impl


def attend(q, k, v, prefix_k, prefix_v, key_padding_mask, causal: bool, scale: float, backend=None,
           dropout_p: float = 0.0):
    """:func:`prefix_attention` without :func:`check_inputs`, for callers whose arguments satisfy the
    contract by construction (pet_fast.hf_attention: q, k, v from the model's projections, the prefix
    from its encoder, the padding mask from its mask function), where the checks would run in every
    layer of every step. ``scale`` and ``dropout_p`` must be floats. Same dispatch."""
    impl = attend_impl(q, k, v, prefix_k, prefix_v, key_padding_mask, causal, backend, dropout_p, scale)
    return impl.run(q, k, v, prefix_k, prefix_v, key_padding_mask=key_padding_mask, causal=causal, scale=scale,
                    dropout_p=dropout_p)


# ---------------------------------------------------------------------------------------------------
# Decode path: the CUDA kernel (csrc/prefix_attention.cu) for 1..8 new tokens per sequence over the
# prefix plus the cache, split over the key length. Forward only.

def decode_shape_reasons(info) -> list:
    """Why the decode kernel cannot take a call, whatever the device (shapes and autograd)."""
    why = []
    if not 1 <= info["q_len"] <= DECODE_MAX_Q_LEN:
        why.append(f"q_len {info['q_len']} is outside 1..{DECODE_MAX_Q_LEN} (the decode kernel is for a few new tokens)")
    if not 1 <= info["head_dim"] <= MAX_HEAD_DIM:
        why.append(f"head_dim {info['head_dim']} is outside 1..{MAX_HEAD_DIM}")
    if info.get("requires_grad"):
        why.append("a gradient is required and the decode kernel is forward only")
    if info.get("dropout"):
        why.append("attention dropout (the decode kernel has none)")
    if info["kv_len"] + info["prefix_len"] > DECODE_MAX_KEYS:
        why.append(f"prefix plus cache length {info['kv_len'] + info['prefix_len']} is over {DECODE_MAX_KEYS} "
                   "(the decode kernel's key positions are int32)")
    # its grid: (splits, blocks of up to 8 (query head, token) rows per key/value head, batch): at most q_heads blocks
    return why + _grid_reasons(info["batch"], info["q_heads"])


_DECODE_DTYPES = (torch.float16, torch.bfloat16)


def cuda_decode_reasons(info) -> list:
    why = decode_shape_reasons(info)
    if info["device"].type != "cuda":
        return [f"inputs are on {info['device'].type}, the cuda backend needs CUDA tensors"] + why
    if why:  # do not load (or build) the extension for a call it could not take anyway
        if info["dtype"] not in _DECODE_DTYPES:
            why.append(f"dtype {info['dtype']} is not one of {tuple(str(d) for d in _DECODE_DTYPES)}")
        return why
    return dispatch.cuda_reasons(info, dtypes=_DECODE_DTYPES)


def _decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_k: Optional[torch.Tensor],
            prefix_v: Optional[torch.Tensor], key_padding_mask: Optional[torch.Tensor], causal: bool,
            scale: float) -> torch.Tensor:
    from .. import _ext

    ext = _ext.load()
    if ext is None:
        raise RuntimeError(f"prefix_attention: the CUDA extension is unavailable: {_ext.reason()}")
    return ext.prefix_attention_decode(q, k, v, prefix_k, prefix_v, key_padding_mask, None, causal, scale, 0)


def _decode_fake(q, k, v, prefix_k, prefix_v, key_padding_mask, causal, scale):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


DECODE = _autograd.custom_op("prefix_attention_decode", _decode, fake=_decode_fake)


def decode(q, k, v, prefix_k=None, prefix_v=None, key_padding_mask=None, causal=False, scale=None, dropout_p=0.0):
    """The CUDA decode path (same signature as :func:`sdpa`; :func:`decode_shape_reasons` refuses dropout)."""
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    prefix_k, prefix_v = _canonical_prefix(prefix_k, prefix_v)
    return DECODE(q, k, v, prefix_k, prefix_v, key_padding_mask, causal, scale)


dispatch.register(OP, "cuda", decode, cuda_decode_reasons)


TIMINGS_ENV = "PET_FAST_PREFIX_ATTENTION_TIMINGS"
NO_PADDING = "fwd+bwd, no padding"
DROPOUT = "fwd+bwd, dropout"
MODES = ("decode", "fwd", "fwd+bwd", NO_PADDING, DROPOUT)
_TIMINGS: dict = {}


def load_timings(path=None) -> Optional[dict]:
    """(Re)read auto's measured order: ``{"orders": {mode: [backends]}}`` for the modes of MODES,
    written by ``benchmarks/bench_prefix_attention.py --dispatch-table PATH`` on a GPU. Looked up in
    $PET_FAST_PREFIX_ATTENTION_TIMINGS, else pet_fast/ops/prefix_attention_timings.json; None without one."""
    def valid(orders):
        return isinstance(orders, dict) and all(
            m in MODES and isinstance(o, list) and o and all(b in dispatch.BACKENDS for b in o)
            for m, o in orders.items())

    expected = "{'orders': {" + " | ".join(repr(m) for m in MODES) + ": [backends, fastest first]}}"
    orders, path = _timings.read_order_table(OP, TIMINGS_ENV, "orders", valid, expected, path)
    _TIMINGS.update(orders=orders, path=path, device=_timings.table_device(path) if orders else None)
    dispatch.clear_plans()  # remembered choices followed the old table
    return orders


def timings_summary() -> str:
    """One line for ``pet-fast info``: the card and the order per kind of call auto follows."""
    orders, where = _TIMINGS.get("orders"), _TIMINGS.get("path")
    if not orders:
        return f"no table ({where}): design order triton, cuda, eager (decode: triton, eager, cuda)"
    card = _TIMINGS.get("device") or "an unnamed card"
    modes = "; ".join(f"{m}: {', '.join(preference_for_mode(m))}" for m in ("fwd", "fwd+bwd", NO_PADDING, DROPOUT,
                                                                          "decode"))
    return f"measured on {card} ({where}): {modes}"


def _mode(info) -> str:
    if info.get("requires_grad"):
        if info.get("dropout"):
            return DROPOUT
        return "fwd+bwd" if info.get("padding") else NO_PADDING
    return "decode" if info["q_len"] <= DECODE_MAX_Q_LEN else "fwd"


def preference_for_mode(mode: str) -> list:
    """auto's order for one kind of call: "fwd" (no gradient needed), "fwd+bwd" (a gradient is needed),
    "fwd+bwd, no padding" (the same without a key-padding mask) and "fwd+bwd, dropout" (with attention
    dropout; both: their own measured order, else fwd+bwd's), or "decode" (no gradient, at most
    DECODE_MAX_Q_LEN queries)."""
    orders = _TIMINGS.get("orders") or {}
    measured = orders.get(mode) or (orders.get("fwd+bwd") if mode in (NO_PADDING, DROPOUT) else None)
    if measured:
        return list(measured) + [b for b in ("triton", "eager", "cuda") if b not in measured]
    if mode == "decode":
        return ["triton", "eager", "cuda"]
    return ["triton", "cuda", "eager"]


def preference(info) -> list:
    """auto's order: the measured one where a timings table has this kind of call (decode, forward,
    forward+backward), else Triton first, then eager (SDPA), then the CUDA decode kernel.

    Without a table the decode kernel comes last: on an H100 (benchmarks/results/h100-2026-11-27, bf16,
    B32 H32/8 D128 P20, one new token) it took 505 us with a cache of 512 and 3717 us with 4096, against
    274 and 1777 us for concatenation + SDPA, which is what the eager backend runs. It has been reworked
    since (more loads in flight per warp); a GPU run's table puts it first again where it measures faster.
    The Triton kernels' place is by design until a table says otherwise.
    """
    return preference_for_mode(_mode(info))


load_timings()
dispatch.set_preference(OP, preference)
