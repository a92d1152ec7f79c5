"""Attaching methods to a model: ``inject``, the per-model task registry, ``set_active``.

Every method has a config dataclass (a :class:`MethodConfig` subclass registered with
:func:`register_method`) whose ``attach(model, name, registry)`` adds the task's modules in place.
The rules every method follows, so that saving, loading and switching stay generic:

* A task's trainable modules live in ``nn.ModuleDict`` attributes named ``pet_fast_tasks`` (the
  constant ``TASK_ATTR``), keyed by the task name, on the modules they change (or on the model itself
  for model-wide parts such as a prefix encoder). So every parameter of task ``name`` has a
  state-dict key containing ``"pet_fast_tasks.<name>."``.
* Wrappers that run a task's modules read ``registry.active`` at every forward: a tuple of the
  active task names (usually one), set by :func:`set_active`.
* ``attach`` checks everything it needs of the model first and raises ``ValueError`` before it
  changes anything.
"""
from __future__ import annotations

import contextlib
import dataclasses
import re
from typing import ClassVar, Dict, Optional, Tuple, Type

from torch import nn

from ._threads import ThreadSlot

TASK_ATTR = "pet_fast_tasks"
_REGISTRY_ATTR = "_pet_fast_registry"
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*$")

METHODS: Dict[str, Type["MethodConfig"]] = {}


def register_method(cls):
    """Class decorator: make a config class known by its ``method`` name (for loading saved configs)."""
    METHODS[cls.method] = cls
    return cls


@dataclasses.dataclass
class MethodConfig:
    """Base of the method configs. ``train_head``: give the task its own trainable copy of the task head (the
    model's children named in ``models.TASK_HEADS``: the classifier, and e.g. DistilBERT's pre_classifier)."""

    method: ClassVar[str] = ""
    train_head: bool = True

    def attach(self, model: nn.Module, name: str, registry: "TaskRegistry") -> None:  # pragma: no cover
        raise NotImplementedError

    def detach(self, model: nn.Module, name: str, registry: "TaskRegistry") -> None:
        """Undo what ``attach`` changed outside the task's modules, once task ``name`` has left ``registry``
        (``remove``; ``load`` after a failed check). Nothing for most methods."""

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["method"] = self.method
        return d

    @staticmethod
    def from_dict(d: dict) -> "MethodConfig":
        d = dict(d)
        method = d.pop("method", None)
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r} in config; known: {sorted(METHODS)}")
        cls = METHODS[method]
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - fields
        if unknown:
            raise ValueError(f"config for method {method!r} has unknown fields {sorted(unknown)}")
        return cls(**d)


class TaskRegistry:
    """Per-model state (not a module, not saved in the state dict)."""

    def __init__(self):
        self.configs: Dict[str, MethodConfig] = {}
        self.active: Tuple[str, ...] = ()
        self.base_frozen = False
        # per task, how many modules hold its parts (task_hosts): save refuses a task that lost some since
        self.hosts: Dict[str, int] = {}
        # mask tasks serving one batch together (methods/mask.py mixed_mask_tasks): per thread, as the block is
        self._mixed = ThreadSlot()

    @property
    def mixed(self):
        return self._mixed.get()

    @mixed.setter
    def mixed(self, value) -> None:
        self._mixed.set(value)


def registry(model: nn.Module) -> Optional[TaskRegistry]:
    return model.__dict__.get(_REGISTRY_ATTR)


# Modules that hold the model they run as an attribute, and the attribute: tasks belong on the model itself.
_WRAPPERS = {"DataParallel": "module", "DistributedDataParallel": "module", "FullyShardedDataParallel": "module",
             "OptimizedModule": "_orig_mod"}


def check_not_a_wrapper(model: nn.Module, what: str) -> None:
    """ValueError where ``model`` is a wrapper (DistributedDataParallel, DataParallel, FSDP, torch.compile's
    module, peft's PeftModel) of the model ``what`` must act on: its registry, head and state-dict names are the
    inner model's."""
    attr = _WRAPPERS.get(type(model).__name__)
    if attr is None and type(model).__name__.startswith("PeftModel"):  # peft's: its tuner holds the model
        attr = "base_model.model"
    inner = model
    for part in attr.split(".") if attr else ():
        inner = getattr(inner, part, None)
    if attr is not None and isinstance(inner, nn.Module):
        raise ValueError(f"{what} acts on the model itself, and {type(model).__name__} wraps it: pass model.{attr} "
                         f"(wrap or compile after inject and set_active)")


def check_not_on_meta(model: nn.Module, what: str) -> None:
    """ValueError where a tensor of ``model`` is on the meta device (built under ``torch.device("meta")`` or
    ``init_empty_weights``, or offloaded by accelerate). A task attached there would be created on meta too,
    and ``to_empty`` would then leave it uninitialised memory: no error, wrong outputs."""
    tensors = [(n, t) for n, t in [*model.named_parameters(), *model.named_buffers()] if t is not None and t.is_meta]
    if tensors:
        name, _ = tensors[0]
        raise ValueError(f"{what}: {name} is on the meta device ({len(tensors)} of the model's tensors are): load the "
                         f"model's weights first (from_pretrained, or to_empty + load_state_dict), then {what}; with "
                         f"accelerate, {what} before dispatch_model / cpu_offload")


def no_tasks_hint(model) -> str:
    """For "model has no pet_fast tasks" errors: where a wrapper (DistributedDataParallel, DataParallel,
    torch.compile's module) holds the injected model, how to reach it; else how to add a task."""
    inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
    if isinstance(inner, nn.Module) and registry(inner) is not None:
        attr = "module" if getattr(model, "module", None) is inner else "_orig_mod"
        return f"{type(model).__name__} wraps the model that has them: pass model.{attr}"
    return "call pet_fast.inject first"


def _registry_or_create(model: nn.Module) -> TaskRegistry:
    reg = registry(model)
    if reg is None:
        reg = TaskRegistry()
        model.__dict__[_REGISTRY_ATTR] = reg
    return reg


# A task's modules are entries of nn.ModuleDicts: a name that is already an attribute of one ("train", "keys",
# "training", "_modules", ...) cannot be an entry.
_HOLDER_ATTRIBUTES = nn.ModuleDict()


def check_task_name(name) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(f"name must be a string of letters, digits, '_' or '-' starting with a letter or '_', got {name!r}")
    if hasattr(_HOLDER_ATTRIBUTES, name):
        raise ValueError(f"task name {name!r} is reserved (an attribute of torch.nn.ModuleDict, which holds the tasks' "
                         f"modules); pick another name")
    return name


def task_holder(host: nn.Module) -> nn.ModuleDict:
    """The ``pet_fast_tasks`` ModuleDict on ``host`` (created on first use)."""
    holder = getattr(host, TASK_ATTR, None)
    if holder is None:
        holder = nn.ModuleDict()
        host.add_module(TASK_ATTR, holder)
    return holder


def inject(model: nn.Module, config: MethodConfig, name: str = "default") -> nn.Module:
    """Freeze the model's pretrained weights and attach ``config``'s method as task ``name``, in place.

    The new task becomes the active one. Returns ``model``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(config, MethodConfig):
        raise TypeError(f"config must be one of the pet_fast method configs ({sorted(METHODS)}), got {type(config).__name__}")
    check_task_name(name)
    check_not_a_wrapper(model, "inject")
    check_not_on_meta(model, "inject")
    existed = registry(model) is not None
    reg = _registry_or_create(model)
    if name in reg.configs:
        raise ValueError(f"model already has a task named {name!r}; pick another name")
    try:
        config.attach(model, name, reg)  # checks first, raises before changing anything
        if config.train_head:
            from . import models

            models.attach_task_head(model, name, reg)
    except BaseException:
        with contextlib.suppress(Exception):  # attach's own error is the one that explains, raised below
            _undo_attach(model, name, config, reg)  # (should attach or the head's copy fail past the checks)
        if not existed:
            model.__dict__.pop(_REGISTRY_ATTR, None)
        raise
    for host in model.modules():  # new modules follow the train/eval mode of the module they sit on
        holder = host._modules.get(TASK_ATTR)
        if holder is not None and name in holder._modules:
            holder[name].train(host.training)
    reg.__dict__.setdefault("hosts", {})[name] = task_hosts(model, name)  # (a registry pickled before it had one)
    if not reg.base_frozen:
        for p in model.parameters():  # the new task's parameters are re-enabled by set_active below
            p.requires_grad_(False)
        reg.base_frozen = True
    reg.configs[name] = config
    set_active(model, name)
    return model


def task_hosts(model: nn.Module, name: str) -> int:
    """How many of ``model``'s modules hold a part of task ``name`` (in their ``pet_fast_tasks``)."""
    return sum(1 for m in model.modules() if name in getattr(m._modules.get(TASK_ATTR), "_modules", ()))


def _undo_attach(model: nn.Module, name: str, config: MethodConfig, reg: TaskRegistry) -> None:
    """Takes off what a failed ``attach`` of task ``name`` left: its modules, the site overrides no task uses
    any more, the method's state (``detach``)."""
    from .methods import _sites

    for _, host in _sites.hosts_with_task(model, name):
        del getattr(host, TASK_ATTR)[name]
    for mod in list(model.modules()):
        if _sites.site_kind(mod) is not None:
            _sites.uninstall_if_unused(mod)
    config.detach(model, name, reg)


def remove(model: nn.Module, name: str) -> None:
    """Detach task ``name``: its modules, its head copy and its overrides go; the base is untouched."""
    from .methods import _sites

    reg = registry(model)
    if reg is None:
        raise ValueError(f"model has no pet_fast tasks; {no_tasks_hint(model)}")
    if name not in reg.configs:
        raise ValueError(f"unknown task {name!r}; the model has {sorted(reg.configs)}")
    for other, cfg in reg.configs.items():
        if other != name and name in getattr(cfg, "adapters", ()):
            raise ValueError(f"task {other!r} (a fusion) uses adapter {name!r}; remove {other!r} first")
    for _, host in _sites.hosts_with_task(model, name):
        del getattr(host, TASK_ATTR)[name]
        _sites.uninstall_if_unused(host)
    for mod in list(model.modules()):  # norms that only captured inputs for removed parallel adapters
        if _sites.site_kind(mod) == "capture":
            _sites.uninstall_if_unused(mod)
    config = reg.configs.pop(name)
    reg.__dict__.get("hosts", {}).pop(name, None)
    reg.active = tuple(n for n in reg.active if n != name)
    config.detach(model, name, reg)
    set_active(model, reg.active)


def set_active(model: nn.Module, name) -> None:
    """Make task ``name`` (a name, a sequence of names, or None for none) the one the model runs."""
    reg = registry(model)
    if reg is None:
        raise ValueError(f"model has no pet_fast tasks; {no_tasks_hint(model)}")
    if name is None or isinstance(name, str):
        names = () if name is None else (name,)
    elif isinstance(name, (list, tuple)) and all(isinstance(n, str) for n in name):
        names = tuple(name)
    else:
        raise TypeError(f"name must be a task name, a sequence of task names or None, got {name!r}")
    for n in names:
        if n not in reg.configs:
            raise ValueError(f"unknown task {n!r}; the model has {sorted(reg.configs)}")
    if len(set(names)) != len(names):
        raise ValueError(f"name names a task more than once: {list(names)}")
    reg.active = names
    # Only the active tasks' parameters train; inactive ones are frozen. A config may keep some of
    # its parameters frozen (``frozen_parameters``: e.g. the adapters under a fusion).
    for n in reg.configs:
        frozen = getattr(reg.configs[n], "frozen_parameter_keys", None)
        for k, p in task_parameters(model, n).items():
            p.requires_grad_(n in names and not (frozen is not None and frozen(k)))


def task_parameters(model: nn.Module, name: str) -> Dict[str, nn.Parameter]:
    """Every parameter of task ``name``, by state-dict name."""
    key = f"{TASK_ATTR}.{name}."
    return {k: p for k, p in model.named_parameters() if key in k}


def trainable_parameters(model: nn.Module) -> Dict[str, nn.Parameter]:
    """Every parameter of ``model`` that trains now (``requires_grad``: the active tasks' and their heads'), by
    state-dict name; give an optimizer its ``.values()``. It changes with ``inject`` and ``set_active``."""
    return {k: p for k, p in model.named_parameters() if p.requires_grad}
