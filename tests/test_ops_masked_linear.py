import pytest
import torch

import pet_fast
from conftest import rel_err


def ref64(x, w, scores, bias, threshold):
    m = (scores.double() > threshold).double()
    y = torch.einsum("...i,oi->...o", x.double(), w.double() * m)
    return y if bias is None else y + bias.double()


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("threshold", [-10.0, 0.0, 10.0])  # keeps all, about half, none
@pytest.mark.parametrize("shape,i,o", [((5,), 7, 3), ((2, 3), 13, 9), ((0,), 4, 4)])
def test_forward(bias, threshold, shape, i, o):
    x = torch.randn(*shape, i, dtype=torch.float64)
    w = torch.randn(o, i, dtype=torch.float64)
    s = torch.randn(o, i)
    b = torch.randn(o, dtype=torch.float64) if bias else None
    out = pet_fast.masked_linear(x, w, s, b, threshold=threshold)
    assert out.shape == (*shape, o)
    assert rel_err(out, ref64(x, w, s, b, threshold)) < 1e-12
    if threshold == 10.0 and bias:
        assert torch.equal(out, b.expand_as(out))


@pytest.mark.parametrize("train_weight", [True, False])
def test_straight_through_gradients_exact(train_weight):
    n, i, o = 6, 5, 4
    x = torch.randn(n, i, dtype=torch.float64, requires_grad=True)
    w = torch.randn(o, i, dtype=torch.float64, requires_grad=train_weight)
    s = torch.randn(o, i, dtype=torch.float32, requires_grad=True)
    b = torch.randn(o, dtype=torch.float64, requires_grad=True)
    y = pet_fast.masked_linear(x, w, s, b, threshold=0.1)
    gy = torch.randn_like(y)
    y.backward(gy)
    m = (s.detach().double() > 0.1).double()
    d_weff = gy.T @ x.detach()  # (o, i): d_y^T x
    assert torch.allclose(x.grad, gy @ (w.detach() * m), atol=1e-12)
    assert s.grad.dtype == torch.float32
    assert torch.allclose(s.grad.double(), (d_weff * w.detach()).float().double(), atol=1e-6)
    assert torch.allclose(b.grad, gy.sum(0), atol=1e-12)
    if train_weight:
        assert torch.allclose(w.grad, d_weff * m, atol=1e-12)
    else:
        assert w.grad is None


def test_gradcheck_x_and_bias():
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    s = torch.randn(5, 4, dtype=torch.float64)
    b = torch.randn(5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: pet_fast.masked_linear(x, w, s, b), (x, w, b))


def test_scores_in_other_dtype_than_weight():
    x = torch.randn(3, 8, dtype=torch.float16)
    w = torch.randn(6, 8, dtype=torch.float16)
    s = torch.randn(6, 8)  # float32 scores with a half weight
    out = pet_fast.masked_linear(x, w, s)
    assert out.dtype == torch.float16
    assert rel_err(out, ref64(x, w, s, None, 0.0)) < 1e-2


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_a_masked_out_nonfinite_weight_counts_zero_on_every_path(backend):
    """Where the mask is 0 the masked weight is 0 whatever W holds (NaN, inf): from scores, from packed bits,
    per task of a mixed batch, as the kernels read it."""
    x, w, s = torch.ones(2, 4), torch.ones(3, 4), torch.ones(3, 4)
    w[0, 0], s[0, 0] = float("nan"), -1.0
    w[1, 2], s[1, 2] = float("inf"), -1.0
    want = torch.tensor([[3.0, 3.0, 4.0]] * 2)
    packed = pet_fast.pack_mask(s, 0.0)
    torch.testing.assert_close(pet_fast.masked_linear(x, w, s, backend=backend), want)
    with torch.no_grad():
        torch.testing.assert_close(pet_fast.masked_linear(x, w, packed_mask=packed, backend=backend), want)
    if backend == "eager":
        torch.testing.assert_close(pet_fast.masked_linear_multitask(x, w, packed[None], torch.zeros(2, dtype=torch.long),
                                                                    backend="eager"), want)
