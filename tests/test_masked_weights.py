"""masked_weights (many masked weights in one autograd node, one Triton launch) and mask-tuning's use of it
once per forward: values and straight-through gradients against the per-weight formulas, bad input, and
a masked model's step with the batch equal to the step with masked_linear per linear."""
import copy
import gc
import weakref

import pytest
import torch

import pet_fast
from pet_fast import dispatch
from pet_fast.methods import mask as mask_method
from pet_fast.ops import masked_linear as masked_ops
from tiny_models import batch, build, logits

SHAPES = [(37, 53), (5, 1100), (1, 1), (64, 32), (3, 2049)]  # odd sizes; 5x1100 and 3x2049 span several tiles


def _lists(dtype=torch.float32, scores_dtype=torch.float32, threshold=0.0, keep="half", seed=0):
    g = torch.Generator().manual_seed(seed)
    ws = [torch.randn(s, generator=g).to(dtype) for s in SHAPES]
    shift = {"all": 10.0, "none": -10.0, "half": 0.0}[keep]
    ss = [(torch.randn(s, generator=g) + threshold + shift).to(scores_dtype) for s in SHAPES]
    return ws, ss


def _expected(ws, ss, threshold, dtype):
    return [torch.where(s > threshold, w, 0.0).to(dtype) for w, s in zip(ws, ss)]


@pytest.mark.parametrize("backend", ["eager", "triton"])
@pytest.mark.parametrize("dtype,out_dtype,scores_dtype", [
    (torch.float32, torch.float32, torch.float32), (torch.float32, torch.float16, torch.float32),
    (torch.float16, torch.float16, torch.float16), (torch.float32, torch.float16, torch.float16)])
@pytest.mark.parametrize("keep", ["all", "none", "half"])
def test_values_and_straight_through_gradients(backend, dtype, out_dtype, scores_dtype, keep):
    threshold = 0.3
    ws, ss = _lists(dtype, scores_dtype, threshold, keep)
    for s in ss:
        s.requires_grad_()
    outs = pet_fast.masked_weights(ws, ss, threshold=threshold, dtype=out_dtype, backend=backend)
    exp = _expected(ws, [s.detach() for s in ss], threshold, out_dtype)
    assert len(outs) == len(ws)
    for o, e in zip(outs, exp):
        assert o.dtype == out_dtype and o.shape == e.shape
        torch.testing.assert_close(o, e, rtol=0, atol=0)
    g = torch.Generator().manual_seed(1)
    grads = [torch.randn(o.shape, generator=g).to(out_dtype) for o in outs]
    used = [0, 1, 3, 4]  # output 2 is not used: its scores get no gradient
    torch.autograd.backward([outs[i] for i in used], [grads[i] for i in used])
    for i, (w, s) in enumerate(zip(ws, ss)):
        if i not in used:
            assert s.grad is None
            continue
        want = (grads[i].double() * w.double()).to(scores_dtype)  # G * W, exact in float64, rounded once
        assert s.grad.dtype == scores_dtype
        torch.testing.assert_close(s.grad, want, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_weight_gradient_when_the_weight_trains(backend):
    ws, ss = _lists(keep="half")
    ws = [w.requires_grad_(i % 2 == 0) for i, w in enumerate(ws)]
    outs = pet_fast.masked_weights(ws, ss, threshold=0.0, backend=backend)
    grads = [torch.randn(o.shape) for o in outs]
    torch.autograd.backward(list(outs), grads)
    for i, (w, s, g) in enumerate(zip(ws, ss, grads)):
        if i % 2:
            assert w.grad is None
        else:
            torch.testing.assert_close(w.grad, torch.where(s > 0.0, g, 0.0), rtol=0, atol=0)


def test_triton_takes_one_launch_for_the_list(monkeypatch):
    from pet_fast.kernels import masked_weights as kernels

    launches = []
    real = kernels._grouped_kernel

    class Spy:
        def __getitem__(self, grid):
            launches.append(grid)
            return real[grid]

    monkeypatch.setattr(kernels, "_grouped_kernel", Spy())
    ws, ss = _lists()
    outs = pet_fast.masked_weights(ws, ss, threshold=0.0, backend="triton")
    assert len(launches) == 1
    for o, e in zip(outs, _expected(ws, ss, 0.0, torch.float32)):
        torch.testing.assert_close(o, e, rtol=0, atol=0)


def _spy_launches(monkeypatch, name):
    from pet_fast.kernels import masked_weights as kernels

    launches = []
    real = getattr(kernels, name)

    class Spy:
        def __getitem__(self, grid):
            def launch(*a, **k):
                launches.append(k["ALIGNED"])
                return real[grid](*a, **k)
            return launch

    monkeypatch.setattr(kernels, name, Spy())
    return launches


@pytest.mark.parametrize("dtype,out_dtype,scores_dtype", [
    (torch.float32, torch.bfloat16, torch.float32), (torch.float32, torch.float16, torch.float16),
    (torch.float16, torch.float16, torch.float32), (torch.float16, torch.float32, torch.float16)])
def test_triton_backward_takes_one_launch_for_the_scores_gradients(monkeypatch, dtype, out_dtype, scores_dtype):
    """Every output with a gradient (as in a model's step): d_scores[i] = G_i * W_i for the whole list in one
    launch, bit for bit the eager backend's (one float32 product, rounded once to the scores' dtype). No
    bfloat16 scores here: the interpreter rounds float32 to bfloat16 wrongly (test_gpu_triton_matches_eager)."""
    launches = _spy_launches(monkeypatch, "_grouped_grads_kernel")
    ws, ss = _lists(dtype, scores_dtype, 0.1, "half")
    g = torch.Generator().manual_seed(2)
    grads = [torch.randn(w.shape, generator=g).to(out_dtype) for w in ws]
    got = {}
    for backend in ("triton", "eager"):
        leaves = [s.clone().requires_grad_() for s in ss]
        outs = pet_fast.masked_weights(ws, leaves, threshold=0.1, dtype=out_dtype, backend=backend)
        torch.autograd.backward(list(outs), grads)
        got[backend] = [s.grad for s in leaves]
    assert launches == [False]  # the triton backward only; odd sizes: no vector hints
    for a, b, w, gr in zip(got["triton"], got["eager"], ws, grads):
        assert a.dtype == scores_dtype and a.shape == w.shape
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(a, (gr.float() * w.float()).to(scores_dtype), rtol=0, atol=0)


def test_triton_backward_falls_back_per_weight_where_the_kernel_does_not_apply(monkeypatch):
    """A missing gradient (an unused output) or a strided one: the per-weight formulas, with the same values
    (autograd casts every gradient to its output's dtype, and the outputs share one); aligned lists take the
    kernel's vector hints."""
    launches = _spy_launches(monkeypatch, "_grouped_grads_kernel")
    ws, ss = _lists(keep="half")

    def scores_grads(make_grads, used=None):
        leaves = [s.clone().requires_grad_() for s in ss]
        outs = pet_fast.masked_weights(ws, leaves, threshold=0.0, backend="triton")
        used = range(len(outs)) if used is None else used
        grads = make_grads(outs)
        torch.autograd.backward([outs[i] for i in used], [grads[i] for i in used])
        for i in used:
            torch.testing.assert_close(leaves[i].grad, grads[i].float() * ws[i], rtol=0, atol=0)
        return leaves

    leaves = scores_grads(lambda outs: [torch.randn(o.shape) for o in outs], used=[0, 1, 3, 4])
    assert leaves[2].grad is None
    scores_grads(lambda outs: [torch.randn(o.shape[::-1]).t() if i == 0 else torch.randn(o.shape) for i, o in enumerate(outs)])
    assert launches == []
    g = torch.Generator().manual_seed(0)
    aligned_w = [torch.randn(s, generator=g) for s in [(64, 32), (16, 48)]]
    aligned_s = [torch.randn(w.shape, generator=g).requires_grad_() for w in aligned_w]
    outs = pet_fast.masked_weights(aligned_w, aligned_s, threshold=0.0, backend="triton")
    grads = [torch.randn(o.shape, generator=g) for o in outs]
    torch.autograd.backward(list(outs), grads)
    assert launches == [True]
    for s, w, gr in zip(aligned_s, aligned_w, grads):
        torch.testing.assert_close(s.grad, gr * w, rtol=0, atol=0)


def test_triton_refuses_mixed_dtypes_and_strided_inputs_and_auto_falls_back():
    ws, ss = _lists()
    mixed = [ws[0].half()] + ws[1:]
    with pytest.raises(dispatch.BackendUnavailableError, match="several dtypes"):
        pet_fast.masked_weights(mixed, ss, backend="triton")
    strided = [ws[0].t()] + ws[1:]
    with pytest.raises(dispatch.BackendUnavailableError, match="not contiguous"):
        pet_fast.masked_weights(strided, [ss[0].t()] + ss[1:], backend="triton")
    out = pet_fast.masked_weights(mixed, ss)  # auto: eager on the CPU
    torch.testing.assert_close(out[0], torch.where(ss[0] > 0, mixed[0], 0.0), rtol=0, atol=0)


def test_strided_inputs_after_a_contiguous_call_are_refused_too():
    """The op remembers its plan per call signature: contiguity is part of it, so transposed tensors of the
    contiguous call's shapes are refused by the triton backend (it reads them flat), not read wrongly."""
    ws, ss = _lists()
    pet_fast.masked_weights(ws, ss, backend="triton")
    m = [min(w.shape) for w in ws]  # (square: a transpose keeps the shape)
    square = [w[:k, :k].contiguous() for w, k in zip(ws, m)]
    sq_s = [s[:k, :k].contiguous() for s, k in zip(ss, m)]
    pet_fast.masked_weights(square, sq_s, backend="triton")
    flipped_w, flipped_s = [w.t() for w in square], [s.t() for s in sq_s]
    with pytest.raises(dispatch.BackendUnavailableError, match="not contiguous"):
        pet_fast.masked_weights(flipped_w, flipped_s, backend="triton")
    out = pet_fast.masked_weights(flipped_w, flipped_s)  # auto: eager here
    for o, w, s in zip(out, flipped_w, flipped_s):
        torch.testing.assert_close(o, torch.where(s > 0, w, 0.0), rtol=0, atol=0)


@pytest.mark.parametrize("call,match", [
    (lambda w, s: pet_fast.masked_weights([], []), "weights must not be empty"),
    (lambda w, s: pet_fast.masked_weights(w, s[:-1]), "one tensor per weight"),
    (lambda w, s: pet_fast.masked_weights(w[0], s[0]), "weights must be a list or tuple"),
    (lambda w, s: pet_fast.masked_weights(w, [s[1]] + s[1:]), r"scores\[0\] must have shape"),
    (lambda w, s: pet_fast.masked_weights([w[0][0]] + w[1:], s), r"weights\[0\] must have 2 dimensions"),
    (lambda w, s: pet_fast.masked_weights(w, [s[0].int()] + s[1:]), r"scores\[0\] must be a floating-point"),
    (lambda w, s: pet_fast.masked_weights(w, [s[0].to("meta")] + s[1:]), "must be on the device of weights"),
    (lambda w, s: pet_fast.masked_weights(w, s, dtype=torch.int32), "dtype must be a floating"),
    (lambda w, s: pet_fast.masked_weights(w, s, threshold=float("nan")), "threshold must not be NaN"),
    (lambda w, s: pet_fast.masked_weights(w, s, threshold=True), "threshold must be a real number"),
])
def test_bad_input_names_the_argument(call, match):
    ws, ss = _lists()
    with pytest.raises((TypeError, ValueError), match=match):
        call(ws, ss)


# ------------------------------------------------------------------ mask-tuning: one batch per forward


def _mask_model(kind="bert"):
    model = build(kind)
    pet_fast.inject(model, pet_fast.MaskConfig(init_score=0.05), "m")
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # about half of every mask kept
        for m in model.modules():
            if isinstance(m, mask_method.MaskScores):
                m.scores.copy_(torch.randn(m.scores.shape, generator=g))
    return model  # eval mode (no dropout): the two paths see the same activations; gradients flow the same


def _step(model, per_linear: bool, monkeypatch, autocast: bool = False):
    with monkeypatch.context() as mp:
        if per_linear:
            mp.setattr(mask_method._ForwardMasks, "weight", lambda *a: None)
        ids, mask = batch()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = logits(model, ids, mask).float()
        out.pow(2).sum().backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out.detach(), grads


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_a_step_with_one_batch_equals_the_step_with_masked_linear_per_linear(backend, autocast, monkeypatch):
    model = _mask_model()
    calls = {"batch": 0, "per_linear": 0}
    real_batch, real_linear = mask_method.masked_weights, mask_method.masked_linear

    def count_batch(*a, **k):
        calls["batch"] += 1
        return real_batch(*a, **k)

    def count_linear(*a, **k):
        calls["per_linear"] += 1
        return real_linear(*a, **k)

    monkeypatch.setattr(mask_method, "masked_weights", count_batch)
    monkeypatch.setattr(mask_method, "masked_linear", count_linear)
    with pet_fast.use_backend(backend):
        out_b, grads_b = _step(model, False, monkeypatch, autocast)
        assert calls == {"batch": 1, "per_linear": 0}
        out_l, grads_l = _step(model, True, monkeypatch, autocast)
        assert calls["per_linear"] > 0
    assert set(grads_b) == set(grads_l) and any("scores" in k for k in grads_b)
    # the forward runs the same F.linear on the same masked weights: the same bits; the gradients come
    # from the same products, in another order (bf16 ones under autocast)
    torch.testing.assert_close(out_b, out_l, rtol=0, atol=0)
    tol = dict(rtol=1e-2, atol=1e-4) if autocast else dict(rtol=1e-5, atol=1e-6)
    for k in grads_l:
        torch.testing.assert_close(grads_b[k], grads_l[k], **tol, msg=k)


def test_gpt2_conv1d_linears_run_per_linear_and_the_rest_batch(monkeypatch):
    model = _mask_model("gpt2")
    out_b, grads_b = _step(model, False, monkeypatch)
    out_l, grads_l = _step(model, True, monkeypatch)
    torch.testing.assert_close(out_b, out_l, rtol=1e-6, atol=1e-6)
    for k in grads_l:
        torch.testing.assert_close(grads_b[k], grads_l[k], rtol=1e-5, atol=1e-6, msg=k)


def test_no_batch_without_grad_under_checkpointing_or_outside_the_models_forward(monkeypatch):
    model = _mask_model()
    made = []
    real = mask_method.masked_weights
    monkeypatch.setattr(mask_method, "masked_weights", lambda *a, **k: made.append(1) or real(*a, **k))
    ids, mask = batch()
    with torch.no_grad():
        logits(model, ids, mask)
    model.train()  # transformers checkpoints only in training mode
    switch = "activation_checkpointing" if hasattr(model, "activation_checkpointing_enable") else "gradient_checkpointing"
    getattr(model, f"{switch}_enable")()
    logits(model, ids, mask).sum().backward()
    getattr(model, f"{switch}_disable")()
    layer = model.bert.encoder.layer[0].attention.self.query  # a masked linear called on its own
    layer(torch.randn(2, 3, layer.in_features)).sum().backward()
    assert made == []
    logits(model, ids, mask).sum().backward()
    assert made == [1]


def test_a_deep_copy_batches_its_own_scores(monkeypatch):
    model = _mask_model()
    twin = copy.deepcopy(model)
    ids, mask = batch()
    logits(twin, ids, mask).sum().backward()
    assert all(p.grad is None for p in model.parameters())
    assert any(p.grad is not None for n, p in twin.named_parameters() if "scores" in n)


def test_removed_tasks_are_forgotten_and_a_new_one_batches():
    model = _mask_model()
    pet_fast.inject(model, pet_fast.MaskConfig(), "n")
    state = model.__dict__["_pet_fast_mask_forward"]
    removed = weakref.ref(next(m for m in model.modules() if isinstance(m, mask_method.MaskScores)))
    pet_fast.remove(model, "m")
    gc.collect()
    assert "m" not in state.sites and removed() is None  # nothing keeps the removed task's scores alive
    ids, mask = batch()
    logits(model, ids, mask).sum().backward()
    assert len(state.sites["n"]) > 0
    base = model.base_model
    pet_fast.remove(model, "n")  # the model's last mask task: the per-forward state and its hooks go
    assert "_pet_fast_mask_forward" not in model.__dict__
    assert not base._forward_pre_hooks and not base._forward_hooks
    pet_fast.inject(model, pet_fast.MaskConfig(), "o")
    logits(model, ids, mask).sum().backward()
    assert len(model.__dict__["_pet_fast_mask_forward"].sites["o"]) > 0


def test_backend_for_reports_masked_linears_choice():
    x, w, s = torch.randn(3, 4), torch.randn(5, 4), torch.randn(5, 4)
    assert masked_ops.backend_for(x, w, s) == "eager"
    assert masked_ops.backend_for(x, w, s, backend="triton") == "triton"


@pytest.mark.gpu
@pytest.mark.parametrize("scores_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gpu_triton_matches_eager(out_dtype, scores_dtype):
    """Forward and the scores' gradients (one launch each: every output has a gradient), bit for bit."""
    ws, ss = _lists(keep="half", scores_dtype=scores_dtype)
    ws = [w.cuda() for w in ws]
    ss = [s.cuda().requires_grad_() for s in ss]
    outs = pet_fast.masked_weights(ws, ss, threshold=0.0, dtype=out_dtype, backend="triton")
    for o, e in zip(outs, _expected(ws, [s.detach() for s in ss], 0.0, out_dtype)):
        torch.testing.assert_close(o, e, rtol=0, atol=0)
    grads = [torch.randn_like(o) for o in outs]
    torch.autograd.backward(list(outs), grads)
    for w, s, g in zip(ws, ss, grads):
        torch.testing.assert_close(s.grad, (g.float() * w.float()).to(scores_dtype), rtol=0, atol=0)


def test_aligned_lists_take_the_vector_hints_and_give_the_same_values(monkeypatch):
    """Sizes that are multiples of 16 at 16-byte aligned addresses: the launcher sets ALIGNED (vector loads
    on a GPU); the values are the same."""
    seen = _spy_launches(monkeypatch, "_grouped_kernel")
    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(s, generator=g) for s in [(64, 32), (16, 48), (48, 16)]]
    ss = [torch.randn(w.shape, generator=g) for w in ws]
    outs = pet_fast.masked_weights(ws, ss, threshold=0.0, dtype=torch.float16, backend="triton")
    odd = pet_fast.masked_weights(ws[:1] + [torch.randn(3, 5)], ss[:1] + [torch.randn(3, 5)], backend="triton")
    assert seen == [True, False]
    for o, e in zip(list(outs) + [odd[0]], _expected(ws, ss, 0.0, torch.float16) + [torch.where(ss[0] > 0, ws[0], 0.0)]):
        torch.testing.assert_close(o, e, rtol=0, atol=0)


@pytest.mark.gpu
def test_gpu_a_masked_step_with_one_batch_equals_the_per_linear_step(monkeypatch):
    """On a GPU under bf16 autocast (auto: the grouped kernel and the Triton masked_linear path)."""
    model = _mask_model().cuda()
    ids, mask = batch()

    def step(per_linear):
        with monkeypatch.context() as mp:
            if per_linear:
                mp.setattr(mask_method._ForwardMasks, "weight", lambda *a: None)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = logits(model, ids.cuda(), mask.cuda()).float()
            out.pow(2).sum().backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        return out.detach(), grads

    out_b, grads_b = step(False)
    out_l, grads_l = step(True)
    torch.testing.assert_close(out_b, out_l, rtol=1e-3, atol=1e-5)  # the same cuBLAS products
    assert set(grads_b) == set(grads_l)
    for k in grads_l:
        torch.testing.assert_close(grads_b[k], grads_l[k], rtol=1e-2, atol=1e-4, msg=k)
