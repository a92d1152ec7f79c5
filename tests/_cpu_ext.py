"""Building a CPU-only module of csrc/ files for a test (the full extension pet_fast._C builds only where
CUDA is): the C++ that does not need a GPU is checked on the CPU through it."""
import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_cpu_module(tmp_path_factory):
    """Builds tests/csrc/cpu_module.cpp (which includes the csrc/ files that need no GPU: one translation unit,
    one compile) as the module ``pet_fast_cpu_test``, once per test run (skips the test without a C++ compiler
    or ninja)."""
    from torch.utils.cpp_extension import is_ninja_available, load

    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler")
    if not is_ninja_available():
        pytest.skip("ninja is not installed (pip install ninja): torch builds C++ extensions with it")
    # Under pytest-xdist every worker has its own base temp directory; their parent is the run's: the workers
    # share one build there (torch's build lock makes the others wait for the first, then they load it).
    base = tmp_path_factory.getbasetemp()
    build = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "pet_fast_cpu_test_build"
    build.mkdir(exist_ok=True)
    return load(name="pet_fast_cpu_test", build_directory=str(build), verbose=False,
                extra_include_paths=[str(ROOT / "csrc")], sources=[str(ROOT / "tests" / "csrc" / "cpu_module.cpp")])
