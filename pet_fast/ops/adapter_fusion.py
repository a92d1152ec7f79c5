"""adapter_fusion: AdapterFusion's attention over the outputs of k adapters (AdapterHub semantics).

For every token, with query q (the layer output the adapters read) and the k adapter outputs
v_1..v_k (each adapter's scaled up-projection, before any residual):

    if residual_before:   v_j <- v_j + residual          (keys and values both see it)
    Q   = q @ w_query.T + b_query          (or q itself when w_query is None)
    K_j = v_j @ w_key.T + b_key            (or v_j when w_key is None)
    V_j = v_j @ w_value.T (+ b_value)      (when w_value is given and value_before_softmax, else v_j)
    p   = softmax_j(<Q, K_j> / temperature)          (computed in float32 for low precision)
    out = sum_j p_j V_j
    if w_value is given and not value_before_softmax:  out <- out @ w_value.T (+ b_value)
    if not residual_before:  out <- out + residual

This is the forward of AdapterHub's ``BertFusion`` with its attention dropout off (dropout belongs to
the module) and ``T`` passed in as ``temperature``. ``stacked_adapter_fusion`` computes the k adapter
outputs as well, from stacked adapter weights, so a fused backend never stores them.

Contract (adapter_fusion)
    query     (..., d);  values (..., k, d), k >= 1;  residual (..., d)
    w_query, w_key, w_value  (d, d) or None;  b_query, b_key, b_value  (d,) or None (a bias needs its weight)
    temperature  > 0
    score_mask (..., k) or None: multiplies each score before the temperature, p = softmax_j(m_j <Q, K_j> / T).
    Dropout on the scores (AdapterHub's, in training) is the mask of a dropout of ones: 0 or 1 / (1 - p_drop).
    Any floating dtype (the kernels read it as float32); it is not differentiated. With a mask, the score
    terms shared by the adapters (the key bias's <Q, b_key>, a residual added before the fusion's) no
    longer cancel in the softmax: every backend computes them.
    score_shift (...,) or None: a number added to every adapter's score of its token, before the mask
    (differentiated): with the stacked op's folded product, which drops the key bias's term, a score mask needs
    that term given here, <Q, b_key> = query @ (w_query.T @ b_key) + b_query @ b_key. Without a mask it cancels.
Contract (stacked_adapter_fusion), in addition
    x (..., d) the adapters' input; w_down (k, r, d); b_down (k, r) or None; w_up (k, d, r);
    b_up (k, d) or None; scaling a number or a tensor of shape (k,); activation as for bottleneck_adapter.
    Adapters with different bottleneck sizes are stacked by padding with zero rows/columns (all
    supported activations map 0 to 0, so the padding changes nothing).
    w_query_key (d, d) and b_query_key (d,) or None: the query and key projections folded into one product,
    in place of w_query, b_query, w_key and b_key (none of which may be given with them): the scores are
    <query @ w_query_key + b_query_key, v_j>, which equals <Q, K_j> up to the key bias's term (the same for
    every adapter: it cancels in the softmax) for w_query_key = w_query.T @ w_key and b_query_key =
    b_query @ w_key. A training step folds them once for all layers (methods/fusion.py): one d x d product
    per token instead of two, forward and backward.
All tensors share query's device and dtype, except that with fp16/bf16 tensors and residual_before=False the
residual may be float32: it is then added to the fused output in float32, and the output is float32 (as
eager PyTorch under autocast gives it, where a float32 residual stream meets half-precision products).

Under autocast, with inputs not in the autocast dtype, every backend computes as eager PyTorch does
there: the products in the autocast dtype, float32 leaves getting float32 gradients (the triton backends
cast the inputs once and run with autocast off; see "Autocast" below).

Backends: eager (``reference`` / ``stacked_reference``) and triton (kernels/stacked_adapter_fusion.py and kernels/adapter_fusion.py, fp32/fp16/
bf16, k <= 64, and r <= 256 for the stacked op). The triton backends rewrite the projections exactly:
score_j = <Q @ Wk, v_j> (the key bias is the same for every adapter and cancels in the softmax; with a
score mask, whose products keep it from cancelling, the stacked op adds that shared term t0 in its kernels) and,
since the probabilities sum to one, the value projection and a residual added before the softmax move
outside the weighted sum. The kernels compute sum_j softmax_j(<qk, v_j>/T) v_j (the stacked one from x
and the adapter weights, never writing the k adapter outputs); the d x d projections run as matmuls
around them. For fp16/bf16 the stacked backend keeps qk and the gradient of ctx in fp32, which the
precision rule needs (see the comment above its custom ops). Both are torch.library custom ops with
autograd, so torch.compile captures them whole; eager calls take the same formulas through
autograd.Functions (ops/_autograd.py: far less host time per call).
"""
from __future__ import annotations

import contextlib
import functools
import threading
import weakref
from typing import List, Optional, Union

import torch
import torch.nn.functional as F

from .. import dispatch
from . import _autograd, _checks, _replayed, _timings, activations
from ._autocast import compute_dtype

OP = "adapter_fusion"
OP_STACKED = "stacked_adapter_fusion"
HALF = (torch.float16, torch.bfloat16)


def _check_projection(name_w, w, name_b, b, d):
    if w is not None:
        _checks.tensor(name_w, w, ndim=2)
        _checks.shape(name_w, w, (d, d), "(d, d)")
    if b is not None:
        if w is None:
            raise ValueError(f"{name_b} was given without {name_w}")
        _checks.tensor(name_b, b, ndim=1)
        _checks.shape(name_b, b, (d,))


def check_query_key(query, w_query_key, b_query_key, w_query, b_query, w_key, b_key):
    """The folded query-key product's arguments (see the contract)."""
    if w_query_key is None:
        if b_query_key is not None:
            raise ValueError("b_query_key was given without w_query_key")
        return
    given = [n for n, t in (("w_query", w_query), ("b_query", b_query), ("w_key", w_key), ("b_key", b_key)) if t is not None]
    if given:
        raise ValueError(f"w_query_key replaces the query and key projections: do not pass {', '.join(given)} with it")
    _check_projection("w_query_key", w_query_key, "b_query_key", b_query_key, query.shape[-1])
    _checks.same_device("query", query, w_query_key=w_query_key, b_query_key=b_query_key)
    _checks.same_dtype("query", query, w_query_key=w_query_key, b_query_key=b_query_key)


def check_score_mask(query, score_mask, k, score_shift=None):
    """The score mask's shape (query's leading dims, k), device and dtype (floating); the score shift's shape
    (query's leading dims), device and dtype (query's)."""
    if score_mask is not None:
        _checks.tensor("score_mask", score_mask)
        want = tuple(query.shape[:-1]) + (k,)
        _checks.shape("score_mask", score_mask, want, f"query's leading dims and k = {k}")
        _checks.same_device("query", query, score_mask=score_mask)
    if score_shift is not None:
        _checks.tensor("score_shift", score_shift)
        _checks.shape("score_shift", score_shift, tuple(query.shape[:-1]), "query's leading dims")
        _checks.same_device("query", query, score_shift=score_shift)
        _checks.same_dtype("query", query, score_shift=score_shift)


def check_fusion(query, values, residual, w_query, b_query, w_key, b_key, w_value, b_value, temperature, values_name="values",
                 residual_before=False):
    _checks.tensor("query", query, min_ndim=1)
    d = query.shape[-1]
    lead = tuple(query.shape[:-1])
    if values is not None:
        _checks.tensor(values_name, values, min_ndim=2)
        if tuple(values.shape[:-2]) != lead or values.shape[-1] != d or values.shape[-2] < 1:
            raise ValueError(f"{values_name} must have shape (..., k, d) = {lead + ('k', d)} with k >= 1, got {tuple(values.shape)}")
    _checks.tensor("residual", residual)
    _checks.shape("residual", residual, query.shape, "the shape of query")
    _check_projection("w_query", w_query, "b_query", b_query, d)
    _check_projection("w_key", w_key, "b_key", b_key, d)
    _check_projection("w_value", w_value, "b_value", b_value, d)
    temperature = _checks.real_number("temperature", temperature, positive=True)
    others = {values_name: values, "residual": residual, "w_query": w_query, "b_query": b_query,
              "w_key": w_key, "b_key": b_key, "w_value": w_value, "b_value": b_value}
    _checks.same_device("query", query, **others)
    if residual.dtype == torch.float32 and query.dtype in HALF and not residual_before:
        others.pop("residual")  # float32 residual added after the fusion (see the contract)
    elif residual.dtype != query.dtype:
        raise TypeError(f"residual must have the dtype of query ({query.dtype})" + (
            " or, with residual_before=False, float32" if query.dtype in HALF else "") + f", got {residual.dtype}")
    _checks.same_dtype("query", query, **others)
    return temperature


def _probabilities(scores, dtype, temperature, score_shift=None, score_mask=None):
    """softmax_j((scores + shift) * mask / T) in float32 (float64 for float64), returned in ``dtype``."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    scores = scores.to(acc)
    if score_shift is not None:
        scores = scores + score_shift.to(acc).unsqueeze(-1)
    if score_mask is not None:
        scores = scores * score_mask.detach().to(acc)
    return torch.softmax(scores / temperature, dim=-1).to(dtype)


def reference(query, values, residual, w_query=None, b_query=None, w_key=None, b_key=None, w_value=None,
              b_value=None, temperature=1.0, residual_before=False, value_before_softmax=True, w_query_key=None,
              b_query_key=None, score_mask=None, score_shift=None):
    """Eager PyTorch, differentiable through autograd (but for ``score_mask``, which the contract does not
    differentiate)."""
    if residual_before:
        values = values + residual.unsqueeze(-2)
    if w_query_key is not None:  # the folded product (contract): the keys are the values themselves
        q = torch.matmul(query, w_query_key)
        q = q + b_query_key if b_query_key is not None else q
        keys = values
    else:
        q = F.linear(query, w_query, b_query) if w_query is not None else query
        keys = F.linear(values, w_key, b_key) if w_key is not None else values
    project_first = w_value is not None and value_before_softmax
    vals = F.linear(values, w_value, b_value) if project_first else values
    scores = torch.matmul(keys, q.unsqueeze(-1)).squeeze(-1)  # (..., k)
    probs = _probabilities(scores, query.dtype, temperature, score_shift, score_mask)
    out = torch.matmul(probs.unsqueeze(-2), vals).squeeze(-2)
    if w_value is not None and not value_before_softmax:
        out = F.linear(out, w_value, b_value)
    if not residual_before:
        out = out + residual
    return out


def stacked_adapter_outputs(x, w_down, b_down, w_up, b_up, activation="relu", scaling=1.0):
    """(..., k, d): each adapter's ``scaling_j * (act(x @ w_down[j].T + b_down[j]) @ w_up[j].T + b_up[j])``."""
    h = torch.einsum("...d,krd->...kr", x, w_down)
    if b_down is not None:
        h = h + b_down
    h = activations.apply(activations.canonical(activation), h)
    up = torch.einsum("...kr,kdr->...kd", h, w_up)
    if b_up is not None:
        up = up + b_up
    if isinstance(scaling, torch.Tensor):
        return up * scaling.unsqueeze(-1)
    return up * scaling


def masked_eager(query, values, residual, w_query=None, b_query=None, w_key=None, b_key=None, w_value=None,
                 b_value=None, temperature=1.0, residual_before=False, value_before_softmax=True, w_query_key=None,
                 b_query_key=None, score_mask=None, score_shift=None):
    """:func:`reference`'s values for a call with a score mask, computed as the fused backends compute them:
    <Q, v_j Wk^T + bk> = <Q Wk, v_j> + <Q, bk>, and since the probabilities sum to one, sum_j p_j (v_j Wv^T + bv)
    = (sum_j p_j v_j) Wv^T + bv. The k keys and k projected values per token (two (..., k, d) tensors, each
    kept for the backward) are never formed: autograd keeps the adapter outputs once, Q Wk and the weighted
    sum (d per token each). The eager path of masked calls (dropout on the scores in training)."""
    if residual_before:
        values = values + residual.unsqueeze(-2)
    if w_query_key is not None:
        qk = torch.matmul(query, w_query_key)
        qk = qk + b_query_key if b_query_key is not None else qk
    else:
        q = F.linear(query, w_query, b_query) if w_query is not None else query
        qk = torch.matmul(q, w_key) if w_key is not None else q
    scores = torch.matmul(values, qk.unsqueeze(-1)).squeeze(-1)
    if w_query_key is None and w_key is not None and b_key is not None:
        scores = scores + (q * b_key).sum(-1, keepdim=True)  # the same for every adapter (AdapterHub's key bias)
    probs = _probabilities(scores, query.dtype, temperature, score_shift, score_mask)
    out = torch.matmul(probs.unsqueeze(-2), values).squeeze(-2)
    if w_value is not None:  # before or after the softmax: the same map (see above)
        out = F.linear(out, w_value, b_value)
    return out if residual_before else out + residual


def stacked_reference(x, query, residual, w_down, b_down, w_up, b_up, activation="relu", scaling=1.0, **fusion):
    """The contract's definition: the adapter outputs, then :func:`reference`."""
    values = stacked_adapter_outputs(x, w_down, b_down, w_up, b_up, activation, scaling)
    return reference(query, values, residual, **fusion)


def stacked_eager(x, query, residual, w_down, b_down, w_up, b_up, activation="relu", scaling=1.0, **fusion):
    """The eager backend: the adapter outputs, then :func:`given_eager`."""
    values = stacked_adapter_outputs(x, w_down, b_down, w_up, b_up, activation, scaling)
    return given_eager(query, values, residual, **fusion)


def describe(query, k, **extra) -> dict:
    """What the dispatcher sees of a (validated) call of either fusion op."""
    return _checks.info(query, d=query.shape[-1], k=k, n=query.numel() // max(query.shape[-1], 1), **extra)


def given_eager(query, values, residual, **fusion):
    """The eager backend of adapter_fusion: :func:`reference`, but for calls with a score mask (dropout on the
    scores in training) :func:`masked_eager`, which keeps a third of what the definition keeps for the
    backward. (Calls without a mask keep the definition: it is the eager baseline of the precision rule and
    the benchmarks.)"""
    if fusion.get("score_mask") is None:
        return reference(query, values, residual, **fusion)
    return masked_eager(query, values, residual, **fusion)


dispatch.register(OP, "eager", given_eager)
dispatch.register(OP_STACKED, "eager", stacked_eager)


def adapter_fusion(
    query: torch.Tensor,
    values: torch.Tensor,
    residual: torch.Tensor,
    *,
    w_query: Optional[torch.Tensor] = None,
    b_query: Optional[torch.Tensor] = None,
    w_key: Optional[torch.Tensor] = None,
    b_key: Optional[torch.Tensor] = None,
    w_value: Optional[torch.Tensor] = None,
    b_value: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    residual_before: bool = False,
    value_before_softmax: bool = True,
    score_mask: Optional[torch.Tensor] = None,
    score_shift: Optional[torch.Tensor] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """AdapterFusion over given adapter outputs ``values (..., k, d)``; see the module docstring."""
    def resolve():
        t = check_fusion(query, values, residual, w_query, b_query, w_key, b_key, w_value, b_value, temperature,
                         residual_before=residual_before)
        check_score_mask(query, score_mask, values.shape[-2], score_shift)
        requires_grad = _checks.needs_grad(query, values, residual, w_query, b_query, w_key, b_key, w_value, b_value,
                                           score_shift)
        return t, describe(query, values.shape[-2], requires_grad=requires_grad)

    sig = _checks.signature(query, values, residual, w_query, b_query, w_key, b_key, w_value, b_value, temperature,
                            bool(residual_before), score_mask, score_shift)
    temperature, impl = dispatch.plan(OP, sig, backend, resolve)
    return impl.run(query, values, residual, w_query=w_query, b_query=b_query, w_key=w_key, b_key=b_key,
                    w_value=w_value, b_value=b_value, temperature=temperature,
                    residual_before=bool(residual_before), value_before_softmax=bool(value_before_softmax),
                    score_mask=score_mask, score_shift=score_shift)


def check_stacked(x, query, w_down, b_down, w_up, b_up, activation, scaling):
    _checks.tensor("x", x, min_ndim=1)
    _checks.shape("x", x, query.shape, "the shape of query")
    _checks.tensor("w_down", w_down, ndim=3)
    _checks.tensor("w_up", w_up, ndim=3)
    k, r, d = w_down.shape
    if d != x.shape[-1] or k < 1 or r < 1:
        raise ValueError(f"w_down must have shape (k, r, d) with k, r >= 1 and d = {x.shape[-1]}, got {tuple(w_down.shape)}")
    _checks.shape("w_up", w_up, (k, d, r), "(k, d, r) to match w_down")
    if b_down is not None:
        _checks.tensor("b_down", b_down, ndim=2)
        _checks.shape("b_down", b_down, (k, r))
    if b_up is not None:
        _checks.tensor("b_up", b_up, ndim=2)
        _checks.shape("b_up", b_up, (k, d))
    if isinstance(scaling, torch.Tensor):
        _checks.tensor("scaling", scaling)
        if tuple(scaling.shape) not in ((), (k,)):
            raise ValueError(f"scaling must be a number or a tensor of shape () or ({k},), got {tuple(scaling.shape)}")
    else:
        scaling = _checks.real_number("scaling", scaling)
    others = dict(x=x, w_down=w_down, b_down=b_down, w_up=w_up, b_up=b_up,
                  scaling=scaling if isinstance(scaling, torch.Tensor) else None)
    _checks.same_dtype("query", query, **others)
    _checks.same_device("query", query, **others)
    return activations.canonical(activation), scaling


def stacked_adapter_fusion(
    x: torch.Tensor,
    query: torch.Tensor,
    residual: torch.Tensor,
    w_down: torch.Tensor,
    b_down: Optional[torch.Tensor],
    w_up: torch.Tensor,
    b_up: Optional[torch.Tensor],
    *,
    activation: str = "relu",
    scaling: Union[float, torch.Tensor] = 1.0,
    w_query: Optional[torch.Tensor] = None,
    b_query: Optional[torch.Tensor] = None,
    w_key: Optional[torch.Tensor] = None,
    b_key: Optional[torch.Tensor] = None,
    w_value: Optional[torch.Tensor] = None,
    b_value: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    residual_before: bool = False,
    value_before_softmax: bool = True,
    w_query_key: Optional[torch.Tensor] = None,
    b_query_key: Optional[torch.Tensor] = None,
    score_mask: Optional[torch.Tensor] = None,
    score_shift: Optional[torch.Tensor] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """k stacked adapters on ``x`` and AdapterFusion over their outputs, in one op."""
    def resolve():
        _checks.tensor("query", query, min_ndim=1)
        act, s = check_stacked(x, query, w_down, b_down, w_up, b_up, activation, scaling)
        t = check_fusion(query, None, residual, w_query, b_query, w_key, b_key, w_value, b_value, temperature,
                         residual_before=residual_before)
        check_query_key(query, w_query_key, b_query_key, w_query, b_query, w_key, b_key)
        check_score_mask(query, score_mask, w_down.shape[0], score_shift)
        requires_grad = _checks.needs_grad(x, query, residual, w_down, b_down, w_up, b_up, w_query, b_query, w_key,
                                           b_key, w_value, b_value, w_query_key, b_query_key, score_shift,
                                           s if isinstance(s, torch.Tensor) else None)
        info = describe(query, w_down.shape[0], r=w_down.shape[1], activation=act, requires_grad=requires_grad)
        # a plan keeps no tensor: a scaling tensor is this call's own, a number is the checked float
        return (act, None if isinstance(s, torch.Tensor) else s, t), info

    sig = _checks.signature(x, query, residual, w_down, b_down, w_up, b_up, activation, scaling, w_query, b_query,
                            w_key, b_key, w_value, b_value, temperature, bool(residual_before), w_query_key, b_query_key,
                            score_mask, score_shift)
    (activation, number, temperature), impl = dispatch.plan(OP_STACKED, sig, backend, resolve)
    scaling = scaling if number is None else number
    return impl.run(x, query, residual, w_down, b_down, w_up, b_up, activation=activation, scaling=scaling,
                    w_query=w_query, b_query=b_query, w_key=w_key, b_key=b_key, w_value=w_value, b_value=b_value,
                    temperature=temperature, residual_before=bool(residual_before),
                    value_before_softmax=bool(value_before_softmax), w_query_key=w_query_key, b_query_key=b_query_key,
                    score_mask=score_mask, score_shift=score_shift)


# ---------------------------------------------------------------------------------------------------
# Fused triton backend of stacked_adapter_fusion.
#
# With qk = Q @ Wk (Q = query @ Wq.T + bq, or query), <Q, Wk v_j + bk> = <qk, v_j> + <Q, bk>, and the
# second term is the same for every adapter, so it cancels in the softmax. The probabilities sum to
# one, so sum_j p_j (Wv (v_j + res) + bv) = Wv (sum_j p_j v_j + res) + bv whether the value projection
# comes before or after the softmax. The kernel computes ctx = sum_j softmax_j(<qk, v_j>/T) v_j from x
# and the stacked adapter weights; the d x d projections and residual adds are cuBLAS/PyTorch ops
# around it, differentiated by autograd, except the value projection, which the core op applies
# itself when there is one (see _core_grad).
#
# Precision of the gradient of ctx. Autograd hands a tensor a gradient of its own dtype, so with ctx
# in fp16/bf16 and the value projection outside the op, dctx = dy @ Wv arrived rounded to the low
# precision. Every gradient the kernel reduces over tokens and d from it carried that rounding,
# d_scaling above all: sum over n, j, c of dctx * v_j, a sum with cancellation whose rounding noise
# is relative to its terms, not to its value. Eager PyTorch rounds the same gradient, but its error
# in that sum moves with its other roundings, and the rule compares case by case (property test:
# k=1, r=2, d=7, swish, per-adapter scaling, value projection after the softmax, fp16: d_scaling
# error 1.8e-3 against eager's 1.3e-4; 1.3e-4 with dctx in fp32). So the core op takes the
# value projection (and the residual added before it) and its backward forms dctx = dy @ Wv in
# fp32, which the kernels read as such; the forward is unchanged (ctx, the projection's input and
# its output in the input dtype, as in eager).
#
# Precision of qk. Rounded to fp16/bf16, qk = Q @ Wk puts an error relative to |qk| |v_j| into every
# score, which the softmax backward passes on to the gradients of query, Wq, Wk, x and Wd (random
# fp16 cases: up to 1.2x the bound of the rule, against at most 0.7x with qk in fp32); eager PyTorch
# never forms qk. So for low precision qk is a matmul with an fp32 result (_qk_f32: tensor
# cores where torch can write fp32 from fp16/bf16 operands); the kernels read it as fp32 and return
# dqk in fp32, which its backward rounds once to the input dtype for the two matmuls, as before.
# The core op takes Q and Wk and forms that fp32 qk itself (the same function, so the same bits), and
# again in its backward: it keeps Q (N x d in the input dtype, which Wk's gradient needs anyway) and not
# the fp32 qk (N x d x 4 bytes per layer of a training step), as the C++ node does.


#
# Autocast. The eager reference under autocast runs its matmuls in the autocast dtype with float32
# inputs (F.linear / matmul / einsum cast them), so the fused backends do the same, explicitly: a call
# under autocast whose inputs are not in the autocast dtype casts them once (tensors that take part in
# the products; the residual added after the fusion keeps its dtype, as eager adds it) and runs the
# fused path with autocast off. Inside, every custom op sees inputs of one dtype, and its output and
# gradients have the dtypes its fake rule states (an F.linear that autocast rounded inside the core op
# made its output bf16 with a float32 input saved for dWv, and the backward's matmul failed). The casts
# are differentiable: float32 master weights get float32 gradients, as under autocast.
#
# Eager calls reach the custom ops' formulas through autograd.Functions (see ops/_autograd.py): the
# custom ops, with their fake rules, are what torch.compile sees.


@functools.cache  # imported once: no import statement per launch
def _attention_kernels():
    from ..kernels import adapter_fusion as kernels

    return kernels


@functools.cache  # imported once: no import statement per launch
def _stacked_kernels():
    from ..kernels import stacked_adapter_fusion as kernels

    return kernels


def _no_autocast(device_type: str):
    """A context with autocast off on ``device_type`` (a no-op context when it is off already)."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _caster(dtype):
    """t -> t.to(dtype) for tensors (once per distinct tensor: x and query are often the same), else t."""
    seen = {}

    def cast(t):
        if not isinstance(t, torch.Tensor) or t.dtype == dtype:
            return t
        key = id(t)
        if key not in seen:
            seen[key] = (t, t.to(dtype))  # keeps t alive, so its id stays unique during the call
        return seen[key][1]

    return cast


def _matmul_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b (2-D) with an fp32 result for fp16/bf16 operands: fp32 accumulation, no rounding of the result."""
    if a.dtype in (torch.float32, torch.float64):
        return a @ b.to(a.dtype)
    if a.is_cuda and b.dtype == a.dtype:
        try:  # tensor cores, fp32 output (torch >= 2.8)
            return torch.mm(a, b, out_dtype=torch.float32)
        except (TypeError, RuntimeError, NotImplementedError):
            pass
    return a.float() @ b.float()


def _qk_f32(q: torch.Tensor, w_key: torch.Tensor) -> torch.Tensor:
    """q (N, d) @ w_key (d, d) in fp32 for fp16/bf16 operands (see the comment above)."""
    return _matmul_f32(q, w_key)


def _qk_grads(q, w_key, dqk, need_q: bool, need_w: bool, bias_dtype=None, dq_onto=None):
    """(dq, dWk, db) of qk = q @ w_key (+ b) formed in float32: dqk rounded once to q's dtype for both
    products and the bias's gradient (a column sum, as a linear's bias gets it; None without ``bias_dtype``).
    ``dq_onto``: a gradient of q from elsewhere, to which dq is added by the product itself (one addmm)."""
    g = dqk.to(q.dtype)
    if dq_onto is not None:
        dq = torch.addmm(dq_onto, g, w_key.t().to(g.dtype)) if need_q else dq_onto
    else:
        dq = g @ w_key.t().to(g.dtype) if need_q else None
    dw = (q.t() @ g).to(w_key.dtype) if need_w else None
    db = g.sum(0).to(bias_dtype) if bias_dtype is not None else None
    return dq, dw, db


def _project(ctx, residual, w_value, b_value):
    """(out, pre): out = (ctx + residual) @ Wv.T + bv in ctx's dtype, pre its input (saved for dWv).
    Autocast is off here: the op's output has its inputs' dtype whatever the caller's context."""
    pre = ctx + residual if residual is not None else ctx
    with _no_autocast(pre.device.type):
        return F.linear(pre, w_value, b_value), pre


def _core_forward(x: torch.Tensor, qk: Optional[torch.Tensor], w_down: torch.Tensor, b_down: Optional[torch.Tensor],
                  w_up: torch.Tensor, b_up: Optional[torch.Tensor], scaling: Optional[torch.Tensor],
                  scaling_value: float, activation: str, inv_temperature: float, residual: Optional[torch.Tensor],
                  w_value: Optional[torch.Tensor], b_value: Optional[torch.Tensor], q: Optional[torch.Tensor] = None,
                  w_key: Optional[torch.Tensor] = None, b_qk: Optional[torch.Tensor] = None,
                  score_mask: Optional[torch.Tensor] = None, t0: Optional[torch.Tensor] = None) -> List[torch.Tensor]:
    """[out, a, p, pre]: out = ctx, or with w_value the projection of ctx (+ residual); pre its input. With
    ``qk=None``, ``q`` (N, d) and ``w_key`` (fp16/bf16): qk = q @ w_key in float32 is formed here (as
    _qk_f32 forms it) and again in the backward, so that the op keeps q for its backward and not the
    float32 qk (N x d x 4 bytes per layer), as the C++ node does (csrc/stacked_fusion_replay.cpp). For the
    folded query-key product (the contract's w_query_key), q is the query itself, which is x at the usual
    sites: nothing more is kept. ``b_qk`` (d,): qk's bias (the contract's b_query_key), which the kernels add
    as they read qk (no launch of its own). ``score_mask`` (N, k) float32 and ``t0`` (N,) in x's dtype: the
    scores are m_j (<qk, v_j> + t0) (see _shared_score), t0 differentiated, the mask not."""
    if qk is None:
        qk = _qk_f32(q, w_key)
    ctx, a, p = _stacked_kernels().forward(x, qk, w_down, b_down, w_up, b_up, scaling, scaling_value, activation,
                                          inv_temperature, b_qk, score_mask, t0)
    if w_value is None:
        return [ctx, a, p, x.new_empty((0,))]
    out, pre = _project(ctx, residual, w_value, b_value)
    return [out, a, p, pre]


def _rp(r: int) -> int:
    return max(16, 1 << (r - 1).bit_length())


def _core_fake(x, qk, w_down, b_down, w_up, b_up, scaling, scaling_value, activation, inv_temperature, residual,
               w_value, b_value, q=None, w_key=None, b_qk=None, score_mask=None, t0=None):
    n = x.shape[0]
    k, r = w_down.shape[0], w_down.shape[1]
    return [torch.empty_like(x), x.new_empty((n, k, _rp(r)), dtype=torch.float32),
            x.new_empty((n, k), dtype=torch.float32),
            torch.empty_like(x) if w_value is not None else x.new_empty((0,))]


def _core_backward(dctx: torch.Tensor, x: torch.Tensor, qk: torch.Tensor, w_down: torch.Tensor,
                   b_down: Optional[torch.Tensor], w_up: torch.Tensor, b_up: Optional[torch.Tensor],
                   scaling: Optional[torch.Tensor], scaling_value: float, activation: str, inv_temperature: float,
                   a: torch.Tensor, p: torch.Tensor, need_ds: bool, need_weights: bool,
                   b_qk: Optional[torch.Tensor] = None, dqk_like_x: bool = False,
                   score_mask: Optional[torch.Tensor] = None, need_dt0: bool = False) -> List[torch.Tensor]:
    """The kernels' backward; ``dqk_like_x``: dqk written in x's dtype (the op rounds it so for its products
    anyway), not in qk's; the last output is t0's gradient (with ``need_dt0``)."""
    out = _stacked_kernels().backward(dctx, x, qk, w_down, b_down, w_up, b_up, scaling, scaling_value, activation,
                                     inv_temperature, a, p, need_ds, need_weights, b_qk, dqk_like_x, score_mask,
                                     need_dt0)
    return [t if t is not None else x.new_empty((0,)) for t in out]


def _core_backward_fake(dctx, x, qk, w_down, b_down, w_up, b_up, scaling, scaling_value, activation,
                        inv_temperature, a, p, need_ds, need_weights, b_qk=None, dqk_like_x=False, score_mask=None,
                        need_dt0=False):
    empty = lambda: x.new_empty((0,))  # one per output: outputs never alias
    like = lambda t: torch.empty_like(t) if (t is not None and need_weights) else empty()
    dqk = torch.empty_like(qk, dtype=x.dtype) if dqk_like_x else torch.empty_like(qk)
    return [torch.empty_like(x), dqk, like(w_down), like(b_down), like(w_up), like(b_up),
            torch.empty_like(scaling) if (need_ds and scaling is not None) else empty(),
            x.new_empty((x.shape[0],)) if (need_dt0 and score_mask is not None) else empty()]


def _core_setup(ctx, inputs, output):
    x, qk, w_down, b_down, w_up, b_up, scaling, scaling_value, activation, inv_temperature, residual, w_value, \
        b_value, q, w_key, b_qk, score_mask, t0 = tuple(inputs) + (None,) * (18 - len(inputs))
    _, a, p, pre = output
    # with q and w_key (qk None), q is kept and qk formed again in the backward (see _core_forward)
    ctx.save_for_backward(x, qk, w_down, b_down, w_up, b_up, scaling, a, p, w_value, pre, q, w_key, b_qk, score_mask)
    # gradients to return: one per argument passed (the autograd.Function's), where the custom op's dispatcher
    # drops trailing arguments equal to their defaults (q, w_key, b_qk, score_mask, t0: None) before its
    # Function sees them
    ctx.n_inputs = len(inputs)
    optional = (q, w_key, b_qk, score_mask, t0)
    ctx.n_passed = 13 + max((i + 1 for i, t in enumerate(optional) if t is not None), default=0)
    ctx.has_t0 = t0 is not None
    # q passed as x itself (the folded product at a site whose query is the adapters' input): one gradient,
    # dx with dq added by the product (see _core_grad)
    ctx.q_is_x = q is not None and q is x
    ctx.mark_non_differentiable(a, p, pre)
    ctx.scaling_value, ctx.activation, ctx.inv_temperature = scaling_value, activation, inv_temperature
    ctx.has_residual, ctx.has_b_value = residual is not None, b_value is not None
    ctx.set_materialize_grads(False)  # no zero-filled gradients for a, p and pre: 3 launches per backward


def _core_grad(ctx, grads):
    dout = grads[0]
    x, qk, w_down, b_down, w_up, b_up, scaling, a, p, w_value, pre, q, w_key, b_qk, score_mask = ctx.saved_tensors
    with_q = q is not None
    if with_q:
        qk = _qk_f32(q, w_key)  # the forward's qk, formed again (same op, same bits)
    dres = dwv = dbv = None
    if w_value is None:
        dctx = dout
    else:
        # dctx in fp32 (module comment above); the projection's own gradients as autograd forms them.
        # The operands share x's dtype (the run functions resolve autocast before the op); the casts
        # below are no-ops then and keep the formula well-typed for any caller.
        dout = dout.to(pre.dtype)
        dctx = _matmul_f32(dout, w_value)
        if ctx.has_residual and ctx.needs_input_grad[10]:
            dres = dctx.to(dout.dtype)
        if ctx.needs_input_grad[11]:
            dwv = (dout.t() @ pre).to(w_value.dtype)
        if ctx.has_b_value and ctx.needs_input_grad[12]:
            dbv = dout.sum(0).to(w_value.dtype)
    need_ds = scaling is not None and ctx.needs_input_grad[6]
    need_weights = any(ctx.needs_input_grad[2:6])  # False when the adapters are frozen: no weight reduction
    need_dt0 = ctx.has_t0 and ctx.needs_input_grad[17]
    dx, dqk, dwd, dbd, dwu, dbu, ds, dt0 = CORE_BACKWARD.within(ctx)(
        dctx.contiguous(), x, qk, w_down, b_down, w_up, b_up, scaling, ctx.scaling_value, ctx.activation,
        ctx.inv_temperature, a, p, need_ds, need_weights, b_qk, with_q,  # (with q, dqk is rounded to q's dtype)
        score_mask, need_dt0)
    w = need_weights
    dq = dwk = dbqk = None
    need_b = b_qk is not None and ctx.needs_input_grad[15]
    if need_b and not with_q:
        dbqk = dqk.sum(0).to(b_qk.dtype)
    if with_q:  # qk = q @ w_key's gradients
        merge = ctx.q_is_x and dx is not None  # x's two gradients in one: no add of autograd's after two products
        dq, dwk, dbqk = _qk_grads(q, w_key, dqk, ctx.needs_input_grad[13], ctx.needs_input_grad[14],
                                  b_qk.dtype if need_b else None, dq_onto=dx if merge else None)
        if merge:
            dx, dq = dq, None
        dqk = None
    grads = (dx, dqk, dwd if w else None, dbd if (w and b_down is not None) else None, dwu if w else None,
             dbu if (w and b_up is not None) else None, ds if need_ds else None, None, None, None, dres, dwv, dbv,
             dq, dwk, dbqk, None, dt0 if need_dt0 else None)
    return grads[:ctx.n_inputs if getattr(ctx, "pet_fast_eager", False) else ctx.n_passed]


CORE_BACKWARD = _autograd.custom_op("stacked_fusion_core_triton_backward", _core_backward, fake=_core_backward_fake)
CORE = _autograd.custom_op("stacked_fusion_core_triton", _core_forward, fake=_core_fake,
                           autograd=(_core_grad, _core_setup), returns_list=True)


def _shared_score(query, q, residual, w_key, b_key, w_query_key, b_query_key, residual_before):
    """t0 (N,) in query's dtype, the score term every adapter shares, or None where there is none: <Q, K(res)>
    with K(res) = res @ Wk.T + bk the key of the residual added before the fusion (residual_before), else of
    zero (bk); folded, <query @ Wqk + bqk, res>. The softmax cancels it, unless a score mask scales the scores.
    Differentiable (autograd takes its gradient to Q, the key projection and the residual). For fp16/bf16 it
    is rounded as eager PyTorch rounds each score (a product's output in the input dtype); the kernels add it
    to the rest of the score in float32."""
    d = query.shape[-1]
    if w_query_key is not None:
        if not residual_before:
            return None
        qk = torch.matmul(query, w_query_key)  # (in the input dtype, as the unfolded key of the residual below)
        qk = qk + b_query_key if b_query_key is not None else qk
        return (qk.float() * residual.float()).sum(-1).reshape(-1).to(query.dtype)
    if residual_before:
        keys = F.linear(residual, w_key, b_key) if w_key is not None else residual
        return (q.float() * keys.float()).sum(-1).reshape(-1).to(q.dtype)
    if w_key is None or b_key is None:
        return None
    return torch.mv(q.reshape(-1, d), b_key)  # (autograd keeps q, which the core op keeps too, and b_key)


def _masked_args(k, score_mask, score_shift, query, q, residual, w_key, b_key, w_query_key=None, b_query_key=None,
                 residual_before=False) -> tuple:
    """The kernels' (score_mask (N, k) float32, t0 (N,) or None), both dense (a strided mask or shift is
    copied), for a call with a score mask; () without one. t0: _shared_score's term plus the score shift."""
    if score_mask is None:
        return ()
    t0 = _shared_score(query, q, residual, w_key, b_key, w_query_key, b_query_key, residual_before)
    if score_shift is not None:
        t0 = score_shift.reshape(-1) if t0 is None else t0 + score_shift.reshape(-1)
    return (score_mask.reshape(-1, k).to(torch.float32).contiguous(), t0.contiguous() if t0 is not None else None)


def _core_args(x, query, residual, w_down, b_down, w_up, b_up, activation, scaling, w_query, b_query, w_key,
               w_value, b_value, temperature, residual_before, w_query_key=None, b_query_key=None, b_key=None,
               score_shift=None, score_mask=None) -> tuple:
    """The fused path's core call from the op's arguments (all tensors in one dtype except maybe ``residual``
    when it is added at the end, and the score mask, read as float32): (x2, qk, rest, q2, w_key, b_qk, masked,
    low): the node's inputs (_node_inputs) and CORE's arguments (see _stacked_triton)."""
    d = query.shape[-1]
    if w_query_key is not None:  # folded (contract): qk = query @ w_query_key + b_query_key, one product
        q, w_key = query, w_query_key
        b_qk = b_query_key.contiguous() if b_query_key is not None else None  # (the kernels read it densely)
        same = query is x  # (at the usual sites: then the core op gets x itself as q, and sums x's gradients)
    else:
        q = F.linear(query, w_query, b_query) if w_query is not None else query
        b_qk, same = None, False
    low = w_key is not None and q.dtype in (torch.float16, torch.bfloat16)
    if w_key is None:
        qk = q  # b_key cancels in the softmax
    elif low:
        qk = None  # fp32 (see above): the core forms it (_qk_f32), or the C++ node below
    else:
        qk = torch.matmul(q, w_key)  # (b_qk, if any, is added by the kernels as they read qk)
    if qk is not None:
        qk = qk.reshape(-1, d).contiguous()
    c = lambda t: t.contiguous() if t is not None else None
    if isinstance(scaling, torch.Tensor):
        s_t, s_v = scaling.contiguous(), 1.0
    else:
        s_t, s_v = None, float(scaling)
    res = residual.reshape(-1, d) if (residual_before and w_value is not None) else None
    rest = (c(w_down), c(b_down), c(w_up), c(b_up), s_t, s_v, activations.canonical(activation), 1.0 / float(temperature),
            res, w_value, b_value)
    x2 = x.reshape(-1, d).contiguous()
    q2 = (x2 if same else q.reshape(-1, d)) if low else None  # (the node, or CORE, forms qk = q2 @ w_key)
    masked = _masked_args(w_down.shape[0], score_mask, score_shift, query, q, residual, w_key, b_key, w_query_key,
                          b_query_key, residual_before)
    return x2, qk, rest, q2, (w_key if low else None), b_qk, masked, low


def _node_inputs(x2, qk, rest, q2, w_key, b_qk, masked) -> list:
    """The C++ node's input list (kernels/stacked_adapter_fusion.py core_with_grad) from _core_args' parts."""
    w_down, b_down, w_up, b_up, s_t, _, _, _, res, w_value, b_value = rest
    return [x2, qk, w_down, b_down, w_up, b_up, s_t, res, w_value, b_value, q2, w_key, b_qk,
            *(masked if masked else (None, None))]


def _finish(out, query, residual, res):
    """The op's output from the core's (N, d) output: in query's shape, the residual added unless the core took it."""
    out = out.reshape(query.shape)
    return out + residual if res is None else out


_LAST = threading.local()  # a weakref to the output of this thread's last stacked-op call that ran as the C++ node


def _stacked_triton(*args):
    """The fused path (the arguments as :func:`_core_args`')."""
    query, residual = args[1], args[2]
    x2, qk, rest, q2, w_key, b_qk, masked, low = _core_args(*args)
    out = None
    if torch.is_grad_enabled() and not (torch.compiler.is_compiling() or _autograd.always_custom_op()):
        # once both launchers are recorded: one C++ node in place of the Function (csrc/stacked_fusion_replay.cpp);
        # for fp16/bf16 it forms qk itself and keeps q for the backward, not the float32 qk
        out = _stacked_kernels().core_with_grad(_node_inputs(x2, qk, rest, q2, w_key, b_qk, masked), *rest[5:8])
    if out is not None:
        y = _finish(out, query, residual, rest[8])
        _LAST.node = weakref.ref(y)  # (weak: a functional caller's output is not kept alive)
        return y
    bias = () if (b_qk is None and not masked) else (b_qk,)
    if low:  # the op forms the float32 qk itself and keeps q, not qk, for its backward
        out = CORE(x2, None, *rest, q2, w_key, *bias, *masked)[0]
    else:
        out = CORE(x2, qk, *rest, *((None, None) + bias if bias else ()), *masked)[0]
    return _finish(out, query, residual, rest[8])


# ---------------------------------------------------------------------------------------------------
# Replayed calls: an AdapterFusion module repeats one kind of call per step; once its call has run as the C++
# node, later calls with the same facts skip the op's Python (checks, signature, plan, the launchers' keys:
# about 50 us of host time per layer and step on the CPU) and reach the node through a C++ guard
# (csrc/stacked_fusion_replay.cpp GuardedStackedFusion), which checks each input's facts, grad, deterministic
# and autocast modes; the scalars and the dispatch route are checked here. Any difference returns None and
# the caller runs the op. The core's arguments are formed by the same code as the op's (_core_args).


def _same(t):
    return t


class ReplayedStackedCall:
    """A caller's stacked_adapter_fusion call replayed through one C++ call while its facts stay those of the
    call it was made from (:func:`replayed_stacked_call`): same arguments as the op (no ``backend``); returns
    the output with its autograd node, or None (then the caller calls the op). Not copied with its holder
    (deepcopy and pickling give None)."""

    __slots__ = ("guard", "route", "scalars", "scaling", "residual")

    def __call__(self, x, query, residual, w_down, b_down, w_up, b_up, *, activation="relu", scaling=1.0,
                 w_query=None, b_query=None, w_key=None, b_key=None, w_value=None, b_value=None, temperature=1.0,
                 residual_before=False, value_before_softmax=True, w_query_key=None, b_query_key=None,
                 score_mask=None, score_shift=None):
        if ((activation, temperature, residual_before, value_before_softmax) != self.scalars
                or (residual.dtype, residual.shape) != self.residual or _replayed.route() != self.route):
            return None
        if isinstance(scaling, torch.Tensor) != (self.scaling is None) or (self.scaling is not None and scaling != self.scaling):
            return None
        masked = score_mask is not None  # (b_key and the shift count only with a mask, as in run_stacked_triton)
        core = _core_args(x, query, residual, w_down, b_down, w_up, b_up, activation, scaling, w_query, b_query,
                          w_key, w_value, b_value, temperature, residual_before, w_query_key, b_query_key,
                          b_key if masked else None, score_shift if masked else None, score_mask)
        try:
            out = self.guard(_node_inputs(*core[:7]))
        except RuntimeError as exc:  # a failing launch: as a failing node (kernels/_replay.py autograd)
            _replayed.replay().give_up(exc)
            return None
        return None if out is None else _finish(out, query, residual, core[2][8])

    def __deepcopy__(self, memo):
        return None

    def __reduce__(self):
        return (_replayed.no_call, ())


class ReplayedStackedCalls:
    """A module's replayed calls, one per shape of x (a batch padded to its longest sequence changes shape from
    step to step: a shape seen again finds its own), at most MAX_SHAPES, the oldest dropped first. Not copied
    with its holder (deepcopy and pickling give None)."""

    __slots__ = ("calls",)
    MAX_SHAPES = 8

    def __init__(self):
        self.calls: dict = {}

    def get(self, x: torch.Tensor) -> Optional[ReplayedStackedCall]:
        return self.calls.get(x.shape)

    def add(self, x: torch.Tensor, call: ReplayedStackedCall) -> None:
        if x.shape not in self.calls and len(self.calls) >= self.MAX_SHAPES:
            del self.calls[next(iter(self.calls))]
        self.calls[x.shape] = call

    def __deepcopy__(self, memo):
        return None

    def __reduce__(self):
        return (_replayed.no_call, ())


def replayed_stacked_call(y, x, query, residual, w_down, b_down, w_up, b_up, *, activation="relu", scaling=1.0,
                          w_query=None, b_query=None, w_key=None, b_key=None, w_value=None, b_value=None,
                          temperature=1.0, residual_before=False, value_before_softmax=True, w_query_key=None,
                          b_query_key=None, score_mask=None, score_shift=None):
    """A :class:`ReplayedStackedCall` for calls like the stacked_adapter_fusion call that just returned ``y``
    with these arguments, when that call ran as the C++ node with them as they came (not cast for autocast);
    None otherwise. The caller must pass the op's arguments unchanged to both."""
    last = getattr(_LAST, "node", None)
    _LAST.node = None
    if last is None or last() is not y or compute_dtype(query) != query.dtype:
        return None
    masked = score_mask is not None
    # the node's inputs formed again for their facts, their graph thrown away: what it saves for a backward is
    # kept from gradient checkpointing's hooks, which count what a layer's forward and its recomputation save
    with torch.autograd.graph.saved_tensors_hooks(_same, _same):
        core = _core_args(x, query, residual, w_down, b_down, w_up, b_up, activation, scaling, w_query, b_query,
                          w_key, w_value, b_value, temperature, residual_before, w_query_key, b_query_key,
                          b_key if masked else None, score_shift if masked else None, score_mask)
    guard = _stacked_kernels().core_guard(_node_inputs(*core[:7]), *core[2][5:8])
    if guard is None:
        return None
    call = ReplayedStackedCall()
    call.guard, call.route = guard, _replayed.route()
    call.scalars = (activation, temperature, residual_before, value_before_softmax)
    call.scaling = None if isinstance(scaling, torch.Tensor) else scaling
    call.residual = (residual.dtype, residual.shape)  # (the guard sees it only where the core adds it)
    return call


def run_stacked_triton(x, query, residual, w_down, b_down, w_up, b_up, activation="relu", scaling=1.0,
                       w_query=None, b_query=None, w_key=None, b_key=None, w_value=None, b_value=None,
                       temperature=1.0, residual_before=False, value_before_softmax=True, w_query_key=None,
                       b_query_key=None, score_mask=None, score_shift=None):
    """The triton backend of stacked_adapter_fusion: same call as :func:`stacked_reference`."""
    # the key bias counts only where a score mask keeps it from cancelling in the softmax
    args = (x, query, residual, w_down, b_down, w_up, b_up, activation, scaling, w_query, b_query, w_key, w_value,
            b_value, temperature, residual_before, w_query_key, b_query_key, b_key if score_mask is not None else None,
            score_shift if score_mask is not None else None)
    dt = compute_dtype(query)
    if dt == query.dtype:
        with _no_autocast(query.device.type):  # autocast off, or on with inputs in its dtype: nothing to round
            return _stacked_triton(*args, score_mask)
    cast = _caster(dt)
    with torch.autocast(query.device.type, enabled=False):
        return _stacked_triton(*(cast(a) if i != 2 or residual_before else a for i, a in enumerate(args)), score_mask)


TRITON_MAX_R = 256
TRITON_MAX_K = 64


def stacked_triton_reasons(info) -> list:
    why = dispatch.triton_reasons(info)  # deterministic: the backward's reduction has no atomics
    if info["r"] > TRITON_MAX_R:
        why.append(f"bottleneck size r={info['r']} > {TRITON_MAX_R} (the r-wide hidden tile must fit in registers)")
    if info["k"] > TRITON_MAX_K:
        why.append(f"k={info['k']} adapters > {TRITON_MAX_K}")
    return why


dispatch.register(OP_STACKED, "triton", run_stacked_triton, stacked_triton_reasons)
dispatch.set_preference(OP_STACKED, _timings.preference(OP_STACKED))


# ---------------------------------------------------------------------------------------------------
# Triton backend of adapter_fusion (adapter outputs given): the same reduction of the projections, with
# a kernel for ctx = sum_j softmax_j(<qk, v_j>/T) v_j that reads the values instead of recomputing them.


def _attn_forward(values: torch.Tensor, qk: torch.Tensor, inv_temperature: float,
                  score_mask: Optional[torch.Tensor] = None, t0: Optional[torch.Tensor] = None) -> List[torch.Tensor]:
    """[ctx, p]; ``score_mask`` (N, k) float32 and ``t0`` (N,) in qk's dtype as the stacked core's."""
    ctx, p = _attention_kernels().attention_forward(values, qk, inv_temperature, score_mask, t0)
    return [ctx, p]


def _attn_fake(values, qk, inv_temperature, score_mask=None, t0=None):
    return [torch.empty_like(qk), qk.new_empty((qk.shape[0], values.shape[1]), dtype=torch.float32)]


def _attn_backward(dctx: torch.Tensor, values: torch.Tensor, qk: torch.Tensor, p: torch.Tensor,
                   inv_temperature: float, score_mask: Optional[torch.Tensor] = None,
                   need_dt0: bool = False) -> List[torch.Tensor]:
    dv, dqk, dt0 = _attention_kernels().attention_backward(dctx, values, qk, p, inv_temperature, score_mask, need_dt0)
    return [dv, dqk, dt0 if dt0 is not None else qk.new_empty((0,))]


def _attn_backward_fake(dctx, values, qk, p, inv_temperature, score_mask=None, need_dt0=False):
    dt0 = qk.new_empty((qk.shape[0],)) if (need_dt0 and score_mask is not None) else qk.new_empty((0,))
    return [torch.empty_like(values), torch.empty_like(qk), dt0]


def _attn_setup(ctx, inputs, output):
    values, qk, inv_temperature, score_mask, t0 = tuple(inputs) + (None,) * (5 - len(inputs))
    ctx.save_for_backward(values, qk, output[1], score_mask)
    ctx.mark_non_differentiable(output[1])
    ctx.inv_temperature = inv_temperature
    ctx.has_t0 = t0 is not None
    # one gradient per argument passed (the custom op's dispatcher drops trailing None arguments)
    ctx.n_inputs = len(inputs)
    ctx.n_passed = 5 if t0 is not None else 4 if score_mask is not None else 3
    ctx.set_materialize_grads(False)  # no zero-filled gradient for p


def _attn_grad(ctx, grads):
    values, qk, p, score_mask = ctx.saved_tensors
    need_dt0 = ctx.has_t0 and ctx.needs_input_grad[4]
    dv, dqk, dt0 = ATTENTION_BACKWARD.within(ctx)(grads[0].contiguous(), values, qk, p, ctx.inv_temperature,
                                                  score_mask, need_dt0)
    out = (dv, dqk, None, None, dt0 if need_dt0 else None)
    return out[:ctx.n_inputs if getattr(ctx, "pet_fast_eager", False) else ctx.n_passed]


ATTENTION_BACKWARD = _autograd.custom_op("fusion_attention_triton_backward", _attn_backward,
                                         fake=_attn_backward_fake)
ATTENTION = _autograd.custom_op("fusion_attention_triton", _attn_forward, fake=_attn_fake,
                                autograd=(_attn_grad, _attn_setup), returns_list=True)


def _given_triton(query, values, residual, w_query, b_query, w_key, w_value, b_value, temperature,
                  residual_before, b_key=None, score_shift=None, score_mask=None):
    d = query.shape[-1]
    k = values.shape[-2]
    q = F.linear(query, w_query, b_query) if w_query is not None else query
    qk = torch.matmul(q, w_key) if w_key is not None else q  # b_key cancels in the softmax (without a mask)
    masked = _masked_args(k, score_mask, score_shift, query, q, residual, w_key, b_key,
                          residual_before=residual_before)
    ctx = ATTENTION(values.reshape(-1, k, d).contiguous(), qk.reshape(-1, d).contiguous(), 1.0 / float(temperature),
                    *masked)[0]
    out = ctx.reshape(query.shape)
    if residual_before:
        out = out + residual
    if w_value is not None:
        out = F.linear(out, w_value, b_value)
    if not residual_before:
        out = out + residual
    return out


def run_triton(query, values, residual, w_query=None, b_query=None, w_key=None, b_key=None, w_value=None,
               b_value=None, temperature=1.0, residual_before=False, value_before_softmax=True, score_mask=None,
               score_shift=None):
    """The triton backend of adapter_fusion: same call as :func:`reference`."""
    args = (query, values, residual, w_query, b_query, w_key, w_value, b_value, temperature, residual_before,
            b_key if score_mask is not None else None, score_shift if score_mask is not None else None)
    dt = compute_dtype(query)
    if dt == query.dtype:
        with _no_autocast(query.device.type):
            return _given_triton(*args, score_mask)
    cast = _caster(dt)
    with torch.autocast(query.device.type, enabled=False):
        return _given_triton(*(cast(a) if i != 2 or residual_before else a for i, a in enumerate(args)), score_mask)


def fusion_triton_reasons(info) -> list:
    why = dispatch.triton_reasons(info)
    if info["k"] > TRITON_MAX_K:
        why.append(f"k={info['k']} adapters > {TRITON_MAX_K}")
    return why


dispatch.register(OP, "triton", run_triton, fusion_triton_reasons)
dispatch.set_preference(OP, _timings.preference(OP))
