"""MaskConfig on tiny models: first mask keeps every weight, STE reaches only the scores, merge()."""
import pytest
import torch

import pet_fast
from pet_fast import models
from pet_fast.tasks import TASK_ATTR
from pet_fast.methods.mask import MaskScores
from tiny_models import batch, build, logits


@pytest.mark.parametrize("kind", ["bert", "gpt2", "qwen2"])
def test_mask_starts_as_identity_trains_scores_and_merges(kind):
    model = build(kind)
    ids, mask = batch()
    ref = logits(model, ids, mask).detach()
    pet_fast.inject(model, pet_fast.MaskConfig(), "m")
    n_lin = sum(1 for blk in models.layers(model) for m in blk.modules() if models.linear_like(m))
    scores = [m for m in model.modules() if isinstance(m, MaskScores)]
    assert len(scores) == n_lin > 0
    torch.testing.assert_close(logits(model, ids, mask), ref, rtol=0, atol=0)
    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for _ in range(2):
        out = logits(model, ids, mask)
        opt.zero_grad()
        out.pow(2).sum().backward()
        with_grad = {k for k, p in model.named_parameters() if p.grad is not None}
        assert with_grad == {k for k, p in model.named_parameters() if p.requires_grad}
        assert all(f"{TASK_ATTR}.m." in k for k in with_grad)
        opt.step()
    model.eval()
    assert min(s.mask().float().mean().item() for s in scores) < 1.0  # some weights were dropped
    with torch.no_grad():  # a masked-out weight holding NaN counts 0, merged or not
        site = next(s for s in scores if not bool(s.mask().all()))
        host = next(m for m in model.modules() if m._modules.get(TASK_ATTR) is not None and m._modules[TASK_ATTR]._modules.get("m") is site)
        host.weight[(~site.mask()).t() if type(host).__name__ == "Conv1D" else ~site.mask()] = float("nan")
    before = logits(model, ids, mask).detach()
    assert torch.isfinite(before).all()
    pet_fast.merge(model)
    assert not any(isinstance(m, MaskScores) for m in model.modules())
    assert not any(TASK_ATTR in k for k in model.state_dict())
    torch.testing.assert_close(logits(model, ids, mask), before, rtol=1e-6, atol=1e-6)


def test_mask_target_modules_threshold_and_errors():
    model = build("bert")
    pet_fast.inject(model, pet_fast.MaskConfig(target_modules=["query", "value"], threshold=0.5), "m")
    scores = [m for m in model.modules() if isinstance(m, MaskScores)]
    assert len(scores) == 4 and all(s.threshold == 0.5 and bool(s.mask().all()) for s in scores)
    with pytest.raises(ValueError, match="init_score"):
        pet_fast.MaskConfig(threshold=0.2, init_score=0.1)
    with pytest.raises(ValueError, match="Linear"):
        pet_fast.inject(model, pet_fast.MaskConfig(target_modules=["LayerNorm"]), "bad")


def test_mask_uses_the_masked_weight():
    model = build("bert")
    pet_fast.inject(model, pet_fast.MaskConfig(target_modules=["output.dense"]), "m")
    host = model.bert.encoder.layer[0].output.dense
    s = host.pet_fast_tasks["m"]
    with torch.no_grad():
        s.scores.copy_(torch.randn_like(s.scores))
    x = torch.randn(2, 37)
    want = x @ (host.weight * (s.scores > 0)).T + host.bias
    torch.testing.assert_close(host(x), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_pack_for_serving_keeps_the_outputs_in_a_bit_per_weight(kind, tmp_path):
    """Two mask tasks packed for serving: each keeps its mask as int32 words (1 bit per weight) and no
    scores, gives the outputs of its scores (BERT's Linear and GPT-2's transposed Conv1D), runs without
    gradients, is saved as its mask (loaded back as scores that give the same outputs), and can be
    merged."""
    model = build(kind)
    ids, mask = batch()
    for n, seed in (("a", 0), ("b", 1)):
        pet_fast.inject(model, pet_fast.MaskConfig(), n)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for host_name, host in model.named_modules():
                holder = getattr(host, TASK_ATTR, None)
                if holder is not None and n in holder and isinstance(holder[n], MaskScores):
                    holder[n].scores.copy_(torch.randn(holder[n].scores.shape, generator=g))
    model.eval()
    want = {}
    for n in ("a", "b"):
        pet_fast.set_active(model, n)
        with torch.no_grad():
            want[n] = logits(model, ids, mask)
    assert not torch.equal(want["a"], want["b"])
    pet_fast.pack_for_serving(model)
    packed = [m for m in model.modules() if isinstance(m, MaskScores)]
    assert packed and all(m.scores is None and m.packed.dtype == torch.int32 for m in packed)
    for m in packed:
        out_f, in_f = m.shape
        assert m.packed.shape == (out_f, (in_f + 31) // 32)
    assert not any(k.endswith(".scores") for k in model.state_dict())
    for n in ("a", "b"):
        pet_fast.set_active(model, n)
        with torch.no_grad():
            torch.testing.assert_close(logits(model, ids, mask), want[n], rtol=1e-5, atol=1e-5)
            if kind == "bert":  # the packed-bit GEMM (Triton, under the interpreter here)
                with pet_fast.use_backend("triton"):
                    torch.testing.assert_close(logits(model, ids, mask), want[n], rtol=1e-4, atol=1e-5)
    assert not any(p.requires_grad for n_, p in model.named_parameters() if TASK_ATTR in n_ and ".scores" in n_)
    pet_fast.set_active(model, "a")
    path = pet_fast.save(model, tmp_path / "a", "a")
    fresh = build(kind)
    pet_fast.load(fresh, path)
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(logits(fresh, ids, mask), want["a"], rtol=1e-5, atol=1e-5)
    pet_fast.set_active(model, "b")
    pet_fast.merge(model, "b")
    with torch.no_grad():
        torch.testing.assert_close(logits(model, ids, mask), want["b"], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="no mask task to pack"):
        pet_fast.pack_for_serving(model)  # merge dropped them all
    with pytest.raises(ValueError, match="no pet_fast tasks; call pet_fast.inject first"):
        pet_fast.pack_for_serving(build(kind))


def _random_mask_tasks(model, names):
    """Attach mask tasks ``names``, each with random scores and its own random head."""
    for seed, n in enumerate(names):
        pet_fast.inject(model, pet_fast.MaskConfig(), n)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for m in model.modules():
                holder = getattr(m, TASK_ATTR, None)
                if holder is not None and n in holder:
                    for p in holder[n].parameters():
                        p.copy_(torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_mixed_mask_tasks_serve_one_batch(kind):
    """Rows of one batch in three packed tasks: each row gives the output its own task gives it alone (its
    masks in every linear, its own head); one multitask call per masked linear; bad uses refused."""
    import pet_fast.methods.mask as mask_mod

    model = build(kind)
    ids, mask = batch()
    names = ("a", "b", "c")
    _random_mask_tasks(model, names)
    model.eval()
    with pytest.raises(ValueError, match="pack_for_serving"):
        with pet_fast.mixed_mask_tasks(model, names, [0, 1, 2]):
            pass
    pet_fast.pack_for_serving(model)
    alone = {}
    for n in names:
        pet_fast.set_active(model, n)
        with torch.no_grad():
            alone[n] = logits(model, ids, mask)
    rows = torch.tensor([2, 0, 1])
    calls = []
    real = mask_mod._MixedTasks.linear

    def counted(self, host, x):
        out = real(self, host, x)
        calls.append(out is not None)
        return out

    mask_mod._MixedTasks.linear = counted
    try:
        pet_fast.set_active(model, None)
        with torch.no_grad(), pet_fast.mixed_mask_tasks(model, names, rows):
            got = logits(model, ids, mask)
    finally:
        mask_mod._MixedTasks.linear = real
    n_lin = sum(1 for m in model.modules() if isinstance(m, MaskScores)) // 3
    assert calls.count(True) == n_lin
    for i, t in enumerate(rows.tolist()):
        torch.testing.assert_close(got[i], alone[names[t]][i], rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        pet_fast.set_active(model, "a")
        torch.testing.assert_close(logits(model, ids, mask), alone["a"])  # the block left nothing behind
    with pytest.raises(ValueError, match=r"task_of_row must lie in \[0, 3\)"):
        with pet_fast.mixed_mask_tasks(model, names, [0, 3, 1]):
            pass
    with pytest.raises(ValueError, match="not a mask task"):
        with pet_fast.mixed_mask_tasks(model, ["a", "zzz"], [0, 1, 0]):
            pass
    pet_fast.inject(model, pet_fast.AdapterConfig(train_head=False), "adapter")  # active: would run on every row
    with pytest.raises(ValueError, match=r"tasks \['adapter'\] are active and would run on every row"):
        with pet_fast.mixed_mask_tasks(model, names, rows):
            pass


@pytest.mark.gpu
def test_gpu_packed_and_mixed_tasks_bf16():
    """On a GPU in bf16: packed tasks through the serving kernels, alone and mixed in one batch, against each
    task's scores through eager masked linears (float32 logits of a tiny BERT, bf16 rounding)."""
    model = build("bert")
    ids, mask = batch()
    _random_mask_tasks(model, ("a", "b"))
    model = model.cuda().to(torch.bfloat16).eval()
    ids, mask = ids.cuda(), mask.cuda()
    want = {}
    for n in ("a", "b"):
        pet_fast.set_active(model, n)
        with torch.no_grad(), pet_fast.use_backend("eager"):
            want[n] = logits(model, ids, mask).float()
    pet_fast.pack_for_serving(model)
    for n in ("a", "b"):
        pet_fast.set_active(model, n)
        with torch.no_grad():
            torch.testing.assert_close(logits(model, ids, mask).float(), want[n], rtol=3e-2, atol=3e-2)
    pet_fast.set_active(model, None)
    rows = torch.tensor([1, 0, 1])
    with torch.no_grad(), pet_fast.mixed_mask_tasks(model, ["a", "b"], rows):
        got = logits(model, ids, mask).float()
    for i, t in enumerate(rows.tolist()):
        torch.testing.assert_close(got[i], want["ab"[t]][i], rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("config", [pet_fast.MaskConfig(target_modules=["dense"]),
                                    pet_fast.AdapterConfig(placement="houlsby", target_modules=["dense"])],
                         ids=["mask", "adapter"])
def test_target_modules_leave_the_task_head_out(config, tmp_path):
    """RoBERTa's classifier has a `dense` too: the task head is copied per task and trains whole, so a method's
    target_modules skip it (a site inside it was copied into the next tasks' heads and never ran); two tasks
    then keep apart and each saved task loads into a fresh model."""
    import copy

    model = build("roberta")
    pet_fast.inject(model, copy.deepcopy(config), "k")
    pet_fast.inject(model, copy.deepcopy(config), "j")
    for name in ("k", "j"):
        keys = pet_fast.task_parameters(model, name)
        assert not any(k.startswith("classifier.dense.") and "pet_fast_tasks" in k[len("classifier.dense."):]
                       for k in keys)
        assert not any(f"{TASK_ATTR}.{other}." in k for k in keys for other in {"k", "j"} - {name})
    pet_fast.set_active(model, "k")
    ids, mask = batch()
    want = logits(model, ids, mask)
    fresh = build("roberta")
    pet_fast.load(fresh, pet_fast.save(model, str(tmp_path / "k"), "k"))
    torch.testing.assert_close(logits(fresh, ids, mask), want, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"outside the task head \(classifier.out_proj is in it\)"):
        pet_fast.inject(build("roberta"), pet_fast.MaskConfig(target_modules=["out_proj"]), "m")


def test_scores_stay_float32_when_the_model_is_cast_to_half_precision():
    """At threshold 4 the default init_score 4.01 is 4.0 in bfloat16: cast with the model, every mask would
    drop every weight."""
    model = build("bert")
    pet_fast.inject(model, pet_fast.MaskConfig(threshold=4.0), "m")
    model.to(torch.bfloat16)
    scores = [m for m in model.modules() if isinstance(m, MaskScores)]
    assert all(s.scores.dtype == torch.float32 and bool(s.mask().all()) for s in scores)
    assert model.bert.encoder.layer[0].output.dense.weight.dtype == torch.bfloat16
    fresh = build("bert").to(torch.bfloat16)
    pet_fast.inject(fresh, pet_fast.MaskConfig(threshold=4.0), "m")  # injected after the cast: the same model
    fresh.load_state_dict(model.state_dict())
    ids, mask = batch()
    torch.testing.assert_close(logits(model, ids, mask), logits(fresh, ids, mask), rtol=0, atol=0)
    model.double()  # a wider float carries them
    assert all(s.scores.dtype == torch.float64 for s in scores)


def test_mixed_mask_tasks_under_torch_compile():
    """Compiled code serves a mixed batch as eager code does; its per-linear look-ups run eagerly (traced, they
    guarded each linear's frame on its module: one recompilation per linear, past dynamo's limit in BERT)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    model = build("bert")
    _random_mask_tasks(model, ("a", "b"))
    model.eval()
    pet_fast.pack_for_serving(model)
    pet_fast.set_active(model, None)
    ids, mask = batch()
    with torch.no_grad(), pet_fast.mixed_mask_tasks(model, ["a", "b"], [1, 0, 1]):
        want = logits(model, ids, mask)
        torch._dynamo.reset()
        counters.clear()
        compiled = torch.compile(model, backend="eager")
        for _ in range(2):
            torch.testing.assert_close(logits(compiled, ids, mask), want, rtol=0, atol=0)
    assert not any("recompile" in str(k).lower() and "limit" in str(k).lower() for k in counters["graph_break"])
    assert counters["stats"]["unique_graphs"] <= 12  # (25 with the look-ups traced)


@pytest.mark.parametrize("when", ["before", "after"])
def test_pruned_and_parametrised_linears_are_masked_as_the_module_computes_them(when):
    """torch.nn.utils.prune and parametrize move a linear's weight or bias out of its parameter dict: mask-tuning
    read the dict, so a moved bias was left out (2.2-6.5 off) and a moved weight raised KeyError."""
    import torch.nn.utils.parametrize as parametrize
    import torch.nn.utils.prune as prune

    class Doubled(torch.nn.Module):
        def forward(self, t):
            return 2 * t

    def change(model):
        layer = model.bert.encoder.layer[0]
        prune.l1_unstructured(layer.attention.self.query, "weight", amount=0.5)
        prune.l1_unstructured(layer.attention.self.key, "bias", amount=0.5)
        parametrize.register_parametrization(layer.attention.self.value, "bias", Doubled())
        torch.nn.utils.parametrizations.weight_norm(layer.output.dense)

    plain, model = build("bert"), build("bert")
    change(plain)
    if when == "before":
        change(model)
    pet_fast.inject(model, pet_fast.MaskConfig(), "m")
    if when == "after":
        change(model)
    ids, mask = batch()
    got = logits(model, ids, mask)  # (eval mode: no dropout; scores at init keep every weight)
    with torch.no_grad():
        torch.testing.assert_close(got, logits(plain, ids, mask), rtol=1e-5, atol=1e-6)
    got.square().sum().backward()
    layer = model.bert.encoder.layer[0]
    for lin in (layer.attention.self.query, layer.attention.self.key, layer.attention.self.value, layer.output.dense):
        assert lin.pet_fast_tasks["m"].scores.grad is not None
