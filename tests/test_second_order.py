"""Gradients taken with create_graph=True (a gradient penalty) through the fused backends.

The kernels' gradients are no functions of the op's inputs to autograd: differentiated again they would be
constants, a silently wrong second-order gradient. They come back behind an Error node instead (the Python
autograd.Functions: ops/_autograd.py refuse_second_order; the C++ nodes: csrc/second_order.h): used as values
they equal eager's, differentiated they raise, naming the op. The eager backend differentiates twice;
masked_weights' backward is torch ops under create_graph, so its second order is exact on every backend."""
import importlib

import pytest
import torch
from _cpu_ext import load_cpu_module

import pet_fast
from pet_fast.ops import bottleneck_adapter as adapter_op

R = importlib.import_module("pet_fast.kernels._replay")
_node_names = importlib.import_module("test_stacked_fusion_replay")._node_names
REFUSED = "cannot be differentiated again"


def _adapter_args(seed=0, n=(2, 5), d=16, r=4):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: (torch.randn(*s, generator=g) * 0.3).requires_grad_()  # noqa: E731
    return mk(*n, d), mk(r, d), mk(r), mk(d, r), mk(d), mk(*n, d)


def _adapter(x, wd, bd, wu, bu, res):
    return pet_fast.bottleneck_adapter(x, wd, bd, wu, bu, activation="gelu", scaling=0.5, residual=res, add_input=True)


def _masked(x, w, s, b):
    return pet_fast.masked_linear(x, w, s, b, threshold=0.0)


def _masked_args(seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 5, 12, generator=g).requires_grad_(), torch.randn(10, 12, generator=g).requires_grad_(),
            torch.randn(10, 12, generator=g).requires_grad_(), torch.randn(10, generator=g).requires_grad_())


def _prefix(q, k, v, pk, pv):
    return pet_fast.prefix_attention(q, k, v, pk, pv)


def _prefix_args(seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g).requires_grad_()  # noqa: E731
    return mk(2, 2, 5, 16), mk(2, 2, 5, 16), mk(2, 2, 5, 16), mk(2, 3, 16), mk(2, 3, 16)


def _stacked(x, wd, wu, wq, wk, wv):
    return pet_fast.stacked_adapter_fusion(x, x, x, wd, None, wu, None, activation="relu", w_query=wq, w_key=wk,
                                           w_value=wv)


def _stacked_args(seed=0, d=16, k=3, r=4):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: (torch.randn(*s, generator=g) * 0.3).requires_grad_()  # noqa: E731
    return mk(2, 5, d), mk(k, r, d), mk(k, d, r), mk(d, d), mk(d, d), mk(d, d)


OPS = {"bottleneck_adapter": (_adapter, _adapter_args), "masked_linear": (_masked, _masked_args),
       "prefix_attention": (_prefix, _prefix_args), "stacked_adapter_fusion": (_stacked, _stacked_args)}


def _penalty_grads(fn, args, backend):
    """First-order gradients with create_graph=True, and the gradient of their squared norm (the penalty)."""
    with pet_fast.use_backend(backend):
        y = fn(*args)
        first = torch.autograd.grad(y.pow(2).sum(), args, create_graph=True, allow_unused=True)
        penalty = sum(g.pow(2).sum() for g in first if g is not None)
        return first, penalty


@pytest.mark.parametrize("op", sorted(OPS))
def test_fused_backward_gradients_are_refused_a_second_differentiation(op):
    fn, make = OPS[op]
    args = make()
    want, penalty = _penalty_grads(fn, args, "eager")
    if op != "prefix_attention":  # (eager: SDPA's own backward is not differentiable either)
        torch.autograd.grad(penalty, args, allow_unused=True)  # eager: twice differentiable
    got, penalty = _penalty_grads(fn, args, "triton")
    for g, w in zip(got, want):
        assert (g is None) == (w is None)
        if w is not None:  # the first-order values are the kernels' own
            torch.testing.assert_close(g.detach(), w.detach(), rtol=1e-4, atol=1e-5)
    with pytest.raises(RuntimeError, match=REFUSED):
        torch.autograd.grad(penalty, args, allow_unused=True)


def test_without_create_graph_the_gradients_are_plain_tensors():
    args = _adapter_args()
    with pet_fast.use_backend("triton"):
        grads = torch.autograd.grad(_adapter(*args).sum(), args)
    assert all(g.grad_fn is None and not g.requires_grad for g in grads)


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_masked_weights_second_order_is_exact(backend):
    """Its scores' gradient is grad * W: under create_graph the torch ops form it (not the grouped kernel), and
    a penalty on it differentiates to eager's."""
    g = torch.Generator().manual_seed(3)
    ws = [torch.randn(6, 5, generator=g).requires_grad_() for _ in range(2)]
    ss = [torch.randn(6, 5, generator=g).requires_grad_() for _ in range(2)]
    x = torch.randn(4, 5, generator=g)

    def penalty(be):
        with pet_fast.use_backend(be):
            masked = pet_fast.masked_weights(ws, ss, threshold=0.1)
            loss = sum((x @ m.t()).pow(2).sum() for m in masked)
            d_s = torch.autograd.grad(loss, ss, create_graph=True)
            return torch.autograd.grad(sum(d.pow(2).sum() for d in d_s), ws)

    for got, want in zip(penalty(backend), penalty("eager")):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def cpu_ext(tmp_path_factory):
    return load_cpu_module(tmp_path_factory)


def test_the_replayed_adapter_node_refuses_too(cpu_ext):
    """The C++ node of a recorded forward/backward pair (csrc/triton_replay.cpp ReplayBackward)."""
    args = _adapter_args(1)
    with pet_fast.use_backend("triton"), R.through_interpreter(cpu_ext):
        for _ in range(2):  # the first call records both launchers
            torch.autograd.grad(_adapter(*args).sum(), args)
        y = _adapter(*args)
        assert "BottleneckAdapterBackward" in _node_names(y)
        first = torch.autograd.grad(y.pow(2).sum(), args, create_graph=True)
    with pytest.raises(RuntimeError, match=REFUSED + r".*use_backend\('eager'\)"):
        torch.autograd.grad(sum(g.pow(2).sum() for g in first), args)
    with pet_fast.use_backend("eager"):
        want = torch.autograd.grad(_adapter(*args).pow(2).sum(), args)
    for g, w in zip(first, want):
        torch.testing.assert_close(g.detach(), w, rtol=1e-4, atol=1e-5)


def test_the_stacked_fusion_node_refuses_too(cpu_ext):
    """The stacked fusion's C++ node (csrc/stacked_fusion_replay.cpp), whose backward also runs ATen products:
    their graph would be partial (the forward's intermediates have no history)."""
    args = _stacked_args(2)
    with pet_fast.use_backend("triton"), R.through_interpreter(cpu_ext):
        for _ in range(2):
            torch.autograd.grad(_stacked(*args).sum(), args)
        y = _stacked(*args)
        assert "StackedFusionCoreBackward" in _node_names(y)
        first = torch.autograd.grad(y.pow(2).sum(), args, create_graph=True)
    with pytest.raises(RuntimeError, match="backward of stacked_adapter_fusion .*" + REFUSED):
        torch.autograd.grad(sum(g.pow(2).sum() for g in first), args)


def test_the_cuda_adapters_cpp_function_refuses_too(cpu_ext):
    """The cuda backend's adapter node (csrc/bottleneck_adapter_autograd.cpp), built for the CPU."""
    x, wd, bd, wu, bu, res = (t.detach().double().requires_grad_() for t in _adapter_args(4, n=(7,)))
    act = adapter_op.CUDA_ACT_CODES["gelu"]
    y = cpu_ext.bottleneck_adapter_composite(x, wd, bd, wu, bu, None, 0.5, res, act, True)
    first = torch.autograd.grad(y.pow(2).sum(), (x, wd, bd, wu, bu), create_graph=True)
    want = torch.autograd.grad(adapter_op.reference(x, wd, bd, wu, bu, "gelu", 0.5, res, True).pow(2).sum(),
                               (x, wd, bd, wu, bu))
    for g, w in zip(first, want):
        torch.testing.assert_close(g.detach(), w, rtol=1e-10, atol=1e-10)
    with pytest.raises(RuntimeError, match=r"backward of bottleneck_adapter \(cuda\) .*" + REFUSED):
        torch.autograd.grad(sum(g.pow(2).sum() for g in first), (x, wd))


@pytest.mark.gpu
@pytest.mark.parametrize("op", sorted(OPS))
def test_gpu_fused_gradients_refuse_a_second_differentiation(op):
    """On a GPU, where the calls after the first run as the replayed C++ nodes (the extension built): the
    create_graph gradients' values are eager's, and differentiating them raises."""
    fn, make = OPS[op]
    args = tuple(t.detach().cuda().requires_grad_() for t in make(5))
    with pet_fast.use_backend("eager"):
        want = torch.autograd.grad(fn(*args).pow(2).sum(), args, allow_unused=True)
    with pet_fast.use_backend("triton"):
        for _ in range(2):  # (records the launchers where the replay is on)
            torch.autograd.grad(fn(*args).sum(), args, allow_unused=True)
        got, penalty = _penalty_grads(fn, args, "triton")
    for g, w in zip(got, want):
        assert (g is None) == (w is None)
        if w is not None:
            torch.testing.assert_close(g.detach(), w, rtol=1e-3, atol=1e-4)
    with pytest.raises(RuntimeError, match=REFUSED):
        torch.autograd.grad(penalty, args, allow_unused=True)
