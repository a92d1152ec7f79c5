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
    (adapter(x=t(3, 8, dtype=torch.float16), w_down=t(4, 8, dtype=f64)), TypeError,
     "w_down must have the dtype of x (torch.float16) or float32"),
    (adapter(x=t(3, 8, dtype=torch.float16), b_down=t(4, dtype=torch.float16)), TypeError,
     "b_down must have the dtype of w_down"),
    (adapter(x=t(3, 8, dtype=torch.float16), w_down=t(4, 8), b_down=t(4), w_up=t(8, 4), b_up=t(8),
             residual=t(3, 8, dtype=torch.bfloat16)), TypeError, "residual must have the dtype of x (torch.float16) or float32, got torch.bfloat16"),
    (adapter(residual=t(3, 8, dtype=torch.float16)), TypeError, "residual must have the dtype of x (torch.float32), got torch.float16"),
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
    (attn(q=t(2, 4, 3, 0), k=t(2, 2, 5, 0), v=t(2, 2, 5, 0), prefix_k=None, prefix_v=None), ValueError,
     "q must have a head dimension D >= 1"),
    (lambda: pet_fast.unpack_mask(pet_fast.pack_mask(t(2, 33)), (2.5, 33)), TypeError,
     "shape must be an int or a sequence of ints"),
    (lambda: pet_fast.unpack_mask(pet_fast.pack_mask(t(2, 33)), "ab"), TypeError, "shape must be an int or a sequence"),
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


# ----- modules: constructors and calls ------------------------------------------------------------------
import dataclasses  # noqa: E402
from typing import ClassVar  # noqa: E402

from torch import nn  # noqa: E402

from pet_fast import AdapterFusion, BottleneckAdapter, MaskedLinear, PrefixEncoder, SideTuning  # noqa: E402
from pet_fast import tasks as inject_mod  # noqa: E402


def ctor(cls, *a, **kw):
    return lambda: cls(*a, **kw)


def fwd(make_module, *a, **kw):
    return lambda: make_module()(*a, **kw)


def adapters_for_fuse(*mods):
    return lambda: AdapterFusion(8).fuse(t(3, 8), t(3, 8), t(3, 8), list(mods))


MODULE_CASES = [
    (ctor(BottleneckAdapter, 0, 2), ValueError, "d_model must be a positive int"),
    (ctor(BottleneckAdapter, 8.0, 2), ValueError, "d_model must be a positive int"),
    (ctor(BottleneckAdapter, 8, 0), ValueError, "bottleneck must be a positive int"),
    (ctor(BottleneckAdapter, 8, 2, init="xavier"), ValueError, "init must be one of"),
    (ctor(BottleneckAdapter, 8, 2, scaling="big"), ValueError, "scaling must be a number, 'learned' or 'channel'"),
    (ctor(BottleneckAdapter, 8, 2, scaling=[1.0]), TypeError, "scaling must be a number"),
    (ctor(BottleneckAdapter, 8, 2, activation="elu"), ValueError, "activation must be one of"),
    (fwd(lambda: BottleneckAdapter(8, 2), [1.0] * 8), TypeError, "x must be a torch.Tensor"),
    (fwd(lambda: BottleneckAdapter(8, 2), t(3, 7)), ValueError, "to match x's last dimension"),
    (fwd(lambda: BottleneckAdapter(8, 2), t(3, 8), residual=t(3, 9)), ValueError, "residual must have shape (3, 8)"),
    (fwd(lambda: BottleneckAdapter(8, 2), t(3, 8), backend="fast"), ValueError, "backend must be one of"),
    (ctor(AdapterFusion, 0), ValueError, "d_model must be a positive int"),
    (ctor(AdapterFusion, "8"), ValueError, "d_model must be a positive int"),
    (ctor(AdapterFusion, 8, dropout=1.0), ValueError, "dropout must be in [0, 1)"),
    (fwd(lambda: AdapterFusion(8), t(3, 8), t(3, 8), t(3, 8)), ValueError, "values must have shape (..., k, d)"),
    (fwd(lambda: AdapterFusion(8), t(3, 8), t(3, 2, 8), t(3, 7)), ValueError, "residual must have shape (3, 8)"),
    (fwd(lambda: AdapterFusion(8), t(3, 8), t(3, 2, 8, dtype=f64), t(3, 8)), TypeError, "values must have the dtype of query"),
    (adapters_for_fuse(), ValueError, "adapters must hold at least one BottleneckAdapter"),
    # (different activations and per-channel scalings are fused from the adapters' outputs: tests/test_methods_fusion.py)
    (adapters_for_fuse(BottleneckAdapter(8, 2), BottleneckAdapter(6, 2)), ValueError, "adapters must share d_model"),
    (ctor(MaskedLinear, 0, 4), ValueError, "in_features must be a positive int"),
    (ctor(MaskedLinear, 4, -1), ValueError, "out_features must be a positive int"),
    (ctor(MaskedLinear, 4, 4, threshold="0"), TypeError, "threshold must be a real number"),
    (ctor(MaskedLinear, 4, 4, threshold=0.5, init_score=0.1), ValueError, "init_score (0.1) must be > threshold"),
    (ctor(MaskedLinear, 4, 4, init_score="1"), TypeError, "init_score must be a real number"),
    (lambda: MaskedLinear.from_linear(nn.Conv1d(2, 2, 1)), TypeError, "linear must be an nn.Linear"),
    (fwd(lambda: MaskedLinear(8, 4), t(3, 7)), ValueError, "x's last dimension must equal weight.shape[1] = 8"),
    (fwd(lambda: MaskedLinear(8, 4), torch.ones(3, 8, dtype=torch.long)), TypeError, "x must be a floating-point"),
    (ctor(PrefixEncoder, 0, 2, 8, 4), ValueError, "num_layers must be a positive int"),
    (ctor(PrefixEncoder, 2, 0, 8, 4), ValueError, "num_kv_heads must be a positive int"),
    (ctor(PrefixEncoder, 2, 2, 0, 4), ValueError, "head_dim must be a positive int"),
    (ctor(PrefixEncoder, 2, 2, 8, -1), ValueError, "prefix_length must be an int >= 0"),
    (ctor(PrefixEncoder, 2, 2, 8, 4, projection_dim=0), ValueError, "projection_dim must be None (flat) or a positive int"),
    (ctor(PrefixEncoder, 2, 2, 8, 4, dropout=1.5), ValueError, "dropout"),
    (fwd(lambda: PrefixEncoder(2, 2, 8, 4), batch_size=-1), ValueError, "batch_size must be None or an int >= 0"),
    (fwd(lambda: PrefixEncoder(2, 2, 8, 4), batch_size=2.0), ValueError, "batch_size must be None or an int >= 0"),
    (fwd(lambda: PrefixEncoder(2, 2, 8, 4), dtype="float16"), TypeError, "dtype must be None or a torch.dtype"),
    (ctor(SideTuning, lambda x: x, nn.Linear(2, 2)), TypeError, "base and side must be nn.Modules"),
    (ctor(SideTuning, nn.Linear(2, 2), nn.Linear(2, 2), 1.5), ValueError, "alpha must be a number in [0, 1]"),
    (ctor(SideTuning, nn.Linear(2, 2), nn.Linear(2, 2), "fixed"), ValueError, "alpha must be a number in [0, 1]"),
    (ctor(SideTuning, nn.Linear(2, 2), nn.Linear(2, 2), "learned", alpha_init=1.0), ValueError, "alpha_init must be in (0, 1)"),
    (fwd(lambda: SideTuning(nn.Linear(2, 2), nn.Linear(2, 2), lambda step: 2.0), t(3, 2)), ValueError,
     "the alpha schedule returned 2.0"),
]


@dataclasses.dataclass
class _NoopMethod(inject_mod.MethodConfig):
    """A method that attaches one linear per task (for the inject/set_active contract only)."""

    method: ClassVar[str] = "noop-for-tests"

    def attach(self, model, name, registry):
        inject_mod.task_holder(model)[name] = nn.Linear(2, 2)


def injected():
    return inject_mod.inject(nn.Linear(2, 2), _NoopMethod(), "a")


def twice():
    inject_mod.inject(injected(), _NoopMethod(), "a")


INJECT_CASES = [
    (lambda: inject_mod.inject("model", _NoopMethod()), TypeError, "model must be an nn.Module"),
    (lambda: inject_mod.inject(nn.Linear(2, 2), {"method": "adapter"}), TypeError, "config must be one of the pet_fast method configs"),
    (lambda: inject_mod.inject(nn.Linear(2, 2), _NoopMethod(), "1task"), ValueError, "name must be a string of letters"),
    (lambda: inject_mod.inject(nn.Linear(2, 2), _NoopMethod(), "a b"), ValueError, "name must be a string of letters"),
    (lambda: inject_mod.inject(nn.Linear(2, 2), _NoopMethod(), 3), ValueError, "name must be a string of letters"),
    (lambda: inject_mod.inject(nn.Linear(2, 2), _NoopMethod(), "train"), ValueError, "task name 'train' is reserved"),
    (lambda: inject_mod.inject(nn.Linear(2, 2), _NoopMethod(), "_modules"), ValueError, "task name '_modules' is reserved"),
    (twice, ValueError, "model already has a task named 'a'"),
    (lambda: inject_mod.set_active(nn.Linear(2, 2), "a"), ValueError, "model has no pet_fast tasks"),
    (lambda: inject_mod.set_active(injected(), "b"), ValueError, "unknown task 'b'"),
    (lambda: inject_mod.set_active(injected(), ["a", "b"]), ValueError, "unknown task 'b'"),
    (lambda: inject_mod.set_active(injected(), ["a", "a"]), ValueError, "name names a task more than once"),
    (lambda: inject_mod.set_active(injected(), 3), TypeError, "name must be a task name, a sequence of task names or None"),
    (lambda: inject_mod.set_active(injected(), [3]), TypeError, "name must be a task name, a sequence of task names or None"),
    (lambda: inject_mod.MethodConfig.from_dict({"method": "nope"}), ValueError, "unknown method 'nope'"),
]


@pytest.mark.parametrize("backend", ["eager", "triton", "cuda", "auto"])
@pytest.mark.parametrize("call,exc,text", MODULE_CASES + INJECT_CASES,
                         ids=[f"m{i}-{c[2][:30]}" for i, c in enumerate(MODULE_CASES + INJECT_CASES)])
def test_bad_module_and_inject_calls_are_refused(call, exc, text, backend):
    with pet_fast.use_backend(backend), pytest.raises(exc) as info:
        call()
    assert text in str(info.value)


def test_set_active_refusal_changes_nothing():
    model = injected()
    inject_mod.inject(model, _NoopMethod(), "b")
    before = (inject_mod.registry(model).active, {k: p.requires_grad for k, p in model.named_parameters()})
    with pytest.raises(ValueError):
        inject_mod.set_active(model, ["a", "missing"])
    assert before == (inject_mod.registry(model).active, {k: p.requires_grad for k, p in model.named_parameters()})


def test_bad_input_is_refused_before_any_kernel(monkeypatch):
    """A refused call never reaches a backend: every registered run function is replaced by one that
    fails the test, and every bad call of the table still raises its own error."""
    from pet_fast import dispatch

    def boom(*a, **kw):
        raise AssertionError("a backend ran on bad input")

    for entry in dispatch._REGISTRY.values():
        for impl in entry.impls.values():
            monkeypatch.setattr(impl, "run", boom)
    for call, exc, text in CASES + [c for c in MODULE_CASES if "schedule" not in c[2]]:
        with pytest.raises(exc):
            call()


def test_the_hf_hooks_plans_do_not_stand_in_for_the_ops_checks():
    """attend_impl (the attention hook's path, which skips the checks) and prefix_attention remember their call
    plans apart: a call of the op after the hook's with the same shapes still runs the op's checks."""
    from pet_fast.ops import prefix_attention as pa

    q = k = v = torch.randn(1, 2, 3, 4)
    pk = pv = torch.randn(2, 2, 4)
    pa.attend_impl(q, k, v, pk, pv, None, False)
    with pytest.raises(TypeError, match="scale must be a real number"):
        pet_fast.prefix_attention(q, k, v, pk, pv, scale=False, dropout_p=True)
