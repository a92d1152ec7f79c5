"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2021): the module around the
``bottleneck_adapter`` op."""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import nn

from ..ops import _checks, activations
from ..ops.bottleneck_adapter import as_autocast_would, bottleneck_adapter, replayed_call

INITS = ("bert", "identity")


class BottleneckAdapter(nn.Module):
    """``residual + s * up(act(down(x)))`` with a d -> r -> d bottleneck.

    Args:
        d_model: width d of the hidden states.
        bottleneck: bottleneck size r.
        activation: see ``pet_fast.ops.activations.ACTIVATIONS``.
        scaling: a number (fixed), ``"learned"`` (one trained scalar, starting at 1) or
            ``"channel"`` (one trained factor per channel, starting at 1).
        init: ``"bert"`` (AdapterHub's default: weights ~ N(0, 0.02), biases 0) or ``"identity"``
            (down ~ Kaiming-uniform, up and biases 0: the adapter starts as the identity map).
        bias: whether the projections have biases.
    Parameters live in float32 (or the dtype given). With float16/bfloat16 input (autocast, half
    precision) float32 parameters go to the op as they are (it rounds them as it reads them); other
    mismatches are cast to the input's dtype.
    """

    def __init__(self, d_model: int, bottleneck: int, *, activation: str = "relu",
                 scaling: Union[float, str] = 1.0, init: str = "bert", bias: bool = True,
                 dtype: Optional[torch.dtype] = None, device=None):
        super().__init__()
        if not isinstance(d_model, int) or d_model < 1:
            raise ValueError(f"d_model must be a positive int, got {d_model!r}")
        if not isinstance(bottleneck, int) or bottleneck < 1:
            raise ValueError(f"bottleneck must be a positive int, got {bottleneck!r}")
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        self.activation = activations.canonical(activation)
        kw = dict(dtype=dtype, device=device)
        self.w_down = nn.Parameter(torch.empty(bottleneck, d_model, **kw))
        self.w_up = nn.Parameter(torch.empty(d_model, bottleneck, **kw))
        # registered also when absent (None entries): forward reads the four from _parameters
        self.register_parameter("b_down", nn.Parameter(torch.zeros(bottleneck, **kw)) if bias else None)
        self.register_parameter("b_up", nn.Parameter(torch.zeros(d_model, **kw)) if bias else None)
        if isinstance(scaling, str):
            if scaling == "learned":
                self.scaling = nn.Parameter(torch.ones((), **kw))
            elif scaling == "channel":
                self.scaling = nn.Parameter(torch.ones(d_model, **kw))
            else:
                raise ValueError(f"scaling must be a number, 'learned' or 'channel', got {scaling!r}")
        else:
            if isinstance(scaling, bool) or not isinstance(scaling, (int, float)):
                raise TypeError(f"scaling must be a number, 'learned' or 'channel', got {type(scaling).__name__}")
            self.scaling = float(scaling)
        self.init = init
        self.reset_parameters()

    @property
    def d_model(self) -> int:
        return self.w_down.shape[1]

    @property
    def bottleneck(self) -> int:
        return self.w_down.shape[0]

    def reset_parameters(self) -> None:
        with torch.no_grad():
            if self.init == "bert":
                self.w_down.normal_(0.0, 0.02)
                self.w_up.normal_(0.0, 0.02)
            else:
                nn.init.kaiming_uniform_(self.w_down, a=math.sqrt(5))
                self.w_up.zero_()
            for b in (self.b_down, self.b_up):
                if b is not None:
                    b.zero_()

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None, *, add_input: bool = False,
                layer_norm: Optional[tuple] = None, backend: Optional[str] = None) -> torch.Tensor:
        """``base + A(x)``: base = x, or ``residual``, or ``x + residual`` with ``add_input``; with
        ``layer_norm=(weight, bias, eps)``, ``x + A(LayerNorm(x))`` (see the op)."""
        # parameters read from _parameters directly: this runs in every adapter of every step, and each
        # nn.Module attribute lookup of a parameter costs about a microsecond of host time
        p = self._parameters
        w_down, b_down, w_up, b_up = p["w_down"], p["b_down"], p["w_up"], p["b_up"]
        scaling = p["scaling"] if "scaling" in p else self.scaling
        compiling = torch.compiler.is_compiling()
        replayed = None if compiling else self.__dict__.get("_replayed")  # the op's C++ node (see below)
        if replayed is not None and backend is None:
            y = replayed(x, w_down, b_down, w_up, b_up, self.activation, scaling, residual, add_input, layer_norm)
            if y is not None:
                return y
        _checks.tensor("x", x, floating=False)
        args = (x, residual, add_input, w_down, b_down, w_up, b_up, scaling)  # as they came
        if layer_norm is None:  # (with one, the op rounds LN(x) to autocast's dtype itself: x stays as it is)
            if add_input is True and residual is None:
                raise ValueError("add_input=True adds x to the residual: a residual is required")
            # as autocast would compute them, and outside autocast a residual or parameters of another dtype than
            # x's cast to it (which the op itself refuses)
            x, residual, add_input, w_down, b_down, w_up, b_up, scaling = as_autocast_would(
                x, residual, add_input, w_down, b_down, w_up, b_up, scaling)
        y = bottleneck_adapter(x, w_down, b_down, w_up, b_up, activation=self.activation, scaling=scaling,
                               residual=residual, add_input=add_input, layer_norm=layer_norm, backend=backend)
        if not compiling and backend is None and torch.is_grad_enabled() and all(
                a is b for a, b in zip(args, (x, residual, add_input, w_down, b_down, w_up, b_up, scaling))):
            # the op got this call's arguments as they came: once its call ran as the C++ node, the next
            # calls with the same facts reach that node in one C++ call (ops/bottleneck_adapter.py; a call
            # without gradients never runs as the node, so serving calls skip this)
            replayed = replayed_call(y, x, w_down, b_down, w_up, b_up, self.activation, scaling, residual,
                                     add_input, layer_norm)
            if replayed is not None:
                self.__dict__["_replayed"] = replayed
        return y

    def extra_repr(self) -> str:
        s = self.scaling if isinstance(self.scaling, float) else "learned" if self.scaling.dim() == 0 else "channel"
        bias = "" if self.b_down is not None else ", bias=False"
        return f"d_model={self.d_model}, bottleneck={self.bottleneck}, activation={self.activation}, scaling={s}{bias}"


# --------------------------------------------------------------------------------------------
# AdapterConfig: where adapters go in a transformers model

import dataclasses  # noqa: E402
from typing import List  # noqa: E402

from ..tasks import MethodConfig, register_method, task_holder  # noqa: E402

PLACEMENTS = ("houlsby", "pfeiffer", "parallel")
PLACEMENT_ALIASES = {"double_seq_bn": "houlsby", "seq_bn": "pfeiffer", "par_bn": "parallel"}
# AdapterHub's defaults per placement (double_seq_bn, seq_bn, par_bn): reduction factor, activation,
# scaling, init, attention-output adapter, FFN-output adapter.
PLACEMENT_DEFAULTS = {
    "houlsby": dict(reduction_factor=16.0, activation="swish", scaling=1.0, init="bert", mh_adapter=True, output_adapter=True),
    "pfeiffer": dict(reduction_factor=16.0, activation="relu", scaling=1.0, init="bert", mh_adapter=False, output_adapter=True),
    "parallel": dict(reduction_factor=2.0, activation="relu", scaling=4.0, init="identity", mh_adapter=False, output_adapter=True),
}
INIT_ALIASES = {"mam_adapter": "identity"}


def _in_out_widths(module: nn.Module):
    """(input, output) features of a linear layer (nn.Linear, transformers' Conv1D), None for other modules."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    nx, nf = getattr(module, "nx", None), getattr(module, "nf", None)
    weight = getattr(module, "weight", None)
    if isinstance(nf, int) and isinstance(weight, torch.Tensor) and weight.dim() == 2:  # Conv1D: weight (in, out)
        return (nx if isinstance(nx, int) else weight.shape[0]), nf
    return None


def _width(host: nn.Module, kind: str, hidden: Optional[int]) -> Optional[int]:
    """The width of the output an adapter at ``host`` reads: a target's own (Linear, Conv1D), else the model's."""
    if kind == "generic":
        return getattr(host, "out_features", None) or getattr(host, "nf", None) or hidden
    return hidden


@register_method
@dataclasses.dataclass
class AdapterConfig(MethodConfig):
    """Bottleneck adapters, placed and computed as AdapterHub's ``double_seq_bn`` (``"houlsby"``),
    ``seq_bn`` (``"pfeiffer"``) and ``par_bn`` (``"parallel"``).

    With the sublayer output ``h``, its residual input ``x``, the block's LayerNorm ``LN`` and
    ``A(z) = scaling * up(act(down(z)))``, a BERT-style (post-LN) sublayer computes
    houlsby ``LN(h + x + A(h))``, pfeiffer ``LN(h + x + A(LN(h + x)))``, parallel ``LN(h + x + A(x))``.
    Pre-LN blocks (GPT-2, Llama) have no LN there: houlsby adds ``A(h)`` to the attention and MLP
    outputs, pfeiffer adds ``A(y)`` to the block output ``y``, parallel adds ``A(r)`` (``r`` the
    residual stream entering the sublayer's norm) to the sublayer output.

    ``None`` fields take the placement's AdapterHub default (table ``PLACEMENT_DEFAULTS``); the
    bottleneck size is ``bottleneck`` or ``max(1, hidden // reduction_factor)``. ``init``:
    ``"bert"`` (N(0, 0.02)) or ``"identity"`` (alias ``"mam_adapter"``: up-projection zero, so a new
    adapter leaves the model's outputs unchanged). ``target_modules``: names of modules (e.g.
    ``["attention.output.dense"]``) after which an adapter runs on their output (houlsby/pfeiffer:
    ``h + A(h)``; parallel: ``h + A(input)``), for any model (without a transformers config, give ``bottleneck``;
    modules of the task head, e.g. ``classifier.dense``, are left out: each task has its own copy of the head,
    which trains whole). ``leave_out``: block indices to skip (with ``target_modules``, the index of the
    outermost numbered block list in each target's name, ``...layer.<i>.``: in an encoder-decoder model
    both stacks' blocks ``i``; a target without one is refused).
    """

    method = "adapter"
    placement: str = "pfeiffer"
    bottleneck: Optional[int] = None
    reduction_factor: Optional[float] = None
    activation: Optional[str] = None
    scaling: Union[float, str, None] = None
    init: Optional[str] = None
    mh_adapter: Optional[bool] = None
    output_adapter: Optional[bool] = None
    target_modules: Optional[List[str]] = None
    leave_out: List[int] = dataclasses.field(default_factory=list)

    def __post_init__(self):
        if not isinstance(self.placement, str):
            raise TypeError(f"placement must be a string, one of {PLACEMENTS}, got {type(self.placement).__name__}")
        placement = PLACEMENT_ALIASES.get(self.placement.lower(), self.placement.lower())
        if placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {PLACEMENTS} (or {sorted(PLACEMENT_ALIASES)}), got {self.placement!r}")
        self.placement = placement
        for key, value in PLACEMENT_DEFAULTS[placement].items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        self.activation = activations.canonical(self.activation)
        self.init = INIT_ALIASES.get(self.init, self.init)
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS} or 'mam_adapter', got {self.init!r}")
        if self.bottleneck is not None and (isinstance(self.bottleneck, bool) or not isinstance(self.bottleneck, int) or self.bottleneck < 1):
            raise ValueError(f"bottleneck must be a positive int or None, got {self.bottleneck!r}")
        if isinstance(self.reduction_factor, bool) or not isinstance(self.reduction_factor, (int, float)) or self.reduction_factor <= 0:
            raise ValueError(f"reduction_factor must be a positive number, got {self.reduction_factor!r}")
        self.reduction_factor = float(self.reduction_factor)
        if isinstance(self.scaling, str):
            if self.scaling not in ("learned", "channel"):
                raise ValueError(f"scaling must be a number, 'learned' or 'channel', got {self.scaling!r}")
        elif isinstance(self.scaling, bool) or not isinstance(self.scaling, (int, float)):
            raise TypeError(f"scaling must be a number, 'learned' or 'channel', got {type(self.scaling).__name__}")
        else:
            self.scaling = float(self.scaling)
        if not (self.mh_adapter or self.output_adapter) and self.target_modules is None:
            raise ValueError("mh_adapter and output_adapter are both False: the adapter would go nowhere")
        if self.target_modules is not None:
            if isinstance(self.target_modules, str):
                self.target_modules = [self.target_modules]
            self.target_modules = list(self.target_modules)
        self.leave_out = sorted(int(i) for i in self.leave_out)

    def bottleneck_size(self, hidden: int) -> int:
        return self.bottleneck if self.bottleneck is not None else max(1, int(hidden // self.reduction_factor))

    def sites(self, model: nn.Module) -> list:
        """(host, kind, peer) triples where this config puts an adapter (peer: capture norms)."""
        from .. import models

        fam = models.family(model)
        out = []
        if self.target_modules is not None:
            for name, mod in models.without_left_out(models.match_targets(model, self.target_modules), self.leave_out):
                out.append((mod, "generic", None))
            return out
        if fam == "generic":
            raise ValueError(f"model type {models.model_type(model)!r} has no known adapter placement; pass target_modules")
        blocks = models.layers(model)
        models.check_leave_out(self.leave_out, range(len(blocks)))
        for i, block in enumerate(blocks):
            if i in self.leave_out:
                continue
            parts = models.block_parts(block, fam)
            if fam == "bert":
                if self.mh_adapter:
                    out.append((parts["mh"], "bert_sublayer", None))
                if self.output_adapter:
                    out.append((parts["output"], "bert_sublayer", None))
                continue
            if self.placement == "pfeiffer":
                if self.mh_adapter:
                    raise ValueError("a pfeiffer adapter after the attention of a pre-LN block (GPT-2, Llama) is not "
                                     "supported; use mh_adapter=False or placement='houlsby'")
                out.append((parts["block"], "block", None))
                continue
            for loc, sub, norm in (("mh_adapter", "attn", "norm_attn"), ("output_adapter", "mlp", "norm_mlp")):
                if getattr(self, loc):
                    out.append((parts[sub], "sublayer", None))
                    if self.placement == "parallel":
                        out.append((parts[norm], "capture", parts[sub]))
        if not out:
            raise ValueError("this config places no adapter in the model (every layer left out?)")
        return out

    def attach(self, model: nn.Module, name: str, registry) -> None:
        from .. import models
        from . import _sites

        sites = self.sites(model)
        try:
            hidden = models.hidden_size(model)
        except ValueError:  # a model without a transformers config: the targets give the widths
            if self.bottleneck is None:
                raise ValueError("the model has no config telling its hidden size, from which the reduction factor "
                                 "sets the bottleneck: give AdapterConfig(bottleneck=...)") from None
            hidden = None
        for host, kind, _ in sites:
            _sites.check_installable(host, kind)
            if kind != "capture" and _width(host, kind, hidden) is None:
                where = next((n for n, m in model.named_modules() if m is host), type(host).__name__)
                raise ValueError(f"cannot tell the output width of target {where!r} (no out_features, and the model "
                                 f"has no config telling its hidden size)")
            if kind == "generic" and self.placement == "parallel":
                widths = _in_out_widths(host)
                if widths is not None and widths[0] != widths[1]:
                    where = next((n for n, m in model.named_modules() if m is host), type(host).__name__)
                    raise ValueError(f"a parallel adapter reads the input of target {where!r} and adds to its output, "
                                     f"which need one width: it maps {widths[0]} to {widths[1]} features (use "
                                     f"placement='houlsby' there, or another target)")
        r = self.bottleneck_size(hidden)
        for host, kind, peer in sites:
            _sites.install(host, kind, registry, peer)
            if kind == "capture":
                continue
            ref = next((p for p in host.parameters() if p.is_floating_point()), None)
            if ref is None:  # a target without parameters (a dropout, an activation): the model's dtype and device
                ref = next((p for p in model.parameters() if p.is_floating_point()), None)
            dtype = None if ref is None else ref.dtype
            adapter = BottleneckAdapter(_width(host, kind, hidden), r, activation=self.activation, scaling=self.scaling,
                                        init=self.init, dtype=dtype, device=None if ref is None else ref.device)
            adapter.placement = self.placement
            task_holder(host)[name] = adapter
