"""Short GPU check of the masked_linear serving kernel (csrc/masked_linear.cu): correctness against the
eager op and times at the serving shapes, in well under a minute once pet_fast._C is built.

    python benchmarks/check_masked_linear_serving.py [--json PATH]

For each (N, in, out) of the issue's serving shapes, bf16: plain F.linear on the unmasked weight (the
limit), the extension called directly (kernel time without the op's Python layer), the op with
backend="cuda", and the multitask form over 4 tasks; for N <= 16 also the extension with each of its two
single-mask kernels forced (tensor cores, `mma_us`; the fp32 kernel, `fp32_us`), on which the launcher's
choice between them rests (kMmaMinTokens in csrc/masked_linear_lane.cuh); ratios to the limit and the
bytes-moved floor (weight + bits + x + y at the copy rate measured in the same run). Exits 1 when an output differs from
the eager op by more than the precision rule of DESIGN.md §5 allows. Not among gpu_check.sh's default
benchmarks (bench_masked_linear.py is; BENCHES=masked_serving runs this one): a quick rerun after a
kernel change.
"""
import argparse
import importlib
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import common  # noqa: E402

import pet_fast  # noqa: E402
from pet_fast import _ext  # noqa: E402

ml = importlib.import_module("pet_fast.ops.masked_linear")
mp = importlib.import_module("pet_fast.ops.mask_packing")

SHAPES = [(1, 4096, 4096), (16, 4096, 4096), (64, 4096, 11008), (4, 4096, 4096), (1, 4096, 11008), (2, 4096, 4096),
          (8, 4096, 4096)]
TASKS = 4


def forced(ext, min_tokens, fn):
    """fn() with single masks of fewer than ``min_tokens`` tokens on the fp32 kernel (0: every call on tensor
    cores, 65: none)."""
    was = ext.masked_linear_set_mma_min_tokens(min_tokens)
    try:
        return fn()
    finally:
        ext.masked_linear_set_mma_min_tokens(was)


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


@torch.no_grad()
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU")
        return 2
    ext = _ext.load()
    if ext is None:
        print(f"pet_fast._C unavailable: {_ext.reason()}")
        return 2
    torch.manual_seed(0)
    big = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")
    copy_us = common.bench_us(lambda: big.clone())
    rate = 2 * big.numel() / (copy_us * 1e-6)  # bytes read + written per second
    rows, ok = [], True
    for n, i, o in SHAPES:
        x = torch.randn(n, i, device="cuda", dtype=torch.bfloat16)
        w = (torch.randn(o, i, device="cuda") / i ** 0.5).to(torch.bfloat16)
        b = torch.randn(o, device="cuda", dtype=torch.bfloat16)
        s = torch.randn(o, i, device="cuda")
        packed = mp.pack_mask(s)
        stack = mp.pack_mask(torch.randn(TASKS, o, i, device="cuda"))
        ids = torch.randint(0, TASKS, (n,), device="cuda", dtype=torch.int32)
        floor_us = (w.numel() * 2 + packed.numel() * 4 + x.numel() * 2 + n * o * 2) / rate * 1e6

        ref = F.linear(x.double(), (w * (s > 0)).double(), b.double())
        eager = pet_fast.masked_linear(x, w, None, b, packed_mask=packed, backend="eager")
        out = ext.masked_linear_packed(x, w, packed, b, None)
        err, err_eager = rel(out, ref), rel(eager, ref)
        good = err <= 2 * err_eager + 1e-3
        mt = ext.masked_linear_packed(x, w, stack, b, ids)
        mt_eager = ml.masked_linear_multitask(x, w, stack, ids.long(), b, backend="eager")
        mt_err = rel(mt, mt_eager)
        good = good and mt_err <= 2e-2
        forms = {}
        if n <= 16 and hasattr(ext, "masked_linear_set_mma_min_tokens"):
            for name, min_tokens in (("mma", 0), ("fp32", 65)):
                call = lambda: ext.masked_linear_packed(x, w, packed, b, None)
                err_form = rel(forced(ext, min_tokens, call), ref)
                good = good and err_form <= 2 * err_eager + 1e-3
                forms[f"{name}_us"] = round(forced(ext, min_tokens, lambda: common.bench_us(call)), 2)
                forms[f"{name}_rel_err"] = f"{err_form:.2e}"
        ok = ok and good

        limit = common.bench_us(lambda: F.linear(x, w, b))
        kern = common.bench_us(lambda: ext.masked_linear_packed(x, w, packed, b, None))
        op = common.bench_us(lambda: pet_fast.masked_linear(x, w, None, b, packed_mask=packed, backend="cuda"))
        multi = common.bench_us(lambda: ext.masked_linear_packed(x, w, stack, b, ids))
        row = {"n": n, "in": i, "out": o, "plain_us": round(limit, 2), "floor_us": round(floor_us, 2),
               "kernel_us": round(kern, 2), "op_cuda_us": round(op, 2), f"multitask_{TASKS}_us": round(multi, 2),
               "kernel_vs_plain": round(kern / limit, 3), "op_vs_plain": round(op / limit, 3),
               "kernel_vs_floor": round(kern / floor_us, 3), "rel_err": f"{err:.2e}",
               "eager_rel_err": f"{err_eager:.2e}", "multitask_vs_eager": f"{mt_err:.2e}", "ok": good, **forms}
        rows.append(row)
        print(row, flush=True)
    env = common.environment()
    print(f"device: {env.get('device')}; copy rate {rate / 1e9:.0f} GB/s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "rows": rows}, f, indent=2)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
