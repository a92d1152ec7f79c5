"""The frozen base's forward replayed from CUDA graphs (side-tuning's ``SideConfig(base_graphs=True)``).

Side-tuning runs its base under ``torch.no_grad()`` in eval mode: the same kernels on the same weights every
step, nothing saved for a backward. At BERT-base's 32 x 128 that forward is bound by the host (11.0 ms in
the first H100 session's step benchmark, where the whole frozen floor's step had 6.4 ms of GPU work in a later
profile), so the side-tuning step's time is mostly the base's launches. Here
each input signature's forward is captured once into a CUDA graph and then replayed: the step copies its
inputs into the graph's buffers, replays (one launch), and clones the last hidden state out.

What a replay assumes, and how it is kept:
- the same computation for the same signature: the key holds every tensor argument's shape, dtype and device
  and every other argument's value, the autocast state and inference mode; the graphs are dropped when a weight of the base
  moves or is replaced (their addresses are compared at every call). A weight updated in place, as by
  ``load_state_dict``, is seen by the replays, which read the weights' memory;
- no decision on the inputs' values on the host: transformers materialises its attention masks while a
  stream is capturing (it skips them only outside capture, after reading the mask), so one graph serves
  batches with and without padding;
- the output is read before the next replay: it is cloned (one launch), so a hidden state kept by the
  side-tuning cache or saved by autograd (a learned alpha) is not overwritten.

Forward hooks on base modules run at capture only. A signature whose capture fails (a synchronising op
in a custom model) runs eagerly from then on, with one warning. At most ``max_graphs`` signatures are
captured; later ones run eagerly (a data loader with dynamic padding makes one per length: pad to a few
fixed lengths to keep them all replayed)."""
from __future__ import annotations

import warnings
from typing import Callable, Dict, Iterable, Optional, Tuple

import torch


# Registrations of modules, parameters and buffers anywhere in the process, counted by torch's global hooks
# (installed with the first BaseGraphs): a runner lists its weights' slots again when the count moved.
_REGISTRATIONS = [0]
_HOOKS = []


def _registered(module, name, value):
    _REGISTRATIONS[0] += 1  # (returns None: the registered value stays as it is)


def _count_registrations() -> None:
    if not _HOOKS:
        from torch.nn.modules import module as M

        _HOOKS.extend([M.register_module_module_registration_hook(_registered),
                       M.register_module_parameter_registration_hook(_registered),
                       M.register_module_buffer_registration_hook(_registered)])


class CudaGraphs:
    """Capture and replay through torch.cuda.CUDAGraph, all of a runner's graphs in one memory pool (they
    replay one at a time and each output is cloned before another replays)."""

    warmup = 2  # eager calls on a side stream before capture (cuBLAS handles, lazy initialisation, autotuning)

    def __init__(self):
        self.pool = None

    def reset(self) -> None:
        """A new memory pool for the next captures (the dropped graphs' pool is freed with them)."""
        self.pool = None

    def capture(self, fn: Callable[[], torch.Tensor]):
        """Returns (replay, output): ``replay()`` runs the captured work again, refilling ``output``."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(self.warmup):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = fn()
        return graph.replay, out


class BaseGraphs:
    """Replays ``forward(**arguments)`` (returning a tensor) from graphs keyed by the arguments' signature."""

    def __init__(self, weights: Callable[[], Iterable[Tuple[dict, str]]], max_graphs: int = 8, backend=None):
        if isinstance(max_graphs, bool) or not isinstance(max_graphs, int) or max_graphs < 1:
            raise ValueError(f"max_graphs must be a positive int, got {max_graphs!r}")
        # where the tensors the graphs read besides their inputs live: (a module's _parameters or _buffers, name)
        self.weights = weights
        self.slots: list = []
        self.slots_at = -1  # _REGISTRATIONS[0] when the slots were listed
        self.weights_at = None  # the weights' addresses when the graphs were captured
        self.max_graphs = max_graphs
        self.backend = backend or CudaGraphs()
        self.graphs: Dict[tuple, tuple] = {}  # key -> (replay, static inputs, static output)
        self.failed: set = set()
        self.captures = self.replays = 0
        _count_registrations()

    def addresses(self) -> tuple:
        """The weights' addresses: read through their modules' dicts, so a tensor moved (``.to()``, ``.data =``)
        or put in a slot's place (``module.weight = ...``) shows. The slots are listed again when a module,
        parameter or buffer was registered anywhere since (torch's global registration hooks)."""
        if self.slots_at != _REGISTRATIONS[0]:
            self.slots, self.slots_at = list(self.weights()), _REGISTRATIONS[0]
        try:
            return tuple([d[n].data_ptr() for d, n in self.slots])
        except (KeyError, AttributeError):  # a slot deleted or set to None: list them again
            self.slots_at = -1
            return self.addresses()

    @staticmethod
    def usable(arguments: Dict[str, object]) -> bool:
        """Whether a call with these arguments can be replayed: CUDA tensors, on one device, not under
        torch.compile (which traces the eager forward) nor inside another capture."""
        tensors = [v for v in arguments.values() if isinstance(v, torch.Tensor)]
        if not tensors or torch.compiler.is_compiling():
            return False
        device = tensors[0].device
        if device.type != "cuda" or any(t.device != device for t in tensors):
            return False
        return not torch.cuda.is_current_stream_capturing()

    def key(self, arguments: Dict[str, object]) -> Optional[tuple]:
        """The signature a graph is captured for; None where an argument cannot be part of one."""
        parts = []
        for name in sorted(arguments):
            v = arguments[name]
            if isinstance(v, torch.Tensor):
                parts.append((name, tuple(v.shape), v.dtype, v.device, v.requires_grad))
            else:
                try:
                    hash(v)
                except TypeError:
                    return None
                parts.append((name, type(v), v))
        autocast = tuple((d, torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in ("cuda", "cpu"))
        # buffers captured under inference mode are inference tensors, which later calls outside it cannot refill
        return tuple(parts), autocast, torch.is_inference_mode_enabled()

    def __call__(self, forward: Callable[..., torch.Tensor], arguments: Dict[str, object]) -> torch.Tensor:
        """``forward(**arguments)``, replayed where it can be (see the module docstring)."""
        at = self.addresses()
        if at != self.weights_at:
            self.clear()  # a weight moved or was replaced: every graph reads stale memory
            self.weights_at = at
        key = self.key(arguments)
        if key is None or key in self.failed:
            return forward(**arguments)
        entry = self.graphs.get(key)
        if entry is None:
            if len(self.graphs) >= self.max_graphs:
                return forward(**arguments)
            entry = self._capture(key, forward, arguments)
            if entry is None:
                return forward(**arguments)
        replay, static, out = entry
        for name, buffer in static.items():
            buffer.copy_(arguments[name])
        replay()
        self.replays += 1
        return out.clone()

    def _capture(self, key, forward, arguments):
        static = {n: v.clone() for n, v in arguments.items() if isinstance(v, torch.Tensor)}
        call = {**arguments, **static}
        try:
            replay, out = self.backend.capture(lambda: forward(**call))
        except Exception as e:  # noqa: BLE001 - any failure to capture leaves the signature eager
            self.failed.add(key)
            warnings.warn(f"side-tuning's base could not be captured as a CUDA graph ({type(e).__name__}: {e}); "
                          "this input signature runs eagerly", RuntimeWarning, stacklevel=3)
            return None
        if not isinstance(out, torch.Tensor):
            self.failed.add(key)
            return None
        self.graphs[key] = entry = (replay, static, out)
        self.captures += 1
        return entry

    def clear(self) -> None:
        """Drop every graph (and, with the last reference, their memory)."""
        self.graphs.clear()
        self.failed.clear()
        getattr(self.backend, "reset", lambda: None)()
