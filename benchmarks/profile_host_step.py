"""Host time of whole training steps on the CPU, every Triton launch replaced by a stub that costs nothing:
what pet_fast's own Python costs per step on the paths a GPU takes (the ``/triton`` rows), beside the
floor, full fine-tuning and the eager rows.

A BERT-base step at batch 32 x 128 is bound by the host on an H100: each adapter or masked linear adds its
host time to the step, 24 and 72 times. This script reproduces that regime on a machine without a GPU:
a BERT as deep as BERT-base (12 layers) but narrow (hidden 64, batch 2 x 16), so that every row is bound by
the host too, with the step benchmark's methods (pet_fast/bench.py). Under ``TRITON_INTERPRET=1`` the
triton backends accept CPU tensors; the stubs make their launches free, so a triton row measures the
Python around the kernels (argument checks, dispatch, autograd glue, allocations, launch set-up).

    python benchmarks/profile_host_step.py --json out.json
    python benchmarks/profile_host_step.py --rows floor 'houlsby/*' --steps 50

What it is not: the stubbed kernels leave their outputs uninitialised, so nothing computed is checked or
meaningful; the rows time forward + backward + zero_grad, without AdamW's step (on the CPU its foreach
kernels fall back to per-tensor loops, which a GPU does not do); and a GPU adds, per stubbed launch, the
Triton launcher's own host time (reported as ``stubbed_launches`` per step). CPU numbers only: a GPU
session measures the real steps with bench_step.py and profile_step.py.

Beside the times, which drift with the machine's load, each row gives exact counts of one step: the aten
ops that reach a kernel (``aten_ops``; on a GPU each non-view op is a launch or an allocation), and among
them the copies (clone, copy_), the dtype casts (_to_copy; with ``--autocast``, autocast's own among them) and
the zero fills (zeros, fill_, select/slice backward).
"""
from __future__ import annotations

import collections
import contextlib
import fnmatch
import importlib
import os
import pkgutil
import statistics
import sys
import time

os.environ["TRITON_INTERPRET"] = "1"  # before triton.jit reads it: the kernels take CPU tensors

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402
from pet_fast import bench  # noqa: E402

ROWS = ["full", "floor", "houlsby/eager", "houlsby/triton", "pfeiffer/eager", "pfeiffer/triton", "mask/eager",
        "mask/triton", "fusion3/eager", "fusion3/triton", "prefix20/eager", "prefix20/triton"]
# BERT-base's depth and heads' layout, at a width where the host bounds every op
SPEC = ("bert", 2, 16, False, "tiny")
DIMS = dict(hidden_size=64, num_hidden_layers=12, num_attention_heads=4, intermediate_size=128, vocab_size=1000)


class _Stub:
    """Stands for a Triton kernel (jit function or autotuner): ``kernel[grid](...)`` evaluates the grid,
    counts the launch and returns."""

    launches = 0

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            _Stub.launches += 1
            if callable(grid):  # the launcher's grid function still runs, with block sizes a config would give
                grid({**kwargs, **{k: 64 for k in ("BLOCK_N", "BLOCK_M", "BLOCK_K", "BLOCK_P", "BLOCK")}, "SPLIT_D": 1})
        return launch


_ORIGINALS: list = []  # (module, name, kernel) replaced by kernels_stubbed


@contextlib.contextmanager
def kernels_stubbed():
    """Every Triton kernel in pet_fast.kernels replaced by a stub inside the block."""
    import pet_fast.kernels as package

    # every module imported before any is stubbed: one importing another's helper must get the real one
    modules = [importlib.import_module(f"{package.__name__}.{info.name}")
               for info in pkgutil.iter_modules(package.__path__)]
    for module in modules:
        for name, value in list(vars(module).items()):
            if type(value).__name__ in ("JITFunction", "InterpretedFunction", "Autotuner", "Heuristics"):
                _ORIGINALS.append((module, name, value))
                setattr(module, name, _Stub())
    try:
        yield
    finally:
        while _ORIGINALS:
            module, name, value = _ORIGINALS.pop()
            setattr(module, name, value)


def build_model(spec, device):
    import transformers as tf

    cfg = tf.BertConfig(num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **DIMS)
    cfg._attn_implementation = "sdpa"
    return tf.BertForSequenceClassification(cfg).to(device).train()


def make_step(row: bench.Row, autocast_dtype=None):
    """One training step of ``row`` (the step benchmark's) without the optimizer's update (see the module docstring)."""
    return bench.make_step(row, SPEC, torch.device("cpu"), build=build_model, update=False,
                           autocast_dtype=autocast_dtype)[0]


def replay_module():
    """A CPU build of the Triton replay (csrc/triton_replay.cpp), as the tests build it (-O3 here)."""
    return common.cpu_test_module("pet_fast_replay_cpu_build")


def time_row(row: bench.Row, steps: int, replay=None, autocast_dtype=None) -> dict:
    step = make_step(row, autocast_dtype)  # (builds the model; no kernel runs before the timed steps' warm-up)
    if replay is not None and row.backend == "triton":
        # the GPU's replay path: a first step records the launchers (real kernels, interpreted), then every
        # recorded program launches through a counting no-op, the others through the stubs
        from pet_fast.kernels import _replay

        with _replay.through_interpreter(replay):
            step()
            for cache in _replay._CACHES:
                for entry in cache.values():
                    if isinstance(entry, _replay.Entry):
                        entry.program.set_launcher(_count_replayed)
            with kernels_stubbed():
                return _time_steps(row, step, steps)
    with kernels_stubbed():
        return _time_steps(row, step, steps)


def _count_replayed(i, slots):
    _Stub.launches += 1


class _CountOps(TorchDispatchMode):
    """Counts the aten ops that reach a backend kernel (after autograd; views and allocations included):
    on a GPU each non-view op is a launch or an allocation, each one host time. Exact, unlike the times."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def _time_steps(row, step, steps: int) -> dict:
    for _ in range(3):
        step()
    _Stub.launches = 0
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    launches = _Stub.launches / steps
    counter = _CountOps()
    with counter:
        step()
    ops = counter.ops
    return {"row": row.row, "ms": round(statistics.median(times) * 1e3, 3), "stubbed_launches": round(launches, 1),
            "aten_ops": sum(ops.values()), "copies": ops["clone"] + ops["copy_"], "casts": ops["_to_copy"],
            "fills": sum(ops[k] for k in ("zeros", "zero_", "fill_", "zeros_like", "select_backward", "slice_backward"))}


def main():
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--rows", nargs="+", default=ROWS, help="row names or glob patterns (default: %(default)s)")
    p.add_argument("--steps", type=int, default=30, help="timed steps per row (the median is reported)")
    p.add_argument("--repeats", type=int, default=2,
                   help="passes over all rows; each row reports its fastest pass (other work only adds time)")
    p.add_argument("--replay", action="store_true",
                   help="the triton rows as a GPU runs them with the launches replayed from C++ "
                        "(kernels/_replay.py): needs a C++ compiler and ninja")
    p.add_argument("--autocast", action="store_true",
                   help="the forward under bf16 autocast with float32 weights, as the GPU's step runs it: the casts "
                        "autocast and the methods make are counted (the CPU's autocast op lists are close to CUDA's, "
                        "not identical)")
    args = p.parse_args()
    torch.set_num_threads(1)
    # the GPU step's 4096 tokens fold AdapterFusion's query and key (methods/fusion.py); this batch's 32 tokens
    # at width 64 would not: ask for the step's path
    import pet_fast.methods.fusion as fusion_method

    fusion_method.FOLD_MIN_TOKENS_PER_WIDTH = 0.0
    torch.set_flush_denormal(True)  # garbage from stubbed kernels must not hit slow denormal arithmetic
    replay = replay_module() if args.replay else None
    extra = [r for r in args.rows if r not in ROWS and not any(c in r for c in "*?[")]  # e.g. side/eager
    names = [r for r in ROWS + extra if any(fnmatch.fnmatch(r, pat) for pat in args.rows)]
    rows = {}
    for _ in range(args.repeats):
        for name in names:
            kind, _, backend = name.partition("/")
            rec = time_row(bench.Row("bert-deep-narrow", name, kind, backend or None), args.steps, replay,
                           torch.bfloat16 if args.autocast else None)
            if name not in rows or rec["ms"] < rows[name]["ms"]:
                rows[name] = rec
            print(f"{name}: {rec['ms']} ms, {rec['stubbed_launches']} stubbed launches", flush=True)
    floor = rows.get("floor", {}).get("ms")
    full = rows.get("full", {}).get("ms")
    out = []
    for name in names:
        rec = dict(rows[name])
        rec["vs_floor"] = round(rec["ms"] / floor, 3) if floor else None
        rec["vs_full"] = round(rec["ms"] / full, 3) if full else None
        out.append(rec)
    print()
    common.print_table(out, ["row", "ms", "vs_floor", "vs_full", "stubbed_launches", "aten_ops", "copies", "casts", "fills"])
    common.write(args.json, out, model=dict(DIMS, batch=SPEC[1], seq=SPEC[2]), threads=1,
                 autocast="bf16" if args.autocast else None,
                 what="host time per step, Triton launches stubbed, no optimizer update (CPU)")


if __name__ == "__main__":
    main()
