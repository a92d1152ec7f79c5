"""Where the methods run inside a model: per-module forward overrides that read the active task.

A *site* is a module of the pretrained model whose forward pet_fast replaces with an ``Override``
(an instance attribute, so the module keeps its class, its state-dict keys and its parameters). The
override looks up which of the model's active tasks (``registry.active``) has a module in the
site's ``pet_fast_tasks`` ModuleDict and runs it; with no active task there it runs the original
forward unchanged. One override per module serves every task attached there.

Kinds of site (the functions in ``KINDS``):
  ``bert_sublayer``  BertSelfOutput / BertOutput (post-LN): ``LN(dropout(dense(hs)) + input)``
  ``sublayer``       attention / MLP of a pre-LN block (GPT-2, Llama): their output ``h``
  ``block``          a pre-LN block: its output (the residual stream after the FFN)
  ``capture``        a norm in front of a sublayer: remembers its input for a parallel adapter
  ``generic``        any module named by ``target_modules``: its input and output
  ``linear``         an nn.Linear / GPT-2 Conv1D with masks
  ``head``           the task head: per-task copies
  ``side``           the backbone: side-tuning
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from .._threads import ThreadSlot
from ..tasks import TASK_ATTR

_OVERRIDE = "forward"


class Override:
    """Replaces ``host.forward``; calls ``KINDS[kind](self, *args, **kwargs)``."""

    def __init__(self, host: nn.Module, kind: str, registry, peer: Optional[nn.Module] = None):
        self.host = host
        self.kind = kind
        self.registry = registry
        self.peer = peer
        # a "sublayer" site's input of the norm in front of it, set by that norm's "capture" site (parallel
        # adapters read it) and taken once; per thread (threads running the model at once each hand over their
        # own). Kept on this plain object, not on the module: torch.compile (torch 2.11) cannot trace a module's
        # __dict__.pop.
        self.captured = ThreadSlot()

    def original(self, *args, **kwargs):
        return type(self.host).forward(self.host, *args, **kwargs)

    def active(self) -> Optional[Tuple[str, nn.Module]]:
        # dicts read directly, not nn.Module's attribute and ModuleDict lookups: this runs at every site
        # (every linear under mask-tuning) of every forward
        holder = self.host._modules.get(TASK_ATTR)
        if holder is None:
            return None
        modules = holder._modules
        found = None
        for n in self.registry.active:
            m = modules.get(n)
            if m is not None:
                if found is not None:
                    names = [n for n in self.registry.active if n in modules]
                    if self.kind == "head":
                        raise RuntimeError(f"tasks {names} each have their own copy of the task head; activate one "
                                           f"at a time, or inject all but one with train_head=False")
                    raise RuntimeError(f"tasks {names} are all active on the same module ({type(self.host).__name__}); "
                                       "activate one at a time (combine adapters with FusionConfig)")
                found = (n, m)
        return found

    def __call__(self, *args, **kwargs):
        return KINDS[self.kind](self, *args, **kwargs)


def check_installable(host: nn.Module, kind: str) -> None:
    """Raise ValueError if ``install(host, kind, ...)`` would fail (checked before changing anything)."""
    current = host.__dict__.get(_OVERRIDE)
    if isinstance(current, Override):
        if current.kind != kind:
            raise ValueError(f"module {type(host).__name__} already runs pet_fast site {current.kind!r}, cannot also be a {kind!r} site")
    elif current is not None:
        raise ValueError(f"module {type(host).__name__} already has a patched forward; pet_fast cannot attach there")


def install(host: nn.Module, kind: str, registry, peer: Optional[nn.Module] = None) -> None:
    """Install (once) an override of ``kind`` on ``host``."""
    current = host.__dict__.get(_OVERRIDE)
    if isinstance(current, Override):
        if current.kind != kind:
            raise ValueError(f"module {type(host).__name__} already runs pet_fast site {current.kind!r}, cannot also be a {kind!r} site")
        return
    if current is not None:
        raise ValueError(f"module {type(host).__name__} already has a patched forward; pet_fast cannot attach there")
    host.__dict__[_OVERRIDE] = Override(host, kind, registry, peer)


def uninstall_if_unused(host: nn.Module) -> None:
    holder = getattr(host, TASK_ATTR, None)
    if holder is not None and len(holder) > 0:
        return
    if holder is not None:
        delattr(host, TASK_ATTR)
    current = host.__dict__.get(_OVERRIDE)
    if isinstance(current, Override):
        if current.kind == "capture" and current.peer is not None and len(getattr(current.peer, TASK_ATTR, ())) > 0:
            return  # the sublayer still has parallel adapters that read this input
        del host.__dict__[_OVERRIDE]


def site_kind(host: nn.Module) -> Optional[str]:
    current = host.__dict__.get(_OVERRIDE)
    return current.kind if isinstance(current, Override) else None


# --------------------------------------------------------------------------------------------
# adapter / fusion computations, shared by the kinds

def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _replace_first(out, value):
    return (value,) + tuple(out[1:]) if isinstance(out, tuple) else value


def _adapter(module, inp, residual, add_input=False):
    """``residual + A(inp)`` (``inp + residual + A(inp)`` with ``add_input``); under autocast a float32
    residual stream stays float32 (the module adds it in float32, no cast launch) and float32 inputs
    reach the products in autocast's dtype. A residual that is the input itself is passed as none: the
    op's base is then its input, and its backward adds the two gradients of the input in its kernel."""
    return module(inp, residual=None if residual is inp else residual, add_input=add_input)


def _frozen_layer_norm(norm) -> Optional[tuple]:
    """(weight, bias, eps) of an nn.LayerNorm over the last dimension whose parameters do not train (the
    base's, as adapters leave it), for the adapter op to apply itself; None for anything else, and for
    parameters on the meta device: an offloading hook (accelerate) loads them when the norm itself is called."""
    if type(norm) is not nn.LayerNorm or len(norm.normalized_shape) != 1 or norm._forward_pre_hooks:
        return None  # (a hook, e.g. pruning's, makes its parameters when it is called)
    p = norm._parameters
    if "weight" not in p or "bias" not in p:  # parametrised: the module makes them
        return None
    w, b = p.get("weight"), p.get("bias")
    if any(t is not None and (t.requires_grad or t.is_meta) for t in (w, b)):
        return None
    return w, b, norm.eps


def _children(self: Override, fusion) -> list:
    holder = getattr(self.host, TASK_ATTR)
    missing = [c for c in fusion.adapter_names if c not in holder]
    if missing:
        raise RuntimeError(f"fusion needs adapters {missing}, which are no longer attached here")
    return [holder[c] for c in fusion.adapter_names]


def _fuse(self, fusion, inp, query, residual, *, float32_residual: bool = False):
    """The fusion at this site, on ``inp`` (and ``query``) in inp's dtype. The residual is cast to that dtype
    too, but with ``float32_residual``: a float32 residual that the op adds after the fusion stays float32
    (the op adds it so, and returns float32)."""
    adapters = _children(self, fusion)
    dt = inp.dtype
    if not (float32_residual and residual.dtype == torch.float32 and not fusion.residual_before):
        residual = residual.to(dt)
    return fusion.fuse(inp, query.to(dt), residual, adapters)


def _is_fusion(module) -> bool:
    return hasattr(module, "adapter_names")


def _bert_sublayer(self: Override, hidden_states, input_tensor, *args, **kwargs):
    act = self.active()
    if act is None or args or kwargs:
        return self.original(hidden_states, input_tensor, *args, **kwargs)
    _, module = act
    mods = self.host._modules  # (not nn.Module's attribute lookup, three times per site and step)
    h = mods["dropout"](mods["dense"](hidden_states))
    x = input_tensor
    LN = mods["LayerNorm"]
    placement = module.placement
    if _is_fusion(module):
        # LN(fusion + h + x): the op adds the residual s = h + x itself (float32 under autocast, as the add
        # promotes it), so that neither h is cast nor x added after the op (four launches per layer and step).
        # With residual_before, h joins every adapter output before the fusion (the op's residual is h), and x
        # is added after it.
        before = module.residual_before
        s = h + x if (placement == "pfeiffer" or not before) else None
        res = h if before else s
        if placement == "houlsby":
            out = _fuse(self, module, h, h, res, float32_residual=True)
        elif placement == "pfeiffer":
            y = LN(s)
            out = _fuse(self, module, y, h if module.query_before_ln else y, res, float32_residual=True)
        else:  # parallel: the adapters read the sublayer input
            out = _fuse(self, module, x, x, res, float32_residual=True)
        return LN(out + x.to(out.dtype)) if before else LN(out)
    if placement == "houlsby":  # LN(h + x + A(h)): the op adds h + x itself (no add launch, forward or backward)
        out = _adapter(module, h, x, add_input=True)
    elif placement == "pfeiffer":  # LN(s + A(LN(s))), s = h + x: the op applies the inner (frozen) LN itself
        s = h + x
        ln = _frozen_layer_norm(LN)
        out = module(s, layer_norm=ln) if ln is not None else _adapter(module, LN(s), s)
    else:  # parallel: LN(h + x + A(x))
        out = _adapter(module, x, h, add_input=True)
    return LN(out)


def _sublayer(self: Override, *args, **kwargs):
    out = self.original(*args, **kwargs)
    act = self.active()
    if act is None:
        self.captured.set(None)
        return out
    _, module = act
    h = _first(out)
    if module.placement == "parallel":
        x = self.captured.get()
        self.captured.set(None)
        if x is None:
            raise RuntimeError("parallel adapter: the input of the norm in front of this sublayer was not seen")
        new = _fuse(self, module, x, x, h) if _is_fusion(module) else _adapter(module, x, h)
    else:
        new = _fuse(self, module, h, h, h) if _is_fusion(module) else _adapter(module, h, h)
    return _replace_first(out, new)


def _block(self: Override, *args, **kwargs):
    out = self.original(*args, **kwargs)
    act = self.active()
    if act is None:
        return out
    _, module = act
    y = _first(out)
    new = _fuse(self, module, y, y, y) if _is_fusion(module) else _adapter(module, y, y)
    return _replace_first(out, new)


def _capture(self: Override, x, *args, **kwargs):
    peer = None if self.peer is None else _override_of(self.peer)
    if peer is not None:
        peer.captured.set(x)
    return self.original(x, *args, **kwargs)


def _override_of(host: nn.Module) -> Optional[Override]:
    """``host``'s Override, also where a forward wrapped after it hides it (accelerate's hooks keep the forward
    they wrap as ``_old_forward``)."""
    found = host.__dict__.get(_OVERRIDE)
    if isinstance(found, Override):
        return found
    return next((v for v in host.__dict__.values() if isinstance(v, Override)), None)


def _generic(self: Override, *args, **kwargs):
    out = self.original(*args, **kwargs)
    act = self.active()
    if act is None:
        return out
    _, module = act
    h = _first(out)
    if module.placement == "parallel":
        x = args[0] if args else next(iter(kwargs.values()))
        if x.shape[-1] != h.shape[-1]:
            raise RuntimeError("parallel adapter on a generic target needs a module whose input and output widths match")
        new = _fuse(self, module, x, x, h) if _is_fusion(module) else _adapter(module, x, h)
    else:
        new = _fuse(self, module, h, h, h) if _is_fusion(module) else _adapter(module, h, h)
    return _replace_first(out, new)


def _linear(self: Override, x, *args, **kwargs):
    mixed = getattr(self.registry, "mixed", None)  # mask tasks serving one batch (mask.mixed_mask_tasks)
    if mixed is not None:
        out = mixed.linear(self.host, x)
        if out is not None:
            return out
    act = self.active()
    if act is None:
        return self.original(x, *args, **kwargs)
    name, scores_module = act
    return scores_module.apply_to(self.host, x, name)


def _head(self: Override, *args, **kwargs):
    mixed = getattr(self.registry, "mixed", None)
    if mixed is not None:
        out = mixed.head(self.host, args, kwargs)
        if out is not None:
            return out
    act = self.active()
    if act is None:
        return self.original(*args, **kwargs)
    return act[1](*args, **kwargs)


def _side(self: Override, *args, **kwargs):
    from .side import side_forward

    return side_forward(self, *args, **kwargs)


KINDS: Dict[str, Callable] = {
    "bert_sublayer": _bert_sublayer,
    "sublayer": _sublayer,
    "block": _block,
    "capture": _capture,
    "generic": _generic,
    "linear": _linear,
    "head": _head,
    "side": _side,
}


def hosts_with_task(model: nn.Module, name: str) -> List[Tuple[str, nn.Module]]:
    out = []
    for mod_name, mod in model.named_modules():
        holder = mod.__dict__.get("_modules", {}).get(TASK_ATTR)
        if holder is not None and name in holder:
            out.append((mod_name, mod))
    return out
