"""The cuda backend's adapter beyond the few-token kernels: one C++ autograd node of ATen ops
(csrc/bottleneck_adapter_autograd.cpp). Its code is device-agnostic ATen, so a CPU-only build of that file
(in tests/csrc/cpu_module.cpp) checks it here against the op's eager reference: outputs and
every gradient in float64 over every form of the call, the mixed-precision form (half x, float32
parameters and residual), a frozen adapter; and the cuda backend's routing and reasons."""
import itertools

import pytest
import torch
from _cpu_ext import load_cpu_module

from pet_fast import dispatch
from pet_fast.ops import bottleneck_adapter as op


@pytest.fixture(scope="module")
def ext(tmp_path_factory):
    return load_cpu_module(tmp_path_factory)


def _call(ext, x, wd, bd, wu, bu, act, scaling, residual, add_input):
    s_t, s_v = (scaling, 1.0) if isinstance(scaling, torch.Tensor) else (None, float(scaling))
    return ext.bottleneck_adapter_composite(x, wd, bd, wu, bu, s_t, s_v, residual, op.CUDA_ACT_CODES[act], add_input)


FORMS = [(act, sc, res, bias) for act, sc, res, bias in itertools.product(
    sorted(op.CUDA_ACT_CODES), ["one", "number", "scalar tensor", "per channel"], ["none", "residual", "add_input"],
    [True, False])]


@pytest.mark.parametrize("act,sc,res,bias", FORMS)
def test_float64_output_and_every_gradient_match_the_reference(ext, act, sc, res, bias):
    g = torch.Generator().manual_seed(0)
    n, d, r = 37, 24, 5
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).requires_grad_()  # noqa: E731
    x, wd, wu = mk(n, d), mk(r, d), mk(d, r)
    bd, bu = (mk(r), mk(d)) if bias else (None, None)
    residual = mk(n, d) if res != "none" else None
    scaling = {"one": 1.0, "number": 0.7, "scalar tensor": mk(()), "per channel": mk(d)}[sc]
    y = _call(ext, x, wd, bd, wu, bu, act, scaling, residual, res == "add_input")
    y_ref = op.reference(x, wd, bd, wu, bu, act, scaling, residual, res == "add_input")
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    leaves = [t for t in (x, wd, bd, wu, bu, residual, scaling) if isinstance(t, torch.Tensor)]
    gy = torch.randn(y.shape, generator=g, dtype=torch.float64)
    for got, want in zip(torch.autograd.grad(y, leaves, gy), torch.autograd.grad(y_ref, leaves, gy)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("affine", [True, False])
def test_layer_norm_form_in_float64(ext, affine):
    """Pfeiffer's placement: the adapter reads LayerNorm(x) (frozen weight and bias), the base is x."""
    g = torch.Generator().manual_seed(5)
    n, d, r = 70, 24, 6
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).requires_grad_()  # noqa: E731
    x, wd, bd, wu, bu, s = mk(n, d), mk(r, d), mk(r), mk(d, r), mk(d), mk(d)
    lw, lb = (torch.randn(d, generator=g, dtype=torch.float64), torch.randn(d, generator=g, dtype=torch.float64)) \
        if affine else (None, None)
    y = ext.bottleneck_adapter_composite(x, wd, bd, wu, bu, s, 1.0, None, op.CUDA_ACT_CODES["relu"], False,
                                         use_ln=True, ln_weight=lw, ln_bias=lb, ln_eps=1e-5)
    y_ref = op.reference(x, wd, bd, wu, bu, "relu", s, layer_norm=(lw, lb, 1e-5))
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    leaves = (x, wd, bd, wu, bu, s)
    gy = torch.randn(y.shape, generator=g, dtype=torch.float64)
    for got, want in zip(torch.autograd.grad(y, leaves, gy), torch.autograd.grad(y_ref, leaves, gy)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_layer_norm_form_float32_stream_half_products(ext, monkeypatch):
    """Under autocast: x is the float32 residual stream, LN(x) reaches the products in float16 (the carrier's
    dtype), the sum stays float32; through run_cuda with the op's layer_norm argument."""
    monkeypatch.setattr(op, "_extension", lambda: ext)
    g = torch.Generator().manual_seed(6)
    n, d, r = 80, 32, 8
    x = torch.randn(n, d, generator=g).requires_grad_()
    wd, bd = (torch.randn(r, d, generator=g) * 0.2).requires_grad_(), torch.randn(r, generator=g).requires_grad_()
    wu, bu = (torch.randn(d, r, generator=g) * 0.2).requires_grad_(), torch.randn(d, generator=g).requires_grad_()
    ln = (torch.randn(d, generator=g), torch.randn(d, generator=g), 1e-12)
    with torch.autocast("cpu", dtype=torch.float16):
        y = op.run_cuda(x, wd, bd, wu, bu, activation="gelu", layer_norm=ln)
        y_ref = op.reference(x, wd, bd, wu, bu, "gelu", layer_norm=ln)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, y_ref, rtol=2e-3, atol=2e-3)
    leaves = (x, wd, bd, wu, bu)
    gy = torch.randn(y.shape, generator=g)
    got, want = torch.autograd.grad(y, leaves, gy), torch.autograd.grad(y_ref, leaves, gy)
    assert [t.dtype for t in got] == [torch.float32] * 5
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2 * b.abs().max().item())


def test_mixed_precision_half_x_float32_parameters_and_residual(ext):
    """The autocast form: float16 x, float32 master weights (used in float16, gradients in float32) and a
    float32 residual stream (the sum taken in float32)."""
    g = torch.Generator().manual_seed(1)
    n, d, r = 70, 32, 8
    x = torch.randn(n, d, generator=g).half().requires_grad_()
    wd, bd = (torch.randn(r, d, generator=g) * 0.2).requires_grad_(), torch.randn(r, generator=g).requires_grad_()
    wu, bu = (torch.randn(d, r, generator=g) * 0.2).requires_grad_(), torch.randn(d, generator=g).requires_grad_()
    residual = torch.randn(n, d, generator=g).requires_grad_()
    y = _call(ext, x, wd, bd, wu, bu, "gelu", 1.0, residual, True)
    y_ref = op.reference(x, wd, bd, wu, bu, "gelu", 1.0, residual, True)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, y_ref, rtol=2e-3, atol=2e-3)
    leaves = (x, wd, bd, wu, bu, residual)
    gy = torch.randn(y.shape, generator=g)
    got, want = torch.autograd.grad(y, leaves, gy), torch.autograd.grad(y_ref, leaves, gy)
    assert [t.dtype for t in got] == [torch.float16] + [torch.float32] * 5
    for a, b in zip(got, want):
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-2, atol=1e-2 * b.abs().max().item())


def test_frozen_adapter_and_calls_without_grad(ext):
    g = torch.Generator().manual_seed(2)
    n, d, r = 66, 16, 4
    x = torch.randn(n, d, generator=g, requires_grad=True)
    wd, wu = torch.randn(r, d, generator=g), torch.randn(d, r, generator=g)
    y = _call(ext, x, wd, None, wu, None, "relu", 0.5, None, False)
    (dx,) = torch.autograd.grad(y, (x,), torch.ones_like(y))
    (dx_ref,) = torch.autograd.grad(op.reference(x, wd, None, wu, None, "relu", 0.5), (x,), torch.ones_like(y))
    torch.testing.assert_close(dx, dx_ref, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        assert _call(ext, x, wd, None, wu, None, "relu", 0.5, None, False).grad_fn is None


def test_the_cuda_backend_takes_the_autograd_node_beyond_the_few_token_kernels(ext, monkeypatch):
    monkeypatch.setattr(op, "_extension", lambda: ext)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 20, 16, generator=g, requires_grad=True)  # 100 tokens > CUDA_MAX_N, leading dims kept
    wd, bd = torch.randn(8, 16, generator=g, requires_grad=True), torch.zeros(8, requires_grad=True)
    wu, bu = torch.randn(16, 8, generator=g, requires_grad=True), torch.zeros(16, requires_grad=True)
    residual = torch.randn(5, 20, 16, generator=g)
    y = op.run_cuda(x, wd, bd, wu, bu, activation="silu", scaling=2.0, residual=residual, add_input=True)
    assert y.shape == x.shape
    nodes, todo = [], [y.grad_fn]
    while todo:  # the graph behind y: a reshape, then the C++ node
        f = todo.pop()
        if f is not None:
            nodes.append(f.name())
            todo.extend(g for g, _ in f.next_functions)
    assert any("AdapterFunction" in name for name in nodes), nodes
    torch.testing.assert_close(y, op.reference(x, wd, bd, wu, bu, "silu", 2.0, residual, True), rtol=1e-5, atol=1e-5)


def test_cuda_reasons_beyond_the_few_token_kernels(monkeypatch):
    monkeypatch.setattr(dispatch, "cuda_reasons", lambda info: [])  # as on a GPU with the extension built
    info = dict(device=torch.device("cuda"), dtype=torch.bfloat16, n=4096, d=768, r=512, layer_norm=False,
                float32_residual=True)
    assert op.cuda_reasons(info) == []  # any r, a float32 residual: the autograd node takes them
    assert op.cuda_reasons(dict(info, layer_norm=True)) == []  # and the LayerNorm
    # few tokens in a form the few-token kernels do not take (r > 256, a float32 residual, a LayerNorm): the node
    assert op.cuda_reasons(dict(info, n=64)) == []
    assert op.cuda_reasons(dict(info, n=1, r=64, float32_residual=False, layer_norm=True)) == []
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert any("torch.compile" in w for w in op.cuda_reasons(info))
    # compiled code takes the custom op of the few-token kernels, within their limits only
    assert any("r=512" in w and "torch.compile" in w for w in op.cuda_reasons(dict(info, n=64)))
    assert any("LayerNorm" in w for w in op.cuda_reasons(dict(info, n=64, r=64, float32_residual=False, layer_norm=True)))
    assert op.cuda_reasons(dict(info, n=64, r=64, float32_residual=False)) == []


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gpu_cuda_backend_beyond_64_tokens_matches_float64(dtype):
    """pet_fast._C's node on a GPU (half x with float32 master weights and residual, as under autocast):
    every output and gradient within the error of eager PyTorch in that dtype, against float64."""
    import pet_fast

    g = torch.Generator().manual_seed(4)
    n, d, r = 300, 768, 64
    master = torch.float32
    x = torch.randn(n, d, generator=g).to("cuda", dtype).requires_grad_()
    wd = (torch.randn(r, d, generator=g) * d ** -0.5).to("cuda", master).requires_grad_()
    wu = (torch.randn(d, r, generator=g) * r ** -0.5).to("cuda", master).requires_grad_()
    bd, bu = torch.randn(r, generator=g).cuda().requires_grad_(), torch.randn(d, generator=g).cuda().requires_grad_()
    residual = torch.randn(n, d, generator=g).cuda().requires_grad_()
    leaves = (x, wd, bd, wu, bu, residual)
    gy = torch.randn(n, d, generator=g).cuda()

    def run(backend, ts):
        y = pet_fast.bottleneck_adapter(ts[0], *ts[1:5], activation="gelu", residual=ts[5], add_input=True, backend=backend)
        return (y, *torch.autograd.grad(y, ts, gy.to(y.dtype)))

    got = run("cuda", leaves)
    eager = run("eager", leaves)
    d64 = [t.detach().double().requires_grad_() for t in leaves]
    truth = run("eager", d64)
    for a, e, t in zip(got, eager, truth):
        err, err_eager = (a.double() - t).abs().max().item(), (e.double() - t).abs().max().item()
        assert err <= 2 * err_eager + 1e-5 * t.abs().max().item(), (err, err_eager)


@pytest.mark.gpu
@pytest.mark.parametrize("n,r,form", [(1, 64, "layer_norm"), (16, 300, "plain"), (64, 32, "float32_residual")])
def test_gpu_cuda_backend_few_tokens_beyond_the_kernels_forms(n, r, form):
    """Few tokens in the forms the few-token kernels do not take run as the C++ node: bf16 x, every output
    and gradient within twice eager's error against float64."""
    import pet_fast

    g = torch.Generator().manual_seed(5)
    d = 768
    x = torch.randn(n, d, generator=g).to("cuda", torch.bfloat16).requires_grad_()
    wd = (torch.randn(r, d, generator=g) * d ** -0.5).to("cuda", torch.bfloat16).requires_grad_()
    wu = (torch.randn(d, r, generator=g) * r ** -0.5).to("cuda", torch.bfloat16).requires_grad_()
    bd = torch.randn(r, generator=g).to("cuda", torch.bfloat16).requires_grad_()
    bu = torch.randn(d, generator=g).to("cuda", torch.bfloat16).requires_grad_()
    leaves = [x, wd, bd, wu, bu]
    kw = {}
    if form == "layer_norm":
        kw["layer_norm"] = (torch.randn(d, generator=g).to("cuda", torch.bfloat16), None, 1e-5)
    if form == "float32_residual":
        leaves.append(torch.randn(n, d, generator=g).cuda().requires_grad_())
    gy = torch.randn(n, d, generator=g).cuda()

    def run(backend, ts):
        extra = dict(kw, residual=ts[5]) if len(ts) > 5 else dict(kw)
        if "layer_norm" in extra:
            extra["layer_norm"] = (extra["layer_norm"][0].to(ts[0].dtype), None, 1e-5)
        y = pet_fast.bottleneck_adapter(ts[0], *ts[1:5], activation="gelu", backend=backend, **extra)
        return (y, *torch.autograd.grad(y, ts, gy.to(y.dtype)))

    assert op.cuda_reasons(op.describe(x, wd, "gelu", 1.0, leaves[5] if len(leaves) > 5 else None,
                                       kw.get("layer_norm"))) == []
    got, eager = run("cuda", leaves), run("eager", leaves)
    truth = run("eager", [t.detach().double().requires_grad_() for t in leaves])
    for a, e, t in zip(got, eager, truth):
        err, err_eager = (a.double() - t).abs().max().item(), (e.double() - t).abs().max().item()
        assert err <= 2 * err_eager + 1e-5 * t.abs().max().item(), (err, err_eager)


@pytest.mark.gpu
def test_gpu_cuda_backend_layer_norm_form_under_autocast_matches_float64():
    """Pfeiffer's site on a GPU: the float32 stream x, LN(x) in bf16 for the products (autocast), float32 sum."""
    import pet_fast

    g = torch.Generator().manual_seed(7)
    n, d, r = 300, 768, 48
    x = torch.randn(n, d, generator=g).cuda().requires_grad_()
    wd = (torch.randn(r, d, generator=g) * d ** -0.5).cuda().requires_grad_()
    wu = (torch.randn(d, r, generator=g) * r ** -0.5).cuda().requires_grad_()
    bd, bu = torch.randn(r, generator=g).cuda().requires_grad_(), torch.randn(d, generator=g).cuda().requires_grad_()
    lw, lb = torch.randn(d, generator=g).cuda(), torch.randn(d, generator=g).cuda()
    leaves = (x, wd, bd, wu, bu)
    gy = torch.randn(n, d, generator=g).cuda()

    def run(backend, ts, autocast=True):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            y = pet_fast.bottleneck_adapter(ts[0], *ts[1:], activation="relu", layer_norm=(lw.to(ts[0].dtype),
                                            lb.to(ts[0].dtype), 1e-12), backend=backend)
        return (y, *torch.autograd.grad(y, ts, gy.to(y.dtype)))

    got, eager = run("cuda", leaves), run("eager", leaves)
    truth = run("eager", [t.detach().double().requires_grad_() for t in leaves], autocast=False)
    for a, e, t in zip(got, eager, truth):
        err, err_eager = (a.double() - t).abs().max().item(), (e.double() - t).abs().max().item()
        assert err <= 2 * err_eager + 1e-5 * t.abs().max().item(), (err, err_eager)
