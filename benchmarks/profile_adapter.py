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

    return common.profile_rows(call, calls, {"backend": backend})


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
