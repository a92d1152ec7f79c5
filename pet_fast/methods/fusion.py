"""AdapterFusion (Pfeiffer et al. 2021): attention over the outputs of k frozen adapters."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from ..dispatch import graph_task
from ..ops import _checks
from ..ops._autocast import compute_dtype
from ..ops import adapter_fusion as fusion_ops
from ._per_forward import PerForward, attached, counted_steps, forgotten as _forgotten, installed
from .adapter import BottleneckAdapter


# The folded query-key product (see _ForwardProjections) costs about d^3 multiply-adds per layer per forward
# (3 d^3 with its backward) and saves about N d^2 (3 N d^2): it pays from N >= d tokens per call, in
# training and in inference alike. Below that (serving, small evaluation batches) the layers take the
# projections unfolded. Tools that measure a small batch for a large step's sake may lower it.
FOLD_MIN_TOKENS_PER_WIDTH = 1.0
# temperature=True (AdapterHub's): the softmax temperature starts here and falls by 1/ANNEALING_STEPS of it per
# training forward, down to 1
TEMPERATURE_START, ANNEALING_STEPS = 50.0, 1000


def _maybe_cast(t, dtype):
    return None if t is None else t.to(dtype)


def _seen(steps: torch.Tensor) -> tuple:
    """What tells that ``temperature_steps`` changed outside the forwards: the tensor (a load with
    ``assign=True`` puts a new one there, whose version may equal the old one's) and its version."""
    return id(steps), steps._version


class AdapterFusion(nn.Module):
    """The fusion layer of AdapterHub's ``BertFusion``.

    Args mirror AdapterHub's fusion config: ``query``/``key``/``value`` add d x d projections (query
    and key with bias, value without); ``value_initialized`` starts the value projection near the
    identity (1 on the diagonal, 1e-6 elsewhere); ``temperature=True`` starts the softmax temperature
    at 50 and lowers it by 0.05 per training forward down to 1 (its progress is the buffer
    ``temperature_steps``, saved with the task; a layer recomputed in the backward under gradient
    checkpointing takes the temperature of the module's last training forward and lowers nothing: its own
    forward's where each forward has its backward, as in gradient accumulation, but with two training
    forwards before one backward the first is recomputed at the second's temperature, 0.05 lower);
    ``dropout`` applies to the attention scores in training, as AdapterHub applies it (before the
    temperature; the key bias then counts). In
    :meth:`fuse` the stacked op takes it as its ``score_mask``, and in :meth:`forward` (given adapter outputs)
    the given-outputs op, so the fused backends train with it.
    """

    def __init__(self, d_model: int, *, query: bool = True, key: bool = True, value: bool = True,
                 value_initialized: bool = False, temperature: bool = False, residual_before: bool = False,
                 value_before_softmax: bool = True, dropout: float = 0.0, dtype=None, device=None):
        super().__init__()
        if isinstance(d_model, bool) or not isinstance(d_model, int) or d_model < 1:
            raise ValueError(f"d_model must be a positive int, got {d_model!r}")
        kw = dict(dtype=dtype, device=device)
        self.query = nn.Linear(d_model, d_model, **kw) if query else None
        self.key = nn.Linear(d_model, d_model, **kw) if key else None
        self.value = nn.Linear(d_model, d_model, bias=False, **kw) if value else None
        for lin in (self.query, self.key, self.value):
            if lin is not None:
                nn.init.normal_(lin.weight, 0.0, 0.02)
                if lin.bias is not None:
                    nn.init.zeros_(lin.bias)
        if value and value_initialized:
            with torch.no_grad():
                self.value.weight.fill_(1e-6).fill_diagonal_(1.0)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.dropout = dropout
        self.T = TEMPERATURE_START if temperature else 1.0
        self.reduction = self.T / ANNEALING_STEPS
        self._last_t = self.T  # the temperature of the last training forward (what its recomputation takes)
        if temperature:
            self.register_buffer("temperature_steps", torch.zeros((), dtype=torch.long, device=device))
            self._steps_seen = _seen(self.temperature_steps)
        self.residual_before = residual_before
        self.value_before_softmax = value_before_softmax

    def _projections(self, dtype, key_bias: bool = False, fold: bool = False) -> dict:
        """The op's projection arguments in ``dtype``. The key's bias adds one number per token to every
        adapter's score, which the softmax cancels: it is passed (``key_bias``) only where dropout on the
        scores keeps it from cancelling, so that every backend leaves its gradient None. With ``fold`` (the
        stacked op's calls with at least FOLD_MIN_TOKENS_PER_WIDTH x d tokens), a model's forward may hand the
        query and key projections folded into one (``w_query_key``, ``b_query_key``: see _ForwardProjections),
        and with ``key_bias`` too the key bias's term folded as ``score_shift_weight`` and ``score_shift_bias``
        (not op arguments: the caller forms the op's score shift from them, see _score_shift)."""
        forward = self.__dict__.get("_forward")  # (a plain attribute set by FusionConfig.attach)
        cast = forward.projections(self, dtype, fold, key_bias) if forward is not None else None
        if cast is None:
            cast = {name: _maybe_cast(t, dtype) for name, t in _projection_tensors(self, key_bias).items()}
        return dict(cast, b_key=cast.get("b_key"), b_value=None, residual_before=self.residual_before,
                    value_before_softmax=self.value_before_softmax)

    def _temperature(self) -> float:
        """This call's softmax temperature, lowered after each training forward down to 1. A copy into
        ``temperature_steps`` (load, load_state_dict: its version moves) or a new tensor there
        (``load_state_dict(assign=True)``) sets the temperature from it."""
        steps = self._buffers.get("temperature_steps")
        compiling = torch.compiler.is_compiling()  # (compiled code: no version or backward-pass reads)
        if compiling and steps is not None and (self.key is not None or self.query is not None):
            # compiled code takes it from the buffer, a tensor (folded into the key or query side,
            # _temperature_folded): a Python float would be a constant of the graph, compiled again at every step
            t = (TEMPERATURE_START - self.reduction * counted_steps(steps)).clamp(min=1.0)
            if self.training:
                steps.add_(1)
            return t
        if steps is not None and not compiling and _seen(steps) != self._steps_seen:
            t = TEMPERATURE_START
            for _ in range(min(int(steps), 2 * ANNEALING_STEPS)):  # (one read; as the forwards lowered it, bit for bit)
                t = max(t - self.reduction, 1.0)
            self.T, self._last_t, self._steps_seen = t, t, _seen(steps)
        if not self.training:
            return self.T
        if not compiling and graph_task() != -1:  # recomputed in the backward (gradient checkpointing): its
            # forward's, lowering nothing
            return self._last_t
        t = self._last_t = self.T
        lowered = max(t - self.reduction, 1.0)
        if lowered != t:
            self.T = lowered
            if steps is not None:
                steps.add_(1)
                if not compiling:
                    self._steps_seen = _seen(steps)
        return t

    def forward(self, query: torch.Tensor, values: torch.Tensor, residual: torch.Tensor, *,
                backend: Optional[str] = None) -> torch.Tensor:
        """Fuse given adapter outputs ``values (..., k, d)``."""
        _checks.tensor("query", query, floating=False)
        t = self._temperature()
        dropout = self.training and self.dropout > 0
        proj, _, t = _temperature_folded(self._projections(query.dtype, key_bias=dropout), None, t)
        # dropout: the op's score mask (its eager backend keeps the adapter outputs once: fusion_ops.masked_eager)
        mask = dropout_mask(values.shape[:-1], self.dropout, values.device) if dropout else None
        return fusion_ops.adapter_fusion(query, values, residual, temperature=t, score_mask=mask, backend=backend,
                                         **proj)

    def _stacked(self, adapters: Sequence[BottleneckAdapter], dtype) -> tuple:
        """:func:`stack_adapters`, kept between calls while the adapters are frozen (AdapterFusion's
        usual second stage): stacking k adapters costs a few dozen small launches per call. The copy is
        rebuilt when any adapter parameter changes in place (its version counter moves) or gets new memory
        (``p.data = ...``, as ``vector_to_parameters`` does), when the adapters, their scalings or activations,
        or the dtype change, and never kept when autograd needs the stacking or under torch.compile (which
        folds it into the graph), under inference mode or for parameters without storage (torch.func's
        vmap). Not seen: an in-place change through ``p.data`` (``p.data.mul_(2)``), which
        by design moves no version counter; change frozen weights under ``torch.no_grad()`` instead."""
        # the adapters' own parameter dicts: Module.parameters() (a generator that walks submodules and
        # deduplicates) made half the host time of a cached call (three adapters: 13 -> 6 us on the CPU)
        params = [p for a in adapters for p in (a._parameters.values() if not a._modules else a.parameters())
                  if p is not None]
        if (torch.compiler.is_compiling() or (torch.is_grad_enabled() and any(p.requires_grad for p in params))
                or torch.is_inference_mode_enabled()):  # (inference tensors kept would fail a later training step)
            return stack_adapters(adapters, dtype)
        try:
            key = (dtype, tuple(id(a) for a in adapters), tuple((id(p), p.data_ptr(), p.device, p._version) for p in params),
                   tuple(a.scaling if isinstance(a.scaling, float) else id(a.scaling) for a in adapters),
                   tuple(a.activation for a in adapters))
        except RuntimeError:  # parameters without storage (torch.func's batched tensors under vmap): not kept
            return stack_adapters(adapters, dtype)
        cache = self.__dict__.get("_stack_cache")
        if cache is None or cache[0] != key:
            with torch.no_grad():
                # the parameters themselves are kept too: while they live, no other tensor takes their ids
                cache = (key, stack_adapters(adapters, dtype), params)
            self.__dict__["_stack_cache"] = cache  # a plain attribute: not in state_dict, not moved by .to()
        return cache[1]

    def fuse(self, x: torch.Tensor, query: torch.Tensor, residual: torch.Tensor,
             adapters: Sequence[BottleneckAdapter], *, backend: Optional[str] = None) -> torch.Tensor:
        """Run ``adapters`` on ``x`` and fuse their outputs in one op (the k outputs are not stored
        by fused backends). Adapters that differ in activation or scaling kind, or scale per channel, are run
        one by one and their outputs fused (the given-values op)."""
        if len(adapters) == 0:
            raise ValueError("adapters must hold at least one BottleneckAdapter")
        if not torch.jit.is_tracing() and len({a.d_model for a in adapters}) != 1:  # (traced: sizes are tensors)
            raise ValueError(f"adapters must share d_model to be fused, got {[a.d_model for a in adapters]}")
        dropout = self.training and self.dropout > 0
        if not _stackable(adapters):
            # the k outputs formed, then fused: adapters the stacked op does not take (per-channel scaling,
            # different activations)
            values = torch.stack([a(x, residual=torch.zeros_like(x)) for a in adapters], dim=-2)
            dt = compute_dtype(values)
            if dt != values.dtype:
                # under autocast the adapters return float32 (x + 0 in the float32 stream): cast once here, or each
                # of the two products that read the values casts them and keeps its own copy for the backward
                values = values.to(dt)
            query, residual = self._in_compute_dtype(query, residual, dt)
            return self.forward(query, values, residual, backend=backend)
        dt = compute_dtype(x)
        if dt != x.dtype:
            # Under autocast with float32 activations (the LayerNorm output at a Pfeiffer site), run the op in
            # the autocast dtype as eager autocast would: the activations cast once (x and query are often
            # the same tensor), the frozen adapters stacked once in that dtype and kept (not cast on every
            # call), and the residual left in float32 when it is added after the fusion (the op adds it in
            # float32, as eager does).
            xc = x.to(dt)
            query, residual = self._in_compute_dtype(xc if query is x else query, residual, dt)
            x = xc
        w_down, b_down, w_up, b_up, scaling, activation = self._stacked(adapters, x.dtype)
        t = self._temperature()
        # dropout: the op's score mask (the key bias's term then counts: with the fold, as the op's score shift)
        mask = dropout_mask(x.shape[:-1] + (len(adapters),), self.dropout, x.device) if dropout else None
        proj = self._projections(query.dtype, key_bias=dropout, fold=_worth_folding(x))
        shift = _score_shift(query, proj.pop("score_shift_weight", None), proj.pop("score_shift_bias", None))
        proj, shift, t = _temperature_folded(proj, shift, t)
        kw = dict(activation=activation, scaling=scaling, temperature=t, score_mask=mask, score_shift=shift, **proj)
        compiling = torch.compiler.is_compiling()
        calls = None if (compiling or backend is not None) else self.__dict__.get("_replayed")
        replayed = calls.get(x) if calls is not None else None
        if replayed is not None:  # this module's earlier call, as the op's C++ node behind a guard (see below)
            y = replayed(x, query, residual, w_down, b_down, w_up, b_up, **kw)
            if y is not None:
                return y
        y = fusion_ops.stacked_adapter_fusion(x, query, residual, w_down, b_down, w_up, b_up, backend=backend, **kw)
        if not compiling and backend is None and torch.is_grad_enabled():
            # once the op's call ran as its C++ node, the next calls with the same facts reach that node in one
            # C++ call (ops/adapter_fusion.py ReplayedStackedCall, kept per shape of x; calls without gradients
            # never run as the node)
            replayed = fusion_ops.replayed_stacked_call(y, x, query, residual, w_down, b_down, w_up, b_up, **kw)
            if replayed is not None:
                if calls is None:
                    calls = self.__dict__["_replayed"] = fusion_ops.ReplayedStackedCalls()
                calls.add(x, replayed)
        return y

    def _in_compute_dtype(self, query, residual, dt):
        """query in the compute dtype ``dt`` (autocast's, where the fused ops take one dtype), and the residual
        where it enters the products (added before the fusion) or is not float32 (the ops add a float32
        residual after the fusion in float32, as eager autocast does)."""
        if query.dtype != dt:
            query = query.to(dt)
        if residual.dtype != dt and (self.residual_before or residual.dtype != torch.float32):
            residual = residual.to(dt)
        return query, residual


def _temperature_folded(proj: dict, shift: Optional[torch.Tensor], t) -> tuple:
    """(proj, shift, temperature): with a temperature other than 1, its inverse folded into the key side of the
    scores (the folded query-key product and its bias, or the key projection and its bias; the score shift) and
    temperature 1 for the op. A temperature annealed at every training forward (``temperature=True``) would
    otherwise be a new constant of the fused kernels' recorded launches at every step, recorded anew each time
    (kernels/_replay.py). The scores are the same up to rounding. Without a key projection, the query side
    takes it (the scores are bilinear in the two); without either the temperature stays."""
    names = (("w_query_key", "b_query_key") if proj.get("w_query_key") is not None
             else ("w_key", "b_key") if proj.get("w_key") is not None else ("w_query", "b_query"))
    if proj.get(names[0]) is None or (not isinstance(t, torch.Tensor) and t == 1.0):  # (a tensor: compiled code's)
        return proj, shift, t
    inv = 1.0 / t
    proj = dict(proj, **{n: proj[n] * inv for n in names if proj.get(n) is not None})
    return proj, None if shift is None else shift * inv, 1.0


def _score_shift(query: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor]):
    """query @ weight + bias per token (the folded key bias's term, see _ForwardProjections._folded), or None."""
    if weight is None:
        return None
    shift = torch.mv(query.reshape(-1, query.shape[-1]), weight).view(query.shape[:-1])
    return shift if bias is None else shift + bias


def dropout_mask(shape, p: float, device) -> torch.Tensor:
    """float32 ``shape``: 0 with probability ``p``, else 1 / (1 - p) (``F.dropout`` of ones, in two launches)."""
    return torch.empty(shape, dtype=torch.float32, device=device).bernoulli_(1.0 - p).mul_(1.0 / (1.0 - p))


def _worth_folding(x: torch.Tensor) -> bool:
    """Whether this call's token count pays for the folded query-key product (FOLD_MIN_TOKENS_PER_WIDTH)."""
    d = x.shape[-1]
    return x.numel() >= FOLD_MIN_TOKENS_PER_WIDTH * d * d


def _stackable(adapters: Sequence[BottleneckAdapter]) -> bool:
    """Whether :func:`stack_adapters` takes these adapters: one activation, one width, scalar scalings."""
    fixed = [isinstance(a.scaling, float) for a in adapters]
    return (len({a.activation for a in adapters}) == 1 and (all(fixed) or not any(fixed))
            and all(isinstance(a.scaling, float) or a.scaling.dim() == 0 for a in adapters))


def _projection_tensors(fusion: AdapterFusion, key_bias: bool = False) -> dict:
    """The op's projection arguments as the module holds them, the key's bias only with ``key_bias`` (see
    _projections); None where a projection or bias is absent."""
    q, k, v = fusion.query, fusion.key, fusion.value
    out = dict(w_query=None if q is None else q.weight, b_query=None if q is None else q.bias,
               w_key=None if k is None else k.weight, w_value=None if v is None else v.weight)
    if key_bias:
        out["b_key"] = None if k is None else k.bias
    return out


class _ForwardProjections(PerForward):
    """The query, key and value projections of every fusion layer of a task, cast to the forward's compute
    dtype by one cast per forward of the model, at the first layer that asks, and for the stacked op's calls
    the query and key projections folded into one product for all layers at once.

    Under autocast the projections' float32 weights were cast to autocast's dtype in every layer: the query's
    weight and bias and the key's and value's weights forward, and each gradient cast back to float32 in the
    backward (96 launches per step in BERT-base). Here the weights of all layers are concatenated and cast
    once (two launches), and their gradients come back through one cast and one concatenation; each
    weight's gradient is then a view of that float32 buffer. The values are those of the per-layer casts,
    bit for bit.

    The fold: the scores need only qk = (y Wq^T + bq) Wk = y (Wq^T Wk) + bq Wk (the key's bias cancels in the
    softmax). Two batched products per forward (Wq^T Wk and bq Wk for all layers, (d+1) d^2 multiply-adds per
    layer) leave four N x d x d products per layer and step where there were seven (forward q and qk; backward
    qk formed again, dq, dWk, dy, dWq). The kernels add qk's bias as they read qk and write dqk rounded as the
    products read it, x's two gradients are summed by the product that forms one of them, and the op keeps
    nothing of the query's projection for its backward (its input y is the adapters' input, kept anyway; q was
    N x d per layer). In BERT-base's step, counted on the CPU (benchmarks/results/cpu-fusion-fold-2026-11-29):
    49 launches and 203 aten ops fewer. The products are rounded once, in the compute dtype (as q and Wk were),
    so the scores differ from the unfolded ones' by rounding only. The batched products cost about 3 d^3 per
    layer and step against the 3 N d^2 they save: calls with fewer than N = d tokens (serving, small evaluation
    batches) ask for the projections unfolded (FOLD_MIN_TOKENS_PER_WIDTH). With dropout on the scores the key's
    bias is batched too, and its term <Q, bk> = y (bk Wq) + bq . bk, which the masked scores no longer cancel, is
    folded by two more batched products, for the op's score shift.

    Where no cast is needed (float32 training, or weights already in the compute dtype) the batch is made for
    the fold alone (one concatenation instead of the cast; in float32 the three products it saves per layer are
    the slow ones), and not at all for calls that cannot fold.

    Open during a forward of the model (_per_forward.py). Layers outside the batch cast per call: one called
    on its own, under torch.compile (which fuses the casts), and layers whose projections have another device,
    dtype or width than the asking layer's. The fold needs every batched layer to have the same projections,
    query and key among them."""

    def __init__(self, checkpoint_modules):
        super().__init__(checkpoint_modules)
        self.sites: dict = {}  # task name -> [(host, AdapterFusion)], in attach order

    def projections(self, module: AdapterFusion, dtype: torch.dtype, fold: bool = False,
                    key_bias: bool = False) -> Optional[dict]:
        """``module``'s projections cast to ``dtype`` for this forward (with ``fold``, folded where the batch
        allows; with ``key_bias``, the key's bias among them, or folded into the score shift's weight and bias),
        or None (then the layer casts them)."""
        if torch.compiler.is_compiling() or not self.open:
            return None
        name, cache = module.__dict__.get("_task"), self.cache
        # grad mode in the key: a batch made under no_grad (a frozen lower layer) holds no graph for later layers
        key = (name, dtype, fold, key_bias, torch.is_grad_enabled())
        batch = cache.get(key)
        if batch is None:
            batch = cache[key] = self._batch(name, dtype, module, fold, key_bias)
        return batch.get(id(module))

    def _batch(self, name, dtype, module, fold, key_bias) -> dict:
        self.sites = {n: kept for n, pairs in self.sites.items() if (kept := [(h, f) for h, f in pairs if attached(h, n, f)])}
        own = [t for t in _projection_tensors(module, key_bias).values() if t is not None]
        cast = any(t.dtype != dtype for t in own)
        if not own or not (cast or fold):
            return {}
        device, kind, width = own[0].device, own[0].dtype, own[0].shape[-1]
        layers = []
        for _, f in self.sites.get(name, ()):
            tensors = _projection_tensors(f, key_bias)
            present = [t for t in tensors.values() if t is not None]
            if present and all(t.device == device and t.dtype == kind and t.shape[-1] == width for t in present):
                layers.append((f, tensors))
        if not any(f is module for f, _ in layers):
            return {}
        layout = [tuple(n for n, t in tensors.items() if t is not None) for _, tensors in layers]
        fold = fold and len(set(layout)) == 1 and {"w_query", "w_key"} <= set(layout[0])
        if not (cast or fold):  # (weights in the compute dtype and nothing to fold: the layers use their own)
            return {}
        # rows of width d: the (d, d) weights as they are, the (d,) biases as (1, d) (fewer views than flattening)
        rows = [t if t.dim() == 2 else t.unsqueeze(0) for _, tensors in layers for t in tensors.values() if t is not None]
        with torch.autocast(device.type, enabled=False):  # (CPU autocast cannot concatenate float16 under bfloat16)
            flat = torch.cat(rows).to(dtype)
        if fold:
            return self._folded(flat, layers, layout[0], width)
        pieces = iter(flat.split([t.shape[0] for t in rows]))
        out = {}
        for f, tensors in layers:
            cast = out[id(f)] = {}
            for n, t in tensors.items():
                cast[n] = None if t is None else next(pieces) if t.dim() == 2 else next(pieces).squeeze(0)
        return out

    @staticmethod
    def _folded(flat, layers, names, d) -> dict:
        """Per layer {w_query_key, b_query_key, w_value} from the cast rows of layers that all hold ``names``:
        the rows as (layers, rows per layer, d), split by projection (one concatenation back), and the folded
        products for all layers in one batched product each. Per-layer tensors are unbound views (their
        gradients come back stacked: one launch per kind). With the key's bias among ``names`` (dropout on the
        scores, where its term <Q, b_key> no longer cancels), also the term folded as the op's score shift
        query @ w + b: {score_shift_weight: b_key Wq, score_shift_bias: bq . b_key}."""
        heights = [1 if n.startswith("b_") else d for n in names]
        parts = dict(zip(names, flat.view(len(layers), sum(heights), d).split(heights, dim=1)))
        wk = parts["w_key"]
        w_qk = torch.bmm(parts["w_query"].transpose(1, 2), wk).unbind(0)
        b_qk = torch.bmm(parts["b_query"], wk).squeeze(1).unbind(0) if "b_query" in parts else None
        w_v = parts["w_value"].unbind(0) if "w_value" in parts else None
        out = {id(f): {"w_query_key": w_qk[i], "b_query_key": None if b_qk is None else b_qk[i],
                       "w_value": None if w_v is None else w_v[i]} for i, (f, _) in enumerate(layers)}
        if "b_key" in parts:
            bk = parts["b_key"]
            w_s = torch.bmm(bk, parts["w_query"]).squeeze(1).unbind(0)
            b_s = torch.bmm(parts["b_query"], bk.transpose(1, 2)).view(-1).unbind(0) if "b_query" in parts else None
            for i, (f, _) in enumerate(layers):
                out[id(f)].update(score_shift_weight=w_s[i], score_shift_bias=None if b_s is None else b_s[i])
        return out


def _forward_projections(model: nn.Module) -> _ForwardProjections:
    return installed(model, "_pet_fast_fusion_forward", _ForwardProjections)


def stack_adapters(adapters: Sequence[BottleneckAdapter], dtype):
    """Stacked (k, r_max, d) / (k, d, r_max) weights, zero-padded where bottleneck sizes differ."""
    acts = {a.activation for a in adapters}
    if len(acts) != 1:
        raise ValueError(f"adapters must share one activation to be fused, got {sorted(acts)}")
    d = adapters[0].d_model
    if any(a.d_model != d for a in adapters):
        raise ValueError("adapters must share d_model to be fused")
    r = max(a.bottleneck for a in adapters)
    ref = adapters[0].w_down
    F = torch.nn.functional
    rows_down, rows_up, bd, bu = [], [], [], []
    for a in adapters:
        pad = r - a.bottleneck
        rows_down.append(F.pad(a.w_down.to(dtype), (0, 0, 0, pad)))
        rows_up.append(F.pad(a.w_up.to(dtype), (0, pad)))
        bd.append(F.pad(a.b_down.to(dtype), (0, pad)) if a.b_down is not None else ref.new_zeros(r, dtype=dtype))
        bu.append(a.b_up.to(dtype) if a.b_up is not None else ref.new_zeros(d, dtype=dtype))
    w_down, w_up = torch.stack(rows_down), torch.stack(rows_up)
    b_down, b_up = torch.stack(bd), torch.stack(bu)
    scales = [a.scaling for a in adapters]
    if all(isinstance(s, float) for s in scales):
        # filled on the device: torch.tensor(scales, device=cuda) would copy from the host and wait for
        # the GPU to drain on every call
        if len(set(scales)) == 1:
            scaling = ref.new_full((len(scales),), scales[0], dtype=dtype)
        else:
            scaling = torch.stack([ref.new_full((), s, dtype=dtype) for s in scales])
    elif all(isinstance(s, torch.Tensor) and s.dim() == 0 for s in scales):
        scaling = torch.stack([s.to(dtype) for s in scales])
    else:
        raise ValueError("adapters to be fused need scalar scaling (fixed or learned), not per-channel")
    return w_down, b_down, w_up, b_up, scaling, acts.pop()


# --------------------------------------------------------------------------------------------
# FusionConfig: AdapterFusion over adapter tasks already attached to a model

import dataclasses  # noqa: E402
from typing import List  # noqa: E402

from torch import nn as _nn  # noqa: E402

from ..tasks import MethodConfig, register_method, task_holder  # noqa: E402

FUSION_KINDS = {
    # AdapterHub's "static" and "dynamic" (its default) fusion configs.
    "static": dict(query=True, key=True, value=False, query_before_ln=False, regularization=False, residual_before=False,
                   temperature=False, value_before_softmax=True, value_initialized=False),
    "dynamic": dict(query=True, key=True, value=True, query_before_ln=False, regularization=True, residual_before=False,
                    temperature=False, value_before_softmax=True, value_initialized=True),
}


@register_method
@dataclasses.dataclass
class FusionConfig(MethodConfig):
    """AdapterFusion over adapter tasks ``adapters`` (names of AdapterConfig tasks already attached,
    e.g. loaded with ``pet_fast.load(model, path, name)``). The fusion task trains only its fusion
    layers (and the head); the adapters stay frozen. All adapters must share placement and locations.
    ``kind`` picks AdapterHub's ``"dynamic"`` (default) or ``"static"`` field values;
    ``None`` fields take them. ``dropout_prob=None`` takes the model's attention dropout (as
    AdapterHub does). With ``regularization``, add ``fusion_regularization_loss(model)`` to the loss
    to pull the value projections toward the identity (AdapterHub applies it one step late).
    At the sites, the k adapters and the fusion run as one ``stacked_adapter_fusion`` op when they share
    an activation and a scalar scaling kind (fixed or learned); otherwise (per-channel scaling, different
    activations) each adapter runs on its own and their outputs are fused (``adapter_fusion``). In
    training with a dropout above 0 (BERT's default 0.1), the stacked op takes the dropout as its score
    mask (fused backends included), as the given-outputs op does for adapters the stacked op does not take.
    With parallel adapters, the fusion adds its output once to ``h + x`` (AdapterHub adds ``x``
    a second time there). The key projection's bias adds the same number to every adapter's score, which the
    softmax cancels: it is kept (and saved) as AdapterHub has it, but gets no gradient (None) unless dropout
    applies to the scores, where it does not cancel.
    """

    method = "fusion"
    adapters: List[str] = dataclasses.field(default_factory=list)
    kind: str = "dynamic"
    query: Optional[bool] = None
    key: Optional[bool] = None
    value: Optional[bool] = None
    query_before_ln: Optional[bool] = None
    regularization: Optional[bool] = None
    residual_before: Optional[bool] = None
    temperature: Optional[bool] = None
    value_before_softmax: Optional[bool] = None
    value_initialized: Optional[bool] = None
    dropout_prob: Optional[float] = None

    def __post_init__(self):
        if self.kind not in FUSION_KINDS:
            raise ValueError(f"kind must be one of {sorted(FUSION_KINDS)}, got {self.kind!r}")
        for key, value in FUSION_KINDS[self.kind].items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        if isinstance(self.adapters, str):
            self.adapters = [self.adapters]
        self.adapters = list(self.adapters)
        if len(self.adapters) < 1 or not all(isinstance(a, str) for a in self.adapters):
            raise ValueError(f"adapters must list the names of at least one adapter task, got {self.adapters!r}")
        if len(set(self.adapters)) != len(self.adapters):
            raise ValueError(f"adapters has duplicates: {self.adapters}")
        if self.dropout_prob is not None and not 0.0 <= self.dropout_prob < 1.0:
            raise ValueError(f"dropout_prob must be in [0, 1) or None, got {self.dropout_prob}")

    def attach(self, model: _nn.Module, name: str, registry) -> None:
        from . import _sites
        from .adapter import AdapterConfig

        configs = []
        for a in self.adapters:
            cfg = registry.configs.get(a)
            if cfg is None:
                raise ValueError(f"fusion needs adapter task {a!r}, which the model does not have (it has {sorted(registry.configs)}); "
                                 "inject or load the adapters first")
            if not isinstance(cfg, AdapterConfig):
                raise ValueError(f"task {a!r} is a {cfg.method!r} task; fusion combines adapter tasks only")
            configs.append(cfg)
        first = configs[0]
        for a, cfg in zip(self.adapters[1:], configs[1:]):
            for field in ("placement", "mh_adapter", "output_adapter", "target_modules", "leave_out"):
                if getattr(cfg, field) != getattr(first, field):
                    raise ValueError(f"adapters to fuse must share {field}: {self.adapters[0]!r} has {getattr(first, field)!r}, "
                                     f"{a!r} has {getattr(cfg, field)!r}")
        hosts = [h for _, h in _sites.hosts_with_task(model, self.adapters[0])
                 if isinstance(h.pet_fast_tasks[self.adapters[0]], BottleneckAdapter)]
        for h in hosts:
            kind = _sites.site_kind(h)
            if (self.residual_before or self.query_before_ln) and kind in ("block", "generic"):
                raise ValueError("residual_before / query_before_ln are supported at BERT-style sites and pre-LN "
                                 "attention/MLP sites only, not at block outputs or target_modules")
            missing = [a for a in self.adapters if a not in getattr(h, "pet_fast_tasks")]
            if missing:
                raise ValueError(f"adapters {missing} are not attached where {self.adapters[0]!r} is; they cannot be fused")
        dropout = self.dropout_prob
        if dropout is None:
            dropout = float(getattr(getattr(model, "config", None), "attention_probs_dropout_prob", 0.0) or 0.0)
        self.__dict__["_score_dropout"] = dropout  # (not a field: frozen_parameter_keys reads it)
        forward = _forward_projections(model)
        forward.sites[name] = []
        for h in hosts:
            child = h.pet_fast_tasks[self.adapters[0]]
            ref = child.w_down
            fusion = AdapterFusion(child.d_model, query=self.query, key=self.key, value=self.value,
                                   value_initialized=self.value_initialized, temperature=self.temperature,
                                   residual_before=self.residual_before, value_before_softmax=self.value_before_softmax,
                                   dropout=dropout, dtype=ref.dtype, device=ref.device)
            fusion.adapter_names = tuple(self.adapters)
            fusion.placement = first.placement
            fusion.query_before_ln = self.query_before_ln
            fusion.__dict__["_forward"], fusion.__dict__["_task"] = forward, name  # plain attributes, not state
            task_holder(h)[name] = fusion
            forward.sites[name].append((h, fusion))

    def detach(self, model: nn.Module, name: str, registry) -> None:
        """The task's fusions leave the per-forward projections (nothing keeps them alive); with the model's
        last fusion task gone, their hooks go too."""
        _forgotten(model, "_pet_fast_fusion_forward", name, registry, FusionConfig)


    def frozen_parameter_keys(self, key: str) -> bool:
        """The task's parameters that stay frozen while it is active (tasks.set_active): the key projection's
        bias where the fusion has no dropout on its scores. Its term is the same for every adapter, which the
        softmax cancels: it can get no gradient, and a parameter that requires grad without ever getting one
        stops DistributedDataParallel (it expects a gradient for each). With dropout it trains."""
        return key.endswith(".key.bias") and not self.__dict__.get("_score_dropout", 0.0)


def fusion_regularization_loss(model: _nn.Module, name: Optional[str] = None) -> torch.Tensor:
    """AdapterHub's fusion regularizer: ``0.01 * sum ||I - W_value||_F^2`` over the value projections
    of fusion task ``name`` (default: the active fusion tasks configured with ``regularization``) whose
    weight trains. A ``name`` configured without it is refused (ValueError)."""
    from ..tasks import TASK_ATTR, registry

    reg = registry(model)
    if name is not None:
        cfg = reg.configs.get(name) if reg else None
        if not isinstance(cfg, FusionConfig):
            raise ValueError(f"{name!r} is not a fusion task of this model")
        if not cfg.regularization:
            raise ValueError(f"fusion task {name!r} was configured with regularization=False")
        names = [name]
    else:
        names = [n for n in (reg.active if reg else ()) if isinstance(reg.configs[n], FusionConfig)
                 and reg.configs[n].regularization]
    total = None
    for mod in model.modules():
        holder = mod._modules.get(TASK_ATTR)
        if holder is None:
            continue
        for n in names:
            f = holder[n] if n in holder else None
            if isinstance(f, AdapterFusion) and f.value is not None and f.value.weight.requires_grad:
                w = f.value.weight
                term = 0.01 * (torch.eye(w.shape[0], dtype=w.dtype, device=w.device) - w).pow(2).sum()
                total = term if total is None else total + term
    if total is None:
        p = next(model.parameters())
        return torch.zeros((), dtype=p.dtype, device=p.device)
    return total
