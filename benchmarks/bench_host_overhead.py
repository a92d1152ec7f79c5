"""Host time per op call: what pet_fast's Python layers (argument checks, dispatch, autograd glue, kernel
launch) cost beside the plain PyTorch ops they replace, on shapes so small that the device is idle.

A BERT-base training step at batch 32 x 128 is bound by the host on an H100 (benchmarks/profile_step.py):
every microsecond an op spends in Python before its kernels start is added to the step, 24 times for
Houlsby adapters, 72 times for mask-tuning. This benchmark measures it per call and per backend.

    python benchmarks/bench_host_overhead.py --json out.json      # GPU: every backend that runs there
    python benchmarks/bench_host_overhead.py --quick              # CPU: eager, the path CPU users take
    python benchmarks/bench_host_overhead.py --quick --stub-kernels   # CPU: the kernel paths' Python, serving

``--stub-kernels`` (CPU only) times the triton and cuda rows without gradients (serving) with every kernel
replaced by a stub: the Triton kernels as in profile_host_step.py (run under ``TRITON_INTERPRET=1``, so
that they take CPU tensors), and the extension's serving entry points by functions that allocate their
output and launch nothing. What those rows measure is pet_fast's Python on the way to the kernels, the
part a GPU's host adds to a few-token call besides the launches themselves.

Rows: ``op``, ``mode`` (fwd: no gradient; fwd+bwd: forward, then torch.autograd.grad), ``impl`` (``torch``:
the op's eager PyTorch function called directly, without checks or dispatch, the baseline;
``op/<backend>``: pet_fast's functional op;
``module``: pet_fast's nn.Module under auto; ``module houlsby`` / ``module pfeiffer``: its calls at those
sites of a post-LN block, with ``add_input`` / ``layer_norm``), ``host_us`` (per call: calls issued back to back without a
synchronisation, then one; on a GPU the device keeps up at these sizes, so this is the host's rate) and
``vs_torch``. ``masked_linear (packed)`` serves from a packed mask, without gradients, beside ``F.linear``
on the unmasked weight (the serving target's yardstick).
"""
from __future__ import annotations

import contextlib
import os
import sys
import time

STUB = "--stub-kernels" in sys.argv
if STUB:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton.jit reads it: the (stubbed) kernels take CPU tensors

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # (profile_host_step, for --stub-kernels)

import pet_fast  # noqa: E402
from benchmarks import common  # noqa: E402
from pet_fast import _ext, dispatch  # noqa: E402
from pet_fast.dispatch import BackendUnavailableError  # noqa: E402
from pet_fast.ops import adapter_fusion as fusion_op  # noqa: E402
from pet_fast.ops import bottleneck_adapter as adapter_op  # noqa: E402
from pet_fast.ops import masked_linear as masked_op  # noqa: E402
from pet_fast.ops import prefix_attention as prefix_op  # noqa: E402
from pet_fast.kernels import _replay as replay  # noqa: E402


# Rows with this suffix run with the Triton launches from Python (kernels/_replay.py off): the others
# replay recorded launches from C++ where the extension is built.
PYTHON_LAUNCHES = " (python launches)"


def host_us(fn, calls: int, device, repeats: int = 3) -> float:
    for _ in range(5):
        fn()
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    sync()
    best = None
    for _ in range(repeats):  # the best run: the machine's other work only ever adds time
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        us = (time.perf_counter() - t0) / calls * 1e6
        best = us if best is None else min(best, us)
    return best


def cases(device, dtype):
    """(op, {impl: callable}, {impl or "": leaves}) per op, at tiny shapes: the leaves are the tensors whose
    gradients the fwd+bwd rows take ("" for every impl not named: a module's row takes its own parameters)."""
    g = torch.Generator().manual_seed(0)
    new = lambda *s, grad=False: torch.randn(*s, generator=g).to(device=device, dtype=dtype).requires_grad_(grad)
    n, d, r = 16, 64, 8

    x, res = new(n, d, grad=True), new(n, d)
    wd, bd, wu, bu = new(r, d, grad=True), new(r, grad=True), new(d, r, grad=True), new(d, grad=True)
    module = pet_fast.BottleneckAdapter(d, r, activation="silu").to(device=device, dtype=dtype)
    with torch.no_grad():  # the op rows' weights, so that every row computes the same gradients
        for name, t in zip(("w_down", "b_down", "w_up", "b_up"), (wd, bd, wu, bu)):
            getattr(module, name).copy_(t)
    lnw, lnb = torch.ones(d, device=device, dtype=dtype), torch.zeros(d, device=device, dtype=dtype)
    adapter = {
        "torch": lambda: adapter_op.reference(x, wd, bd, wu, bu, "silu", 1.0, res),
        "module": lambda: module(x, residual=res),
        # the calls of the Houlsby and Pfeiffer sites of a post-LN block
        "module houlsby": lambda: module(x, residual=res, add_input=True),
        "module pfeiffer": lambda: module(x, layer_norm=(lnw, lnb, 1e-5)),
    }
    for b in ("eager", "triton", "cuda"):
        adapter[f"op/{b}"] = (lambda b=b: pet_fast.bottleneck_adapter(x, wd, bd, wu, bu, activation="silu",
                                                                      residual=res, backend=b))
    adapter["op/triton" + PYTHON_LAUNCHES] = adapter["op/triton"]
    adapter["module houlsby" + PYTHON_LAUNCHES] = adapter["module houlsby"]
    own = [x] + list(module.parameters())
    yield "bottleneck_adapter", adapter, {"": [x, wd, bd, wu, bu], "module": own, "module houlsby": own,
                                          "module pfeiffer": own}

    w, bias = new(d, d), new(d)
    scores = torch.randn(d, d, generator=g).to(device).requires_grad_(True)  # float32 scores, as MaskedLinear's
    layer = pet_fast.MaskedLinear(d, d, dtype=dtype, device=device)
    with torch.no_grad():
        layer.weight.copy_(w)
        layer.bias.copy_(bias)
        layer.scores.copy_(scores)
    masked = {
        "torch": lambda: masked_op.reference(x, w, scores, bias),
        "module": lambda: layer(x),
    }
    for b in ("eager", "triton"):
        masked[f"op/{b}"] = (lambda b=b: pet_fast.masked_linear(x, w, scores, bias, backend=b))
    yield "masked_linear", masked, {"": [x, scores], "module": [x, layer.scores]}

    # serving a packed mask: one token, no gradient (its fwd+bwd rows are skipped)
    x1, packed = new(1, d), pet_fast.pack_mask(scores.detach(), 0.0)
    serving = {"torch": lambda: F.linear(x1, w, bias)}
    for b in ("eager", "triton", "cuda"):
        serving[f"op/{b}"] = (lambda b=b: pet_fast.masked_linear(x1, w, None, bias, packed_mask=packed, backend=b))
    # a batch mixing tasks (pet_fast.mixed_mask_tasks calls it so per linear), here one token of task 1 of 3
    stack, ids = torch.stack([packed] * 3), torch.ones(1, dtype=torch.int64, device=device)
    serving["op/cuda (3 tasks)"] = lambda: pet_fast.masked_linear_multitask(x1, w, stack, ids, bias, validate_ids=False,
                                                                            backend="cuda")
    yield SERVING_ONLY, serving, {"": [x1]}

    k = 3
    wd3, wu3 = new(k, r, d, grad=True), new(k, d, r, grad=True)
    wq, wk, wv = new(d, d, grad=True), new(d, d, grad=True), new(d, d, grad=True)
    fusion = {"torch": lambda: fusion_op.stacked_reference(x, x, res, wd3, None, wu3, None, w_query=wq, w_key=wk,
                                                           w_value=wv)}
    for b in ("eager", "triton"):
        fusion[f"op/{b}"] = (lambda b=b: pet_fast.stacked_adapter_fusion(x, x, res, wd3, None, wu3, None, w_query=wq,
                                                                         w_key=wk, w_value=wv, backend=b))
    fusion["op/triton" + PYTHON_LAUNCHES] = fusion["op/triton"]
    # the module as a model's fusion layer runs it: frozen adapters, BERT's dropout on the scores (FusionConfig's
    # default), its repeated calls through the guarded node on a GPU (ops/adapter_fusion.py ReplayedStackedCall)
    ads = [pet_fast.BottleneckAdapter(d, r, activation="relu").to(device=device, dtype=dtype).requires_grad_(False)
           for _ in range(k)]
    fus = pet_fast.AdapterFusion(d, dropout=0.1).to(device=device, dtype=dtype)
    fusion["module"] = lambda: fus.fuse(x, x, res, ads)
    yield "stacked_adapter_fusion", fusion, {"": [x, wd3, wu3, wq, wk, wv], "module": [x] + list(fus.parameters())}

    B, H, L, D, P = 2, 4, 16, 32, 4
    q, kk, v = new(B, H, L, D, grad=True), new(B, H, L, D, grad=True), new(B, H, L, D, grad=True)
    pk, pv = new(H, P, D, grad=True), new(H, P, D, grad=True)
    prefix = {"torch": lambda: prefix_op.sdpa(q, kk, v, pk, pv)}
    for b in ("eager", "triton"):
        prefix[f"op/{b}"] = (lambda b=b: pet_fast.prefix_attention(q, kk, v, pk, pv, backend=b))
    prefix["op/triton" + PYTHON_LAUNCHES] = prefix["op/triton"]
    yield "prefix_attention", prefix, {"": [q, kk, v, pk, pv]}


SERVING_ONLY = "masked_linear (packed)"


class _StubExtension:
    """Stands for pet_fast._C under --stub-kernels: the serving entry points allocate their output and launch
    nothing."""

    @staticmethod
    def bottleneck_adapter_forward_small(x, *args):
        return torch.empty_like(x)

    @staticmethod
    def masked_linear_packed(x, weight, packed, bias, task_ids):
        return x.new_empty((x.shape[0], weight.shape[0]))


@contextlib.contextmanager
def kernels_stubbed():
    """Every Triton kernel and the extension's serving entry points stubbed, CPU tensors taken by the cuda
    backend (see the module docstring)."""
    from profile_host_step import kernels_stubbed as triton_stubbed  # (it sets TRITON_INTERPRET too)

    state, reasons = dict(_ext._state), dispatch.cuda_reasons
    _ext._state.update(loaded=True, module=_StubExtension, reason="stubbed (bench_host_overhead --stub-kernels)")
    dispatch.cuda_reasons = lambda info, *args, **kwargs: []
    dispatch.clear_plans()
    try:
        with triton_stubbed():
            yield
    finally:
        _ext._state.update(state)
        dispatch.cuda_reasons = reasons
        dispatch.clear_plans()


def main():
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=None, help="calls per timing (default 300, 30 with --quick: the third H100 run, at 2000, spent its 60 s limit "
                        "before reaching the fusion and prefix rows)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per row; the fastest is reported (a noisy "
                   "shared machine needs more runs of fewer calls)")
    p.add_argument("--ops", nargs="+", default=None, help="only these ops' rows (names as printed)")
    p.add_argument("--stub-kernels", action="store_true",
                   help="CPU: time the triton and cuda rows without gradients, every kernel stubbed (see above)")
    args = p.parse_args()
    gpu = torch.cuda.is_available() and not args.quick and not args.stub_kernels
    device = torch.device("cuda" if gpu else "cpu")
    dtype = torch.bfloat16 if gpu else torch.float32
    calls = args.calls or (30 if args.quick else 300)  # --quick: a smoke run, not a measurement
    rows = []
    with kernels_stubbed() if args.stub_kernels else contextlib.nullcontext():
        for op, impls, leaves in cases(device, dtype):
            if args.ops and op not in args.ops:
                continue
            measure(op, impls, leaves, gpu, args.stub_kernels, calls, max(1, args.repeats), device, rows)
            # after each op: a run stopped at its time limit keeps the ops it measured
            common.write(args.json, rows, dtype=str(dtype).replace("torch.", ""), calls=calls,
                         stubbed_kernels=bool(args.stub_kernels), partial=True)
    common.write(args.json, rows, dtype=str(dtype).replace("torch.", ""), calls=calls,
                 stubbed_kernels=bool(args.stub_kernels))


def measure(op, impls, leaves, gpu, stubbed, calls, repeats, device, rows):
    """Times one op's rows (both modes) into ``rows``."""
    for mode in ("fwd",) if op == SERVING_ONLY else ("fwd", "fwd+bwd"):
        base = None
        for name, fn in impls.items():
            kernel = name.startswith("op/") and name != "op/eager"
            if kernel and not gpu and not (stubbed and mode == "fwd" and not name.endswith(PYTHON_LAUNCHES)):
                continue  # kernels run on the CPU only in the interpreter: not a host-time measurement
            if mode == "fwd":
                call = lambda fn=fn: fn()
                ctx = torch.no_grad
            else:
                wrt = [t for t in leaves.get(name.removesuffix(PYTHON_LAUNCHES), leaves[""]) if t.requires_grad]

                def call(fn=fn, wrt=wrt):
                    out = fn()
                    torch.autograd.grad(out, wrt, torch.ones_like(out))
                ctx = torch.enable_grad
            if name.endswith(PYTHON_LAUNCHES):
                def call(inner=call):
                    prev = replay.set_enabled(False)
                    try:
                        inner()
                    finally:
                        replay.set_enabled(prev)
            try:
                with ctx():
                    us = host_us(call, calls, device, repeats)
            except (BackendUnavailableError, RuntimeError) as exc:
                rows.append({"op": op, "mode": mode, "impl": name, "error": f"{type(exc).__name__}: {exc}"[:160]})
                continue
            base = us if name == "torch" else base
            rows.append({"op": op, "mode": mode, "impl": name, "host_us": round(us, 1),
                         "vs_torch": round(us / base, 2) if base else None})
            print(f"{op:24s} {mode:8s} {name:16s} {us:8.1f} us" + (f"  {us / base:5.2f}x torch" if base else ""),
                  flush=True)


if __name__ == "__main__":
    main()
