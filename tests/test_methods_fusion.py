"""FusionConfig: AdapterHub's BertFusion over adapter tasks, checked against closed forms."""
import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F

import pet_fast
import pet_fast.ops.adapter_fusion as fusion_ops
from pet_fast.methods.fusion import _ForwardProjections
from pet_fast.tasks import TASK_ATTR
from tiny_models import Logits, batch, build, logits


def A(ad, z):
    act = {"relu": F.relu, "silu": F.silu}[ad.activation]
    return ad.scaling * (act(z @ ad.w_down.T + ad.b_down) @ ad.w_up.T + ad.b_up)


def _fused_model(placement, kind="dynamic", k=3, **fusion):
    model = build("bert")
    for i in range(k):
        pet_fast.inject(model, pet_fast.AdapterConfig(placement=placement, init="bert", bottleneck=4 + i), f"a{i}")
    pet_fast.inject(model, pet_fast.FusionConfig(adapters=[f"a{i}" for i in range(k)], kind=kind, **fusion), "f")
    for mod in model.modules():
        if isinstance(mod, pet_fast.AdapterFusion):
            with torch.no_grad():
                for lin in (mod.query, mod.key, mod.value):
                    if lin is not None:
                        lin.weight.normal_(0, 0.1)
    return model


@pytest.mark.parametrize("placement,kind,fusion", [
    ("pfeiffer", "dynamic", {}), ("pfeiffer", "static", {}), ("houlsby", "dynamic", {}), ("parallel", "dynamic", {}),
    ("pfeiffer", "dynamic", {"residual_before": True}), ("houlsby", "static", {"residual_before": True}),
    ("pfeiffer", "dynamic", {"query_before_ln": True}), ("parallel", "dynamic", {"residual_before": True})])
def test_bert_fusion_closed_form(placement, kind, fusion):
    """AdapterHub's BertFusion at a BERT output site: LN(h + x + fusion) (residual_before: the sublayer output
    h joins every adapter output before the fusion, and LN(x + fusion))."""
    model = _fused_model(placement, kind, **fusion)
    host = model.bert.encoder.layer[1].output
    fus = host.pet_fast_tasks["f"]
    ads = [host.pet_fast_tasks[f"a{i}"] for i in range(3)]
    hs, x = torch.randn(2, 4, 37), torch.randn(2, 4, 32)
    LN = host.LayerNorm
    h = host.dense(hs)
    a_in = {"pfeiffer": LN(h + x), "houlsby": h, "parallel": x}[placement]
    q_in = h if fusion.get("query_before_ln") else a_in
    u = torch.stack([A(a, a_in) for a in ads], dim=-2)  # (B, T, k, H)
    if fusion.get("residual_before"):
        u = u + h.unsqueeze(-2)
    q = fus.query(q_in)
    kk = fus.key(u)
    v = fus.value(u) if kind == "dynamic" else u
    p = torch.softmax((kk * q.unsqueeze(-2)).sum(-1), dim=-1)
    want = LN((x if fusion.get("residual_before") else h + x) + (p.unsqueeze(-1) * v).sum(-2))
    torch.testing.assert_close(host(hs, x), want, rtol=1e-5, atol=2e-5)


def test_adapters_the_stacked_op_does_not_take_are_fused_from_their_outputs(monkeypatch):
    """Adapters with per-channel scaling, different activations or mixed fixed and learned scalings: run one by
    one and fused from their outputs (the given-values op), matching the closed form, output and training."""
    model = build("bert")
    cfgs = [dict(scaling="channel", activation="relu"), dict(scaling=0.5, activation="silu"), dict(scaling="learned")]
    for i, kw in enumerate(cfgs):
        pet_fast.inject(model, pet_fast.AdapterConfig(placement="pfeiffer", bottleneck=4 + i, **kw), f"a{i}")
    pet_fast.inject(model, pet_fast.FusionConfig(adapters=["a0", "a1", "a2"]), "f")
    stacked = []
    monkeypatch.setattr(fusion_ops, "stacked_adapter_fusion", lambda *a, **k: stacked.append(1))
    host = model.bert.encoder.layer[1].output
    fus = host.pet_fast_tasks["f"]
    ads = [host.pet_fast_tasks[f"a{i}"] for i in range(3)]
    with torch.no_grad():
        ads[0].scaling.copy_(torch.rand(32) + 0.5)
        for lin in (fus.query, fus.key, fus.value):
            lin.weight.normal_(0, 0.1)
    model.eval()
    hs, x = torch.randn(2, 4, 37), torch.randn(2, 4, 32)
    h = host.dense(hs)
    a_in = host.LayerNorm(h + x)
    u = torch.stack([A(ad, a_in) if ad.activation in ("relu", "silu") else
                     ad.scaling * (F.gelu(a_in @ ad.w_down.T + ad.b_down) @ ad.w_up.T + ad.b_up) for ad in ads], dim=-2)
    p = torch.softmax((fus.key(u) * fus.query(a_in).unsqueeze(-2)).sum(-1), dim=-1)
    want = host.LayerNorm(h + x + (p.unsqueeze(-1) * fus.value(u)).sum(-2))
    torch.testing.assert_close(host(hs, x), want, rtol=1e-5, atol=2e-5)
    model.train()
    ids, mask = batch()
    logits(model, ids, mask).pow(2).sum().backward()
    assert fus.query.weight.grad is not None and not stacked


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_fusion_trains_only_the_fusion_layers_and_uses_the_stacked_op(monkeypatch, dropout):
    """The stacked op at every layer, with dropout on the scores (its score mask) or without."""
    calls = []
    real = fusion_ops.stacked_adapter_fusion

    def counting(*a, **kw):
        calls.append(kw.get("score_mask"))
        return real(*a, **kw)
    monkeypatch.setattr(fusion_ops, "stacked_adapter_fusion", counting)
    model = _fused_model("pfeiffer")
    model.train()
    for mod in model.modules():
        if isinstance(mod, pet_fast.AdapterFusion):
            mod.dropout = dropout
    ids, mask = batch()
    out = logits(model, ids, mask)
    assert len(calls) == 2  # one per layer
    assert all((m is not None) == (dropout > 0) for m in calls)
    loss = out.pow(2).sum() + pet_fast.fusion_regularization_loss(model)
    loss.backward()
    with_grad = {k for k, p in model.named_parameters() if p.grad is not None}
    # (without dropout the key's bias cancels in the softmax: the op does not take it, and its gradient stays None)
    assert with_grad == {k for k, p in model.named_parameters()
                         if p.requires_grad and (dropout > 0 or not k.endswith(".f.key.bias"))}
    assert with_grad and all(f"{TASK_ATTR}.f." in k for k in with_grad)
    assert any(".value." in k for k in with_grad)


def test_fusion_regularization_value():
    model = _fused_model("pfeiffer")
    ws = [m.value.weight for m in model.modules() if isinstance(m, pet_fast.AdapterFusion)]
    want = sum(0.01 * (torch.eye(32) - w).pow(2).sum() for w in ws)
    torch.testing.assert_close(pet_fast.fusion_regularization_loss(model), want)
    torch.testing.assert_close(pet_fast.fusion_regularization_loss(model, "f"), want)


def test_fusion_regularization_follows_the_config():
    """FusionConfig(regularization=False) (the static kind's default) was read by no code: the loss counted its
    value projections all the same."""
    model = build("bert")
    for i in range(2):
        pet_fast.inject(model, pet_fast.AdapterConfig(placement="pfeiffer", bottleneck=4), f"a{i}")
    pet_fast.inject(model, pet_fast.FusionConfig(adapters=["a0", "a1"], regularization=False), "f")
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, pet_fast.AdapterFusion):
                m.value.weight.normal_()
    assert float(pet_fast.fusion_regularization_loss(model)) == 0.0
    with pytest.raises(ValueError, match="fusion task 'f' was configured with regularization=False"):
        pet_fast.fusion_regularization_loss(model, "f")
    with pytest.raises(ValueError, match="'a0' is not a fusion task"):
        pet_fast.fusion_regularization_loss(model, "a0")


def test_fusion_defaults_and_refusals():
    d, s = pet_fast.FusionConfig(adapters=["a"]), pet_fast.FusionConfig(adapters=["a"], kind="static")
    assert (d.value, d.value_initialized, d.regularization) == (True, True, True)
    assert (s.value, s.value_initialized, s.regularization) == (False, False, False)
    model = build("bert")
    pet_fast.inject(model, pet_fast.AdapterConfig(placement="pfeiffer"), "a")
    pet_fast.inject(model, pet_fast.AdapterConfig(placement="houlsby"), "b")
    with pytest.raises(ValueError, match="does not have"):
        pet_fast.inject(model, pet_fast.FusionConfig(adapters=["a", "zz"]), "f")
    with pytest.raises(ValueError, match="share placement"):
        pet_fast.inject(model, pet_fast.FusionConfig(adapters=["a", "b"]), "f")
    assert "f" not in model._pet_fast_registry.configs


def test_fusion_on_llama_runs_and_trains():
    model = build("llama", head="lm")
    for i in range(2):
        pet_fast.inject(model, pet_fast.AdapterConfig(placement="houlsby", bottleneck=4), f"a{i}")
    pet_fast.inject(model, pet_fast.FusionConfig(adapters=["a0", "a1"], kind="static"), "f")
    ids, mask = batch()
    out = model(input_ids=ids, attention_mask=mask, labels=ids)
    out.loss.backward()
    assert all(f"{TASK_ATTR}.f." in k for k, p in model.named_parameters() if p.grad is not None)


def _frozen_fusion(scales=(1.0, 0.5, 2.0)):
    ads = [pet_fast.BottleneckAdapter(16, 3 + i, activation="relu", scaling=s) for i, s in enumerate(scales)]
    for a in ads:
        a.requires_grad_(False)
        with torch.no_grad():
            a.w_up.normal_(0, 0.3)
    fus = pet_fast.AdapterFusion(16)
    return ads, fus


def test_stacked_frozen_adapters_are_kept_until_they_change(monkeypatch):
    """Frozen adapters are stacked once; an in-place update of one of them (version counter), another dtype
    or another activation rebuilds the stack, and the result always equals a fresh computation."""
    import pet_fast.methods.fusion as fusion_mod

    ads, fus = _frozen_fusion()
    calls = []
    real = fusion_mod.stack_adapters
    monkeypatch.setattr(fusion_mod, "stack_adapters", lambda *a: calls.append(1) or real(*a))
    x, q, res = torch.randn(5, 16), torch.randn(5, 16), torch.randn(5, 16)
    first = fus.fuse(x, q, res, ads)
    second = fus.fuse(x, q, res, ads)
    assert len(calls) == 1 and torch.equal(first, second)
    with torch.no_grad():
        ads[1].w_up.add_(0.5)  # e.g. load_state_dict copies in place
    third = fus.fuse(x, q, res, ads)
    assert len(calls) == 2 and not torch.allclose(third, first)
    fresh = pet_fast.AdapterFusion(16)
    fresh.load_state_dict(fus.state_dict())
    torch.testing.assert_close(third, fresh.fuse(x, q, res, ads))  # its own stack: one more call
    assert len(calls) == 3
    fus.fuse(x.half(), q.half(), res.half(), ads)  # another dtype: rebuilt
    assert len(calls) == 4
    assert "_stack_cache" not in fus.state_dict()
    for a in ads:
        a.activation = "gelu"  # another activation: rebuilt (the stack carries it)
    torch.testing.assert_close(fus.fuse(x, q, res, ads), fresh.fuse(x, q, res, ads))
    assert len(calls) == 6
    from torch.nn.utils import parameters_to_vector, vector_to_parameters

    params = [p for a in ads for p in a.parameters()]
    vector_to_parameters(parameters_to_vector(params) * 3, params)  # new memory (p.data = ...): rebuilt
    fresh = pet_fast.AdapterFusion(16)
    fresh.load_state_dict(fus.state_dict())
    torch.testing.assert_close(fus.fuse(x, q, res, ads), fresh.fuse(x, q, res, ads))
    assert len(calls) == 8


def test_stacked_trainable_adapters_are_stacked_every_call_and_get_gradients(monkeypatch):
    import pet_fast.methods.fusion as fusion_mod

    ads, fus = _frozen_fusion()
    for a in ads:
        a.requires_grad_(True)
    calls = []
    real = fusion_mod.stack_adapters
    monkeypatch.setattr(fusion_mod, "stack_adapters", lambda *a: calls.append(1) or real(*a))
    x, q, res = torch.randn(5, 16), torch.randn(5, 16), torch.randn(5, 16)
    fus.fuse(x, q, res, ads).sum().backward()
    fus.fuse(x, q, res, ads)
    assert len(calls) == 2
    assert all(a.w_down.grad is not None and a.w_down.grad.abs().sum() > 0 for a in ads)


def test_stack_adapters_fixed_scales_filled_on_the_device():
    from pet_fast.methods.fusion import stack_adapters

    ads, _ = _frozen_fusion(scales=(1.0, 0.5, 2.0))
    assert stack_adapters(ads, torch.float32)[4].tolist() == [1.0, 0.5, 2.0]
    ads, _ = _frozen_fusion(scales=(0.25, 0.25, 0.25))
    s = stack_adapters(ads, torch.float16)[4]
    assert s.dtype == torch.float16 and s.tolist() == [0.25, 0.25, 0.25]


@pytest.mark.parametrize("placement", ["pfeiffer", "houlsby"])
def test_fused_op_in_a_model_under_autocast(placement):
    """A BERT training step under autocast with the fusion on the triton backend (the interpreter; fp16
    autocast, which the interpreter computes right): the pfeiffer sites hand the op float32 inputs (the
    LayerNorm's output), the houlsby sites half ones. Loss and gradients match the eager backend's."""
    results = []
    for backend in ("eager", "triton"):
        model = _fused_model(placement)
        model.train()
        for mod in model.modules():
            if isinstance(mod, pet_fast.AdapterFusion):
                mod.dropout = 0.0
        ids, mask = batch()
        with pet_fast.use_backend(backend), torch.autocast("cpu", dtype=torch.float16):
            loss = logits(model, ids, mask).float().pow(2).mean()
        loss.backward()
        # the key bias cancels in the softmax: without dropout no backend gets it, and its gradient stays None
        key_biases = [p for k, p in model.named_parameters() if k.endswith(".f.key.bias")]
        assert key_biases and all(p.requires_grad and p.grad is None for p in key_biases)
        grads = {k: p.grad for k, p in model.named_parameters() if p.requires_grad and not k.endswith(".f.key.bias")}
        assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads.values())
        results.append((loss.detach(), grads))
    (loss_e, g_e), (loss_t, g_t) = results
    torch.testing.assert_close(loss_t, loss_e, rtol=5e-3, atol=1e-3)
    for k in g_e:
        scale = g_e[k].abs().max().item()
        assert (g_t[k] - g_e[k]).abs().max().item() <= 0.05 * scale + 1e-4, k


def test_fuse_under_autocast_keeps_the_stack_in_the_autocast_dtype(monkeypatch):
    """float32 activations under autocast: the frozen adapters are stacked once in the autocast dtype (no
    casts of them per call), the residual stays float32 and so does the output, as with eager autocast."""
    import pet_fast.methods.fusion as fusion_mod

    ads, fus = _frozen_fusion()
    calls = []
    real = fusion_mod.stack_adapters
    monkeypatch.setattr(fusion_mod, "stack_adapters", lambda *a: calls.append(a[1]) or real(*a))
    x, res = torch.randn(5, 16), torch.randn(5, 16)
    with torch.autocast("cpu", dtype=torch.float16):
        first = fus.fuse(x, x, res, ads)
        second = fus.fuse(x, x, res, ads)
    assert calls == [torch.float16] and torch.equal(first, second) and first.dtype == torch.float32
    # the same products as the op on inputs cast by hand, the residual added in float32
    h = x.half()
    w_down, b_down, w_up, b_up, scaling, act = real(ads, torch.float16)
    proj = fus._projections(torch.float16)
    want = fusion_ops.stacked_adapter_fusion(h, h, torch.zeros_like(h), w_down, b_down, w_up, b_up, activation=act,
                                             scaling=scaling, **proj).float() + res
    torch.testing.assert_close(first, want)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("residual_before", [False, True])
def test_adapters_the_stacked_op_does_not_take_under_autocast(dropout, residual_before):
    """Adapters with different activations under bf16 autocast (float32 activations, as at a Pfeiffer site):
    the given-outputs op gets query, outputs and (where it enters the products) the residual in the autocast
    dtype, as the stacked op does (the op takes one dtype); float32 weights get float32 gradients."""
    ads, _ = _frozen_fusion()
    ads[0].activation = "tanh"
    fus = pet_fast.AdapterFusion(16, dropout=dropout, residual_before=residual_before).train()
    x = torch.randn(2, 5, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fus.fuse(x, x, x, ads)
    assert out.dtype == (torch.bfloat16 if residual_before else torch.float32) and torch.isfinite(out).all()
    out.float().sum().backward()
    assert x.grad.dtype == torch.float32 and fus.query.weight.grad.dtype == torch.float32


def test_given_outputs_with_dropout_on_the_triton_backend(monkeypatch):
    """Fusing given adapter outputs with dropout in training takes the given-outputs op's triton backend with
    the drawn mask: AdapterHub's definition with that mask, output and every gradient (float32 against
    float64)."""
    import pet_fast.methods.fusion as fusion_mod

    masks = []
    real_mask = fusion_mod.dropout_mask
    monkeypatch.setattr(fusion_mod, "dropout_mask", lambda *a: masks.append(real_mask(*a)) or masks[-1])
    torch.manual_seed(0)
    fus = pet_fast.AdapterFusion(16, dropout=0.4).train()
    _randomize_projections(fus)
    leaves = [torch.randn(2, 5, *s, requires_grad=True) for s in ((16,), (3, 16), (16,))]
    got = fus(*leaves, backend="triton")
    fus64 = copy.deepcopy(fus).double()
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    want = _dropout_fusion_by_definition(fus64, *leaves64, 1.0, masks[0].double())
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)
    dy = torch.randn(got.shape)
    have = torch.autograd.grad(got, leaves + list(fus.parameters()), dy)
    need = torch.autograd.grad(want, leaves64 + list(fus64.parameters()), dy.double())
    for a, b in zip(have, need):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5 * max(1.0, b.abs().max().item()))


def test_dropout_path_with_half_inputs_and_float32_module():
    """Training with dropout on the scores runs eagerly; half-precision inputs with a float32 fusion
    layer (no autocast) use the projections cast to the inputs' dtype, as the fused op does."""
    ads, fus = _frozen_fusion()
    fus.dropout = 0.1
    fus.train()
    x = torch.randn(5, 16).half()
    out = fus.fuse(x, x, x, ads)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    out.float().sum().backward()
    assert fus.query.weight.grad is not None and fus.query.weight.grad.dtype == torch.float32


def _randomize_projections(fus):
    """Projection weights of norm ~0.3 per entry and unit biases (zero at init: their terms would vanish)."""
    with torch.no_grad():
        for lin in (fus.query, fus.key, fus.value):
            if lin is not None:
                lin.weight.normal_(0, 0.3)
                if lin.bias is not None:
                    lin.bias.normal_()


def _dropout_fusion_by_definition(fus, query, values, residual, t, mask):
    """AdapterHub's BertFusion with dropout on the scores (its ``mask``), as written: k keys and k projected
    values."""
    lin = F.linear
    if fus.residual_before:
        values = values + residual.unsqueeze(-2)
    q = fus.query(query) if fus.query is not None else query
    keys = fus.key(values) if fus.key is not None else values
    vals = lin(values, fus.value.weight) if fus.value is not None and fus.value_before_softmax else values
    scores = torch.matmul(keys, q.unsqueeze(-1)).squeeze(-1) * mask
    out = torch.matmul(torch.softmax(scores / t, dim=-1).unsqueeze(-2), vals).squeeze(-2)
    if fus.value is not None and not fus.value_before_softmax:
        out = lin(out, fus.value.weight)
    return out if fus.residual_before else out + residual


@pytest.mark.parametrize("kw", [dict(), dict(value=False), dict(residual_before=True, value_before_softmax=False),
                                dict(query=False, key=False, value=False)])
def test_dropout_path_equals_the_definition_and_keeps_no_k_keys_or_values(kw, monkeypatch):
    """Fusing given outputs with dropout on the scores runs eagerly (fusion_ops.masked_eager). It forms Q @ Wk
    and the weighted sum of the adapter outputs instead of the k keys and k projected values per token (same
    values, same dropout mask): the backward keeps the (..., k, d) adapter outputs once, not three times."""
    import pet_fast.methods.fusion as fusion_mod

    masks = []
    real_mask = fusion_mod.dropout_mask
    monkeypatch.setattr(fusion_mod, "dropout_mask", lambda *a: masks.append(real_mask(*a)) or masks[-1])
    torch.manual_seed(0)
    fus = pet_fast.AdapterFusion(16, dropout=0.3, dtype=torch.float64, **kw).train()
    _randomize_projections(fus)
    leaves = [torch.randn(2, 5, *s, dtype=torch.float64, requires_grad=True) for s in ((16,), (3, 16), (16,))]
    saved = {}  # storage -> shape of the tensors autograd keeps for the backward

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = tuple(t.shape)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        got = fus(*leaves)
    assert len(masks) == 1 and masks[0].shape == (2, 5, 3) and (masks[0] == 0).any()
    want = _dropout_fusion_by_definition(fus, *leaves, 1.0, masks[0].double())
    torch.testing.assert_close(got, want)
    params = [p for p in fus.parameters()]
    for a, b in zip(torch.autograd.grad(got.sum(), leaves + params), torch.autograd.grad(want.sum(), leaves + params)):
        torch.testing.assert_close(a, b)
    assert sum(1 for s in saved.values() if s[-2:] == (3, 16)) == 1, saved  # the adapter outputs, once


def test_dropout_path_under_autocast_keeps_the_adapter_outputs_once():
    """Under autocast the adapters' outputs come in float32; both products that read them would cast them to
    autocast's dtype and keep a copy each for the backward. They are cast once (the same bits). (Adapters the
    stacked op does not take: different activations, so that fuse forms their outputs and runs eagerly.)"""
    ads, fus = _frozen_fusion()
    ads[0].activation = "tanh"
    fus.dropout = 0.1
    fus.train()
    x = torch.randn(2, 5, 16, requires_grad=True)
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = (tuple(t.shape), t.dtype)
        return t

    with torch.autocast("cpu", dtype=torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fus.fuse(x, x, x, ads)
    kd = [v for v in saved.values() if len(v[0]) >= 3 and v[0][-2:] == (3, 16)]  # per token, k x d
    assert len(kd) == 1 and kd[0][1] == torch.bfloat16, saved
    out.float().sum().backward()
    assert fus.key.weight.grad is not None and x.grad is not None


class _CountOps:
    """Counts aten ops by name inside the block."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        counts = self.counts = {}

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                name = func.overloadpacket.__name__
                counts[name] = counts.get(name, 0) + 1
                return func(*args, **(kwargs or {}))

        self.mode = Mode()

    def __enter__(self):
        self.mode.__enter__()
        return self.counts

    def __exit__(self, *exc):
        return self.mode.__exit__(*exc)


def _autocast_step(model, ids, mask, backend="eager", autocast=True, dropout=0.0):
    """Loss and float32 gradients of one step under bf16 autocast (or in float32), with the aten ops it ran;
    ``dropout`` on the fusion's scores (masks drawn from seed 0)."""
    model.train()
    fusions = [m for m in model.modules() if isinstance(m, pet_fast.AdapterFusion)]
    for mod in fusions:
        mod.dropout = dropout
    torch.manual_seed(0)
    counter = _CountOps()
    with counter as ops:
        with pet_fast.use_backend(backend), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = logits(model, ids, mask).float().pow(2).mean()
        loss.backward()
    grads = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
    assert all(g.dtype == torch.float32 and g.shape == p.shape for g, p in
               ((p.grad, p) for p in model.parameters() if p.grad is not None))
    return loss.detach(), grads, ops


def _fusion_model_with_query_bias(frozen_value: bool = True, placement="pfeiffer", kind="dynamic", **fusion):
    model = _fused_model(placement, kind, **fusion)
    fusions = [m for m in model.modules() if isinstance(m, pet_fast.AdapterFusion)]
    with torch.no_grad():
        for f in fusions:
            f.query.bias.normal_(0, 0.5)  # (zero at init: the folded bias would be zero too)
    if frozen_value and fusions[1].value is not None:
        fusions[1].value.weight.requires_grad_(False)
    return model, fusions


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_projections_are_cast_once_per_forward_under_autocast(monkeypatch, backend):
    """Under autocast the fusion layers' float32 projections are cast to autocast's dtype for all layers at once
    per forward (one cast forward, one back), not per layer and tensor: without the fold, the same loss and
    gradients, bit for bit, as the casts per layer. A frozen projection still gets no gradient."""
    real = _PROJECTIONS
    ids, mask = batch()
    runs = []
    for per_layer in (False, True):
        if per_layer:
            monkeypatch.setattr(_ForwardProjections, "projections", lambda self, module, dtype, fold=False, kb=False: None)
        else:
            monkeypatch.setattr(_ForwardProjections, "projections",
                                lambda self, module, dtype, fold=False, kb=False: real(self, module, dtype, False, kb))
        model, fusions = _fusion_model_with_query_bias()
        loss, grads, ops = _autocast_step(model, ids, mask, backend)
        assert fusions[1].value.weight.grad is None and fusions[0].value.weight.grad is not None
        runs.append((ops.get("_to_copy", 0), loss, grads))
    (casts, loss, grads), (casts_per_layer, loss_per_layer, grads_per_layer) = runs
    assert len(fusions) == 2
    # per layer: the query's weight and bias, the key's and the value's weight, cast forward and (but the
    # frozen value weight) back; batched: one cast each way
    assert casts_per_layer - casts == (4 + 4) + (4 + 3) - 2
    assert torch.equal(loss, loss_per_layer)
    assert grads.keys() == grads_per_layer.keys()
    for k in grads:
        assert torch.equal(grads[k], grads_per_layer[k]), k


_PROJECTIONS, _STACKED_OP = _ForwardProjections.projections, fusion_ops.stacked_adapter_fusion


def _fold_switch(monkeypatch, fold: bool) -> list:
    """The batched projections with the fold on or off; returns the list to which each stacked op call appends
    whether it got the folded product."""
    monkeypatch.setattr(_ForwardProjections, "projections",
                        lambda self, module, dtype, f=False, kb=False: _PROJECTIONS(self, module, dtype, f and fold, kb))
    seen = []

    def op(*a, **kw):
        seen.append(kw.get("w_query_key") is not None)
        return _STACKED_OP(*a, **kw)

    monkeypatch.setattr(fusion_ops, "stacked_adapter_fusion", op)
    return seen


# 4 x 9 = 36 tokens for the tiny models' d = 32: enough for the fold (methods/fusion.py FOLD_MIN_TOKENS_PER_WIDTH)
FOLD_BATCH = batch(B=4)
FOLD_CONFIGS = [dict(), dict(placement="houlsby", residual_before=True), dict(query_before_ln=True),
                dict(placement="parallel", kind="static")]


@pytest.mark.parametrize("config", FOLD_CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()) or "pfeiffer")
@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_query_and_key_folded_once_per_forward_under_autocast(monkeypatch, backend, config):
    """The stacked op's calls in a model's forward get the query and key projections folded for all layers
    (w_query_key = Wq^T Wk, b_query_key = bq Wk, two batched products): one product per layer where the
    query's projection and qk took two, forward and backward, and the same loss and gradients as the
    unfolded projections up to bf16 rounding (each folded product rounded once, as q and Wk were). Every
    projection that trains gets a gradient; the frozen one none."""
    ids, mask = FOLD_BATCH
    runs = []
    for fold in (True, False):
        seen = _fold_switch(monkeypatch, fold)
        model, fusions = _fusion_model_with_query_bias(**config)
        loss, grads, ops = _autocast_step(model, ids, mask, backend)
        assert seen == [fold] * len(fusions)
        assert fusions[1].value is None or fusions[1].value.weight.grad is None
        runs.append((loss, grads, ops))
    (loss, grads, ops), (loss_ref, grads_ref, ops_ref) = runs
    # the key bias cancels in the softmax (no gradient); the frozen value weight does not train
    trained = {k for k, p in model.named_parameters() if p.requires_grad and not k.endswith(".f.key.bias")}
    assert grads.keys() == grads_ref.keys() == trained and any(k.endswith(".f.query.bias") for k in trained)
    torch.testing.assert_close(loss, loss_ref, rtol=2e-2, atol=1e-3)
    for k in grads_ref:
        scale = grads_ref[k].abs().max().item()
        assert (grads[k] - grads_ref[k]).abs().max().item() <= 0.05 * scale + 1e-6, k
    gemms = lambda o: sum(o.get(n, 0) for n in ("mm", "addmm", "bmm", "matmul"))
    # two layers: forward 2 -> 1 per layer and 2 batched; backward 4 -> 2 per layer and 4 batched
    assert gemms(ops_ref) - gemms(ops) == len(fusions) * (1 + 2) - (2 + 4)


def test_small_batches_take_the_projections_unfolded(monkeypatch):
    """Fewer tokens than the width (3 x 9 = 27 against d = 32: serving, small evaluation batches), where the
    batched products would cost more than they save: the stacked op gets the projections unfolded, in
    inference and in training, under autocast and in float32."""
    ids, mask = batch()
    assert int(ids.numel()) < 32
    for autocast in (True, False):
        seen = _fold_switch(monkeypatch, True)
        model, fusions = _fusion_model_with_query_bias()
        _autocast_step(model, ids, mask, autocast=autocast)
        model.eval()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits(model, ids, mask)
        assert seen == [False] * (2 * len(fusions))


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_query_and_key_folded_in_float32_training(monkeypatch, backend):
    """Without autocast (float32 weights and activations) the batch is made for the fold alone (no cast):
    the stacked op gets the folded product, with the unfolded projections' loss and gradients to float32
    rounding, and no cast more than they make."""
    ids, mask = FOLD_BATCH
    runs = []
    for fold in (True, False):
        seen = _fold_switch(monkeypatch, fold)
        model, fusions = _fusion_model_with_query_bias()
        loss, grads, ops = _autocast_step(model, ids, mask, backend, autocast=False)
        assert seen == [fold] * len(fusions)
        runs.append((loss, grads, ops))
    (loss, grads, ops), (loss_ref, grads_ref, ops_ref) = runs
    assert grads.keys() == grads_ref.keys() and ops.get("_to_copy", 0) == ops_ref.get("_to_copy", 0)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-7)
    for k in grads_ref:
        scale = grads_ref[k].abs().max().item()
        assert (grads[k] - grads_ref[k]).abs().max().item() <= 1e-4 * scale + 1e-9, k


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_folded_projections_in_inference_under_autocast(monkeypatch, backend):
    """Inference (no_grad, eval) under autocast takes the fold too, and errs no more than the unfolded
    projections against the float64 model (the precision rule: at most twice their error plus a small part).
    Adapters and projections are scaled up so that the scores matter (at their initial scale the fused output
    hardly depends on them: a 10% change of the query bias moved the hidden state by 3e-5; here by 0.26), which
    also makes the softmax sharp: bf16 rounding of either form then moves single outputs by ~0.1."""
    import copy

    ids, mask = FOLD_BATCH
    outs = []
    for fold in (True, False):
        seen = _fold_switch(monkeypatch, fold)
        model, fusions = _fusion_model_with_query_bias(frozen_value=False)
        torch.manual_seed(1)
        with torch.no_grad():
            for mod in model.modules():
                if isinstance(mod, pet_fast.BottleneckAdapter):
                    mod.w_up.normal_(0, 0.5)
                    mod.w_down.normal_(0, 0.5)
            for f in fusions:
                f.query.weight.normal_(0, 0.5)
                f.key.weight.normal_(0, 0.5)
        model.eval()
        with torch.no_grad(), pet_fast.use_backend(backend), torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        outs.append(out.hidden_states[-1].double())
        assert seen == [fold] * len(fusions)
        if not fold:
            with torch.no_grad(), pet_fast.use_backend("eager"):
                ref = copy.deepcopy(model).double()(input_ids=ids, attention_mask=mask,
                                                    output_hidden_states=True).hidden_states[-1]
    err_fold, err_unfold = ((o - ref).abs().max().item() for o in outs)
    assert err_fold <= 2 * err_unfold + 1e-2 * ref.abs().max().item(), (err_fold, err_unfold)
    assert (outs[0] - outs[1]).abs().mean().item() < 2e-3 * ref.abs().max().item()


def test_fuse_takes_adapters_the_stacked_op_does_not():
    """AdapterFusion.fuse on adapters with different activations and a per-channel scaling: the given-values
    op on their outputs, the same numbers as fusing those outputs directly."""
    fus = pet_fast.AdapterFusion(8).eval()
    ads = [pet_fast.BottleneckAdapter(8, 2, activation="tanh"), pet_fast.BottleneckAdapter(8, 3, scaling="channel")]
    with torch.no_grad():
        ads[1].scaling.copy_(torch.rand(8) + 0.5)
        for a in ads:
            a.w_up.normal_()
    x, q, r = torch.randn(3, 8), torch.randn(3, 8), torch.randn(3, 8)
    values = torch.stack([a(x, residual=torch.zeros_like(x)) for a in ads], dim=-2)
    torch.testing.assert_close(fus.fuse(x, q, r, ads), fus(q, values, r))


# --- dropout on the scores through the stacked op (its score mask) ---------------------------------------

def _definition_with_mask(fus, x, query, residual, ads, mask, t):
    """AdapterHub's BertFusion over the adapters' outputs, as written (k keys and k projected values), with the
    dropout's mask given: scores * mask, then the temperature and the softmax."""
    values = torch.stack([a(x, residual=torch.zeros_like(x)) for a in ads], dim=-2)
    if fus.residual_before:
        values = values + residual.unsqueeze(-2)
    q = fus.query(query) if fus.query is not None else query
    keys = fus.key(values) if fus.key is not None else values
    vals = F.linear(values, fus.value.weight) if fus.value is not None and fus.value_before_softmax else values
    scores = torch.matmul(keys, q.unsqueeze(-1)).squeeze(-1) * mask
    out = torch.matmul(torch.softmax(scores / t, dim=-1).unsqueeze(-2), vals).squeeze(-2)
    if fus.value is not None and not fus.value_before_softmax:
        out = F.linear(out, fus.value.weight)
    return out if fus.residual_before else out + residual


@pytest.mark.parametrize("kw", [dict(), dict(residual_before=True, value_before_softmax=False), dict(value=False)])
@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_fuse_with_dropout_takes_the_stacked_op_and_equals_the_definition(monkeypatch, backend, kw):
    """In training with dropout, fuse runs the stacked op with the dropout as its score mask (one op, the
    adapters' outputs never formed, every backend): with the mask it drew, the output and every gradient (the
    key bias's included: with dropout it counts) equal AdapterHub's definition, in float32 against float64."""
    import pet_fast.methods.fusion as fusion_mod

    torch.manual_seed(0)
    ads, _ = _frozen_fusion()
    fus = pet_fast.AdapterFusion(16, dropout=0.4, **kw).train()
    _randomize_projections(fus)
    masks, stacked = [], []
    real_mask, real_op = fusion_mod.dropout_mask, fusion_ops.stacked_adapter_fusion
    monkeypatch.setattr(fusion_mod, "dropout_mask", lambda *a: masks.append(real_mask(*a)) or masks[-1])
    monkeypatch.setattr(fusion_ops, "stacked_adapter_fusion", lambda *a, **k: stacked.append(1) or real_op(*a, **k))
    x, q, res = (torch.randn(4, 5, 16, requires_grad=True) for _ in range(3))
    got = fus.fuse(x, q, res, ads, backend=backend)
    assert len(stacked) == 1 and len(masks) == 1 and masks[0].shape == (4, 5, 3)
    fus64 = copy.deepcopy(fus).double()
    ads64 = [copy.deepcopy(a).double() for a in ads]
    leaves64 = [t.detach().double().requires_grad_() for t in (x, q, res)]
    want = _definition_with_mask(fus64, *leaves64, ads64, masks[0].double(), 1.0)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)
    dy = torch.randn(got.shape)
    params, params64 = list(fus.parameters()), list(fus64.parameters())
    have = torch.autograd.grad(got, [x, q, res] + params, dy)
    need = torch.autograd.grad(want, leaves64 + params64, dy.double())
    for i, (a, b) in enumerate(zip(have, need)):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5 * max(1.0, b.abs().max().item()), msg=str(i))
    if fus.key is not None:  # (with dropout the key bias counts: it gets a gradient)
        assert have[3 + [n for n, _ in fus.named_parameters()].index("key.bias")].abs().max() > 0


@pytest.mark.parametrize("dropout", [0.0, 0.4])
@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_fuse_at_a_temperature_equals_the_definition(monkeypatch, backend, dropout):
    """A temperature other than 1 (temperature=True's annealing) divides the scores, as AdapterHub's BertFusion
    does (after the dropout's mask): the op gets it folded into the key projection, and the output and every
    gradient are the definition's, in float32 against float64."""
    import pet_fast.methods.fusion as fusion_mod

    torch.manual_seed(0)
    ads, _ = _frozen_fusion()
    fus = pet_fast.AdapterFusion(16, dropout=dropout, temperature=True).train()
    _randomize_projections(fus)
    masks = []
    real_mask = fusion_mod.dropout_mask
    monkeypatch.setattr(fusion_mod, "dropout_mask", lambda *a: masks.append(real_mask(*a)) or masks[-1])
    x, q, res = (torch.randn(4, 5, 16, requires_grad=True) for _ in range(3))
    t = fus.T
    got = fus.fuse(x, q, res, ads, backend=backend)
    assert fus.T < t == 50.0
    mask = masks[0].double() if masks else torch.ones(4, 5, 3, dtype=torch.float64)
    fus64 = copy.deepcopy(fus).double()
    ads64 = [copy.deepcopy(a).double() for a in ads]
    leaves64 = [v.detach().double().requires_grad_() for v in (x, q, res)]
    want = _definition_with_mask(fus64, *leaves64, ads64, mask, t)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)
    dy = torch.randn(got.shape)
    params = [p for p in fus.parameters() if p.requires_grad]
    params64 = [p for p in fus64.parameters() if p.requires_grad]
    have = torch.autograd.grad(got, [x, q, res] + params, dy, allow_unused=True)
    need = torch.autograd.grad(want, leaves64 + params64, dy.double(), allow_unused=True)
    for i, (a, b) in enumerate(zip(have, need)):
        if b is None or (a is None and not dropout):  # (the key bias: its term cancels without a mask)
            continue
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5 * max(1.0, b.abs().max().item()), msg=str(i))


def test_fuse_with_dropout_draws_a_new_mask_per_call_and_none_in_eval():
    """Each training call draws its own mask (outputs differ); in eval mode there is no dropout (the output
    is the dropout-free one, folded or not)."""
    ads, _ = _frozen_fusion()
    fus = pet_fast.AdapterFusion(16, dropout=0.5).train()
    x = torch.randn(6, 16)
    a, b = fus.fuse(x, x, x, ads), fus.fuse(x, x, x, ads)
    assert not torch.equal(a, b)
    fus.eval()
    plain = pet_fast.AdapterFusion(16).eval()
    plain.load_state_dict(fus.state_dict())
    torch.testing.assert_close(fus.fuse(x, x, x, ads), plain.fuse(x, x, x, ads), rtol=0, atol=0)


def test_dropout_mask_values_and_rate():
    """0 with probability p, else 1 / (1 - p): the mean stays 1."""
    import pet_fast.methods.fusion as fusion_mod

    torch.manual_seed(0)
    m = fusion_mod.dropout_mask((200, 500), 0.3, "cpu")
    assert m.dtype == torch.float32 and m.shape == (200, 500)
    kept = m[m != 0]
    assert torch.equal(kept, torch.full_like(kept, 1 / 0.7))
    zeros = (m == 0).float().mean().item()
    assert abs(zeros - 0.3) < 0.01 and abs(m.mean().item() - 1.0) < 0.02  # (100k draws: 5 sigma ~ 0.007)


@pytest.mark.parametrize("temperature", [1.0, 3.0])
@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_dropout_with_the_fold_gives_the_unfolded_dropout_step(monkeypatch, backend, autocast, temperature):
    """With dropout on the scores the fold still applies: the key bias's term <Q, b_key>, which masked scores
    no longer cancel, comes folded as the op's score shift (query @ (b_key Wq) + bq . b_key, batched for all
    layers with the fold). With the same masks (same seed), the unfolded dropout step's loss and gradients,
    the key bias's included (float32: to float32 rounding; bf16 autocast: to its rounding). A temperature
    (folded into the folded product and the shift, or into the key projection) likewise."""
    ids, mask = FOLD_BATCH
    runs = []
    for fold in (True, False):
        seen = _fold_switch(monkeypatch, fold)
        shifts = []
        inner = fusion_ops.stacked_adapter_fusion
        monkeypatch.setattr(fusion_ops, "stacked_adapter_fusion",
                            lambda *a, **kw: shifts.append(kw.get("score_shift") is not None) or inner(*a, **kw))
        model, fusions = _fusion_model_with_query_bias()
        with torch.no_grad():
            for f in fusions:
                f.key.bias.normal_(0, 0.5)  # (zero at init: its term would be zero)
                f.T = temperature
        loss, grads, _ = _autocast_step(model, ids, mask, backend, autocast=autocast, dropout=0.3)
        assert seen == [fold] * len(fusions) and shifts == [fold] * len(fusions)
        runs.append((loss, grads))
    (loss, grads), (loss_ref, grads_ref) = runs
    trained = {k for k, p in model.named_parameters() if p.requires_grad}
    assert grads.keys() == grads_ref.keys() == trained and any(k.endswith(".f.key.bias") for k in trained)
    rtol = 0.05 if autocast else 1e-4
    torch.testing.assert_close(loss, loss_ref, rtol=rtol, atol=1e-6)
    for k in grads_ref:
        scale = grads_ref[k].abs().max().item()
        assert (grads[k] - grads_ref[k]).abs().max().item() <= rtol * scale + 1e-9, k


def _annealing_model(kind="bert"):
    torch.manual_seed(0)
    model = _fused_model("pfeiffer", temperature=True, dropout_prob=0.0)
    return model


def test_the_annealed_temperature_is_saved_and_loaded(tmp_path):
    """temperature=True's progress is state: after some training forwards, save and load (and load_state_dict)
    give a model at the same temperature, bit for bit, with the same logits."""
    model = _annealing_model()
    ids, mask = batch()
    model.train()
    for _ in range(7):
        logits(model, ids, mask)
    fusions = [m for m in model.modules() if isinstance(m, pet_fast.AdapterFusion)]
    assert all(f.T == pytest.approx(50.0 - 7 * 0.05) for f in fusions)
    for n in ("a0", "a1", "a2", "f"):
        pet_fast.save(model, tmp_path / n, n)
    fresh = build("bert")
    for n in ("a0", "a1", "a2", "f"):
        pet_fast.load(fresh, tmp_path / n, n)
    model.eval()
    fresh.eval()
    torch.testing.assert_close(logits(fresh, ids, mask), logits(model, ids, mask), rtol=0, atol=0)
    assert [f.T for f in fresh.modules() if isinstance(f, pet_fast.AdapterFusion)] == [f.T for f in fusions]
    other = _annealing_model()
    other.load_state_dict(model.state_dict())
    other.eval()
    torch.testing.assert_close(logits(other, ids, mask), logits(model, ids, mask), rtol=0, atol=0)


def test_the_annealed_temperature_follows_a_state_dict_loaded_with_assign():
    """load_state_dict(assign=True) puts new tensors in place of temperature_steps (version 0 when read from
    safetensors, as the fresh buffer's): the temperature follows them (it stayed at its start, 50)."""
    model = _annealing_model()
    ids, mask = batch()
    model.train()
    for _ in range(5):
        logits(model, ids, mask)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for k, v in state.items():
        if k.endswith("temperature_steps"):
            state[k] = torch.tensor(int(v), dtype=v.dtype)  # version 0
            assert state[k]._version == 0
    other = _annealing_model()
    other.load_state_dict(state, assign=True)
    model.eval()
    other.eval()
    torch.testing.assert_close(logits(other, ids, mask), logits(model, ids, mask), rtol=0, atol=0)
    assert [f.T for f in other.modules() if isinstance(f, pet_fast.AdapterFusion)] == pytest.approx([50.0 - 5 * 0.05] * 2)


@pytest.mark.parametrize("reentrant", [False, True])
def test_a_recomputed_layer_keeps_its_forwards_temperature(reentrant):
    """Under gradient checkpointing each layer's forward runs again in the backward: it takes the temperature
    of its forward and lowers nothing, so a step's temperature and gradients are those without checkpointing."""
    ids, mask = batch()
    runs = []
    for ckpt in (False, True):
        model = _annealing_model()
        if ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        model.train()
        for _ in range(2):
            logits(model, ids, mask).pow(2).sum().backward()
        runs.append(({f.T for f in model.modules() if isinstance(f, pet_fast.AdapterFusion)},
                     {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}))
    (t_plain, g_plain), (t_ckpt, g_ckpt) = runs
    assert t_plain == t_ckpt and len(t_plain) == 1 and t_plain.pop() == pytest.approx(50.0 - 2 * 0.05)
    assert g_plain.keys() == g_ckpt.keys() and g_plain
    for k in g_plain:
        torch.testing.assert_close(g_ckpt[k], g_plain[k], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_every_trainable_fusion_parameter_gets_a_gradient(kind):
    """Without dropout on the scores (Llama has no attention dropout; BERT's is 0.1) the key projection's bias
    cancels in the softmax and can get no gradient: it is frozen, so that every parameter that trains gets a
    gradient at every step (DistributedDataParallel expects one for each)."""
    model = build(kind)
    for i in range(2):
        pet_fast.inject(model, pet_fast.AdapterConfig(placement="houlsby", init="bert", bottleneck=4), f"a{i}")
    pet_fast.inject(model, pet_fast.FusionConfig(adapters=["a0", "a1"]), "f")
    ids, mask = batch(pad_left=kind == "llama")
    model.train()
    logits(model, ids, mask).sum().backward()
    trainable = pet_fast.trainable_parameters(model)
    assert trainable and all(p.grad is not None for p in trainable.values())
    key_bias = [k for k in pet_fast.task_parameters(model, "f") if k.endswith(".key.bias")]
    assert key_bias and all((k in trainable) == (kind == "bert") for k in key_bias)


def test_a_removed_fusion_is_freed_and_the_last_one_takes_its_hooks():
    import gc
    import weakref

    model = _fused_model("pfeiffer")
    pet_fast.inject(model, pet_fast.FusionConfig(adapters=["a0", "a1"]), "g")
    state = model.__dict__["_pet_fast_fusion_forward"]
    removed = weakref.ref(next(m for m in model.modules() if isinstance(m, pet_fast.AdapterFusion)))
    pet_fast.remove(model, "f")
    gc.collect()
    assert "f" not in state.sites and removed() is None  # nothing keeps the removed fusion alive
    base = model.base_model
    pet_fast.remove(model, "g")
    assert "_pet_fast_fusion_forward" not in model.__dict__
    assert not base._forward_pre_hooks and not base._forward_hooks
    ids, mask = batch()
    pet_fast.set_active(model, "a0")
    logits(model, ids, mask).sum().backward()  # the adapters run on


def test_fusion_on_a_float16_model_under_bfloat16_autocast():
    """The per-forward cast of the fusion projections concatenates them with autocast off (CPU autocast to
    bfloat16 cannot concatenate float16 tensors: the forward raised)."""
    model = build("llama")
    for i in range(2):
        pet_fast.inject(model, pet_fast.AdapterConfig(init="bert"), f"a{i}")
    pet_fast.inject(model, pet_fast.FusionConfig(adapters=["a0", "a1"]), "f")
    model.half().train()
    ids, mask = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = logits(model, ids, mask)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    out.float().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in pet_fast.trainable_parameters(model).values())


def test_an_inference_mode_evaluation_leaves_training_working():
    """The fusion's stack of frozen adapters is not kept from an inference-mode call (inference tensors saved
    for backward failed every later training step)."""
    model = _fused_model("pfeiffer")
    ids, mask = batch()
    model.eval()
    with torch.inference_mode():
        want = logits(model, ids, mask)
    model.train()
    logits(model, ids, mask).sum().backward()
    assert all(p.grad is not None for p in pet_fast.trainable_parameters(model).values())
    model.eval()
    torch.testing.assert_close(logits(model, ids, mask).detach(), want)


def test_vmap_over_the_fused_adapters_weights():
    """torch.func.vmap over sets of adapter weights (functional_call): parameters without storage are not
    cached by address; each set gives what a loop over the sets gives."""
    from torch.func import functional_call, vmap

    model = _fused_model("pfeiffer")
    model.eval()
    ids, mask = batch()
    names = [k for k, _ in model.named_parameters() if any(f"{TASK_ATTR}.a{i}." in k for i in range(3))]
    base = {k: v.detach().clone() for k, v in model.named_parameters() if k in names}
    sets = {k: torch.stack([v, 2 * v]) for k, v in base.items()}

    def run(params):
        return functional_call(model, params, (), dict(input_ids=ids, attention_mask=mask)).logits

    with torch.no_grad():
        got = vmap(run)(sets)
        for i in range(2):
            torch.testing.assert_close(got[i], run({k: v[i] for k, v in sets.items()}))


@pytest.mark.parametrize("fold", [True, False])
def test_a_layer_run_without_grad_leaves_later_layers_projections_their_gradients(monkeypatch, fold):
    """The per-forward batch of every layer's projections was keyed without grad mode: made at a first layer run
    under no_grad (frozen lower layers, a reentrant checkpoint), later layers took it, and their fusion's query,
    key and value got no gradient (float32 from d tokens per call, any size under autocast)."""
    from pet_fast.methods import fusion as fusion_mod

    ids, mask = batch(B=4)  # (36 tokens: the fold pays from d = 32)

    def grads(batched):
        monkeypatch.setattr(fusion_mod, "FOLD_MIN_TOKENS_PER_WIDTH", 1.0 if batched and fold else 1e9)
        model = _fused_model("pfeiffer")
        model.train()
        if batched and not fold:  # the cast batch: under autocast
            ctx = torch.autocast("cpu", dtype=torch.bfloat16)
        else:
            ctx = contextlib.nullcontext()
        layer0 = model.bert.encoder.layer[0]
        inner = layer0.forward

        def frozen(*a, **kw):
            with torch.no_grad():
                return inner(*a, **kw)

        layer0.forward = frozen
        with ctx:
            logits(model, ids, mask).float().square().sum().backward()
        return {k: p.grad for k, p in pet_fast.trainable_parameters(model).items() if "layer.1." in k and ".f." in k}

    ref, got = grads(False), grads(True)
    assert ref and all(g is not None for g in ref.values())
    assert [k for k, g in got.items() if g is None] == []
    if fold:
        for k in ref:
            torch.testing.assert_close(got[k], ref[k], rtol=1e-4, atol=1e-6)


def test_torch_jit_trace_of_a_fused_model_serves_other_shapes():
    """Traced, the adapters' widths are tensors: the check that they agree refused every traced fusion."""
    model = _fused_model("pfeiffer").eval()
    ids, mask = batch()

    with torch.no_grad():
        traced = torch.jit.trace(Logits(model), (ids, mask), check_trace=False, strict=False)
        ids2, mask2 = batch(B=4, T=11)
        torch.testing.assert_close(traced(ids2, mask2), logits(model, ids2, mask2), rtol=1e-5, atol=1e-6)
