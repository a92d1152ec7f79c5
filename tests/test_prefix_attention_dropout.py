"""Attention dropout in prefix_attention: the Triton kernels draw it themselves (Philox under a seed from
torch's generator, drawn again in the backward), the eager backend passes it to SDPA.

The kernels' draws are made visible by ``kernels.dropout_keep``; the float64 reference applied with that
mask is the definition every output and gradient is checked against. The op draws its seed from torch's
generator and from nothing else, so ``torch.manual_seed`` before a call reproduces the seed it used.
"""
import importlib

import pytest
import torch

import pet_fast
from pet_fast import dispatch
from conftest import rel_err
from test_kernels_prefix_attention import NAMES, assert_gpu_precision_rule, make, padding_mask

op = importlib.import_module("pet_fast.ops.prefix_attention")
kernels = pytest.importorskip("pet_fast.kernels.prefix_attention")


def _key_columns(tensors) -> int:
    k, pk = tensors[1], tensors[3]
    return k.shape[2] + (0 if pk is None else pk.shape[-2])


def run_dropout(backend, tensors, kpm, causal, grad_out, p, torch_seed):
    """Output and gradients of the op with dropout ``p`` after ``torch.manual_seed(torch_seed)``, and the
    keep mask its kernels drew (the seed the op took, drawn again the same way)."""
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in tensors]
    torch.manual_seed(torch_seed)
    out = pet_fast.prefix_attention(*leaves, key_padding_mask=kpm, causal=causal, dropout_p=p, backend=backend)
    present = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad(out, present, grad_out.to(out.dtype)))
    torch.manual_seed(torch_seed)
    seed = op.dropout_seed(tensors[0].device)
    keep = kernels.dropout_keep(seed, (*tensors[0].shape[:3], _key_columns(tensors)), p)
    return out.detach(), [None if t is None else next(grads) for t in leaves], keep


def reference(tensors, kpm, causal, grad_out, p, keep, dtype=torch.float64):
    leaves = [None if t is None else t.detach().to(dtype).requires_grad_() for t in tensors]
    out = op.reference(*leaves, key_padding_mask=kpm, causal=causal, dropout_p=p, dropout_keep=keep)
    present = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad(out, present, grad_out.to(dtype)))
    return out.detach(), [None if t is None else next(grads) for t in leaves]


CASES = [
    # B, Hq, Hkv, L, S, D, P, prefix, padding, causal
    (2, 2, 2, 19, 21, 16, 5, "shared", None, False),
    (2, 4, 2, 17, 35, 8, 3, "per_batch", "right", True),   # GQA, S > L, bottom-right causal
    (3, 2, 1, 21, 9, 16, 18, "shared", "left", True),      # L > S; the last sequence all padding
    (3, 2, 2, 5, 17, 24, None, None, "left", False),       # no prefix; D = 24 padded to 32
]


@pytest.mark.parametrize("B,Hq,Hkv,L,S,D,P,prefix,pad,causal", CASES)
def test_float32_output_and_every_gradient_with_the_kernels_draws(B, Hq, Hkv, L, S, D, P, prefix, pad, causal):
    tensors = make(B, Hq, Hkv, L, S, D, P, prefix)
    kpm = padding_mask(B, S, pad)
    gy = torch.randn(B, Hq, L, D)
    p = 0.3
    out, grads, keep = run_dropout("triton", tensors, kpm, causal, gy, p, torch_seed=7)
    assert 0.6 < keep.float().mean().item() < 0.8
    ref_out, ref_grads = reference(tensors, kpm, causal, gy, p, keep)
    for name, a, b in zip(NAMES, [out] + grads, [ref_out] + ref_grads):
        assert (a is None) == (b is None), name
        if a is None:
            continue
        assert a.dtype == torch.float32 and torch.isfinite(a).all(), name
        assert rel_err(a, b) < 2e-6, (name, rel_err(a, b))
    # the dropout did something: the undropped output is far from it
    nodrop = op.reference(*tensors, key_padding_mask=kpm, causal=causal)
    assert rel_err(out, nodrop) > 0.05


def test_float16_follows_the_precision_rule():
    B, Hq, Hkv, L, S, D, P = 2, 4, 2, 17, 19, 16, 5
    tensors = make(B, Hq, Hkv, L, S, D, P, "shared", dtype=torch.float16)
    kpm = padding_mask(B, S, "right")
    gy = torch.randn(B, Hq, L, D)
    p = 0.2
    out, grads, keep = run_dropout("triton", tensors, kpm, True, gy, p, torch_seed=3)
    eager_out, eager_grads = reference(tensors, kpm, True, gy, p, keep, dtype=torch.float16)
    ref_out, ref_grads = reference(tensors, kpm, True, gy, p, keep)
    for name, a, e, r in zip(NAMES, [out] + grads, [eager_out] + eager_grads, [ref_out] + ref_grads):
        assert a.dtype == torch.float16, name
        err = (a.double() - r).abs().max().item()
        eager_err = (e.double() - r).abs().max().item()
        assert err <= 2 * eager_err + 1e-3 * max(1.0, r.abs().max().item()), (name, err, eager_err)


def test_forced_tiles_draw_the_same_weights():
    """The draws depend on the weight's (batch, head, row, column), not on the tile that visits it: forward
    and backward with other tiles give the same result up to rounding."""
    tensors = make(2, 2, 1, 23, 29, 8, 6, "shared")
    kpm = padding_mask(2, 29, "left")
    gy = torch.randn(2, 2, 23, 8)
    seed = op.dropout_seed("cpu")
    results = []
    for tile in (dict(block_m=16, block_n=16), dict(block_m=32, block_n=16), dict(block_m=16, block_n=32)):
        out, lse = kernels.forward(*tensors, kpm, True, None, dropout_p=0.4, seed=seed, **tile)
        grads = kernels.backward(gy, *tensors, kpm, out, lse, True, None, dropout_p=0.4, seed=seed, **tile)
        results.append([out] + [g for g in grads])
    for other in results[1:]:
        for name, a, b in zip(NAMES, results[0], other):
            assert rel_err(a, b) < 1e-6, name


def test_draws_are_bernoulli_and_independent():
    """Keep rate 1 - p within 5 sigma overall and per key column, per row and per stream (batch, head); two
    seeds, and neighbouring rows, columns and heads, agree as often as independent draws do; p = 0.5 and
    p = 0.05 alike."""
    shape = (4, 3, 40, 70)  # 33600 draws
    for p in (0.5, 0.05):
        keep = kernels.dropout_keep(op.dropout_seed("cpu"), shape, p).double()
        n = keep.numel()
        sigma = (p * (1 - p) / n) ** 0.5
        assert abs(keep.mean().item() - (1 - p)) < 5 * sigma, p
        for dims in ((0, 1, 2), (0, 1, 3), (2, 3)):  # per column, per row, per stream
            rates = keep.mean(dim=dims)
            per = n // rates.numel()
            assert (rates - (1 - p)).abs().max().item() < 5 * (p * (1 - p) / per) ** 0.5 + 1e-12, (p, dims)
        pair = lambda both, count: abs(both - (1 - p) ** 2) < 5 * ((1 - p) ** 2 * (1 - (1 - p) ** 2) / count) ** 0.5
        other = kernels.dropout_keep(op.dropout_seed("cpu"), shape, p).double()
        assert pair((keep * other).mean().item(), n), p
        # neighbours: rows of one Philox call (4 consecutive rows), next columns, next heads
        for a, b in ((keep[:, :, :-1], keep[:, :, 1:]), (keep[..., :-1], keep[..., 1:]),
                     (keep[:, :-1], keep[:, 1:])):
            assert pair((a * b).mean().item(), a.numel()), p


def test_expectation_is_the_undropped_attention():
    """Averaged over the kernels' draws (one per query row, every row the same query), the reference with
    the dropout mask and its 1 / (1 - p) scaling is the attention without dropout."""
    n = 2048
    q, k, v, pk, pv = make(1, 1, 1, 1, 6, 8, 3, "shared", dtype=torch.float64)
    q = q.expand(-1, -1, n, -1)
    p = 0.3
    keep = kernels.dropout_keep(op.dropout_seed("cpu"), (1, 1, n, 9), p)
    dropped = op.reference(q, k, v, pk, pv, dropout_p=p, dropout_keep=keep)[0, 0]
    mean, spread = dropped.mean(0), dropped.std(0) / n ** 0.5
    want = op.reference(q[:, :, :1], k, v, pk, pv)[0, 0, 0]
    assert ((mean - want).abs() <= 5 * spread + 1e-9).all()


def test_same_torch_seed_same_result_and_p_zero_is_no_dropout():
    tensors = make(2, 2, 2, 9, 11, 8, 4, "shared")
    kpm = padding_mask(2, 11, "right")
    outs = []
    for s in (5, 5, 6):
        torch.manual_seed(s)
        outs.append(pet_fast.prefix_attention(*tensors, key_padding_mask=kpm, dropout_p=0.5, backend="triton"))
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])
    plain = pet_fast.prefix_attention(*tensors, key_padding_mask=kpm, backend="triton")
    assert torch.equal(pet_fast.prefix_attention(*tensors, key_padding_mask=kpm, dropout_p=0.0, backend="triton"),
                       plain)


def test_eager_backend_is_sdpa_dropout():
    """The eager backend's dropout is SDPA's: random, finite, nothing without it; its mean over the batch
    of one repeated sequence is the undropped attention."""
    B = 1200
    q, k, v, pk, pv = make(1, 2, 2, 3, 5, 8, 2, "shared", dtype=torch.float64)
    q, k, v = (t.expand(B, -1, -1, -1).contiguous() for t in (q, k, v))
    out = pet_fast.prefix_attention(q, k, v, pk, pv, dropout_p=0.25, backend="eager")
    assert torch.isfinite(out).all() and not torch.allclose(out[0], out[1])
    want = op.reference(q[:1], k[:1], v[:1], pk, pv)[0]
    assert ((out.mean(0) - want).abs() <= 5 * out.std(0) / B ** 0.5 + 1e-9).all()


def test_dropout_calls_take_the_own_kernels_and_not_the_decode_kernel(monkeypatch):
    """With dropout, calls that need a gradient skip the merged path (torch's flash kernel draws its own
    mask, which the prefix part could not share); the CUDA decode kernel has no dropout."""
    seen = []
    real_own = op._own
    monkeypatch.setattr(op, "_own", lambda *a: seen.append(a[-1]) or real_own(*a))
    monkeypatch.setattr(op.MERGED_FORWARD, "impl", lambda *a: pytest.fail("the merged path took a dropout call"))
    q, k, v, pk, pv = make(1, 2, 2, 5, 6, 8, 2, "shared")
    pet_fast.prefix_attention(q.requires_grad_(), k, v, pk, pv, dropout_p=0.1, backend="triton").sum().backward()
    assert seen == [0.1] and q.grad is not None
    info = op.describe(q, k, pk, None, False, v, pv, dropout_p=0.1)
    assert any("dropout" in why for why in op.decode_shape_reasons(info))
    with torch.no_grad():
        with pytest.raises(dispatch.BackendUnavailableError, match="dropout"):
            pet_fast.prefix_attention(q, k, v, pk, pv, dropout_p=0.1, backend="cuda")


@pytest.mark.parametrize("bad,exc,match", [
    (1.0, ValueError, r"dropout_p must be in \[0, 1\), got 1.0"),
    (-0.1, ValueError, r"dropout_p must be in \[0, 1\)"),
    (float("nan"), ValueError, "dropout_p must not be NaN"),
    ("0.1", TypeError, "dropout_p must be a real number"),
])
def test_bad_dropout_p_is_refused(bad, exc, match):
    q, k, v, pk, pv = make(1, 2, 2, 3, 4, 8, 2, "shared")
    with pytest.raises(exc, match=match):
        pet_fast.prefix_attention(q, k, v, pk, pv, dropout_p=bad)


def test_kernels_refuse_dropout_without_a_seed():
    q, k, v, pk, pv = make(1, 2, 2, 3, 4, 8, 2, "shared")
    with pytest.raises(ValueError, match="seed"):
        kernels.forward(q, k, v, pk, pv, None, False, None, dropout_p=0.1)


def test_compiled_call_with_dropout_has_no_graph_break():
    """torch.compile(fullgraph=True) of a call with dropout (the seed drawn inside the graph): the same
    draws as the eager call under the same torch seed (Inductor takes torch's own generator here)."""
    from torch._inductor import config as inductor_config

    tensors = make(2, 2, 1, 7, 9, 8, 3, "shared")
    kpm = padding_mask(2, 9, "left")

    def f(q, k, v, pk, pv):
        return pet_fast.prefix_attention(q, k, v, pk, pv, key_padding_mask=kpm, causal=True, dropout_p=0.3,
                                         backend="triton")

    torch.manual_seed(11)
    eager = f(*tensors)
    with inductor_config.patch(fallback_random=True):
        compiled = torch.compile(f, fullgraph=True)
        torch.manual_seed(11)
        got = compiled(*tensors)
    assert torch.equal(got, eager)


def test_activation_checkpointing_recomputes_the_same_draws():
    """torch.utils.checkpoint restores torch's generator before it recomputes the forward, so the op's seed,
    and with it every draw, is the same: the gradients equal those of the call without checkpointing."""
    from torch.utils.checkpoint import checkpoint

    tensors = make(2, 2, 1, 9, 11, 8, 3, "shared")
    kpm = padding_mask(2, 11, "right")
    gy = torch.randn(2, 2, 9, 8)

    def f(q, k, v, pk, pv):
        return pet_fast.prefix_attention(q, k, v, pk, pv, key_padding_mask=kpm, causal=True, dropout_p=0.4,
                                         backend="triton")

    results = []
    for wrap in (False, True):
        leaves = [t.detach().clone().requires_grad_() for t in tensors]
        torch.manual_seed(21)
        out = checkpoint(f, *leaves, use_reentrant=False) if wrap else f(*leaves)
        torch.manual_seed(99)  # the generator moves on before the backward recomputes
        results.append([out.detach()] + list(torch.autograd.grad(out, leaves, gy)))
    for name, a, b in zip(NAMES, *results):
        assert torch.equal(a, b), name


# ---------------------------------------------------------------------------------------------------
# GPU: real Triton (TRITON_INTERPRET=0 in benchmarks/gpu_check.sh).

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,Hq,Hkv,L,S,D,P,prefix,pad,causal", [
    (2, 4, 4, 129, 200, 32, 20, "shared", "right", False),
    (2, 8, 2, 257, 257, 64, 30, "per_batch", "left", True),
    (2, 4, 2, 77, 129, 128, 17, None, "right", True),
])
def test_gpu_dropout_follows_the_precision_rule(dtype, B, Hq, Hkv, L, S, D, P, prefix, pad, causal):
    tensors = make(B, Hq, Hkv, L, S, D, P, prefix, dtype=dtype, device="cuda")
    kpm = padding_mask(B, S, pad, "cuda")
    gy = torch.randn(B, Hq, L, D, device="cuda")
    p = 0.1
    out, grads, keep = run_dropout("triton", tensors, kpm, causal, gy, p, torch_seed=1)
    assert abs(keep.float().mean().item() - (1 - p)) < 0.01
    ref_out, ref_grads = reference(tensors, kpm, causal, gy, p, keep)
    eager = None
    if dtype != torch.float32:
        eager_out, eager_grads = reference(tensors, kpm, causal, gy, p, keep, dtype=dtype)
        eager = [eager_out] + eager_grads
    assert_gpu_precision_rule([out] + grads, [ref_out] + ref_grads, eager)


@pytest.mark.gpu
def test_gpu_dropout_draws_anew_in_each_cuda_graph_replay():
    """The seed is a device tensor drawn by torch's CUDA generator: a captured forward draws a new mask on
    each replay (a seed passed as a host integer would be frozen into the graph)."""
    q, k, v, pk, pv = make(2, 4, 4, 64, 80, 64, 10, "shared", dtype=torch.bfloat16, device="cuda")
    f = lambda: pet_fast.prefix_attention(q, k, v, pk, pv, dropout_p=0.2, backend="triton")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        f()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = f()
    graph.replay()
    first = out.clone()
    graph.replay()
    assert torch.isfinite(out).all() and not torch.equal(first, out)
