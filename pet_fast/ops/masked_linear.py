"""masked_linear: a linear layer whose weight is masked by learned scores (mask-tuning).

    y = x @ (weight * M).T + bias,   M = 1[scores > threshold]

Gradients (straight-through estimator for the hard threshold):
    dx       = dy @ (weight * M)
    d_scores = (dy^T x) * weight          (in scores' dtype)
    d_weight = (dy^T x) * M               (only when weight requires grad)
    d_bias   = dy summed over tokens

Contract
    x        (..., in_features) floating; leading dimensions are tokens (N may be 0)
    weight   (out_features, in_features), x's device; x's dtype, or float32 when x is float16/bfloat16
             (float32 master weights: the product is taken in x's dtype)
    scores   (out_features, in_features), any floating dtype (usually float32), x's device
    bias     (out_features,) or None, the weight's dtype
    threshold a real number
Under autocast the product runs in autocast's dtype, as ``F.linear``'s would (y has that dtype); the
gradients come back in their inputs' dtypes.
Instead of ``scores`` a call may pass ``packed_mask=`` (int32, (out_features, ceil(in_features / 32)),
from :func:`pet_fast.pack_mask`; layout in mask_packing.py): the mask for serving, 1 bit per weight,
with no gradient of its own. Exactly one of the two is required.
:func:`masked_linear_multitask` serves a batch that mixes tasks: one base weight, a stack of packed
masks, and a task id per token.

Backends
    eager   PyTorch; everything, CPU included.
    triton  training (scores): one Triton pass writes the masked weight W_eff = W * M in the GEMMs'
            dtype, cuBLAS runs y, dx and G = dy^T x, one Triton pass writes d_scores and d_weight from G
            (custom ops ``pet_fast::masked_linear`` and ``pet_fast::masked_linear_backward``). This
            writes the masked weight (weight-sized, in the GEMMs' dtype) once per call, departing from
            the plan of never writing it: the GEMMs that mask weight tiles in registers measured 2.5x
            slower than cuBLAS at the training shapes (H100, bf16; see the comment above the ops).
            Serving (packed_mask): kernels/masked_linear.py's GEMM that masks weight tiles in registers
            from the bits (``pet_fast::masked_linear_packed``). fp16/bf16/fp32; scores in fp16/bf16/fp32.
    cuda    csrc/masked_linear.cu: packed masks only, N <= 64 tokens, fp16/bf16, no gradients; also the
            multitask op.
Eager calls reach the custom ops' functions through autograd.Functions (ops/_autograd.py), compiled code
the custom ops themselves. Auto's order per call: a measured-timings table when one exists, else cuda
first for packed masks with N <= 16 tokens, triton first otherwise (see ``preference``).
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F

from .. import _ext, dispatch
from . import _autograd, _checks, _timings, mask_packing
from ._autocast import compute_dtype  # the GEMMs' dtype of a call

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
    if not (weight.dtype == x.dtype or (weight.dtype == torch.float32 and x.dtype in _HALF)):
        raise TypeError(f"weight must have the dtype of x ({x.dtype})" + (
            " or float32" if x.dtype in _HALF else "") + f", got {weight.dtype}")
    _checks.same_dtype("weight", weight, bias=bias)
    _checks.same_device("x", x, weight=weight, scores=scores, packed_mask=packed_mask, bias=bias)
    return _checks.real_number("threshold", threshold)


_HALF = (torch.float16, torch.bfloat16)


class _MaskedWeight(torch.autograd.Function):
    """Forward: ``W * 1[scores > threshold]``, zero where the mask is 0 (whatever W holds there), in one
    ``where``. Backward, with the straight-through estimator for the hard threshold: d_weight = grad * M,
    d_scores = grad * W in the scores' dtype."""

    @staticmethod
    def forward(ctx, weight, scores, threshold):
        keep = scores > threshold
        ctx.save_for_backward(keep if ctx.needs_input_grad[0] else None, weight if ctx.needs_input_grad[1] else None)
        ctx.scores_dtype = scores.dtype
        return torch.where(keep, weight, 0.0)

    @staticmethod
    def backward(ctx, grad):
        keep, weight = ctx.saved_tensors
        d_weight = torch.where(keep, grad, 0.0) if keep is not None else None
        d_scores = (grad * weight).to(ctx.scores_dtype) if weight is not None else None
        return d_weight, d_scores, None


def masked_weight(weight: torch.Tensor, scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """``weight * 1[scores > threshold]`` with straight-through gradients to ``scores`` (eager PyTorch)."""
    return _MaskedWeight.apply(weight, scores, threshold)


def reference(x, weight, scores, bias=None, threshold=0.0, packed_mask=None):
    """Eager PyTorch: masks the weight once, then ``F.linear``. Autograd gives the STE gradients (to x,
    weight and bias also with a packed mask, which itself has no gradient)."""
    if weight.dtype != x.dtype:  # float32 master weights with half-precision x: used in x's dtype
        weight, bias = weight.to(x.dtype), None if bias is None else bias.to(x.dtype)
    if packed_mask is not None:
        # zero where the mask is 0, whatever the weight holds there (inf or NaN too), as from scores
        w_eff = torch.where(mask_packing.unpack_mask(packed_mask, weight.shape).bool(), weight, 0.0)
    else:
        w_eff = masked_weight(weight, scores, threshold)
    return F.linear(x, w_eff, bias)


def describe(x, weight, scores, bias, packed_mask=None) -> dict:
    """What the dispatcher sees of a (validated) call."""
    tensors = [t for t in (x, weight, scores, bias) if t is not None]
    return _checks.info(x, dtype=compute_dtype(x), x_dtype=x.dtype,
                        scores_dtype=None if scores is None else scores.dtype, packed=packed_mask is not None,
                        n=x.numel() // max(x.shape[-1], 1), in_features=weight.shape[1],
                        out_features=weight.shape[0], bias=bias is not None, weight_grad=weight.requires_grad,
                        needs_grad=_checks.needs_grad(*tensors))


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
    threshold, impl = _plan(x, weight, scores, bias, threshold, packed_mask, backend)
    return impl.run(x, weight, scores, bias, threshold=threshold, packed_mask=packed_mask)


def _plan(x, weight, scores, bias, threshold, packed_mask, backend) -> tuple:
    """(checked threshold, implementation) of a call, from dispatch's call plans."""
    def resolve():
        return check_inputs(x, weight, scores, bias, threshold, packed_mask), describe(x, weight, scores, bias, packed_mask)

    # the description reads autocast's state (compute_dtype): part of the signature
    sig = _checks.signature(x, weight, scores, bias, threshold, packed_mask)
    if sig is not None:
        sig += (compute_dtype(x),)
    return dispatch.plan(OP, sig, backend, resolve)


def backend_for(x, weight, scores=None, bias=None, *, threshold: float = 0.0, packed_mask=None,
                backend: Optional[str] = None) -> str:
    """The backend that :func:`masked_linear` runs this call on (checking the call as it would)."""
    return _plan(x, weight, scores, bias, threshold, packed_mask, backend)[1].backend


# ---------------------------------------------------------------------------------------------------
# Fused backends. Each is a torch.library custom op (a fake-tensor rule, and an autograd formula for the
# training op) so that torch.compile(fullgraph=True) captures it as one node; eager calls take the same
# functions through an autograd.Function (ops/_autograd.py: a custom op costs ~130 us of host time per
# call outside compiled code, an autograd.Function ~7 us). The implementations launch the Triton kernels
# on CUDA tensors (and on CPU tensors under TRITON_INTERPRET=1); on CPU tensors otherwise they compute
# the same formulas with PyTorch, so the ops are usable (and testable) everywhere.
#
# The training path (scores) departs from the "never write the masked weight": it writes
# W_eff = W * 1[scores > threshold] once per call, in the GEMMs' dtype, with one elementwise kernel, and
# hands every GEMM to cuBLAS:
#     forward   W_eff (Triton), y = x @ W_eff.T + b (F.linear)
#     backward  dx = dy @ W_eff, G = dy.T @ x (cuBLAS), then d_scores = G * W and d_weight = G * M in one
#               elementwise pass (Triton), d_bias = sum of dy
# because on an H100 (bf16, the training shapes) the in-register masking GEMMs of
# kernels/masked_linear.py measured 2.5x slower than cuBLAS when masking from the scores and ~15x slower
# still from packed bits (benchmarks/results/h100-2026-11-27b/call4), while the extra traffic here is one
# weight-sized write and read. W_eff is kept for the backward's dx rather than recomputed: recomputing
# reads W and the scores again (4 + 4 bytes per weight in fp32) and writes W_eff again, keeping it costs
# nothing but its memory until the backward, which is what autocast's F.linear keeps too (its cast copy
# of the weight). Under autocast the GEMMs run in autocast's dtype, as F.linear's would: W_eff is written
# in that dtype straight from the (float32) weight, x is cast once, and that cast is kept for G.

_KERNEL_SCORE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_CUDA_DTYPES = (torch.float16, torch.bfloat16)
CUDA_MAX_TOKENS = 64  # the cuda serving kernel keeps one accumulator per token in registers


def _kernels_run_on(t: torch.Tensor) -> bool:
    return t.is_cuda or dispatch.triton_interpreting()


@functools.cache  # imported once: no import statement per launch
def _kernels():
    from ..kernels import masked_linear as kernels  # imports triton: only when a kernel runs

    return kernels


def _masked_weight(weight, scores, threshold, dtype):
    if _kernels_run_on(weight):
        return _kernels().masked_weight(weight, scores, threshold, dtype)
    return torch.where(scores > threshold, weight, 0.0).to(dtype)


def _train_forward(x: torch.Tensor, weight: torch.Tensor, scores: torch.Tensor, bias: Optional[torch.Tensor],
                   threshold: float, dtype: Optional[torch.dtype] = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, W_eff, x_c): y (..., out) = x_c @ W_eff.T + bias in ``dtype`` (default x's), W_eff the masked
    weight and x_c x in that dtype, both kept for the backward (x_c is empty when x already has it:
    outputs of a custom op must not alias its inputs). W_eff is written to memory (one Triton pass), not
    masked inside the GEMM: see the comment above for the measurements behind that choice."""
    dtype = dtype or x.dtype
    w_eff = _masked_weight(weight, scores, threshold, dtype)
    x_c = x.to(dtype)
    y = F.linear(x_c, w_eff, None if bias is None else bias.to(dtype))
    return y, w_eff, (x_c if x_c is not x else x.new_empty((0,), dtype=dtype))


def _train_forward_fake(x, weight, scores, bias, threshold, dtype=None):
    dtype = dtype or x.dtype
    return (x.new_empty((*x.shape[:-1], weight.shape[0]), dtype=dtype), weight.new_empty(weight.shape, dtype=dtype),
            x.new_empty(x.shape if dtype != x.dtype else (0,), dtype=dtype))


def _train_backward(dy: torch.Tensor, x_c: torch.Tensor, w_eff: Optional[torch.Tensor], weight: torch.Tensor,
                    scores: torch.Tensor, threshold: float, x_dtype: torch.dtype, bias_dtype: torch.dtype,
                    input_grad: bool, scores_grad: bool, weight_grad: bool, bias_grad: bool
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, d_scores, d_weight, d_bias) for dy (..., out); the ones not asked for are empty tensors."""
    def empty(dtype):  # a fresh tensor each: outputs of a custom op must not alias each other
        return dy.new_empty((0,), dtype=dtype)

    dx = torch.matmul(dy, w_eff).to(x_dtype) if input_grad else empty(x_dtype)
    ds = dw = None
    if scores_grad or weight_grad:
        g = _as_2d(dy).t() @ _as_2d(x_c)  # (out, in) in the GEMMs' dtype
        if _kernels_run_on(g):
            ds_, dw_ = _kernels().mask_grads(g, weight, scores, threshold, scores_dtype=scores.dtype,
                                             weight_grad=weight_grad)
        else:
            gf = g.float()
            ds_ = (gf * weight).to(scores.dtype)
            dw_ = torch.where(scores > threshold, gf, 0.0).to(weight.dtype) if weight_grad else None
        ds = ds_ if scores_grad else None
        dw = dw_ if weight_grad else None
    db = _as_2d(dy).sum(0, dtype=bias_dtype) if bias_grad else empty(bias_dtype)
    return dx, (ds if ds is not None else empty(scores.dtype)), (dw if dw is not None else empty(weight.dtype)), db


def _train_backward_fake(dy, x_c, w_eff, weight, scores, threshold, x_dtype, bias_dtype, input_grad, scores_grad,
                         weight_grad, bias_grad):
    def maybe(flag, shape, dtype):
        return dy.new_empty(shape if flag else (0,), dtype=dtype)

    return (maybe(input_grad, (*dy.shape[:-1], weight.shape[1]), x_dtype),
            maybe(scores_grad, weight.shape, scores.dtype), maybe(weight_grad, weight.shape, weight.dtype),
            maybe(bias_grad, (weight.shape[0],), bias_dtype))


def _train_setup_context(ctx, inputs, output):
    x, weight, scores, bias, threshold, dtype = inputs
    y, w_eff, x_c = output
    ctx.mark_non_differentiable(w_eff, x_c)
    ctx.set_materialize_grads(False)  # else autograd hands the backward a zero tensor the size of W_eff
    need_x, need_w, need_s = ctx.needs_input_grad[:3]
    x_kept = (x if x.dtype == y.dtype else x_c) if (need_w or need_s) else None  # x in the GEMMs' dtype
    ctx.save_for_backward(x_kept, w_eff if need_x else None, weight, scores)
    ctx.threshold = threshold
    ctx.x_dtype = x.dtype
    ctx.bias_dtype = None if bias is None else bias.dtype


def _train_grad(ctx, dy, _dw_eff, _dx_c):
    x_c, w_eff, weight, scores = ctx.saved_tensors
    need_x, need_w, need_s, need_b = ctx.needs_input_grad[:4]
    need_b = bool(need_b and ctx.bias_dtype is not None)
    if dy is None or not (need_x or need_w or need_s or need_b):  # dy: grads are not materialized
        return None, None, None, None, None, None
    if x_c is None:  # not kept (neither scores nor weight needed a gradient at the forward)
        x_c = weight.new_empty((0, weight.shape[1]), dtype=dy.dtype)
    dx, ds, dw, db = TRAIN_BACKWARD.within(ctx)(
        dy, x_c, w_eff, weight, scores, ctx.threshold, ctx.x_dtype, ctx.bias_dtype or dy.dtype, need_x, need_s,
        need_w, need_b)
    return (dx if need_x else None, dw if need_w else None, ds if need_s else None, db if need_b else None, None, None)


TRAIN_BACKWARD = _autograd.custom_op("masked_linear_backward", _train_backward, fake=_train_backward_fake)
TRAIN = _autograd.custom_op("masked_linear", _train_forward, fake=_train_forward_fake,
                            autograd=(_train_grad, _train_setup_context))


def _packed(x: torch.Tensor, weight: torch.Tensor, packed: torch.Tensor, bias: Optional[torch.Tensor],
            task_ids: Optional[torch.Tensor], kernel: str) -> torch.Tensor:
    """Inference from packed bits: x (M, K); packed (N, W) or, with task_ids (M,), a stack (T, N, W).
    ``kernel`` is "cuda" (pet_fast._C), "triton" (single mask only) or "eager"."""
    if kernel == "cuda":
        ext = _ext.load()
        if ext is None:
            raise RuntimeError(f"pet_fast._C is not available: {_ext.reason()}")
        return ext.masked_linear_packed(x, weight, packed, bias, task_ids)
    if kernel == "triton" and task_ids is None and _kernels_run_on(x):
        return _kernels().forward(x, weight, bits=packed, bias=bias)
    if task_ids is None:
        return reference(x, weight, None, bias, packed_mask=packed)
    return reference_multitask(x, weight, packed, task_ids, bias)


def _packed_fake(x, weight, packed, bias, task_ids, kernel):
    return x.new_empty((x.shape[0], weight.shape[0]))


PACKED = _autograd.custom_op("masked_linear_packed", _packed, fake=_packed_fake)


def _as_2d(x):
    if x.dim() == 2:
        return x  # (a reshape is a view op: microseconds of host time in a call bound by the host)
    n = 1
    for d in x.shape[:-1]:
        n *= d
    return x.reshape(n, x.shape[-1])


def _serving_args(x, weight, bias):
    """x (flattened to 2-D), weight and bias in the dtype the serving kernels compute in (they take one)."""
    dtype = compute_dtype(x)
    cast = lambda t: t if (t is None or t.dtype == dtype) else t.to(dtype)
    return cast(_as_2d(x)), cast(weight), cast(bias)


def _triton_run(x, weight, scores, bias=None, threshold=0.0, packed_mask=None):
    if packed_mask is None:
        return TRAIN(x, weight, scores, bias, threshold, compute_dtype(x))[0]
    x2, w, b = _serving_args(x, weight, bias)
    return _unflatten(PACKED(x2, w, packed_mask, b, None, "triton"), x)


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
    if info["packed"] and features >= _KERNEL_MAX_FEATURES:
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
        if not hasattr(_ext.load(), "masked_linear_packed"):
            why.append("pet_fast._C was built without masked_linear_packed (rebuild it)")
    return why


def _cuda_run(x, weight, scores, bias=None, threshold=0.0, packed_mask=None):
    x2, w, b = _serving_args(x, weight, bias)
    y = PACKED(x2, w, packed_mask, b, None, "cuda")
    return _unflatten(y, x)


def _unflatten(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The (M, N) output of a call on x flattened to rows, in x's leading shape."""
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], y.shape[-1])


dispatch.register(OP, "triton", _triton_run, _triton_reasons)
dispatch.register(OP, "cuda", _cuda_run, _cuda_serving_reasons)


# Auto's order of backends per call. A table of measured timings, when one exists, decides; it is a JSON
# file named by $PET_FAST_MASKED_LINEAR_TIMINGS, else pet_fast/ops/masked_linear_timings.json (shipped:
# the serving and training rows of an H100 run, benchmarks/results/h100-2026-11-27c/call1; `python
# benchmarks/bench_masked_linear.py --dispatch-table PATH` writes one from a GPU run, with rows for
# training calls too, ordered by their forward + backward):
#     {"rows": [{"packed": true, "n_max": 16, "order": ["cuda", "triton", "eager"]},
#               {"packed": false, "n_max": 4096, "order": ["triton", "eager"]}, ...]}
# The first row with the call's `packed` and `n <= n_max` gives the order; a call above every such row takes
# the largest one's (measured nearest). Without a table (or without a row of the call's kind): packed masks
# with N <= 16 tokens go to cuda first (memory-bound GEMV-like serving, where
# the CUDA-core kernel reads the weight once), everything else to triton first (for scores: the training
# path of one masking pass, cuBLAS, one gradient pass).
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
    dispatch.clear_plans()  # remembered choices followed the old table
    return rows


def preference(info) -> list:
    """Auto's order of backends for a call described by ``info`` (see the comment above)."""
    rows = [r for r in _TIMINGS.get("rows") or () if bool(r["packed"]) == bool(info["packed"])]
    for row in rows:
        if info["n"] <= row["n_max"]:
            return list(row["order"])
    if rows:
        return list(max(rows, key=lambda r: r["n_max"])["order"])
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
    if validate_ids:
        check_task_ids(task_ids, packed_masks.shape[0])


def check_task_ids(task_ids: torch.Tensor, tasks: int) -> None:
    """The ids' values in [0, tasks): reads them on the host (a device synchronisation)."""
    if task_ids.numel():
        lo, hi = int(task_ids.min()), int(task_ids.max())
        if lo < 0 or hi >= tasks:
            raise ValueError(f"task_ids must lie in [0, {tasks}) (the number of packed masks), "
                             f"got values in [{lo}, {hi}]")


def reference_multitask(x, weight, packed_masks, task_ids, bias=None):
    """Eager PyTorch: one ``F.linear`` per task present in the batch."""
    x2 = _as_2d(x)
    ids = task_ids.reshape(-1)
    y = x2.new_zeros((x2.shape[0], weight.shape[0]))
    for task in ids.unique().tolist():
        rows = (ids == task).nonzero().squeeze(1)
        w = torch.where(mask_packing.unpack_mask(packed_masks[task], weight.shape).bool(), weight, 0.0)
        y = y.index_copy(0, rows, F.linear(x2.index_select(0, rows), w, bias))
    return y.reshape(*x.shape[:-1], weight.shape[0])


def describe_multitask(x, weight, packed_masks, task_ids, bias) -> dict:
    """What the dispatcher sees of a (validated) multitask call."""
    tensors = [t for t in (x, weight, bias) if t is not None]
    return _checks.info(x, packed=True, tasks=packed_masks.shape[0], n=x.numel() // max(x.shape[-1], 1),
                        in_features=weight.shape[1], out_features=weight.shape[0], bias=bias is not None,
                        needs_grad=_checks.needs_grad(*tensors))


def _cuda_multitask_run(x, weight, packed_masks, task_ids, bias=None):
    ids = task_ids if task_ids.dim() == 1 else task_ids.reshape(-1)
    return _unflatten(PACKED(_as_2d(x), weight, packed_masks, bias, ids, "cuda"), x)


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
    def resolve():
        check_multitask_inputs(x, weight, packed_masks, task_ids, bias, validate_ids=False)
        return None, describe_multitask(x, weight, packed_masks, task_ids, bias)

    # the checks and the choice read only what the signature holds (a serving step calls this per linear,
    # with the same facts every time); the ids' values, when asked for, are checked on every call
    _, impl = dispatch.plan(OP_MULTITASK, _checks.signature(x, weight, packed_masks, task_ids, bias), backend, resolve)
    if validate_ids:
        check_task_ids(task_ids, packed_masks.shape[0])
    return impl.run(x, weight, packed_masks, task_ids, bias)
