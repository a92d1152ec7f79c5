"""Loading the CUDA extension ``pet_fast._C``: prebuilt, built just in time, or absent with a reason.

Nothing here runs at ``import pet_fast``; :func:`load` is called by the dispatcher the first time a
CUDA tensor could use the ``cuda`` backend. The just-in-time build compiles the same sources as
``setup.py`` with ninja into a per-version cache folder, under a file lock so that two processes
starting at once build it once and both load it.
"""
from __future__ import annotations

import hashlib
import importlib
import os
import shutil
import threading
from pathlib import Path
from typing import Optional

_lock = threading.Lock()
_state: dict = {"loaded": False, "module": None, "reason": "not loaded yet"}


def source_dir() -> Optional[Path]:
    """The folder holding the .cu/.cpp sources: shipped in the wheel, or the repository's csrc/."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "csrc", here.parent / "csrc"):
        if candidate.is_dir() and any(candidate.glob("*.cpp")):
            return candidate
    return None


def cache_dir() -> Path:
    root = os.environ.get("PET_FAST_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "pet_fast"
    )
    return Path(root)


def _sources_digest(sources: list[Path]) -> str:
    h = hashlib.sha256()
    for path in sources:
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def _why_not_buildable() -> Optional[str]:
    """A reason the extension cannot be built just in time here, or None if it can be tried."""
    import torch

    if os.environ.get("PET_FAST_JIT", "1").strip().lower() in ("0", "false", "no", "off"):
        return "PET_FAST_JIT=0 disables the just-in-time build"
    if torch.version.cuda is None:
        return "torch is a CPU-only build"
    if not torch.cuda.is_available():
        return "no CUDA device is visible"
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is None or shutil.which("nvcc", path=os.path.join(CUDA_HOME, "bin")) is None:
        return "nvcc was not found (set CUDA_HOME)"
    if shutil.which("ninja") is None:
        return "ninja is not installed (pip install ninja)"
    if source_dir() is None:
        return "the CUDA sources (csrc/) are not shipped with this installation"
    return None


def _build_just_in_time():
    from filelock import FileLock
    from torch.utils.cpp_extension import load as cpp_load

    src = source_dir()
    sources = sorted(src.glob("*.cpp")) + sorted(src.glob("*.cu"))
    import torch

    major, minor = torch.cuda.get_device_capability()
    arch = f"{major}{minor}" + ("a" if major >= 9 else "")
    # one folder per GPU architecture too (a cache shared by A100 and H100 nodes rebuilt at every switch)
    tag = f"torch{torch.__version__}-cuda{torch.version.cuda}-sm{arch}-{_sources_digest(sources)}"
    build_dir = cache_dir() / tag
    build_dir.mkdir(parents=True, exist_ok=True)
    flags = ["-O3", "--use_fast_math", "-std=c++17", f"-gencode=arch=compute_{arch},code=sm_{arch}"]
    with FileLock(str(build_dir / "build.lock")):
        # torch's own lock file in the build folder outlives a build that was killed (Ctrl-C, a time limit),
        # and torch then waits for it forever. Holding our lock (an OS lock, released when its process
        # dies), no other build of ours is running: such a file is stale.
        stale = build_dir / "lock"
        if stale.exists():
            import warnings

            warnings.warn(f"pet_fast: removing a stale build lock left by an interrupted build ({stale})",
                          RuntimeWarning, stacklevel=2)
            stale.unlink(missing_ok=True)
        return cpp_load(
            name="pet_fast_C",
            sources=[str(s) for s in sources],
            extra_include_paths=[str(src)],
            extra_cflags=["-O3", "-std=c++17", "-DPET_FAST_CUDA"],
            extra_cuda_cflags=flags,
            build_directory=str(build_dir),
            verbose=os.environ.get("PET_FAST_VERBOSE_BUILD") == "1",
        )


def load():
    """Return the extension module, or None (then :func:`reason` says why). Tries once per process.

    Once tried, the answer is read without the lock, so that dispatch inside torch.compile traces it.
    Under torch.compile before any eager call has tried, the extension counts as absent for that
    graph (a build cannot run inside tracing)."""
    if _state["loaded"]:
        return _state["module"]
    if torch_compiling():
        _state["reason"] = "not loaded yet (the first call ran under torch.compile; call once eagerly to load it)"
        return None
    with _lock:
        if _state["loaded"]:
            return _state["module"]
        _state["loaded"] = True
        try:
            _state["module"] = importlib.import_module("pet_fast._C")
            _state["reason"] = "prebuilt pet_fast._C"
            return _state["module"]
        except ImportError as exc:
            prebuilt_error = str(exc)
        try:
            why = _why_not_buildable()
        except Exception as exc:  # a broken CUDA install must not break the CPU path
            why = f"checking the CUDA toolchain failed: {exc}"
        if why is not None:
            _state["reason"] = f"pet_fast._C is not built ({prebuilt_error}) and cannot be built here: {why}"
            return None
        try:
            _state["module"] = _build_just_in_time()
            _state["reason"] = "built just in time"
        except Exception as exc:
            _state["reason"] = f"the just-in-time build failed: {exc}"
        return _state["module"]


def torch_compiling() -> bool:
    import torch

    return torch.compiler.is_compiling()


def available() -> bool:
    return load() is not None


def reason() -> str:
    return _state["reason"]


def status(try_load: bool = True) -> tuple[bool, str]:
    """(available, reason). With try_load=False it never triggers a build."""
    if try_load:
        load()
    return _state["module"] is not None, _state["reason"]


def _reset_for_tests():
    from . import dispatch

    with _lock:
        _state.update(loaded=False, module=None, reason="not loaded yet")
    dispatch.clear_plans()  # plans remember which backends the extension's state allowed
