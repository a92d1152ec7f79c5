"""Triton kernels of ``adapter_fusion`` over given adapter outputs values (N, k, d):
``ctx = sum_j softmax_j(<qk, v_j> * inv_temperature) v_j`` (fp32 softmax); with a score mask m (N, k) fp32
and the shared score term t0 (N,) (see stacked_adapter_fusion.py's docstring), the scores are
``m_j (<qk, v_j> + t0)`` and the backward also writes t0's gradient. The stacked form, which computes the
adapter outputs as well, is in stacked_adapter_fusion.py. No atomics: every program owns its tokens'
outputs and gradients.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._host import FP_FUSION, cdiv, next_power_of_2

from .bottleneck_adapter import interpreting
from .stacked_adapter_fusion import _col, _pairwise

# One read of the values in the forward (scores, then the weighted sum from L2); the
# backward reads them again and writes their gradient, which is an output of the op.


@triton.jit
def _attn_fwd_kernel(V, QK, SM, T0, CTX, PBUF, N, D, K, inv_t, HAS_SM: tl.constexpr, HAS_T0: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, KP: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)  # int64 before the product: N may pass 2**31
    rmask = rows < N
    kk = tl.arange(0, KP)
    cols = tl.arange(0, BLOCK_D)
    scores = tl.zeros((BLOCK_N, KP), dtype=tl.float32)
    for j in range(K):
        sc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            c = d0 + cols
            m2 = rmask[:, None] & (c < D)[None, :]
            q = tl.load(QK + rows[:, None] * D + c[None, :], mask=m2, other=0.0).to(tl.float32)
            v = tl.load(V + (rows[:, None] * K + j) * D + c[None, :], mask=m2, other=0.0).to(tl.float32)
            sc += tl.sum(q * v, axis=1)
        if HAS_SM:
            if HAS_T0:
                sc += tl.load(T0 + rows, mask=rmask, other=0.0).to(tl.float32)
            sc = sc * tl.load(SM + rows * K + j, mask=rmask, other=0.0)
        scores = tl.where(kk[None, :] == j, (sc * inv_t)[:, None], scores)
    scores = tl.where(kk[None, :] < K, scores, float("-inf"))
    e = tl.exp(scores - tl.max(scores, axis=1)[:, None])
    p = e / tl.sum(e, axis=1)[:, None]
    tl.store(PBUF + rows[:, None] * K + kk[None, :], p, mask=rmask[:, None] & (kk[None, :] < K))
    for d0 in range(0, D, BLOCK_D):
        c = d0 + cols
        m2 = rmask[:, None] & (c < D)[None, :]
        acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
        for j in range(K):
            v = tl.load(V + (rows[:, None] * K + j) * D + c[None, :], mask=m2, other=0.0).to(tl.float32)
            acc += _col(p, kk, j)[:, None] * v
        tl.store(CTX + rows[:, None] * D + c[None, :], acc.to(CTX.dtype.element_ty), mask=m2)


@triton.jit
def _attn_bwd_kernel(V, QK, SM, DCTX, PBUF, DV, DQK, DT0, N, D, K, inv_t, HAS_SM: tl.constexpr, HAS_T0: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, KP: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)  # int64 before the product: N may pass 2**31
    rmask = rows < N
    kk = tl.arange(0, KP)
    cols = tl.arange(0, BLOCK_D)
    p = tl.load(PBUF + rows[:, None] * K + kk[None, :], mask=rmask[:, None] & (kk[None, :] < K), other=0.0)
    dp = tl.zeros((BLOCK_N, KP), dtype=tl.float32)
    for j in range(K):
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            c = d0 + cols
            m2 = rmask[:, None] & (c < D)[None, :]
            g = tl.load(DCTX + rows[:, None] * D + c[None, :], mask=m2, other=0.0).to(tl.float32)
            v = tl.load(V + (rows[:, None] * K + j) * D + c[None, :], mask=m2, other=0.0).to(tl.float32)
            acc += tl.sum(g * v, axis=1)
        dp = tl.where(kk[None, :] == j, acc[:, None], dp)
    dsc = p * (dp - tl.sum(p * dp, axis=1)[:, None]) * inv_t
    if HAS_SM:  # (as the stacked rows backward: the masked score gradient, t0's without cancellation)
        m = tl.load(SM + rows[:, None] * K + kk[None, :], mask=rmask[:, None] & (kk[None, :] < K), other=0.0)
        if HAS_T0:
            tl.store(DT0 + rows, (0.5 * inv_t * _pairwise(p, m, dp, kk, K)).to(DT0.dtype.element_ty), mask=rmask)
        dsc = dsc * m
    for d0 in range(0, D, BLOCK_D):
        c = d0 + cols
        m2 = rmask[:, None] & (c < D)[None, :]
        offs = rows[:, None] * D + c[None, :]
        g = tl.load(DCTX + offs, mask=m2, other=0.0).to(tl.float32)
        q = tl.load(QK + offs, mask=m2, other=0.0).to(tl.float32)
        dq = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
        for j in range(K):
            voffs = (rows[:, None] * K + j) * D + c[None, :]
            v = tl.load(V + voffs, mask=m2, other=0.0).to(tl.float32)
            dsj = _col(dsc, kk, j)[:, None]
            dq += dsj * v
            tl.store(DV + voffs, (_col(p, kk, j)[:, None] * g + dsj * q).to(DV.dtype.element_ty), mask=m2)
        tl.store(DQK + offs, dq.to(DQK.dtype.element_ty), mask=m2)


def _attn_blocks(d: int):
    if interpreting():
        return 16, 32, 4
    return 32, min(128, max(16, next_power_of_2(d))), 4


def attention_forward(values, qk, inv_temperature, score_mask=None, t0=None):
    """values (N, k, d), qk (N, d), contiguous; score_mask (N, k) fp32 contiguous or None, and with it t0 (N,)
    or None: (ctx (N, d), p (N, k) fp32)."""
    n, k, d = values.shape
    ctx = torch.empty_like(qk)
    p = torch.empty((n, k), device=qk.device, dtype=torch.float32)
    if n:
        bn, bd, w = _attn_blocks(d)
        _attn_fwd_kernel[(cdiv(n, bn),)](values, qk, score_mask if score_mask is not None else qk,
                                         t0 if t0 is not None else qk, ctx, p, n, d, k, float(inv_temperature),
                                         HAS_SM=score_mask is not None, HAS_T0=t0 is not None, BLOCK_N=bn,
                                         BLOCK_D=bd, KP=max(2, next_power_of_2(k)), num_warps=w, **FP_FUSION)
    return ctx, p


def attention_backward(dctx, values, qk, p, inv_temperature, score_mask=None, need_dt0=False):
    """(d_values (N, k, d), d_qk (N, d), d_t0 (N,) in qk's dtype with ``need_dt0`` and a mask, else None)."""
    n, k, d = values.shape
    dv = torch.empty_like(values)
    dqk = torch.empty_like(qk)
    need_dt0 = bool(need_dt0 and score_mask is not None)
    dt0 = torch.empty((n,), device=qk.device, dtype=qk.dtype) if need_dt0 else None
    if n:
        bn, bd, w = _attn_blocks(d)
        _attn_bwd_kernel[(cdiv(n, bn),)](values, qk, score_mask if score_mask is not None else qk, dctx, p, dv, dqk,
                                         dt0 if need_dt0 else qk, n, d, k, float(inv_temperature),
                                         HAS_SM=score_mask is not None, HAS_T0=need_dt0, BLOCK_N=bn, BLOCK_D=bd,
                                         KP=max(2, next_power_of_2(k)), num_warps=w, **FP_FUSION)
    return dv, dqk, dt0
