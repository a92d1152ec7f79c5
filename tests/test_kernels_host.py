"""The launchers' host-side integer helpers agree with Triton's own (which they replace on the hot path)."""
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
