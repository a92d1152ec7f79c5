"""The measured-timings table that orders the adapter ops' backends."""
import json
import os
import subprocess
import sys

import pytest
import torch

from pet_fast.ops import _timings


def test_table_orders_backends_by_nearest_measured_row(tmp_path, monkeypatch):
    path = tmp_path / "table.json"
    path.write_text(json.dumps({"device": "test", "rows": [
        {"op": "bottleneck_adapter", "mode": "fwd", "dtype": "bfloat16", "n": 16, "d": 768, "r": 64,
         "us": {"eager": 30.0, "triton": 9.0, "cuda": 6.0}},
        {"op": "bottleneck_adapter", "mode": "fwd", "dtype": "bfloat16", "n": 16384, "d": 768, "r": 64,
         "us": {"eager": 60.0, "triton": 20.0, "cuda": None}},
        {"op": "bottleneck_adapter", "mode": "fwd+bwd", "dtype": "bfloat16", "n": 16384, "d": 768, "r": 64,
         "us": {"eager": 400.0, "triton": 500.0}},
        {"op": "bad row"},
    ]}))
    monkeypatch.setattr(_timings, "TABLE", _timings.load_table(path))
    assert len(_timings.TABLE) == 3
    order = _timings.preference("bottleneck_adapter")
    info = dict(dtype=torch.bfloat16, n=8, d=1024, r=64, requires_grad=False)
    assert order(info) == ["cuda", "triton", "eager"]
    assert order({**info, "n": 8192})[:2] == ["triton", "eager"]
    # eager measured faster with gradients: auto prefers it
    assert order({**info, "n": 8192, "requires_grad": True})[:2] == ["eager", "triton"]
    assert _timings.preference("stacked_adapter_fusion")(info) == list(_timings.DEFAULT_ORDER)


def test_missing_table_gives_the_default_order(tmp_path, monkeypatch):
    assert _timings.load_table(tmp_path / "absent.json") == []
    monkeypatch.setattr(_timings, "TABLE", [])
    order = _timings.preference("bottleneck_adapter")(dict(dtype=torch.float16, n=1, d=8, r=2))
    assert order == ["cuda", "triton", "eager"]


def test_auto_dispatch_with_a_table_compiles_without_graph_breaks(monkeypatch):
    import pet_fast

    monkeypatch.setattr(_timings, "TABLE", [("bottleneck_adapter", "fwd+bwd", "float32", 1.0, 2.7, 1.4, 0.0,
                                              ("triton", "eager"))])
    torch._dynamo.reset()
    m = pet_fast.BottleneckAdapter(16, 4, activation="gelu", scaling="channel")
    x = torch.randn(3, 16, requires_grad=True)
    out = torch.compile(m, fullgraph=True, backend="aot_eager")(x)  # auto: eager on the CPU
    assert torch.allclose(out, m(x, backend="eager"))


def test_shipped_table_is_the_measured_one(monkeypatch):
    """pet_fast/ops/dispatch_table.json (measured on an H100, benchmarks/results/h100-2026-11-27c/call1): auto
    follows the fastest measured backend per shape and mode: Triton forward and backward at BERT-base's
    width, the cuda backend for the forward at 16 tokens and d=4096 and for training at r=256, d=4096."""
    from pathlib import Path

    path = Path(_timings.__file__).with_name("dispatch_table.json")
    doc = json.loads(path.read_text())
    assert "H100" in doc["device"]
    for row in doc["rows"]:  # every timing in it is a measured number or an explicit gap
        assert all(t is None or t > 0 for t in row["us"].values())
    rows = _timings.load_table(path)
    assert {r[1] for r in rows if r[0] == "bottleneck_adapter"} == {"fwd", "fwd+bwd"}
    monkeypatch.setattr(_timings, "TABLE", rows)
    order = _timings.preference("bottleneck_adapter")
    info = dict(dtype=torch.bfloat16, n=16384, d=768, r=64, requires_grad=False)
    assert order(info)[0] == "triton"
    assert order({**info, "requires_grad": True})[0] == "triton"
    assert order(dict(info, n=16, d=4096))[0] == "cuda"
    assert order(dict(info, n=8192, d=4096, r=256, requires_grad=True))[0] == "cuda"


@pytest.mark.parametrize("text", ["[]", '{"rows": 5}', '{"rows": [{"op": "x", "mode": "fwd", "us": [1]}, 3]}',
                                  "not json"])
def test_a_malformed_table_is_ignored_with_a_warning_naming_it(tmp_path, text):
    """A table of the wrong shape (as $PET_FAST_DISPATCH_TABLE may name) orders nothing: the design order, never a
    failure at import; a file that is no table says so, naming it."""
    path = tmp_path / "t.json"
    path.write_text(text)
    if text.startswith('{"rows": ['):
        assert _timings.load_table(path) == []  # (rows that are not rows are skipped)
    else:
        with pytest.warns(RuntimeWarning, match="ignoring the timings table .*t.json"):
            assert _timings.load_table(path) == []
    env = dict(os.environ, PET_FAST_DISPATCH_TABLE=str(path))
    out = subprocess.run([sys.executable, "-c", "import pet_fast"], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
