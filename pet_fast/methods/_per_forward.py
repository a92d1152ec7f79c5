"""State kept for one forward of a model: what a method computes once per forward for all its layers.

A forward pre-hook on the model opens a forward, a forward hook (also called when the forward raises)
closes it; while one is open, :attr:`PerForward.cache` is a dict for that forward only (per thread:
threads sharing a model keep apart). It is not open outside a forward of the model (a layer called on its
own), while torch.compile traces (compiled code takes the per-layer path, which it fuses), and while
transformers' gradient checkpointing is on or a region of torch.utils.checkpoint runs (a recomputed layer must
not find another forward's tensors).
Parameter updates between forwards are always seen: nothing outlives the forward.
"""
from __future__ import annotations

import copy
import threading
from typing import Sequence

import torch
from torch import nn

from ..ops import _autograd


class PerForward:
    def __init__(self, checkpoint_modules: Sequence[nn.Module]):
        self.checkpoint_modules = list(checkpoint_modules)
        self._local = threading.local()

    def __deepcopy__(self, memo):
        twin = type(self).__new__(type(self))
        memo[id(self)] = twin
        for k, v in self.__dict__.items():
            if k != "_local":
                twin.__dict__[k] = copy.deepcopy(v, memo)
        twin._local = threading.local()
        return twin

    def __getstate__(self):
        state = dict(self.__dict__)
        del state["_local"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._local = threading.local()

    @property
    def open(self) -> bool:
        """Whether this thread is inside a forward of the model, outside a checkpointed region."""
        return getattr(self._local, "open", False) and not in_checkpointed_region()

    @property
    def cache(self) -> dict:
        return getattr(self._local, "cache", {})

    def start(self, module, args, kwargs):
        if torch.compiler.is_compiling():
            return None
        local = self._local
        local.cache = {}
        local.open = not any(getattr(m, "gradient_checkpointing", False) for m in self.checkpoint_modules)
        return None

    def stop(self, module, args, kwargs, output):
        if torch.compiler.is_compiling():
            return None
        self._local.open = False
        self._local.cache = {}
        return None

    def install(self, module: nn.Module) -> None:
        """Open and close this state around every forward of ``module``."""
        self.handles = [module.register_forward_pre_hook(self.start, with_kwargs=True),
                        module.register_forward_hook(self.stop, with_kwargs=True, always_call=True)]

    def uninstall(self) -> None:
        for handle in getattr(self, "handles", ()):
            handle.remove()
        self.handles = []


# torch.utils.checkpoint's non-reentrant regions (its own wrappers, FSDP's and accelerate's activation
# checkpointing, a user's checkpoint() around layers) run under its saved-tensor hooks. A layer there must not
# take tensors made for the whole forward: its recomputation, in the backward, runs after the forward closed
# (the per-layer path) and must save what the first run saved. (Reentrant regions run without grad: nothing
# is saved there.)
_TOP_SAVED_TENSOR_HOOKS = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)


def in_checkpointed_region() -> bool:
    if _TOP_SAVED_TENSOR_HOOKS is None:
        return False
    hooks = _TOP_SAVED_TENSOR_HOOKS(False)
    return hooks is not None and getattr(hooks[0], "__module__", None) == "torch.utils.checkpoint"


def checkpoint_modules(model: nn.Module) -> list:
    """The modules of ``model`` that carry transformers' ``gradient_checkpointing`` switch."""
    return [m for m in model.modules() if hasattr(m, "gradient_checkpointing")]


def installed(model: nn.Module, attr: str, cls) -> PerForward:
    """The model's ``cls`` state kept as ``model.<attr>`` (a plain attribute: not a submodule, not in the
    state dict), made and installed around the base model's forward on first use."""
    state = model.__dict__.get(attr)
    if state is None:
        base = getattr(model, "base_model", model)
        state = cls(checkpoint_modules(base))
        state.install(base)
        model.__dict__[attr] = state
    return state


def uninstalled(model: nn.Module, attr: str) -> None:
    """Removes the state kept as ``model.<attr>`` and its hooks (the model's last task that used it is gone)."""
    state = model.__dict__.pop(attr, None)
    if state is not None:
        state.uninstall()


def forgotten(model: nn.Module, attr: str, name: str, registry, config_type) -> None:
    """Task ``name`` is gone: its entry leaves the ``sites`` of the state kept as ``model.<attr>``, and the state
    and its hooks go with the model's last task of ``config_type``."""
    state = model.__dict__.get(attr)
    if state is not None:
        state.sites.pop(name, None)
    if not any(isinstance(c, config_type) for c in registry.configs.values()):
        uninstalled(model, attr)


def attached(host: nn.Module, name: str, module: nn.Module) -> bool:
    """Whether ``module`` is still task ``name``'s module at ``host`` (removed tasks are detached)."""
    from ..tasks import TASK_ATTR

    holder = host._modules.get(TASK_ATTR)
    return holder is not None and holder._modules.get(name) is module


def _float_copy(steps: torch.Tensor) -> torch.Tensor:
    return steps.to(torch.float32, copy=True)


def _float_copy_fake(steps: torch.Tensor) -> torch.Tensor:
    return torch.empty(steps.shape, dtype=torch.float32, device=steps.device)


# A step count that a compiled forward reads from a buffer and then advances (fusion's temperature annealing,
# side-tuning's alpha schedule), read through an opaque op: AOT autograd recomputes plain arithmetic on a graph
# input in the backward instead of saving it, and by then the buffer holds the next count (fusion's key
# gradients came at the next step's temperature, x 50/49.95). The op's output is saved instead.
counted_steps = _autograd.custom_op("counted_steps", _float_copy, fake=_float_copy_fake)
