"""Triton kernels of the bottleneck adapter ``y = base + s * (act(x @ Wd.T + bd) @ Wu.T + bu)``.

Forward: one launch, one program per tile of ``BLOCK_N`` tokens. The program accumulates the
down-projection ``a = x @ Wd.T`` over blocks of d into an fp32 ``(BLOCK_N, RP)`` tile (RP = r padded to
a power of two >= 16; padded rows of Wd load as zeros), adds ``bd``, applies the activation, and with
the r-wide hidden still in registers loops over d again: up-projection, ``bu``, scaling (a Python
number, a scalar tensor or one value per channel) and the residual (``x`` or a separate tensor). The
hidden never reaches global memory. Where the token tiles are too few to fill the GPU, the autotuner may
split the second loop's columns over ``SPLIT_D`` programs per tile (each recomputes the hidden; the rows
backward splits dx's columns the same way).

With a LayerNorm (``LN``: the op's ``layer_norm``, Pfeiffer's placement), each program first takes its
rows' mean and variance (one pass over x in fp32, the blocks' statistics merged pairwise) and the
down-projection reads ``LN(x)``, rounded to the products' dtype (``CD``'s: autocast's for the float32
residual stream); the base is x.

What the forward saves for the backward: nothing beyond its inputs (x, Wd, bd, Wu, bu, the scaling
tensor, the LayerNorm's weight and bias). The backward recomputes the hidden (and the LayerNorm).

Backward, three launches:
1. ``_bwd_rows_kernel``, one program per token tile: recomputes ``a`` and, in the same pass over d,
   ``dh = (s * dy) @ Wu``; then ``h = act(a)``, ``da = dh * act'(a)``; writes ``h`` and ``da`` (r-wide,
   N x RP in x's dtype: the only intermediates that touch global memory) and
   ``dx = da @ Wd (+ dy when the residual is x)``. With a LayerNorm it also writes ``LN(x)`` (N x d, in the
   products' dtype: the reduction's x) and takes ``da @ Wd`` back through the LayerNorm: its two row sums
   from the first pass's ``LN(x) @ Wd.T`` and from ``Wd @ w`` and ``Wd @ b`` (no pass over x of their
   own), then dx column block by column block.
2. ``_bwd_cols_kernel``, a grid over (blocks of d) x (splits of the tokens): each program reduces its
   tokens into ``da.T @ x`` (dWd), ``M = dy.T @ h``, ``sum(dy)`` and ``sum(da)`` (dbd, programs of the
   first d block) in fp32, then applies the scaling once: ``dWu = s * M``, ``dbu = s * sum(dy)``, and
   ``d_scaling = rowsum(M * Wu) + bu * sum(dy)`` (exact algebra: no second pass over the hidden). It
   writes these fp32 partial sums to its own slice of a (splits, ...) buffer.
3. ``_sum_splits_kernel`` adds the splits in a fixed order and writes each gradient in its own dtype.
No atomics, so the gradients are the same bits on every run. For wide bottlenecks (RP >= 128) steps
2-3 are replaced by cuBLAS products over the tokens (``dy.T @ h``, ``da.T @ x``) and sums: there the
reduction kernel's fp32 accumulators do not fit in registers.
``d_residual`` is ``dy`` itself.

Tile shapes of the per-token-tile kernels are autotuned per (d, RP, power-of-two class of N, dtype
class, variant: LayerNorm, residual, scaling mode, activation) on a GPU; the reduction kernel uses fixed
tiles (its grid, and so its partials buffer, depends on them).

Under ``TRITON_INTERPRET=1`` (CPU tests) every tile is upcast to fp32 right after loading and the
matrix products run in fp32; on a GPU fp16/bf16 operands go to tensor cores with fp32 accumulation and
fp32 inputs use ``input_precision="ieee"`` (no tf32).
"""
from __future__ import annotations

import itertools
import os

import torch
import triton
import triton.language as tl

from . import _replay
from ._host import cdiv, next_power_of_2, sm_count

ACT_CODES = {"relu": 0, "gelu": 1, "gelu_tanh": 2, "silu": 3, "tanh": 4, "identity": 5}

_SQRT1_2 = 0.7071067811865476
_INV_SQRT_2PI = 0.3989422804014327
_GELU_C = 0.7978845608028654  # sqrt(2/pi)


# Read once, as triton.jit itself reads TRITON_INTERPRET when the kernels are defined (a launcher runs per
# adapter per step: no environment lookups there).
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_AUTOTUNE = os.environ.get("PET_FAST_AUTOTUNE", "1") != "0"


def interpreting() -> bool:
    return _INTERPRET


@triton.jit
def _tanh(u):
    # 1 - 2/(exp(2u)+1): exact limits at +-inf, no tl.tanh needed (absent in some Triton versions).
    return 1.0 - 2.0 / (tl.exp(2.0 * u) + 1.0)


@triton.jit
def act_fwd(a, ACT: tl.constexpr):
    if ACT == 0:
        h = tl.where(a < 0.0, 0.0, a)  # NaN stays NaN, as in torch.relu
    elif ACT == 1:
        h = 0.5 * a * (1.0 + tl.math.erf(a * 0.7071067811865476))
    elif ACT == 2:
        t = _tanh(0.7978845608028654 * (a + 0.044715 * a * a * a))
        h = 0.5 * a * (1.0 + t)
    elif ACT == 3:
        h = a / (1.0 + tl.exp(-a))
    elif ACT == 4:
        h = _tanh(a)
    else:
        h = a
    return h


@triton.jit
def act_fwd_bwd(a, ACT: tl.constexpr):
    """(act(a), act'(a)) in fp32."""
    if ACT == 0:
        h = tl.where(a < 0.0, 0.0, a)  # NaN stays NaN, as in torch.relu
        g = tl.where(a > 0.0, 1.0, 0.0)
    elif ACT == 1:
        cdf = 0.5 * (1.0 + tl.math.erf(a * 0.7071067811865476))
        h = a * cdf
        g = cdf + a * 0.3989422804014327 * tl.exp(-0.5 * a * a)
    elif ACT == 2:
        t = _tanh(0.7978845608028654 * (a + 0.044715 * a * a * a))
        h = 0.5 * a * (1.0 + t)
        g = 0.5 * (1.0 + t) + 0.5 * a * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * a * a)
    elif ACT == 3:
        sg = 1.0 / (1.0 + tl.exp(-a))
        h = a * sg
        g = sg * (1.0 + a * (1.0 - sg))
    elif ACT == 4:
        h = _tanh(a)
        g = 1.0 - h * h
    else:
        h = a
        g = tl.full(a.shape, 1.0, tl.float32)
    return h, g


@triton.jit
def mm(a, b, UPCAST: tl.constexpr):
    """a @ b with fp32 accumulation; fp32 'ieee' products when UPCAST, else the operands' own type."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _row_stats(X, rows, rmask, cols, D, eps, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Mean and 1/sqrt(var + eps) of each row of the tile (LayerNorm's statistics), in one pass over x in
    fp32: each block's mean and sum of squared deviations from it, merged into the running ones (Chan,
    Golub and LeVeque's pairwise update), as stable as two passes when the mean is large against the
    spread, where a sum of squares would cancel. One read of x fewer than two passes, in the forward and
    in the rows backward."""
    mean = tl.zeros((BLOCK_N,), dtype=tl.float32)
    m2 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        c = d0 + cols
        cm = c < D
        xt = tl.load(X + rows[:, None] * D + c[None, :], mask=rmask[:, None] & cm[None, :], other=0.0).to(tl.float32)
        n_a = d0 * 1.0  # columns merged so far
        n_b = tl.minimum(D - d0, BLOCK_D) * 1.0  # columns of this block
        block_mean = tl.sum(xt, axis=1) / n_b
        dev = tl.where(cm[None, :], xt - block_mean[:, None], 0.0)
        frac = n_b / (n_a + n_b)
        delta = block_mean - mean
        mean += delta * frac
        m2 += tl.sum(dev * dev, axis=1) + delta * delta * (n_a * frac)
    return mean, 1.0 / tl.sqrt(m2 / D + eps)


@triton.jit
def _normalized(xt, mean, rstd, LNW, LNB, c, cm, HAS_LNW: tl.constexpr, HAS_LNB: tl.constexpr):
    """LayerNorm of a loaded tile of x (columns c), in fp32, zero in the columns past D: there x loads as 0 and
    (0 - mean) * rstd is unbounded (rstd = 1/sqrt(eps) on a constant row), which rounded to fp16 is inf, and
    inf times the zero-padded weight is NaN in the products."""
    y = (xt.to(tl.float32) - mean[:, None]) * rstd[:, None]
    if HAS_LNW:
        y = y * tl.load(LNW + c, mask=cm, other=0.0).to(tl.float32)[None, :]
    if HAS_LNB:
        y = y + tl.load(LNB + c, mask=cm, other=0.0).to(tl.float32)[None, :]
    return tl.where(cm[None, :], y, 0.0)


@triton.jit
def _column_range(part, D, SPLIT_D: tl.constexpr, BLOCK_D: tl.constexpr):
    """[lo, hi): part ``part`` of SPLIT_D ranges of whole BLOCK_D blocks covering [0, D) (the last ones may
    be empty)."""
    if SPLIT_D == 1:
        return 0, D
    else:
        per = tl.cdiv(tl.cdiv(D, SPLIT_D), BLOCK_D) * BLOCK_D
        lo = part * per
        return lo, tl.minimum(lo + per, D)


@triton.jit
def _fwd_kernel(X, WD, BD, WU, BU, S, RES, Y, CD, LNW, LNB, N, D, R, s_value, eps, n_bucket,
                HAS_BD: tl.constexpr, HAS_BU: tl.constexpr, S_MODE: tl.constexpr, HAS_RES: tl.constexpr,
                ADD_X: tl.constexpr, LN: tl.constexpr, HAS_LNW: tl.constexpr, HAS_LNB: tl.constexpr,
                ACT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                RP: tl.constexpr, UPCAST: tl.constexpr, SPLIT_D: tl.constexpr):
    # CD only carries the products' dtype (x's, or autocast's for a LayerNorm read from float32 x).
    # The tile's first row moves the base pointers (int64: N * D may pass 2**31); offsets inside the
    # tile stay int32, which keeps the pointer tiles at half the registers.
    # SPLIT_D programs share a token tile (adjacent ids: they read its x through the L2 together); each
    # computes the whole hidden and writes its own range of the output's columns.
    pid = tl.program_id(0)
    row0 = (pid // SPLIT_D).to(tl.int64) * BLOCK_N
    c_lo, c_hi = _column_range(pid % SPLIT_D, D, SPLIT_D, BLOCK_D)
    X += row0 * D
    Y += row0 * D
    if HAS_RES:
        RES += row0 * D
    rows = tl.arange(0, BLOCK_N)
    rmask = rows < N - row0
    rr = tl.arange(0, RP)
    rrmask = rr < R
    cols = tl.arange(0, BLOCK_D)
    if LN:
        mean, rstd = _row_stats(X, rows, rmask, cols, D, eps, BLOCK_N, BLOCK_D)
    acc = tl.zeros((BLOCK_N, RP), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        c = d0 + cols
        cm = c < D
        xt = tl.load(X + rows[:, None] * D + c[None, :], mask=rmask[:, None] & cm[None, :], other=0.0)
        if LN:  # the adapter reads LN(x), rounded to the products' dtype (as autocast would round it)
            xt = _normalized(xt, mean, rstd, LNW, LNB, c, cm, HAS_LNW, HAS_LNB).to(CD.dtype.element_ty)
        wt = tl.load(WD + rr[:, None] * D + c[None, :], mask=rrmask[:, None] & cm[None, :], other=0.0)
        acc += mm(xt, tl.trans(wt.to(xt.dtype)), UPCAST)  # float32 master weights: rounded to x's dtype
    if HAS_BD:
        acc += tl.load(BD + rr, mask=rrmask, other=0.0).to(tl.float32)[None, :]
    # the padded hidden columns (r..RP) hold x @ 0, which is NaN for an inf in x: zeroed, or the up-projection's
    # zero columns would carry it to every output column of the token
    acc = tl.where(rrmask[None, :], acc, 0.0)
    h = act_fwd(acc, ACT)
    if UPCAST:
        hq = h
    else:
        hq = h.to(CD.dtype.element_ty)
    if S_MODE == 0:
        s = s_value
    elif S_MODE == 1:
        s = tl.load(S).to(tl.float32)
    for d0 in range(c_lo, c_hi, BLOCK_D):
        c = d0 + cols
        cm = c < c_hi
        wu = tl.load(WU + c[:, None] * R + rr[None, :], mask=cm[:, None] & rrmask[None, :], other=0.0)
        up = mm(hq, tl.trans(wu.to(CD.dtype.element_ty)), UPCAST)
        if HAS_BU:
            up += tl.load(BU + c, mask=cm, other=0.0).to(tl.float32)[None, :]
        if S_MODE == 2:
            up = up * tl.load(S + c, mask=cm, other=0.0).to(tl.float32)[None, :]
        else:
            up = up * s
        offs = rows[:, None] * D + c[None, :]
        m2 = rmask[:, None] & cm[None, :]
        if HAS_RES:
            base = tl.load(RES + offs, mask=m2, other=0.0).to(tl.float32)
            if ADD_X:  # base = residual + x, in float32 (as eager adds a half x to a float32 residual)
                base += tl.load(X + offs, mask=m2, other=0.0).to(tl.float32)
        else:
            base = tl.load(X + offs, mask=m2, other=0.0).to(tl.float32)
        tl.store(Y + offs, (base + up).to(Y.dtype.element_ty), mask=m2)


@triton.jit
def _bwd_rows_kernel(X, WD, BD, WU, S, DY, DX, HBUF, DABUF, CD, LNW, LNB, YBUF, N, D, R, s_value, eps, n_bucket,
                     HAS_BD: tl.constexpr, S_MODE: tl.constexpr, ADD_DY: tl.constexpr, LN: tl.constexpr,
                     HAS_LNW: tl.constexpr, HAS_LNB: tl.constexpr, ACT: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, RP: tl.constexpr, UPCAST: tl.constexpr,
                     SPLIT_D: tl.constexpr):
    # int64 base, int32 offsets in the tile, and SPLIT_D programs per token tile, as in the forward: each
    # recomputes the tile's hidden and its gradient and writes its own range of dx's columns; the first
    # writes h, da (and LN(x)).
    pid = tl.program_id(0)
    row0 = (pid // SPLIT_D).to(tl.int64) * BLOCK_N
    part = pid % SPLIT_D
    c_lo, c_hi = _column_range(part, D, SPLIT_D, BLOCK_D)
    first = part == 0
    X += row0 * D
    DY += row0 * D
    DX += row0 * D
    HBUF += row0 * RP
    DABUF += row0 * RP
    rows = tl.arange(0, BLOCK_N)
    rmask = rows < N - row0
    rr = tl.arange(0, RP)
    rrmask = rr < R
    cols = tl.arange(0, BLOCK_D)
    if LN:  # the adapter read y = LN(x): recomputed here, and written for the weight-gradient reduction
        YBUF += row0 * D
        mean, rstd = _row_stats(X, rows, rmask, cols, D, eps, BLOCK_N, BLOCK_D)
        # Wd @ w and Wd @ b (r-wide, with Wd as the products read it), for the LayerNorm's backward below
        wd_w = tl.zeros((RP,), dtype=tl.float32)
        wd_b = tl.zeros((RP,), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            c = d0 + cols
            cm = c < D
            wd = tl.load(WD + rr[:, None] * D + c[None, :], mask=rrmask[:, None] & cm[None, :], other=0.0)
            wd = wd.to(CD.dtype.element_ty).to(tl.float32)
            if HAS_LNW:
                wd_w += tl.sum(wd * tl.load(LNW + c, mask=cm, other=0.0).to(tl.float32)[None, :], axis=1)
            else:
                wd_w += tl.sum(wd, axis=1)
            if HAS_LNB:
                wd_b += tl.sum(wd * tl.load(LNB + c, mask=cm, other=0.0).to(tl.float32)[None, :], axis=1)
    a = tl.zeros((BLOCK_N, RP), dtype=tl.float32)
    dh = tl.zeros((BLOCK_N, RP), dtype=tl.float32)
    if S_MODE == 0:
        s = s_value
    elif S_MODE == 1:
        s = tl.load(S).to(tl.float32)
    for d0 in range(0, D, BLOCK_D):
        c = d0 + cols
        cm = c < D
        m2 = rmask[:, None] & cm[None, :]
        offs = rows[:, None] * D + c[None, :]
        xt = tl.load(X + offs, mask=m2, other=0.0)
        if LN:
            xt = _normalized(xt, mean, rstd, LNW, LNB, c, cm, HAS_LNW, HAS_LNB).to(CD.dtype.element_ty)
            if first:
                tl.store(YBUF + offs, xt, mask=m2)
        wd = tl.load(WD + rr[:, None] * D + c[None, :], mask=rrmask[:, None] & cm[None, :], other=0.0)
        a += mm(xt, tl.trans(wd.to(xt.dtype)), UPCAST)
        g = tl.load(DY + offs, mask=m2, other=0.0).to(tl.float32)
        if S_MODE == 2:
            g = g * tl.load(S + c, mask=cm, other=0.0).to(tl.float32)[None, :]
        else:
            g = g * s
        wu = tl.load(WU + c[:, None] * R + rr[None, :], mask=cm[:, None] & rrmask[None, :], other=0.0)
        if UPCAST:
            dh += mm(g, wu, UPCAST)
        else:
            dh += mm(g.to(CD.dtype.element_ty), wu.to(CD.dtype.element_ty), UPCAST)
    if LN:  # (LN(x) - b) @ Wd.T = (w xhat) @ Wd.T, for the LayerNorm's backward below
        if HAS_LNB:
            a_x = a - wd_b[None, :]
        else:
            a_x = a
    if HAS_BD:
        a += tl.load(BD + rr, mask=rrmask, other=0.0).to(tl.float32)[None, :]
    a = tl.where(rrmask[None, :], a, 0.0)  # padded hidden columns (see the forward)
    h, gp = act_fwd_bwd(a, ACT)
    da = tl.where(rrmask[None, :], dh * gp, 0.0)  # (dh too holds 0 * dy there: NaN for an inf gradient)
    hoffs = rows[:, None] * RP + rr[None, :]
    if first:
        tl.store(HBUF + hoffs, h.to(HBUF.dtype.element_ty), mask=rmask[:, None])
        tl.store(DABUF + hoffs, da.to(DABUF.dtype.element_ty), mask=rmask[:, None])
    if UPCAST:
        daq = da
    else:
        daq = da.to(CD.dtype.element_ty)
    if LN:
        # gy = da @ Wd is the gradient of y = LN(x); with g = gy * w and xhat = (x - mean) * rstd,
        # dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), dx then column by column. The two row sums need
        # no pass over x: sum_c g = da . (Wd @ w), and since w * xhat = y - b,
        # sum_c g xhat = da . (y @ Wd.T - Wd @ b), where y @ Wd.T is the first loop's product (before bd).
        daf = daq.to(tl.float32)
        sg = tl.sum(daf * wd_w[None, :], axis=1) / D
        sgx = tl.sum(daf * a_x, axis=1) / D
    for d0 in range(c_lo, c_hi, BLOCK_D):
        c = d0 + cols
        cm = c < c_hi
        m2 = rmask[:, None] & cm[None, :]
        offs = rows[:, None] * D + c[None, :]
        if LN:
            g, xhat = _ln_grad_tile(X, WD, LNW, daq, mean, rstd, rows, rmask, rr, rrmask, c, D, CD,
                                    HAS_LNW, UPCAST)
            dx = rstd[:, None] * (g - sg[:, None] - xhat * sgx[:, None])
        else:
            wd = tl.load(WD + rr[:, None] * D + c[None, :], mask=rrmask[:, None] & cm[None, :], other=0.0)
            dx = mm(daq, wd.to(CD.dtype.element_ty), UPCAST)
        if ADD_DY:
            dx += tl.load(DY + offs, mask=m2, other=0.0).to(tl.float32)
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=m2)


@triton.jit
def _ln_grad_tile(X, WD, LNW, daq, mean, rstd, rows, rmask, rr, rrmask, c, D, CD, HAS_LNW: tl.constexpr,
                  UPCAST: tl.constexpr):
    """For columns c of the tile: g = (da @ Wd) * w, the gradient of LN's normalised x scaled by its
    weight, and xhat; both fp32 and zero outside the tile."""
    cm = c < D
    m2 = rmask[:, None] & cm[None, :]
    wd = tl.load(WD + rr[:, None] * D + c[None, :], mask=rrmask[:, None] & cm[None, :], other=0.0)
    g = mm(daq, wd.to(CD.dtype.element_ty), UPCAST)
    if HAS_LNW:
        g = g * tl.load(LNW + c, mask=cm, other=0.0).to(tl.float32)[None, :]
    x = tl.load(X + rows[:, None] * D + c[None, :], mask=m2, other=0.0).to(tl.float32)
    xhat = (x - mean[:, None]) * rstd[:, None]
    return tl.where(m2, g, 0.0), tl.where(m2, xhat, 0.0)


@triton.jit
def _bwd_cols_kernel(X, DY, HBUF, DABUF, WU, BU, S, PART, N, D, R, s_value, rows_per_split, split_stride,
                     OFF_WU, OFF_BU, OFF_BD, OFF_DS,
                     NEED_W: tl.constexpr, HAS_BU: tl.constexpr, NEED_BD: tl.constexpr, NEED_DS: tl.constexpr,
                     S_MODE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, RP: tl.constexpr,
                     UPCAST: tl.constexpr):
    pid_d = tl.program_id(0)
    pid_s = tl.program_id(1)
    c = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    cm = c < D
    rr = tl.arange(0, RP)
    rrmask = rr < R
    acc_wd = tl.zeros((RP, BLOCK_D), dtype=tl.float32)  # da.T @ x
    acc_m = tl.zeros((BLOCK_D, RP), dtype=tl.float32)  # dy.T @ h, unscaled
    # sum(dy) and sum(da) per token slot, reduced over the slots once after the loop: a column sum inside
    # the loop crossed threads and warps at every tile (shuffles, shared memory and barriers on sm_90)
    acc_dy = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    acc_bd = tl.zeros((BLOCK_N, RP), dtype=tl.float32)
    start = pid_s.to(tl.int64) * rows_per_split
    stop = tl.minimum(start + rows_per_split, N)
    rows = tl.arange(0, BLOCK_N)
    for n0 in range(start, stop, BLOCK_N):
        # int32 offsets inside the tile; the tile's first row (int64) moves the base pointers
        rmask = rows < stop - n0
        m2 = rmask[:, None] & cm[None, :]
        offs = rows[:, None] * D + c[None, :]
        hoffs = rows[:, None] * RP + rr[None, :]
        dyt = tl.load(DY + n0 * D + offs, mask=m2, other=0.0)
        h = tl.load(HBUF + n0 * RP + hoffs, mask=rmask[:, None], other=0.0)
        acc_dy += dyt.to(tl.float32)
        # dy is float32 when the residual (and so the output) is: the product takes it in h's dtype
        acc_m += mm(tl.trans(dyt.to(HBUF.dtype.element_ty)), h, UPCAST)
        if NEED_W:
            xt = tl.load(X + n0 * D + offs, mask=m2, other=0.0)
            da = tl.load(DABUF + n0 * RP + hoffs, mask=rmask[:, None], other=0.0)
            acc_wd += mm(tl.trans(da), xt, UPCAST)
            if NEED_BD:
                acc_bd += da.to(tl.float32)
    acc_dy = tl.sum(acc_dy, axis=0)
    # The scaling multiplies dy per channel: applied once here rather than to every loaded tile.
    if S_MODE == 0:
        s = tl.full((BLOCK_D,), 1.0, tl.float32) * s_value
    elif S_MODE == 1:
        s = tl.full((BLOCK_D,), 1.0, tl.float32) * tl.load(S).to(tl.float32)
    else:
        s = tl.load(S + c, mask=cm, other=0.0).to(tl.float32)
    part = PART + pid_s.to(tl.int64) * split_stride
    if NEED_W:
        tl.store(part + rr[:, None] * D + c[None, :], acc_wd, mask=rrmask[:, None] & cm[None, :])
        tl.store(part + OFF_WU + c[:, None] * R + rr[None, :], acc_m * s[:, None], mask=cm[:, None] & rrmask[None, :])
        if HAS_BU:
            tl.store(part + OFF_BU + c, acc_dy * s, mask=cm)
        if NEED_BD:
            if pid_d == 0:
                tl.store(part + OFF_BD + rr, tl.sum(acc_bd, axis=0), mask=rrmask)
    if NEED_DS:
        # d_scaling[c] = sum_n dy[n, c] * (h[n] . Wu[c] + bu[c]) = sum_k acc_m[c, k] Wu[c, k] + bu[c] sum_n dy[n, c]
        wu = tl.load(WU + c[:, None] * R + rr[None, :], mask=cm[:, None] & rrmask[None, :], other=0.0)
        if not UPCAST:
            wu = wu.to(HBUF.dtype.element_ty)  # as the forward used it (in the products' dtype)
        ds = tl.sum(acc_m * wu.to(tl.float32), axis=1)
        if HAS_BU:
            ds += tl.load(BU + c, mask=cm, other=0.0).to(tl.float32) * acc_dy
        tl.store(part + OFF_DS + c, ds, mask=cm)


@triton.jit
def _sum_splits_kernel(PART, O0, O1, O2, O3, O4, total, splits, E0, E1, E2, E3, BLOCK: tl.constexpr):
    """Adds the (splits, total) fp32 partial sums in split order (the same bits every run) and writes
    region k = [E(k-1), Ek) of the result to its own tensor Ok in Ok's dtype (E4 = total)."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = i < total
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    src = PART + i
    for _ in range(0, splits):
        acc += tl.load(src, mask=m, other=0.0)
        src += total  # pointer steps: no int32 product of split and size
    tl.store(O0 + i, acc.to(O0.dtype.element_ty), mask=m & (i < E0))
    tl.store(O1 + (i - E0), acc.to(O1.dtype.element_ty), mask=m & (i >= E0) & (i < E1))
    tl.store(O2 + (i - E1), acc.to(O2.dtype.element_ty), mask=m & (i >= E1) & (i < E2))
    tl.store(O3 + (i - E2), acc.to(O3.dtype.element_ty), mask=m & (i >= E2) & (i < E3))
    tl.store(O4 + (i - E3), acc.to(O4.dtype.element_ty), mask=m & (i >= E3))


# ---------------------------------------------------------------------------------------------------
# Launchers (plain tensors in and out; autograd lives in pet_fast/ops/bottleneck_adapter.py).

MAX_R = 256


def padded_r(r: int) -> int:
    return max(16, next_power_of_2(r))


def _blocks(rp: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_D, num_warps) of the backward's reduction kernel (untuned heuristics)."""
    if interpreting():
        return 16, 64, 4
    # 8 warps: at 4 the two fp32 accumulators spill to local memory (ptxas, sm_90, bf16)
    if rp <= 64:
        return 64, 64, 8
    if rp <= 128:
        return 32, 64, 8
    return 32, 32, 8


def autotuning() -> bool:
    """False under the interpreter or with PET_FAST_AUTOTUNE=0 (GPU correctness runs: one safe tile per
    kernel, so that many test shapes cost one compile each instead of one per tile)."""
    return not interpreting() and _AUTOTUNE


def row_configs():
    """Tile shapes tried by the autotuner of the per-token-tile kernels (one under the interpreter)."""
    if interpreting():
        return [triton.Config({"BLOCK_N": 16, "BLOCK_D": 64}, num_warps=4)]
    if not autotuning():  # fits the shared memory up to RP=256 without spilling registers (sm_90, bf16)
        return [triton.Config({"BLOCK_N": 16, "BLOCK_D": 32}, num_warps=8, num_stages=2)]
    # Mostly 8 warps (with 4, most tiles spill: benchmarks/compile_check.py); few, each costs a compile per key.
    # 128 rows: each program re-reads both weights; on an H100 the forward chose the largest tile at every N.
    return [triton.Config({"BLOCK_N": bn, "BLOCK_D": bd}, num_warps=w, num_stages=st)
            for bn, bd, w, st in [(64, 64, 8, 3), (32, 64, 8, 3), (64, 128, 8, 3), (32, 64, 4, 3), (128, 64, 8, 3),
                                  (16, 32, 8, 2)]]  # (16, 32) fits the shared memory at RP=256


def prune_row_configs(configs, named_args, **kwargs):
    """Drop tiles whose fp32 accumulators (BLOCK_N x RP) would not fit in registers, and for float32
    products (UPCAST) the 128-row tiles, whose sm_90 builds spill (benchmarks/compile_check.py: 56-640 bytes
    of stack in the adapter's and the stacked fusion's forward at RP=64; none in bf16/fp16)."""
    rp = kwargs.get("RP", named_args.get("RP", 16))
    upcast = kwargs.get("UPCAST", named_args.get("UPCAST"))
    kept = [c for c in configs if c.kwargs["BLOCK_N"] * rp <= 8192 and c.kwargs["BLOCK_D"] * rp <= 16384
            and not (upcast and c.kwargs["BLOCK_N"] > 64)]
    return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_D"])]


def prune_bwd_row_configs(configs, named_args, **kwargs):
    """:func:`prune_row_configs`, and for float32 inputs (UPCAST) the tiles whose shared memory fits sm_90's
    227 KiB: benchmarks/compile_check.py measured BLOCK_N x BLOCK_D x RP = 2^19 at 295-305 KB, 2^18 at 148 KB
    (the autotuner would compile the others, then skip them as out of resources)."""
    kept = prune_row_configs(configs, named_args, **kwargs)
    if kwargs.get("UPCAST", named_args.get("UPCAST")):
        rp = kwargs.get("RP", named_args.get("RP", 16))
        kept = [c for c in kept if c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_D"] * rp <= 1 << 18] or kept
    return kept


def n_bucket(n: int) -> int:
    """Autotuning key for the token count: its power of two, capped (one tuning per size class)."""
    return min(next_power_of_2(max(n, 1)), 1 << 14)


# Column splits (SPLIT_D programs per token tile) tried by the adapter's autotuners where the token tiles
# alone leave SMs idle: the BERT-base step's 4096 tokens make 64 tiles of 64 on an H100's 132 SMs, and each
# program's loops over d are a chain of dependent loads (H100: 29.6 us per forward at N=4096, d=768, about
# five times its bytes). A split shortens each program's second loop and multiplies the programs; every
# program of a tile recomputes the hidden (x and Wd read again, mostly from the L2).
SPLITS = ((64, 64, 8, 3, 2), (64, 64, 8, 3, 4), (128, 64, 8, 3, 4))


def adapter_row_configs():
    """:func:`row_configs` with SPLIT_D=1, and on a GPU the column splits of SPLITS."""
    configs = [triton.Config({**c.kwargs, "SPLIT_D": 1}, num_warps=c.num_warps, num_stages=c.num_stages)
               for c in row_configs()]
    if autotuning():
        configs += [triton.Config({"BLOCK_N": bn, "BLOCK_D": bd, "SPLIT_D": sp}, num_warps=w, num_stages=st)
                    for bn, bd, w, st, sp in SPLITS]
    return configs


def _prune_splits(configs, named_args, kwargs):
    """Drop the column splits where the token tiles alone give two programs per SM, or where a part would
    get fewer than two column blocks."""
    n, d, x = named_args.get("N"), named_args.get("D"), named_args.get("X")
    sms = sm_count(x.device) if isinstance(x, torch.Tensor) and x.is_cuda else 132
    kept = [c for c in configs if c.kwargs.get("SPLIT_D", 1) == 1 or (
        n is not None and d is not None and cdiv(n, c.kwargs["BLOCK_N"]) < 2 * sms
        and d >= 2 * c.kwargs["SPLIT_D"] * c.kwargs["BLOCK_D"])]
    return kept or configs


def prune_adapter_configs(configs, named_args, **kwargs):
    return prune_row_configs(_prune_splits(configs, named_args, kwargs), named_args, **kwargs)


def prune_adapter_bwd_configs(configs, named_args, **kwargs):
    """:func:`prune_bwd_row_configs` after the splits' pruning; from RP=64 on, float32 keeps only the
    (16, 32) tile: under Triton 3.6 (the GPU machines') each larger one spills 344-4240 bytes of stack at
    RP=64 (compile_check, sm_90, with and without LayerNorm), and would cost a compile and a timing per
    autotuning key, in the GPU tests' time too."""
    kept = prune_bwd_row_configs(_prune_splits(configs, named_args, kwargs), named_args, **kwargs)
    if kwargs.get("UPCAST", named_args.get("UPCAST")) and kwargs.get("RP", named_args.get("RP", 16)) >= 64:
        kept = [c for c in kept if c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_D"] <= 16 * 32] or kept
    return kept


def _split_grid(n):
    return lambda meta: (cdiv(n, meta["BLOCK_N"]) * meta["SPLIT_D"],)


# Autotuning keys: the sizes, and every variant switch of the kernel (a LayerNorm or a residual read
# changes the best tile), so that variants do not share one tuned tile.
_fwd_tuned = triton.autotune(adapter_row_configs(), key=["D", "RP", "n_bucket", "UPCAST", "HAS_BD", "HAS_BU", "S_MODE",
                                                         "HAS_RES", "ADD_X", "LN", "HAS_LNW", "HAS_LNB", "ACT"],
                             prune_configs_by={"early_config_prune": prune_adapter_configs})(_fwd_kernel)
_bwd_rows_tuned = triton.autotune(adapter_row_configs(), key=["D", "RP", "n_bucket", "UPCAST", "HAS_BD", "S_MODE",
                                                              "ADD_DY", "LN", "HAS_LNW", "HAS_LNB", "ACT"],
                                  prune_configs_by={"early_config_prune": prune_adapter_bwd_configs})(_bwd_rows_kernel)


def _scale_mode(scaling):
    if scaling is None:
        return 0
    return 2 if scaling.dim() == 1 else 1


_CARRIERS: dict = {}  # (device, dtype) -> an empty tensor: its pointer only tells a kernel the dtype


def _ln_args(x, ln, compute):
    """(carrier of the products' dtype, LN weight, LN bias, eps, LN flags) for the kernels. ``ln`` is None
    or (weight or None, bias or None, eps); ``compute`` the products' dtype (x's when None)."""
    if compute is None or compute == x.dtype:
        cd = x
    else:  # kept, not allocated per call (its null pointer is never read)
        cd = _CARRIERS.get((x.device, compute))
        if cd is None:
            cd = _CARRIERS[(x.device, compute)] = x.new_empty((0,), dtype=compute)
    if ln is None:
        return cd, x, x, 0.0, dict(LN=False, HAS_LNW=False, HAS_LNB=False)
    w, b, eps = ln
    return cd, (w if w is not None else x), (b if b is not None else x), float(eps), dict(
        LN=True, HAS_LNW=w is not None, HAS_LNB=b is not None)


_FORWARD_PROGRAMS: dict = _replay.register_cache({})
_BACKWARD_PROGRAMS: dict = _replay.register_cache({})


def forward(x, w_down, b_down, w_up, b_up, scaling, scaling_value, residual, activation, add_input=False,
            ln=None, compute=None):
    """See :func:`_forward`; calls with a key seen before replay its launch from C++ (kernels/_replay.py)."""
    if not _replay.active(x):
        return _forward(x, w_down, b_down, w_up, b_up, scaling, scaling_value, residual, activation, add_input, ln,
                        compute)
    lnw, lnb = (ln[0], ln[1]) if ln is not None else (None, None)
    key = _replay.key_of(x, w_down, b_down, w_up, b_up, scaling, scaling_value, residual, activation, add_input,
                         None if ln is None else (lnw, lnb, float(ln[2])), compute)
    return _replay.call(_FORWARD_PROGRAMS, key, [x, w_down, b_down, w_up, b_up, scaling, residual, lnw, lnb],
                        _forward, x, w_down, b_down, w_up, b_up, scaling, scaling_value, residual, activation,
                        add_input, ln, compute, single=True)


# The backward launcher's inputs (dy, x, w_down, b_down, w_up, b_up, scaling, LN weight, LN bias) from the
# forward's (x, w_down, b_down, w_up, b_up, scaling, residual, LN weight, LN bias); -1: the output's gradient
_BWD_FROM_FWD = [-1, 0, 1, 2, 3, 4, 5, 7, 8]
_PAIRS: dict = _replay.register_cache({})  # (forward key, need_ds, need_weights) -> (forward, backward, grad map)


def _program_pair(x, w_down, b_down, w_up, b_up, scaling, scaling_value, residual, activation, add_input, ln,
                  compute):
    """(forward program, backward program, grad map) for these launcher arguments when both launchers are
    recorded; None while one is missing; False when one cannot be recorded."""
    lnw, lnb = (ln[0], ln[1]) if ln is not None else (None, None)
    ln_key = None if ln is None else (lnw, lnb, float(ln[2]))
    # the backward's arguments as the autograd formula will pass them (pet_fast/ops/bottleneck_adapter.py)
    need_ds = scaling is not None and scaling.requires_grad
    need_w = any(t is not None and t.requires_grad for t in (w_down, b_down, w_up, b_up))
    fkey = _replay.key_of(x, w_down, b_down, w_up, b_up, scaling, scaling_value, residual, activation, add_input,
                          ln_key, compute)
    pair = _PAIRS.get((fkey, need_ds, need_w))
    if pair is not None:
        return pair
    has_residual = not (residual is None or add_input)
    like = x if residual is None else residual
    bkey = (_replay.tensor_key(like.shape, like.dtype, like.get_device()),) + _replay.key_of(
        x, w_down, b_down, w_up, b_up, scaling, scaling_value, has_residual, activation, need_ds, need_w, ln_key,
        compute)
    fwd, bwd = _FORWARD_PROGRAMS.get(fkey), _BACKWARD_PROGRAMS.get(bkey)
    if fwd is None or bwd is None:
        return None
    if not (isinstance(fwd, _replay.Entry) and isinstance(bwd, _replay.Entry)):
        return False
    # gradients of x, w_down, b_down, w_up, b_up, scaling, residual (dy itself), LN weight and bias (none)
    grad_map = [0, 1, 2, 3, 4, 5 if need_ds else -1, -2 if residual is not None else -1, -1, -1]
    pair = _PAIRS[(fkey, need_ds, need_w)] = (fwd, bwd, grad_map)
    return pair


def _run_node(pair, inputs, out_like=-1):
    """The forward program's output with the C++ node of ``pair``; None when the forward declines, or when
    the pair became complete in the backward pass running now (a recomputation: _replay.recorded_in_this_backward)."""
    if _replay.recorded_in_this_backward(pair[0], pair[1]):
        return None
    return _replay.autograd(pair[0], pair[1], _BWD_FROM_FWD, pair[2], inputs, "BottleneckAdapterBackward", out_like)


class NodeCall:
    """A recorded program pair bound to one kind of op call (the op remembers it per call signature): runs
    a call as the C++ autograd node straight from the op's arguments, without recomputing keys. The
    programs read flat memory: x and the residual go in as they are shaped, (..., d), and the output and
    their gradients come back in x's shape, with no view ops (and no view nodes in the backward)."""

    __slots__ = ("pair",)

    def __init__(self, pair):
        self.pair = pair

    @staticmethod
    def inputs(x, w_down, b_down, w_up, b_up, scaling, residual, layer_norm) -> list:
        """The node's inputs for the op's arguments (contiguous: the kernels read contiguous memory)."""
        c = lambda t: None if t is None else t.contiguous()  # noqa: E731
        lnw, lnb = (c(layer_norm[0]), c(layer_norm[1])) if layer_norm is not None else (None, None)
        return [c(x), c(w_down), c(b_down), c(w_up), c(b_up), scaling.contiguous() if isinstance(scaling, torch.Tensor)
                else None, c(residual), lnw, lnb]

    def __call__(self, x, w_down, b_down, w_up, b_up, scaling, residual, layer_norm):
        return _run_node(self.pair, self.inputs(x, w_down, b_down, w_up, b_up, scaling, residual, layer_norm), 0)

    def guarded(self, inputs):
        """This node behind a C++ check of ``inputs``' facts (:func:`_replay.guarded`), or None."""
        return _replay.guarded(self.pair[0], self.pair[1], _BWD_FROM_FWD, self.pair[2], inputs,
                               "BottleneckAdapterBackward", 0)


def node_call(x, w_down, b_down, w_up, b_up, scaling, scaling_value, residual, activation, add_input=False, ln=None,
              compute=None):
    """The NodeCall for calls like this one (the launcher's arguments) once both programs are recorded;
    None while one is missing, False when one cannot be recorded."""
    pair = _program_pair(x, w_down, b_down, w_up, b_up, scaling, scaling_value, residual, activation, add_input, ln,
                         compute)
    return NodeCall(pair) if pair else pair


def _forward(x, w_down, b_down, w_up, b_up, scaling, scaling_value, residual, activation, add_input=False,
             ln=None, compute=None):
    """x (N, d) contiguous; returns y (N, d) in the residual's dtype (x's without one: a float32
    residual of half-precision x gives a float32 sum). ``scaling`` is a tensor (() or (d,)) or None
    (then ``scaling_value`` is used). ``add_input``: the base is residual + x (a residual is given).
    ``ln`` = (weight, bias, eps): the adapter reads LayerNorm(x), the base stays x; ``compute``: the
    products' dtype (default x's), e.g. autocast's for float32 x."""
    n, d = x.shape
    r = w_down.shape[0]
    like = x if residual is None else residual
    y = _replay.empty(like.shape, like.dtype, like.device)
    if n == 0:
        return y
    rp = padded_r(r)
    cd, lnw, lnb, eps, ln_flags = _ln_args(x, ln, compute)
    upcast = interpreting() or cd.dtype == torch.float32
    dummy = x
    _replay.launch(
        _fwd_tuned, _split_grid(n),
        x, w_down, b_down if b_down is not None else dummy, w_up, b_up if b_up is not None else dummy,
        scaling if scaling is not None else dummy, residual if residual is not None else dummy, y, cd, lnw, lnb,
        n, d, r, float(scaling_value), eps, n_bucket(n),
        HAS_BD=b_down is not None, HAS_BU=b_up is not None, S_MODE=_scale_mode(scaling),
        HAS_RES=residual is not None, ADD_X=bool(add_input) and residual is not None, **ln_flags,
        ACT=ACT_CODES[activation], RP=rp, UPCAST=upcast)
    return y


def sum_splits(part, outs) -> None:
    """Adds the rows of ``part`` (splits, total), fp32 partial sums, in split order and writes consecutive
    regions of the sum into ``outs`` (at most 5 tensors whose sizes add up to ``total``), each in its dtype."""
    splits, total = part.shape
    o = list(outs) + [part] * (5 - len(outs))  # absent regions: empty, never stored to
    ends = list(itertools.accumulate(t.numel() for t in outs))
    e = ends[:-1] + [total] * (5 - len(ends))
    block = 1024
    _replay.launch(_sum_splits_kernel, (cdiv(total, block),), part, *o, total, splits, *e[:4], BLOCK=block, num_warps=4)


def _splits(n: int, d_blocks: int, bn: int, device) -> int:
    """Token splits of the reduction: about two programs per SM over the whole grid. The fp32 partials
    then hold splits x (2 r d + 2 d + r) floats, at most about 2 x SMs x (2 RP BLOCK_D + ...) floats."""
    tiles = cdiv(n, bn)
    if interpreting() or device.type != "cuda":
        return min(tiles, 2)
    sms = sm_count(device)
    return max(1, min(tiles, cdiv(2 * sms, d_blocks)))


# From this padded bottleneck width up, the weight gradients are reduced over the tokens by cuBLAS matrix
# products instead of _bwd_cols_kernel, whose (RP x BLOCK_D) fp32 accumulators no longer fit in registers
# (H100, N=8192 d=4096 r=256: forward+backward 1629 us against 531 us for eager PyTorch, whose backward
# is cuBLAS). The rows kernel still computes dx, h and da in one pass.
MATMUL_REDUCTION_MIN_RP = 128


def _reduce_with_matmuls(outs, x, dy, h, da, w_up, b_up, scaling, scaling_value, upcast) -> None:
    """Fills ``outs`` (as :func:`backward` lays them out) from cuBLAS products over the tokens; the
    products take h and da in x's dtype, as _bwd_cols_kernel does, with fp32 accumulation."""
    if scaling is None:
        s = scaling_value
    else:
        s = scaling.float() if scaling.dim() == 0 else scaling.float()[:, None]
    m = torch.mm(dy.t().to(h.dtype), h).float()  # (d, r) = dy.T h, unscaled (dy in h's dtype, as the kernel)
    if "wu" in outs:
        outs["wu"].copy_(m * s)
        outs["wd"].copy_(torch.mm(da.t(), x))
    dy_sum = dy.float().sum(0) if ("bu" in outs or "ds" in outs) else None
    if "bu" in outs:
        outs["bu"].copy_(dy_sum * (s if not isinstance(s, torch.Tensor) or s.dim() == 0 else s[:, 0]))
    if "bd" in outs:
        outs["bd"].copy_(da.float().sum(0))
    if "ds" in outs:
        wu = w_up.float() if upcast else w_up.to(x.dtype).float()  # as the forward used it
        ds = (m * wu).sum(1)
        if b_up is not None:
            ds += b_up.float() * dy_sum
        outs["ds"].copy_(ds)


def backward(dy, x, w_down, b_down, w_up, b_up, scaling, scaling_value, has_residual, activation, need_ds,
             need_weights=True, ln=None, compute=None):
    """See :func:`_backward`; calls with a key seen before replay its launches from C++ (kernels/_replay.py)."""
    if not _replay.active(x):
        return _backward(dy, x, w_down, b_down, w_up, b_up, scaling, scaling_value, has_residual, activation,
                         need_ds, need_weights, ln, compute)
    lnw, lnb = (ln[0], ln[1]) if ln is not None else (None, None)
    key = _replay.key_of(dy, x, w_down, b_down, w_up, b_up, scaling, scaling_value, has_residual, activation,
                         bool(need_ds), bool(need_weights), None if ln is None else (lnw, lnb, float(ln[2])), compute)
    return _replay.call(_BACKWARD_PROGRAMS, key, [dy, x, w_down, b_down, w_up, b_up, scaling, lnw, lnb],
                        _backward, dy, x, w_down, b_down, w_up, b_up, scaling, scaling_value, has_residual,
                        activation, need_ds, need_weights, ln, compute, single=False)


def _backward(dy, x, w_down, b_down, w_up, b_up, scaling, scaling_value, has_residual, activation, need_ds,
              need_weights=True, ln=None, compute=None):
    """Gradients of :func:`forward`: (dx, dWd, dbd, dWu, dbu, d_scaling).

    d_scaling has the scaling tensor's shape and is computed only when ``need_ds``; the weight and bias
    gradients are None without ``need_weights`` (frozen adapter: the reduction reads neither x nor da)
    and the biases' when they are None; the residual's gradient is ``dy`` itself (the caller returns it).
    No atomics: each reduction program writes its fp32 partial sums to its own slice of a
    (splits, ...) buffer; ``_sum_splits_kernel`` adds the splits in a fixed order and writes every
    gradient in its dtype, so the result is the same bits on every run (three launches in all). From a
    padded width of MATMUL_REDUCTION_MIN_RP the weight gradients come from cuBLAS products instead
    (deterministic too). With ``ln`` (the forward's), the rows kernel recomputes LayerNorm(x), writes it
    in the products' dtype for the reduction (the x of dWd), and returns x's gradient through the
    LayerNorm (its weight and bias get none)."""
    n, d = x.shape
    r = w_down.shape[0]
    rp = padded_r(r)
    bn, bd, warps = _blocks(rp)
    cd, lnw, lnb, eps, ln_flags = _ln_args(x, ln, compute)
    upcast = interpreting() or cd.dtype == torch.float32
    need_ds = bool(need_ds and scaling is not None)
    dx = _replay.empty(x.shape, x.dtype, x.device)
    xin = x  # what the adapter read: x, or LN(x) written by the rows kernel
    if n == 0:
        hbuf = dabuf = None
    else:
        # h and da in the products' dtype (the reduction feeds them to the tensor cores in that dtype
        # anyway), in one allocation
        hd = _replay.empty((2, n, rp), cd.dtype, x.device)
        hbuf, dabuf = hd[0], hd[1]
        if ln is not None:
            xin = _replay.empty((n, d), cd.dtype, x.device)
        dummy = x
        _replay.launch(
            _bwd_rows_tuned, _split_grid(n),
            x, w_down, b_down if b_down is not None else dummy, w_up, scaling if scaling is not None else dummy,
            dy, dx, hbuf, dabuf, cd, lnw, lnb, xin, n, d, r, float(scaling_value), eps, n_bucket(n),
            HAS_BD=b_down is not None, S_MODE=_scale_mode(scaling), ADD_DY=not has_residual, **ln_flags,
            ACT=ACT_CODES[activation], RP=rp, UPCAST=upcast)
    # One split's partial sums, region by region (only what is needed), and the tensor each lands in:
    # separate allocations, since gradients returned by a custom op must not alias one another.
    dt = w_down.dtype
    new = lambda *shape, dtype=dt: _replay.empty(shape, dtype, x.device)
    outs = {}
    if need_weights:
        outs.update(wd=new(r, d), wu=new(d, r))
        if b_up is not None:
            outs["bu"] = new(d)
        if b_down is not None:
            outs["bd"] = new(r)
    if need_ds:
        outs["ds"] = new(d, dtype=scaling.dtype if scaling.dim() == 1 else torch.float32)
    sizes = [t.numel() for t in outs.values()]
    total = sum(sizes)
    offsets = dict(zip(outs, itertools.accumulate([0] + sizes[:-1])))
    if total > 0 and n == 0:
        _replay.unrecordable("no tokens: the gradients are zero-filled")
        for t in outs.values():
            t.zero_()  # no tokens: zero gradients
    elif total > 0 and rp >= MATMUL_REDUCTION_MIN_RP:
        _replay.unrecordable("the weight gradients come from torch products")
        _reduce_with_matmuls(outs, xin, dy, hbuf[:, :r], dabuf[:, :r], w_up, b_up, scaling, scaling_value, upcast)
    elif total > 0:
        d_blocks = cdiv(d, bd)
        splits = _splits(n, d_blocks, bn, x.device)
        rows_per_split = cdiv(cdiv(n, splits), bn) * bn
        splits = cdiv(n, rows_per_split)
        part = _replay.empty((splits, total), torch.float32, x.device)
        _replay.launch(
            _bwd_cols_kernel, (d_blocks, splits),
            xin, dy, hbuf, dabuf, w_up, b_up if b_up is not None else x, scaling if scaling is not None else x, part,
            n, d, r, float(scaling_value), rows_per_split, total,
            offsets.get("wu", 0), offsets.get("bu", 0), offsets.get("bd", 0), offsets.get("ds", 0),
            NEED_W=need_weights, HAS_BU=b_up is not None, NEED_BD=need_weights and b_down is not None,
            NEED_DS=need_ds, S_MODE=_scale_mode(scaling), BLOCK_N=bn, BLOCK_D=bd, RP=rp, UPCAST=upcast,
            num_warps=warps, num_stages=2 if rp >= 128 else 3)
        sum_splits(part, list(outs.values()))
    d_scaling = None
    if need_ds:
        if scaling.dim() != 1:
            _replay.unrecordable("a scalar scaling's gradient is a torch sum")
        d_scaling = outs["ds"] if scaling.dim() == 1 else outs["ds"].sum().to(scaling.dtype)
    if not need_weights:
        return dx, None, None, None, None, d_scaling
    return dx, outs["wd"], outs.get("bd"), outs["wu"], outs.get("bu"), d_scaling
