"""Where the time of one bottleneck_adapter forward+backward goes, per backend: GPU time per kernel
(torch.profiler) and host time per call, so that a slow backend shows whether its kernels or its
launches are slow.

    python benchmarks/profile_adapter.py --json out.json           # GPU, bf16, (N, d, r) = (16384, 768, 64)
    python benchmarks/profile_adapter.py --shape 4096,768,64 --site houlsby   # BERT-base 32x128's Houlsby site
    python benchmarks/profile_adapter.py --quick                   # CPU smoke run (eager, tiny)

Rows: one per (backend, kernel name) with the summed GPU microseconds per call, and one per backend
with the host microseconds of a whole call (launch-bound when close to or above the GPU total).
"""
from __future__ import annotations

import contextlib
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402
from benchmarks.bench_bottleneck_adapter import adapter_inputs, run_adapter, tuned_configs  # noqa: E402
import pet_fast  # noqa: E402
from pet_fast.dispatch import BackendUnavailableError  # noqa: E402


def site_inputs(site, n, d, r, dtype, device):
    """The adapter's tensors as a training step hands them over. "plain": every tensor in ``dtype``, no
    residual. "houlsby": a BERT-style Houlsby site under autocast: x in ``dtype`` (the dense layer's output),
    a float32 residual stream, float32 weights, ``add_input`` (the op returns x + residual + adapter(x)).
    "pfeiffer": a BERT-style Pfeiffer site under autocast: x the float32 residual stream, read through the
    block's frozen LayerNorm inside the op (``layer_norm``), float32 weights (x + adapter(LN(x)))."""
    t = adapter_inputs(n, d, r, dtype if site == "plain" else torch.float32, device, True)
    g = torch.Generator(device="cpu").manual_seed(1)
    if site == "houlsby":
        t["x"] = t["x"].detach().to(dtype).requires_grad_()
        t["residual"] = torch.randn(n, d, generator=g).to(device).requires_grad_()
    elif site == "pfeiffer":
        t["ln_weight"] = (1 + 0.1 * torch.randn(d, generator=g)).to(device)  # frozen: no gradient
        t["ln_bias"] = (0.1 * torch.randn(d, generator=g)).to(device)
    return t


def run_site(t, backend, site, dtype):
    if site == "plain":
        return run_adapter(t, backend)
    ctx = torch.autocast(t["x"].device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
    if site == "houlsby":
        kw = dict(residual=t["residual"], add_input=True)
    else:
        kw = dict(layer_norm=(t["ln_weight"], t["ln_bias"], 1e-12))
    with ctx:
        return pet_fast.bottleneck_adapter(t["x"], t["w_down"], t["b_down"], t["w_up"], t["b_up"], activation="gelu",
                                           scaling=0.5, backend=backend, **kw)


def profile(backend, t, calls, site="plain", dtype=torch.bfloat16):
    leaves = [v for v in t.values() if v.requires_grad]
    dy = torch.randn_like(run_site(t, backend, site, dtype))

    def call():
        torch.autograd.grad(run_site(t, backend, site, dtype), leaves, dy)

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
        if torch.cuda.is_available() and (ev.device_type == torch.autograd.DeviceType.CPU
                                          or ev.self_device_time_total <= 0):
            # a CPU-side op (aten::mm, an autograd node): its own device time is that of the kernels it
            # launched, which have their own rows (counting both doubled the GPU total before 2026-11-27c)
            continue
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
    p.add_argument("--site", choices=("plain", "houlsby", "pfeiffer"), default="plain",
                   help="plain: every tensor in bf16, no residual; houlsby / pfeiffer: as a BERT Houlsby or Pfeiffer "
                        "site trains under autocast (float32 weights and residual stream; add_input / the frozen "
                        "LayerNorm inside the op)")
    args = p.parse_args()
    gpu = torch.cuda.is_available() and not args.quick
    device, dtype = ("cuda", torch.bfloat16) if gpu else ("cpu", torch.float32)
    n, d, r = (64, 32, 8) if args.quick else tuple(int(v) for v in args.shape.split(","))
    calls = 20 if gpu else 3
    rows = []
    for backend in ("eager", "triton", "cuda") if gpu else ("eager",):
        t = site_inputs(args.site, n, d, r, dtype, device)
        try:
            rows += profile(backend, t, calls, args.site, dtype)
        except BackendUnavailableError as exc:
            rows.append({"backend": backend, "kernel": "(skipped)", "note": str(exc)[:160]})
        common.write(args.json, rows, partial=True, shape=[n, d, r])
    common.print_table(rows, ["backend", "kernel", "us_per_call", "launches_per_call", "host_us_per_call",
                              "wall_us_per_call", "gpu_us_per_call", "note"])
    tuned = tuned_configs() if gpu else {}  # the tiles the autotuners chose, per kernel and key
    for kernel, chosen in tuned.items():
        for key, config in chosen.items():
            print("autotune", kernel, key, config)
    common.write(args.json, rows, shape=[n, d, r], dtype=str(dtype), site=args.site, tuned=tuned)


if __name__ == "__main__":
    main()
