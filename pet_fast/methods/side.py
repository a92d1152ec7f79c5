"""Side-tuning (Zhang et al. 2020): a small trained side network blended with a frozen base."""
from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional, Union

import torch
from torch import nn


def blend(base: torch.Tensor, side: torch.Tensor, alpha) -> torch.Tensor:
    """``alpha * base + (1 - alpha) * side`` in one launch (lerp), in the side output's dtype (autocast's, under
    autocast), and in the base's where that is narrower: a bfloat16 or float16 model's head reads the result
    (its side network trains in float32)."""
    if isinstance(alpha, torch.Tensor):
        alpha = alpha.to(side.dtype)
    out = torch.lerp(side, base.to(side.dtype), alpha)
    return out.to(base.dtype) if base.dtype.itemsize < out.dtype.itemsize else out


class SideTuning(nn.Module):
    """``alpha * base(*args) + (1 - alpha) * side(*args)``.

    The base is frozen and run in eval mode under ``torch.no_grad()``: no graph, no saved activations.
    ``alpha`` is a number in [0, 1] (fixed), ``"learned"`` (``sigmoid`` of a trained logit, starting at
    ``alpha_init``), or a callable ``schedule(step) -> float`` evaluated at the number of training
    forwards with grad so far (the side-tuning curriculum; the count is the buffer ``steps``, saved in the
    state dict, so a schedule resumes where it was). ``base_output`` / ``side_output`` pick the tensor out
    of a module's output (e.g. ``lambda out: out.logits``); by default the output itself.
    """

    def __init__(self, base: nn.Module, side: nn.Module, alpha: Union[float, str, Callable[[int], float]] = 0.5, *,
                 alpha_init: float = 0.5, base_output: Optional[Callable] = None, side_output: Optional[Callable] = None):
        super().__init__()
        if not isinstance(base, nn.Module) or not isinstance(side, nn.Module):
            raise TypeError("base and side must be nn.Modules")
        self.base = base
        self.side = side
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.base.eval()
        self.alpha_logit = None
        self.schedule = None
        if isinstance(alpha, str):
            if alpha != "learned":
                raise ValueError(f"alpha must be a number in [0, 1], 'learned' or a callable, got {alpha!r}")
            if not 0.0 < alpha_init < 1.0:
                raise ValueError(f"alpha_init must be in (0, 1), got {alpha_init}")
            self.alpha_logit = nn.Parameter(torch.tensor(math.log(alpha_init / (1 - alpha_init))))
        elif callable(alpha):
            self.schedule = alpha
        else:
            if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
                raise ValueError(f"alpha must be a number in [0, 1], 'learned' or a callable, got {alpha!r}")
            self.fixed_alpha = float(alpha)
        # training forwards so far (with grad enabled), a buffer: saved in the state dict, so a schedule resumes
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.base_output = base_output or (lambda out: out)
        self.side_output = side_output or (lambda out: out)

    def train(self, mode: bool = True):
        super().train(mode)
        self.base.eval()  # the base never trains (dropout and batch-norm statistics stay frozen)
        return self

    def alpha(self):
        if self.alpha_logit is not None:
            return torch.sigmoid(self.alpha_logit)
        if self.schedule is not None:
            step = int(self.steps)
            value = float(self.schedule(step))
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"the alpha schedule returned {value} at step {step}, outside [0, 1]")
            return value
        return self.fixed_alpha

    def base_forward(self, *args, **kwargs) -> torch.Tensor:
        with torch.no_grad():
            return self.base_output(self.base(*args, **kwargs))

    def blend(self, base_out: torch.Tensor, side_out: torch.Tensor) -> torch.Tensor:
        return blend(base_out, side_out, self.alpha())

    def forward(self, *args, **kwargs) -> torch.Tensor:
        base_out = self.base_forward(*args, **kwargs)
        out = self.blend(base_out, self.side_output(self.side(*args, **kwargs)))
        if self.training and torch.is_grad_enabled():
            self.steps += 1
        return out


# --------------------------------------------------------------------------------------------
# SideConfig: side-tuning on a transformers backbone

import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import inspect  # noqa: E402
import threading  # noqa: E402

import torch.nn.functional as F  # noqa: E402

from .. import models  # noqa: E402
from .._threads import ThreadSlot  # noqa: E402
from ._base_graphs import BaseGraphs  # noqa: E402
from ._float32 import keeping_float32  # noqa: E402
from ._per_forward import counted_steps  # noqa: E402
from ..ops._autocast import AUTOCAST_DEVICES  # noqa: E402
from ..tasks import MethodConfig, register_method, task_holder  # noqa: E402

_IDS_ATTR = "_pet_fast_example_ids"


class _SideBlock(nn.Module):
    def __init__(self, width: int, heads: int, ffn: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, ffn)
        self.fc2 = nn.Linear(ffn, width)

    def forward(self, x, allowed=None, is_causal=False):
        B, T, W = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, T, 3, self.heads, W // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, is_causal=is_causal)
        x = x + self.out(a.transpose(1, 2).reshape(B, T, W))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class SideNetwork(nn.Module):
    """The default side network: the frozen input embeddings (width ``d_embed``, default d) -> Linear(d_embed,
    width) + learned positions -> ``layers`` small pre-LN transformer blocks (causal for decoder models) ->
    LayerNorm -> Linear(width, d). The last projection starts at zero (the side output starts at 0)."""

    def __init__(self, d_model: int, *, width: int = 64, layers: int = 1, heads: int = 4, ffn: Optional[int] = None,
                 max_positions: int = 512, causal: bool = False, d_embed: Optional[int] = None):
        super().__init__()
        if width % heads:
            raise ValueError(f"width ({width}) must be a multiple of heads ({heads})")
        self.causal = causal
        self.proj_in = nn.Linear(d_embed or d_model, width)
        self.pos = nn.Parameter(torch.randn(max_positions, width) * 0.02)
        self.blocks = nn.ModuleList([_SideBlock(width, heads, ffn or 4 * width) for _ in range(layers)])
        self.norm = nn.LayerNorm(width)
        self.proj_out = nn.Linear(width, d_model)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, emb: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        B, T, _ = emb.shape
        if T > self.pos.shape[0]:
            raise ValueError(f"sequence length {T} exceeds the side network's {self.pos.shape[0]} positions")
        if position_ids is None and attention_mask is not None:
            # each row's real tokens count their positions from 0, however the batch is padded (a decoder's on the
            # left; an encoder's row then gives what it gives unpadded, as RoBERTa's own positions do); right
            # padding gives 0..T-1 as the table's first rows
            position_ids = attention_mask.long().cumsum(-1) - 1  # (-1 on left padding: clamped below)
        pos = self.pos[:T] if position_ids is None else self.pos[position_ids.clamp(0, self.pos.shape[0] - 1)]
        x = self.proj_in(emb.to(self.proj_in.weight.dtype)) + pos
        # The keys each query sees, broadcast to (B, 1, T, T) only where a mask is needed: without padding the
        # blocks attend with no mask (causal: SDPA's own, top-left aligned as T == T), so SDPA may take its flash
        # kernel and nothing is built per step.
        allowed, is_causal = None, False
        if attention_mask is not None:
            allowed = attention_mask.to(torch.bool).view(B, 1, 1, T)
            if self.causal:
                allowed = allowed & torch.ones(T, T, dtype=torch.bool, device=emb.device).tril()
            allowed = allowed | torch.eye(T, dtype=torch.bool, device=emb.device)  # no row without a key
        else:
            is_causal = self.causal
        for block in self.blocks:
            x = block(x, allowed, is_causal)
        return self.proj_out(self.norm(x))


class CachedRow(NamedTuple):
    """One example in the side-tuning cache: what it was computed from (see _CallInputs) and the base's output."""
    layout: tuple
    rows: torch.Tensor
    embeds: Optional[torch.Tensor]
    hidden: torch.Tensor


class SideBranch(nn.Module):
    """One side-tuning task on a backbone: the side network, the blend weight and the optional
    cache of base outputs. ``alpha``: fixed, ``"learned"`` (sigmoid of a trained logit starting at
    ``alpha_init``), or scheduled linearly from ``alpha`` to ``alpha_end`` over ``schedule_steps``
    training forwards (the step count is a buffer, saved with the task). ``base_graphs``: how many input
    signatures of the base's forward are replayed from CUDA graphs (0: none; see SideConfig)."""

    def __init__(self, network: nn.Module, *, alpha=0.5, alpha_init: float = 0.5, alpha_end: Optional[float] = None,
                 schedule_steps: int = 0, cache: bool = False, base_graphs: int = 0):
        super().__init__()
        self.network = network
        self.alpha_logit = None
        if alpha == "learned":
            self.alpha_logit = nn.Parameter(torch.tensor(math.log(alpha_init / (1 - alpha_init))))
        self.alpha_value = None if alpha == "learned" else float(alpha)
        self.alpha_end = alpha_end
        self.schedule_steps = schedule_steps
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.use_cache = cache
        self.cache = {}
        self.base_graphs = base_graphs

    def _apply(self, fn, recurse=True):
        """A cast of the model to float16/bfloat16 leaves the side network in float32 (as attached to such a
        model: it trains in float32, and blend gives the head the base's dtype)."""
        return super()._apply(keeping_float32(self, fn), recurse)

    def alpha(self):
        if self.alpha_logit is not None:
            return torch.sigmoid(self.alpha_logit)
        if self.alpha_end is not None and self.schedule_steps > 0:
            if torch.compiler.is_compiling():  # a tensor from the buffer (a Python float: one graph per step)
                t = counted_steps(self.steps).clamp(max=self.schedule_steps) / self.schedule_steps
                return self.alpha_value + t * (self.alpha_end - self.alpha_value)
            t = min(int(self.steps), self.schedule_steps) / self.schedule_steps
            return self.alpha_value + t * (self.alpha_end - self.alpha_value)
        return self.alpha_value

    def blend(self, base: torch.Tensor, side: torch.Tensor) -> torch.Tensor:
        return blend(base, side, self.alpha())

    def cached(self, ids, inputs: "_CallInputs") -> Optional[torch.Tensor]:
        """The base's hidden states of the rows named by ``ids``, or None where one of them is not cached or was
        cached from other inputs (other padding, mask, token types, positions): the batch is then recomputed.
        Raises where an id comes back with other tokens (or input embeddings) of the same length."""
        hits = [self.cache.get(key) for key in ids]
        if not hits or any(h is None for h in hits):
            return None
        if any(h.layout != inputs.layout or h.rows.shape != inputs.rows.shape[1:] for h in hits):
            return None  # another set of inputs, or padded differently: recompute
        if inputs.rows.shape[1]:
            stored = torch.stack([h.rows for h in hits])
            differ = stored != inputs.rows
            tokens = inputs.token_width
            changed = differ[:, :tokens].any(1)
            if bool(changed.any()):
                key = ids[int(changed.nonzero()[0])]
                raise ValueError(f"example id {key!r} was seen before with different input_ids; example ids must be "
                                 f"unique per example")
            if bool(differ.any()):
                return None  # same tokens, another mask, token types or positions: recompute
        if inputs.embeds is not None:
            stored = [h.embeds for h in hits]
            if any(e is None or e.shape != inputs.embeds.shape[1:] or e.dtype != inputs.embeds.dtype for e in stored):
                return None
            same = (torch.stack(stored) == inputs.embeds).reshape(len(stored), -1).all(1).cpu()
            if not bool(same.all()):
                key = ids[int((~same).nonzero()[0])]
                raise ValueError(f"example id {key!r} was seen before with different inputs_embeds; example ids must "
                                 f"be unique per example")
        return torch.stack([h.hidden for h in hits])

    def store(self, ids, inputs: "_CallInputs", hidden: torch.Tensor) -> None:
        hidden = hidden.detach()
        embeds = None if inputs.embeds is None else inputs.embeds.clone()  # (the caller's tensor may be reused)
        for i, key in enumerate(ids):
            self.cache[key] = CachedRow(inputs.layout, inputs.rows[i], None if embeds is None else embeds[i], hidden[i])

    def extra_repr(self) -> str:
        a = "learned" if self.alpha_logit is not None else self.alpha_value
        return (f"alpha={a}, alpha_end={self.alpha_end}, schedule_steps={self.schedule_steps}, cache={self.use_cache}, "
                f"base_graphs={self.base_graphs}")


def _base_modules(host: nn.Module) -> list:
    """The frozen base's modules: every module under ``host`` (itself included, each once) but the task
    holder's. A walk over ``_modules``, not ``host.modules()``, whose generators cost about a millisecond of
    host time per step in BERT-base (228 modules)."""
    holder = host._modules.get("pet_fast_tasks")
    seen = set(map(id, holder.modules())) if holder is not None else set()
    found, stack = [], [host]
    while stack:
        m = stack.pop()
        if id(m) in seen:
            continue
        seen.add(id(m))
        found.append(m)
        stack.extend(c for c in reversed(m._modules.values()) if c is not None)
    return found


@contextlib.contextmanager
def _base_eval(host: nn.Module):
    """Put the frozen base (everything under host except pet_fast task modules) in eval mode. Only the
    modules in training mode are switched, and back, through ``object.__setattr__``: ``training`` is a
    plain attribute, and nn.Module's own ``__setattr__`` (which looks for a parameter, buffer or module of
    that name first) cost about 4 us per module, twice per module and step. The flags are the model's, shared
    by its threads: the first thread in switches them and the last one out switches them back (a thread leaving
    earlier turned dropout on in the middle of another's base)."""
    if torch.compiler.is_compiling():  # (traced code takes no lock; it runs as one call)
        switched = _switch_off(host)
        try:
            yield
        finally:
            _switch_on(switched)
        return
    switch = host.__dict__.get(_EVAL_SWITCH)
    if switch is None:
        switch = host.__dict__.setdefault(_EVAL_SWITCH, _EvalSwitch())
    with switch.lock:
        if switch.inside == 0:
            switch.switched = _switch_off(host)
        switch.inside += 1
    try:
        yield
    finally:
        with switch.lock:
            switch.inside -= 1
            if switch.inside == 0:
                _switch_on(switch.switched)
                switch.switched = []


def _switch_off(host: nn.Module) -> list:
    switched = [m for m in _base_modules(host) if m.training]
    for m in switched:
        object.__setattr__(m, "training", False)
    return switched


def _switch_on(switched: list) -> None:
    for m in switched:
        object.__setattr__(m, "training", True)


_EVAL_SWITCH = "_pet_fast_base_eval"


class _EvalSwitch:
    """How many threads run the base in eval mode now, and the modules the first of them switched."""

    def __init__(self):
        self.lock, self.inside, self.switched = threading.Lock(), 0, []

    def __deepcopy__(self, memo):
        return _EvalSwitch()

    def __reduce__(self):
        return (_EvalSwitch, ())


def _normalise_ids(ids) -> list:
    if isinstance(ids, torch.Tensor):
        return [int(i) for i in ids.flatten().tolist()]
    return [i if isinstance(i, (int, str)) else int(i) for i in ids]


# The inputs that decide the base's output per row, as the cache compares them: the integer ones
# (input_ids first, then the 2-d attention mask, token types and positions given) side by side in one
# int64 tensor on the host (one copy, one synchronisation per batch), the input embeddings on their device.
_ROW_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids", "global_attention_mask")


class _CallInputs:
    """A call's inputs as the cache compares them; ``layout`` also holds the base's state that its outputs depend
    on besides the inputs: its weights' dtype and device (a model cast or moved after caching) and autocast's
    dtype there, if on."""

    __slots__ = ("layout", "rows", "token_width", "embeds")

    def __init__(self, arguments: dict, batch: int, weight: torch.Tensor):
        parts, layout = [], []
        for name in _ROW_INPUTS:
            t = arguments.get(name)
            if isinstance(t, torch.Tensor) and t.dim() == 2 and t.shape[0] in (1, batch):
                parts.append(t.detach().expand(batch, -1).long())
                layout.append((name, t.shape[1]))
        dev = weight.device.type
        autocast = torch.get_autocast_dtype(dev) if dev in AUTOCAST_DEVICES and torch.is_autocast_enabled(dev) else None
        self.layout = ((weight.dtype, weight.device, autocast),) + tuple(layout)
        self.token_width = layout[0][1] if layout and layout[0][0] == "input_ids" else 0
        self.rows = torch.cat(parts, 1).cpu() if parts else torch.empty(batch, 0, dtype=torch.long)
        embeds = arguments.get("inputs_embeds")
        self.embeds = embeds.detach() if isinstance(embeds, torch.Tensor) else None


# The cache is a host-side dictionary keyed by example ids, and whether a batch hits it depends on
# the ids' values: under torch.compile these two calls run eagerly (one graph break each, around a
# dictionary look-up; the base and the side network stay compiled). Without the cache, side-tuning
# compiles with fullgraph=True.
@torch.compiler.disable
def _cache_lookup(branch, ids, arguments, batch, weight):
    inputs = _CallInputs(arguments, batch, weight)
    return branch.cached(_normalise_ids(ids), inputs), inputs


@torch.compiler.disable
def _cache_store(branch, ids, inputs, hidden) -> None:
    branch.store(_normalise_ids(ids), inputs, hidden)


# Arguments that ask the base for more than its last hidden state, or for state kept across calls (a KV
# cache): such calls run eagerly, not from a CUDA graph.
_NOT_GRAPHED = {"past_key_values": None, "cache": None, "use_cache": True, "output_attentions": True,
                "output_hidden_states": True, "return_dict": False}


def _graphable_call(host: nn.Module, arguments: dict) -> Optional[dict]:
    """The base's call as keyword arguments for BaseGraphs, or None where it must run eagerly."""
    params = models.signature(type(host).forward).parameters
    call = {}
    for name, value in arguments.items():
        kind = params[name].kind if name in params else None
        if name == "self":
            continue
        if kind is inspect.Parameter.VAR_POSITIONAL:
            if value:
                return None
        elif kind is inspect.Parameter.VAR_KEYWORD:
            call.update(value)
        else:
            call[name] = value
    for name, refused in _NOT_GRAPHED.items():
        value = call.get(name)
        if value is not None and (refused is None or value == refused):
            return None
    return call if BaseGraphs.usable(call) else None


def _graphs(branch, host: nn.Module) -> BaseGraphs:
    graphs = branch.__dict__.get("_graphs")
    if graphs is None:
        def weights():  # where the base keeps its parameters and buffers
            for m in _base_modules(host):
                for d in (m._parameters, m._buffers):
                    yield from ((d, n) for n, t in d.items() if t is not None)
        graphs = branch.__dict__["_graphs"] = BaseGraphs(weights, max_graphs=branch.base_graphs)
    return graphs


def _base_hidden(site, host: nn.Module, call: dict) -> torch.Tensor:
    with _base_eval(host):
        out = site.original(**call)
    if not isinstance(out, tuple):
        host.__dict__[_OUTPUT_CLASS] = type(out)  # (the class a replayed call's output is built as)
    return out[0] if isinstance(out, tuple) else out.last_hidden_state


def _asks_more(host: nn.Module, arguments: dict) -> bool:
    """Whether the call asks the base for its hidden states or attentions (given, or by the model's config): a
    cached row keeps the last hidden state only, so such calls run the base."""
    given = dict(arguments.get("kwargs") or {}, **{k: v for k, v in arguments.items() if k != "kwargs"})
    config = getattr(host, "config", None)
    for name in ("output_hidden_states", "output_attentions"):
        value = given.get(name)
        if value is None:
            value = getattr(config, name, False)
        if value:
            return True
    return False


def _check_side_call(arguments: dict, ids, ref) -> None:
    """Refuses what side-tuning cannot compute right: a call that continues from a KV cache (the side network
    sees only the new tokens, without their context: generate with use_cache=False), and example ids that do not
    name one example per row."""
    cache = arguments.get("cache", arguments.get("past_key_values"))
    if cache is not None and hasattr(cache, "get_seq_length") and cache.get_seq_length() > 0:
        raise ValueError("side-tuning runs its side network over the whole sequence: a call continuing from a KV cache "
                         "(incremental decoding) would see only the new tokens; generate with use_cache=False")
    if ids is not None and ref is not None and ref.dim() >= 2:
        n = len(ids) if not isinstance(ids, torch.Tensor) else (ids.shape[0] if ids.dim() else 1)
        if n != ref.shape[0]:
            raise ValueError(f"example_ids must name one example per row: {n} ids for a batch of {ref.shape[0]}")


def side_forward(site, *args, **kwargs):
    """The backbone's forward with a side-tuning task active (see SideConfig)."""
    host = site.host
    ids = kwargs.pop("example_ids", None)
    slot = host.__dict__.get(_IDS_ATTR)
    ctx_ids = None if slot is None else slot.get()
    if ids is None:
        ids = ctx_ids
    act = site.active()
    if act is None:
        return site.original(*args, **kwargs)
    side_name, branch = act
    arguments = models.signature(type(host).forward).bind_partial(host, *args, **kwargs).arguments
    input_ids = arguments.get("input_ids")
    attention_mask = arguments.get("attention_mask")
    inputs_embeds = arguments.get("inputs_embeds")
    _check_side_call(arguments, ids, input_ids if input_ids is not None else inputs_embeds)
    ref = input_ids if input_ids is not None else inputs_embeds
    # (a prepared 4-d attention mask is not compared row by row: such calls run the base, and are not kept)
    use_cache = (branch.use_cache and ids is not None and isinstance(ref, torch.Tensor) and ref.dim() >= 2
                 and not (isinstance(attention_mask, torch.Tensor) and attention_mask.dim() != 2)
                 and not _asks_more(host, arguments))
    alone = len(site.registry.active) == 1
    if not alone and host.training and torch.is_grad_enabled():
        others = [n for n in site.registry.active if n != side_name]
        raise ValueError(f"side task {side_name!r} runs the frozen base without gradients, so tasks {others} active "
                         f"with it would not train (their parameters would get no gradient): train them apart "
                         f"(set_active one task), or run the two together without gradients")
    hidden = out = None
    if use_cache:
        if not alone:
            others = [n for n in site.registry.active if n != side_name]
            raise ValueError(f"side task {side_name!r} caches the frozen base's outputs, but tasks {others} are active "
                             f"too: the base's output is theirs as well (and changes as they train); activate "
                             f"{side_name!r} alone, or give no example ids (or inject it with cache=False)")
        hidden, inputs = _cache_lookup(branch, ids, arguments, ref.shape[0], host.get_input_embeddings().weight)
    if hidden is None:
        call = None
        if branch.base_graphs and alone and not torch.compiler.is_compiling():
            # (graphs hold the base alone: with other tasks active, their modules run in it, eagerly)
            call = _graphable_call(host, arguments)
        if call is not None:  # the base replayed (out stays None: the output is built below, as for a cache hit)
            with torch.no_grad():
                hidden = _graphs(branch, host)(lambda **kw: _base_hidden(site, host, kw), call)
        else:
            with torch.no_grad(), _base_eval(host):
                out = site.original(*args, **kwargs)
            hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state
            if not isinstance(out, tuple):
                host.__dict__[_OUTPUT_CLASS] = type(out)
        if use_cache:
            _cache_store(branch, ids, inputs, hidden)
    with torch.no_grad():
        emb = inputs_embeds if inputs_embeds is not None else host.get_input_embeddings()(input_ids)
    mask2d = attention_mask if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2 else None
    side = branch.network(emb.detach(), mask2d, arguments.get("position_ids"))
    if side.shape[-1] != hidden.shape[-1]:
        raise ValueError(f"side task {side_name!r}: the side network gives {side.shape[-1]} features, but "
                         f"{type(host).__name__}'s last hidden states have {hidden.shape[-1]}")
    blended = branch.blend(hidden, side)
    if branch.training and torch.is_grad_enabled():
        branch.steps += 1
    pooled = _pooled(host, blended)
    if out is None:  # served from the cache or replayed: built as the backbone builds its output
        return _output(host, arguments, blended, pooled)
    if isinstance(out, tuple):
        return (blended,) + ((pooled,) + tuple(out[2:]) if pooled is not None else tuple(out[1:]))
    out.last_hidden_state = blended
    if pooled is not None:
        out.pooler_output = pooled
    return out


def _pooled(host: nn.Module, hidden: torch.Tensor) -> Optional[torch.Tensor]:
    """The backbone's pooled output of the blended states, as it pools its own: a pooler module on the whole
    sequence (BERT's takes the first token itself), or a Linear and its activation on the first token (ALBERT,
    BigBird)."""
    pooler = getattr(host, "pooler", None)
    if isinstance(pooler, nn.Linear):
        act = getattr(host, "pooler_activation", getattr(host, "activation", None))  # (ALBERT's; BigBird's)
        pooled = pooler(hidden[:, 0])
        return act(pooled) if isinstance(act, nn.Module) else pooled
    return pooler(hidden) if isinstance(pooler, nn.Module) else None


_OUTPUT_CLASS = "_pet_fast_side_output_class"


def _output(host: nn.Module, arguments: dict, hidden: torch.Tensor, pooled: Optional[torch.Tensor]):
    """The backbone's output for a call whose base did not run: its class (with a pooler's output or a cache
    field, empty) or, with ``return_dict=False`` given or in the model's config, its tuple."""
    from transformers import modeling_outputs as mo

    cls = host.__dict__.get(_OUTPUT_CLASS)  # the class the base returned (its task class reads its fields)
    if cls is not None and dataclasses.is_dataclass(cls):
        fields = {f.name for f in dataclasses.fields(cls)}
        out = cls(last_hidden_state=hidden, **({"pooler_output": pooled} if "pooler_output" in fields else {}))
    elif pooled is not None:
        out = mo.BaseModelOutputWithPoolingAndCrossAttentions(last_hidden_state=hidden, pooler_output=pooled)
    else:
        out = mo.BaseModelOutputWithPast(last_hidden_state=hidden)
    return_dict = arguments.get("return_dict", arguments.get("kwargs", {}).get("return_dict"))
    if return_dict is None:
        return_dict = getattr(getattr(host, "config", None), "return_dict", True)
    return out if return_dict else out.to_tuple()


def side_host(model: nn.Module) -> nn.Module:
    """The module whose forward side-tuning takes over: the backbone, or the transformers model inside it
    that embeds the same tokens and runs the blocks where the backbone only hands its inputs on (OPT's
    decoder: OPTForCausalLM calls it itself, past the backbone's forward)."""
    host = models.backbone(model)
    emb = host.get_input_embeddings() if hasattr(host, "get_input_embeddings") else None
    while emb is not None:
        inner = [c for c in host.children() if hasattr(c, "config") and hasattr(c, "get_input_embeddings")
                 and c.get_input_embeddings() is emb and "input_ids" in models.signature(type(c).forward).parameters]
        if len(inner) != 1:
            break
        host = inner[0]
    return host


def _causal(host: nn.Module, model: nn.Module) -> bool:
    """Whether the base's self-attention is causal (a decoder's: the side network must not see later tokens
    either). transformers' attention modules say so in ``is_causal`` (BERT's: its config's is_decoder); for
    models whose modules do not (Bloom, MPT, XGLM), a model type with causal LMs and no masked LM is causal."""
    said = [m.is_causal for n, m in host.named_modules()
            if "Attention" in type(m).__name__ and "cross" not in n.lower() and isinstance(getattr(m, "is_causal", None), bool)]
    if said:
        return any(said)
    from transformers.models.auto import modeling_auto as auto

    kind = models.model_type(model)
    return kind in auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and kind not in auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES


@contextlib.contextmanager
def example_ids(model: nn.Module, ids):
    """Give the ids of the examples of the next forwards (for the side-tuning cache), when the model
    call cannot take ``example_ids=`` itself."""
    host = side_host(model)
    slot = host.__dict__.get(_IDS_ATTR)
    if slot is None:  # (per thread: another thread's forwards keep their own ids)
        slot = host.__dict__[_IDS_ATTR] = ThreadSlot()
    outer = slot.get()
    slot.set(ids)
    try:
        yield
    finally:  # (a nested block gives the outer one's ids back)
        slot.set(outer)


class _ExampleIdsHook:
    """Pre- and post-forward hook of the outer model: takes ``example_ids=`` from its call into the side host's
    slot for that forward (task classes such as DebertaV2ForSequenceClassification or BloomForCausalLM do not
    hand extra keywords to their backbone: the ids were dropped, and the cache never filled). An object, not a
    closure: a copy of the model gets its own, reading the copy's host."""

    def __init__(self, host: nn.Module):
        self.host = host
        self.outer = ThreadSlot()  # per thread, the ids given before this forward's (restored after it)

    def pre(self, module, args, kwargs):
        if "example_ids" not in kwargs:
            if self.outer.get():  # a forward nested in one that took ids: its post pops this mark, not theirs
                self.outer.set(self.outer.get() + (_NO_IDS,))
            return None
        kwargs = dict(kwargs)
        slot = self.host.__dict__.get(_IDS_ATTR)
        if slot is None:
            slot = self.host.__dict__[_IDS_ATTR] = ThreadSlot()
        self.outer.set(((self.outer.get() or ()) + (slot.get(),)))
        if "example_ids" in models.signature(type(module).forward).parameters:
            slot.set(kwargs["example_ids"])  # (a forward that takes them itself keeps them)
        else:
            slot.set(kwargs.pop("example_ids"))
        return args, kwargs

    def post(self, module, args, kwargs, output):
        stack = self.outer.get()
        if stack:  # (a forward that took ids: the earlier ones back, also after an exception)
            self.outer.set(stack[:-1])
            if stack[-1] is not _NO_IDS:
                self.host.__dict__[_IDS_ATTR].set(stack[-1])
        return None


_NO_IDS = object()


_IDS_HOOK = "_pet_fast_side_ids_hook"


@register_method
@dataclasses.dataclass
class SideConfig(MethodConfig):
    """Side-tuning on a transformers model: the final hidden states of the frozen backbone (run under
    ``torch.no_grad()`` and in eval mode, so it keeps no graph and no activations) are blended with a
    small side network's output, ``alpha * base + (1 - alpha) * side``, before the task head (and
    before BERT's pooler). The side network reads the frozen input embeddings (default
    ``SideNetwork``: ``width``, ``layers``, ``heads``, ``ffn``; causal for GPT-2/Llama).

    ``alpha``: a number in [0, 1], or ``"learned"`` (starting at ``alpha_init``); with ``alpha_end``
    and ``schedule_steps`` it moves linearly from ``alpha`` to ``alpha_end`` over that many training
    forwards. ``cache=True`` keeps the base's output per example id, so epochs after the first skip
    the base: pass the ids as ``model(..., example_ids=ids)`` (a tensor or list of ints/strings, one per
    row; transformers models hand extra keywords to the backbone) or wrap the call in
    ``with pet_fast.example_ids(model, ids):``. A cached example must come back with the same
    ``input_ids`` (or ``inputs_embeds``); other tokens of the same length are refused (ids must be unique
    per example), while another length, attention mask, ``token_type_ids`` or ``position_ids`` (or the
    model cast or moved since, or autocast switched) recomputes the batch and replaces its rows; calls with
    a prepared 4-d attention mask run the base and are not kept. The cache lives in memory on the base's
    device (with the input embeddings, when the model is called with them) and is not saved. It holds the
    frozen base's outputs: a call with example ids while other tasks are active too (their modules change
    the base) is refused.

    ``base_graphs=True`` (or a number of input shapes, True meaning 8) replays the base's forward on a GPU
    from CUDA graphs, one per input shape, captured at its first call: the base's launches leave the host's
    time per step (a BERT-base forward at 32 x 128 took 11.0 ms on an H100, bound by the host). Same values
    as the eager forward, under the conditions of ``pet_fast/methods/_base_graphs.py``: forward hooks on base
    modules run at capture only, shapes past the number given run eagerly (pad batches to a few lengths),
    calls that ask the base for a KV cache, attentions or hidden states run eagerly, and so does the CPU, and
    so does the base while other tasks are active with the side task (their modules run in it).
    """

    method = "side"
    width: int = 64
    layers: int = 1
    heads: int = 4
    ffn: Optional[int] = None
    alpha: Union[float, str] = 0.5
    alpha_init: float = 0.5
    alpha_end: Optional[float] = None
    schedule_steps: int = 0
    cache: bool = False
    base_graphs: Union[bool, int] = False

    def __post_init__(self):
        if self.base_graphs is True:
            self.base_graphs = 8
        elif self.base_graphs is False:
            self.base_graphs = 0
        elif not isinstance(self.base_graphs, int) or self.base_graphs < 0:
            raise ValueError(f"base_graphs must be a bool or a number of input shapes >= 0, got {self.base_graphs!r}")
        for key in ("width", "layers", "heads"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{key} must be a positive int, got {v!r}")
        if self.width % self.heads:
            raise ValueError(f"width ({self.width}) must be a multiple of heads ({self.heads})")
        if isinstance(self.alpha, str):
            if self.alpha != "learned":
                raise ValueError(f"alpha must be a number in [0, 1] or 'learned', got {self.alpha!r}")
            if not 0.0 < self.alpha_init < 1.0:
                raise ValueError(f"alpha_init must be in (0, 1), got {self.alpha_init}")
        elif isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be a number in [0, 1] or 'learned', got {self.alpha!r}")
        if self.alpha_end is not None:
            if isinstance(self.alpha, str):
                raise ValueError("alpha_end (a schedule) needs a numeric alpha to start from")
            if not 0.0 <= self.alpha_end <= 1.0:
                raise ValueError(f"alpha_end must be in [0, 1], got {self.alpha_end}")
            if not isinstance(self.schedule_steps, int) or self.schedule_steps < 1:
                raise ValueError(f"schedule_steps must be a positive int with alpha_end, got {self.schedule_steps!r}")

    def attach(self, model: nn.Module, name: str, registry) -> None:
        from . import _sites

        host = side_host(model)
        if not hasattr(host, "get_input_embeddings") or host.get_input_embeddings() is None:
            raise ValueError("side-tuning needs a transformers backbone with input embeddings")
        if not isinstance(host.get_input_embeddings(), nn.Embedding):
            raise ValueError(f"side-tuning runs its side network on token embeddings (an nn.Embedding); "
                             f"{type(model).__name__}'s input embeddings are a {type(host.get_input_embeddings()).__name__}")
        if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
            raise ValueError(f"side-tuning blends the backbone's last hidden states with a side network over its input "
                             f"tokens; encoder-decoder models ({type(model).__name__}: the decoder's states are over "
                             f"other tokens) are not supported")
        _sites.check_installable(host, "side")
        # (the host's config: a vision-language model's text model has the hidden size, its own config not)
        hidden = models.hidden_size(host if getattr(host, "config", None) is not None else model)
        project_out = getattr(host, "project_out", None)  # OPT's: its last hidden states narrower than hidden_size
        if isinstance(project_out, nn.Linear):
            hidden = project_out.out_features
        cfg = getattr(host, "config", None) or getattr(model, "config", None)
        max_pos = next((v for v in (getattr(cfg, "max_position_embeddings", None), getattr(cfg, "n_positions", None))
                        if isinstance(v, int) and v > 0), 512)  # (XLNet's is -1: no table of its own)
        causal = models.family(model) in ("gpt2", "llama") or bool(getattr(cfg, "is_decoder", False)) or _causal(host, model)
        ref = host.get_input_embeddings().weight
        # trained in float32 (float64 in a float64 model), also in a bfloat16 or float16 model: blend() gives
        # the head the base's dtype
        dtype = torch.float64 if ref.dtype == torch.float64 else torch.float32
        network = SideNetwork(hidden, width=self.width, layers=self.layers, heads=self.heads, ffn=self.ffn,
                              max_positions=max_pos, causal=causal, d_embed=ref.shape[1])  # (ALBERT's are narrower)
        branch = SideBranch(network, alpha=self.alpha, alpha_init=self.alpha_init, alpha_end=self.alpha_end,
                            schedule_steps=self.schedule_steps, cache=self.cache,
                            base_graphs=self.base_graphs).to(device=ref.device, dtype=dtype)
        _sites.install(host, "side", registry)
        task_holder(host)[name] = branch
        if model is not host and _IDS_HOOK not in model.__dict__:
            hook = _ExampleIdsHook(host)
            model.__dict__[_IDS_HOOK] = (model.register_forward_pre_hook(hook.pre, with_kwargs=True),
                                         model.register_forward_hook(hook.post, with_kwargs=True, always_call=True))

    def detach(self, model: nn.Module, name: str, registry) -> None:
        """With the model's last side task gone: the outer model's example_ids hook removed."""
        if any(isinstance(c, SideConfig) for c in registry.configs.values()):
            return
        for handle in model.__dict__.pop(_IDS_HOOK, ()):
            handle.remove()
