"""The host work an adapter adds to a training step, counted in aten ops (views and allocations aside)
and kernel launches: BERT-size steps are bound by the host, so each adapter site on the fused path
must cost its kernels and next to nothing else. Tiny BERT, fp16 autocast (the interpreter computes it
right), the Triton launchers counted and run outside the count."""
import collections
import contextlib
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import _disable_current_modes

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pet_fast  # noqa: E402
from benchmarks import common  # noqa: E402
from pet_fast import bench  # noqa: E402

FREE = {"view", "_unsafe_view", "t", "transpose", "unsqueeze", "squeeze", "expand", "alias", "detach",
        "as_strided", "slice", "select", "permute", "empty", "empty_like", "empty_strided", "new_empty",
        "_reshape_alias", "split", "unbind", "lift_fresh"}


def _step_counts(monkeypatch, placement, backend):
    kernels = pytest.importorskip("pet_fast.kernels.bottleneck_adapter")
    spec = bench.QUICK_MODELS["bert-tiny-4x32"]
    torch.manual_seed(0)
    model = bench.build_model(spec, torch.device("cpu"))
    ids, mask, labels = bench.make_batch(spec, model.config.vocab_size, torch.device("cpu"))
    if placement is None:  # the frozen model with its head training: what every method adds to
        for p in model.parameters():
            p.requires_grad_(False)
        for p in model.classifier.parameters():
            p.requires_grad_(True)
    else:
        pet_fast.inject(model, pet_fast.AdapterConfig(placement=placement), "t")
    launches = collections.Counter()
    for name in ("forward", "backward"):
        real = getattr(kernels, name)

        def counted(*args, _real=real, _name=name):
            launches[_name] += 1
            with _disable_current_modes():  # the interpreter's own tensor traffic is not the step's
                return _real(*args)

        monkeypatch.setattr(kernels, name, counted)

    def step():
        ctx = pet_fast.use_backend(backend) if backend else contextlib.nullcontext()
        with torch.no_grad():
            emb = model.get_input_embeddings()(ids)
        with ctx, torch.autocast("cpu", dtype=torch.float16):  # gradients reach the input in every variant
            out = model(inputs_embeds=emb.requires_grad_(), attention_mask=mask, labels=labels)
        out.loss.backward()
        model.zero_grad(set_to_none=True)

    step()
    launches.clear()
    with common.AtenOps(skip=FREE) as count:
        step()
    return count.ops, launches


# aten ops per site besides the kernels: houlsby's op adds h + x itself (add_input), the add the frozen
# block runs before its LayerNorm, so a houlsby site runs at least one aten op fewer than the frozen model
# (measured: 2, the add and a cast of h's gradient in the backward); pfeiffer's op applies the block's
# frozen LayerNorm to the float32 stream itself (layer_norm) and rounds it for the products in its
# kernels, so its second LayerNorm, the casts and the gradient-accumulation add are no aten ops (measured: 0)
BUDGET = {"houlsby": -1, "pfeiffer": 0}


@pytest.mark.parametrize("placement,sites", [("houlsby", 4), ("pfeiffer", 2)])
def test_fused_adapter_sites_add_their_kernels_and_little_else(monkeypatch, placement, sites):
    base, _ = _step_counts(monkeypatch, None, None)
    fused, launches = _step_counts(monkeypatch, placement, "triton")
    eager, _ = _step_counts(monkeypatch, placement, "eager")
    assert launches == {"forward": sites, "backward": sites}  # one launcher call each way per site
    extra = sum(fused.values()) - sum(base.values())
    extra_eager = sum(eager.values()) - sum(base.values())
    assert extra <= BUDGET[placement] * sites, (extra, fused - base)
    assert fused["_to_copy"] <= base["_to_copy"], (fused - base)
    assert fused["native_layer_norm"] == base["native_layer_norm"], (fused - base)
    assert extra_eager > extra + 10 * sites  # what the fused path saves over eager PyTorch's adapter
