"""Prefix-tuning on tiny random transformers models (BERT, RoBERTa, GPT-2, Llama, Mistral, Qwen2).

The independent computation everywhere: the same base model (a copy, never injected) run with the
prefix written into a transformers ``DynamicCache`` as P past tokens, with ``ones(B, P)`` put in
front of the attention mask, which is how PEFT runs prefix tuning (and, with the positions reset, how
AdapterHub's concatenation behaves). The prefix tables for it are built from the layouts PEFT and
AdapterHub document, not from our per-layer slicing.
"""
import copy
import inspect
import json
import os
import types

import pytest
import torch
import transformers as tf
from transformers import DynamicCache

import pet_fast
from pet_fast import hf_attention
from pet_fast.tasks import inject, registry, set_active, task_parameters, trainable_parameters
from pet_fast.methods.prefix import (
    PrefixConfig,
    adapterhub_prefix_detect,
    adapterhub_prefix_load,
    model_dims,
    peft_prefix_detect,
    peft_prefix_load,
    prefix_encoder,
)

V = 61  # vocabulary; token 1 is RoBERTa's padding id, real tokens are drawn from [3, V)


def make(family, impl="sdpa"):
    torch.manual_seed(0)
    common = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                  attn_implementation=impl)
    if family in ("bert", "roberta"):
        cls = tf.BertForSequenceClassification if family == "bert" else tf.RobertaForSequenceClassification
        cfgcls = tf.BertConfig if family == "bert" else tf.RobertaConfig
        extra = dict(pad_token_id=1) if family == "roberta" else {}
        cfg = cfgcls(max_position_embeddings=64, num_labels=3, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0, **extra, **common)
        return cls(cfg).eval()
    if family == "gpt2":
        cfg = tf.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0,
                            embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, attn_implementation=impl)
        return tf.GPT2LMHeadModel(cfg).eval()
    kv = {"llama": 2, "mistral": 2, "qwen2": 1, "qwen3": 2}[family]
    cfgcls = {"llama": tf.LlamaConfig, "mistral": tf.MistralConfig, "qwen2": tf.Qwen2Config, "qwen3": tf.Qwen3Config}[family]
    clsm = {"llama": tf.LlamaForCausalLM, "mistral": tf.MistralForCausalLM, "qwen2": tf.Qwen2ForCausalLM,
            "qwen3": tf.Qwen3ForCausalLM}[family]
    cfg = cfgcls(num_key_value_heads=kv, max_position_embeddings=64, bos_token_id=0, eos_token_id=0,
                 pad_token_id=0, **common)
    return clsm(cfg).eval()


CAUSAL = ("gpt2", "llama", "mistral", "qwen2")
FAMILIES = ("bert", "roberta") + CAUSAL


_SEQS = [torch.randint(3, V, (n,), generator=torch.Generator().manual_seed(n)) for n in range(8)]


def batch(lengths, side, T=None):
    """Padded batch of fixed random sequences (the sequence of length n is always the same)."""
    T = T or max(lengths)
    ids = torch.ones(len(lengths), T, dtype=torch.long)  # padding id 1
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    seqs = []
    for b, n in enumerate(lengths):
        s = _SEQS[n]
        seqs.append(s)
        sl = slice(0, n) if side == "right" else slice(T - n, T)
        ids[b, sl] = s
        mask[b, sl] = 1
    return ids, mask, seqs


def positions(mask):
    return (mask.cumsum(-1) - 1).clamp(min=0)


def peft_cache(table, L, Hkv, D, B, config):
    """PEFT's get_prompt: (P, L*2*Hkv*D) -> view(B, P, 2L, Hkv, D).permute(2, 0, 3, 1, 4).split(2)."""
    P = table.shape[0]
    pkv = table.unsqueeze(0).expand(B, -1, -1).reshape(B, P, 2 * L, Hkv, D).permute(2, 0, 3, 1, 4).split(2)
    cache = DynamicCache(config=config)
    for layer, kv in enumerate(pkv):
        cache.update(kv[0], kv[1], layer)
    return cache


# The models' cache keyword: ``cache`` in recent transformers, ``past_key_values`` before (5.17, the GPU
# machines' release), so that these tests also run there.
CACHE = "cache" if "cache" in inspect.signature(tf.BertModel.forward).parameters else "past_key_values"


def reference(base, family, table, ids, mask, position_ids=None, shift=True):
    """The base model with the prefix as P cached tokens (PEFT's way). Returns logits (LMs) or the
    (last hidden state, classifier logits) pair (encoders)."""
    L, Hkv, D, _ = model_dims(base)
    P, B = table.shape[0], ids.shape[0]
    cache = peft_cache(table, L, Hkv, D, B, base.config)
    full_mask = torch.cat([torch.ones(B, P, dtype=mask.dtype), mask], dim=1)
    if not shift and position_ids is None:
        position_ids = torch.arange(ids.shape[1])[None].expand(B, -1)
    if shift and position_ids is not None:
        position_ids = position_ids + P
    if family in ("bert", "roberta"):
        if family == "roberta" and position_ids is None:  # roberta's own rule, shifted by P like PEFT
            position_ids = (mask.cumsum(-1) + P) * mask + 1
        elif family == "roberta" and not shift:
            position_ids = (mask.cumsum(-1)) * mask + 1
        out = base.base_model(input_ids=ids, attention_mask=full_mask, position_ids=position_ids, **{CACHE: cache})
        return out.last_hidden_state, base.classifier(out.last_hidden_state if family == "roberta" else out.pooler_output)
    return base(input_ids=ids, attention_mask=full_mask, position_ids=position_ids, **{CACHE: cache}).logits


def run(model, family, ids, mask, position_ids=None):
    if family in ("bert", "roberta"):
        out = model.base_model(input_ids=ids, attention_mask=mask, position_ids=position_ids)
        return out.last_hidden_state, model.classifier(out.last_hidden_state if family == "roberta" else out.pooler_output)
    return model(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits


def close(a, b, tol=2e-5):
    if isinstance(a, tuple):
        for x, y in zip(a, b):
            close(x, y, tol)
        return
    assert torch.allclose(a, b, atol=tol, rtol=tol), (a - b).abs().max().item()


def injected(family, impl="sdpa", **kw):
    model = make(family, impl)
    base = copy.deepcopy(model)
    kw.setdefault("init_std", 1.0)  # prefixes large enough to change the outputs clearly
    inject(model, PrefixConfig(prefix_length=kw.pop("P", 3), **kw), "p")
    return model, base


# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("family", FAMILIES + ("qwen3",))  # (Qwen3: its q/k norms come before the prefix joins)
def test_matches_prefix_as_cached_tokens(family, impl):
    proj = 8 if impl == "eager" else None  # MLP re-parametrisation on one, flat on the other
    model, base = injected(family, impl, projection_dim=proj)
    assert model.config._attn_implementation == hf_attention.NAME
    ids, mask, _ = batch([6, 4], "right")
    with torch.no_grad():
        table = prefix_encoder(model, "p").flat()
        out = run(model, family, ids, mask)
        ref = reference(base, family, table, ids, mask)
        plain = run(base, family, ids, mask)
    real = mask.bool()
    if family in CAUSAL + ("qwen3",):
        close(out[real], ref[real])
        assert (out[real] - plain[real]).abs().max() > 1e-2  # the prefix does change the outputs
    else:
        close(out[0][real], ref[0][real])
        close(out[1], ref[1])
        assert (out[0][real] - plain[0][real]).abs().max() > 1e-2


@pytest.mark.parametrize("family", FAMILIES)
def test_padding_left_and_right_match_unpadded(family):
    model, _ = injected(family, "sdpa", projection_dim=8)
    lengths = [6, 4]
    with torch.no_grad():
        singles = []
        for n in lengths:
            ids, mask, _ = batch([n], "right")
            singles.append(run(model, family, ids, mask))
        for side in ("right", "left"):
            ids, mask, _ = batch(lengths, side, T=7)
            pos = None
            if side == "left" and family != "roberta":  # roberta derives positions from the padding itself
                pos = positions(mask)
            out = run(model, family, ids, mask, pos)
            for b, n in enumerate(lengths):
                real = mask[b].bool()
                got = out[0][b][real] if isinstance(out, tuple) else out[b][real]
                want = singles[b][0][0] if isinstance(out, tuple) else singles[b][0]
                close(got, want)


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
def test_gradients_reach_exactly_prefix_and_head(family):
    model, _ = injected(family, "sdpa", projection_dim=8 if family == "gpt2" else None)
    model.train()
    prefix = set(task_parameters(model, "p"))
    head = {n for n, _ in model.named_parameters() if n.startswith("classifier.pet_fast_tasks.p.")}  # the task's head
    assert set(trainable_parameters(model)) == prefix | head
    ids, mask, _ = batch([6, 4], "right")
    out = run(model, family, ids, mask)
    loss = out[1].square().sum() if isinstance(out, tuple) else out.square().sum()
    loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == prefix | head
    for n in prefix:
        assert model.get_parameter(n).grad.abs().sum() > 0, n


@pytest.mark.parametrize("family,impl", [("gpt2", "eager"), ("llama", "sdpa"), ("mistral", "eager"), ("qwen2", "sdpa")])
def test_generate_equals_stepwise_greedy(family, impl):
    model, base = injected(family, impl, P=4)
    ids, mask, _ = batch([5, 3], "left")
    new = 5
    with torch.no_grad():
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
                             pad_token_id=0, eos_token_id=None)
        seq, m = ids, mask
        for _ in range(new):  # no cache: the whole sequence every step
            logits = model(input_ids=seq, attention_mask=m, position_ids=positions(m)).logits
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
            m = torch.cat([m, torch.ones_like(nxt)], dim=1)
        # and the first generated token agrees with the prefix-in-cache computation
        table = prefix_encoder(model, "p").flat()
        ref = reference(base, family, table, ids, mask, position_ids=positions(mask))
    assert torch.equal(gen, seq)
    assert torch.equal(gen[:, ids.shape[1]], ref[:, -1].argmax(-1))


def test_generate_with_static_cache_equals_dynamic_cache():
    """A static cache holds unfilled slots (keys are not bottom-right aligned): the mask function
    gives the dense mask and the prefix is still attended at every step."""
    model, _ = injected("llama", "sdpa", P=4)
    ids, mask, _ = batch([5, 3], "left")
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        assert torch.equal(model.generate(**kw), model.generate(cache_implementation="static", **kw))


def test_static_cache_decoding_steps_take_the_fused_op(monkeypatch):
    """Each new token over a static cache (unfilled slots after it) reaches the op with a (B, S) key mask
    of the slots it may see (the sequence's unpadded keys up to its own position), not a dense mask; only
    the prefill, whose queries are not the cache's last keys, takes the dense path."""
    import pet_fast.ops.prefix_attention as op_mod

    model, _ = injected("llama", "sdpa", P=4)
    ids, mask, _ = batch([5, 3], "left")
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        expected = model.generate(**kw)
    calls, dense = [], []

    def record(q, k, v, pk, pv, key_padding_mask, causal, scale):
        calls.append((q.shape[2], k.shape[2], key_padding_mask))
        op_mod.check_inputs(q, k, v, pk, pv, key_padding_mask, causal, scale)

    spy_on_the_op(monkeypatch, record)
    real_dense = hf_attention._dense
    monkeypatch.setattr(hf_attention, "_dense", lambda *a, **k: dense.append(1) or real_dense(*a, **k))
    with torch.no_grad():
        got = model.generate(cache_implementation="static", **kw)
    assert torch.equal(got, expected)
    L = model_dims(model)[0]
    T = ids.shape[1]
    assert len(dense) == L  # the prefill
    assert len(calls) == L * 3  # the three decoding steps
    for i, (q_len, S, kpm) in enumerate(calls):
        pos = T + i // L  # the new token's slot
        assert q_len == 1 and S > pos and kpm.shape == (2, S)
        assert torch.equal(kpm[:, :T], mask.bool()) and kpm[:, T:pos + 1].all() and not kpm[:, pos + 1:].any()


@pytest.mark.parametrize("family,reentrant", [("bert", False), ("llama", False), ("llama", True)])
def test_gradient_checkpointing_same_gradients(family, reentrant):
    model, _ = injected(family, "sdpa", projection_dim=8)
    ids, mask, _ = batch([6, 4], "right")
    grads = []
    for ckpt in (False, True):
        if ckpt:
            kwargs = {"gradient_checkpointing_kwargs": {"use_reentrant": reentrant}}
            model.gradient_checkpointing_enable(**kwargs)
            assert getattr(model, "is_activation_checkpointing", None) or model.is_gradient_checkpointing
        model.train()
        model.zero_grad()
        out = run(model, family, ids, mask)
        (out[1] if isinstance(out, tuple) else out).square().sum().backward()
        grads.append({n: p.grad.clone() for n, p in task_parameters(model, "p").items()})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for n in grads[0]:
        close(grads[0][n], grads[1][n], 1e-5)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("family", ["bert", "gpt2", "mistral"])
def test_inactive_prefix_falls_back_to_original_attention(family, impl):
    model, base = injected(family, impl)
    ids, mask, _ = batch([6, 4], "right")
    with torch.no_grad():
        set_active(model, None)
        out, plain = run(model, family, ids, mask), run(base, family, ids, mask)
        set_active(model, "p")
        on = run(model, family, ids, mask)
    real = mask.bool()
    if isinstance(out, tuple):
        close(out[0][real], plain[0][real], 1e-6)
        close(out[1], plain[1], 1e-6)
        assert (on[1] - plain[1]).abs().max() > 1e-3
    else:
        close(out[real], plain[real], 1e-6)
        assert (on[real] - plain[real]).abs().max() > 1e-3


def spy_on_the_op(monkeypatch, record):
    """Calls ``record(q, k, v, pk, pv, key_padding_mask, causal, scale)`` on every call that the attention
    function makes of pet_fast.prefix_attention (through ``attend_impl``, the op's dispatch without the
    argument checks), before the call runs."""
    import pet_fast.ops.prefix_attention as op_mod

    real_impl = op_mod.attend_impl

    def spy_impl(*args, **kwargs):
        impl = real_impl(*args, **kwargs)

        def run(q, k, v, pk, pv, key_padding_mask, causal, scale, dropout_p=0.0):
            record(q, k, v, pk, pv, key_padding_mask, causal, scale)
            return impl.run(q, k, v, pk, pv, key_padding_mask=key_padding_mask, causal=causal, scale=scale,
                            dropout_p=dropout_p)

        return types.SimpleNamespace(backend=impl.backend, run=run)

    monkeypatch.setattr(op_mod, "attend_impl", spy_impl)


@pytest.mark.parametrize("family", ["bert", "gpt2", "mistral", "qwen2"])
def test_fused_op_runs_without_dense_mask(family, monkeypatch):
    """Padding + causal reach pet_fast.prefix_attention as a (B, S) key padding mask and a flag,
    in prefill and in every decoding step (never a dense mask, never the concatenated path)."""
    import pet_fast.ops.prefix_attention as op_mod

    model, _ = injected(family, "sdpa")
    calls = []

    def record(q, k, v, pk, pv, key_padding_mask, causal, scale):
        calls.append((q.shape, k.shape, pk, key_padding_mask, causal))
        op_mod.check_inputs(q, k, v, pk, pv, key_padding_mask, causal, scale)  # the contract holds

    spy_on_the_op(monkeypatch, record)
    monkeypatch.setattr(hf_attention, "_dense", None)  # any use of the dense path would fail
    ids, mask, _ = batch([6, 4], "left")
    L, Hkv, D, _ = model_dims(model)
    with torch.no_grad():
        if family in CAUSAL:
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0,
                           eos_token_id=None)
        else:
            run(model, family, ids, mask)
    steps = 3 if family in CAUSAL else 1
    assert len(calls) == L * steps
    for i, (qs, ks, pk, kpm, causal) in enumerate(calls):
        step = i // L
        assert causal == (family in CAUSAL)
        # the eager backend (the CPU's) gets the prefix of one forward broadcast over the batch (stride 0):
        # never copied per sequence
        assert pk.shape == (2, Hkv, 3, D) and pk.stride(0) == 0
        S = ids.shape[1] + step
        assert ks[1:3] == (Hkv, S) and qs[2] == (ids.shape[1] if step == 0 else 1)
        assert kpm is not None and kpm.shape == (2, S) and kpm.dtype == torch.bool
        assert torch.equal(kpm[:, :ids.shape[1]], mask.bool())


def set_attention_dropout(model, p):
    """Llama-style layers read ``attention_dropout``; BERT's self-attention its ``dropout`` module's p."""
    for name, m in model.named_modules():
        if hasattr(m, "attention_dropout"):
            m.attention_dropout = p
        if name.endswith("attention.self") and isinstance(getattr(m, "dropout", None), torch.nn.Dropout):
            m.dropout.p = p


def test_dense_4d_mask_and_attention_dropout_paths():
    model, base = injected("llama", "sdpa")
    ids, mask, _ = batch([6, 4], "right")
    T = ids.shape[1]
    tri = torch.ones(T, T).tril().bool()
    mask4 = (tri[None, None] & mask.bool()[:, None, None, :])
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
        dense = model(input_ids=ids, attention_mask=mask4).logits
    real = mask.bool()
    close(dense[real], ref[real])
    # a 4-D mask in training keeps the dense path's attention dropout: random and finite
    set_attention_dropout(model, 0.5)
    model.train()
    with torch.no_grad():
        a, b = (model(input_ids=ids, attention_mask=mask4).logits for _ in range(2))
    assert torch.isfinite(a[real]).all() and (a[real] - b[real]).abs().max() > 1e-3
    # keep_attention_dropout=False drops attention dropout in training (deterministic, = eval)
    nodrop, _ = injected("llama", "sdpa", keep_attention_dropout=False)
    set_attention_dropout(nodrop, 0.5)
    with torch.no_grad():
        want = nodrop(input_ids=ids, attention_mask=mask).logits
        nodrop.train()
        close(nodrop(input_ids=ids, attention_mask=mask).logits[real], want[real])


@pytest.mark.parametrize("family,backend", [("bert", "eager"), ("bert", "triton"), ("llama", "triton")])
def test_attention_dropout_in_training_is_the_ops(monkeypatch, family, backend):
    """Attention dropout in training goes to the op's dropout_p (never to the concatenated dense path):
    random and finite in training, with gradients reaching the prefix; in eval mode no dropout."""
    from pet_fast import hf_attention
    from pet_fast.ops import prefix_attention as op

    model, _ = injected(family, "sdpa")
    set_attention_dropout(model, 0.5)
    monkeypatch.setattr(hf_attention, "_dense", None)  # any use of the dense path would fail
    seen = []
    real = op.attend_impl
    monkeypatch.setattr(op, "attend_impl", lambda *a, **kw: seen.append(kw.get("dropout_p")) or real(*a, **kw))
    ids, mask, _ = batch([6, 4], "right")
    with pet_fast.use_backend(backend):
        model.eval()
        with torch.no_grad():
            want = model(input_ids=ids, attention_mask=mask).logits
        assert set(seen) == {0.0}
        model.train()
        a = model(input_ids=ids, attention_mask=mask).logits
        with torch.no_grad():
            b = model(input_ids=ids, attention_mask=mask).logits
        assert set(seen[-2:]) == {0.5}
        tol = 1e-2 * want.abs().max()  # BERT's classifier logits are small
        assert torch.isfinite(a).all() and (a - b).abs().max() > tol and (a - want).abs().max() > tol
        a.square().mean().backward()
    grads = [p.grad for n, p in model.named_parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_fallback_with_cache_and_several_queries():
    """No active prefix, sdpa, a cache and L > 1 new tokens without padding: the fallback must give
    the original model's (bottom-right causal) result."""
    model, base = injected("llama", "sdpa")
    set_active(model, None)
    ids, _, _ = batch([7], "right")
    with torch.no_grad():
        outs = []
        for m in (model, base):
            cache = DynamicCache(config=m.config)
            m(input_ids=ids[:, :3], **{CACHE: cache})
            outs.append(m(input_ids=ids[:, 3:], **{CACHE: cache}).logits)
    close(outs[0], outs[1], 1e-6)


def test_two_prefix_tasks_concatenate():
    model, base = injected("llama", "eager", P=2)
    inject(model, PrefixConfig(prefix_length=3, init_std=1.0), "q")
    set_active(model, ["p", "q"])
    ids, mask, _ = batch([6, 4], "right")
    with torch.no_grad():
        table = torch.cat([prefix_encoder(model, "p").flat(), prefix_encoder(model, "q").flat()], dim=0)
        close(model(input_ids=ids, attention_mask=mask).logits[mask.bool()],
              reference(base, "llama", table, ids, mask)[mask.bool()])


def test_config_and_model_errors():
    with pytest.raises(ValueError, match="prefix_length"):
        PrefixConfig(prefix_length=0)
    with pytest.raises(ValueError, match="projection_dim"):
        PrefixConfig(projection_dim=0)
    with pytest.raises(ValueError):
        inject(torch.nn.Linear(3, 3), PrefixConfig())


@pytest.mark.parametrize("family", ["bert", "roberta", "gpt2", "llama"])
def test_shifted_positions_past_the_position_table_are_refused(family):
    """shift_positions moves the tokens' positions by P: past a table of absolute position embeddings (64
    here; RoBERTa's starts after its padding index) the call is refused with the way out, instead of failing
    inside the embedding lookup (a device-side assert on a GPU). Rotary models (Llama) have no table."""
    limit = {"bert": 64, "roberta": 62, "gpt2": 64, "llama": None}[family]
    P = 5
    model = make(family)
    inject(model, PrefixConfig(prefix_length=P), "p")
    ids = torch.randint(3, V, (2, (limit or 64) - P))
    model(input_ids=ids)  # fits exactly
    long = torch.randint(3, V, (2, (limit or 64) - P + 1))
    if limit is None:
        model(input_ids=long)
        return
    with pytest.raises(ValueError, match=f"need {limit + 1} positions, but the model has {limit}; use "
                                         r"PrefixConfig\(shift_positions=False\)"):
        model(input_ids=long)
    # positions the caller passes (generate() passes them): checked too, against the whole table
    fits = torch.arange(64 - P)[None].expand(2, -1)
    model(input_ids=torch.randint(3, V, (2, 64 - P)), position_ids=fits)
    with pytest.raises(ValueError, match="at the positions given need 65 positions, but the model has 64"):
        model(input_ids=torch.randint(3, V, (2, 64 - P + 1)), position_ids=torch.arange(64 - P + 1)[None].expand(2, -1))
    if family == "gpt2":
        with pytest.raises(ValueError, match="shift_positions=False"):
            model.generate(input_ids=ids[:, : 64 - P - 2], max_new_tokens=5, do_sample=False)
    unshifted = make(family)
    inject(unshifted, PrefixConfig(prefix_length=P, shift_positions=False), "p")
    unshifted(input_ids=long)


@pytest.mark.parametrize("family,impl", [("llama", "sdpa"), ("mistral", "eager"), ("bert", "sdpa")])
def test_torch_compile_fullgraph(family, impl):
    """No graph break in a whole injected model (dynamo with the eager backend: tracing is what
    fullgraph checks; the backend only runs the captured graph)."""
    model, _ = injected(family, impl)
    ids, mask, _ = batch([6, 4], "left")
    torch._dynamo.reset()
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
        got = torch.compile(model, fullgraph=True, backend="eager")(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    close(got[real] if family in CAUSAL else got, want[real] if family in CAUSAL else want)


# --------------------------------------------------------------------------------------------------
# importers


def write_peft(path, model, table, extra=None, **cfg_over):
    from safetensors.torch import save_file

    L, Hkv, D, _ = model_dims(model)
    os.makedirs(path, exist_ok=True)
    cfg = {"peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": table.shape[0],
           "num_layers": L, "token_dim": Hkv * D, "num_attention_heads": Hkv, "encoder_hidden_size": Hkv * D,
           "num_transformer_submodules": 1, "prefix_projection": False, "inference_mode": True,
           "base_model_name_or_path": None, "modules_to_save": None}
    cfg.update(cfg_over)
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump(cfg, f)
    tensors = {"prompt_embeddings": table.contiguous()}
    tensors.update(extra or {})
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"))


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_import_peft_checkpoint(family, tmp_path):
    model = make(family)
    base = copy.deepcopy(model)
    L, Hkv, D, H = model_dims(model)
    P = 4
    table = torch.randn(P, L * 2 * Hkv * D)
    extra = {}
    if family == "bert":
        extra = {"base_model.classifier.weight": torch.randn(3, H), "base_model.classifier.bias": torch.randn(3)}
    write_peft(tmp_path / "peft", model, table, extra, task_type="SEQ_CLS" if family == "bert" else "CAUSAL_LM")
    assert peft_prefix_detect(tmp_path / "peft") and not adapterhub_prefix_detect(tmp_path / "peft")
    peft_prefix_load(model, tmp_path / "peft", "imported")
    with torch.no_grad():
        if family == "bert":
            base.classifier.weight.copy_(extra["base_model.classifier.weight"])
            base.classifier.bias.copy_(extra["base_model.classifier.bias"])
        ids, mask, _ = batch([6, 4], "right")
        out = run(model, family, ids, mask)
        ref = reference(base, family, table, ids, mask, shift=True)
    close(out, ref)


def test_import_peft_refuses_mismatch_without_changes(tmp_path):
    model = make("llama")
    L, Hkv, D, _ = model_dims(model)
    write_peft(tmp_path / "bad", model, torch.randn(4, L * 2 * Hkv * D + 2))
    with pytest.raises(ValueError, match="prompt_embeddings"):
        peft_prefix_load(model, tmp_path / "bad", "x")
    write_peft(tmp_path / "bad2", model, torch.randn(4, L * 2 * Hkv * D), num_layers=L + 1)
    with pytest.raises(ValueError, match="num_layers"):
        peft_prefix_load(model, tmp_path / "bad2", "x")
    for n, value in enumerate((None, "4", 0)):  # absent, a string, not positive
        write_peft(tmp_path / f"bad3{n}", model, torch.randn(4, L * 2 * Hkv * D), num_virtual_tokens=value)
        with pytest.raises(ValueError, match="needs num_virtual_tokens"):
            peft_prefix_load(model, tmp_path / f"bad3{n}", "x")
    assert registry(model) is None and model.config._attn_implementation == "sdpa"


def write_adapterhub(path, model, tensors, prefix_length, flat, bottleneck=None, key_prefix="bert.", name="pt",
                     safetensors=True):
    L, Hkv, D, H = model_dims(model)
    os.makedirs(path, exist_ok=True)
    config = {"architecture": "prefix_tuning", "bottleneck_size": bottleneck or 512, "cross_prefix": True,
              "dropout": 0.0, "encoder_prefix": True, "flat": flat, "init_weights_seed": None, "leave_out": [],
              "non_linearity": "tanh", "prefix_length": prefix_length, "shared_gating": True, "use_gating": False}
    meta = {"config": config, "hidden_size": H, "model_class": type(model).__name__, "model_name": None,
            "model_type": model.config.model_type, "name": name, "version": "adapters.1.2.0"}
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True)
    sd = {}
    # the pool is stored once at the model and once per layer (the same tensors)
    for where in [f"{key_prefix}prefix_tuning."] + [f"{key_prefix}encoder.layer.{i}.attention.self.prefix_tuning.pool."
                                                      for i in range(L)]:
        for k, t in tensors.items():
            sd[f"{where}prefix_tunings.{name}.self_prefix.{k}"] = t.clone()
    if safetensors:
        from safetensors.torch import save_file

        save_file(sd, os.path.join(path, "adapter.safetensors"))
    else:
        torch.save(sd, os.path.join(path, "pytorch_adapter.bin"))


@pytest.mark.parametrize("family,flat", [("bert", False), ("gpt2", True)])
def test_import_adapterhub_checkpoint(family, flat, tmp_path):
    model = make(family)
    base = copy.deepcopy(model)
    L, Hkv, D, H = model_dims(model)
    P, bn = 5, 7
    out_dim = L * 2 * Hkv * D
    if flat:
        tensors = {"control_trans": torch.randn(P * out_dim)}
        table = tensors["control_trans"].view(P, out_dim)
    else:
        tensors = {"wte.weight": torch.randn(P, H), "control_trans.0.weight": torch.randn(bn, H) * 0.3,
                   "control_trans.0.bias": torch.randn(bn), "control_trans.2.weight": torch.randn(out_dim, bn),
                   "control_trans.2.bias": torch.randn(out_dim)}
        # AdapterHub's PrefixTuning.forward, written out: control_trans(wte(arange(P)))
        h = torch.tanh(tensors["wte.weight"] @ tensors["control_trans.0.weight"].T + tensors["control_trans.0.bias"])
        table = h @ tensors["control_trans.2.weight"].T + tensors["control_trans.2.bias"]
    write_adapterhub(tmp_path / "ah", model, tensors, P, flat, bn, key_prefix="bert." if family == "bert" else "transformer.",
                     safetensors=not flat)
    assert adapterhub_prefix_detect(tmp_path / "ah") and not peft_prefix_detect(tmp_path / "ah")
    adapterhub_prefix_load(model, tmp_path / "ah", "imported")
    ids, mask, _ = batch([6, 4], "right")
    with torch.no_grad():
        out = run(model, family, ids, mask)
        ref = reference(base, family, table, ids, mask, shift=False)
    close(out, ref, 1e-4)


def test_packed_sequences_take_the_dense_mask_path(monkeypatch):
    """Packed sequences (position_ids restarting, no attention mask): transformers builds a
    block-diagonal mask, which reaches the attention as a dense mask; each packed sequence sees the
    prefix and its own tokens only."""
    model, _ = injected("llama", "sdpa")
    dense_calls = []
    real_dense = hf_attention._dense
    monkeypatch.setattr(hf_attention, "_dense", lambda *a: dense_calls.append(a[5].shape) or real_dense(*a))
    a, b = _SEQS[3], _SEQS[4]
    with torch.no_grad():
        packed = model(input_ids=torch.cat([a, b])[None], position_ids=torch.tensor([[0, 1, 2, 0, 1, 2, 3]]),
                       use_cache=False).logits  # transformers detects packing only without a cache
        sep_a = model(input_ids=a[None]).logits
        sep_b = model(input_ids=b[None]).logits
    assert dense_calls == [(1, 1, 7, 7)] * 2  # the block-diagonal mask, once per layer
    close(packed[0, :3], sep_a[0])
    close(packed[0, 3:], sep_b[0])


def _fp32_and_bf16_autocast_logits(side):
    """An injected Llama's logits in float32 and under bf16 autocast (real tokens only), padded on ``side``."""
    model, _ = injected("llama", "sdpa")
    ids, mask, _ = batch([6, 4], side)
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = model(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    return want[real], got[real].float()


def test_autocast_bf16_runs_close_to_fp32():
    want, got = _fp32_and_bf16_autocast_logits("right")
    assert torch.isfinite(got).all()
    assert (got - want).abs().max() < 0.1 * want.abs().max()


def test_autocast_runs_the_op_in_autocasts_dtype_when_rope_leaves_float32(monkeypatch):
    """Some transformers releases (5.17) return float32 queries and keys from RoPE under bf16 autocast:
    the op still gets bf16 q, k, v and prefix (as SDPA would cast them), not a float32 call with a
    float32 prefix and a mask converted in every layer."""
    from transformers.models.llama import modeling_llama

    real_rope = modeling_llama.apply_rotary_pos_emb
    monkeypatch.setattr(modeling_llama, "apply_rotary_pos_emb",
                        lambda *a, **k: tuple(t.float() for t in real_rope(*a, **k)))
    dtypes = []
    spy_on_the_op(monkeypatch, lambda q, k, v, pk, pv, *args: dtypes.append({t.dtype for t in (q, k, v, pk, pv)}))
    want, got = _fp32_and_bf16_autocast_logits("left")
    assert dtypes[0] == {torch.float32} and dtypes[-1] == {torch.bfloat16}
    assert (got - want).abs().max() < 0.1 * want.abs().max()


def test_pet_fast_load_recognises_prefix_checkpoints(tmp_path):
    """The importers are wired into pet_fast.load: PEFT and AdapterHub prefix folders load by their files."""
    import pet_fast

    model = make("llama")
    base = copy.deepcopy(model)
    L, Hkv, D, _ = model_dims(model)
    table = torch.randn(3, L * 2 * Hkv * D)
    write_peft(tmp_path / "peft", model, table)
    assert pet_fast.load(model, tmp_path / "peft", "p") == "p"
    ids, mask, _ = batch([5, 3], "left")
    with torch.no_grad():
        close(run(model, "llama", ids, mask), reference(base, "llama", table, ids, mask, shift=True))

    bert = make("bert")
    L, Hkv, D, H = model_dims(bert)
    write_adapterhub(tmp_path / "ah", bert, {"control_trans": torch.randn(2 * L * 2 * Hkv * D)}, 2, True, name="sst")
    assert pet_fast.load(bert, tmp_path / "ah") == "sst"
    assert registry(bert).active == ("sst",)


# --------------------------------------------------------------------------------------------------
# One computation of every layer's prefix per forward (methods/prefix.py: _ForwardPrefixes)


def _count_prefix_calls(monkeypatch):
    from pet_fast.methods import prefix as prefix_mod

    counts = {"stacked": 0, "layer": 0}
    for name in counts:
        real = getattr(prefix_mod.PrefixEncoder, name)

        def spy(self, *a, _real=real, _name=name, **kw):
            counts[_name] += 1
            return _real(self, *a, **kw)

        monkeypatch.setattr(prefix_mod.PrefixEncoder, name, spy)
    return counts


def _grads_and_output(model, family, ids, mask):
    model.zero_grad()
    out = run(model, family, ids, mask)
    out = out[1] if isinstance(out, tuple) else out
    out.square().sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in trainable_parameters(model).items()}


@pytest.mark.parametrize("family,projection", [("bert", None), ("llama", 8), ("gpt2", None)])
def test_one_prefix_computation_per_forward_same_numbers(family, projection, monkeypatch):
    """A forward computes all layers' prefixes once (flat or MLP); the per-layer path (taken while
    gradient checkpointing is on or outside a forward) gives the same outputs and gradients."""
    import types

    model, _ = injected(family, "sdpa", projection_dim=projection)
    model.train()
    ids, mask, _ = batch([6, 4], "left")
    counts = _count_prefix_calls(monkeypatch)
    out, grads = _grads_and_output(model, family, ids, mask)
    assert counts == {"stacked": 1, "layer": 0}
    state = model.__dict__["_pet_fast_prefix_forward"]
    assert not state.open and not state.cache  # closed after the forward: nothing is kept
    # as if gradient checkpointing were on: each layer computes its own prefix
    monkeypatch.setattr(state, "checkpoint_modules", [types.SimpleNamespace(gradient_checkpointing=True)])
    out2, grads2 = _grads_and_output(model, family, ids, mask)
    L = model_dims(model)[0]
    assert counts == {"stacked": 1, "layer": L}
    close(out, out2, 1e-6)
    assert grads.keys() == grads2.keys() and grads
    for n in grads:
        close(grads[n], grads2[n], 1e-6)


def test_prefix_cache_sees_updates_and_separate_forwards():
    """Every forward recomputes the prefix: an optimizer step between forwards is seen, and two
    forwards before their backwards (gradient accumulation) each have their own graph."""
    model, base = injected("llama", "sdpa")
    model.train()
    ids, mask, _ = batch([6, 4], "right")
    enc = prefix_encoder(model, "p")
    loss1 = model(input_ids=ids, attention_mask=mask).logits.square().mean()
    loss2 = model(input_ids=ids, attention_mask=mask).logits.square().mean()
    loss1.backward()
    loss2.backward()  # would fail if both forwards shared one graph of the prefix
    g = enc.prefix.grad.clone()
    model.zero_grad()
    model(input_ids=ids, attention_mask=mask).logits.square().mean().backward()
    close(g, 2 * enc.prefix.grad, 1e-6)
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
        enc.prefix.add_(0.5)
        after = model(input_ids=ids, attention_mask=mask).logits
        table = enc.prefix.detach()
        L, Hkv, D, _ = model_dims(model)
        ref = reference(base, "llama", table, ids, mask)
    real = mask.bool()
    assert (after - before).abs().max() > 1e-3
    close(after[real], ref[real], 2e-5)


def test_prefix_cache_closed_after_a_failing_forward():
    model, _ = injected("bert", "sdpa")
    state = model.__dict__["_pet_fast_prefix_forward"]
    with pytest.raises(Exception):
        model(input_ids=torch.full((1, 3), V + 5))  # out of the vocabulary: the embedding raises
    assert not state.open and not state.cache


@pytest.mark.parametrize("padded", [False, True])
def test_kernels_read_the_shared_prefix_and_eager_its_batch_views(padded, monkeypatch):
    """In a forward of the model the Triton backend gets each layer's prefix shared by the batch, (Hkv, P, D)
    (a batch view would cost it a select and a zero-filled gradient per layer), the eager backend (B, Hkv,
    P, D) views with batch stride 0 (its gradient then summed over the batch once); the same outputs and
    gradients either way."""
    import pet_fast

    model, _ = injected("bert", "sdpa")
    model.train()
    ids, mask, _ = batch([6, 4] if padded else [6, 6], "right")
    seen = {}
    results = {}
    for backend in ("eager", "triton"):
        shapes = seen[backend] = []
        with monkeypatch.context() as m, pet_fast.use_backend(backend):
            spy_on_the_op(m, lambda q, k, v, pk, pv, *a, _to=shapes: _to.append((pk.shape, pk.stride(), pv.stride())))
            results[backend] = _grads_and_output(model, "bert", ids, mask)
    L, Hkv, D, _ = model_dims(model)
    assert len(seen["eager"]) == len(seen["triton"]) == L
    for shape, k_stride, v_stride in seen["triton"]:
        assert shape == (Hkv, 3, D)
    for shape, k_stride, v_stride in seen["eager"]:
        assert shape == (2, Hkv, 3, D) and k_stride[0] == 0 and v_stride[0] == 0
    (out_e, grads_e), (out_t, grads_t) = results["eager"], results["triton"]
    close(out_e, out_t, 1e-5)
    assert grads_e.keys() == grads_t.keys() and grads_e
    for n in grads_e:
        close(grads_e[n], grads_t[n], 1e-4)


def test_no_padding_mask_when_nothing_is_padded(monkeypatch):
    """An all-ones attention mask reaches the op as no mask (SDPA keeps its fast kernel), with the
    numbers of the padded path."""

    model, _ = injected("bert", "sdpa")
    seen = []
    spy_on_the_op(monkeypatch, lambda q, k, v, pk, pv, key_padding_mask, *a: seen.append(key_padding_mask))
    ids, mask, _ = batch([5, 5], "right")
    assert bool(mask.all())
    with torch.no_grad():
        out = run(model, "bert", ids, mask)
        assert seen and all(m is None for m in seen)
        seen.clear()
        padded_ids = torch.cat([ids, torch.ones(2, 2, dtype=ids.dtype)], 1)
        padded_mask = torch.cat([mask, torch.zeros(2, 2, dtype=mask.dtype)], 1)
        out_padded = run(model, "bert", padded_ids, padded_mask)
        assert seen and all(m is not None for m in seen)
    close(out[0], out_padded[0][:, :5], 1e-5)
    close(out[1], out_padded[1], 1e-5)


def test_deep_copy_reads_its_own_prefix():
    model, _ = injected("llama", "sdpa")
    ids, mask, _ = batch([6, 4], "right")
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
        twin = copy.deepcopy(model)
        prefix_encoder(twin, "p").prefix.add_(1.0)
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, before)
        assert (twin(input_ids=ids, attention_mask=mask).logits - before).abs().max() > 1e-3


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
def test_deep_copy_shifts_positions_by_its_own_tasks(family):
    """The position shift (shift_positions=True) reads the copy's tasks, not the original's."""
    model, _ = injected(family, "sdpa")
    ids, mask, _ = batch([6, 4], "right")
    twin = copy.deepcopy(model)
    with torch.no_grad():
        want = run(twin, family, ids, mask)
        set_active(model, None)  # the original only
        close(run(twin, family, ids, mask), want, 0.0)
        # a second task on the copy (its head left to p's): both shift the copy's positions, by 3 + 2
        inject(twin, PrefixConfig(prefix_length=2, init_std=1.0, train_head=False), "q")
        set_active(twin, ["p", "q"])
        table = torch.cat([prefix_encoder(twin, n).flat() for n in ("p", "q")])
        got, want = run(twin, family, ids, mask), reference(make(family), family, table, ids, mask)
        if family in CAUSAL:
            got, want = got[mask.bool()], want[mask.bool()]
        close(got, want)


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_injected_model_pickles(family, tmp_path):
    import pickle

    model, _ = injected(family, "sdpa")
    ids, mask, _ = batch([6, 4], "right")
    with torch.no_grad():
        want = run(model, family, ids, mask)
        close(run(pickle.loads(pickle.dumps(model)), family, ids, mask), want, 0.0)
        torch.save(model, tmp_path / "m.pt")
        close(run(torch.load(tmp_path / "m.pt", weights_only=False), family, ids, mask), want, 0.0)


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_removing_the_last_prefix_task_restores_the_model(family):
    model, base = injected(family, "sdpa")
    inject(model, PrefixConfig(prefix_length=2), "q")
    ids, mask, _ = batch([6, 4], "right")
    pet_fast.remove(model, "p")  # one prefix task left: still switched
    assert hf_attention.current_implementation(model) == hf_attention.NAME
    pet_fast.remove(model, "q")
    assert hf_attention.current_implementation(model) == "sdpa"
    assert "_pet_fast_prefix_position_hook" not in model.__dict__
    assert not any(hf_attention.layer_prefix(m) is not None for m in model.modules())
    assert not any(len(m._forward_pre_hooks) for m in model.modules())
    with torch.no_grad():
        close(run(model, family, ids, mask), run(base, family, ids, mask), 0.0)
    inject(model, PrefixConfig(prefix_length=3, init_std=1.0), "again")  # and it can be injected again
    with torch.no_grad():
        table = prefix_encoder(model, "again").flat()
        close(run(model, family, ids, mask), reference(base, family, table, ids, mask))


def test_a_failed_prefix_load_leaves_the_attention_as_it_was(tmp_path):
    model, _ = injected("gpt2", "sdpa")
    pet_fast.save(model, tmp_path / "ck")
    other = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=V, n_embd=32, n_layer=3, n_head=4, n_positions=64))
    with pytest.raises(ValueError):
        pet_fast.load(other, tmp_path / "ck")  # three layers against the checkpoint's two
    assert hf_attention.current_implementation(other) == "sdpa"
    assert not any(len(m._forward_pre_hooks) for m in other.modules())


def test_threads_sharing_a_model_keep_their_forwards_apart():
    """The per-forward prefixes are per thread: concurrent training forwards on one model each build
    and free their own graph."""
    import threading

    model, _ = injected("bert", "sdpa")
    model.train()
    ids, mask, _ = batch([6, 4], "right")
    ref = run(model, "bert", ids, mask)[0].detach()
    errors = []

    def work():
        try:
            for _ in range(3):
                out = run(model, "bert", ids, mask)[0]
                out.square().sum().backward()
                close(out.detach(), ref, 1e-6)
        except Exception as exc:  # reported below
            errors.append(repr(exc))

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_keep_attention_dropout_is_a_setting_of_each_task():
    """A second prefix task without attention dropout leaves the first one's training dropout alone, before
    and after it is removed."""
    cfg = tf.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, vocab_size=61,
                        max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.5)
    torch.manual_seed(0)
    model = tf.BertForSequenceClassification(cfg).train()
    ids = torch.randint(3, 61, (2, 7))

    def draws_dropout():
        torch.manual_seed(1)
        a = model(input_ids=ids).logits
        torch.manual_seed(2)
        return not torch.equal(a, model(input_ids=ids).logits)

    inject(model, pet_fast.PrefixConfig(prefix_length=3, train_head=False), "keeps")  # (no heads: both can be active)
    assert draws_dropout()
    inject(model, pet_fast.PrefixConfig(prefix_length=3, keep_attention_dropout=False, train_head=False), "drops")
    assert not draws_dropout()
    set_active(model, ["keeps", "drops"])  # together: one of them trains without it
    assert not draws_dropout()
    set_active(model, "keeps")
    assert draws_dropout()
    pet_fast.remove(model, "drops")
    assert draws_dropout()


def test_a_whole_prefix_tuned_model_saved_with_torch_save_runs_in_a_new_process(tmp_path):
    """The model names pet_fast's attention implementation, which a new process's transformers knows only once
    registered: unpickling the layers' prefix sources registers it."""
    import subprocess
    import sys

    model = make("llama")
    inject(model, pet_fast.PrefixConfig(prefix_length=3), "t")
    ids, mask = torch.randint(3, V, (2, 6)), torch.ones(2, 6, dtype=torch.long)
    mask[0, :2] = 0
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
    torch.save(model, tmp_path / "model.pt")
    torch.save((ids, mask, want), tmp_path / "batch.pt")
    code = ("import torch\n"
            f"model = torch.load({str(tmp_path / 'model.pt')!r}, weights_only=False)\n"
            f"ids, mask, want = torch.load({str(tmp_path / 'batch.pt')!r})\n"
            "with torch.no_grad():\n"
            "    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, want, rtol=0, atol=0)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]


def test_two_active_tasks_with_head_copies_are_told_about_train_head():
    model = make("bert")
    inject(model, pet_fast.PrefixConfig(prefix_length=2), "a")
    inject(model, pet_fast.PrefixConfig(prefix_length=2), "b")
    set_active(model, ["a", "b"])
    with pytest.raises(RuntimeError, match=r"tasks \['a', 'b'\] each have their own copy of the task head.*train_head=False"):
        model(input_ids=torch.randint(3, V, (2, 5)))


def _gemma2(softcap):
    import transformers as tf

    cfg = tf.Gemma2Config(vocab_size=61, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=8, intermediate_size=37, attn_logit_softcapping=softcap,
                          sliding_window=64, query_pre_attn_scalar=8, pad_token_id=0)
    torch.manual_seed(0)
    return tf.Gemma2ForCausalLM(cfg).eval()


def test_models_whose_attention_softcaps_or_has_sinks_are_refused():
    """Gemma2's logit softcapping and GPT-OSS's attention sinks reach the attention function as arguments the
    prefix path did not apply: its logits were off by 2e-2 (softcap 0.05), with no error."""
    import transformers as tf

    with pytest.raises(ValueError, match="does not apply attention logit softcapping"):
        pet_fast.inject(_gemma2(0.05), pet_fast.PrefixConfig(prefix_length=3), "p")
    cfg = tf.GptOssConfig(vocab_size=61, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=8, intermediate_size=16, num_local_experts=2,
                          num_experts_per_tok=1, sliding_window=64, pad_token_id=0, layer_types=["full_attention"] * 2)
    with pytest.raises(ValueError, match=r"does not apply attention sinks \(GptOssAttention.sinks\)"):
        pet_fast.inject(tf.GptOssForCausalLM(cfg).eval(), pet_fast.PrefixConfig(prefix_length=3), "p")
    model = _gemma2(None)  # without softcapping: runs, and refuses a softcap that appears later
    pet_fast.inject(model, pet_fast.PrefixConfig(prefix_length=3), "p")
    ids = torch.randint(3, 61, (2, 5))
    model(input_ids=ids)
    model.model.layers[1].self_attn.attn_logit_softcapping = 0.05
    with pytest.raises(ValueError, match="does not apply 'softcap'.*which Gemma2Attention passes"):
        model(input_ids=ids)


def _opt(head):
    cfg = tf.OPTConfig(vocab_size=61, hidden_size=32, num_hidden_layers=2, ffn_dim=37, num_attention_heads=4,
                       max_position_embeddings=64, word_embed_proj_dim=32, pad_token_id=1, bos_token_id=0,
                       eos_token_id=2, dropout=0.0, attention_dropout=0.0)
    torch.manual_seed(0)
    return {"lm": tf.OPTForCausalLM, "cls": tf.OPTForSequenceClassification}[head](cfg).eval()


@pytest.mark.parametrize("head", ["lm", "cls"])
def test_opt_positions_come_from_the_mask_shifted_by_the_prefix(head):
    """OPT derives positions from the attention mask (padding-aware). The position hook sat on base_model's
    forward: OPTForCausalLM calls the decoder past it (no shift: 0.17 off PEFT's), and on
    OPTForSequenceClassification it replaced the mask's positions by arange + P (a left-padded row 1.0 off)."""
    model = _opt(head)
    base = copy.deepcopy(model)
    inject(model, PrefixConfig(prefix_length=3, init_std=1.0), "p")
    ids, mask = torch.randint(3, 61, (2, 7)), torch.ones(2, 7, dtype=torch.long)
    ids[0, :2], mask[0, :2] = 1, 0  # left padding
    with torch.no_grad():
        table = prefix_encoder(model, "p").flat()
        L, Hkv, D, _ = model_dims(base)
        cache = peft_cache(table, L, Hkv, D, 2, base.config)
        full = torch.cat([torch.ones(2, 3, dtype=mask.dtype), mask], dim=1)
        if head == "lm":
            got, want = model(input_ids=ids, attention_mask=mask).logits, base(input_ids=ids, attention_mask=full,
                                                                               **{CACHE: cache}).logits
        else:
            got = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
            want = base.model(input_ids=ids, attention_mask=full, **{CACHE: cache}).last_hidden_state
            unpadded = model.model(input_ids=ids[:1, 2:]).last_hidden_state
            torch.testing.assert_close(got[:1, 2:], unpadded, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[:, 2:][mask[:, 2:].bool()], want[:, 2:][mask[:, 2:].bool()], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)


def test_opt_generation_with_a_prefix_equals_it_without_the_cache():
    model = _opt("lm")
    inject(model, PrefixConfig(prefix_length=3, init_std=1.0), "p")
    ids, mask = torch.randint(3, 61, (2, 5)), torch.ones(2, 5, dtype=torch.long)
    ids[0, :2], mask[0, :2] = 1, 0
    kw = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=1)
    cached = model.generate(ids, **kw)
    torch.testing.assert_close(cached, model.generate(ids, use_cache=False, **kw))
    with pytest.raises(ValueError, match="these tokens need 66 positions, but the model has 64"):
        model(input_ids=torch.randint(3, 61, (1, 63)))


def test_encoder_decoder_models_are_refused_by_name():
    """T5 and BART were refused with "could not map the attention modules ... (layer_idx [0, 0, 0, 1, 1, 1])"."""
    cfg = tf.BartConfig(vocab_size=61, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
                        decoder_attention_heads=4, encoder_ffn_dim=37, decoder_ffn_dim=37)
    with pytest.raises(ValueError, match=r"prefix tuning of encoder-decoder models \(BartForConditionalGeneration\)"):
        inject(tf.BartForConditionalGeneration(cfg), PrefixConfig(prefix_length=3), "p")


def test_attention_the_prefix_does_not_take_keeps_the_models_implementation():
    """A BERT decoder's cross-attention (no prefix there) ran sdpa in an eager model: its attention weights were
    gone (output_attentions)."""
    cfg = tf.BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                        max_position_embeddings=64, is_decoder=True, add_cross_attention=True,
                        attn_implementation="eager")
    torch.manual_seed(0)
    base = tf.BertLMHeadModel(cfg).eval()
    model = copy.deepcopy(base)
    inject(model, PrefixConfig(prefix_length=3), "p")
    ids, enc = torch.randint(3, V, (2, 6)), torch.randn(2, 5, 32)
    with torch.no_grad():
        out = model(input_ids=ids, encoder_hidden_states=enc, output_attentions=True)
        assert all(a is not None and a.shape == (2, 4, 6, 5) for a in out.cross_attentions)
        set_active(model, None)
        out = model(input_ids=ids, encoder_hidden_states=enc, output_attentions=True)
        want = base(input_ids=ids, encoder_hidden_states=enc, output_attentions=True)
    for a, b in zip(out.cross_attentions + out.attentions, want.cross_attentions + want.attentions):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    pet_fast.remove(model, "p")
    assert not any(hf_attention.ORIGINAL_ATTR in m.__dict__ for m in model.modules())


def test_an_attention_module_that_does_not_say_is_causal_stays_causal():
    """transformers takes a module without is_causal for causal; the prefix path took it for bidirectional:
    earlier tokens saw later ones."""
    model, _ = injected("llama", "sdpa")
    for m in model.modules():
        if "is_causal" in m.__dict__ and "Attention" in type(m).__name__:
            del m.is_causal
    ids = torch.randint(3, V, (1, 8))
    later = ids.clone()
    later[:, 5:] = torch.randint(3, V, (1, 3))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=later).logits[:, :5], model(input_ids=ids).logits[:, :5],
                                   rtol=0, atol=0)


def test_roberta_like_encoders_outside_the_family_shift_positions_as_roberta():
    """Data2VecText derives positions as RoBERTa does (padding-aware, after padding_idx): outside the recognised
    family its positions became arange(T) + P (2.8 off PEFT's on real tokens)."""
    cfg = tf.Data2VecTextConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=37, max_position_embeddings=70, pad_token_id=1,
                                hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    base = tf.Data2VecTextModel(cfg).eval()
    model = copy.deepcopy(base)
    inject(model, PrefixConfig(prefix_length=3, init_std=1.0), "p")
    ids, mask, _ = batch([7, 4], "right")
    ids[mask == 0] = 1
    with torch.no_grad():
        L, Hkv, D, _ = model_dims(base)
        cache = peft_cache(prefix_encoder(model, "p").flat(), L, Hkv, D, 2, base.config)
        full = torch.cat([torch.ones(2, 3, dtype=mask.dtype), mask], dim=1)
        want = base(input_ids=ids, attention_mask=full, **{CACHE: cache}).last_hidden_state
        got = model(input_ids=ids, attention_mask=mask).last_hidden_state
    close(got[mask.bool()], want[mask.bool()])


def test_arguments_passed_by_position_reach_the_position_hook():
    """GPT2Model(new_ids, past): the hook read the cache from keywords only (positions from 0 again: 1.75 off);
    LlamaModel(ids, mask, positions): the hook added position_ids as a keyword (TypeError)."""
    model, _ = injected("gpt2")
    gpt2 = model.transformer
    ids = torch.randint(3, V, (1, 6))
    with torch.no_grad():
        full = gpt2(input_ids=ids).last_hidden_state
        past = gpt2(input_ids=ids[:, :4], use_cache=True).past_key_values
        close(gpt2(ids[:, 4:], past).last_hidden_state, full[:, 4:])
    llama = injected("llama")[0].model
    mask = torch.ones(1, 6, dtype=torch.long)
    with torch.no_grad():
        close(llama(ids, mask, torch.arange(6)[None]).last_hidden_state,
              llama(input_ids=ids, attention_mask=mask, position_ids=torch.arange(6)[None]).last_hidden_state)


def test_a_peft_checkpoint_with_a_trained_tied_head_is_refused_and_leaves_the_model(tmp_path):
    """GPT-2's lm_head is tied to its embeddings; PEFT's modules_to_save trains an untied copy. The import looked
    the key up among deduplicated names, failed (AttributeError) after attaching the task, and left it attached."""
    model = make("gpt2")
    L, Hkv, D, _ = model_dims(model)
    table = torch.randn(3, L * 2 * Hkv * D)
    head = model.lm_head.weight.detach()
    write_peft(tmp_path / "same", model, table, {"base_model.lm_head.weight": head.clone()})
    write_peft(tmp_path / "trained", model, table, {"base_model.lm_head.weight": head + 0.5})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"'lm_head.weight' is tied to 'transformer.wte.weight' in this model"):
        pet_fast.load(model, tmp_path / "trained", "p")
    assert registry(model) is None or "p" not in registry(model).configs
    assert model.config._attn_implementation == "sdpa"
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    pet_fast.load(model, tmp_path / "same", "p")  # the untrained head (equal to the tied weight): imported
    torch.testing.assert_close(prefix_encoder(model, "p").flat().detach(), table)


def test_an_adapterhub_prefix_of_a_grouped_query_model_is_refused_saying_why(tmp_path):
    """AdapterHub sizes a GQA model's prefix by its query heads (the keys and values repeated to them): the import
    failed on a shape ("needs control_trans of shape (192,)") that did not say so."""
    from safetensors.torch import save_file

    model = make("llama")  # 4 query heads, 2 key/value heads
    L, Hkv, D, _ = model_dims(model)
    meta = {"config": {"architecture": "prefix_tuning", "flat": True, "prefix_length": 3, "non_linearity": "tanh",
                       "leave_out": [], "use_gating": False, "dropout": 0.0}, "name": "pt", "model_class": "LlamaForCausalLM"}
    os.makedirs(tmp_path / "ah")
    with open(tmp_path / "ah" / "adapter_config.json", "w") as f:
        json.dump(meta, f)
    save_file({"model.prefix_tunings.pt.self_prefix.control_trans": torch.randn(3 * L * 2 * 4 * D)},
              str(tmp_path / "ah" / "adapter.safetensors"))
    with pytest.raises(ValueError, match="has 4 heads per layer .* has 2 key/value heads"):
        pet_fast.load(model, tmp_path / "ah")


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_attention_of_other_key_widths_than_the_prefix_is_refused(backend):
    """DeepSeek's MLA keys are qk_nope + qk_rope wide while config.head_dim is the rope part: the prefix was sized 4
    for keys 12 wide, and the triton backend (auto's on a GPU) ran it reading past the prefix: finite, wrong logits."""
    cfg = tf.DeepseekV3Config(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=4, intermediate_size=48, max_position_embeddings=64, pad_token_id=0,
                              n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, n_shared_experts=1,
                              first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=4,
                              qk_nope_head_dim=8, v_head_dim=12, n_group=1, topk_group=1, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = tf.DeepseekV3ForCausalLM(cfg).eval()
    inject(model, PrefixConfig(prefix_length=3), "p")
    with pytest.raises(ValueError, match=r"the prefix of DeepseekV3Attention has 4 heads of width 4 .* keys have 4 "
                                         r"heads of width 12"), pet_fast.use_backend(backend), torch.no_grad():
        model(input_ids=torch.randint(3, V, (2, 5)))


def test_a_hybrid_model_is_refused_saying_why():
    """Jamba's attention layers sit between mamba layers (layer_idx 1, 3): the refusal named the indices only."""
    cfg = tf.JambaConfig(vocab_size=V, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=48, num_experts=2, num_experts_per_tok=1, attn_layer_period=2,
                         attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1, mamba_d_state=4,
                         mamba_d_conv=2, mamba_expand=2, mamba_dt_rank=4, use_mamba_kernels=False, pad_token_id=0)
    with pytest.raises(ValueError, match=r"layer_idx \[1, 3\]\): prefix tuning needs the self-attention layers "
                                         r"numbered 0..n-1 \(not hybrid models"):
        inject(tf.JambaForCausalLM(cfg), PrefixConfig(prefix_length=3), "p")
