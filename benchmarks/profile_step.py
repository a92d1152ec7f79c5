"""Where one training step's time goes, per step-benchmark row: host time, GPU time, kernel launches, and
the kernels and host-side ops that cost the most (torch.profiler), so that a slow row shows whether the
GPU or the host bounds it, and which op to attack.

    python benchmarks/profile_step.py --json out.json                        # GPU: bert-32x128, key rows
    python benchmarks/profile_step.py --rows floor 'houlsby/*' --json o.json
    python benchmarks/profile_step.py --quick                                # CPU smoke run, tiny BERT

Per row: ``wall_ms`` (synchronised step), ``host_ms`` (the time the Python thread spends issuing one
step: the step is host-bound when this is close to wall_ms), ``gpu_ms`` (summed kernel time), ``launches``
(kernels per step), and the top kernels and top host ops with their share. Rows are the step benchmark's
(pet_fast/bench.py: same model, batch, autocast and AdamW).
"""
from __future__ import annotations

import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402
from pet_fast import bench  # noqa: E402

DEFAULT_ROWS = ["floor", "full", "houlsby/eager", "houlsby/triton", "houlsby/triton-py", "houlsby/cuda", "pfeiffer/triton", "pfeiffer/cuda", "mask/eager", "mask/triton",
                "prefix20/eager", "prefix20/triton", "fusion3/triton"]


def profile_row(row, spec, device, steps: int, top: int) -> dict:
    step = bench.make_step(row, spec, device)[0]
    for _ in range(3):
        step()
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    sync()
    walls, hosts = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        hosts.append(time.perf_counter() - t0)
        sync()
        walls.append(time.perf_counter() - t0)
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(steps):
            step()
        sync()
    events = prof.key_averages()
    gpu = device.type == "cuda"
    kernels = [(e.key, e.self_device_time_total, e.count) for e in events if gpu and e.self_device_time_total > 0
               and e.device_type == torch.autograd.DeviceType.CUDA]
    host_ops = [(e.key, e.self_cpu_time_total, e.count) for e in events if e.self_cpu_time_total > 0]
    gpu_us = sum(t for _, t, _ in kernels)
    host_us = sum(t for _, t, _ in host_ops)
    pick = lambda items, total: [{"name": k[:100], "us_per_step": round(t / steps, 1), "calls_per_step": round(c / steps, 1),
                                  "share": round(t / total, 3) if total else None}
                                 for k, t, c in sorted(items, key=lambda i: -i[1])[:top]]
    return {"model": row.model, "row": row.row,
            "wall_ms": round(sorted(walls)[len(walls) // 2] * 1e3, 3),
            "host_ms": round(sorted(hosts)[len(hosts) // 2] * 1e3, 3),
            "gpu_ms": round(gpu_us / steps / 1e3, 3) if gpu else None,
            "launches": round(sum(c for _, _, c in kernels) / steps, 1) if gpu else None,
            "host_ops_per_step": round(sum(c for _, _, c in host_ops) / steps, 1),
            "top_kernels": pick(kernels, gpu_us) if gpu else [],
            "top_host_ops": pick(host_ops, host_us)}


def main():
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="a step-benchmark model (default bert-32x128; --quick: bert-tiny-4x32)")
    p.add_argument("--rows", nargs="+", default=None, help="step rows (names or glob patterns)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--top", type=int, default=12)
    args = p.parse_args()
    gpu = torch.cuda.is_available() and not args.quick
    device = torch.device("cuda" if gpu else "cpu")
    table = bench.MODELS if gpu else bench.QUICK_MODELS
    model = args.model or ("bert-32x128" if gpu else "bert-tiny-4x32")
    if model not in table:
        raise SystemExit(f"--model must be one of {sorted(table)}, got {model!r}")
    wanted = args.rows or (DEFAULT_ROWS if gpu else ["floor", "houlsby/eager"])
    todo = [r for r in bench.plan([model], compile_rows=False, auto_rows=True, kernel_rows=gpu)
            if any(bench._matches(r, pat) for pat in wanted)]
    steps = args.steps or (5 if gpu else 2)
    rows = []
    for row in todo:
        try:
            rec = profile_row(row, table[model], device, steps, args.top)
        except Exception as exc:  # report the row and go on
            rec = {"model": model, "row": row.row, "error": f"{type(exc).__name__}: {exc}"[:300]}
        rows.append(rec)
        print(f"{row.row}: " + (rec.get("error") or f"wall {rec['wall_ms']} ms, host {rec['host_ms']} ms, gpu {rec['gpu_ms']} ms, "
                                f"{rec['launches']} launches"), flush=True)
        common.write(args.json, rows, partial=True, model=model)
        bench._cleanup(False)
    common.write(args.json, rows, model=model, device=str(device))


if __name__ == "__main__":
    main()
