"""Bit-packed binary masks: 1 bit per weight, for storing and serving mask-tuned tasks.

Layout (shared by the eager code here, the Triton kernels and the CUDA kernel):

    packed  int32, shape (..., ceil(in_features / 32)), contiguous
    bit b of word w of a row is the mask of column 32 * w + b     (least significant bit first)

Bits past ``in_features`` in the last word of a row are 0. On a little-endian machine (every CUDA GPU
and x86/ARM CPU) the same buffer viewed as uint8 holds the mask of column 8 * j + b in bit b of byte j,
which is how the CUDA kernel reads it (one byte per 8 weights). The leading dimensions are free: a
stack of T task masks for one (out, in) weight is a (T, out, ceil(in / 32)) tensor.
"""
from __future__ import annotations

import operator
from typing import Sequence

import torch

from . import _checks

WORD_BITS = 32


def packed_words(in_features: int) -> int:
    """How many int32 words hold one row of ``in_features`` mask bits."""
    return (int(in_features) + WORD_BITS - 1) // WORD_BITS


def _bit_values(device) -> torch.Tensor:
    return torch.ones((), dtype=torch.int64, device=device) << torch.arange(WORD_BITS, dtype=torch.int64, device=device)


def pack_bool(mask: torch.Tensor) -> torch.Tensor:
    """Pack a bool tensor along its last dimension (see the module docstring for the layout)."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor, got dtype {mask.dtype}")
    if mask.dim() < 1:
        raise ValueError("mask must have at least 1 dimension")
    *lead, k = mask.shape
    words = packed_words(k)
    pad = words * WORD_BITS - k
    m = mask
    if pad:
        m = torch.nn.functional.pad(m.to(torch.uint8), (0, pad)).bool()
    m = m.reshape(*lead, words, WORD_BITS).to(torch.int64)
    v = (m * _bit_values(mask.device)).sum(-1)  # 0 .. 2**32 - 1
    v = torch.where(v >= 2 ** 31, v - 2 ** 32, v)  # two's complement reinterpretation as int32
    return v.to(torch.int32).contiguous()


def pack_mask(scores: torch.Tensor, threshold: float = 0.0) -> torch.Tensor:
    """``1[scores > threshold]`` packed at 1 bit per weight along the last dimension.

    scores: floating tensor (..., in_features); returns int32 (..., ceil(in_features / 32)).
    Bit b of word w of a row is the mask of column 32 * w + b (least significant bit first).
    """
    _checks.tensor("scores", scores, min_ndim=1)
    threshold = _checks.real_number("threshold", threshold)
    return pack_bool(scores.detach() > threshold)


def check_packed(name: str, packed, lead: Sequence[int], in_features: int) -> None:
    """Validate a packed mask of shape (*lead, ceil(in_features / 32)), int32."""
    if not isinstance(packed, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of int32 words (see pet_fast.pack_mask), got {type(packed).__name__}")
    if packed.dtype != torch.int32:
        raise TypeError(f"{name} must have dtype torch.int32 (see pet_fast.pack_mask), got {packed.dtype}")
    expected = (*[int(s) for s in lead], packed_words(in_features))
    if tuple(packed.shape) != expected:
        raise ValueError(f"{name} must have shape {expected} (1 bit per weight, 32 per int32 word), got {tuple(packed.shape)}")


def unpack_mask(packed: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """The bool mask of ``shape`` held in ``packed`` (the inverse of :func:`pack_mask`)."""
    try:  # (operator.index: ints, numpy's and torch's integer scalars; not floats, strings or bools)
        dims = [shape] if not isinstance(shape, (tuple, list, torch.Size)) else list(shape)
        if any(isinstance(s, bool) for s in dims):
            raise TypeError
        shape = tuple(operator.index(s) for s in dims)
    except TypeError:
        raise TypeError(f"shape must be an int or a sequence of ints, got {shape!r}") from None
    if len(shape) < 1:
        raise ValueError("shape must have at least 1 dimension")
    if any(s < 0 for s in shape):
        raise ValueError(f"shape must not have negative sizes, got {shape}")
    check_packed("packed", packed, shape[:-1], shape[-1])
    bits = (packed.to(torch.int64).unsqueeze(-1) >> torch.arange(WORD_BITS, dtype=torch.int64, device=packed.device)) & 1
    bits = bits.reshape(*shape[:-1], packed.shape[-1] * WORD_BITS)
    return bits[..., : shape[-1]].bool()
