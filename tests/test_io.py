"""save / load of every method, several tasks on one base, refusals, atomic writes, AdapterHub imports."""
import json
import os

import pytest
import torch
import torch.nn.functional as F

import pet_fast
import pet_fast.io as pio
from pet_fast.tasks import TASK_ATTR
from tiny_models import batch, build, logits


def _perturb(model, name):
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for k, p in model.named_parameters():
            if f"{TASK_ATTR}.{name}." in k:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, {k: p.requires_grad for k, p in model.named_parameters()}


def _assert_unchanged(model, snap):
    state, grads = snap
    now = model.state_dict()
    assert set(now) == set(state)
    assert all(torch.equal(now[k], state[k]) for k in state)
    assert {k: p.requires_grad for k, p in model.named_parameters()} == grads


def _saved_adapter(path):
    """A BERT with a Houlsby adapter task "t" saved at ``path``: (model, ids, mask, its logits then)."""
    model = build("bert")
    pet_fast.inject(model, pet_fast.AdapterConfig(), "t")
    ids, mask = batch()
    want = logits(model, ids, mask).detach()
    pet_fast.save(model, path)
    return model, ids, mask, want


def _loads_as_saved(path, ids, mask, want):
    fresh = build("bert")
    pet_fast.load(fresh, path)
    torch.testing.assert_close(logits(fresh, ids, mask), want, rtol=0, atol=0)


CONFIGS = {
    "houlsby": lambda: pet_fast.AdapterConfig(placement="houlsby"),
    "parallel": lambda: pet_fast.AdapterConfig(placement="parallel", scaling="learned"),
    "side": lambda: pet_fast.SideConfig(width=16, heads=2, alpha="learned"),
    "mask": lambda: pet_fast.MaskConfig(),
}


@pytest.mark.parametrize("kind,method", [("bert", "houlsby"), ("gpt2", "parallel"), ("llama", "side"), ("roberta", "mask"), ("gpt2", "mask")])
def test_roundtrip_on_a_fresh_base(tmp_path, kind, method):
    model = build(kind)
    pet_fast.inject(model, CONFIGS[method](), "t")
    _perturb(model, "t")
    if method == "mask":
        for m in model.modules():
            if isinstance(m, pet_fast.methods.MaskScores):
                with torch.no_grad():
                    m.scores.copy_(torch.randn_like(m.scores))
    ids, mask = batch()
    want = logits(model, ids, mask).detach()
    pet_fast.save(model, tmp_path / "ckpt")
    files = sorted(os.listdir(tmp_path / "ckpt"))
    assert files == [pio.CONFIG_FILE, pio.WEIGHTS_FILE]
    fresh = build(kind)
    assert pet_fast.load(fresh, tmp_path / "ckpt") == "t"
    torch.testing.assert_close(logits(fresh, ids, mask), want, rtol=0, atol=0)
    saved = json.loads((tmp_path / "ckpt" / pio.CONFIG_FILE).read_text())
    assert all(TASK_ATTR in k for k in saved["tensors"])
    n_task = sum(v.numel() for k, v in model.state_dict().items() if f"{TASK_ATTR}.t." in k)
    n_all = sum(v.numel() for v in model.state_dict().values())
    assert n_task < n_all / 2  # only the task was written


def test_mask_checkpoint_packs_one_bit_per_weight(tmp_path):
    model = build("bert")
    pet_fast.inject(model, pet_fast.MaskConfig(target_modules=["output.dense"]), "m")
    host = model.bert.encoder.layer[0].output.dense
    with torch.no_grad():
        host.pet_fast_tasks["m"].scores.copy_(torch.randn(32, 37))
    pet_fast.save(model, tmp_path / "bits")
    from safetensors.torch import load_file

    stored = load_file(str(tmp_path / "bits" / pio.WEIGHTS_FILE))
    key = f"bert.encoder.layer.0.output.dense.{TASK_ATTR}.{{task}}.mask_bits"
    packed = stored[key]
    assert packed.dtype == torch.uint8 and packed.numel() == (32 * 37 + 7) // 8
    assert not any(k.endswith(".scores") for k in stored)
    flat = (host.pet_fast_tasks["m"].scores > 0).reshape(-1)
    for i in (0, 1, 100, 32 * 37 - 1):  # bit j of byte i is element 8*i+j, least significant first
        assert bool((int(packed[i // 8]) >> (i % 8)) & 1) == bool(flat[i])
    pet_fast.save(model, tmp_path / "scores", include_scores=True)
    stored = load_file(str(tmp_path / "scores" / pio.WEIGHTS_FILE))
    assert any(k.endswith(".scores") for k in stored)
    fresh = build("bert")
    pet_fast.load(fresh, tmp_path / "scores")
    h2 = fresh.bert.encoder.layer[0].output.dense
    torch.testing.assert_close(h2.pet_fast_tasks["m"].scores, host.pet_fast_tasks["m"].scores)


def test_pack_unpack_roundtrip():
    m = torch.rand(5, 13) > 0.5
    torch.testing.assert_close(pio.unpack_mask(pio.pack_mask(m), (5, 13)), m)
    assert pio.pack_mask(torch.tensor([True, False, True] + [False] * 5)).tolist() == [0b101]


def test_several_tasks_on_one_base_switched(tmp_path):
    src = build("bert")
    outs = {}
    ids, mask = batch()
    for name, cfg in (("a", pet_fast.AdapterConfig()), ("m", pet_fast.MaskConfig()), ("s", pet_fast.SideConfig(width=16, heads=2))):
        pet_fast.inject(src, cfg, name)
        _perturb(src, name)
        outs[name] = logits(src, ids, mask).detach()
        pet_fast.save(src, tmp_path / name)
    fresh = build("bert")
    for name in ("s", "a", "m"):
        pet_fast.load(fresh, tmp_path / name)
    for name in ("a", "m", "s"):
        pet_fast.set_active(fresh, name)
        torch.testing.assert_close(logits(fresh, ids, mask), outs[name], rtol=0, atol=0)
    pet_fast.set_active(fresh, "a")
    assert all(p.requires_grad == (f"{TASK_ATTR}.a." in k) for k, p in fresh.named_parameters())


def test_fusion_roundtrip(tmp_path):
    src = build("bert")
    for n in ("x", "y"):
        pet_fast.inject(src, pet_fast.AdapterConfig(), n)
        _perturb(src, n)
        pet_fast.save(src, tmp_path / n)
    pet_fast.inject(src, pet_fast.FusionConfig(adapters=["x", "y"]), "f")
    _perturb(src, "f")
    pet_fast.save(src, tmp_path / "f")
    ids, mask = batch()
    want = logits(src, ids, mask).detach()
    fresh = build("bert")
    snap = _snapshot(fresh)
    with pytest.raises(ValueError, match="does not have"):
        pet_fast.load(fresh, tmp_path / "f")  # its adapters are not there yet
    _assert_unchanged(fresh, snap)
    pet_fast.load(fresh, tmp_path / "x")
    pet_fast.load(fresh, tmp_path / "y")
    pet_fast.load(fresh, tmp_path / "f")
    torch.testing.assert_close(logits(fresh, ids, mask), want, rtol=0, atol=0)


def test_mismatches_are_refused_before_anything_changes(tmp_path):
    src = build("bert")
    pet_fast.inject(src, pet_fast.AdapterConfig(), "t")
    pet_fast.save(src, tmp_path / "ok")
    other = build("gpt2")
    snap = _snapshot(other)
    with pytest.raises(ValueError, match="model_type"):
        pet_fast.load(other, tmp_path / "ok")
    _assert_unchanged(other, snap)
    assert getattr(other, "_pet_fast_registry", None) is None
    # same model type, edited config (bottleneck) -> tensor shapes differ
    meta = json.loads((tmp_path / "ok" / pio.CONFIG_FILE).read_text())
    meta["config"]["bottleneck"] = 7
    (tmp_path / "ok" / pio.CONFIG_FILE).write_text(json.dumps(meta))
    target = build("bert")
    pet_fast.inject(target, pet_fast.AdapterConfig(placement="houlsby"), "keep")
    snap = _snapshot(target)
    with pytest.raises(ValueError, match="shape mismatch"):
        pet_fast.load(target, tmp_path / "ok")
    _assert_unchanged(target, snap)
    assert list(target._pet_fast_registry.configs) == ["keep"] and target._pet_fast_registry.active == ("keep",)
    meta["config"]["placement"] = "nowhere"
    (tmp_path / "ok" / pio.CONFIG_FILE).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="placement"):
        pet_fast.load(target, tmp_path / "ok")
    _assert_unchanged(target, snap)
    with pytest.raises(ValueError, match="already has a task"):
        pet_fast.save(target, tmp_path / "k2")
        pet_fast.load(target, tmp_path / "k2")


def test_save_is_atomic(tmp_path, monkeypatch):
    model, ids, mask, want = _saved_adapter(tmp_path / "c")
    _perturb(model, "t")

    def crash(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(pio.json, "dump", crash)  # dies after the weights, before the config
    with pytest.raises(OSError):
        pet_fast.save(model, tmp_path / "c")
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["c"]  # no temporary folder left, old checkpoint intact
    _loads_as_saved(tmp_path / "c", ids, mask, want)
    with pytest.raises(OSError):
        monkeypatch.setattr(pio.json, "dump", crash)
        pet_fast.save(model, tmp_path / "new")
    assert not (tmp_path / "new").exists()
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x.txt").write_text("mine")
    monkeypatch.undo()
    with pytest.raises(ValueError, match="not a pet_fast checkpoint"):
        pet_fast.save(model, tmp_path / "junk")



def test_a_save_failing_at_its_last_rename_puts_the_old_checkpoint_back(tmp_path, monkeypatch):
    model, ids, mask, want = _saved_adapter(tmp_path / "c")
    _perturb(model, "t")
    real, calls = os.replace, []

    def second_fails(a, b):  # the old checkpoint moved aside, then the new one refused its place
        calls.append((a, b))
        if len(calls) == 2:
            raise OSError("rename refused")
        return real(a, b)
    monkeypatch.setattr(pio.os, "replace", second_fails)
    with pytest.raises(OSError, match="rename refused"):
        pet_fast.save(model, tmp_path / "c")
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["c"]
    _loads_as_saved(tmp_path / "c", ids, mask, want)


def test_a_crash_between_the_renames_is_named_by_load(tmp_path):
    _saved_adapter(tmp_path / "c")
    os.replace(tmp_path / "c", tmp_path / ".c.old-x1y2")  # as a save that died after its first rename leaves it
    with pytest.raises(ValueError, match=r"does not exist; a save there was interrupted.*\.c\.old-x1y2"):
        pet_fast.load(build("bert"), tmp_path / "c")
    with pytest.raises(ValueError, match="does not exist'?$"):
        pet_fast.load(build("bert"), tmp_path / "other")


def test_saving_over_a_checkpoint_with_other_files_beside_it_is_refused(tmp_path):
    model = _saved_adapter(tmp_path / "c")[0]
    (tmp_path / "c" / "tokenizer.json").write_text("{}")
    before = {f: (tmp_path / "c" / f).read_bytes() for f in os.listdir(tmp_path / "c")}
    with pytest.raises(ValueError, match=r"other files \(tokenizer.json\), which saving there would delete"):
        pet_fast.save(model, tmp_path / "c")
    assert {f: (tmp_path / "c" / f).read_bytes() for f in os.listdir(tmp_path / "c")} == before
    (tmp_path / "f").write_text("a file")
    with pytest.raises(ValueError, match="is not a folder"):
        pet_fast.save(model, tmp_path / "f")
    (tmp_path / "empty").mkdir()
    pet_fast.save(model, tmp_path / "empty")
    assert pio.is_checkpoint(tmp_path / "empty")

# ---------------------------------------------------------------------------------------------
# AdapterHub imports, checked against AdapterHub's computations written out here

def _ah_adapter_files(path, name, placement, H, layers, d, act="relu", scaling=1.0, fmt="bin", mh=False, seed=0):
    flags = {"pfeiffer": dict(original_ln_before=True, original_ln_after=True, residual_before_ln=True, is_parallel=False),
             "houlsby": dict(original_ln_before=False, original_ln_after=True, residual_before_ln=True, is_parallel=False),
             "parallel": dict(original_ln_before=False, original_ln_after=True, residual_before_ln=True, is_parallel=True)}[placement]
    config = dict(flags, mh_adapter=mh, output_adapter=True, reduction_factor=H / d, non_linearity=act, ln_before=False,
                  ln_after=False, init_weights="bert", scaling=scaling, use_gating=False, adapter_residual_before_ln=False,
                  dropout=0.0, leave_out=[], phm_layer=False, inv_adapter=None, cross_adapter=False, stochastic_depth=0.0)
    meta = {"config": config, "hidden_size": H, "model_class": "BertAdapterModel", "model_name": "tiny", "model_type": "bert",
            "name": name, "version": "adapters.1.2.0"}
    path.mkdir()
    (path / "adapter_config.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
    g = torch.Generator().manual_seed(seed)
    state = {}
    for i in range(layers):
        for loc in (["attention.output", "output"] if mh else ["output"]):
            p = f"bert.encoder.layer.{i}.{loc}.adapters.{name}."
            state[p + "adapter_down.0.weight"] = torch.randn(d, H, generator=g) * 0.3
            state[p + "adapter_down.0.bias"] = torch.randn(d, generator=g) * 0.1
            state[p + "adapter_up.weight"] = torch.randn(H, d, generator=g) * 0.3
            state[p + "adapter_up.bias"] = torch.randn(H, generator=g) * 0.1
    if fmt == "bin":
        torch.save(state, path / "pytorch_adapter.bin")
    else:
        from safetensors.torch import save_file

        save_file(state, str(path / "adapter.safetensors"))
    return state


def _ah_A(state, prefix, z, act, scaling):
    f = {"relu": F.relu, "swish": F.silu, "gelu_new": lambda t: F.gelu(t, approximate="tanh")}[act]
    down = f(z @ state[prefix + "adapter_down.0.weight"].T + state[prefix + "adapter_down.0.bias"])
    return scaling * (down @ state[prefix + "adapter_up.weight"].T + state[prefix + "adapter_up.bias"])


def _bert_reference(model, ids, mask, sublayer):
    """BERT forward with each output sublayer replaced by ``sublayer(i, loc, h, x, LN)``."""
    handles = []
    for i, layer in enumerate(model.bert.encoder.layer):
        for loc, host in (("attention.output", layer.attention.output), ("output", layer.output)):
            def fwd(hs, x, host=host, i=i, loc=loc):
                return sublayer(i, loc, host.dense(hs), x, host.LayerNorm)
            host.forward = fwd
            handles.append(host)
    try:
        return logits(model, ids, mask)
    finally:
        for host in handles:
            del host.forward


@pytest.mark.parametrize("placement,act,fmt,mh", [("pfeiffer", "relu", "bin", False), ("houlsby", "swish", "safetensors", True),
                                                  ("parallel", "relu", "bin", False)])
def test_import_adapterhub_adapter(tmp_path, placement, act, fmt, mh):
    scaling = 4.0 if placement == "parallel" else 1.0
    state = _ah_adapter_files(tmp_path / "ah", "sst", placement, 32, 2, 4, act=act, scaling=scaling, fmt=fmt, mh=mh)
    ref_model = build("bert")
    ids, mask = batch()

    def sublayer(i, loc, h, x, LN):
        p = f"bert.encoder.layer.{i}.{loc}.adapters.sst."
        if p + "adapter_up.weight" not in state:
            return LN(h + x)
        if placement == "houlsby":
            return LN(h + x + _ah_A(state, p, h, act, scaling))
        if placement == "pfeiffer":
            return LN(h + x + _ah_A(state, p, LN(h + x), act, scaling))
        return LN(h + x + _ah_A(state, p, x, act, scaling))
    with torch.no_grad():
        want = _bert_reference(ref_model, ids, mask, sublayer)
    model = build("bert")
    assert pet_fast.load(model, tmp_path / "ah") == "sst"
    cfg = model._pet_fast_registry.configs["sst"]
    assert (cfg.placement, cfg.bottleneck, cfg.mh_adapter) == (placement, 4, mh)
    torch.testing.assert_close(logits(model, ids, mask), want, rtol=1e-5, atol=1e-5)


def test_import_adapterhub_legacy_gelu_and_refusals(tmp_path):
    _ah_adapter_files(tmp_path / "old", "a", "pfeiffer", 32, 2, 4, act="gelu")
    meta = json.loads((tmp_path / "old" / "adapter_config.json").read_text())
    del meta["version"]  # adapter-transformers era: "gelu" meant the tanh approximation
    (tmp_path / "old" / "adapter_config.json").write_text(json.dumps(meta))
    model = build("bert")
    pet_fast.load(model, tmp_path / "old")
    assert model._pet_fast_registry.configs["a"].activation == "gelu_tanh"
    meta["config"]["use_gating"] = True
    (tmp_path / "old" / "adapter_config.json").write_text(json.dumps(meta))
    snap = _snapshot(model)
    with pytest.raises(ValueError, match="use_gating"):
        pet_fast.load(model, tmp_path / "old", name="b")
    _assert_unchanged(model, snap)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="neither"):
        pet_fast.load(model, tmp_path / "empty")


@pytest.mark.parametrize("temperature", [False, True])
def test_import_adapterhub_fusion(tmp_path, temperature):
    """(temperature=True: AdapterHub keeps no annealing state, so the import starts at 50, as AdapterHub does.)"""
    H = 32
    states = [_ah_adapter_files(tmp_path / n, n, "pfeiffer", H, 2, 4, seed=i) for i, n in enumerate(("a", "b"))]
    fdir = tmp_path / "fusion"
    fdir.mkdir()
    fcfg = {"key": True, "query": True, "value": True, "query_before_ln": False, "regularization": True,
            "residual_before": False, "temperature": temperature, "value_before_softmax": True, "value_initialized": True,
            "dropout_prob": None}
    (fdir / "adapter_fusion_config.json").write_text(json.dumps({"adapter_names": ["a", "b"], "config": fcfg, "hidden_size": H,
                                                                 "model_type": "bert", "name": "a,b", "version": "adapters.1.2.0"}))
    g = torch.Generator().manual_seed(5)
    fstate = {}
    for i in range(2):
        p = f"bert.encoder.layer.{i}.output.adapter_fusion_layer.a,b."
        for proj in ("query", "key", "value"):
            fstate[p + proj + ".weight"] = torch.randn(H, H, generator=g) * 0.1
            if proj != "value":
                fstate[p + proj + ".bias"] = torch.randn(H, generator=g) * 0.1
    torch.save(fstate, fdir / "pytorch_model_adapter_fusion.bin")

    def sublayer(i, loc, h, x, LN):
        if loc != "output":
            return LN(h + x)
        q = LN(h + x)
        u = torch.stack([_ah_A(s, f"bert.encoder.layer.{i}.output.adapters.{n}.", q, "relu", 1.0)
                         for s, n in zip(states, ("a", "b"))], dim=-2)
        p = f"bert.encoder.layer.{i}.output.adapter_fusion_layer.a,b."
        Q = q @ fstate[p + "query.weight"].T + fstate[p + "query.bias"]
        K = u @ fstate[p + "key.weight"].T + fstate[p + "key.bias"]
        Vv = u @ fstate[p + "value.weight"].T
        probs = torch.softmax((K * Q.unsqueeze(-2)).sum(-1) / (50.0 if temperature else 1.0), dim=-1)
        return LN(h + (probs.unsqueeze(-1) * Vv).sum(-2) + x)
    ids, mask = batch()
    with torch.no_grad():
        want = _bert_reference(build("bert"), ids, mask, sublayer)
    model = build("bert")
    pet_fast.load(model, tmp_path / "a")
    pet_fast.load(model, tmp_path / "b")
    assert pet_fast.load(model, fdir) == "a_b"
    torch.testing.assert_close(logits(model, ids, mask), want, rtol=1e-5, atol=1e-5)


def test_malformed_adapterhub_fusion_config_is_refused_clearly(tmp_path):
    fdir = tmp_path / "fusion"
    fdir.mkdir()
    torch.save({}, fdir / "pytorch_model_adapter_fusion.bin")
    model = build("bert")
    for meta in ({"config": {}}, {"adapter_names": "a,b"}, {"adapter_names": []}):
        (fdir / "adapter_fusion_config.json").write_text(json.dumps(meta))
        with pytest.raises(ValueError, match="needs adapter_names"):
            pio.import_adapterhub_fusion(model, fdir)
    (fdir / "adapter_fusion_config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="must hold a JSON object"):
        pio.import_adapterhub_fusion(model, fdir)
    assert pet_fast.tasks.registry(model) is None


def test_register_importer_is_tried(tmp_path):
    seen = []
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "marker.xyz").write_text("")
    pio.register_importer(lambda p: (p / "marker.xyz").exists(), lambda m, p, n: seen.append(n) or "imported")
    try:
        assert pet_fast.load(build("bert"), tmp_path / "foreign", name="z") == "imported"
        assert seen == ["z"]
    finally:
        pio.IMPORTERS.pop()


def test_import_adapterhub_adapter_llama_layout(tmp_path):
    """AdapterHub's Llama blocks hold ``attention_adapters`` / ``output_adapters`` and pass no LayerNorm:
    seq_bn then computes y + A(y) on the block output y = x + h."""
    H, d = 32, 4
    path = tmp_path / "ll"
    _ah_adapter_files(path, "t", "pfeiffer", H, 0, d)  # config only
    meta = json.loads((path / "adapter_config.json").read_text())
    meta["model_type"] = "llama"
    (path / "adapter_config.json").write_text(json.dumps(meta))
    g = torch.Generator().manual_seed(3)
    state = {}
    for i in range(2):
        p = f"model.layers.{i}.output_adapters.adapters.t."
        state[p + "adapter_down.0.weight"] = torch.randn(d, H, generator=g) * 0.3
        state[p + "adapter_down.0.bias"] = torch.randn(d, generator=g) * 0.1
        state[p + "adapter_up.weight"] = torch.randn(H, d, generator=g) * 0.3
        state[p + "adapter_up.bias"] = torch.randn(H, generator=g) * 0.1
    torch.save(state, path / "pytorch_adapter.bin")
    base = build("llama", head="lm")
    for i, layer in enumerate(base.model.layers):
        p = f"model.layers.{i}.output_adapters.adapters.t."
        layer.register_forward_hook(lambda m, a, out, p=p: out + _ah_A(state, p, out, "relu", 1.0))
    ids, mask = batch()
    with torch.no_grad():
        want = logits(base, ids, mask)
    model = build("llama", head="lm")
    pet_fast.load(model, path)
    torch.testing.assert_close(logits(model, ids, mask), want, rtol=1e-5, atol=1e-5)


def test_a_wrapped_model_is_named_in_the_error(tmp_path):
    """save, set_active and merge on a DataParallel/DistributedDataParallel wrapper (or torch.compile's module)
    name the wrapper and the attribute that holds the model with the tasks."""
    model = build("bert")
    pet_fast.inject(model, pet_fast.AdapterConfig(), "t")
    wrapped = torch.nn.DataParallel(model)
    with pytest.raises(ValueError, match="DataParallel wraps the model that has them: pass model.module"):
        pet_fast.save(wrapped, tmp_path / "c")
    with pytest.raises(ValueError, match="pass model.module"):
        pet_fast.set_active(wrapped, "t")
    with pytest.raises(ValueError, match="call pet_fast.inject first"):
        pet_fast.save(build("bert"), tmp_path / "c")
    pet_fast.save(wrapped.module, tmp_path / "c")
    with pytest.raises(ValueError, match="pass model.module"):
        pet_fast.remove(wrapped, "t")
    with pytest.raises(ValueError, match="pass model.module"):
        pet_fast.pack_for_serving(wrapped)
    with pytest.raises(ValueError, match="load acts on the model itself, and DataParallel wraps it: pass model.module"):
        pet_fast.load(wrapped, tmp_path / "c")


class _Tuner(torch.nn.Module):  # peft's layout: PeftModel.base_model (its tuner) .model (the model)
    def __init__(self, model):
        super().__init__()
        self.model = model


class PeftModelForSequenceClassification(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.base_model = _Tuner(model)


@pytest.mark.parametrize("wrap", ["DataParallel", "compiled", "peft"])
def test_inject_refuses_a_wrapper(wrap):
    """A wrapper's children are the model (no head to copy) and its state-dict names carry the wrapper's prefix:
    inject refuses it, naming the attribute to pass, and changes nothing. (peft's PeftModel: no head copy was made,
    and the refusals that came pointed elsewhere.)"""
    model = build("bert")
    wrapped = {"DataParallel": torch.nn.DataParallel, "compiled": torch.compile,
               "peft": PeftModelForSequenceClassification}[wrap](model)
    attr = {"DataParallel": "module", "compiled": "_orig_mod", "peft": "base_model.model"}[wrap]
    with pytest.raises(ValueError, match=rf"inject acts on the model itself, .* pass model.{attr}"):
        pet_fast.inject(wrapped, pet_fast.AdapterConfig(), "t")
    assert all(p.requires_grad for p in model.parameters()) and pet_fast.tasks.registry(wrapped) is None


def test_a_head_that_cannot_be_copied_leaves_the_model_as_it_was():
    """inject copies the task head after the method's modules: a head whose forward something else patched
    (accelerate's hooks, say) is refused, naming the head, and what the method attached is taken off."""
    from pet_fast.methods import _sites

    model = build("bert")
    model.classifier.forward = lambda *a, **k: None  # patched by someone else
    with pytest.raises(ValueError, match="the task head 'classifier': .*already has a patched forward"):
        pet_fast.inject(model, pet_fast.AdapterConfig(), "t")
    assert pet_fast.tasks.registry(model) is None and all(p.requires_grad for p in model.parameters())
    assert not any(_sites.site_kind(m) for m in model.modules())
    assert not any("pet_fast_tasks" in n for n, _ in model.named_modules())
    pet_fast.inject(model, pet_fast.AdapterConfig(train_head=False), "t")  # (without a head copy it attaches)


def test_an_adapterhub_adapter_from_another_model_is_refused(tmp_path):
    """Its facts are checked as pet_fast's own checkpoints' are: the model type (a BERT adapter's output sites are
    not GPT-2's), and the layers its config places adapters in (one for a 1-layer model in a 2-layer one)."""
    _ah_adapter_files(tmp_path / "bert", "a", "pfeiffer", 32, 2, 4)
    with pytest.raises(ValueError, match="saved from model_type 'bert'; this model is 'gpt2'"):
        pet_fast.load(build("gpt2"), tmp_path / "bert")
    _ah_adapter_files(tmp_path / "short", "a", "pfeiffer", 32, 1, 4)
    model = build("bert")
    snap = _snapshot(model)
    with pytest.raises(ValueError, match=r"weights for layers \[0\] \(leave_out=\[\]\); this model has 2 layers"):
        pet_fast.load(model, tmp_path / "short")
    _assert_unchanged(model, snap)


def test_adapterhub_gelu_orig_is_the_exact_gelu(tmp_path):
    _ah_adapter_files(tmp_path / "a", "a", "pfeiffer", 32, 2, 4, act="gelu_orig")
    model = build("bert")
    pet_fast.load(model, tmp_path / "a")
    assert model._pet_fast_registry.configs["a"].activation == "gelu"


def _ah_fusion_dir(path, names, cfg, state):
    path.mkdir()
    (path / "adapter_fusion_config.json").write_text(json.dumps({"adapter_names": names, "config": cfg, "hidden_size": 32,
                                                                 "model_type": "bert", "name": ",".join(names)}))
    torch.save(state, path / "pytorch_model_adapter_fusion.bin")


def test_adapterhub_fusion_files_as_adapterhub_writes_them(tmp_path):
    """A fusion's file also holds the layers of fusions whose names start with its own ("a,b" saves "a,b,c"'s):
    they are left out. Without query, key and value AdapterHub keeps an unused dense layer: left out too.
    Fusions of parallel adapters (which AdapterHub adds the sublayer input to twice) are refused."""
    H = 32
    for i, n in enumerate(("a", "b")):
        _ah_adapter_files(tmp_path / n, n, "pfeiffer", H, 2, 4, seed=i)
    base = {"key": False, "query": False, "value": False, "query_before_ln": False, "residual_before": False,
            "temperature": False, "value_before_softmax": True, "value_initialized": False}
    state = {}
    for i in range(2):
        state[f"bert.encoder.layer.{i}.output.adapter_fusion_layer.a,b.dense.weight"] = torch.randn(1, H)
        state[f"bert.encoder.layer.{i}.output.adapter_fusion_layer.a,b.dense.bias"] = torch.randn(1)
        state[f"bert.encoder.layer.{i}.output.adapter_fusion_layer.a,b,c.value.weight"] = torch.randn(H, H)
    _ah_fusion_dir(tmp_path / "fusion", ["a", "b"], base, state)
    model = build("bert")
    for n in ("a", "b"):
        pet_fast.load(model, tmp_path / n)
    assert pet_fast.load(model, tmp_path / "fusion") == "a_b"
    for i, n in enumerate(("p", "q")):
        _ah_adapter_files(tmp_path / n, n, "parallel", H, 2, 4, seed=i)
    _ah_fusion_dir(tmp_path / "pfusion", ["p", "q"], base, {k.replace("a,b.", "p,q."): t for k, t in state.items()
                                                          if "a,b." in k})
    model = build("bert")
    for n in ("p", "q"):
        pet_fast.load(model, tmp_path / n)
    with pytest.raises(ValueError, match="fuses parallel adapters with the sublayer's input added twice"):
        pet_fast.load(model, tmp_path / "pfusion")
