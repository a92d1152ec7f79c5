"""Recording a launcher's Triton launches once and replaying them from C++ (csrc/triton_replay.cpp).

A launcher (e.g. ``bottleneck_adapter.backward``) turns its arguments into buffers and kernel launches by
host logic that depends only on their shapes, dtypes, devices, contiguity and flags (the *key*); only the
tensors' addresses differ between calls with the same key. On a GPU each Triton launch from Python costs the JIT's
argument binding, its cache lookup and the launcher's Python, several launches per adapter site and
step, while the step is bound by the host. So :func:`call` runs the launcher in Python the first time a
key is seen, with a recording active: :func:`empty` notes each allocation and :func:`launch` each
launch (the compiled kernel, its final grid, every parameter as an input, allocation or constant). The
recording becomes a ``TritonProgram`` of the extension, which later calls with that key run in one C++
call: allocate, launch with ``cuLaunchKernel``, return the outputs. Launchers call :func:`empty` and
:func:`launch` instead of ``torch.empty`` and ``kernel[grid](...)``; without a recording these are
exactly those calls.

What cannot be recorded makes the key run in Python from then on: a branch that computes with torch
ops (the launcher calls :func:`unrecordable`), a tensor parameter that is neither an input, an
allocation, a view of one, nor an empty carrier, inputs that overlap in memory, a parameter type other
than pointers, integers and floats, a launch needing clusters or scratch memory. A call that passes one
tensor as two inputs runs in Python unrecorded (the key would not tell later calls apart): a later call
of its key with separate tensors records it. Replay also declines a
call (Python runs it, the same kernels) when an input's address is not 16-byte aligned where the
recorded one was, since Triton may have compiled the kernel for aligned addresses.

``PET_FAST_TRITON_REPLAY=0`` turns replay off (every launch from Python).
"""
from __future__ import annotations

import contextlib
import functools
import os
import re
import threading
from typing import Any, Callable, Optional

import torch

from ..dispatch import graph_task as _graph_task
from ._host import FP_FUSION

KINDS = {"ptr": 0, "ptr_aligned": 1, "i32": 2, "i64": 3, "u32": 4, "u64": 5, "fp32": 6, "fp64": 7, "null": 8}
ENV_VAR = "PET_FAST_TRITON_REPLAY"
_ENABLED = os.environ.get(ENV_VAR, "1") != "0"
_local = threading.local()
_REFUSED = object()  # a key whose calls run in Python
MAX_PROGRAMS = 1024  # keys kept per launcher
SCRATCH_POINTERS = 2  # Triton appends global and profile scratch pointers to every kernel's parameters
MAX_PLAIN_SHARED = 228 * 1024  # bytes of shared memory a launch takes without an extra launch attribute


class Unrecordable(Exception):
    """Why a recording cannot become a program."""


def empty(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """``torch.empty``; noted as an allocation of the active recording."""
    t = torch.empty(shape, dtype=dtype, device=device)
    rec = getattr(_local, "rec", None)
    if rec is not None:
        rec.allocs.append(t)
    return t


def launch(kernel, grid, *args, **kwargs):
    """``kernel[grid](*args, **kwargs)`` (with FMA contraction, _host.FP_FUSION); noted as a launch of the
    active recording."""
    kwargs = {**FP_FUSION, **kwargs}
    rec = getattr(_local, "rec", None)
    if rec is None:
        return kernel[grid](*args, **kwargs)
    if callable(grid):  # the autotuner calls it per benchmarked config; the last call is the launch
        seen = []

        def grid_fn(meta):
            seen.append(tuple(grid(meta)))
            return seen[-1]

        compiled = kernel[grid_fn](*args, **kwargs)
        final = seen[-1] if seen else None
    else:
        compiled = kernel[grid](*args, **kwargs)
        final = tuple(grid)
    rec.add(kernel, final, compiled, args, kwargs)
    return compiled


def unrecordable(why: str) -> None:
    """Called by a launcher on a branch that computes with torch ops: the active recording is dropped."""
    rec = getattr(_local, "rec", None)
    if rec is not None:
        rec.refusal = rec.refusal or why


@functools.cache
def _as_jit(fn):
    from triton.runtime.jit import JITFunction

    return JITFunction(fn)


def _interpreted(kernel) -> bool:
    """Whether ``kernel`` (under autotuner / heuristics wrappers) runs in Triton's interpreter."""
    fn = kernel
    while type(fn).__name__ != "InterpretedFunction" and hasattr(fn, "fn"):
        fn = fn.fn
    return type(fn).__name__ == "InterpretedFunction"


def _jit_function(kernel):
    """The JITFunction under autotuner / heuristics wrappers (under the interpreter, one made from the
    kernel's Python function: it describes the same parameters)."""
    fn = kernel
    while not hasattr(fn, "params") and hasattr(fn, "fn"):
        if type(fn).__name__ == "InterpretedFunction":
            return _as_jit(fn.fn)
        fn = fn.fn
    return fn


def binder_types(jit, values: dict) -> dict:
    """Each parameter's type as Triton's binder gives it (``'constexpr'`` for constexprs and for
    integers equal to 1, which Triton specialises away): used when no compiled kernel is at hand (the
    interpreter), and checked against the compiled kernel's own signature on a GPU."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    out = {}
    for p in jit.params:
        name = p.name
        if p.is_constexpr:
            out[name] = "constexpr"
            continue
        v = values[name]
        if isinstance(v, bool):
            out[name] = "u1"
        else:
            out[name] = native_specialize_impl(BaseBackend, v, p.is_const, not p.do_not_specialize,
                                               not p.do_not_specialize_on_alignment)[0]
    return out


_ENTRY_PARAM = re.compile(r"\.param\b")


def ptx_param_count(ptx: str) -> int:
    """How many parameters the PTX entry point takes (Triton appends scratch pointers to the kernel's own)."""
    start = ptx.index(".entry")
    head = ptx[start:ptx.index(")", start)]
    return len(_ENTRY_PARAM.findall(head))


class Recording:
    def __init__(self, inputs):
        self.inputs = list(inputs)
        self.allocs: list = []
        self.launches: list = []
        self.constants: list = []
        # per launch: (kernel, grid, arguments with tensors as slots, constexprs, the parameters passed), for
        # execute() and launch_from_slots() (tests)
        self.symbolic: list = []
        self.refusal: Optional[str] = None

    def add(self, kernel, grid, compiled, args, kwargs) -> None:
        try:
            self.launches.append(self._launch(kernel, grid, compiled, args, kwargs))
        except Unrecordable as exc:
            self.refusal = self.refusal or str(exc)
        except Exception as exc:  # e.g. another Triton version's internals: the launch ran, just not recorded
            self.refusal = self.refusal or f"recording failed: {type(exc).__name__}: {exc}"

    def _slot(self, t: torch.Tensor) -> tuple:
        for i, inp in enumerate(self.inputs):
            if inp is t:
                return i, 0
        p = t.data_ptr()
        n_in = len(self.inputs)
        for i, s in enumerate(self.inputs + self.allocs):
            if s is None:
                continue
            base = s.data_ptr()
            if s.numel() and base <= p < base + s.numel() * s.element_size():
                return (i if i < n_in else i - n_in + 1_000_000), p - base  # allocations: renumber()
        if t.numel() == 0:  # a carrier: its address only tells a kernel a dtype
            self.constants.append(t)
            return 2_000_000 + len(self.constants) - 1, 0
        raise Unrecordable("a kernel reads a tensor that is not an input of the launcher")

    def _launch(self, kernel, grid, compiled, args, kwargs) -> tuple:
        jit = _jit_function(kernel)
        names = [p.name for p in jit.params]
        values = dict(zip(names, args))
        values.update({k: v for k, v in kwargs.items() if k in names})
        missing = [p.name for p in jit.params if not p.is_constexpr and p.name not in values]
        if missing:
            raise Unrecordable(f"parameters {missing} take their defaults")
        types = binder_types(jit, values)
        if compiled is not None:  # a GPU: the compiled kernel's own signature and launch facts
            sig = dict(compiled.src.signature)
            if any(types[n] != sig.get(n) for n in names if sig.get(n) == "constexpr" or types[n] == "constexpr"):
                raise Unrecordable("the binder's constexprs differ from the compiled kernel's")
            types = {n: sig.get(n) for n in names}
            md = compiled.metadata
            if getattr(md, "num_ctas", 1) != 1 or getattr(md, "launch_cooperative_grid", False) or \
                    getattr(md, "launch_pdl", False):
                raise Unrecordable("the kernel launches clusters, a cooperative grid or with PDL")
            if md.shared > MAX_PLAIN_SHARED:  # newer Tritons launch those with an extra attribute
                raise Unrecordable(f"the kernel takes {md.shared} bytes of shared memory")
            if getattr(md, "global_scratch_size", 0) or getattr(md, "profile_scratch_size", 0):
                raise Unrecordable("the kernel needs scratch memory")
            if compiled.function is None:
                raise Unrecordable("the compiled kernel is not loaded")
            function, threads, shared = int(compiled.function), 32 * md.num_warps, md.shared
        elif not _interpreted(kernel):  # e.g. a jit_cache_hook that vetoed the compilation
            raise Unrecordable("the launch returned no compiled kernel")
        else:  # the interpreter (tests): the binder's types, no function
            function, threads, shared = 0, 0, 0
        params, named = [], {}
        for n in names:
            ty = types[n]
            if ty == "constexpr":
                if n in values:
                    named[n] = values[n]
                continue
            v = named[n] = values[n]
            if isinstance(ty, str) and ty.startswith("*"):
                if not isinstance(v, torch.Tensor):
                    raise Unrecordable(f"pointer parameter {n} is not a tensor")
                slot, offset = self._slot(v)
                named[n] = ("slot", slot, offset)
                kind = KINDS["ptr_aligned"] if v.data_ptr() % 16 == 0 else KINDS["ptr"]
                params.append((kind, slot, offset, 0.0))
            elif ty in ("i32", "i64", "u32", "u64") and isinstance(v, int) and not isinstance(v, bool):
                params.append((KINDS[ty], -1, int(v), 0.0))
            elif ty in ("fp32", "fp64") and isinstance(v, (int, float)) and not isinstance(v, bool):
                params.append((KINDS[ty], -1, 0, float(v)))
            else:
                raise Unrecordable(f"parameter {n} of type {ty!r} cannot be replayed")
        if compiled is not None:
            # Triton (3.6 to 3.9) passes exactly two trailing pointers, global and profile scratch; none is
            # needed here (checked above). Anything else in the entry (instrumentation, say) is refused.
            ptx = compiled.asm.get("ptx")  # absent when Triton keeps binaries only: the count alone then
            if ptx is not None and ptx_param_count(ptx) != len(params) + SCRATCH_POINTERS:
                raise Unrecordable(f"the PTX entry takes {ptx_param_count(ptx)} parameters, not the kernel's "
                                   f"{len(params)} plus {SCRATCH_POINTERS} scratch pointers")
            params += [(KINDS["null"], -1, 0, 0.0)] * SCRATCH_POINTERS
        if grid is None:
            raise Unrecordable("the grid was never evaluated")
        g = list(grid) + [1] * (3 - len(grid))
        consts = {k: v for k, v in kwargs.items() if k not in named}
        kept = [n for n in names if types[n] != "constexpr"]  # the parameters the launch passes, in order
        self.symbolic.append((kernel, tuple(g), named, consts, kept))
        return function, g, threads, shared, params, compiled

    def renumber(self, slot: int) -> int:
        """A program's slot for a recorded one: inputs, then constants, then allocations."""
        n_in, n_const = len(self.inputs), len(self.constants)
        if slot >= 2_000_000:
            return n_in + slot - 2_000_000
        if slot >= 1_000_000:
            return n_in + n_const + slot - 1_000_000
        return slot

    def execute(self, inputs, outputs, single: bool):
        """Runs the recorded launches from Python on new ``inputs`` (the program's semantics, for tests
        under the interpreter): fresh allocations, each kernel called with its recorded scalars, grid and
        constexprs, and its tensors rebuilt from slots and byte offsets. Returns what the program would."""
        slots = list(inputs) + list(self.constants) + [torch.empty(a.shape, dtype=a.dtype, device=a.device)
                                                       for a in self.allocs]
        for i in range(len(self.symbolic)):
            self.launch_from_slots(i, slots)
        n_in, n_const = len(self.inputs), len(self.constants)
        outs = [outputs] if single else list(outputs)
        got = [None if t is None else slots[n_in + n_const + next(i for i, a in enumerate(self.allocs) if a is t)]
               for t in outs]
        return got[0] if single else tuple(got)

    def launch_from_slots(self, i: int, slots) -> None:
        """Launch ``i`` from Python on a program's slots (the tests' launcher under the interpreter)."""
        kernel, grid, named, consts, _ = self.symbolic[i]
        args = {}
        for n, v in named.items():
            if isinstance(v, tuple) and len(v) == 3 and v[0] == "slot":
                base = slots[self.renumber(v[1])]
                # the memory from the slot's address plus the byte offset to its storage's end, as a GPU
                # kernel sees a pointer (a reshape would copy a strided input into another layout)
                start = base.storage_offset() + v[2] // base.element_size()
                span = base.untyped_storage().nbytes() // base.element_size() - start
                args[n] = base.as_strided((span,), (1,), start)
            else:
                args[n] = v
        kernel[grid](**args, **consts)

    def program(self, ext, outputs, single: bool):
        """(the extension's TritonProgram, the compiled kernels it launches) or raises Unrecordable."""
        if self.refusal:
            raise Unrecordable(self.refusal)
        if _one_tensor_twice(self.inputs):
            raise Unrecordable("one tensor is passed as two inputs")
        present = [t for t in self.inputs if t is not None and t.numel()]
        spans = sorted((t.data_ptr(), t.data_ptr() + t.numel() * t.element_size(), i) for i, t in enumerate(present))
        for (s0, e0, i0), (s1, e1, i1) in zip(spans, spans[1:]):
            if s1 < e0:
                raise Unrecordable("two inputs overlap in memory")
        n_in, n_const = len(self.inputs), len(self.constants)
        renumber = self.renumber


        launches, kernels = [], []
        for function, g, threads, shared, params, compiled in self.launches:
            ps = [(k, renumber(s) if k in (KINDS["ptr"], KINDS["ptr_aligned"]) else s, v, f) for k, s, v, f in params]
            launches.append((function, g, threads, shared, ps))
            kernels.append(compiled)
        outs = [outputs] if single else list(outputs)
        out_slots = []
        for t in outs:
            if t is None:
                out_slots.append(-1)
                continue
            idx = next((i for i, a in enumerate(self.allocs) if a is t), None)
            if idx is None:
                raise Unrecordable("an output is not one of the launcher's allocations")
            out_slots.append(n_in + n_const + idx)
        allocs = [(list(a.shape), a.dtype) for a in self.allocs]
        return ext.TritonProgram(n_in, self.constants, allocs, launches, out_slots), kernels


class Entry:
    __slots__ = ("program", "kernels", "single", "ext", "task")

    def __init__(self, program, kernels, single, ext):
        self.program, self.kernels, self.single = program, kernels, single  # kernels: keep them loaded
        self.ext = ext
        self.task = _graph_task()  # the backward pass recording it, -1 outside one (see recorded_in_this_backward)

    def run(self, inputs):
        out = self.program.run(inputs)
        if out is None:
            return None
        return out[0] if self.single else tuple(out)


_ext_module: list = []
_interpreter_ext: list = []  # tests: a CPU build whose programs launch through the interpreter


@contextlib.contextmanager
def through_interpreter(ext):
    """Tests on the CPU: inside the block, launchers record and replay CPU calls too, with ``ext`` (a
    build of csrc/triton_replay.cpp) and each program's launches run from Python under the Triton
    interpreter (``TritonProgram.set_launcher``); the caches are emptied before and after."""
    _interpreter_ext.append(ext)
    _clear_caches()
    try:
        yield
    finally:
        _interpreter_ext.pop()
        _clear_caches()


_CACHES: list = []


def recorded_in_this_backward(*entries) -> bool:
    """Whether one of ``entries`` was recorded in the backward pass running now. A C++ node built on a pair
    of programs keeps other tensors for its backward than the autograd.Function its op otherwise runs; a
    layer recomputed in the backward (gradient checkpointing) must take the path its forward took, and a
    backward program recorded earlier in the same backward pass did not exist during that forward: the
    node's callers run the Function then (torch.utils.checkpoint compares what the two passes keep)."""
    task = _graph_task()
    return task != -1 and any(e.task == task for e in entries)


def register_cache(cache: dict) -> dict:
    """A launcher's program cache (emptied by :func:`through_interpreter`)."""
    _CACHES.append(cache)
    return cache


_GENERATION = [0]


def _clear_caches() -> None:
    for c in _CACHES:
        c.clear()
    _GENERATION[0] += 1


def active(x: torch.Tensor) -> bool:
    """Whether a launcher called on ``x`` records and replays: on a GPU, or in the tests' interpreter mode."""
    return x.device.type == "cuda" or bool(_interpreter_ext)


def _extension():
    """The CUDA extension when it can replay (loaded once), else None."""
    if not _ext_module:
        try:
            import pet_fast._ext as ext_loader

            m = ext_loader.load()
        except Exception:  # the replay is an optimisation: a broken extension leaves the Python path
            m = None
        _ext_module.append(m if getattr(m, "triton_replay_can_launch", False) else None)
    return _ext_module[0]


def record(inputs, fn: Callable, *args, single: bool, ext=None, **kwargs):
    """Runs ``fn`` with a recording of ``inputs``; returns (its result, Entry or the reason it is none)."""
    _local.rec = rec = Recording(inputs)
    try:
        result = fn(*args, **kwargs)
    finally:
        _local.rec = None
    try:
        program, kernels = rec.program(ext, result, single)
    except Unrecordable as exc:
        return result, str(exc)
    except Exception as exc:  # the call itself succeeded: its key just runs in Python
        return result, f"building the program failed: {type(exc).__name__}: {exc}"
    if _interpreter_ext and ext is _interpreter_ext[-1]:
        program.set_launcher(rec.launch_from_slots)
    return result, Entry(program, kernels, single, ext)


def set_enabled(flag: bool) -> bool:
    """Turns replay on or off for this process (benchmarks compare the two); returns the previous state."""
    global _ENABLED
    prev, _ENABLED = _ENABLED, bool(flag)
    _GENERATION[0] += 1
    return prev


@contextlib.contextmanager
def disabled():
    """Every launch from Python inside the block (the benchmarks' ``triton-py`` rows)."""
    prev = set_enabled(False)
    try:
        yield
    finally:
        set_enabled(prev)


def _one_tensor_twice(inputs) -> bool:
    """Whether one tensor object fills two input slots (``residual=x``, say). A recording made so would read that
    slot for both in every later call of its key, whose inputs the key does not say are one: such calls are not
    recorded (later calls with separate tensors are; their programs read each slot, which is right for any)."""
    ids = [id(t) for t in inputs if t is not None and t.numel()]  # (an empty tensor is read for nothing)
    return len(set(ids)) != len(ids)


def call(cache: dict, key: Any, inputs: list, fn: Callable, *args, single: bool, **kwargs):
    """``fn(*args, **kwargs)``, replayed when ``key`` was recorded (see the module docstring).
    ``inputs``: every tensor the launcher's kernels read, in a fixed order (None where absent)."""
    if not _ENABLED:
        return fn(*args, **kwargs)
    entry = cache.get(key)
    if entry is None:
        ext = _interpreter_ext[-1] if _interpreter_ext else _extension()
        if ext is None or getattr(_local, "rec", None) is not None or _one_tensor_twice(inputs):
            return fn(*args, **kwargs)  # (the key stays unrecorded, not refused)
        result, entry = record(inputs, fn, *args, single=single, ext=ext, **kwargs)
        if len(cache) >= MAX_PROGRAMS:  # e.g. a new token count every step: start again rather than grow
            cache.clear()
        cache[key] = entry if isinstance(entry, Entry) else _REFUSED
        return result
    if entry is not _REFUSED:
        try:
            out = entry.run(inputs)
        except RuntimeError as exc:  # e.g. the driver refused a launch: this key launches from Python from now on
            _warn_replay_failed(exc)
            cache[key] = _REFUSED
            out = None
        if out is not None:
            return out
    return fn(*args, **kwargs)


def _warn_replay_failed(exc: Exception) -> None:
    import warnings

    warnings.warn(f"pet_fast: replaying recorded Triton launches failed ({exc}); launching from Python instead "
                  f"(set {ENV_VAR}=0 to turn the replay off)", RuntimeWarning, stacklevel=3)


def enabled() -> bool:
    return _ENABLED


def give_up(exc: Exception) -> None:
    """A replayed C++ node failed (e.g. the driver refused a launch): warns and turns replay off, so that its
    calls go back to the autograd.Functions and Python launches."""
    _warn_replay_failed(exc)
    set_enabled(False)


def autograd(forward: Entry, backward: Entry, bwd_map: list, grad_map: list, inputs: list, name: str,
             out_like: int = -1):
    """The forward program's output (in the shape of input ``out_like``, -1: as allocated) with one C++
    autograd node running the backward program (see ``replay_autograd`` in csrc/triton_replay.cpp for the
    maps), or None when the forward declines."""
    try:
        return forward.ext.replay_autograd(forward.program, backward.program, bwd_map, grad_map, inputs, name, out_like)
    except RuntimeError as exc:
        give_up(exc)
        return None


def guarded(forward: Entry, backward: Entry, bwd_map: list, grad_map: list, inputs: list, name: str,
            out_like: int = -1):
    """:func:`autograd` for later calls like this one, as a C++ ``GuardedReplay``: called with a list of
    inputs, it checks in C++ what a caller's Python would have checked (each input's presence, shape,
    dtype, device, requires_grad and contiguity; grad mode; deterministic mode and autocast as they are
    now) and returns the output with its node, or None when anything differs. None when these inputs
    cannot be guarded (not contiguous plain tensors)."""
    try:
        return forward.ext.GuardedReplay(forward.program, backward.program, bwd_map, grad_map, inputs, name, out_like)
    except RuntimeError:
        return None


def generation() -> int:
    """Changes whenever the recorded programs are dropped or replay is turned off or on: what a caller
    keeps from them (a GuardedReplay) is valid only while it is the same."""
    return _GENERATION[0]


def tensor_key(shape, dtype: torch.dtype, device: int) -> tuple:
    """:func:`key_of`'s entry for a contiguous tensor of this shape, dtype and device index (-1: the CPU), for
    callers that know a launcher's future argument before it exists (a backward's gradient, say)."""
    return (torch.Size(shape), dtype, device, True)


def key_of(*args) -> Optional[tuple]:
    """A launcher call's key: per tensor its shape, dtype, device index and contiguity, per tuple its
    items' keys, other values themselves."""
    out = []
    for a in args:
        if isinstance(a, torch.Tensor):  # (a launcher may copy a non-contiguous input: not the same program)
            out.append((a.shape, a.dtype, a.get_device(), a.is_contiguous()))
        elif isinstance(a, tuple):
            out.append(key_of(*a))
        else:
            out.append(a)
    return tuple(out)
