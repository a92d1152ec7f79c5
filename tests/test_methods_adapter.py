"""AdapterConfig on tiny BERT / RoBERTa / GPT-2 / Llama-family models, checked against closed forms
of AdapterHub's computations (seq_bn, double_seq_bn, par_bn) written here independently."""
import copy

import pytest
import torch
import torch.nn.functional as F

import pet_fast
from pet_fast import models
from pet_fast.tasks import TASK_ATTR
from tiny_models import batch, build, logits

ACT = {"relu": F.relu, "silu": F.silu, "gelu": F.gelu, "tanh": torch.tanh}


def A(ad, z):
    """AdapterHub's adapter branch: scaling * up(act(down(z))) (no residual)."""
    h = ACT[ad.activation](z @ ad.w_down.T + ad.b_down)
    return ad.scaling * (h @ ad.w_up.T + ad.b_up)


def test_defaults_follow_adapterhub():
    h = pet_fast.AdapterConfig(placement="houlsby")
    p = pet_fast.AdapterConfig()  # seq_bn is AdapterHub's default
    par = pet_fast.AdapterConfig(placement="par_bn")
    assert (h.reduction_factor, h.activation, h.scaling, h.init, h.mh_adapter, h.output_adapter) == (16, "silu", 1.0, "bert", True, True)
    assert (p.placement, p.reduction_factor, p.activation, p.mh_adapter, p.output_adapter) == ("pfeiffer", 16, "relu", False, True)
    assert (par.placement, par.reduction_factor, par.scaling, par.init) == ("parallel", 2, 4.0, "identity")
    assert pet_fast.AdapterConfig(placement="double_seq_bn").placement == "houlsby"
    with pytest.raises(ValueError, match="placement"):
        pet_fast.AdapterConfig(placement="sideways")
    with pytest.raises(ValueError, match="activation"):
        pet_fast.AdapterConfig(activation="nope")


@pytest.mark.parametrize("placement", ["houlsby", "pfeiffer", "parallel"])
def test_bert_sublayer_closed_form(placement):
    model = build("bert")
    pet_fast.inject(model, pet_fast.AdapterConfig(placement=placement, init="bert", reduction_factor=4), "t")
    layer = model.bert.encoder.layer[0]
    torch.manual_seed(3)
    for host, width in ((layer.attention.output, 32), (layer.output, 37)):
        if TASK_ATTR not in host._modules:
            assert placement != "houlsby"
            continue
        ad = host.pet_fast_tasks["t"]
        with torch.no_grad():
            ad.b_down.normal_()
            ad.b_up.normal_()
        hs, x = torch.randn(2, 5, width), torch.randn(2, 5, 32)
        LN = host.LayerNorm
        h = host.dense(hs)
        if placement == "houlsby":
            want = LN(h + x + A(ad, h))
        elif placement == "pfeiffer":
            want = LN(h + x + A(ad, LN(h + x)))
        else:
            want = LN(h + x + A(ad, x))
        got = host(hs, x)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        pet_fast.set_active(model, None)
        torch.testing.assert_close(host(hs, x), LN(h + x))  # no active task: the original layer
        pet_fast.set_active(model, "t")


def _manual_pre_ln(base, model, placement):
    """Hooks on an untouched copy that add the adapters by the closed forms (x + h + A(...))."""
    fam = models.family(base)
    handles = []
    for b_blk, m_blk in zip(models.layers(base), models.layers(model)):
        bp, mp = models.block_parts(b_blk, fam), models.block_parts(m_blk, fam)
        if placement == "houlsby":
            for sub in ("attn", "mlp"):
                ad = mp[sub].pet_fast_tasks["t"]

                def hook(mod, inp, out, ad=ad):
                    if isinstance(out, tuple):
                        return (out[0] + A(ad, out[0]),) + out[1:]
                    return out + A(ad, out)
                handles.append(bp[sub].register_forward_hook(hook))
        elif placement == "pfeiffer":
            ad = mp["block"].pet_fast_tasks["t"]

            def hook(mod, inp, out, ad=ad):
                y = out[0] if isinstance(out, tuple) else out
                y = y + A(ad, y)
                return (y,) + out[1:] if isinstance(out, tuple) else y
            handles.append(bp["block"].register_forward_hook(hook))
        else:
            ad = mp["mlp"].pet_fast_tasks["t"]
            seen = {}
            handles.append(bp["norm_mlp"].register_forward_pre_hook(lambda mod, inp, seen=seen: seen.update(r=inp[0])))
            handles.append(bp["mlp"].register_forward_hook(lambda mod, inp, out, ad=ad, seen=seen: out + A(ad, seen["r"])))
    return handles


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("placement", ["houlsby", "pfeiffer", "parallel"])
def test_pre_ln_closed_form(kind, placement):
    base = build(kind)
    model = copy.deepcopy(base)
    pet_fast.inject(model, pet_fast.AdapterConfig(placement=placement, init="bert", bottleneck=5, train_head=False), "t")
    for mod in model.modules():
        if isinstance(mod, pet_fast.BottleneckAdapter):
            with torch.no_grad():
                mod.w_up.normal_(0, 0.3)
                mod.b_up.normal_(0, 0.1)
    ids, mask = batch()
    _manual_pre_ln(base, model, placement)
    torch.testing.assert_close(logits(model, ids, mask), logits(base, ids, mask), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["bert", "roberta", "electra", "gpt2", "llama", "mistral", "qwen2", "qwen3"])
def test_identity_init_keeps_logits_and_gradients_reach_exactly_the_task(kind):
    model = build(kind)
    ids, mask = batch()
    ref = logits(model, ids, mask).detach()
    placement = "houlsby" if kind in ("bert", "llama") else "parallel"
    pet_fast.inject(model, pet_fast.AdapterConfig(placement=placement, init="identity"), "t")
    out = logits(model, ids, mask)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    out.float().pow(2).sum().backward()
    trainable = {k for k, p in model.named_parameters() if p.requires_grad}
    with_grad = {k for k, p in model.named_parameters() if p.grad is not None}
    assert trainable == with_grad
    assert trainable and all(f"{TASK_ATTR}.t." in k for k in trainable)
    assert any(k.startswith(("classifier", "score")) for k in trainable)  # the task's own head copy


def test_two_tasks_switch_and_remove():
    model = build("bert")
    ids, mask = batch()
    ref = logits(model, ids, mask).detach()
    pet_fast.inject(model, pet_fast.AdapterConfig(placement="pfeiffer", init="bert"), "a")
    out_a = logits(model, ids, mask).detach()
    pet_fast.inject(model, pet_fast.AdapterConfig(placement="houlsby", init="bert"), "b")
    out_b = logits(model, ids, mask).detach()
    assert not torch.allclose(out_a, out_b)
    pet_fast.set_active(model, "a")
    torch.testing.assert_close(logits(model, ids, mask), out_a)
    assert all(not p.requires_grad for k, p in model.named_parameters() if ".b." in k)
    with pytest.raises(RuntimeError, match=r"tasks \['a', 'b'\] are all active on the same module"):
        pet_fast.set_active(model, ["a", "b"])
        logits(model, ids, mask)
    pet_fast.remove(model, "a")
    pet_fast.remove(model, "b")
    assert not any(TASK_ATTR in k for k in model.state_dict())
    torch.testing.assert_close(logits(model, ids, mask), ref, rtol=0, atol=0)


def test_target_modules_generic_path():
    model = build("bert")
    cfg = pet_fast.AdapterConfig(placement="houlsby", target_modules=["attention.self.value"], bottleneck=4, init="bert")
    pet_fast.inject(model, cfg, "t")
    host = model.bert.encoder.layer[1].attention.self.value
    ad = host.pet_fast_tasks["t"]
    x = torch.randn(2, 3, 32)
    h = torch.nn.functional.linear(x, host.weight, host.bias)
    torch.testing.assert_close(host(x), h + A(ad, h), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="match no module"):
        pet_fast.inject(model, pet_fast.AdapterConfig(target_modules=["nope"]), "u")
    assert "u" not in model._pet_fast_registry.configs


@pytest.mark.parametrize("kind,target", [("bert", "intermediate.dense"), ("bert", "output.dense"), ("gpt2", "mlp.c_fc")])
def test_parallel_adapter_on_a_target_that_changes_width_is_refused_at_inject(kind, target):
    """A parallel adapter reads the target's input and adds to its output: a linear map between two widths
    (32 -> 37, 37 -> 32; GPT-2's Conv1D too) is refused before anything changes; one width works."""
    model = build(kind)
    keys = set(model.state_dict())
    with pytest.raises(ValueError, match=r"maps (32 to 37|37 to 32) features"):
        pet_fast.inject(model, pet_fast.AdapterConfig(placement="parallel", target_modules=[target]), "t")
    assert set(model.state_dict()) == keys and pet_fast.tasks.registry(model) is None
    same = "attention.self.value" if kind == "bert" else "attn.c_proj"
    pet_fast.inject(model, pet_fast.AdapterConfig(placement="parallel", target_modules=[same], init="bert"), "ok")
    ids, mask = batch()
    logits(model, ids, mask).sum().backward()


def test_pfeiffer_after_attention_refused_on_pre_ln_before_any_change():
    model = build("llama")
    keys = set(model.state_dict())
    with pytest.raises(ValueError, match="pre-LN"):
        pet_fast.inject(model, pet_fast.AdapterConfig(placement="pfeiffer", mh_adapter=True), "t")
    assert set(model.state_dict()) == keys
    assert all(p.requires_grad for p in model.parameters())
    assert getattr(model, "_pet_fast_registry", None) is None


@pytest.mark.filterwarnings("ignore:.past_key_values. is deprecated")
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_left_padding_and_generate_with_a_kv_cache(kind):
    model = build(kind, head="lm")
    ids, mask = batch(pad_left=True)
    ref = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
    pet_fast.inject(model, pet_fast.AdapterConfig(placement="parallel", init="identity"), "t")
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert torch.equal(out, ref)
    for mod in model.modules():
        if isinstance(mod, pet_fast.BottleneckAdapter):
            with torch.no_grad():
                mod.w_up.normal_(0, 0.5)
    # With the cache, each new token's logits equal those of a full forward over the sequence so far.
    full = model(input_ids=ids, attention_mask=mask).logits[:, -1]
    step = model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], use_cache=True)
    last = model(input_ids=ids[:, -1:], attention_mask=mask, past_key_values=step.past_key_values).logits[:, -1]
    torch.testing.assert_close(last, full, rtol=1e-4, atol=1e-5)


def test_inject_returns_the_model_and_the_registry_lives_in_tasks():
    import pet_fast.tasks as mod

    assert mod.TASK_ATTR == TASK_ATTR and pet_fast.inject is mod.inject
    model = build("bert")
    assert pet_fast.inject(model, pet_fast.AdapterConfig(), "t") is model


@pytest.mark.parametrize("placement", ["houlsby", "pfeiffer", "parallel"])
def test_training_step_under_autocast_triton_matches_eager(placement, monkeypatch):
    """BERT under fp16 autocast (which the interpreter computes right): houlsby sites hand the adapter
    half activations with the float32 residual stream; pfeiffer sites hand it the float32 stream itself
    with the block's frozen LayerNorm (the op normalises and rounds to fp16 for the products inside).
    No cast of the residual stream reaches the op, the triton backend's loss and gradients match
    eager's, every gradient is float32."""
    from pet_fast.ops import bottleneck_adapter as op

    seen = []
    real = op.bottleneck_adapter

    def spy(x, *args, residual=None, **kw):
        if kw.get("layer_norm") is not None:  # pfeiffer: x is the float32 stream, the base of the op
            seen.append((torch.float16 if x.dtype == torch.float32 else x.dtype, torch.float32))
        else:
            seen.append((x.dtype, None if residual is None else residual.dtype))
        return real(x, *args, residual=residual, **kw)

    monkeypatch.setattr("pet_fast.methods.adapter.bottleneck_adapter", spy)
    results = []
    for backend in ("eager", "triton"):
        torch.manual_seed(0)
        model = build("bert")
        pet_fast.inject(model, pet_fast.AdapterConfig(placement=placement, init="bert"), "t")
        model.train()
        ids, mask = batch()
        with pet_fast.use_backend(backend), torch.autocast("cpu", dtype=torch.float16):
            loss = logits(model, ids, mask).float().pow(2).mean()
        loss.backward()
        grads = {k: p.grad for k, p in model.named_parameters() if p.requires_grad}
        assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads.values())
        results.append((loss.detach(), grads))
    assert seen and all(xd == torch.float16 for xd, _ in seen)
    if placement != "parallel":  # BERT's residual stream is float32 under autocast and stays so
        assert all(rd == torch.float32 for _, rd in seen)
    (loss_e, g_e), (loss_t, g_t) = results
    torch.testing.assert_close(loss_t, loss_e, rtol=5e-3, atol=1e-3)
    for k in g_e:
        scale = g_e[k].abs().max().item()
        assert (g_t[k] - g_e[k]).abs().max().item() <= 0.05 * scale + 1e-4, k


def test_an_attach_failing_past_its_checks_leaves_no_site_behind(monkeypatch):
    """Should a method's attach fail after it has installed some sites (here: the third adapter cannot be
    built), inject takes them off again: a later task runs at every site, as on a fresh model."""
    from pet_fast.methods import _sites, adapter as adapter_module

    real, built = adapter_module.BottleneckAdapter, []

    def failing(*args, **kwargs):
        if len(built) == 2:
            raise RuntimeError("out of memory (simulated)")
        built.append(1)
        return real(*args, **kwargs)

    model, fresh = build("bert"), build("bert")
    monkeypatch.setattr(adapter_module, "BottleneckAdapter", failing)
    with pytest.raises(RuntimeError, match="simulated"):
        pet_fast.inject(model, pet_fast.AdapterConfig(placement="houlsby"), "broken")
    monkeypatch.setattr(adapter_module, "BottleneckAdapter", real)
    assert not any(_sites.site_kind(m) for m in model.modules())
    assert not any(TASK_ATTR in n for n, _ in model.named_modules())
    for m in (model, fresh):
        pet_fast.inject(m, pet_fast.AdapterConfig(placement="houlsby"), "ok")
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for p in pet_fast.task_parameters(m, "ok").values():  # every adapter changes the output
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    ids, mask = batch()
    torch.testing.assert_close(logits(model, ids, mask), logits(fresh, ids, mask), rtol=0, atol=0)


def test_target_modules_on_a_model_without_a_config():
    """A plain nn.Module: the targets give the adapters' widths; the bottleneck must be given (the reduction factor
    has no hidden size to divide)."""
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 4))
    x = torch.randn(5, 6)
    with pytest.raises(ValueError, match=r"give AdapterConfig\(bottleneck=\.\.\.\)"):
        pet_fast.inject(model, pet_fast.AdapterConfig(placement="houlsby", target_modules=["0", "2"]), "a")
    assert not any(p.requires_grad is False for p in model.parameters())  # refused before any change
    pet_fast.inject(model, pet_fast.AdapterConfig(placement="houlsby", target_modules=["0", "2"], bottleneck=3), "a")
    first, second = model[0].pet_fast_tasks["a"], model[2].pet_fast_tasks["a"]
    assert (first.d_model, first.bottleneck, second.d_model) == (10, 3, 4)
    with torch.no_grad():
        for p in pet_fast.task_parameters(model, "a").values():
            p.normal_(0, 0.5)
    # each target's output h becomes h + A(h) (the adapter module's own residual)
    h = first(x @ model[0].weight.T + model[0].bias)
    want = second(torch.relu(h) @ model[2].weight.T + model[2].bias)
    torch.testing.assert_close(model(x), want)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_parallel_adapters_run_when_a_hook_wraps_the_sublayer_after_inject(kind):
    """accelerate's hooks (dispatch_model, cpu offload) wrap a module's forward, keeping the one they wrap as
    _old_forward: the norm in front must still hand the sublayer its input."""
    from accelerate.hooks import ModelHook, add_hook_to_module

    model = build(kind)
    pet_fast.inject(model, pet_fast.AdapterConfig(placement="parallel", init="bert"), "t")
    ids, mask = batch()
    want = logits(model, ids, mask)
    for block in models.layers(model):
        add_hook_to_module(getattr(block, "mlp"), ModelHook())  # a hook that changes nothing
    torch.testing.assert_close(logits(model, ids, mask), want, rtol=0, atol=0)


def _tiny_t5():
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.T5Config(vocab_size=61, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_decoder_layers=2, num_heads=4,
                      decoder_start_token_id=0, pad_token_id=0)
    return tf.T5ForConditionalGeneration(cfg).eval()


def _hosts(model):
    return sorted(n.rsplit(".pet_fast_tasks", 1)[0] for n, _ in model.named_modules() if n.endswith("pet_fast_tasks"))


@pytest.mark.parametrize("config", [
    lambda **kw: pet_fast.AdapterConfig(placement="houlsby", bottleneck=4, **kw),
    lambda **kw: pet_fast.MaskConfig(**kw)])
def test_leave_out_with_target_modules_skips_blocks_not_sublayers(config):
    """T5's names hold two indices, block.<i>.layer.<k>: leave_out took the sub-layer's k (it left out every
    block's self-attention and kept block 0's feed-forward)."""
    model = _tiny_t5()
    pet_fast.inject(model, config(target_modules=["SelfAttention.o", "DenseReluDense.wo"], leave_out=[0]), "t")
    assert _hosts(model) == [f"{stack}.block.1.layer.{k}.{part}" for stack, k, part in [
        ("decoder", 0, "SelfAttention.o"), ("decoder", 2, "DenseReluDense.wo"),
        ("encoder", 0, "SelfAttention.o"), ("encoder", 1, "DenseReluDense.wo")]]


def test_leave_out_refuses_targets_without_a_block_index():
    """ALBERT's one shared layer (albert_layer_groups.0.albert_layers.0) has no block index: leave_out was
    ignored, with no error."""
    import transformers as tf

    cfg = tf.AlbertConfig(vocab_size=61, embedding_size=16, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                          intermediate_size=37)
    model = tf.AlbertModel(cfg).eval()
    with pytest.raises(ValueError, match=r"leave_out needs each target's block index .* "
                                         r"encoder\.albert_layer_groups\.0\.albert_layers\.0\.ffn_output has none"):
        pet_fast.inject(model, pet_fast.AdapterConfig(placement="houlsby", bottleneck=4, target_modules=["ffn_output"],
                                                      leave_out=[1]), "t")
    pet_fast.inject(model, pet_fast.AdapterConfig(placement="houlsby", bottleneck=4, target_modules=["ffn_output"]), "t")


@pytest.mark.parametrize("kind, heads", [("bart", ["classification_head"]),
                                         ("distilbert", ["classifier", "pre_classifier"]),
                                         ("deberta-v2", ["classifier", "pooler"])])
def test_task_heads_of_other_classification_models_train_and_are_saved(kind, heads, tmp_path):
    """BART's (and T5's) classification_head, DistilBERT's pre_classifier and DeBERTa's pooler are new layers of
    the task class: they stayed frozen at their random init with train_head=True, and were not saved."""
    import transformers as tf

    torch.manual_seed(0)
    if kind == "bart":
        cfg = tf.BartConfig(vocab_size=61, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
                            decoder_attention_heads=4, encoder_ffn_dim=37, decoder_ffn_dim=37, num_labels=3)
        make, target = lambda: tf.BartForSequenceClassification(cfg).eval(), "fc2"
    elif kind == "distilbert":
        cfg = tf.DistilBertConfig(vocab_size=61, dim=32, n_layers=1, n_heads=4, hidden_dim=37, num_labels=3)
        make, target = lambda: tf.DistilBertForSequenceClassification(cfg).eval(), "lin2"
    else:
        cfg = tf.DebertaV2Config(vocab_size=61, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                 intermediate_size=37, num_labels=3)
        make, target = lambda: tf.DebertaV2ForSequenceClassification(cfg).eval(), "output.dense"
    model = make()
    torch.manual_seed(0)
    fresh = make()
    with torch.no_grad():  # another random head: the saved task must bring its own
        for head in heads:
            for p in getattr(fresh, head).parameters():
                p.normal_()
    pet_fast.inject(model, pet_fast.AdapterConfig(placement="houlsby", bottleneck=4, target_modules=[target]), "t")
    names = pet_fast.trainable_parameters(model)
    for head in heads:
        assert any(n.startswith(f"{head}.pet_fast_tasks.t.") for n in names), (head, sorted(names))
    ids = torch.randint(3, 61, (2, 7))
    ids[:, -1] = 2  # (BART classifies at its last eos token)
    model.train()
    opt = torch.optim.SGD(list(names.values()), lr=0.5)
    for _ in range(2):
        model(input_ids=ids, labels=torch.tensor([0, 2])).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    pet_fast.load(fresh, pet_fast.save(model, tmp_path / "t", "t"))
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("config", [lambda **kw: pet_fast.AdapterConfig(placement="houlsby", **kw),
                                    lambda **kw: pet_fast.MaskConfig(**kw)])
def test_leave_out_refuses_indices_that_name_no_block(config):
    """leave_out=[-1] (meant as the last block) or [5] on a 2-block model skipped nothing, with no error."""
    for bad in ([-1], [5], [0, 2]):
        with pytest.raises(ValueError, match=r"leave_out \[.*\] names no block of the model \(its blocks: 0\.\.1\)"):
            pet_fast.inject(build("bert"), config(leave_out=bad), "t")
        with pytest.raises(ValueError, match=r"names no block of the model \(its blocks: 0\.\.1\)"):
            pet_fast.inject(build("bert"), config(leave_out=bad, target_modules=["output.dense"]), "t")
    model = build("bert")
    pet_fast.inject(model, config(leave_out=[1]), "t")
    assert all(".layer.0." in n for n in _hosts(model) if ".layer." in n)


def test_a_bare_backbone_keeps_its_pretrained_pooler_frozen():
    """BertModel's pooler is its direct child: it took it for a task head and trained a copy per task."""
    model = build("bert", head="base")
    pet_fast.inject(model, pet_fast.AdapterConfig(placement="houlsby"), "t")
    assert not any("pooler" in n for n in pet_fast.trainable_parameters(model))


def test_an_adapter_after_a_module_without_parameters_takes_the_models_dtype():
    """A target without parameters (a dropout) gave the adapter float32 on the CPU whatever the model's dtype and
    device."""
    model = build("bert").double()
    pet_fast.inject(model, pet_fast.AdapterConfig(placement="houlsby", target_modules=["attention.output.dropout"]), "t")
    params = {n: p for n, p in pet_fast.task_parameters(model, "t").items() if "dropout" in n}
    assert params and all(p.dtype == torch.float64 for p in params.values())
    ids, mask = batch()
    assert logits(model, ids, mask).dtype == torch.float64


def test_pfeiffer_at_a_pruned_layer_norm_applies_the_pruned_weight():
    """Pruning moves a LayerNorm's weight out of its parameter dict: the adapter op applied the norm without a
    weight (4.2 off). Such a norm runs itself."""
    import torch.nn.utils.prune as prune

    def make():
        model = build("bert")
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "LayerNorm.weight" in n:
                    p.uniform_(0.5, 2.0, generator=torch.Generator().manual_seed(len(n)))
        pet_fast.inject(model, pet_fast.AdapterConfig(placement="pfeiffer", init="bert"), "t")
        norm = model.bert.encoder.layer[0].output.LayerNorm
        torch.manual_seed(0)
        prune.random_unstructured(norm, "weight", amount=0.3)
        return model, norm

    model, _ = make()
    plain, norm = make()
    prune.remove(norm, "weight")  # the same weights, made permanent
    ids, mask = batch()
    with torch.no_grad():
        torch.testing.assert_close(logits(model, ids, mask), logits(plain, ids, mask), rtol=1e-5, atol=1e-6)


def test_a_checkpoint_saved_before_pre_classifier_was_copied_per_task_still_loads(tmp_path):
    """DistilBERT's pre_classifier (BART's classification_head, DeBERTa's pooler...) has had a per-task copy since
    2026-11-29: a checkpoint saved before has none, and its load failed on the missing tensors. The copy then keeps
    the model's own head, which the task ran with."""
    import json

    import transformers as tf
    from safetensors.torch import load_file, save_file

    cfg = tf.DistilBertConfig(vocab_size=61, dim=32, n_layers=1, n_heads=4, hidden_dim=37, num_labels=3)
    torch.manual_seed(0)
    model = tf.DistilBertForSequenceClassification(cfg).eval()
    fresh = copy.deepcopy(model)
    pet_fast.inject(model, pet_fast.AdapterConfig(placement="houlsby", bottleneck=4, init="bert",
                                                  target_modules=["lin2"]), "t")
    folder = pet_fast.save(model, tmp_path / "t", "t")
    tensors = {k: v for k, v in load_file(str(folder / "pet_fast_task.safetensors")).items()
               if not k.startswith("pre_classifier.")}
    save_file(tensors, str(folder / "pet_fast_task.safetensors"))  # as saved before
    meta = json.loads((folder / "pet_fast_config.json").read_text())
    meta["tensors"] = {k: v for k, v in meta["tensors"].items() if k in tensors}
    (folder / "pet_fast_config.json").write_text(json.dumps(meta))
    pet_fast.load(fresh, folder)
    ids = torch.randint(3, 61, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)


def test_a_target_naming_a_container_is_refused():
    """target_modules=["layers"] matched Llama's ModuleList of blocks: the adapter was attached, trained and
    saved, but a ModuleList is never called: it changed nothing."""
    with pytest.raises(ValueError, match=r"matches 'model.layers', a ModuleList \(a container, which is never called\)"):
        pet_fast.inject(build("llama"), pet_fast.AdapterConfig(placement="houlsby", target_modules=["layers"]), "t")


def test_a_container_with_a_forward_of_its_own_is_a_target():
    """A ModuleDict subclass that the model calls (SwitchTransformers' experts) was refused as a container."""
    class Experts(torch.nn.ModuleDict):
        def forward(self, x):  # (its experts by name, as SwitchTransformers' are)
            return self["a"](x) + self["b"](x)

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.experts = Experts({"a": torch.nn.Linear(8, 8), "b": torch.nn.Linear(8, 8)})
            self.config = type("Config", (), {"hidden_size": 8})()  # (the width the adapters take)

        def forward(self, x):
            return self.experts(x)

    model = Model()
    x = torch.randn(2, 3, 8)
    want = model(x)
    pet_fast.inject(model, pet_fast.AdapterConfig(placement="houlsby", bottleneck=2, init="bert",
                                                  target_modules=["experts"], train_head=False), "t")
    assert (model(x) - want).abs().max() > 0  # the adapter runs after the experts
