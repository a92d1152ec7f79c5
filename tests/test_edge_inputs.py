"""Inputs a kernel must survive, on every backend that runs here: non-contiguous and transposed
inputs, leading batch dimensions, empty inputs, NaN and inf (propagated as the reference does, never a
hang), very large and tiny scales, and (on a GPU) tensors past 2**31 elements."""
from __future__ import annotations

import faulthandler

import pytest
import torch

import pet_fast
from pet_fast import dispatch

import _cases
from _cases import OPS
from conftest import rel_err

f32 = torch.float32


def backends(op, device="cpu"):
    return list(_cases.runnable(op, device, dtypes=(f32,)))


def op_backends():
    return [pytest.param(op, b, id=f"{op}-{b}") for op in OPS for b in backends(op)]


@pytest.fixture(autouse=True)
def _no_hang():
    """A call that hangs (a kernel loop that never ends on NaN) fails the run instead of stalling CI."""
    faulthandler.dump_traceback_later(300, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


def check_against_reference(b, backend, rtol=1e-4):
    out, grads = _cases.run(b, backend)
    ref, ref_grads = _cases.run_ref(b, torch.ones(out.shape, dtype=torch.float64))
    assert out.shape == ref.shape and out.dtype == b.leaves[next(iter(b.leaves))].dtype
    # absolute part relative to the largest value of the case (gradients that are zero by symmetry are
    # sums of terms of that size); see test_properties.assert_close
    floor = max([_max_abs(ref)] + [_max_abs(g) for g in ref_grads.values()])
    for what, got, want in [("output", out, ref)] + [(n, g, ref_grads[n]) for n, g in grads.items()]:
        assert got.shape == want.shape, what
        err = (got.detach().cpu().double() - want).abs().max().item() if want.numel() else 0.0
        assert err <= rtol * _max_abs(want) + 0.1 * rtol * floor, f"{what}: error {err:.3g}"


def _max_abs(t):
    return t.detach().abs().max().item() if t.numel() else 0.0


def same_nonfinite_and_close(out, ref, rtol=1e-4):
    """Same NaN positions, same infinities (with sign), and the finite entries close."""
    assert out.shape == ref.shape
    assert torch.equal(torch.isnan(out), torch.isnan(ref)), "NaN positions differ from the reference"
    assert torch.equal(torch.isposinf(out), torch.isposinf(ref)), "+inf positions differ from the reference"
    assert torch.equal(torch.isneginf(out), torch.isneginf(ref)), "-inf positions differ from the reference"
    fin = torch.isfinite(ref)
    if fin.any():
        assert rel_err(out[fin], ref[fin]) < rtol


# ----- layouts and leading dimensions -------------------------------------------------------------------
LAYOUT_KINDS = ["transposed", "strided", "offset"]


def check_non_contiguous(op, backend, kind, device="cpu"):
    p = dict(_cases.DEFAULTS[op])
    p["layouts"] = {name: kind for name in _cases.build(op, p).leaves}
    if op == "prefix_attention" and kind == "transposed":
        p["layouts"].update(q="heads_last", k="heads_last", v="heads_last")
    b = _cases.build(op, p, device=device)
    args = b.views(_cases.fresh(b.leaves))
    assert any(not t.is_contiguous() for t in args.values() if t.dim() > 1)
    check_against_reference(b, backend)


@pytest.mark.parametrize("kind", LAYOUT_KINDS)
@pytest.mark.parametrize("op,backend", op_backends())
def test_non_contiguous_inputs(op, backend, kind):
    check_non_contiguous(op, backend, kind)


LEADS = [[], [7], [2, 3], [2, 1, 3, 2]]


@pytest.mark.parametrize("lead", LEADS)
@pytest.mark.parametrize("op,backend", [pc for pc in op_backends() if pc.values[0] != "prefix_attention"])
def test_leading_batch_dims(op, backend, lead):
    check_against_reference(_cases.build(op, dict(_cases.DEFAULTS[op], lead=lead)), backend)


def check_expanded_prefix(backend, device="cpu"):
    """PrefixEncoder(batch_size=B) hands over stride-0 batch views; every backend takes them."""
    p = dict(_cases.DEFAULTS["prefix_attention"], prefix="expanded")
    check_against_reference(_cases.build("prefix_attention", p, device=device), backend)


@pytest.mark.parametrize("backend", backends("prefix_attention"))
def test_expanded_prefix_like_prefix_encoder(backend):
    check_expanded_prefix(backend)


# ----- empty inputs -------------------------------------------------------------------------------------
EMPTY = [
    ("bottleneck_adapter", dict(lead=[0])),
    ("bottleneck_adapter", dict(lead=[2, 0, 3])),
    ("masked_linear", dict(lead=[0])),
    ("masked_linear", dict(lead=[3, 0])),
    ("adapter_fusion", dict(lead=[0])),
    ("stacked_adapter_fusion", dict(lead=[0, 2])),
    ("prefix_attention", dict(P=0)),                              # P = 0 (an empty prefix)
    ("prefix_attention", dict(S=0, causal=False, pad=None)),      # S = 0: only the prefix
    ("prefix_attention", dict(S=0, P=0, pad=None)),               # nothing to attend: zeros
    ("prefix_attention", dict(L=0)),                              # no queries
    ("prefix_attention", dict(B=0)),
    ("prefix_attention", dict(prefix="per_batch", P=0, S=0, pad=None)),
]


def check_empty(op, over, backend, device="cpu"):
    b = _cases.build(op, dict(_cases.DEFAULTS[op], **over), device=device)
    check_against_reference(b, backend)
    out, grads = _cases.run(b, backend)
    assert torch.isfinite(out).all()
    assert all(torch.isfinite(g).all() for g in grads.values())


@pytest.mark.parametrize("op,over", EMPTY, ids=[f"{op}-{sorted(o.items())}" for op, o in EMPTY])
def test_empty_inputs(op, over):
    for backend in backends(op):
        check_empty(op, over, backend)


# ----- NaN and inf -------------------------------------------------------------------------------------
def eager_and(op, backend, p, poison, device="cpu"):
    """Outputs of the op's eager definition (its reference function: for prefix_attention not the eager
    backend, which runs SDPA) and of ``backend`` on the same inputs after ``poison(leaves)`` (in place)."""
    b = _cases.build(op, p, device=device)
    with torch.no_grad():
        poison(b.leaves)
    outs = []
    for name in (_cases.REFERENCE, backend):
        out, _ = _cases.run(b, name, grads=False)
        outs.append(out.detach())
    return outs


def _row(name, index, value):
    def poison(leaves):
        leaves[name][index] = value
    return poison


NONFINITE = [float("nan"), float("inf"), float("-inf")]


def check_nonfinite_row(op, backend, value, device="cpu"):
    first = {"bottleneck_adapter": "x", "masked_linear": "x", "prefix_attention": "q", "adapter_fusion": "query",
             "stacked_adapter_fusion": "x"}[op]
    index = (1, 2) if op != "prefix_attention" else (1, 0, 2)
    eager, out = eager_and(op, backend, dict(_cases.DEFAULTS[op]), _row(first, index, value), device)
    same_nonfinite_and_close(out, eager)
    # the poisoned token/query is the only one affected (per-token ops; attention rows are independent)
    bad = ~torch.isfinite(eager)
    if value != value:
        assert bad[index].all()
    rows = bad.reshape(-1, eager.shape[-1]).any(-1).nonzero().flatten().tolist()
    assert len(rows) <= 1


@pytest.mark.parametrize("value", NONFINITE)
@pytest.mark.parametrize("op,backend", op_backends())
def test_nan_and_inf_rows_propagate_like_the_reference(op, backend, value):
    check_nonfinite_row(op, backend, value)


def check_one_infinite_entry(op, backend, value, device="cpu"):
    """One infinite entry of a token (not the whole token) through a bounded activation leaves the token's other
    columns finite in the reference: the kernels must not turn it NaN through their padded hidden columns
    (x @ 0 is NaN there when r is not the padded width)."""
    p = dict(_cases.DEFAULTS[op], act="tanh", r=3)
    b = _cases.build(op, p, device=device)
    with torch.no_grad():
        b.leaves["x"][1, 2, 0] = value
    (eager, eager_grads), (out, grads) = (_cases.run(b, name) for name in (_cases.REFERENCE, backend))
    assert torch.isfinite(eager[1, 2, 1:]).all()  # (the case does test that)
    same_nonfinite_and_close(out.detach(), eager.detach())
    # the input's gradient (the hidden's derivative is finite there): the same in every column
    same_nonfinite_and_close(grads["x"], eager_grads["x"])


@pytest.mark.parametrize("value", [float("inf"), float("-inf")])
@pytest.mark.parametrize("op,backend", [p for p in op_backends() if p.values[0] in ("bottleneck_adapter",
                                                                                    "stacked_adapter_fusion")])
def test_one_infinite_entry_stays_in_its_column(op, backend, value):
    check_one_infinite_entry(op, backend, value)


def check_hidden_nan_key(backend, device="cpu"):
    p = dict(_cases.DEFAULTS["prefix_attention"], pad=None, causal=True, L=5, S=7)
    # the last key is visible only to the last query (bottom-right causal): every other row stays finite
    eager, out = eager_and("prefix_attention", backend, p, _row("k", (0, 1, 6), float("nan")), device)
    same_nonfinite_and_close(out, eager)
    assert torch.isnan(eager[0, 2:4, 4]).all() and torch.isfinite(eager[0, :, :4]).all()
    assert torch.isfinite(eager[1]).all()


def _hidden_nan_cases():
    # The eager backend (SDPA) adds its mask to the scores, so a NaN key leaks into rows that cannot
    # see it (NaN + -inf is NaN); the module docstring says so. Strict: a torch that hides it passes
    # this test, which then fails until the mark is removed.
    leaks = pytest.mark.xfail(strict=True, reason="SDPA lets a NaN in a hidden key reach the rows that cannot see it")
    return [pytest.param(b, marks=[leaks] if b == "eager" else []) for b in backends("prefix_attention")]


@pytest.mark.parametrize("backend", _hidden_nan_cases())
def test_nan_key_hidden_by_causality_stays_hidden(backend):
    check_hidden_nan_key(backend)


def check_nan_scores(backend, device="cpu"):
    """NaN > threshold is False: a NaN score prunes its weight, on every backend."""
    b = _cases.build("masked_linear", device=device)
    with torch.no_grad():
        b.leaves["scores"][0, :] = float("nan")
    out, _ = _cases.run(b, backend, grads=False)
    ref, _ = _cases.run_ref(b)
    assert torch.isfinite(out).all()
    assert rel_err(out.cpu(), ref) < 1e-4


@pytest.mark.parametrize("backend", backends("masked_linear"))
def test_nan_scores_mean_pruned(backend):
    check_nan_scores(backend)


# ----- very large and tiny scales -----------------------------------------------------------------------
SCALES = [
    ("bottleneck_adapter", dict(scaling=1e-30)),
    ("bottleneck_adapter", dict(scaling=1e30)),
    ("bottleneck_adapter", dict(scaling=1e30, wscale=1e5)),   # overflows to inf in float32
    ("bottleneck_adapter", dict(scaling=-1e38, residual=False)),
    ("masked_linear", dict(threshold=1e30)),                  # prunes everything: the bias
    ("masked_linear", dict(threshold=-1e30)),                 # keeps everything
    ("masked_linear", dict(wscale=1e38)),                     # weights and sums overflow to +-inf (and inf - inf)
    ("prefix_attention", dict(scale=1e-30)),                  # uniform attention
    ("prefix_attention", dict(scale=1e4)),                    # one-hot attention
    ("adapter_fusion", dict(temperature=1e30)),
    ("adapter_fusion", dict(temperature=1e-3)),
    ("stacked_adapter_fusion", dict(scaling=1e30, temperature=1e30)),
    ("stacked_adapter_fusion", dict(scaling=1e-30)),
]


def overflow_consistent(out, ref64):
    """For sums whose partial sums overflow float32, inf versus NaN (inf - inf) depends on the order of
    summation, which differs between backends. What must hold: where the float64 result lies beyond
    float32's range the output is not finite, and where the output is finite it is close to float64."""
    big = ref64.abs() > torch.finfo(torch.float32).max
    assert (~torch.isfinite(out.cpu()[big])).all(), "a result beyond float32's range came out finite"
    fin = torch.isfinite(out.cpu()) & torch.isfinite(ref64)
    assert fin.any()
    assert rel_err(out.cpu()[fin].double(), ref64[fin]) < 1e-3


def check_scale(op, over, backend, device="cpu"):
    p = dict(_cases.DEFAULTS[op], **over)
    eager, out = eager_and(op, backend, p, lambda leaves: None, device)
    ref, _ = _cases.run_ref(_cases.build(op, p, device=device))
    if over.get("wscale", 0) >= 1e38:
        overflow_consistent(out, ref)
        overflow_consistent(eager, ref)
        return
    same_nonfinite_and_close(out, eager, rtol=1e-3)
    # where float32 stays finite it agrees with float64
    e64 = eager.double().cpu()
    fin = torch.isfinite(e64) & torch.isfinite(ref)
    if fin.any():
        assert rel_err(e64[fin], ref[fin]) < 1e-3


@pytest.mark.parametrize("op,over", SCALES, ids=[f"{op}-{sorted(o.items())}" for op, o in SCALES])
def test_extreme_scales_match_the_reference(op, over):
    for backend in backends(op):
        check_scale(op, over, backend)


def test_extreme_scales_cover_infinity():
    """The table above does reach inf (else it would not test overflow)."""
    for op, over in SCALES:
        if over.get("wscale", 0) >= 1e5:
            b = _cases.build(op, dict(_cases.DEFAULTS[op], **over))
            out, _ = _cases.run(b, "eager", grads=False)
            assert torch.isinf(out).any(), op


# ----- all of the above for the kernels on a GPU ----------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("op", OPS)
def test_edge_inputs_gpu(op, backend):
    if backend not in backends(op, "cuda"):
        pytest.skip(f"{op} has no {backend} backend that takes float32 CUDA tensors here")
    for kind in LAYOUT_KINDS:
        check_non_contiguous(op, backend, kind, "cuda")
    for eop, over in EMPTY:
        if eop == op:
            check_empty(op, over, backend, "cuda")
    for value in NONFINITE:
        check_nonfinite_row(op, backend, value, "cuda")
    for sop, over in SCALES:
        if sop == op:
            check_scale(op, over, backend, "cuda")
    if op == "prefix_attention":
        check_expanded_prefix(backend, "cuda")
        check_hidden_nan_key(backend, "cuda")
    if op == "masked_linear":
        check_nan_scores(backend, "cuda")


# ----- past 2**31 elements (int64 offsets) --------------------------------------------------------------
def _big_case(op, numel, device, dtype):
    """Shapes whose main tensor has at least ``numel`` elements, with small other dimensions."""
    if op == "bottleneck_adapter":
        d = 64
        return dict(lead=[-(-numel // d)], d=d, r=8, act="relu", b_down=True, b_up=True, residual=False, scaling=0.5)
    if op == "masked_linear":
        i = 64
        return {"lead": [-(-numel // i)], "in": i, "out": 16, "bias": True, "threshold": 0.0}
    if op == "prefix_attention":
        D, Hkv = 64, 2
        S = -(-numel // (Hkv * D))
        return dict(B=1, Hkv=Hkv, group=1, L=16, S=S, D=D, P=4, prefix="shared", pad=None, causal=True)
    if op == "adapter_fusion":
        d, k = 32, 2
        return dict(lead=[-(-numel // (d * k))], k=k, d=d, query=True, key=True, value=False,
                    temperature=1.0, residual_before=False, value_before_softmax=True)
    d, k = 32, 2
    return dict(lead=[-(-numel // d)], k=k, r=4, d=d, act="relu", b_down=True, b_up=True, scaling="per_adapter",
                query=True, key=True, value=False, temperature=1.0, residual_before=False, value_before_softmax=True)


def attention_rows64(q, k, v, prefix_k, prefix_v, chunk=1 << 19):
    """Non-causal, unpadded attention of a few query rows over ``[prefix; keys]`` in float64, a chunk of
    keys at a time (online softmax): neither the concatenation nor an fp16 probability matrix. The eager
    op is no reference past a few million keys in fp16: it casts the probabilities (each about 1/S) to
    fp16, where they fall below the smallest normal number; at 2**24 keys its output is some 15% off."""
    B, Hq, L, D = q.shape
    Hkv = k.shape[1]
    q64 = q.double().reshape(B, Hkv, (Hq // Hkv) * L, D) * D ** -0.5  # query head h reads kv head h // group
    blocks = []
    if prefix_k is not None:
        pk, pv = (t if t.dim() == 4 else t.unsqueeze(0).expand(B, -1, -1, -1) for t in (prefix_k, prefix_v))
        blocks.append((pk, pv))
    blocks += [(k[:, :, i:i + chunk], v[:, :, i:i + chunk]) for i in range(0, k.shape[2], chunk)]
    m = torch.full(q64.shape[:-1], float("-inf"), dtype=torch.float64, device=q.device)
    l = torch.zeros_like(m)
    acc = torch.zeros_like(q64)
    for kc, vc in blocks:
        s = q64 @ kc.double().transpose(-2, -1)
        m_new = torch.maximum(m, s.amax(-1))
        alpha = torch.exp(m - m_new)
        p_ = torch.exp(s - m_new[..., None])
        l = l * alpha + p_.sum(-1)
        acc = acc * alpha[..., None] + p_ @ vc.double()
        m = m_new
    return (acc / l[..., None]).reshape(B, Hq, L, D)


def test_attention_rows64_matches_the_float64_reference():
    """The chunked reference above (shared and per-batch prefix, grouped heads, several chunks)."""
    g = torch.Generator().manual_seed(0)
    for prefix_shape in [(2, 3, 8), (2, 2, 3, 8)]:
        q = torch.randn(2, 4, 3, 8, generator=g, dtype=torch.float64)
        k, v = (torch.randn(2, 2, 37, 8, generator=g, dtype=torch.float64) for _ in range(2))
        pk, pv = (torch.randn(prefix_shape, generator=g, dtype=torch.float64) for _ in range(2))
        ref = pet_fast.prefix_attention(q, k, v, pk, pv, backend="eager")
        assert rel_err(attention_rows64(q, k, v, pk, pv, chunk=8), ref) < 1e-12


def check_big(op, backend, numel, device, dtype=torch.float16, tail=4096):
    """Forward on a tensor of >= numel elements (drawn on ``device`` directly); the last rows, past
    the 2**31 boundary, must equal the eager op run on those rows alone (for attention, a float64
    reference of the rows that see every key)."""
    p = _big_case(op, numel, device, dtype)
    g = torch.Generator(device=device).manual_seed(0)
    rand = lambda shape, scale=1.0: torch.randn(tuple(shape), generator=g, device=device, dtype=dtype) * scale
    b = _cases.build(op, p, dtype=dtype, device=device, rand=rand)
    args = b.views({k: v.detach() for k, v in b.leaves.items()})
    assert max(t.numel() for t in args.values()) >= numel
    with torch.no_grad():
        out = b.call(args, backend)
        if op == "prefix_attention":
            # the keys are the big tensor: the last query rows without the causal mask see every key, and
            # so does the last row of the causal call (bottom-right alignment)
            assert torch.isfinite(out).all()
            q2 = args["q"][..., -2:, :].contiguous()
            ref = attention_rows64(q2, args["k"], args["v"], args["prefix_k"], args["prefix_v"])
            got = pet_fast.prefix_attention(q2, args["k"], args["v"], args["prefix_k"], args["prefix_v"],
                                            causal=False, backend=backend)
            assert rel_err(out[..., -1:, :], ref[..., -1:, :]) < 2e-2
        else:
            small = {k: (v[-tail:] if k in ("x", "query", "values", "residual") else v) for k, v in args.items()}
            ref = b.call(small, "eager")
            got = out[-tail:]
    assert torch.isfinite(got).all()
    assert rel_err(got, ref) < 2e-2


def test_big_case_logic_on_small_cpu_sizes():
    """The >2**31 check below, run here on a small size so its own logic is tested."""
    for op in OPS:
        check_big(op, "eager", 5000, "cpu", dtype=torch.float32, tail=64)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["auto", "triton", "cuda"])
@pytest.mark.parametrize("op", OPS)
def test_past_2_31_elements(op, backend):
    if backend != "auto" and backend not in dispatch._REGISTRY[op].impls:
        pytest.skip(f"{op} has no {backend} backend")
    free, _ = torch.cuda.mem_get_info()
    if free < 40 * 2 ** 30:
        pytest.skip("needs about 40 GiB of free GPU memory")
    try:
        check_big(op, backend, 2 ** 31 + 2 ** 20, "cuda")
    except pet_fast.BackendUnavailableError as exc:
        if backend == "auto":
            raise
        pytest.skip(f"outside the {backend} backend's contract: {exc}")  # e.g. the cuda serving kernels
    finally:
        torch.cuda.empty_cache()
