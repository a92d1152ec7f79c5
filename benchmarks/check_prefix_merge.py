"""One-minute GPU check of the merged prefix attention path (torch flash + Triton prefix merge).

For each shape: the merged path's output and gradients against the float64 reference (error beside the
error of the op's definition run in the same dtype, the precision rule of DESIGN.md §5), then the
forward and forward+backward medians of SDPA without a prefix (the limit), concatenation + SDPA, the
merged path and the flash-style Triton kernels, with ratios to the limit, all in the same run.

    python benchmarks/check_prefix_merge.py [--json PATH] [--dtype bf16|fp16]

``TRITON_INTERPRET=1 ... --quick``: the error check alone at a tiny fp16 shape on the CPU, a smoke run.
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.bench_prefix_attention import cat_sdpa, limit_sdpa, make_inputs, timed  # noqa: E402
from benchmarks.common import parser, print_table, write  # noqa: E402

from pet_fast.ops import prefix_attention as ops  # noqa: E402

SHAPES = [("B32 H12 L512 D64 P20", 32, 12, 512, 64, 20, False),
          ("causal B4 H32 L2048 D128 P64", 4, 32, 2048, 128, 64, True)]
CHECK = [("check B2 H4 L333 D64 P20", 2, 4, 333, 64, 20, False),
         ("check causal B2 H4 L257 D128 P64 per-batch", 2, 4, 257, 128, 64, True)]


def errors(B, H, L, D, P, causal, dtype, per_batch, device="cuda"):
    """{field: (error, error of the definition in dtype, largest reference value)}."""
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(device)
    pshape = (B, H, P, D) if per_batch else (H, P, D)
    tensors = [r(B, H, L, D), r(B, H, L, D), r(B, H, L, D), r(*pshape), r(*pshape)]
    gy = r(B, H, L, D)

    def run(fn, dt):
        leaves = [t.to(dt).requires_grad_() for t in tensors]
        out = fn(*leaves, causal=causal)
        return [out] + list(torch.autograd.grad(out, leaves, gy.to(dt)))

    ref = run(ops.reference, torch.float64)
    got = run(ops.merged, dtype)
    eager = run(ops.reference, dtype)
    names = ("out", "dq", "dk", "dv", "d_prefix_k", "d_prefix_v")
    return {n: ((a.double() - r_).abs().max().item(), (e.double() - r_).abs().max().item(), r_.abs().max().item())
            for n, a, e, r_ in zip(names, got, eager, ref)}


def main(argv=None):
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    args = p.parse_args(argv)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    device, check, shapes = "cuda", CHECK, SHAPES
    if args.quick:
        if os.environ.get("TRITON_INTERPRET") != "1":
            p.error("--quick runs the kernels on the CPU: set TRITON_INTERPRET=1 (read when triton is imported)")
        device, dtype, shapes = "cpu", torch.float16, []
        check = [("quick B2 H2 L19 D16 P5 per-batch", 2, 2, 19, 16, 5, True)]
    rows = []
    for name, B, H, L, D, P, causal in check:
        for field, (err, eager_err, top) in errors(B, H, L, D, P, causal, dtype, "per-batch" in name, device).items():
            rows.append(dict(shape=name, mode="error", impl=field, err=f"{err:.3g}", eager_err=f"{eager_err:.3g}",
                             ok=err <= 2 * eager_err + 2e-3 * max(1.0, top)))
    for name, B, H, L, D, P, causal in shapes:
        for grad in (False, True):
            mode = "fwd+bwd" if grad else "fwd"
            q, k, v, pk, pv, _ = make_inputs(B, H, H, L, L, D, P, dtype, "cuda", grad)
            cands = {
                "sdpa, no prefix (limit)": lambda q, k, v, pk, pv, m, c: limit_sdpa(q, k, v, c),
                "cat + sdpa": lambda q, k, v, pk, pv, m, c: cat_sdpa(q, k, v, pk, pv, m, c, False),
                "merged (cudnn or flash, as probed)": lambda q, k, v, pk, pv, m, c: ops.merged(q, k, v, pk, pv, causal=c),
                "own triton kernels": lambda q, k, v, pk, pv, m, c: ops.own_kernels(q, k, v, pk, pv, causal=c),
            }
            res = {impl: timed(fn, (q, k, v, pk, pv, None, causal), grad) for impl, fn in cands.items()}
            limit = res["sdpa, no prefix (limit)"]
            rows += [dict(shape=name, mode=mode, impl=i, us=round(us, 1), x_limit=round(us / limit, 3))
                     for i, us in res.items()]
    print_table(rows, ["shape", "mode", "impl", "us", "x_limit", "err", "eager_err", "ok"])
    write(args.json, rows, op="prefix_attention_merge", dtype=str(dtype))
    return 0 if all(r.get("ok", True) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
