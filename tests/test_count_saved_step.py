"""benchmarks/count_saved_step.py (the bytes a step's forward keeps for the backward, per method vs the
floor) on a tiny BERT, and what the adapter op keeps for its backward."""
import json
import os
import sys

import torch

import pet_fast

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import count_saved_step as C  # noqa: E402


def test_tiny_bert_table_and_json(tmp_path, capsys):
    path = tmp_path / "saved.json"
    assert C.main(["--hidden", "32", "--heads", "2", "--layers", "2", "--to-layers", "4", "--seq", "8", "16",
                   "--rows", "floor", "houlsby", "--json", str(path)]) == 0
    doc = json.loads(path.read_text())
    s = doc["summary"]
    assert s["floor"]["peak_vs_floor"] == 1.0 and s["houlsby"]["peak_vs_floor"] > 0
    # per token, a Houlsby layer (two eager adapters) keeps what the floor's keeps and, per adapter, its
    # input h (d values in bf16) and the r-wide pre-activation and hidden (r = d / 16 each, in bf16)
    per_token = lambda layers, row: sum(v["per_token"] for v in doc["summaries"][layers][row]["by_creator"].values())
    layer = {row: per_token("2", row) - per_token("1", row) for row in ("floor", "houlsby")}
    assert abs(layer["houlsby"] - layer["floor"] - 2 * (2 * 32 + 2 * 2 + 2 * 2)) < 0.5, layer
    out = capsys.readouterr().out
    assert "extrapolated from 1 and 2 layers to 4" in out and "saved bytes by creator op" in out
    for r in s.values():
        assert r["alive"] >= r["saved"] - 1 and r["static"] >= r["weights"]


def _saved(fn):
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = (t.dtype, tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, saved


def test_triton_adapter_keeps_only_its_input_and_parameters():
    """The fused adapter recomputes its r-wide hidden in the backward: per token it keeps x alone (the input
    its down-projection's gradient needs), not the residual, the hidden or the output."""
    torch.manual_seed(0)
    n, d, r = 9, 16, 4
    m = pet_fast.BottleneckAdapter(d, r, activation="silu")
    h = torch.randn(n, d, dtype=torch.float16, requires_grad=True)
    x = torch.randn(n, d, requires_grad=True)  # float32 residual stream
    y, saved = _saved(lambda: m(h, residual=x, add_input=True, backend="triton"))
    per_token = {k: v for k, v in saved.items() if v[1] and v[1][0] == n}
    assert list(per_token) == [h.untyped_storage().data_ptr()], saved
    y.sum().backward()
    assert h.grad is not None and m.w_down.grad is not None
