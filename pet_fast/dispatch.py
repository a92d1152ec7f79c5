"""The one place that decides which backend runs an op call, and says why.

Backends: ``eager`` (plain PyTorch, always available, the reference), ``triton`` (kernels in
``pet_fast.kernels``) and ``cuda`` (the C++ extension ``pet_fast._C``). Each op registers one
:class:`Impl` per backend, with a function that lists the reasons it cannot take a given call
(an empty list means it can).

The choice, first match wins:
1. the ``backend=`` argument of the call;
2. the innermost :func:`use_backend` context;
3. the ``PET_FAST_BACKEND`` environment variable;
4. ``auto``.
An explicit backend that cannot run the inputs raises :class:`BackendUnavailableError` with every
reason. ``auto`` walks the op's preference order (measured timings where an op provides them, else
cuda, triton, eager) and takes the first backend with no reasons; eager takes everything, so the CPU
always works.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import threading
from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping, Optional, Sequence

import torch
import torch.autograd.forward_ad as _forward_ad

from . import _env

BACKENDS = ("eager", "triton", "cuda")
CHOICES = ("auto",) + BACKENDS
ENV_VAR = "PET_FAST_BACKEND"


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run the given inputs."""


@dataclass
class Impl:
    op: str
    backend: str
    run: Callable
    reasons: Callable[[Mapping], list]


@dataclass
class _OpEntry:
    impls: dict = field(default_factory=dict)
    # Returns the auto preference order for a call; by default cuda, triton, eager.
    preference: Optional[Callable[[Mapping], Sequence[str]]] = None


_REGISTRY: dict[str, _OpEntry] = {}
# Stack of use_backend() choices, one per thread (a block in one thread must not change what another
# thread's calls pick); a plain list inside, so torch.compile can trace it.
class _Local(threading.local):
    def __init__(self):  # (per thread, at its first access: never made inside a traced call, where torch.compile
        self.stack = []  # guarded on its absence and compiled the model again at the second call)


_LOCAL = _Local()


def _context() -> list:
    return _LOCAL.stack


# The stacks of the threads that have a use_backend() block open. Autograd runs a GPU's backward in a thread of
# its own, where a layer recomputed under gradient checkpointing calls the ops again: with one choice open in
# the process, that thread takes it, as the forward did (else its recomputation could take another backend
# than the forward, which checkpointing refuses).
_OPEN: dict = {}
_OPEN_LOCK = threading.Lock()
# The id of the autograd backward pass (graph task) running in this thread, -1 outside one.
graph_task = getattr(torch._C, "_current_graph_task_id", lambda: -1)


def _foreign_thread() -> bool:
    """Whether this thread is an autograd worker thread (one per device, started by the engine, not by Python),
    not one of the program's own, whose blocks are its own. Python sees both a worker and a thread a C library
    started (a server's worker) as its stand-in object; on Linux the OS thread name tells them apart (the engine
    names its threads pt_autograd_<device>)."""
    if not isinstance(threading.current_thread(), threading._DummyThread):
        return False
    known = getattr(_THIS_THREAD, "autograd_worker", None)  # (per thread state: an OS id may be reused)
    if known is None:
        try:
            with open(f"/proc/self/task/{threading.get_native_id()}/comm") as f:
                known = f.read().strip().startswith("pt_autograd")
        except OSError:  # (no /proc: every thread not started by Python counts)
            known = True
        _THIS_THREAD.autograd_worker = known
    return known


_THIS_THREAD = threading.local()


def _open_choice() -> Optional[str]:
    """The use_backend() choice for a thread without a block of its own: the innermost choice of the threads
    with one open when this is an autograd worker thread (not started by Python) running a backward pass and
    they agree; None otherwise."""
    if not _OPEN or torch.compiler.is_compiling() or graph_task() == -1 or not _foreign_thread():
        return None
    with _OPEN_LOCK:
        tops = [s[-1:] for s in _OPEN.values()]  # (a slice: an owner may pop its last choice meanwhile)
    choices = {t[0] for t in tops if t}
    return choices.pop() if len(choices) == 1 else None


def register(op: str, backend: str, run: Callable, reasons: Optional[Callable[[Mapping], list]] = None) -> Impl:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    impl = Impl(op, backend, run, reasons or (lambda info: []))
    _REGISTRY.setdefault(op, _OpEntry()).impls[backend] = impl
    clear_plans()
    return impl


def set_preference(op: str, preference: Callable[[Mapping], Sequence[str]]) -> None:
    """Let an op order its backends per call (for example from a table of measured timings)."""
    _REGISTRY.setdefault(op, _OpEntry()).preference = preference
    clear_plans()


def ops() -> list[str]:
    return sorted(_REGISTRY)


def validate_backend(name, argname: str = "backend") -> str:
    if not isinstance(name, str):
        raise TypeError(f"{argname} must be a string, one of {CHOICES}, got {type(name).__name__}")
    key = name.strip().lower()
    if key not in CHOICES:
        raise ValueError(f"{argname} must be one of {CHOICES}, got {name!r}")
    return key


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[str]:
    """Run the ops called inside the block on backend ``name`` (or ``"auto"``)."""
    key = validate_backend(name)
    stack = _context()
    stack.append(key)
    if len(stack) == 1 and not torch.compiler.is_compiling():
        with _OPEN_LOCK:
            _OPEN[threading.get_ident()] = stack
    try:
        yield key
    finally:
        stack.pop()
        if not stack and not torch.compiler.is_compiling():
            with _OPEN_LOCK:
                _OPEN.pop(threading.get_ident(), None)


def requested(backend: Optional[str] = None) -> tuple[str, str]:
    """(choice, where it came from) for a call whose ``backend=`` argument is ``backend``."""
    if backend is not None:
        return validate_backend(backend), "argument"
    stack = _context()
    if stack:
        return stack[-1], "use_backend()"
    if _OPEN:
        choice = _open_choice()
        if choice is not None:
            return choice, "use_backend() (open in the program's thread)"
    env = _env.get(ENV_VAR)
    if env:
        return validate_backend(env, argname=f"environment variable {ENV_VAR}"), ENV_VAR
    return "auto", "default"


def torch_at_least(major: int, minor: int) -> bool:
    """Whether the installed torch is release major.minor or later."""
    try:
        return tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) >= (major, minor)
    except ValueError:
        return False


# torch.compiler.is_exporting came in torch 2.6 and said True inside torch.compile too until 2.12 (compiled
# code would then lose auto's measured ranking): trusted from 2.12 on.
_IS_EXPORTING = getattr(torch.compiler, "is_exporting", None) if torch_at_least(2, 12) else None


def _exporting() -> bool:
    return _IS_EXPORTING is not None and _IS_EXPORTING()


def _preference(entry: _OpEntry, info: Mapping) -> list[str]:
    # (torch.export: no measured ranking, whose size comparisons would hold the program to the traced sizes)
    measured = entry.preference is not None and not _exporting()
    order = list(entry.preference(info)) if measured else ["cuda", "triton", "eager"]
    if "eager" not in order:
        order.append("eager")
    return order


def explain(op: str, info: Mapping) -> list[tuple[str, list]]:
    """For every backend, the reasons it cannot take this call (empty: it can), in auto's order."""
    entry = _REGISTRY[op]
    out = []
    for name in _preference(entry, info):
        impl = entry.impls.get(name)
        out.append((name, (impl.reasons(info) if impl else [f"{op} has no {name} implementation"])
                    + _mode_reasons(name)))
    for name in BACKENDS:
        if name not in [n for n, _ in out]:
            impl = entry.impls.get(name)
            out.append((name, (impl.reasons(info) if impl else [f"{op} has no {name} implementation"])
                        + _mode_reasons(name)))
    return out


def forward_ad_active() -> bool:
    """Whether forward-mode AD is on (inside ``torch.autograd.forward_ad.dual_level()``)."""
    return _forward_ad._current_level >= 0


def _mode_reasons(name: str) -> list:
    """Reasons every fused backend shares, from the autograd mode rather than the inputs."""
    if name != "eager" and forward_ad_active():
        return ["forward-mode AD is on (torch.autograd.forward_ad.dual_level): the fused kernels have no "
                "forward-mode formula"]
    return []


def select(op: str, info: Mapping, backend: Optional[str] = None) -> Impl:
    """The implementation that runs this call of ``op`` described by ``info``."""
    entry = _REGISTRY.get(op)
    if entry is None:
        raise KeyError(f"unknown op {op!r}; registered: {ops()}")
    choice, source = requested(backend)
    if choice != "auto":
        impl = entry.impls.get(choice)
        why = (impl.reasons(info) if impl else [f"{op} has no {choice} implementation"]) + _mode_reasons(choice)
        if why:
            raise BackendUnavailableError(
                f"{op}: backend {choice!r} (chosen by {source}) cannot run these inputs: " + "; ".join(why)
            )
        return impl
    for name in _preference(entry, info):
        impl = entry.impls.get(name)
        # Kernels run on CPU tensors only under the Triton interpreter, which is for tests: auto never
        # takes that path.
        if name != "eager" and info["device"].type != "cuda":
            continue
        if impl is not None and not impl.reasons(info) and not _mode_reasons(name):
            return impl
    raise BackendUnavailableError(f"{op}: no backend can run these inputs: {explain(op, info)}")


# ---------------------------------------------------------------------------------------------------
# Call plans: the ops' fast path on the host.
#
# A training step calls each op with the same shapes, dtypes and devices in every layer and every step.
# Checking the arguments, describing the call and walking the backends' reasons took about 20 us of host
# time per call (measured on the CPU, benchmarks/bench_host_overhead.py), as much as launching a kernel,
# and a BERT-base step is bound by the host. So an op names each call by a *signature*, every fact its
# checks and its dispatch description read (tensors' shapes, dtypes, devices and requires_grad, the other
# arguments by type and value; see _checks.signature), and the first call with a signature, under a given
# dispatch state (requested backend, grad mode, deterministic mode, Triton interpreter), remembers what
# its checks returned and which backend it took. A call with a known signature and state skips both; any
# other call runs them, so bad input still raises. Code being compiled takes the plain path (dynamo
# traces it and guards on the same facts).

_PLANS: dict = {}
PLANS_MAX = 4096  # distinct (op, signature, state) entries kept; beyond, the memo starts again


_PLANS_GENERATION = [0]


def clear_plans() -> None:
    """Forget every remembered call plan (done whenever a backend, a preference or a timings table changes)."""
    _PLANS.clear()
    _PLANS_GENERATION[0] += 1


def plans_generation() -> int:
    """Changes with every :func:`clear_plans`: what a caller keeps from a plan is valid while it is the same."""
    return _PLANS_GENERATION[0]


def plan(op: str, signature, backend: Optional[str], resolve: Callable[[], tuple]) -> tuple:
    """``(checked, impl)`` for a call of ``op``: ``resolve()`` runs the op's argument checks and returns
    ``(checked, info)`` (``checked``: what the op needs back from its checks, e.g. normalised arguments;
    ``info``: the call's description for :func:`select`). Remembered per ``signature`` and dispatch state;
    ``signature=None`` (an argument the signature cannot describe) always resolves."""
    if signature is None or torch.compiler.is_compiling():
        checked, info = resolve()
        return checked, select(op, info, backend)
    key = (op, requested(backend)[0], signature, torch.is_grad_enabled(),
           torch.are_deterministic_algorithms_enabled(), triton_interpreting(), forward_ad_active())
    hit = _PLANS.get(key)
    if hit is None:
        checked, info = resolve()
        hit = (checked, select(op, info, backend))
        if len(_PLANS) >= PLANS_MAX:
            _PLANS.clear()
        _PLANS[key] = hit
    return hit


# ---------------------------------------------------------------------------------------------------
# Reasons shared by the kernel backends. Each returns a list of human-readable strings.

_LOW_PRECISION_AND_FP32 = (torch.float16, torch.bfloat16, torch.float32)


def triton_interpreting() -> bool:
    return _env.get("TRITON_INTERPRET", "0") == "1"


# Looked up once: find_spec is not traceable by torch.compile, and select() runs inside compiled code.
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def triton_reasons(info: Mapping, dtypes=_LOW_PRECISION_AND_FP32) -> list:
    """Why Triton cannot run a call on ``info['device']`` with ``info['dtype']``."""
    why = []
    if not _TRITON_INSTALLED:
        why.append("triton is not installed")
    device = info["device"]
    if device.type == "cpu":
        if not triton_interpreting():
            why.append("inputs are on the CPU (Triton runs them only under TRITON_INTERPRET=1)")
    elif device.type != "cuda":
        why.append(f"inputs are on {device.type}, Triton needs CUDA")
    elif not torch.cuda.is_available():
        why.append("CUDA is not available")
    if info["dtype"] not in dtypes:
        why.append(f"dtype {info['dtype']} is not one of {tuple(str(d) for d in dtypes)}")
    return why


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple:
    return tuple(torch.cuda.get_device_capability(index))


def device_capability(device: torch.device) -> tuple:
    """(major, minor) of a CUDA device, queried once per device: launchers that ask per call (a step calls
    them per layer) would otherwise pay the driver query each time."""
    return _capability(device.index if device.index is not None else torch.cuda.current_device())


def cuda_reasons(info: Mapping, dtypes=_LOW_PRECISION_AND_FP32, min_capability=(8, 0)) -> list:
    """Why the C++ extension cannot run a call; loads (or builds) it only for CUDA inputs."""
    why = []
    device = info["device"]
    if device.type != "cuda":
        return [f"inputs are on {device.type}, the cuda backend needs CUDA tensors"]
    cap = device_capability(device)
    if tuple(cap) < tuple(min_capability):
        why.append(f"compute capability {cap} is below {min_capability}")
    if info["dtype"] not in dtypes:
        why.append(f"dtype {info['dtype']} is not one of {tuple(str(d) for d in dtypes)}")
    from . import _ext

    if not _ext.available():
        why.append(_ext.reason())
    return why


def nondeterministic_reasons(what: str = "its backward sums weight gradients with fp32 atomics") -> list:
    """The reason a backend whose results depend on the order of atomic updates gives under
    ``torch.use_deterministic_algorithms(True)`` (then auto falls back to a deterministic backend)."""
    if torch.are_deterministic_algorithms_enabled():
        return [f"not deterministic: {what} (torch.use_deterministic_algorithms is on)"]
    return []

