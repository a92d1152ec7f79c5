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
Instead of ``scores`` a call may pass ``packed_mask=`` (int32, (out_features, ceil(in_features / 32)),
from :func:`pet_fast.pack_mask`; layout in mask_packing.py): the mask for serving, 1 bit per weight,
with no gradient of its own. Exactly one of the two is required.
:func:`masked_linear_multitask` serves a batch that mixes tasks: one base weight, a stack of packed
masks, and a task id per token.

Backends
    eager   PyTorch; everything, CPU included.
    triton  kernels/masked_linear.py through the custom ops ``pet_fast::masked_linear`` (forward, with
            the straight-through backward ``pet_fast::masked_linear_backward``) and
            ``pet_fast::masked_linear_packed`` (inference): GEMMs that mask weight tiles in registers.
            fp16/bf16/fp32; scores in fp16/bf16/fp32.
    cuda    csrc/masked_linear.cu: packed masks only, N <= 64 tokens, fp16/bf16, no gradients; also the
            multitask op.
Auto's order per call: a measured-timings table when one exists, else cuda first for packed masks with
N <= 16 tokens, triton first otherwise (see ``preference``).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .. import dispatch
from . import _checks, _timings, mask_packing

OP = "masked_linear"


def check_inputs(x, weight, scores, bias, threshold, packed_mask=None) -> float:
    _checks.tensor("x", x, min_ndim=1)
    _checks.tensor("weight", weight, ndim=2)
    if (scores is None) == (packed_mask is None):
        raise ValueError("masked_linear needs exactly one of scores (training, straight-through gradients) and "
                         "packed_mask (a mask from pet_fast.pack_mask, inference); got "
                         + ("both" if scores is not None else "neither"))
    out_f, in_f = weight.shape
    if x.shape[-1] != in_f:
        raise ValueError(f"x's last dimension must equal weight.shape[1] = {in_f}, got x of shape {tuple(x.shape)}")
    if scores is not None:
        _checks.tensor("scores", scores, ndim=2)
        _checks.shape("scores", scores, weight.shape, "the shape of weight")
    else:
        mask_packing.check_packed("packed_mask", packed_mask, (out_f,), in_f)
    if bias is not None:
        _checks.tensor("bias", bias, ndim=1)
        _checks.shape("bias", bias, (out_f,))
    _checks.same_dtype("x", x, weight=weight, bias=bias)
    _checks.same_device("x", x, weight=weight, scores=scores, packed_mask=packed_mask, bias=bias)
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


def reference(x, weight, scores, bias=None, threshold=0.0, packed_mask=None):
    """Eager PyTorch: masks the weight once, then ``F.linear``. Autograd gives the STE gradients (to x,
    weight and bias also with a packed mask, which itself has no gradient)."""
    if packed_mask is not None:
        mask = mask_packing.unpack_mask(packed_mask, weight.shape).to(weight.dtype)
    else:
        mask = straight_through_mask(scores, threshold, weight.dtype)
    return F.linear(x, weight * mask, bias)


def describe(x, weight, scores, bias, packed_mask=None) -> dict:
    """What the dispatcher sees of a (validated) call."""
    tensors = [t for t in (x, weight, scores, bias) if t is not None]
    return _checks.info(x, scores_dtype=None if scores is None else scores.dtype, packed=packed_mask is not None,
                        n=x.numel() // max(x.shape[-1], 1), in_features=weight.shape[1],
                        out_features=weight.shape[0], bias=bias is not None, weight_grad=weight.requires_grad,
                        needs_grad=torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


dispatch.register(OP, "eager", reference)


def masked_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    scores: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    *,
    threshold: float = 0.0,
    packed_mask: Optional[torch.Tensor] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """``x @ (weight * (scores > threshold)).T + bias`` with straight-through gradients to ``scores``.

    Pass either ``scores`` (training) or ``packed_mask`` (int32 words from :func:`pet_fast.pack_mask`,
    1 bit per weight; inference, ``threshold`` is then unused). See the module docstring for the contract
    and the gradients.
    """
    threshold = check_inputs(x, weight, scores, bias, threshold, packed_mask)
    impl = dispatch.select(OP, describe(x, weight, scores, bias, packed_mask), backend)
    return impl.run(x, weight, scores, bias, threshold=threshold, packed_mask=packed_mask)


# ---------------------------------------------------------------------------------------------------
# Fused backends. The kernels are wrapped as torch.library custom ops (with a fake implementation and
# an autograd formula) so that torch.compile(fullgraph=True) captures them as single nodes. Their
# implementations launch the Triton kernels on CUDA tensors (and on CPU tensors under
# TRITON_INTERPRET=1); on CPU tensors otherwise they compute the same formulas eagerly, so the
# custom ops are usable (and testable) everywhere.

_KERNEL_SCORE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_CUDA_DTYPES = (torch.float16, torch.bfloat16)
CUDA_MAX_TOKENS = 64  # the cuda serving kernel keeps one accumulator per token in registers


def _kernels_run_on(t: torch.Tensor) -> bool:
    return t.is_cuda or dispatch.triton_interpreting()


def _eager_mask(weight, scores, threshold):
    return (scores > threshold).to(weight.dtype)


@torch.library.custom_op("pet_fast::masked_linear", mutates_args=())
def _fused(x: torch.Tensor, weight: torch.Tensor, scores: torch.Tensor, bias: Optional[torch.Tensor],
           threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, bits) for x (M, K) 2-D. The mask is packed first (one pass over the scores, 1 bit per weight
    written), then the GEMM masks weight tiles in registers from those bits, which cost 1/32 of the
    bytes of fp32 scores on every tile load; the backward reuses the bits."""
    if _kernels_run_on(x):
        from ..kernels import masked_linear as kernels

        bits = kernels.pack(scores, threshold)
        return kernels.forward(x, weight, bits=bits, bias=bias), bits
    bits = mask_packing.pack_mask(scores, threshold)
    return F.linear(x, weight * _eager_mask(weight, scores, threshold), bias), bits


@_fused.register_fake
def _fused_fake(x, weight, scores, bias, threshold):
    words = mask_packing.packed_words(weight.shape[1])
    return x.new_empty((x.shape[0], weight.shape[0])), x.new_empty((weight.shape[0], words), dtype=torch.int32)


@torch.library.custom_op("pet_fast::masked_linear_backward", mutates_args=())
def _fused_backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bits: torch.Tensor,
                    scores_dtype: torch.dtype, input_grad: bool, scores_grad: bool, weight_grad: bool,
                    bias_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, d_scores, d_weight, d_bias) from the packed mask; the ones not asked for are empty tensors."""
    def empty(dtype):  # a fresh tensor each: outputs of a custom op must not alias each other
        return dy.new_empty((0,), dtype=dtype)

    dx = ds = dw = db = None
    if _kernels_run_on(dy):
        from ..kernels import masked_linear as kernels

        if input_grad:
            dx = kernels.grad_input(dy, weight, bits=bits)
        if scores_grad or weight_grad:
            ds, dw, db = kernels.grad_weight(dy, x, weight, bits=bits, weight_grad=weight_grad, bias_grad=bias_grad,
                                             scores_dtype=scores_dtype)
    else:
        mask = mask_packing.unpack_mask(bits, weight.shape).to(weight.dtype)
        if input_grad:
            dx = dy @ (weight * mask)
        if scores_grad or weight_grad:
            g = dy.t().float() @ x.float()
            ds = (g * weight.float()).to(scores_dtype)
            dw = (g * mask.float()).to(weight.dtype) if weight_grad else None
    if bias_grad and db is None:
        db = dy.float().sum(0).to(dy.dtype)
    return (dx if input_grad else empty(dy.dtype), ds if scores_grad else empty(scores_dtype),
            dw if weight_grad else empty(weight.dtype), db if bias_grad else empty(dy.dtype))


@_fused_backward.register_fake
def _fused_backward_fake(dy, x, weight, bits, scores_dtype, input_grad, scores_grad, weight_grad, bias_grad):
    def maybe(flag, shape, dtype):
        return dy.new_empty(shape if flag else (0,), dtype=dtype)

    return (maybe(input_grad, x.shape, x.dtype), maybe(scores_grad, weight.shape, scores_dtype),
            maybe(weight_grad, weight.shape, weight.dtype), maybe(bias_grad, (weight.shape[0],), dy.dtype))


def _fused_setup_context(ctx, inputs, output):
    x, weight, scores, bias, threshold = inputs
    ctx.save_for_backward(x, weight, output[1])
    ctx.mark_non_differentiable(output[1])
    ctx.scores_dtype = scores.dtype
    ctx.has_bias = bias is not None


def _fused_autograd(ctx, dy, _dbits):
    x, weight, bits = ctx.saved_tensors
    need_x, need_w, need_s, need_b, _ = ctx.needs_input_grad
    need_b = bool(need_b and ctx.has_bias)
    if not (need_x or need_w or need_s or need_b):
        return None, None, None, None, None
    dx, ds, dw, db = torch.ops.pet_fast.masked_linear_backward(dy, x, weight, bits, ctx.scores_dtype, need_x,
                                                                need_s, need_w, need_b)
    return (dx if need_x else None, dw if need_w else None, ds if need_s else None, db if need_b else None, None)


_fused.register_autograd(_fused_autograd, setup_context=_fused_setup_context)


@torch.library.custom_op("pet_fast::masked_linear_packed", mutates_args=())
def _packed(x: torch.Tensor, weight: torch.Tensor, packed: torch.Tensor, bias: Optional[torch.Tensor],
            task_ids: Optional[torch.Tensor], kernel: str) -> torch.Tensor:
    """Inference from packed bits: x (M, K); packed (N, W) or, with task_ids (M,), a stack (T, N, W).
    ``kernel`` is "cuda" (pet_fast._C), "triton" (single mask only) or "eager"."""
    if kernel == "cuda":
        from .. import _ext

        ext = _ext.load()
        if ext is None:
            raise RuntimeError(f"pet_fast._C is not available: {_ext.reason()}")
        return ext.masked_linear_packed(x, weight, packed, bias, task_ids)
    if kernel == "triton" and task_ids is None and _kernels_run_on(x):
        from ..kernels import masked_linear as kernels

        return kernels.forward(x, weight, bits=packed, bias=bias)
    if task_ids is None:
        return reference(x, weight, None, bias, packed_mask=packed)
    return reference_multitask(x, weight, packed, task_ids, bias)


@_packed.register_fake
def _packed_fake(x, weight, packed, bias, task_ids, kernel):
    return x.new_empty((x.shape[0], weight.shape[0]))


def _as_2d(x):
    n = 1
    for d in x.shape[:-1]:
        n *= d
    return x.reshape(n, x.shape[-1])


def _triton_run(x, weight, scores, bias=None, threshold=0.0, packed_mask=None):
    x2 = _as_2d(x)
    if packed_mask is not None:
        y = torch.ops.pet_fast.masked_linear_packed(x2, weight, packed_mask, bias, None, "triton")
    else:
        y = torch.ops.pet_fast.masked_linear(x2, weight, scores, bias, threshold)[0]
    return y.reshape(*x.shape[:-1], weight.shape[0])


def _no_grad_reason(info) -> list:
    if info["needs_grad"]:
        return ["a packed mask is served without gradients by the kernels, and an input requires grad "
                "(eager computes those gradients)"]
    return []


def _triton_reasons(info) -> list:
    why = dispatch.triton_reasons(info)
    if info["packed"]:
        why += _no_grad_reason(info)
    elif info["scores_dtype"] not in _KERNEL_SCORE_DTYPES:
        why.append(f"scores dtype {info['scores_dtype']} is not one of float16, bfloat16, float32")
    features = max(info["in_features"], info["out_features"])
    if features >= _KERNEL_MAX_FEATURES:
        why.append(f"{features} features >= {_KERNEL_MAX_FEATURES}: the kernels' int32 offsets inside a tile "
                   "would overflow")
    return why


_KERNEL_MAX_FEATURES = 1 << 22  # kernels/masked_linear.py MAX_FEATURES (not imported here: it imports triton)


def _cuda_serving_reasons(info, max_tokens=CUDA_MAX_TOKENS) -> list:
    why = []
    if not info["packed"]:
        why.append("the cuda kernel serves packed masks only (training from scores takes triton)")
    if info["n"] > max_tokens:
        why.append(f"{info['n']} tokens > {max_tokens}: the cuda kernel is for serving few tokens")
    if info["packed"]:
        why += _no_grad_reason(info)
    if why and info["device"].type != "cuda":
        return why + [f"inputs are on {info['device'].type}, the cuda backend needs CUDA tensors"]
    if why:
        return why  # do not load (or build) the extension for a call it could not take anyway
    why += dispatch.cuda_reasons(info, dtypes=_CUDA_DTYPES)
    if not why:
        from .. import _ext

        if not hasattr(_ext.load(), "masked_linear_packed"):
            why.append("pet_fast._C was built without masked_linear_packed (rebuild it)")
    return why


def _cuda_run(x, weight, scores, bias=None, threshold=0.0, packed_mask=None):
    y = torch.ops.pet_fast.masked_linear_packed(_as_2d(x), weight, packed_mask, bias, None, "cuda")
    return y.reshape(*x.shape[:-1], weight.shape[0])


dispatch.register(OP, "triton", _triton_run, _triton_reasons)
dispatch.register(OP, "cuda", _cuda_run, _cuda_serving_reasons)


# Auto's order of backends per call. A table of measured timings, when one exists, decides; it is a JSON
# file named by $PET_FAST_MASKED_LINEAR_TIMINGS, else pet_fast/ops/masked_linear_timings.json (none is
# shipped yet: `python benchmarks/bench_masked_linear.py --dispatch-table PATH` writes one from a GPU run):
#     {"rows": [{"packed": true, "n_max": 16, "order": ["cuda", "triton", "eager"]}, ...]}
# The first row with the call's `packed` and `n <= n_max` gives the order. Without a table (or when no
# row matches): packed masks with N <= 16 tokens go to cuda first (memory-bound GEMV-like serving, where
# the CUDA-core kernel reads the weight once), everything else to triton first (tensor cores).
TIMINGS_ENV = "PET_FAST_MASKED_LINEAR_TIMINGS"
DEFAULT_CUDA_FIRST_MAX_TOKENS = 16
_TIMINGS: dict = {}


def load_timings(path=None) -> Optional[list]:
    """(Re)read the measured-timings table; returns its rows, or None when there is no table."""
    def valid(rows):
        return isinstance(rows, list) and all(
            isinstance(r, dict) and {"packed", "n_max", "order"} <= set(r)
            and all(b in dispatch.BACKENDS for b in r["order"]) for r in rows)

    expected = "{'rows': [{'packed': bool, 'n_max': int, 'order': [backends]}, ...]}"
    rows, path = _timings.read_order_table(OP, TIMINGS_ENV, "rows", valid, expected, path)
    _TIMINGS.update(rows=rows, path=path)
    return rows


def preference(info) -> list:
    """Auto's order of backends for a call described by ``info`` (see the comment above)."""
    for row in _TIMINGS.get("rows") or ():
        if bool(row["packed"]) == bool(info["packed"]) and info["n"] <= row["n_max"]:
            return list(row["order"])
    if info["packed"] and info["n"] <= DEFAULT_CUDA_FIRST_MAX_TOKENS:
        return ["cuda", "triton", "eager"]
    return ["triton", "cuda", "eager"]


load_timings()
dispatch.set_preference(OP, preference)


# ---------------------------------------------------------------------------------------------------
# Mixed-task serving: one base weight, a stack of packed task masks, a task id per token.

OP_MULTITASK = "masked_linear_multitask"


def check_multitask_inputs(x, weight, packed_masks, task_ids, bias, validate_ids=True) -> None:
    _checks.tensor("x", x, min_ndim=1)
    _checks.tensor("weight", weight, ndim=2)
    out_f, in_f = weight.shape
    if x.shape[-1] != in_f:
        raise ValueError(f"x's last dimension must equal weight.shape[1] = {in_f}, got x of shape {tuple(x.shape)}")
    if not isinstance(packed_masks, torch.Tensor):
        raise TypeError(f"packed_masks must be a torch.Tensor, got {type(packed_masks).__name__}")
    if packed_masks.dim() != 3 or packed_masks.shape[0] < 1:
        raise ValueError("packed_masks must be a stack of T >= 1 packed masks of shape (T, out_features, "
                         f"ceil(in_features / 32)), got shape {tuple(packed_masks.shape)}")
    mask_packing.check_packed("packed_masks", packed_masks, (packed_masks.shape[0], out_f), in_f)
    if not isinstance(task_ids, torch.Tensor):
        raise TypeError(f"task_ids must be a torch.Tensor, got {type(task_ids).__name__}")
    if task_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"task_ids must have dtype int32 or int64, got {task_ids.dtype}")
    if tuple(task_ids.shape) != tuple(x.shape[:-1]):
        raise ValueError(f"task_ids must have shape {tuple(x.shape[:-1])} (one task per row of x), got {tuple(task_ids.shape)}")
    if bias is not None:
        _checks.tensor("bias", bias, ndim=1)
        _checks.shape("bias", bias, (out_f,))
    _checks.same_dtype("x", x, weight=weight, bias=bias)
    _checks.same_device("x", x, weight=weight, packed_masks=packed_masks, task_ids=task_ids, bias=bias)
    if validate_ids and task_ids.numel():
        lo, hi = int(task_ids.min()), int(task_ids.max())
        if lo < 0 or hi >= packed_masks.shape[0]:
            raise ValueError(f"task_ids must lie in [0, {packed_masks.shape[0]}) (the number of packed masks), "
                             f"got values in [{lo}, {hi}]")


def reference_multitask(x, weight, packed_masks, task_ids, bias=None):
    """Eager PyTorch: one ``F.linear`` per task present in the batch."""
    x2 = _as_2d(x)
    ids = task_ids.reshape(-1)
    y = x2.new_zeros((x2.shape[0], weight.shape[0]))
    for task in ids.unique().tolist():
        rows = (ids == task).nonzero().squeeze(1)
        w = weight * mask_packing.unpack_mask(packed_masks[task], weight.shape).to(weight.dtype)
        y = y.index_copy(0, rows, F.linear(x2.index_select(0, rows), w, bias))
    return y.reshape(*x.shape[:-1], weight.shape[0])


def describe_multitask(x, weight, packed_masks, task_ids, bias) -> dict:
    tensors = [t for t in (x, weight, bias) if t is not None]
    return _checks.info(x, packed=True, tasks=packed_masks.shape[0], n=x.numel() // max(x.shape[-1], 1),
                        in_features=weight.shape[1], out_features=weight.shape[0], bias=bias is not None,
                        needs_grad=torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


def _cuda_multitask_run(x, weight, packed_masks, task_ids, bias=None):
    y = torch.ops.pet_fast.masked_linear_packed(_as_2d(x), weight, packed_masks, bias, task_ids.reshape(-1), "cuda")
    return y.reshape(*x.shape[:-1], weight.shape[0])


dispatch.register(OP_MULTITASK, "eager", reference_multitask)
dispatch.register(OP_MULTITASK, "cuda", _cuda_multitask_run, _cuda_serving_reasons)


def masked_linear_multitask(x: torch.Tensor, weight: torch.Tensor, packed_masks: torch.Tensor, task_ids: torch.Tensor,
                            bias: Optional[torch.Tensor] = None, *, validate_ids: bool = True,
                            backend: Optional[str] = None) -> torch.Tensor:
    """Serve a batch that mixes tasks in one call: row ``i`` of ``x`` uses mask ``packed_masks[task_ids[i]]``.

    x (..., in_features); weight (out_features, in_features), shared by every task; packed_masks
    (T, out_features, ceil(in_features / 32)) int32, a stack of :func:`pet_fast.pack_mask` results;
    task_ids (x.shape[:-1]) int32/int64 in [0, T); bias (out_features,) or None. Gradients flow to x,
    weight and bias on the eager backend only. ``validate_ids=False`` skips the range check of the ids
    (which reads them on the host, a device synchronisation); out-of-range ids are then undefined.
    """
    check_multitask_inputs(x, weight, packed_masks, task_ids, bias, validate_ids)
    impl = dispatch.select(OP_MULTITASK, describe_multitask(x, weight, packed_masks, task_ids, bias), backend)
    return impl.run(x, weight, packed_masks, task_ids, bias)
