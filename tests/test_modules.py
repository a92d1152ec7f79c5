import pytest
import torch
from torch import nn

import pet_fast
from pet_fast import AdapterFusion, BottleneckAdapter, MaskedLinear, PrefixEncoder, SideTuning
from conftest import rel_err


# ----- BottleneckAdapter ---------------------------------------------------------------------------
def test_adapter_identity_init_is_identity_and_trains():
    a = BottleneckAdapter(16, 4, init="identity")
    x = torch.randn(2, 5, 16)
    assert torch.equal(a(x), x)
    a(x).pow(2).sum().backward()
    assert a.w_up.grad.abs().sum() > 0 and a.b_up.grad.abs().sum() > 0


@pytest.mark.parametrize("scaling", [0.5, "learned", "channel"])
def test_adapter_matches_op_and_scaling_gets_grad(scaling):
    a = BottleneckAdapter(12, 3, activation="tanh", scaling=scaling)
    x, res = torch.randn(4, 12), torch.randn(4, 12)
    s = a.scaling if isinstance(a.scaling, float) else a.scaling.detach()
    expected = res + s * (torch.tanh(x @ a.w_down.T + a.b_down) @ a.w_up.T + a.b_up)
    out = a(x, residual=res)
    assert rel_err(out, expected) < 1e-6
    out.sum().backward()
    if not isinstance(a.scaling, float):
        assert a.scaling.grad is not None


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_adapter_without_biases(backend):
    a = BottleneckAdapter(12, 3, activation="tanh", bias=False, scaling="channel")
    assert a.b_down is None and a.b_up is None and set(dict(a.named_parameters())) == {"w_down", "w_up", "scaling"}
    assert "scaling=channel, bias=False" in repr(a)
    x = torch.randn(4, 12, requires_grad=True)
    with pet_fast.use_backend(backend):
        out = a(x)
    expected = x + a.scaling.detach() * (torch.tanh(x @ a.w_down.T) @ a.w_up.T)
    assert rel_err(out, expected) < 1e-6
    out.sum().backward()
    assert a.w_down.grad is not None and x.grad is not None


def test_adapter_half_input_and_autocast():
    a = BottleneckAdapter(8, 2)
    x = torch.randn(3, 8).half()
    assert a(x).dtype == torch.float16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert a(torch.randn(3, 8).bfloat16()).dtype == torch.bfloat16


@pytest.mark.parametrize("kw,exc", [(dict(d_model=0, bottleneck=2), ValueError), (dict(d_model=4, bottleneck=0), ValueError),
                                    (dict(d_model=4, bottleneck=2, init="xavier"), ValueError),
                                    (dict(d_model=4, bottleneck=2, scaling="big"), ValueError),
                                    (dict(d_model=4, bottleneck=2, activation="elu"), ValueError)])
def test_adapter_bad_arguments(kw, exc):
    with pytest.raises(exc):
        BottleneckAdapter(**kw)


# ----- AdapterFusion ---------------------------------------------------------------------------------
def test_fusion_fuse_equals_adapters_then_forward():
    d = 10
    adapters = [BottleneckAdapter(d, r, activation="relu", scaling=s) for r, s in ((3, 1.0), (5, 0.5), (2, 2.0))]
    fusion = AdapterFusion(d).eval()
    x, q, res = torch.randn(2, 4, d), torch.randn(2, 4, d), torch.randn(2, 4, d)
    ups = torch.stack([a(x) - x for a in adapters], dim=-2)  # each adapter's scaled up-projection
    expected = fusion(q, ups, res)
    assert rel_err(fusion.fuse(x, q, res, adapters), expected) < 1e-5


def test_fusion_value_initialized_and_gradients():
    d = 6
    f = AdapterFusion(d, value_initialized=True)
    w = f.value.weight.detach()
    assert torch.equal(torch.diagonal(w), torch.ones(d))
    assert (w - torch.diag(torch.diagonal(w))).abs().max().item() == pytest.approx(1e-6)
    q, vals, res = torch.randn(3, d), torch.randn(3, 2, d), torch.randn(3, d)
    f(q, vals, res).sum().backward()
    # every parameter trains but the key's bias, which cancels in the softmax and is not passed to the op
    assert {n for n, p in f.named_parameters() if p.grad is None} == {"key.bias"}


def test_fusion_temperature_decays_in_training_only():
    f = AdapterFusion(4, temperature=True)
    args = (torch.randn(2, 4), torch.randn(2, 3, 4), torch.randn(2, 4))
    f(*args)
    f(*args)
    assert f.T == pytest.approx(50.0 - 2 * 0.05)
    f.eval()
    f(*args)
    assert f.T == pytest.approx(50.0 - 2 * 0.05)


def test_fusion_dropout_path_trains():
    f = AdapterFusion(4, dropout=0.5)
    out = f(torch.randn(8, 4), torch.randn(8, 3, 4), torch.randn(8, 4))
    out.sum().backward()
    assert f.query.weight.grad is not None


# ----- MaskedLinear --------------------------------------------------------------------------------
def test_masked_linear_from_linear_keeps_outputs_and_merges():
    lin = nn.Linear(7, 5)
    m = MaskedLinear.from_linear(lin, threshold=0.2)
    x = torch.randn(3, 7)
    assert torch.allclose(m(x), lin(x))
    assert m.weight.data_ptr() == lin.weight.data_ptr() and not m.weight.requires_grad
    with torch.no_grad():
        m.scores[0, :3] = -1.0
    merged = m.merge()
    assert isinstance(merged, nn.Linear)
    assert torch.equal(merged(x), m(x))
    assert merged.weight[0, :3].abs().sum() == 0


def test_masked_linear_trains_scores_only():
    m = MaskedLinear(6, 4)
    x = torch.randn(5, 6)
    m(x).pow(2).sum().backward()
    assert m.scores.grad is not None and m.scores.grad.dtype == torch.float32
    assert m.weight.grad is None and m.bias.grad is None


def test_masked_linear_init_score_must_keep_every_weight():
    with pytest.raises(ValueError, match="init_score"):
        MaskedLinear(3, 3, threshold=0.5, init_score=0.5)
    with pytest.raises(TypeError, match="linear must be an nn.Linear"):
        MaskedLinear.from_linear(nn.Conv1d(2, 2, 1))


# ----- PrefixEncoder -------------------------------------------------------------------------------
@pytest.mark.parametrize("projection_dim", [None, 16])
def test_prefix_encoder_shapes_and_layout(projection_dim):
    enc = PrefixEncoder(3, 2, 4, 5, projection_dim=projection_dim)
    out = enc()
    assert len(out) == 3 and out[0][0].shape == (2, 5, 4)
    flat = enc.flat().detach()
    # flat[p] is ordered (layer, k/v, head, dim)
    assert torch.equal(out[1][1].detach()[0, 2], flat[2].view(3, 2, 2, 4)[1, 1, 0])
    batched = enc(batch_size=6)
    assert batched[0][0].shape == (6, 2, 5, 4)
    sum(k.sum() + v.sum() for k, v in enc()).backward()
    assert all(p.grad is not None for p in enc.parameters())


def test_prefix_encoder_feeds_prefix_attention():
    enc = PrefixEncoder(1, 2, 8, 3)
    (pk, pv), = enc()
    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    pet_fast.prefix_attention(q, k, v, pk, pv).sum().backward()
    assert enc.prefix.grad.abs().sum() > 0


# ----- SideTuning ----------------------------------------------------------------------------------
def test_side_tuning_fixed_alpha_no_base_graph():
    base, side = nn.Sequential(nn.Linear(4, 3), nn.Dropout(0.5)), nn.Linear(4, 3)
    st = SideTuning(base, side, alpha=0.25).train()
    assert not base.training  # the base stays in eval mode
    x = torch.randn(5, 4)
    out = st(x)
    with torch.no_grad():
        expected = 0.25 * base(x) + 0.75 * side(x)
    assert torch.allclose(out, expected)
    out.sum().backward()
    assert all(p.grad is None for p in base.parameters())
    assert side.weight.grad is not None
    assert st.base_forward(x).grad_fn is None


def test_side_tuning_learned_and_scheduled_alpha():
    st = SideTuning(nn.Linear(2, 2), nn.Linear(2, 2), alpha="learned", alpha_init=0.3)
    assert st.alpha().item() == pytest.approx(0.3)
    st(torch.randn(3, 2)).sum().backward()
    assert st.alpha_logit.grad is not None
    sched = SideTuning(nn.Linear(2, 2), nn.Linear(2, 2), alpha=lambda step: max(0.0, 1.0 - 0.5 * step))
    assert sched.alpha() == 1.0
    sched(torch.randn(1, 2))
    assert sched.alpha() == 0.5
    with pytest.raises(ValueError, match="alpha"):
        SideTuning(nn.Linear(2, 2), nn.Linear(2, 2), alpha=1.5)


def test_side_tuning_schedule_resumes_from_its_state_dict():
    schedule = lambda step: max(0.0, 1.0 - 0.25 * step)  # noqa: E731
    st = SideTuning(nn.Linear(2, 2), nn.Linear(2, 2), alpha=schedule).train()
    for _ in range(2):
        st(torch.randn(3, 2))
    with torch.no_grad():
        st(torch.randn(3, 2))  # an evaluation pass in training mode: not a training step
    assert int(st.steps) == 2 and st.alpha() == 0.5
    resumed = SideTuning(nn.Linear(2, 2), nn.Linear(2, 2), alpha=schedule)
    resumed.load_state_dict(st.state_dict())
    assert resumed.alpha() == 0.5
