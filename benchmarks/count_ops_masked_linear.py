"""Count what one MaskedLinear forward + backward dispatches, per backend, on the CPU: aten ops (each a
host-side dispatch, and on a GPU most of them a launch) and Triton launches. The step of a BERT-base
mask-tuning run is bound by host time (72 masked linears a step), so these counts are what the eager
and triton paths cost beyond the GEMMs.

    python benchmarks/count_ops_masked_linear.py

The Triton launchers are replaced by counters that run them outside the counting mode, so the
interpreter's own tensor copies (TRITON_INTERPRET=1 on the CPU) are not counted. Rows: no autocast with
fp32 x and weight; bf16 autocast with fp32 x and weight (a linear after a LayerNorm); bf16 autocast with
bf16 x and a float32 weight (a linear after a GEMM). Frozen weight and bias, trained scores, x requires grad.
"""
from __future__ import annotations

import argparse
import collections
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
from torch.utils._python_dispatch import _disable_current_modes  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import common  # noqa: E402
from pet_fast.methods.mask import MaskedLinear  # noqa: E402


def _count_launches(counter):
    from pet_fast.kernels import masked_linear as kern

    saved = {}
    for name in ("masked_weight", "mask_grads", "forward", "grad_input", "grad_weight", "pack"):
        real = getattr(kern, name)
        saved[name] = real

        def wrapped(*args, _real=real, _name=name, **kwargs):
            counter.ops[f"triton:{_name}"] += 1
            with _disable_current_modes():
                return _real(*args, **kwargs)

        setattr(kern, name, wrapped)
    return lambda: [setattr(kern, n, f) for n, f in saved.items()]


def count(backend: str, autocast: bool, x_dtype: torch.dtype) -> collections.Counter:
    """backend "plain": the nn.Linear that full fine-tuning trains (weight and bias), for comparison."""
    torch.manual_seed(0)
    layer = MaskedLinear(40, 24) if backend != "plain" else torch.nn.Linear(40, 24)
    if backend == "plain":
        layer.scores = layer.weight
        layer.forward = lambda t, backend=None, _f=layer.forward: _f(t.to(layer.weight.dtype) if not autocast else t)
    x = torch.randn(6, 40, dtype=x_dtype, requires_grad=True)
    dy = torch.randn(6, 24, dtype=torch.bfloat16 if (autocast or x_dtype != torch.float32) else torch.float32)

    def step():
        x.grad = None
        layer.scores.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = layer(x, backend=backend)
        y.backward(dy)

    step()  # warm-up (compiles the kernels under the interpreter)
    with common.AtenOps() as c:
        restore = _count_launches(c)
        try:
            step()
        finally:
            restore()
    return c.ops


def main():
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    cases = [("fp32, no autocast", False, torch.float32), ("bf16 autocast, fp32 x", True, torch.float32),
             ("bf16 autocast, bf16 x, fp32 weight", True, torch.bfloat16)]
    for backend in ("plain", "eager", "triton"):
        for label, autocast, x_dtype in cases:
            ops = count(backend, autocast, x_dtype)
            aten = sum(n for k, n in ops.items() if not k.startswith("triton:"))
            launches = sum(n for k, n in ops.items() if k.startswith("triton:"))
            detail = ", ".join(f"{k} {n}" for k, n in sorted(ops.items()))
            print(f"{backend:6s} | {label:36s} | aten {aten:2d} | triton {launches} | {detail}")


if __name__ == "__main__":
    main()
