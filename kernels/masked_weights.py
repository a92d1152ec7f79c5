"""Triton kernel of ``masked_weights``: ``W_i * 1[S_i > threshold]`` for a whole list of weights in one launch.

Mask-tuning masks every linear of a model (72 in BERT-base). One launch per weight costs its host time 72
times per step; this kernel writes all the masked weights in one launch, into one flat output buffer (each
weight at an offset padded to 16 elements), from a table of the weights' and scores' addresses.

The backward's scores gradients (``G_i * W_i``, G_i the gradient of output i) take one launch too
(``grouped_scores_grads``, same tiles and layout).

Grid: one program per tile of ``BLOCK`` elements of one weight, over all the weights' tiles; tables, made
once per list of (address, size) and kept on the device: the tile's weight index, the tile's first element,
each weight's size, its output offset, and the weights' and scores' addresses (int64, cast to pointers of
the weights' and the scores' dtypes, which are the same for the whole list). Reads the weight and the
scores once, writes the masked weight once in the output dtype: 10 bytes per weight for fp32 weights and
scores and a bf16 output. The comparison is taken in fp32 against the threshold rounded to the scores'
dtype, as PyTorch's ``scores > threshold`` (kernels/masked_linear.py: threshold_for).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._host import FP_FUSION, cdiv
from .masked_linear import threshold_for

BLOCK = 1024
ALIGN = 16  # output offsets are multiples of this many elements (the kernel assumes it)


@triton.jit
def _tile_operands(A_PTRS, B_PTRS, TILE_TENSOR, TILE_START, SIZES, OUT_OFFSETS, A_CARRIER, B_CARRIER,
                   BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
    """This program's tile: the two operands' elements in fp32 (tensor t of each list, read from the int64
    address tables and cast to pointers of the carriers' dtypes), the output offsets and the mask."""
    pid = tl.program_id(0)
    t = tl.load(TILE_TENSOR + pid)
    start = tl.multiple_of(tl.load(TILE_START + pid), BLOCK)  # tiles start at multiples of BLOCK
    size = tl.load(SIZES + t)
    a_ptr = tl.load(A_PTRS + t).to(A_CARRIER.dtype)  # int64 address -> pointer to the list's dtype
    b_ptr = tl.load(B_PTRS + t).to(B_CARRIER.dtype)
    o = tl.multiple_of(tl.load(OUT_OFFSETS + t), 16)  # ALIGN
    if ALIGNED:  # every address 16-byte aligned and every size a multiple of 16 (checked by the launcher):
        # the compiler may then use vector loads and stores, which it cannot prove for loaded addresses
        a_ptr = tl.multiple_of(a_ptr, 16)
        b_ptr = tl.multiple_of(b_ptr, 16)
        size = tl.multiple_of(size, 16)
    offs = start + tl.arange(0, BLOCK)
    ok = offs < size
    a = tl.load(a_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    return a, b, o + offs, ok


@triton.jit
def _grouped_kernel(W_PTRS, S_PTRS, OUT, TILE_TENSOR, TILE_START, SIZES, OUT_OFFSETS, threshold, W_CARRIER,
                    S_CARRIER, BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
    w, s, where, ok = _tile_operands(W_PTRS, S_PTRS, TILE_TENSOR, TILE_START, SIZES, OUT_OFFSETS, W_CARRIER,
                                     S_CARRIER, BLOCK, ALIGNED)
    tl.store(OUT + where, tl.where(s > threshold, w, 0.0).to(OUT.dtype.element_ty), mask=ok)


@triton.jit
def _grouped_grads_kernel(G_PTRS, W_PTRS, OUT, TILE_TENSOR, TILE_START, SIZES, OUT_OFFSETS, G_CARRIER, W_CARRIER,
                          BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
    """The backward's d_scores[i] = G_i * W_i, the product in fp32, stored in OUT's dtype (the scores'), for
    the whole list: the forward's tiles and output layout, G's addresses in place of the scores'."""
    g, w, where, ok = _tile_operands(G_PTRS, W_PTRS, TILE_TENSOR, TILE_START, SIZES, OUT_OFFSETS, G_CARRIER,
                                     W_CARRIER, BLOCK, ALIGNED)
    tl.store(OUT + where, (g * w).to(OUT.dtype.element_ty), mask=ok)


_TABLES: dict = {}  # (device, ((weight address, scores address, numel), ...)) -> device tables
_TABLES_MAX = 64


def _tables(weights, scores, device):
    """(w_ptrs, s_ptrs, tile_tensor, tile_start, sizes, out_offsets, splits, total, aligned) for the list,
    cached by addresses and sizes (parameters keep both from step to step). ``aligned``: every address
    16-byte aligned and every size a multiple of 16 (the kernel's ALIGNED)."""
    key = (device, tuple((w.data_ptr(), s.data_ptr(), w.numel()) for w, s in zip(weights, scores)))
    hit = _TABLES.get(key)
    if hit is not None:
        return hit
    sizes = [w.numel() for w in weights]
    offsets, total = [], 0
    for n in sizes:
        offsets.append(total)
        total += cdiv(n, ALIGN) * ALIGN
    tile_tensor, tile_start = [], []
    for i, n in enumerate(sizes):
        tiles = cdiv(n, BLOCK)
        tile_tensor += [i] * tiles
        tile_start += [j * BLOCK for j in range(tiles)]
    as_dev = lambda values, dtype: torch.tensor(values, dtype=dtype).to(device)
    # the output buffer cut into [weight 0, its padding, weight 1, ...]: one split_with_sizes call per step
    # instead of a slice per weight
    splits = [v for n in sizes for v in (n, cdiv(n, ALIGN) * ALIGN - n)]
    hit = (as_dev([w.data_ptr() for w in weights], torch.int64), as_dev([s.data_ptr() for s in scores], torch.int64),
           as_dev(tile_tensor, torch.int32), as_dev(tile_start, torch.int64), as_dev(sizes, torch.int64),
           as_dev(offsets, torch.int64), splits, total,
           all(w.data_ptr() % 16 == 0 and s.data_ptr() % 16 == 0 and w.numel() % 16 == 0
               for w, s in zip(weights, scores)))
    if len(_TABLES) >= _TABLES_MAX:
        _TABLES.clear()
    _TABLES[key] = hit
    return hit


def grouped_masked_weights(weights, scores, threshold: float, dtype: torch.dtype) -> list:
    """``[(w * (s > threshold)).to(dtype) for w, s in zip(weights, scores)]`` in one launch. The weights
    share one dtype, the scores another; all are contiguous and on one device. The outputs are views of one
    buffer (they do not alias each other)."""
    device = weights[0].device
    w_ptrs, s_ptrs, tile_tensor, tile_start, sizes, out_offsets, splits, total, aligned = _tables(weights, scores, device)
    flat = torch.empty(total, dtype=dtype, device=device)
    tiles = tile_tensor.numel()
    if tiles:
        _grouped_kernel[(tiles,)](w_ptrs, s_ptrs, flat, tile_tensor, tile_start, sizes, out_offsets,
                                  threshold_for(scores[0].dtype, threshold), weights[0], scores[0], BLOCK=BLOCK,
                                  ALIGNED=aligned, **FP_FUSION)
    return [piece.view(w.shape) for piece, w in zip(flat.split_with_sizes(splits)[::2], weights)]


def grouped_scores_grads(grads, weights, scores) -> list:
    """``[(g.float() * w.float()).to(s.dtype) for g, w, s in zip(grads, weights, scores)]`` in one launch:
    the straight-through gradients of the scores. The gradients share one dtype and are contiguous, with
    the weights' shapes; the weights and scores are those of :func:`grouped_masked_weights` (its tables are
    reused; only the gradients' addresses, new every step, go to the device per call). The outputs are views
    of one buffer in the scores' dtype."""
    device = weights[0].device
    w_ptrs, _, tile_tensor, tile_start, sizes, out_offsets, splits, total, aligned = _tables(weights, scores, device)
    flat = torch.empty(total, dtype=scores[0].dtype, device=device)
    tiles = tile_tensor.numel()
    if tiles:
        g_ptrs = torch.tensor([g.data_ptr() for g in grads], dtype=torch.int64).to(device, non_blocking=True)
        aligned = aligned and all(g.data_ptr() % 16 == 0 for g in grads)
        _grouped_grads_kernel[(tiles,)](g_ptrs, w_ptrs, flat, tile_tensor, tile_start, sizes, out_offsets, grads[0],
                                        weights[0], BLOCK=BLOCK, ALIGNED=aligned, **FP_FUSION)
    return [piece.view(w.shape) for piece, w in zip(flat.split_with_sizes(splits)[::2], weights)]
