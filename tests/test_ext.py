import torch

from pet_fast import _ext


def test_absent_extension_is_explained_without_building(monkeypatch, tmp_path):
    monkeypatch.setenv("PET_FAST_CACHE", str(tmp_path))
    _ext._reset_for_tests()
    try:
        mod = _ext.load()
        ok, why = _ext.status(try_load=False)
        if torch.cuda.is_available() and mod is not None:
            assert ok
        else:
            assert mod is None and not ok
            assert "cannot be built here" in why or "build failed" in why
            assert not list(tmp_path.iterdir())  # nothing was built on a machine that cannot build
    finally:
        _ext._reset_for_tests()


def test_jit_can_be_disabled(monkeypatch):
    monkeypatch.setenv("PET_FAST_JIT", "0")
    assert _ext._why_not_buildable() == "PET_FAST_JIT=0 disables the just-in-time build"


def test_sources_are_found():
    src = _ext.source_dir()
    assert src is not None and (src / "bindings.cpp").is_file()


def test_import_does_not_load_the_extension():
    import subprocess
    import sys

    code = ("import sys, pet_fast; print('pet_fast._C' in sys.modules, "
            "any(m.startswith('pet_fast.kernels') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]  # neither the CUDA extension nor the Triton kernels load at import
