"""Determinism: with ``torch.use_deterministic_algorithms(True)`` every op, on every backend, either
gives the same bits on repeated runs (forward and backward) or refuses: the explicit backend raises
BackendUnavailableError whose reasons mention determinism (a kernel with float atomics, say), or
torch's own RuntimeError for a nondeterministic algorithm; ``auto`` then still runs, on a
deterministic backend.

The contract for kernel authors: a backend whose results can change from run to run (float atomics in
a backward, split-K reductions in arbitrary order) adds a reason mentioning "deterministic" when
``torch.are_deterministic_algorithms_enabled()``. A kernel file using float atomics that is in fact
deterministic says so with a module-level ``DETERMINISTIC = True``.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from pet_fast import dispatch

import _cases
from _cases import OPS

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def deterministic():
    before = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=warn_only)


def bits(b, backend):
    out, grads = _cases.run(b, backend, gy=None)
    return [out.detach().clone()] + [grads[k].clone() for k in sorted(grads)]


def check_same_bits_or_refusal(op, backend, device, dtype, p=None, repeats=3):
    b = _cases.build(op, p, dtype=dtype, device=device)
    args = b.views(_cases.fresh(b.leaves))
    impl = dispatch._REGISTRY[op].impls[backend]
    why = impl.reasons(b.describe(args))
    if why:
        if not any("determinis" in w for w in why):
            pytest.skip(f"{backend} cannot run {op} here: {why}")
        with pytest.raises(dispatch.BackendUnavailableError, match="determinis"):
            b.call(args, backend)
        chosen = dispatch.select(op, b.describe(args))
        assert chosen.backend != backend
        backend = "auto"  # auto must still run, deterministically
    try:
        first = bits(b, backend)
    except RuntimeError as exc:  # torch's standard refusal of a nondeterministic algorithm
        if "deterministic" not in str(exc):
            raise
        return "refused"
    for _ in range(repeats - 1):
        again = bits(b, backend)
        for x, y in zip(first, again):
            assert torch.equal(x, y), f"{op}[{backend}] differs between runs under deterministic mode"
    return "same bits"


@pytest.mark.parametrize("op,backend", [pytest.param(op, b, id=f"{op}-{b}") for op in OPS for b in _cases.runnable(op, "cpu")])
def test_same_bits_or_refusal_cpu(deterministic, op, backend):
    assert check_same_bits_or_refusal(op, backend, "cpu", torch.float32) in ("same bits", "refused")


def test_deterministic_mode_is_restored_after_each_test():
    assert not torch.are_deterministic_algorithms_enabled()


def _kernel_files(op, backend):
    if backend == "triton":
        names = [op, op.replace("stacked_", "")]
        return [ROOT / "kernels" / f"{n}.py" for n in names if (ROOT / "kernels" / f"{n}.py").exists()]
    if backend == "cuda":
        names = [op, op.replace("stacked_", "")]
        return [ROOT / "csrc" / f"{n}.cu" for n in names if (ROOT / "csrc" / f"{n}.cu").exists()]
    return []


FLOAT_ATOMICS = re.compile(r"tl\.atomic_(add|xchg|cas)|atomicAdd\s*\(")


@pytest.mark.parametrize("op", OPS)
def test_backends_with_atomics_declare_nondeterminism(deterministic, op):
    """A kernel source with atomics must make its backend refuse under deterministic mode, unless the
    kernel module declares ``DETERMINISTIC = True``. Checked on a CUDA-like call description, so it
    runs without a GPU."""
    for backend, impl in dispatch._REGISTRY[op].impls.items():
        for path in _kernel_files(op, backend):
            src = path.read_text()
            if not FLOAT_ATOMICS.search(src) or re.search(r"^DETERMINISTIC\s*=\s*True", src, re.M):
                continue
            info = _cases.sample_info(op, torch.device("cpu"), torch.float16)
            info["device"] = torch.device("cuda", 0)
            try:
                why = impl.reasons(info)
            except (AssertionError, RuntimeError) as exc:  # CUDA queries without a GPU
                pytest.skip(f"{backend} reasons need a GPU to evaluate: {exc}")
            assert any("determinis" in w for w in why), (
                f"{path.name} uses atomics but the {backend} backend of {op} does not refuse under "
                f"torch.use_deterministic_algorithms(True): {why}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", ["eager", "triton", "cuda", "auto"])
@pytest.mark.parametrize("op", OPS)
def test_same_bits_or_refusal_gpu(deterministic, op, backend, dtype):
    if backend == "auto":
        b = _cases.build(op, dtype=dtype, device="cuda")
        try:
            first = bits(b, None)
        except RuntimeError as exc:  # torch's standard refusal
            assert "deterministic" in str(exc)
            return
        assert all(torch.equal(x, y) for x, y in zip(first, bits(b, None)))
        return
    if backend not in dispatch._REGISTRY[op].impls:
        pytest.skip(f"{op} has no {backend} backend")
    # a bigger case than the default, so that split reductions and atomics would show
    p = dict(_cases.DEFAULTS[op])
    if "lead" in p:
        p["lead"] = [64, 129]
    else:
        p.update(B=2, L=200, S=300, D=64, P=16)
    assert check_same_bits_or_refusal(op, backend, "cuda", dtype, p) in ("same bits", "refused")
