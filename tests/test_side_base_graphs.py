"""SideConfig(base_graphs=...): the frozen base's forward replayed from CUDA graphs.

On the CPU the graphs are stood in for by FakeGraphs, which keeps what a CUDA graph keeps (the buffers it was
captured on, an output refilled in place at each replay), so the runner's own logic is tested: inputs copied
into the captured buffers, outputs cloned, keys, limits, recapture after a weight is replaced, eager fallbacks.
The GPU test runs real CUDA graphs against the eager base."""
import pytest
import torch

import pet_fast
from pet_fast.methods import _base_graphs
from pet_fast.methods._base_graphs import BaseGraphs
from tiny_models import batch, build



class FakeGraphs:
    """capture: run once, keep the function and its output; replay: run it again (on the buffers it was
    captured with) and write the result into that same output, as a CUDA graph's replay does."""

    def __init__(self):
        self.fail = False

    def capture(self, fn):
        if self.fail:
            raise RuntimeError("operation not permitted when stream is capturing")
        out = fn()

        def replay():
            out.copy_(fn())
        return replay, out


@pytest.fixture
def fake_graphs(monkeypatch):
    monkeypatch.setattr(_base_graphs, "CudaGraphs", FakeGraphs)
    monkeypatch.setattr(BaseGraphs, "usable", staticmethod(lambda call: any(isinstance(v, torch.Tensor) for v in call.values())))


def _pair(kind="bert", **cfg):
    """The same model twice, side-tuned alike, the second with base_graphs."""
    models = []
    for graphs in (False, cfg.pop("base_graphs", True)):
        model = build(kind)
        torch.manual_seed(5)
        pet_fast.inject(model, pet_fast.SideConfig(width=16, heads=2, base_graphs=graphs, **cfg), "s")
        torch.nn.init.normal_(_branch(model).network.proj_out.weight)  # a side output that is not 0
        model.train()
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0  # the task head's dropout (outside the base) would draw differently in the two models
        models.append(model)
    return models


def _branch(model):
    return pet_fast.models.backbone(model).pet_fast_tasks["s"]


def _graphs(model) -> BaseGraphs:
    return _branch(model).__dict__["_graphs"]


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_replays_give_the_eager_values_and_gradients(fake_graphs, kind):
    eager, graphed = _pair(kind)
    outs = []
    for seed, T in ((1, 9), (2, 9), (3, 7), (4, 9)):  # two shapes; the first one three times with other tokens
        ids, mask = batch(seed=seed, T=T)
        for model in (eager, graphed):
            model.zero_grad()
            out = model(input_ids=ids, attention_mask=mask).logits
            out.pow(2).sum().backward()
        outs.append(out.detach().clone())  # graphed
        torch.testing.assert_close(out, eager(input_ids=ids, attention_mask=mask).logits, rtol=0, atol=0)
        for (name, p), q in zip(eager.named_parameters(), graphed.parameters()):
            assert (p.grad is None) == (q.grad is None), name
            if p.grad is not None:
                torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=0, msg=name)
    g = _graphs(graphed)
    assert (g.captures, g.replays) == (2, 4)
    assert not torch.equal(outs[0], outs[1])  # a replay saw the new tokens


def test_a_kept_hidden_state_is_not_overwritten_by_the_next_replay(fake_graphs):
    # the side-tuning cache keeps each example's base output: it must be a copy, not the graph's output buffer
    eager, graphed = _pair(cache=True)
    ids, mask = batch(seed=1)
    other, _ = batch(seed=2)
    for model in (eager, graphed):
        model(input_ids=ids, attention_mask=mask, example_ids=[0, 1, 2])
        model(input_ids=other, attention_mask=mask, example_ids=[3, 4, 5])
    for key in range(6):
        torch.testing.assert_close(_branch(graphed).cache[key].hidden, _branch(eager).cache[key].hidden,
                                   rtol=0, atol=0)
    assert _graphs(graphed).replays == 2


@pytest.mark.parametrize("how", ["parameter", "data", "module"])
def test_a_replaced_weight_drops_the_graphs(fake_graphs, how):
    eager, graphed = _pair()
    ids, mask = batch()
    graphed(input_ids=ids, attention_mask=mask)
    for model in (eager, graphed):
        output = model.bert.encoder.layer[0].output
        with torch.no_grad():
            if how == "parameter":  # a new tensor in the weight's place
                output.dense.weight = torch.nn.Parameter(output.dense.weight * 2, requires_grad=False)
            elif how == "data":  # the same Parameter on new memory, as .to() and .half() do
                output.dense.weight.data = output.dense.weight.data * 2
            else:  # a new module in the old one's place
                dense = torch.nn.Linear(output.dense.in_features, output.dense.out_features).requires_grad_(False)
                dense.weight.copy_(output.dense.weight * 2)
                dense.bias.copy_(output.dense.bias)
                output.dense = dense
    torch.testing.assert_close(graphed(input_ids=ids, attention_mask=mask).logits,
                               eager(input_ids=ids, attention_mask=mask).logits, rtol=0, atol=0)
    assert _graphs(graphed).captures == 2 and len(_graphs(graphed).graphs) == 1  # dropped, captured again
    before = _graphs(graphed).captures
    with torch.no_grad():
        graphed.bert.encoder.layer[0].output.dense.weight.mul_(0.5)  # in place: the replays read the new values
        eager.bert.encoder.layer[0].output.dense.weight.mul_(0.5)
    torch.testing.assert_close(graphed(input_ids=ids, attention_mask=mask).logits,
                               eager(input_ids=ids, attention_mask=mask).logits, rtol=0, atol=0)
    assert _graphs(graphed).captures == before


def test_shapes_past_the_limit_and_calls_asking_for_more_run_eagerly(fake_graphs):
    eager, graphed = _pair(base_graphs=1)
    for T in (9, 7):
        ids, mask = batch(T=T)
        torch.testing.assert_close(graphed(input_ids=ids, attention_mask=mask).logits,
                                   eager(input_ids=ids, attention_mask=mask).logits, rtol=0, atol=0)
    g = _graphs(graphed)
    assert (g.captures, g.replays, len(g.graphs)) == (1, 1, 1)
    ids, mask = batch(T=9)
    out = graphed(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    assert out.hidden_states is not None and g.replays == 1  # the eager base's hidden states, not a replay


def test_a_failed_capture_warns_once_and_runs_eagerly(fake_graphs):
    eager, graphed = _pair()
    ids, mask = batch()
    graphed(input_ids=ids, attention_mask=mask)  # creates the runner
    g = _graphs(graphed)
    g.clear()
    g.backend.fail = True
    with pytest.warns(RuntimeWarning, match="could not be captured"):
        out = graphed(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(out, eager(input_ids=ids, attention_mask=mask).logits, rtol=0, atol=0)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        graphed(input_ids=ids, attention_mask=mask)  # the signature is known to fail: no second try, no warning
    assert g.captures == 1 and len(g.failed) == 1 and not g.graphs  # the first call's capture only


def test_calls_under_inference_mode_have_graphs_of_their_own(fake_graphs):
    # an evaluation under torch.inference_mode() between training steps: its buffers are inference tensors,
    # which a training call could not refill
    eager, graphed = _pair()
    ids, mask = batch()
    with torch.inference_mode():
        graphed(input_ids=ids, attention_mask=mask)
    out = graphed(input_ids=ids, attention_mask=mask).logits
    out.sum().backward()
    torch.testing.assert_close(out, eager(input_ids=ids, attention_mask=mask).logits, rtol=0, atol=0)
    assert _graphs(graphed).captures == 2


def test_the_cpu_runs_the_eager_base_whatever_the_config():
    model = build("bert")
    pet_fast.inject(model, pet_fast.SideConfig(width=16, heads=2, base_graphs=True), "s")
    ids, mask = batch()
    model(input_ids=ids, attention_mask=mask)
    assert "_graphs" not in _branch(model).__dict__ or _graphs(model).captures == 0


def test_config_values():
    assert pet_fast.SideConfig(base_graphs=True).base_graphs == 8
    assert pet_fast.SideConfig().base_graphs == 0
    assert pet_fast.SideConfig(base_graphs=3).base_graphs == 3
    for bad in (-1, 1.5, "yes"):
        with pytest.raises(ValueError, match="base_graphs"):
            pet_fast.SideConfig(base_graphs=bad)
    with pytest.raises(ValueError, match="max_graphs"):
        BaseGraphs(lambda: [], max_graphs=0)


@pytest.mark.gpu
@pytest.mark.parametrize("autocast", [False, True])
def test_gpu_cuda_graph_replays_match_the_eager_base(autocast):
    eager, graphed = (m.cuda() for m in _pair())
    for seed, T in ((1, 9), (2, 9), (3, 9), (4, 7)):
        ids, mask = (t.cuda() for t in batch(seed=seed, T=T))
        if seed == 3:
            mask.fill_(1)  # no padding: captured with the mask materialised, the eager base skips it
        results = []
        for model in (eager, graphed):
            model.zero_grad()
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                out = model(input_ids=ids, attention_mask=mask).logits
            out.float().pow(2).sum().backward()
            results.append((out.detach().float(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
        (a, ga), (b, gb) = results
        tol = dict(rtol=2e-2, atol=2e-2) if autocast else dict(rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(b, a, **tol)
        assert len(ga) == len(gb)
        for x, y in zip(ga, gb):
            torch.testing.assert_close(y, x, **tol)
    g = _graphs(graphed)
    assert (g.captures, g.replays) == (2, 4)


def test_torch_compile_traces_the_eager_base_whole(fake_graphs):
    # fullgraph=True: the graphs' host-side runner must stay out of the traced code (is_compiling)
    torch._dynamo.reset()
    try:
        eager, graphed = _pair()
        ids, mask = batch()
        compiled = torch.compile(graphed, fullgraph=True, backend="aot_eager")
        out = compiled(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(out, eager(input_ids=ids, attention_mask=mask).logits, rtol=1e-5, atol=1e-6)
        assert "_graphs" not in _branch(graphed).__dict__
    finally:
        torch._dynamo.reset()


def test_graphs_hold_the_base_alone_other_active_tasks_run_it_eagerly(fake_graphs):
    """With another task active in the base (an adapter), the base runs eagerly: a graph captured with the
    adapter kept computing it after it was switched off or removed."""
    eager, graphed = _pair()
    for model in (eager, graphed):
        torch.manual_seed(6)  # the same adapter in both
        pet_fast.inject(model, pet_fast.AdapterConfig(train_head=False, init="bert"), "a")
        pet_fast.set_active(model, ["s", "a"])
    ids, mask = batch()
    for step in ("both", "side alone", "adapter removed"):
        if step == "side alone":
            for model in (eager, graphed):
                pet_fast.set_active(model, "s")
        elif step == "adapter removed":
            for model in (eager, graphed):
                pet_fast.remove(model, "a")
        with torch.no_grad():  # (training the two tasks together is refused: the side task's base has no grad)
            torch.testing.assert_close(graphed(input_ids=ids, attention_mask=mask).logits,
                                       eager(input_ids=ids, attention_mask=mask).logits, rtol=0, atol=0, msg=step)
        graphs = _branch(graphed).__dict__.get("_graphs")
        # (FakeGraphs re-runs the Python at a replay, which a CUDA graph does not: count the captures)
        captures = 0 if graphs is None else graphs.captures
        assert captures == 0 if step == "both" else captures >= 1, step
