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
hidden held in registers); the softmax; then per block of d ``ctx = [p_j s_j act(a_j)]_j @ [Wu_j]_j``
plus the biases. The k adapter outputs v_j (k x d per token) never reach global memory. The forward
writes and saves ``a`` (N, k, RP) fp32 and ``p`` (N, k) fp32: r-wide and k-wide per adapter, where
eager PyTorch keeps the (N, k, d) adapter outputs and their projections.

Backward, two launches: a per-token-tile kernel (``dp_j = <dctx, v_j>`` from ``dctx @ Wu_j``; the
softmax backward; ``da_j``; ``dqk = sum_j dscore_j v_j``; ``dx = sum_j da_j @ Wd_j``), writing the
r-wide ``da`` and k-wide ``dscore``; then a grid over (adapter, block of d, split of tokens) that
reduces ``dWd``, ``dbd``, ``dWu``, ``dbu`` and ``d_scaling`` into fp32 buffers with fp32 atomics.
Nothing k x d per token is written in either direction. For fp16/bf16 inputs ``qk`` and ``dctx`` come
in fp32 (rounded to the input dtype they cost the gradients precision: see pet_fast/ops/adapter_fusion.py);
the kernels load them as fp32 and ``dqk`` is written in qk's dtype. The forward's score matmul takes the
hidden h as two halves in the input dtype (h ~ hi + lo), so the scores keep fp32 precision on the tensor
cores: the softmax and d_scaling are sensitive to them. The forward's tile shape is autotuned on a
GPU (one configuration under the interpreter); the backward uses fixed tiles.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .bottleneck_adapter import (ACT_CODES, act_fwd, act_fwd_bwd, interpreting, mm, n_bucket, padded_r,
                                 prune_row_configs, row_configs)


@triton.jit
def _col(t, kk, j):
    """Column j of a (BLOCK_N, KP) tile as a (BLOCK_N,) vector."""
    return tl.sum(tl.where(kk[None, :] == j, t, 0.0), axis=1)


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
def _fwd_kernel(X, QK, WD, BD, WU, BU, S, CTX, ABUF, PBUF, N, D, R, K, s_value, inv_t, n_bucket,
                HAS_BD: tl.constexpr, HAS_BU: tl.constexpr, S_MODE: tl.constexpr, ACT: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, RP: tl.constexpr, KP: tl.constexpr,
                UPCAST: tl.constexpr):
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
        for d0 in range(0, D, BLOCK_D):
            c = d0 + cols
            cm = c < D
            xt = tl.load(X + rows[:, None] * D + c[None, :], mask=rmask[:, None] & cm[None, :], other=0.0)
            wt = tl.load(wd_j + rr[:, None] * D + c[None, :], mask=rrmask[:, None] & cm[None, :], other=0.0)
            a += mm(xt, tl.trans(wt), UPCAST)
        if HAS_BD:
            a += tl.load(BD + j * R + rr, mask=rrmask, other=0.0).to(tl.float32)[None, :]
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
            sc += tl.sum(q * u, axis=1)
        sc = sc * _scale(S, s_value, j, S_MODE) * inv_t
        scores = tl.where(kk[None, :] == j, sc[:, None], scores)
    scores = tl.where(kk[None, :] < K, scores, float("-inf"))
    mx = tl.max(scores, axis=1)
    e = tl.exp(scores - mx[:, None])
    p = e / tl.sum(e, axis=1)[:, None]
    tl.store(PBUF + rows[:, None] * K + kk[None, :], p, mask=rmask[:, None] & (kk[None, :] < K))
    for d0 in range(0, D, BLOCK_D):
        c = d0 + cols
        cm = c < D
        acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
        for j in range(K):
            w = _col(p, kk, j) * _scale(S, s_value, j, S_MODE)
            a = tl.load(ABUF + (rows[:, None] * K + j) * RP + rr[None, :], mask=rmask[:, None], other=0.0)
            hw = act_fwd(a, ACT) * w[:, None]
            if not UPCAST:
                hw = hw.to(CTX.dtype.element_ty)
            wu = tl.load(WU + j * D * R + c[:, None] * R + rr[None, :], mask=cm[:, None] & rrmask[None, :], other=0.0)
            acc += mm(hw, tl.trans(wu), UPCAST)
            if HAS_BU:
                acc += w[:, None] * tl.load(BU + j * D + c, mask=cm, other=0.0).to(tl.float32)[None, :]
        tl.store(CTX + rows[:, None] * D + c[None, :], acc.to(CTX.dtype.element_ty), mask=rmask[:, None] & cm[None, :])


@triton.jit
def _bwd_rows_kernel(X, QK, DCTX, WD, WU, BU, S, ABUF, PBUF, DABUF, DSCBUF, DX, DQK, N, D, R, K, s_value, inv_t,
                     HAS_BU: tl.constexpr, S_MODE: tl.constexpr, ACT: tl.constexpr,
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
    # pass A: dp_j = <dctx, v_j> = s_j (<dctx @ Wu_j, h_j> + <dctx, bu_j>); da_j starts as s_j p_j (dctx @ Wu_j)
    dp = tl.zeros((BLOCK_N, KP), dtype=tl.float32)
    for j in range(K):
        g = tl.zeros((BLOCK_N, RP), dtype=tl.float32)
        gb = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            c = d0 + cols
            cm = c < D
            dct = tl.load(DCTX + rows[:, None] * D + c[None, :], mask=rmask[:, None] & cm[None, :], other=0.0)
            wu = tl.load(WU + j * D * R + c[:, None] * R + rr[None, :], mask=cm[:, None] & rrmask[None, :], other=0.0)
            if UPCAST:
                g += mm(dct, wu, UPCAST)
            else:
                g += mm(dct.to(wu.dtype), wu, UPCAST)  # dctx may come in fp32: tensor-core operands
            if HAS_BU:
                gb += tl.sum(dct.to(tl.float32) * tl.load(BU + j * D + c, mask=cm, other=0.0).to(tl.float32)[None, :], axis=1)
        s = _scale(S, s_value, j, S_MODE)
        aoffs = (rows[:, None] * K + j) * RP + rr[None, :]
        a = tl.load(ABUF + aoffs, mask=rmask[:, None], other=0.0)
        h = act_fwd(a, ACT)
        dpj = s * (tl.sum(g * h, axis=1) + gb)
        dp = tl.where(kk[None, :] == j, dpj[:, None], dp)
        tl.store(DABUF + aoffs, g * (s * _col(p, kk, j))[:, None], mask=rmask[:, None])
    dsc = p * (dp - tl.sum(p * dp, axis=1)[:, None]) * inv_t
    tl.store(DSCBUF + rows[:, None] * K + kk[None, :], dsc, mask=rmask[:, None] & kmask[None, :])
    # pass B: da_j = (s_j p_j dctx @ Wu_j + s_j dscore_j qk @ Wu_j) * act'(a_j)
    for j in range(K):
        gq = tl.zeros((BLOCK_N, RP), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            c = d0 + cols
            cm = c < D
            qt = tl.load(QK + rows[:, None] * D + c[None, :], mask=rmask[:, None] & cm[None, :], other=0.0)
            wu = tl.load(WU + j * D * R + c[:, None] * R + rr[None, :], mask=cm[:, None] & rrmask[None, :], other=0.0)
            if UPCAST:
                gq += mm(qt, wu, UPCAST)
            else:
                gq += mm(qt.to(wu.dtype), wu, UPCAST)  # qk comes in fp32 for fp16/bf16: tensor-core operands
        s = _scale(S, s_value, j, S_MODE)
        aoffs = (rows[:, None] * K + j) * RP + rr[None, :]
        a = tl.load(ABUF + aoffs, mask=rmask[:, None], other=0.0)
        h, gp = act_fwd_bwd(a, ACT)
        da = tl.load(DABUF + aoffs, mask=rmask[:, None], other=0.0)
        da = (da + gq * (s * _col(dsc, kk, j))[:, None]) * gp
        tl.store(DABUF + aoffs, da, mask=rmask[:, None])
    # pass C, per block of d: dqk = sum_j dscore_j v_j and dx = sum_j da_j @ Wd_j
    for d0 in range(0, D, BLOCK_D):
        c = d0 + cols
        cm = c < D
        acc_q = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
        acc_x = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
        for j in range(K):
            w = _col(dsc, kk, j) * _scale(S, s_value, j, S_MODE)
            aoffs = (rows[:, None] * K + j) * RP + rr[None, :]
            a = tl.load(ABUF + aoffs, mask=rmask[:, None], other=0.0)
            hw = act_fwd(a, ACT) * w[:, None]
            da = tl.load(DABUF + aoffs, mask=rmask[:, None], other=0.0)
            wu = tl.load(WU + j * D * R + c[:, None] * R + rr[None, :], mask=cm[:, None] & rrmask[None, :], other=0.0)
            wd = tl.load(WD + j * R * D + rr[:, None] * D + c[None, :], mask=rrmask[:, None] & cm[None, :], other=0.0)
            if not UPCAST:
                hw = hw.to(wu.dtype)
                da = da.to(wd.dtype)
            acc_q += mm(hw, tl.trans(wu), UPCAST)
            acc_x += mm(da, wd, UPCAST)
            if HAS_BU:
                acc_q += w[:, None] * tl.load(BU + j * D + c, mask=cm, other=0.0).to(tl.float32)[None, :]
        offs = rows[:, None] * D + c[None, :]
        m2 = rmask[:, None] & cm[None, :]
        tl.store(DQK + offs, acc_q.to(DQK.dtype.element_ty), mask=m2)
        tl.store(DX + offs, acc_x.to(DX.dtype.element_ty), mask=m2)


@triton.jit
def _bwd_cols_kernel(X, QK, DCTX, WU, BU, S, ABUF, PBUF, DABUF, DSCBUF, DWD, DWU, DBU, DBD, DS,
                     N, D, R, K, s_value, rows_per_split,
                     HAS_BU: tl.constexpr, S_MODE: tl.constexpr, NEED_DS: tl.constexpr, NEED_BD: tl.constexpr,
                     ACT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, RP: tl.constexpr,
                     UPCAST: tl.constexpr):
    pid_d = tl.program_id(0)
    pid_s = tl.program_id(1)
    j = tl.program_id(2)
    c = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    cm = c < D
    rr = tl.arange(0, RP)
    rrmask = rr < R
    s = _scale(S, s_value, j, S_MODE)
    if NEED_DS:
        wu = tl.load(WU + j * D * R + c[:, None] * R + rr[None, :], mask=cm[:, None] & rrmask[None, :], other=0.0)
        if HAS_BU:
            bu = tl.load(BU + j * D + c, mask=cm, other=0.0).to(tl.float32)
    acc_wd = tl.zeros((RP, BLOCK_D), dtype=tl.float32)
    acc_wu = tl.zeros((BLOCK_D, RP), dtype=tl.float32)
    acc_bu = tl.zeros((BLOCK_D,), dtype=tl.float32)
    acc_bd = tl.zeros((RP,), dtype=tl.float32)
    acc_s = tl.zeros((BLOCK_N,), dtype=tl.float32)
    start = pid_s.to(tl.int64) * rows_per_split
    stop = tl.minimum(start + rows_per_split, N)
    for n0 in range(start, stop, BLOCK_N):
        rows = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        rmask = rows < stop
        m2 = rmask[:, None] & cm[None, :]
        offs = rows[:, None] * D + c[None, :]
        xt = tl.load(X + offs, mask=m2, other=0.0)
        dct = tl.load(DCTX + offs, mask=m2, other=0.0).to(tl.float32)
        qt = tl.load(QK + offs, mask=m2, other=0.0).to(tl.float32)
        pj = tl.load(PBUF + rows * K + j, mask=rmask, other=0.0)
        dscj = tl.load(DSCBUF + rows * K + j, mask=rmask, other=0.0)
        dv = pj[:, None] * dct + dscj[:, None] * qt  # gradient of v_j
        du = dv * s
        aoffs = (rows[:, None] * K + j) * RP + rr[None, :]
        h = act_fwd(tl.load(ABUF + aoffs, mask=rmask[:, None], other=0.0), ACT)
        da = tl.load(DABUF + aoffs, mask=rmask[:, None], other=0.0)
        if UPCAST:
            acc_wd += mm(tl.trans(da), xt, UPCAST)
            acc_wu += mm(tl.trans(du), h, UPCAST)
        else:
            acc_wd += mm(tl.trans(da.to(xt.dtype)), xt, UPCAST)
            acc_wu += mm(tl.trans(du.to(xt.dtype)), h.to(xt.dtype), UPCAST)
        acc_bu += tl.sum(du, axis=0)
        if NEED_BD:
            acc_bd += tl.sum(da, axis=0)
        if NEED_DS:
            if UPCAST:
                u = mm(h, tl.trans(wu), UPCAST)
            else:
                u = mm(h.to(wu.dtype), tl.trans(wu), UPCAST)
            if HAS_BU:
                u += bu[None, :]
            acc_s += tl.sum(dv * u, axis=1)
    tl.atomic_add(DWD + j * R * D + rr[:, None] * D + c[None, :], acc_wd, mask=rrmask[:, None] & cm[None, :])
    tl.atomic_add(DWU + j * D * R + c[:, None] * R + rr[None, :], acc_wu, mask=cm[:, None] & rrmask[None, :])
    tl.atomic_add(DBU + j * D + c, acc_bu, mask=cm)
    if NEED_BD:
        if pid_d == 0:
            tl.atomic_add(DBD + j * R + rr, acc_bd, mask=rrmask)
    if NEED_DS:
        tl.atomic_add(DS + j, tl.sum(acc_s, axis=0))


_fwd_tuned = triton.autotune(row_configs(), key=["D", "RP", "K", "n_bucket", "UPCAST"],
                             prune_configs_by={"early_config_prune": prune_row_configs})(_fwd_kernel)


def _blocks(rp: int) -> tuple[int, int, int]:
    if interpreting():
        return 16, 32, 4
    if rp <= 64:
        return 32, 64, 4
    return 16, 64, 4


def _scale_mode(scaling):
    if scaling is None:
        return 0
    return 2 if scaling.dim() == 1 else 1


def forward(x, qk, w_down, b_down, w_up, b_up, scaling, scaling_value, activation, inv_temperature):
    """x, qk (N, d) contiguous; stacked weights (k, r, d), (k, r), (k, d, r), (k, d); scaling a tensor
    (() or (k,)) or None. Returns (ctx (N, d), a (N, k, RP) fp32, p (N, k) fp32)."""
    n, d = x.shape
    k, r, _ = w_down.shape
    rp = padded_r(r)
    kp = max(2, triton.next_power_of_2(k))
    ctx = torch.empty_like(x)
    abuf = torch.empty((n, k, rp), device=x.device, dtype=torch.float32)
    pbuf = torch.empty((n, k), device=x.device, dtype=torch.float32)
    if n == 0:
        return ctx, abuf, pbuf
    dummy = x
    _fwd_tuned[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)](
        x, qk, w_down, b_down if b_down is not None else dummy, w_up, b_up if b_up is not None else dummy,
        scaling if scaling is not None else dummy, ctx, abuf, pbuf, n, d, r, k, float(scaling_value),
        float(inv_temperature), n_bucket(n), HAS_BD=b_down is not None, HAS_BU=b_up is not None,
        S_MODE=_scale_mode(scaling), ACT=ACT_CODES[activation], RP=rp, KP=kp,
        UPCAST=interpreting() or x.dtype == torch.float32)
    return ctx, abuf, pbuf


def backward(dctx, x, qk, w_down, b_down, w_up, b_up, scaling, scaling_value, activation, inv_temperature,
             abuf, pbuf, need_ds, need_weights=True):
    """(dx, dqk, dWd, dbd, dWu, dbu, d_scaling); the weight gradients are None without ``need_weights``
    (frozen adapters: the reduction kernel is skipped) and the biases' when they are None."""
    n, d = x.shape
    k, r, _ = w_down.shape
    rp = padded_r(r)
    kp = max(2, triton.next_power_of_2(k))
    bn, bd, warps = _blocks(rp)
    stages = 2 if rp >= 128 else 3
    upcast = interpreting() or x.dtype == torch.float32
    need_ds = bool(need_ds and scaling is not None)
    sizes = [k * r * d, k * d * r, k * d, k * r, k]
    if w_down.dtype == torch.float32:
        dwd, dwu, dbu, dbd, ds = (torch.zeros(n_, device=x.device, dtype=torch.float32) for n_ in sizes)
    else:
        dwd, dwu, dbu, dbd, ds = torch.split(torch.zeros(sum(sizes), device=x.device, dtype=torch.float32), sizes)
    dx = torch.empty_like(x)
    dqk = torch.empty_like(qk)
    if n > 0:
        dummy = x
        s_mode = _scale_mode(scaling)
        s_arg = scaling if scaling is not None else dummy
        bu_arg = b_up if b_up is not None else dummy
        dabuf = torch.empty_like(abuf)
        dscbuf = torch.empty_like(pbuf)
        _bwd_rows_kernel[(triton.cdiv(n, bn),)](
            x, qk, dctx, w_down, w_up, bu_arg, s_arg, abuf, pbuf, dabuf, dscbuf, dx, dqk, n, d, r, k,
            float(scaling_value), float(inv_temperature), HAS_BU=b_up is not None, S_MODE=s_mode,
            ACT=ACT_CODES[activation], BLOCK_N=bn, BLOCK_D=bd, RP=rp, KP=kp, UPCAST=upcast, num_warps=warps,
            num_stages=stages)
    if n > 0 and (need_weights or need_ds):
        d_blocks = triton.cdiv(d, bd)
        tiles = triton.cdiv(n, bn)
        if interpreting() or x.device.type != "cuda":
            splits = min(tiles, 2)
        else:
            sms = torch.cuda.get_device_properties(x.device).multi_processor_count
            splits = max(1, min(tiles, triton.cdiv(2 * sms, d_blocks * k)))
        rows_per_split = triton.cdiv(triton.cdiv(n, splits), bn) * bn
        splits = triton.cdiv(n, rows_per_split)
        _bwd_cols_kernel[(d_blocks, splits, k)](
            x, qk, dctx, w_up, bu_arg, s_arg, abuf, pbuf, dabuf, dscbuf, dwd, dwu, dbu, dbd, ds,
            n, d, r, k, float(scaling_value), rows_per_split, HAS_BU=b_up is not None, S_MODE=s_mode,
            NEED_DS=need_ds, NEED_BD=b_down is not None, ACT=ACT_CODES[activation], BLOCK_N=bn, BLOCK_D=bd,
            RP=rp, UPCAST=upcast, num_warps=warps, num_stages=stages)
    dt = w_down.dtype
    d_scaling = None
    if need_ds:
        d_scaling = (ds if scaling.dim() == 1 else ds.sum()).to(scaling.dtype)
    if not need_weights:
        return dx, dqk, None, None, None, None, d_scaling
    return (dx, dqk, dwd.view(k, r, d).to(dt), dbd.view(k, r).to(dt) if b_down is not None else None,
            dwu.view(k, d, r).to(dt), dbu.view(k, d).to(dt) if b_up is not None else None, d_scaling)
