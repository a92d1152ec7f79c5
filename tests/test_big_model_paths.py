"""What users of large models do around pet_fast: models built on the meta device, accelerate's offloading,
and casting the model to half precision after inject."""
import pytest
import torch

import pet_fast
from tiny_models import batch, build, logits

CONFIGS = {
    "houlsby": lambda: pet_fast.AdapterConfig(placement="houlsby"),
    "pfeiffer": lambda: pet_fast.AdapterConfig(placement="pfeiffer"),
    "mask": lambda: pet_fast.MaskConfig(),
    "prefix": lambda: pet_fast.PrefixConfig(prefix_length=3),
    "prefix_mlp": lambda: pet_fast.PrefixConfig(prefix_length=3, projection_dim=8),
    "side": lambda: pet_fast.SideConfig(width=8, layers=1, heads=2),
}


def _on_meta(kind="bert"):
    with torch.device("meta"):
        return build(kind)


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_inject_refuses_a_model_on_the_meta_device(method):
    """A task attached to a meta model was created on meta; after to_empty and the base's weights, it was
    uninitialised memory (NaN or 1e37 logits), with no error."""
    model = _on_meta()
    with pytest.raises(ValueError, match=r"inject: bert\.embeddings\.word_embeddings\.weight is on the meta device"):
        pet_fast.inject(model, CONFIGS[method](), "t")
    assert pet_fast.tasks.registry(model) is None and not any("pet_fast_tasks" in n for n, _ in model.named_modules())


def test_load_refuses_a_model_on_the_meta_device(tmp_path):
    """load onto a meta model reported success and kept none of the checkpoint's values."""
    model = build("bert")
    pet_fast.inject(model, pet_fast.AdapterConfig(placement="houlsby", init="bert"), "a")
    pet_fast.save(model, tmp_path / "a", "a")
    with pytest.raises(ValueError, match=r"load: .* is on the meta device"):
        pet_fast.load(_on_meta(), tmp_path / "a")


accelerate = pytest.importorskip("accelerate")


def _offloaded(method, kind="bert"):
    model = build(kind)
    pet_fast.inject(model, CONFIGS[method](), "t")
    with torch.no_grad():
        for p in pet_fast.task_parameters(model, "t").values():
            p.add_(torch.randn_like(p) * 0.05)  # away from the init (zero up-projections give the base)
    ids, mask = batch()
    with torch.no_grad():
        want = logits(model, ids, mask)
    accelerate.cpu_offload(model, execution_device=torch.device("cpu"))
    return model, ids, mask, want


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
@pytest.mark.parametrize("method", ["houlsby", "pfeiffer"])
def test_adapters_run_under_cpu_offload(method, kind):
    """Pfeiffer at BERT's post-LN sites handed the block's LayerNorm parameters to the adapter op without calling
    the LayerNorm: offloaded, they were meta, and accelerate failed to move them. The LayerNorm is called now."""
    model, ids, mask, want = _offloaded(method, kind)
    with torch.no_grad():
        torch.testing.assert_close(logits(model, ids, mask), want, rtol=0, atol=0)


@pytest.mark.parametrize("method", ["prefix", "prefix_mlp"])
def test_an_offloaded_prefix_is_refused_naming_the_meta_device(method):
    """The prefix is read without calling its encoder: offloaded, it stays meta (SDPA failed with a device
    mismatch, the MLP prefix inside accelerate's hook)."""
    model, ids, mask, _ = _offloaded(method)
    with pytest.raises(ValueError, match="prefix's parameters are on the meta device"), torch.no_grad():
        logits(model, ids, mask)


def test_an_offloaded_mask_task_says_what_meta_means():
    model, ids, mask, _ = _offloaded("mask")
    with pytest.raises(ValueError, match="got meta; a meta tensor holds no values: offloaded by accelerate"), torch.no_grad():
        logits(model, ids, mask)


def test_save_refuses_an_offloaded_task_and_writes_nothing(tmp_path):
    """save read meta tensors (NotImplementedError inside torch), and for mask tasks inside pack_mask."""
    for method in ("houlsby", "mask"):
        model, *_ = _offloaded(method)
        with pytest.raises(ValueError, match=r"save: .* is on the meta device .*save the task before offloading"):
            pet_fast.save(model, tmp_path / method, "t")
        assert not (tmp_path / method).exists()


@pytest.mark.parametrize("method", ["prefix", "prefix_mlp", "side", "mask"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_cast_after_inject_keeps_float32_task_parameters(method, dtype, tmp_path):
    """Prefixes, side networks and mask scores are float32 also in a half-precision model; a cast of the model
    after inject left prefixes and side networks in half precision, so the model's logits differed from the
    same task loaded onto a half-precision base (MLP prefix 6e-5, side 1.5e-4)."""
    model = build("bert")
    pet_fast.inject(model, CONFIGS[method](), "t")
    with torch.no_grad():
        for p in pet_fast.task_parameters(model, "t").values():
            p.add_(torch.randn_like(p) * 0.05)
    model.to(dtype)
    params = {n: p for n, p in pet_fast.task_parameters(model, "t").items() if not n.startswith("classifier.")}
    assert params and all(p.dtype == torch.float32 for p in params.values())  # (the head's copy is the model's)
    assert model.bert.embeddings.word_embeddings.weight.dtype == dtype
    fresh = build("bert").to(dtype)
    pet_fast.load(fresh, pet_fast.save(model, tmp_path / "t", "t", include_scores=True))
    ids, mask = batch()
    with torch.no_grad():
        torch.testing.assert_close(logits(fresh, ids, mask), logits(model, ids, mask), rtol=0, atol=0)


def test_save_refuses_a_task_whose_modules_were_replaced(tmp_path):
    """quantize_dynamic after inject swaps the masked linears (and the head) for quantized ones, which drop the
    task's parts: save wrote a checkpoint without them (0 tensors for a mask task), with no error."""
    model = build("bert")
    pet_fast.inject(model, pet_fast.MaskConfig(), "m")
    pet_fast.save(model, tmp_path / "ok", "m")
    quantized = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    with pytest.raises(ValueError, match=r"save: task 'm' was attached to \d+ modules and 0 hold it now"):
        pet_fast.save(quantized, tmp_path / "q", "m")
    assert not (tmp_path / "q").exists()
