"""benchmarks/compile_check.py drives a launcher with recorders in place of the kernels and compiles what it
captured for sm_90 (no GPU, no interpreter): here on the smallest module."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_compile_check_compiles_the_masked_weights_launches_for_sm90(tmp_path):
    triton = pytest.importorskip("triton")
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        pytest.skip("triton without its NVIDIA backend's ptxas")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PET_FAST_AUTOTUNE")}
    out_json = tmp_path / "compile.json"
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "compile_check.py"), "--only",
                          "masked_weights", "--dtypes", "bf16,fp32", "--json", str(out_json)],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    report = json.loads(out_json.read_text())
    results = report["results"]
    # aligned and odd weight lists in two dtypes: the ALIGNED=True and False specialisations of each
    assert {(r["kernel"], r["consts"]["ALIGNED"]) for r in results} == {("_grouped_kernel", True),
                                                                        ("_grouped_kernel", False)}
    assert len(results) == 4
    for r in results:
        assert r["status"] == "ok", r
        assert 0 <= r["shared"] <= report["limit"]
        assert r["sig"]["W_PTRS"].startswith("*")  # the table of addresses passed as a tensor
    assert {r["sig"]["OUT"] for r in results} == {"*bf16", "*fp32"}
    assert report["launcher_failures"] == [] and report["not_launched"] == []
