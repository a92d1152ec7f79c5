"""masked_linear kernels: the Triton GEMMs (under TRITON_INTERPRET=1 here, on the GPU in the gpu tests),
the bit packing, the packed-mask and multitask serving paths, the custom ops under torch.compile, and
dispatch. Every fused output and gradient is compared with a float64 reference."""
import importlib

import pytest
import torch
import torch.nn.functional as F

import pet_fast
from conftest import HAS_GPU, rel_err
from pet_fast import dispatch
from pet_fast.methods.mask import MaskedLinear

ml = importlib.import_module("pet_fast.ops.masked_linear")
mp = importlib.import_module("pet_fast.ops.mask_packing")

LOW = (torch.float16, torch.bfloat16)


def ref64(x, w, mask, bias):
    y = x.double() @ (w.double() * mask.double()).T
    return y if bias is None else y + bias.double()


def grads64(x, w, mask, dy):
    """dx, d_scores, d_weight, d_bias of the straight-through estimator, in float64."""
    g = dy.double().reshape(-1, w.shape[0])
    x2 = x.double().reshape(-1, w.shape[1])
    geff = g.T @ x2
    return (g @ (w.double() * mask.double())).reshape(x.shape), geff * w.double(), geff * mask.double(), g.sum(0)


def assert_close(out, ref, eager, dtype, what, fp32_tol=1e-5):
    """DESIGN.md §5: fp32 relative error well under 1e-4; fp16/bf16 at most 2x eager PyTorch's error in
    the same dtype (against the same float64 reference) plus a small atol."""
    assert out.shape == ref.shape, what
    if dtype == torch.float32 or dtype == torch.float64:
        assert rel_err(out, ref) < fp32_tol, (what, rel_err(out, ref))
        return
    err = (out.double() - ref).abs().max().item() if ref.numel() else 0.0
    eager_err = (eager.double() - ref).abs().max().item() if ref.numel() else 0.0
    scale = ref.abs().max().item() if ref.numel() else 0.0
    atol = 1e-3 * max(scale, 1.0) if dtype == torch.float16 else 8e-3 * max(scale, 1.0)
    assert err <= 2 * eager_err + atol, (what, err, eager_err, atol)


def make(shape, i, o, dtype, threshold, bias, train_weight, device="cpu"):
    x = torch.randn(*shape, i, device=device).to(dtype).requires_grad_()
    w = (torch.randn(o, i, device=device) / i ** 0.5).to(dtype).requires_grad_(train_weight)
    s = torch.randn(o, i, device=device).requires_grad_()
    b = torch.randn(o, device=device).to(dtype).requires_grad_() if bias else None
    return x, w, s, b


def run(backend, x, w, s, b, threshold, dy):
    leaves = [t for t in (x, w, s, b) if t is not None]
    for t in leaves:
        t.grad = None
    y = pet_fast.masked_linear(x, w, s, b, threshold=threshold, backend=backend)
    y.backward(dy)
    out = (y.detach(), x.grad, s.grad, w.grad, None if b is None else b.grad)
    for t in leaves:
        t.grad = None
    return out


# ---------------------------------------------------------------------------------------------------
# Triton under the interpreter: forward and straight-through gradients.

THRESHOLDS = [-10.0, 0.0, 10.0]  # keeps every weight, about half, none


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("threshold", THRESHOLDS)
@pytest.mark.parametrize("bias,train_weight", [(True, False), (False, True), (True, True)])
def test_triton_forward_backward(dtype, threshold, bias, train_weight):
    # 21 tokens x 37 -> 45: odd sizes that span two tiles in every dimension of the interpreter config
    x, w, s, b = make((3, 7), 37, 45, dtype, threshold, bias, train_weight)
    dy = torch.randn(3, 7, 45).to(dtype)
    fused = run("triton", x, w, s, b, threshold, dy)
    eager = run("eager", x, w, s, b, threshold, dy)
    mask = s.detach() > threshold
    dx, ds, dw, db = grads64(x.detach(), w.detach(), mask, dy)
    refs = (ref64(x.detach(), w.detach(), mask, None if b is None else b.detach()), dx, ds, dw, db)
    names = ("y", "dx", "d_scores", "d_weight", "d_bias")
    for name, out, eag, ref in zip(names, fused, eager, refs):
        if name == "d_weight" and not train_weight or name == "d_bias" and not bias:
            assert out is None and eag is None, name
            continue
        assert out.dtype == eag.dtype, name  # d_scores in the scores' dtype, the rest in x's
        assert_close(out, ref, eag, dtype if name != "d_scores" else torch.float32, name,
                     fp32_tol=1e-5 if dtype == torch.float32 else 2e-3)
    if threshold == 10.0:  # nothing kept: y is the bias, dx and d_weight are 0, d_scores still flows (STE)
        assert torch.equal(fused[1], torch.zeros_like(fused[1]))
        assert fused[2].abs().max() > 0
        if train_weight:
            assert torch.equal(fused[3], torch.zeros_like(fused[3]))


def test_training_path_kernels_direct():
    """The two elementwise kernels of the training path at an odd size (not a multiple of the block),
    into fp16/fp32 outputs, with NaN scores (never kept) and a threshold rounded like PyTorch's."""
    from pet_fast.kernels import masked_linear as kern

    w = torch.randn(37, 61)
    s = torch.randn(37, 61)
    s[0, :5] = float("nan")
    g = torch.randn(37, 61).half()
    for dtype in (torch.float32, torch.float16):
        out = kern.masked_weight(w, s, 0.3, dtype)
        assert out.dtype == dtype and torch.equal(out, (w * (s > 0.3)).to(dtype))
    ds, dw = kern.mask_grads(g, w, s, 0.3, scores_dtype=torch.float32, weight_grad=True)
    assert torch.equal(ds, g.float() * w) and dw.dtype == torch.float32
    assert torch.equal(dw, g.float() * (s > 0.3))
    ds, dw = kern.mask_grads(g, w.half(), s.half(), 0.3, scores_dtype=torch.float16, weight_grad=False)
    assert dw is None and ds.dtype == torch.float16
    assert torch.equal(ds, (g.float() * w.half().float()).half())


@pytest.mark.parametrize("backend", ["triton", "eager"])
@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.float16])
def test_autocast_and_float32_master_weights(backend, weight_dtype):
    """Under autocast the GEMMs run in autocast's dtype (fp16 here: the interpreter computes bf16
    wrong), as F.linear's would; float32 weights also serve half-precision x without autocast. Both
    against the eager op under the same autocast and against float64."""
    torch.manual_seed(1)
    x = torch.randn(3, 7, 37).requires_grad_()
    w = (torch.randn(45, 37) / 37 ** 0.5).to(weight_dtype).requires_grad_()
    s = torch.randn(45, 37).requires_grad_()
    b = torch.randn(45).to(weight_dtype).requires_grad_()
    dy = torch.randn(3, 7, 45).half()

    def go(x, backend):
        for t in (x, w, s, b):
            t.grad = None
        with torch.autocast("cpu", dtype=torch.float16, enabled=weight_dtype == torch.float32 and x.dtype == torch.float32):
            y = pet_fast.masked_linear(x, w, s, b, threshold=0.1, backend=backend)
        y.backward(dy)
        return y.detach(), x.grad, s.grad, w.grad, b.grad

    x16 = x.detach().half().requires_grad_()
    cases = [x16] if weight_dtype == torch.float16 else [x, x16]
    mask = s.detach() > 0.1
    for xin in cases:
        out = go(xin, backend)
        ref = go(xin, "eager") if backend != "eager" else out
        dx, ds, dw, db = grads64(xin.detach(), w.detach(), mask, dy)
        want = (ref64(xin.detach(), w.detach(), mask, b.detach()), dx, ds, dw, db)
        for name, o, e, r in zip(("y", "dx", "d_scores", "d_weight", "d_bias"), out, ref, want):
            assert o.dtype == e.dtype, name
            assert o.dtype == {"y": torch.float16, "dx": xin.dtype, "d_scores": torch.float32}.get(name, weight_dtype)
            assert_close(o, r, e, torch.float16, name)


@pytest.mark.parametrize("scores_grad,x_grad,weight_grad", [(False, True, True), (True, False, False),
                                                            (False, False, True), (True, True, False)])
def test_training_path_subsets_of_gradients(scores_grad, x_grad, weight_grad):
    """Frozen scores, x without a gradient, the weight frozen or trainable: the op computes only what is
    asked for, and every gradient it returns is exact (fp32)."""
    x, w, s, b = make((2, 5), 37, 19, torch.float32, 0.0, True, weight_grad)
    x.requires_grad_(x_grad)
    s.requires_grad_(scores_grad)
    dy = torch.randn(2, 5, 19)
    fused = run("triton", x, w, s, b, 0.0, dy)
    eager = run("eager", x, w, s, b, 0.0, dy)
    for name, out, ref, flag in zip(("y", "dx", "d_scores", "d_weight", "d_bias"), fused, eager,
                                    (True, x_grad, scores_grad, weight_grad, True)):
        assert (out is None) == (not flag) == (ref is None), name
        if flag:
            assert rel_err(out, ref) < 1e-5, name


def test_custom_op_and_eager_function_paths_agree(monkeypatch):
    """Eager calls go through an autograd.Function, compiled code (and PET_FAST_CUSTOM_OPS=1) through
    the custom ops: both run the same functions, so outputs and gradients are identical."""
    x, w, s, b = make((3, 4), 21, 13, torch.float32, 0.0, True, True)
    dy = torch.randn(3, 4, 13)
    results = []
    for flag in ("0", "1"):
        monkeypatch.setenv("PET_FAST_CUSTOM_OPS", flag)
        results.append(run("triton", x, w, s, b, 0.0, dy))
        with torch.no_grad():
            packed = mp.pack_mask(s)
            results[-1] += (pet_fast.masked_linear(x, w, None, b, packed_mask=packed, backend="triton"),)
    for a, c in zip(*results):
        assert torch.equal(a, c)


def test_triton_gradients_match_eager_fp32_tightly():
    x, w, s, b = make((19,), 33, 17, torch.float32, 0.1, True, True)
    dy = torch.randn(19, 17)
    for out, ref in zip(run("triton", x, w, s, b, 0.1, dy), run("eager", x, w, s, b, 0.1, dy)):
        assert rel_err(out, ref) < 1e-5


def test_triton_frozen_scores_and_zero_tokens():
    x, w, s, b = make((0,), 9, 5, torch.float32, 0.0, True, True)
    y = pet_fast.masked_linear(x, w, s, b, backend="triton")
    assert y.shape == (0, 5)
    y.sum().backward()
    assert torch.equal(s.grad, torch.zeros_like(s))
    assert torch.equal(w.grad, torch.zeros_like(w)) and torch.equal(b.grad, torch.zeros_like(b))
    # scores that do not require grad: the backward skips the weight-gradient GEMM
    x, w, s, b = make((4,), 9, 5, torch.float32, 0.0, False, False)
    s.requires_grad_(False)
    y = pet_fast.masked_linear(x, w, s, None, backend="triton")
    y.sum().backward()
    assert rel_err(x.grad, torch.ones(4, 5, dtype=torch.float64) @ (w.double() * (s > 0).double())) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kernels_mask_from_scores_and_bits_agree(dtype):
    # The kernels mask the weight tiles in registers, from packed bits (the serving op's GEMM) or straight
    # from the scores (not dispatched in training: see pet_fast/ops/masked_linear.py). Both modes, called
    # directly, against the float64 reference.
    from pet_fast.kernels import masked_linear as kern

    x = torch.randn(19, 45).to(dtype)
    w = torch.randn(35, 45).to(dtype)
    s = torch.randn(35, 45)
    b = torch.randn(35).to(dtype)
    dy = torch.randn(19, 35).to(dtype)
    bits = kern.pack(s, 0.2)
    assert torch.equal(bits, mp.pack_mask(s, 0.2))
    mask = s > 0.2
    tol = 1e-5 if dtype == torch.float32 else 3e-3
    geff = dy.double().T @ x.double()
    for src in ({"scores": s, "threshold": 0.2}, {"bits": bits}):
        assert rel_err(kern.forward(x, w, bias=b, **src), ref64(x, w, mask, b)) < tol
        assert rel_err(kern.grad_input(dy, w, **src), dy.double() @ (w.double() * mask)) < tol
        ds, dw, db = kern.grad_weight(dy, x, w, weight_grad=True, bias_grad=True, **src)
        assert ds.dtype == torch.float32 and dw.dtype == dtype
        assert rel_err(ds, geff * w.double()) < tol
        assert rel_err(dw, geff * mask) < tol
        assert rel_err(db, dy.double().sum(0)) < tol


@pytest.mark.parametrize("block_k", [16, 64])
def test_bits_tile_expansion_and_gather(block_k):
    """The forward from bits with other column tiles than the interpreter's single config: 64 columns
    (two words per row expanded by the broadcast shift, the second tile starting at word 2) and 16 (the
    fp32 FMA tiles: per-element gather), at odd sizes, with bit 31 set (negative int32 words)."""
    from pet_fast.kernels import masked_linear as kern

    M, N, K = 9, 37, 100
    x, w, b = torch.randn(M, K), torch.randn(N, K), torch.randn(N)
    s = torch.randn(N, K)
    s[:, 31] = 1.0  # bit 31 of every first word
    bits = mp.pack_mask(s)
    assert int(bits[:, 0].max()) < 0
    y = torch.empty(M, N)
    grid = (triton_cdiv(M, 16) * triton_cdiv(N, 32),)
    kern._forward_kernel.fn[grid](x, w, bits, bits, b, y, M, N, K, bits.shape[1], 0.0, FROM_BITS=True, HAS_BIAS=True,
                                  UPCAST=True, FP32_DOT=True, PRECISION="ieee", BLOCK_M=16, BLOCK_N=32, BLOCK_K=block_k,
                                  GROUP=4)
    assert rel_err(y, ref64(x, w, s > 0, b)) < 1e-5


def triton_cdiv(a, b):
    return (a + b - 1) // b


@pytest.mark.parametrize("i,o", [(0, 4), (5, 0)])
def test_triton_empty_features(i, o):
    x, w, s, b = make((3,), i, o, torch.float32, 0.0, True, True)
    fused = run("triton", x, w, s, b, 0.0, torch.ones(3, o))
    eager = run("eager", x, w, s, b, 0.0, torch.ones(3, o))
    for out, ref in zip(fused, eager):
        assert out.shape == ref.shape and torch.allclose(out, ref)


def test_threshold_rounded_like_pytorch_for_half_scores():
    # PyTorch compares fp16 scores with the threshold rounded to fp16: 0.09997 rounds to the fp16 value
    # 0.0999755859375, which is then not > the threshold (although it is > 0.09997 in fp32)
    thr = 0.09997
    s = torch.tensor([[thr, 0.0999, 0.1001, -1.0]], dtype=torch.float16).repeat(3, 1)
    w = torch.ones(3, 4)
    x = torch.ones(2, 4)
    ref = pet_fast.masked_linear(x, w, s, threshold=thr, backend="eager")
    out = pet_fast.masked_linear(x, w, s, threshold=thr, backend="triton")
    assert torch.equal(out, ref)


# ---------------------------------------------------------------------------------------------------
# Bit packing.

@pytest.mark.parametrize("shape", [(1,), (3, 1), (5, 31), (2, 32), (4, 33), (2, 3, 65), (7, 100), (3, 0)])
def test_pack_unpack_round_trip(shape):
    s = torch.randn(*shape)
    packed = pet_fast.pack_mask(s, 0.2) if hasattr(pet_fast, "pack_mask") else mp.pack_mask(s, 0.2)
    assert packed.dtype == torch.int32
    assert packed.shape == (*shape[:-1], (shape[-1] + 31) // 32)
    assert torch.equal(mp.unpack_mask(packed, shape), s > 0.2)
    # padding bits past in_features are 0
    full = ((packed.to(torch.int64).unsqueeze(-1) >> torch.arange(32)) & 1).reshape(*shape[:-1], -1)
    assert int(full[..., shape[-1]:].sum()) == 0


def test_bit_order_lsb_first():
    m = torch.zeros(2, 70, dtype=torch.bool)
    m[0, 0] = m[0, 33] = m[0, 69] = True
    m[1, :32] = True
    p = mp.pack_bool(m)
    assert p.tolist() == [[1, 2, 1 << 5], [-1, 0, 0]]
    # viewed as bytes (little-endian), byte j holds columns 8j .. 8j + 7, column 8j + b in bit b
    assert p.view(torch.uint8)[0].tolist()[:5] == [1, 0, 0, 0, 2]


def test_pack_errors():
    with pytest.raises(TypeError, match="scores"):
        mp.pack_mask(torch.ones(3, 4, dtype=torch.int32))
    with pytest.raises(TypeError, match="threshold"):
        mp.pack_mask(torch.ones(3, 4), "0")
    with pytest.raises(TypeError, match="int32"):
        mp.unpack_mask(torch.zeros(3, 1, dtype=torch.int64), (3, 4))
    with pytest.raises(ValueError, match=r"\(3, 2\)"):
        mp.unpack_mask(torch.zeros(3, 1, dtype=torch.int32), (3, 40))


# ---------------------------------------------------------------------------------------------------
# Packed masks through masked_linear.

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("bias", [True, False])
def test_packed_mask_forward(dtype, bias):
    x, w, s, b = make((2, 11), 45, 19, dtype, 0.0, bias, False)
    x.requires_grad_(False)
    s.requires_grad_(False)
    if b is not None:
        b.requires_grad_(False)
    packed = mp.pack_mask(s, 0.3)
    ref = ref64(x, w, s > 0.3, b)
    eager = pet_fast.masked_linear(x, w, packed_mask=packed, bias=b)  # auto on CPU: eager
    assert torch.equal(eager, pet_fast.masked_linear(x, w, s, b, threshold=0.3, backend="eager"))
    out = pet_fast.masked_linear(x, w, None, b, packed_mask=packed, backend="triton")
    assert_close(out, ref, eager, dtype, "y")


def test_packed_mask_gradients_on_eager_and_refused_by_kernels():
    x, w, s, b = make((5,), 8, 6, torch.float32, 0.0, True, True)
    packed = mp.pack_mask(s)
    y = pet_fast.masked_linear(x, w, packed_mask=packed, bias=b)
    y.sum().backward()
    assert rel_err(w.grad, (torch.ones(5, 6).T @ x.detach()) * (s.detach() > 0)) < 1e-6
    with pytest.raises(dispatch.BackendUnavailableError, match="without gradients"):
        pet_fast.masked_linear(x, w, packed_mask=packed, bias=b, backend="triton")
    with torch.no_grad():
        out = pet_fast.masked_linear(x, w, packed_mask=packed, bias=b, backend="triton")
    assert rel_err(out, y.detach()) < 1e-5


def test_scores_xor_packed_mask():
    x, w, s = torch.randn(2, 8), torch.randn(3, 8), torch.randn(3, 8)
    with pytest.raises(ValueError, match="exactly one of scores"):
        pet_fast.masked_linear(x, w)
    with pytest.raises(ValueError, match="both"):
        pet_fast.masked_linear(x, w, s, packed_mask=mp.pack_mask(s))
    with pytest.raises(TypeError, match="packed_mask"):
        pet_fast.masked_linear(x, w, packed_mask=(s > 0))
    with pytest.raises(ValueError, match="packed_mask must have shape"):
        pet_fast.masked_linear(x, w, packed_mask=mp.pack_mask(s.T))


# ---------------------------------------------------------------------------------------------------
# Multitask serving (eager here; cuda in the gpu tests).

def test_multitask_matches_per_task_calls():
    T, o, i = 3, 10, 37
    w, b = torch.randn(o, i), torch.randn(o)
    scores = torch.randn(T, o, i)
    packed = mp.pack_mask(scores)
    x = torch.randn(2, 7, i)
    ids = torch.randint(0, T, (2, 7))
    ids[0, 0], ids[1, 1] = 0, 2
    y = ml.masked_linear_multitask(x, w, packed, ids, b)
    assert y.shape == (2, 7, o)
    for t in range(T):
        sel = ids == t
        ref = ref64(x[sel], w, scores[t] > 0, b)
        assert rel_err(y[sel], ref) < 1e-5


def test_multitask_errors():
    w = torch.randn(4, 8)
    packed = mp.pack_mask(torch.randn(2, 4, 8))
    x = torch.randn(3, 8)
    with pytest.raises(ValueError, match=r"task_ids must lie in \[0, 2\)"):
        ml.masked_linear_multitask(x, w, packed, torch.tensor([0, 1, 2]))
    with pytest.raises(TypeError, match="task_ids must have dtype"):
        ml.masked_linear_multitask(x, w, packed, torch.tensor([0.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="task_ids must have shape"):
        ml.masked_linear_multitask(x, w, packed, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="packed_masks must be a stack"):
        ml.masked_linear_multitask(x, w, packed[0], torch.tensor([0, 1, 1]))
    with pytest.raises(dispatch.BackendUnavailableError, match="needs CUDA tensors"):
        ml.masked_linear_multitask(x, w, packed, torch.tensor([0, 1, 1]), backend="cuda")


def test_multitask_ids_are_checked_on_every_call_after_a_good_one():
    """The op remembers its checks per signature (dispatch.plan); the ids' values are not part of it, so a
    call with the same shapes and out-of-range ids still raises, and validate_ids=False skips that check."""
    w = torch.randn(4, 8)
    packed = mp.pack_mask(torch.randn(2, 4, 8))
    x = torch.randn(3, 8)
    good = ml.masked_linear_multitask(x, w, packed, torch.tensor([0, 1, 1]))
    assert torch.equal(good, ml.reference_multitask(x, w, packed, torch.tensor([0, 1, 1])))
    for bad in (torch.tensor([0, 1, 2]), torch.tensor([-1, 0, 0])):
        with pytest.raises(ValueError, match=r"task_ids must lie in \[0, 2\)"):
            ml.masked_linear_multitask(x, w, packed, bad)
    with pytest.raises(ValueError, match="task_ids must have shape"):
        ml.masked_linear_multitask(x, w, packed, torch.tensor([0, 1]))
    assert ml.masked_linear_multitask(x, w, packed, torch.tensor([0, 1, 1]), validate_ids=False).shape == (3, 4)


# ---------------------------------------------------------------------------------------------------
# torch.library custom ops and torch.compile.

def test_custom_ops_opcheck():
    x = torch.randn(5, 9, requires_grad=True)
    w = torch.randn(6, 9, requires_grad=True)
    s = torch.randn(6, 9, requires_grad=True)
    b = torch.randn(6, requires_grad=True)
    utils = ("test_schema", "test_faketensor", "test_autograd_registration")
    torch.library.opcheck(torch.ops.pet_fast.masked_linear.default, (x, w, s, b, 0.1), test_utils=utils)
    # 3-D x computed in fp16 (what autocast asks for): y, W_eff and the cast of x in fp16
    torch.library.opcheck(torch.ops.pet_fast.masked_linear.default,
                          (x.detach().reshape(5, 1, 9).requires_grad_(), w, s, None, 0.1, torch.float16), test_utils=utils)
    dy = torch.randn(5, 6)
    torch.library.opcheck(torch.ops.pet_fast.masked_linear_backward.default,
                          (dy, x.detach(), w.detach(), w.detach(), s.detach(), 0.1, torch.float32, torch.float32,
                           True, True, False, True), test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.pet_fast.masked_linear_packed.default,
                          (x.detach(), w.detach(), mp.pack_mask(s), None, None, "triton"),
                          test_utils=("test_schema", "test_faketensor"))


def _graph_recorder(graphs: list):
    """A torch.compile backend that keeps each captured graph's text in ``graphs`` and runs it as is."""
    def backend(gm, example_inputs):
        graphs.append(str(gm.graph))
        return gm.forward

    return backend


def test_masked_linear_module_compiles_fullgraph():
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    layer = MaskedLinear(21, 13, threshold=0.0, train_weight=True, train_bias=True)
    with torch.no_grad():
        layer.scores.normal_()
        layer.bias.normal_()
    x = torch.randn(2, 3, 21, requires_grad=True)
    seen = []
    counter = CompileCounterWithBackend(_graph_recorder(seen))
    compiled = torch.compile(lambda t: layer(t, backend="triton"), fullgraph=True, backend=counter)
    y = compiled(x)
    y.square().sum().backward()
    got = (y.detach(), x.grad, layer.scores.grad, layer.weight.grad, layer.bias.grad)
    assert counter.frame_count == 1
    assert any("pet_fast.masked_linear" in g for g in seen)
    x.grad = None
    for p in layer.parameters():
        p.grad = None
    y = layer(x, backend="eager")
    y.square().sum().backward()
    want = (y.detach(), x.grad, layer.scores.grad, layer.weight.grad, layer.bias.grad)
    for a, b in zip(got, want):
        assert rel_err(a, b) < 1e-5
    torch._dynamo.reset()


def test_training_path_compiles_fullgraph_under_autocast():
    """torch.compile reads the autocast state when it traces the call: the custom op gets the GEMMs'
    dtype as an argument, and the compiled step matches the eager one."""
    torch._dynamo.reset()
    layer = MaskedLinear(21, 13, threshold=0.0)
    with torch.no_grad():
        layer.scores.normal_()
    x = torch.randn(2, 3, 21, requires_grad=True)
    graphs = []
    compiled = torch.compile(lambda t: layer(t, backend="triton"), fullgraph=True, backend=_graph_recorder(graphs))
    got, want = [], []
    for fn, out in ((compiled, got), (lambda t: layer(t, backend="triton"), want)):
        x.grad = layer.scores.grad = None
        with torch.autocast("cpu", dtype=torch.float16):
            y = fn(x)
        y.float().square().sum().backward()
        out += [y.detach(), x.grad, layer.scores.grad]
    assert got[0].dtype == torch.float16 and any("pet_fast.masked_linear" in g for g in graphs)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    torch._dynamo.reset()


def test_packed_serving_compiles_fullgraph():
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    w, b = torch.randn(11, 40), torch.randn(11)
    packed = mp.pack_mask(torch.randn(11, 40))
    counter = CompileCounterWithBackend("aot_eager")
    fn = torch.compile(lambda t: pet_fast.masked_linear(t, w, packed_mask=packed, bias=b, backend="triton"),
                       fullgraph=True, backend=counter)
    x = torch.randn(2, 5, 40)
    with torch.no_grad():
        out = fn(x)
    assert counter.frame_count == 1
    assert rel_err(out, pet_fast.masked_linear(x, w, packed_mask=packed, bias=b, backend="eager")) < 1e-5
    torch._dynamo.reset()


def test_compile_aot_autograd_backward_uses_fused_backward():
    torch._dynamo.reset()
    layer = MaskedLinear(16, 8)
    graphs = []

    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    def fw(gm, _):
        graphs.append(str(gm.graph))
        return make_boxed_func(gm.forward)

    compiled = torch.compile(lambda t: layer(t, backend="triton"), fullgraph=True,
                             backend=aot_autograd(fw_compiler=fw, bw_compiler=fw))
    x = torch.randn(4, 16)
    compiled(x).sum().backward()
    assert any("masked_linear_backward" in g for g in graphs)
    assert rel_err(layer.scores.grad, torch.ones(4, 8).T @ x * layer.weight.detach()) < 1e-5
    torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------------
# Dispatch.

def test_dispatch_reasons_and_default_order(monkeypatch, tmp_path):
    x, w = torch.randn(4, 8), torch.randn(6, 8)
    packed = mp.pack_mask(torch.randn(6, 8))
    info = ml.describe(x, w, None, None, packed)
    assert ml.load_timings(str(tmp_path / "absent.json")) is None  # the design order, without a table
    assert ml.preference(info) == ["cuda", "triton", "eager"]
    big = dict(info, n=17)
    assert ml.preference(big) == ["triton", "cuda", "eager"]
    train = ml.describe(x, w.requires_grad_(), torch.randn(6, 8), None)
    reasons = dict(dispatch.explain(ml.OP, train))
    assert any("packed masks only" in r for r in reasons["cuda"])
    reasons = dict(dispatch.explain(ml.OP, big))
    assert not any("tokens >" in r for r in reasons["cuda"])
    assert any("tokens > 64" in r for r in dict(dispatch.explain(ml.OP, dict(info, n=65)))["cuda"])
    assert reasons["eager"] == []
    # CPU tensors under auto always take eager
    assert dispatch.select(ml.OP, info).backend == "eager"
    # a measured table overrides the default order
    table = tmp_path / "t.json"
    table.write_text('{"rows": [{"packed": true, "n_max": 64, "order": ["triton", "cuda", "eager"]}]}')
    try:
        ml.load_timings(str(table))
        assert ml.preference(info) == ["triton", "cuda", "eager"]
        assert ml.preference(train) == ["triton", "cuda", "eager"]  # no row for scores: the default
        table.write_text('{"rows": [{"packed": false, "n_max": 4096, "order": ["eager", "triton"]}]}')
        ml.load_timings(str(table))
        assert ml.preference(train) == ["eager", "triton"]
        assert ml.preference(dict(train, n=4097)) == ["eager", "triton"]  # above every row: the largest row's
        table.write_text('{"rows": [{"packed": false, "n_max": 64, "order": ["triton", "eager"]}, '
                         '{"packed": false, "n_max": 4096, "order": ["eager", "triton"]}, '
                         '{"packed": true, "n_max": 99999, "order": ["cuda", "eager"]}]}')
        ml.load_timings(str(table))
        assert ml.preference(dict(train, n=64)) == ["triton", "eager"]
        assert ml.preference(dict(train, n=65)) == ["eager", "triton"]
        assert ml.preference(dict(train, n=1 << 20)) == ["eager", "triton"]
        table.write_text('{"rows": [{"packed": true, "order": ["gpu"]}]}')
        with pytest.raises(ValueError, match="timings table"):
            ml.load_timings(str(table))
    finally:
        monkeypatch.delenv(ml.TIMINGS_ENV, raising=False)
        ml.load_timings()


def test_shipped_timings_table_loads():
    import pathlib

    path = pathlib.Path(ml.__file__).with_name("masked_linear_timings.json")
    rows = ml.load_timings(str(path))
    try:
        # serving rows (packed masks) and training rows (scores) of the H100 run, each in token order
        assert {bool(r["packed"]) for r in rows} == {True, False}
        with torch.no_grad():
            info = ml.describe(torch.randn(16, 8), torch.randn(6, 8), None, None, mp.pack_mask(torch.randn(6, 8)))
        assert ml.preference(info) == [r for r in rows if r["packed"] and r["n_max"] >= 16][0]["order"]
        scores = ml.describe(torch.randn(16, 8), torch.randn(6, 8), torch.randn(6, 8), None, None)
        assert not scores["packed"]
        assert ml.preference(scores) == [r for r in rows if not r["packed"] and r["n_max"] >= 16][0]["order"]
    finally:
        ml.load_timings()


def test_triton_refuses_float64_scores():
    x, w, s = torch.randn(2, 8), torch.randn(3, 8), torch.randn(3, 8, dtype=torch.float64)
    with pytest.raises(dispatch.BackendUnavailableError, match="scores dtype"):
        pet_fast.masked_linear(x, w, s, backend="triton")


# ---------------------------------------------------------------------------------------------------
# GPU (skipped without one): Triton compiled for the card, the cuda serving kernel.

GPU_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("threshold", [-10.0, 0.0, 10.0])
@pytest.mark.parametrize("train_weight", [False, True])
def test_gpu_triton_forward_backward(dtype, threshold, train_weight):
    torch.backends.cuda.matmul.allow_tf32 = False
    x, w, s, b = make((3, 171), 777, 515, dtype, threshold, True, train_weight, device="cuda")
    dy = torch.randn(3, 171, 515, device="cuda").to(dtype)
    fused = run("triton", x, w, s, b, threshold, dy)
    eager = run("eager", x, w, s, b, threshold, dy)
    mask = s.detach() > threshold
    dx, ds, dw, db = grads64(x.detach(), w.detach(), mask, dy)
    refs = (ref64(x.detach(), w.detach(), mask, b.detach()), dx, ds, dw, db)
    for name, out, eag, ref in zip(("y", "dx", "d_scores", "d_weight", "d_bias"), fused, eager, refs):
        if name == "d_weight" and not train_weight:
            assert out is None
            continue
        assert_close(out, ref, eag, dtype, name, fp32_tol=5e-5)


def packed_case(n, k, out_features, dtype, device="cuda"):
    """(x, w, packed mask, bias, float64 reference, eager op) of a random serving call from packed bits."""
    x = torch.randn(n, k, device=device).to(dtype)
    w = torch.randn(out_features, k, device=device).to(dtype)
    s = torch.randn(out_features, k, device=device)
    b = torch.randn(out_features, device=device).to(dtype)
    packed = mp.pack_mask(s)
    eager = pet_fast.masked_linear(x, w, packed_mask=packed, bias=b, backend="eager")
    return x, w, packed, b, ref64(x, w, s > 0, b), eager


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
def test_gpu_triton_packed(dtype):
    torch.backends.cuda.matmul.allow_tf32 = False
    x, w, packed, b, ref, eager = packed_case(200, 1001, 300, dtype)
    out = pet_fast.masked_linear(x, w, packed_mask=packed, bias=b, backend="triton")
    assert_close(out, ref, eager, dtype, "y", fp32_tol=5e-5)


@pytest.mark.gpu
def test_gpu_training_path_under_autocast():
    """The op's training path in a bf16 autocast step with float32 x, weight and bias (a BERT linear
    after a LayerNorm): y in bf16, gradients in their inputs' dtypes, against the eager op under the same
    autocast and float64."""
    x, w, s, b = make((4, 129), 771, 515, torch.float32, 0.0, True, True, device="cuda")
    dy = torch.randn(4, 129, 515, device="cuda").bfloat16()

    def go(backend):
        for t in (x, w, s, b):
            t.grad = None
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = pet_fast.masked_linear(x, w, s, b, backend=backend)
        y.backward(dy)
        return y.detach(), x.grad, s.grad, w.grad, b.grad

    fused, eager = go("triton"), go("eager")
    mask = s.detach() > 0
    dx, ds, dw, db = grads64(x.detach(), w.detach(), mask, dy)
    refs = (ref64(x.detach(), w.detach(), mask, b.detach()), dx, ds, dw, db)
    for name, out, eag, ref in zip(("y", "dx", "d_scores", "d_weight", "d_bias"), fused, eager, refs):
        assert out.dtype == eag.dtype, name
        assert_close(out, ref, eag, torch.bfloat16, name)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
def test_gpu_register_masking_gemms_direct(dtype):
    """The in-register masking GEMMs (no longer the op's training path, still its serving path from
    bits) compiled for the card with every autotune config's tile: from scores and from bits."""
    from pet_fast.kernels import masked_linear as kern

    torch.backends.cuda.matmul.allow_tf32 = False
    x = torch.randn(333, 1001, device="cuda").to(dtype)
    w = torch.randn(515, 1001, device="cuda").to(dtype)
    s = torch.randn(515, 1001, device="cuda")
    b = torch.randn(515, device="cuda").to(dtype)
    dy = torch.randn(333, 515, device="cuda").to(dtype)
    mask = s > 0
    bits = kern.pack(s, 0.0)
    assert torch.equal(bits, mp.pack_mask(s))
    w_eff = w * mask.to(dtype)
    g = dy.double().T @ x.double()
    for src in ({"scores": s}, {"bits": bits}):
        assert_close(kern.forward(x, w, bias=b, **src), ref64(x, w, mask, b), F.linear(x, w_eff, b), dtype, "y", 5e-5)
        assert_close(kern.grad_input(dy, w, **src), dy.double() @ (w.double() * mask), dy @ w_eff, dtype, "dx", 5e-5)
        ds, dw, db = kern.grad_weight(dy, x, w, weight_grad=True, bias_grad=True, **src)
        eager_g = dy.T @ x
        assert ds.dtype == torch.float32 and dw.dtype == dtype
        assert_close(ds, g * w.double(), eager_g.float() * w.float(), dtype, "d_scores", 5e-5)
        assert_close(dw, g * mask, eager_g * mask, dtype, "d_weight", 5e-5)
        assert_close(db, dy.double().sum(0), dy.sum(0), dtype, "d_bias", 5e-5)


def _has_cuda_kernel():
    return HAS_GPU and not ml._cuda_serving_reasons(
        {"device": torch.device("cuda"), "dtype": torch.float16, "packed": True, "n": 1, "needs_grad": False})


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 3, 16, 33, 64])
@pytest.mark.parametrize("i,o", [(4096, 257), (1000, 77), (37, 5)])
def test_gpu_cuda_packed(dtype, n, i, o):
    if not _has_cuda_kernel():
        pytest.fail(f"the cuda backend is unavailable: {pet_fast._ext.reason()}")
    x = torch.randn(n, i, device="cuda").to(dtype)
    w = torch.randn(o, i, device="cuda").to(dtype)
    s = torch.randn(o, i, device="cuda")
    b = torch.randn(o, device="cuda").to(dtype)
    packed = mp.pack_mask(s)
    ref = ref64(x, w, s > 0, b)
    eager = pet_fast.masked_linear(x, w, packed_mask=packed, bias=b, backend="eager")
    out = pet_fast.masked_linear(x, w, packed_mask=packed, bias=b, backend="cuda")
    assert_close(out, ref, eager, dtype, "y")
    out = pet_fast.masked_linear(x, w, packed_mask=packed, backend="cuda")
    assert_close(out, ref64(x, w, s > 0, None), F.linear(x, w * (s > 0).to(dtype)), dtype, "y without bias")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 2, 5, 16])
def test_gpu_cuda_packed_either_kernel_for_few_tokens(dtype, n):
    """The launcher's two single-mask kernels, each forced (tensor cores from 0 tokens, the fp32 kernel
    below 65), give the precision rule's answer; the default takes the fp32 kernel for one token only."""
    if not _has_cuda_kernel():
        pytest.fail(f"the cuda backend is unavailable: {pet_fast._ext.reason()}")
    ext = pet_fast._ext.load()
    x, w, packed, b, ref, eager = packed_case(n, 1000, 77, dtype)
    outs = {}
    for min_tokens in (0, 65):
        was = ext.masked_linear_set_mma_min_tokens(min_tokens)
        try:
            outs[min_tokens] = ext.masked_linear_packed(x, w, packed, b, None)
        finally:
            assert ext.masked_linear_set_mma_min_tokens(was) == min_tokens
        assert_close(outs[min_tokens], ref, eager, dtype, f"y (mma from {min_tokens} tokens)")
    default = ext.masked_linear_packed(x, w, packed, b, None)
    assert torch.equal(default, outs[65 if n == 1 else 0])  # the same kernel gives the same bits


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_cuda_packed_unaligned_and_deterministic(dtype):
    """x and weight 2 bytes off a 16-byte boundary (K % 8 == 0 but element loads), and two calls on the
    same inputs bitwise equal (the split-K partials are summed in a fixed order)."""
    if not _has_cuda_kernel():
        pytest.fail(f"the cuda backend is unavailable: {pet_fast._ext.reason()}")
    n, i, o = 5, 1032, 300
    x = torch.randn(n * i + 1, device="cuda").to(dtype)[1:].view(n, i)
    w = torch.randn(o * i + 1, device="cuda").to(dtype)[1:].view(o, i)
    s = torch.randn(o, i, device="cuda")
    b = torch.randn(o, device="cuda").to(dtype)
    packed = mp.pack_mask(s)
    out = pet_fast.masked_linear(x, w, packed_mask=packed, bias=b, backend="cuda")
    eager = pet_fast.masked_linear(x, w, packed_mask=packed, bias=b, backend="eager")
    assert_close(out, ref64(x, w, s > 0, b), eager, dtype, "y")
    xa, wa = x.clone(), w.clone()  # aligned copies: 16-byte loads
    again = pet_fast.masked_linear(xa, wa, packed_mask=packed, bias=b, backend="cuda")
    assert_close(again, ref64(x, w, s > 0, b), eager, dtype, "y aligned")
    assert torch.equal(again, pet_fast.masked_linear(xa, wa, packed_mask=packed, bias=b, backend="cuda"))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 16, 64])
def test_gpu_cuda_multitask(dtype, n):
    if not _has_cuda_kernel():
        pytest.fail(f"the cuda backend is unavailable: {pet_fast._ext.reason()}")
    T, o, i = 5, 300, 2048 + 40
    x = torch.randn(n, i, device="cuda").to(dtype)
    w = torch.randn(o, i, device="cuda").to(dtype)
    s = torch.randn(T, o, i, device="cuda")
    b = torch.randn(o, device="cuda").to(dtype)
    packed = mp.pack_mask(s)
    ids = torch.randint(0, T, (n,), device="cuda", dtype=torch.int32)
    out = ml.masked_linear_multitask(x, w, packed, ids, b, backend="cuda")
    eager = ml.masked_linear_multitask(x, w, packed, ids, b, backend="eager")
    ref = torch.stack([ref64(x[r:r + 1], w, s[int(ids[r])] > 0, b)[0] for r in range(n)])
    assert_close(out, ref, eager, dtype, "y")


@pytest.mark.gpu
def test_gpu_cuda_binding_task_ids_outside_the_stack_mask_everything():
    """The raw binding (pet_fast._C.masked_linear_packed): int64 ids outside [0, T), 2^32 + 1 included (it
    must not wrap to task 1), give the all-zero mask (the bias alone); float ids are refused."""
    if not _has_cuda_kernel():
        pytest.fail(f"the cuda backend is unavailable: {pet_fast._ext.reason()}")
    ext = pet_fast._ext.load()
    T, o, i = 3, 40, 96
    x = torch.randn(4, i, device="cuda").half()
    w = torch.randn(o, i, device="cuda").half()
    packed = mp.pack_mask(torch.randn(T, o, i, device="cuda"))
    b = torch.randn(o, device="cuda").half()
    ids = torch.tensor([1, 2 ** 32 + 1, -1, T], device="cuda", dtype=torch.int64)
    out = ext.masked_linear_packed(x, w, packed, b, ids)
    row0 = ml.masked_linear_multitask(x[:1], w, packed, ids[:1].int(), b, backend="eager")
    torch.testing.assert_close(out[:1], row0, rtol=2e-2, atol=2e-2)  # task 1 (precision: test_gpu_cuda_multitask)
    assert torch.equal(out[1:], b.expand(3, -1))
    with pytest.raises(RuntimeError, match="task_ids must be int32 or int64"):
        ext.masked_linear_packed(x, w, packed, b, ids.float())


# ---------------------------------------------------------------------------------------------------
# The CUDA serving kernel's per-lane code, compiled for the host and run for every lane of every warp
# (tests/csrc/masked_linear_host_check.cpp): its indexing of the weight, of the packed-mask bytes
# written by pet_fast.pack_mask, of the task stack and of the K tails, checked without a GPU.

def _cuda_include():
    import os
    import shutil

    candidates = [os.environ.get("CUDA_HOME", ""), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for root in candidates:
        if root and os.path.isfile(os.path.join(root, "include", "cuda_fp16.h")):
            return os.path.join(root, "include")
    return None


@pytest.fixture(scope="module")
def host_check(tmp_path_factory):
    import pathlib
    import shutil
    import subprocess

    include = _cuda_include()
    cxx = shutil.which("g++") or shutil.which("c++")
    if include is None or cxx is None:
        pytest.skip("needs a C++ compiler and the CUDA headers (cuda_fp16.h)")
    root = pathlib.Path(__file__).resolve().parents[1]
    exe = tmp_path_factory.mktemp("host_check") / "masked_linear_host_check"
    subprocess.run([cxx, "-std=c++17", "-O1", "-Wno-unknown-pragmas", f"-I{include}", f"-I{root / 'csrc'}",
                    str(root / "tests" / "csrc" / "masked_linear_host_check.cpp"), "-o", str(exe)],
                   check=True, capture_output=True, timeout=300)
    return exe


def _host_run(exe, workdir, x, w, packed, ids, bias, vec, sms=132, mma=True):
    import subprocess

    import numpy as np

    def dump(name, t):
        t = t.contiguous()
        if t.dtype in LOW:
            t = t.view(torch.int16)
        t.numpy().tofile(str(workdir / f"{name}.bin"))

    dump("x", x)
    dump("w", w)
    dump("bits", packed)
    if ids is not None:
        dump("ids", ids.to(torch.int32))
    if bias is not None:
        dump("bias", bias)
    n, k = x.shape
    o = w.shape[0]
    tasks = 0 if ids is None else packed.shape[0]
    code = 0 if x.dtype == torch.float16 else 1
    run = subprocess.run([str(exe), str(workdir), str(code), str(n), str(k), str(o), str(tasks), str(int(vec)),
                          str(int(bias is not None)), str(sms), str(int(mma))], check=True, capture_output=True,
                         text=True,
                         timeout=120)
    plan = dict(kv.split("=") for kv in run.stdout.split())
    y = torch.from_numpy(np.fromfile(str(workdir / "y.bin"), dtype=np.int16)).view(x.dtype)
    return y.reshape(n, o), {key: int(v) for key, v in plan.items()}


# (n, k, o, tasks, vec, sms, mma, expected plan entries): the plan the launcher would pick on a GPU with
# `sms` multiprocessors (mma: compute capability 8.0 or more, where a single mask takes the tensor-core
# kernel; per-token masks always take the fp32 kernel), asserted so that each case keeps covering what
# its comment says
_HOST_CASES = [
    (2, 40, 9, 0, True, 132, True, {"mma": 1, "tokens": 8, "splits": 1}),   # 6 empty tokens, K % 32 != 0, 9 rows
    (1, 40, 9, 0, True, 132, True, {"mma": 0, "tokens": 1, "splits": 1}),   # one token: the fp32 kernel anyway
    (3, 1104, 13, 0, True, 132, True, {"mma": 1, "splits": 5, "kc": 256}),  # split K, last chunk past K
    (2, 2056, 33, 0, True, 2, True, {"mma": 1, "splits": 3, "kc": 768}),    # 12 loads per chunk, in flight
    (3, 37, 6, 0, False, 132, True, {"mma": 1}),                           # K % 8 != 0: element loads
    (12, 300, 40, 0, False, 132, True, {"mma": 1, "tokens": 16, "splits": 2}),  # two n tiles, 4 empty tokens
    (20, 2056, 150, 0, True, 1, True, {"mma": 1, "groups": 2, "tiles": 2, "kc": 1024}),  # 2 groups, 2 tiles
    (64, 776, 5, 0, True, 132, True, {"mma": 1, "groups": 4, "splits": 4}),   # four groups and split K
    (3, 1104, 13, 0, True, 132, False, {"mma": 0, "tokens": 4, "splits": 5}),  # fp32 kernel: split K
    (5, 300, 70, 0, False, 1, False, {"mma": 0, "tokens": 8, "passes": 4, "kc": 512}),  # 3 empty tokens, passes
    (16, 1032, 70, 3, True, 1, True, {"mma": 0, "tokens": 16, "tiles": 2, "splits": 2}),  # multitask, 16 tokens
    (33, 61, 5, 2, False, 132, True, {"mma": 0, "tokens": 16, "groups": 3}),  # multitask, 3 token groups, K tail
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,k,o,tasks,vec,sms,mma,plan", _HOST_CASES)
def test_cuda_lane_code_on_host(host_check, tmp_path, dtype, n, k, o, tasks, vec, sms, mma, plan):
    x = torch.randn(n, k).to(dtype)
    w = torch.randn(o, k).to(dtype)
    b = torch.randn(o).to(dtype) if n != 3 else None
    if tasks:
        scores = torch.randn(tasks, o, k)
        packed = mp.pack_mask(scores)
        ids = torch.randint(0, tasks, (n,))
        ids[0] = tasks - 1
        out, got = _host_run(host_check, tmp_path, x, w, packed, ids, b, vec, sms, mma)
        eager = ml.masked_linear_multitask(x, w, packed, ids, b)
        ref = torch.stack([ref64(x[r:r + 1], w, scores[int(ids[r])] > 0, b)[0] for r in range(n)])
    else:
        s = torch.randn(o, k)
        packed = mp.pack_mask(s)
        out, got = _host_run(host_check, tmp_path, x, w, packed, None, b, vec, sms, mma)
        eager = pet_fast.masked_linear(x, w, packed_mask=packed, bias=b)
        ref = ref64(x, w, s > 0, b)
    assert {key: got[key] for key in plan} == plan
    assert_close(out, ref, eager, dtype, "y")
    assert rel_err(out, ref) < (2e-3 if dtype == torch.float16 else 1.6e-2)


@pytest.mark.parametrize("n,k,o,tasks,plan", [
    (1, 4096, 4096, 0, {"mma": 0, "tokens": 1, "tiles": 128, "kc": 2048, "splits": 2, "blocks": 256}),
    (2, 4096, 4096, 0, {"mma": 1, "tokens": 8, "tiles": 32, "kc": 512, "splits": 8, "blocks": 256}),
    (16, 4096, 4096, 0, {"mma": 1, "tokens": 16, "groups": 1, "tiles": 32, "kc": 512, "splits": 8, "blocks": 256}),
    (64, 4096, 11008, 0, {"mma": 1, "tokens": 16, "groups": 4, "tiles": 86, "kc": 1024, "splits": 4}),
    (1, 4096, 4096, 4, {"mma": 0, "tokens": 1, "tiles": 128, "kc": 2048, "splits": 2, "blocks": 256}),
    (16, 4096, 4096, 4, {"mma": 0, "tokens": 16, "tiles": 64, "kc": 1024, "splits": 4, "blocks": 256}),
])
def test_cuda_plan_of_serving_shapes(host_check, n, k, o, tasks, plan):
    """The launch plans of the benchmark's serving shapes on an H100 (132 SMs): at least ~2 blocks per
    SM and, for N <= 16, one wave at most; x staged in at most 32 KiB; each weight byte read by one
    block per group of 16 tokens."""
    import subprocess

    run = subprocess.run([str(host_check), "--plan", "1", str(n), str(k), str(o), str(tasks), "1", "0", "132"],
                         check=True, capture_output=True, text=True, timeout=60)
    got = {key: int(v) for key, v in (kv.split("=") for kv in run.stdout.split())}
    assert {key: got[key] for key in plan} == plan
    assert got["blocks"] >= 2 * 132 - 8
    if n <= 16:
        assert got["blocks"] <= 132 * 2
    assert got["tokens"] * got["kc"] * 2 <= 32 * 1024
    assert got["tiles"] * got["rows_per_block"] >= o > (got["tiles"] - 1) * got["rows_per_block"]
    assert got["splits"] * got["kc"] >= k > (got["splits"] - 1) * got["kc"]


@pytest.mark.parametrize("xshape", [(1,), (3, 1)])
def test_triton_strided_bias_regression(xshape):
    """Found by the property tests: a bias view with stride 2 was read as if contiguous."""
    x, w, s = torch.randn(*xshape), torch.randn(2, 1), torch.randn(2, 1)
    b = torch.randn(2, 2)[:, 0]
    out = pet_fast.masked_linear(x, w, s, b, backend="triton")
    assert torch.allclose(out, pet_fast.masked_linear(x, w, s, b, backend="eager"), atol=1e-6)


def test_triton_refuses_features_past_its_int32_tile_offsets():
    """The GEMM kernels index inside a tile with int32 (rows of a tile * row length < 2**31): the
    launchers refuse wider layers and dispatch gives them to eager."""
    from pet_fast.kernels import masked_linear as kernels

    wide = kernels.MAX_FEATURES
    assert ml._KERNEL_MAX_FEATURES == wide
    x, w = torch.zeros(1, wide), torch.zeros(1, wide)
    bits = torch.zeros(1, wide // 32, dtype=torch.int32)
    with pytest.raises(ValueError, match="in_features"):
        kernels.forward(x, w, bits=bits)
    with pytest.raises(ValueError, match="in_features"):
        kernels.grad_weight(torch.zeros(1, 1), x, w, bits=bits, weight_grad=True, bias_grad=False)
    with pytest.raises(ValueError, match="out_features"):
        kernels.grad_input(torch.zeros(1, wide), w.T.contiguous(), bits=torch.zeros(wide, 1, dtype=torch.int32))
    with torch.no_grad():
        info = ml.describe(x, w, None, None, bits)
    assert any("int32 offsets" in why for why in ml._triton_reasons(info))
    assert not any("int32 offsets" in why for why in ml._triton_reasons(dict(info, in_features=64)))
    # the training path (elementwise kernels with int64 offsets, then cuBLAS) has no such limit
    assert not any("int32 offsets" in why for why in ml._triton_reasons(ml.describe(x, w, torch.zeros(1, wide), None)))
