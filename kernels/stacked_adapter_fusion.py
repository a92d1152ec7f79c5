"""Triton kernels of AdapterFusion over k stacked bottleneck adapters (the core of
``stacked_adapter_fusion``).

The op's projections reduce to this core (see pet_fast/ops/adapter_fusion.py): with
``qk = Q @ Wk`` (or ``Q``), the score of adapter j is ``<qk, v_j>`` (the key bias adds the same number
to every score and cancels in the softmax), and because the probabilities sum to one the value
projection and a residual added before the softmax both move outside the sum. The kernels compute

    v_j  = s_j * (act(x @ Wd_j.T + bd_j) @ Wu_j.T + bu_j)        j = 1..k
    p    = softmax_j(<qk, v_j> * inv_temperature)                 (fp32)
    ctx  = sum_j p_j v_j

Forward, one launch, one program per tile of tokens: for each adapter the pre-activation
``a_j = x @ Wd_j.T + bd_j`` (r-wide) and its score (looping over d, recomputing v_j blocks from the
hidden held in registers); the softmax; then ``hw_j = p_j s_j act(a_j)`` once per adapter, written r-wide
in the input dtype to a scratch buffer of the program's own rows; then per block of d
``ctx = [hw_j]_j @ [Wu_j]_j`` plus the biases (the activation is not evaluated again per block of d). The k
adapter outputs v_j (k x d per token) never reach global memory. The forward writes and saves ``a``
(N, k, RP) fp32 and ``p`` (N, k) fp32: r-wide and k-wide per adapter, where eager PyTorch keeps the
(N, k, d) adapter outputs and their projections.

Backward, two launches: a per-token-tile kernel (``dp_j = <dctx, v_j>`` from ``dctx @ Wu_j``, and
``qk @ Wu_j`` in the same pass over d, kept r-wide in a scratch buffer; the softmax backward; ``da_j``
and, once per adapter, ``s_j dscore_j act(a_j)`` to a scratch buffer;
``dqk = sum_j dscore_j v_j`` and ``dx = sum_j da_j @ Wd_j`` per block of d), writing the
r-wide ``da`` and k-wide ``dscore`` (and for fp16/bf16 ``da`` and the hidden ``h`` in the input dtype);
then a grid over (adapter, block of d, split of tokens) whose programs sum ``dWd``, ``dbd``, ``dWu``,
``dbu`` and ``d_scaling`` over their tokens in fp32 and write them to their own slice of a partials
buffer, which ``sum_splits`` (bottleneck_adapter.py) reduces over the splits in a fixed order,
writing every gradient in its dtype in one launch: no atomics, so the backward is deterministic
(the same bits on every run). The scaling multiplies each sum once at the end, and ``d_scaling`` comes
from the unscaled ``dWu`` sum and ``Wu`` (see ``_bwd_cols_kernel``). Nothing k x d per token is written
in either direction.

Score mask (dropout on the scores, the op's ``score_mask``): with a mask m (N, k) fp32 the scores are
``m_j (<qk, v_j> + t0)``, t0 (N,) in the input dtype being the score term shared by the adapters that the softmax
cancels without a mask (the key bias's, and a residual added before the fusion's; formed by the op,
which passes None where there is none). The forward reads m and t0; the per-token-tile backward
multiplies the score gradient by m before it is stored and used (``DSCBUF``: the weight-gradient
reduction reads it unchanged) and writes t0's gradient, the sum over j of that product (in a form without
its cancellation: see ``_bwd_rows_kernel``). Without a
mask neither kernel reads or writes anything more (``HAS_SM``/``HAS_T0``).

For fp16/bf16 inputs ``qk`` and ``dctx`` come in fp32 (rounded to the input dtype they cost the
gradients precision: see pet_fast/ops/adapter_fusion.py); the kernels load them as fp32 and ``dqk`` is
written in qk's dtype (or, where the op rounds it before its products, in x's). The forward's score matmul takes the
hidden h as two halves in the input dtype (h ~ hi + lo), so the scores keep fp32 precision on the tensor
cores: the softmax and d_scaling are sensitive to them. The forward's and the per-token-tile backward's tile
shapes are autotuned on a GPU (one configuration under the interpreter and with PET_FAST_AUTOTUNE=0); the
weight-gradient reduction uses fixed tiles.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _replay
from ._host import cdiv, next_power_of_2, sm_count

from .bottleneck_adapter import (ACT_CODES, act_fwd, act_fwd_bwd, autotuning, interpreting, mm, n_bucket, padded_r,
                                 prune_bwd_row_configs, prune_row_configs, row_configs, sum_splits)


@triton.jit
def _col(t, kk, j):
    """Column j of a (BLOCK_N, KP) tile as a (BLOCK_N,) vector."""
    return tl.sum(tl.where(kk[None, :] == j, t, 0.0), axis=1)


@triton.jit
def _pairwise(p, m, dp, kk, K):
    """sum_ij p_i p_j (m_j - m_i)(dp_j - dp_i) per row of (BLOCK_N, KP) tiles: twice t0's gradient (times T),
    sum_j m_j dscore_j, which equals it since the p_i sum to one. The plain sum cancels (to exactly 0 where
    no score is dropped) and kept the rounding of its terms; this form has none (0 is 0) and costs k^2 per
    token."""
    acc = tl.sum(p * 0.0, axis=1)
    for i in range(K):
        pi = _col(p, kk, i)
        mi = _col(m, kk, i)
        dpi = _col(dp, kk, i)
        acc += pi * tl.sum(p * (m - mi[:, None]) * (dp - dpi[:, None]), axis=1)
    return acc


@triton.jit
def _scale(S, s_value, j, S_MODE: tl.constexpr):
    if S_MODE == 0:
        s = s_value
    elif S_MODE == 1:
        s = tl.load(S).to(tl.float32)
    else:
        s = tl.load(S + j).to(tl.float32)
    return s


@triton.jit
def _fwd_kernel(X, QK, QKB, SM, T0, WD, BD, WU, BU, S, CTX, ABUF, PBUF, HW, N, D, R, K, s_value, inv_t, n_bucket,
                HAS_QKB: tl.constexpr, HAS_SM: tl.constexpr, HAS_T0: tl.constexpr, HAS_BD: tl.constexpr,
                HAS_BU: tl.constexpr, S_MODE: tl.constexpr, ACT: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, RP: tl.constexpr, KP: tl.constexpr,
                UPCAST: tl.constexpr, CHAIN: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)  # int64 before the product: N may pass 2**31
    rmask = rows < N
    rr = tl.arange(0, RP)
    rrmask = rr < R
    kk = tl.arange(0, KP)
    cols = tl.arange(0, BLOCK_D)
    scores = tl.zeros((BLOCK_N, KP), dtype=tl.float32)
    for j in range(K):
        wd_j = WD + j * R * D
        wu_j = WU + j * D * R
        a = tl.zeros((BLOCK_N, RP), dtype=tl.float32)
        if UPCAST:
            # fp32: the GPU compiles `acc += dot` as one chain of fused multiply-adds over all of d; at
            # d = 4096 that chain's rounding (rms 1.2e-6 in a, against 2.4e-7 for blocked sums) reached
            # the scores and d_scaling (a sum with heavy cancellation) past the fp32 bound in emulation
            # (sequential fp32 FMAs, d=4096 r=256 k=2: d_scaling 8.0e-5 against 5e-5). Chains of
            # CHAIN products, each added to the total with a plain add, bring it to 8e-6.
            tl.static_assert(CHAIN % BLOCK_D == 0)
            for d00 in range(0, D, CHAIN):
                part = tl.zeros((BLOCK_N, RP), dtype=tl.float32)
                for d1 in range(0, CHAIN, BLOCK_D):
                    c = d00 + d1 + cols
                    cm = c < D
                    xt = tl.load(X + rows[:, None] * D + c[None, :], mask=rmask[:, None] & cm[None, :], other=0.0)
                    wt = tl.load(wd_j + rr[:, None] * D + c[None, :], mask=rrmask[:, None] & cm[None, :], other=0.0)
                    part += mm(xt, tl.trans(wt), UPCAST)
                a += part
        else:
            for d0 in range(0, D, BLOCK_D):
                c = d0 + cols
                cm = c < D
                xt = tl.load(X + rows[:, None] * D + c[None, :], mask=rmask[:, None] & cm[None, :], other=0.0)
                wt = tl.load(wd_j + rr[:, None] * D + c[None, :], mask=rrmask[:, None] & cm[None, :], other=0.0)
                a += mm(xt, tl.trans(wt), UPCAST)
        if HAS_BD:
            a += tl.load(BD + j * R + rr, mask=rrmask, other=0.0).to(tl.float32)[None, :]
        # the padded hidden columns (r..RP) hold x @ 0, NaN for an inf in x: zeroed, or the up-projection's zero
        # columns would carry it to the token's whole output (the backward reads a from here)
        a = tl.where(rrmask[None, :], a, 0.0)
        tl.store(ABUF + (rows[:, None] * K + j) * RP + rr[None, :], a, mask=rmask[:, None])
        h = act_fwd(a, ACT)
        # The scores need h to fp32 precision: a score is a sum over d of |qk| |v_j| terms, and rounding h
        # to fp16/bf16 here perturbed the probabilities enough to move d_scaling past the precision rule's
        # bound (fp16, d=768, r=64, k=3: error 15.2 against a bound of 10.6; 3.2 with h in fp32). So for
        # the tensor cores h is split into a high and a low half in the input dtype, h ~ hq + hl to ~2^-22,
        # and both go through the matmul with fp32 accumulation (W_up is exact in the input dtype).
        if UPCAST:
            hq = h
            hl = h
        else:
            hq = h.to(CTX.dtype.element_ty)
            hl = (h - hq.to(tl.float32)).to(CTX.dtype.element_ty)
        sc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            c = d0 + cols
            cm = c < D
            m2 = rmask[:, None] & cm[None, :]
            wu = tl.load(wu_j + c[:, None] * R + rr[None, :], mask=cm[:, None] & rrmask[None, :], other=0.0)
            u = mm(hq, tl.trans(wu), UPCAST)
            if not UPCAST:
                u += mm(hl, tl.trans(wu), UPCAST)
            if HAS_BU:
                u += tl.load(BU + j * D + c, mask=cm, other=0.0).to(tl.float32)[None, :]
            q = tl.load(QK + rows[:, None] * D + c[None, :], mask=m2, other=0.0).to(tl.float32)
            if HAS_QKB:  # qk's bias (the folded query-key product's), added as qk is read
                q += tl.load(QKB + c, mask=cm, other=0.0).to(tl.float32)[None, :]
            sc += tl.sum(q * u, axis=1)
        sc = sc * _scale(S, s_value, j, S_MODE)
        if HAS_SM:
            if HAS_T0:  # the score term the adapters share (module docstring; read per adapter, not kept live
                # across the loop: the 128-token tile spilled 24 bytes with it kept, sm_90)
                sc += tl.load(T0 + rows, mask=rmask, other=0.0).to(tl.float32)
            sc = sc * tl.load(SM + rows * K + j, mask=rmask, other=0.0)
        sc = sc * inv_t
        scores = tl.where(kk[None, :] == j, sc[:, None], scores)
    scores = tl.where(kk[None, :] < K, scores, float("-inf"))
    mx = tl.max(scores, axis=1)
    e = tl.exp(scores - mx[:, None])
    p = e / tl.sum(e, axis=1)[:, None]
    tl.store(PBUF + rows[:, None] * K + kk[None, :], p, mask=rmask[:, None] & (kk[None, :] < K))
    # The context's products read hw_j = p_j s_j act(a_j), rounded to the input dtype, once per block of d:
    # formed once per adapter here (the activation, gelu's erf among them, not again per block of d) and kept
    # r-wide in HW, the program's own rows.
    tl.debug_barrier()  # a was stored above by other threads of the program
    for j in range(K):
        aoffs = (rows[:, None] * K + j) * RP + rr[None, :]
        a = tl.load(ABUF + aoffs, mask=rmask[:, None], other=0.0)
        hw = act_fwd(a, ACT) * (_col(p, kk, j) * _scale(S, s_value, j, S_MODE))[:, None]
        tl.store(HW + aoffs, hw.to(HW.dtype.element_ty), mask=rmask[:, None])
    tl.debug_barrier()
    for d0 in range(0, D, BLOCK_D):
        c = d0 + cols
        cm = c < D
        acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
        for j in range(K):
            hw = tl.load(HW + (rows[:, None] * K + j) * RP + rr[None, :], mask=rmask[:, None], other=0.0)
            wu = tl.load(WU + j * D * R + c[:, None] * R + rr[None, :], mask=cm[:, None] & rrmask[None, :], other=0.0)
            acc += mm(hw, tl.trans(wu), UPCAST)
            if HAS_BU:
                w = tl.load(PBUF + rows * K + j, mask=rmask, other=0.0) * _scale(S, s_value, j, S_MODE)
                acc += w[:, None] * tl.load(BU + j * D + c, mask=cm, other=0.0).to(tl.float32)[None, :]
        tl.store(CTX + rows[:, None] * D + c[None, :], acc.to(CTX.dtype.element_ty), mask=rmask[:, None] & cm[None, :])


@triton.jit
def _bwd_rows_kernel(X, QK, QKB, SM, DT0, DCTX, WD, WU, BU, S, ABUF, PBUF, DABUF, GQBUF, DA, HB, DSCBUF, HW, DX, DQK,
                     N, D, R, K, s_value, inv_t, n_bucket, HAS_QKB: tl.constexpr, HAS_SM: tl.constexpr,
                     HAS_T0: tl.constexpr, HAS_BU: tl.constexpr, S_MODE: tl.constexpr,
                     ACT: tl.constexpr, WRITE_H: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, RP: tl.constexpr, KP: tl.constexpr,
                     UPCAST: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)  # int64 before the product: N may pass 2**31
    rmask = rows < N
    rr = tl.arange(0, RP)
    rrmask = rr < R
    kk = tl.arange(0, KP)
    kmask = kk < K
    cols = tl.arange(0, BLOCK_D)
    p = tl.load(PBUF + rows[:, None] * K + kk[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
    # pass A: dp_j = <dctx, v_j> = s_j (<dctx @ Wu_j, h_j> + <dctx, bu_j>); da_j starts as s_j p_j (dctx @ Wu_j);
    # in the same pass over d, qk @ Wu_j for pass B (kept r-wide in fp32 in GQBUF)
    dp = tl.zeros((BLOCK_N, KP), dtype=tl.float32)
    for j in range(K):
        g = tl.zeros((BLOCK_N, RP), dtype=tl.float32)
        gq = tl.zeros((BLOCK_N, RP), dtype=tl.float32)
        gb = tl.zeros((BLOCK_N,), dtype=tl.float32)
        gqb = tl.zeros((RP,), dtype=tl.float32)  # qk's bias @ Wu_j: the same for every token
        for d0 in range(0, D, BLOCK_D):
            c = d0 + cols
            cm = c < D
            m2 = rmask[:, None] & cm[None, :]
            dct = tl.load(DCTX + rows[:, None] * D + c[None, :], mask=m2, other=0.0)
            qt = tl.load(QK + rows[:, None] * D + c[None, :], mask=m2, other=0.0)
            wu = tl.load(WU + j * D * R + c[:, None] * R + rr[None, :], mask=cm[:, None] & rrmask[None, :], other=0.0)
            if HAS_QKB:
                qb = tl.load(QKB + c, mask=cm, other=0.0).to(tl.float32)
                gqb += tl.sum(qb[:, None] * wu.to(tl.float32), axis=0)
            if UPCAST:
                g += mm(dct, wu, UPCAST)
                gq += mm(qt, wu, UPCAST)
            else:  # tensor-core operands in the weights' dtype; dctx and qk kept in fp32 by the op (its precision
                # notes) are split into a high and a low half there, as pass C splits dv: rounded whole, they put an
                # error of the input dtype's epsilon into dp_j, which the softmax backward's cancellation magnifies
                dch = dct.to(wu.dtype)
                g += mm(dch, wu, UPCAST)
                if DCTX.dtype.element_ty == tl.float32:
                    g += mm((dct - dch.to(tl.float32)).to(wu.dtype), wu, UPCAST)
                qth = qt.to(wu.dtype)
                gq += mm(qth, wu, UPCAST)
                if QK.dtype.element_ty == tl.float32:
                    gq += mm((qt - qth.to(tl.float32)).to(wu.dtype), wu, UPCAST)
            if HAS_BU:
                gb += tl.sum(dct.to(tl.float32) * tl.load(BU + j * D + c, mask=cm, other=0.0).to(tl.float32)[None, :], axis=1)
        if HAS_QKB:
            gq += gqb[None, :]
        s = _scale(S, s_value, j, S_MODE)
        aoffs = (rows[:, None] * K + j) * RP + rr[None, :]
        a = tl.load(ABUF + aoffs, mask=rmask[:, None], other=0.0)
        h = act_fwd(a, ACT)
        dpj = s * (tl.sum(g * h, axis=1) + gb)
        dp = tl.where(kk[None, :] == j, dpj[:, None], dp)
        tl.store(DABUF + aoffs, g * (s * _col(p, kk, j))[:, None], mask=rmask[:, None])
        tl.store(GQBUF + aoffs, gq, mask=rmask[:, None])
    dsc = p * (dp - tl.sum(p * dp, axis=1)[:, None]) * inv_t
    if HAS_SM:  # the gradient of the unmasked score <qk, v_j> (+ t0): dscore_j m_j
        m = tl.load(SM + rows[:, None] * K + kk[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        if HAS_T0:
            tl.store(DT0 + rows, (0.5 * inv_t * _pairwise(p, m, dp, kk, K)).to(DT0.dtype.element_ty), mask=rmask)
        dsc = dsc * m
    tl.store(DSCBUF + rows[:, None] * K + kk[None, :], dsc, mask=rmask[:, None] & kmask[None, :])
    tl.debug_barrier()  # the tiles stored above are read back below, maybe by other threads of the program
    # pass B: da_j = (s_j p_j dctx @ Wu_j + s_j dscore_j qk @ Wu_j) * act'(a_j), written to DA in its dtype
    # (the input dtype for fp16/bf16: the tensor-core dots that read it round it to that anyway); with
    # WRITE_H also h_j in the input dtype, for the weight-gradient reduction (see ``backward``); and pass C's
    # operand hw_j = s_j dscore_j act(a_j), rounded as pass C's dot rounds it, to HW (formed once per adapter,
    # not again per block of d in pass C)
    for j in range(K):
        s = _scale(S, s_value, j, S_MODE)
        aoffs = (rows[:, None] * K + j) * RP + rr[None, :]
        gq = tl.load(GQBUF + aoffs, mask=rmask[:, None], other=0.0)
        a = tl.load(ABUF + aoffs, mask=rmask[:, None], other=0.0)
        h, gp = act_fwd_bwd(a, ACT)
        w = s * _col(dsc, kk, j)
        da = tl.load(DABUF + aoffs, mask=rmask[:, None], other=0.0)
        da = (da + gq * w[:, None]) * gp
        tl.store(DA + aoffs, da.to(DA.dtype.element_ty), mask=rmask[:, None])
        if WRITE_H:
            tl.store(HB + aoffs, h.to(HB.dtype.element_ty), mask=rmask[:, None])
        # (act_fwd, not h: pass C's operand as the forward forms the activation)
        tl.store(HW + aoffs, (act_fwd(a, ACT) * w[:, None]).to(HW.dtype.element_ty), mask=rmask[:, None])
    tl.debug_barrier()
    # pass C, per block of d: dqk = sum_j dscore_j v_j and dx = sum_j da_j @ Wd_j
    for d0 in range(0, D, BLOCK_D):
        c = d0 + cols
        cm = c < D
        acc_q = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
        acc_x = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
        for j in range(K):
            aoffs = (rows[:, None] * K + j) * RP + rr[None, :]
            hw = tl.load(HW + aoffs, mask=rmask[:, None], other=0.0)
            da = tl.load(DA + aoffs, mask=rmask[:, None], other=0.0)
            wu = tl.load(WU + j * D * R + c[:, None] * R + rr[None, :], mask=cm[:, None] & rrmask[None, :], other=0.0)
            wd = tl.load(WD + j * R * D + rr[:, None] * D + c[None, :], mask=rrmask[:, None] & cm[None, :], other=0.0)
            if not UPCAST:
                da = da.to(wd.dtype)
            acc_q += mm(hw, tl.trans(wu), UPCAST)
            acc_x += mm(da, wd, UPCAST)
            if HAS_BU:
                w = tl.load(DSCBUF + rows * K + j, mask=rmask, other=0.0) * _scale(S, s_value, j, S_MODE)
                acc_q += w[:, None] * tl.load(BU + j * D + c, mask=cm, other=0.0).to(tl.float32)[None, :]
        offs = rows[:, None] * D + c[None, :]
        m2 = rmask[:, None] & cm[None, :]
        tl.store(DQK + offs, acc_q.to(DQK.dtype.element_ty), mask=m2)
        tl.store(DX + offs, acc_x.to(DX.dtype.element_ty), mask=m2)


@triton.jit
def _bwd_cols_kernel(X, QK, QKB, DCTX, WU, BU, S, HB, DA, PBUF, DSCBUF, PART,
                     N, D, R, K, s_value, rows_per_split, part_stride, off_wu, off_bu, off_bd, off_ds, d_blocks,
                     HAS_QKB: tl.constexpr, HAS_BU: tl.constexpr, S_MODE: tl.constexpr, NEED_W: tl.constexpr, NEED_DS: tl.constexpr,
                     NEED_BD: tl.constexpr, H_IS_A: tl.constexpr, ACT: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_D: tl.constexpr, RP: tl.constexpr, UPCAST: tl.constexpr):
    """Program (block of d, split of tokens, adapter j): this split's sums over its tokens, written to its own
    slice PART[split] of the partials (no atomics; ``backward`` sums over the splits).

    With dv = p_j dctx + dscore_j qk (the gradient of v_j) and u_j = h_j Wu_j^T + bu_j:
        dWd_j = da_j^T x     dbd_j = sum_n da_j          (da_j holds s_j already)
        dWu_j = s_j dv^T h_j     dbu_j = s_j sum_n dv
        ds_j  = sum_n <dv, u_j> = <dv^T h_j, Wu_j> + <sum_n dv, bu_j>
    so the loop accumulates the unscaled A = dv^T h_j and b = sum_n dv, multiplies them by s_j once at the
    end, and forms ds_j from A and b with this program's tile of Wu_j and bu_j (exact algebra; no matmul
    for u_j in the loop). For fp16/bf16 with NEED_DS, dv goes into the tensor-core dot as two halves
    (dv ~ hi + lo in the input dtype), so A, hence ds_j, keeps dv at fp32 precision, as the former
    fp32 <dv, u_j> sum did; h_j is rounded to the input dtype as before.
    """
    pid_d = tl.program_id(0)
    pid_s = tl.program_id(1)
    j = tl.program_id(2).to(tl.int64)
    c = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    cm = c < D
    rr = tl.arange(0, RP)
    rrmask = rr < R
    acc_wu = tl.zeros((BLOCK_D, RP), dtype=tl.float32)
    # the bias sums per token slot, reduced over the slots once after the loop (a column sum per tile
    # crosses threads and warps)
    acc_bu = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    if NEED_W:
        acc_wd = tl.zeros((RP, BLOCK_D), dtype=tl.float32)
        acc_bd = tl.zeros((BLOCK_N, RP), dtype=tl.float32)
    start = pid_s.to(tl.int64) * rows_per_split
    stop = tl.minimum(start + rows_per_split, N)
    for n0 in range(start, stop, BLOCK_N):
        rows = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        rmask = rows < stop
        m2 = rmask[:, None] & cm[None, :]
        offs = rows[:, None] * D + c[None, :]
        dct = tl.load(DCTX + offs, mask=m2, other=0.0).to(tl.float32)
        qt = tl.load(QK + offs, mask=m2, other=0.0).to(tl.float32)
        if HAS_QKB:  # (rows past the split load p_j = dscore_j = 0: their dv stays 0)
            qt += tl.load(QKB + c, mask=cm, other=0.0).to(tl.float32)[None, :]
        pj = tl.load(PBUF + rows * K + j, mask=rmask, other=0.0)
        dscj = tl.load(DSCBUF + rows * K + j, mask=rmask, other=0.0)
        dv = pj[:, None] * dct + dscj[:, None] * qt  # gradient of v_j, unscaled
        aoffs = (rows[:, None] * K + j) * RP + rr[None, :]
        h = tl.load(HB + aoffs, mask=rmask[:, None], other=0.0)
        if H_IS_A:
            h = act_fwd(h, ACT)
        if UPCAST:
            acc_wu += mm(tl.trans(dv), h, UPCAST)
        else:
            hq = h.to(X.dtype.element_ty)
            dvq = dv.to(X.dtype.element_ty)
            acc_wu += mm(tl.trans(dvq), hq, UPCAST)
            if NEED_DS:
                dvl = (dv - dvq.to(tl.float32)).to(X.dtype.element_ty)
                acc_wu += mm(tl.trans(dvl), hq, UPCAST)
        acc_bu += dv
        if NEED_W:
            xt = tl.load(X + offs, mask=m2, other=0.0)
            da = tl.load(DA + aoffs, mask=rmask[:, None], other=0.0)
            acc_wd += mm(tl.trans(da.to(xt.dtype)), xt, UPCAST)
            if NEED_BD:
                acc_bd += da.to(tl.float32)
    acc_bu = tl.sum(acc_bu, axis=0)
    # Every element of this split's slice is written by exactly one program: (j, rows < R, columns < D) of
    # dWd, dWu and dbu by the program of its d block, dbd by the d block 0, ds entry (j, pid_d) by its own.
    out = PART + pid_s.to(tl.int64) * part_stride
    if NEED_W:
        s = _scale(S, s_value, j, S_MODE)
        tl.store(out + j * R * D + rr[:, None] * D + c[None, :], acc_wd, mask=rrmask[:, None] & cm[None, :])
        tl.store(out + off_wu + j * D * R + c[:, None] * R + rr[None, :], acc_wu * s,
                 mask=cm[:, None] & rrmask[None, :])
        if HAS_BU:
            tl.store(out + off_bu + j * D + c, acc_bu * s, mask=cm)
        if NEED_BD:
            if pid_d == 0:
                tl.store(out + off_bd + j * R + rr, tl.sum(acc_bd, axis=0), mask=rrmask)
    if NEED_DS:
        wu = tl.load(WU + j * D * R + c[:, None] * R + rr[None, :], mask=cm[:, None] & rrmask[None, :], other=0.0)
        ds = tl.sum(tl.sum(acc_wu * wu.to(tl.float32), axis=1), axis=0)
        if HAS_BU:
            ds += tl.sum(acc_bu * tl.load(BU + j * D + c, mask=cm, other=0.0).to(tl.float32), axis=0)
        tl.store(out + off_ds + j * d_blocks + pid_d, ds)


# Autotuning keys: the sizes and every variant switch of the kernel (variants do not share a tuned tile).
_fwd_tuned = triton.autotune(row_configs(), key=["D", "RP", "K", "KP", "n_bucket", "UPCAST", "HAS_QKB", "HAS_SM",
                                                 "HAS_T0", "HAS_BD", "HAS_BU", "S_MODE", "ACT", "CHAIN"],
                             prune_configs_by={"early_config_prune": prune_row_configs})(_fwd_kernel)


# The per-token-tile backward's tiles on a GPU with autotuning on: the fixed tile of _blocks first (the
# choice before autotuning), then smaller and larger ones. At the BERT-base step's 4096 tokens the fixed
# 32-row tile makes 128 programs on an H100's 132 SMs, one per SM, each a chain of small dependent
# products (112 us per call at k=3 in the third GPU session's profile, several times its arithmetic):
# 16-row tiles give two programs per SM. Each tile costs a compile per key, so few; pruned per RP as the
# forward's (fp32 accumulators in registers) and kept where the sm_90 builds do not spill
# (benchmarks/compile_check.py).
BWD_ROW_TILES = [(32, 64, 4, 3), (16, 64, 4, 2), (16, 64, 4, 3), (16, 32, 4, 3), (64, 64, 8, 3), (32, 128, 8, 3)]


def bwd_row_configs() -> list:
    return [triton.Config({"BLOCK_N": bn, "BLOCK_D": bd}, num_warps=w, num_stages=st) for bn, bd, w, st in BWD_ROW_TILES]


def prune_fusion_bwd_row_configs(configs, named_args, **kwargs):
    """The adapter backward's pruning, and beyond RP=64 16-row tiles only (as _blocks): at RP=256 the 32-row
    tile needs 240 KiB of shared memory and spills 4.4 KB (compile_check, sm_90, bf16); for float32 inputs
    there, at most 128 columns in flight over the stages (64 x 3 needs 336 KiB)."""
    kept = prune_bwd_row_configs(configs, named_args, **kwargs)
    if kwargs.get("RP", named_args.get("RP", 16)) > 64:
        upcast = kwargs.get("UPCAST", named_args.get("UPCAST"))
        kept = [c for c in kept if c.kwargs["BLOCK_N"] <= 16
                and not (upcast and c.kwargs["BLOCK_D"] * c.num_stages > 128)] or kept
    return kept


_bwd_rows_tuned = triton.autotune(bwd_row_configs(), key=["D", "RP", "K", "KP", "n_bucket", "UPCAST", "HAS_QKB",
                                                      "HAS_SM", "HAS_T0", "HAS_BU", "S_MODE", "ACT", "WRITE_H"],
                                  prune_configs_by={"early_config_prune": prune_fusion_bwd_row_configs})(_bwd_rows_kernel)


def _blocks(rp: int) -> tuple[int, int, int]:
    if interpreting():
        return 16, 32, 4
    if rp <= 64:
        return 32, 64, 4
    return 16, 64, 4


def _cols_blocks(rp: int) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_D, num_warps, num_stages) of the weight-gradient reduction. Its grid has only about
    2 programs per SM, so 8 warps each; the tiles are the largest whose sm_90 build keeps the registers
    without spilling (ptxas, bf16, d_scaling trained: 0 bytes of stack at r = 16..256)."""
    if interpreting():
        return 16, 32, 4, 1
    if rp <= 64:
        return 32, 64, 8, 3
    if rp <= 128:
        return 32, 32, 8, 3
    return 16, 32, 8, 2


def _scale_mode(scaling):
    if scaling is None:
        return 0
    return 2 if scaling.dim() == 1 else 1


FP32_CHAIN = 256  # float32 products per fused multiply-add chain in the forward's x @ Wd_j.T (see _fwd_kernel)
_FORWARD_PROGRAMS: dict = _replay.register_cache({})
_BACKWARD_PROGRAMS: dict = _replay.register_cache({})


def forward(x, qk, w_down, b_down, w_up, b_up, scaling, scaling_value, activation, inv_temperature, b_qk=None,
            score_mask=None, t0=None):
    """See :func:`_forward`; calls with a key seen before replay its launch from C++ (kernels/_replay.py)."""
    extra = (score_mask, t0)
    if not _replay.active(x):
        return _forward(x, qk, w_down, b_down, w_up, b_up, scaling, scaling_value, activation, inv_temperature, b_qk,
                        *extra)
    key = _replay.key_of(x, qk, w_down, b_down, w_up, b_up, scaling, scaling_value, activation, inv_temperature, b_qk)
    inputs = [x, qk, w_down, b_down, w_up, b_up, scaling, b_qk]
    if score_mask is not None:  # (keys and inputs of calls without it as before: the C++ node runs those programs)
        key, inputs = key + _replay.key_of(*extra), inputs + list(extra)
    return _replay.call(_FORWARD_PROGRAMS, key, inputs, _forward,
                        x, qk, w_down, b_down, w_up, b_up, scaling, scaling_value, activation, inv_temperature, b_qk,
                        *extra, single=False)


# The node's inputs (csrc/stacked_fusion_replay.cpp), absent ones None: x, qk, w_down, b_down, w_up, b_up, scaling,
# residual, w_value, b_value, q, w_key, b_qk, score_mask, t0 (as :func:`_forward`'s and ops/adapter_fusion.py
# _core_forward's). With qk None, q (N, d) and w_key (fp16/bf16): the node forms qk = q @ w_key in float32 itself.


def core_with_grad(inputs: list, scaling_value, activation, inv_temperature):
    """The fusion core's output (ops/adapter_fusion.py _core_forward's first) with its gradients from one C++
    autograd node (csrc/stacked_fusion_replay.cpp), once earlier calls through the op's autograd.Function
    have recorded both launchers for these arguments; None otherwise (the caller runs the Function)."""
    found = _node_programs(inputs, scaling_value, activation, inv_temperature)
    if found is None:
        return None
    fwd, bwd, need_ds, need_w = found
    try:
        return fwd.ext.stacked_fusion_autograd(fwd.program, bwd.program, inputs, need_ds, need_w)
    except RuntimeError as exc:  # the Function takes these calls from now on
        _replay.give_up(exc)
        return None


def core_guard(inputs: list, scaling_value, activation, inv_temperature):
    """A C++ ``GuardedStackedFusion`` for later calls like one whose :func:`core_with_grad` ran as the node with
    ``inputs``: called with such a list, it checks each input's facts in C++ and runs the node, or returns
    None. None here when the programs are gone or the inputs cannot be guarded (not contiguous)."""
    found = _node_programs(inputs, scaling_value, activation, inv_temperature)
    try:
        return None if found is None else found[0].ext.GuardedStackedFusion(found[0].program, found[1].program,
                                                                            inputs, found[2], found[3])
    except RuntimeError:
        return None


def _node_programs(inputs: list, scaling_value, activation, inv_temperature):
    """(forward entry, backward entry, need_ds, need_weights) of the node for these inputs, or None when
    either launcher has no program for them yet (the backward's key as the Function's backward, _core_grad,
    calls it) or the pair became complete in the backward pass running now (_replay.recorded_in_this_backward)."""
    x, qk, w_down, b_down, w_up, b_up, scaling, _, w_value, _, _, _, b_qk, score_mask, t0 = inputs
    if not (_replay.enabled() and _replay.active(x)):
        return None
    n, d = x.shape
    dev = x.get_device()
    qk_key = _replay.key_of(qk) if qk is not None else (_replay.tensor_key((n, d), torch.float32, dev),)
    args_key = _replay.key_of(x) + qk_key + _replay.key_of(w_down, b_down, w_up, b_up, scaling, scaling_value,
                                                           activation, inv_temperature)
    bias_key = _replay.key_of(b_qk)
    mask_key = _replay.key_of(score_mask, t0) if score_mask is not None else ()  # (as forward() and backward() key)
    fwd = _FORWARD_PROGRAMS.get(args_key + bias_key + mask_key)
    if not isinstance(fwd, _replay.Entry):
        return None
    need_ds = scaling is not None and scaling.requires_grad
    need_w = any(t is not None and t.requires_grad for t in (w_down, b_down, w_up, b_up))
    k, r = w_down.shape[0], w_down.shape[1]
    dctx_dtype = x.dtype if w_value is None else (torch.float64 if x.dtype == torch.float64 else torch.float32)
    bkey = (_replay.tensor_key((n, d), dctx_dtype, dev),) + args_key + (
        _replay.tensor_key((n, k, padded_r(r)), torch.float32, dev), _replay.tensor_key((n, k), torch.float32, dev),
        need_ds, need_w) + bias_key + (qk is None,)
    if score_mask is not None:
        bkey = bkey + _replay.key_of(score_mask, t0 is not None and t0.requires_grad)
    bwd = _BACKWARD_PROGRAMS.get(bkey)
    if not isinstance(bwd, _replay.Entry) or _replay.recorded_in_this_backward(fwd, bwd):
        return None
    return fwd, bwd, need_ds, need_w


def _forward(x, qk, w_down, b_down, w_up, b_up, scaling, scaling_value, activation, inv_temperature, b_qk=None,
              score_mask=None, t0=None):
    """x, qk (N, d) contiguous; stacked weights (k, r, d), (k, r), (k, d, r), (k, d); scaling a tensor
    (() or (k,)) or None; b_qk (d,) or None, added to qk as the kernels read it; score_mask (N, k) fp32
    contiguous or None, and with it t0 (N,) in x's dtype or None: score_j = m_j (<qk, v_j> + t0) (see the module
    docstring). Returns (ctx (N, d), a (N, k, RP) fp32, p (N, k) fp32)."""
    n, d = x.shape
    k, r, _ = w_down.shape
    rp = padded_r(r)
    kp = max(2, next_power_of_2(k))
    ctx = _replay.empty(x.shape, x.dtype, x.device)
    abuf = _replay.empty((n, k, rp), torch.float32, x.device)
    pbuf = _replay.empty((n, k), torch.float32, x.device)
    if n == 0:
        return ctx, abuf, pbuf
    upcast = interpreting() or x.dtype == torch.float32
    # the context's r-wide operand per token and adapter (scratch: the kernel writes and reads it)
    hw = _replay.empty((n, k, rp), torch.float32 if upcast else x.dtype, x.device)
    dummy = x
    _replay.launch(
        _fwd_tuned, lambda meta: (cdiv(n, meta["BLOCK_N"]),),
        x, qk, b_qk if b_qk is not None else dummy, score_mask if score_mask is not None else dummy,
        t0 if t0 is not None else dummy, w_down, b_down if b_down is not None else dummy, w_up,
        b_up if b_up is not None else dummy, scaling if scaling is not None else dummy, ctx, abuf, pbuf, hw, n, d, r, k,
        float(scaling_value), float(inv_temperature), n_bucket(n), HAS_QKB=b_qk is not None,
        HAS_SM=score_mask is not None, HAS_T0=t0 is not None, HAS_BD=b_down is not None, HAS_BU=b_up is not None,
        S_MODE=_scale_mode(scaling), ACT=ACT_CODES[activation], RP=rp, KP=kp, UPCAST=upcast, CHAIN=FP32_CHAIN)
    return ctx, abuf, pbuf


def split_plan(n: int, d: int, k: int, bn: int, bd: int, device) -> tuple[int, int, int]:
    """(d_blocks, splits, rows_per_split) of the weight-gradient reduction: a grid of d_blocks x splits x k
    programs, about 2 per SM on a GPU. Bound of the partials: splits <= max(1, cdiv(2 SMs, d_blocks k)),
    and one split's slice of the partials holds k (2 r d + d + r) + k d_blocks fp32 numbers, about
    d_blocks k BLOCK_D (2 r + 1) (one tile per program), so the partials take at most about
    max(2 SMs, d_blocks k) programs x BLOCK_D (2 r + 1) x 4 bytes: the grid times one program's tile
    (e.g. 264 x 64 x 129 x 4 B = 8.7 MB on an H100 at r = 64), never a multiple of N."""
    d_blocks = cdiv(d, bd)
    tiles = cdiv(n, bn)
    if interpreting() or getattr(device, "type", "cpu") != "cuda":
        splits = min(tiles, 3)
    else:
        sms = sm_count(device)
        splits = max(1, min(tiles, cdiv(2 * sms, d_blocks * k)))
    rows_per_split = cdiv(cdiv(n, splits), bn) * bn
    return d_blocks, cdiv(n, rows_per_split), rows_per_split


def backward(dctx, x, qk, w_down, b_down, w_up, b_up, scaling, scaling_value, activation, inv_temperature,
             abuf, pbuf, need_ds, need_weights=True, b_qk=None, dqk_like_x=False, score_mask=None, need_dt0=False):
    """See :func:`_backward`; calls with a key seen before replay its launches from C++ (kernels/_replay.py)."""
    rest = (score_mask, bool(need_dt0))
    if not _replay.active(x):
        return _backward(dctx, x, qk, w_down, b_down, w_up, b_up, scaling, scaling_value, activation,
                         inv_temperature, abuf, pbuf, need_ds, need_weights, b_qk, dqk_like_x, *rest)
    key = _replay.key_of(dctx, x, qk, w_down, b_down, w_up, b_up, scaling, scaling_value, activation, inv_temperature,
                         abuf, pbuf, bool(need_ds), bool(need_weights), b_qk, bool(dqk_like_x))
    inputs = [dctx, x, qk, w_down, b_down, w_up, b_up, scaling, abuf, pbuf, b_qk]
    if score_mask is not None:  # (keys and inputs of calls without it as before: the C++ node runs those programs)
        key, inputs = key + _replay.key_of(*rest), inputs + [score_mask]
    return _replay.call(_BACKWARD_PROGRAMS, key, inputs, _backward, dctx, x, qk, w_down, b_down, w_up, b_up, scaling,
                        scaling_value, activation, inv_temperature, abuf, pbuf, need_ds, need_weights, b_qk, dqk_like_x,
                        *rest, single=False)


def _backward(dctx, x, qk, w_down, b_down, w_up, b_up, scaling, scaling_value, activation, inv_temperature,
              abuf, pbuf, need_ds, need_weights=True, b_qk=None, dqk_like_x=False, score_mask=None, need_dt0=False):
    """(dx, dqk, dWd, dbd, dWu, dbu, d_scaling, dt0); the weight gradients are None without ``need_weights``
    (frozen adapters: only d_scaling, if needed, is reduced) and the biases' when they are None; dt0 (N,)
    in x's dtype, the gradient of the forward's t0, with ``need_dt0`` (and ``score_mask``), else None.

    The reduction writes fp32 partial sums, one slice per split of the tokens, and ``sum_splits``
    adds the splits in a fixed order into each gradient's own tensor: no atomics, the same bits on every run. For fp16/bf16 the
    per-token tensors it reads r-wide (h and da, per token and adapter) come in the input dtype from the
    per-token kernel (its tensor-core dots round them to that anyway): half the bytes of the fp32 a and
    da, which it reads once per block of d."""
    n, d = x.shape
    k, r, _ = w_down.shape
    rp = padded_r(r)
    kp = max(2, next_power_of_2(k))
    bn, bd, warps = _blocks(rp)
    stages = 2 if rp >= 128 else 3
    upcast = interpreting() or x.dtype == torch.float32
    need_ds = bool(need_ds and scaling is not None)
    reduce = n > 0 and (need_weights or need_ds)
    low = x.dtype != torch.float32
    dx = _replay.empty(x.shape, x.dtype, x.device)
    # (dqk_like_x: in x's dtype, the caller's rounding of it before its products, done by the kernel's store)
    dqk = _replay.empty(qk.shape, x.dtype if dqk_like_x else qk.dtype, qk.device)
    dummy = x
    s_mode = _scale_mode(scaling)
    s_arg = scaling if scaling is not None else dummy
    bu_arg = b_up if b_up is not None else dummy
    qkb_arg = b_qk if b_qk is not None else dummy
    need_dt0 = bool(need_dt0 and score_mask is not None)
    dt0 = _replay.empty((n,), x.dtype, x.device) if need_dt0 else None
    if n > 0:
        dabuf = _replay.empty(abuf.shape, abuf.dtype, x.device)
        gqbuf = _replay.empty(abuf.shape, torch.float32, x.device)  # scratch: qk @ Wu_j, pass A to pass B
        da = _replay.empty(abuf.shape, x.dtype, x.device) if low else dabuf
        hbuf = _replay.empty(abuf.shape, x.dtype, x.device) if (low and reduce) else abuf
        dscbuf = _replay.empty(pbuf.shape, pbuf.dtype, x.device)
        hw = _replay.empty(abuf.shape, torch.float32 if upcast else x.dtype, x.device)  # scratch: pass C's operand
        args = (x, qk, qkb_arg, score_mask if score_mask is not None else dummy, dt0 if need_dt0 else dummy, dctx,
                w_down, w_up, bu_arg, s_arg, abuf, pbuf, dabuf, gqbuf, da, hbuf, dscbuf, hw, dx, dqk,
                n, d, r, k, float(scaling_value), float(inv_temperature), n_bucket(n))
        flags = dict(HAS_QKB=b_qk is not None, HAS_SM=score_mask is not None, HAS_T0=need_dt0, HAS_BU=b_up is not None,
                     S_MODE=s_mode, ACT=ACT_CODES[activation], WRITE_H=hbuf is not abuf, RP=rp, KP=kp, UPCAST=upcast)
        if autotuning():  # (the kernel only writes what it reads from its inputs: the tuner's reruns are safe)
            _replay.launch(_bwd_rows_tuned, lambda meta: (cdiv(n, meta["BLOCK_N"]),), *args, **flags)
        else:
            _replay.launch(_bwd_rows_kernel, (cdiv(n, bn),), *args, **flags, BLOCK_N=bn, BLOCK_D=bd, num_warps=warps,
                           num_stages=stages)
        del dabuf, gqbuf, hw
    need_bd = need_weights and b_down is not None
    need_bu = need_weights and b_up is not None
    bn, bd, warps, stages = _cols_blocks(rp)
    d_blocks = cdiv(d, bd)
    # one split's slice of the partials: [dWd (k, r, d) | dWu (k, d, r) | dbu (k, d) | dbd (k, r) | ds (k, d_blocks)],
    # each part present only when needed
    sizes = {"wd": k * r * d if need_weights else 0, "wu": k * d * r if need_weights else 0,
             "bu": k * d if need_bu else 0, "bd": k * r if need_bd else 0, "ds": k * d_blocks if need_ds else 0}
    offs, total = {}, 0
    for name, size in sizes.items():
        offs[name] = total
        total += size
    if reduce:
        d_blocks, splits, rows_per_split = split_plan(n, d, k, bn, bd, x.device)
        part = _replay.empty((splits, total), torch.float32, x.device)
        _replay.launch(
            _bwd_cols_kernel, (d_blocks, splits, k),
            x, qk, qkb_arg, dctx, w_up, bu_arg, s_arg, hbuf, da, pbuf, dscbuf, part,
            n, d, r, k, float(scaling_value), rows_per_split, total, offs["wu"], offs["bu"], offs["bd"], offs["ds"],
            d_blocks, HAS_QKB=b_qk is not None, HAS_BU=b_up is not None, S_MODE=s_mode, NEED_W=need_weights, NEED_DS=need_ds,
            NEED_BD=need_bd, H_IS_A=hbuf is abuf, ACT=ACT_CODES[activation], BLOCK_N=bn, BLOCK_D=bd, RP=rp,
            UPCAST=upcast, num_warps=warps, num_stages=stages)
    dt = w_down.dtype
    shapes = {"wd": (k, r, d), "wu": (k, d, r), "bu": (k, d), "bd": (k, r), "ds": (k, d_blocks)}
    # separate tensors, each in its dtype: custom-op outputs must not alias one another
    outs = {name: _replay.empty(shapes[name], torch.float32 if name == "ds" else dt, x.device)
            for name, size in sizes.items() if size}
    if reduce and total:
        sum_splits(part, list(outs.values()))  # the splits in a fixed order, each region into its tensor
    else:  # no tokens: every gradient is zero
        if outs:
            _replay.unrecordable("no tokens: the gradients are zero-filled")
        for t in outs.values():
            t.zero_()
    d_scaling = None
    if need_ds:
        _replay.unrecordable("the scaling's gradient is a torch sum")
        ds = outs["ds"].sum(dim=1)
        d_scaling = (ds if scaling.dim() == 1 else ds.sum()).to(scaling.dtype)
    if not need_weights:
        return dx, dqk, None, None, None, None, d_scaling, dt0
    return (dx, dqk, outs["wd"], outs.get("bd"), outs["wu"], outs.get("bu"), d_scaling, dt0)
