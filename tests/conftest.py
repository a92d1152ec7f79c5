import os

import pytest
import torch

# Triton kernels run on the CPU only under the interpreter, which must be set before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")
# Tests must never reach the network (models are built from configs or loaded from local folders).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import no_network  # noqa: E402  (tests/no_network.py: outgoing connections of this process are refused)

no_network.install()

HAS_GPU = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not HAS_GPU:
            item.add_marker(skip_gpu)


FAILURE_LOG_ENV = "PET_FAST_FAILURE_LOG"


def pytest_runtest_logreport(report):
    """With $PET_FAST_FAILURE_LOG set, append each failure's full text to that file as it happens. A GPU
    run cut at its time limit (benchmarks/gpu_check.sh) never reaches pytest's summary; the file keeps what
    failed and why. Under xdist this runs in the controller, which gets every worker's reports."""
    path = os.environ.get(FAILURE_LOG_ENV)
    if not path or not report.failed or os.environ.get("PYTEST_XDIST_WORKER"):  # the worker's copy: skipped
        return
    with open(path, "a", encoding="utf-8") as f:
        f.write(f"=== {report.nodeid} ({report.when})\n{report.longreprtext}\n\n")


@pytest.fixture(autouse=True)
def _clean_backend_env(monkeypatch):
    monkeypatch.delenv("PET_FAST_BACKEND", raising=False)
    torch.manual_seed(0)
    yield


def graph_node_names(t: torch.Tensor) -> set:
    """The class names of every autograd node behind ``t`` (which ops a call recorded)."""
    names, todo, seen = set(), [t.grad_fn], set()
    while todo:
        f = todo.pop()
        if f is None or f in seen:
            continue
        seen.add(f)
        names.add(type(f).__name__)
        todo.extend(g for g, _ in f.next_functions)
    return names


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref| (0 when both are 0)."""
    out, ref = out.double(), ref.double()
    den = ref.abs().max().item() if ref.numel() else 0.0
    num = (out - ref).abs().max().item() if ref.numel() else 0.0
    return num / den if den > 0 else num


@pytest.fixture(autouse=True)
def _fresh_call_plans():
    """Tests swap timings tables and backends' functions: no test sees another's remembered call plans."""
    from pet_fast import dispatch

    dispatch.clear_plans()
    yield


@pytest.fixture(scope="session")
def replay_ext(tmp_path_factory):
    """A CPU-only build of csrc/triton_replay.cpp (kernels/_replay.py's programs, launched by the tests
    through the Triton interpreter), built once per session."""
    from _cpu_ext import load_cpu_module

    return load_cpu_module(tmp_path_factory)


def assert_same_bits(got: dict, want: dict) -> None:
    """Two dicts of tensors (None where a gradient is absent) equal key by key, bit for bit."""
    assert got.keys() == want.keys()
    for k in want:
        if want[k] is None or got[k] is None:
            assert want[k] is None and got[k] is None, k
        else:
            assert got[k].shape == want[k].shape, k
            torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=k)


def fail_replayed_launches() -> None:
    """Every recorded Triton program (kernels/_replay.py) launches through a launcher that raises as a
    refused cuLaunchKernel does."""
    from pet_fast.kernels import _replay

    def failing(i, slots):
        raise RuntimeError("triton replay: cuLaunchKernel failed with CUresult 400")

    for cache in _replay._CACHES:
        for entry in cache.values():
            if isinstance(entry, _replay.Entry):
                entry.program.set_launcher(failing)


def configs_as_on_a_gpu(kernels_module, make_configs):
    """``make_configs()`` as a GPU with autotuning builds them (kernels_module's interpreter flag off)."""
    monkey = pytest.MonkeyPatch()
    monkey.setattr(kernels_module, "_AUTOTUNE", True)
    monkey.setattr(kernels_module, "interpreting", lambda: False)
    try:
        return make_configs()
    finally:
        monkey.undo()
