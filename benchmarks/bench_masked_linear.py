"""masked_linear (mask-tuning): eager, triton and cuda against plain ``F.linear``, the limit.

Training shapes (N tokens, in, out): forward, and forward + backward with the straight-through
estimator (gradients to x and to the float32 scores; the weight frozen) against the full-fine-tuning
linear (forward, dx and dW). Serving shapes: forward from bit-packed masks (no scores) against
``F.linear`` on the unmasked weight, plus the multitask form (a batch mixing 4 tasks) on eager and cuda.
Mask-tuning's masked weights per step (``masked_weights``: BERT-base's 72 linears, float32 weights and
scores, written in the GEMMs' dtype): eager, the grouped Triton kernel, the per-weight Triton pass (one
launch per linear), against autocast's cast of the 72 float32 weights (what full fine-tuning's step does
instead) and the byte floor (10 bytes per weight at bf16); forward, and forward + backward (the scores'
straight-through gradients from the 72 weight gradients).

    python benchmarks/bench_masked_linear.py --json benchmarks/results/masked_linear.json
    python benchmarks/bench_masked_linear.py --quick        # CPU smoke run: tiny shapes, eager + plain
    python benchmarks/bench_masked_linear.py --dispatch-table pet_fast/ops/masked_linear_timings.json

``--dispatch-table`` writes auto's backend orders measured here (see pet_fast/ops/masked_linear.py,
``preference``): for packed-mask calls from the serving rows, for training calls (scores) from the
forward + backward of the training rows. The "triton" training row is the op's training path (masked
weight written by one Triton pass, cuBLAS GEMMs, one Triton pass for the score gradients); the rows
beside it time its two kernels alone and the in-register masking GEMMs (the previous training path).
"""
from __future__ import annotations

import importlib
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import common  # noqa: E402

import pet_fast  # noqa: E402
from pet_fast import dispatch  # noqa: E402

ml = importlib.import_module("pet_fast.ops.masked_linear")
mw = importlib.import_module("pet_fast.ops.masked_weights")
mp = importlib.import_module("pet_fast.ops.mask_packing")

TRAIN_SHAPES = [(16384, 768, 3072), (4096, 4096, 4096), (16384, 3072, 768)]
SERVE_SHAPES = [(1, 4096, 4096), (16, 4096, 4096), (64, 4096, 11008)]
QUICK_TRAIN = [(64, 48, 96)]
QUICK_SERVE = [(1, 64, 128), (16, 64, 128)]
TASKS = 4


def _available(info, backend, op=ml.OP):
    impl = dispatch._REGISTRY[op].impls.get(backend)
    if impl is None:
        return [f"no {backend} implementation"]
    if backend != "eager" and info["device"].type != "cuda":
        return ["kernels are benchmarked on CUDA only"]
    return impl.reasons(info)


def _time(fn, rep):
    return round(common.bench_us(fn, rep=rep), 2)


def _kernel_time(fn):
    """The kernels' own GPU time per call (None on the CPU): a training call whose host is slower than its
    kernels is timed by bench_us at its host's pace; this column shows the kernels alone."""
    us = common.kernel_us(fn)
    return None if us is None else round(us, 2)


def bench_training(shapes, device, dtype, backends, rep):
    rows = []
    for n, i, o in shapes:
        common.checkpoint(rows)  # the shapes measured so far
        x = torch.randn(n, i, device=device, dtype=dtype, requires_grad=True)
        w = (torch.randn(o, i, device=device) / i ** 0.5).to(dtype)
        s = torch.randn(o, i, device=device, requires_grad=True)
        b = torch.randn(o, device=device, dtype=dtype)
        dy = torch.randn(n, o, device=device, dtype=dtype)
        w_ft = w.clone().requires_grad_(True)
        with torch.no_grad():
            limit_fwd = _time(lambda: F.linear(x, w, b), rep)

        def full_ft():
            y = F.linear(x, w_ft, b)
            torch.autograd.grad(y, (x, w_ft), dy)

        limit_fb = _time(full_ft, rep)
        limit_gpu = _kernel_time(full_ft)
        base = {"n": n, "in": i, "out": o, "dtype": str(dtype).replace("torch.", "")}
        rows.append({**base, "case": "train", "backend": "plain F.linear", "fwd_us": limit_fwd, "fwd_bwd_us": limit_fb,
                     "fwd_vs_limit": 1.0, "fwd_bwd_vs_limit": 1.0, "fwd_bwd_gpu_us": limit_gpu,
                     "fwd_bwd_gpu_vs_limit": 1.0 if limit_gpu else None})
        eager = {}
        for backend in backends:
            with torch.no_grad():
                why = _available(ml.describe(x, w, s, b), backend)
            if why:
                rows.append({**base, "case": "train", "backend": backend, "skipped": "; ".join(why)})
                continue
            with torch.no_grad():
                fwd = _time(lambda: pet_fast.masked_linear(x, w, s, b, backend=backend), rep)

            def fwd_bwd():
                y = pet_fast.masked_linear(x, w, s, b, backend=backend)
                torch.autograd.grad(y, (x, s), dy)

            fb = _time(fwd_bwd, rep)
            gpu_fb = _kernel_time(fwd_bwd)
            if backend == "eager":
                eager = {"fwd": fwd, "fb": fb}
            rows.append({**base, "case": "train", "backend": backend, "fwd_us": fwd, "fwd_bwd_us": fb,
                         "fwd_vs_limit": round(fwd / limit_fwd, 3), "fwd_bwd_vs_limit": round(fb / limit_fb, 3),
                         "fwd_bwd_gpu_us": gpu_fb,
                         "fwd_bwd_gpu_vs_limit": round(gpu_fb / limit_gpu, 3) if (gpu_fb and limit_gpu) else None,
                         "fwd_vs_eager": round(fwd / eager["fwd"], 3) if eager else None,
                         "fwd_bwd_vs_eager": round(fb / eager["fb"], 3) if eager else None})
            if backend == "triton":
                rows += _triton_variants(base, x, w, s, b, dy, limit_fwd, limit_fb, rep)
    common.checkpoint(rows, section_done=True)
    return rows


@torch.no_grad()
def _triton_variants(base, x, w, s, b, dy, limit_fwd, limit_fb, rep):
    """Rows beside the op's triton training path (the "triton" row: the masked weight written by one
    Triton pass, cuBLAS GEMMs, one Triton pass for the score and weight gradients): its two elementwise
    kernels alone, and the in-register masking GEMMs of kernels/masked_linear.py, which were the
    training path before (pack the mask, then forward, dx and the weight-gradient GEMM reading bits),
    called directly without autograd; and those GEMMs masking from the scores or from pre-packed bits."""
    from pet_fast.kernels import masked_linear as kern

    packed = mp.pack_mask(s)
    g = dy.t() @ x
    rows = []

    def gemms_from_bits(backward):
        bits = kern.pack(s, 0.0)
        y = kern.forward(x, w, bits=bits, bias=b)
        if backward:
            kern.grad_input(dy, w, bits=bits)
            kern.grad_weight(dy, x, w, bits=bits, weight_grad=False, bias_grad=False, scores_dtype=s.dtype)
        return y

    fwd = _time(lambda: gemms_from_bits(False), rep)
    fb = _time(lambda: gemms_from_bits(True), rep)
    rows.append({**base, "case": "train", "backend": "triton in-register GEMMs from packed bits (kernels direct)",
                 "fwd_us": fwd, "fwd_bwd_us": fb, "fwd_vs_limit": round(fwd / limit_fwd, 3),
                 "fwd_bwd_vs_limit": round(fb / limit_fb, 3)})
    variants = {
        "triton masked_weight kernel alone (W_eff in x's dtype)": lambda: kern.masked_weight(w, s, 0.0, x.dtype),
        "triton mask_grads kernel alone (d_scores from G)": lambda: kern.mask_grads(g, w, s, 0.0, scores_dtype=s.dtype,
                                                                                  weight_grad=False),
        "triton GEMM kernel, mask from scores": lambda: kern.forward(x, w, scores=s, bias=b),
        "triton GEMM kernel, mask from pre-packed bits": lambda: kern.forward(x, w, bits=packed, bias=b),
        "triton pack kernel alone": lambda: kern.pack(s, 0.0),
    }
    for name, fn in variants.items():
        t = _time(fn, rep)
        rows.append({**base, "case": "train", "backend": name, "fwd_us": t, "fwd_vs_limit": round(t / limit_fwd, 3)})
    return rows


@torch.no_grad()
def bench_serving(shapes, device, dtype, backends, rep):
    rows = []
    for n, i, o in shapes:
        common.checkpoint(rows)  # the shapes measured so far
        x = torch.randn(n, i, device=device, dtype=dtype)
        w = (torch.randn(o, i, device=device) / i ** 0.5).to(dtype)
        b = torch.randn(o, device=device, dtype=dtype)
        packed = mp.pack_mask(torch.randn(o, i, device=device))
        stack = mp.pack_mask(torch.randn(TASKS, o, i, device=device))
        ids = torch.randint(0, TASKS, (n,), device=device)
        limit = _time(lambda: F.linear(x, w, b), rep)
        base = {"n": n, "in": i, "out": o, "dtype": str(dtype).replace("torch.", "")}
        rows.append({**base, "case": "serve", "backend": "plain F.linear", "fwd_us": limit, "fwd_vs_limit": 1.0})
        eager = None
        for backend in backends:
            why = _available(ml.describe(x, w, None, b, packed), backend)
            if why:
                rows.append({**base, "case": "serve", "backend": backend, "skipped": "; ".join(why)})
                continue
            t = _time(lambda: pet_fast.masked_linear(x, w, None, b, packed_mask=packed, backend=backend), rep)
            eager = t if backend == "eager" else eager
            rows.append({**base, "case": "serve", "backend": backend, "fwd_us": t, "fwd_vs_limit": round(t / limit, 3),
                         "fwd_vs_eager": round(t / eager, 3) if eager else None})
        eager_mt = None
        for backend in ("eager", "cuda"):
            if backend not in backends:
                continue
            impl = dispatch._REGISTRY[ml.OP_MULTITASK].impls[backend]
            why = impl.reasons(ml.describe_multitask(x, w, stack, ids, b))
            if why:
                rows.append({**base, "case": f"serve {TASKS} tasks", "backend": backend, "skipped": "; ".join(why)})
                continue
            t = _time(lambda: ml.masked_linear_multitask(x, w, stack, ids, b, validate_ids=False, backend=backend), rep)
            eager_mt = t if backend == "eager" else eager_mt
            rows.append({**base, "case": f"serve {TASKS} tasks", "backend": backend, "fwd_us": t,
                         "fwd_vs_limit": round(t / limit, 3), "fwd_vs_eager": round(t / eager_mt, 3) if eager_mt else None})
    common.checkpoint(rows, section_done=True)
    return rows


# BERT-base's linears, (out, in): per layer query, key, value, attention output, intermediate, output
BERT_BASE_LINEARS = ([(768, 768)] * 4 + [(3072, 768), (768, 3072)]) * 12
QUICK_LINEARS = [(48, 32), (32, 48), (96, 32)] * 2


def bench_masked_weights(shapes, device, dtype, rep, rate):
    """masked_weights over a model's linears against autocast's weight casts and the byte floor."""
    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(s, generator=g).to(device) for s in shapes]
    ss = [torch.randn(s, generator=g).to(device).requires_grad_() for s in shapes]
    n = sum(w.numel() for w in ws)
    e = torch.finfo(dtype).bits // 8
    # read weight and scores, write the masked weight; backward: read G and the weight, write d_scores
    floor_fwd = n * (4 + 4 + e) / rate if rate else None
    floor_fb = floor_fwd + n * (e + 4 + 4) / rate if rate else None
    vs = lambda t, f: round(t / f, 3) if f else None  # noqa: E731
    base = {"case": "masked_weights", "n": len(shapes), "in": n, "out": None}
    rows = [{**base, "backend": "autocast weight casts (full FT)", "fwd_us": _time(lambda: [w.to(dtype) for w in ws], rep),
             "byte_floor_us": floor_fwd and round(floor_fwd, 2)}]
    grads = [torch.randn(s, generator=g).to(device=device, dtype=dtype) for s in shapes]
    runs = {"eager": dict(backend="eager"), "triton": dict(backend="triton")}
    for name, kw in runs.items():
        why = "; ".join(_available(mw.describe(ws, ss, dtype), kw["backend"], mw.OP))
        if why:
            rows.append({**base, "backend": name, "skipped": why})
            continue
        fwd = lambda: pet_fast.masked_weights(ws, [s.detach() for s in ss], dtype=dtype, **kw)  # noqa: E731
        fb = lambda: torch.autograd.grad(pet_fast.masked_weights(ws, ss, dtype=dtype, **kw), ss, grads)  # noqa: E731
        t_f, t_fb = _time(fwd, rep), _time(fb, rep)
        rows.append({**base, "backend": name, "fwd_us": t_f, "fwd_bwd_us": t_fb, "byte_floor_us": floor_fwd and round(floor_fwd, 2),
                     "fwd_vs_floor": vs(t_f, floor_fwd), "fwd_bwd_vs_floor": vs(t_fb, floor_fb)})
    if device == "cuda":  # the per-linear path's pass: one launch per weight
        k = importlib.import_module("pet_fast.kernels.masked_linear")
        t = _time(lambda: [k.masked_weight(w, s.detach(), 0.0, dtype) for w, s in zip(ws, ss)], rep)
        rows.append({**base, "backend": "triton, one launch per weight", "fwd_us": t, "fwd_vs_floor": vs(t, floor_fwd)})
    return rows


def dispatch_table(rows):
    """Auto's orders, backends from fastest to slowest, one row per measured N: packed-mask calls by the
    serving forward times, calls with scores (training) by the forward + backward times (summed over the
    training shapes that share N; a backend counts only where it was measured at all of them)."""
    table = []
    for packed, case, key in ((True, "serve", "fwd_us"), (False, "train", "fwd_bwd_us")):
        for n in sorted({r["n"] for r in rows if r["case"] == case}):
            at_n = [r for r in rows if r["case"] == case and r["n"] == n]
            shapes = {(r["in"], r["out"]) for r in at_n}
            totals = {}
            for backend in dispatch.BACKENDS:
                times = [r[key] for r in at_n if r["backend"] == backend and r.get(key) is not None]
                if len(times) == len(shapes):
                    totals[backend] = sum(times)
            if totals:
                table.append({"packed": packed, "n_max": n, "order": sorted(totals, key=totals.get)})
    return {"rows": table}


def main(argv=None):
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--dispatch-table", help="write auto's backend orders (packed masks and training), measured here")
    args = p.parse_args(argv)
    gpu = torch.cuda.is_available() and not args.quick
    device = "cuda" if gpu else "cpu"
    dtype = torch.bfloat16 if gpu else torch.float32
    backends = ["eager", "triton", "cuda"]  # kernels report why they are skipped on the CPU
    rep = 50 if gpu else 5
    torch.manual_seed(0)
    common.keep_partial(args.json)
    rows = bench_training(TRAIN_SHAPES if not args.quick else QUICK_TRAIN, device, dtype, backends, rep)
    rows += bench_serving(SERVE_SHAPES if not args.quick else QUICK_SERVE, device, dtype, backends, rep)
    common.checkpoint(rows)
    rows += bench_masked_weights(QUICK_LINEARS if args.quick else BERT_BASE_LINEARS, device, dtype, rep,
                                 common.copy_rate_bytes_per_us(device, False) if gpu else None)  # no floor on the CPU
    common.print_table(rows, ["case", "n", "in", "out", "backend", "fwd_us", "fwd_vs_limit", "fwd_bwd_us",
                              "fwd_bwd_vs_limit", "fwd_bwd_gpu_us", "fwd_bwd_gpu_vs_limit", "fwd_vs_eager",
                              "fwd_vs_floor", "skipped"])
    common.write(args.json, rows, op="masked_linear",
                 note="limit: plain F.linear (train fwd+bwd: the full-fine-tuning linear, forward + dx + dW); "
                      "serving from packed bits, 1 bit per weight")
    if args.dispatch_table:
        with open(args.dispatch_table, "w") as f:
            json.dump({"device": common.environment()["device"], **dispatch_table(rows)}, f, indent=2)


if __name__ == "__main__":
    main()
