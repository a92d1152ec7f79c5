"""Property tests: every backend that can run here computes the float64 reference's function, outputs
and gradients, on random valid inputs (shapes including empty ones, leading batch dimensions,
non-contiguous layouts, dtypes, activations, thresholds, paddings, causal flags, GQA ratios, prefix
lengths, shared and per-batch prefixes), or refuses the call with BackendUnavailableError when its
``reasons`` say so.

Backends are discovered from the dispatch registry, so kernels registered later are tested without
a change here (Triton on CPU tensors under TRITON_INTERPRET=1; Triton and CUDA on a GPU in the tests
marked gpu).

Profiles (hypothesis settings, derandomized, no example database, so CI is reproducible):
    ci   (default)  a few hundred cases per op for eager, fewer and tiny ones for interpreted kernels
    gpu             more and larger cases; select with PET_FAST_HYPOTHESIS_PROFILE=gpu
The cases run per op and backend are counted; ``test_case_counts`` (last in the file) prints them and
checks that every property test that ran really tried its share.
"""
from __future__ import annotations

import collections
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pet_fast import dispatch
from pet_fast.ops.activations import ACTIVATIONS, ALIASES

import _cases
from _cases import LAYOUTS, OPS

f64, f32, f16, bf16 = torch.float64, torch.float32, torch.float16, torch.bfloat16

_COMMON = dict(derandomize=True, database=None, deadline=None, print_blob=True,
               suppress_health_check=list(HealthCheck))
settings.register_profile("ci", max_examples=300, **_COMMON)
settings.register_profile("gpu", max_examples=400, **_COMMON)
PROFILE = os.environ.get("PET_FAST_HYPOTHESIS_PROFILE", "ci")
if PROFILE not in ("ci", "gpu"):
    raise ValueError(f"PET_FAST_HYPOTHESIS_PROFILE must be 'ci' or 'gpu', got {PROFILE!r}")

# Examples and size limits per profile and kind of backend ("eager", "interp": a kernel interpreted
# on the CPU, "device": a kernel on a GPU). Kernels must see sizes past their block sizes on the GPU.
BUDGET = {
    "ci": {"eager": dict(n=300, lead=4, d=12, r=6, seq=7, head=9, prefix=4, k=4),
           "interp": dict(n=15, lead=3, d=20, r=6, seq=5, head=16, prefix=3, k=3),
           "device": dict(n=60, lead=40, d=160, r=40, seq=70, head=64, prefix=20, k=5),
           "device_eager": dict(n=20, lead=40, d=160, r=40, seq=70, head=64, prefix=20, k=5)},
    "gpu": {"eager": dict(n=1000, lead=6, d=40, r=12, seq=12, head=24, prefix=6, k=6),
            "interp": dict(n=40, lead=4, d=40, r=12, seq=9, head=32, prefix=5, k=4),
            "device": dict(n=150, lead=160, d=520, r=96, seq=160, head=128, prefix=40, k=8),
            "device_eager": dict(n=40, lead=160, d=520, r=96, seq=160, head=128, prefix=40, k=8)},
}

COUNTS: collections.Counter = collections.Counter()  # (op, backend, device, "ran" | "refused")
STARTED: set = set()

# ----- strategies -------------------------------------------------------------------------------------
ACT_NAMES = list(ACTIVATIONS) + sorted(ALIASES)


def lead_dims(data, cap):
    n = data.draw(st.integers(0, 3), label="number of leading dims")
    return [data.draw(st.integers(0, cap), label=f"lead[{i}]") for i in range(n)]


def layouts(data, names):
    return {n: data.draw(st.sampled_from(LAYOUTS), label=f"layout {n}") for n in names}


def draw_adapter(data, c):
    p = dict(lead=lead_dims(data, c["lead"]), d=data.draw(st.integers(1, c["d"]), label="d"),
             r=data.draw(st.integers(1, c["r"]), label="r"), act=data.draw(st.sampled_from(ACT_NAMES), label="act"),
             b_down=data.draw(st.booleans()), b_up=data.draw(st.booleans()), residual=data.draw(st.booleans()),
             scaling=data.draw(st.one_of(st.sampled_from(["scalar", "channel"]),
                                         st.floats(-4, 4, allow_nan=False, width=32)), label="scaling"),
             master=data.draw(st.booleans(), label="float32 master weights (half-precision x)"))
    p["layouts"] = layouts(data, ["x", "w_down", "w_up", "residual", "b_down", "b_up"])
    return p


def draw_masked(data, c):
    p = {"lead": lead_dims(data, c["lead"]), "in": data.draw(st.integers(1, c["d"]), label="in"),
         "out": data.draw(st.integers(1, c["d"]), label="out"), "bias": data.draw(st.booleans(), label="bias"),
         "threshold": data.draw(st.one_of(st.floats(-2.5, 2.5, allow_nan=False, width=32),
                                          st.sampled_from([float("-inf"), float("inf"), -1e30, 1e30, 0.0])),
                                label="threshold"),
         "scores_dtype": data.draw(st.sampled_from(["float32", "same", "float64"]), label="scores dtype"),
         "train_weight": data.draw(st.booleans(), label="train weight")}
    p["layouts"] = layouts(data, ["x", "weight", "scores", "bias"])
    return p


def draw_attention(data, c):
    p = dict(B=data.draw(st.integers(0, 2), label="B"), Hkv=data.draw(st.integers(1, 2), label="Hkv"),
             group=data.draw(st.integers(1, 3), label="GQA group"), L=data.draw(st.integers(0, c["seq"]), label="L"),
             S=data.draw(st.integers(0, c["seq"]), label="S"), D=data.draw(st.integers(1, c["head"]), label="D"),
             P=data.draw(st.integers(0, c["prefix"]), label="P"),
             prefix=data.draw(st.sampled_from([None, "shared", "per_batch", "expanded"]), label="prefix"),
             pad=data.draw(st.sampled_from([None, "left", "right", "random"]), label="padding"),
             causal=data.draw(st.booleans(), label="causal"),
             scale=data.draw(st.one_of(st.none(), st.floats(0.0625, 2.0, width=32)), label="scale"))
    p["layouts"] = {n: data.draw(st.sampled_from(LAYOUTS + ("heads_last",)), label=f"layout {n}")
                    for n in ("q", "k", "v", "prefix_k", "prefix_v")}
    return p


def draw_projections(data, p):
    for name in ("query", "key", "value"):
        p[name] = data.draw(st.booleans(), label=name)
        p[f"b_{name}"] = data.draw(st.booleans(), label=f"b_{name}")
    p.update(temperature=data.draw(st.floats(0.25, 4.0, width=32), label="temperature"),
             residual_before=data.draw(st.booleans(), label="residual_before"),
             value_before_softmax=data.draw(st.booleans(), label="value_before_softmax"))
    return p


def draw_fusion(data, c):
    p = dict(lead=lead_dims(data, c["lead"]), k=data.draw(st.integers(1, c["k"]), label="k"),
             d=data.draw(st.integers(1, c["d"]), label="d"))
    draw_projections(data, p)
    p["layouts"] = layouts(data, ["query", "values", "residual", "w_query", "w_key", "w_value"])
    return p


def draw_stacked(data, c):
    p = dict(lead=lead_dims(data, c["lead"]), k=data.draw(st.integers(1, c["k"]), label="k"),
             r=data.draw(st.integers(1, c["r"]), label="r"), d=data.draw(st.integers(1, c["d"]), label="d"),
             act=data.draw(st.sampled_from(ACT_NAMES), label="act"), b_down=data.draw(st.booleans()),
             b_up=data.draw(st.booleans()),
             scaling=data.draw(st.one_of(st.sampled_from(["per_adapter", "scalar"]),
                                         st.floats(-3, 3, allow_nan=False, width=32)), label="scaling"))
    draw_projections(data, p)
    if p["query"] and p["key"]:
        p["fold"] = data.draw(st.booleans(), label="fold (w_query_key)")
    p["score_mask"] = data.draw(st.booleans(), label="score_mask")
    p["score_shift"] = data.draw(st.booleans(), label="score_shift")
    p["layouts"] = layouts(data, ["x", "query", "residual", "w_down", "w_up", "b_down", "w_query", "w_query_key",
                                  "b_query_key"])
    return p


DRAW = {"bottleneck_adapter": draw_adapter, "masked_linear": draw_masked, "prefix_attention": draw_attention,
        "adapter_fusion": draw_fusion, "stacked_adapter_fusion": draw_stacked}


# ----- tolerances ---------------------------------------------------------------------------------------
def assert_close(what, got, ref, dtype, eager_lowp=None, floor=0.0):
    """|got - ref|.max() against the float64 reference, normalised by max|ref|, with an absolute part
    relative to ``floor`` (the largest reference value of the case: a gradient that is zero by
    symmetry, e.g. a key bias under a shift-invariant softmax, is computed as a sum of terms of that
    size, so its rounding error is relative to them, not to zero).
    fp64: 1e-10; fp32: 1e-4 (DESIGN.md §5); fp16/bf16: at most 2x eager PyTorch's error in the same
    dtype plus a small atol."""
    assert tuple(got.shape) == tuple(ref.shape), f"{what}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    got64 = got.detach().cpu().double()
    ref = ref.detach()
    assert torch.isfinite(got64).all(), f"{what}: non-finite values for finite inputs"
    if ref.numel() == 0:
        return
    scale = ref.abs().max().item()
    err = (got64 - ref).abs().max().item()
    if dtype == f64:
        tol = 1e-10 * scale + 1e-12 * floor
    elif dtype == f32:
        tol = 1e-4 * scale + 1e-5 * floor
    else:
        eager_err = (eager_lowp.detach().cpu().double() - ref).abs().max().item()
        tol = 2 * eager_err + (1e-2 if dtype == bf16 else 2e-3) * max(scale, 0.1 * floor)
    assert err <= tol, f"{what}: max error {err:.3g} > {tol:.3g} (max|ref| {scale:.3g}, case scale {floor:.3g})"


def _max_abs(t):
    return t.detach().abs().max().item() if t.numel() else 0.0


PRECISION_RANK = {f64: 0, f32: 1, f16: 2, bf16: 3}


def check_case(op, backend, p, dtype, device, seed):
    b = _cases.BUILDERS[op](p, dtype, torch.device(device), seed)
    args = b.views(_cases.fresh(b.leaves))
    why = dispatch._REGISTRY[op].impls[backend].reasons(b.describe(args))
    if why:
        with pytest.raises(dispatch.BackendUnavailableError):
            b.call(args, backend)
        COUNTS[(op, backend, device, "refused")] += 1
        return
    leaves = _cases.fresh(b.leaves)
    out = b.call(b.views(leaves), backend)
    assert out.dtype == dtype
    gy = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=f64).to(dtype).to(device)
    diff = [k for k, v in leaves.items() if v.requires_grad]
    if out.requires_grad:
        gs = torch.autograd.grad(out, [leaves[k] for k in diff], gy, allow_unused=True)
    else:
        gs = [None] * len(diff)
    grads = {k: torch.zeros_like(leaves[k]) if g is None else g for k, g in zip(diff, gs)}
    ref, ref_grads = _cases.run_ref(b, gy)
    low = dtype in (f16, bf16)
    # the precision rule's baseline: the op's eager definition run in the same low precision
    eager_out, eager_grads = _cases.run(b, _cases.REFERENCE, gy=gy) if low else (None, {})
    floor = max([_max_abs(ref)] + [_max_abs(g) for g in ref_grads.values()])
    assert_close(f"{op}[{backend}] output", out, ref, dtype, eager_out, floor)
    for name, g in grads.items():
        want_dtype = b.leaves[name].dtype
        assert g.dtype == want_dtype, f"gradient of {name} has dtype {g.dtype}, expected {want_dtype}"
        # the tolerance of the less precise of the op's dtype and the gradient's (masked_linear's scores
        # gradient is computed in x's dtype and stored in the scores' dtype)
        tol_dtype = max((dtype, g.dtype), key=lambda dt: PRECISION_RANK[dt])
        assert_close(f"{op}[{backend}] grad {name}", g, ref_grads[name], tol_dtype, eager_grads.get(name), floor)
    COUNTS[(op, backend, device, "ran")] += 1


def run_property(op, backend, device, kind):
    budget = BUDGET[PROFILE][kind]
    on_cpu = torch.device(device).type == "cpu"
    wanted = (f64, f32) if backend == "eager" else ((f32, f16) if on_cpu else (f32, f16, bf16))
    dtypes = [dt for dt in _cases.runnable(op, device).get(backend, ()) if dt in wanted]
    if not dtypes:
        pytest.skip(f"{backend} takes none of {wanted} for {op} on {device}")
    STARTED.add((op, backend, device, budget["n"]))

    @settings(settings.get_profile(PROFILE), max_examples=budget["n"])
    @given(data=st.data())
    def prop(data):
        p = DRAW[op](data, budget)
        dtype = data.draw(st.sampled_from(dtypes), label="dtype")
        seed = data.draw(st.integers(0, 2 ** 16), label="seed")
        check_case(op, backend, p, dtype, device, seed)

    prop()


def _cpu_backends():
    out = []
    for op in OPS:
        for backend in _cases.runnable(op, "cpu"):
            out.append(pytest.param(op, backend, id=f"{op}-{backend}",
                                    marks=[pytest.mark.interpreter] if backend != "eager" else []))
    return out


@pytest.mark.parametrize("op,backend", _cpu_backends())
def test_property_cpu(op, backend):
    run_property(op, backend, "cpu", "eager" if backend == "eager" else "interp")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["eager", "triton", "cuda"])
@pytest.mark.parametrize("op", OPS)
def test_property_gpu(op, backend):
    if backend not in dispatch._REGISTRY[op].impls:
        pytest.skip(f"{op} has no {backend} backend")
    run_property(op, backend, "cuda", "device_eager" if backend == "eager" else "device")


# ----- counts -------------------------------------------------------------------------------------------
def test_case_counts(capsys):
    check_counts(capsys)


@pytest.mark.gpu
def test_case_counts_gpu(capsys):
    check_counts(capsys)


def check_counts(capsys):
    """Last in the file: every property test that ran tried its share of cases (so a strategy that
    rejects everything cannot pass silently). Prints the counts; PET_FAST_PROPERTY_COUNTS=path writes them."""
    lines = []
    for op, backend, device, n in sorted(STARTED):
        ran, refused = COUNTS[(op, backend, device, "ran")], COUNTS[(op, backend, device, "refused")]
        lines.append(f"{op:24s} {backend:7s} {device:5s} ran {ran:5d} refused {refused:5d} (profile {PROFILE})")
        assert ran + refused >= min(n, 10), f"{op}/{backend}/{device}: only {ran + refused} cases tried"
        if backend == "eager":
            assert ran >= n * 0.9, f"{op}/eager refused cases: {refused}"
    with capsys.disabled():
        print("\nproperty cases:\n  " + "\n  ".join(lines))
    path = os.environ.get("PET_FAST_PROPERTY_COUNTS")
    if path:
        with open(path, "a") as fh:
            fh.write("\n".join(lines) + "\n")
    if not STARTED:
        pytest.skip("no property test ran in this session")
