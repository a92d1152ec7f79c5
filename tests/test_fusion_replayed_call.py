"""An AdapterFusion module's repeated call as one C++ call (ops/adapter_fusion.py ReplayedStackedCall).

Once a module's stacked-op call has run as the C++ node (csrc/stacked_fusion_replay.cpp), the module keeps
that node behind a C++ guard (GuardedStackedFusion) and later calls with the same facts skip the op's Python.
On the CPU, under the Triton interpreter with a CPU build of the replay (`replay_ext`): the replayed calls
must give the Python launches' outputs and gradients bit for bit, and every fact the op's Python would have
read differently must send the call back to the op."""
import copy
import importlib
import pickle

import pytest
import torch
from conftest import assert_same_bits, fail_replayed_launches

import pet_fast
from pet_fast import dispatch

R = importlib.import_module("pet_fast.kernels._replay")
OPS = importlib.import_module("pet_fast.ops.adapter_fusion")
METHODS = importlib.import_module("pet_fast.methods.fusion")
NODE = "StackedFusionCoreBackward"
_node_names = importlib.import_module("test_stacked_fusion_replay")._node_names

D, SHAPE = 24, (3, 5)


def _fusion(dropout=0.0, **kw):
    """Three frozen adapters (their scalings numbers, as the node takes them) and a fusion layer with non-zero
    biases, so that the query's and (with dropout) the key's bias terms show."""
    torch.manual_seed(0)
    ads = [pet_fast.BottleneckAdapter(D, 3 + i, activation="relu", scaling=1.0 + 0.5 * i) for i in range(3)]
    for a in ads:
        a.requires_grad_(False)
        with torch.no_grad():
            a.w_up.normal_(0, 0.3)
    fus = pet_fast.AdapterFusion(D, dropout=dropout, **kw)
    with torch.no_grad():
        for lin in (fus.query, fus.key):
            lin.weight.normal_(0, 0.3)
            lin.bias.normal_(0, 0.3)
    return ads, fus


def _inputs(seed, shape=SHAPE, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(*shape, D, generator=g).to(dtype).requires_grad_() for k in ("x", "residual")}


def _call(fus, ads, t, **kw):
    return fus.fuse(t["x"], t["x"], t["residual"], ads, **kw)


def _step(fus, ads, t, call=_call, seed=0):
    """Output and every gradient (the inputs' and the fusion's), fresh each time; ``seed`` fixes the dropout."""
    fus.zero_grad(set_to_none=True)
    for v in t.values():
        v.grad = None
    torch.manual_seed(seed)
    y = call(fus, ads, t)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(9)).to(y.device, y.dtype)
    y.backward(dy)
    grads = {k: v.grad for k, v in t.items()}
    grads.update({k: p.grad for k, p in fus.named_parameters()})
    return y.detach(), grads


def _same(a, b):
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)
    assert_same_bits(a[1], b[1])


def _replayed_calls(fus) -> list:
    """The module's replayed calls (one per shape of x)."""
    calls = fus.__dict__.get("_replayed")
    assert calls is None or isinstance(calls, OPS.ReplayedStackedCalls)
    out = [] if calls is None else list(calls.calls.values())
    assert all(isinstance(c, OPS.ReplayedStackedCall) for c in out)
    return out


def _warm(fus, ads, call=_call):
    """Two calls: the first records the launchers, the second runs as the node and makes the replayed call."""
    for s in range(2):
        _step(fus, ads, _inputs(100 + s), call)
    assert _replayed_calls(fus)


class _OpCalls:
    """The module's op, counting its calls (the replayed call does not call it)."""

    def __init__(self, monkeypatch, fail=False):
        self.n, self.fail, self.op = 0, fail, OPS.stacked_adapter_fusion
        monkeypatch.setattr(METHODS.fusion_ops, "stacked_adapter_fusion", self)

    def __call__(self, *a, **k):
        if self.fail:
            pytest.fail("the module called the op: its replayed call was not used")
        self.n += 1
        return self.op(*a, **k)


def _half(fus, ads, t):
    with torch.autocast("cpu", dtype=torch.float16):
        return _call(fus, ads, t)


# (module options, the call): with dropout the score mask and the key bias's term t0 reach the node
FORMS = {
    "plain": (dict(), _call),
    "dropout": (dict(dropout=0.3), _call),
    "residual_before": (dict(residual_before=True), _call),
    "dropout, residual_before": (dict(dropout=0.3, residual_before=True), _call),
    "autocast fp16": (dict(), _half),
    "autocast fp16, dropout": (dict(dropout=0.3), _half),
    "autocast fp16, dropout, residual_before": (dict(dropout=0.3, residual_before=True), _half),
}


@pytest.mark.parametrize("form", sorted(FORMS))
def test_a_modules_repeated_calls_skip_the_op_and_give_the_python_launches_bits(replay_ext, monkeypatch, form):
    kw, call = FORMS[form]
    ads, fus = _fusion(**kw)
    inputs = [_inputs(s) for s in range(3)]
    with pet_fast.use_backend("triton"):
        want = [_step(fus, ads, t, call, seed=s) for s, t in enumerate(inputs)]  # launches from Python
        with R.through_interpreter(replay_ext):
            _warm(fus, ads, call)
            _OpCalls(monkeypatch, fail=True)
            got = [_step(fus, ads, t, call, seed=s) for s, t in enumerate(inputs)]
    for w, g in zip(want, got):
        _same(g, w)
    assert (fus.key.bias.grad is not None) == ("dropout" in form)  # (without a mask its term cancels: no gradient)


def test_the_replayed_call_is_the_node_itself(replay_ext):
    ads, fus = _fusion(dropout=0.3)
    with pet_fast.use_backend("triton"), R.through_interpreter(replay_ext):
        _warm(fus, ads)
        y = _call(fus, ads, _inputs(4))
    assert y.grad_fn.name() == "AddBackward0"  # the residual, added after the core
    assert NODE in _node_names(y)


def _noncontiguous(t):
    return {k: v.detach().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_() for k, v in t.items()}


def _frozen_value(fus, ads, t):
    fus.value.weight.requires_grad_(False)
    return fus, ads, t


def _dropout_on(fus, ads, t):
    fus.dropout = 0.3
    return fus, ads, t


def _gelu(fus, ads, t):
    for a in ads:
        a.activation = "gelu"
    return fus, ads, t


def _residual_float64(fus, ads, t):
    return fus, ads, {"x": t["x"], "residual": t["residual"].detach().double().requires_grad_()}


# Each case changes one fact the op's Python reads: the call must go to the op (and be right).
CHANGES = {
    "another shape": lambda fus, ads, t: (fus, ads, _inputs(5, shape=(2, 7))),
    "another dtype": lambda fus, ads, t: (fus.half(), [a.half() for a in ads], _inputs(5, dtype=torch.float16)),
    "a frozen value projection": _frozen_value,
    "another activation": _gelu,
    "dropout on": _dropout_on,
}


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_a_changed_fact_sends_the_call_to_the_op(replay_ext, monkeypatch, change):
    ads, fus = _fusion()
    with pet_fast.use_backend("triton"), R.through_interpreter(replay_ext):
        _warm(fus, ads)
        fus, ads, t = CHANGES[change](fus, ads, _inputs(5))
        calls = _OpCalls(monkeypatch)
        got = _step(fus, ads, t, seed=3)
        assert calls.n == 1
    with pet_fast.use_backend("eager"):
        want = _step(fus, ads, t, seed=3)
    tol = 2e-2 if t["x"].dtype == torch.float16 else 1e-4
    torch.testing.assert_close(got[0].float(), want[0].float(), rtol=tol, atol=tol)
    for k in ("x", "residual"):
        torch.testing.assert_close(got[1][k].float(), want[1][k].float(), rtol=tol, atol=tol)


def test_a_residual_the_op_refuses_is_refused_after_replayed_calls(replay_ext):
    """The guard sees the residual only where the core adds it; a residual of another dtype reaches the op,
    whose checks name it."""
    ads, fus = _fusion()
    with pet_fast.use_backend("triton"), R.through_interpreter(replay_ext):
        _warm(fus, ads)
        t = _residual_float64(fus, ads, _inputs(5))[2]
        with pytest.raises(TypeError, match="residual must have the dtype of query"):
            _call(fus, ads, t)


def test_new_values_with_the_same_facts_stay_replayed(replay_ext, monkeypatch):
    """Adapters changed in place (another scaling, updated weights: the stack is rebuilt, same shapes), new
    fusion weights, and a non-contiguous input (made contiguous as the op makes it) keep the replayed call, with
    the new values."""
    ads, fus = _fusion(dropout=0.3)
    t = _inputs(11)
    with pet_fast.use_backend("triton"), R.through_interpreter(replay_ext):
        _warm(fus, ads)
        ads[1].scaling = 0.25
        with torch.no_grad():
            ads[2].w_down.mul_(2.0)
            fus.value.weight.add_(0.1)
        calls = _OpCalls(monkeypatch)
        got = _step(fus, ads, _noncontiguous(t), seed=2)
        assert calls.n == 0
    with pet_fast.use_backend("eager"):
        want = _step(fus, ads, t, seed=2)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    for k, g in want[1].items():
        if g is not None:
            torch.testing.assert_close(got[1][k], g, rtol=1e-4, atol=1e-5)


def test_batches_of_alternating_shapes_each_keep_their_replayed_call(replay_ext, monkeypatch):
    """A batch padded to its longest sequence changes shape from step to step: each shape seen again finds its
    own replayed call (at most MAX_SHAPES kept, the oldest dropped first), with the Python launches' bits."""
    ads, fus = _fusion(dropout=0.3)
    shapes = [(3, 5), (2, 7), (4, 3)]
    inputs = {sh: _inputs(20 + i, shape=sh) for i, sh in enumerate(shapes)}
    with pet_fast.use_backend("triton"):
        want = {sh: _step(fus, ads, t, seed=1) for sh, t in inputs.items()}
        with R.through_interpreter(replay_ext):
            for _ in range(2):  # records, then runs as the node and keeps a replayed call, per shape
                for sh in shapes:
                    _step(fus, ads, _inputs(40, shape=sh))
            assert len(_replayed_calls(fus)) == 3
            calls = _OpCalls(monkeypatch)
            got = {sh: _step(fus, ads, t, seed=1) for sh, t in reversed(list(inputs.items()))}
            assert calls.n == 0
            monkeypatch.setattr(OPS.ReplayedStackedCalls, "MAX_SHAPES", 3)
            _step(fus, ads, _inputs(41, shape=(5, 2)))  # the op, twice (records, then the node): a fourth shape
            _step(fus, ads, _inputs(42, shape=(5, 2)))
            kept = fus.__dict__["_replayed"].calls
            assert list(kept) == [torch.Size([*sh, D]) for sh in [(2, 7), (4, 3), (5, 2)]]  # (3, 5)'s dropped
    for sh in shapes:
        _same(got[sh], want[sh])


def _no_grad(fus, ads, t):
    with torch.no_grad():
        y = _call(fus, ads, t)
    assert y.grad_fn is None
    return y


def _deterministic(fus, ads, t):
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        return _call(fus, ads, t)
    finally:
        torch.use_deterministic_algorithms(prev)


def _eager_block(fus, ads, t):
    with pet_fast.use_backend("eager"):
        y = _call(fus, ads, t)
    assert NODE not in _node_names(y)
    return y


def _replay_off(fus, ads, t):
    with R.disabled():
        return _call(fus, ads, t)


def _plans_cleared(fus, ads, t):
    dispatch.clear_plans()
    return _call(fus, ads, t)


MODES = {"no grad": _no_grad, "autocast": _half, "deterministic mode": _deterministic,
         "a use_backend block": _eager_block, "a backend argument": lambda fus, ads, t: _call(fus, ads, t, backend="triton"),
         "replay turned off": _replay_off, "the plans cleared": _plans_cleared}


@pytest.mark.parametrize("mode", sorted(MODES))
def test_a_changed_mode_sends_the_call_to_the_op(replay_ext, monkeypatch, mode):
    ads, fus = _fusion()
    t = _inputs(6)
    with pet_fast.use_backend("triton"), R.through_interpreter(replay_ext):
        _warm(fus, ads)
        calls = _OpCalls(monkeypatch)
        got = MODES[mode](fus, ads, t)
        assert calls.n == 1
        with pet_fast.use_backend("eager"):
            want = MODES[mode](fus, ads, t) if mode not in ("a use_backend block", "a backend argument") else _call(fus, ads, t)
        tol = 2e-2 if mode == "autocast" else 1e-5
        torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)
        calls.n = 0
        _call(fus, ads, t)  # back to the warmed facts: the replayed call again, or once, the op
        _call(fus, ads, t)
        # stale after replay's or the plans' generation changed; replaced by the node's call in deterministic
        # mode (the module keeps its last call's facts)
        assert calls.n == (1 if mode in ("replay turned off", "the plans cleared", "deterministic mode") else 0)


def test_copies_of_a_module_do_not_carry_its_replayed_call(replay_ext):
    ads, fus = _fusion()
    t = _inputs(7)
    with pet_fast.use_backend("triton"), R.through_interpreter(replay_ext):
        _warm(fus, ads)
        want = _call(fus, ads, t)
        for c in (copy.deepcopy(fus), pickle.loads(pickle.dumps(fus))):
            assert c.__dict__.get("_replayed") is None
            torch.testing.assert_close(_call(c, ads, t), want, rtol=0, atol=0)
    assert fus.__dict__.get("_replayed") is not None


def test_a_failing_replayed_call_warns_and_the_op_takes_over(replay_ext):
    ads, fus = _fusion(dropout=0.3)
    t = _inputs(8)
    with pet_fast.use_backend("triton"), R.through_interpreter(replay_ext):
        _warm(fus, ads)
        want = _step(fus, ads, t, seed=1)
        fail_replayed_launches()
        try:
            with pytest.warns(RuntimeWarning, match="launching from Python instead"):
                got = _step(fus, ads, t, seed=1)
            assert not R.enabled()
        finally:
            R.set_enabled(True)
    _same(got, want)


def test_folded_training_steps_of_a_model_replay_the_calls_bit_for_bit(replay_ext, monkeypatch):
    """A tiny BERT with AdapterFusion over three Pfeiffer adapters, steps under fp16 autocast with dropout on the
    scores and the fold (the key bias's term as the op's score shift): from the third step every fusion layer's
    call is replayed, and every loss and gradient equals the Python launches' bit for bit."""
    from test_methods_fusion import FOLD_BATCH, _fused_model
    from tiny_models import logits

    def run(replay: bool, steps=4):
        torch.manual_seed(0)
        model = _fused_model("pfeiffer")
        model.train()
        fusions = [m for m in model.modules() if isinstance(m, pet_fast.AdapterFusion)]
        for m in fusions:
            m.dropout = 0.2
        out = []
        for step in range(steps):
            if replay and step == 2:
                assert all(_replayed_calls(m) for m in fusions)
                _OpCalls(monkeypatch, fail=True)
            ids, mask = FOLD_BATCH
            torch.manual_seed(step)
            with pet_fast.use_backend("triton"), torch.autocast("cpu", dtype=torch.float16):
                loss = logits(model, ids, mask).float().pow(2).mean()
            loss.backward()
            out.append((loss.detach(), {k: None if p.grad is None else p.grad.clone()
                                        for k, p in model.named_parameters() if p.requires_grad}))
            model.zero_grad(set_to_none=True)
        return out

    shifts = []
    monkeypatch.setattr(METHODS, "_score_shift", lambda *a, f=METHODS._score_shift: shifts.append(a[1]) or f(*a))
    want = run(False)
    assert shifts and all(w is not None for w in shifts)  # (folded: the key bias's term as the score shift)
    with R.through_interpreter(replay_ext):
        got = run(True)
    for (lw, gw), (lg, gg) in zip(want, got):
        torch.testing.assert_close(lg, lw, rtol=0, atol=0)
        assert any(k.endswith("key.bias") and g is not None for k, g in gw.items())
        assert_same_bits(gg, gw)


def _recorded() -> int:
    return sum(len(c) for c in R._CACHES)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_an_annealed_temperature_keeps_the_replayed_call_and_records_once(replay_ext, monkeypatch, dropout):
    """temperature=True lowers the softmax temperature at every training call: folded into the key side of the
    scores (methods/fusion.py _temperature_folded), it is no constant of the recorded launches, so the calls stay
    replayed and nothing is recorded again; every step equals the eager backend's at that step's temperature."""
    ads, fus = _fusion(dropout=dropout, temperature=True)
    inputs = [_inputs(30 + s) for s in range(3)]
    with pet_fast.use_backend("triton"), R.through_interpreter(replay_ext):
        _warm(fus, ads)
        recorded = _recorded()
        _OpCalls(monkeypatch, fail=True)
        temps, got = [], []
        for s, t in enumerate(inputs):
            temps.append(fus.T)
            got.append(_step(fus, ads, t, seed=s))
        assert _recorded() == recorded and temps[0] > temps[1] > temps[2] > 1.0
    monkeypatch.undo()
    with pet_fast.use_backend("eager"):
        for s, (t, temp, g) in enumerate(zip(inputs, temps, got)):
            fus.T = temp
            w = _step(fus, ads, t, seed=s)
            torch.testing.assert_close(g[0], w[0], rtol=1e-5, atol=1e-5)
            for k, v in w[1].items():
                if v is not None:
                    torch.testing.assert_close(g[1][k], v, rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.gpu
@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gpu_replayed_fusion_calls_match_python_launches(dtype, dropout):
    """On a GPU with the extension: a module's calls through its replayed call (the guard, the node, launches from
    C++) give the Python launches' outputs and gradients bit for bit."""
    if not R.enabled() or R._extension() is None:
        pytest.skip("the extension cannot replay Triton launches here")
    ads, fus = _fusion(dropout=dropout)
    fus.to("cuda", dtype)
    ads = [a.to("cuda", dtype) for a in ads]

    def inputs(seed, shape=(4, 37)):
        return {k: v.detach().to("cuda", dtype).requires_grad_() for k, v in _inputs(seed, shape).items()}

    t = [inputs(s) for s in range(3)]
    with pet_fast.use_backend("triton"):
        with R.disabled():
            want = [_step(fus, ads, u, seed=s) for s, u in enumerate(t)]
        for s in range(2):
            _step(fus, ads, inputs(100 + s))
        assert _replayed_calls(fus)
        got = [_step(fus, ads, u, seed=s) for s, u in enumerate(t)]
    for w, g in zip(want, got):
        _same(g, w)

