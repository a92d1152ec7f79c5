"""Concurrency: processes loading (or building) the extension at once, and modules used from several
threads in inference."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

import pet_fast
from pet_fast import dispatch

ROOT = Path(__file__).resolve().parent.parent


def _spawn(code, env_extra=None):
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], cwd=str(ROOT), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _run_together(code, n, tmp_path, env_extra=None):
    """Start ``n`` processes that each wait for a go-file, release them at once, return their outputs."""
    go = tmp_path / "go"
    env = dict(env_extra or {}, GO_FILE=str(go))
    procs = [_spawn(code, env) for _ in range(n)]
    go.write_text("go")
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, f"a process failed:\n{out}\n{err}"
        outs.append(out.strip())
    return outs


WAIT = """
import os, time
deadline = time.time() + 60
while not os.path.exists(os.environ["GO_FILE"]):
    assert time.time() < deadline, "never released"
    time.sleep(0.005)
"""


# A checkout with the extension built in place (setup.py with CUDA) loads that one and never builds.
PREBUILT = importlib.util.find_spec("pet_fast._C") is not None
no_prebuilt = pytest.mark.skipif(PREBUILT, reason="a prebuilt pet_fast._C is installed: nothing is built just in time")


@no_prebuilt
@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU outcome (no extension) is checked here")
def test_two_processes_loading_the_extension_at_once_get_the_same_answer(tmp_path):
    code = WAIT + """
import pet_fast
from pet_fast import _ext
m = _ext.load()
print(repr(m), "|", _ext.reason())
"""
    outs = _run_together(code, 2, tmp_path, {"PET_FAST_CACHE": str(tmp_path / "cache")})
    assert outs[0] == outs[1]
    assert outs[0].startswith("None |")


@no_prebuilt
def test_the_build_lock_serialises_two_just_in_time_builds(tmp_path):
    """Two processes that both find no prebuilt extension build it just in time under one file lock:
    the (fake) builds never overlap and both processes get the module."""
    log = tmp_path / "build.log"
    inside = tmp_path / "inside"
    code = WAIT + f"""
import os, time, types
import torch, torch.utils.cpp_extension
from pet_fast import _ext

def fake_build(name, sources, build_directory, **kw):
    try:
        fd = os.open({str(inside)!r}, os.O_CREAT | os.O_EXCL)
    except FileExistsError:
        with open({str(log)!r}, "a") as fh:
            fh.write("OVERLAP\\n")
        raise
    with open({str(log)!r}, "a") as fh:
        fh.write(f"start {{os.getpid()}}\\n")
    time.sleep(0.3)
    with open({str(log)!r}, "a") as fh:
        fh.write(f"end {{os.getpid()}}\\n")
    os.close(fd)
    os.unlink({str(inside)!r})
    return types.SimpleNamespace(name=name, build_directory=build_directory)

torch.utils.cpp_extension.load = fake_build
torch.cuda.get_device_capability = lambda *a: (8, 0)
_ext._why_not_buildable = lambda: None
m = _ext.load()
assert m is not None, _ext.reason()
print(_ext.reason(), "|", m.build_directory)
"""
    outs = _run_together(code, 2, tmp_path, {"PET_FAST_CACHE": str(tmp_path / "cache")})
    assert outs[0] == outs[1] and outs[0].startswith("built just in time |")
    assert (tmp_path / "cache") in Path(outs[0].split("| ")[1]).parents
    events = log.read_text().split()
    assert "OVERLAP" not in events
    kinds = events[0::2]
    assert kinds == ["start", "end", "start", "end"], events
    assert events[1] == events[3] and events[5] == events[7] and events[1] != events[5]


# ----- threads -----------------------------------------------------------------------------------------
def _workloads():
    torch.manual_seed(0)
    d = 16
    adapter = pet_fast.BottleneckAdapter(d, 4, activation="gelu", scaling="channel").eval()
    with torch.no_grad():
        adapter.w_up.normal_()
    masked = pet_fast.MaskedLinear(d, 8, threshold=0.0).eval()
    with torch.no_grad():
        masked.scores.normal_()
    adapters = [pet_fast.BottleneckAdapter(d, 3) for _ in range(3)]
    fusion = pet_fast.AdapterFusion(d).eval()
    enc = pet_fast.PrefixEncoder(1, 2, 8, 3)
    side = pet_fast.SideTuning(torch.nn.Linear(d, d), torch.nn.Linear(d, d), 0.3).eval()
    xs = [torch.randn(3, 5, d) for _ in range(8)]
    qs = [torch.randn(2, 4, 5, 8) for _ in range(8)]

    def attention(i):
        (pk, pv), = enc(batch_size=2)
        kv = qs[(i + 1) % 8][:, :2]
        return pet_fast.prefix_attention(qs[i], kv, kv, pk, pv, causal=True)

    return [
        lambda i: adapter(xs[i]),
        lambda i: masked(xs[i]),
        lambda i: fusion.fuse(xs[i], xs[i], xs[i], adapters),
        lambda i: fusion(xs[i], torch.stack([xs[i], xs[(i + 1) % 8]], -2), xs[i]),
        attention,
        lambda i: side(xs[i]),
    ]


def test_modules_from_several_threads_match_serial():
    jobs = [(w, i) for w, _ in enumerate(_workloads()) for i in range(8)] * 3
    work = _workloads()
    with torch.inference_mode():
        serial = [work[w](i) for w, i in jobs]
        with ThreadPoolExecutor(max_workers=6) as pool:
            threaded = list(pool.map(lambda job: work[job[0]](job[1]), jobs))
    for (w, i), a, b in zip(jobs, serial, threaded):
        assert torch.equal(a, b), f"workload {w} input {i} differs when run from threads"


def test_use_backend_in_one_thread_does_not_leak_into_another():
    """``use_backend`` is per thread: a thread inside ``use_backend("cuda")`` (which cannot run CPU
    tensors) must not change what another thread's ``auto`` calls pick."""
    inside, done = threading.Event(), threading.Event()
    seen = {}

    def holder():
        with pet_fast.use_backend("cuda"):
            seen["holder"] = dispatch.requested()
            inside.set()
            done.wait(30)

    t = threading.Thread(target=holder)
    t.start()
    try:
        assert inside.wait(30)
        seen["other"] = dispatch.requested()
        x = torch.randn(3, 8)
        out = pet_fast.bottleneck_adapter(x, torch.randn(4, 8), None, torch.randn(8, 4), None)  # auto: eager
        assert out.shape == x.shape
    finally:
        done.set()
        t.join()
    assert seen["holder"] == ("cuda", "use_backend()")
    assert seen["other"] == ("auto", "default")
    assert dispatch.requested() == ("auto", "default")


def test_prefix_masks_built_under_inference_mode_stay_out_of_other_threads_graphs():
    """The eager prefix backend reuses a forward's masks across layers: a mask built under inference_mode
    (in one thread) must not reach a graph that records gradients (another thread, or later)."""
    q, k = torch.randn(2, 4, 5, 8), torch.randn(2, 4, 5, 8)
    pk = torch.randn(4, 3, 8, requires_grad=True)
    with torch.inference_mode():
        pet_fast.prefix_attention(q, k, k, pk, pk, causal=True, backend="eager")
    with ThreadPoolExecutor(max_workers=1) as pool:
        out = pool.submit(lambda: pet_fast.prefix_attention(q, k, k, pk, pk, causal=True, backend="eager")).result()
    out.sum().backward()
    out2 = pet_fast.prefix_attention(q, k, k, pk, pk, causal=True, backend="eager")
    out2.sum().backward()
    assert pk.grad is not None and torch.isfinite(pk.grad).all()


# ----- one injected model served from several threads: state kept per thread ------------------------------
def _start_and_join(threads, hook) -> None:
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        hook.remove()


def _two_threads(first, second, pause_module):
    """Runs first() in thread A and second() in thread B so that B runs whole while A waits at
    ``pause_module``'s forward (after A's earlier layers). Returns (A's result, B's result), exceptions
    included."""
    out, at_pause, b_done = {}, threading.Event(), threading.Event()

    def pre(module, args):
        if threading.current_thread().name == "A" and not at_pause.is_set():
            at_pause.set()
            b_done.wait(30)
    hook = pause_module.register_forward_pre_hook(pre)

    def run(name, fn, wait=None):
        if wait is not None:
            wait.wait(30)
        try:
            out[name] = fn()
        except Exception as exc:  # noqa: BLE001 (reported by the test)
            out[name] = exc
        if name == "B":
            b_done.set()
    threads = [threading.Thread(target=run, name="A", args=("A", first)),
               threading.Thread(target=run, name="B", args=("B", second, at_pause))]
    _start_and_join(threads, hook)
    return out["A"], out["B"]


def test_parallel_adapters_hand_each_thread_its_own_norm_input():
    from tiny_models import batch, build

    model = build("gpt2")
    pet_fast.inject(model, pet_fast.AdapterConfig(placement="parallel", init="bert"), "t")
    (a_ids, a_mask), (b_ids, b_mask) = batch(seed=1), batch(seed=2)
    run = lambda ids, mask: model(input_ids=ids, attention_mask=mask).logits  # noqa: E731
    with torch.no_grad():
        want_a, want_b = run(a_ids, a_mask), run(b_ids, b_mask)
        # A pauses between layer 0's norm (which hands its input to the MLP's parallel adapter) and the MLP
        got_a, got_b = _two_threads(lambda: run(a_ids, a_mask), lambda: run(b_ids, b_mask),
                                    model.transformer.h[0].mlp)
    torch.testing.assert_close(got_a, want_a, rtol=0, atol=0)
    torch.testing.assert_close(got_b, want_b, rtol=0, atol=0)


def test_a_mixed_mask_block_belongs_to_its_thread():
    from tiny_models import batch, build

    model = build("bert")
    for n in ("t1", "t2"):
        pet_fast.inject(model, pet_fast.MaskConfig(), n)
        g = torch.Generator().manual_seed(len(n) + int(n[1]))
        with torch.no_grad():
            for p in pet_fast.task_parameters(model, n).values():
                p.copy_(torch.randn(p.shape, generator=g))
    model.eval()
    pet_fast.pack_for_serving(model)
    pet_fast.set_active(model, "t1")
    ids, mask = batch()
    run = lambda: model(input_ids=ids, attention_mask=mask).logits  # noqa: E731
    with torch.no_grad():
        want_t1 = run()

        def mixed():
            with pet_fast.mixed_mask_tasks(model, ["t1", "t2"], [1, 1, 1]):
                return run()
        got_mixed, got_plain = _two_threads(mixed, run, model.bert.encoder.layer[1])
        pet_fast.set_active(model, "t2")
        want_t2 = run()
    torch.testing.assert_close(got_plain, want_t1, rtol=0, atol=0)  # B ran outside any block: its active task
    torch.testing.assert_close(got_mixed, want_t2, rtol=0, atol=0)
    assert pet_fast.tasks.registry(model).mixed is None


def test_a_side_task_in_training_keeps_each_threads_base_in_eval_mode():
    """The base's training flags are the model's: a thread leaving the base first must not turn dropout back on
    (BERT's hidden dropout, 0.1) inside another thread's base. A enters the base, B enters it, A leaves, then B
    runs its remaining layers."""
    from tiny_models import batch, build

    model = build("bert", head="base")
    pet_fast.inject(model, pet_fast.SideConfig(width=16, heads=2, alpha=1.0), "s")  # output = the base's
    model.train()
    (a_ids, a_mask), (b_ids, b_mask) = batch(seed=1), batch(seed=2)
    run = lambda ids, mask: model(input_ids=ids, attention_mask=mask).last_hidden_state  # noqa: E731
    with torch.no_grad():
        want_b = run(b_ids, b_mask)  # deterministic: the base runs in eval mode
    b_inside, a_done, out = threading.Event(), threading.Event(), {}

    def pre(module, args):
        name = threading.current_thread().name
        if name == "A":
            b_inside.wait(30)  # A, inside its base, waits until B is inside too
        elif name == "B" and not b_inside.is_set():
            b_inside.set()
            a_done.wait(30)  # B waits inside its base until A has left
    hook = model.encoder.layer[1].register_forward_pre_hook(pre)

    def thread(name, ids, mask):
        with torch.no_grad():
            out[name] = run(ids, mask)
        if name == "A":
            a_done.set()
    threads = [threading.Thread(target=thread, name=n, args=(n, i, m)) for n, i, m in (("A", a_ids, a_mask),
                                                                                       ("B", b_ids, b_mask))]
    _start_and_join(threads, hook)
    torch.testing.assert_close(out["B"], want_b, rtol=0, atol=0)
    assert all(m.training for m in model.modules())  # every flag back as the caller left it


def test_example_ids_given_in_one_thread_are_not_another_threads():
    """B's forward, outside any example_ids block, runs while A is inside one: it has no ids (it took A's, and its
    batch was cached under them)."""
    from tiny_models import batch, build

    model = build("bert")
    model.eval()
    pet_fast.inject(model, pet_fast.SideConfig(width=16, heads=2, cache=True), "s")
    branch = model.bert.pet_fast_tasks["s"]
    (a_ids, a_mask), (b_ids, b_mask) = batch(seed=1), batch(seed=2)

    def with_ids():
        with pet_fast.example_ids(model, [10, 11, 12]):
            return model(input_ids=a_ids, attention_mask=a_mask).logits

    def without():
        model(input_ids=b_ids, attention_mask=b_mask)
        return set(branch.cache)  # A, paused in its base, has stored nothing yet
    with torch.no_grad():
        got_a, cached_when_b_ended = _two_threads(with_ids, without, model.bert.encoder)
    assert not isinstance(got_a, Exception), got_a
    assert cached_when_b_ended == set()
    assert set(branch.cache) == {10, 11, 12}
