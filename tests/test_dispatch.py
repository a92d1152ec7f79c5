import threading

import pytest
import torch

import pet_fast
from pet_fast import dispatch


def _adapter_args(dtype=torch.float32):
    x = torch.randn(3, 8, dtype=dtype)
    return x, torch.randn(4, 8, dtype=dtype), None, torch.randn(8, 4, dtype=dtype), None


@pytest.fixture
def fake_op():
    """A throwaway op with eager, triton and cuda implementations whose reasons the test controls."""
    calls = []
    why = {"triton": ["no triton here"], "cuda": ["no cuda here"]}
    for name in dispatch.BACKENDS:
        dispatch.register("fake_op", name, lambda name=name: calls.append(name) or name,
                          reasons=lambda info, name=name: list(why.get(name, [])))
    yield why, calls
    dispatch._REGISTRY.pop("fake_op")


def _info(device="cpu"):
    return {"device": torch.device(device), "dtype": torch.float32}


def test_auto_takes_eager_on_cpu():
    x, wd, bd, wu, bu = _adapter_args()
    assert dispatch.select("bottleneck_adapter", _info()).backend == "eager"
    out = pet_fast.bottleneck_adapter(x, wd, bd, wu, bu, backend="auto")
    assert out.shape == x.shape


def test_auto_prefers_kernels_only_for_cuda_tensors(fake_op):
    why, _ = fake_op
    why.clear()  # every backend claims it can run
    assert dispatch.select("fake_op", _info("cpu")).backend == "eager"
    assert dispatch.select("fake_op", _info("cuda")).backend == "cuda"
    why["cuda"] = ["busy"]
    assert dispatch.select("fake_op", _info("cuda")).backend == "triton"


def test_preference_order_is_per_op(fake_op):
    why, _ = fake_op
    why.clear()
    dispatch.set_preference("fake_op", lambda info: ["triton", "cuda"])
    assert dispatch.select("fake_op", _info("cuda")).backend == "triton"
    assert [n for n, _ in dispatch.explain("fake_op", _info("cuda"))] == ["triton", "cuda", "eager"]


def test_explicit_backend_fails_loudly_with_reasons(fake_op):
    with pytest.raises(dispatch.BackendUnavailableError, match="no triton here"):
        dispatch.select("fake_op", _info(), "triton")
    with pytest.raises(dispatch.BackendUnavailableError, match="chosen by argument"):
        dispatch.select("fake_op", _info(), "cuda")


def test_precedence_argument_context_environment(fake_op, monkeypatch):
    why, _ = fake_op
    why.clear()
    monkeypatch.setenv("PET_FAST_BACKEND", "cuda")
    assert dispatch.select("fake_op", _info()).backend == "cuda"
    with pet_fast.use_backend("triton"):
        assert dispatch.select("fake_op", _info()).backend == "triton"
        with pet_fast.use_backend("eager"):
            assert dispatch.select("fake_op", _info()).backend == "eager"
        assert dispatch.select("fake_op", _info(), backend="cuda").backend == "cuda"
        assert dispatch.requested() == ("triton", "use_backend()")
    assert dispatch.requested() == ("cuda", "PET_FAST_BACKEND")


def test_context_is_restored_after_an_error():
    with pytest.raises(RuntimeError):
        with pet_fast.use_backend("eager"):
            raise RuntimeError("boom")
    assert dispatch.requested() == ("auto", "default")


def _requested_in_a_backward_elsewhere(monkeypatch, foreign=True):
    """dispatch.requested() as seen from inside a backward pass run by another thread (standing for autograd's
    GPU worker thread, which Python did not start: ``foreign``)."""
    import threading

    monkeypatch.setattr(dispatch, "_foreign_thread", lambda: foreign)
    seen = []
    x = torch.ones(2, requires_grad=True)
    y = x * 2
    y.register_hook(lambda g: seen.append(dispatch.requested()) or g)
    t = threading.Thread(target=lambda: y.sum().backward())
    t.start()
    t.join()
    return seen[0]


def test_autograds_own_thread_takes_the_programs_open_block(monkeypatch):
    """A layer recomputed in the backward (gradient checkpointing) calls the ops in autograd's worker thread on a
    GPU: it takes the use_backend() block open in the program's thread, as the forward took it; not when it is
    a thread of the program's own, not outside a backward, not when open blocks disagree."""
    import threading

    assert _requested_in_a_backward_elsewhere(monkeypatch) == ("auto", "default")
    with pet_fast.use_backend("eager"):
        assert _requested_in_a_backward_elsewhere(monkeypatch) == ("eager", "use_backend() (open in the program's thread)")
        assert _requested_in_a_backward_elsewhere(monkeypatch, foreign=False) == ("auto", "default")
        seen = []
        t = threading.Thread(target=lambda: seen.append(dispatch.requested()))  # (outside a backward)
        monkeypatch.setattr(dispatch, "_foreign_thread", lambda: True)
        t.start()
        t.join()
        assert seen == [("auto", "default")]
        started, release = threading.Event(), threading.Event()

        def other_block():
            with pet_fast.use_backend("triton"):
                started.set()
                release.wait()
        other = threading.Thread(target=other_block)
        other.start()
        started.wait()
        try:
            assert _requested_in_a_backward_elsewhere(monkeypatch) == ("auto", "default")  # (two choices open)
        finally:
            release.set()
            other.join()
    assert dispatch._OPEN == {}


def test_unknown_backend_names():
    x, wd, bd, wu, bu = _adapter_args()
    with pytest.raises(ValueError, match="backend must be one of"):
        pet_fast.bottleneck_adapter(x, wd, bd, wu, bu, backend="fast")
    with pytest.raises(TypeError, match="backend must be a string"):
        pet_fast.bottleneck_adapter(x, wd, bd, wu, bu, backend=3)
    with pytest.raises(ValueError, match="backend must be one of"):
        with pet_fast.use_backend("gpu"):
            pass


def test_bad_environment_variable_is_named(monkeypatch):
    monkeypatch.setenv("PET_FAST_BACKEND", "turbo")
    x, wd, bd, wu, bu = _adapter_args()
    with pytest.raises(ValueError, match="PET_FAST_BACKEND"):
        pet_fast.bottleneck_adapter(x, wd, bd, wu, bu)


def test_cuda_backend_refuses_cpu_tensors_with_reason():
    x, wd, bd, wu, bu = _adapter_args()
    with pytest.raises(dispatch.BackendUnavailableError, match="cuda"):
        pet_fast.bottleneck_adapter(x, wd, bd, wu, bu, backend="cuda")


def test_triton_reasons():
    info = {"device": torch.device("cpu"), "dtype": torch.float64}
    why = " ".join(dispatch.triton_reasons(info))
    assert "float64" in why
    assert dispatch.cuda_reasons(info) == ["inputs are on cpu, the cuda backend needs CUDA tensors"]


def test_every_op_has_eager_and_sample_calls():
    from pet_fast.cli import sample_calls

    samples = sample_calls("cpu", torch.float32)
    assert {label.split(" ")[0] for label in samples} == set(dispatch.ops()) - {"fake_op"}
    for label, info in samples.items():
        assert dispatch.select(label.split(" ")[0], info).backend == "eager"


def test_forward_mode_ad_keeps_the_fused_backends_out(fake_op):
    """The fused kernels have no forward-mode formula: inside a dual level auto takes eager, an explicit
    kernel backend is refused by name, and remembered plans made outside do not leak in."""
    import torch.autograd.forward_ad as fwAD

    why, _ = fake_op
    why.clear()
    assert dispatch.select("fake_op", _info("cuda")).backend == "cuda"
    sig = ("fake-signature",)
    assert dispatch.plan("fake_op", sig, "triton", lambda: (None, _info("cuda")))[1].backend == "triton"
    with fwAD.dual_level():
        assert dispatch.forward_ad_active()
        assert dispatch.select("fake_op", _info("cuda")).backend == "eager"
        with pytest.raises(dispatch.BackendUnavailableError, match="forward-mode AD is on"):
            dispatch.select("fake_op", _info("cuda"), "triton")
        with pytest.raises(dispatch.BackendUnavailableError, match="forward-mode AD is on"):
            dispatch.plan("fake_op", sig, "triton", lambda: (None, _info("cuda")))
        assert dict(dispatch.explain("fake_op", _info("cuda")))["cuda"] == [
            "forward-mode AD is on (torch.autograd.forward_ad.dual_level): the fused kernels have no forward-mode formula"]
    assert not dispatch.forward_ad_active()
    assert dispatch.plan("fake_op", sig, "triton", lambda: (None, _info("cuda")))[1].backend == "triton"


def test_a_call_whose_only_trainable_tensor_is_a_bias_or_up_projection_counts_as_training():
    """auto orders backends by measured rows of the forward or of forward + backward: every tensor that
    requires grad makes the call a training call (the adapter's w_up and biases, the fusion ops' biases)."""
    from pet_fast.ops import adapter_fusion as af
    from pet_fast.ops import bottleneck_adapter as ba

    seen = []
    real = dispatch.select
    x, wd, wu = torch.randn(3, 8), torch.randn(2, 8), torch.randn(8, 2).requires_grad_()
    try:
        dispatch.select = lambda op, info, backend=None: seen.append(info["requires_grad"]) or real(op, info, backend)
        ba.bottleneck_adapter(x, wd, None, wu, None)
        ba.bottleneck_adapter(x, wd, torch.zeros(2, requires_grad=True), wu.detach(), None)
        af.adapter_fusion(x, torch.randn(3, 2, 8), x, w_query=torch.randn(8, 8), b_query=torch.zeros(8, requires_grad=True))
    finally:
        dispatch.select = real
    assert seen == [True, True, True]


def test_a_thread_started_by_c_code_keeps_its_own_backend_in_a_checkpointed_backward():
    """Autograd's device threads take the block open in the program's threads for a recomputation; a thread a C
    library started (a server's worker: threading's stand-in object too) is not one of them, whatever the OS
    names it, and keeps its own choice ('auto': eager here), not another thread's block (a 'cuda' it cannot run)."""
    import _thread
    from torch.utils.checkpoint import checkpoint

    x = torch.randn(4, 8, requires_grad=True)
    wd, wu = torch.randn(3, 8, requires_grad=True), torch.randn(8, 3, requires_grad=True)
    inside, release, finished, result = threading.Event(), threading.Event(), threading.Event(), {}

    def holder():
        with pet_fast.use_backend("cuda"):
            inside.set()
            release.wait(30)

    def foreign():
        try:
            assert isinstance(threading.current_thread(), threading._DummyThread)
            checkpoint(lambda t: pet_fast.bottleneck_adapter(t, wd, None, wu, None), x, use_reentrant=False).sum().backward()
            result["ok"] = True
        except Exception as exc:  # noqa: BLE001 (reported below)
            result["error"] = exc
        finished.set()
    t = threading.Thread(target=holder)
    t.start()
    inside.wait(10)
    try:
        _thread.start_new_thread(foreign, ())
        assert finished.wait(60)
    finally:
        release.set()
        t.join()
    assert result.get("ok"), result
