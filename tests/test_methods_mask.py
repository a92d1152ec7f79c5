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
    before = logits(model, ids, mask).detach()
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
