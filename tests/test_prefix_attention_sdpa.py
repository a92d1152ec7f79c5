"""The eager backend of prefix_attention (:func:`sdpa`, one call of torch's scaled_dot_product_attention)
against the op's definition :func:`reference`: outputs and the gradients of q, k, v and the prefix, in
float64 (exact up to rounding), float32 and float16 (precision rule of DESIGN.md §5); the masks it
passes to SDPA (none where none is needed); rows that see no key; torch.compile(fullgraph=True)."""
import importlib

import pytest
import torch
import torch.nn.functional as F

import pet_fast
from conftest import rel_err
from test_ops_prefix_attention import ref64

op = importlib.import_module("pet_fast.ops.prefix_attention")  # the package re-exports the function


def padding_mask(B, S, side, g):
    """Left, right or random padding; the first sequence is full, later ones shorter."""
    if side is None:
        return None
    if side == "random":
        return torch.rand(B, S, generator=g) < 0.6
    lengths = torch.tensor([S - (b * S) // (B + 1) for b in range(B)])
    pos = torch.arange(S)[None, :]
    return pos < lengths[:, None] if side == "right" else pos >= (S - lengths)[:, None]


def make(B, Hq, Hkv, L, S, D, P, prefix, pad, seed=0):
    """float64 tensors (q, k, v, prefix_k, prefix_v) and the padding mask."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    q, k, v = r(B, Hq, L, D), r(B, Hkv, S, D), r(B, Hkv, S, D)
    if prefix is None:
        pk = pv = None
    elif prefix == "shared":
        pk, pv = r(Hkv, P, D), r(Hkv, P, D)
    elif prefix == "per_batch":
        pk, pv = r(B, Hkv, P, D), r(B, Hkv, P, D)
    else:  # "expanded": a stride-0 batch view, as PrefixEncoder returns it
        pk, pv = r(Hkv, P, D).expand(B, -1, -1, -1), r(Hkv, P, D).expand(B, -1, -1, -1)
    return (q, k, v, pk, pv), padding_mask(B, S, pad, g), torch.randn(B, Hq, L, D, generator=g, dtype=torch.float64)


def forward_backward(fn, tensors, kpm, causal, gy, dtype, scale=None):
    """Output and gradients (None for an absent input) of fn on copies of ``tensors`` cast to dtype."""
    leaves = [None if t is None else t.detach().to(dtype).requires_grad_() for t in tensors]
    out = fn(*leaves, key_padding_mask=kpm, causal=causal, scale=scale)
    present = [t for t in leaves if t is not None]
    # an empty prefix (P = 0) is not part of the graph: its (empty) gradient is zeros
    grads = torch.autograd.grad(out, present, gy.to(dtype), allow_unused=True)
    grads = iter(torch.zeros_like(t) if g is None else g for t, g in zip(present, grads))
    return [out.detach()] + [None if t is None else next(grads) for t in leaves]


NAMES = ("out", "dq", "dk", "dv", "d_prefix_k", "d_prefix_v")

CASES = [
    # B, Hq, Hkv, L, S, D, P, prefix, padding, causal
    (2, 2, 2, 5, 5, 8, 3, "shared", None, False),          # no mask at all
    (2, 2, 2, 5, 7, 8, 3, "per_batch", None, False),
    (2, 4, 2, 3, 7, 8, 2, "per_batch", "right", True),     # GQA, S > L, bottom-right causal
    (3, 2, 1, 6, 4, 4, 3, "shared", "left", True),         # L > S: early rows see only the prefix
    (2, 2, 2, 6, 6, 8, 0, "shared", None, True),           # P = 0, L == S: SDPA's is_causal
    (2, 4, 2, 6, 6, 8, None, None, None, True),            # no prefix, L == S, GQA
    (1, 3, 1, 6, 4, 4, 0, "shared", None, True),           # P = 0, L > S: early rows see nothing
    (2, 3, 3, 4, 9, 8, None, None, None, True),            # no prefix, S > L: explicit mask
    (3, 2, 2, 4, 6, 8, None, None, "left", False),         # padding alone, no prefix
    (3, 2, 2, 4, 6, 8, 2, "expanded", "random", True),
    (2, 4, 1, 3, 0, 8, 4, "shared", None, True),           # S = 0: only the prefix
    (2, 2, 2, 3, 0, 8, None, None, None, False),           # nothing to attend: zeros
]


@pytest.mark.parametrize("B,Hq,Hkv,L,S,D,P,prefix,pad,causal", CASES)
def test_float64_matches_the_reference(B, Hq, Hkv, L, S, D, P, prefix, pad, causal):
    tensors, kpm, gy = make(B, Hq, Hkv, L, S, D, P, prefix, pad)
    got = forward_backward(op.sdpa, tensors, kpm, causal, gy, torch.float64)
    want = forward_backward(op.reference, tensors, kpm, causal, gy, torch.float64)
    for name, a, b in zip(NAMES, got, want):
        assert (a is None) == (b is None), name
        if a is None:
            continue
        assert a.shape == b.shape and a.dtype == torch.float64, name
        assert torch.isfinite(a).all(), name
        if b.numel():
            assert (a - b).abs().max().item() <= 1e-12 * max(1.0, b.abs().max().item()), name
    # and the independent loop reference of the op tests, for the output
    assert rel_err(got[0], ref64(*tensors, kpm, causal)) < 1e-12


def test_dispatched_as_the_eager_backend_with_a_custom_scale():
    tensors, kpm, gy = make(2, 4, 2, 5, 6, 8, 3, "shared", "right")
    assert pet_fast.dispatch._REGISTRY[op.OP].impls["eager"].run is op.sdpa
    out = pet_fast.prefix_attention(*tensors, key_padding_mask=kpm, causal=True, scale=0.3, backend="eager")
    assert rel_err(out, op.reference(*tensors, kpm, True, 0.3)) < 1e-12


@pytest.mark.parametrize("B,Hq,Hkv,L,S,D,P,prefix,pad,causal", [CASES[2], CASES[3], CASES[5], CASES[6]])
def test_float32_output_and_gradients(B, Hq, Hkv, L, S, D, P, prefix, pad, causal):
    tensors, kpm, gy = make(B, Hq, Hkv, L, S, D, P, prefix, pad, seed=1)
    got = forward_backward(op.sdpa, tensors, kpm, causal, gy, torch.float32)
    want = forward_backward(op.reference, tensors, kpm, causal, gy, torch.float64)
    for name, a, b in zip(NAMES, got, want):
        if b is not None:
            assert a.dtype == torch.float32, name
            assert rel_err(a, b) < 1e-5, (name, rel_err(a, b))


@pytest.mark.parametrize("B,Hq,Hkv,L,S,D,P,prefix,pad,causal", [
    (2, 4, 2, 9, 13, 16, 3, "shared", "right", True),
    (2, 2, 2, 7, 7, 16, 0, "shared", None, True),
    (2, 2, 2, 7, 11, 16, 5, "per_batch", None, False),
    (3, 4, 2, 6, 8, 16, None, None, "left", True),
])
def test_float16_follows_the_precision_rule(B, Hq, Hkv, L, S, D, P, prefix, pad, causal):
    """Error against float64 at most twice the error of the float16 reference, plus a small atol."""
    tensors, kpm, gy = make(B, Hq, Hkv, L, S, D, P, prefix, pad, seed=2)
    got = forward_backward(op.sdpa, tensors, kpm, causal, gy, torch.float16)
    base = forward_backward(op.reference, tensors, kpm, causal, gy, torch.float16)
    want = forward_backward(op.reference, tensors, kpm, causal, gy, torch.float64)
    for name, a, e, r in zip(NAMES, got, base, want):
        if r is None or r.numel() == 0:
            continue
        assert a.dtype == torch.float16 and torch.isfinite(a).all(), name
        err = (a.double() - r).abs().max().item()
        base_err = (e.double() - r).abs().max().item()
        assert err <= 2 * base_err + 2e-3 * max(1.0, r.abs().max().item()), (name, err, base_err)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16], ids=str)
def test_rows_that_see_no_key_are_zero_and_pass_no_gradient(monkeypatch, dtype):
    # batch 0 all padding; causal with L > S and no prefix: the first rows of batch 1 see nothing too
    B, Hq, L, S, D = 2, 2, 6, 4, 8
    tensors, _, gy = make(B, Hq, Hq, L, S, D, None, None, None, seed=3)
    kpm = torch.tensor([[False] * S, [True, True, True, False]])
    leaves = [t.to(dtype).requires_grad_() for t in tensors[:3]]
    spy = _Spy()
    monkeypatch.setattr(op.F, "scaled_dot_product_attention", spy)
    out = op.sdpa(*leaves, key_padding_mask=kpm, causal=True)
    # SDPA itself never sees a row without a key (some devices give NaN there); sdpa zeroes them
    assert spy.calls[0]["mask_values"].any(dim=-1).all()
    assert not torch.isnan(out).any()
    empty = torch.zeros(B, Hq, L, dtype=torch.bool)
    empty[0] = True
    empty[1, :, : L - S] = True  # query i sees keys j <= i - 2
    assert torch.equal(out[empty], torch.zeros_like(out[empty]))  # exact zeros
    assert (out[~empty].abs().amax(dim=-1) > 0).all()
    dq, dk, dv = torch.autograd.grad(out, leaves, gy.to(dtype))
    for g in (dq, dk, dv):
        assert torch.isfinite(g).all()
    assert torch.equal(dq[empty], torch.zeros_like(dq[empty]))
    assert dk[0].abs().max() == 0 and dv[0].abs().max() == 0  # batch 0: no row sees a key
    assert dk[1, :, 3].abs().max() == 0  # the padded key of batch 1
    assert dk[1].abs().max() > 0
    ref = forward_backward(op.reference, tensors[:3] + (None, None), kpm, True, gy, torch.float64)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 5e-3}[dtype]
    for a, b in zip([out, dq, dk, dv], ref):
        assert rel_err(a, b) < tol


_SDPA = F.scaled_dot_product_attention


class _Spy:
    """Records the keyword arguments that sdpa gives scaled_dot_product_attention."""

    def __init__(self):
        self.calls = []

    def __call__(self, q, k, v, attn_mask=None, is_causal=False, scale=None, **kw):
        # mask_values: the allowed positions as bool, whether sdpa passed a bool or an additive mask
        allowed = attn_mask
        if attn_mask is not None and attn_mask.dtype != torch.bool:
            allowed = attn_mask != float("-inf")
        self.calls.append(dict(q=q.shape, k=k.shape, mask=None if attn_mask is None else attn_mask.shape,
                               is_causal=is_causal, mask_values=allowed, mask_dtype=None if attn_mask is None
                               else attn_mask.dtype, mask_stride=None if attn_mask is None else attn_mask.stride(),
                               **kw))
        return _SDPA(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale, **kw)


@pytest.mark.parametrize("B,Hq,Hkv,L,S,P,pad,causal,mask,is_causal", [
    (2, 2, 2, 5, 7, 3, None, False, None, False),                  # flash-eligible: no mask
    (2, 2, 2, 5, 7, None, None, False, None, False),
    (2, 2, 2, 6, 6, 0, None, True, None, True),                    # L == S, no prefix: is_causal
    (2, 2, 2, 5, 7, 0, None, True, (1, 1, 5, 7), False),           # S != L: explicit, broadcast over B
    (2, 2, 2, 6, 6, 3, None, True, (1, 1, 6, 9), False),           # prefix: explicit
    (2, 2, 2, 5, 7, 3, "right", False, (2, 1, 1, 10), False),      # padding alone: broadcast over L
    (2, 2, 2, 5, 7, 3, "left", True, (2, 1, 5, 10), False),
])
def test_mask_only_when_needed(monkeypatch, B, Hq, Hkv, L, S, P, pad, causal, mask, is_causal):
    spy = _Spy()
    monkeypatch.setattr(op.F, "scaled_dot_product_attention", spy)
    tensors, kpm, _ = make(B, Hq, Hkv, L, S, 8, P, None if P is None else "shared", pad)
    out = pet_fast.prefix_attention(*tensors, key_padding_mask=kpm, causal=causal, backend="eager")
    (call,) = spy.calls
    assert call["mask"] == (None if mask is None else torch.Size(mask))
    assert call["is_causal"] is is_causal
    assert call["k"][2] == S + (P or 0)  # the prefix concatenated
    assert rel_err(out, op.reference(*tensors, kpm, causal)) < 1e-12


def test_grouped_heads_are_repeated_on_the_cpu(monkeypatch):
    """The CPU's flash kernel has no GQA (enable_gqa would send it to the math path): the key/value
    heads are repeated there; enable_gqa is for CUDA calls in fp16/bf16."""
    spy = _Spy()
    monkeypatch.setattr(op.F, "scaled_dot_product_attention", spy)
    tensors, _, _ = make(2, 6, 2, 4, 5, 8, 3, "shared", None)
    out = op.sdpa(*tensors)
    assert spy.calls[0]["k"][1] == 6 and "enable_gqa" not in spy.calls[0]
    assert rel_err(out, op.reference(*tensors)) < 1e-12
    # CUDA in half precision: enable_gqa, with or without a mask (measured faster on an H100)
    assert op._sdpa_gqa("cuda", torch.bfloat16) == op._SDPA_GQA
    assert op._sdpa_gqa("cuda", torch.float16, masked=True) == (op._SDPA_GQA and op._SDPA_GQA_WITH_MASK)
    assert op._SDPA_GQA_WITH_MASK == (tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 11))
    assert not op._sdpa_gqa("cuda", torch.float32) and not op._sdpa_gqa("cpu", torch.bfloat16, masked=True)


class _Layer(torch.nn.Module):
    """A small attention layer with its own prefix, calling the op on the eager backend."""

    def __init__(self, P, causal):
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)
        self.prefix_k = torch.nn.Parameter(torch.randn(2, P, 8))
        self.prefix_v = torch.nn.Parameter(torch.randn(2, P, 8))
        self.causal = causal

    def forward(self, x, kpm):  # x: (B, L, 4 heads * 8); 2 key/value heads
        B, L, _ = x.shape
        q = x.view(B, L, 4, 8).transpose(1, 2)
        kv = self.proj(x.view(B, L, 4, 8)[:, :, :2]).transpose(1, 2)
        out = pet_fast.prefix_attention(q, kv, kv * 0.5, self.prefix_k, self.prefix_v, key_padding_mask=kpm,
                                        causal=self.causal, backend="eager")
        return out.transpose(1, 2).reshape(B, L, 32)


@pytest.mark.parametrize("P,causal,pad", [(3, True, True), (0, True, False), (0, True, True), (2, False, False)])
def test_compiles_fullgraph_and_matches_eager(P, causal, pad):
    torch.manual_seed(0)
    layer = _Layer(P, causal)
    x = torch.randn(2, 5, 32, requires_grad=True)
    kpm = torch.tensor([[True] * 5, [False, False, True, True, True]]) if pad else None
    explained = torch._dynamo.explain(layer)(x, kpm)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    y = compiled(x, kpm)
    gy = torch.randn_like(y)
    params = [x, layer.proj.weight] + ([layer.prefix_k, layer.prefix_v] if P else [])
    got = torch.autograd.grad(y, params, gy)
    y_ref = layer(x, kpm)
    ref = torch.autograd.grad(y_ref, params, gy)
    assert torch.isfinite(y).all()
    assert rel_err(y, y_ref) < 1e-6
    for a, b in zip(got, ref):
        assert rel_err(a, b) < 1e-6


def test_compiles_with_dynamic_shapes():
    """dynamic=True: the shape tests of sdpa (P == 0, L == S, L > S) are symbolic; they become guards,
    never a graph break or a SymBool handed to SDPA."""
    def f(q, k, v, pk, pv, kpm):
        return pet_fast.prefix_attention(q, k, v, pk, pv, key_padding_mask=kpm, causal=True, backend="eager")

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager", dynamic=True)
    g = torch.Generator().manual_seed(5)
    for L, S, P, pad in [(5, 7, 3, True), (6, 6, 0, False), (7, 3, 0, True)]:
        q = torch.randn(2, 4, L, 8, generator=g, requires_grad=True)
        k, v = torch.randn(2, 2, S, 8, generator=g), torch.randn(2, 2, S, 8, generator=g)
        pk, pv = torch.randn(2, P, 8, generator=g), torch.randn(2, P, 8, generator=g)
        kpm = torch.rand(2, S, generator=g) < 0.7 if pad else None
        out = compiled(q, k, v, pk, pv, kpm)
        (dq,) = torch.autograd.grad(out.sum(), [q])
        ref = op.reference(q, k, v, pk, pv, kpm, True)
        (rq,) = torch.autograd.grad(ref.sum(), [q])
        assert rel_err(out, ref) < 1e-5 and rel_err(dq, rq) < 1e-5, (L, S, P, pad)


# ---------------------------------------------------------------------------------------------------
# GPU: SDPA's CUDA kernels (flash without a mask, the memory-efficient one with a mask, enable_gqa).

GPU_CASES = [
    # B, Hq, Hkv, L, S, D, P, prefix, padding, causal
    (2, 4, 4, 129, 200, 64, 20, "shared", "right", False),
    (2, 8, 2, 257, 257, 64, 30, "per_batch", "left", True),
    (2, 8, 2, 190, 190, 128, 0, "shared", None, True),       # is_causal with enable_gqa
    (2, 8, 2, 100, 333, 80, 7, "expanded", None, False),     # no mask: flash with enable_gqa
    (3, 4, 4, 77, 50, 64, None, None, "right", True),        # rows with no key (L > S, no prefix)
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("B,Hq,Hkv,L,S,D,P,prefix,pad,causal", GPU_CASES)
def test_gpu_follows_the_precision_rule(dtype, B, Hq, Hkv, L, S, D, P, prefix, pad, causal):
    tensors, kpm, gy = make(B, Hq, Hkv, L, S, D, P, prefix, pad, seed=4)
    if pad == "right":
        kpm[-1] = False  # one sequence all padding
    tensors = tuple(None if t is None else t.cuda() for t in tensors)
    kpm, gy = (None if kpm is None else kpm.cuda()), gy.cuda()
    got = forward_backward(op.sdpa, tensors, kpm, causal, gy, dtype)
    want = forward_backward(op.reference, tensors, kpm, causal, gy, torch.float64)
    base = None if dtype == torch.float32 else forward_backward(op.reference, tensors, kpm, causal, gy, dtype)
    for i, (name, a, r) in enumerate(zip(NAMES, got, want)):
        if r is None or r.numel() == 0:
            continue
        assert a.dtype == dtype and torch.isfinite(a).all(), name
        if base is None:
            assert rel_err(a, r) < 1e-4, (name, rel_err(a, r))
            continue
        err = (a.double() - r).abs().max().item()
        base_err = (base[i].double() - r).abs().max().item()
        atol = (1e-2 if dtype == torch.bfloat16 else 2e-3) * max(1.0, r.abs().max().item())
        assert err <= 2 * base_err + atol, (name, err, base_err)


def test_masks_built_once_for_the_layers_of_a_forward(monkeypatch):
    """Calls with the same padding mask object (the layers of one forward) reuse the masks; a new
    mask, a change in place, other sizes or causality build them again, and the results follow."""
    g = torch.Generator().manual_seed(3)
    (q, k, v, pk, pv), _, _ = make(2, 2, 2, 5, 7, 4, 3, "shared", None)
    kpm = padding_mask(2, 7, "random", g)
    kpm[:, 0] = True
    built = []
    real = op._sdpa_masks
    monkeypatch.setattr(op, "_sdpa_masks", lambda *a: built.append(a) or real(*a))
    op._LAST_MASKS.value = None
    first = op.sdpa(q, k, v, pk, pv, key_padding_mask=kpm)
    assert torch.equal(op.sdpa(q, k, v, pk, pv, key_padding_mask=kpm), first)
    assert len(built) == 1
    kpm[1, 3:] = False  # in place: the version counter moves
    changed = op.sdpa(q, k, v, pk, pv, key_padding_mask=kpm)
    assert len(built) == 2
    assert torch.allclose(changed, ref64(q, k, v, pk, pv, kpm, False), atol=1e-12)
    assert not torch.allclose(changed, first)
    op.sdpa(q, k, v, pk, pv, key_padding_mask=kpm, causal=True)
    op.sdpa(q, k, v, pk, pv, key_padding_mask=kpm.clone())
    assert len(built) == 4


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("Hkv,L,S,P,pad,causal", [
    (1, 5, 7, 3, "left", True),      # GQA, left padding, causal, prefix: the Llama case
    (2, 5, 7, 3, "right", False),    # padding alone: (B, 1, 1, P + S)
    (2, 6, 6, 3, None, True),        # causality alone: (1, 1, L, P + S)
    (2, 6, 4, 0, "random", True),    # no prefix, rows that see no key
])
def test_additive_mask_gives_the_bool_masks_results(monkeypatch, dtype, Hkv, L, S, P, pad, causal):
    """sdpa passes its mask as the additive float mask SDPA makes of a bool one (q's dtype, rows
    16-aligned): the output and every gradient are the bits of the bool-mask call."""
    g = torch.Generator().manual_seed(7)
    tensors, _, gy = make(2, 2, Hkv, L, S, 8, P or None, "expanded" if P else None, None, seed=5)
    kpm = padding_mask(2, S, pad, g)
    spy = _Spy()
    monkeypatch.setattr(op.F, "scaled_dot_product_attention", spy)
    op._LAST_MASKS.value = None
    additive = forward_backward(op.sdpa, tensors, kpm, causal, gy, dtype)
    call = spy.calls[-1]
    assert call["mask_dtype"] == dtype and call["mask_stride"][-2] % 16 == 0 and call["mask_stride"][-1] == 1
    monkeypatch.setattr(op, "_additive_dtype", lambda q: None)
    op._LAST_MASKS.value = None
    boolean = forward_backward(op.sdpa, tensors, kpm, causal, gy, dtype)
    assert spy.calls[-1]["mask_dtype"] == torch.bool
    for name, a, b in zip(NAMES, additive, boolean):
        assert (a is None) == (b is None), name
        if a is not None:
            assert torch.equal(a, b), name


def test_additive_mask_is_sdpas_conversion():
    m = torch.rand(3, 1, 4, 21, generator=torch.Generator().manual_seed(0)) < 0.5
    a = op._additive_mask(m, torch.float16)
    want = torch.zeros(m.shape, dtype=torch.float16).masked_fill(~m, float("-inf"))
    assert torch.equal(a, want) and a.stride(-2) == 32 and a.stride(-1) == 1


def test_mask_stays_bool_under_autocast_to_another_dtype(monkeypatch):
    """Under autocast to a dtype other than q's, SDPA runs in the autocast dtype: the mask is left bool
    (an additive mask in q's dtype would be cast in every call)."""
    (q, k, v, pk, pv), _, _ = make(2, 2, 1, 5, 7, 8, 3, "shared", None)
    kpm = padding_mask(2, 7, "left", None)
    q, k, v, pk, pv = (t.float() for t in (q, k, v, pk, pv))
    spy = _Spy()
    monkeypatch.setattr(op.F, "scaled_dot_product_attention", spy)
    op._LAST_MASKS.value = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert op._additive_dtype(q) is None and op._additive_dtype(q.bfloat16()) == torch.bfloat16
        op.sdpa(q, k, v, pk, pv, key_padding_mask=kpm, causal=True)
    assert spy.calls[-1]["mask_dtype"] == torch.bool
    op.sdpa(q, k, v, pk, pv, key_padding_mask=kpm, causal=True)  # same mask object, no autocast: rebuilt
    assert spy.calls[-1]["mask_dtype"] == torch.float32
