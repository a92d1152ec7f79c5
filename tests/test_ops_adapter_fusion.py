import pytest
import torch

import pet_fast
from conftest import rel_err


def fusion64(query, values, residual, wq=None, bq=None, wk=None, bk=None, wv=None, bv=None, T=1.0,
             residual_before=False, value_before_softmax=True, mask=None, shift=None):
    """Independent float64 reference, one token at a time; ``shift`` (...,) is added to a token's scores and
    ``mask`` (..., k) multiplies them."""
    d = query.shape[-1]
    qf, vf, rf = query.double().reshape(-1, d), values.double().reshape(-1, values.shape[-2], d), residual.double().reshape(-1, d)
    lin = lambda w, b, t: t if w is None else t @ w.double().T + (0 if b is None else b.double())
    outs = []
    for n in range(qf.shape[0]):
        vals = vf[n] + rf[n] if residual_before else vf[n]
        qn = lin(wq, bq, qf[n])
        keys = lin(wk, bk, vals)
        vv = lin(wv, bv, vals) if (wv is not None and value_before_softmax) else vals
        scores = keys @ qn if shift is None else keys @ qn + shift.double().reshape(-1)[n]
        scores = scores if mask is None else scores * mask.double().reshape(-1, vf.shape[1])[n]
        p = torch.softmax(scores / T, dim=0)
        o = p @ vv
        if wv is not None and not value_before_softmax:
            o = lin(wv, bv, o)
        outs.append(o if residual_before else o + rf[n])
    return torch.stack(outs).reshape(query.shape) if outs else torch.zeros(query.shape, dtype=torch.float64)


def params(d, query=True, key=True, value=True, value_bias=False):
    r = lambda *s: torch.randn(*s, dtype=torch.float64) * 0.3
    return dict(w_query=r(d, d) if query else None, b_query=r(d) if query else None,
                w_key=r(d, d) if key else None, b_key=r(d) if key else None,
                w_value=r(d, d) if value else None, b_value=r(d) if value and value_bias else None)


@pytest.mark.parametrize("qkv", [(True, True, True), (True, True, False), (False, False, False), (False, True, True)])
@pytest.mark.parametrize("residual_before", [False, True])
@pytest.mark.parametrize("value_before_softmax", [True, False])
def test_fusion_matches_reference(qkv, residual_before, value_before_softmax):
    d, k = 7, 3
    query, residual = torch.randn(2, 5, d, dtype=torch.float64), torch.randn(2, 5, d, dtype=torch.float64)
    values = torch.randn(2, 5, k, d, dtype=torch.float64)
    p = params(d, *qkv, value_bias=True)
    out = pet_fast.adapter_fusion(query, values, residual, temperature=2.0, residual_before=residual_before,
                                  value_before_softmax=value_before_softmax, **p)
    ref = fusion64(query, values, residual, p["w_query"], p["b_query"], p["w_key"], p["b_key"], p["w_value"],
                   p["b_value"], 2.0, residual_before, value_before_softmax)
    assert rel_err(out, ref) < 1e-12


def test_fusion_gradcheck():
    d, k = 4, 3
    t = lambda *s: torch.randn(*s, dtype=torch.float64, requires_grad=True)
    query, values, residual = t(3, d), t(3, k, d), t(3, d)
    wq, bq, wk, bk, wv = t(d, d), t(d), t(d, d), t(d), t(d, d)
    f = lambda *a: pet_fast.adapter_fusion(a[0], a[1], a[2], w_query=a[3], b_query=a[4], w_key=a[5], b_key=a[6], w_value=a[7])
    assert torch.autograd.gradcheck(f, (query, values, residual, wq, bq, wk, bk, wv))


def adapters64(x, wd, bd, wu, bu, scaling, act):
    h = torch.einsum("nd,krd->nkr", x.double().reshape(-1, x.shape[-1]), wd.double()) + bd.double()
    h = {"relu": torch.relu, "tanh": torch.tanh}[act](h)
    up = torch.einsum("nkr,kdr->nkd", h, wu.double()) + bu.double()
    return (up * scaling.double()[:, None]).reshape(*x.shape[:-1], wd.shape[0], x.shape[-1])


@pytest.mark.parametrize("act", ["relu", "tanh"])
def test_stacked_matches_adapters_then_fusion(act):
    d, k, r = 9, 3, 4
    x, query, residual = (torch.randn(2, 3, d, dtype=torch.float64) for _ in range(3))
    wd, bd = torch.randn(k, r, d, dtype=torch.float64), torch.randn(k, r, dtype=torch.float64)
    wu, bu = torch.randn(k, d, r, dtype=torch.float64), torch.randn(k, d, dtype=torch.float64)
    scaling = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    p = params(d)
    out = pet_fast.stacked_adapter_fusion(x, query, residual, wd, bd, wu, bu, activation=act, scaling=scaling, **p)
    ref = fusion64(query, adapters64(x, wd, bd, wu, bu, scaling, act), residual, p["w_query"], p["b_query"],
                   p["w_key"], p["b_key"], p["w_value"])
    assert rel_err(out, ref) < 1e-12


def test_stacked_gradcheck():
    d, k, r = 4, 2, 3
    t = lambda *s: torch.randn(*s, dtype=torch.float64, requires_grad=True)
    args = (t(3, d), t(3, d), t(3, d), t(k, r, d), t(k, r), t(k, d, r), t(k, d))
    wq, wk, wv, s = t(d, d), t(d, d), t(d, d), t(k)
    f = lambda *a: pet_fast.stacked_adapter_fusion(*a[:7], activation="tanh", scaling=a[10], w_query=a[7], w_key=a[8], w_value=a[9])
    assert torch.autograd.gradcheck(f, args + (wq, wk, wv, s))


def test_float32_residual_with_half_inputs():
    """A float32 residual (the residual stream under autocast) is added after the fusion in float32; with
    residual_before it would enter the products, and is refused."""
    d, k = 8, 3
    h = lambda *s: torch.randn(*s).half()
    query, values, w = h(4, d), h(4, k, d), h(d, d)
    residual = torch.randn(4, d)
    out = pet_fast.adapter_fusion(query, values, residual, w_query=w, w_key=w, w_value=w)
    assert out.dtype == torch.float32
    want = pet_fast.adapter_fusion(query, values, torch.zeros_like(query), w_query=w, w_key=w, w_value=w).float() + residual
    torch.testing.assert_close(out, want)
    with pytest.raises(TypeError, match="residual"):
        pet_fast.adapter_fusion(query, values, residual, w_query=w, w_key=w, residual_before=True)
    with pytest.raises(TypeError, match="residual"):
        pet_fast.adapter_fusion(query.float(), values.float(), residual.half())
    x = h(4, d)
    stacked = dict(w_down=h(k, 2, d), b_down=None, w_up=h(k, d, 2), b_up=None)
    out = pet_fast.stacked_adapter_fusion(x, query, residual, **stacked, w_key=w)
    assert out.dtype == torch.float32
    with pytest.raises(TypeError, match="residual"):
        pet_fast.stacked_adapter_fusion(x, query, residual, **stacked, residual_before=True)
