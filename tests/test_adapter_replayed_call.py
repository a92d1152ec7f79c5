"""An adapter module's repeated call as one C++ call (ops/bottleneck_adapter.py ReplayedCall).

Once a module's call has run as the triton backend's C++ autograd node (kernels/_replay.py), the module
keeps that node behind a C++ guard (csrc/triton_replay.cpp GuardedReplay) and later calls with the same
facts skip the op's Python. On the CPU, under the Triton interpreter with a CPU build of the replay
(`replay_ext`): the replayed calls must give the Python launches' outputs and gradients bit for bit, and
every fact the op's Python would have read differently must send the call back to the op."""
import copy
import importlib
import pickle

import pytest
import torch
from conftest import assert_same_bits, fail_replayed_launches

import pet_fast
from pet_fast import dispatch

R = importlib.import_module("pet_fast.kernels._replay")
OPS = importlib.import_module("pet_fast.ops.bottleneck_adapter")
METHODS = importlib.import_module("pet_fast.methods.adapter")

D, RANK, SHAPE = 40, 6, (2, 7)


def _module(**kw):
    torch.manual_seed(0)
    m = METHODS.BottleneckAdapter(D, RANK, activation="gelu", init="bert", **kw)
    with torch.no_grad():  # non-zero biases, so that their gradients and the output's bias terms show
        for b in (m.b_down, m.b_up):
            b.normal_()
    return m


def _inputs(seed, shape=SHAPE, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(*shape, D, generator=g).to(dtype).requires_grad_() for k in ("h", "x")}


def _houlsby(m, t, **kw):
    """The Houlsby site's call: h + x + A(h)."""
    return m(t["h"], residual=t["x"], add_input=True, **kw)


def _step(m, t, call=_houlsby):
    """Output and every gradient (inputs' and parameters'), fresh each time."""
    m.zero_grad(set_to_none=True)
    for v in t.values():
        v.grad = None
    y = call(m, t)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(9)).to(y.device, y.dtype)
    y.backward(dy)
    grads = {k: v.grad for k, v in t.items()}
    grads.update({k: p.grad for k, p in m.named_parameters()})
    return y.detach(), grads, y.grad_fn


def _same(a, b):
    ya, ga, _ = a
    yb, gb, _ = b
    torch.testing.assert_close(ya, yb, rtol=0, atol=0)
    assert_same_bits(ga, gb)


def _warm(m, call=_houlsby):
    """Two steps: the first records the launchers, the second runs as the node and makes the ReplayedCall."""
    for s in range(2):
        _step(m, _inputs(100 + s), call)
    assert isinstance(m.__dict__.get("_replayed"), OPS.ReplayedCall)


class _OpCalls:
    """The module's op, counting its calls (the ReplayedCall does not call it)."""

    def __init__(self, monkeypatch, fail=False):
        self.n, self.fail, self.op = 0, fail, METHODS.bottleneck_adapter
        monkeypatch.setattr(METHODS, "bottleneck_adapter", self)

    def __call__(self, *a, **k):
        if self.fail:
            pytest.fail("the module called the op: its replayed call was not used")
        self.n += 1
        return self.op(*a, **k)


def test_a_modules_repeated_calls_skip_the_op_and_give_the_python_launches_bits(replay_ext, monkeypatch):
    m = _module(scaling="channel")
    inputs = [_inputs(s) for s in range(3)]
    with pet_fast.use_backend("triton"):
        want = [_step(m, t) for t in inputs]  # every launch from Python (replay is off for CPU tensors)
        assert want[0][2].name() != "BottleneckAdapterBackward"
        with R.through_interpreter(replay_ext):
            _warm(m)
            _OpCalls(monkeypatch, fail=True)
            got = [_step(m, t) for t in inputs]
    for w, g in zip(want, got):
        _same(g, w)
        # the node's output and the inputs' gradients in the inputs' (2, 7, d) shape, no view nodes
        assert g[2].name() == "BottleneckAdapterBackward"
        assert {f.name() for f, _ in g[2].next_functions if f is not None} == {"torch::autograd::AccumulateGrad"}


def _pfeiffer(eps=1e-5, affine=True):
    g = torch.Generator().manual_seed(4)
    w = torch.randn(D, generator=g) if affine else None
    b = torch.randn(D, generator=g) if affine else None

    def call(m, t):
        return m(t["h"], layer_norm=(w, b, eps))
    return call


def test_the_pfeiffer_form_replays_too(replay_ext, monkeypatch):
    m = _module()
    t = _inputs(3)
    with pet_fast.use_backend("triton"):
        want = _step(m, t, _pfeiffer())
        with R.through_interpreter(replay_ext):
            _warm(m, _pfeiffer())
            calls = _OpCalls(monkeypatch)
            _same(_step(m, t, _pfeiffer()), want)
            assert calls.n == 0
            _step(m, t, _pfeiffer(eps=1e-6))  # another eps: the op
            assert calls.n == 1
            _step(m, t, _pfeiffer(affine=False))  # no LayerNorm weight: the op
            assert calls.n == 2


def _noncontiguous(t):
    return {k: v.detach().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_() for k, v in t.items()}


# Each case changes one fact the op's Python reads: the call must go to the op (and be right).
CHANGES = {
    "another shape": lambda m, t: (m, _inputs(5, shape=(3, 5))),
    "another dtype": lambda m, t: (m, _inputs(5, dtype=torch.float16)),
    "a frozen weight": lambda m, t: ((m.w_up.requires_grad_(False), m)[1], t),
    "a non-contiguous input": lambda m, t: (m, _noncontiguous(t)),
    "another scaling": lambda m, t: (setattr(m, "scaling", 0.5) or m, t),
    "another activation": lambda m, t: (setattr(m, "activation", "relu") or m, t),
}


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_a_changed_fact_sends_the_call_to_the_op(replay_ext, monkeypatch, change):
    m = _module()
    with pet_fast.use_backend("triton"), R.through_interpreter(replay_ext):
        _warm(m)
        m2, t = CHANGES[change](m, _inputs(5))
        calls = _OpCalls(monkeypatch)
        got = _step(m2, t)
        assert calls.n == 1
    ref = _step(m2, {k: v.detach().double().requires_grad_() for k, v in t.items()},
                lambda mm, tt: pet_fast.bottleneck_adapter(
                    tt["h"], *(p.double() if p is not None else None for p in (mm.w_down, mm.b_down, mm.w_up, mm.b_up)),
                    activation=mm.activation, scaling=mm.scaling, residual=tt["x"], add_input=True, backend="eager"))
    tol = 2e-2 if t["h"].dtype == torch.float16 else 1e-5
    torch.testing.assert_close(got[0].double(), ref[0], rtol=tol, atol=tol)
    for k in ("h", "x"):
        torch.testing.assert_close(got[1][k].double(), ref[1][k], rtol=tol, atol=tol)


def _no_grad(m, t):
    with torch.no_grad():
        y = _houlsby(m, t)
    assert y.grad_fn is None
    return y


def _autocast(m, t):
    with torch.autocast("cpu", dtype=torch.float16):
        return _houlsby(m, t)


def _deterministic(m, t):
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        return _houlsby(m, t)
    finally:
        torch.use_deterministic_algorithms(prev)


def _eager_block(m, t):
    with pet_fast.use_backend("eager"):
        y = _houlsby(m, t)
    assert y.grad_fn.name() != "BottleneckAdapterBackward"
    return y


def _replay_off(m, t):
    with R.disabled():
        return _houlsby(m, t)


def _plans_cleared(m, t):
    dispatch.clear_plans()
    return _houlsby(m, t)


MODES = {"no grad": _no_grad, "autocast": _autocast, "deterministic mode": _deterministic,
         "a use_backend block": _eager_block, "a backend argument": lambda m, t: _houlsby(m, t, backend="triton"),
         "add_input off": lambda m, t: m(t["h"], residual=t["x"]), "replay turned off": _replay_off,
         "the plans cleared": _plans_cleared}


@pytest.mark.parametrize("mode", sorted(MODES))
def test_a_changed_mode_sends_the_call_to_the_op(replay_ext, monkeypatch, mode):
    m = _module()
    t = _inputs(6)
    with pet_fast.use_backend("triton"), R.through_interpreter(replay_ext):
        _warm(m)
        calls = _OpCalls(monkeypatch)
        got = MODES[mode](m, t)
        assert calls.n == 1
        with pet_fast.use_backend("eager"):
            want = MODES[mode](m, t) if mode not in ("a use_backend block", "a backend argument") else _houlsby(m, t)
        tol = 2e-2 if mode == "autocast" else 1e-5
        torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)
        calls.n = 0
        _houlsby(m, t)  # back to the warmed facts: the replayed call again, or once, the op
        _houlsby(m, t)
        # stale after replay's or the plans' generation changed; replaced by the node's call in deterministic
        # mode (the module keeps its last call's facts)
        assert calls.n == (1 if mode in ("replay turned off", "the plans cleared", "deterministic mode") else 0)


def test_copies_of_a_module_do_not_carry_its_replayed_call(replay_ext):
    m = _module()
    t = _inputs(7)
    with pet_fast.use_backend("triton"), R.through_interpreter(replay_ext):
        _warm(m)
        want = _houlsby(m, t)
        for c in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
            assert c.__dict__.get("_replayed") is None
            torch.testing.assert_close(_houlsby(c, t), want, rtol=0, atol=0)
    assert m.__dict__.get("_replayed") is not None  # (the original keeps it; its generation is stale now)


def test_a_failing_replayed_call_warns_and_the_op_takes_over(replay_ext, monkeypatch):
    m = _module()
    t = _inputs(8)
    with pet_fast.use_backend("triton"), R.through_interpreter(replay_ext):
        _warm(m)
        want = _step(m, t)
        fail_replayed_launches()
        try:
            with pytest.warns(RuntimeWarning, match="launching from Python instead"):
                got = _step(m, t)
            assert not R.enabled()
        finally:
            R.set_enabled(True)
    _same(got, want)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gpu_replayed_module_calls_match_python_launches(dtype):
    """On a GPU with the extension: a module's steps through its replayed call (cuLaunchKernel from C++, the
    guard, the node) give the Python launches' outputs and gradients bit for bit."""
    if not R.enabled() or R._extension() is None:
        pytest.skip("the extension cannot replay Triton launches here")
    m = _module().to("cuda", dtype)

    def inputs(seed, shape=(3, 37)):
        return {k: v.detach().to("cuda", dtype).requires_grad_() for k, v in _inputs(seed, shape).items()}

    t = [inputs(s) for s in range(3)]
    with pet_fast.use_backend("triton"):
        with R.disabled():
            want = [_step(m, u) for u in t]
        for s in range(2):
            _step(m, inputs(100 + s))
        assert isinstance(m.__dict__.get("_replayed"), OPS.ReplayedCall)
        got = [_step(m, u) for u in t]
    for w, g in zip(want, got):
        assert g[2].name() == "BottleneckAdapterBackward"
        _same(g, w)


def test_a_functional_call_through_the_node_does_not_keep_its_output_alive(replay_ext):
    import gc
    import weakref

    m = _module()
    with pet_fast.use_backend("triton"), R.through_interpreter(replay_ext):
        _warm(m)
        t = _inputs(9)
        p = m._parameters
        y = pet_fast.bottleneck_adapter(t["h"], p["w_down"], p["b_down"], p["w_up"], p["b_up"], activation="gelu",
                                        residual=t["x"], add_input=True)
        assert y.grad_fn.name() == "BottleneckAdapterBackward"  # the op's remembered node, called directly
        ref = weakref.ref(y)
        del y
        gc.collect()
        assert ref() is None


def test_a_dual_tensor_is_not_replayed(replay_ext):
    """Forward-mode AD: the C++ node carries no tangent, so a call with a dual tensor is not replayed; the
    op's dispatch then refuses the triton backend by name (and auto would take eager, which has the tangent)."""
    import torch.autograd.forward_ad as fwAD

    from pet_fast.dispatch import BackendUnavailableError

    m = _module()
    t = _inputs(10)
    with pet_fast.use_backend("triton"), R.through_interpreter(replay_ext):
        _warm(m)
        with pytest.raises(BackendUnavailableError, match="forward-mode AD is on"):
            with fwAD.dual_level():
                _houlsby(m, {"h": fwAD.make_dual(t["h"].detach(), torch.ones_like(t["h"])), "x": t["x"]})
        _houlsby(m, t)  # and the replayed call afterwards
    with fwAD.dual_level():  # auto: eager, with the tangent
        y = _houlsby(m, {"h": fwAD.make_dual(t["h"].detach(), torch.ones_like(t["h"])), "x": t["x"].detach()})
        tangent = fwAD.unpack_dual(y).tangent
    eps = 1e-3
    h = t["h"].detach().double()
    f = lambda z: pet_fast.bottleneck_adapter(  # noqa: E731
        z, *(p.detach().double() for p in (m.w_down, m.b_down, m.w_up, m.b_up)), activation="gelu",
        residual=t["x"].detach().double(), add_input=True, backend="eager")
    torch.testing.assert_close(tangent.double(), (f(h + eps) - f(h - eps)) / (2 * eps), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("use_reentrant", [False, True])
@pytest.mark.parametrize("placement", ["houlsby", "pfeiffer"])
def test_gradient_checkpointing_with_the_replayed_node(replay_ext, placement, use_reentrant):
    """Under gradient checkpointing each layer runs again in the backward. In the first step the backward
    launchers record their programs during the backward, after the later layers' recomputation and before the
    earlier ones': a recomputed layer must still take its forward's path (the Function, not the C++ node, which
    keeps other tensors; torch.utils.checkpoint refuses a recomputation that saves different ones). Later steps
    run the node, and every step's gradients are those of the same steps without checkpointing."""
    from tiny_models import batch, build, logits

    def run(ckpt: bool):
        torch.manual_seed(0)
        model = build("bert")
        pet_fast.inject(model, pet_fast.AdapterConfig(placement=placement, init="bert"), "a")
        model.train()
        if ckpt:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": use_reentrant})
        out, names = [], set()
        for step in range(3):
            ids, mask = batch(B=4, seed=step)
            with pet_fast.use_backend("triton"):  # (the recomputation in the backward takes the backend too)
                loss = logits(model, ids, mask).float().pow(2).mean()
                names |= {type(m.__dict__.get("_replayed")).__name__ for m in model.modules()
                          if isinstance(m, METHODS.BottleneckAdapter)}
                loss.backward()
            out.append((loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}))
            model.zero_grad(set_to_none=True)
        return out, names

    with R.through_interpreter(replay_ext):
        want, _ = run(False)
    with R.through_interpreter(replay_ext):  # (nothing recorded yet: the first step records in its backward)
        got, names = run(True)
    assert "ReplayedCall" in names  # (made by the second step's forward, or its recomputation where the forward runs
    # without gradients: reentrant checkpointing)
    for (lw, gw), (lg, gg) in zip(want, got):
        torch.testing.assert_close(lg, lw, rtol=0, atol=0)
        assert gw.keys() == gg.keys()
        for k in gw:
            torch.testing.assert_close(gg[k], gw[k], rtol=1e-5, atol=1e-7)
