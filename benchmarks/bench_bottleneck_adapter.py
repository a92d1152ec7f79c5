"""Benchmark of bottleneck_adapter, stacked_adapter_fusion and adapter_fusion: eager vs triton vs cuda.

Forward (under no_grad) and forward+backward (gradients of the input and of every adapter weight), at
the shapes of the issue, in bf16 on a GPU; for few tokens (N <= 64) also the forward replayed from a CUDA
graph, which shows the device time without the host's (launch-bound at that size); there the cuda
forward is timed twice, as dispatched (one launch on sm_90+) and as "cuda, two kernels" (that form switched
off). Each row gives the median time, the ratio to eager PyTorch
and the ratio to the byte floor: the bytes that must move divided by the device's copy rate, measured
in the same run with a large tensor copy.

    python benchmarks/bench_bottleneck_adapter.py --json out.json      # GPU
    python benchmarks/bench_bottleneck_adapter.py --quick              # CPU smoke run (eager, tiny)

On a GPU (without --quick) it also writes ``dispatch_table.json`` next to the JSON (or at ``--table``):
the measured order of backends that ``pet_fast/ops/_timings.py`` reads once it is committed as
``pet_fast/ops/dispatch_table.json`` (shipped in the package).
"""
from __future__ import annotations

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pet_fast  # noqa: E402
from pet_fast import _ext  # noqa: E402
from benchmarks import common  # noqa: E402
from pet_fast.dispatch import BackendUnavailableError  # noqa: E402

# the shapes, and (4096, 768, 64): an adapter of the BERT-base step at 32 x 128, so that the dispatch
# table (nearest measured shape) decides that step's calls from its own size
ADAPTER_SHAPES = [(16384, 768, 64), (8192, 4096, 64), (8192, 4096, 256), (16, 768, 64), (16, 4096, 64), (4096, 768, 64)]
FUSION = [(16384, 768, 64, k) for k in (2, 3, 8)]
QUICK_ADAPTER = [(64, 32, 8), (16, 32, 8)]
QUICK_FUSION = [(32, 16, 4, 2)]
REPS: dict = {}  # bench_us arguments; fewer repetitions for --quick


def adapter_inputs(n, d, r, dtype, device, grad):
    g = torch.Generator(device="cpu").manual_seed(0)
    mk = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to(device=device, dtype=dtype).requires_grad_(grad)
    return dict(x=mk(n, d), w_down=mk(r, d, scale=d ** -0.5), b_down=mk(r), w_up=mk(d, r, scale=r ** -0.5), b_up=mk(d))


def fusion_inputs(n, d, r, k, dtype, device, grad):
    g = torch.Generator(device="cpu").manual_seed(0)
    mk = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to(device=device, dtype=dtype).requires_grad_(grad)
    return dict(x=mk(n, d), query=mk(n, d), residual=mk(n, d), w_down=mk(k, r, d, scale=d ** -0.5), b_down=mk(k, r),
                w_up=mk(k, d, r, scale=r ** -0.5), b_up=mk(k, d), w_query=mk(d, d, scale=d ** -0.5), b_query=mk(d),
                w_key=mk(d, d, scale=d ** -0.5), b_key=mk(d), w_value=mk(d, d, scale=d ** -0.5))


def given_inputs(n, d, k, dtype, device, grad):
    g = torch.Generator(device="cpu").manual_seed(0)
    mk = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to(device=device, dtype=dtype).requires_grad_(grad)
    return dict(query=mk(n, d), values=mk(n, k, d), residual=mk(n, d), w_query=mk(d, d, scale=d ** -0.5),
                b_query=mk(d), w_key=mk(d, d, scale=d ** -0.5), b_key=mk(d), w_value=mk(d, d, scale=d ** -0.5))


def run_given(t, backend):
    rest = {a: b for a, b in t.items() if a not in ("query", "values", "residual")}
    return pet_fast.adapter_fusion(t["query"], t["values"], t["residual"], backend=backend, **rest)


CUDA_TWO_KERNELS = "cuda, two kernels"  # few tokens: the cuda forward with its one-launch (cluster) form off


def run_adapter(t, backend):
    if backend == CUDA_TWO_KERNELS:
        ext = _ext.load()
        was = ext.bottleneck_adapter_set_small_cluster(False)
        try:
            return run_adapter(t, "cuda")
        finally:
            ext.bottleneck_adapter_set_small_cluster(was)
    return pet_fast.bottleneck_adapter(t["x"], t["w_down"], t["b_down"], t["w_up"], t["b_up"], activation="gelu",
                                       scaling=0.5, backend=backend)


def run_fusion(t, backend):
    rest = {a: b for a, b in t.items() if a not in ("x", "query", "residual", "w_down", "b_down", "w_up", "b_up")}
    return pet_fast.stacked_adapter_fusion(t["x"], t["query"], t["residual"], t["w_down"], t["b_down"], t["w_up"],
                                           t["b_up"], activation="gelu", backend=backend, **rest)


GRAPH_MODE = "fwd, CUDA graph"  # few tokens (serving): the forward replayed from a CUDA graph, without host cost
GRAPH_MAX_N = 64


def _graph_us(run, t, backend):
    """Median microseconds of one forward replayed from a CUDA graph: the device time of the call alone
    (serving loops capture their decode step in a graph, e.g. torch.compile's mode="reduce-overhead")."""
    with torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up (autotuning, first launches) outside the capture
            for _ in range(3):
                run(t, backend)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            run(t, backend)
    return common.bench_us(graph.replay, **REPS)


def time_backend(run, t, backend, mode):
    """(median microseconds of a call, its kernels' own GPU microseconds, None), or (None, None, the reason)
    when the backend cannot take the call. The kernel time (GPU only, not for graph replays) leaves out the
    gaps a slow host leaves between the kernels, which the first number includes."""
    leaves = [v for v in t.values() if isinstance(v, torch.Tensor) and v.requires_grad]
    try:
        if mode == GRAPH_MODE:
            try:
                return _graph_us(run, t, backend), None, None
            except RuntimeError as exc:  # a call that cannot be captured is reported, not fatal
                return None, None, f"capture failed: {exc}"[:160]
        if mode == "fwd":
            with torch.no_grad():
                run(t, backend)
                return (common.bench_us(lambda: run(t, backend), **REPS),
                        common.kernel_us(lambda: run(t, backend)), None)
        out = run(t, backend)
        dy = torch.randn_like(out)

        def step():
            torch.autograd.grad(run(t, backend), leaves, dy, allow_unused=True)

        step()
        return common.bench_us(step, **REPS), common.kernel_us(step), None
    except BackendUnavailableError as exc:
        return None, None, str(exc).split(": ", 2)[-1][:160]


def main():
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--table", help="write the dispatch table here (GPU runs; default: beside --json)")
    p.add_argument("--table-from", metavar="JSON", help="only write the dispatch table (--table) from the rows of an "
                   "earlier GPU run's JSON, e.g. one stopped at its time limit")
    args = p.parse_args()
    if args.table_from:
        with open(args.table_from) as f:
            doc = json.load(f)
        write_table(doc["rows"], doc["env"], args.table or "dispatch_table.json")
        return
    if args.quick:
        REPS.update(warmup=2, rep=5)
    gpu = torch.cuda.is_available() and not args.quick
    device = "cuda" if gpu else "cpu"
    dtype = torch.bfloat16 if gpu else torch.float32
    backends = ("eager", "triton", "cuda") if gpu else ("eager",)
    rate = common.copy_rate_bytes_per_us(device, args.quick or not gpu, **REPS)
    e = torch.finfo(dtype).bits // 8
    rows = []
    cases = [("bottleneck_adapter", s) for s in (QUICK_ADAPTER if args.quick else ADAPTER_SHAPES)]
    cases += [("stacked_adapter_fusion", s) for s in (QUICK_FUSION if args.quick else FUSION)]
    cases += [("adapter_fusion", s) for s in (QUICK_FUSION if args.quick else FUSION)]
    for op, shape in cases:
        if op == "bottleneck_adapter":
            n, d, r = shape
            k = 1
            make, run = (lambda grad: adapter_inputs(n, d, r, dtype, device, grad)), run_adapter
            weights = 2 * r * d + r + d
            tensors_nd = {"fwd": 2, "fwd+bwd": 4}  # x, y (+ dy, dx)
        elif op == "adapter_fusion":
            n, d, r, k = shape
            make, run = (lambda grad: given_inputs(n, d, k, dtype, device, grad)), run_given
            weights = 3 * d * d + 2 * d
            tensors_nd = {"fwd": 3 + k, "fwd+bwd": 6 + 2 * k}  # query, residual, out, k values (+ gradients)
        else:
            n, d, r, k = shape
            make, run = (lambda grad: fusion_inputs(n, d, r, k, dtype, device, grad)), run_fusion
            weights = k * (2 * r * d + r + d) + 3 * d * d + 2 * d
            tensors_nd = {"fwd": 4, "fwd+bwd": 8}  # x, query, residual, out (+ their gradients)
        modes = ["fwd", "fwd+bwd"] + ([GRAPH_MODE] if (gpu and op == "bottleneck_adapter" and n <= GRAPH_MAX_N) else [])
        for mode in modes:
            t = make(mode == "fwd+bwd")
            w_bytes = weights * e * (2 if mode == "fwd+bwd" else 1)
            floor_bytes = tensors_nd["fwd+bwd" if mode == "fwd+bwd" else "fwd"] * n * d * e + w_bytes
            floor_us = floor_bytes / rate
            times, kernels, why = {}, {}, {}
            case_backends = backends
            if (gpu and op == "bottleneck_adapter" and n <= GRAPH_MAX_N and mode != "fwd+bwd" and _ext.available()
                    and hasattr(_ext.load(), "bottleneck_adapter_set_small_cluster")):
                case_backends = backends + (CUDA_TWO_KERNELS,)
            for b in case_backends:
                times[b], kernels[b], reason = time_backend(run, t, b, mode)
                if reason:
                    why[b] = reason
            base = times.get("eager")
            for b in case_backends:
                us = times[b]
                rows.append({
                    "op": op, "mode": mode, "backend": b, "dtype": str(dtype).replace("torch.", ""),
                    "n": n, "d": d, "r": r, "k": k, "us": None if us is None else round(us, 2),
                    "vs_eager": None if (us is None or not base) else round(base / us, 3),
                    "vs_floor": None if us is None else round(us / floor_us, 3),
                    "floor_us": round(floor_us, 2), "skipped": why.get(b),
                    "gpu_us": None if kernels[b] is None else round(kernels[b], 2),
                    "gpu_vs_floor": None if kernels[b] is None else round(kernels[b] / floor_us, 3)})
            del t
            common.write(args.json, rows, partial=True)  # a run stopped at a time limit keeps its rows
    common.print_table(rows, ["op", "mode", "backend", "n", "d", "r", "k", "us", "vs_eager", "vs_floor", "floor_us",
                              "gpu_us", "gpu_vs_floor"])
    common.write(args.json, rows, copy_rate_GBps=round(rate * 1e-3, 1), tuned=tuned_configs() if gpu else {},
                 note="vs_eager = eager time / this time (>1: faster); vs_floor = this time / byte-floor time; "
                      "gpu_us: the kernels' own GPU time per call (torch.profiler), gpu_vs_floor = that / byte floor")
    table_path = args.table or (os.path.join(os.path.dirname(os.path.abspath(args.json)), "dispatch_table.json")
                                if args.json else None)
    if gpu and table_path:
        write_table(rows, common.environment(), table_path)


def tuned_configs() -> dict:
    """The tile the autotuner chose per kernel and key (what to keep when trimming the configurations)."""
    from pet_fast.kernels import bottleneck_adapter as ka, stacked_adapter_fusion as kf

    out = {}
    for name, tuner in [("adapter_fwd", ka._fwd_tuned), ("adapter_bwd_rows", ka._bwd_rows_tuned)] + [
            (f"fusion_{n}", getattr(kf, n)) for n in dir(kf) if n.endswith("_tuned")]:
        for key, cfg in getattr(tuner, "cache", {}).items():
            out.setdefault(name, {})[str(key)] = str(cfg)
    return out


def write_table(rows, env, path) -> None:
    """The dispatch table (pet_fast/ops/_timings.py) of these measured rows: per case, each backend's time."""
    measured = {}
    for row in rows:
        if row["mode"] not in ("fwd", "fwd+bwd") or row["backend"] not in ("eager", "triton", "cuda"):
            continue  # dispatch decides eager calls; graph replays and forms within a backend are reported only
        key = (row["op"], row["mode"], row["dtype"], row["n"], row["d"], row["r"], row["k"])
        measured.setdefault(key, {})[row["backend"]] = row["us"]
    table = {"device": env["device"], "env": env,
             "rows": [dict(op=o, mode=m, dtype=dt, n=n, d=d, r=r, k=k, us=us)
                      for (o, m, dt, n, d, r, k), us in measured.items()]}
    with open(path, "w") as f:
        json.dump(table, f, indent=2)
        f.write("\n")
    print(f"dispatch table written to {path}")


if __name__ == "__main__":
    main()
