"""Whole models with each method attached compile with ``torch.compile(fullgraph=True)``: no graph
break from pet_fast code, forward and backward, same outputs and gradients as the uncompiled model.
``aot_eager`` traces forward and backward without code generation, so the check is fast on the CPU."""
import copy

import pytest
import torch

import pet_fast
from tiny_models import Logits, batch, build, logits

@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Every model here runs through transformers' same wrapper functions: without a reset, the compiled
    variants pile up on those code objects until dynamo's recompile limit (8 in torch 2.11) refuses one."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


CASES = [("bert", m) for m in ("houlsby", "pfeiffer", "parallel", "fusion", "side", "mask", "prefix")]
CASES += [("llama", m) for m in ("houlsby", "parallel", "fusion", "side", "mask", "prefix")]


def _prepared(kind, method, device="cpu"):
    model = build(kind, num_labels=2)
    if method == "fusion":
        for n in ("a", "b", "c"):
            pet_fast.inject(model, pet_fast.AdapterConfig(placement="pfeiffer", bottleneck=4), n)
        pet_fast.inject(model, pet_fast.FusionConfig(adapters=["a", "b", "c"], dropout_prob=0.0), "t")
    else:
        cfg = {"houlsby": pet_fast.AdapterConfig(placement="houlsby", bottleneck=4),
               "pfeiffer": pet_fast.AdapterConfig(placement="pfeiffer", bottleneck=4),
               "parallel": pet_fast.AdapterConfig(placement="parallel", bottleneck=4),
               "side": pet_fast.SideConfig(width=16, heads=2),
               "side-cache": pet_fast.SideConfig(width=16, heads=2, cache=True),
               "mask": pet_fast.MaskConfig(),
               "prefix": pet_fast.PrefixConfig(prefix_length=5)}[method]
        pet_fast.inject(model, cfg, "t")
    for m in model.modules():  # train mode (the training code paths) without randomness
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model.to(device).train()


def _run(model, fn, ids, mask, labels, **kw):
    out = fn(input_ids=ids, attention_mask=mask, labels=labels, **kw)
    out.loss.backward()
    trained = {k: p for k, p in model.named_parameters() if p.requires_grad}
    # only a fusion's key bias gets no gradient: it cancels in the softmax, and the op does not take it
    assert all(k.endswith(".t.key.bias") for k, p in trained.items() if p.grad is None)
    grads = {k: p.grad.clone() for k, p in trained.items() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out.logits.detach(), grads


@pytest.mark.parametrize("kind,method", CASES)
def test_fullgraph_forward_backward_matches_eager(kind, method):
    model = _prepared(kind, method)
    ids, mask = batch(pad_left=kind == "llama")
    labels = torch.tensor([0, 1, 0])
    ref_logits, ref_grads = _run(model, model, ids, mask, labels)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")  # raises on any graph break
    logits, grads = _run(model, compiled, ids, mask, labels)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys() and any("pet_fast_tasks" in k for k in grads)
    for k in ref_grads:
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-5, atol=1e-6)


def test_side_cache_breaks_only_around_the_lookup():
    """The cache is a host-side dictionary keyed by example ids: its look-up and store run eagerly
    (torch.compiler.disable), the rest compiles; a hit gives the same outputs as eager."""
    model = _prepared("bert", "side-cache")
    ref_model = copy.deepcopy(model)
    ids, mask = batch()
    labels = torch.tensor([0, 1, 0])
    ex = torch.tensor([10, 11, 12])
    explain = torch._dynamo.explain(model)(input_ids=ids, attention_mask=mask, labels=labels, example_ids=ex)
    assert explain.graph_break_count <= 2, explain.break_reasons
    compiled = torch.compile(model, backend="aot_eager")
    for _ in range(2):  # a miss (fills the cache), then a hit
        logits, grads = _run(model, compiled, ids, mask, labels, example_ids=ex)
        ref_logits, ref_grads = _run(ref_model, ref_model, ids, mask, labels, example_ids=ex)
        torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-6)
        for k in ref_grads:
            torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["houlsby", "pfeiffer", "fusion", "prefix", "mask", "side"])
def test_reduce_overhead_cuda_graphs(method):
    """mode="reduce-overhead" (CUDA graphs) on fixed shapes: training steps give the eager losses."""
    ids, mask = (t.cuda() for t in batch())
    labels = torch.tensor([0, 1, 0], device="cuda")
    losses = []
    for compiled in (False, True):
        model = _prepared("bert", method, device="cuda")
        fn = torch.compile(model, mode="reduce-overhead", fullgraph=True) if compiled else model
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        run = []
        for _ in range(4):
            if compiled:
                torch.compiler.cudagraph_mark_step_begin()
            loss = fn(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            run.append(loss.item())
        losses.append(run)
    torch.testing.assert_close(torch.tensor(losses[1]), torch.tensor(losses[0]), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("kind,method", [("bert", "fusion"), ("bert", "mask"), ("bert", "prefix"), ("llama", "prefix")])
def test_fullgraph_with_the_triton_backend(kind, method):
    """The fused ops' custom ops traced whole (the kernels run under the interpreter here): AdapterFusion's
    stacked op, the masked linears' training op and the grouped masking, prefix attention (BERT: padding on
    the right; Llama: causal, grouped-query, padding on the left), forward and backward, no graph break,
    the uncompiled model's outputs and gradients."""
    model = _prepared(kind, method)
    ids, mask = batch(pad_left=kind == "llama")
    labels = torch.tensor([0, 1, 0])
    with pet_fast.use_backend("triton"):
        ref_logits, ref_grads = _run(model, model, ids, mask, labels)
        logits, grads = _run(model, torch.compile(model, fullgraph=True, backend="aot_eager"), ids, mask, labels)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    assert grads.keys() == ref_grads.keys() and any("pet_fast_tasks" in k for k in grads)
    for k in ref_grads:
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["houlsby", "pfeiffer"])
def test_fullgraph_under_autocast_with_the_triton_adapter(method):
    """Under autocast the adapter sites hand the op half activations and the float32 residual stream
    (pfeiffer: float32 LayerNorm outputs cast by the module): the fake rule's output dtype (the
    residual's) must agree with the kernels', forward and backward, with no graph break."""
    model = _prepared("bert", method)
    ids, mask = batch()
    labels = torch.tensor([0, 1, 0])

    def run(fn):
        with pet_fast.use_backend("triton"), torch.autocast("cpu", dtype=torch.float16):
            out = fn(input_ids=ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        trained = {k: p for k, p in model.named_parameters() if p.requires_grad}
        assert all(k.endswith(".t.key.bias") for k, p in trained.items() if p.grad is None)  # (as in _run)
        grads = {k: p.grad.clone() for k, p in trained.items() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        return out.logits.detach().float(), grads

    ref_logits, ref_grads = run(model)
    logits, grads = run(torch.compile(model, fullgraph=True, backend="aot_eager"))
    torch.testing.assert_close(logits, ref_logits, rtol=1e-3, atol=1e-3)
    assert grads.keys() == ref_grads.keys()
    for k in ref_grads:
        assert grads[k].dtype == torch.float32
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_fusion_with_dropout_on_the_scores_compiles_fullgraph(backend):
    """AdapterFusion's dropout on the scores (the stacked op's score mask, drawn in the graph): no graph
    break, and with the same seed the uncompiled model's outputs and gradients, the key bias's included."""
    model = build("bert", num_labels=2)
    for n in ("a", "b", "c"):
        pet_fast.inject(model, pet_fast.AdapterConfig(placement="pfeiffer", bottleneck=4), n)
    pet_fast.inject(model, pet_fast.FusionConfig(adapters=["a", "b", "c"], dropout_prob=0.3), "t")
    for m in model.modules():  # only the fusion's dropout draws
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    model.train()
    ids, mask = batch()
    labels = torch.tensor([0, 1, 0])
    results = []
    for fn in (model, torch.compile(model, fullgraph=True, backend="aot_eager")):
        torch.manual_seed(3)
        with pet_fast.dispatch.use_backend(backend):
            out = fn(input_ids=ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
        model.zero_grad(set_to_none=True)
        results.append((out.logits.detach(), grads))
    (ref_logits, ref_grads), (logits, grads) = results
    assert any(k.endswith(".t.key.bias") for k in grads)  # every trained tensor got a gradient (dict comp above)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-6)
    for k in ref_grads:
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("key", [True, False])
def test_compiled_annealing_takes_each_steps_gradients_at_its_own_temperature(key):
    """AOT autograd recomputed the temperature from the step count in the backward, after the forward had counted
    the step: the key's gradient came at the next step's temperature (x 50/49.95, far below the model test's
    tolerance; the float32 temperature of compiled code against eager's float64 differs by ~3e-7). Without a key projection the query side takes the temperature: one graph for all steps (a
    Python float there compiled once per step)."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    d = 8
    adapters = [pet_fast.BottleneckAdapter(d, 3) for _ in range(2)]
    fusions = [pet_fast.AdapterFusion(d, temperature=True, key=key).train() for _ in range(2)]
    with torch.no_grad():  # (larger scores: the temperature shows)
        fusions[0].query.weight.normal_()
        if key:
            fusions[0].key.weight.normal_()
    fusions[1].load_state_dict(fusions[0].state_dict())
    x = torch.randn(2, 5, d)
    eager = fusions[0]
    compiled = torch.compile(lambda x: fusions[1].fuse(x, x, x, adapters), backend="aot_eager", fullgraph=True)
    counters.clear()
    for step in range(4):
        eager.fuse(x, x, x, adapters).square().sum().backward()
        compiled(x).square().sum().backward()
        for name, p in eager.named_parameters():
            if p.grad is None:  # (the key's bias: cancels in the softmax)
                continue
            got = dict(fusions[1].named_parameters())[name].grad
            assert float((got - p.grad).abs().max() / p.grad.abs().max()) < 1e-5, (name, step)
            p.grad = None
        fusions[1].zero_grad(set_to_none=True)
    assert counters["stats"]["unique_graphs"] == 1
    assert int(fusions[1].temperature_steps) == int(eager.temperature_steps) == 4


def test_fusion_with_an_annealed_temperature_compiles_once():
    """temperature=True lowers the softmax temperature at every training forward: compiled code reads it from the
    buffer as a tensor, so ten fullgraph training steps need no recompilation (a Python float would be a graph
    constant: one compile per step, past dynamo's limit), and each step's loss and gradients are the uncompiled
    model's at the same temperature."""
    def make():
        torch.manual_seed(0)
        model = build("bert", num_labels=2)
        for n in ("a", "b"):
            pet_fast.inject(model, pet_fast.AdapterConfig(placement="pfeiffer", bottleneck=4), n)
        pet_fast.inject(model, pet_fast.FusionConfig(adapters=["a", "b"], dropout_prob=0.0, temperature=True), "t")
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
            if isinstance(m, pet_fast.AdapterFusion):  # (larger scores: the temperature shows)
                with torch.no_grad():
                    m.query.weight.normal_(0, 1.0)
                    m.key.weight.normal_(0, 1.0)
        return model.train()

    ids, mask = batch()
    labels = torch.tensor([0, 1, 0])
    eager, model = make(), make()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch._dynamo.utils.counters.clear()
    for step in range(10):
        want = eager(input_ids=ids, attention_mask=mask, labels=labels).loss
        got = compiled(input_ids=ids, attention_mask=mask, labels=labels).loss
        want.backward()
        got.backward()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        for (k, p), q in zip(eager.named_parameters(), model.parameters()):
            if p.grad is not None:
                torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=k)
        eager.zero_grad(set_to_none=True)
        model.zero_grad(set_to_none=True)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 2  # (transformers' problem_type: one more)
    fusions = [m for m in model.modules() if isinstance(m, pet_fast.AdapterFusion)]
    assert all(int(m.temperature_steps) == 10 for m in fusions)
    model.eval()  # eager again: the temperature read back from the buffer
    assert all(m._temperature() == pytest.approx(50.0 - 10 * 0.05) for m in fusions)


@pytest.mark.parametrize("method", ["houlsby", "fusion"])
def test_compiled_adapters_follow_the_sequence_length_without_a_graph_per_length(method):
    """auto's ranking of backends read the call's token count as an int: each sequence length compiled a new graph
    (fullgraph=True failed at dynamo's recompilation limit, 8). It now guards on the count's power-of-two class."""
    from torch._dynamo.utils import counters

    model = build("bert", num_labels=2)
    if method == "fusion":
        for n in ("x", "y"):
            pet_fast.inject(model, pet_fast.AdapterConfig(placement="pfeiffer", bottleneck=4), n)
        pet_fast.inject(model, pet_fast.FusionConfig(adapters=["x", "y"], dropout_prob=0.0), "t")
    else:
        pet_fast.inject(model, pet_fast.AdapterConfig(placement="houlsby", bottleneck=4), "t")
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    model.train()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    counters.clear()
    labels = torch.tensor([0, 1, 0])
    for T in range(9, 21):
        ids, mask = batch(T=T)
        got = compiled(input_ids=ids, attention_mask=mask, labels=labels).loss
        torch.testing.assert_close(got, model(input_ids=ids, attention_mask=mask, labels=labels).loss)
    # transformers' problem_type, the first static graph, the dynamic one, and the classes 16-31 and 32-63 tokens
    assert counters["stats"]["unique_graphs"] <= 4


def test_a_new_thread_compiles_the_model_once():
    """use_backend()'s per-thread stack was made inside the first traced call: the second call compiled again."""
    import threading

    from torch._dynamo.utils import counters

    model = build("bert", head="base")
    pet_fast.inject(model, pet_fast.AdapterConfig(placement="houlsby", bottleneck=4), "a")
    compiled = torch.compile(model, backend="eager")
    ids, mask = batch()
    seen = []

    def run():
        counters.clear()
        for _ in range(3):
            compiled(input_ids=ids, attention_mask=mask)
        seen.append(counters["stats"]["unique_graphs"])

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert seen == [1]


def test_side_tuning_with_a_scheduled_alpha_compiles_once_and_matches_eager():
    """The schedule read the step count with int(): a graph break in every forward, alpha a Python float guarded by
    value (one graph per step up to dynamo's limit), and fullgraph=True failed. Compiled code now reads it from
    the buffer as a tensor, before the step is counted: every step's gradients are eager's."""
    from torch._dynamo.utils import counters

    def make():
        model = build("bert", num_labels=2)
        pet_fast.inject(model, pet_fast.SideConfig(width=16, heads=2, alpha=0.9, alpha_end=0.1, schedule_steps=3), "s")
        with torch.no_grad():
            for p in pet_fast.task_parameters(model, "s").values():
                p.add_(torch.randn_like(p) * 0.1)
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        return model.train()

    torch.manual_seed(0)
    eager = make()
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, backend="aot_eager", fullgraph=True)
    ids, mask = batch()
    labels = torch.tensor([0, 1, 0])
    counters.clear()
    for step in range(5):  # past the schedule's end
        eager(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        compiled(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        grads = dict(compiled_model.named_parameters())
        for k, p in eager.named_parameters():
            if p.grad is not None:
                torch.testing.assert_close(grads[k].grad, p.grad, rtol=1e-5, atol=1e-7, msg=f"{k} at step {step}")
        eager.zero_grad(set_to_none=True)
        compiled_model.zero_grad(set_to_none=True)
    assert counters["stats"]["unique_graphs"] <= 2  # (transformers' problem_type: one more)
    assert sum(counters["graph_break"].values()) == 0
    assert int(compiled_model.bert.pet_fast_tasks["s"].steps) == 5


@pytest.mark.parametrize("method", ["houlsby", "packed_mask", "prefix"])
def test_torch_export_with_dynamic_batch_and_length_serves_other_shapes(method):
    """auto's measured ranking compared the token count (and the prefix's position check read the length): the
    exported program held guards on the traced sizes, and other shapes failed with a guard assertion."""
    from torch.export import Dim

    model = build("bert")
    if method == "packed_mask":
        pet_fast.inject(model, pet_fast.MaskConfig(), "t")
        pet_fast.pack_for_serving(model)
    elif method == "prefix":
        pet_fast.inject(model, pet_fast.PrefixConfig(prefix_length=3, init_std=1.0), "t")
    else:
        pet_fast.inject(model, pet_fast.AdapterConfig(placement="houlsby", init="bert"), "t")
    ids, mask = batch(B=2, T=7)
    b, s = Dim("b", min=1, max=16), Dim("s", min=2, max=32)
    program = torch.export.export(Logits(model), (ids, mask), dynamic_shapes=({0: b, 1: s}, {0: b, 1: s}),
                                  strict=False).module()
    for B, T in ((3, 11), (5, 20), (1, 4)):
        ids, mask = batch(B=B, T=T)
        with torch.no_grad():
            torch.testing.assert_close(program(ids, mask), logits(model, ids, mask), rtol=1e-5, atol=1e-6)
