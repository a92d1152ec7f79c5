"""Where the time of one bottleneck_adapter forward+backward goes, per backend: GPU time per kernel
(torch.profiler) and host time per call, so that a slow backend shows whether its kernels or its
launches are slow.

    python benchmarks/profile_adapter.py --json out.json           # GPU, bf16, (N, d, r) = (16384, 768, 64)
    python benchmarks/profile_adapter.py --quick                   # CPU smoke run (eager, tiny)

Rows: one per (backend, kernel name) with the summed GPU microseconds per call, and one per backend
with the host microseconds of a whole call (launch-bound when close to or above the GPU total).
"""
from __future__ import annotations

import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402
from benchmarks.bench_bottleneck_adapter import adapter_inputs, run_adapter  # noqa: E402
from pet_fast.dispatch import BackendUnavailableError  # noqa: E402


def profile(backend, t, calls):
    leaves = [v for v in t.values() if v.requires_grad]
    dy = torch.randn_like(run_adapter(t, backend))

    def call():
        torch.autograd.grad(run_adapter(t, backend), leaves, dy)

    for _ in range(3):  # compile, autotune, warm the allocator
        call()
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(calls):
        call()
    host_us = (time.perf_counter() - t0) / calls * 1e6  # without a sync per call: launch rate when GPU-bound
    sync()
    wall_us = (time.perf_counter() - t0) / calls * 1e6
    acts = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(calls):
            call()
        sync()
    rows = []
    for ev in prof.key_averages():
        dev_us = getattr(ev, "device_time_total", 0.0) or getattr(ev, "cuda_time_total", 0.0)
        if torch.cuda.is_available() and ev.self_device_time_total <= 0:
            continue  # CPU-side op: its kernels are counted in their own rows
        if not torch.cuda.is_available() and ev.self_cpu_time_total <= 0:
            continue
        self_us = ev.self_device_time_total if torch.cuda.is_available() else ev.self_cpu_time_total
        rows.append({"backend": backend, "kernel": ev.key[:90], "us_per_call": round(self_us / calls, 2),
                     "launches_per_call": round(ev.count / calls, 2), "total_us_incl_children": round(dev_us / calls, 2)})
    rows.sort(key=lambda r: -r["us_per_call"])
    summary = {"backend": backend, "kernel": "(whole call)", "host_us_per_call": round(host_us, 2),
               "wall_us_per_call": round(wall_us, 2),
               "gpu_us_per_call": round(sum(r["us_per_call"] for r in rows), 2)}
    return [summary] + rows


def main():
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--shape", default="16384,768,64", help="N,d,r")
    args = p.parse_args()
    gpu = torch.cuda.is_available() and not args.quick
    device, dtype = ("cuda", torch.bfloat16) if gpu else ("cpu", torch.float32)
    n, d, r = (64, 32, 8) if args.quick else tuple(int(v) for v in args.shape.split(","))
    calls = 20 if gpu else 3
    rows = []
    for backend in ("eager", "triton", "cuda") if gpu else ("eager",):
        t = adapter_inputs(n, d, r, dtype, device, True)
        try:
            rows += profile(backend, t, calls)
        except BackendUnavailableError as exc:
            rows.append({"backend": backend, "kernel": "(skipped)", "note": str(exc)[:160]})
        common.write(args.json, rows, partial=True, shape=[n, d, r])
    common.print_table(rows, ["backend", "kernel", "us_per_call", "launches_per_call", "host_us_per_call",
                              "wall_us_per_call", "gpu_us_per_call", "note"])
    common.write(args.json, rows, shape=[n, d, r], dtype=str(dtype))


if __name__ == "__main__":
    main()
