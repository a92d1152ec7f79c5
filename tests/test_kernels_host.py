"""The launchers' host-side helpers: integer helpers that agree with Triton's own (which they replace on the
hot path), and the autotuners' keys."""
import importlib

import pytest

triton = pytest.importorskip("triton")
from pet_fast.kernels._host import cdiv, next_power_of_2  # noqa: E402


def test_cdiv_matches_triton():
    for a in list(range(0, 200)) + [2**31 - 1, 2**31, 2**40 + 3]:
        for b in (1, 2, 3, 16, 17, 64, 1024):
            assert cdiv(a, b) == triton.cdiv(a, b), (a, b)


def test_next_power_of_2_matches_triton():
    for n in list(range(0, 2100)) + [2**31 - 1, 2**31, 2**31 + 1]:
        assert next_power_of_2(n) == triton.next_power_of_2(n), n


def test_sm_count_queries_each_device_once(monkeypatch):
    import torch

    from pet_fast.kernels import _host

    calls = []

    class Props:
        multi_processor_count = 132

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: calls.append(i) or Props())
    _host._sm_count.cache_clear()
    try:
        assert [_host.sm_count(torch.device("cuda", 0)) for _ in range(3)] == [132] * 3
        assert _host.sm_count(torch.device("cuda", 1)) == 132
        assert calls == [0, 1]
    finally:
        _host._sm_count.cache_clear()


def test_device_capability_is_queried_once_per_device(monkeypatch):
    import torch

    from pet_fast import dispatch

    calls = []
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: calls.append(i) or (9, 0))
    dispatch._capability.cache_clear()
    try:
        assert [dispatch.device_capability(torch.device("cuda", 0)) for _ in range(3)] == [(9, 0)] * 3
        assert calls == [0]
    finally:
        dispatch._capability.cache_clear()


@pytest.mark.parametrize("module, names", [("bottleneck_adapter", ("_fwd_tuned", "_bwd_rows_tuned")),
                                           ("stacked_adapter_fusion", ("_fwd_tuned", "_bwd_rows_tuned")),
                                           ("prefix_attention", ("_fwd_tuned", "_dkdv_tuned", "_dq_tuned")),
                                           ("masked_linear", ("_forward_kernel", "_grad_input_kernel",
                                                              "_grad_weight_kernel"))])
def test_autotuning_keys_cover_every_variant_switch(module, names):
    """Triton's autotuner keys its cache by the listed arguments (and the tensors' dtypes) only: a variant
    switch left out of the key (a LayerNorm, a residual read, the scaling mode) shares the tile tuned for
    another variant. Every constexpr argument that is not a tile size of the configurations is in the key."""
    km = importlib.import_module(f"pet_fast.kernels.{module}")
    replay = importlib.import_module("pet_fast.kernels._replay")
    for name in names:
        tuned = getattr(km, name)
        fn = replay._jit_function(tuned)
        tiles = {k for c in tuned.configs for k in c.kwargs}
        switches = {p.name for p in fn.params if p.is_constexpr} - tiles
        assert switches and switches <= set(tuned.keys), (name, sorted(switches - set(tuned.keys)))
