"""The eager-mode path into the fused ops' custom ops.

Every fused backend is a ``torch.library`` custom op with a fake-tensor rule and an autograd formula, so
that ``torch.compile(fullgraph=True)`` captures it as one opaque node. Outside compiled code that
machinery is costly on the host: measured on the CPU, a call of a custom op with an autograd formula
costs about 130 us before its kernel launches, against about 5 us for a ``torch.autograd.Function``
(and a BERT-base training step at batch 32 x 128 is bound by the host). So eager calls go through an
``autograd.Function`` built from the very same three functions (forward, setup_context, backward), and
only code being compiled calls the custom op: both paths run the same launchers and the same formulas.

``PET_FAST_CUSTOM_OPS=1`` sends eager calls through the custom ops too (tests compare the two paths).
"""
from __future__ import annotations

from typing import Callable

import torch

from .. import _env

ENV_VAR = "PET_FAST_CUSTOM_OPS"


def always_custom_op() -> bool:
    return _env.get(ENV_VAR, "0") == "1"


def function(name: str, forward: Callable, setup_context: Callable, backward: Callable, op_name: str = "") -> type:
    """An ``autograd.Function`` running ``forward(*inputs)``, ``setup_context(ctx, inputs, output)`` and
    ``backward(ctx, *grads)`` as registered with ``register_autograd`` of a custom op.

    It is written in the form with ``ctx`` in ``forward`` (which calls the two functions in turn), not
    with a separate ``setup_context``: for that form ``Function.apply`` binds the call's arguments to
    ``forward``'s signature through ``inspect`` on every call, which measured 15 us per call against
    5 us on the CPU. (torch.func transforms need the separate form; they do not run through the fused
    ops anyway, whose custom ops refuse them too.)"""

    def fwd(ctx, *inputs):
        output = forward(*inputs)
        setup_context(ctx, inputs, output)
        ctx.pet_fast_eager = True  # its backward then calls the eager backward ops too (Op.within)
        return output

    def bwd(ctx, *grads):
        if not torch.is_grad_enabled():
            return backward(ctx, *grads)
        with torch.no_grad():  # create_graph=True: see refuse_second_order
            out = backward(ctx, *grads)
        return refuse_second_order(op_name or name, out, grads + tuple(ctx.saved_tensors))

    return type(name, (torch.autograd.Function,), {"forward": staticmethod(fwd), "backward": staticmethod(bwd)})


def refuse_second_order(op: str, grads: tuple, depends_on) -> tuple:
    """A backward's results ``grads`` (a tuple, None where there is no gradient) as computed, or, when one of
    ``depends_on`` requires grad (the backward ran under create_graph=True), as outputs of a node whose own
    backward raises: the fused kernels' gradients are no functions of the op's inputs to autograd, so a second
    differentiation through them would treat them as constants, silently. The node's inputs are ``depends_on``,
    so that differentiating toward any of them reaches it. Used as values the gradients are unchanged. The C++
    autograd nodes do the same (csrc/second_order.h)."""
    depends = [t for t in depends_on if isinstance(t, torch.Tensor) and t.requires_grad]
    if not depends:
        return grads
    at = [i for i, t in enumerate(grads) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    refused = _Refused.apply(SECOND_ORDER.format(op=op), len(at), *(grads[i] for i in at), *depends)
    out = list(grads)
    for i, t in zip(at, refused if isinstance(refused, tuple) else (refused,)):
        out[i] = t
    return tuple(out)


SECOND_ORDER = ("pet_fast: the backward of {op} ran fused kernels, whose gradients cannot be differentiated again "
                "(create_graph=True, e.g. a gradient penalty); run it under pet_fast.use_backend('eager') for "
                "higher-order gradients")


class _Refused(torch.autograd.Function):
    """Its first ``n`` tensors as outputs (aliases); its backward raises ``message``."""

    @staticmethod
    def forward(ctx, message, n, *tensors):
        ctx.message = message
        return tuple(t.detach() for t in tensors[:n])

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(ctx.message)


class Op:
    """A fused op's two entry points: ``Op(custom_op, impl)`` calls ``custom_op`` in compiled code and
    ``impl`` (the same computation, without the dispatcher's overhead) otherwise.

    For a forward with an autograd formula, ``impl`` is ``function(...).apply``; for a backward-only op
    (called from an autograd formula), the undecorated function itself."""

    __slots__ = ("custom_op", "impl", "forward")

    def __init__(self, custom_op: Callable, impl: Callable, forward: Callable | None = None):
        self.custom_op = custom_op
        self.impl = impl
        self.forward = forward  # for an op with an autograd formula: its forward alone, for calls without grad

    def __call__(self, *args):
        if torch.compiler.is_compiling() or always_custom_op():
            return self.custom_op(*args)
        if self.forward is not None and not torch.is_grad_enabled():
            return self.forward(*args)  # nothing to record: no autograd.Function (~5 us of host time)
        return self.impl(*args)

    def within(self, ctx) -> Callable:
        """The entry point for an autograd formula with context ``ctx``: the eager function when the
        formula runs for the autograd.Function, the custom op when it runs for the custom op (also
        while torch.compile or opcheck traces the backward with fake tensors)."""
        return self.impl if getattr(ctx, "pet_fast_eager", False) else self.custom_op


def custom_op(name: str, fn: Callable, *, fake: Callable, autograd: tuple | None = None,
              returns_list: bool = False) -> Op:
    """Registers ``fn`` as the custom op ``pet_fast::<name>`` (schema from its annotations) with the
    fake-tensor rule ``fake`` and, when given, ``autograd = (backward, setup_context)``; returns the
    :class:`Op` that calls it in compiled code and the eager path otherwise. ``returns_list``: ``fn``
    returns ``List[Tensor]``; its autograd.Function returns a tuple (as a Function must) and hands
    ``backward`` the gradients as one list, as the custom op's autograd does."""
    op = torch.library.custom_op(f"pet_fast::{name}", mutates_args=())(fn)
    op.register_fake(fake)
    if autograd is None:
        return Op(op, fn)
    backward, setup_context = autograd
    op.register_autograd(backward, setup_context=setup_context)
    if returns_list:
        fn_eager, backward_eager = (lambda *a: tuple(fn(*a))), (lambda ctx, *grads: backward(ctx, list(grads)))
    else:
        fn_eager, backward_eager = fn, backward
    return Op(op, function(f"_{name}_function", fn_eager, setup_context, backward_eager, f"pet_fast::{name}").apply,
              fn_eager)
