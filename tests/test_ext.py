import os

import pytest
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


@pytest.mark.parametrize("value", ["0", "off", "OFF", " False "])
def test_jit_can_be_disabled(monkeypatch, value):
    monkeypatch.setenv("PET_FAST_JIT", value)
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


def test_a_stale_torch_build_lock_is_removed_before_building(monkeypatch, tmp_path):
    """A just-in-time build killed half-way leaves torch's lock file in the build folder, and torch's next
    build waits for it forever: holding our own (OS) lock, the build removes it first, and says so."""
    import torch
    import torch.utils.cpp_extension as cpp

    monkeypatch.setenv("PET_FAST_CACHE", str(tmp_path))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    seen = {}

    def fake_load(name, sources, build_directory, **kw):
        seen["lock"] = os.path.exists(os.path.join(build_directory, "lock"))
        seen["flags"] = kw["extra_cuda_cflags"]
        return "module"

    monkeypatch.setattr(cpp, "load", fake_load)
    src = _ext.source_dir()
    sources = sorted(src.glob("*.cpp")) + sorted(src.glob("*.cu"))
    tag = f"torch{torch.__version__}-cuda{torch.version.cuda}-sm90a-{_ext._sources_digest(sources)}"
    (tmp_path / tag).mkdir(parents=True)
    (tmp_path / tag / "lock").write_text("")
    with pytest.warns(RuntimeWarning, match="stale build lock"):
        assert _ext._build_just_in_time() == "module"
    assert seen["lock"] is False and "-gencode=arch=compute_90a,code=sm_90a" in seen["flags"]


def test_each_gpu_architecture_builds_in_its_own_folder(monkeypatch, tmp_path):
    """The build folder's name held no architecture: a cache shared by nodes with other GPUs rebuilt at every
    switch (and a build for one served the other until ninja noticed the flags)."""
    import torch
    import torch.utils.cpp_extension as cpp

    monkeypatch.setenv("PET_FAST_CACHE", str(tmp_path))
    folders = []
    monkeypatch.setattr(cpp, "load", lambda name, sources, build_directory, **kw: folders.append(build_directory))
    for cap in ((8, 0), (9, 0), (8, 0)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, cap=cap: cap)
        _ext._build_just_in_time()
    assert folders[0] == folders[2] != folders[1] and "-sm80-" in folders[0] and "-sm90a-" in folders[1]
