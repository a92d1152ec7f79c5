"""The fused prefix attention (Triton kernels behind torch.library custom ops, and the CUDA decode
kernel) against the float64 reference: outputs and every gradient, the prefix's included.

On the CPU the Triton kernels run under TRITON_INTERPRET=1 with 16x16 blocks, so the odd sizes below
cross block boundaries; shapes are tiny because the interpreter is slow. GPU tests are marked gpu.
"""
import importlib
import os

import pytest
import torch

import pet_fast
from pet_fast import dispatch
from conftest import rel_err

op = importlib.import_module("pet_fast.ops.prefix_attention")  # the package re-exports the function
kernels = pytest.importorskip("pet_fast.kernels.prefix_attention")


def padding_mask(B, S, side, device="cpu"):
    """Left or right padding with a different length per sequence (the last one may be all padding)."""
    if side is None:
        return None
    lengths = torch.tensor([S - (b * S) // max(B - 1, 1) // 2 for b in range(B)])
    if B > 2:
        lengths[-1] = 0
    pos = torch.arange(S)[None, :]
    m = pos < lengths[:, None] if side == "right" else pos >= (S - lengths)[:, None]
    return m.to(device)


def make(B, Hq, Hkv, L, S, D, P, prefix="shared", dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(1234 + L * 7 + S)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    q, k, v = r(B, Hq, L, D), r(B, Hkv, S, D), r(B, Hkv, S, D)
    if prefix is None:
        return q, k, v, None, None
    if prefix == "shared":
        return q, k, v, r(Hkv, P, D), r(Hkv, P, D)
    if prefix == "per_batch":
        return q, k, v, r(B, Hkv, P, D), r(B, Hkv, P, D)
    if prefix == "broadcast":  # (B, Hkv, P, D) view with batch stride 0, as PrefixEncoder returns it
        return q, k, v, r(Hkv, P, D).expand(B, -1, -1, -1), r(Hkv, P, D).expand(B, -1, -1, -1)
    raise ValueError(prefix)


def run(backend, tensors, kpm, causal, grad_out, scale=None):
    """Output and gradients (None where an input is absent) of one backend, in the tensors' dtype.
    ``"reference"`` runs the op's definition, :func:`op.reference` (the eager backend is SDPA): the
    float64 reference and the low-precision baseline of the precision rule."""
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in tensors]
    if backend == "reference":
        out = op.reference(*leaves, key_padding_mask=kpm, causal=causal, scale=scale)
    else:
        out = pet_fast.prefix_attention(*leaves, key_padding_mask=kpm, causal=causal, scale=scale, backend=backend)
    present = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(out, present, grad_out.to(out.dtype), allow_unused=True)
    it = iter(grads)
    return out.detach(), [None if t is None else next(it) for t in leaves]


def reference64(tensors, kpm, causal, grad_out, scale=None):
    return run("reference", [None if t is None else t.double() for t in tensors], kpm, causal, grad_out.double(),
               scale)


NAMES = ("out", "dq", "dk", "dv", "d_prefix_k", "d_prefix_v")

CASES = [
    # B, Hq, Hkv, L, S, D, P, prefix, padding, causal
    (2, 2, 2, 19, 21, 16, 5, "shared", None, False),
    (2, 4, 2, 17, 35, 8, 3, "per_batch", "right", True),   # GQA, S > L, bottom-right causal
    (3, 2, 1, 21, 9, 16, 18, "shared", "left", True),      # L > S: early rows see only the prefix
    (1, 3, 1, 18, 5, 8, 0, "shared", None, True),          # P = 0 and L > S: early rows see nothing
    (3, 2, 2, 5, 17, 24, None, None, "left", False),       # no prefix; D = 24 padded to 32
    (2, 4, 1, 3, 0, 8, 7, "broadcast", None, True),        # S = 0, broadcast prefix view
]


@pytest.mark.parametrize("B,Hq,Hkv,L,S,D,P,prefix,pad,causal", CASES)
def test_float32_output_and_every_gradient(B, Hq, Hkv, L, S, D, P, prefix, pad, causal):
    tensors = make(B, Hq, Hkv, L, S, D, P, prefix)
    kpm = padding_mask(B, S, pad)
    gy = torch.randn(B, Hq, L, D)
    got = run("triton", tensors, kpm, causal, gy)
    ref = reference64(tensors, kpm, causal, gy)
    for name, a, b in zip(NAMES, [got[0]] + got[1], [ref[0]] + ref[1]):
        assert (a is None) == (b is None), name
        if a is None:
            continue
        assert a.shape == b.shape and a.dtype == torch.float32, name
        assert torch.isfinite(a).all(), name
        assert rel_err(a, b) < 2e-6, (name, rel_err(a, b))


@pytest.mark.parametrize("B,Hq,Hkv,L,S,D,P,prefix,pad,causal", [
    (2, 4, 2, 17, 19, 16, 5, "shared", "right", True),
    (3, 2, 2, 9, 18, 8, 3, "per_batch", "left", False),
])
def test_float16_follows_the_precision_rule(B, Hq, Hkv, L, S, D, P, prefix, pad, causal):
    tensors = make(B, Hq, Hkv, L, S, D, P, prefix, dtype=torch.float16)
    kpm = padding_mask(B, S, pad)
    gy = torch.randn(B, Hq, L, D)
    got = run("triton", tensors, kpm, causal, gy)
    eager = run("reference", tensors, kpm, causal, gy)
    ref = reference64(tensors, kpm, causal, gy)
    for name, a, e, r in zip(NAMES, [got[0]] + got[1], [eager[0]] + eager[1], [ref[0]] + ref[1]):
        assert a.dtype == torch.float16, name
        err = (a.double() - r).abs().max().item()
        eager_err = (e.double() - r).abs().max().item()
        assert err <= 2 * eager_err + 1e-3 * max(1.0, r.abs().max().item()), (name, err, eager_err)


def test_fully_masked_rows_are_zero_and_pass_no_gradient():
    B, Hq, L, S, D = 2, 2, 5, 6, 8
    q, k, v, _, _ = make(B, Hq, Hq, L, S, D, None, None)
    kpm = torch.ones(B, S, dtype=torch.bool)
    kpm[0] = False
    gy = torch.randn(B, Hq, L, D)
    out, (dq, dk, dv, _, _) = run("triton", (q, k, v, None, None), kpm, True, gy)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert torch.equal(dq[0], torch.zeros_like(dq[0]))
    assert torch.equal(dk[0], torch.zeros_like(dk[0])) and torch.equal(dv[0], torch.zeros_like(dv[0]))
    # causal with L > S and no prefix: the first L - S rows see nothing
    q, k, v, _, _ = make(1, 2, 2, 7, 3, D, None, None)
    out, (dq, _, _, _, _) = run("triton", (q, k, v, None, None), None, True, torch.randn(1, 2, 7, D))
    assert torch.equal(out[:, :, :4], torch.zeros_like(out[:, :, :4]))
    assert torch.equal(dq[:, :, :4], torch.zeros_like(dq[:, :, :4]))
    assert out[:, :, 4:].abs().sum() > 0 and torch.isfinite(dq).all()


def _check_fp32(tensors, kpm, causal, gy, **tile):
    """The kernels' output and gradients (forced tile, if given) against the float64 reference."""
    out, lse = kernels.forward(*tensors, kpm, causal, None, **tile)
    grads = kernels.backward(gy, *tensors, kpm, out, lse, causal, None, **tile)
    ref = reference64(tensors, kpm, causal, gy)
    for name, a, b in zip(NAMES, [out] + list(grads), [ref[0]] + ref[1]):
        if b is not None:
            assert rel_err(a, b) < 2e-6, (name, tile, rel_err(a, b))
    return out, grads


@pytest.mark.parametrize("block_m,block_n", [(32, 16), (16, 32)])
def test_tiles_other_than_square_split_the_masked_and_unmasked_blocks_right(block_m, block_n):
    """The key loops visit whole unmasked blocks, then masked ones, from bounds that depend on both tile
    sides (the causal diagonal of a 32-row tile spans two 16-key blocks; a 32-key block spans two 16-row
    query steps): tiles that are not square, against the float64 reference, every gradient."""
    for B, Hq, Hkv, L, S, D, P, pad, causal in [(2, 2, 1, 45, 50, 16, 3, "left", True),
                                                (2, 2, 2, 70, 37, 16, 5, "right", False),
                                                (1, 2, 2, 33, 33, 16, 0, None, True)]:
        tensors = make(B, Hq, Hkv, L, S, D, P, "shared" if P else None)
        _check_fp32(tensors, padding_mask(B, S, pad), causal, torch.randn(B, Hq, L, D),
                    block_m=block_m, block_n=block_n)


def test_padding_with_holes_and_garbage_in_padded_keys():
    """A mask with masked keys between unmasked ones (not left or right padding) is exact; keys outside the
    first..last unmasked key are never read, so NaN there changes nothing, and every masked key's gradient
    is zero."""
    B, Hq, Hkv, L, S, D, P = 2, 2, 1, 21, 40, 16, 3
    tensors = make(B, Hq, Hkv, L, S, D, P)
    gy = torch.randn(B, Hq, L, D)
    holes = torch.rand(B, S, generator=torch.Generator().manual_seed(5)) > 0.4
    for causal in (False, True):
        _check_fp32(tensors, holes, causal, gy)
    kpm = padding_mask(B, S, "left") & padding_mask(B, S, "right").flip(0)  # padding on both sides of batch 1
    out, grads = _check_fp32(tensors, kpm, True, gy)
    q, k, v, pk, pv = tensors
    pad = ~kpm[:, None, :, None].expand_as(k)
    k2, v2 = k.masked_fill(pad, float("nan")), v.masked_fill(pad, float("nan"))
    out2, lse2 = kernels.forward(q, k2, v2, pk, pv, kpm, True, None)  # the reference would be NaN
    grads2 = kernels.backward(gy, q, k2, v2, pk, pv, kpm, out2, lse2, True, None)
    assert torch.equal(out2, out)
    for a, b in zip(grads2, grads):
        assert torch.equal(a, b)
    assert torch.equal(grads2[1][pad], torch.zeros_like(grads2[1][pad]))


def test_autotuner_tries_the_tiles_of_the_head_dim_class():
    """On a GPU, fp16/bf16 calls are autotuned: each kernel's pruner keeps its head-dim class's tiles (the
    fixed tile of _config first), and the forward keeps 16-row tiles for decoding only, and 128-row ones
    from 128 query rows on. Float32 and forced tiles are not autotuned."""
    for tuned, tables, backward in [(kernels._fwd_tuned, kernels._FWD_TILES, False),
                                    (kernels._dkdv_tuned, kernels._DKDV_TILES, True),
                                    (kernels._dq_tuned, kernels._DQ_TILES, True)]:
        prune = tuned.early_config_prune
        for D in (16, 64, 80, 128, 256):
            cls = kernels._tile_class(kernels._block_d(D))
            want = kernels._class_tiles(tables, backward)[cls]
            assert want[0] == kernels._config(D, backward) and len(set(want)) == len(want)
            for L in (1, 16, 100, 512):
                kept = [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
                        for c in prune(tuned.configs, {"L": L}, BLOCK_D=kernels._block_d(D))]
                assert kept and set(kept) <= set(want), (D, L)
                rows = {t[0] for t in kept}
                if backward:
                    assert set(kept) == set(want)
                elif L <= 16:
                    assert rows == {16} or 16 not in {t[0] for t in want}, (D, L, kept)
                else:
                    assert 16 not in rows and (L >= 128 or 128 not in rows), (D, L, kept)
    half = torch.float16
    assert not kernels._tuned(torch.float32, None) and not kernels._tuned(half, 32)
    assert kernels._tuned(half, None) == kernels.autotuning()  # False under the interpreter


def test_log_sum_exp_and_non_contiguous_inputs():
    B, Hq, Hkv, L, S, D, P = 2, 4, 2, 6, 9, 16, 3
    q, k, v, pk, pv = make(B, Hq, Hkv, L, S, D, P)
    q = q.transpose(1, 2).contiguous().transpose(1, 2)  # (B, L, H, D) memory, as projections give it
    assert not q.is_contiguous()
    kpm = padding_mask(B, S, "right")
    kpm[1] = False
    out, lse = kernels.forward(q, k, v, pk, pv, kpm, True, 0.3)
    kk = torch.cat([pk.expand(B, -1, -1, -1), k], 2).repeat_interleave(2, 1).double()
    scores = q.double() @ kk.transpose(-1, -2) * 0.3
    allowed = op.allowed_keys(B, L, S, P, kpm, True, "cpu")
    ref_lse = scores.masked_fill(~allowed, float("-inf")).logsumexp(-1)
    assert rel_err(lse, ref_lse) < 1e-6
    assert rel_err(out, op.reference(*(t.double() for t in (q, k, v, pk, pv)), kpm, True, 0.3)) < 2e-6
    # with a prefix no row is empty; without it, batch 1 has no key at all: +inf and zeros
    out, lse = kernels.forward(q, k, v, None, None, kpm, True, 0.3)
    assert torch.isinf(lse[1]).all() and (lse[1] > 0).all() and torch.equal(out[1], torch.zeros_like(out[1]))


def _strided(t: torch.Tensor, how: str) -> torch.Tensor:
    """The same values in another memory layout: "blhd" (the (B, L, H, D) memory of projections), "padded"
    (rows of a wider buffer, as a slice of fused projections gives), "plain" (contiguous)."""
    if how == "blhd":
        return t.transpose(1, 2).contiguous().transpose(1, 2)
    if how == "padded":
        wide = torch.zeros(*t.shape[:-1], t.shape[-1] + 5, dtype=t.dtype)
        wide[..., :t.shape[-1]] = t
        return wide[..., :t.shape[-1]]
    return t.contiguous()


@pytest.mark.parametrize("layouts", [("blhd", "blhd", "blhd", "blhd"), ("padded", "blhd", "plain", "padded"),
                                     ("plain", "plain", "plain", "blhd"), ("padded", "padded", "padded", "padded")])
def test_strided_inputs_are_read_in_place_and_outputs_come_in_projection_layout(layouts, monkeypatch):
    """q, k, v and dO in any layout with a contiguous last dim (k and v, or q and dO, with different strides
    included), GQA, padding and causal: the output and every gradient as the float64 reference's, and out,
    dq, dk, dv in (B, L, H, D) memory, the layout an attention layer transposes back with no copy. No input
    is copied when k and v share their strides and q and dO theirs (as in an attention layer)."""
    B, Hq, Hkv, L, S, D, P = 2, 4, 2, 17, 19, 16, 3
    lq, lk, lv, lg = layouts
    q, k, v, pk, pv = make(B, Hq, Hkv, L, S, D, P)
    q, k, v = _strided(q, lq), _strided(k, lk), _strided(v, lv)
    kpm = padding_mask(B, S, "left")
    gy = _strided(torch.randn(B, Hq, L, D, generator=torch.Generator().manual_seed(3)), lg)
    copies = []
    real_contiguous = torch.Tensor.contiguous
    monkeypatch.setattr(torch.Tensor, "contiguous",
                        lambda t, *a, **kw: copies.append(t.shape) or real_contiguous(t, *a, **kw))
    out, lse = kernels.forward(q, k, v, pk, pv, kpm, True, None)
    grads = kernels.backward(gy, q, k, v, pk, pv, kpm, out, lse, True, None)
    monkeypatch.setattr(torch.Tensor, "contiguous", real_contiguous)
    seq_copies = [s for s in copies if s[-2] in (L, S)]  # (the prefix and the padding mask are small)
    assert (seq_copies == []) == (k.stride() == v.stride() and q.stride() == gy.stride()), seq_copies
    for t in (out,) + tuple(grads[:3]):
        assert t.transpose(1, 2).is_contiguous()
    ref_out, ref_grads = reference64((q, k, v, pk, pv), kpm, True, gy)
    for name, a, b in zip(NAMES, (out,) + tuple(grads), [ref_out] + ref_grads):
        assert rel_err(a, b) < 2e-6, (name, rel_err(a, b))


@pytest.mark.parametrize("scale", [0.05, 1.7])
def test_a_given_scale_reaches_output_and_every_gradient(scale):
    """The kernels take the row max of the unscaled scores and scale it (one multiplication per score
    fewer): other scales than D ** -0.5, a flat and a sharp softmax, with masked keys."""
    tensors = make(2, 4, 2, 17, 19, 16, 5)
    kpm = padding_mask(2, 19, "left")
    gy = torch.randn(2, 4, 17, 16)
    got = run("triton", tensors, kpm, True, gy, scale)
    ref = reference64(tensors, kpm, True, gy, scale)
    for name, a, b in zip(NAMES, [got[0]] + got[1], [ref[0]] + ref[1]):
        assert rel_err(a, b) < 2e-6, (name, rel_err(a, b))


@pytest.mark.parametrize("scale", [0.0, -0.4])
def test_a_scale_that_is_not_positive_runs_on_the_eager_backend_only(scale):
    """Taking the max before scaling holds for a scale > 0: the kernels refuse others with the reason, the
    op's eager backend (SDPA) takes any real scale, padding and causal masks included."""
    tensors = make(2, 4, 2, 9, 11, 8, 3)
    q, k, v, pk, pv = tensors
    kpm = padding_mask(2, 11, "right")
    info = op.describe(q, k, pk, kpm, True, v, pv, scale=scale)
    assert any(r.startswith("scale <= 0") for r in op.triton_reasons(info))
    assert op.triton_reasons(op.describe(q, k, pk, kpm, True, v, pv, scale=0.3)) == []
    with pytest.raises(dispatch.BackendUnavailableError, match="scale <= 0"):
        pet_fast.prefix_attention(q, k, v, pk, pv, key_padding_mask=kpm, causal=True, scale=scale, backend="triton")
    with pytest.raises(dispatch.BackendUnavailableError, match="scale <= 0"):
        op.attend_impl(q, k, v, pk, pv, kpm, True, backend="triton", scale=scale)
    assert op.attend_impl(q, k, v, pk, pv, kpm, True, backend="triton", scale=0.3).backend == "triton"
    with pytest.raises(ValueError, match="scale must be > 0"):
        kernels.forward(q, k, v, pk, pv, kpm, True, scale)
    gy = torch.randn(2, 4, 9, 8)
    got = run("eager", tensors, kpm, True, gy, scale)
    ref = reference64(tensors, kpm, True, gy, scale)
    for name, a, b in zip(NAMES, [got[0]] + got[1], [ref[0]] + ref[1]):
        assert torch.isfinite(a).all() and rel_err(a, b) < 1e-5, (name, rel_err(a, b))


def test_dispatch_reasons_and_auto_choice():
    q, k, v, pk, pv = make(1, 2, 2, 3, 4, 8, 2)
    info = op.describe(q, k, pk, None, False, v, pv)
    names = dict(dispatch.explain(op.OP, info))
    assert names["triton"] == []  # the tests run under the interpreter
    assert pet_fast.prefix_attention(q, k, v, pk, pv).shape == q.shape  # auto on CPU: eager
    assert dispatch.select(op.OP, info).backend == "eager"
    assert any("head_dim" in r for r in op.triton_reasons(dict(info, head_dim=512)))
    # the grid's second and third dimensions hold the heads and the batch: past CUDA's 65535, eager runs
    assert op.triton_reasons(dict(info, batch=65535, q_heads=65535)) == []
    assert [r.split()[0] for r in op.triton_reasons(dict(info, batch=65536, q_heads=70000))] == ["batch", "q_heads"]
    cuda_why = op.cuda_decode_reasons(info)
    assert cuda_why and any("cpu" in r for r in cuda_why)
    gpu_info = dict(info, device=torch.device("cuda", 0), dtype=torch.float16, q_len=16, requires_grad=True)
    shape_why = op.decode_shape_reasons(gpu_info)
    assert any("q_len" in r for r in shape_why) and any("grad" in r for r in shape_why)
    assert op.decode_shape_reasons(dict(gpu_info, q_len=8, requires_grad=False)) == []
    long_cache = dict(gpu_info, q_len=8, requires_grad=False, kv_len=op.DECODE_MAX_KEYS)  # plus the prefix
    assert any("int32" in r for r in op.decode_shape_reasons(long_cache))
    # the decode kernel's grid holds the batch and (at most) the query heads in dimensions of at most 65535
    ok = dict(gpu_info, q_len=8, requires_grad=False, batch=65535, q_heads=65535, kv_heads=65535)
    assert op.decode_shape_reasons(ok) == []
    assert [r.split()[0] for r in op.decode_shape_reasons(dict(ok, batch=65536, q_heads=65536 * 2))] == ["batch",
                                                                                                       "q_heads"]
    # without a table (the design order) the decode kernel, which once measured slower than concatenation
    # + SDPA, is tried last; the shipped table's orders are tested below
    try:
        op.load_timings(os.devnull + ".absent")
        assert op.preference(dict(gpu_info, q_len=1, requires_grad=False)) == ["triton", "eager", "cuda"]
        assert op.preference(gpu_info)[0] == "triton"
    finally:
        op.load_timings()
    with pytest.raises(dispatch.BackendUnavailableError, match="cuda"):
        pet_fast.prefix_attention(q, k, v, pk, pv, backend="cuda")


def test_torch_compile_fullgraph_forward_and_backward():
    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(8, 8)
            self.prefix_k = torch.nn.Parameter(torch.randn(2, 3, 8))
            self.prefix_v = torch.nn.Parameter(torch.randn(2, 3, 8))

        def forward(self, x, kpm):  # x: (B, L, 4 heads * 8)
            B, L, _ = x.shape
            q = x.view(B, L, 4, 8).transpose(1, 2)
            kv = self.proj(x.view(B, L, 4, 8)[:, :, :2]).transpose(1, 2)
            out = pet_fast.prefix_attention(q, kv, kv * 0.5, self.prefix_k, self.prefix_v, key_padding_mask=kpm,
                                            causal=True, backend="triton")
            return out.transpose(1, 2).reshape(B, L, 32)

    layer = Layer()
    x = torch.randn(2, 5, 32, requires_grad=True)
    kpm = padding_mask(2, 5, "left")
    explained = torch._dynamo.explain(layer)(x, kpm)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    y = compiled(x, kpm)
    gy = torch.randn_like(y)
    got = torch.autograd.grad(y, [x, layer.prefix_k, layer.prefix_v, layer.proj.weight], gy)
    with pet_fast.use_backend("eager"):
        y_ref = layer(x, kpm)
        ref = torch.autograd.grad(y_ref, [x, layer.prefix_k, layer.prefix_v, layer.proj.weight], gy)
    assert rel_err(y, y_ref) < 1e-5
    for a, b in zip(got, ref):
        assert rel_err(a, b) < 1e-5


# ---------------------------------------------------------------------------------------------------
# GPU: real Triton (TRITON_INTERPRET=0 in benchmarks/gpu_check.sh) and the CUDA decode kernel.

GPU_CASES = [
    # B, Hq, Hkv, L, S, D, P, prefix, padding, causal
    (2, 4, 4, 129, 200, 32, 20, "shared", "right", False),
    (2, 8, 2, 257, 257, 64, 30, "per_batch", "left", True),
    (1, 4, 4, 100, 333, 80, 64, "shared", "right", True),
    (2, 6, 3, 190, 77, 96, 7, "broadcast", None, True),
    (2, 4, 1, 64, 300, 128, 0, "shared", "left", False),
    (2, 4, 2, 77, 129, 128, 17, None, "right", True),
]


def assert_gpu_precision_rule(got, ref, eager=None):
    """The GPU tests' rule for [out, dq, dk, dv, d_prefix_k, d_prefix_v] (None where absent) against the
    float64 ``ref``: float32 within 1e-4 relative; fp16/bf16 (``eager``: the definition run in that dtype)
    within twice eager's error plus 2e-3 of the reference's scale."""
    for name, a, r, e in zip(NAMES, got, ref, eager or [None] * len(NAMES)):
        if r is None:
            continue
        if eager is None:
            assert rel_err(a, r) < 1e-4, (name, rel_err(a, r))
            continue
        err = (a.double() - r).abs().max().item()
        eager_err = (e.double() - r).abs().max().item()
        assert err <= 2 * eager_err + 2e-3 * max(1.0, r.abs().max().item()), (name, err, eager_err)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,Hq,Hkv,L,S,D,P,prefix,pad,causal", GPU_CASES)
def test_gpu_triton_follows_the_precision_rule(dtype, B, Hq, Hkv, L, S, D, P, prefix, pad, causal):
    tensors = make(B, Hq, Hkv, L, S, D, P, prefix, dtype=dtype, device="cuda")
    kpm = padding_mask(B, S, pad, "cuda")
    gy = torch.randn(B, Hq, L, D, device="cuda")
    got = run("triton", tensors, kpm, causal, gy)
    ref = reference64(tensors, kpm, causal, gy)
    eager = None if dtype == torch.float32 else run("reference", tensors, kpm, causal, gy)
    assert_gpu_precision_rule([got[0]] + got[1], [ref[0]] + ref[1], eager and [eager[0]] + eager[1])


@pytest.mark.gpu
def test_gpu_autotuned_launches_follow_the_precision_rule(monkeypatch):
    """The autotuned launchers (grids from the chosen tile, the backward's tile-dependent prefix block
    count) as benchmarks and models run them, though the GPU tests otherwise run with PET_FAST_AUTOTUNE=0:
    the autotuner runs every tile of its list for this call (10 compiles), keeps the fastest, and the result
    follows the precision rule. (The tiles' loop bounds are checked under the interpreter with forced
    tiles; benchmarks/compile_check_kernels.py compiles every tile for sm_90.)"""
    monkeypatch.setattr(kernels, "autotuning", lambda: True)
    B, Hq, Hkv, L, S, D, P = 2, 4, 2, 48, 77, 64, 20
    tensors = make(B, Hq, Hkv, L, S, D, P, "per_batch", dtype=torch.bfloat16, device="cuda")
    kpm = padding_mask(B, S, "right", "cuda")
    gy = torch.randn(B, Hq, L, D, device="cuda")
    assert kernels._tuned(torch.bfloat16, None)
    out, lse = kernels.forward(*tensors, kpm, True, None)
    got = [out] + list(kernels.backward(gy.to(torch.bfloat16), *tensors, kpm, out, lse, True, None))
    ref = reference64(tensors, kpm, True, gy)
    eager = run("reference", tensors, kpm, True, gy)
    assert_gpu_precision_rule(got, [ref[0]] + ref[1], [eager[0]] + eager[1])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,Hq,Hkv,L,S,D,P,prefix,pad,causal", [
    (3, 8, 2, 1, 517, 64, 20, "shared", "right", False),
    (2, 4, 4, 8, 4100, 128, 64, "per_batch", "right", True),
    (4, 6, 2, 5, 33, 80, 0, "shared", "left", True),
    (2, 4, 1, 3, 1000, 96, 9, "broadcast", None, True),
    (2, 4, 4, 2, 0, 32, 5, "shared", None, False),
])
def test_gpu_cuda_decode_follows_the_precision_rule(dtype, B, Hq, Hkv, L, S, D, P, prefix, pad, causal):
    from pet_fast import _ext

    if not _ext.available():
        pytest.skip(_ext.reason())
    tensors = make(B, Hq, Hkv, L, S, D, P, prefix, dtype=dtype, device="cuda")
    kpm = padding_mask(B, S, pad, "cuda")
    with torch.no_grad():
        info = op.describe(tensors[0], tensors[1], tensors[3], kpm, causal, tensors[2], tensors[4])
        assert op.cuda_decode_reasons(info) == []  # auto's order comes from timings; the kernel must accept
        got = pet_fast.prefix_attention(*tensors, key_padding_mask=kpm, causal=causal, backend="cuda")
        eager = op.reference(*tensors, key_padding_mask=kpm, causal=causal)  # the definition in dtype
        ref = op.reference(*(None if t is None else t.double() for t in tensors), key_padding_mask=kpm, causal=causal)
    assert got.dtype == dtype and got.shape == tensors[0].shape
    err = (got.double() - ref).abs().max().item()
    eager_err = (eager.double() - ref).abs().max().item()
    assert err <= 2 * eager_err + 2e-3 * max(1.0, ref.abs().max().item()), (err, eager_err)


@pytest.mark.gpu
def test_gpu_cuda_decode_refuses_gradients():
    q, k, v, pk, pv = make(1, 2, 2, 1, 16, 64, 4, dtype=torch.float16, device="cuda")
    q.requires_grad_()
    with pytest.raises(dispatch.BackendUnavailableError, match="grad"):
        pet_fast.prefix_attention(q, k, v, pk, pv, backend="cuda")


def test_measured_timings_order_auto(tmp_path):
    """A GPU run's table (bench_prefix_attention.py --dispatch-table) decides auto's order per kind of call."""
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.bench_prefix_attention import dispatch_table

    rows = [dict(shape="d512", mode="decode", impl="pet_fast cuda decode + padding", us=50.0),
            dict(shape="d512", mode="decode", impl="pet_fast eager (sdpa) + padding", us=270.0),
            dict(shape="d512", mode="decode", impl="pet_fast triton + padding", us=60.0),
            dict(shape="d4k", mode="decode", impl="pet_fast cuda decode + padding", us=260.0),
            dict(shape="d4k", mode="decode", impl="pet_fast eager (sdpa) + padding", us=1700.0),
            dict(shape="d4k", mode="decode", impl="pet_fast triton + padding", us=255.0),
            dict(shape="t", mode="fwd+bwd", impl="pet_fast eager (sdpa) + padding", us=800.0),
            dict(shape="t", mode="fwd+bwd", impl="pet_fast triton + padding", us=900.0),
            dict(shape="t", mode="fwd+bwd", impl="cat + sdpa + padding mask", us=10.0),  # not a backend
            dict(shape="t", mode="fwd+bwd", impl="cat + sdpa, no padding", us=600.0),  # eager without padding
            dict(shape="t", mode="fwd+bwd", impl="pet_fast triton, no padding", us=450.0),
            dict(shape="t", mode="fwd+bwd", impl="pet_fast triton + padding + dropout 0.1", us=950.0),
            dict(shape="t", mode="fwd+bwd", impl="pet_fast eager (sdpa) + padding + dropout 0.1", us=1200.0),
            dict(shape="u", mode="fwd", impl="pet_fast triton + padding", error="failed")]
    table = dispatch_table(rows)
    # decode: one win each, cuda's total time is lower (310 against 315); fwd has a single backend measured: no order
    assert table == {"orders": {"decode": ["cuda", "triton", "eager"], "fwd+bwd": ["eager", "triton"],
                                "fwd+bwd, no padding": ["triton", "eager"], "fwd+bwd, dropout": ["triton", "eager"]}}
    path = tmp_path / "prefix_attention_timings.json"
    path.write_text(json.dumps(table))
    gpu = dict(device=torch.device("cuda", 0), dtype=torch.bfloat16, q_len=1, requires_grad=False)
    try:
        op.load_timings(str(path))
        assert op.preference(gpu) == ["cuda", "triton", "eager"]
        assert op.preference(dict(gpu, requires_grad=True, padding=True)) == ["eager", "triton", "cuda"]
        assert op.preference(dict(gpu, requires_grad=True, padding=False)) == ["triton", "eager", "cuda"]
        assert op.preference(dict(gpu, requires_grad=True, padding=True, dropout=True)) == ["triton", "eager", "cuda"]
        assert op.preference(dict(gpu, q_len=64)) == ["triton", "cuda", "eager"]  # not measured: by design
        path.write_text(json.dumps({"orders": {"decode": ["fast"]}}))
        with pytest.raises(ValueError, match="prefix_attention timings"):
            op.load_timings(str(path))
    finally:
        op.load_timings()
    shipped = op._TIMINGS.get("orders")
    assert op.preference(gpu) == (list(shipped["decode"]) if shipped and "decode" in shipped
                                  else ["triton", "eager", "cuda"])


def test_auto_follows_every_order_of_a_table(tmp_path):
    """fwd (no gradient needed), fwd+bwd (a gradient is needed) and decode (no gradient, few queries) each
    take their own order from the table, decided from the real call (grad mode and requires_grad)."""
    import json

    orders = {"fwd": ["eager", "cuda", "triton"], "fwd+bwd": ["cuda", "eager", "triton"],
              "decode": ["eager", "triton", "cuda"]}
    path = tmp_path / "prefix_attention_timings.json"
    path.write_text(json.dumps({"device": "Test Card 9000", "orders": orders}))
    q, k, v, pk, pv = make(2, 2, 1, 12, 12, 8, 3)
    try:
        op.load_timings(str(path))

        def order(q_, pk_):
            info = op.describe(q_, k, pk_, None, False, v, pv)
            return [name for name, _ in dispatch.explain(op.OP, info)]

        assert order(q, pk) == orders["fwd"]
        assert order(q, pk.requires_grad_()) == orders["fwd+bwd"]  # no padding: fwd+bwd's order without its own
        with torch.no_grad():
            assert order(q, pk) == orders["fwd"]  # parameters that need a gradient, but none is recorded
        assert order(q[:, :, :1], pk) == orders["fwd+bwd"]
        with torch.no_grad():
            assert order(q[:, :, :1], pk) == orders["decode"]
        for mode, expected in orders.items():
            assert op.preference_for_mode(mode) == expected
        # unpadded calls that need a gradient: their own order where the table has one
        path.write_text(json.dumps({"orders": {**orders, "fwd+bwd, no padding": ["triton", "eager", "cuda"]}}))
        op.load_timings(str(path))
        assert order(q, pk.detach()) == orders["fwd"]
        mask = torch.ones(2, 12, dtype=torch.bool)
        info = op.describe(q, k, pk, mask, False, v, pv)
        assert [name for name, _ in dispatch.explain(op.OP, info)] == orders["fwd+bwd"]
        assert order(q, pk.requires_grad_()) == ["triton", "eager", "cuda"]
        # calls with dropout that need a gradient: fwd+bwd's order, then their own where the table has one
        drop = op.describe(q, k, pk, mask, False, v, pv, dropout_p=0.1)
        assert [name for name, _ in dispatch.explain(op.OP, drop)] == orders["fwd+bwd"]
        path.write_text(json.dumps({"orders": {**orders, "fwd+bwd, dropout": ["triton", "cuda", "eager"]}}))
        op.load_timings(str(path))
        assert [name for name, _ in dispatch.explain(op.OP, drop)] == ["triton", "cuda", "eager"]
        # a table with some modes only: the others keep the design order
        path.write_text(json.dumps({"orders": {"fwd+bwd": ["eager"]}}))
        op.load_timings(str(path))
        assert op.preference_for_mode("fwd+bwd") == ["eager", "triton", "cuda"]
        assert op.preference_for_mode("fwd") == ["triton", "cuda", "eager"]
        assert op.preference_for_mode("decode") == ["triton", "eager", "cuda"]
    finally:
        op.load_timings()


def test_info_reports_the_table(tmp_path):
    import json

    from pet_fast import cli

    path = tmp_path / "prefix_attention_timings.json"
    path.write_text(json.dumps({"device": "Test Card 9000", "orders": {"fwd": ["eager", "triton"],
                                                                       "fwd+bwd": ["triton", "eager"]}}))
    try:
        op.load_timings(str(path))
        line = [x for x in cli.timing_tables() if x.startswith("prefix_attention:")]
        assert len(line) == 1
        assert "Test Card 9000" in line[0] and str(path) in line[0]
        assert "fwd: eager, triton, cuda" in line[0] and "fwd+bwd: triton, eager, cuda" in line[0]
        assert "decode: triton, eager, cuda" in line[0]  # not in the table: design order
        op.load_timings(str(tmp_path / "absent.json"))
        line = [x for x in cli.timing_tables() if x.startswith("prefix_attention:")][0]
        assert "no table" in line
    finally:
        op.load_timings()


def test_shipped_table_is_the_h100_measurement():
    """pet_fast/ops/prefix_attention_timings.json: the orders bench_prefix_attention.py measured on an H100
    (benchmarks/results/h100-2026-11-27b/call2), read by default."""
    import json
    from pathlib import Path

    shipped = Path(op.__file__).with_name("prefix_attention_timings.json")
    doc = json.loads(shipped.read_text())
    assert "H100" in doc["device"]
    if op.TIMINGS_ENV not in __import__("os").environ:
        assert op._TIMINGS["path"] == str(shipped)
        assert op._TIMINGS["orders"] == doc["orders"]
        assert op.preference_for_mode("fwd+bwd")[0] == doc["orders"]["fwd+bwd"][0]


@pytest.mark.parametrize("per_batch,dropout_p", [(False, 0.0), (True, 0.0), (False, 0.3)])
def test_eager_path_matches_custom_op_path(monkeypatch, per_batch, dropout_p):
    """Eager calls go through an autograd.Function (ops/_autograd.py), compiled code through the custom
    ops; PET_FAST_CUSTOM_OPS=1 sends eager calls through the custom ops: same outputs, same gradients (with
    dropout, the same draws under the same torch seed)."""
    from pet_fast.ops import _autograd

    def run():
        q, k, v, pk, pv = make(2, 4, 2, 9, 11, 16, 3, prefix="per_batch" if per_batch else "shared")
        leaves = [t.requires_grad_() for t in (q, k, v, pk, pv)]
        mask = padding_mask(2, 11, "left")
        torch.manual_seed(4)
        out = op.fused(q, k, v, pk, pv, key_padding_mask=mask, causal=True, dropout_p=dropout_p)
        out.backward(torch.linspace(-1, 1, out.numel()).reshape(out.shape))
        return [out.detach()] + [t.grad for t in leaves]

    monkeypatch.delenv(_autograd.ENV_VAR, raising=False)
    eager = run()
    monkeypatch.setenv(_autograd.ENV_VAR, "1")
    custom = run()
    for a, b in zip(eager, custom):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
def test_custom_ops_opcheck(dropout_p):
    q, k, v, pk, pv = make(1, 2, 1, 5, 7, 8, 2)
    mask = padding_mask(1, 7, "right")
    seed = op.dropout_seed(q.device) if dropout_p else None
    torch.library.opcheck(torch.ops.pet_fast.prefix_attention_fwd.default,
                          (q.requires_grad_(), k.requires_grad_(), v, pk.requires_grad_(), pv, mask, True, 0.3,
                           dropout_p, seed),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    out, lse = torch.ops.pet_fast.prefix_attention_fwd(q.detach(), k.detach(), v, pk.detach(), pv, mask, True, 0.3,
                                                       dropout_p, seed)
    torch.library.opcheck(torch.ops.pet_fast.prefix_attention_bwd.default,
                          (torch.randn_like(out), q.detach(), k.detach(), v, pk.detach(), pv, mask, out, lse, True, 0.3,
                           dropout_p, seed),
                          test_utils=("test_schema", "test_faketensor"))


def test_the_prefix_gradient_sum_indexes_past_2_to_the_31():
    """The kernel that adds the prefix gradients' partial rows takes their half width as an int32 below 2**31:
    2 * half wrapped negative from 2**30 (a per-batch prefix of B * Hkv * P * D >= 2**30 elements) and it
    stored nothing, leaving the gradients' empty memory. One program over the first 128 columns of one row."""
    half = 2 ** 30 + 5
    part = torch.arange(128, dtype=torch.float32)
    dpk, dpv = torch.full((128,), -1.0), torch.full((1,), -1.0)
    kernels._sum_parts_kernel[(1,)](part, dpk, dpv, half, 1, BLOCK=128, SPLIT_BLOCK=4)
    assert torch.equal(dpk, part) and dpv.item() == -1.0
