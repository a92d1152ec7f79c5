import pytest
import torch

import pet_fast
from conftest import rel_err


def ref64(q, k, v, pk, pv, kpm, causal, scale=None):
    """Independent float64 reference: loops over batch, head and query row."""
    B, Hq, L, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    g = Hq // Hkv
    scale = D ** -0.5 if scale is None else scale
    out = torch.zeros(B, Hq, L, D, dtype=torch.float64)
    for b in range(B):
        for h in range(Hq):
            hk = h // g
            if pk is None:
                pkb = torch.zeros(0, D, dtype=torch.float64)
                pvb = pkb
            else:
                pkb = (pk[b, hk] if pk.dim() == 4 else pk[hk]).double()
                pvb = (pv[b, hk] if pv.dim() == 4 else pv[hk]).double()
            for i in range(L):
                keys, vals = [pkb], [pvb]
                ok = torch.ones(S, dtype=torch.bool)
                if kpm is not None:
                    ok &= kpm[b]
                if causal:
                    ok &= torch.arange(S) <= i + S - L
                keys.append(k[b, hk].double()[ok])
                vals.append(v[b, hk].double()[ok])
                K, V = torch.cat(keys), torch.cat(vals)
                if K.shape[0] == 0:
                    continue
                p = torch.softmax(K @ q[b, h, i].double() * scale, dim=0)
                out[b, h, i] = p @ V
    return out


def make(B, Hq, Hkv, L, S, D, P, per_batch=False, dtype=torch.float64, requires_grad=False):
    r = lambda *s: torch.randn(*s, dtype=dtype, requires_grad=requires_grad)
    q, k, v = r(B, Hq, L, D), r(B, Hkv, S, D), r(B, Hkv, S, D)
    if P is None:
        return q, k, v, None, None
    pshape = (B, Hkv, P, D) if per_batch else (Hkv, P, D)
    return q, k, v, r(*pshape), r(*pshape)


CASES = [
    # B, Hq, Hkv, L, S, D, P, per_batch, padding, causal
    (2, 2, 2, 5, 5, 8, 3, False, None, False),
    (2, 4, 2, 3, 7, 8, 2, True, "right", True),     # GQA, S > L, causal bottom-right
    (1, 3, 1, 6, 4, 4, 0, False, None, True),       # P = 0, L > S: early rows see nothing
    (2, 2, 1, 5, 5, 16, None, False, "left", False),  # no prefix
    (3, 2, 2, 4, 6, 8, 5, False, "left", True),
]


def padding_mask(B, S, side):
    if side is None:
        return None
    lengths = torch.tensor([S - b for b in range(B)]).clamp_min(1)
    pos = torch.arange(S)[None, :]
    return pos < lengths[:, None] if side == "right" else pos >= (S - lengths)[:, None]


@pytest.mark.parametrize("B,Hq,Hkv,L,S,D,P,per_batch,pad,causal", CASES)
def test_matches_float64_reference(B, Hq, Hkv, L, S, D, P, per_batch, pad, causal):
    q, k, v, pk, pv = make(B, Hq, Hkv, L, S, D, P, per_batch)
    kpm = padding_mask(B, S, pad)
    out = pet_fast.prefix_attention(q, k, v, pk, pv, key_padding_mask=kpm, causal=causal)
    assert out.shape == q.shape
    assert rel_err(out, ref64(q, k, v, pk, pv, kpm, causal)) < 1e-12


def test_fully_masked_rows_are_zero_without_nan_gradients():
    q, k, v, _, _ = make(2, 2, 2, 3, 4, 8, None, requires_grad=True)
    kpm = torch.tensor([[False] * 4, [True, True, False, False]])
    out = pet_fast.prefix_attention(q, k, v, key_padding_mask=kpm)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    out.sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert torch.equal(q.grad[0], torch.zeros_like(q.grad[0]))


def test_empty_sequence_with_prefix():
    q, k, v, pk, pv = make(2, 2, 2, 3, 0, 8, 4)
    out = pet_fast.prefix_attention(q, k, v, pk, pv, key_padding_mask=torch.ones(2, 0, dtype=torch.bool), causal=True)
    assert rel_err(out, ref64(q, k, v, pk, pv, None, True)) < 1e-12


def test_custom_scale():
    q, k, v, pk, pv = make(1, 2, 2, 4, 4, 8, 2)
    out = pet_fast.prefix_attention(q, k, v, pk, pv, scale=0.05)
    assert rel_err(out, ref64(q, k, v, pk, pv, None, False, scale=0.05)) < 1e-12


@pytest.mark.parametrize("per_batch", [False, True])
def test_gradcheck_including_prefix(per_batch):
    q, k, v, pk, pv = make(2, 4, 2, 3, 4, 4, 2, per_batch, requires_grad=True)
    kpm = padding_mask(2, 4, "right")
    f = lambda *a: pet_fast.prefix_attention(*a, key_padding_mask=kpm, causal=True)
    assert torch.autograd.gradcheck(f, (q, k, v, pk, pv))


def test_float32_gradients_match_reference():
    q, k, v, pk, pv = make(2, 4, 2, 5, 6, 8, 3, dtype=torch.float32, requires_grad=True)
    kpm = padding_mask(2, 6, "left")
    out = pet_fast.prefix_attention(q, k, v, pk, pv, key_padding_mask=kpm, causal=True)
    gy = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v, pk, pv), gy)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v, pk, pv)]
    ref = ref64(*leaves, kpm, True)
    for g, rg in zip(grads, torch.autograd.grad(ref, leaves, gy.double())):
        assert rel_err(g, rg) < 1e-5


def test_the_op_called_under_autocast_computes_in_its_dtype_on_every_backend():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 5, 16, generator=g) for _ in range(3))
    pk, pv = (torch.randn(4, 3, 16, generator=g) for _ in range(2))
    want = pet_fast.prefix_attention(q, k, v, pk, pv, causal=True, backend="eager")
    outs = {}
    for backend in ("eager", "triton"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outs[backend] = pet_fast.prefix_attention(q, k, v, pk, pv, causal=True, backend=backend)
        assert outs[backend].dtype == torch.bfloat16, backend
        assert rel_err(outs[backend].float(), want) < 3e-2
