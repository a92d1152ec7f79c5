"""Shared by the reliability tests: float64 references, input layouts, backend discovery, and one
builder per op that turns a dict of parameters into leaves, the call and its float64 reference.

The float64 references are the independent ones of tests/test_ops_*.py (imported, not rewritten);
only what they lack is added here: the straight-through gradient of masked_linear and the k stacked
adapters of stacked_adapter_fusion with every activation.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch

import pet_fast
from pet_fast import dispatch
from pet_fast.ops import adapter_fusion as fusion_ops
from pet_fast.ops import bottleneck_adapter as adapter_ops
from pet_fast.ops import masked_linear as masked_ops
from pet_fast.ops import prefix_attention as attention_ops
from pet_fast.ops.activations import ALIASES
from test_ops_adapter_fusion import fusion64
from test_ops_bottleneck_adapter import ACTS
from test_ops_bottleneck_adapter import ref64 as adapter64
from test_ops_masked_linear import ref64 as masked64
from test_ops_prefix_attention import ref64 as attention64

OPS = ("bottleneck_adapter", "masked_linear", "prefix_attention", "adapter_fusion", "stacked_adapter_fusion")
# A pseudo-backend for run(): the op's eager reference function, its definition. That is the eager
# backend for every op but prefix_attention, whose eager backend runs SDPA instead.
REFERENCE = "reference"
FLOATS = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


# ----- float64 references not in the op tests ----------------------------------------------------
def masked_ste64(x, w, scores, bias, threshold):
    """masked_linear in float64 with the straight-through estimator: the mask's value, the identity
    as its derivative with respect to the scores (so d_scores = (dy^T x) * w, d_w = (dy^T x) * M)."""
    s = scores.double()
    m = (s > threshold).double()
    mask = m + (s - s.detach()).nan_to_num(0.0)  # NaN scores: mask 0 (NaN > t is False)
    y = torch.einsum("...i,oi->...o", x.double(), w.double() * mask)
    return y if bias is None else y + bias.double()


def stacked_values64(x, wd, bd, wu, bu, act, scaling):
    """(..., k, d): every adapter's scaled up-projection, token by token in float64."""
    act = ALIASES.get(act, act)
    h = torch.einsum("...d,krd->...kr", x.double(), wd.double())
    if bd is not None:
        h = h + bd.double()
    up = torch.einsum("...kr,kdr->...kd", ACTS[act](h), wu.double())
    if bu is not None:
        up = up + bu.double()
    s = scaling.double()[..., None] if isinstance(scaling, torch.Tensor) else scaling
    return up * s


# ----- layouts: the same values in another memory layout -------------------------------------------
LAYOUTS = ("contiguous", "transposed", "strided", "offset")


def layout(t: torch.Tensor, kind: str) -> torch.Tensor:
    """A differentiable view of ``t``'s values with another stride pattern (never a copy in the
    result: the result is a non-contiguous view of a larger buffer)."""
    if kind == "contiguous" or t.dim() == 0:
        return t
    if kind == "transposed" and t.dim() >= 2:
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if kind == "heads_last" and t.dim() == 4:  # (B, H, L, D) stored as (B, L, H, D), as HF models do
        return t.transpose(1, 2).contiguous().transpose(1, 2)
    if kind == "offset":  # a view with a non-zero storage offset and padded rows
        return torch.cat([torch.zeros_like(t[..., :1]), t], dim=-1)[..., 1:]
    # "strided" (and the fallbacks): every other element of the last dimension
    return torch.stack([t, t], dim=-1)[..., 0]


# ----- backend discovery ----------------------------------------------------------------------------
def sample_info(op: str, device, dtype) -> dict:
    """What the dispatcher sees of a small, ordinary call of ``op`` (for backend discovery)."""
    t = lambda *s: torch.empty(*s, device=device, dtype=dtype)
    if op == "bottleneck_adapter":
        return adapter_ops.describe(t(3, 8), t(4, 8), "relu", 1.0, None)
    if op == "masked_linear":
        return masked_ops.describe(t(3, 8), t(5, 8), t(5, 8).float(), t(5))
    if op == "prefix_attention":
        return attention_ops.describe(t(2, 2, 3, 8), t(2, 2, 5, 8), t(2, 2, 8), None, False)
    if op == "adapter_fusion":
        return fusion_ops.describe(t(3, 8), 2)
    return fusion_ops.describe(t(3, 8), 2, r=4, activation="relu")


def runnable(op: str, device, dtypes=FLOATS) -> Dict[str, tuple]:
    """{backend: dtypes it accepts for an ordinary call on ``device``}, from the dispatch registry,
    so backends registered later (Triton under TRITON_INTERPRET=1, CUDA on a GPU) are picked up."""
    out = {}
    for name, impl in sorted(dispatch._REGISTRY[op].impls.items()):
        ok = tuple(dt for dt in dtypes if not impl.reasons(sample_info(op, torch.device(device), dt)))
        if ok:
            out[name] = ok
    return out


# ----- builders ---------------------------------------------------------------------------------------
@dataclass
class Built:
    """One call of an op: ``leaves`` (name -> tensor, float leaves that get gradients require grad),
    ``views(leaves)`` the op's tensor arguments (layouts, expansions applied), ``call(args, backend)``,
    ``ref(args64)`` the float64 reference on CPU tensors, and ``describe(args)``."""

    op: str
    leaves: Dict[str, torch.Tensor]
    views: Callable[[dict], dict]
    call: Callable[[dict, Optional[str]], torch.Tensor]
    ref: Callable[[dict], torch.Tensor]
    describe: Callable[[dict], dict]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _rand(g, shape, scale=1.0):
    return torch.randn(tuple(shape), generator=g, dtype=torch.float64) * scale


def _leaf(t64, dtype, device, grad=True):
    t = t64.to(dtype).to(device)
    return t.requires_grad_(grad and t.is_floating_point())


def build_adapter(p, dtype, device, seed=0, rand=None) -> Built:
    g = _gen(seed)
    R = rand or (lambda shape, scale=1.0: _rand(g, shape, scale))
    lead, d, r = tuple(p["lead"]), p["d"], p["r"]
    L = {"x": R(lead + (d,)), "w_down": R((r, d), p.get("wscale", 0.5)),
         "w_up": R((d, r), p.get("wscale", 0.5))}
    if p["b_down"]:
        L["b_down"] = R((r,))
    if p["b_up"]:
        L["b_up"] = R((d,))
    if p["residual"]:
        L["residual"] = R(lead + (d,))
    sc = p["scaling"]
    if sc == "scalar":
        L["scaling"] = R(())
    elif sc == "channel":
        L["scaling"] = R((d,))
    # float32 master weights with half-precision x (the op's mixed-precision contract)
    pdt = torch.float32 if p.get("master") and dtype in (torch.float16, torch.bfloat16) else dtype
    leaves = {k: _leaf(v, dtype if k in ("x", "residual") else pdt, device) for k, v in L.items()}
    lay = p.get("layouts", {})

    def views(t):
        return {k: layout(v, lay.get(k, "contiguous")) for k, v in t.items()}

    def scaling(a):
        return a["scaling"] if "scaling" in a else sc

    def call(a, backend):
        return pet_fast.bottleneck_adapter(a["x"], a["w_down"], a.get("b_down"), a["w_up"], a.get("b_up"),
                                           activation=p["act"], scaling=scaling(a), residual=a.get("residual"),
                                           backend=backend)

    def ref(a):
        return adapter64(a["x"], a["w_down"], a.get("b_down"), a["w_up"], a.get("b_up"), ALIASES.get(p["act"], p["act"]),
                         scaling(a), a.get("residual"))

    def describe(a):
        _, s = adapter_ops.check_inputs(a["x"], a["w_down"], a.get("b_down"), a["w_up"], a.get("b_up"), p["act"],
                                        scaling(a), a.get("residual"))
        return adapter_ops.describe(a["x"], a["w_down"], ALIASES.get(p["act"], p["act"]), s, a.get("residual"))

    return Built("bottleneck_adapter", leaves, views, call, ref, describe)


def build_masked(p, dtype, device, seed=0, rand=None) -> Built:
    g = _gen(seed)
    R = rand or (lambda shape, scale=1.0: _rand(g, shape, scale))
    lead, i, o = tuple(p["lead"]), p["in"], p["out"]
    sdt = {"float32": torch.float32, "float64": torch.float64, "same": dtype}[p.get("scores_dtype", "float32")]
    leaves = {"x": _leaf(R(lead + (i,)), dtype, device),
              "weight": _leaf(R((o, i), p.get("wscale", 1.0)), dtype, device, p.get("train_weight", True)),
              "scores": _leaf(R((o, i)), sdt, device)}
    if p["bias"]:
        leaves["bias"] = _leaf(R((o,)), dtype, device)
    lay = p.get("layouts", {})
    th = p["threshold"]

    def views(t):
        return {k: layout(v, lay.get(k, "contiguous")) for k, v in t.items()}

    def call(a, backend):
        return pet_fast.masked_linear(a["x"], a["weight"], a["scores"], a.get("bias"), threshold=th, backend=backend)

    def ref(a):
        out = masked_ste64(a["x"], a["weight"], a["scores"], a.get("bias"), th)
        # the STE form must have the forward of the op tests' independent reference
        plain = masked64(a["x"], a["weight"], a["scores"], a.get("bias"), th)
        assert torch.allclose(out.detach(), plain, rtol=1e-12, atol=1e-12, equal_nan=True)
        return out

    def describe(a):
        return masked_ops.describe(a["x"], a["weight"], a["scores"], a.get("bias"))

    return Built("masked_linear", leaves, views, call, ref, describe)


def padding(g, B, S, kind):
    if kind is None:
        return None
    if kind == "random":
        return torch.rand(B, S, generator=g) < 0.7
    lengths = torch.randint(0, S + 1, (B,), generator=g)
    pos = torch.arange(S)[None, :]
    return pos < lengths[:, None] if kind == "right" else pos >= (S - lengths)[:, None]


def build_attention(p, dtype, device, seed=0, rand=None, loop_limit=96) -> Built:
    g = _gen(seed)
    R = rand or (lambda shape, scale=1.0: _rand(g, shape, scale))
    B, Hkv, grp, L_, S, D = p["B"], p["Hkv"], p["group"], p["L"], p["S"], p["D"]
    Hq = Hkv * grp
    sc = p.get("qscale", 1.0)
    T = {"q": R((B, Hq, L_, D), sc), "k": R((B, Hkv, S, D), sc), "v": R((B, Hkv, S, D))}
    P, prefix = p["P"], p["prefix"]  # prefix: None | "shared" | "per_batch" | "expanded"
    if prefix is not None:
        shape = (B, Hkv, P, D) if prefix == "per_batch" else (Hkv, P, D)
        T["prefix_k"], T["prefix_v"] = R(shape, sc), R(shape)
    kpm = padding(g, B, S, p["pad"])
    leaves = {k: _leaf(v, dtype, device) for k, v in T.items()}
    lay = p.get("layouts", {})

    def views(t):
        a = {k: layout(v, lay.get(k, "contiguous")) for k, v in t.items()}
        if prefix == "expanded":  # what PrefixEncoder(batch_size=B) hands over: a stride-0 batch view
            a["prefix_k"] = a["prefix_k"].unsqueeze(0).expand(B, -1, -1, -1)
            a["prefix_v"] = a["prefix_v"].unsqueeze(0).expand(B, -1, -1, -1)
        return a

    def mask(on):
        return None if kpm is None else kpm.to(on)

    def call(a, backend):
        if backend == REFERENCE:  # the definition (the eager backend is SDPA, not this)
            return attention_ops.reference(a["q"], a["k"], a["v"], a.get("prefix_k"), a.get("prefix_v"),
                                           mask(a["q"].device), p["causal"], p.get("scale"))
        return pet_fast.prefix_attention(a["q"], a["k"], a["v"], a.get("prefix_k"), a.get("prefix_v"),
                                         key_padding_mask=mask(a["q"].device), causal=p["causal"],
                                         scale=p.get("scale"), backend=backend)

    def ref(a):
        if B * Hq * L_ <= loop_limit:  # the independent loop reference of the op tests
            return attention64(a["q"], a["k"], a["v"], a.get("prefix_k"), a.get("prefix_v"), kpm, p["causal"], p.get("scale"))
        # larger cases: the eager reference in float64 (checked against the loop one on the small cases)
        return attention_ops.reference(a["q"], a["k"], a["v"], a.get("prefix_k"), a.get("prefix_v"), kpm, p["causal"],
                                       p.get("scale"))

    def describe(a):
        return attention_ops.describe(a["q"], a["k"], a.get("prefix_k"), mask(a["q"].device), p["causal"])

    return Built("prefix_attention", leaves, views, call, ref, describe)


def _projections(R, p, d):
    T = {}
    for name in ("query", "key", "value"):
        if p.get(name):
            T[f"w_{name}"] = R((d, d), 0.4)
            if p.get(f"b_{name}"):
                T[f"b_{name}"] = R((d,), 0.4)
    return T


_PROJ = ("w_query", "b_query", "w_key", "b_key", "w_value", "b_value")


def build_fusion(p, dtype, device, seed=0, rand=None) -> Built:
    g = _gen(seed)
    R = rand or (lambda shape, scale=1.0: _rand(g, shape, scale))
    lead, k, d = tuple(p["lead"]), p["k"], p["d"]
    T = {"query": R(lead + (d,)), "values": R(lead + (k, d)), "residual": R(lead + (d,))}
    T.update(_projections(R, p, d))
    leaves = {n: _leaf(v, dtype, device) for n, v in T.items()}
    lay = p.get("layouts", {})
    flags = dict(temperature=p["temperature"], residual_before=p["residual_before"],
                 value_before_softmax=p["value_before_softmax"])

    def views(t):
        return {n: layout(v, lay.get(n, "contiguous")) for n, v in t.items()}

    def call(a, backend):
        return pet_fast.adapter_fusion(a["query"], a["values"], a["residual"], backend=backend, **flags,
                                       **{n: a.get(n) for n in _PROJ})

    def ref(a):
        return fusion64(a["query"], a["values"], a["residual"], *(a.get(n) for n in _PROJ), flags["temperature"],
                        flags["residual_before"], flags["value_before_softmax"])

    def describe(a):
        return fusion_ops.describe(a["query"], k)

    return Built("adapter_fusion", leaves, views, call, ref, describe)


def build_stacked(p, dtype, device, seed=0, rand=None) -> Built:
    g = _gen(seed)
    R = rand or (lambda shape, scale=1.0: _rand(g, shape, scale))
    lead, k, r, d = tuple(p["lead"]), p["k"], p["r"], p["d"]
    T = {"x": R(lead + (d,)), "query": R(lead + (d,)), "residual": R(lead + (d,)),
         "w_down": R((k, r, d), 0.5), "w_up": R((k, d, r), 0.5)}
    if p["b_down"]:
        T["b_down"] = R((k, r))
    if p["b_up"]:
        T["b_up"] = R((k, d))
    sc = p["scaling"]
    if sc == "per_adapter":
        T["scaling"] = R((k,))
    elif sc == "scalar":
        T["scaling"] = R(())
    T.update(_projections(R, p, d))
    if p.get("fold") and "w_query" in T and "w_key" in T:  # the folded query-key product (the key bias cancels)
        wq, bq, wk = T.pop("w_query"), T.pop("b_query", None), T.pop("w_key")
        T.pop("b_key", None)
        T["w_query_key"] = wq.T @ wk
        if bq is not None:
            T["b_query_key"] = bq @ wk
    if p.get("score_shift"):
        T["score_shift"] = R(lead)
    leaves = {n: _leaf(v, dtype, device) for n, v in T.items()}
    lay = p.get("layouts", {})
    flags = dict(temperature=p["temperature"], residual_before=p["residual_before"],
                 value_before_softmax=p["value_before_softmax"])
    mask = None
    if p.get("score_mask"):  # dropout's multipliers (exact in every dtype) and others; not differentiated
        pick = torch.randint(0, 3, lead + (k,), generator=g)
        mask = torch.tensor([0.0, 1.25, 2.0], dtype=torch.float32)[pick].to(device)
        flags["score_mask"] = mask

    def views(t):
        return {n: layout(v, lay.get(n, "contiguous")) for n, v in t.items()}

    def projections(a):  # as the reference takes them: the folded product is a query projection w_query_key.T
        if "w_query_key" not in a:
            return [a.get(n) for n in _PROJ]
        return [a["w_query_key"].T, a.get("b_query_key"), None, None, a.get("w_value"), a.get("b_value")]

    def scaling(a):
        return a["scaling"] if "scaling" in a else sc

    def call(a, backend):
        return pet_fast.stacked_adapter_fusion(a["x"], a["query"], a["residual"], a["w_down"], a.get("b_down"),
                                               a["w_up"], a.get("b_up"), activation=p["act"], scaling=scaling(a),
                                               backend=backend, **flags,
                                               **{n: a.get(n) for n in _PROJ + ("w_query_key", "b_query_key", "score_shift")})

    def ref(a):
        values = stacked_values64(a["x"], a["w_down"], a.get("b_down"), a["w_up"], a.get("b_up"), p["act"], scaling(a))
        return fusion64(a["query"], values, a["residual"], *projections(a), flags["temperature"],
                        flags["residual_before"], flags["value_before_softmax"], mask, a.get("score_shift"))

    def describe(a):
        return fusion_ops.describe(a["query"], k, r=r, activation=ALIASES.get(p["act"], p["act"]))

    return Built("stacked_adapter_fusion", leaves, views, call, ref, describe)


BUILDERS = {"bottleneck_adapter": build_adapter, "masked_linear": build_masked, "prefix_attention": build_attention,
            "adapter_fusion": build_fusion, "stacked_adapter_fusion": build_stacked}

# One ordinary parameter set per op (used by the edge, determinism and concurrency tests).
DEFAULTS = {
    "bottleneck_adapter": dict(lead=[3, 5], d=13, r=4, act="gelu", b_down=True, b_up=True, residual=True,
                               scaling="channel"),
    "masked_linear": dict(lead=[3, 5], **{"in": 11, "out": 7}, bias=True, threshold=0.1),
    "prefix_attention": dict(B=2, Hkv=2, group=2, L=5, S=7, D=8, P=3, prefix="shared", pad="right", causal=True),
    "adapter_fusion": dict(lead=[3, 5], k=3, d=9, query=True, b_query=True, key=True, b_key=True, value=True,
                           temperature=1.5, residual_before=False, value_before_softmax=True),
    "stacked_adapter_fusion": dict(lead=[3, 5], k=3, r=4, d=9, act="relu", b_down=True, b_up=True,
                                   scaling="per_adapter", query=True, b_query=True, key=True, value=True,
                                   temperature=1.0, residual_before=False, value_before_softmax=True),
}


def build(op, p=None, dtype=torch.float32, device="cpu", seed=0, rand=None) -> Built:
    """``rand(shape, scale)`` replaces the CPU float64 generator (e.g. to draw huge tensors on a GPU)."""
    return BUILDERS[op](dict(DEFAULTS[op]) if p is None else p, dtype, torch.device(device), seed, rand)


# ----- running a built case ---------------------------------------------------------------------------
def fresh(leaves: dict) -> dict:
    return {k: v.detach().clone().requires_grad_(v.requires_grad) for k, v in leaves.items()}


def run(b: Built, backend, leaves=None, gy=None, grads=True):
    """(output, {leaf name: gradient}) of the op on ``backend`` (gradients for ``gy``); ``REFERENCE``
    runs the op's definition in the leaves' dtype."""
    leaves = fresh(b.leaves) if leaves is None else leaves
    if backend == REFERENCE and b.op != "prefix_attention":
        backend = "eager"
    out = b.call(b.views(leaves), backend)
    if not grads:
        return out, {}
    diff = {k: v for k, v in leaves.items() if v.requires_grad}
    if gy is None:
        gy = torch.ones_like(out)
    if not out.requires_grad:
        return out, {k: torch.zeros_like(v) for k, v in diff.items()}
    gs = torch.autograd.grad(out, list(diff.values()), gy, allow_unused=True)
    return out, {k: torch.zeros_like(v) if gr is None else gr for (k, v), gr in zip(diff.items(), gs)}


def run_ref(b: Built, gy=None):
    """(output, gradients) of the float64 reference on CPU copies of the leaves."""
    leaves = {k: v.detach().cpu().double().requires_grad_(v.requires_grad) for k, v in b.leaves.items()}
    out = b.ref(b.views(leaves))
    diff = {k: v for k, v in leaves.items() if v.requires_grad}
    if gy is None:
        return out, {}
    if not out.requires_grad:
        return out, {k: torch.zeros_like(v) for k, v in diff.items()}
    gs = torch.autograd.grad(out, list(diff.values()), gy.detach().cpu().double(), allow_unused=True)
    return out, {k: torch.zeros_like(v) if gr is None else gr for (k, v), gr in zip(diff.items(), gs)}
