"""dispatch.plan: a call whose signature was seen before skips the checks and the backend walk, and takes
exactly what a fresh call would take under every dispatch state; bad input still raises."""
import gc
import os
import weakref

import pytest
import torch

import pet_fast
from pet_fast import dispatch
from pet_fast.ops import _checks, _timings
from pet_fast.ops import bottleneck_adapter as ba
from pet_fast.ops import masked_linear as ml


def adapter_args(d=8, r=3, dtype=torch.float32, grad=True):
    x = torch.randn(5, d, dtype=dtype)
    p = [torch.randn(r, d, dtype=dtype), torch.randn(r, dtype=dtype), torch.randn(d, r, dtype=dtype), torch.randn(d, dtype=dtype)]
    for t in p:
        t.requires_grad_(grad)
    return [x] + p


@pytest.fixture
def counted_checks(monkeypatch):
    calls = []
    real = ba.check_inputs
    monkeypatch.setattr(ba, "check_inputs", lambda *a: calls.append(1) or real(*a))
    return calls


def test_a_repeated_signature_skips_the_checks(counted_checks):
    args = adapter_args()
    y0 = pet_fast.bottleneck_adapter(*args, activation="silu", scaling=0.5)
    y1 = pet_fast.bottleneck_adapter(*adapter_args(), activation="silu", scaling=0.5)  # new tensors, same signature
    assert len(counted_checks) == 1
    assert y1.shape == y0.shape
    pet_fast.bottleneck_adapter(*args, activation="silu", scaling=0.25)  # another value of a plain argument
    pet_fast.bottleneck_adapter(*adapter_args(d=9), activation="silu", scaling=0.5)  # another shape
    pet_fast.bottleneck_adapter(*adapter_args(grad=False), activation="silu", scaling=0.5)  # requires_grad differs
    assert len(counted_checks) == 4


def test_the_plan_gives_the_scaling_of_each_call():
    args = adapter_args(grad=False)
    for s in (0.5, 2.0, 0.5):  # the plain number is part of the signature
        ref = ba.reference(*args, activation="relu", scaling=s)
        torch.testing.assert_close(pet_fast.bottleneck_adapter(*args, scaling=s), ref)
    for s in (torch.tensor(0.5), torch.tensor(3.0)):  # tensors: the same plan, each call's own value
        ref = ba.reference(*args, activation="relu", scaling=s)
        torch.testing.assert_close(pet_fast.bottleneck_adapter(*args, scaling=s), ref)


def test_plans_keep_no_tensor():
    args = adapter_args()
    s = torch.tensor(0.5, requires_grad=True)
    pet_fast.bottleneck_adapter(*args, scaling=s).sum().backward()
    w = weakref.ref(s)
    del s
    gc.collect()
    assert w() is None

    def tensors(obj):
        if isinstance(obj, torch.Tensor):
            return 1
        if isinstance(obj, (tuple, list)):
            return sum(tensors(o) for o in obj)
        return 0

    assert dispatch._PLANS and sum(tensors(k) + tensors(v) for k, v in dispatch._PLANS.items()) == 0


@pytest.mark.parametrize("bad", [
    dict(scaling=float("nan")),
    dict(scaling=True),
    dict(scaling="x"),
    dict(activation="nope"),
    dict(residual=torch.randn(4, 8)),
])
def test_bad_input_raises_after_a_good_call_with_nearly_the_same_signature(bad):
    args = adapter_args()
    good = dict(activation="relu", scaling=1.0, residual=torch.randn(5, 8))
    pet_fast.bottleneck_adapter(*args, **good)
    with pytest.raises((TypeError, ValueError)):
        pet_fast.bottleneck_adapter(*args, **{**good, **bad})
    with pytest.raises((TypeError, ValueError)):  # and again: a failed call leaves no plan behind
        pet_fast.bottleneck_adapter(*args, **{**good, **bad})


def test_a_non_tensor_argument_is_named_every_time():
    args = adapter_args()
    pet_fast.bottleneck_adapter(*args)
    for _ in range(2):
        with pytest.raises(TypeError, match="x must be a torch.Tensor"):
            pet_fast.bottleneck_adapter(args[0].tolist(), *args[1:])
    assert _checks.signature(args[0].tolist()) is None


def test_a_dtype_mismatch_raises_after_the_matching_call():
    args = adapter_args()
    pet_fast.bottleneck_adapter(*args)
    with pytest.raises(TypeError, match="w_down must have the dtype of x"):
        pet_fast.bottleneck_adapter(args[0], args[1].double(), *args[2:])


def test_the_requested_backend_is_part_of_the_plan(monkeypatch):
    args = adapter_args(grad=False)
    seen = []
    monkeypatch.setattr(dispatch._REGISTRY[ba.OP].impls["triton"], "run", lambda *a, **k: seen.append("triton") or a[0])
    pet_fast.bottleneck_adapter(*args)  # auto on the CPU: eager
    assert seen == []
    with pet_fast.use_backend("triton"):
        pet_fast.bottleneck_adapter(*args)
    assert seen == ["triton"]
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    pet_fast.bottleneck_adapter(*args)
    assert seen == ["triton", "triton"]
    monkeypatch.delenv(dispatch.ENV_VAR)
    pet_fast.bottleneck_adapter(*args)
    assert seen == ["triton", "triton"]
    with pytest.raises(ValueError, match="backend must be one of"):
        pet_fast.bottleneck_adapter(*args, backend="turbo")


def test_deterministic_mode_reaches_the_choice(monkeypatch):
    """A backend whose reasons depend on deterministic mode (as the atomics-based kernels' do): a plan made
    with the mode off must not serve a call with it on."""
    entry = dispatch._REGISTRY[ba.OP]
    picks = []
    monkeypatch.setattr(entry.impls["triton"], "run", lambda *a, **k: picks.append("triton") or a[0])
    real_reasons = entry.impls["triton"].reasons
    monkeypatch.setattr(entry.impls["triton"], "reasons", lambda info: real_reasons(info) + (
        ["not deterministic"] if torch.are_deterministic_algorithms_enabled() else []))
    dispatch.clear_plans()
    args = adapter_args()
    with pet_fast.use_backend("triton"):
        pet_fast.bottleneck_adapter(*args)
        torch.use_deterministic_algorithms(True)
        try:
            with pytest.raises(dispatch.BackendUnavailableError, match="not deterministic"):
                pet_fast.bottleneck_adapter(*args)
        finally:
            torch.use_deterministic_algorithms(False)
        pet_fast.bottleneck_adapter(*args)
    assert picks == ["triton", "triton"]


def test_timings_preference_follows_grad_mode(monkeypatch):
    """The adapter's measured order differs with and without gradients; a plan made under no_grad must
    not serve a call that needs gradients."""
    monkeypatch.setattr(_timings, "TABLE", [
        (ba.OP, "fwd", "float32", 1.6, 2.1, 1.1, 0.0, ("triton", "eager")),
        (ba.OP, "fwd+bwd", "float32", 1.6, 2.1, 1.1, 0.0, ("eager", "triton")),
    ])
    dispatch.clear_plans()
    monkeypatch.setattr(dispatch, "triton_interpreting", lambda: True)
    seen = []
    entry = dispatch._REGISTRY[ba.OP]
    monkeypatch.setattr(entry.impls["triton"], "run", lambda *a, **k: seen.append("triton") or a[0])
    monkeypatch.setattr(entry.impls["eager"], "run", lambda *a, **k: seen.append("eager") or a[0])
    # auto takes kernels only on CUDA tensors: make the device check pass by describing a CUDA call
    real_describe = ba.describe
    monkeypatch.setattr(ba, "describe", lambda *a: {**real_describe(*a), "device": torch.device("cuda")})
    monkeypatch.setattr(entry.impls["triton"], "reasons", lambda info: [])
    args = adapter_args(grad=True)
    with torch.no_grad():
        pet_fast.bottleneck_adapter(*args)
    pet_fast.bottleneck_adapter(*args)
    with torch.no_grad():
        pet_fast.bottleneck_adapter(*args)
    assert seen == ["triton", "eager", "triton"]


def test_autocast_is_part_of_the_masked_linear_plan(monkeypatch):
    seen = []
    real = ml.describe
    monkeypatch.setattr(ml, "describe", lambda *a: (lambda info: seen.append(info["dtype"]) or info)(real(*a)))
    x, w = torch.randn(3, 8), torch.randn(4, 8)
    scores = torch.randn(4, 8, requires_grad=True)
    y32 = pet_fast.masked_linear(x, w, scores)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y16 = pet_fast.masked_linear(x, w, scores)
    pet_fast.masked_linear(x, w, scores)
    assert seen == [torch.float32, torch.bfloat16]
    assert y32.dtype == torch.float32 and y16.dtype == torch.bfloat16


def test_changing_a_preference_forgets_the_plans():
    args = adapter_args(grad=False)
    pet_fast.bottleneck_adapter(*args)
    assert dispatch._PLANS
    dispatch.set_preference(ba.OP, _timings.preference(ba.OP))
    assert not dispatch._PLANS


def test_the_memo_is_bounded(monkeypatch):
    monkeypatch.setattr(dispatch, "PLANS_MAX", 3)
    dispatch.clear_plans()
    for d in range(2, 9):
        pet_fast.bottleneck_adapter(*adapter_args(d=d, grad=False))
        assert len(dispatch._PLANS) <= 3


def test_compiled_code_takes_the_plain_path():
    calls = []
    real = ba.check_inputs

    def counting(*a):
        calls.append(1)
        return real(*a)

    args = adapter_args(grad=False)
    ba.check_inputs, saved = counting, ba.check_inputs
    try:
        fn = torch.compile(lambda *a: pet_fast.bottleneck_adapter(*a), fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(fn(*args), ba.reference(*args))
    finally:
        ba.check_inputs = saved
    assert calls  # traced through the checks (dynamo guards on what they read), not through the memo


@pytest.mark.parametrize("name", [dispatch.ENV_VAR, "PET_FAST_CUSTOM_OPS", "TRITON_INTERPRET", "PET_FAST_TEST_ÄNDERUNG"])
def test_the_cheap_environment_reads_see_every_change(monkeypatch, name):
    from pet_fast import _env

    monkeypatch.delenv(name, raising=False)
    assert _env.get(name) is None and _env.get(name, "0") == "0"
    for value in ("1", "eager", "", "wert-ü"):
        monkeypatch.setenv(name, value)
        assert _env.get(name, "0") == os.environ.get(name, "0") == value
    monkeypatch.delenv(name)
    assert _env.get(name, "x") == "x"


def test_the_cheap_environment_reads_follow_a_replaced_os_environ(monkeypatch):
    from pet_fast import _env

    monkeypatch.setattr(os, "environ", {"PET_FAST_CUSTOM_OPS": "1"})
    assert _env.get("PET_FAST_CUSTOM_OPS") == "1" and _env.get("TRITON_INTERPRET", "0") == "0"


def test_a_backend_set_in_the_environment_after_a_call_is_taken(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    args = adapter_args()
    assert dispatch.requested(None) == ("auto", "default")
    pet_fast.bottleneck_adapter(*args)
    monkeypatch.setenv(dispatch.ENV_VAR, "cuda")
    assert dispatch.requested(None) == ("cuda", dispatch.ENV_VAR)
    with pytest.raises(dispatch.BackendUnavailableError, match="cuda"):
        pet_fast.bottleneck_adapter(*args)


def test_compute_dtype_follows_autocast_on_and_off():
    from pet_fast.ops._autocast import compute_dtype

    x = torch.randn(2, 3)
    assert compute_dtype(x) == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert compute_dtype(x) == torch.bfloat16
        assert compute_dtype(x.double()) == torch.float64
        assert compute_dtype(torch.ones(2, dtype=torch.int64)) == torch.int64
        with torch.autocast("cpu", enabled=False):
            assert compute_dtype(x) == torch.float32
    assert compute_dtype(x.half()) == torch.float16
