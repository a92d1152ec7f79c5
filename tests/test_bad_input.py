"""Every way to call a public op wrongly is answered by ValueError/TypeError naming the argument."""
import pytest
import torch

import pet_fast

f32, f64 = torch.float32, torch.float64


def t(*shape, dtype=f32):
    return torch.randn(*shape, dtype=dtype)


def adapter(**over):
    kw = dict(x=t(3, 8), w_down=t(4, 8), b_down=t(4), w_up=t(8, 4), b_up=t(8))
    kw.update(over)
    args = [kw.pop(k) for k in ("x", "w_down", "b_down", "w_up", "b_up")]
    return lambda: pet_fast.bottleneck_adapter(*args, **kw)


def masked(**over):
    kw = dict(x=t(3, 8), weight=t(5, 8), scores=t(5, 8), bias=t(5))
    kw.update(over)
    args = [kw.pop(k) for k in ("x", "weight", "scores", "bias")]
    return lambda: pet_fast.masked_linear(*args, **kw)


def attn(**over):
    kw = dict(q=t(2, 4, 3, 8), k=t(2, 2, 5, 8), v=t(2, 2, 5, 8), prefix_k=t(2, 2, 8), prefix_v=t(2, 2, 8))
    kw.update(over)
    args = [kw.pop(k) for k in ("q", "k", "v", "prefix_k", "prefix_v")]
    return lambda: pet_fast.prefix_attention(*args, **kw)


def fusion(**over):
    kw = dict(query=t(3, 8), values=t(3, 2, 8), residual=t(3, 8))
    kw.update(over)
    args = [kw.pop(k) for k in ("query", "values", "residual")]
    return lambda: pet_fast.adapter_fusion(*args, **kw)


def stacked(**over):
    kw = dict(x=t(3, 8), query=t(3, 8), residual=t(3, 8), w_down=t(2, 4, 8), b_down=t(2, 4), w_up=t(2, 8, 4), b_up=t(2, 8))
    kw.update(over)
    args = [kw.pop(k) for k in ("x", "query", "residual", "w_down", "b_down", "w_up", "b_up")]
    return lambda: pet_fast.stacked_adapter_fusion(*args, **kw)


CASES = [
    # (call, exception, text the message must contain)
    (adapter(x=[1.0, 2.0]), TypeError, "x must be a torch.Tensor"),
    (adapter(x=torch.ones(3, 8, dtype=torch.long)), TypeError, "x must be a floating-point"),
    (adapter(x=t(3, 7)), ValueError, "w_down must have shape (r, d)"),
    (adapter(w_down=t(4, 8, 1)), ValueError, "w_down must have 2 dimensions"),
    (adapter(w_up=t(8, 5)), ValueError, "w_up must have shape (8, 4)"),
    (adapter(b_down=t(5)), ValueError, "b_down must have shape (4,)"),
    (adapter(b_up=t(7)), ValueError, "b_up must have shape (8,)"),
    (adapter(w_down=t(4, 8, dtype=f64)), TypeError, "w_down must have the dtype of x"),
    (adapter(activation="softsign"), ValueError, "activation must be one of"),
    (adapter(activation=None), TypeError, "activation must be a string"),
    (adapter(scaling=t(3)), ValueError, "scaling must be a number or a tensor of shape () or (8,)"),
    (adapter(scaling="2"), TypeError, "scaling must be a real number"),
    (adapter(residual=t(3, 9)), ValueError, "residual must have shape (3, 8)"),
    (adapter(x=torch.randn(0)), ValueError, "w_down must have shape (r, d)"),
    (masked(weight=t(5, 7)), ValueError, "x's last dimension must equal weight.shape[1]"),
    (masked(scores=t(5, 7)), ValueError, "scores must have shape (5, 8)"),
    (masked(scores=torch.ones(5, 8, dtype=torch.int32)), TypeError, "scores must be a floating-point"),
    (masked(bias=t(6)), ValueError, "bias must have shape (5,)"),
    (masked(weight=t(5, 8, dtype=f64)), TypeError, "weight must have the dtype of x"),
    (masked(threshold="0"), TypeError, "threshold must be a real number"),
    (masked(threshold=float("nan")), ValueError, "threshold must not be NaN"),
    (attn(q=t(2, 4, 3)), ValueError, "q must have 4 dimensions"),
    (attn(k=t(2, 3, 5, 8), v=t(2, 3, 5, 8), prefix_k=t(3, 2, 8), prefix_v=t(3, 2, 8)), ValueError, "multiple of the key/value heads"),
    (attn(k=t(2, 2, 5, 4)), ValueError, "k must have shape (B, Hkv, S, D)"),
    (attn(v=t(2, 2, 6, 8)), ValueError, "v must have shape (2, 2, 5, 8)"),
    (attn(prefix_v=None), ValueError, "prefix_k and prefix_v must be given together"),
    (attn(prefix_k=t(3, 2, 8), prefix_v=t(3, 2, 8)), ValueError, "prefix_k must have shape (Hkv, P, D)"),
    (attn(prefix_k=t(3, 2, 2, 8), prefix_v=t(3, 2, 2, 8)), ValueError, "prefix_k must have shape (B, Hkv, P, D)"),
    (attn(prefix_v=t(2, 3, 8)), ValueError, "prefix_v must have shape (2, 2, 8)"),
    (attn(key_padding_mask=torch.ones(2, 5)), TypeError, "key_padding_mask must be a bool tensor"),
    (attn(key_padding_mask=torch.ones(2, 4, dtype=torch.bool)), ValueError, "key_padding_mask must have shape (2, 5)"),
    (attn(causal=1), TypeError, "causal must be a bool"),
    (attn(scale="x"), TypeError, "scale must be a real number"),
    (attn(q=t(2, 4, 3, 8, dtype=f64)), TypeError, "k must have the dtype of q"),
    (fusion(values=t(3, 8)), ValueError, "values must have shape (..., k, d)"),
    (fusion(values=t(3, 0, 8)), ValueError, "with k >= 1"),
    (fusion(residual=t(3, 7)), ValueError, "residual must have shape (3, 8)"),
    (fusion(w_query=t(8, 7)), ValueError, "w_query must have shape (8, 8)"),
    (fusion(b_key=t(8)), ValueError, "b_key was given without w_key"),
    (fusion(temperature=0.0), ValueError, "temperature must be > 0"),
    (stacked(w_up=t(2, 8, 5)), ValueError, "w_up must have shape (2, 8, 4)"),
    (stacked(w_down=t(2, 4, 7)), ValueError, "w_down must have shape (k, r, d)"),
    (stacked(scaling=t(3)), ValueError, "scaling must be a number or a tensor of shape () or (2,)"),
    (stacked(x=t(4, 8)), ValueError, "x must have shape (3, 8)"),
    (stacked(b_up=t(2, 7)), ValueError, "b_up must have shape (2, 8)"),
]


@pytest.mark.parametrize("backend", ["eager", "triton", "cuda", "auto"])
@pytest.mark.parametrize("call,exc,text", CASES, ids=[f"{i}-{c[2][:30]}" for i, c in enumerate(CASES)])
def test_bad_input_is_refused_before_any_backend(call, exc, text, backend):
    with pet_fast.use_backend(backend), pytest.raises(exc) as info:
        call()
    assert text in str(info.value)


@pytest.mark.parametrize("make", [adapter, masked, attn, fusion, stacked])
def test_valid_baseline_calls_work(make):
    assert make()().dtype == torch.float32


def test_mismatched_devices_are_named():
    meta = torch.empty(4, 8, device="meta")
    with pytest.raises(ValueError, match="w_down must be on the device of x"):
        adapter(w_down=meta)()
