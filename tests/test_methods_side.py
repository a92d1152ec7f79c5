"""SideConfig: frozen base without graph or saved activations, side network, alpha, cache."""
import copy

import pytest
import torch

import pet_fast
from pet_fast.tasks import TASK_ATTR
from tiny_models import batch, build


def _saved_shapes(fn):
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, shapes


@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama"])
def test_side_base_keeps_no_activations_and_only_the_side_trains(kind):
    model = build(kind)
    pet_fast.inject(model, pet_fast.SideConfig(width=16, heads=2), "s")
    model.train()
    ids, mask = batch()
    # Embeddings that require grad: a base run with autograd on would then keep its activations.
    emb = model.get_input_embeddings()(ids).detach().requires_grad_()
    out, shapes = _saved_shapes(lambda: model(inputs_embeds=emb, attention_mask=mask).logits)
    # The base's FFN is 37 wide; nothing of that width may be kept for backward.
    assert shapes and not any(37 in s for s in shapes)
    out.pow(2).sum().backward()
    with_grad = {k for k, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {k for k, p in model.named_parameters() if p.requires_grad}
    assert all(f"{TASK_ATTR}.s." in k for k in with_grad)
    assert any(".network." in k for k in with_grad)


def test_side_blend_formula_and_alpha_modes():
    model = build("bert", head="base")
    ids, mask = batch()
    base = model(input_ids=ids, attention_mask=mask).last_hidden_state.detach()
    pet_fast.inject(model, pet_fast.SideConfig(width=8, heads=2, alpha=0.25), "s")
    branch = model.pet_fast_tasks["s"]
    with torch.no_grad():
        branch.network.proj_out.bias.fill_(1.0)
    side = branch.network(model.get_input_embeddings()(ids), mask)
    out = model(input_ids=ids, attention_mask=mask)
    torch.testing.assert_close(out.last_hidden_state, 0.25 * base + 0.75 * side)
    torch.testing.assert_close(out.pooler_output, model.pooler(out.last_hidden_state))
    pet_fast.inject(model, pet_fast.SideConfig(width=8, heads=2, alpha=1.0, alpha_end=0.0, schedule_steps=4), "sched")
    sched = model.pet_fast_tasks["sched"]
    model.train()
    for _ in range(2):
        model(input_ids=ids, attention_mask=mask)
    assert int(sched.steps) == 2 and sched.alpha() == pytest.approx(0.5)
    pet_fast.inject(model, pet_fast.SideConfig(width=8, heads=2, alpha="learned", alpha_init=0.3), "learned")
    lrn = model.pet_fast_tasks["learned"]
    assert float(lrn.alpha().detach()) == pytest.approx(0.3)
    model(input_ids=ids, attention_mask=mask).last_hidden_state.sum().backward()
    assert lrn.alpha_logit.grad is not None
    with pytest.raises(ValueError, match="alpha"):
        pet_fast.SideConfig(alpha=1.5)


def test_side_cache_skips_the_base_after_the_first_epoch():
    model = build("bert")
    pet_fast.inject(model, pet_fast.SideConfig(width=16, heads=2, cache=True), "s")
    calls = []
    model.bert.encoder.register_forward_hook(lambda *a: calls.append(1))
    ids, mask = batch()
    first = model(input_ids=ids, attention_mask=mask, example_ids=torch.tensor([10, 11, 12])).logits
    assert len(calls) == 1
    second = model(input_ids=ids, attention_mask=mask, example_ids=torch.tensor([10, 11, 12])).logits
    assert len(calls) == 1  # served from the cache
    torch.testing.assert_close(first, second)
    with pet_fast.example_ids(model, [10, 11, 12]):
        model(input_ids=ids, attention_mask=mask)
    assert len(calls) == 1
    model(input_ids=ids, attention_mask=mask)  # no ids: the base runs
    assert len(calls) == 2
    other = ids.clone()
    other[1, 0] = (other[1, 0] + 1) % 50 + 3
    with pytest.raises(ValueError, match="example id 11"):
        model(input_ids=other, attention_mask=mask, example_ids=[10, 11, 12])


def test_side_base_runs_in_eval_mode_and_training_flags_come_back():
    # BERT's default dropout (0.1) is on in training mode: the base must run without it, and every module's
    # flag must be as the caller left it afterwards (one base module in eval mode on purpose stays so).
    model = build("bert", head="base")
    ids, mask = batch()
    expected = model(input_ids=ids, attention_mask=mask).last_hidden_state  # eval mode: no dropout
    pet_fast.inject(model, pet_fast.SideConfig(width=8, heads=2, alpha=1.0), "s")  # output = the base's
    model.train()
    kept_eval = model.encoder.layer[1].output.dropout
    kept_eval.eval()
    before = {name: m.training for name, m in model.named_modules()}
    seen = []
    hook = model.encoder.layer[0].attention.self.register_forward_pre_hook(
        lambda m, args: seen.append([sub.training for sub in model.encoder.modules()]))
    for _ in range(2):
        out = model(input_ids=ids, attention_mask=mask).last_hidden_state
        torch.testing.assert_close(out, expected, rtol=0, atol=0)  # no dropout drew anything
    hook.remove()
    assert seen and not any(any(flags) for flags in seen)  # the whole encoder in eval mode while the base ran
    assert {name: m.training for name, m in model.named_modules()} == before
    assert not kept_eval.training and model.pet_fast_tasks["s"].network.training


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_side_network_attends_as_its_dense_mask_says(causal, padded):
    # The network builds a mask only where padding needs one; its output is that of the blocks under the full
    # (B, 1, T, T) mask: a query sees the unpadded keys (up to itself when causal), and at least itself.
    from pet_fast.methods.side import SideNetwork

    torch.manual_seed(0)
    net = SideNetwork(12, width=8, heads=2, layers=2, causal=causal).double()
    torch.nn.init.normal_(net.proj_out.weight)  # (zero at init: the output would be 0 whatever the mask)
    B, T = 3, 7
    emb = torch.randn(B, T, 12, dtype=torch.float64)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, -2:] = 0
    mask[2, :3] = 0
    dense = torch.ones(B, 1, T, T, dtype=torch.bool)
    if padded:
        dense &= mask.bool().view(B, 1, 1, T)
    if causal:
        dense &= torch.ones(T, T, dtype=torch.bool).tril()
    dense |= torch.eye(T, dtype=torch.bool)
    # positions: with a mask, each row counts its own from its first real token (left padding), else 0..T-1
    pos = net.pos[(mask.cumsum(1) - 1).clamp(min=0)] if padded else net.pos[:T]
    x = net.proj_in(emb) + pos
    for block in net.blocks:
        x = block(x, dense)
    expected = net.proj_out(net.norm(x))
    torch.testing.assert_close(net(emb, mask if padded else None), expected)


@pytest.mark.parametrize("alpha", [0.3, "learned"])
def test_side_blend_gradients_follow_the_formula_in_float64(alpha):
    # blend = a * base + (1 - a) * side: the side output's gradient is (1 - a) * g; a learned alpha's logit
    # gets sum(g * (base - side)) * a * (1 - a); the base (no graph) gets none.
    from pet_fast.methods.side import SideBranch

    torch.manual_seed(0)
    branch = SideBranch(torch.nn.Identity(), alpha=alpha, alpha_init=0.3).double()
    base = torch.randn(2, 5, 7, dtype=torch.float64)
    side = torch.randn(2, 5, 7, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 5, 7, dtype=torch.float64)
    a = float(branch.alpha())  # 0.3 up to the float32 logit's rounding when learned
    assert a == pytest.approx(0.3)
    out = branch.blend(base, side)
    torch.testing.assert_close(out, a * base + (1 - a) * side, rtol=1e-15, atol=1e-15)
    out.backward(g)
    torch.testing.assert_close(side.grad, (1 - a) * g, rtol=1e-15, atol=1e-15)
    if alpha == "learned":
        expected = (g * (base - side.detach())).sum() * a * (1 - a)
        torch.testing.assert_close(branch.alpha_logit.grad, expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("kind", ["bert", "llama"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_side_tuning_a_model_held_in_another_dtype(kind, dtype):
    """A model loaded in bfloat16, float16 or float64 (from_pretrained(torch_dtype=...)): the side network trains
    in float32 (float64 for float64), the head reads the model's dtype; the numbers are the float32 model's."""
    ids, mask = batch()
    want_model = build(kind)
    pet_fast.inject(want_model, pet_fast.SideConfig(width=16, heads=2), "s")
    model = build(kind).to(dtype)
    pet_fast.inject(model, pet_fast.SideConfig(width=16, heads=2), "s")
    with torch.no_grad():  # the same side weights (its last projection starts at zero: give it values)
        for (k, p), (_, q) in zip(want_model.named_parameters(), model.named_parameters()):
            if f"{TASK_ATTR}.s." in k:
                p.normal_(0, 0.2)
                q.copy_(p)
    net = {p.dtype for k, p in model.named_parameters() if ".network." in k}
    assert net == {torch.float64 if dtype == torch.float64 else torch.float32}
    model.train()
    want_model.train()
    torch.manual_seed(5)  # (the head's dropout draws the same mask in both)
    out = model(input_ids=ids, attention_mask=mask).logits
    assert out.dtype == dtype
    torch.manual_seed(5)
    want = want_model(input_ids=ids, attention_mask=mask).logits
    tol = {torch.float64: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(out.double(), want.double(), rtol=tol, atol=tol)
    out.float().pow(2).sum().backward()
    grads = {k for k, p in model.named_parameters() if p.grad is not None}
    assert grads == {k for k, p in model.named_parameters() if p.requires_grad} and any(".network." in k for k in grads)


def test_side_tuning_refuses_encoder_decoder_models():
    import transformers as tf

    model = tf.T5ForSequenceClassification(tf.T5Config(vocab_size=61, d_model=32, d_kv=8, d_ff=37, num_layers=2,
                                                       num_heads=4, decoder_start_token_id=0))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="encoder-decoder models"):
        pet_fast.inject(model, pet_fast.SideConfig(width=16, heads=2), "s")
    assert model.state_dict().keys() == before.keys()
    assert pet_fast.tasks.registry(model) is None


def _side_only(kind, head="base"):
    """A model whose side task alone makes the output (alpha 0), with a side network of non-zero weights."""
    model = build(kind, head=head)
    pet_fast.inject(model, pet_fast.SideConfig(width=16, heads=2, alpha=0.0), "s")
    with torch.no_grad():
        for k, p in model.named_parameters():
            if ".network." in k:
                p.normal_(0, 0.1)
    return model


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_side_network_on_a_left_padded_decoder_batch(kind):
    """A decoder's batch is padded on the left: a row's real tokens take the side network's positions from 0 (from
    the mask, or the position_ids given), as the base's do, so the padded row's outputs are the unpadded row's."""
    model = _side_only(kind)
    ids, mask = batch(pad_left=True)
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask).last_hidden_state
        given = model(input_ids=ids, attention_mask=mask,
                      position_ids=(mask.cumsum(1) - 1).clamp(min=0)).last_hidden_state
        solo = model(input_ids=ids[:1, 3:], attention_mask=mask[:1, 3:]).last_hidden_state
    torch.testing.assert_close(full[0, 3:], solo[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(given, full, rtol=1e-6, atol=1e-7)


def test_side_tuning_refuses_incremental_decoding_and_generates_without_a_cache():
    """The side network runs over the whole sequence: a call continuing from a KV cache is refused (it would
    see only the new token); generate(use_cache=False) gives the full forwards' greedy tokens."""
    model = _side_only("llama", head="lm")
    ids = torch.randint(3, 61, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cache = model(input_ids=ids[:, :-1], use_cache=True).past_key_values
        with pytest.raises(ValueError, match="continuing from a KV cache.*use_cache=False"):
            model(input_ids=ids[:, -1:], past_key_values=cache, use_cache=True)
        out = model.generate(input_ids=ids, max_new_tokens=3, do_sample=False, use_cache=False)
        want = ids
        for _ in range(3):
            want = torch.cat([want, model(input_ids=want).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(out, want)


def test_example_ids_nest_and_must_name_one_example_per_row():
    model = build("bert")
    model.eval()
    pet_fast.inject(model, pet_fast.SideConfig(width=16, heads=2, cache=True), "s")
    branch = next(m for m in model.modules() if type(m).__name__ == "SideBranch")
    ids, mask = batch()
    with torch.no_grad(), pet_fast.example_ids(model, [40, 41, 42]):
        with pet_fast.example_ids(model, [50, 51]):
            model(input_ids=ids[:2], attention_mask=mask[:2])
        model(input_ids=ids, attention_mask=mask)  # the outer block's ids again
    assert {40, 41, 42, 50, 51} <= set(branch.cache)
    for wrong in ([1, 2], [7, 8, 9, 10]):
        with pytest.raises(ValueError, match="one example per row"):
            model(input_ids=ids, attention_mask=mask, example_ids=wrong)


def _cached_side_model(head: str):
    """A BERT in eval mode with a side task that caches, and the list its base's encoder appends to per run."""
    model = build("bert", head=head)
    model.eval()
    pet_fast.inject(model, pet_fast.SideConfig(width=16, heads=2, cache=True), "s")
    calls = []
    model.base_model.encoder.register_forward_hook(lambda *a: calls.append(1))
    return model, calls


def test_side_cache_recomputes_rows_given_another_mask_token_types_or_positions():
    """The cache keys rows by example id and compares every input that changes the base's output: the same
    tokens with another attention mask, token types or positions are recomputed (not served stale)."""
    model, calls = _cached_side_model("base")
    ids, mask = batch()
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, example_ids=[1, 2, 3])
        other_mask = mask.clone()
        other_mask[1, -2:] = 0
        token_types = torch.zeros_like(ids)
        token_types[:, 4:] = 1
        positions = torch.arange(ids.shape[1]).flip(0)[None]
        for kwargs in ({"attention_mask": other_mask}, {"attention_mask": mask, "token_type_ids": token_types},
                       {"attention_mask": mask, "position_ids": positions}):
            n = len(calls)
            got = model(input_ids=ids, example_ids=[1, 2, 3], **kwargs).last_hidden_state
            assert len(calls) == n + 1  # recomputed
            want = model(input_ids=ids, **kwargs).last_hidden_state  # no ids: no cache
            torch.testing.assert_close(got, want, rtol=0, atol=0)
            again = model(input_ids=ids, example_ids=[1, 2, 3], **kwargs).last_hidden_state
            assert len(calls) == n + 2  # the recomputed rows replaced the cached ones: a hit now
            torch.testing.assert_close(again, want, rtol=0, atol=0)


def test_side_cache_compares_input_embeddings():
    model, calls = _cached_side_model("base")
    ids, mask = batch()
    with torch.no_grad():
        emb = model.get_input_embeddings()(ids)
        first = model(inputs_embeds=emb, attention_mask=mask, example_ids=[7, 8, 9]).last_hidden_state
        second = model(inputs_embeds=emb.clone(), attention_mask=mask, example_ids=[7, 8, 9]).last_hidden_state
        assert len(calls) == 1
        torch.testing.assert_close(first, second, rtol=0, atol=0)
        emb[2, 3, 0] += 1.0  # in place: the cache holds its own copy of what it saw
        with pytest.raises(ValueError, match="example id 9 .*different inputs_embeds"):
            model(inputs_embeds=emb, attention_mask=mask, example_ids=[7, 8, 9])


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_side_cache_hit_honours_return_dict_false(kind):
    model = build(kind)
    model.eval()
    pet_fast.inject(model, pet_fast.SideConfig(width=16, heads=2, cache=True), "s")
    ids, mask = batch()
    base = model.base_model
    with torch.no_grad():
        miss = base(input_ids=ids, attention_mask=mask, example_ids=[1, 2, 3], return_dict=False)
        hit = base(input_ids=ids, attention_mask=mask, example_ids=[1, 2, 3], return_dict=False)
        as_dict = base(input_ids=ids, attention_mask=mask, example_ids=[1, 2, 3])
    assert isinstance(miss, tuple) and isinstance(hit, tuple)
    torch.testing.assert_close(hit[0], miss[0], rtol=0, atol=0)
    if kind == "bert":  # the pooler's output comes second, as from the backbone
        assert len(hit) == 2
        torch.testing.assert_close(hit[1], miss[1], rtol=0, atol=0)
    torch.testing.assert_close(as_dict.last_hidden_state, miss[0], rtol=0, atol=0)


def test_side_cache_is_refused_while_other_tasks_change_the_base():
    model = build("bert")
    model.eval()
    pet_fast.inject(model, pet_fast.AdapterConfig(train_head=False, init="bert"), "ad")
    pet_fast.inject(model, pet_fast.SideConfig(width=16, heads=2, cache=True), "sd")
    ids, mask = batch()
    pet_fast.set_active(model, ["sd", "ad"])
    with pytest.raises(ValueError, match=r"side task 'sd' caches the frozen base's outputs, but tasks \['ad'\]"):
        model(input_ids=ids, attention_mask=mask, example_ids=[0, 1, 2])
    together = model(input_ids=ids, attention_mask=mask).logits  # without ids: no cache, both tasks run
    pet_fast.set_active(model, "sd")
    alone = model(input_ids=ids, attention_mask=mask, example_ids=[0, 1, 2]).logits
    assert not torch.allclose(together, alone)
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask, example_ids=[0, 1, 2]).logits, alone)


def test_side_cache_recomputes_after_the_model_is_cast_or_autocast_switches():
    model, calls = _cached_side_model("cls")
    ids, mask = batch()
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, example_ids=[1, 2, 3])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(input_ids=ids, attention_mask=mask, example_ids=[1, 2, 3])
        assert len(calls) == 2  # autocast changes the base's output: recomputed
        model.double()
        got = model(input_ids=ids, attention_mask=mask, example_ids=[1, 2, 3]).logits  # (it crashed in the pooler)
        assert len(calls) == 3 and got.dtype == torch.float64
        torch.testing.assert_close(got, model(input_ids=ids, attention_mask=mask).logits, rtol=0, atol=0)


def test_side_cache_leaves_calls_with_a_prepared_attention_mask_alone():
    """A 4-d attention mask is not compared row by row: such calls run the base (an example first seen without a
    mask got its cached unmasked states)."""
    model, calls = _cached_side_model("base")
    ids, _ = batch()
    B, T = ids.shape
    masked = torch.ones(B, 1, T, T, dtype=torch.bool)
    masked[..., T // 2:] = False
    with torch.no_grad():
        model(input_ids=ids, example_ids=[0, 1, 2])
        got = model(input_ids=ids, attention_mask=masked, example_ids=[0, 1, 2]).last_hidden_state
        assert len(calls) == 2
        torch.testing.assert_close(got, model(input_ids=ids, attention_mask=masked).last_hidden_state, rtol=0, atol=0)


def test_training_a_side_task_together_with_another_task_is_refused():
    """The side task runs the base without gradients: a task active with it would get none (it silently did not
    train). Together they still run without gradients; a prefix task injects after a side task (its check of
    the backbone's position_ids read the side site's (*args, **kwargs))."""
    model = build("bert")
    pet_fast.inject(model, pet_fast.SideConfig(width=16, heads=2), "s")
    pet_fast.inject(model, pet_fast.PrefixConfig(prefix_length=2, train_head=False), "p")
    pet_fast.set_active(model, ["s", "p"])
    ids, mask = batch()
    model.train()
    with pytest.raises(ValueError, match=r"side task 's' runs the frozen base without gradients, so tasks \['p'\]"):
        model(input_ids=ids, attention_mask=mask)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    model.eval()
    model(input_ids=ids, attention_mask=mask)


def _generic_lm(kind, **over):
    import transformers as tf

    torch.manual_seed(0)
    if kind == "opt":
        cfg = tf.OPTConfig(vocab_size=61, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=37,
                           max_position_embeddings=64, dropout=0.0, **over)
        return tf.OPTForCausalLM(cfg).eval()
    cfg = tf.GPTNeoXConfig(vocab_size=61, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=37, max_position_embeddings=64, **over)
    return tf.GPTNeoXForCausalLM(cfg).eval()


def _assert_side_network_causal(model):
    """A side task (alpha=0: the side network's output alone) with random weights on ``model``: a token's logits do
    not change with later tokens. Returns the batch."""
    pet_fast.inject(model, pet_fast.SideConfig(alpha=0.0, width=16, heads=2), "s")
    ids = torch.randint(3, 61, (2, 7))
    later = ids.clone()
    later[:, 4:] = torch.randint(3, 61, (2, 3))
    with torch.no_grad():
        for p in pet_fast.task_parameters(model, "s").values():
            p.add_(torch.randn_like(p) * 0.5)
        torch.testing.assert_close(model(input_ids=later).logits[:, :4], model(input_ids=ids).logits[:, :4],
                                   rtol=0, atol=0)
    return ids


@pytest.mark.parametrize("kind", ["opt", "neox"])
def test_side_network_on_other_decoders_runs_and_is_causal(kind):
    """OPTForCausalLM calls its decoder past the backbone's forward: the side task never ran (alpha=0 gave the
    plain model's logits, and nothing trained). And on decoders other than GPT-2 and Llama the side network
    attended to later tokens (their configs' is_decoder is False): a token's logits saw the future."""
    model = _generic_lm(kind)
    plain = copy.deepcopy(model)
    ids = _assert_side_network_causal(model)
    with torch.no_grad():
        assert (model(input_ids=ids).logits - plain(input_ids=ids).logits).abs().max() > 0.1
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for n, p in pet_fast.task_parameters(model, "s").items() if "network" in n)


def test_side_network_reads_embeddings_narrower_than_the_hidden_states():
    """ALBERT's and ELECTRA's token embeddings are narrower than hidden_size, OPT's last hidden states too
    (word_embed_proj_dim): the first forward failed inside nn.Linear. ViT's patch embeddings are refused."""
    import transformers as tf

    small = dict(vocab_size=61, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=37)
    models = [tf.AlbertForSequenceClassification(tf.AlbertConfig(embedding_size=16, **small)),
              tf.ElectraForSequenceClassification(tf.ElectraConfig(embedding_size=24, **small)),
              _generic_lm("opt", word_embed_proj_dim=16)]
    ids = torch.randint(3, 61, (2, 7))
    for model in models:
        model.eval()
        plain = copy.deepcopy(model)
        pet_fast.inject(model, pet_fast.SideConfig(alpha=1.0, width=16, heads=2), "s")
        with torch.no_grad():
            torch.testing.assert_close(model(input_ids=ids).logits, plain(input_ids=ids).logits, rtol=0, atol=0)
    vit = tf.ViTForImageClassification(tf.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                                    intermediate_size=37, image_size=16, patch_size=8))
    with pytest.raises(ValueError, match="runs its side network on token embeddings .* are a ViTPatchEmbeddings"):
        pet_fast.inject(vit, pet_fast.SideConfig(width=16, heads=2), "s")


def test_side_cache_runs_the_base_for_calls_asking_its_hidden_states():
    """A cache hit built the output from the last hidden state alone: output_hidden_states (given, or set in the
    model's config) came back None on the second identical call."""
    model, calls = _cached_side_model("cls")
    ids, mask = batch()
    with torch.no_grad():
        for _ in range(2):
            out = model(input_ids=ids, attention_mask=mask, example_ids=[1, 2, 3], output_hidden_states=True)
            assert out.hidden_states is not None and len(out.hidden_states) == 3
        model.config.output_hidden_states = True
        out = model(input_ids=ids, attention_mask=mask, example_ids=[1, 2, 3])
        assert out.hidden_states is not None
        model.config.output_hidden_states = False
        model(input_ids=ids, attention_mask=mask, example_ids=[1, 2, 3])
        model(input_ids=ids, attention_mask=mask, example_ids=[1, 2, 3])
    assert len(calls) == 4  # three runs asking for hidden states, one to fill the cache, one hit


def test_side_network_is_causal_where_attention_modules_do_not_say_and_pools_as_bigbird():
    """Bloom's attention has no is_causal: its side network attended to later tokens. BigBird's pooler is a
    Linear with its tanh beside it (as `activation`): the side path left the tanh out."""
    import transformers as tf

    torch.manual_seed(0)
    ids = _assert_side_network_causal(tf.BloomForCausalLM(tf.BloomConfig(vocab_size=61, hidden_size=32, n_layer=2,
                                                                         n_head=4)).eval())
    cfg = tf.BigBirdConfig(vocab_size=61, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                           intermediate_size=37, attention_type="original_full", max_position_embeddings=64)
    bigbird = tf.BigBirdModel(cfg).eval()
    plain = copy.deepcopy(bigbird)
    pet_fast.inject(bigbird, pet_fast.SideConfig(alpha=1.0, width=16, heads=2), "s")
    with torch.no_grad():
        torch.testing.assert_close(bigbird(input_ids=ids).pooler_output, plain(input_ids=ids).pooler_output,
                                   rtol=0, atol=0)


def test_side_cache_hits_rebuild_the_bases_output_class():
    """A hit rebuilt a fixed output class: task classes reading other fields of their base's output
    (GPT2LMHeadModel: cross_attentions) failed on every epoch after the first."""
    model = build("gpt2", head="lm")
    pet_fast.inject(model, pet_fast.SideConfig(width=16, heads=2, cache=True), "s")
    ids, mask = batch()
    with torch.no_grad():
        first = model(input_ids=ids, attention_mask=mask, example_ids=[0, 1, 2]).logits
        again = model(input_ids=ids, attention_mask=mask, example_ids=[0, 1, 2]).logits
    torch.testing.assert_close(again, first, rtol=0, atol=0)


def test_side_network_sees_a_left_padded_encoder_row_as_unpadded():
    """The side network gave an encoder's tokens the table's first positions whatever the padding: a left-padded
    row changed by 1.35 where RoBERTa's own positions leave it as unpadded."""
    model = build("roberta", head="base")
    pet_fast.inject(model, pet_fast.SideConfig(alpha=0.5, width=16, heads=2), "s")
    with torch.no_grad():
        for p in pet_fast.task_parameters(model, "s").values():
            p.add_(torch.randn_like(p) * 0.5)
        ids, mask = batch(pad_left=True)
        ids[0, :3] = 1  # RoBERTa's padding id
        padded = model(input_ids=ids, attention_mask=mask).last_hidden_state[0, 3:]
        alone = model(input_ids=ids[:1, 3:]).last_hidden_state[0]
    torch.testing.assert_close(padded, alone, rtol=1e-5, atol=1e-5)


def test_example_ids_given_to_a_task_class_that_drops_extra_keywords_reach_the_cache():
    """DebertaV2ForSequenceClassification (Bloom, Falcon, Longformer...) does not hand extra keywords to its
    backbone: example_ids=... was dropped and the cache never filled, with no error."""
    import transformers as tf

    cfg = tf.DebertaV2Config(vocab_size=61, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                             intermediate_size=37, num_labels=2)
    torch.manual_seed(0)
    model = tf.DebertaV2ForSequenceClassification(cfg).eval()
    pet_fast.inject(model, pet_fast.SideConfig(width=16, heads=2, cache=True), "s")
    calls = []
    model.deberta.encoder.register_forward_hook(lambda *a: calls.append(1))
    ids = torch.randint(3, 61, (2, 7))
    with torch.no_grad():
        want = model(input_ids=ids, example_ids=[4, 5]).logits
        got = model(input_ids=ids, example_ids=[4, 5]).logits
    assert len(calls) == 1
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    pet_fast.remove(model, "s")
    assert "_pet_fast_side_ids_hook" not in model.__dict__ and not model._forward_pre_hooks


def test_side_tuning_a_vision_language_model_reads_its_text_models_sizes():
    """Llava's side host is its language model, but the hidden size and positions were read from the composite's
    config (text_config and vision_config only): inject was refused as if the model had no hidden size."""
    import transformers as tf

    text = tf.LlamaConfig(vocab_size=61, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                          num_key_value_heads=2, intermediate_size=37, max_position_embeddings=64)
    vision = tf.CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 image_size=16, patch_size=4, projection_dim=16)
    torch.manual_seed(0)
    model = tf.LlavaForConditionalGeneration(tf.LlavaConfig(text_config=text.to_dict(), vision_config=vision.to_dict(),
                                                            image_token_index=60)).eval()
    plain = copy.deepcopy(model)
    pet_fast.inject(model, pet_fast.SideConfig(alpha=1.0, width=16, heads=2), "s")
    network = model.model.language_model.pet_fast_tasks["s"].network
    assert network.pos.shape[0] == 64 and network.causal
    ids = torch.randint(3, 59, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, plain(input_ids=ids).logits, rtol=0, atol=0)


def test_side_cache_compares_longformers_global_attention_mask():
    """A row cached with one global_attention_mask was served for a call with another (0.016 off)."""
    import transformers as tf

    cfg = tf.LongformerConfig(vocab_size=61, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                              intermediate_size=37, attention_window=4, max_position_embeddings=70, pad_token_id=1)
    torch.manual_seed(0)
    model = tf.LongformerModel(cfg).eval()
    pet_fast.inject(model, pet_fast.SideConfig(width=16, heads=2, cache=True), "s")
    ids = torch.randint(3, 61, (2, 8))
    marked = torch.zeros(2, 8, dtype=torch.long)
    marked[:, 0] = 1
    with torch.no_grad():
        model(input_ids=ids, example_ids=[0, 1])
        got = model(input_ids=ids, global_attention_mask=marked, example_ids=[0, 1]).last_hidden_state
        want = model(input_ids=ids, global_attention_mask=marked).last_hidden_state
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_a_replayed_base_call_rebuilds_the_bases_output_class(monkeypatch):
    """The base's output class was recorded only from eager runs: a call served from the base's CUDA graphs (here
    the replay simulated on the CPU) built a fixed class, and GPT-2's LM head failed on cross_attentions."""
    from pet_fast.methods import side

    monkeypatch.setattr(side.BaseGraphs, "usable", staticmethod(lambda call: True))
    monkeypatch.setattr(side, "_graphs", lambda branch, host: (lambda fn, call: fn(**call)))
    model = build("gpt2", head="lm")
    pet_fast.inject(model, pet_fast.SideConfig(width=16, heads=2, base_graphs=True), "s")
    ids, mask = batch()
    with torch.no_grad():
        assert model(input_ids=ids, attention_mask=mask).logits.shape == (3, 9, 61)


def test_a_model_whose_forward_takes_example_ids_keeps_them():
    """The outer model's hook took example_ids out of every call: a model of one's own that declares them lost
    them (TypeError when required)."""
    class Classifier(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = build("bert", head="base")
            self.config = self.bert.config
            self.head = torch.nn.Linear(32, 2)

        @property
        def base_model(self):
            return self.bert

        def forward(self, input_ids, attention_mask=None, *, example_ids):
            self.seen = example_ids
            return self.head(self.bert(input_ids=input_ids, attention_mask=attention_mask,
                                       example_ids=example_ids).last_hidden_state[:, 0])

    model = Classifier().eval()
    pet_fast.inject(model, pet_fast.SideConfig(width=16, heads=2, cache=True), "s")
    calls = []
    model.bert.encoder.register_forward_hook(lambda *a: calls.append(1))
    ids, mask = batch()
    with torch.no_grad():
        for _ in range(2):
            model(input_ids=ids, attention_mask=mask, example_ids=[0, 1, 2])
    assert model.seen == [0, 1, 2] and len(calls) == 1


def test_side_tuning_a_model_without_a_position_table_of_its_own():
    """XLNet's max_position_embeddings is -1: the side network's table was made with -1 rows and failed."""
    import transformers as tf

    torch.manual_seed(0)
    model = tf.XLNetModel(tf.XLNetConfig(vocab_size=61, d_model=32, n_layer=1, n_head=4, d_inner=37)).eval()
    plain = copy.deepcopy(model)
    pet_fast.inject(model, pet_fast.SideConfig(alpha=1.0, width=16, heads=2), "s")
    ids = torch.randint(3, 61, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).last_hidden_state, plain(input_ids=ids).last_hidden_state,
                                   rtol=0, atol=0)
