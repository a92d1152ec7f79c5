import math

import pytest
import torch

import pet_fast
from conftest import rel_err

ACTS = {
    "relu": lambda h: h.clamp_min(0),
    "gelu": lambda h: 0.5 * h * (1 + torch.erf(h / math.sqrt(2))),
    "gelu_tanh": lambda h: 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h ** 3))),
    "silu": lambda h: h / (1 + torch.exp(-h)),
    "tanh": torch.tanh,
    "identity": lambda h: h,
}


def ref64(x, wd, bd, wu, bu, act, scaling, residual):
    """Independent float64 reference: token by token with einsum."""
    x64 = x.double()
    h = torch.einsum("nd,rd->nr", x64.reshape(-1, x.shape[-1]), wd.double())
    if bd is not None:
        h = h + bd.double()
    h = ACTS[act](h)
    up = torch.einsum("nr,dr->nd", h, wu.double())
    if bu is not None:
        up = up + bu.double()
    s = scaling.double() if isinstance(scaling, torch.Tensor) else scaling
    base = (x64 if residual is None else residual.double()).reshape(-1, x.shape[-1])
    return (base + s * up).reshape(x.shape)


def make(shape, d, r, bias=True, dtype=torch.float64, requires_grad=False):
    g = lambda *s: torch.randn(*s, dtype=dtype, requires_grad=requires_grad)
    x = g(*shape, d)
    return x, g(r, d) * 0.3, g(r) if bias else None, g(d, r) * 0.3, g(d) if bias else None


@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("shape,d,r", [((5,), 7, 3), ((2, 3), 13, 1), ((1, 4, 3), 33, 17), ((0,), 8, 2)])
def test_matches_float64_reference(act, shape, d, r):
    x, wd, bd, wu, bu = make(shape, d, r)
    out = pet_fast.bottleneck_adapter(x, wd, bd, wu, bu, activation=act, scaling=0.7)
    assert out.shape == x.shape
    assert rel_err(out, ref64(x, wd, bd, wu, bu, act, 0.7, None)) < 1e-12


@pytest.mark.parametrize("scaling_kind", ["float", "scalar_tensor", "channel"])
def test_scaling_residual_and_no_bias(scaling_kind):
    d, r = 11, 4
    x, wd, _, wu, _ = make((3, 5), d, r, bias=False)
    residual = torch.randn_like(x)
    scaling = {"float": 2.5, "scalar_tensor": torch.tensor(0.3, dtype=torch.float64),
               "channel": torch.randn(d, dtype=torch.float64)}[scaling_kind]
    out = pet_fast.bottleneck_adapter(x, wd, None, wu, None, activation="swish", scaling=scaling, residual=residual)
    assert rel_err(out, ref64(x, wd, None, wu, None, "silu", scaling, residual)) < 1e-12


@pytest.mark.parametrize("act", ["relu", "gelu", "gelu_tanh", "silu", "tanh", "identity"])
def test_gradcheck(act):
    d, r = 6, 3
    x, wd, bd, wu, bu = make((2, 3), d, r, requires_grad=True)
    s = torch.randn(d, dtype=torch.float64, requires_grad=True)
    res = torch.randn(2, 3, d, dtype=torch.float64, requires_grad=True)
    if act == "relu":  # keep pre-activations away from the kink for finite differences
        with torch.no_grad():
            bd.add_(torch.sign(bd) * 0.5)
    f = lambda *a: pet_fast.bottleneck_adapter(a[0], a[1], a[2], a[3], a[4], activation=act, scaling=a[5], residual=a[6])
    assert torch.autograd.gradcheck(f, (x, wd, bd, wu, bu, s, res))


def test_gradients_match_float64_reference():
    d, r = 9, 5
    x, wd, bd, wu, bu = make((4, 3), d, r, dtype=torch.float32, requires_grad=True)
    out = pet_fast.bottleneck_adapter(x, wd, bd, wu, bu, activation="gelu", scaling=0.5)
    gy = torch.randn_like(out)
    grads = torch.autograd.grad(out, (x, wd, bd, wu, bu), gy)
    leaves = [t.detach().double().requires_grad_() for t in (x, wd, bd, wu, bu)]
    ref = ref64(*leaves, "gelu", 0.5, None)
    ref_grads = torch.autograd.grad(ref, leaves, gy.double())
    for g, rg in zip(grads, ref_grads):
        assert rel_err(g, rg) < 1e-5


def test_half_precision_runs_and_keeps_dtype():
    x, wd, bd, wu, bu = make((3,), 16, 4, dtype=torch.float16)
    out = pet_fast.bottleneck_adapter(x, wd, bd, wu, bu)
    assert out.dtype == torch.float16
    assert rel_err(out, ref64(x, wd, bd, wu, bu, "relu", 1.0, None)) < 1e-2


def test_add_input_adds_x_to_the_residual_and_checks_its_arguments():
    torch.manual_seed(1)
    x, res = torch.randn(4, 6, 10, dtype=torch.float64), torch.randn(4, 6, 10, dtype=torch.float64)
    wd, bd, wu, bu = torch.randn(3, 10, dtype=torch.float64), None, torch.randn(10, 3, dtype=torch.float64), None
    out = pet_fast.bottleneck_adapter(x, wd, bd, wu, bu, activation="silu", residual=res, add_input=True)
    expect = ref64(x, wd, bd, wu, bu, "silu", 1.0, x + res).reshape(x.shape)
    assert rel_err(out, expect) < 1e-12
    args = [t.requires_grad_() for t in (x, wd, wu)]
    res.requires_grad_()
    torch.autograd.gradcheck(lambda x, wd, wu, res: pet_fast.bottleneck_adapter(
        x, wd, None, wu, None, activation="tanh", residual=res, add_input=True), (*args, res))
    with pytest.raises(ValueError, match="add_input=True adds x to the residual: a residual is required"):
        pet_fast.bottleneck_adapter(x, wd, None, wu, None, add_input=True)
    with pytest.raises(TypeError, match="add_input must be a bool"):
        pet_fast.bottleneck_adapter(x, wd, None, wu, None, residual=res, add_input=1)
    module = pet_fast.BottleneckAdapter(10, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="a residual is required"):  # the module must not take x as the residual
        module(x, add_input=True)


def test_add_input_with_a_float32_input_under_autocast_keeps_it_in_float32():
    """The module casts float32 input to autocast's dtype for the products; the base still takes the
    float32 input (the parallel placement in a post-LN block: x is the LayerNorm's float32 output)."""
    torch.manual_seed(2)
    module = pet_fast.BottleneckAdapter(16, 4, init="identity")  # up-projection zero: out = h + x exactly
    x, h = torch.randn(5, 16), torch.randn(5, 16).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module(x, residual=h, add_input=True)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, h.float() + x, rtol=0, atol=0)


@pytest.mark.parametrize("form", ["plain", "residual", "add_input"])
def test_the_op_called_under_autocast_computes_as_eager_autocast_on_every_backend(form):
    """Float32 x under autocast: the products read x rounded to autocast's dtype and the base is added in float32,
    on the kernels too (they see no autocast). Built so that the two readings differ by 0.5 exactly: x0 - x1 =
    2**-10 in float32 is 0 in bfloat16, and the down-projection scales it by 512."""
    d, r = 24, 5
    x = torch.zeros(7, d)
    x[:, 0], x[:, 1] = 1 + 2 ** -10, 1.0
    w_down, w_up = torch.zeros(r, d), torch.zeros(d, r)
    w_down[0, 0], w_down[0, 1], w_up[:, 0] = 512.0, -512.0, 1.0
    res = torch.randn(7, d)
    kw = {"plain": {}, "residual": dict(residual=res), "add_input": dict(residual=res, add_input=True)}[form]
    base = x + res if form == "add_input" else res if form == "residual" else x
    for backend in ("eager", "triton"):
        out = pet_fast.bottleneck_adapter(x, w_down, None, w_up, None, backend=backend, **kw)
        torch.testing.assert_close(out - base, torch.full_like(x, 0.5))  # float32: 512 * 2**-10
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = pet_fast.bottleneck_adapter(x, w_down, None, w_up, None, backend=backend, **kw)
        assert out.dtype == torch.float32, backend
        torch.testing.assert_close(out, base, rtol=0, atol=0)  # the products saw bfloat16 x: 0
