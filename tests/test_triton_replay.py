"""Recorded Triton launches replayed from C++ (kernels/_replay.py, csrc/triton_replay.cpp).

On the CPU, under the Triton interpreter: the adapter launchers are recorded on one set of inputs; the
recording, run on *other* inputs with the same key (fresh allocations, each kernel called with the
recorded scalars, grid and constexprs, its tensors rebuilt from slots and offsets), must give exactly
what the launcher gives on those inputs; and the C++ program's dry run (a CPU-only build of
csrc/triton_replay.cpp) must pass each kernel the same scalars and the new inputs' addresses. What the
CPU cannot check is the launch itself (cuLaunchKernel on the compiled kernels): the GPU tests at the
end compare replayed calls with launches from Python on a GPU."""
import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch


R = importlib.import_module("pet_fast.kernels._replay")
K = importlib.import_module("pet_fast.kernels.bottleneck_adapter")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def ext(replay_ext):
    return replay_ext


def _adapter(n, d, r, dtype, seed, bias=True, scaling="channel", residual=True):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    t = dict(x=rnd(n, d), w_down=rnd(r, d) * d ** -0.5, b_down=rnd(r) if bias else None, w_up=rnd(d, r) * r ** -0.5,
             b_up=rnd(d) if bias else None, scaling=rnd(d) if scaling == "channel" else None,
             residual=rnd(n, d) if residual else None, dy=rnd(n, d))
    return t


def _fwd_args(t, act="gelu", add_input=True, scaling_value=1.0):
    return (t["x"], t["w_down"], t["b_down"], t["w_up"], t["b_up"], t["scaling"], scaling_value, t["residual"], act,
            add_input and t["residual"] is not None, None, None)


def _bwd_args(t, act="gelu", need_ds=True):
    return (t["dy"], t["x"], t["w_down"], t["b_down"], t["w_up"], t["b_up"], t["scaling"], 1.0,
            t["residual"] is not None, act, need_ds and t["scaling"] is not None, True, None, None)


def _fwd_inputs(t):
    return [t["x"], t["w_down"], t["b_down"], t["w_up"], t["b_up"], t["scaling"], t["residual"], None, None]


def _bwd_inputs(t):
    return [t["dy"], t["x"], t["w_down"], t["b_down"], t["w_up"], t["b_up"], t["scaling"], None, None]


def _same(a, b):
    if isinstance(a, tuple):
        assert len(a) == len(b)
        for u, v in zip(a, b):
            _same(u, v)
    elif a is None:
        assert b is None
    else:
        assert a.shape == b.shape and a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=0, atol=0)


CASES = [(37, 24, 5, torch.float32, True, "channel", True), (70, 33, 16, torch.float16, False, None, False),
         (5, 64, 7, torch.float32, True, None, True)]


@pytest.mark.parametrize("n,d,r,dtype,bias,scaling,residual", CASES)
def test_recorded_launches_on_new_inputs_give_the_launchers_results(n, d, r, dtype, bias, scaling, residual):
    first, second = (_adapter(n, d, r, dtype, s, bias, scaling, residual) for s in (0, 1))
    for fn, args, inputs, single in [(K._forward, _fwd_args, _fwd_inputs, True),
                                     (K._backward, _bwd_args, _bwd_inputs, False)]:
        R._local.rec = rec = R.Recording(inputs(first))
        try:
            out1 = fn(*args(first))
        finally:
            R._local.rec = None
        assert rec.refusal is None and rec.launches
        replayed = rec.execute(inputs(second), out1, single)
        _same(replayed, fn(*args(second)))
        assert R.key_of(*args(first)) == R.key_of(*args(second))


@pytest.mark.parametrize("n,d,r,dtype,bias,scaling,residual", CASES)
def test_the_cpp_program_passes_the_new_inputs_and_the_recorded_scalars(ext, n, d, r, dtype, bias, scaling, residual):
    first, second = (_adapter(n, d, r, dtype, s, bias, scaling, residual) for s in (0, 1))
    for fn, args, inputs, single in [(K._forward, _fwd_args, _fwd_inputs, True),
                                     (K._backward, _bwd_args, _bwd_inputs, False)]:
        out1, entry = R.record(inputs(first), fn, *args(first), single=single, ext=ext)
        assert isinstance(entry, R.Entry), entry
        R._local.rec = rec = R.Recording(inputs(second))  # the launches' arguments on the new inputs
        try:
            out2 = fn(*args(second))
        finally:
            R._local.rec = None
        outs, params = entry.program.params(inputs(second))
        assert entry.program.n_launches == len(rec.symbolic) == len(params)
        for (kernel, grid, named, consts, kept), values in zip(rec.symbolic, params):
            recorded = [named[k] for k in kept]
            assert len(recorded) == len(values)  # (no trailing scratch pointers under the interpreter)
            for want, got in zip(recorded, values):
                if isinstance(want, tuple):  # a tensor: an input's address plus the offset, or a fresh buffer
                    slot = rec.renumber(want[1])
                    if slot < len(rec.inputs):
                        assert got == rec.inputs[slot].data_ptr() + want[2]
                    else:
                        assert isinstance(got, int) and got != 0 or slot < len(rec.inputs) + len(rec.constants)
                else:
                    assert got == pytest.approx(want, rel=1e-7) if isinstance(want, float) else got == want
        # the outputs: fresh tensors of the launcher's shapes and dtypes (their values need the kernels)
        want = [out2] if single else list(out2)
        assert len(outs) == len(want)
        for o, w in zip(outs, want):
            assert (o is None) == (w is None)
            if o is not None:
                assert o.shape == w.shape and o.dtype == w.dtype and o.data_ptr() != w.data_ptr()


F = importlib.import_module("pet_fast.kernels.stacked_adapter_fusion")


def _fusion(n, d, r, k, dtype, seed, bias=True):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    return dict(x=rnd(n, d), qk=rnd(n, d), w_down=rnd(k, r, d) * d ** -0.5, b_down=rnd(k, r) if bias else None,
                w_up=rnd(k, d, r) * r ** -0.5, b_up=rnd(k, d) if bias else None, dctx=rnd(n, d))


@pytest.mark.parametrize("n,d,r,k,dtype,bias", [(37, 24, 5, 3, torch.float32, True), (20, 40, 8, 2, torch.float16, False)])
def test_recorded_fusion_launches_on_new_inputs_give_the_launchers_results(ext, n, d, r, k, dtype, bias):
    first, second = (_fusion(n, d, r, k, dtype, s, bias) for s in (0, 1))
    fwd = lambda t: (t["x"], t["qk"], t["w_down"], t["b_down"], t["w_up"], t["b_up"], None, 1.0, "relu", 0.5)  # noqa: E731
    fwd_in = lambda t: [t["x"], t["qk"], t["w_down"], t["b_down"], t["w_up"], t["b_up"], None]  # noqa: E731
    saved = {}
    for name, t in (("first", first), ("second", second)):
        saved[name] = F._forward(*fwd(t))
    R._local.rec = rec = R.Recording(fwd_in(first))
    try:
        out1 = F._forward(*fwd(first))
    finally:
        R._local.rec = None
    assert rec.refusal is None
    _same(rec.execute(fwd_in(second), out1, False), saved["second"])
    _, entry = R.record(fwd_in(first), F._forward, *fwd(first), single=False, ext=ext)
    assert isinstance(entry, R.Entry), entry

    bwd = lambda t, a, p: (t["dctx"], *fwd(t)[:6], None, 1.0, "relu", 0.5, a, p, False, True)  # noqa: E731
    bwd_in = lambda t, a, p: [t["dctx"], t["x"], t["qk"], t["w_down"], t["b_down"], t["w_up"], t["b_up"], None, a, p]  # noqa: E731
    a1, p1 = saved["first"][1:]
    a2, p2 = saved["second"][1:]
    R._local.rec = rec = R.Recording(bwd_in(first, a1, p1))
    try:
        out1 = F._backward(*bwd(first, a1, p1))
    finally:
        R._local.rec = None
    assert rec.refusal is None
    _same(rec.execute(bwd_in(second, a2, p2), out1, False), F._backward(*bwd(second, a2, p2)))
    _, entry = R.record(bwd_in(first, a1, p1), F._backward, *bwd(first, a1, p1), single=False, ext=ext)
    assert isinstance(entry, R.Entry), entry


def test_a_scalar_scaling_gradient_is_not_recorded(ext):
    t = _adapter(9, 16, 4, torch.float32, 0, scaling=None)
    t["scaling"] = torch.tensor(0.5)
    _, why = R.record(_bwd_inputs(t), K._backward, *_bwd_args(t), single=False, ext=ext)
    assert isinstance(why, str) and "scalar scaling" in why


def test_a_kernel_reading_a_foreign_tensor_is_not_recorded(ext):
    t = _adapter(9, 16, 4, torch.float32, 0)
    inputs = _fwd_inputs(t)
    inputs[1] = None  # w_down not declared as an input: the kernel reads a tensor the program cannot find
    _, why = R.record(inputs, K._forward, *_fwd_args(t), single=True, ext=ext)
    assert isinstance(why, str) and "not an input" in why


def test_overlapping_inputs_are_not_recorded(ext):
    t = _adapter(9, 16, 4, torch.float32, 0)
    t["residual"] = t["x"][1:]  # overlaps x: a replay on separate tensors would read the wrong one
    t["x"] = t["x"][:-1]
    _, why = R.record(_fwd_inputs(t), K._forward, *_fwd_args(t), single=True, ext=ext)
    assert isinstance(why, str) and "overlap" in why


def test_replay_refuses_an_unaligned_input_where_the_recording_was_aligned(ext):
    t = _adapter(9, 16, 4, torch.float32, 0)
    _, entry = R.record(_fwd_inputs(t), K._forward, *_fwd_args(t), single=True, ext=ext)
    inputs = _fwd_inputs(t)
    inputs[0] = torch.empty(9 * 16 + 1)[1:].view(9, 16).copy_(t["x"])  # 4 bytes past an aligned address
    assert entry.program.params(inputs) is None
    assert entry.program.params(_fwd_inputs(t)) is not None


def test_the_program_checks_its_inputs(ext):
    t = _adapter(9, 16, 4, torch.float32, 0)
    _, entry = R.record(_fwd_inputs(t), K._forward, *_fwd_args(t), single=True, ext=ext)
    with pytest.raises(RuntimeError, match="expected 9 inputs"):
        entry.program.params(_fwd_inputs(t)[:-1])
    inputs = _fwd_inputs(t)
    inputs[1] = None
    with pytest.raises(RuntimeError, match="absent but a kernel reads it"):
        entry.program.params(inputs)
    if not ext.triton_replay_can_launch:
        with pytest.raises(RuntimeError, match="no CUDA launcher"):
            entry.program.run(_fwd_inputs(t))


def test_ptx_param_count_reads_the_entry_point():
    ptx = (".version 8.7\n.target sm_90a\n.visible .entry k(\n\t.param .u64 .ptr .global .align 1 k_param_0,\n"
           "\t.param .u32 k_param_1,\n\t.param .f32 k_param_2,\n\t.param .u64 .ptr .global .align 1 k_param_3\n)\n"
           ".reqntid 128\n{\n}")
    assert R.ptx_param_count(ptx) == 4


def _fake_compiled(ptx_params, **metadata):
    """What a GPU launch hands the recording: the compiled kernel's signature, launch metadata, function
    handle and PTX (``ptx_params`` entry parameters; None: Triton kept the binary only)."""
    from types import SimpleNamespace

    md = dict(num_warps=4, shared=0, num_ctas=1, launch_cooperative_grid=False, launch_pdl=False,
              global_scratch_size=0, profile_scratch_size=0)
    md.update(metadata)
    ptx = ".visible .entry k(" + ",".join(f"\n .param .u64 p{i}" for i in range(ptx_params or 0)) + "\n)"
    return SimpleNamespace(src=SimpleNamespace(signature={"PART": "*fp32", "O0": "*fp32", "n": "i32", "BLOCK": "constexpr"}),
                           metadata=SimpleNamespace(**md), function=1234,
                           asm={} if ptx_params is None else {"ptx": ptx})


def _copy_kernel_launch(compiled):
    import triton
    import triton.language as tl

    @triton.jit
    def copy_kernel(PART, O0, n, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(O0 + offs, tl.load(PART + offs, mask=offs < n), mask=offs < n)

    x, y = torch.zeros(8), torch.zeros(8)
    rec = R.Recording([x, y])
    return rec._launch(copy_kernel, (1,), compiled, (x, y, 5), {"BLOCK": 8})


@pytest.mark.parametrize("ptx_params", [5, None])
def test_a_gpu_launch_is_recorded_with_two_null_scratch_pointers(ptx_params):
    """The GPU branch of the recording with a compiled kernel's facts: its 3 parameters, then Triton's two
    scratch pointers as null, 32 threads per warp; with no PTX in the cache (binaries only) the count
    alone."""
    function, grid, threads, shared, params, _ = _copy_kernel_launch(_fake_compiled(ptx_params))
    assert (function, grid, threads, shared) == (1234, [1, 1, 1], 128, 0)
    assert [p[0] for p in params] == [R.KINDS["ptr_aligned"]] * 2 + [R.KINDS["i32"]] + [R.KINDS["null"]] * 2


@pytest.mark.parametrize("ptx_params, metadata, why", [
    (6, {}, "PTX entry takes 6 parameters"),  # e.g. instrumentation arguments: nulls would fault
    (4, {}, "PTX entry takes 4 parameters"),
    (5, {"num_ctas": 2}, "clusters"),
    (5, {"launch_pdl": True}, "PDL"),
    (5, {"global_scratch_size": 64}, "scratch memory"),
    (5, {"shared": 229 * 1024}, "bytes of shared memory"),
])
def test_a_gpu_launch_the_replay_cannot_make_is_refused(ptx_params, metadata, why):
    with pytest.raises(R.Unrecordable, match=why):
        _copy_kernel_launch(_fake_compiled(ptx_params, **metadata))


def test_a_gpu_launch_without_a_compiled_kernel_is_refused(monkeypatch):
    """A compiled (not interpreted) kernel's launch that returned no compiled kernel (a cache hook that
    vetoed the compilation, say) is not recorded as an interpreter launch (function 0)."""
    _copy_kernel_launch(None)  # interpreted: recorded
    monkeypatch.setattr(R, "_interpreted", lambda kernel: False)
    with pytest.raises(R.Unrecordable, match="no compiled kernel"):
        _copy_kernel_launch(None)


def test_compiled_kernels_take_two_scratch_pointers_after_their_parameters():
    """What the replay appends as null pointers: a kernel compiled for sm_90 here (no GPU needed; in a
    process without the interpreter) takes its non-constexpr parameters, then Triton's global and
    profile scratch pointers."""
    code = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from pet_fast.kernels import _replay as R, bottleneck_adapter as K
jit = K._sum_splits_kernel
names = jit.arg_names
sig = {n: "constexpr" if n == "BLOCK" else ("*fp32" if n in ("PART", "O0", "O1", "O2", "O3", "O4") else "i32")
       for n in names}
src = ASTSource(fn=jit, signature=sig, constexprs={(names.index("BLOCK"),): 1024}, attrs={})
compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4))
print(R.ptx_param_count(compiled.asm["ptx"]), sum(t != "constexpr" for t in sig.values()))
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    in_ptx, kept = map(int, out.stdout.split())
    assert in_ptx == kept + 2


_PTX_CHECK = """
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton._C.libtriton import native_specialize_impl
from triton.backends.compiler import BaseBackend
from pet_fast.kernels import _replay as R, bottleneck_adapter as K

captured = []
R.launch = lambda kernel, grid, *a, **k: captured.append((kernel, a, k))  # what the launchers pass, not run
g = torch.Generator().manual_seed(0)
n, d, r = 37, 48, 1  # r = 1: an integer argument Triton specialises into a constexpr
mk = lambda *s, dt=torch.bfloat16: torch.randn(*s, generator=g).to(dt)
x, wd, bd, wu, bu, res, dy = mk(n, d), mk(r, d), mk(r), mk(d, r), mk(d), mk(n, d, dt=torch.float32), mk(n, d)
K._forward(x, wd, bd, wu, bu, None, 0.5, res, "gelu", True, None, None)
K._backward(dy, x, wd, bd, wu, bu, None, 0.5, False, "gelu", False, True, None, None)
for kernel, args, kwargs in captured:
    jit = R._jit_function(kernel)
    cfg = kernel.configs[0] if hasattr(kernel, "configs") else None
    kw = dict(kwargs)
    if cfg is not None:
        kw.update(cfg.kwargs)
    names = [p.name for p in jit.params]
    values = dict(zip(names, args)); values.update({k: v for k, v in kw.items() if k in names})
    types = R.binder_types(jit, values)
    sig, consts, attrs = {}, {}, {}
    for i, p in enumerate(jit.params):
        if types[p.name] == "constexpr":
            sig[p.name] = "constexpr"; consts[(i,)] = values[p.name]
        else:
            sig[p.name] = types[p.name]
            key = native_specialize_impl(BaseBackend, values[p.name], p.is_const, True, True)[1]
            if key == "D":
                attrs[(i,)] = [["tt.divisibility", 16]]
    warps = kw.get("num_warps", cfg.num_warps if cfg is not None else 4)
    compiled = triton.compile(ASTSource(fn=jit, signature=sig, constexprs=consts, attrs=attrs),
                              target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps))
    kept = sum(t != "constexpr" for t in sig.values())
    print(jit.__name__ if hasattr(jit, "__name__") else jit.fn.__name__, R.ptx_param_count(compiled.asm["ptx"]), kept,
          "R" if types.get("R") == "constexpr" else "")
"""


def test_the_adapter_kernels_compiled_for_sm90_take_the_recorded_parameters_and_two_scratch_pointers():
    """The launches the adapter's launchers make (captured, not run), compiled for sm_90 with the binder's
    specialisation (r = 1 turns an integer argument into a constexpr): each PTX entry takes exactly the
    parameters a recording keeps, in order, plus the two scratch pointers the replay passes as null."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", _PTX_CHECK], capture_output=True, text=True, env=env, cwd=ROOT,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [ln.split() for ln in out.stdout.splitlines() if ln.strip()]
    assert [ln[0] for ln in lines] == ["_fwd_kernel", "_bwd_rows_kernel", "_bwd_cols_kernel", "_sum_splits_kernel"]
    for name, in_ptx, kept, *flag in lines:
        assert int(in_ptx) == int(kept) + 2, name
    assert all(ln[3:] == ["R"] for ln in lines[:3])  # r = 1 was specialised away, and not recorded


def test_launchers_run_unchanged_without_a_recording():
    t = _adapter(9, 16, 4, torch.float32, 0)
    assert getattr(R._local, "rec", None) is None
    a = K.forward(*_fwd_args(t))
    b = K._forward(*_fwd_args(t))
    _same(a, b)


def _fresh_gpu_programs():
    """A GPU test's start: the extension loaded (else skip), every recorded program forgotten."""
    if R._extension() is None:
        pytest.skip("the CUDA extension is not available")
    R._clear_caches()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gpu_replayed_calls_match_launches_from_python(dtype):
    _fresh_gpu_programs()
    for n, d, r in [(4096, 768, 64), (1000, 1024, 16), (37, 200, 5)]:
        tensors = [_adapter(n, d, r, dtype, s) for s in range(3)]
        for t in tensors:
            for k, v in t.items():
                if v is not None:
                    t[k] = v.cuda()
        for i, t in enumerate(tensors):  # the first call records, the next ones replay
            _same(K.forward(*_fwd_args(t)), K._forward(*_fwd_args(t)))
            _same(K.backward(*_bwd_args(t)), K._backward(*_bwd_args(t)))
        entry = K._FORWARD_PROGRAMS[R.key_of(*_fwd_args(tensors[0]))]
        assert isinstance(entry, R.Entry), "the forward was not recorded"
        assert isinstance(K._BACKWARD_PROGRAMS[R.key_of(*_bwd_args(tensors[0]))], R.Entry)
    torch.cuda.synchronize()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_replayed_fusion_calls_match_launches_from_python(dtype):
    _fresh_gpu_programs()
    for n, d, r, k in [(4096, 768, 64, 3), (300, 200, 7, 2)]:
        for seed in range(3):  # the first call records, the next ones replay
            t = {name: (v.cuda() if v is not None else None) for name, v in _fusion(n, d, r, k, dtype, seed).items()}
            args = (t["x"], t["qk"], t["w_down"], t["b_down"], t["w_up"], t["b_up"], None, 1.0, "relu", 0.5)
            out = F.forward(*args)
            _same(out, F._forward(*args))
            bargs = (t["dctx"], *args, out[1], out[2], False, True)
            _same(F.backward(*bargs), F._backward(*bargs))
        assert isinstance(F._FORWARD_PROGRAMS[R.key_of(*args)], R.Entry), "the forward was not recorded"
        assert isinstance(F._BACKWARD_PROGRAMS[R.key_of(*bargs)], R.Entry), "the backward was not recorded"
    torch.cuda.synchronize()


# --- whole ops through replayed programs on the CPU ----------------------------------------------
# Inside _replay.through_interpreter the launchers record CPU calls too and replay them with the C++
# program (allocations, slots, outputs), its launches run from Python under the interpreter: every
# second call below goes through TritonProgram.run.

REPLAYED = [((3, 7), 45, 5, torch.float32, "gelu", dict(scaling="channel", residual=True, add_input=True)),
            ((37,), 70, 17, torch.float32, "silu", dict(scaling="number")),
            ((21,), 77, 9, torch.float16, "relu", dict(scaling="channel", residual=True)),
            ((12,), 40, 6, torch.float32, "relu", dict(scaling="channel", layer_norm="affine"))]


@pytest.mark.parametrize("n_shape,d,r,dtype,act,kw", REPLAYED)
def test_adapter_op_through_replayed_programs_matches_the_reference(ext, n_shape, d, r, dtype, act, kw):
    tk = importlib.import_module("test_kernels_bottleneck_adapter")
    with R.through_interpreter(ext):
        for _ in range(2):  # records, then replays
            tk.check_against_reference(n_shape, d, r, dtype, act, **kw)
        fwd = [e for e in K._FORWARD_PROGRAMS.values() if isinstance(e, R.Entry)]
        bwd = [e for e in K._BACKWARD_PROGRAMS.values() if isinstance(e, R.Entry)]
        assert fwd and bwd, (K._FORWARD_PROGRAMS, K._BACKWARD_PROGRAMS)
    assert not K._FORWARD_PROGRAMS and not K._BACKWARD_PROGRAMS  # emptied on the way out


def test_replayed_adapter_calls_give_the_python_launches_bits(ext):
    t = [_adapter(50, 48, 12, torch.float16, s) for s in range(3)]
    want = [(K._forward(*_fwd_args(u)), K._backward(*_bwd_args(u))) for u in t]
    with R.through_interpreter(ext):
        for u, (y, g) in zip(t, want):
            _same(K.forward(*_fwd_args(u)), y)
            _same(K.backward(*_bwd_args(u)), g)
        entry = K._FORWARD_PROGRAMS[R.key_of(*_fwd_args(t[0]))]
        assert isinstance(entry, R.Entry)
        calls = []
        entry.program.set_launcher(lambda i, slots: calls.append(i))
        K.forward(*_fwd_args(t[1]))
        assert calls == [0]  # the cached program ran: one launch


def test_an_unaligned_input_runs_the_python_launch(ext):
    t = _adapter(9, 16, 4, torch.float32, 0)
    with R.through_interpreter(ext):
        K.forward(*_fwd_args(t))  # records
        u = dict(t)
        u["x"] = torch.empty(9 * 16 + 1)[1:].view(9, 16).copy_(t["x"])
        entry = K._FORWARD_PROGRAMS[R.key_of(*_fwd_args(t))]
        calls = []
        entry.program.set_launcher(lambda i, slots: calls.append(i))
        _same(K.forward(*_fwd_args(u)), K._forward(*_fwd_args(u)))
        assert calls == []  # declined by the program: the launcher ran from Python


@pytest.mark.parametrize("kw", [dict(residual=True, add_input=True), dict(residual=True), dict(layer_norm="affine"),
                                dict(scaling="scalar")])
def test_the_cpp_autograd_node_takes_later_calls_and_matches_the_function(ext, kw):
    """Once a call through the autograd.Function recorded both launchers, later calls with the same key run
    as one C++ node (forward program here, backward program in the engine): the same output and
    gradients, bit for bit, as the Function's."""
    tk = importlib.import_module("test_kernels_bottleneck_adapter")
    ops = [tk.make_case((2, 13), 40, 6, torch.float16, seed=s, **kw)[1] for s in range(3)]
    dy = torch.randn(2, 13, 40, generator=torch.Generator().manual_seed(3)).half()
    want = []
    for ts in ops:
        ts2 = {k: (v.detach().clone().requires_grad_() if isinstance(v, torch.Tensor) else v) for k, v in ts.items()}
        out = tk.call(ts2, "gelu", "triton")
        assert "ReplayBackward" not in type(out.grad_fn).__name__
        want.append((out, tk.grads(ts2, out, dy)))
    with R.through_interpreter(ext):
        names = []
        for ts, (y, g) in zip(ops, want):
            out = tk.call(ts, "gelu", "triton")
            node = out.grad_fn
            while node.name() in ("ViewBackward0", "ReshapeAliasBackward0", "UnsafeViewBackward0"):
                node = node.next_functions[0][0]  # the op's output is reshaped to x's shape
            names.append(node.name())
            _same(out, y)
            got = tk.grads(ts, out, dy)
            assert set(got) == set(g)
            for k in g:
                _same(got[k], g[k])
    # the first call records through the Function; scalar scalings keep it (their gradient is a torch sum)
    if kw.get("scaling") == "scalar":
        assert "BottleneckAdapterBackward" not in names
    else:
        assert names[0] != "BottleneckAdapterBackward" and names[1:] == ["BottleneckAdapterBackward"] * 2, names


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kw", [dict(residual=True, add_input=True), dict(layer_norm="affine")])
def test_gpu_cpp_autograd_node_matches_the_function(dtype, kw):
    _fresh_gpu_programs()
    tk = importlib.import_module("test_kernels_bottleneck_adapter")
    ops = [tk.make_case((32, 128), 768, 64, dtype, "cuda", seed=s, **kw)[1] for s in range(3)]
    dy = torch.randn(32, 128, 768, generator=torch.Generator().manual_seed(3)).to("cuda", dtype)
    names = []
    for ts in ops:
        ts2 = {k: (v.detach().clone().requires_grad_() if isinstance(v, torch.Tensor) else v) for k, v in ts.items()}
        with R.disabled():
            y = tk.call(ts2, "silu", "triton")
            g = tk.grads(ts2, y, dy)
        out = tk.call(ts, "silu", "triton")
        node = out.grad_fn
        while node.name() in ("ViewBackward0", "ReshapeAliasBackward0", "UnsafeViewBackward0"):
            node = node.next_functions[0][0]
        names.append(node.name())
        _same(out, y)
        got = tk.grads(ts, out, dy)
        for k in g:
            _same(got[k], g[k])
    assert names[1:] == ["BottleneckAdapterBackward"] * 2, names


def test_the_cpp_autograd_node_keeps_only_what_its_backward_reads(ext):
    """The residual (and the output's own storage) are not saved: the node holds x and the adapter's
    parameters, as the autograd.Function does."""
    import gc
    import weakref

    t = _adapter(20, 32, 4, torch.float32, 0)
    ps = {k: (v.requires_grad_() if k in ("x", "w_down", "b_down", "w_up", "b_up") else v) for k, v in t.items()}
    args = lambda res: (ps["x"], ps["w_down"], ps["b_down"], ps["w_up"], ps["b_up"], None, 1.0, res, "gelu", True)  # noqa: E731
    call = lambda res: K.node_call(*args(res))(ps["x"], ps["w_down"], ps["b_down"], ps["w_up"], ps["b_up"], None,  # noqa: E731
                                               res, None)
    with R.through_interpreter(ext):
        res0 = torch.randn(20, 32)
        y = K.forward(ps["x"], ps["w_down"], ps["b_down"], ps["w_up"], ps["b_up"], None, 1.0, res0, "gelu", True)
        K.backward(torch.ones(20, 32), ps["x"].detach(), ps["w_down"], ps["b_down"], ps["w_up"], ps["b_up"], None, 1.0,
                   False, "gelu", False, True)
        res = torch.randn(20, 32)
        alive = weakref.ref(res)
        y = call(res)
        assert y is not None and y.grad_fn.name() == "BottleneckAdapterBackward"
        del res
        gc.collect()
        assert alive() is None
        g = torch.autograd.grad(y, [ps["x"], ps["w_down"]], torch.ones(20, 32))
        assert all(t is not None for t in g)


def test_the_op_remembers_the_node_per_call_signature(ext, monkeypatch):
    """After the calls that record both launchers, the op goes from its arguments to the C++ node (no
    launcher keys computed, no autograd.Function), and a signature it has not seen takes the Function."""
    tk = importlib.import_module("test_kernels_bottleneck_adapter")
    ops = importlib.import_module("pet_fast.ops.bottleneck_adapter")
    with R.through_interpreter(ext):
        for s in range(2):
            ts = tk.make_case((3, 11), 32, 4, torch.float32, seed=s, residual=True, add_input=True)[1]
            tk.call(ts, "relu", "triton").sum().backward()
        assert any(v for v in ops._NODES.values())
        monkeypatch.setattr(K, "node_call", lambda *a, **k: pytest.fail("the remembered node was not used"))
        ts = tk.make_case((3, 11), 32, 4, torch.float32, seed=5, residual=True, add_input=True)[1]
        out = tk.call(ts, "relu", "triton")
        # x goes in (3, 11, 32) and the output comes back so: no view nodes around the node
        assert out.grad_fn.name() == "BottleneckAdapterBackward"
        assert [f.name() for f, _ in out.grad_fn.next_functions if f is not None][0] == "torch::autograd::AccumulateGrad"
        out.sum().backward()
        assert ts["w_down"].grad is not None and ts["x"].grad is not None
    assert not ops._NODES  # emptied with the programs


def test_a_launchers_programs_are_capped(ext, monkeypatch):
    monkeypatch.setattr(R, "MAX_PROGRAMS", 3)
    with R.through_interpreter(ext):
        for n in range(1, 8):  # a new token count each call: a new key
            t = _adapter(n, 16, 4, torch.float32, n)
            K.forward(*_fwd_args(t))
            assert 1 <= len(K._FORWARD_PROGRAMS) <= 3


def _failing_launch(i, slots):
    raise RuntimeError("triton replay: cuLaunchKernel failed with CUresult 400")


def test_a_failing_replay_warns_and_falls_back_to_python_launches(ext):
    t = _adapter(9, 16, 4, torch.float32, 0)
    with R.through_interpreter(ext):
        K.forward(*_fwd_args(t))  # records
        key = R.key_of(*_fwd_args(t))
        K._FORWARD_PROGRAMS[key].program.set_launcher(_failing_launch)
        with pytest.warns(RuntimeWarning, match="launching from Python instead"):
            y = K.forward(*_fwd_args(t))
        _same(y, K._forward(*_fwd_args(t)))
        assert K._FORWARD_PROGRAMS[key] is R._REFUSED  # this key launches from Python from now on


def test_a_failing_node_warns_turns_replay_off_and_the_function_takes_over(ext):
    tk = importlib.import_module("test_kernels_bottleneck_adapter")
    try:
        with R.through_interpreter(ext):
            for s in range(2):
                ts = tk.make_case((3, 11), 32, 4, torch.float32, seed=s, residual=True, add_input=True)[1]
                tk.call(ts, "relu", "triton").sum().backward()
            for cache in R._CACHES:
                for e in cache.values():
                    if isinstance(e, R.Entry):
                        e.program.set_launcher(_failing_launch)
            ts = tk.make_case((3, 11), 32, 4, torch.float32, seed=7, residual=True, add_input=True)[1]
            with pytest.warns(RuntimeWarning, match="launching from Python instead"):
                out = tk.call(ts, "relu", "triton")
            assert not R.enabled()
            assert out.grad_fn.next_functions[0][0].name() != "BottleneckAdapterBackward"
            ref = tk.make_case((3, 11), 32, 4, torch.float32, seed=7, residual=True, add_input=True)[1]
            _same(out, tk.call(ref, "relu", "triton"))
    finally:
        R.set_enabled(True)


PA = importlib.import_module("pet_fast.kernels.prefix_attention")


def _prefix_case(seed, B=2, Hq=4, Hkv=2, L=5, S=9, P=3, D=16, shared=True, padded=True, dtype=torch.float32,
                 device="cpu"):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    q, k, v = rnd(B, Hq, L, D), rnd(B, Hkv, S, D), rnd(B, Hkv, S, D)
    pk, pv = (rnd(Hkv, P, D), rnd(Hkv, P, D)) if shared else (rnd(B, Hkv, P, D), rnd(B, Hkv, P, D))
    kpm = None
    if padded:
        kpm = torch.ones(B, S, dtype=torch.bool, device=device)
        kpm[0, :2] = False  # left padding in the first sequence
    return q, k, v, pk, pv, kpm


def _pa_forward_from_python(*args, **kwargs):
    """PA.forward's result with every launch from Python (its output transposed as forward returns it)."""
    out, lse = PA._forward(*args, **kwargs)
    return out.transpose(1, 2), lse


def _blhd(t):
    return t.transpose(1, 2).contiguous().transpose(1, 2)


@pytest.mark.parametrize("shared,padded,causal", [(True, True, False), (False, False, True), (True, False, True)])
def test_prefix_forward_through_replayed_programs_gives_the_launchers_bits(ext, shared, padded, causal):
    cases = [_prefix_case(s, shared=shared, padded=padded) for s in range(3)]
    want = [_pa_forward_from_python(*c, causal=causal) for c in cases]
    with R.through_interpreter(ext):
        for c, w in zip(cases, want):
            _same(PA.forward(*c, causal=causal), w)
        entry = PA._FORWARD_PROGRAMS[PA.forward_key(*cases[0], causal, None)]
        assert isinstance(entry, R.Entry), entry
        calls = []
        entry.program.set_launcher(lambda i, slots: calls.append(i))
        PA.forward(*cases[1], causal=causal)
        assert calls == [0]


@pytest.mark.parametrize("prefix,padded,causal,layout", [("shared", True, True, True), ("per_batch", False, True, False),
                                                         (None, True, False, False)])
def test_prefix_backward_through_replayed_programs_gives_the_launchers_bits(ext, prefix, padded, causal, layout):
    """The backward's four launches (delta, dk/dv with the prefix's partials, dq, the partials' sum; three
    without a prefix) recorded on a key's first call and replayed after: the launchers' bits, for
    contiguous inputs and for the (B, L, H, D) memory of projections."""
    def case(seed):
        q, k, v, pk, pv, kpm = _prefix_case(seed, shared=prefix == "shared", padded=padded)
        if prefix is None:
            pk = pv = None
        if layout:
            q, k, v = _blhd(q), _blhd(k), _blhd(v)
        out, lse = PA.forward(q, k, v, pk, pv, kpm, causal)
        gy = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).transpose(1, 2).contiguous()
        return gy.transpose(1, 2), q, k, v, pk, pv, kpm, out, lse, causal, None, None, None

    cases = [case(s) for s in range(2)]
    want = [PA.backward(*c[:10]) for c in cases]  # outside the block: every launch from Python
    with R.through_interpreter(ext):
        for c, w in zip(cases, want):
            _same(PA.backward(*c[:10]), w)
        gy, q = cases[0][:2]
        if gy.stride() != q.stride():  # as backward lays them out
            cases[0] = (gy.contiguous(), q.contiguous()) + cases[0][2:]
        entry = PA._BACKWARD_PROGRAMS[PA.backward_key(*cases[0])]
        assert isinstance(entry, R.Entry), entry
        calls = []
        entry.program.set_launcher(lambda i, slots: calls.append(i))
        PA.backward(*cases[1][:10])
        assert calls == ([0, 1, 2] if prefix is None else [0, 1, 2, 3])


def test_prefix_dropout_through_replayed_programs_reads_each_calls_seed(ext):
    """With attention dropout the seed tensor is an input of the recorded programs: each replayed forward
    and backward draws from its own call's seed (the launchers' bits with that seed), not the recording's."""
    c = _prefix_case(0)
    seeds = [torch.tensor([s], dtype=torch.int64) for s in (11, 12)]
    gy = torch.randn(c[0].shape, generator=torch.Generator().manual_seed(5))

    def run(seed):
        out, lse = PA.forward(*c, True, None, dropout_p=0.3, seed=seed)
        return (out, lse) + PA.backward(gy, *c, out, lse, True, None, dropout_p=0.3, seed=seed)

    want = [run(s) for s in seeds]  # outside the block: every launch from Python
    assert not torch.equal(want[0][0], want[1][0])
    with R.through_interpreter(ext):
        for s, w in zip(seeds, want):
            _same(run(s), w)
        key = PA.forward_key(*c, True, None, None, None, 0.3, seeds[0])
        assert isinstance(PA._FORWARD_PROGRAMS[key], R.Entry)
        assert key != PA.forward_key(*c, True, None)  # without dropout: another program


def test_a_query_in_another_layout_is_its_own_key(ext):
    """A query in the (B, L, H, D) memory of projections is read in place under its own key (the kernels take
    its strides); one whose rows are not contiguous is copied first, and then takes the contiguous key."""
    q, k, v, pk, pv, kpm = _prefix_case(0)
    qb = _blhd(q)
    qt = q.transpose(2, 3).contiguous().transpose(2, 3)  # same shape, rows not contiguous
    with R.through_interpreter(ext):
        PA.forward(q, k, v, pk, pv, kpm)  # records the contiguous key
        _same(PA.forward(qb, k, v, pk, pv, kpm), _pa_forward_from_python(qb, k, v, pk, pv, kpm))
        assert PA.forward_key(qb, k, v, pk, pv, kpm, False, None) != PA.forward_key(q, k, v, pk, pv, kpm, False, None)
        assert isinstance(PA._FORWARD_PROGRAMS[PA.forward_key(qb, k, v, pk, pv, kpm, False, None)], R.Entry)
        before = len(PA._FORWARD_PROGRAMS)
        _same(PA.forward(qt, k, v, pk, pv, kpm), _pa_forward_from_python(q, k, v, pk, pv, kpm))
        assert len(PA._FORWARD_PROGRAMS) == before


PAM = importlib.import_module("pet_fast.kernels.prefix_attention_merge")


@pytest.mark.parametrize("shared", [True, False])
def test_merged_prefix_path_through_replayed_programs_gives_the_launchers_bits(ext, shared):
    """The merged path's Triton halves (the forward's merge, the backward's prefix part and sum of partials)
    recorded on the first call of a key and replayed after: the same bits as launches from Python, for the
    (B, L, H, D) layout projections give (strided q) too; a layout with other strides is its own key."""
    def case(seed, layout):
        q, k, v, pk, pv, _ = _prefix_case(seed, Hkv=4, L=9, S=9, shared=shared, padded=False)
        if layout:
            q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
        return q, k, v, pk, pv

    for layout in (False, True):
        cases = [case(s, layout) for s in range(3)]
        want = []
        for q, k, v, pk, pv in cases:
            out, lse = PAM.forward(q, k, v, pk, pv, True, 0.25)
            want.append(((out, lse), PAM.backward(out * 0.5, q, k, v, pk, pv, out, lse, True, 0.25)))
        with R.through_interpreter(ext):
            for (q, k, v, pk, pv), (fwd, bwd) in zip(cases, want):
                out, lse = PAM.forward(q, k, v, pk, pv, True, 0.25)
                _same((out, lse), fwd)
                _same(PAM.backward(fwd[0] * 0.5, q, k, v, pk, pv, fwd[0], fwd[1], True, 0.25), bwd)
            assert any(isinstance(e, R.Entry) for e in PAM._MERGE_FORWARD_PROGRAMS.values())
            assert any(isinstance(e, R.Entry) for e in PAM._MERGE_BACKWARD_PROGRAMS.values())
            calls = []
            for e in list(PAM._MERGE_FORWARD_PROGRAMS.values()) + list(PAM._MERGE_BACKWARD_PROGRAMS.values()):
                if isinstance(e, R.Entry):
                    e.program.set_launcher(lambda i, slots: calls.append(i))
            q, k, v, pk, pv = cases[0]
            PAM.forward(q, k, v, pk, pv, True, 0.25)
            assert calls, "a recorded key launches through its program"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_replayed_merged_prefix_path_matches_launches_from_python(dtype):
    """The merged path's recorded merge and prefix-gradient launches, replayed through cuLaunchKernel, give
    the bits of launches from Python (the sequence part, torch's own kernels, runs the same either way;
    its backward's dq may use atomics, so the comparison takes the prefix part's inputs from one run)."""
    _fresh_gpu_programs()
    for layout in (False, True):
        for seed in range(3):
            q, k, v, pk, pv, _ = _prefix_case(seed, dtype=dtype, device="cuda", B=4, Hq=12, Hkv=12, L=128, S=128,
                                              P=20, D=64, padded=False)
            if layout:  # the (B, L, H, D) memory of projections
                q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
            with R.disabled():
                o_s, lse_s = PAM._flash_forward(q, k, v, True, 0.125)
                want = PAM._merge_forward(q, pk, pv, o_s, lse_s, 0.125)
                out = want[0].transpose(1, 2)  # allocated (B, L, H, D); the path's output is this view
                dq_s = torch.randn_like(q)
                want_b = PAM._merge_backward(out * 0.5, q, pk, pv, out, want[1], dq_s, 0.125)
            key = R.key_of(q, pk, pv, o_s, lse_s, 0.125) + PAM._strides(q, o_s, lse_s)
            got = R.call(PAM._MERGE_FORWARD_PROGRAMS, key, [q, pk, pv, o_s, lse_s], PAM._merge_forward, q, pk, pv,
                         o_s, lse_s, 0.125, single=False)
            _same(got, want)
            args = (out * 0.5, q, pk, pv, out, want[1], dq_s, 0.125)
            key = R.key_of(*args) + PAM._strides(args[0], q, dq_s)
            _same(R.call(PAM._MERGE_BACKWARD_PROGRAMS, key, [args[0], q, pk, pv, out, want[1], dq_s],
                         PAM._merge_backward, *args, single=False), want_b)
        assert any(isinstance(e, R.Entry) for e in PAM._MERGE_FORWARD_PROGRAMS.values())
        assert any(isinstance(e, R.Entry) for e in PAM._MERGE_BACKWARD_PROGRAMS.values())
    torch.cuda.synchronize()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_replayed_prefix_forward_matches_launches_from_python(dtype):
    _fresh_gpu_programs()
    for shape in [dict(B=32, Hq=32, Hkv=8, L=1, S=512, P=20, D=128), dict(B=4, Hq=12, Hkv=12, L=128, S=128, P=20, D=64)]:
        for seed in range(3):
            c = _prefix_case(seed, dtype=dtype, device="cuda", **shape)
            _same(PA.forward(*c), _pa_forward_from_python(*c))
        assert isinstance(PA._FORWARD_PROGRAMS[PA.forward_key(*c, False, None)], R.Entry)
    torch.cuda.synchronize()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_replayed_prefix_backward_matches_launches_from_python(dtype):
    """The backward's four launches, replayed through cuLaunchKernel, give the bits of launches from Python
    (no atomics: every program owns its outputs), padded GQA in the (B, L, H, D) layout of projections."""
    _fresh_gpu_programs()
    for seed in range(3):
        q, k, v, pk, pv, kpm = _prefix_case(seed, dtype=dtype, device="cuda", B=4, Hq=12, Hkv=4, L=128, S=128, P=20,
                                            D=64)
        q, k, v = _blhd(q), _blhd(k), _blhd(v)
        out, lse = PA.forward(q, k, v, pk, pv, kpm, True)
        gy = torch.randn_like(out)
        args = (gy, q, k, v, pk, pv, kpm, out, lse, True, None, None, None)
        with R.disabled():
            want = PA.backward(*args[:10])
        _same(PA.backward(*args[:10]), want)
    assert isinstance(PA._BACKWARD_PROGRAMS[PA.backward_key(*args)], R.Entry)
    torch.cuda.synchronize()


@pytest.mark.parametrize("placement", ["houlsby", "pfeiffer"])
def test_training_steps_through_replay_give_the_python_launches_gradients(ext, placement):
    """A tiny BERT with adapters under fp16 autocast, three training steps on the triton backend: through
    recorded and replayed programs (the first step records, the later ones run the C++ nodes) every loss
    and every gradient equals, bit for bit, those of the same steps with every launch from Python."""
    import pet_fast
    from tiny_models import batch, build, logits

    def run(replay: bool):
        torch.manual_seed(0)
        model = build("bert")
        pet_fast.inject(model, pet_fast.AdapterConfig(placement=placement, init="bert"), "t")
        model.train()
        out, names = [], set()
        for step in range(3):
            ids, mask = batch(seed=step)
            with pet_fast.use_backend("triton"), torch.autocast("cpu", dtype=torch.float16):
                loss = logits(model, ids, mask).float().pow(2).mean()
            todo, seen = [loss.grad_fn], set()
            while todo:  # the autograd nodes of the step, by name (a C++ node's Python type is generic)
                f = todo.pop()
                if f is not None and f not in seen:
                    seen.add(f)
                    names.add(f.name())
                    todo += [n for n, _ in f.next_functions]
            loss.backward()
            out.append((loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}))
            model.zero_grad(set_to_none=True)
        if replay:  # the third step's adapters ran as their modules' replayed calls (no op Python)
            ops = importlib.import_module("pet_fast.ops.bottleneck_adapter")
            assert all(isinstance(m.__dict__.get("_replayed"), ops.ReplayedCall) for m in model.modules()
                       if type(m).__name__ == "BottleneckAdapter")
        return out, names

    want, names_py = run(False)
    with R.through_interpreter(ext):
        got, names = run(True)
    assert "BottleneckAdapterBackward" in names and "BottleneckAdapterBackward" not in names_py
    for (lw, gw), (lg, gg) in zip(want, got):
        _same(lg, lw)
        assert set(gg) == set(gw)
        for k in gw:
            _same(gg[k], gw[k])


def test_a_recording_that_fails_unexpectedly_leaves_the_call_in_python(ext, monkeypatch):
    """Triton internals the recorder reads may differ in another version: the launch has run, its result
    stands, and the key runs in Python."""
    t = _adapter(9, 16, 4, torch.float32, 0)

    def broken(jit, values):
        raise AttributeError("KernelParam has no attribute 'is_const'")

    monkeypatch.setattr(R, "binder_types", broken)
    with R.through_interpreter(ext):
        y = K.forward(*_fwd_args(t))
        _same(y, K._forward(*_fwd_args(t)))
        assert K._FORWARD_PROGRAMS[R.key_of(*_fwd_args(t))] is R._REFUSED


def test_a_call_passing_one_tensor_twice_is_not_recorded_for_its_key(ext):
    """residual=x: a program recorded so would read x for the residual in every later call of the key (whose
    inputs the key does not say are one tensor). Such a call runs unrecorded; the next call with separate
    tensors records the key, and its program serves both kinds."""
    t, u = _adapter(9, 16, 4, torch.float32, 0), _adapter(9, 16, 4, torch.float32, 1)
    t["residual"] = t["x"]
    _, why = R.record(_fwd_inputs(t), K._forward, *_fwd_args(t), single=True, ext=ext)
    assert isinstance(why, str) and "one tensor is passed as two inputs" in why
    with R.through_interpreter(ext):
        for case in (t, u, t):
            _same(K.forward(*_fwd_args(case)), K._forward(*_fwd_args(case)))
            if case is t and not K._FORWARD_PROGRAMS:
                continue  # the first call: unrecorded, and not refused
            assert isinstance(K._FORWARD_PROGRAMS[R.key_of(*_fwd_args(u))], R.Entry)


def test_the_op_with_x_as_its_residual_then_separate_tensors(ext):
    import pet_fast
    from pet_fast.ops.bottleneck_adapter import reference

    g = torch.Generator().manual_seed(0)
    n, d, r = 5, 32, 8
    w = (torch.randn(r, d, generator=g), torch.randn(r, generator=g), torch.randn(d, r, generator=g),
         torch.randn(d, generator=g))
    x1, x2, res2 = (torch.randn(n, d, generator=g) for _ in range(3))
    with torch.no_grad(), pet_fast.use_backend("triton"), R.through_interpreter(ext):
        y1 = pet_fast.bottleneck_adapter(x1, *w, residual=x1)
        y2 = pet_fast.bottleneck_adapter(x2, *w, residual=res2)  # (it read x2 as its residual)
    torch.testing.assert_close(y1, reference(x1, *w, residual=x1))
    torch.testing.assert_close(y2, reference(x2, *w, residual=res2))
