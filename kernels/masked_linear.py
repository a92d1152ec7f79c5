"""Triton kernels for masked_linear (mask-tuning): GEMMs whose weight tiles are masked in registers.

    forward   y   = x @ (W * M).T + b                 M = 1[scores > threshold] or the packed bits
    backward  dx  = dy @ (W * M)
              G   = dy.T @ x        (one GEMM)  ->  d_scores = G * W,  d_weight = G * M,  d_bias = sum(dy)

The masked weight ``W * M`` is never written to global memory: each (rows, K) tile of W is loaded with
the matching tile of the scores (compared to the threshold) or of the packed mask words (bit
``k % 32`` of word ``k // 32``, see pet_fast/ops/mask_packing.py), and zeroed where the mask is 0 before
it enters ``tl.dot``. Accumulation is in fp32. Each tile starts at an int64 base (row * row length) and the
offsets inside it are int32 (rows of a tile * row length < 2**31, see _check_sizes): int64 offset tiles
cost twice the registers, and on sm_90 made the odd-shape tiles spill. No autograd here: the wiring is in
pet_fast/ops/masked_linear.py. The op serves packed masks with these GEMMs (``forward(bits=...)``); its
training path does NOT use them any more: measured on an H100 (bf16) they ran 2.5x slower than cuBLAS
masking from the scores and far slower from bits, so training writes the masked weight once with
:func:`masked_weight`, runs cuBLAS, and forms the score and weight gradients with :func:`mask_grads`
(both at the end of this file). The GEMMs stay callable for the serving path and the benchmark's rows.

Layouts (the launchers make inputs contiguous): x (M, K), weight (N, K), scores (N, K),
bits (N, ceil(K / 32)) int32, bias (N,), y (M, N). Here M counts tokens, N output features and K
input features.
"""
from __future__ import annotations

import functools
import os
from typing import Optional

import torch
import triton
import triton.language as tl

from ._host import FP_FUSION, cdiv

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# PET_FAST_AUTOTUNE=0 (GPU correctness runs): one small tile per kernel, one compile per kernel.
_TUNE = os.environ.get("PET_FAST_AUTOTUNE", "1") != "0"


def _configs(gpu, transpose=False):
    """Autotune configs from (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) tuples in forward terms (an
    (M, N) output tile, K the reduction); ``transpose`` maps them onto the dx kernel, whose BLOCK_N is
    the reduction and BLOCK_K the output tile. The fp32 tiles of _FMA_CONFIGS go with the others: the
    pruner keeps them for IEEE fp32 dots only (see _prune)."""
    if _INTERPRET:  # the interpreter accepts exactly one config
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP": 4}, num_warps=4, num_stages=1)]
    tiles = gpu + _FMA_CONFIGS if _TUNE else [(64, 64, 64, 8, 3), (64, 64, 16, 8, 3)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bk if transpose else bn, "BLOCK_K": bn if transpose else bk,
                           "GROUP": 8}, num_warps=w, num_stages=s) for bm, bn, bk, w, s in tiles]


SHARED_BYTES = 232448  # shared memory per block on sm_90 (H100, H200)


def _tf32_tiles_fit(c, reduction: str, from_bits: bool) -> bool:
    """Whether a forward or dx GEMM config's pipelined float32 tiles fit the shared memory: the rows'
    (BLOCK_M x reduction) and the weight's (other block x reduction), and the scores' the weight is
    masked by (not from packed bits). The tiles were sized for 2-byte inputs; benchmarks/compile_check.py
    found 9 of 12 over the limit with TF32 from scores, in both kernels."""
    red = c.kwargs[reduction]
    other = c.kwargs["BLOCK_N" if reduction == "BLOCK_K" else "BLOCK_K"]
    return c.num_stages * red * (c.kwargs["BLOCK_M"] + other * (1 if from_bits else 2)) * 4 <= SHARED_BYTES


def _prune(reduction, check_shared: bool = False):
    """IEEE fp32 dots run on the FMA units with their operand tiles in registers: on sm_90 the
    tensor-core tiles spill 0.5-17 KB per thread there (benchmarks/compile_check_kernels.py), while
    reductions of 16 do not spill. Keep the tiles that suit the dot: reduction block <= 16 for IEEE
    fp32, >= 32 otherwise; with ``check_shared``, TF32 only the tiles whose float32 stages fit (the
    autotuner would compile the others, then skip them as out of resources)."""
    def prune(configs, named_args, **kwargs):
        fp32 = bool(kwargs.get("FP32_DOT"))
        fma = fp32 and kwargs.get("PRECISION") == "ieee"
        kept = [c for c in configs if (c.kwargs[reduction] <= 16) == fma] or configs
        if check_shared and fp32 and not fma:
            kept = [c for c in kept if _tf32_tiles_fit(c, reduction, bool(kwargs.get("FROM_BITS")))] or kept
        return kept
    return prune


# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) of the two GEMMs that reduce over K or N (forward, dx), in
# forward terms. On sm_90 each fits the shared memory; in bf16/fp16 only (64, 256, 32, 4, 4) spills (0-32 B).
# (64, 64, 64, 8, 3) is also the PET_FAST_AUTOTUNE=0 tile: with 4 warps it spilled 184-304 B at odd K.
_GEMM_CONFIGS = [
    (128, 128, 64, 8, 3), (128, 256, 32, 8, 4), (256, 128, 64, 8, 3), (64, 128, 64, 4, 4),
    (128, 64, 64, 4, 4), (64, 64, 64, 4, 4), (64, 64, 64, 8, 3), (128, 128, 32, 4, 4), (64, 256, 32, 4, 4),
    # few tokens (serving from packed bits with N > 16): narrow row tiles, more programs over the weight
    (16, 64, 128, 4, 4), (32, 64, 128, 4, 4), (16, 128, 64, 4, 4),
]
# IEEE fp32 (no tensor cores): short reductions, none of them spills on sm_90 ((64, 64, 16, 4, 3) does at odd K,
# hence the 8-warp one, also the PET_FAST_AUTOTUNE=0 tile)
_FMA_CONFIGS = [(64, 64, 16, 4, 3), (64, 64, 16, 8, 3), (32, 64, 16, 4, 3), (128, 64, 16, 8, 3), (64, 128, 16, 8, 3),
                (16, 64, 16, 4, 3)]


@triton.jit
def _keep_tile(s_ptr, bits_ptr, row0, rows, col0, offs_c, valid, n_rows, n_cols, n_words, threshold,
               FROM_BITS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """The (BLOCK_R, BLOCK_C) tile of the mask as booleans, for rows ``row0 + rows`` (row0 a scalar, rows
    the int32 offsets inside the tile) and columns ``offs_c = col0 + arange(BLOCK_C)``: bit ``c % 32`` of
    word ``c // 32`` of the row, or ``scores > threshold``.

    From bits, with BLOCK_C a multiple of 32 (col0, a multiple of BLOCK_C, then starts a word): the
    (BLOCK_R, BLOCK_C / 32) tile of words is loaded once, one load per word, and expanded in registers by
    a broadcast shift to (BLOCK_R, BLOCK_C / 32, 32) bits, reshaped to the (BLOCK_R, BLOCK_C) tile. (A
    gather of the word of every element, 32 loads of each word, measured ~15x slower than masking from
    the scores on an H100; the expansion is unmeasured on hardware.) Bits past n_cols are 0 in the layout
    and the callers mask the weight there anyway. Narrower tiles (the fp32 FMA tiles of 16 columns)
    keep the per-element gather."""
    if FROM_BITS:
        if BLOCK_C % 32 == 0:
            wi = (col0 // 32) + tl.arange(0, BLOCK_C // 32)
            row_ok = (row0 + rows) < n_rows
            words = tl.load((bits_ptr + tl.cast(row0, tl.int64) * n_words) + (rows[:, None] * n_words + wi[None, :]),
                            mask=row_ok[:, None] & (wi[None, :] < n_words), other=0)
            bit3 = (words[:, :, None] >> tl.arange(0, 32)[None, None, :]) & 1
            keep = tl.reshape(bit3, (BLOCK_R, BLOCK_C)) != 0
        else:
            word = tl.load((bits_ptr + tl.cast(row0, tl.int64) * n_words) + (rows[:, None] * n_words + (offs_c[None, :] >> 5)),
                           mask=valid, other=0)
            keep = ((word >> (offs_c[None, :] & 31).to(tl.int32)) & 1) != 0
    else:
        s = tl.load((s_ptr + tl.cast(row0, tl.int64) * n_cols) + (rows[:, None] * n_cols + offs_c[None, :]),
                    mask=valid, other=0.0).to(tl.float32)
        keep = s > threshold
    return keep


@triton.jit
def _masked_weight_tile(w_ptr, s_ptr, bits_ptr, row0, rows, col0, offs_c, n_rows, n_cols, n_words, threshold,
                        FROM_BITS: tl.constexpr, UPCAST: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """The (rows, cols) tile of W * M; rows (``row0 + rows``) index output features, cols input features."""
    valid = ((row0 + rows)[:, None] < n_rows) & (offs_c[None, :] < n_cols)
    w = tl.load((w_ptr + tl.cast(row0, tl.int64) * n_cols) + (rows[:, None] * n_cols + offs_c[None, :]),
                mask=valid, other=0.0)
    if UPCAST:
        w = w.to(tl.float32)
    keep = _keep_tile(s_ptr, bits_ptr, row0, rows, col0, offs_c, valid, n_rows, n_cols, n_words, threshold, FROM_BITS,
                      BLOCK_R, BLOCK_C)
    return tl.where(keep, w, tl.zeros_like(w))


@triton.jit
def _grouped_pid(pid, n_rows_blocks, n_cols_blocks, GROUP: tl.constexpr):
    """Row-major tile order in groups of GROUP row blocks, so that neighbouring programs share operands in L2."""
    per_group = GROUP * n_cols_blocks
    group = pid // per_group
    first = group * GROUP
    size = tl.minimum(n_rows_blocks - first, GROUP)
    pid_r = first + (pid % per_group) % size
    pid_c = (pid % per_group) // size
    return pid_r, pid_c


@triton.jit
def _dot(a, b, acc, FP32_DOT: tl.constexpr, PRECISION: tl.constexpr):
    if FP32_DOT:
        return tl.dot(a, b, acc, input_precision=PRECISION)
    return tl.dot(a, b, acc)


# Autotuning keys: the sizes and every constexpr that is not a tile size (variants do not share a tuned tile).
@triton.autotune(configs=_configs(_GEMM_CONFIGS), key=["M", "N", "K", "FROM_BITS", "HAS_BIAS", "UPCAST", "FP32_DOT",
                                                       "PRECISION"],
                 prune_configs_by={"early_config_prune": _prune("BLOCK_K", check_shared=True)})
@triton.jit
def _forward_kernel(x_ptr, w_ptr, s_ptr, bits_ptr, b_ptr, y_ptr, M, N, K, n_words, threshold,
                    FROM_BITS: tl.constexpr, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr,
                    FP32_DOT: tl.constexpr, PRECISION: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr):
    pid_m, pid_n = _grouped_pid(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP)
    m0 = pid_m * BLOCK_M
    n0 = pid_n * BLOCK_N
    rm = tl.arange(0, BLOCK_M)
    rn = tl.arange(0, BLOCK_N)
    m_ok = (m0 + rm) < M
    x_base = x_ptr + tl.cast(m0, tl.int64) * K
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(x_base + (rm[:, None] * K + offs_k[None, :]), mask=m_ok[:, None] & (offs_k[None, :] < K), other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
        w = _masked_weight_tile(w_ptr, s_ptr, bits_ptr, n0, rn, k0, offs_k, N, K, n_words, threshold, FROM_BITS, UPCAST,
                                BLOCK_N, BLOCK_K)
        acc = _dot(a, tl.trans(w), acc, FP32_DOT, PRECISION)
    offs_n = n0 + rn
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    tl.store((y_ptr + tl.cast(m0, tl.int64) * N) + (rm[:, None] * N + offs_n[None, :]), acc.to(y_ptr.dtype.element_ty),
             mask=m_ok[:, None] & (offs_n[None, :] < N))


@triton.autotune(configs=_configs(_GEMM_CONFIGS, transpose=True), key=["M", "N", "K", "FROM_BITS", "UPCAST", "FP32_DOT",
                                                                       "PRECISION"],
                 prune_configs_by={"early_config_prune": _prune("BLOCK_N", check_shared=True)})
@triton.jit
def _grad_input_kernel(dy_ptr, w_ptr, s_ptr, bits_ptr, dx_ptr, M, N, K, n_words, threshold,
                       FROM_BITS: tl.constexpr, UPCAST: tl.constexpr, FP32_DOT: tl.constexpr, PRECISION: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr):
    """dx (M, K) = dy (M, N) @ (W * M) (N, K); here BLOCK_N tiles the reduction and BLOCK_K the output."""
    pid_m, pid_k = _grouped_pid(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(K, BLOCK_K), GROUP)
    m0 = pid_m * BLOCK_M
    rm = tl.arange(0, BLOCK_M)
    rn = tl.arange(0, BLOCK_N)
    m_ok = (m0 + rm) < M
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    dy_base = dy_ptr + tl.cast(m0, tl.int64) * N
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + rn
        g = tl.load(dy_base + (rm[:, None] * N + offs_n[None, :]), mask=m_ok[:, None] & (offs_n[None, :] < N), other=0.0)
        if UPCAST:
            g = g.to(tl.float32)
        w = _masked_weight_tile(w_ptr, s_ptr, bits_ptr, n0, rn, pid_k * BLOCK_K, offs_k, N, K, n_words, threshold,
                                FROM_BITS, UPCAST, BLOCK_N, BLOCK_K)
        acc = _dot(g, w, acc, FP32_DOT, PRECISION)
    tl.store((dx_ptr + tl.cast(m0, tl.int64) * K) + (rm[:, None] * K + offs_k[None, :]), acc.to(dx_ptr.dtype.element_ty),
             mask=m_ok[:, None] & (offs_k[None, :] < K))


# (BLOCK_N, BLOCK_K, BLOCK_M, warps, stages) for the weight-gradient GEMM, which reduces over tokens
# On sm_90 (bf16/fp16) (256, 128, 32, 8, 3) spills 350-360 B in the epilogue; the others do not spill.
_WGRAD_CONFIGS = [
    (128, 128, 64, 8, 3), (128, 128, 32, 8, 4), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4),
    (64, 64, 64, 4, 4), (64, 64, 64, 8, 3), (256, 128, 32, 8, 3),
]
# IEEE fp32 (FMA units): reductions of 16 tokens, none of them spills on sm_90 (the tiles above spill up to 470 B)
_WGRAD_FMA_CONFIGS = [(64, 64, 16, 4, 3), (128, 64, 16, 8, 3), (64, 128, 16, 8, 3), (128, 128, 16, 8, 3)]


def _wgrad_configs():
    if _INTERPRET:
        return [triton.Config({"BLOCK_N": 32, "BLOCK_K": 32, "BLOCK_M": 16, "GROUP": 4}, num_warps=4, num_stages=1)]
    tiles = _WGRAD_CONFIGS + _WGRAD_FMA_CONFIGS if _TUNE else [(64, 64, 64, 8, 3), (64, 64, 16, 4, 3)]
    return [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "BLOCK_M": bm, "GROUP": 8}, num_warps=w, num_stages=s)
            for bn, bk, bm, w, s in tiles]


@triton.autotune(configs=_wgrad_configs(), key=["M", "N", "K", "WEIGHT_GRAD", "BIAS_GRAD", "FROM_BITS", "UPCAST",
                                               "FP32_DOT", "PRECISION"],
                 prune_configs_by={"early_config_prune": _prune("BLOCK_M")})
@triton.jit
def _grad_weight_kernel(dy_ptr, x_ptr, w_ptr, s_ptr, bits_ptr, ds_ptr, dw_ptr, db_ptr, M, N, K, n_words, threshold,
                        FROM_BITS: tl.constexpr, WEIGHT_GRAD: tl.constexpr, BIAS_GRAD: tl.constexpr, UPCAST: tl.constexpr,
                        FP32_DOT: tl.constexpr, PRECISION: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, GROUP: tl.constexpr):
    """G = dy.T @ x over a (BLOCK_N, BLOCK_K) tile; epilogue d_scores = G * W, d_weight = G * M.
    The programs of the first column of tiles also sum dy over tokens for d_bias."""
    pid_n, pid_k = _grouped_pid(tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.cdiv(K, BLOCK_K), GROUP)
    n0 = pid_n * BLOCK_N
    rn = tl.arange(0, BLOCK_N)
    rm = tl.arange(0, BLOCK_M)
    offs_n = n0 + rn
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    db = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        m_ok = (m0 + rm) < M
        g_t = tl.load((dy_ptr + tl.cast(m0, tl.int64) * N) + (rm[None, :] * N + offs_n[:, None]),
                      mask=m_ok[None, :] & (offs_n[:, None] < N), other=0.0)
        a = tl.load((x_ptr + tl.cast(m0, tl.int64) * K) + (rm[:, None] * K + offs_k[None, :]),
                    mask=m_ok[:, None] & (offs_k[None, :] < K), other=0.0)
        if UPCAST:
            g_t = g_t.to(tl.float32)
            a = a.to(tl.float32)
        acc = _dot(g_t, a, acc, FP32_DOT, PRECISION)
        if BIAS_GRAD:
            db += tl.sum(g_t.to(tl.float32), axis=1)
    valid = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    base = tl.cast(n0, tl.int64) * K
    idx = rn[:, None] * K + offs_k[None, :]
    w = tl.load((w_ptr + base) + idx, mask=valid, other=0.0).to(tl.float32)
    tl.store((ds_ptr + base) + idx, (acc * w).to(ds_ptr.dtype.element_ty), mask=valid)
    if WEIGHT_GRAD:
        keep = _keep_tile(s_ptr, bits_ptr, n0, rn, pid_k * BLOCK_K, offs_k, valid, N, K, n_words, threshold, FROM_BITS,
                          BLOCK_N, BLOCK_K)
        dw = tl.where(keep, acc, tl.zeros_like(acc))
        tl.store((dw_ptr + base) + idx, dw.to(dw_ptr.dtype.element_ty), mask=valid)
    if BIAS_GRAD:
        if pid_k == 0:
            tl.store(db_ptr + offs_n, db.to(db_ptr.dtype.element_ty), mask=offs_n < N)


# ---------------------------------------------------------------------------------------------------
# Launchers (plain tensors in, tensors out; the callers validate).

@functools.lru_cache(maxsize=256)
def threshold_for(scores_dtype: torch.dtype, threshold: float) -> float:
    """The threshold as the kernels must see it so that ``s > t`` (computed in fp32) matches PyTorch's
    ``scores > threshold`` in the scores' dtype: the threshold rounded to that dtype. Cached: the
    rounding goes through a CPU tensor (two aten ops and a few us of host time per call otherwise)."""
    return float(torch.tensor(float(threshold), dtype=scores_dtype).item())


# Offsets inside a tile are int32: (rows of a tile, at most 256) * (row length) must stay below 2**31.
MAX_FEATURES = 1 << 22


def _check_sizes(n_out: int, n_in: int) -> None:
    for name, n in (("out_features", n_out), ("in_features", n_in)):
        if n >= MAX_FEATURES:
            raise ValueError(f"{name} = {n}: the Triton masked_linear kernels take fewer than {MAX_FEATURES}")


def _dot_flags(dtype: torch.dtype):
    upcast = _INTERPRET
    fp32_dot = upcast or dtype == torch.float32
    precision = "tf32" if (dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 and not _INTERPRET) else "ieee"
    return upcast, fp32_dot, precision


def forward(x: torch.Tensor, weight: torch.Tensor, scores: Optional[torch.Tensor] = None,
            bits: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None, threshold: float = 0.0) -> torch.Tensor:
    """y (M, N) = x (M, K) @ (weight * mask).T + bias, the mask from ``scores`` or from packed ``bits``."""
    if (scores is None) == (bits is None):
        raise ValueError("forward needs exactly one of scores and bits")
    x = x.contiguous()
    weight = weight.contiguous()
    bias = None if bias is None else bias.contiguous()  # the kernel indexes the bias with stride 1
    M, K = x.shape
    N = weight.shape[0]
    _check_sizes(N, K)
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return y
    from_bits = bits is not None
    if from_bits:
        bits = bits.contiguous()
        s_arg, n_words, thr = bits, bits.shape[1], 0.0
    else:
        scores = scores.contiguous()
        s_arg, n_words, thr = scores, 0, threshold_for(scores.dtype, threshold)
    upcast, fp32_dot, precision = _dot_flags(x.dtype)
    grid = lambda meta: (cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"]),)
    _forward_kernel[grid](x, weight, s_arg, s_arg, bias if bias is not None else y, y, M, N, K, n_words, thr,
                          FROM_BITS=from_bits, HAS_BIAS=bias is not None, UPCAST=upcast, FP32_DOT=fp32_dot,
                          PRECISION=precision, **FP_FUSION)
    return y


def grad_input(dy: torch.Tensor, weight: torch.Tensor, scores: Optional[torch.Tensor] = None,
               bits: Optional[torch.Tensor] = None, threshold: float = 0.0) -> torch.Tensor:
    """dx (M, K) = dy (M, N) @ (weight * mask)."""
    if (scores is None) == (bits is None):
        raise ValueError("grad_input needs exactly one of scores and bits")
    dy = dy.contiguous()
    weight = weight.contiguous()
    M, N = dy.shape
    K = weight.shape[1]
    _check_sizes(N, K)
    dx = torch.empty((M, K), dtype=dy.dtype, device=dy.device)
    if M == 0 or K == 0:
        return dx
    if N == 0:
        return dx.zero_()
    from_bits = bits is not None
    if from_bits:
        bits = bits.contiguous()
        s_arg, n_words, thr = bits, bits.shape[1], 0.0
    else:
        scores = scores.contiguous()
        s_arg, n_words, thr = scores, 0, threshold_for(scores.dtype, threshold)
    upcast, fp32_dot, precision = _dot_flags(dy.dtype)
    grid = lambda meta: (cdiv(M, meta["BLOCK_M"]) * cdiv(K, meta["BLOCK_K"]),)
    _grad_input_kernel[grid](dy, weight, s_arg, s_arg, dx, M, N, K, n_words, thr, FROM_BITS=from_bits,
                             UPCAST=upcast, FP32_DOT=fp32_dot, PRECISION=precision, **FP_FUSION)
    return dx


def grad_weight(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, scores: Optional[torch.Tensor] = None,
                bits: Optional[torch.Tensor] = None, threshold: float = 0.0, *, weight_grad: bool, bias_grad: bool,
                scores_dtype: Optional[torch.dtype] = None):
    """(d_scores, d_weight or None, d_bias or None) from one GEMM G = dy.T @ x: d_scores = G * weight in
    ``scores_dtype`` (default: the scores' dtype), d_weight = G * mask, the mask from scores or bits."""
    if (scores is None) == (bits is None):
        raise ValueError("grad_weight needs exactly one of scores and bits")
    dy = dy.contiguous()
    x = x.contiguous()
    weight = weight.contiguous()
    M, N = dy.shape
    K = x.shape[1]
    _check_sizes(N, K)
    from_bits = bits is not None
    if from_bits:
        bits = bits.contiguous()
        s_arg, n_words, thr = bits, bits.shape[1], 0.0
    else:
        scores = scores.contiguous()
        s_arg, n_words, thr = scores, 0, threshold_for(scores.dtype, threshold)
    ds_dtype = scores_dtype or (scores.dtype if scores is not None else torch.float32)
    ds = torch.empty((N, K), dtype=ds_dtype, device=dy.device)
    dw = torch.empty((N, K), dtype=weight.dtype, device=dy.device) if weight_grad else None
    db = torch.empty((N,), dtype=dy.dtype, device=dy.device) if bias_grad else None
    if N == 0:
        return ds, dw, db
    if K == 0:  # no weight, but d_bias still needs the sum over tokens
        return ds, dw, (dy.float().sum(0).to(dy.dtype) if bias_grad else None)
    upcast, fp32_dot, precision = _dot_flags(dy.dtype)
    grid = lambda meta: (cdiv(N, meta["BLOCK_N"]) * cdiv(K, meta["BLOCK_K"]),)
    _grad_weight_kernel[grid](dy, x, weight, s_arg, s_arg, ds, dw if dw is not None else ds,
                              db if db is not None else ds, M, N, K, n_words, thr, FROM_BITS=from_bits,
                              WEIGHT_GRAD=weight_grad, BIAS_GRAD=bias_grad, UPCAST=upcast, FP32_DOT=fp32_dot,
                              PRECISION=precision, **FP_FUSION)
    return ds, dw, db


# ---------------------------------------------------------------------------------------------------
# Packing 1[scores > threshold] into int32 words (the layout of pet_fast/ops/mask_packing.py).

def _pack_configs():
    if _INTERPRET:
        return [triton.Config({"BLOCK_P": 16}, num_warps=4)]
    return [triton.Config({"BLOCK_P": bp}, num_warps=w) for bp, w in ((32, 4), (64, 4), (128, 8))[:3 if _TUNE else 1]]


@triton.autotune(configs=_pack_configs(), key=["R", "K"])
@triton.jit
def _pack_kernel(s_ptr, out_ptr, R, K, n_words, threshold, BLOCK_P: tl.constexpr):
    """One program packs BLOCK_P (row, word) pairs: a (BLOCK_P, 32) tile of scores into BLOCK_P words."""
    offs_p = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    row = offs_p // n_words
    col = (offs_p % n_words) * 32
    b = tl.arange(0, 32)
    cols = col[:, None] + b[None, :]
    valid = (offs_p[:, None] < R * n_words) & (cols < K)
    s = tl.load(s_ptr + row[:, None] * K + cols, mask=valid, other=0.0).to(tl.float32)
    bit = tl.where(valid & (s > threshold), 1, 0).to(tl.int32) << b[None, :]
    # distinct bits: the int32 sum is their OR, bit 31 included (two's complement)
    tl.store(out_ptr + offs_p, tl.sum(bit, axis=1), mask=offs_p < R * n_words)


def pack(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """``pet_fast.pack_mask`` for a 2-D (rows, K) scores tensor, in one kernel."""
    scores = scores.contiguous()
    R, K = scores.shape
    n_words = (K + 31) // 32
    out = torch.empty((R, n_words), dtype=torch.int32, device=scores.device)
    if out.numel() == 0:
        return out
    grid = lambda meta: (cdiv(R * n_words, meta["BLOCK_P"]),)
    _pack_kernel[grid](scores, out, R, K, n_words, threshold_for(scores.dtype, threshold), **FP_FUSION)
    return out


# ---------------------------------------------------------------------------------------------------
# The training path's elementwise kernels. The op (pet_fast/ops/masked_linear.py) computes
#     W_eff = W * 1[scores > threshold]        (masked_weight, written once in the GEMMs' dtype)
#     y = x @ W_eff.T + b, dx = dy @ W_eff, G = dy.T @ x      (cuBLAS)
#     d_scores = G * W, d_weight = G * 1[scores > threshold]  (mask_grads, one pass)
# This writes the masked weight (weight-sized, in the compute dtype) once per step, which the in-register
# GEMMs above avoid; measured on an H100 (bf16) those GEMMs reach about 40% of cuBLAS at the training
# shapes (masking from scores) and much less from packed bits, so writing W_eff and calling cuBLAS is the
# faster training path. Fixed blocks, no autotune: both kernels are memory-bound streams, and autotune's
# host-side lookup costs more than it would win here.

_EW_BLOCK = 1024


@triton.jit
def _masked_weight_kernel(w_ptr, s_ptr, out_ptr, numel, threshold, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < numel
    w = tl.load(w_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    s = tl.load(s_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, tl.where(s > threshold, w, 0.0).to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _mask_grads_kernel(g_ptr, w_ptr, s_ptr, ds_ptr, dw_ptr, numel, threshold, WEIGHT_GRAD: tl.constexpr,
                       BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < numel
    g = tl.load(g_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(ds_ptr + offs, (g * w).to(ds_ptr.dtype.element_ty), mask=ok)
    if WEIGHT_GRAD:
        s = tl.load(s_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        tl.store(dw_ptr + offs, tl.where(s > threshold, g, 0.0).to(dw_ptr.dtype.element_ty), mask=ok)


def masked_weight(weight: torch.Tensor, scores: torch.Tensor, threshold: float, dtype: torch.dtype) -> torch.Tensor:
    """``(weight * (scores > threshold)).to(dtype)`` in one pass (weight and scores of any float dtypes;
    the comparison is that of PyTorch in the scores' dtype, see :func:`threshold_for`)."""
    weight = weight.contiguous()
    scores = scores.contiguous()
    out = torch.empty(weight.shape, dtype=dtype, device=weight.device)
    n = out.numel()
    if n:
        _masked_weight_kernel[(cdiv(n, _EW_BLOCK),)](weight, scores, out, n,
                                                           threshold_for(scores.dtype, threshold), BLOCK=_EW_BLOCK,
                                                           **FP_FUSION)
    return out


def mask_grads(g: torch.Tensor, weight: torch.Tensor, scores: torch.Tensor, threshold: float, *,
               scores_dtype: torch.dtype, weight_grad: bool):
    """(d_scores, d_weight or None) from G = dy.T @ x in one pass: d_scores = G * weight in
    ``scores_dtype``, d_weight = G * (scores > threshold) in the weight's dtype (products in fp32)."""
    g = g.contiguous()
    weight = weight.contiguous()
    scores = scores.contiguous()
    ds = torch.empty(weight.shape, dtype=scores_dtype, device=g.device)
    dw = torch.empty(weight.shape, dtype=weight.dtype, device=g.device) if weight_grad else None
    n = ds.numel()
    if n:
        _mask_grads_kernel[(cdiv(n, _EW_BLOCK),)](g, weight, scores, ds, dw if dw is not None else ds, n,
                                                        threshold_for(scores.dtype, threshold),
                                                        WEIGHT_GRAD=weight_grad, BLOCK=_EW_BLOCK, **FP_FUSION)
    return ds, dw
