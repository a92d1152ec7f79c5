"""Build script: pure Python everywhere, plus the CUDA extension ``pet_fast._C`` where it can be built.

PET_FAST_BUILD_CUDA=1 forces the extension (and fails if it cannot be built), =0 skips it, and unset
builds it when torch has CUDA and nvcc is found. The Triton kernels in ``kernels/`` ship as
``pet_fast.kernels`` and the CUDA sources as package data, so a wheel built without the extension can
still compile it just in time (see pet_fast/_ext.py).
"""
import glob
import os

from setuptools import setup

PACKAGES = ["pet_fast", "pet_fast.ops", "pet_fast.methods", "pet_fast.kernels", "pet_fast.csrc", "pet_fast.data"]
PACKAGE_DIR = {"pet_fast.kernels": "kernels", "pet_fast.csrc": "csrc"}
PACKAGE_DATA = {"pet_fast.csrc": ["*.cu", "*.cpp", "*.h", "*.cuh"], "pet_fast.data": ["*.jsonl"],
                # measured dispatch tables, once a GPU session commits them
                "pet_fast.ops": ["*.json"]}


def _cuda_build_mode():
    flag = os.environ.get("PET_FAST_BUILD_CUDA", "").strip().lower()
    if flag in ("", "auto"):
        return "auto"
    if flag in ("1", "true", "yes", "on"):
        return "force"
    if flag in ("0", "false", "no", "off"):
        return "skip"
    raise SystemExit(f"PET_FAST_BUILD_CUDA must be 1, 0 or auto, got {flag!r}")


def _extension():
    """Return (ext_modules, cmdclass) for pet_fast._C, or explain why it is not built."""
    mode = _cuda_build_mode()
    if mode == "skip":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError as exc:
        reason = f"torch is not importable in the build environment ({exc}); use --no-build-isolation"
    else:
        if torch.version.cuda is None:
            reason = "torch is a CPU-only build"
        elif CUDA_HOME is None:
            reason = "nvcc / CUDA_HOME not found"
        else:
            here = os.path.dirname(os.path.abspath(__file__))
            sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "*.cu")))
            archs = os.environ.get("TORCH_CUDA_ARCH_LIST")
            nvcc_flags = ["-O3", "--use_fast_math", "-std=c++17", "-lineinfo"]
            if archs is None:  # machine code for A100/H100, and compute_90 PTX that newer GPUs (sm_100, sm_120) compile
                nvcc_flags += ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90a,code=sm_90a",
                               "-gencode=arch=compute_90,code=compute_90"]
            ext = CUDAExtension(
                name="pet_fast._C",
                sources=sources,
                include_dirs=[os.path.join(here, "csrc")],
                extra_compile_args={"cxx": ["-O3", "-std=c++17", "-DPET_FAST_CUDA"], "nvcc": nvcc_flags},
            )
            return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}
    if mode == "force":
        raise SystemExit(f"PET_FAST_BUILD_CUDA=1 but the CUDA extension cannot be built: {reason}")
    print(f"pet_fast: building without the CUDA extension ({reason}); it can be built just in time later")
    return [], {}


ext_modules, cmdclass = _extension()
setup(
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    package_data=PACKAGE_DATA,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
