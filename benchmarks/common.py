"""Shared by the op benchmarks: timing, environment facts, JSON output.

Each benchmark script ``benchmarks/bench_<op>.py`` takes ``--json PATH`` and writes
``{"env": environment(), "rows": [...]}``; rows give medians in microseconds and ratios to the
baselines measured in the same run.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import subprocess
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode


def cpu_test_module(build_name: str):
    """A CPU build (-O3, as the host timings need) of tests/csrc/cpu_module.cpp: the replay programs, the
    nodes built on them and the adapter's C++ autograd node, as the tests build them, in
    $TMPDIR/<build_name>."""
    from torch.utils.cpp_extension import load

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    build = os.path.join(os.environ.get("TMPDIR", "/tmp"), build_name)
    os.makedirs(build, exist_ok=True)
    return load(name="pet_fast_cpu_test_o3", build_directory=build, verbose=False, extra_cflags=["-O3"],
                extra_include_paths=[os.path.join(root, "csrc")],
                sources=[os.path.join(root, "tests", "csrc", "cpu_module.cpp")])


def environment() -> dict:
    env = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({os.cpu_count()} threads)",
    }
    from pet_fast.bench import package_versions

    env.update(package_versions())
    try:
        env["git"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                    cwd=os.path.dirname(__file__), timeout=10).stdout.strip() or None
    except Exception:
        env["git"] = None
    return env


def bench_us(fn, warmup: int = 5, rep: int = 50) -> float:
    """Median time of ``fn()`` in microseconds: triton.testing.do_bench on a GPU, wall clock on the CPU."""
    if torch.cuda.is_available():
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=100, return_mode="median")) * 1e3
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(rep):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2] * 1e6


def kernel_us(fn, calls: int = 10):
    """GPU time of ``fn()``'s kernels per call in microseconds (torch.profiler: every device event, none
    counted twice), or None without a GPU. Unlike :func:`bench_us`, which times the call on the GPU's clock
    and so includes the gaps a slow host leaves between kernels, this is the kernels' own time."""
    if not torch.cuda.is_available():
        return None
    fn()
    torch.cuda.synchronize()
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    return sum(e.self_device_time_total for e in _kernel_events(prof)) / calls


def _kernel_events(prof) -> list:
    """The profiler's device events (kernels, copies) with time of their own; CPU-side ops such as aten::mm
    or autograd nodes are left out: their device time is their kernels', which have their own events."""
    return [e for e in prof.key_averages()
            if e.device_type != torch.autograd.DeviceType.CPU and e.self_device_time_total > 0]


def profile_rows(call, calls: int, label: dict) -> list:
    """Where the time of ``call()`` goes: one summary row (host microseconds per call without a sync, wall
    microseconds with one, the kernels' GPU microseconds) and one row per kernel with its own GPU time per
    call (torch.profiler, :func:`_kernel_events`). On the CPU the per-op rows hold CPU time. ``label``'s keys
    start every row. Three warm-up calls first (compiles, autotuning, the allocator)."""
    for _ in range(3):
        call()
    gpu = torch.cuda.is_available()
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(calls):
        call()
    host_us = (time.perf_counter() - t0) / calls * 1e6  # without a sync per call: launch rate when GPU-bound
    sync()
    wall_us = (time.perf_counter() - t0) / calls * 1e6
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if gpu else [])
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(calls):
            call()
        sync()
    rows = []
    events = _kernel_events(prof) if gpu else [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    for ev in events:
        self_us = ev.self_device_time_total if gpu else ev.self_cpu_time_total
        dev_us = getattr(ev, "device_time_total", 0.0) or getattr(ev, "cuda_time_total", 0.0)
        rows.append({**label, "kernel": ev.key[:90], "us_per_call": round(self_us / calls, 2),
                     "launches_per_call": round(ev.count / calls, 2), "total_us_incl_children": round(dev_us / calls, 2)})
    rows.sort(key=lambda r: -r["us_per_call"])
    summary = {**label, "kernel": "(whole call)", "host_us_per_call": round(host_us, 2),
               "wall_us_per_call": round(wall_us, 2), "gpu_us_per_call": round(sum(r["us_per_call"] for r in rows), 2)}
    return [summary] + rows


def copy_rate_bytes_per_us(device, quick: bool, **reps) -> float:
    """Device copy rate for the byte floors: read + write bytes of a large copy per microsecond."""
    numel = (1 << 20) if quick else (1 << 29)  # 1 GiB of bf16 on a GPU
    src = torch.randn(numel, device=device, dtype=torch.float32).to(torch.bfloat16)
    dst = torch.empty_like(src)
    us = bench_us(lambda: dst.copy_(src), **reps)
    return 2 * src.numel() * src.element_size() / us


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--json", help="write the results here")
    p.add_argument("--quick", action="store_true", help="small shapes (CPU smoke run)")
    return p


def write(path, rows, **extra) -> None:
    doc = {"env": environment(), "rows": rows, **extra}
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(doc, f, indent=2)


def print_table(rows, columns) -> None:
    widths = [max(len(c), *(len(f"{r.get(c, '')}") for r in rows)) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for r in rows:
        print("  ".join(f"{r.get(c, '')}".ljust(w) for c, w in zip(columns, widths)))


# Partial results: a benchmark stopped at a time limit keeps the rows it measured.
_PARTIAL = {"path": None, "done": []}


def keep_partial(path) -> None:
    """Rewrite ``path`` (when given) with the rows so far on every :func:`checkpoint`."""
    _PARTIAL.update(path=path, done=[])


def checkpoint(rows, section_done: bool = False) -> None:
    if _PARTIAL["path"]:
        write(_PARTIAL["path"], _PARTIAL["done"] + list(rows), partial=True)
    if section_done:
        _PARTIAL["done"] = _PARTIAL["done"] + list(rows)


class AtenOps(TorchDispatchMode):
    """Counts the aten ops run while active, by name, in ``.ops`` (names in ``skip`` are not counted:
    e.g. views and allocations, which launch nothing). The host work of a step, in ops."""

    def __init__(self, skip=()):
        super().__init__()
        self.ops = collections.Counter()
        self.skip = frozenset(skip)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in self.skip:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))
