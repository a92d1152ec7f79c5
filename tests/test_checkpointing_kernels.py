"""Gradient checkpointing on the kernels' paths (triton backend under the interpreter, launches replayed from a
CPU build of the replay, `replay_ext`): every method trains for three steps with transformers' checkpointing
(non-reentrant, its default, and reentrant) and gets the gradients of the same steps without it.

A recomputed layer must take its forward's path: torch.utils.checkpoint refuses (CheckpointError) a
recomputation that keeps other tensors, and the replay records programs during the first backward, between
recomputations (kernels/_replay.py recorded_in_this_backward)."""
import importlib

import pytest
import torch

import pet_fast
from tiny_models import batch, build, logits

R = importlib.import_module("pet_fast.kernels._replay")

CONFIGS = {
    "houlsby": lambda: pet_fast.AdapterConfig(placement="houlsby", init="bert"),
    "pfeiffer": lambda: pet_fast.AdapterConfig(placement="pfeiffer", init="bert"),
    "parallel": lambda: pet_fast.AdapterConfig(placement="parallel", init="bert"),
    "mask": lambda: pet_fast.MaskConfig(),
    "prefix": lambda: pet_fast.PrefixConfig(prefix_length=3),
}


def _model(kind, method):
    torch.manual_seed(0)
    model = build(kind)
    if method == "fusion":
        for i in range(3):
            pet_fast.inject(model, pet_fast.AdapterConfig(placement="pfeiffer", init="bert", bottleneck=4 + i), f"a{i}")
        pet_fast.inject(model, pet_fast.FusionConfig(adapters=["a0", "a1", "a2"]), "t")
        for m in model.modules():
            if isinstance(m, pet_fast.AdapterFusion):
                m.dropout = 0.2  # (on the scores: the key bias's term counts)
                with torch.no_grad():
                    m.key.bias.normal_(0, 0.1)
    else:
        pet_fast.inject(model, CONFIGS[method.split("-")[0]](), "t")
    for name, m in model.named_modules():  # the base's own dropout off, but for prefix-dropout the attention's (drawn
        # in the prefix kernels from a seed of torch's generator, which checkpointing restores)
        if isinstance(m, torch.nn.Dropout) and not (method == "prefix-dropout" and name.endswith("attention.self.dropout")):
            m.p = 0.0
    return model.train()


def _steps(kind, method, ckpt, replay_ext, autocast=False):
    model = _model(kind, method)
    if ckpt is not None:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": ckpt == "reentrant"})
    out = []
    with R.through_interpreter(replay_ext):  # (nothing recorded yet: the first step records in its backward)
        for step in range(3):
            ids, mask = batch(B=4, seed=step, pad_left=kind == "llama")
            torch.manual_seed(step)
            with pet_fast.use_backend("triton"), torch.autocast("cpu", dtype=torch.float16, enabled=autocast):
                loss = logits(model, ids, mask).float().pow(2).mean()
                loss.backward()  # (inside the block: the recomputation takes the backend too)
            out.append((loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters()
                                        if p.requires_grad and p.grad is not None}))
            model.zero_grad(set_to_none=True)
    return out


CASES = [("bert", m, c) for m in ("houlsby", "pfeiffer", "fusion", "mask", "prefix") for c in ("non-reentrant", "reentrant")]
CASES += [("llama", m, c) for m in ("parallel", "prefix") for c in ("non-reentrant", "reentrant")]
CASES += [("bert", "prefix-dropout", "non-reentrant")]  # (the interpreter's dropout kernels are slow: one case)


@pytest.mark.parametrize("kind,method,ckpt", CASES, ids=lambda v: v if isinstance(v, str) else None)
def test_checkpointed_steps_on_the_kernels_give_the_unchecked_gradients(replay_ext, kind, method, ckpt):
    want = _steps(kind, method, None, replay_ext)
    got = _steps(kind, method, ckpt, replay_ext)
    for (lw, gw), (lg, gg) in zip(want, got):
        torch.testing.assert_close(lg, lw, rtol=1e-6, atol=1e-7)
        assert gw.keys() == gg.keys() and gw
        for k in gw:
            torch.testing.assert_close(gg[k], gw[k], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method", ["houlsby", "fusion"])
def test_checkpointed_steps_under_autocast(replay_ext, method):
    want = _steps("bert", method, None, replay_ext, autocast=True)
    got = _steps("bert", method, "non-reentrant", replay_ext, autocast=True)
    for (lw, gw), (lg, gg) in zip(want, got):
        torch.testing.assert_close(lg, lw, rtol=1e-3, atol=1e-5)
        for k in gw:
            torch.testing.assert_close(gg[k], gw[k], rtol=1e-2, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_gradient_checkpointing_with_the_replayed_node(dtype):
    """On a GPU (the backward, with the recomputation, in autograd's device thread, which takes the use_backend()
    block open in the program's thread): three steps of a tiny BERT with Houlsby adapters under non-reentrant
    gradient checkpointing, the launches replayed from C++, run (no CheckpointError) and give the gradients of
    the same steps without checkpointing."""
    if not R.enabled() or R._extension() is None:  # (outside the replay's gated test run: see gpu_check.sh)
        pytest.skip("the extension cannot replay Triton launches here")
    from tiny_models import batch, build, logits

    def run(ckpt: bool):
        R._clear_caches()  # (each run records in its first backward)
        torch.manual_seed(0)
        model = build("bert").to("cuda", dtype)
        pet_fast.inject(model, pet_fast.AdapterConfig(placement="houlsby", init="bert"), "a")
        model.train()
        if ckpt:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        out = []
        for step in range(3):
            ids, mask = batch(B=16, seed=step)  # 144 tokens: the triton backend's tiles, not the few-token forms
            with pet_fast.use_backend("triton"):
                logits(model, ids.cuda(), mask.cuda()).float().pow(2).mean().backward()
            out.append({k: p.grad.float().clone() for k, p in model.named_parameters() if p.requires_grad})
            model.zero_grad(set_to_none=True)
        return out

    want, got = run(False), run(True)
    for w, g in zip(want, got):
        for k in w:
            torch.testing.assert_close(g[k], w[k], rtol=1e-4 if dtype == torch.float32 else 2e-2, atol=1e-5)
