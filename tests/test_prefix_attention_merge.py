"""The merged path of prefix attention (torch's flash attention over the sequence plus the Triton prefix
merge of kernels/prefix_attention_merge.py) against the float64 reference: output, log-sum-exp and every
gradient; determinism; the routing of the triton backend; opcheck and torch.compile of its custom ops.

On the CPU the flash part is ``_scaled_dot_product_flash_attention_for_cpu`` and the Triton kernels run
under TRITON_INTERPRET=1 with 16x16 blocks, so the odd sizes below cross block boundaries.
"""
import importlib

import pytest
import torch

import pet_fast
from conftest import rel_err

op = importlib.import_module("pet_fast.ops.prefix_attention")
merge = pytest.importorskip("pet_fast.kernels.prefix_attention_merge")

NAMES = ("out", "dq", "dk", "dv", "d_prefix_k", "d_prefix_v")


def make(B, H, L, S, D, P, prefix, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(99 + 3 * L + S + (P or 0))
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    q, k, v = r(B, H, L, D), r(B, H, S, D), r(B, H, S, D)
    if prefix is None:
        return [q, k, v, None, None]
    if prefix == "shared":
        return [q, k, v, r(H, P, D), r(H, P, D)]
    if prefix == "per_batch":
        return [q, k, v, r(B, H, P, D), r(B, H, P, D)]
    if prefix == "broadcast":  # a (B, H, P, D) view with batch stride 0
        return [q, k, v, r(H, P, D).expand(B, -1, -1, -1), r(H, P, D).expand(B, -1, -1, -1)]
    raise ValueError(prefix)


def run(fn, tensors, causal, grad_out, dtype=None):
    """(out, [grads]) of ``fn(q, k, v, pk, pv, causal=...)`` on copies of ``tensors`` (cast to dtype)."""
    leaves = [None if t is None else t.detach().to(dtype or t.dtype).clone().requires_grad_() for t in tensors]
    out = fn(*leaves, causal=causal)
    present = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad(out, present, grad_out.to(out.dtype)))
    return out.detach(), [None if t is None else next(grads) for t in leaves]


def ref64(tensors, causal, grad_out):
    return run(op.reference, tensors, causal, grad_out, torch.float64)


CASES = [
    # B, H, L, S, D, P, prefix, causal
    (3, 2, 33, 23, 16, 21, "shared", False),   # P > block, L > S, 9 partial sums to add (3 query tiles x 3)
    (2, 2, 17, 17, 8, 5, "per_batch", True),   # causal with L == S
    (1, 2, 18, 18, 24, 3, "broadcast", True),  # D = 24 padded to 32; stride-0 prefix view
    (2, 2, 9, 13, 16, None, None, False),      # no prefix: flash alone, forward and backward
]


@pytest.mark.parametrize("B,H,L,S,D,P,prefix,causal", CASES)
def test_float32_output_and_every_gradient(B, H, L, S, D, P, prefix, causal):
    tensors = make(B, H, L, S, D, P, prefix)
    gy = torch.randn(B, H, L, D, generator=torch.Generator().manual_seed(5))
    got = run(op.merged, tensors, causal, gy)
    ref = ref64(tensors, causal, gy)
    for name, a, b in zip(NAMES, [got[0]] + got[1], [ref[0]] + ref[1]):
        assert (a is None) == (b is None), name
        if a is None:
            continue
        assert a.shape == b.shape and a.dtype == torch.float32, name
        assert rel_err(a, b) < 2e-6, (name, rel_err(a, b))


def test_projection_layout_inputs_are_read_in_place():
    """q, k, v and dO with (B, L, H, D) memory (as attention layers make them), read through strides."""
    B, H, L, S, D, P = 2, 3, 17, 13, 16, 6
    bl = lambda t: t.transpose(1, 2).contiguous().transpose(1, 2)
    tensors = make(B, H, L, S, D, P, "shared")
    tensors[:3] = [bl(t) for t in tensors[:3]]
    gy = bl(torch.randn(B, H, L, D, generator=torch.Generator().manual_seed(8)))
    assert not tensors[0].is_contiguous() and not gy.is_contiguous()
    got = run(op.merged, tensors, False, gy)
    ref = ref64(tensors, False, gy)
    for name, a, b in zip(NAMES, [got[0]] + got[1], [ref[0]] + ref[1]):
        assert rel_err(a, b) < 2e-6, (name, rel_err(a, b))


@pytest.mark.parametrize("B,H,L,S,D,P,prefix,causal", [
    (2, 2, 17, 19, 16, 5, "shared", False),
    (2, 3, 17, 17, 8, 18, "per_batch", True),
])
def test_float16_follows_the_precision_rule(B, H, L, S, D, P, prefix, causal):
    tensors = make(B, H, L, S, D, P, prefix, dtype=torch.float16)
    gy = torch.randn(B, H, L, D, generator=torch.Generator().manual_seed(6))
    got = run(op.merged, tensors, causal, gy)
    eager = run(op.reference, tensors, causal, gy)
    ref = ref64(tensors, causal, gy)
    for name, a, e, r in zip(NAMES, [got[0]] + got[1], [eager[0]] + eager[1], [ref[0]] + ref[1]):
        assert a.dtype == torch.float16 and a.shape == r.shape, name
        err = (a.double() - r).abs().max().item()
        eager_err = (e.double() - r).abs().max().item()
        assert err <= 2 * eager_err + 1e-3 * max(1.0, r.abs().max().item()), (name, err, eager_err)


@pytest.mark.parametrize("causal", [False, True])
def test_log_sum_exp_is_the_joint_one(causal):
    B, H, L, D, P = 2, 2, 11, 8, 4
    S = L if causal else 7
    q, k, v, pk, pv = make(B, H, L, S, D, P, "shared")
    out, lse = op.MERGED_FORWARD(q, k, v, pk, pv, causal, 0.4)
    keys = torch.cat([pk.expand(B, -1, -1, -1), k], dim=2).double()
    s = q.double() @ keys.transpose(-1, -2) * 0.4
    if causal:
        s[..., P:] = s[..., P:].masked_fill(torch.ones(L, S, dtype=torch.bool).triu(1), float("-inf"))
    assert lse.shape == (B, H, L) and lse.dtype == torch.float32
    assert rel_err(lse, torch.logsumexp(s, dim=-1)) < 2e-6
    assert out.transpose(1, 2).is_contiguous()  # (B, L, H, D) memory: what the attention layer wants back


@pytest.mark.parametrize("P", [0, 3])
def test_outputs_and_gradients_come_in_projection_layout(P):
    """out, dq, dk and dv are (B, H, L, D) views of (B, L, H, D) memory, whatever q, k, v and dO's layout,
    so that an attention layer's ``out.transpose(1, 2)`` and its projections' gradients need no copy."""
    B, H, L, S, D = 2, 3, 9, 7, 8
    q, k, v, pk, pv = make(B, H, L, S, D, max(P, 1), "shared")
    if P == 0:
        pk, pv = pk[:, :0], pv[:, :0]
    for tensors in ([q, k, v], [t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v)]):
        out, lse = op.MERGED_FORWARD(*tensors, pk, pv, False, 0.3)
        assert out.transpose(1, 2).is_contiguous()
        for gy in (torch.randn_like(out), torch.randn(B, L, H, D).transpose(1, 2)):
            dq, dk, dv, _, _ = op.MERGED_BACKWARD(gy, *tensors, pk, pv, out, lse, False, 0.3)
            for g in (dq, dk, dv):
                assert g.transpose(1, 2).is_contiguous() and g.stride(-1) == 1


def test_same_bits_twice():
    tensors = make(2, 2, 17, 19, 16, 6, "shared", dtype=torch.float16)
    gy = torch.randn(2, 2, 17, 16)
    a = run(op.merged, tensors, False, gy)
    b = run(op.merged, tensors, False, gy)
    for x, y in zip([a[0]] + a[1], [b[0]] + b[1]):
        assert torch.equal(x, y)


def test_eager_path_matches_custom_op_path(monkeypatch):
    """Eager calls take an autograd.Function, PET_FAST_CUSTOM_OPS=1 the custom ops: the same bits."""
    tensors = make(2, 2, 9, 11, 8, 3, "per_batch")
    gy = torch.randn(2, 2, 9, 8)
    monkeypatch.delenv(op._autograd.ENV_VAR, raising=False)
    eager = run(op.merged, tensors, False, gy)
    monkeypatch.setenv(op._autograd.ENV_VAR, "1")
    custom = run(op.merged, tensors, False, gy)
    for a, b in zip([eager[0]] + eager[1], [custom[0]] + custom[1]):
        assert torch.equal(a, b)


def test_triton_backend_routes_gradient_calls_it_covers(monkeypatch):
    """Calls needing a gradient without padding/GQA take the merged path; forward-only calls, padded
    calls and GQA calls take the flash-style kernels."""
    seen = []
    real_merged, real_fused = op.MERGED_FORWARD.forward, op.FUSED_FORWARD.forward
    spy_merged = lambda *a: seen.append("merged") or real_merged(*a)
    spy_fused = lambda *a: seen.append("own") or real_fused(*a)
    monkeypatch.setattr(op.MERGED_FORWARD, "impl", op._autograd.function(
        "_spy_merged", spy_merged, op._merged_setup_context, op._merged_autograd_backward).apply)
    monkeypatch.setattr(op.FUSED_FORWARD, "impl", op._autograd.function(
        "_spy_fused", spy_fused, op._fused_setup_context, op._fused_autograd_backward).apply)
    monkeypatch.setattr(op.MERGED_FORWARD, "forward", spy_merged)  # the entry of calls without grad
    monkeypatch.setattr(op.FUSED_FORWARD, "forward", spy_fused)
    monkeypatch.delenv(op._autograd.ENV_VAR, raising=False)
    q, k, v, pk, pv = make(1, 2, 5, 6, 8, 2, "shared")
    pet_fast.prefix_attention(q.requires_grad_(), k, v, pk, pv, backend="triton")
    with torch.no_grad():
        pet_fast.prefix_attention(q, k, v, pk, pv, backend="triton")
    pet_fast.prefix_attention(q, k, v, pk, pv, key_padding_mask=torch.ones(1, 6, dtype=torch.bool), backend="triton")
    pet_fast.prefix_attention(q, k, v, pk, pv, causal=True, backend="triton")  # L != S
    pet_fast.prefix_attention(q, k[:, :1], v[:, :1], pk[:1], pv[:1], backend="triton")  # GQA
    assert seen == ["merged", "own", "own", "own", "own"]
    with pytest.raises(ValueError, match="key padding mask"):
        op.merged(q, k, v, pk, pv, key_padding_mask=torch.ones(1, 6, dtype=torch.bool))


def test_merged_reasons():
    q, k = torch.empty(2, 4, 5, 12), torch.empty(2, 2, 6, 12)
    why = " | ".join(op.merged_reasons(q, k, None, torch.ones(2, 6, dtype=torch.bool), True))
    for part in ("key padding mask", "grouped-query", "causal with q_len 5 != kv_len 6", "head_dim 12"):
        assert part in why
    assert op.merged_reasons(torch.empty(1, 2, 6, 16), torch.empty(1, 2, 6, 16), None, None, True) == []
    big = torch.empty(65536, 2, 6, 16, device="meta")
    assert any(r.startswith("batch 65536 > 65535") for r in op.merged_reasons(big, big, None, None, True))
    assert op.merged_reasons(torch.empty(1, 2, 6, 16, dtype=torch.bfloat16), torch.empty(1, 2, 6, 16), None, None,
                             False)


def test_custom_ops_opcheck():
    q, k, v, pk, pv = make(1, 2, 5, 7, 8, 2, "per_batch")
    torch.library.opcheck(torch.ops.pet_fast.prefix_attention_merged_fwd.default,
                          (q.requires_grad_(), k.requires_grad_(), v, pk.requires_grad_(), pv, False, 0.3),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    out, lse = torch.ops.pet_fast.prefix_attention_merged_fwd(q.detach(), k.detach(), v, pk.detach(), pv, False, 0.3)
    torch.library.opcheck(torch.ops.pet_fast.prefix_attention_merged_bwd.default,
                          (torch.randn_like(out), q.detach(), k.detach(), v, pk.detach(), pv, out, lse, False, 0.3),
                          test_utils=("test_schema", "test_faketensor"))


def test_torch_compile_fullgraph_captures_the_merged_op():
    torch._dynamo.reset()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(str(gm.graph))
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    def layer(q, k, v, pk, pv):
        return pet_fast.prefix_attention(q, k, v, pk, pv, causal=True, backend="triton") * 2

    tensors = make(2, 2, 9, 9, 8, 3, "shared")
    gy = torch.randn(2, 2, 9, 8)
    eager = run(lambda *a, causal: layer(*a), tensors, True, gy)
    compiled = run(lambda *a, causal: torch.compile(layer, fullgraph=True, backend=backend)(*a), tensors, True, gy)
    assert any("prefix_attention_merged_fwd" in g for g in graphs)
    for a, b in zip([eager[0]] + eager[1], [compiled[0]] + compiled[1]):
        assert torch.equal(a, b)


GPU_CASES = [
    # B, H, L, S, D, P, prefix, causal
    (2, 4, 129, 200, 64, 20, "shared", False),
    (2, 8, 257, 257, 128, 30, "per_batch", True),
    (1, 4, 100, 100, 80, 64, "broadcast", True),
    (1, 2, 65, 90, 256, 17, "shared", False),
    (2, 4, 77, 129, 96, None, None, False),
]


def test_cudnn_probe_accepts_a_right_sequence_part_and_refuses_a_wrong_one(monkeypatch):
    """The probe that lets cuDNN's attention take the sequence part on CUDA runs the whole merged path
    against float32 attention over the concatenation. Here (CPU: flash's CPU kernel and the interpreted
    merge) it must accept the right sequence part, causal or not, and refuse one whose log-sum-exp is in
    base 2 or whose backward is off."""
    cpu = torch.device("cpu")
    for causal in (False, True):
        with torch.no_grad():  # as inside the op's forward and backward
            assert merge._cudnn_matches(cpu, torch.float32, 16, causal)
    right_fwd, right_bwd = merge._flash_forward, merge._flash_backward
    monkeypatch.setattr(merge, "_flash_forward", lambda *a: (right_fwd(*a)[0], right_fwd(*a)[1] * 1.4426950408889634))
    assert not merge._cudnn_matches(cpu, torch.float32, 16, False)
    monkeypatch.setattr(merge, "_flash_forward", right_fwd)
    monkeypatch.setattr(merge, "_flash_backward", lambda *a: tuple(g * 1.1 for g in right_bwd(*a)))
    assert not merge._cudnn_matches(cpu, torch.float32, 16, False)
    monkeypatch.setattr(merge, "_flash_backward", right_bwd)
    monkeypatch.setenv("PET_FAST_PREFIX_CUDNN", "0")
    assert merge.sequence_backend(torch.empty(1, 1, 4, 16), False) == "flash"
    # a shape cuDNN refuses later moves its key to flash, with a warning
    monkeypatch.setattr(merge, "_SEQUENCE_BACKEND", {})
    with pytest.warns(RuntimeWarning, match="flash attention takes the sequence part"):
        merge._cudnn_refused(torch.empty(1, 1, 4, 16), True, RuntimeError("no plan"))
    assert merge._SEQUENCE_BACKEND == {(None, torch.float32, 16, True): "flash"}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,H,L,S,D,P,prefix,causal", GPU_CASES)
@pytest.mark.parametrize("sequence", ["probed", "flash"])
def test_gpu_merged_path_follows_the_precision_rule(dtype, B, H, L, S, D, P, prefix, causal, sequence, monkeypatch):
    """The triton backend on a gradient call it covers: torch's cuDNN attention (where the probe took it)
    or flash attention for the sequence, plus the Triton merge."""
    if sequence == "flash":
        monkeypatch.setenv("PET_FAST_PREFIX_CUDNN", "0")
    tensors = make(B, H, L, S, D, P, prefix, dtype=dtype, device="cuda")
    assert op.merged_reasons(tensors[0], tensors[1], tensors[3], None, causal) == []
    gy = torch.randn(B, H, L, D, device="cuda")
    triton_backend = lambda *a, causal: pet_fast.prefix_attention(*a, causal=causal, backend="triton")
    got = run(triton_backend, tensors, causal, gy)
    eager = run(op.reference, tensors, causal, gy)
    ref = ref64(tensors, causal, gy)
    for name, a, e, r in zip(NAMES, [got[0]] + got[1], [eager[0]] + eager[1], [ref[0]] + ref[1]):
        if r is None:
            continue
        assert a.dtype == dtype and a.shape == r.shape, name
        err = (a.double() - r).abs().max().item()
        eager_err = (e.double() - r).abs().max().item()
        assert err <= 2 * eager_err + 2e-3 * max(1.0, r.abs().max().item()), (name, err, eager_err)


@pytest.mark.gpu
def test_gpu_merged_prefix_gradients_same_bits_twice():
    """The prefix gradients are reduced in a fixed order (dq, dk, dv come from torch's flash backward,
    which follows torch's own determinism setting)."""
    tensors = make(4, 8, 300, 300, 64, 20, "shared", dtype=torch.bfloat16, device="cuda")
    gy = torch.randn(4, 8, 300, 64, device="cuda")
    a = run(op.merged, tensors, True, gy)
    b = run(op.merged, tensors, True, gy)
    assert torch.equal(a[0], b[0])
    assert torch.equal(a[1][3], b[1][3]) and torch.equal(a[1][4], b[1][4])


def test_gpu_check_script_quick_run(capsys):
    """benchmarks/check_prefix_merge.py, the GPU check of this path, at its tiny CPU shape."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.check_prefix_merge import main

    assert main(["--quick"]) == 0
    assert "d_prefix_v" in capsys.readouterr().out
