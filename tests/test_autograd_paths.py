"""The two entry points of a fused op (pet_fast/ops/_autograd.py): eager calls take an autograd.Function,
compiled code and PET_FAST_CUSTOM_OPS=1 take the torch.library custom op. Same formulas, same bits."""
import pytest
import torch

import pet_fast
from pet_fast.ops import _autograd
from pet_fast.ops import bottleneck_adapter as ba


def _adapter_call(monkeypatch, custom_ops: bool, scaling):
    monkeypatch.setenv(_autograd.ENV_VAR, "1" if custom_ops else "0")
    g = torch.Generator().manual_seed(0)
    n, d, r = 13, 24, 5
    x = torch.randn(n, d, generator=g, requires_grad=True)
    res = torch.randn(n, d, generator=g, requires_grad=True)
    params = [torch.randn(r, d, generator=g), torch.randn(r, generator=g), torch.randn(d, r, generator=g),
              torch.randn(d, generator=g)]
    params = [p.mul_(0.3).requires_grad_() for p in params]
    s = torch.full((d,), 0.7, requires_grad=True) if scaling == "channel" else 0.7
    y = pet_fast.bottleneck_adapter(x, *params, activation="gelu", scaling=s, residual=res, backend="triton")
    dy = torch.randn(n, d, generator=g)
    y.backward(dy)
    grads = [t.grad for t in [x, res, *params] + ([s] if scaling == "channel" else [])]
    return y.detach(), grads


@pytest.mark.parametrize("scaling", ["number", "channel"])
def test_adapter_eager_and_custom_op_paths_give_the_same_bits(monkeypatch, scaling):
    y_fn, g_fn = _adapter_call(monkeypatch, False, scaling)
    y_op, g_op = _adapter_call(monkeypatch, True, scaling)
    assert torch.equal(y_fn, y_op)
    assert len(g_fn) == len(g_op) and all(a is not None for a in g_fn)
    for a, b in zip(g_fn, g_op):
        assert torch.equal(a, b)


def test_eager_calls_do_not_enter_the_custom_op(monkeypatch):
    def refuse(*args):
        raise AssertionError("the custom op ran in an eager call")

    monkeypatch.setattr(ba.TRITON, "custom_op", refuse)
    monkeypatch.setattr(ba.TRITON_BACKWARD, "custom_op", refuse)
    monkeypatch.setenv(_autograd.ENV_VAR, "0")
    x = torch.randn(3, 8, requires_grad=True)
    w = [torch.randn(2, 8, requires_grad=True), None, torch.randn(8, 2, requires_grad=True), None]
    pet_fast.bottleneck_adapter(x, *w, backend="triton").sum().backward()
    assert x.grad is not None
    monkeypatch.setenv(_autograd.ENV_VAR, "1")  # and the switch does reach it
    with pytest.raises(AssertionError, match="custom op ran"):
        pet_fast.bottleneck_adapter(x, *w, backend="triton")


def test_backward_formula_picks_the_path_of_its_forward():
    op = _autograd.Op(custom_op="custom", impl="eager")

    class Ctx:
        pass

    ctx = Ctx()
    assert op.within(ctx) == "custom"  # a custom op's context (also fake-tensor tracing)
    ctx.pet_fast_eager = True
    assert op.within(ctx) == "eager"


def test_calls_without_grad_skip_the_autograd_function(monkeypatch):
    """With grad mode off nothing is recorded: the op runs its forward alone (an autograd.Function
    costs host time per call); with grad mode on it runs the Function, and the results agree."""
    monkeypatch.setenv(_autograd.ENV_VAR, "0")
    x = torch.randn(3, 8, requires_grad=True)
    w = [torch.randn(2, 8), None, torch.randn(8, 2), None]
    y_grad = pet_fast.bottleneck_adapter(x, *w, backend="triton")

    def refuse(*args):
        raise AssertionError("the autograd.Function ran without grad mode")

    monkeypatch.setattr(ba.TRITON, "impl", refuse)
    with torch.no_grad():
        y = pet_fast.bottleneck_adapter(x, *w, backend="triton")
    assert torch.equal(y, y_grad.detach()) and not y.requires_grad
    with pytest.raises(AssertionError, match="Function ran"):
        pet_fast.bottleneck_adapter(x, *w, backend="triton")
