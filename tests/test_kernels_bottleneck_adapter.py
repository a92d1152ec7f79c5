"""The triton (and cuda) backends of bottleneck_adapter against the eager reference, outputs and every
gradient. CPU runs use the Triton interpreter (TRITON_INTERPRET=1, set by conftest): tiny shapes."""
import pytest
import torch

import pet_fast
from conftest import HAS_GPU, configs_as_on_a_gpu, graph_node_names, rel_err
from pet_fast import dispatch
import importlib

op = importlib.import_module("pet_fast.ops.bottleneck_adapter")

ACTS = ["relu", "gelu", "gelu_tanh", "silu", "tanh", "identity"]


def make_case(n_shape, d, r, dtype, device="cpu", bias=True, scaling="channel", residual=False, add_input=False,
              layer_norm=None, seed=0):
    """Leaf tensors in float64 (the reference) and copies in ``dtype`` (the kernels and eager)."""
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)
    t = {"x": rnd(*n_shape, d), "w_down": rnd(r, d) / d ** 0.5, "w_up": rnd(d, r) / r ** 0.5}
    t["b_down"] = rnd(r) * 0.5 if bias else None
    t["b_up"] = rnd(d) * 0.5 if bias else None
    if scaling == "channel":
        t["scaling"] = rnd(d)
    elif scaling == "scalar":
        t["scaling"] = rnd(()).abs() + 0.5
    t["residual"] = rnd(*n_shape, d) if residual else None
    hi = {k: (v.clone().requires_grad_() if v is not None else None) for k, v in t.items()}
    lo = {k: (v.to(device=device, dtype=dtype).requires_grad_() if v is not None else None) for k, v in t.items()}
    if scaling == "number":
        hi["scaling"] = lo["scaling"] = 0.75
    hi["add_input"] = lo["add_input"] = add_input
    if layer_norm is not None:  # "affine" or "plain": the frozen LayerNorm the adapter reads x through
        affine = layer_norm == "affine"
        lw, lb = (1 + 0.2 * rnd(d), 0.2 * rnd(d)) if affine else (None, None)
        hi["layer_norm"] = (lw, lb, 1e-5)
        lo["layer_norm"] = tuple(t.to(device=device, dtype=dtype) if t is not None else None for t in (lw, lb)) + (1e-5,)
    return hi, lo


def call(ts, act, backend):
    return pet_fast.bottleneck_adapter(ts["x"], ts["w_down"], ts["b_down"], ts["w_up"], ts["b_up"], activation=act,
                                       scaling=ts["scaling"], residual=ts["residual"],
                                       add_input=ts.get("add_input", False), layer_norm=ts.get("layer_norm"),
                                       backend=backend)


def grads(ts, out, dy):
    names = [k for k, v in ts.items() if isinstance(v, torch.Tensor) and v.requires_grad]
    g = torch.autograd.grad(out, [ts[k] for k in names], dy)
    return dict(zip(names, g))


def check_against_reference(n_shape, d, r, dtype, act, backend="triton", device="cpu", **kw):
    """Output and every gradient: fp32 by relative error; fp16/bf16 by the precision rule (error vs the
    float64 reference at most 2x eager PyTorch's error in the same dtype, plus a small atol)."""
    hi, lo = make_case(n_shape, d, r, dtype, device, **kw)
    ref = call(hi, act, "eager")
    dy = torch.randn(ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ref_g = grads(hi, ref, dy)
    out = call(lo, act, backend)
    assert out.dtype == dtype and out.shape == ref.shape
    got_g = grads(lo, out, dy.to(device=device, dtype=dtype))
    assert set(got_g) == set(ref_g)
    results = {"out": (out, ref)} | {k: (got_g[k], ref_g[k]) for k in ref_g}
    if dtype == torch.float32:
        for name, (a, b) in results.items():
            assert rel_err(a.cpu(), b) < 2e-5, (name, rel_err(a.cpu(), b))
        return
    lo2 = {k: (v.detach().clone().requires_grad_() if isinstance(v, torch.Tensor) else v) for k, v in lo.items()}
    eager = call(lo2, act, "eager")
    eager_g = grads(lo2, eager, dy.to(device=device, dtype=dtype))
    eager_res = {"out": eager} | eager_g
    eps = torch.finfo(dtype).eps
    for name, (a, b) in results.items():
        err = (a.cpu().double() - b).abs().max().item()
        err_eager = (eager_res[name].cpu().double() - b).abs().max().item()
        atol = 4 * eps * b.abs().max().item()
        assert err <= 2 * err_eager + atol, (name, err, err_eager, atol)


# --- interpreter tests (CPU) ---------------------------------------------------------------------

@pytest.mark.parametrize("act", ACTS)
def test_every_activation_fp32(act):
    check_against_reference((3, 7), 45, 5, torch.float32, act, scaling="channel", residual=True)


@pytest.mark.parametrize("n_shape,d,r,kw", [
    ((37,), 70, 17, dict(scaling="scalar")),
    ((5,), 33, 1, dict(scaling="number", bias=False)),
    ((2, 9), 24, 3, dict(scaling="number", residual=True)),
])
def test_odd_shapes_fp32(n_shape, d, r, kw):
    check_against_reference(n_shape, d, r, torch.float32, "silu", **kw)


@pytest.mark.parametrize("act,kw", [("gelu", dict(scaling="channel", residual=True)),
                                    ("relu", dict(scaling="scalar")),
                                    ("gelu_tanh", dict(scaling="number", bias=False)),
                                    ("silu", dict(scaling="channel")),
                                    ("tanh", dict(scaling="scalar", residual=True)),
                                    ("identity", dict(scaling="number"))])
def test_fp16_precision_rule(act, kw):
    check_against_reference((21,), 77, 9, torch.float16, act, **kw)


@pytest.mark.parametrize("dtype,act,kw", [
    (torch.float32, "silu", dict(scaling="channel")),
    (torch.float32, "relu", dict(scaling="number", bias=False)),
    (torch.float16, "gelu", dict(scaling="scalar")),
    (torch.float16, "silu", dict(scaling="number")),
])
def test_add_input_base_is_input_plus_residual(dtype, act, kw):
    """add_input=True: base = x + residual, and x's gradient gets dy added in the rows kernel."""
    check_against_reference((3, 11), 37, 6, dtype, act, residual=True, add_input=True, **kw)


@pytest.mark.parametrize("dtype,n_shape,d,r,act,kw", [
    (torch.float32, (37,), 45, 6, "gelu", dict(scaling="channel", layer_norm="affine")),
    (torch.float32, (2, 9), 70, 17, "relu", dict(scaling="number", bias=False, layer_norm="plain")),
    (torch.float16, (21,), 77, 9, "silu", dict(scaling="scalar", layer_norm="affine")),
    (torch.float16, (5,), 33, 3, "tanh", dict(scaling="channel", layer_norm="plain")),
])
def test_layer_norm_before_the_adapter(dtype, n_shape, d, r, act, kw):
    """layer_norm=(w, b, eps): the adapter reads LN(x), the base is x; x's gradient through the LayerNorm."""
    check_against_reference(n_shape, d, r, dtype, act, **kw)


def test_layer_norm_statistics_stay_exact_far_from_zero():
    """Rows whose mean is large against their spread (x ~ 1000 + N(0, 1)): the kernels' one-pass statistics
    must keep fp32 precision there, as two passes do, where a sum of squares would lose it to cancellation.
    Every result within twice eager float32's error against the float64 reference."""
    hi, lo = make_case((19,), 77, 5, torch.float32, layer_norm="affine")
    for ts in (hi, lo):
        ts["x"] = (ts["x"].detach() + 1000.0).requires_grad_()
    ref = call(hi, "gelu", "eager")
    dy = torch.randn(ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ref_g = {"out": ref} | grads(hi, ref, dy)
    res = {}
    for backend in ("triton", "eager"):
        ts = {k: (v.detach().clone().requires_grad_() if isinstance(v, torch.Tensor) else v) for k, v in lo.items()}
        out = call(ts, "gelu", backend)
        res[backend] = {"out": out} | grads(ts, out, dy.float())
    for name, b in ref_g.items():
        err = (res["triton"][name].double() - b).abs().max().item()
        err_eager = (res["eager"][name].double() - b).abs().max().item()
        assert err <= 2 * err_eager + 4 * torch.finfo(torch.float32).eps * b.abs().max().item(), (name, err, err_eager)


@pytest.mark.parametrize("d", [13, 40])
def test_layer_norm_of_a_constant_fp16_row_past_the_last_column_block(d):
    """A constant row (variance 0) with BERT's eps 1e-12 has rstd 1e6: in the columns past D of the last block
    the kernels' LN of the zero-loaded x would be -mean * 1e6, inf in fp16, and inf times the zero-padded
    weight NaN. The output and the weights' gradients are finite and the float64 reference's (x's gradient
    on that row is rstd times a difference, past fp16's range in any computation)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, d, generator=g).half()
    x[1] = 0.5
    wd, wu = (torch.randn(3, d, generator=g) * 0.3).half(), (torch.randn(d, 3, generator=g) * 0.3).half()
    dy = torch.randn(3, d, generator=g).half()
    out = {}
    for backend, dtype in (("triton", torch.float16), ("eager", torch.float64)):
        leaves = [t.to(dtype).requires_grad_() for t in (x, wd, wu)]
        y = pet_fast.bottleneck_adapter(leaves[0], leaves[1], None, leaves[2], None, layer_norm=(None, None, 1e-12),
                                        backend=backend)
        out[backend] = [y] + list(torch.autograd.grad(y, leaves[1:], dy.to(dtype)))
    for got, want in zip(out["triton"], out["eager"]):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.double(), want, rtol=2e-2, atol=2e-2 * want.abs().max().item())


def check_mixed_dtypes(hi, lo, half, device="cpu", autocast=False):
    """Triton against eager PyTorch computing the same in mixed dtypes (a float32 stream with ``half``
    products, optionally under autocast): a float32 output, every gradient in its leaf's dtype, and the
    precision rule against the float64 reference; returns eager's errors."""
    ref = call(hi, "gelu", "eager")
    dy = torch.randn(ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ref_g = grads(hi, ref, dy)
    results = {}
    for backend in ("triton", "eager"):
        ts = {k: (v.detach().clone().requires_grad_() if isinstance(v, torch.Tensor) else v) for k, v in lo.items()}
        with torch.autocast(device, dtype=half, enabled=autocast):
            out = call(ts, "gelu", backend)
        assert out.dtype == torch.float32
        g = grads(ts, out, dy.to(device=device, dtype=torch.float32))
        for k, v in g.items():
            assert v.dtype == ts[k].dtype, k
        results[backend] = {"out": out} | g
    eps = torch.finfo(half).eps
    eager_errs = {}
    for name, b in ({"out": ref} | ref_g).items():
        err = (results["triton"][name].cpu().double() - b).abs().max().item()
        eager_errs[name] = err_eager = (results["eager"][name].cpu().double() - b).abs().max().item()
        assert err <= 2 * err_eager + 4 * eps * b.abs().max().item(), (name, err, err_eager)
    return eager_errs, {"out": ref} | ref_g


def check_layer_norm_under_autocast(n_shape, d, r, half, device="cpu"):
    """Pfeiffer under autocast: x is the float32 residual stream, LN(x) is rounded to ``half`` for the
    products inside the kernels (as the module's cast did), the output and x's gradient stay float32."""
    hi, lo = make_case(n_shape, d, r, torch.float32, device, scaling="channel", layer_norm="affine")
    eager_errs, refs = check_mixed_dtypes(hi, lo, half, device, autocast=True)
    for name, b in refs.items():  # the products really ran in the half dtype, not in float32
        assert eager_errs[name] > 10 * torch.finfo(torch.float32).eps * b.abs().max().item(), name


@pytest.mark.parametrize("matmul_reduction", [False, True])
def test_layer_norm_from_float32_under_autocast(monkeypatch, matmul_reduction):
    if matmul_reduction:
        kernels = importlib.import_module("pet_fast.kernels.bottleneck_adapter")
        monkeypatch.setattr(kernels, "MATMUL_REDUCTION_MIN_RP", 16)
    check_layer_norm_under_autocast((3, 7), 45, 5, torch.float16)


@pytest.mark.parametrize("w_dtype,b_dtype", [(torch.float32, torch.float16), (torch.float16, torch.float32),
                                              (None, torch.float32), (torch.float32, None), (torch.float32, torch.float32)])
def test_layer_norm_parameters_of_mixed_dtypes_on_every_backend(w_dtype, b_dtype):
    """The contract lets the LayerNorm's weight and bias each be of x's dtype or float32 (or absent): every mix
    runs on eager (a float32 LayerNorm where a parameter is float32) and triton, within the precision rule of
    the float64 reference."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(5, 24, generator=g)
    wd, wu = torch.randn(4, 24, generator=g) * 0.3, torch.randn(24, 4, generator=g) * 0.3
    lw, lb = torch.rand(24, generator=g) + 0.5, torch.randn(24, generator=g) * 0.1
    dy = torch.randn(5, 24, generator=g)

    def run(backend, dtype, ln_dtypes):
        leaves = [t.to(dtype).requires_grad_() for t in (x, wd, wu)]
        w, b = (None if dt is None else t.to(dt) for t, dt in zip((lw, lb), ln_dtypes))
        y = pet_fast.bottleneck_adapter(leaves[0], leaves[1], None, leaves[2], None, layer_norm=(w, b, 1e-5),
                                        backend=backend)
        return [y] + list(torch.autograd.grad(y, leaves, dy.to(dtype)))

    want = run("eager", torch.float64, [None if dt is None else torch.float64 for dt in (w_dtype, b_dtype)])
    got = {be: run(be, torch.float16, (w_dtype, b_dtype)) for be in ("eager", "triton")}
    for i, ref in enumerate(want):
        err = {be: (got[be][i].double() - ref).abs().max().item() for be in got}
        scale = torch.finfo(torch.float16).eps * ref.abs().max().item()
        assert err["eager"] <= 16 * scale and err["triton"] <= 2 * err["eager"] + 4 * scale, (i, err)


def test_layer_norm_arguments_are_checked():
    hi, lo = make_case((4,), 16, 3, torch.float32, layer_norm="affine")
    x, wd, wu = lo["x"], lo["w_down"], lo["w_up"]
    lw, lb, _ = lo["layer_norm"]
    ok = dict(layer_norm=(lw, lb, 1e-5))
    pet_fast.bottleneck_adapter(x, wd, None, wu, None, **ok)
    with pytest.raises(ValueError, match="layer_norm weight requires grad"):
        pet_fast.bottleneck_adapter(x, wd, None, wu, None, layer_norm=(lw.clone().requires_grad_(), lb, 1e-5))
    with pytest.raises(ValueError, match=r"layer_norm bias must have shape \(16,\)"):
        pet_fast.bottleneck_adapter(x, wd, None, wu, None, layer_norm=(lw, lb[:3], 1e-5))
    with pytest.raises(ValueError, match="layer_norm eps must be > 0"):
        pet_fast.bottleneck_adapter(x, wd, None, wu, None, layer_norm=(lw, lb, 0.0))
    with pytest.raises(TypeError, match="layer_norm must be None or a tuple"):
        pet_fast.bottleneck_adapter(x, wd, None, wu, None, layer_norm=lw)
    with pytest.raises(ValueError, match="pass no residual"):
        pet_fast.bottleneck_adapter(x, wd, None, wu, None, residual=x.detach(), layer_norm=(lw, lb, 1e-5))
    with pytest.raises(TypeError, match="layer_norm weight must have the dtype of x"):
        pet_fast.bottleneck_adapter(x, wd, None, wu, None, layer_norm=(lw.double(), lb, 1e-5))
    with torch.no_grad():  # a weight that requires grad is fine where no graph is recorded
        pet_fast.bottleneck_adapter(x, wd, None, wu, None, layer_norm=(lw.clone().requires_grad_(), lb, 1e-5))
    ln_info = op.describe(x, wd, "relu", 1.0, None, ok["layer_norm"])
    # few tokens with a LayerNorm: the cuda backend's C++ node takes them in eager code; compiled code, whose
    # cuda route is the few-token kernels' custom op, is refused
    assert not any("LayerNorm" in w for w in dict(dispatch.explain(op.OP, ln_info))["cuda"])
    with pytest.MonkeyPatch.context() as m:
        m.setattr(torch.compiler, "is_compiling", lambda: True)
        assert any("LayerNorm" in w for w in op.cuda_reasons(ln_info))


@pytest.mark.parametrize("r", [1, 16, 100, 256])
def test_bottleneck_widths_up_to_256_at_d_1024(r):
    check_against_reference((3,), 1024, r, torch.float32, "relu", scaling="scalar")


@pytest.mark.parametrize("dtype,n_shape,d,r,act,kw", [
    (torch.float32, (3, 7), 45, 5, "gelu", dict(scaling="channel", residual=True)),
    (torch.float32, (19,), 33, 17, "silu", dict(scaling="scalar")),
    (torch.float32, (5,), 20, 3, "relu", dict(scaling="number", bias=False)),
    (torch.float16, (21,), 77, 9, "tanh", dict(scaling="channel")),
    (torch.float16, (11,), 40, 6, "relu", dict(scaling="scalar", residual=True)),
])
def test_weight_gradients_through_matmuls(monkeypatch, dtype, n_shape, d, r, act, kw):
    """Wide bottlenecks reduce the weight gradients with matrix products instead of _bwd_cols_kernel:
    that path, forced at every width here, against the reference (both scaling kinds, biases or not)."""
    kernels = importlib.import_module("pet_fast.kernels.bottleneck_adapter")
    monkeypatch.setattr(kernels, "MATMUL_REDUCTION_MIN_RP", 16)
    check_against_reference(n_shape, d, r, dtype, act, **kw)


def test_weight_gradients_through_matmuls_float32_master_weights(monkeypatch):
    kernels = importlib.import_module("pet_fast.kernels.bottleneck_adapter")
    monkeypatch.setattr(kernels, "MATMUL_REDUCTION_MIN_RP", 16)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(13, 24, generator=g).half().requires_grad_()
    ws = [torch.randn(5, 24, generator=g) * 0.2, torch.randn(5, generator=g), torch.randn(24, 5, generator=g) * 0.2,
          torch.randn(24, generator=g), torch.rand(24, generator=g) + 0.5]
    ws = [w.requires_grad_() for w in ws]
    outs = {}
    for backend in ("eager", "triton"):
        leaves = [x] + ws
        y = pet_fast.bottleneck_adapter(x, *ws[:4], scaling=ws[4], activation="gelu", backend=backend)
        outs[backend] = torch.autograd.grad(y, leaves, torch.ones_like(y))
    for a, b in zip(outs["triton"], outs["eager"]):
        assert a.dtype == b.dtype
        assert rel_err(a.float(), b.float()) < 2e-2


@pytest.mark.parametrize("matmul_reduction", [False, True])
@pytest.mark.parametrize("master", [False, True])
@pytest.mark.parametrize("add_input", [False, True])
def test_float32_residual_with_half_x(monkeypatch, matmul_reduction, master, add_input):
    """A float32 residual stream with fp16 x (autocast): the sum in float32, every gradient in its
    leaf's dtype, within the precision rule of eager PyTorch doing the same in mixed dtypes. With
    add_input, the Houlsby site under autocast: LN(h + x + A(h)), h half, x the float32 stream."""
    if matmul_reduction:
        kernels = importlib.import_module("pet_fast.kernels.bottleneck_adapter")
        monkeypatch.setattr(kernels, "MATMUL_REDUCTION_MIN_RP", 16)
    hi, lo = make_case((3, 7), 45, 5, torch.float16, scaling="channel", residual=True, add_input=add_input)
    lo["residual"] = hi["residual"].detach().float().requires_grad_()
    if master:
        for k in ("w_down", "b_down", "w_up", "b_up", "scaling"):
            lo[k] = hi[k].detach().float().requires_grad_()
    check_mixed_dtypes(hi, lo, torch.float16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("kw", [dict(residual=True, add_input=True), dict(layer_norm="affine")])
def test_the_autotuners_128_token_tile(monkeypatch, dtype, kw):
    """The GPU autotuners' 128-token tile (kernels/bottleneck_adapter.py row_configs), forced here on the
    forward and the rows backward (the interpreter otherwise runs one small tile): 300 tokens (two full
    tiles and a partial one), d=200 (not a multiple of BLOCK_D), at the Houlsby and Pfeiffer sites' forms."""
    import triton

    ka = importlib.import_module("pet_fast.kernels.bottleneck_adapter")
    tile = [triton.Config({"BLOCK_N": 128, "BLOCK_D": 64, "SPLIT_D": 1}, num_warps=8, num_stages=3)]
    seen = _force_configs(monkeypatch, ka, tile)
    check_against_reference((300,), 200, 20, dtype, "gelu", **kw)
    assert {"fwd", "bwd_rows"} <= {n for n, _ in seen} and {k["BLOCK_N"] for _, k in seen} == {128}


def _force_configs(monkeypatch, ka, configs) -> list:
    """The adapter's forward and rows-backward autotuners given ``configs`` only; returns the list that
    records (kernel, launch keywords) per launch."""
    for tuner in (ka._fwd_tuned, ka._bwd_rows_tuned):
        monkeypatch.setattr(tuner, "configs", configs)
        monkeypatch.setattr(tuner, "cache", {})
    seen = []

    class Seen:  # the tuner's kernel, recording the tile each launch gets
        def __init__(self, name, fn):
            self.name, self.fn = name, fn

        def run(self, *a, **k):
            seen.append((self.name, k))
            return self.fn.run(*a, **k)

        def __getattr__(self, attr):
            return getattr(self.fn, attr)

    for name, tuner in (("fwd", ka._fwd_tuned), ("bwd_rows", ka._bwd_rows_tuned)):
        monkeypatch.setattr(tuner, "fn", Seen(name, tuner.fn))
    return seen


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("kw", [dict(residual=True, add_input=True), dict(layer_norm="affine"), dict()])
@pytest.mark.parametrize("d, block_d, split", [(200, 32, 3), (200, 64, 4), (100, 64, 4)])
def test_column_splits(monkeypatch, dtype, kw, d, block_d, split):
    """The GPU autotuners' column splits (kernels/bottleneck_adapter.py SPLITS: SPLIT_D programs per token
    tile, each writing a range of the output's and dx's columns), forced here: ranges of whole blocks with a
    partial last one (d=200), and empty trailing ranges (d=100 over four parts of 64 columns); 37 tokens
    (two tiles of 16 and a partial one)."""
    import triton

    ka = importlib.import_module("pet_fast.kernels.bottleneck_adapter")
    tile = [triton.Config({"BLOCK_N": 16, "BLOCK_D": block_d, "SPLIT_D": split}, num_warps=4)]
    seen = _force_configs(monkeypatch, ka, tile)
    check_against_reference((37,), d, 12, dtype, "gelu", **kw)
    assert {"fwd", "bwd_rows"} <= {n for n, _ in seen} and {k["SPLIT_D"] for _, k in seen} == {split}


def test_column_splits_are_tried_only_where_token_tiles_leave_sms_idle():
    """SPLITS are pruned where the token tiles alone give two programs per SM (an H100's 132 here) and where
    a part would get fewer than two column blocks; the other configurations are kept as they were."""
    ka = importlib.import_module("pet_fast.kernels.bottleneck_adapter")
    configs = configs_as_on_a_gpu(ka, ka.adapter_row_configs)
    assert {c.kwargs["SPLIT_D"] for c in configs} == {1, 2, 4}
    splits = lambda kept: sorted((c.kwargs["BLOCK_N"], c.kwargs["SPLIT_D"]) for c in kept if c.kwargs["SPLIT_D"] > 1)  # noqa: E731
    for prune in (ka.prune_adapter_configs, ka.prune_adapter_bwd_configs):
        at = lambda n, d: prune(configs, {"N": n, "D": d, "X": None}, RP=64, UPCAST=False)  # noqa: E731
        assert splits(at(4096, 768)) == [(64, 2), (64, 4), (128, 4)]  # the BERT-base step: 64 tiles of 64
        assert splits(at(16384, 768)) == [(64, 2), (64, 4), (128, 4)]  # 256 tiles of 64
        assert splits(at(32768, 768)) == [(128, 4)]  # 256 tiles of 128, 512 of 64
        assert splits(at(65536, 4096)) == []
        assert splits(at(4096, 384)) == [(64, 2)]  # four parts of 384 columns: 96 each, under two blocks
        unsplit = [c for c in at(4096, 768) if c.kwargs["SPLIT_D"] == 1]
        assert unsplit == [c for c in prune(configs, {"N": 65536, "D": 4096, "X": None}, RP=64, UPCAST=False)]


def test_empty_token_dimension():
    hi, lo = make_case((0,), 16, 4, torch.float32)
    out = call(lo, "relu", "triton")
    assert out.shape == (0, 16)
    out.sum().backward()
    assert lo["w_down"].grad is not None and float(lo["w_down"].grad.abs().sum()) == 0.0


def test_non_contiguous_inputs():
    hi, lo = make_case((6,), 40, 4, torch.float32, scaling="scalar")
    x = torch.randn(40, 6).t()  # (6, 40), not contiguous
    wu = torch.randn(4, 40).t()
    ref = pet_fast.bottleneck_adapter(x, lo["w_down"], lo["b_down"], wu, lo["b_up"], scaling=lo["scaling"], backend="eager")
    out = pet_fast.bottleneck_adapter(x, lo["w_down"], lo["b_down"], wu, lo["b_up"], scaling=lo["scaling"], backend="triton")
    assert rel_err(out, ref) < 2e-5


def test_dispatch_reasons():
    hi, lo = make_case((4,), 8, 300, torch.float32)
    with pytest.raises(dispatch.BackendUnavailableError, match="r=300"):
        call(lo, "relu", "triton")
    info = op.describe(lo["x"], lo["w_down"], "relu", lo["scaling"], None)
    assert op.triton_reasons({**info, "r": 64}) == []  # under the interpreter the CPU is accepted
    # auto never takes a kernel for CPU tensors
    assert dispatch.select(op.OP, info).backend == "eager"
    assert any("cuda" in w.lower() for w in op.cuda_reasons(info))
    x16 = lo["x"].detach().half()
    mixed = op.describe(x16, lo["w_down"], "relu", 1.0, torch.zeros(x16.shape))
    assert mixed["float32_residual"] and not any("float32 residual" in w for w in op.cuda_reasons(mixed))
    with pytest.MonkeyPatch.context() as m:
        m.setattr(torch.compiler, "is_compiling", lambda: True)
        assert any("float32 residual" in w for w in op.cuda_reasons(mixed))


class _Block(torch.nn.Module):
    def __init__(self, d, r):
        super().__init__()
        self.lin = torch.nn.Linear(d, d)
        self.adapter = pet_fast.BottleneckAdapter(d, r, activation="gelu", scaling="channel")
        with torch.no_grad():
            for p in self.adapter.parameters():
                p.normal_(0, 0.3)

    def forward(self, x, backend):
        return self.adapter(self.lin(x), backend=backend).tanh()


def test_torch_compile_fullgraph_through_the_custom_op():
    """fullgraph=True fails on any graph break; the compiled module runs the Triton kernel (interpreter)
    through the custom op, with its fake-tensor rule and autograd formula."""
    torch._dynamo.reset()
    m = _Block(24, 5)
    x = torch.randn(2, 5, 24, requires_grad=True)
    ref = m(x, "eager")
    ref_g = torch.autograd.grad(ref.square().sum(), [x] + list(m.parameters()))
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    out = compiled(x, "triton")
    got_g = torch.autograd.grad(out.square().sum(), [x] + list(m.parameters()))
    assert rel_err(out, ref) < 2e-5
    for a, b in zip(got_g, ref_g):
        assert rel_err(a, b) < 2e-5


@pytest.mark.parametrize("scaling,add_input", [("channel", False), ("number", False), ("channel", True)])
def test_custom_op_opcheck(scaling, add_input):
    """Schema, autograd registration, fake tensors, and AOT dispatch with dynamic shapes (which runs
    the backward custom op as well)."""
    r = lambda *s: torch.randn(*s, requires_grad=True)
    s_t = r(16) if scaling == "channel" else None
    torch.library.opcheck(torch.ops.pet_fast.bottleneck_adapter_triton.default,
                          (r(5, 16), r(3, 16), r(3), r(16, 3), None, s_t, 1.5, r(5, 16), "silu", add_input))


def test_custom_op_opcheck_with_layer_norm():
    r = lambda *s: torch.randn(*s, requires_grad=True)
    torch.library.opcheck(torch.ops.pet_fast.bottleneck_adapter_triton.default,
                          (r(5, 16), r(3, 16), r(3), r(16, 3), r(16), r(16), 1.0, None, "gelu", False, True,
                           torch.randn(16), torch.randn(16), 1e-5, torch.float16))


def check_master_weights(n_shape, d, r, dtype, act, backend="triton", device="cpu", **kw):
    """x (and residual) in ``dtype``, parameters in float32: the output in ``dtype`` and the parameter
    gradients in float32, each within the precision rule against the float64 reference (the eager op
    with the same mixed inputs is the baseline)."""
    hi, lo = make_case(n_shape, d, r, dtype, device, **kw)
    for name in ("w_down", "b_down", "w_up", "b_up", "scaling"):
        if isinstance(lo[name], torch.Tensor):
            lo[name] = lo[name].detach().float().requires_grad_()
    ref = call(hi, act, "eager")
    dy = torch.randn(ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ref_g = grads(hi, ref, dy)
    out = call(lo, act, backend)
    got_g = grads(lo, out, dy.to(device=device, dtype=dtype))
    lo2 = {k: (v.detach().clone().requires_grad_() if isinstance(v, torch.Tensor) else v) for k, v in lo.items()}
    eager = call(lo2, act, "eager")
    eager_g = grads(lo2, eager, dy.to(device=device, dtype=dtype))
    assert out.dtype == dtype and eager.dtype == dtype
    eps = torch.finfo(dtype).eps
    for name, a, e, b in [("out", out, eager, ref)] + [(k, got_g[k], eager_g[k], ref_g[k]) for k in ref_g]:
        assert a.dtype == lo[name].dtype if name != "out" else True, (name, a.dtype)
        err = (a.cpu().double() - b).abs().max().item()
        err_eager = (e.cpu().double() - b).abs().max().item()
        assert err <= 2 * err_eager + 4 * eps * b.abs().max().item(), (name, err, err_eager)


@pytest.mark.parametrize("kw", [dict(scaling="channel", residual=True), dict(scaling="scalar", bias=False),
                                dict(scaling="number")])
def test_float32_master_weights_with_fp16_input(kw):
    check_master_weights((37,), 70, 9, torch.float16, "gelu", **kw)


def test_master_weights_read_without_casts():
    """The triton backend takes float32 parameters of half-precision x as they are: no cast op runs
    between the module and the kernel (each would be a launch and an autograd node per call)."""
    m = pet_fast.BottleneckAdapter(16, 4, scaling="channel")
    x = torch.randn(5, 16, dtype=torch.float16, requires_grad=True)
    y = m(x, backend="triton")
    names = graph_node_names(y)
    assert not any("ToCopy" in n for n in names), names
    y.float().sum().backward()
    assert m.w_down.grad.dtype == torch.float32 and m.scaling.grad.dtype == torch.float32


# --- GPU tests ------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n_shape,d,r", [((4, 128), 768, 64), ((1,), 4096, 256), ((1001,), 1000, 7), ((8, 8192), 1024, 16)])
def test_gpu_triton(dtype, n_shape, d, r):
    check_against_reference(n_shape, d, r, dtype, "gelu", device="cuda", scaling="channel", residual=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_add_input(dtype, backend):
    """Houlsby's base h + x: in the forward kernel (triton), before the kernels (cuda, few tokens)."""
    if backend == "cuda":
        from pet_fast import _ext

        if not _ext.available():
            pytest.skip(_ext.reason())
    n_shape = (4, 128) if backend == "triton" else (16,)
    check_against_reference(n_shape, 768, 64, dtype, "silu", backend=backend, device="cuda", residual=True,
                            add_input=True, scaling="channel")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kw", [dict(residual=True, add_input=True), dict(layer_norm="affine")])
@pytest.mark.parametrize("bn, split", [(64, 2), (64, 4), (128, 4)])
def test_gpu_column_splits(monkeypatch, dtype, kw, bn, split):
    """The autotuners' column splits (SPLITS) compiled for the GPU, forced on the forward and the rows
    backward (the GPU tests otherwise run PET_FAST_AUTOTUNE=0's single tile): 4000 tokens of d=768."""
    import triton

    ka = importlib.import_module("pet_fast.kernels.bottleneck_adapter")
    if dtype == torch.float32 and bn > 64:
        pytest.skip("float32 products never try 128-token tiles (prune_row_configs)")
    tile = [triton.Config({"BLOCK_N": bn, "BLOCK_D": 64, "SPLIT_D": split}, num_warps=8, num_stages=3)]
    seen = _force_configs(monkeypatch, ka, tile)
    replay = importlib.import_module("pet_fast.kernels._replay")
    with replay.disabled():  # launched from Python: a program recorded for another tile is not replayed
        check_against_reference((4000,), 768, 64, dtype, "gelu", device="cuda", scaling="channel", **kw)
    assert {k["SPLIT_D"] for _, k in seen} == {split}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_layer_norm(dtype):
    """Pfeiffer's inner LayerNorm in the kernels: x, LN parameters and products in one dtype."""
    check_against_reference((4, 128), 768, 64, dtype, "relu", device="cuda", layer_norm="affine", scaling="number")


@pytest.mark.gpu
@pytest.mark.parametrize("n_shape,d,r", [((8, 128), 768, 48), ((1000,), 1024, 256)])
def test_gpu_layer_norm_under_bf16_autocast(n_shape, d, r):
    check_layer_norm_under_autocast(n_shape, d, r, torch.bfloat16, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("act", ACTS)
def test_gpu_triton_activations_bf16(act):
    check_against_reference((333,), 8192, 64, torch.bfloat16, act, device="cuda", scaling="scalar")


@pytest.mark.gpu
@pytest.mark.parametrize("op_name", ["bottleneck_adapter_triton", "bottleneck_adapter_cuda"])
def test_gpu_custom_op_opcheck(op_name):
    if op_name.endswith("cuda"):
        from pet_fast import _ext

        if not _ext.available():
            pytest.skip(_ext.reason())
    r = lambda *s: torch.randn(*s, device="cuda", requires_grad=True)
    torch.library.opcheck(getattr(torch.ops.pet_fast, op_name).default,
                          (r(5, 64), r(3, 64), r(3), r(64, 3), r(64), r(64), 1.0, None, "gelu"))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_float32_master_weights_bf16(backend):
    if backend == "cuda":
        from pet_fast import _ext

        if not _ext.available():
            pytest.skip(_ext.reason())
    check_master_weights((2, 16) if backend == "cuda" else (3, 333), 768, 64, torch.bfloat16, "gelu",
                         backend=backend, device="cuda", scaling="channel", residual=True)


@pytest.mark.gpu
def test_gpu_many_tokens_bf16():
    check_against_reference((65536,), 768, 64, torch.bfloat16, "relu", device="cuda", scaling="number")


@pytest.mark.gpu
def test_gpu_compile_inductor():
    torch._dynamo.reset()
    m = _Block(256, 16).cuda()
    x = torch.randn(4, 33, 256, device="cuda", requires_grad=True)
    ref = m(x, "eager")
    out = torch.compile(m, fullgraph=True)(x, "triton")
    assert rel_err(out, ref) < 1e-4
    out.sum().backward()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n_shape,d,r,kw", [((1,), 768, 64, dict(scaling="channel", residual=True)),
                                            ((2, 8), 4096, 64, dict(scaling="scalar")),
                                            ((64,), 8192, 256, dict(scaling="number")),
                                            ((7,), 100, 3, dict(scaling="channel", bias=False))])
def test_gpu_cuda_forward_backward(dtype, n_shape, d, r, kw):
    from pet_fast import _ext

    if not _ext.available():
        pytest.skip(_ext.reason())
    check_against_reference(n_shape, d, r, dtype, "gelu_tanh", backend="cuda", device="cuda", **kw)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n_shape,d,r,kw", [((1, 16), 768, 64, dict(scaling="number")),
                                            ((4, 16), 4096, 64, dict(scaling="channel", residual=True)),
                                            ((64,), 8192, 256, dict(scaling="scalar", residual=True, add_input=True)),
                                            ((3, 5), 100, 3, dict(scaling="channel", bias=False)),
                                            ((2, 9), 333, 17, dict(scaling="number", residual=True))])
def test_gpu_cuda_serving_forward(dtype, n_shape, d, r, kw):
    """The few-token kernels as serving calls them (no gradient, x (batch, tokens, d) handed over as it is):
    the vector forms (rows 16-byte aligned) and the scalar ones (d=100 in half precision, d=333, r=3, r=17),
    against float64 by the precision rule; the 3-D call equals the same rows passed flat."""
    from pet_fast import _ext

    if not _ext.available():
        pytest.skip(_ext.reason())
    hi, lo = make_case(n_shape, d, r, dtype, "cuda", **kw)
    with torch.no_grad():
        ref = call(hi, "gelu", "eager")
        out = call(lo, "gelu", "cuda")
        eager = call(lo, "gelu", "eager")
        flat = {k: (v.reshape(-1, d) if k in ("x", "residual") and v is not None else v) for k, v in lo.items()}
        out_flat = call(flat, "gelu", "cuda")
    assert out.shape == ref.shape and out.dtype == dtype
    assert torch.equal(out.reshape(-1, d), out_flat)
    err = (out.cpu().double() - ref).abs().max().item()
    err_eager = (eager.cpu().double() - ref).abs().max().item()
    atol = (1e-5 if dtype == torch.float32 else 4 * torch.finfo(dtype).eps) * ref.abs().max().item()
    assert err <= 2 * err_eager + atol, (err, err_eager, atol)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n_shape,d,r,kw", [((1,), 64, 8, dict(scaling="number")),
                                            ((1, 16), 768, 64, dict(scaling="channel", residual=True)),
                                            ((5,), 776, 24, dict(scaling="scalar", bias=False)),
                                            ((2, 8), 4096, 64, dict(scaling="channel")),
                                            ((3,), 8192, 256, dict(scaling="number", residual=True)),
                                            ((16,), 40, 256, dict(scaling="channel")),
                                            ((17,), 768, 64, dict(scaling="channel")),
                                            ((4, 16), 4096, 64, dict(scaling="number", residual=True)),
                                            ((2, 31), 1000, 24, dict(scaling="channel")),
                                            ((5,), 100, 8, dict(scaling="scalar"))])
@pytest.mark.parametrize("act", ["gelu", "relu"])
def test_gpu_cuda_one_launch_forward(dtype, n_shape, d, r, kw, act):
    """The one-launch few-token forward (a thread-block cluster, sm_90+, tiles of 16 of up to 64 tokens)
    against float64 by the precision rule, taken where it applies (d and r whole 16-byte rows: not d = 100
    in half precision) with one tile, a ragged second (17, 62 tokens) and four; with it switched off the
    two-kernel form gives the same numbers within the rule."""
    from pet_fast import _ext

    if not _ext.available():
        pytest.skip(_ext.reason())
    ext = _ext.load()
    hi, lo = make_case(n_shape, d, r, dtype, "cuda", **kw)
    eligible = (d * lo["x"].element_size()) % 16 == 0 and (r * lo["x"].element_size()) % 16 == 0
    form = ext.bottleneck_adapter_small_form(lo["x"], lo["w_down"], lo["w_up"])
    assert form == ("cluster" if eligible and torch.cuda.get_device_capability()[0] >= 9 else "two kernels")
    with torch.no_grad():
        ref = call(hi, act, "eager")
        eager = call(lo, act, "eager")
        out = call(lo, act, "cuda")
        was = ext.bottleneck_adapter_set_small_cluster(False)
        try:
            assert ext.bottleneck_adapter_small_form(lo["x"], lo["w_down"], lo["w_up"]) == "two kernels"
            out_two = call(lo, act, "cuda")
        finally:
            ext.bottleneck_adapter_set_small_cluster(was)
    torch.cuda.synchronize()
    assert out.shape == ref.shape and out.dtype == dtype
    err_eager = (eager.cpu().double() - ref).abs().max().item()
    atol = (1e-5 if dtype == torch.float32 else 4 * torch.finfo(dtype).eps) * ref.abs().max().item()
    for got in (out, out_two):
        err = (got.cpu().double() - ref).abs().max().item()
        assert err <= 2 * err_eager + atol, (form, err, err_eager, atol)


@pytest.mark.gpu
def test_gpu_cuda_one_launch_forward_replays_in_a_cuda_graph():
    """Serving captures the call in CUDA graphs: the cluster launch replays with new inputs."""
    from pet_fast import _ext

    if not _ext.available():
        pytest.skip(_ext.reason())
    hi, lo = make_case((1, 16), 768, 64, torch.bfloat16, "cuda", scaling="channel")
    lo = {k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in lo.items()}
    with torch.no_grad():
        call(lo, "gelu", "cuda")  # warm-up outside the capture (extension load, device queries)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = call(lo, "gelu", "cuda")
        lo["x"].copy_(torch.randn_like(lo["x"]))
        graph.replay()
        torch.cuda.synchronize()
        expected = call(lo, "gelu", "eager")
    err = (out.float() - expected.float()).abs().max().item()
    assert err <= 8 * torch.finfo(torch.bfloat16).eps * expected.float().abs().max().item(), err


@pytest.mark.gpu
@pytest.mark.parametrize("act", ACTS)
def test_gpu_cuda_activations(act):
    from pet_fast import _ext

    if not _ext.available():
        pytest.skip(_ext.reason())
    check_against_reference((5,), 333, 17, torch.bfloat16, act, backend="cuda", device="cuda", scaling="channel")


def test_activation_codes_agree():
    from pet_fast.kernels.bottleneck_adapter import ACT_CODES

    assert op.CUDA_ACT_CODES == ACT_CODES
    assert set(ACT_CODES) == set(pet_fast.ops.activations.ACTIVATIONS)


def test_cuda_backend_refuses_cpu_and_takes_any_r():
    hi, lo = make_case((4,), 8, 2, torch.float32)
    with pytest.raises(dispatch.BackendUnavailableError, match="cuda"):
        call(lo, "relu", "cuda")
    info = op.describe(lo["x"], lo["w_down"], "relu", lo["scaling"], None)
    assert info["requires_grad"]
    if not HAS_GPU:
        return
    # r beyond the few-token kernels' limit: the C++ autograd node takes the call, at any token count
    assert op.cuda_reasons({**info, "device": torch.device("cuda"), "n": 64, "r": 300}) == []
    assert op.cuda_reasons({**info, "device": torch.device("cuda"), "n": 65, "r": 300}) == []


@pytest.mark.parametrize("scaling,n,d", [("channel", 9, 30), ("number", 9, 30), ("channel", 37, 70), ("scalar", 37, 70)])
def test_frozen_adapter_gives_input_and_scaling_gradients(scaling, n, d):
    # 37 tokens and d=70: two token splits and two column blocks in the reduction under the interpreter
    hi, lo = make_case((n,), d, 5, torch.float32, scaling=scaling)
    for ts in (hi, lo):
        for name in ("w_down", "b_down", "w_up", "b_up"):
            ts[name] = ts[name].detach()
    ref = call(hi, "relu", "eager")
    out = call(lo, "relu", "triton")
    names = ["x"] + (["scaling"] if scaling != "number" else [])
    g_ref = torch.autograd.grad(ref.square().sum(), [hi[a] for a in names])
    g_out = torch.autograd.grad(out.square().sum(), [lo[a] for a in names])
    for name, a, b in zip(names, g_out, g_ref):
        assert rel_err(a, b) < 2e-5, name


# --- the cuda backend's Python side on CPU, with a stand-in for pet_fast._C --------------------------

class _FakeExtension:
    """Eager float64 stand-in for the two functions of csrc/bottleneck_adapter_bind.cpp, with the same
    arguments and results. Like the first build of the binding, it returns ONE shared empty tensor for
    both absent bias gradients: the Python side must not hand such placeholders on as custom-op outputs."""

    def __init__(self):
        self.calls = []

    @staticmethod
    def _act(code):
        return {v: k for k, v in op.CUDA_ACT_CODES.items()}[code]

    def bottleneck_adapter_forward_small(self, x, w_down, b_down, w_up, b_up, scaling, scaling_value, residual,
                                         activation):
        self.calls.append("forward")
        self.shapes = (tuple(x.shape), None if residual is None else tuple(residual.shape))
        assert x.is_contiguous() and (residual is None or residual.is_contiguous())  # as the binding checks
        d64 = lambda t: t.double() if t is not None else None
        s = d64(scaling) if scaling is not None else scaling_value
        y = op.reference(d64(x), d64(w_down), d64(b_down), d64(w_up), d64(b_up), self._act(activation), s,
                         d64(residual))
        return y.to(x.dtype)

    def bottleneck_adapter_backward_small(self, dy, x, w_down, b_down, w_up, b_up, scaling, scaling_value,
                                          has_residual, activation, need_ds):
        self.calls.append("backward")
        # plain float64 algebra (autograd is off inside a custom op's implementation)
        f64 = lambda t: t.double() if t is not None else None
        x64, wd, bd, wu, bu = (f64(t) for t in (x, w_down, b_down, w_up, b_up))
        act = self._act(activation)
        a = x64 @ wd.T + (bd if bd is not None else 0)
        h, act_vjp = torch.func.vjp(lambda t: pet_fast.ops.activations.apply(act, t), a)
        up = h @ wu.T + (bu if bu is not None else 0)
        g = dy.double() * (scaling.double() if scaling is not None else scaling_value)
        da = act_vjp(g @ wu)[0]
        res = {"x": da @ wd + (0 if has_residual else dy.double()), "wd": da.T @ x64, "bd": da.sum(0),
               "wu": g.T @ h, "bu": g.sum(0)}
        empty = x.new_empty((0,))  # shared on purpose (see the class docstring)
        out = lambda name, t: res[name].to(x.dtype) if t is not None else empty
        if need_ds and scaling is not None:
            ds = (dy.double() * up).sum(0).float()  # per-channel partials, float32
        else:
            ds = x.new_empty((0,), dtype=torch.float32)
        return [out("x", x), out("wd", wd), out("bd", bd), out("wu", wu), out("bu", bu), ds]


@pytest.mark.parametrize("kw", [dict(scaling="channel", bias=False),
                                dict(scaling="scalar", residual=True),
                                dict(scaling="number", bias=False, residual=True)])
def test_cuda_backend_python_side_with_a_fake_extension(monkeypatch, kw):
    """run_cuda's custom ops and autograd formula on CPU: argument mapping, absent bias gradients,
    d_scaling partials (summed for a scalar scaling, cast to scaling's dtype), the residual's gradient."""
    fake = _FakeExtension()
    monkeypatch.setattr(op, "_extension", lambda: fake)
    hi, lo = make_case((7,), 10, 3, torch.float32, **kw)
    ref = call(hi, "gelu_tanh", "eager")
    out = op.run_cuda(lo["x"], lo["w_down"], lo["b_down"], lo["w_up"], lo["b_up"], activation="gelu_tanh",
                      scaling=lo["scaling"], residual=lo["residual"])
    dy = torch.randn(ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ref_g = grads(hi, ref, dy)
    got_g = grads(lo, out, dy.float())
    assert fake.calls == ["forward", "backward"]
    assert set(got_g) == set(ref_g)
    assert rel_err(out, ref) < 2e-5
    for name in ref_g:
        assert got_g[name].dtype == torch.float32 and got_g[name].shape == ref_g[name].shape, name
        assert rel_err(got_g[name], ref_g[name]) < 2e-5, name


@pytest.mark.parametrize("add_input", [False, True])
def test_cuda_serving_calls_hand_the_kernels_x_as_it_is(monkeypatch, add_input):
    """Without gradients the cuda backend passes a (batch, tokens, d) x (and residual) to the few-token
    forward unreshaped (the binding reads rows of d: no view ops on the host); with gradients it flattens
    them for the autograd formula, as before. Both equal the eager op."""
    fake = _FakeExtension()
    monkeypatch.setattr(op, "_extension", lambda: fake)
    g = torch.Generator().manual_seed(3)
    x, res = torch.randn(2, 5, 12, generator=g), torch.randn(2, 5, 12, generator=g).transpose(0, 1).contiguous().transpose(0, 1)
    wd, bd, wu, bu = torch.randn(4, 12, generator=g), torch.randn(4, generator=g), torch.randn(12, 4, generator=g), None
    kw = dict(activation="silu", scaling=0.5, residual=res, add_input=add_input)
    ref = op.reference(x, wd, bd, wu, bu, **kw)
    with torch.no_grad():
        out = op.run_cuda(x, wd, bd, wu, bu, **kw)
    assert fake.calls == ["forward"] and fake.shapes == ((2, 5, 12), (2, 5, 12))
    assert out.shape == x.shape and rel_err(out, ref) < 1e-6
    out = op.run_cuda(x, wd.requires_grad_(), bd, wu, bu, **kw)
    assert fake.shapes == ((10, 12), (10, 12)) and out.shape == x.shape and rel_err(out, ref) < 1e-6


def test_cuda_backward_custom_op_outputs_never_alias(monkeypatch):
    monkeypatch.setattr(op, "_extension", lambda: _FakeExtension())
    r = lambda *s: torch.randn(*s, requires_grad=True)
    torch.library.opcheck(torch.ops.pet_fast.bottleneck_adapter_cuda.default,
                          (r(5, 16), r(3, 16), None, r(16, 3), None, r(16), 1.0, None, "gelu_tanh"))


def test_backward_fake_rules_return_no_aliases():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x, wd, wu, s = torch.empty(5, 16), torch.empty(3, 16), torch.empty(16, 3), torch.empty(16)
        outs = [torch.ops.pet_fast.bottleneck_adapter_cuda_backward(x, x, wd, None, wu, None, s, 1.0, False, "relu",
                                                                     False),
                torch.ops.pet_fast.bottleneck_adapter_triton_backward(x, x, wd, None, wu, None, s, 1.0, False, "relu",
                                                                       False, False)]
        for out in outs:
            assert len({t.untyped_storage()._cdata for t in out}) == len(out)


def test_layer_norm_backward_on_the_gpu_fp16_path(monkeypatch):
    """The rows backward takes the LayerNorm's two row sums from the first loop's LN(x) @ Wd.T and from Wd @ w
    and Wd @ b, without another pass over x. On the GPU's fp16 path (emulated: the kernels' ``interpreting``
    patched to False, fp16 operands into tl.dot) LN(x) is rounded to fp16 in that product: x's gradient
    must still meet the precision rule against eager autocast, at a width where the sums run over many
    blocks of d."""
    kernels = importlib.import_module("pet_fast.kernels.bottleneck_adapter")
    monkeypatch.setattr(kernels, "interpreting", lambda: False)
    monkeypatch.setattr(kernels, "autotuning", lambda: False)
    check_layer_norm_under_autocast((19,), 200, 12, torch.float16)
