"""bottleneck_adapter: the residual bottleneck of Houlsby and Pfeiffer adapters.

    out = base + scaling * (act(x @ w_down.T + b_down) @ w_up.T + b_up)
    base = x without a residual, the residual when given, x + residual with add_input=True

Contract
    x         (..., d) floating; leading dimensions are flattened into tokens (N may be 0)
    w_down    (r, d), r >= 1          b_down  (r,) or None
    w_up      (d, r)                  b_up    (d,) or None
    activation  one of ACTIVATIONS (aliases: swish -> silu, gelu_new -> gelu_tanh)
    scaling   a Python number, or a tensor of shape () or (d,) (may require grad)
    residual  None or a tensor shaped like x
    add_input  bool (default False): the base is x + residual (a residual is required). A post-LN block
              with a Houlsby adapter computes LN(h + x + A(h)): the op takes h and x and adds both, where
              a separate h + x before it would cost a launch, and its backward one more (adding the two
              gradients of h); the op's backward adds them in the kernel that computes dx.
    layer_norm  None or (weight, bias, eps): the adapter reads LayerNorm(x) (over the last dimension;
              weight and bias (d,) tensors or None, of x's dtype or float32, and without gradient: they
              are the frozen base's) and the base is x. Pfeiffer's placement, s + A(LN(s)), in one op:
              the LayerNorm runs inside the kernels, and under autocast its float32 output is rounded to
              autocast's dtype for the products there (as F.linear would round it), with no launch for
              either. Needs residual=None and add_input=False.
All tensors share x's device. The parameters (w_down, b_down, w_up, b_up, a scaling tensor) share one
dtype: x's, or float32 when x is float16/bfloat16 (float32 master weights, as in mixed-precision
training). Float32 parameters enter the products rounded to x's dtype, as autocast would round them, and
their gradients come back in float32. The residual has x's dtype, or float32 when x is float16/bfloat16
(the float32 residual stream of a model under autocast): the sum is then taken and returned in float32,
as eager autocast would. The output has x's shape and the residual's dtype (x's without a residual).
Under autocast, float32 x (without layer_norm) is taken as eager autocast would compute it
(:func:`as_autocast_would`: the products in autocast's dtype, the base added in float32), on every backend.

Backends (chosen per call by pet_fast.dispatch; each is a torch.library custom op with a fake-tensor
rule and an autograd formula, so torch.compile(fullgraph=True) captures it without a graph break; eager
calls take the same formulas through an autograd.Function, see ops/_autograd.py):
    eager   this file's ``reference``; every input, the CPU path.
    triton  kernels/bottleneck_adapter.py: one launch forward, three backward; fp32/fp16/bf16 on CUDA
            (or CPU under TRITON_INTERPRET=1), r <= 256, any N and d; reads float32 parameters of
            half-precision x directly (no cast launches) and writes their gradients in float32. The
            adapter term stays in float32 until it joins the base (rounded once): where eager's
            float16 up-projection overflows to inf before the sum, the kernels give the finite sum.
    cuda    when pet_fast._C is built, fp32/fp16/bf16, compute capability >= 8.0. For N <= 64 tokens,
            csrc/bottleneck_adapter.cu: forward (two launches) and backward (three), r <= 256, one dtype
            for x and the residual, no LayerNorm. Beyond (more tokens, or those forms),
            csrc/bottleneck_adapter_autograd.cpp: the adapter as one C++ autograd node of ATen ops (cuBLAS
            products; the forward one call from Python, the backward run by the engine in C++), every form
            of the call (the LayerNorm too), for steps bound by the host; eager calls only (not under
            torch.compile).
``auto`` orders them by the measured timings of pet_fast/ops/_timings.py and takes the first that
accepts the call; CPU tensors always go to eager. The committed table (pet_fast/ops/dispatch_table.json,
H100, bf16, the third GPU session) puts the Triton kernels first at most shapes, forward and with
gradients, and cuda first for few-token forwards and at (8192, 4096, 256) with gradients.
"""
from __future__ import annotations

import functools
import threading
import weakref
from typing import List, Optional, Union

import torch
import torch.nn.functional as F

from .. import _ext, dispatch
from . import _autograd, _checks, _replayed, _timings, activations
from ._autocast import compute_dtype

OP = "bottleneck_adapter"


def check_layer_norm(x, layer_norm, residual, add_input) -> Optional[tuple]:
    """Validate ``layer_norm``; returns (weight, bias, eps as a float) or None."""
    if layer_norm is None:
        return None
    if not isinstance(layer_norm, (tuple, list)) or len(layer_norm) != 3:
        raise TypeError("layer_norm must be None or a tuple (weight, bias, eps)")
    w, b, eps = layer_norm
    d = x.shape[-1]
    for name, t in (("layer_norm weight", w), ("layer_norm bias", b)):
        if t is None:
            continue
        _checks.tensor(name, t, ndim=1)
        _checks.shape(name, t, (d,))
        if not (t.dtype == x.dtype or t.dtype == torch.float32):
            raise TypeError(f"{name} must have the dtype of x ({x.dtype}) or float32, got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name} must be on the device of x ({x.device}), got {t.device}{_checks.meta_hint(t)}")
        if _checks.needs_grad(t):
            raise ValueError(f"{name} requires grad: the op's LayerNorm computes no gradient for its weight and "
                             "bias (they are the frozen base's); apply the LayerNorm outside the op to train them")
    eps = _checks.real_number("layer_norm eps", eps, positive=True)
    if residual is not None or add_input:
        raise ValueError("layer_norm makes x itself the base: pass no residual and add_input=False")
    return w, b, eps


def check_inputs(x, w_down, b_down, w_up, b_up, activation, scaling, residual, add_input=False) -> tuple:
    """Validate a call; returns (canonical activation, scaling)."""
    if not isinstance(add_input, bool):
        raise TypeError(f"add_input must be a bool, got {type(add_input).__name__}")
    if add_input and residual is None:
        raise ValueError("add_input=True adds x to the residual: a residual is required")
    _checks.tensor("x", x, min_ndim=1)
    _checks.tensor("w_down", w_down, ndim=2)
    _checks.tensor("w_up", w_up, ndim=2)
    d = x.shape[-1]
    r = w_down.shape[0]
    if w_down.shape[1] != d:
        raise ValueError(f"w_down must have shape (r, d) = (r, {d}) to match x's last dimension, got {tuple(w_down.shape)}")
    if r < 1:
        raise ValueError("w_down must have at least one row (bottleneck size r >= 1)")
    _checks.shape("w_up", w_up, (d, r), "(d, r) with r = w_down.shape[0]")
    if b_down is not None:
        _checks.tensor("b_down", b_down, ndim=1)
        _checks.shape("b_down", b_down, (r,))
    if b_up is not None:
        _checks.tensor("b_up", b_up, ndim=1)
        _checks.shape("b_up", b_up, (d,))
    if residual is not None:
        _checks.tensor("residual", residual)
        _checks.shape("residual", residual, x.shape, "the shape of x")
    if isinstance(scaling, torch.Tensor):
        _checks.tensor("scaling", scaling)
        if scaling.shape not in (torch.Size([]), torch.Size([d])):
            raise ValueError(f"scaling must be a number or a tensor of shape () or ({d},), got {tuple(scaling.shape)}")
    else:
        scaling = _checks.real_number("scaling", scaling)
    params = dict(b_down=b_down, w_up=w_up, b_up=b_up, scaling=scaling if isinstance(scaling, torch.Tensor) else None)
    if residual is not None and not (residual.dtype == x.dtype or (residual.dtype == torch.float32 and x.dtype in HALF)):
        raise TypeError(f"residual must have the dtype of x ({x.dtype})" + (
            " or float32" if x.dtype in HALF else "") + f", got {residual.dtype}")
    if not (w_down.dtype == x.dtype or (w_down.dtype == torch.float32 and x.dtype in HALF)):
        raise TypeError(f"w_down must have the dtype of x ({x.dtype})" + (
            " or float32" if x.dtype in HALF else "") + f", got {w_down.dtype}")
    _checks.same_dtype("w_down", w_down, **params)
    _checks.same_device("x", x, w_down=w_down, residual=residual, **params)
    return activations.canonical(activation), scaling


HALF = (torch.float16, torch.bfloat16)


def _params_in(dtype, w_down, b_down, w_up, b_up, scaling):
    """The parameters in ``dtype`` (float32 master weights of half-precision x, for the paths that take
    one dtype); the call's own tensors when they already are."""
    if (w_down.dtype == dtype and w_up.dtype == dtype and (b_down is None or b_down.dtype == dtype)
            and (b_up is None or b_up.dtype == dtype)
            and not (isinstance(scaling, torch.Tensor) and scaling.dtype != dtype)):
        return w_down, b_down, w_up, b_up, scaling  # (the common case, checked without a call per tensor)
    cast = lambda t: t.to(dtype) if (isinstance(t, torch.Tensor) and t.dtype != dtype) else t
    return cast(w_down), cast(b_down), cast(w_up), cast(b_up), cast(scaling)


def reference(x, w_down, b_down, w_up, b_up, activation="relu", scaling=1.0, residual=None, add_input=False,
              layer_norm=None):
    """Eager PyTorch, differentiable through autograd; the definition every backend must match."""
    if layer_norm is not None:  # A(LN(x)) on the base x; LN's output rounded to the products' dtype
        w, b, eps = layer_norm
        if any(t is not None and t.dtype != x.dtype for t in (w, b)):
            # float32 parameters of a half x (either or both, as the contract allows): the LayerNorm in float32,
            # as the kernels compute it (PyTorch's own refuses some of these mixes)
            w, b, z = (None if w is None else w.float()), (None if b is None else b.float()), x.float()
        else:
            z = x
        y = F.layer_norm(z, (x.shape[-1],), w, b, eps).to(compute_dtype(x))
        return reference(y, w_down, b_down, w_up, b_up, activation, scaling, residual=x)
    if w_down.dtype != x.dtype:  # float32 master weights with half-precision x: used in x's dtype
        w_down, b_down, w_up, b_up, scaling = _params_in(x.dtype, w_down, b_down, w_up, b_up, scaling)
    h = activations.apply(activations.canonical(activation), F.linear(x, w_down, b_down))
    up = F.linear(h, w_up, b_up)
    base = x if residual is None else (residual + x if add_input else residual)
    if not isinstance(scaling, torch.Tensor) and scaling == 1.0:
        return base + up  # the same bits as 1.0 * up, without its launch forward and backward
    return base + scaling * up


def describe(x, w_down, activation, scaling, residual, layer_norm=None, others=()) -> dict:
    """What the dispatcher sees of a (validated) call (``others``: the call's other tensors, whose
    ``requires_grad`` counts too)."""
    params = [x, w_down, scaling if isinstance(scaling, torch.Tensor) else None, residual, *others]
    return _checks.info(x, d=x.shape[-1], r=w_down.shape[0], n=x.numel() // max(x.shape[-1], 1), activation=activation,
                        per_channel_scaling=isinstance(scaling, torch.Tensor) and scaling.dim() == 1,
                        residual=residual is not None, layer_norm=layer_norm is not None,
                        float32_residual=residual is not None and residual.dtype != x.dtype,
                        requires_grad=_checks.needs_grad(*params))


dispatch.register(OP, "eager", reference)


# ---------------------------------------------------------------------------------------------------
# Fused backends. Each is a torch.library custom op (opaque to torch.compile, with a fake-tensor rule
# and an autograd formula), so a module calling them compiles with fullgraph=True. The launchers take
# tokens flattened to (N, d) and contiguous; the run functions below do that and restore the shape.


@functools.cache  # an import statement per call costs microseconds: the launchers run per adapter per step
@functools.cache  # imported once: no import statement per call
def _triton_kernels():
    from ..kernels import bottleneck_adapter as kernels  # imports triton: only when a kernel runs

    return kernels


def _triton_forward(x: torch.Tensor, w_down: torch.Tensor, b_down: Optional[torch.Tensor], w_up: torch.Tensor,
                    b_up: Optional[torch.Tensor], scaling: Optional[torch.Tensor], scaling_value: float,
                    residual: Optional[torch.Tensor], activation: str, add_input: bool = False,
                    ln: bool = False, ln_weight: Optional[torch.Tensor] = None, ln_bias: Optional[torch.Tensor] = None,
                    ln_eps: float = 0.0, compute: Optional[torch.dtype] = None) -> torch.Tensor:
    return _triton_kernels().forward(x, w_down, b_down, w_up, b_up, scaling, scaling_value, residual, activation,
                                     add_input, (ln_weight, ln_bias, ln_eps) if ln else None, compute)


def _forward_fake(x, w_down, b_down, w_up, b_up, scaling, scaling_value, residual, activation, add_input=False,
                  ln=False, ln_weight=None, ln_bias=None, ln_eps=0.0, compute=None):
    return torch.empty_like(x if residual is None else residual)


def _absent(t: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    # custom ops return no None: an absent gradient travels as an empty tensor
    return t if t is not None else like.new_empty((0,))


def _triton_backward(dy: torch.Tensor, x: torch.Tensor, w_down: torch.Tensor, b_down: Optional[torch.Tensor],
                     w_up: torch.Tensor, b_up: Optional[torch.Tensor], scaling: Optional[torch.Tensor],
                     scaling_value: float, has_residual: bool, activation: str, need_ds: bool,
                     need_weights: bool, ln: bool = False, ln_weight: Optional[torch.Tensor] = None,
                     ln_bias: Optional[torch.Tensor] = None, ln_eps: float = 0.0,
                     compute: Optional[torch.dtype] = None) -> List[torch.Tensor]:
    dx, dwd, dbd, dwu, dbu, ds = _triton_kernels().backward(
        dy, x, w_down, b_down, w_up, b_up, scaling, scaling_value, has_residual, activation, need_ds, need_weights,
        (ln_weight, ln_bias, ln_eps) if ln else None, compute)
    return [dx, _absent(dwd, x), _absent(dbd, x), _absent(dwu, x), _absent(dbu, x), _absent(ds, x)]


def _triton_backward_fake(dy, x, w_down, b_down, w_up, b_up, scaling, scaling_value, has_residual, activation,
                          need_ds, need_weights, ln=False, ln_weight=None, ln_bias=None, ln_eps=0.0, compute=None):
    empty = lambda: x.new_empty((0,))  # one per output: outputs never alias
    like = lambda t: torch.empty_like(t) if (t is not None and need_weights) else empty()
    return [torch.empty_like(x), like(w_down), like(b_down), like(w_up), like(b_up),
            torch.empty_like(scaling) if (need_ds and scaling is not None) else empty()]


# The triton op's inputs after the nine it shares with the cuda op, and their defaults:
# add_input, ln, ln_weight, ln_bias, ln_eps, compute.
_TRITON_ONLY_DEFAULTS = (False, False, None, None, 0.0, None)


def _setup_context(ctx, inputs, output):
    (x, w_down, b_down, w_up, b_up, scaling, scaling_value, residual, activation,
     add_input, ln, ln_weight, ln_bias, ln_eps, compute) = tuple(inputs) + _TRITON_ONLY_DEFAULTS[len(inputs) - 9:]
    ctx.save_for_backward(x, w_down, b_down, w_up, b_up, scaling, ln_weight, ln_bias)
    ctx.scaling_value = scaling_value
    ctx.has_residual = residual is not None
    # dy reaches x itself too without a residual, or when x is added to it: the rows kernel adds it to dx
    ctx.dy_to_x = residual is None or add_input
    ctx.activation = activation
    ctx.ln, ctx.ln_eps, ctx.compute = ln, ln_eps, compute
    ctx.n_inputs = len(inputs)


def _backward(ctx, dy):
    x, w_down, b_down, w_up, b_up, scaling, ln_weight, ln_bias = ctx.saved_tensors
    need_ds = scaling is not None and ctx.needs_input_grad[5]
    w = any(ctx.needs_input_grad[1:5])  # False for a frozen adapter: no weight reduction
    args = (dy.contiguous(), x, w_down, b_down, w_up, b_up, scaling, ctx.scaling_value, not ctx.dy_to_x,
            ctx.activation, need_ds, w)
    if getattr(ctx, "pet_fast_eager", False):  # the autograd.Function: the launcher itself (None, not an
        # empty tensor, for an absent gradient: no allocation, no custom-op wrapper on this per-step path)
        dx, dwd, dbd, dwu, dbu, ds = _triton_kernels().backward(
            *args, (ln_weight, ln_bias, ctx.ln_eps) if ctx.ln else None, ctx.compute)
    else:
        dx, dwd, dbd, dwu, dbu, ds = TRITON_BACKWARD.custom_op(*args, ctx.ln, ln_weight, ln_bias, ctx.ln_eps, ctx.compute)
    grads = (dx, dwd if w else None, dbd if (w and b_down is not None) else None, dwu if w else None,
             dbu if (w and b_up is not None) else None, ds if need_ds else None, None,
             dy if ctx.has_residual else None, None)
    return grads + (None,) * (ctx.n_inputs - len(grads))  # add_input and the LayerNorm's: no gradient


TRITON_BACKWARD = _autograd.custom_op("bottleneck_adapter_triton_backward", _triton_backward,
                                      fake=_triton_backward_fake)
TRITON = _autograd.custom_op("bottleneck_adapter_triton", _triton_forward, fake=_forward_fake,
                             autograd=(_backward, _setup_context))


def _flat_args(x, w_down, b_down, w_up, b_up, scaling, residual, rows: bool = True):
    """(N, d)-contiguous tensors and (scaling tensor or None, scaling value) for the custom ops; with
    ``rows=False`` x and the residual keep their leading shape (contiguous)."""
    d = x.shape[-1]
    c = lambda t: t.contiguous() if t is not None else None
    if isinstance(scaling, torch.Tensor):
        s_t, s_v = scaling.contiguous(), 1.0
    else:
        s_t, s_v = None, float(scaling)
    if not rows:
        return x.contiguous(), c(w_down), c(b_down), c(w_up), c(b_up), s_t, s_v, c(residual)
    return _rows(x, d), c(w_down), c(b_down), c(w_up), c(b_up), s_t, s_v, _rows(residual, d)


def _rows(t: Optional[torch.Tensor], d: int) -> Optional[torch.Tensor]:
    """``t`` as contiguous (N, d) rows; a 2-D tensor without a reshape (a view op costs microseconds of host
    time, and a few-token serving call is bound by the host)."""
    if t is None:
        return None
    return (t if t.dim() == 2 else t.reshape(-1, d)).contiguous()


def run_triton(x, w_down, b_down, w_up, b_up, activation="relu", scaling=1.0, residual=None, add_input=False,
               layer_norm=None):
    """The triton backend: same call as :func:`reference`."""
    x2, wd, bd, wu, bu, s_t, s_v, res = _flat_args(x, w_down, b_down, w_up, b_up, scaling, residual)
    if layer_norm is None:
        ln = ()
    else:
        c = lambda t: None if t is None else t.contiguous()
        ln = (True, c(layer_norm[0]), c(layer_norm[1]), float(layer_norm[2]), compute_dtype(x))
    y = TRITON(x2, wd, bd, wu, bu, s_t, s_v, res, activations.canonical(activation), bool(add_input), *ln)
    return y if x.dim() == 2 else y.reshape(x.shape)


TRITON_MAX_R = 256


def triton_reasons(info) -> list:
    why = dispatch.triton_reasons(info)  # deterministic: no atomics, fixed reduction order
    if info["r"] > TRITON_MAX_R:
        why.append(f"bottleneck size r={info['r']} > {TRITON_MAX_R} (the r-wide hidden tile must fit in registers)")
    return why


dispatch.register(OP, "triton", run_triton, triton_reasons)


_HALF = (torch.float16, torch.bfloat16)


def as_autocast_would(x, residual, add_input, w_down, b_down, w_up, b_up, scaling) -> tuple:
    """A call's arguments (without ``layer_norm``) as eager autocast would compute them, in the forms the op
    takes: float32 x goes to the products in autocast's dtype, while the base (x itself, or x + residual with
    ``add_input``) stays float32 and the op adds it in float32 (as eager autocast adds float32 + half);
    parameters of a dtype the op does not take with that x are cast to it (F.linear under autocast casts
    them), a scaling tensor to the parameters'. Outside autocast x stays as it is, and so does everything
    the op takes with it; a residual it does not take with x is cast to x's dtype. Returns
    ``(x, residual, add_input, w_down, b_down, w_up, b_up, scaling)``."""
    if x.dtype == torch.float32:
        dt = compute_dtype(x)
        if dt in _HALF:
            if add_input and residual is not None:  # x reaches the products rounded, the base takes it in float32
                residual, add_input = residual + x, False
            x, residual = x.to(dt), (x if residual is None else residual.float())
    if residual is not None and residual.dtype != x.dtype and not (residual.dtype == torch.float32 and x.dtype in _HALF):
        residual = residual.to(x.dtype)
    dt = x.dtype
    if w_down.dtype != dt and not (w_down.dtype == torch.float32 and dt in _HALF):
        cast = lambda t: None if t is None else t.to(dt)  # noqa: E731
        w_down, b_down, w_up, b_up = cast(w_down), cast(b_down), cast(w_up), cast(b_up)
    if isinstance(scaling, torch.Tensor) and scaling.dtype != w_down.dtype:
        scaling = scaling.to(w_down.dtype)
    return x, residual, add_input, w_down, b_down, w_up, b_up, scaling


def bottleneck_adapter(
    x: torch.Tensor,
    w_down: torch.Tensor,
    b_down: Optional[torch.Tensor],
    w_up: torch.Tensor,
    b_up: Optional[torch.Tensor],
    *,
    activation: str = "relu",
    scaling: Union[float, torch.Tensor] = 1.0,
    residual: Optional[torch.Tensor] = None,
    add_input: bool = False,
    layer_norm: Optional[tuple] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """``base + scaling * (act(z @ w_down.T + b_down) @ w_up.T + b_up)`` with z = x, or LayerNorm(x) with
    ``layer_norm=(weight, bias, eps)``; ``base`` = x without a residual, the residual when given,
    ``x + residual`` with ``add_input=True``.

    See the module docstring for the contract. ``backend`` overrides the dispatcher's choice
    (``"eager"``, ``"triton"``, ``"cuda"`` or ``"auto"``).
    """
    if (layer_norm is None and isinstance(x, torch.Tensor) and x.dtype == torch.float32 and isinstance(w_down, torch.Tensor)
            and compute_dtype(x) in _HALF):
        # float32 x under autocast: every backend computes as eager autocast does (the kernels see no autocast)
        x, residual, add_input, w_down, b_down, w_up, b_up, scaling = as_autocast_would(
            x, residual, add_input, w_down, b_down, w_up, b_up, scaling)

    def resolve():
        act, s = check_inputs(x, w_down, b_down, w_up, b_up, activation, scaling, residual, add_input)
        ln = check_layer_norm(x, layer_norm, residual, add_input)
        # a plan keeps no tensor: a scaling tensor is this call's own, a number is the checked float
        return (act, None if isinstance(s, torch.Tensor) else s), describe(x, w_down, act, s, residual, ln, (b_down, w_up, b_up))

    sig = _checks.signature(x, w_down, b_down, w_up, b_up, activation, scaling, residual, add_input)
    if sig is not None and layer_norm is not None:  # its tensors, eps and autocast's dtype (the products')
        ln_sig = (_checks.signature(*layer_norm) if isinstance(layer_norm, (tuple, list)) else None)
        sig = None if ln_sig is None else sig + ln_sig + (compute_dtype(x),)
    (activation, number), impl = dispatch.plan(OP, sig, backend, resolve)
    scaling = scaling if number is None else number
    if impl.backend == "triton" and sig is not None and torch.is_grad_enabled() and not (
            torch.compiler.is_compiling() or _autograd.always_custom_op()):
        return _triton_remembering_nodes(impl.run, sig, x, w_down, b_down, w_up, b_up, activation, scaling,
                                         residual, add_input, layer_norm)
    kw = dict(add_input=True) if add_input else {}
    if layer_norm is not None:
        kw["layer_norm"] = layer_norm
    return impl.run(x, w_down, b_down, w_up, b_up, activation=activation, scaling=scaling, residual=residual, **kw)


# Per call signature: the triton backend's C++ autograd node for
# such calls once their launchers are recorded (kernels.NodeCall), or False when they cannot be. A
# training step's adapter calls then go from the op's arguments to the node without the launchers' keys.
_NODES: dict = {}
_NODES_REGISTERED: list = []


def _triton_remembering_nodes(run, sig, x, w_down, b_down, w_up, b_up, activation, scaling, residual, add_input,
                              layer_norm):
    """``run`` (the registered triton backend) for this call, or the signature's C++ node once recorded."""
    kernels = _triton_kernels()
    replay = kernels._replay
    if not (replay.enabled() and replay.active(x)):
        return run(x, w_down, b_down, w_up, b_up, activation=activation, scaling=scaling, residual=residual,
                   add_input=add_input, layer_norm=layer_norm)
    if not _NODES_REGISTERED:
        replay.register_cache(_NODES)  # emptied with the launchers' programs
        _NODES_REGISTERED.append(True)
    node = _NODES.get(sig)
    if node is None:  # not yet known: both launchers recorded (by earlier calls through the Function)?
        x2, wd, bd, wu, bu, s_t, s_v, res = _flat_args(x, w_down, b_down, w_up, b_up, scaling, residual)
        ln = None if layer_norm is None else (layer_norm[0], layer_norm[1], float(layer_norm[2]))
        node = kernels.node_call(x2, wd, bd, wu, bu, s_t, s_v, res, activation, bool(add_input), ln,
                                 None if layer_norm is None else compute_dtype(x))
        if node is not None:
            if len(_NODES) >= dispatch.PLANS_MAX:
                _NODES.clear()
            _NODES[sig] = node
    if node:
        y = node(x, w_down, b_down, w_up, b_up, scaling, residual, layer_norm)
        if y is not None:
            _LAST.node = (weakref.ref(y), node)  # (weak: a functional caller's output is not kept alive)
            return y
    return run(x, w_down, b_down, w_up, b_up, activation=activation, scaling=scaling, residual=residual,
               add_input=add_input, layer_norm=layer_norm)


# ---------------------------------------------------------------------------------------------------
# Replayed calls: a caller that repeats one kind of call (an adapter module, once per step) skips the op's
# Python once its call has run as the C++ node.
#
# The op's Python per call (signature, plan, node lookup, argument preparation) cost about 20 us of host
# time on the CPU, per adapter site and step. A ReplayedCall keeps the node behind a C++ guard
# (kernels/_replay.py guarded) that checks what the signature and plan read of the tensors, grad,
# deterministic and autocast modes; it checks the rest here (the scalars, the dispatch route, the replay's
# generation). Any difference returns None and the caller runs the op.

_LAST = threading.local()  # (weakref to the output, NodeCall) of this thread's last call that ran as a node


class ReplayedCall:
    """A caller's adapter call replayed by one C++ call while its facts stay those of the call it was made
    from (:func:`replayed_call`). ``module(...)`` returns the output with its autograd node, or None: then
    the caller calls the op. Not copied with its holder (deepcopy and pickling give None)."""

    __slots__ = ("guard", "route", "activation", "scaling", "add_input", "eps")

    def __call__(self, x, w_down, b_down, w_up, b_up, activation, scaling, residual, add_input, layer_norm):
        if activation != self.activation or add_input != self.add_input or _replayed.route() != self.route:
            return None
        if isinstance(scaling, torch.Tensor):
            s_t = scaling  # (the guard checks it is there, and as it was)
        elif self.scaling is None or scaling != self.scaling:
            return None
        else:
            s_t = None
        if layer_norm is None:
            if self.eps is not None:
                return None
            lnw = lnb = None
        else:
            lnw, lnb, eps = layer_norm
            if eps != self.eps:
                return None
        try:
            return self.guard([x, w_down, b_down, w_up, b_up, s_t, residual, lnw, lnb])
        except RuntimeError as exc:  # a failing launch: as a failing node (kernels/_replay.py autograd)
            _triton_kernels()._replay.give_up(exc)
            return None

    def __deepcopy__(self, memo):
        return None

    def __reduce__(self):
        return (_replayed.no_call, ())


def replayed_call(y, x, w_down, b_down, w_up, b_up, activation, scaling, residual, add_input, layer_norm):
    """A :class:`ReplayedCall` for calls like the op call that just returned ``y`` with these arguments, when
    that call ran as the C++ node; None otherwise. The caller must pass the op's arguments unchanged to
    both."""
    last = getattr(_LAST, "node", None)
    _LAST.node = None
    if last is None or last[0]() is not y:
        return None
    node = last[1]
    guard = node.guarded(node.inputs(x, w_down, b_down, w_up, b_up, scaling, residual, layer_norm))
    if guard is None:
        return None
    call = ReplayedCall()
    call.guard, call.route, call.activation, call.add_input = guard, _replayed.route(), activation, add_input
    call.scaling = None if isinstance(scaling, torch.Tensor) else scaling
    call.eps = None if layer_norm is None else layer_norm[2]
    return call


# The cuda backend (csrc/bottleneck_adapter.cu): forward and backward for few tokens (serving and
# small-batch steps), where eager PyTorch and the tiled Triton kernels are bound by launches.
CUDA_MAX_N = 64
CUDA_MAX_R = 256
# the AdapterAct enum of csrc/bottleneck_adapter.h (the same codes as the Triton kernels')
CUDA_ACT_CODES = {"relu": 0, "gelu": 1, "gelu_tanh": 2, "silu": 3, "tanh": 4, "identity": 5}


def _extension():
    ext = _ext.load()
    if ext is None:
        raise RuntimeError(f"bottleneck_adapter (cuda): the extension is not available: {_ext.reason()}")
    return ext


def _cuda_forward(x: torch.Tensor, w_down: torch.Tensor, b_down: Optional[torch.Tensor], w_up: torch.Tensor,
                  b_up: Optional[torch.Tensor], scaling: Optional[torch.Tensor], scaling_value: float,
                  residual: Optional[torch.Tensor], activation: str) -> torch.Tensor:
    return _extension().bottleneck_adapter_forward_small(x, w_down, b_down, w_up, b_up, scaling, scaling_value,
                                                         residual, CUDA_ACT_CODES[activation])


def _cuda_backward(dy: torch.Tensor, x: torch.Tensor, w_down: torch.Tensor, b_down: Optional[torch.Tensor],
                   w_up: torch.Tensor, b_up: Optional[torch.Tensor], scaling: Optional[torch.Tensor],
                   scaling_value: float, has_residual: bool, activation: str, need_ds: bool) -> List[torch.Tensor]:
    need_ds = need_ds and scaling is not None
    if x.shape[0] == 0:
        z = lambda t: torch.zeros_like(t) if t is not None else x.new_empty((0,))
        return [torch.empty_like(x), z(w_down), z(b_down), z(w_up), z(b_up), z(scaling) if need_ds else x.new_empty((0,))]
    dx, dwd, dbd, dwu, dbu, ds = _extension().bottleneck_adapter_backward_small(
        dy, x, w_down, b_down, w_up, b_up, scaling, scaling_value, has_residual, CUDA_ACT_CODES[activation], need_ds)
    if need_ds:
        ds = (ds if scaling.dim() == 1 else ds.sum()).to(scaling.dtype)
    else:
        ds = x.new_empty((0,))
    # Outputs of a custom op must not alias one another: absent gradients get fresh empty tensors here
    # rather than whatever placeholders the extension returned (an older build returned one shared empty
    # tensor for both biases, which torch rejects).
    if b_down is None:
        dbd = x.new_empty((0,))
    if b_up is None:
        dbu = x.new_empty((0,))
    return [dx, dwd, dbd, dwu, dbu, ds]


def _cuda_backward_fake(dy, x, w_down, b_down, w_up, b_up, scaling, scaling_value, has_residual, activation, need_ds):
    like = lambda t: torch.empty_like(t) if t is not None else x.new_empty((0,))  # outputs never alias
    return [torch.empty_like(x), torch.empty_like(w_down), like(b_down), torch.empty_like(w_up), like(b_up),
            like(scaling if need_ds else None)]


def _cuda_grad(ctx, dy):
    x, w_down, b_down, w_up, b_up, scaling = ctx.saved_tensors[:6]  # (the setup saves two LayerNorm slots)
    need_ds = scaling is not None and ctx.needs_input_grad[5]
    dx, dwd, dbd, dwu, dbu, ds = CUDA_BACKWARD.within(ctx)(
        dy.contiguous(), x, w_down, b_down, w_up, b_up, scaling, ctx.scaling_value, ctx.has_residual,
        ctx.activation, need_ds)
    return (dx, dwd, dbd if b_down is not None else None, dwu, dbu if b_up is not None else None,
            ds if need_ds else None, None, dy if ctx.has_residual else None, None)


CUDA_BACKWARD = _autograd.custom_op("bottleneck_adapter_cuda_backward", _cuda_backward, fake=_cuda_backward_fake)
CUDA = _autograd.custom_op("bottleneck_adapter_cuda", _cuda_forward, fake=_forward_fake,
                           autograd=(_cuda_grad, _setup_context))


def run_cuda(x, w_down, b_down, w_up, b_up, activation="relu", scaling=1.0, residual=None, add_input=False,
             layer_norm=None):
    """The cuda backend: same call as :func:`reference`. Up to CUDA_MAX_N tokens, the few-token kernels:
    float32 parameters of half-precision x are cast first (the kernels take one dtype); with ``add_input``
    the base x + residual is added before the kernels (one more launch: the kernels take one base). Beyond,
    and for the forms the few-token kernels do not take (:func:`_few_token_limits`), the C++ autograd node of
    csrc/bottleneck_adapter_autograd.cpp, which takes every form of the call."""
    d = x.shape[-1]
    if (x.numel() > CUDA_MAX_N * d or w_down.shape[0] > CUDA_MAX_R or layer_norm is not None
            or (residual is not None and residual.dtype != x.dtype)):
        s_t, s_v = (scaling, 1.0) if isinstance(scaling, torch.Tensor) else (None, float(scaling))
        ln = {}
        if layer_norm is not None:
            ln = dict(use_ln=True, ln_weight=layer_norm[0], ln_bias=layer_norm[1], ln_eps=float(layer_norm[2]),
                      compute=compute_dtype(x))
        y = _extension().bottleneck_adapter_composite(
            _rows(x, d), w_down, b_down, w_up, b_up, s_t, s_v,
            None if residual is None else residual.reshape(-1, d), CUDA_ACT_CODES[activation], bool(add_input), **ln)
        return y if x.dim() == 2 else y.reshape(x.shape)
    if add_input:
        residual = residual + x
    w_down, b_down, w_up, b_up, scaling = _params_in(x.dtype, w_down, b_down, w_up, b_up, scaling)
    if not torch.is_grad_enabled() and not torch.compiler.is_compiling() and not _autograd.always_custom_op():
        # serving: the kernels take x (..., d) as rows, so a (batch, tokens, d) call costs no view ops on the
        # host (a few-token forward is bound by the host); what the custom op would run, without its wrapper
        return _cuda_forward(*_flat_args(x, w_down, b_down, w_up, b_up, scaling, residual, rows=False),
                             activations.canonical(activation))
    x2, wd, bd, wu, bu, s_t, s_v, res = _flat_args(x, w_down, b_down, w_up, b_up, scaling, residual)
    y = CUDA(x2, wd, bd, wu, bu, s_t, s_v, res, activations.canonical(activation))
    return y if x.dim() == 2 else y.reshape(x.shape)


def _few_token_limits(r: int, float32_residual: bool, layer_norm: bool) -> list:
    """What the few-token kernels do not take (the C++ autograd node takes these calls instead)."""
    why = []
    if r > CUDA_MAX_R:
        why.append(f"bottleneck size r={r} > {CUDA_MAX_R}")
    if float32_residual:
        why.append("a float32 residual with half-precision x (the few-token kernels take one dtype)")
    if layer_norm:
        why.append("a LayerNorm before the adapter (the few-token kernels read x as it is)")
    return why


def cuda_reasons(info) -> list:
    why = dispatch.cuda_reasons(info)
    limits = _few_token_limits(info["r"], bool(info.get("float32_residual")), bool(info.get("layer_norm")))
    if info["n"] > CUDA_MAX_N or limits:  # the C++ autograd node
        if torch.compiler.is_compiling():
            what = f"{info['n']} tokens > {CUDA_MAX_N}" if info["n"] > CUDA_MAX_N else "; ".join(limits)
            why.append(f"{what} under torch.compile: beyond the few-token kernels the cuda backend is a C++ "
                       "autograd node for eager calls (compiled code takes the custom ops)")
    return why


dispatch.register(OP, "cuda", run_cuda, cuda_reasons)
dispatch.set_preference(OP, _timings.preference(OP))
