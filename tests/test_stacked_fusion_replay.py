"""The stacked AdapterFusion core as one C++ autograd node (csrc/stacked_fusion_replay.cpp).

Once calls through the op's autograd.Function have recorded both of the core's launchers
(kernels/_replay.py), later calls run the forward program, the value projection and, in the backward,
dctx = dout @ Wv in float32, the projection's gradients and the backward program, in C++. On the CPU,
under the Triton interpreter with a CPU build (`replay_ext`): outputs and every gradient must equal,
bit for bit, those of the same calls through the Function with every launch from Python."""
import importlib

import pytest
import torch
from conftest import assert_same_bits, fail_replayed_launches


R = importlib.import_module("pet_fast.kernels._replay")
TK = importlib.import_module("test_kernels_adapter_fusion")
NODE = "StackedFusionCoreBackward"


def _node_names(out):
    """Every node's name behind ``out`` (a C++ node's Python type is generic: its name() tells it)."""
    names, todo, seen = set(), [out.grad_fn], set()
    while todo:
        f = todo.pop()
        if f is not None and f not in seen:
            seen.add(f)
            names.add(f.name())
            todo += [n for n, _ in f.next_functions]
    return names


def _run(case, dtype, kw, seeds):
    """Output and gradients of calls on fresh inputs of each seed (the triton backend)."""
    out = []
    for s in seeds:
        lo = TK.make_case((3, 5), 24, 5, 3, dtype, seed=s, **case)[1]
        for name in kw.get("frozen", ()):
            lo[name].requires_grad_(False)
        y = TK.call(lo, "triton", **{a: b for a, b in kw.items() if a != "frozen"})
        dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(7)).to(dtype)
        names = [a for a, b in lo.items() if isinstance(b, torch.Tensor) and b.requires_grad]
        g = torch.autograd.grad(y, [lo[a] for a in names], dy, allow_unused=True)
        out.append((y.detach(), dict(zip(names, g)), _node_names(y)))
    return out


# (make_case options, call options and tensors frozen, whether the node takes the calls). A trained scaling's
# gradient is a torch sum in the backward launcher, which is then not recorded: those calls keep the Function.
FORMS = [
    (dict(), dict(frozen=("scaling",)), True),  # projections, value bias, per-adapter scaling, residual after
    (dict(), dict(residual_before=True, frozen=("scaling",)), True),  # residual added before the value projection
    (dict(value_bias=False, scaling="number"), dict(), True),
    (dict(scaling="scalar"), dict(frozen=("scaling", "w_down", "b_down", "w_up", "b_up")), True),  # frozen adapters
    (dict(proj=False), dict(frozen=("scaling",)), True),  # no projections: ctx itself, the residual added after
    (dict(), dict(frozen=("scaling", "w_value")), True),
    (dict(folded=True), dict(frozen=("scaling",)), True),  # the folded query-key product (its bias in the node)
    (dict(folded=True), dict(frozen=("scaling", "b_query_key")), True),
    (dict(folded=True, query_is_x=True), dict(frozen=("scaling",)), True),  # x's two gradients in one addmm
    # a score mask (dropout on the scores): with the key bias's shared term t0 (its gradient from the backward
    # program), with a residual added before the fusion's too, and folded without a t0
    (dict(), dict(score_mask=TK.score_mask((3, 5), 3), frozen=("scaling",)), True),
    (dict(), dict(score_mask=TK.score_mask((3, 5), 3), residual_before=True, frozen=("scaling", "b_key")), True),
    (dict(folded=True, query_is_x=True), dict(score_mask=TK.score_mask((3, 5), 3), frozen=("scaling",)), True),
    (dict(folded=True, query_is_x=True, shift=True), dict(score_mask=TK.score_mask((3, 5), 3), frozen=("scaling",)),
     True),  # folded, the key bias's term given as the score shift (t0 itself)
    (dict(), dict(), False),  # the scaling trains
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case,kw,node", FORMS)
def test_the_cpp_node_gives_the_functions_bits(replay_ext, case, kw, node, dtype):
    seeds = [0, 1, 2, 3]
    want = _run(case, dtype, dict(kw), seeds)  # every launch from Python (replay is off for CPU tensors)
    assert all(NODE not in w[2] for w in want)
    with R.through_interpreter(replay_ext):
        got = _run(case, dtype, dict(kw), seeds)  # records the launchers, then runs the node
    assert [NODE in g[2] for g in got] == [False] + [node] * 3
    for (yw, gw, _), (yg, gg, _) in zip(want, got):
        torch.testing.assert_close(yg, yw, rtol=0, atol=0)
        assert_same_bits(gg, gw)


def test_the_node_keeps_only_what_its_backward_reads(replay_ext):
    import gc
    import weakref

    with R.through_interpreter(replay_ext):
        _run(dict(), torch.float32, dict(residual_before=True, frozen=("scaling",)), [0, 1])
        lo = TK.make_case((3, 5), 24, 5, 3, torch.float32, seed=2)[1]
        lo["scaling"].requires_grad_(False)
        res = lo["residual"] * 1.0  # not a leaf: only what holds it keeps it
        lo["residual"] = res
        y = TK.call(lo, "triton", residual_before=True)
        assert NODE in _node_names(y)
        ref = weakref.ref(res)
        del lo["residual"], res
        gc.collect()
        assert ref() is None  # an input of the node (through a view), never read by its backward
        y.sum().backward()
        assert lo["w_value"].grad is not None


def test_calls_without_grad_or_through_the_custom_ops_do_not_take_the_node(replay_ext, monkeypatch):
    with R.through_interpreter(replay_ext):
        _run(dict(), torch.float32, dict(frozen=("scaling",)), [0, 1])
        lo = TK.make_case((3, 5), 24, 5, 3, torch.float32, seed=4)[1]
        lo["scaling"].requires_grad_(False)
        with torch.no_grad():
            assert TK.call(lo, "triton").grad_fn is None
        assert NODE in _node_names(TK.call(lo, "triton"))
        monkeypatch.setenv("PET_FAST_CUSTOM_OPS", "1")  # the custom ops, as compiled code calls them
        names = _node_names(TK.call(lo, "triton"))
        assert NODE not in names and "StackedFusionCoreTritonBackward" not in names


def test_a_failing_node_warns_and_the_function_takes_over(replay_ext):
    with R.through_interpreter(replay_ext):
        want = _run(dict(), torch.float32, dict(frozen=("scaling",)), [0, 1, 5])[2]
    with R.through_interpreter(replay_ext):
        _run(dict(), torch.float32, dict(frozen=("scaling",)), [0, 1])
        fail_replayed_launches()
        try:
            with pytest.warns(RuntimeWarning, match="launching from Python instead"):
                got = _run(dict(), torch.float32, dict(frozen=("scaling",)), [5])[0]
            assert not R.enabled() and NODE not in got[2]
        finally:
            R.set_enabled(True)
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("folded,masked", [(False, False), (True, False), (False, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gpu_cpp_fusion_node_matches_the_function(dtype, folded, masked):
    """The node (folded, or with a score mask: dropout on the scores) against the Function's Python launches."""
    if not R.enabled() or R._extension() is None:
        pytest.skip("the extension cannot replay Triton launches here")
    mask = dict(score_mask=TK.score_mask((4, 37), 3, device="cuda")) if masked else {}

    def run(seeds):
        out = []
        for s in seeds:
            lo = TK.make_case((4, 37), 64, 16, 3, dtype, device="cuda", seed=s, folded=folded, query_is_x=folded)[1]
            lo["scaling"].requires_grad_(False)  # (a trained scaling keeps the Function)
            y = TK.call(lo, "triton", **mask)
            dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(7)).to("cuda", dtype)
            names = [a for a, b in lo.items() if isinstance(b, torch.Tensor) and b.requires_grad]
            out.append((y.detach(), torch.autograd.grad(y, [lo[a] for a in names], dy, allow_unused=True),
                        _node_names(y)))
        return out

    with R.disabled():
        want = run([0, 1, 2])
    got = run([10, 11] + [0, 1, 2])[2:]
    assert all(NODE in g[2] for g in got)
    for (yw, gw, _), (yg, gg, _) in zip(want, got):
        torch.testing.assert_close(yg, yw, rtol=0, atol=0)
        for a, b in zip(gg, gw):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_training_steps_through_the_node_give_the_python_launches_gradients(replay_ext, dropout):
    """A tiny BERT with AdapterFusion over three Pfeiffer adapters (frozen, as AdapterFusion trains), three
    steps under fp16 autocast on the triton backend: through the recorded programs and the C++ node (from
    the second step) every loss and gradient equals, bit for bit, the same steps' with Python launches. With
    dropout on the scores (the same seed: the same masks), the key bias trains too."""
    import pet_fast
    from test_methods_fusion import _fused_model
    from tiny_models import batch, logits

    def run(replay: bool):
        torch.manual_seed(0)
        model = _fused_model("pfeiffer")
        model.train()
        for mod in model.modules():
            if isinstance(mod, pet_fast.AdapterFusion):
                mod.dropout = dropout
        out, names = [], set()
        for step in range(3):
            ids, mask = batch(seed=step)
            with pet_fast.use_backend("triton"), torch.autocast("cpu", dtype=torch.float16):
                loss = logits(model, ids, mask).float().pow(2).mean()
            names |= _node_names(loss)
            loss.backward()
            # (without dropout the key projection's bias cancels in the softmax: the fused path leaves it no
            # gradient)
            out.append((loss.detach(), {k: None if p.grad is None else p.grad.clone()
                                        for k, p in model.named_parameters() if p.requires_grad}))
            model.zero_grad(set_to_none=True)
        return out, names

    want, names_py = run(False)
    with R.through_interpreter(replay_ext):
        got, names = run(True)
    assert NODE in names and NODE not in names_py
    for (lw, gw), (lg, gg) in zip(want, got):
        torch.testing.assert_close(lg, lw, rtol=0, atol=0)
        assert any(k.endswith("value.weight") and g is not None for k, g in gw.items())  # the fusion's weights train
        assert any(k.endswith("key.bias") and g is not None for k, g in gw.items()) == (dropout > 0)
        assert_same_bits(gg, gw)


def _saved_by_the_node(replay_ext, dtype) -> list:
    """(shape, dtype) of every tensor a call that runs as the node saves (saved-tensor hooks)."""
    saved = []

    def pack(t):
        saved.append((tuple(t.shape), t.dtype))
        return t

    with R.through_interpreter(replay_ext):
        _run(dict(), dtype, dict(frozen=("scaling",)), [0, 1])
        lo = TK.make_case((3, 5), 24, 5, 3, dtype, seed=3)[1]
        lo["scaling"].requires_grad_(False)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = TK.call(lo, "triton")
        assert NODE in _node_names(y) and "FusionQkF32Backward" not in str(_node_names(y))
    return saved


def test_for_half_precision_the_node_keeps_q_not_the_float32_qk(replay_ext):
    """fp16: the node forms qk = q @ w_key in float32 itself and saves q (N x d fp16) for its backward, not
    the float32 qk (twice the bytes), which it forms again there: no (N, d) float32 tensor is saved."""
    saved = _saved_by_the_node(replay_ext, torch.float16)
    assert ((15, 24), torch.float16) in saved  # q (and x)
    assert ((15, 24), torch.float32) not in saved


def test_the_nodes_own_tensors_go_through_saved_tensor_hooks(replay_ext):
    """What the node keeps of its forward (the down-projections a, the probabilities p, the value projection's
    input) is saved as autograd's saved variables, as the Function saves it: saved-tensor hooks (gradient
    checkpointing, offloading to the host) see all of it, and it is not kept alive behind them."""
    saved = _saved_by_the_node(replay_ext, torch.float32)
    rp = importlib.import_module("pet_fast.kernels.stacked_adapter_fusion").padded_r(5)
    assert ((15, 3, rp), torch.float32) in saved and ((15, 3), torch.float32) in saved  # a and p
    assert saved.count(((15, 24), torch.float32)) >= 2  # x, and pre (ctx + residual, the value projection's input)
