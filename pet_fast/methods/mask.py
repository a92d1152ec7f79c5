"""Mask-tuning (Zhao et al. 2020): a frozen linear whose weight is gated by a learned binary mask."""
from __future__ import annotations

import contextlib
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import _checks
from ..ops._autocast import compute_dtype
from ..ops.mask_packing import pack_mask, unpack_mask
from ..ops.masked_linear import backend_for, masked_linear
from ..ops.masked_weights import masked_weights
from ._float32 import keeping_float32
from ._per_forward import PerForward, attached, forgotten as _forgotten, installed


def _params_for(dtype: torch.dtype, weight: torch.Tensor, bias: Optional[torch.Tensor]):
    """The weight and bias as masked_linear takes them for x of ``dtype``: as they are when they have
    that dtype, or are float32 with half-precision x (the op casts inside its single masking pass, and
    under autocast computes in autocast's dtype, as F.linear would); cast otherwise."""
    if weight.dtype == dtype or (weight.dtype == torch.float32 and dtype in (torch.float16, torch.bfloat16)):
        if bias is None or bias.dtype == weight.dtype:
            return weight, bias
    return weight.to(dtype), None if bias is None else bias.to(dtype)


class MaskedLinear(nn.Module):
    """``y = x @ (W * 1[scores > threshold]).T + b`` with real-valued scores trained through the
    straight-through estimator.

    The weight and bias are frozen unless ``train_weight`` / ``train_bias``. The scores are float32
    and start at ``init_score`` (default ``threshold + 0.01``), so the first mask keeps every weight.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, threshold: float = 0.0,
                 init_score: Optional[float] = None, train_weight: bool = False, train_bias: bool = False,
                 dtype: Optional[torch.dtype] = None, device=None):
        super().__init__()
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        weight = torch.empty(out_features, in_features, dtype=dtype, device=device)
        nn.init.kaiming_uniform_(weight, a=5 ** 0.5)
        b = torch.zeros(out_features, dtype=dtype, device=device) if bias else None
        self._setup(weight, b, threshold, init_score, train_weight, train_bias)

    def _setup(self, weight, bias, threshold, init_score, train_weight, train_bias):
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
            raise TypeError(f"threshold must be a real number, got {type(threshold).__name__}")
        self.threshold = float(threshold)
        if init_score is None:
            init_score = self.threshold + 0.01
        if isinstance(init_score, bool) or not isinstance(init_score, (int, float)):
            raise TypeError(f"init_score must be a real number, got {type(init_score).__name__}")
        if not init_score > self.threshold:
            raise ValueError(f"init_score ({init_score}) must be > threshold ({self.threshold}) so that the first mask keeps every weight")
        self.weight = nn.Parameter(weight, requires_grad=train_weight)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=train_bias)
        self.scores = nn.Parameter(torch.full(weight.shape, float(init_score), dtype=torch.float32, device=weight.device))

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, threshold: float = 0.0, init_score: Optional[float] = None,
                    train_weight: bool = False, train_bias: bool = False) -> "MaskedLinear":
        """Wrap ``linear``'s weight and bias (shared, not copied) with a mask that keeps every weight."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._setup(linear.weight.data, None if linear.bias is None else linear.bias.data,
                    threshold, init_score, train_weight, train_bias)
        return self

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def mask(self) -> torch.Tensor:
        """The current binary mask (bool, the weight's shape)."""
        return self.scores.detach() > self.threshold

    def forward(self, x: torch.Tensor, *, backend: Optional[str] = None) -> torch.Tensor:
        dt = _checks.tensor("x", x, floating=False).dtype
        p = self._parameters  # not nn.Module's attribute lookup: this runs in every linear of every step
        weight, bias = _params_for(dt, p["weight"], p["bias"])
        return masked_linear(x, weight, p["scores"], bias, threshold=self.threshold, backend=backend)

    @torch.no_grad()
    def merge(self) -> nn.Linear:
        """A plain ``nn.Linear`` with the mask folded into its weight (for inference, no overhead)."""
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.weight.device, dtype=self.weight.dtype)
        out.weight.copy_(self.weight * self.mask().to(self.weight.dtype))
        if self.bias is not None:
            out.bias.copy_(self.bias)
        return out

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, threshold={self.threshold}"


# --------------------------------------------------------------------------------------------
# MaskConfig: masks on the linears of a transformers model, kept per task

import dataclasses  # noqa: E402
from typing import List  # noqa: E402

from ..tasks import MethodConfig, register_method, task_holder  # noqa: E402


class MaskScores(nn.Module):
    """One task's real-valued scores for a frozen linear (``(out, in)``, float32, also after the model is cast to
    a half dtype); the mask is ``scores > threshold``. For transformers' Conv1D (weight stored ``(in, out)``)
    the scores still use the ``(out, in)`` layout of nn.Linear."""

    def __init__(self, out_features: int, in_features: int, *, threshold: float, init_score: float, device=None):
        super().__init__()
        self.threshold = float(threshold)
        self.shape = (out_features, in_features)
        self.scores = nn.Parameter(torch.full((out_features, in_features), float(init_score), dtype=torch.float32, device=device))
        self.register_buffer("packed", None)  # the serving form (pack_for_serving): int32 words, 1 bit per weight

    def _apply(self, fn, recurse=True):
        """``model.to(...)``, ``.half()``, ``.cuda()`` reach the scores: they move with the model, but a cast to
        float16/bfloat16 leaves them in float32 (rounded there, scores near the threshold would land on it and
        flip the mask: the default init_score, threshold + 0.01, does at threshold 4 in bfloat16)."""
        return super()._apply(keeping_float32(self, fn), recurse)

    def mask(self) -> torch.Tensor:
        if self._parameters.get("scores") is None:
            return unpack_mask(self._buffers["packed"], self.shape)
        return self.scores.detach() > self.threshold

    def pack(self) -> None:
        """Keep the mask as packed bits (``pet_fast.pack_mask``'s layout: (out, ceil(in / 32)) int32 words)
        in place of the float32 scores: 1 bit per weight instead of 32, inference only (nothing trains)."""
        if self._parameters.get("scores") is None:
            return
        packed = pack_mask(self.scores.detach(), self.threshold)
        del self._parameters["scores"]
        self.register_parameter("scores", None)
        self.register_buffer("packed", packed)

    @staticmethod
    def weight_of(host: nn.Module) -> torch.Tensor:
        """The host's weight as (out, in)."""
        return host.weight.t() if type(host).__name__ == "Conv1D" else host.weight

    def apply_to(self, host: nn.Module, x: torch.Tensor, name: Optional[str] = None) -> torch.Tensor:
        """The masked linear of ``host`` on ``x``; ``name``: this task's name, for the masked weight its
        forward made for every linear at once (_ForwardMasks), when there is one."""
        weight, bias = host_weight_bias(host)
        conv = type(host).__name__ == "Conv1D"
        scores = self._parameters["scores"]
        if scores is None:  # packed for serving: the packed-bit GEMM (the cuda kernel for few tokens)
            weight, bias = _params_for(x.dtype, weight.t() if conv else weight, bias)
            return masked_linear(x, weight, None, bias, packed_mask=self._buffers["packed"])
        forward = self.__dict__.get("_forward")
        if forward is not None and name is not None and not conv:
            w_eff = forward.weight(name, self, host, x)
            if w_eff is not None:  # under autocast F.linear casts x and the bias; else they have w_eff's dtype
                if bias is not None and bias.dtype != w_eff.dtype and not torch.is_autocast_enabled(x.device.type):
                    bias = bias.to(w_eff.dtype)
                return F.linear(x, w_eff, bias)
        weight, bias = _params_for(x.dtype, weight.t() if conv else weight, bias)
        return masked_linear(x, weight, scores, bias, threshold=self.threshold)

    def extra_repr(self) -> str:
        form = ", packed" if self._parameters.get("scores") is None else ""
        return f"shape={self.shape}, threshold={self.threshold}{form}"


class _ForwardMasks(PerForward):
    """The masked weights of every masked linear of the active mask task, made by one
    :func:`pet_fast.masked_weights` call per forward of the model (one autograd node, and one launch on a
    GPU, in place of one op call per linear: 72 in BERT-base), at the first masked linear that asks; each
    linear then runs a plain ``F.linear``, whose weight gradient G = dy^T x reaches the scores through
    masked_weights' straight-through backward (G * W), as masked_linear's would.

    Open during a forward of the model (_per_forward.py), with grad enabled. Linears outside the batch run
    masked_linear per call, with the same values and gradients: GPT-2's Conv1D (its weight is stored
    transposed), a weight of another dtype than the call's products (cast per call), a non-contiguous
    weight, a linear called twice in one forward (its masked weight is taken once), and every call without
    grad (inference keeps the per-call path's memory: one masked weight at a time). The batch's backend is
    the one masked_linear takes for the first linear's call."""

    def __init__(self, checkpoint_modules):
        super().__init__(checkpoint_modules)
        self.sites: dict = {}  # task name -> [(host linear, MaskScores)], in attach order

    def weight(self, name: str, module: "MaskScores", host: nn.Module, x: torch.Tensor) -> Optional[torch.Tensor]:
        """``module``'s masked weight for this forward, or None (then the linear runs masked_linear)."""
        if not torch.is_grad_enabled() or torch.compiler.is_compiling():  # (packed modules never ask: apply_to)
            return None
        if not self.open:
            return None
        local = self._local
        dtype = compute_dtype(x)
        key = (name, dtype, module.threshold)
        batch = local.cache.get(key)
        if batch is None:
            batch = local.cache[key] = self._batch(name, dtype, module, host, x)
        return batch.pop(id(module), None)

    def _batch(self, name, dtype, module, host, x) -> dict:
        # forget the linears of removed tasks (remove() detaches them from their hosts)
        self.sites = {n: kept for n, pairs in self.sites.items() if (kept := [(h, m) for h, m in pairs if attached(h, n, m)])}
        sites = self.sites.get(name, ())
        pairs = [(h, m) for h, m in sites if m.threshold == module.threshold and _batchable(h, m, dtype)]
        if not any(m is module for _, m in pairs):
            return {}
        weight, bias = _params_for(x.dtype, *host_weight_bias(host))
        chosen = backend_for(x, weight, module._parameters["scores"], bias, threshold=module.threshold)
        outs = masked_weights([h._parameters["weight"] for h, _ in pairs], [m._parameters["scores"] for _, m in pairs],
                              threshold=module.threshold, dtype=dtype, backend="eager" if chosen == "eager" else None)
        return {id(m): w for (_, m), w in zip(pairs, outs)}


def host_weight_bias(host: nn.Module) -> tuple:
    """A masked linear's weight and bias: from its parameter dict (not nn.Module's attribute lookup: this runs in
    every linear of every step), or, where a pruning or parametrisation took them out of it, as the module
    makes them (read without the bias, such a linear computed without it)."""
    hp = host._parameters
    weight = hp["weight"] if "weight" in hp else host.weight
    bias = hp["bias"] if "bias" in hp else getattr(host, "bias", None)
    return weight, bias


def _batchable(host: nn.Module, module: "MaskScores", dtype: torch.dtype) -> bool:
    if type(host).__name__ == "Conv1D":
        return False
    w, s = host._parameters.get("weight"), module._parameters["scores"]
    return (w is not None and s is not None and w.dim() == 2 and w.is_contiguous() and s.is_contiguous() and w.device == s.device
            and (w.dtype == dtype or (w.dtype == torch.float32 and dtype in (torch.float16, torch.bfloat16))))


def _forward_masks(model: nn.Module) -> _ForwardMasks:
    """The model's :class:`_ForwardMasks`, made (and its hooks installed) on the first mask task."""
    return installed(model, "_pet_fast_mask_forward", _ForwardMasks)


@register_method
@dataclasses.dataclass
class MaskConfig(MethodConfig):
    """Mask-tuning: every ``nn.Linear`` (and GPT-2 ``Conv1D``) in the transformer blocks, or those
    named by ``target_modules`` (not in the task head, which each task copies and trains whole), computes
    with ``W * 1[scores > threshold]``; only the scores (and the head) train, through the straight-through
    estimator. Scores start at ``init_score`` (default ``threshold + 0.01``), so the first mask keeps every
    weight. Several mask tasks share the frozen weights; ``pet_fast.merge(model)`` folds the active one into
    plain linears. ``leave_out``: block indices to skip, as AdapterConfig's."""

    method = "mask"
    threshold: float = 0.0
    init_score: Optional[float] = None
    target_modules: Optional[List[str]] = None
    leave_out: List[int] = dataclasses.field(default_factory=list)

    def __post_init__(self):
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)):
            raise TypeError(f"threshold must be a real number, got {type(self.threshold).__name__}")
        self.threshold = float(self.threshold)
        if self.init_score is None:
            self.init_score = self.threshold + 0.01
        if isinstance(self.init_score, bool) or not isinstance(self.init_score, (int, float)):
            raise TypeError(f"init_score must be a real number, got {type(self.init_score).__name__}")
        if not self.init_score > self.threshold:
            raise ValueError(f"init_score ({self.init_score}) must be > threshold ({self.threshold}) so that the first mask keeps every weight")
        if isinstance(self.target_modules, str):
            self.target_modules = [self.target_modules]
        if self.target_modules is not None:
            self.target_modules = list(self.target_modules)
        self.leave_out = sorted(int(i) for i in self.leave_out)

    def targets(self, model: nn.Module) -> list:
        from .. import models

        if self.target_modules is not None:
            found = models.match_targets(model, self.target_modules)
            bad = [n for n, m in found if not models.linear_like(m)]
            if bad:
                raise ValueError(f"mask-tuning needs nn.Linear (or Conv1D) targets; not linear: {bad}")
            return models.without_left_out(found, self.leave_out)
        if models.family(model) == "generic":
            raise ValueError(f"model type {models.model_type(model)!r} has no known transformer blocks; pass target_modules")
        out = []
        blocks = models.layers(model)
        models.check_leave_out(self.leave_out, range(len(blocks)))
        for i, block in enumerate(blocks):
            if i in self.leave_out:
                continue
            for n, m in block.named_modules():
                if "pet_fast_tasks" not in n.split(".") and models.linear_like(m):
                    out.append((f"{i}.{n}", m))
        if not out:
            raise ValueError("mask-tuning found no linear layer to mask")
        return out

    def attach(self, model: nn.Module, name: str, registry) -> None:
        from . import _sites

        targets = self.targets(model)
        for _, host in targets:
            _sites.check_installable(host, "linear")
        forward = _forward_masks(model)
        forward.sites[name] = []
        for _, host in targets:
            _sites.install(host, "linear", registry)
            out_f, in_f = MaskScores.weight_of(host).shape
            scores = MaskScores(out_f, in_f, threshold=self.threshold, init_score=self.init_score, device=host.weight.device)
            scores.__dict__["_forward"] = forward  # a plain attribute: not a submodule, not in the state dict
            task_holder(host)[name] = scores
            forward.sites[name].append((host, scores))

    def detach(self, model: nn.Module, name: str, registry) -> None:
        """The task's linears leave the per-forward batch (nothing keeps its scores alive); with the model's last
        mask task gone, the batch's hooks go too."""
        _forgotten(model, "_pet_fast_mask_forward", name, registry, MaskConfig)


def pack_for_serving(model: nn.Module, name: Optional[str] = None) -> nn.Module:
    """Keep mask task ``name`` (default: every mask task) as packed bits instead of float32 scores: 1 bit
    per weight per task (for BERT-base's 72 linears, 10.6 MB in place of 340 MB), every task sharing the
    frozen weights. Its linears then run ``masked_linear`` from the bits (on a GPU the serving kernels:
    CUDA for few tokens, Triton beyond); inference only, as the scores are gone (``pet_fast.save`` still
    writes the task, as its mask). In place; returns ``model``."""
    from ..tasks import TASK_ATTR, no_tasks_hint, registry
    from . import _sites

    reg = registry(model)
    if reg is None:
        raise ValueError(f"model has no pet_fast tasks; {no_tasks_hint(model)}")
    names = [n for n, c in reg.configs.items() if isinstance(c, MaskConfig)]
    if name is not None:
        if name not in names:
            raise ValueError(f"task {name!r} is not a mask task of this model; mask tasks: {names}")
        names = [name]
    if not names:
        raise ValueError("the model has no mask task to pack")
    for n in names:
        for _, host in _sites.hosts_with_task(model, n):
            sub = getattr(host, TASK_ATTR)[n]
            if isinstance(sub, MaskScores):
                sub.pack()
    return model


class _MixedTasks:
    """The state of :func:`mixed_mask_tasks` (on the model's task registry while the block runs)."""

    def __init__(self, tasks, ids, stacks, heads):
        self.tasks, self.ids, self.stacks, self.heads = tasks, ids, stacks, heads
        self._ids_on = {}

    def _ids_at(self, device) -> torch.Tensor:
        ids = self._ids_on.get(device)
        if ids is None:
            ids = self._ids_on[device] = self.ids.to(device)
        return ids

    def _ids(self, device, x_shape):
        ids = self._ids_at(device)
        if len(x_shape) < 2 or x_shape[0] != ids.shape[0]:
            raise ValueError(f"mixed_mask_tasks: a masked linear got input of shape {tuple(x_shape)}, whose first "
                             f"dimension is not the batch's {ids.shape[0]} rows (task_of_row gives one task per row)")
        return ids.view(-1, *([1] * (len(x_shape) - 2))).expand(x_shape[:-1])

    # Under torch.compile both run eagerly (a graph break each, as the multitask op's id checks make anyway):
    # traced, their look-ups by id(host) guarded each linear's frame on its module, one recompilation per linear.
    @torch.compiler.disable
    def linear(self, host: nn.Module, x: torch.Tensor) -> Optional[torch.Tensor]:
        """The masked linear of ``host`` on ``x``, each row with its task's mask; None: not a site of the tasks."""
        stack = self.stacks.get(id(host))
        if stack is None:
            return None
        from ..ops.masked_linear import masked_linear_multitask

        weight, bias = MaskScores.weight_of(host), host_weight_bias(host)[1]
        weight = weight.to(x.dtype).contiguous()
        bias = None if bias is None else bias.to(x.dtype)
        return masked_linear_multitask(x, weight, stack, self._ids(x.device, x.shape), bias, validate_ids=False)

    @torch.compiler.disable
    def head(self, host: nn.Module, args, kwargs):
        """Each task's head on the whole batch, each row taking its task's output; None: no task head here."""
        modules = self.heads.get(id(host))
        if modules is None:
            return None
        outs = [m(*args, **kwargs) if m is not None else type(host).forward(host, *args, **kwargs) for m in modules]
        ids = self._ids_at(outs[0].device)
        stacked = torch.stack(outs)  # (T, B, ...)
        return stacked[ids, torch.arange(ids.shape[0], device=ids.device)]


@contextlib.contextmanager
def mixed_mask_tasks(model: nn.Module, tasks: Sequence[str], task_of_row):
    """Serve one batch whose rows belong to different mask tasks: inside the block, row ``i`` of every
    forward of ``model`` runs task ``tasks[task_of_row[i]]``. The tasks must be packed for serving
    (:func:`pack_for_serving`); every masked linear then makes one call of
    :func:`pet_fast.masked_linear_multitask` for the whole batch (its weight read once for all tasks), and a
    task's own head (a classifier trained with the task) runs once per task, each row taking its task's
    output. The tasks must mask the same linears. ``task_of_row``: one int per row (a list or an integer
    tensor), checked here once (the per-call checks, which would read the ids on the host, are skipped).
    Active tasks of other methods are refused (they would run on every row)."""
    from ..tasks import TASK_ATTR, registry
    from . import _sites

    reg = registry(model)
    tasks = [tasks] if isinstance(tasks, str) else list(tasks)
    if reg is None or not tasks:
        raise ValueError("mixed_mask_tasks needs a model with mask tasks and a non-empty list of them")
    for n in tasks:
        if not isinstance(reg.configs.get(n), MaskConfig):
            raise ValueError(f"task {n!r} is not a mask task of this model")
    others = [n for n in reg.active if not isinstance(reg.configs.get(n), MaskConfig)]
    if others:
        raise ValueError(f"tasks {others} are active and would run on every row of the mixed batch; activate none "
                         f"(pet_fast.set_active(model, None)) or a mask task first")
    ids = torch.as_tensor(task_of_row)
    if ids.dim() != 1 or ids.dtype not in (torch.int32, torch.int64, torch.uint8, torch.int16, torch.int8):
        raise ValueError(f"task_of_row must be one integer per row (1-D), got {ids.dtype} of shape {tuple(ids.shape)}")
    ids = ids.to(torch.int64)
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= len(tasks)):
        raise ValueError(f"task_of_row must lie in [0, {len(tasks)}) (an index into tasks), got values in "
                         f"[{int(ids.min())}, {int(ids.max())}]")
    hosts = {n: _sites.hosts_with_task(model, n) for n in tasks}
    linears = {n: {id(h): h for _, h in hosts[n] if _sites.site_kind(h) == "linear"} for n in tasks}
    if any(linears[n].keys() != linears[tasks[0]].keys() for n in tasks):
        raise ValueError(f"tasks {tasks} do not mask the same linears")
    stacks, heads = {}, {}
    for key, host in linears[tasks[0]].items():
        subs = [getattr(host, TASK_ATTR)._modules[n] for n in tasks]
        if any(m._parameters["scores"] is not None for m in subs):
            raise ValueError("mixed_mask_tasks serves packed masks: call pet_fast.pack_for_serving(model) first")
        stacks[key] = torch.stack([m._buffers["packed"] for m in subs])
    for n in tasks:
        for _, host in hosts[n]:
            if _sites.site_kind(host) == "head" and id(host) not in heads:
                own = [getattr(host, TASK_ATTR)._modules.get(m) for m in tasks]
                if any(m is not None for m in own):
                    heads[id(host)] = own
    previous = getattr(reg, "mixed", None)
    reg.mixed = _MixedTasks(tasks, ids, stacks, heads)
    try:
        yield
    finally:
        reg.mixed = previous


def _merged_module(host: nn.Module, scores: MaskScores) -> nn.Module:
    w = host.weight.detach()
    if type(host).__name__ == "Conv1D":
        new = type(host)(w.shape[1], w.shape[0])
        mask = scores.mask().t()
    else:
        new = nn.Linear(w.shape[1], w.shape[0], bias=host.bias is not None)
        mask = scores.mask()
    new = new.to(device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.weight.copy_(torch.where(mask.bool(), w, 0.0))  # zero where masked, whatever w holds there
        if host.bias is not None:
            new.bias.copy_(host.bias)
    new.requires_grad_(False)
    return new


def merge(model: nn.Module, name: Optional[str] = None) -> nn.Module:
    """Fold mask task ``name`` (default: the active one) into plain linears and its head into the
    model's head, then drop every mask task: the model runs with no pet_fast overhead. In place;
    returns ``model``. Other (non-mask) tasks stay attached."""
    from ..tasks import TASK_ATTR, no_tasks_hint, registry, remove
    from . import _sites

    reg = registry(model)
    if reg is None:
        raise ValueError(f"model has no pet_fast tasks; {no_tasks_hint(model)}")
    if name is None:
        masks = [n for n in reg.active if isinstance(reg.configs[n], MaskConfig)]
        if len(masks) != 1:
            raise ValueError(f"merge needs exactly one active mask task (or name=...); active: {list(reg.active)}")
        name = masks[0]
    if not isinstance(reg.configs.get(name), MaskConfig):
        raise ValueError(f"task {name!r} is not a mask task; only masks can be merged")
    modules = dict(model.named_modules())
    for mod_name, host in _sites.hosts_with_task(model, name):
        kind = _sites.site_kind(host)
        sub = getattr(host, TASK_ATTR)[name]
        if kind == "linear":
            parent_name, _, attr = mod_name.rpartition(".")
            parent = modules[parent_name] if parent_name else model
            setattr(parent, attr, _merged_module(host, sub))
        elif kind == "head":
            own = {k: v for k, v in host.state_dict().items() if TASK_ATTR not in k.split(".")}
            with torch.no_grad():
                for k, v in sub.state_dict().items():
                    if k in own:
                        own[k].copy_(v)
    for n in [n for n, c in reg.configs.items() if isinstance(c, MaskConfig)]:
        remove(model, n)
    return model
