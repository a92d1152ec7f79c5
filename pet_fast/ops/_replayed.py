"""What a module's replayed call (a C++ guard in front of an op's C++ autograd node, kept by the module
between its calls) must see unchanged besides the tensors' facts, which the guard checks itself.

The adapter's ``ReplayedCall`` (ops/bottleneck_adapter.py) and the stacked fusion's ``ReplayedStackedCall``
(ops/adapter_fusion.py) skip their op's Python (argument checks, signature, plan, the launchers' keys) on
repeated calls; anything here that differs from when they were made sends the call back to the op."""
from __future__ import annotations

import functools

from .. import dispatch
from . import _autograd


@functools.cache  # imported once
def replay():
    from ..kernels import _replay

    return _replay


def route() -> tuple:
    """What besides the arguments picks a call's path: the requested backend (argument None: a use_backend()
    block or the environment), the Triton interpreter, the custom-op mode, the plans' and the replay's
    generations."""
    r = replay()
    return (dispatch.requested(None)[0], dispatch.triton_interpreting(), _autograd.always_custom_op(),
            dispatch.plans_generation(), r.generation(), r.enabled())


def no_call():
    """What a copied (deepcopy) or unpickled replayed call becomes: nothing (the copy's first call runs the op)."""
    return None
