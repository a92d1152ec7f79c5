"""masked_weights: the masked weights of many linears at once, with straight-through gradients.

    outputs[i] = (weights[i] * 1[scores[i] > threshold]).to(dtype)

Gradients (straight-through estimator), for each output's gradient G_i:
    d_scores[i] = G_i * weights[i]        taken in float32, returned in the scores' dtype
    d_weight[i] = G_i * 1[scores[i] > threshold]   in the weight's dtype, when the weight requires grad

Mask-tuning masks every linear of a model. Masking each in its own call costs an autograd node, a
dispatch and a launch per linear per step (72 in BERT-base), on a step that is bound by the host. This op
makes all of a task's masked weights in one autograd node, and the linears then run plain ``F.linear``
(pet_fast/methods/mask.py does this once per forward). Its gradients are those of masked_linear's scores
and weight: G_i is the gradient ``F.linear`` gives its weight, ``dy^T x``.

Contract
    weights   a non-empty list of 2-D floating tensors, one device
    scores    a list as long, scores[i] of weights[i]'s shape, floating, on the same device
    threshold a real number (compared as PyTorch compares ``scores > threshold``, in the scores' dtype)
    dtype     the outputs' floating dtype (default: the first weight's)
Returns a tuple of tensors, outputs[i] of weights[i]'s shape.

Backends (chosen per call by pet_fast.dispatch; a plain autograd.Function, not a custom op)
    eager   PyTorch per weight; every input, the CPU path, and the path under torch.compile (which traces
            and fuses it).
    triton  kernels/masked_weights.py: one launch for the whole list, into one buffer (the outputs are
            views of it), when the weights share one dtype and the scores another (fp32/fp16/bf16) and all
            are contiguous. Backward: the scores' gradients in one launch when every output has a
            contiguous gradient of one dtype (else one torch._foreach_mul when the weights and scores are
            float32, per weight otherwise), and d_weight per weight.
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence

import torch

from .. import dispatch
from . import _checks

OP = "masked_weights"
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_inputs(weights, scores, threshold, dtype) -> tuple:
    """Validate a call; returns (threshold as a float, dtype)."""
    for name, seq in (("weights", weights), ("scores", scores)):
        if not isinstance(seq, (list, tuple)):
            raise TypeError(f"{name} must be a list or tuple of tensors, got {type(seq).__name__}")
    if not weights:
        raise ValueError("weights must not be empty")
    if len(scores) != len(weights):
        raise ValueError(f"scores must have one tensor per weight: {len(weights)} weights, {len(scores)} scores")
    device = None
    for i, (w, s) in enumerate(zip(weights, scores)):
        _checks.tensor(f"weights[{i}]", w, ndim=2)
        _checks.tensor(f"scores[{i}]", s, ndim=2)
        _checks.shape(f"scores[{i}]", s, w.shape, f"the shape of weights[{i}]")
        device = w.device if device is None else device
        if w.device != device or s.device != device:
            raise ValueError(f"weights[{i}] and scores[{i}] must be on the device of weights[0] ({device}), "
                             f"got {w.device} and {s.device}{_checks.meta_hint(s if s.is_meta else w)}")
    if dtype is None:
        dtype = weights[0].dtype
    elif not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    return _checks.real_number("threshold", threshold), dtype


def reference(weights, scores, threshold, dtype) -> list:
    """Eager PyTorch forward, weight by weight (no autograd: the Function below applies the gradients)."""
    return [torch.where(s > threshold, w, 0.0).to(dtype) for w, s in zip(weights, scores)]


@functools.cache  # imported once: no import statement per call
def _kernels():
    from ..kernels import masked_weights as kernels  # imports triton: only when a kernel runs

    return kernels


def run_triton(weights, scores, threshold, dtype) -> list:
    return _kernels().grouped_masked_weights(weights, scores, threshold, dtype)


def _grouped_scores_grads(grads, weights, scores, wanted) -> Optional[list]:
    """The scores' gradients from one Triton launch (kernels/masked_weights.py), or None where that kernel
    does not take the call: every output must have a gradient and need one, in one floating dtype,
    contiguous (F.linear's weight gradients are). The forward ran the triton backend, so the weights share
    one dtype and the scores another, all contiguous."""
    if not all(wanted) or any(g is None for g in grads):
        return None
    if grads[0].is_cuda and torch.cuda.is_current_stream_capturing():
        return None  # the kernel's table of G's addresses is copied to the device per call: not in a CUDA graph
    dtype = grads[0].dtype
    if dtype not in _KERNEL_DTYPES or any(g.dtype != dtype or not g.is_contiguous() for g in grads):
        return None
    return _kernels().grouped_scores_grads(grads, weights, scores)


def _scores_grads(grads, weights, scores, wanted) -> list:
    """d_scores[i] = G_i * weights[i] in float32, in the scores' dtype (None where not wanted or no G)."""
    idx = [i for i in range(len(weights)) if wanted[i] and grads[i] is not None]
    out = [None] * len(weights)
    if not idx:
        return out
    if all(weights[i].dtype == torch.float32 and scores[i].dtype == torch.float32 for i in idx):
        # G in any float dtype times float32 W: type promotion takes the product in float32 (one call)
        for i, d in zip(idx, torch._foreach_mul([grads[i] for i in idx], [weights[i] for i in idx])):
            out[i] = d
    else:
        for i in idx:
            out[i] = (grads[i].float() * weights[i].float()).to(scores[i].dtype)
    return out


class _MaskedWeights(torch.autograd.Function):
    """One node for the whole list. Inputs: (run, threshold, dtype, n, *weights, *scores)."""

    @staticmethod
    def forward(ctx, run, threshold, dtype, n, *tensors):
        weights, scores = tensors[:n], tensors[n:]
        ctx.n, ctx.threshold = n, threshold
        ctx.grouped = run is run_triton  # the backward's scores gradients then take one launch too
        ctx.save_for_backward(*tensors)
        ctx.set_materialize_grads(False)  # an output no linear used gets no gradient, not a zero tensor
        return tuple(run(weights, scores, threshold, dtype))

    @staticmethod
    def backward(ctx, *grads):
        n = ctx.n
        saved = ctx.saved_tensors
        weights, scores = saved[:n], saved[n:]
        need = ctx.needs_input_grad[4:]
        # (under create_graph=True the torch ops below, which autograd can differentiate again)
        grouped = ctx.grouped and not torch.is_grad_enabled()
        d_scores = _grouped_scores_grads(grads, weights, scores, need[n:]) if grouped else None
        if d_scores is None:
            d_scores = _scores_grads(grads, weights, scores, need[n:])
        d_weights = [torch.where(s > ctx.threshold, g, 0.0).to(w.dtype) if (need[i] and g is not None) else None
                     for i, (w, s, g) in enumerate(zip(weights, scores, grads))]
        return (None, None, None, None, *d_weights, *d_scores)


def describe(weights, scores, dtype) -> dict:
    """What the dispatcher sees of a (validated) call."""
    ref = weights[0]
    return _checks.info(ref, dtype=dtype, n=len(weights), weight_dtypes=frozenset(w.dtype for w in weights),
                        scores_dtypes=frozenset(s.dtype for s in scores),
                        contiguous=all(w.is_contiguous() and s.is_contiguous() for w, s in zip(weights, scores)))


def triton_reasons(info) -> list:
    why = dispatch.triton_reasons(info)
    for what in ("weight", "scores"):
        kinds = info[f"{what}_dtypes"]
        if len(kinds) != 1:
            why.append(f"the {what} tensors have several dtypes ({sorted(map(str, kinds))}): the kernel takes one")
        elif next(iter(kinds)) not in _KERNEL_DTYPES:
            why.append(f"{what} dtype {next(iter(kinds))} is not one of float16, bfloat16, float32")
    if not info["contiguous"]:
        why.append("a weight or scores tensor is not contiguous (the kernel reads them flat)")
    return why


dispatch.register(OP, "eager", reference)
dispatch.register(OP, "triton", run_triton, triton_reasons)
dispatch.set_preference(OP, lambda info: ["triton", "eager"])


def masked_weights(weights: Sequence[torch.Tensor], scores: Sequence[torch.Tensor], *, threshold: float = 0.0,
                   dtype: Optional[torch.dtype] = None, backend: Optional[str] = None) -> tuple:
    """``(weights[i] * (scores[i] > threshold)).to(dtype)`` for every i, with straight-through gradients
    to the scores (and to the weights that require grad), in one autograd node. See the module docstring."""
    def resolve():
        t, dt = check_inputs(weights, scores, threshold, dtype)
        return (t, dt), describe(weights, scores, dt)

    sig = None
    if isinstance(weights, (list, tuple)) and isinstance(scores, (list, tuple)):
        sig = _checks.signature(*weights, *scores, threshold, len(weights))
        if sig is not None:  # (contiguity too: the triton backend reads the tensors flat and refuses strided ones)
            sig += (dtype, tuple(t.is_contiguous() for t in (*weights, *scores)))
    if torch.compiler.is_compiling():  # traced as plain PyTorch, which torch.compile fuses
        (threshold, dtype), info = resolve()
        impl = dispatch.select(OP, info, "eager")
    else:
        (threshold, dtype), impl = dispatch.plan(OP, sig, backend, resolve)
    n = len(weights)
    return _MaskedWeights.apply(impl.run, threshold, dtype, n, *weights, *scores)
