"""torch.compile(fullgraph=True) captures the modules without graph breaks (aot_eager: no codegen,
so the check is fast on the CPU)."""
import torch

import pet_fast


def _check(fn, *args):
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    out = compiled(*args)
    ref = fn(*args)
    assert torch.allclose(out, ref, atol=1e-6)
    out.sum().backward()


def test_adapter_and_masked_linear_compile():
    a = pet_fast.BottleneckAdapter(16, 4, scaling="channel")
    m = pet_fast.MaskedLinear(16, 8)
    _check(lambda x: m(a(x)), torch.randn(3, 16))
    assert a.w_down.grad is not None and m.scores.grad is not None


def test_prefix_attention_compiles():
    enc = pet_fast.PrefixEncoder(1, 2, 8, 3, projection_dim=8)

    def f(q, k, v, kpm):
        (pk, pv), = enc()
        return pet_fast.prefix_attention(q, k, v, pk, pv, key_padding_mask=kpm, causal=True)

    kpm = torch.tensor([[True, True, False, False]])
    _check(f, torch.randn(1, 4, 3, 8), torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8), kpm)


def test_fusion_compiles():
    d = 8
    adapters = [pet_fast.BottleneckAdapter(d, 3) for _ in range(3)]
    fusion = pet_fast.AdapterFusion(d).eval()
    x = torch.randn(2, 5, d)
    _check(lambda x: fusion.fuse(x, x, x, adapters), x)
