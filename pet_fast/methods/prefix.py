"""Prefix-tuning (Li & Liang 2021): P trained key/value vectors per layer."""
from __future__ import annotations

import dataclasses
import json
import os
from typing import ClassVar, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .. import models
from ..tasks import TASK_ATTR, MethodConfig, register_method, task_holder
from ._float32 import keeping_float32
from ._per_forward import PerForward, checkpoint_modules, uninstalled


class PrefixEncoder(nn.Module):
    """Produces each layer's ``(prefix_k, prefix_v)``, each ``(num_kv_heads, P, head_dim)`` (or
    ``(B, num_kv_heads, P, head_dim)`` as a broadcast view when ``batch_size`` is given).

    ``projection_dim=None`` trains the prefixes directly (flat). Otherwise the MLP
    re-parametrisation of Li & Liang: an embedding of the P positions (width ``embed_dim``, default
    ``num_kv_heads * head_dim``) -> Linear(embed_dim, projection_dim) -> tanh ->
    Linear(projection_dim, num_layers * 2 * num_kv_heads * head_dim). The last axis of the flat or
    projected vector is ordered (layer, key/value, head, head_dim).
    """

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, prefix_length: int, *,
                 projection_dim: Optional[int] = None, embed_dim: Optional[int] = None, dropout: float = 0.0,
                 init_std: float = 0.02, dtype=None, device=None):
        super().__init__()
        for name, value in (("num_layers", num_layers), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(prefix_length, int) or prefix_length < 0:
            raise ValueError(f"prefix_length must be an int >= 0, got {prefix_length!r}")
        if projection_dim is not None and (not isinstance(projection_dim, int) or projection_dim < 1):
            raise ValueError(f"projection_dim must be None (flat) or a positive int, got {projection_dim!r}")
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.prefix_length = prefix_length
        self.projection_dim = projection_dim
        # Set by PrefixConfig.attach: whether real tokens' positions move by P while this prefix is active, and
        # whether layers keep their attention dropout in training while it is.
        self.shift_positions = False
        self.keep_attention_dropout = True
        out_dim = num_layers * 2 * num_kv_heads * head_dim
        kw = dict(dtype=dtype, device=device)
        if projection_dim is None:
            self.prefix = nn.Parameter(torch.randn(prefix_length, out_dim, **kw) * init_std)
        else:
            embed_dim = embed_dim or num_kv_heads * head_dim
            self.embedding = nn.Parameter(torch.randn(prefix_length, embed_dim, **kw) * init_std)
            self.mlp = nn.Sequential(nn.Linear(embed_dim, projection_dim, **kw), nn.Tanh(),
                                     nn.Linear(projection_dim, out_dim, **kw))
        self.dropout = nn.Dropout(dropout)

    def _apply(self, fn, recurse=True):
        """A cast of the model to float16/bfloat16 leaves the prefix in float32 (as attached to such a model)."""
        return super()._apply(keeping_float32(self, fn), recurse)

    def _check_values(self) -> None:
        first = self.prefix if self.projection_dim is None else self.embedding
        if first.is_meta:  # read here without calling this module: offloading hooks never load it
            raise ValueError("the prefix's parameters are on the meta device (offloaded by accelerate?): pet_fast reads "
                             "them without calling the PrefixEncoder, so offloading hooks do not load them; keep the "
                             "model's pet_fast_tasks modules on the execution device")

    def flat(self) -> torch.Tensor:
        """(P, num_layers * 2 * num_kv_heads * head_dim)."""
        self._check_values()
        if self.projection_dim is None:
            return self.prefix
        return self.mlp(self.embedding)

    def layer(self, index: int, dtype: Optional[torch.dtype] = None):
        """Layer ``index``'s ``(prefix_k, prefix_v)``, each (num_kv_heads, P, head_dim); computes only
        that layer's slice (for the MLP, only its rows of the last Linear)."""
        P, H, D = self.prefix_length, self.num_kv_heads, self.head_dim
        w = 2 * H * D
        self._check_values()
        if self.projection_dim is None:
            x = self.prefix[:, index * w:(index + 1) * w]
        else:
            first, act, last = self.mlp[0], self.mlp[1], self.mlp[2]
            h = act(first(self.embedding))
            x = F.linear(h, last.weight[index * w:(index + 1) * w], last.bias[index * w:(index + 1) * w])
        if self.dropout.p > 0:
            x = self.dropout(x)
        if dtype is not None and x.dtype != dtype:
            x = x.to(dtype)
        # one unbind (one backward node that stacks both gradients) rather than two selects (two
        # zero-filled gradients summed)
        pk, pv = x.view(P, 2, H, D).permute(1, 2, 0, 3).unbind(0)
        return pk, pv

    def stacked(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """Every layer's keys and values as one contiguous (2 * num_layers, num_kv_heads, P, head_dim) tensor,
        (layer, key/value) major, from one computation: one MLP call (or none), one dropout, one cast.
        Contiguous once per forward, so each layer's prefix reaches the kernels contiguous (they would copy
        a strided one in every layer's forward and backward: four copies per layer and step, against one
        here and one in the backward)."""
        P, L, H, D = self.prefix_length, self.num_layers, self.num_kv_heads, self.head_dim
        x = self.flat()
        if self.dropout.p > 0:
            x = self.dropout(x)
        if dtype is not None and x.dtype != dtype:
            x = x.to(dtype)
        return x.view(P, 2 * L, H, D).permute(1, 2, 0, 3).contiguous()

    @staticmethod
    def layer_views(stacked: torch.Tensor, batch_size: Optional[int] = None) -> list:
        """Per layer ``(prefix_k, prefix_v)`` views of :meth:`stacked`'s tensor, from one unbind (one
        backward node for all layers): each (num_kv_heads, P, head_dim), or with ``batch_size`` a
        (B, num_kv_heads, P, head_dim) view broadcast over the batch (stride 0), whose gradient is summed
        over the batch once for all layers."""
        kv = stacked if batch_size is None else stacked.unsqueeze(1).expand(-1, batch_size, -1, -1, -1)
        t = kv.unbind(0)
        return [(t[2 * i], t[2 * i + 1]) for i in range(len(t) // 2)]

    def all_layers(self, dtype: Optional[torch.dtype] = None, batch_size: Optional[int] = None) -> list:
        """Every layer's ``(prefix_k, prefix_v)`` (:meth:`layer_views` of :meth:`stacked`): the values of
        :meth:`layer` for every index (with an MLP, up to float rounding: one product for all layers)."""
        return self.layer_views(self.stacked(dtype), batch_size)

    def forward(self, batch_size: Optional[int] = None, dtype: Optional[torch.dtype] = None) -> list:
        """A list with one ``(prefix_k, prefix_v)`` per layer."""
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 0):
            raise ValueError(f"batch_size must be None or an int >= 0, got {batch_size!r}")
        if dtype is not None and not isinstance(dtype, torch.dtype):
            raise TypeError(f"dtype must be None or a torch.dtype, got {dtype!r}")
        P = self.prefix_length
        flat = self.dropout(self.flat())
        if dtype is not None:
            flat = flat.to(dtype)
        kv = flat.view(P, self.num_layers, 2, self.num_kv_heads, self.head_dim).permute(1, 2, 3, 0, 4)
        out = []
        for layer in range(self.num_layers):
            pk, pv = kv[layer, 0], kv[layer, 1]
            if batch_size is not None:
                pk = pk.unsqueeze(0).expand(batch_size, -1, -1, -1)
                pv = pv.unsqueeze(0).expand(batch_size, -1, -1, -1)
            out.append((pk, pv))
        return out

    def extra_repr(self) -> str:
        kind = "flat" if self.projection_dim is None else f"mlp({self.projection_dim})"
        return f"layers={self.num_layers}, kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, P={self.prefix_length}, {kind}"


# --------------------------------------------------------------------------------------------------
# The method: PrefixConfig and its attach points in transformers models


def _attention_modules(model: nn.Module) -> List[nn.Module]:
    """The self-attention modules of a transformers model, ordered by ``layer_idx``."""
    found = []
    for mod_name, m in model.named_modules():
        idx = getattr(m, "layer_idx", None)
        if not isinstance(idx, int) or "Attention" not in type(m).__name__:
            continue
        if getattr(m, "is_cross_attention", False) or "cross" in mod_name.lower() or "Cross" in type(m).__name__:
            continue
        found.append((idx, mod_name, m))
    found.sort(key=lambda t: t[0])
    idxs = [t[0] for t in found]
    if idxs != list(range(len(idxs))):
        raise ValueError(f"could not map the attention modules of {type(model).__name__} to layers (layer_idx {idxs}): "
                         f"prefix tuning needs the self-attention layers numbered 0..n-1 (not hybrid models whose "
                         f"attention layers sit between other kinds, nor encoder-decoder stacks)")
    return [m for _, _, m in found]


def model_dims(model: nn.Module) -> Tuple[int, int, int, int]:
    """(num_layers, num_kv_heads, head_dim, hidden_size) of the prefix a model takes; ValueError if none."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "set_attn_implementation"):
        raise ValueError("prefix tuning needs a transformers PreTrainedModel (with a config and an attention interface)")
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"prefix tuning of encoder-decoder models ({type(model).__name__}) is not supported: it "
                         f"attaches to one stack of self-attention layers")
    can = getattr(model, "_can_set_attn_implementation", None)
    if callable(can) and not can():
        raise ValueError(f"{type(model).__name__} does not route its attention through transformers' AttentionInterface; "
                         "prefix tuning cannot attach to it")
    mods = _attention_modules(model)
    if not mods:
        raise ValueError(f"found no self-attention modules (with a layer_idx) in {type(model).__name__}")
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    softcap = getattr(text, "attn_logit_softcapping", None)
    if softcap:
        raise ValueError(f"prefix tuning does not apply attention logit softcapping (the model's "
                         f"attn_logit_softcapping is {softcap}): its attention would be computed without it")
    if "sinks" in mods[0]._parameters:
        raise ValueError(f"prefix tuning does not apply attention sinks ({type(mods[0]).__name__}.sinks): its attention "
                         f"would be computed without them")
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = (getattr(mods[0], "head_dim", None) or getattr(mods[0], "attention_head_size", None)
                or getattr(text, "head_dim", None) or text.hidden_size // heads)
    return len(mods), int(kv_heads), int(head_dim), int(text.hidden_size)


def _active_prefix_encoders(holder: nn.ModuleDict, reg) -> list:
    return [holder[n] for n in reg.active if n in holder and isinstance(holder[n], PrefixEncoder)]


def _position_shift(holder: nn.ModuleDict, reg) -> int:
    return sum(e.prefix_length for e in _active_prefix_encoders(holder, reg) if e.shift_positions)


class _ForwardPrefixes(PerForward):
    """Every attention layer's prefix, computed once per forward of the model rather than once per layer.

    While a forward of the base model is open (see _per_forward.py), the first layer to ask computes all layers' prefixes
    of every active prefix task as one tensor (:meth:`PrefixEncoder.stacked`: one MLP call, one cast; the
    tasks side by side along P) and the other layers take theirs from it: views from one unbind, either
    shared by the batch (what the kernels read) or broadcast over it (what the eager path concatenates;
    its gradient is then summed over the batch once for all layers), both of the same tensor.
    Outside a forward of the base model (a layer called on its own), while torch.compile traces (it
    fuses either way) and while transformers' gradient checkpointing is on (a recomputed layer
    recomputes its own prefix, nothing is kept between layers), each layer computes its own slice
    (:meth:`PrefixEncoder.layer`). Both give the same values; the cache holds tensors of one forward
    only, so parameter updates between forwards are always seen."""

    def __init__(self, holder: nn.ModuleDict, reg, checkpoint_modules: Sequence[nn.Module]):
        super().__init__(checkpoint_modules)
        self.holder, self.reg = holder, reg

    def keep_dropout(self) -> bool:
        """Whether layers keep their attention dropout in training: unless an active prefix task was configured
        without it (each task's own setting, read per call)."""
        return all(e.keep_attention_dropout for e in _active_prefix_encoders(self.holder, self.reg))

    def batch_views(self, index: int, dtype, batch_size: int):
        """Layer ``index``'s prefix as batch views of this forward's tensor, when one is open and has computed
        it (:meth:`layer` was called), else None: never a second computation."""
        local = self._open()
        encoders = _active_prefix_encoders(self.holder, self.reg) if local is not None else None
        layers = self._layers(local, encoders, dtype, batch_size, compute=False) if encoders else None
        return None if layers is None else layers[index]

    def layer(self, index: int, dtype, batch_size: Optional[int] = None):
        encoders = _active_prefix_encoders(self.holder, self.reg)
        if not encoders:
            return None
        local = self._open()
        if local is not None:
            return self._layers(local, encoders, dtype, batch_size, compute=True)[index]
        parts = [e.layer(index, dtype) for e in encoders]
        if len(parts) == 1:
            return parts[0]
        return torch.cat([p[0] for p in parts], dim=1), torch.cat([p[1] for p in parts], dim=1)

    def _open(self):
        """This thread's state of the open forward, or None (none open; compiled code takes the per-layer path,
        which it fuses)."""
        local = None if torch.compiler.is_compiling() else self._local
        return local if local is not None and self.open else None

    @staticmethod
    def _layers(local, encoders, dtype, batch_size, compute: bool):
        """Every layer's prefix of this forward: shared (H, P, D) views (``batch_size`` None) or batch views,
        both of one tensor that holds every layer of every task (the tasks side by side along P), computed on
        the first call (None instead when ``compute`` is false)."""
        key = (dtype, torch.is_grad_enabled(), tuple(id(e) for e in encoders))
        views = local.cache.get(key)
        if views is None:
            if not compute:
                return None
            kvs = [e.stacked(dtype) for e in encoders]
            views = local.cache[key] = {"stacked": kvs[0] if len(kvs) == 1 else torch.cat(kvs, dim=-2)}
        layers = views.get(batch_size)
        if layers is None:
            layers = views[batch_size] = PrefixEncoder.layer_views(views["stacked"], batch_size)
        return layers


def _forward_prefixes(model: nn.Module, holder: nn.ModuleDict, reg) -> _ForwardPrefixes:
    """The model's :class:`_ForwardPrefixes`, made (and its hooks installed) on the first prefix task."""
    state = model.__dict__.get("_pet_fast_prefix_forward")
    if state is not None:
        return state
    base = getattr(model, "base_model", model)
    state = _ForwardPrefixes(holder, reg, checkpoint_modules(base))
    state.install(base)
    model.__dict__["_pet_fast_prefix_forward"] = state
    return state


class _Source:
    """Layer ``index``'s prefix source (an object, not a closure, so that a deep copy of the model reads
    the copy's prefixes)."""

    __slots__ = ("state", "index")

    def __init__(self, state: _ForwardPrefixes, index: int):
        self.state, self.index = state, index

    def __call__(self, dtype, batch_size=None):
        return self.state.layer(self.index, dtype, batch_size)

    def batch_views(self, dtype, batch_size: int):
        return self.state.batch_views(self.index, dtype, batch_size)

    def keep_dropout(self) -> bool:
        return self.state.keep_dropout()


def _make_source(state: _ForwardPrefixes, index: int) -> _Source:
    return _Source(state, index)


class _ShiftPositions:
    """Forward pre-hook that gives real tokens the positions PEFT gives them: + P (see PrefixConfig). An object
    rather than a closure: a copy of the model (deepcopy) gets its own, reading the copy's tasks, and the model
    pickles."""

    def __init__(self, holder, reg, kind: str):
        self.holder, self.reg, self.kind = holder, reg, kind

    def __call__(self, module, args, kwargs):
        shift = _position_shift(self.holder, self.reg)
        if not shift:
            return None
        kwargs = dict(kwargs)
        if args and self.kind != "embeddings":  # every argument by name (a cache or positions passed by position)
            kwargs = _by_name(module, args, kwargs)
            args = ()
        pos = kwargs.get("position_ids")
        if pos is not None and self.kind != "mask_positions":
            kwargs["position_ids"] = pos + shift
            if pos.numel() and _position_table(module) is not None and not torch.compiler.is_compiling():
                # (one read of the largest: a sync on a GPU, only for models with a table of absolute positions,
                # only where the caller passes positions; compiled code checks nothing here)
                _check_positions(module, pos.shape[-1], int(pos.max()) + 1 + shift, shift, given=True)
            return args, kwargs
        if self.kind == "mask_positions":
            return args, self._mask_positions(module, kwargs, shift)
        if self.kind == "embeddings":
            # BERT/RoBERTa embeddings take the cache length and derive the positions from it (RoBERTa:
            # from the padding of input_ids), exactly as PEFT's prefix of length P in the cache does.
            ids = kwargs.get("input_ids", args[0] if args else None)
            ref = ids if ids is not None else kwargs.get("inputs_embeds")
            for key in ("cache_length", "past_key_values_length"):
                if key in kwargs:
                    kwargs[key] = kwargs[key] + shift
                    _check_positions(module, _tokens(ref), kwargs[key] + _tokens(ref), shift)
                    return args, kwargs
            key = "cache_length" if "cache_length" in models.signature(type(module).forward).parameters else "past_key_values_length"
            kwargs[key] = shift
            _check_positions(module, _tokens(ref), shift + _tokens(ref), shift)
            return args, kwargs
        # causal LMs: the default positions arange(T) + past, shifted
        ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        ref = ids if ids is not None else embeds
        if ref is None:
            return None
        T = ref.shape[1]
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        past = cache.get_seq_length() if cache is not None and hasattr(cache, "get_seq_length") else 0
        _check_positions(module, T, past + shift + T, shift)
        kwargs["position_ids"] = (torch.arange(T, device=ref.device) + (past + shift)).unsqueeze(0)
        return args, kwargs


    @staticmethod
    def _mask_positions(module, kwargs, shift: int) -> dict:
        """A position embedding that derives the positions from the attention mask (OPT's: the count of real
        tokens so far, -1 at padding; its model passes them in, or the embedding computes them): real tokens'
        positions + P, as a prefix of P real tokens in the cache gives them; padding keeps -1."""
        pos = kwargs.get("position_ids")
        if pos is None:
            mask, past = kwargs["attention_mask"], int(kwargs.get("cache_length", kwargs.get("past_key_values_length", 0)))
            pos = ((torch.cumsum(mask, dim=1) * mask) - 1).long()[:, past:]
        kwargs["position_ids"] = torch.where(pos >= 0, pos + shift, pos)
        if pos.numel() and not torch.compiler.is_compiling():  # (a read of the largest: a sync on a GPU)
            end = int(pos.max()) + 1 + shift
            limit = module.num_embeddings - int(getattr(module, "offset", 0))
            if end > limit:
                raise ValueError(
                    f"prefix tuning with shift_positions=True moves the tokens' positions by the prefix length {shift} "
                    f"(as PEFT does): these tokens need {end} positions, but the model has {limit}; use "
                    f"PrefixConfig(shift_positions=False) or sequences of at most {limit - shift} positions")
        return kwargs


def _mask_position_embedding(base: nn.Module):
    """The model's position embedding that derives positions from the attention mask (an nn.Embedding whose
    forward takes ``attention_mask`` and ``position_ids``: OPT's), or None."""
    for m in base.modules():
        if isinstance(m, nn.Embedding) and {"attention_mask", "position_ids"} <= set(models.signature(type(m).forward).parameters):
            return m
    return None


def _by_name(module, args, kwargs) -> dict:
    """``module``'s call arguments all as keywords (its forward's ``**kwargs`` merged in)."""
    bound = models.signature(type(module).forward).bind_partial(module, *args, **kwargs).arguments
    bound.pop(next(iter(bound)))  # self
    for name, p in models.signature(type(module).forward).parameters.items():
        if p.kind is p.VAR_KEYWORD and name in bound:
            bound.update(bound.pop(name))
    return bound


def _tokens(ref) -> int:
    """The sequence length of input ids or embeddings (0 when there are none)."""
    return ref.shape[1] if ref is not None and ref.dim() >= 2 else 0


def _position_table(module):
    """The module's table of absolute position embeddings (BERT's, RoBERTa's, GPT-2's), or None (rotary)."""
    table = getattr(module, "position_embeddings", None) or getattr(module, "wpe", None)
    return table if isinstance(table, nn.Embedding) else None


def _check_positions(module, tokens: int, end: int, shift: int, given: bool = False) -> None:
    """A clear error where ``tokens`` tokens' shifted positions reach ``end`` (one past the largest) beyond the
    module's table of absolute position embeddings; an embedding lookup there fails inside the kernel (on a GPU,
    a device-side assert). Models without such a table (rotary positions) have no limit. ``given``: positions
    the caller passed (RoBERTa's padding offset then does not apply)."""
    table = _position_table(module)
    if table is None or not tokens or torch.compiler.is_compiling():  # (compiled code checks nothing here: a
        return  # comparison of symbolic sizes would hold the graph to them)
    pad = getattr(module, "padding_idx", None)  # RoBERTa's derived positions start after its padding index
    limit = table.num_embeddings - (pad + 1 if isinstance(pad, int) and not given else 0)
    if int(end) > limit:
        raise ValueError(
            f"prefix tuning with shift_positions=True moves the tokens' positions by the prefix length {shift} "
            f"(as PEFT does): {tokens} tokens {'at the positions given' if given else 'from position ' + str(int(end) - tokens)}"
            f" need {int(end)} positions, but the model has {limit}; use PrefixConfig(shift_positions=False) "
            f"(AdapterHub's behaviour) or sequences of at most {limit - shift} positions")


def _install_position_hook(model: nn.Module, holder, reg) -> None:
    if model.__dict__.get("_pet_fast_prefix_position_hook") is not None:
        return

    base = getattr(model, "base_model", model)
    embeddings = getattr(base, "embeddings", None)
    takes_cache_length = isinstance(embeddings, nn.Module) and bool(
        {"cache_length", "past_key_values_length"} & set(models.signature(type(embeddings).forward).parameters))
    if hasattr(embeddings, "position_embeddings") and (models.family(model) == "bert" or takes_cache_length):
        # (BERT's kind, and encoders outside the family that derive positions as it does: Data2VecText, XLM-R XL)
        target, kind = embeddings, "embeddings"
    elif (made_from_mask := _mask_position_embedding(base)) is not None:
        # hooked where the positions are made: OPTForCausalLM calls the decoder itself, past base_model's forward
        target, kind = made_from_mask, "mask_positions"
    else:
        target, kind = base, "model"
        if "position_ids" not in models.signature(type(target).forward).parameters:
            raise ValueError(f"{type(target).__name__}.forward takes no position_ids; set shift_positions=False")
    handle = target.register_forward_pre_hook(_ShiftPositions(holder, reg, kind), with_kwargs=True)
    model.__dict__["_pet_fast_prefix_position_hook"] = handle


@register_method
@dataclasses.dataclass
class PrefixConfig(MethodConfig):
    """Prefix-tuning: ``prefix_length`` trained key/value vectors per layer, attended by every query.

    * ``projection_dim=None`` trains the prefixes directly (flat); an int re-parametrises them by an
      MLP of that hidden size (Li & Liang): embedding (P, ``embed_dim``, default Hkv*head_dim) ->
      Linear -> tanh -> Linear(projection_dim, layers*2*Hkv*head_dim).
    * Grouped-query models get ``num_key_value_heads`` prefix heads.
    * ``shift_positions=True`` (PEFT's behaviour): real tokens get the positions they get in PEFT,
      where the prefix sits in the KV cache as P past tokens: P + their usual position (positions
      derived from the cache length, from RoBERTa's padding, or passed as ``position_ids``, e.g. by
      ``generate()`` from the attention mask, all move by P). The prefix itself has no position (no
      RoPE, no position embedding) in both libraries. ``False``: positions are left alone
      (AdapterHub's behaviour).
    * The prefix is never stored in the KV cache: the attention function adds it at every step, and
      the attention mask covers only real tokens (no ones(P) columns to add).
    * Sliding-window layers (Mistral, Qwen2, Gemma3's local layers): every query sees the whole prefix,
      however far it is from the start. PEFT's prefix, P cached tokens, leaves a query's window once the
      query is ``sliding_window - P`` tokens in: results equal PEFT's only for sequences within that.
    * ``keep_attention_dropout``: in training, layers with attention dropout pass it to the op
      (``prefix_attention(dropout_p=...)``: the Triton kernels draw it themselves, the eager backend is
      SDPA's); False trains without attention dropout (while this task is active: a setting per task).
    * One forward of the model computes every layer's prefix once (one MLP call, one cast, one
      backward node for all layers) and each layer reads its own. Gradient checkpointing: then each
      layer computes its prefix inside its own forward (for the MLP, only that layer's rows of the
      last Linear), so a recomputed layer recomputes its prefix and nothing is stashed between
      layers (PEFT refuses checkpointing with prefix tuning).
    * The model is switched to the ``pet_fast_prefix`` attention implementation
      (:mod:`pet_fast.hf_attention`); it must be configured with ``eager`` or ``sdpa``.
    """

    method: ClassVar[str] = "prefix"
    prefix_length: int = 30
    projection_dim: Optional[int] = None
    embed_dim: Optional[int] = None
    dropout: float = 0.0
    init_std: float = 0.02
    shift_positions: bool = True
    keep_attention_dropout: bool = True

    def __post_init__(self):
        if not isinstance(self.prefix_length, int) or isinstance(self.prefix_length, bool) or self.prefix_length < 1:
            raise ValueError(f"prefix_length must be a positive int, got {self.prefix_length!r}")
        for fname in ("projection_dim", "embed_dim"):
            v = getattr(self, fname)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise ValueError(f"{fname} must be None or a positive int, got {v!r}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")

    def attach(self, model: nn.Module, name: str, registry) -> None:
        from .. import hf_attention

        num_layers, kv_heads, head_dim, _ = model_dims(model)  # raises before any change
        current = hf_attention.current_implementation(model)
        if current not in ("eager", "sdpa", hf_attention.NAME):
            raise ValueError(f"prefix tuning runs on models configured with attn_implementation 'eager' or 'sdpa', "
                             f"not {current!r}")
        if self.shift_positions:
            base = getattr(model, "base_model", model)
            if "position_ids" not in models.signature(type(base).forward).parameters:
                raise ValueError(f"{type(base).__name__}.forward takes no position_ids; use shift_positions=False")
        param = next((p for p in model.parameters() if p.is_floating_point()), None)
        dtype = torch.float64 if param is not None and param.dtype == torch.float64 else torch.float32
        device = param.device if param is not None else None
        encoder = PrefixEncoder(num_layers, kv_heads, head_dim, self.prefix_length, projection_dim=self.projection_dim,
                                embed_dim=self.embed_dim, dropout=self.dropout, init_std=self.init_std,
                                dtype=dtype, device=device)
        encoder.shift_positions = self.shift_positions
        encoder.keep_attention_dropout = self.keep_attention_dropout
        holder = task_holder(model)
        holder[name] = encoder
        original = hf_attention.enable(model)
        state = _forward_prefixes(model, holder, registry)
        for i, m in enumerate(_attention_modules(model)):
            lp = hf_attention.layer_prefix(m)
            if lp is None:  # (a second prefix task: the source already reads every active prefix task)
                hf_attention.set_layer_prefix(m, hf_attention.LayerPrefix(_make_source(state, i), original))
        if self.shift_positions:
            _install_position_hook(model, holder, registry)


    def detach(self, model: nn.Module, name: str, registry) -> None:
        """With the model's last prefix task gone: its attention implementation back, the layers' prefix
        sources and the position hook removed (the model as it was before the first prefix task)."""
        from .. import hf_attention

        if any(isinstance(c, PrefixConfig) for c in registry.configs.values()):
            return
        handle = model.__dict__.pop("_pet_fast_prefix_position_hook", None)
        if handle is not None:
            handle.remove()
        uninstalled(model, "_pet_fast_prefix_forward")
        layers = _attention_modules(model)
        lp = next((p for p in map(hf_attention.layer_prefix, layers) if p is not None), None)
        if lp is not None:
            hf_attention.disable(model, layers, lp.original)


def prefix_encoder(model: nn.Module, name: str) -> PrefixEncoder:
    holder = getattr(model, TASK_ATTR, None)
    if holder is None or name not in holder or not isinstance(holder[name], PrefixEncoder):
        raise ValueError(f"model has no prefix task named {name!r}")
    return holder[name]


# --------------------------------------------------------------------------------------------------
# Importers (``detect(path) -> bool``, ``load_fn(model, path, name) -> None``)


def _read_json(path: str) -> Optional[dict]:
    try:
        with open(os.path.join(path, "adapter_config.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _load_tensors(path: str, names: Sequence[str]) -> Dict[str, torch.Tensor]:
    for fname in names:
        full = os.path.join(path, fname)
        if os.path.isfile(full):
            from ..io import read_tensors

            return read_tensors(full)
    raise ValueError(f"{path}: none of the weight files {list(names)} is there")


def peft_prefix_detect(path) -> bool:
    """A PEFT prefix-tuning checkpoint: adapter_config.json with peft_type PREFIX_TUNING."""
    cfg = _read_json(os.fspath(path)) if os.path.isdir(os.fspath(path)) else None
    return bool(cfg) and str(cfg.get("peft_type", "")).upper() == "PREFIX_TUNING"


def peft_prefix_load(model: nn.Module, path, name: str) -> None:
    """Import a PEFT prefix-tuning checkpoint as task ``name`` (flat prefix, positions shifted like PEFT).

    PEFT saves the flat key/value table ``prompt_embeddings`` (P, num_layers*2*token_dim) even when it
    trained with ``prefix_projection`` (the MLP's output is saved), ordered (layer, key/value, head,
    head_dim): our flat layout. ``modules_to_save`` weights (``base_model.<key>``) are copied into the
    model when it has those keys.
    """
    path = os.fspath(path)
    cfg = _read_json(path)
    if not cfg or str(cfg.get("peft_type", "")).upper() != "PREFIX_TUNING":
        raise ValueError(f"{path} is not a PEFT prefix-tuning checkpoint")
    if int(cfg.get("num_transformer_submodules") or 1) != 1:
        raise ValueError("PEFT prefix checkpoints of encoder-decoder models (num_transformer_submodules=2) are not supported")
    num_layers, kv_heads, head_dim, _ = model_dims(model)
    if not isinstance(cfg.get("num_virtual_tokens"), int) or cfg["num_virtual_tokens"] < 1:
        raise ValueError(f"{path}: adapter_config.json needs num_virtual_tokens (a positive int), "
                         f"got {cfg.get('num_virtual_tokens')!r}")
    P = cfg["num_virtual_tokens"]
    want = {"num_layers": num_layers, "token_dim": kv_heads * head_dim, "num_attention_heads": kv_heads}
    for key, value in want.items():
        if cfg.get(key) is not None and int(cfg[key]) != value:
            raise ValueError(f"PEFT checkpoint has {key}={cfg[key]} but the model needs {value}")
    sd = _load_tensors(path, ("adapter_model.safetensors", "adapter_model.bin"))
    if "prompt_embeddings" not in sd:
        raise ValueError(f"{path}: no 'prompt_embeddings' tensor in the PEFT checkpoint")
    table = sd["prompt_embeddings"]
    shape = (P, num_layers * 2 * kv_heads * head_dim)
    if tuple(table.shape) != shape:
        raise ValueError(f"prompt_embeddings has shape {tuple(table.shape)}, the model needs {shape}")
    model_sd = model.state_dict()
    extra = {}
    for key, tensor in sd.items():
        if key == "prompt_embeddings":
            continue
        k = key[len("base_model."):] if key.startswith("base_model.") else key
        if k not in model_sd:
            raise ValueError(f"PEFT checkpoint tensor {key!r} has no counterpart {k!r} in the model")
        if model_sd[k].shape != tensor.shape:
            raise ValueError(f"PEFT checkpoint tensor {key!r} has shape {tuple(tensor.shape)}, model's {k!r} is {tuple(model_sd[k].shape)}")
        extra[k] = tensor
    from ..io import attach_and_fill

    def fill(_state):  # (a failure here leaves the model as it was: attach_and_fill undoes the inject)
        params = dict(model.named_parameters(remove_duplicate=False))
        buffers = dict(model.named_buffers(remove_duplicate=False))
        first = {}  # a tied tensor's first name: lm_head.weight -> transformer.wte.weight
        for n, t in list(params.items()) + list(buffers.items()):
            first.setdefault(id(t), n)
        targets = []
        for k, tensor in extra.items():
            # A head the task trains has a per-task copy (<head>.pet_fast_tasks.<name>.*): PEFT's
            # modules_to_save weights belong there, so switching tasks keeps them apart.
            head, _, leaf = k.partition(".")
            task_key = f"{head}.{TASK_ATTR}.{name}.{leaf}"
            target = params.get(task_key, params.get(k, buffers.get(k)))
            if first[id(target)] not in (task_key, k) and not torch.equal(target, tensor.to(target.dtype)):
                raise ValueError(f"PEFT checkpoint tensor {k!r} is tied to {first[id(target)]!r} in this model (PEFT "
                                 f"trained an untied copy): loading it would change {first[id(target)]!r} too")
            targets.append((target, tensor))
        with torch.no_grad():
            prefix_encoder(model, name).prefix.copy_(table.to(torch.float32))
            for target, tensor in targets:
                target.copy_(tensor.to(target.dtype))

    attach_and_fill(model, PrefixConfig(prefix_length=P, shift_positions=True), name, fill)


def adapterhub_prefix_detect(path) -> bool:
    """An AdapterHub prefix-tuning checkpoint: adapter_config.json whose config.architecture is
    prefix_tuning, beside pytorch_adapter.bin or adapter.safetensors."""
    path = os.fspath(path)
    cfg = _read_json(path) if os.path.isdir(path) else None
    if not cfg or not isinstance(cfg.get("config"), dict):
        return False
    if cfg["config"].get("architecture") != "prefix_tuning":
        return False
    return any(os.path.isfile(os.path.join(path, f)) for f in ("adapter.safetensors", "pytorch_adapter.bin"))


def adapterhub_prefix_load(model: nn.Module, path, name: str) -> None:
    """Import an AdapterHub prefix-tuning checkpoint (flat or MLP) as task ``name``.

    AdapterHub: MLP ``wte`` (P, H) -> ``control_trans`` Linear(H, bottleneck) -> tanh ->
    Linear(bottleneck, L*2*Hkv*head_dim), viewed (P, L*2, Hkv, head_dim) with key = slot 2l, value =
    slot 2l+1; flat: one vector ``control_trans`` of that size. The prefix is added after RoPE and
    after the cache update and real tokens keep their positions, so ``shift_positions=False``.
    Gating, non-tanh activations and ``leave_out`` are refused.
    """
    from .. import tasks as _inject

    path = os.fspath(path)
    meta = _read_json(path)
    if not meta or not isinstance(meta.get("config"), dict) or meta["config"].get("architecture") != "prefix_tuning":
        raise ValueError(f"{path} is not an AdapterHub prefix-tuning checkpoint")
    c = meta["config"]
    if c.get("use_gating"):
        raise ValueError("AdapterHub prefix tuning with use_gating=True is not supported")
    if c.get("leave_out"):
        raise ValueError(f"AdapterHub prefix tuning with leave_out={c['leave_out']} is not supported")
    if str(c.get("non_linearity", "tanh")).lower() != "tanh":
        raise ValueError(f"AdapterHub prefix tuning with non_linearity={c.get('non_linearity')!r} is not supported (tanh only)")
    num_layers, kv_heads, head_dim, hidden = model_dims(model)
    P = int(c.get("prefix_length", 30))
    flat = bool(c.get("flat", False))
    out_dim = num_layers * 2 * kv_heads * head_dim
    sd = _load_tensors(path, ("adapter.safetensors", "pytorch_adapter.bin"))
    ah_name = meta.get("name")
    marker = f"prefix_tunings.{ah_name}." if ah_name else "prefix_tunings."
    picked: Dict[str, torch.Tensor] = {}
    for key, tensor in sd.items():
        if marker in key and ".self_prefix." in key:
            suffix = key.split(".self_prefix.", 1)[1]
            picked.setdefault(suffix, tensor)  # the pool is saved under several names; they are equal
    config_ = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    query_heads = int(config_.num_attention_heads)
    if query_heads != kv_heads:  # AdapterHub sizes a GQA model's prefix by its query heads
        made = picked.get("control_trans") if flat else picked.get("control_trans.2.weight")
        by_query_heads = num_layers * 2 * query_heads * head_dim
        if made is not None and (made.numel() == P * by_query_heads if flat else made.shape[0] == by_query_heads):
            raise ValueError(f"this AdapterHub prefix has {query_heads} heads per layer (AdapterHub sizes prefixes by the "
                             f"query heads and repeats the keys and values to them), where the model's attention "
                             f"has {kv_heads} key/value heads, which pet_fast's prefixes follow: it cannot be imported")
    if flat:
        if "control_trans" not in picked or tuple(picked["control_trans"].shape) != (P * out_dim,):
            got = tuple(picked["control_trans"].shape) if "control_trans" in picked else None
            raise ValueError(f"AdapterHub flat prefix needs control_trans of shape ({P * out_dim},), got {got}")
        config = PrefixConfig(prefix_length=P, projection_dim=None, dropout=float(c.get("dropout") or 0.0),
                              shift_positions=False)
    else:
        bn = int(c.get("bottleneck_size", 512))
        shapes = {"wte.weight": (P, hidden), "control_trans.0.weight": (bn, hidden), "control_trans.0.bias": (bn,),
                  "control_trans.2.weight": (out_dim, bn), "control_trans.2.bias": (out_dim,)}
        for key, shape in shapes.items():
            if key not in picked:
                raise ValueError(f"AdapterHub prefix checkpoint lacks '...self_prefix.{key}'")
            if tuple(picked[key].shape) != shape:
                raise ValueError(f"AdapterHub tensor self_prefix.{key} has shape {tuple(picked[key].shape)}, the model needs {shape}")
        config = PrefixConfig(prefix_length=P, projection_dim=bn, embed_dim=hidden,
                              dropout=float(c.get("dropout") or 0.0), shift_positions=False)
    _inject.inject(model, config, name)
    enc = prefix_encoder(model, name)
    with torch.no_grad():
        if flat:
            enc.prefix.copy_(picked["control_trans"].view(P, out_dim))
        else:
            enc.embedding.copy_(picked["wte.weight"])
            enc.mlp[0].weight.copy_(picked["control_trans.0.weight"])
            enc.mlp[0].bias.copy_(picked["control_trans.0.bias"])
            enc.mlp[2].weight.copy_(picked["control_trans.2.weight"])
            enc.mlp[2].bias.copy_(picked["control_trans.2.bias"])
