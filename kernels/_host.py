"""Host-side helpers of the launchers, kept cheap: a training step at BERT-base size is bound by the host,
and every launcher runs once per adapter, masked linear or attention layer per step."""
from __future__ import annotations

import functools

import torch


# Every launch asks for floating-point contraction (a * b + c as one FMA): the kernels' arithmetic is
# written for it. Triton 3.9 warns when a launch leaves it to the default, and its release notes announce
# that default turning off in 3.10.
FP_FUSION = {"enable_fp_fusion": True}


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for Python ints. ``triton.cdiv`` is a constexpr function in recent Triton: a few
    microseconds per call on the host, several calls per launch."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (0 for n = 0), as ``triton.next_power_of_2``, which is a constexpr
    function too."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device, looked up once per device (the properties query costs
    microseconds of host time, and the reductions' launchers ask on every call)."""
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())
