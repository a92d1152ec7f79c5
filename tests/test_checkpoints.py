"""Loading never runs code from a file, and truncated, corrupted or mismatched checkpoints are refused
with a clear error that leaves the model as it was (issue: reliability, checkpoints)."""
import json
import os
import pickle

import pytest
import torch

import pet_fast
from pet_fast.tasks import registry
from tiny_models import build

FLAG = []


class _Exploit:
    """A pickle that would run code when unpickled without weights_only."""

    def __reduce__(self):
        return (FLAG.append, ("code ran",))


def _saved(tmp_path, method=None):
    model = build("bert")
    pet_fast.inject(model, method or pet_fast.AdapterConfig(placement="pfeiffer"), "t")
    pet_fast.save(model, tmp_path / "ckpt")
    return tmp_path / "ckpt"


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, {k: p.requires_grad for k, p in model.named_parameters()}


def _unchanged(model, snap):
    state, grads = snap
    now = model.state_dict()
    return set(now) == set(state) and all(torch.equal(now[k], state[k]) for k in state) and \
        {k: p.requires_grad for k, p in model.named_parameters()} == grads and registry(model) is None


def _refused(model, path, match):
    snap = _snapshot(model)
    with pytest.raises(ValueError, match=match):
        pet_fast.load(model, path)
    assert _unchanged(model, snap)


def test_truncated_weights_are_refused(tmp_path):
    path = _saved(tmp_path)
    weights = path / "pet_fast_task.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    _refused(build("bert"), path, "pet_fast_task.safetensors")


def test_corrupted_weights_header_is_refused(tmp_path):
    path = _saved(tmp_path)
    weights = path / "pet_fast_task.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:24] = b"\xff" * 16  # garble the JSON header
    weights.write_bytes(bytes(data))
    _refused(build("bert"), path, "pet_fast_task.safetensors")


@pytest.mark.parametrize("text", ["{not json", "[]", json.dumps({"format": "pet_fast"})])
def test_corrupted_config_is_refused(tmp_path, text):
    path = _saved(tmp_path)
    (path / "pet_fast_config.json").write_text(text)
    _refused(build("bert"), path, "pet_fast_config.json|format")


def test_config_that_does_not_match_the_weights_is_refused(tmp_path):
    path = _saved(tmp_path)
    meta = json.loads((path / "pet_fast_config.json").read_text())
    meta["config"]["bottleneck_size"] = 3  # the stored tensors have another size
    (path / "pet_fast_config.json").write_text(json.dumps(meta))
    _refused(build("bert"), path, "shape|size")


def test_adapterhub_bin_with_code_is_refused_without_running_it(tmp_path):
    folder = tmp_path / "ah"
    folder.mkdir()
    config = {"config": {"architecture": "bottleneck", "reduction_factor": 16, "mh_adapter": False,
                         "output_adapter": True, "non_linearity": "relu", "original_ln_before": True,
                         "original_ln_after": True, "residual_before_ln": True},
              "name": "evil", "model_type": "bert", "hidden_size": 32, "version": "adapters.1.2.0"}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    with open(folder / "pytorch_adapter.bin", "wb") as f:
        pickle.dump({"bert.encoder.layer.0.output.adapters.evil.adapter_down.0.weight": _Exploit()}, f)
    model = build("bert")
    snap = _snapshot(model)
    with pytest.raises(ValueError, match="pytorch_adapter.bin"):
        pet_fast.load(model, folder)
    assert FLAG == [] and _unchanged(model, snap)


def test_peft_bin_with_code_is_refused_without_running_it(tmp_path):
    folder = tmp_path / "peft"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "PREFIX_TUNING", "task_type": "SEQ_CLS", "num_virtual_tokens": 2, "num_transformer_submodules": 1}))
    with open(folder / "adapter_model.bin", "wb") as f:
        pickle.dump({"prompt_embeddings": _Exploit()}, f)
    model = build("bert")
    snap = _snapshot(model)
    with pytest.raises(ValueError, match="adapter_model.bin"):
        pet_fast.load(model, folder)
    assert FLAG == [] and _unchanged(model, snap)


def test_a_failed_save_keeps_the_previous_checkpoint_loadable(tmp_path, monkeypatch):
    path = _saved(tmp_path)
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    model = build("bert")
    pet_fast.inject(model, pet_fast.AdapterConfig(placement="pfeiffer"), "t")
    import safetensors.torch as st

    def crash(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(st, "save_file", crash)
    with pytest.raises(OSError):
        pet_fast.save(model, path)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert not [p for p in tmp_path.iterdir() if p.name != "ckpt"]  # no temporary folder left behind
    assert pet_fast.load(build("bert"), path) == "t"
    assert os.path.isdir(path)
