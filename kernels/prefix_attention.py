"""Triton kernels for attention over ``[prefix; keys]`` without building the concatenation.

Forward: one program per (query block, query head, batch). It runs an online softmax (fp32, base 2)
first over the P prefix keys/values, read from their own tensors (batch stride 0 when the prefix is
shared by the batch), then over the sequence keys, with the key padding read per key from an int8
vector and the bottom-right causal bound used to stop the key loop early. Query head ``h`` reads
key/value head ``h // group``. It returns the output and the natural log-sum-exp per row (fp32,
``+inf`` for a row that sees no key, whose output is zeros).

Backward (flash-attention-2 scheme): ``delta = rowsum(dO * O)`` in fp32, one kernel for the key and
value gradients per (key block, kv head, batch) that loops over the query heads of the group and the
query blocks (no atomics: each program owns its key rows); its first programs take the prefix key
blocks (fp32 partials per batch, summed with torch when the prefix is shared), the others the sequence
key blocks, in one launch. One more kernel computes ``dq`` per query block. Accumulation is fp32 everywhere.

Contiguity is the wrappers' job (they make inputs contiguous); the head dimension is padded to a power
of two with masks, so any D <= 256 runs. No autograd here: see ``pet_fast/ops/prefix_attention.py``.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from . import _replay
from ._host import cdiv, next_power_of_2

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
MAX_HEAD_DIM = 256


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _query_tile(h, b, Hq, G, L, S, D, spk_b, spk_h,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Index set-up of a program that owns BLOCK_M query rows of head h in batch b (forward and dq):
    row/column/key-tile ranges, their masks, the head's base offsets of q, k/v and the prefix, the query
    tile's offsets and the offsets inside one key tile.

    One head alone may hold 2**31 elements (L * D or S * D): rows are int64 before they meet D; key blocks
    start at an int64 scalar (added by the caller) and only the offsets inside a tile (< BLOCK_N * BLOCK_D)
    stay int32."""
    hk = h // G
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n0 = tl.arange(0, BLOCK_N)
    q_base = (b.to(tl.int64) * Hq + h) * L * D
    kv_base = (b.to(tl.int64) * (Hq // G) + hk) * S * D
    p_base = b.to(tl.int64) * spk_b + hk.to(tl.int64) * spk_h
    q_off = q_base + offs_m.to(tl.int64)[:, None] * D + offs_d[None, :]
    kv_tile = offs_n0[:, None] * D + offs_d[None, :]
    return offs_m, offs_d, offs_n0, offs_m < L, offs_d < D, q_base, kv_base, p_base, q_off, kv_tile


@triton.jit
def _load_kv(K, V, off, mask, UPCAST: tl.constexpr):
    """One block of keys and values (zeros where ``mask`` is off), upcast to fp32 under UPCAST."""
    kt = tl.load(K + off, mask=mask, other=0.0)
    vt = tl.load(V + off, mask=mask, other=0.0)
    if UPCAST:
        kt = kt.to(tl.float32)
        vt = vt.to(tl.float32)
    return kt, vt


@triton.jit
def _online_softmax_step(q, kt, vt, ok, m_i, l_i, acc, qk_scale2, V, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """One key block of the online softmax (base 2): the scores of q against kt where ``ok``, folded into
    the running row max ``m_i``, sum ``l_i`` and weighted values ``acc`` (probabilities rounded to V's
    dtype for the product, as flash attention does). Rows with no key yet stay (-inf, 0, 0)."""
    s = _dot(q, tl.trans(kt), IEEE) * qk_scale2
    s = tl.where(ok, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    pc = p.to(V.dtype.element_ty)
    if UPCAST:
        pc = pc.to(tl.float32)
    acc = acc * alpha[:, None] + _dot(pc, vt, IEEE)
    return m_new, l_i, acc


@triton.jit
def _fwd_kernel(
    Q, K, V, PK, PV, KPM, O, LSE,
    qk_scale2,  # scale * log2(e)
    Hq, G, L, S, P, D,
    spk_b, spk_h,  # prefix strides (batch stride 0 when shared); rows are D apart
    HAS_KPM: tl.constexpr, CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    offs_m, offs_d, offs_n0, m_ok, d_ok, q_base, kv_base, p_base, q_off, kv_tile = _query_tile(
        h, b, Hq, G, L, S, D, spk_b, spk_h, BLOCK_M, BLOCK_N, BLOCK_D)

    q = tl.load(Q + q_off, mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    # Prefix keys: never masked.
    for start in range(0, P, BLOCK_N):
        offs_n = start + offs_n0
        n_ok = offs_n < P
        kt, vt = _load_kv(PK, PV, p_base + tl.cast(start, tl.int64) * D + kv_tile, n_ok[:, None] & d_ok[None, :],
                          UPCAST)
        m_i, l_i, acc = _online_softmax_step(q, kt, vt, n_ok[None, :], m_i, l_i, acc, qk_scale2, PV, UPCAST, IEEE)

    # Sequence keys: padding and bottom-right causal masks; blocks past the causal bound are skipped.
    end = S
    if CAUSAL:
        end = tl.minimum(S, tl.maximum((pid_m + 1) * BLOCK_M + S - L, 0))
    for start in range(0, end, BLOCK_N):
        offs_n = start + offs_n0
        n_ok = offs_n < S
        if HAS_KPM:
            n_ok = n_ok & (tl.load(KPM + b.to(tl.int64) * S + offs_n, mask=n_ok, other=0) != 0)
        kt, vt = _load_kv(K, V, kv_base + tl.cast(start, tl.int64) * D + kv_tile, n_ok[:, None] & d_ok[None, :],
                          UPCAST)
        ok = n_ok[None, :]
        if CAUSAL:
            ok = ok & (offs_n[None, :] <= offs_m[:, None] + (S - L))
        m_i, l_i, acc = _online_softmax_step(q, kt, vt, ok, m_i, l_i, acc, qk_scale2, V, UPCAST, IEEE)

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)
    tl.store(O + q_off, out.to(O.dtype.element_ty),
             mask=m_ok[:, None] & d_ok[None, :])
    tl.store(LSE + (b.to(tl.int64) * Hq + h) * L + offs_m, lse, mask=m_ok)


@triton.jit
def _dkdv_block(
    Q, K, V, DO, LSE, DELTA, KPM, DK, DV,
    qk_scale2, scale,
    Hq, G, L, N, S_SEQ, D,
    sk_b, sk_h,  # key/value strides of these keys (batch stride 0 for a shared prefix)
    sdk_b, sdk_h,  # strides of the gradient buffers
    pid_n, hk, b,
    IS_PREFIX: tl.constexpr, HAS_KPM: tl.constexpr, CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    """dk, dv of one block of BLOCK_N keys (prefix or sequence), over every query that sees them."""
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_m0 = tl.arange(0, BLOCK_M)
    d_ok = offs_d < D
    n_ok = offs_n < N
    if not IS_PREFIX:
        if HAS_KPM:
            n_ok = n_ok & (tl.load(KPM + b.to(tl.int64) * S_SEQ + offs_n, mask=n_ok, other=0) != 0)

    k_base = b.to(tl.int64) * sk_b + hk.to(tl.int64) * sk_h
    rows64 = offs_n.to(tl.int64)[:, None] * D  # N * D may pass 2**31 (see _fwd_kernel)
    kv_off = k_base + rows64 + offs_d[None, :]
    kv_mask = (offs_n < N)[:, None] & d_ok[None, :]
    kt = tl.load(K + kv_off, mask=kv_mask, other=0.0)
    vt = tl.load(V + kv_off, mask=kv_mask, other=0.0)
    if UPCAST:
        kt = kt.to(tl.float32)
        vt = vt.to(tl.float32)

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)

    # Queries that can see this key block: all of them for prefix keys; for causal sequence keys,
    # query i sees key j when i >= j - (S - L).
    m_begin = 0
    if not IS_PREFIX:
        if CAUSAL:
            m_begin = tl.maximum(pid_n * BLOCK_N - (S_SEQ - L), 0)
            m_begin = (m_begin // BLOCK_M) * BLOCK_M
    qd_tile = offs_m0[:, None] * D + offs_d[None, :]
    for g in range(0, G):
        h = hk * G + g
        q_base = (b.to(tl.int64) * Hq + h) * L * D
        r_base = (b.to(tl.int64) * Hq + h) * L
        for start in range(m_begin, L, BLOCK_M):
            offs_m = start + offs_m0
            m_ok = offs_m < L
            qd_off = q_base + tl.cast(start, tl.int64) * D + qd_tile
            qd_mask = m_ok[:, None] & d_ok[None, :]
            q = tl.load(Q + qd_off, mask=qd_mask, other=0.0)
            do = tl.load(DO + qd_off, mask=qd_mask, other=0.0)
            if UPCAST:
                q = q.to(tl.float32)
                do = do.to(tl.float32)
            lse2 = tl.load(LSE + r_base + offs_m, mask=m_ok, other=float("inf")) * 1.4426950408889634
            delta = tl.load(DELTA + r_base + offs_m, mask=m_ok, other=0.0)
            s = _dot(kt, tl.trans(q), IEEE) * qk_scale2  # (BLOCK_N, BLOCK_M)
            ok = n_ok[:, None] & m_ok[None, :]
            if not IS_PREFIX:
                if CAUSAL:
                    ok = ok & (offs_n[:, None] <= offs_m[None, :] + (S_SEQ - L))
            p = tl.where(ok, tl.exp2(s - lse2[None, :]), 0.0)
            pc = p.to(DO.dtype.element_ty)
            if UPCAST:
                pc = pc.to(tl.float32)
            dv += _dot(pc, do, IEEE)
            dp = _dot(vt, tl.trans(do), IEEE)
            ds = p * (dp - delta[None, :])
            dsc = ds.to(Q.dtype.element_ty)
            if UPCAST:
                dsc = dsc.to(tl.float32)
            dk += _dot(dsc, q, IEEE)

    dk = dk * scale
    g_off = b.to(tl.int64) * sdk_b + hk.to(tl.int64) * sdk_h + rows64 + offs_d[None, :]
    tl.store(DK + g_off, dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + g_off, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, PK, PV, DO, LSE, DELTA, KPM, DK, DV, DPK, DPV,
    qk_scale2, scale,
    Hq, G, L, S, P, D,
    sk_b, sk_h, spk_b, spk_h, sdp_b, sdp_h,
    NB_P,  # the first NB_P programs take the prefix key blocks (the longest: every query sees them)
    HAS_KPM: tl.constexpr, CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    pid = tl.program_id(0)
    hk = tl.program_id(1)
    b = tl.program_id(2)
    if pid < NB_P:
        _dkdv_block(Q, PK, PV, DO, LSE, DELTA, KPM, DPK, DPV, qk_scale2, scale, Hq, G, L, P, S, D,
                    spk_b, spk_h, sdp_b, sdp_h, pid, hk, b,
                    True, False, False, BLOCK_M, BLOCK_N, BLOCK_D, UPCAST, IEEE)
    else:
        _dkdv_block(Q, K, V, DO, LSE, DELTA, KPM, DK, DV, qk_scale2, scale, Hq, G, L, S, S, D,
                    sk_b, sk_h, sk_b, sk_h, pid - NB_P, hk, b,
                    False, HAS_KPM, CAUSAL, BLOCK_M, BLOCK_N, BLOCK_D, UPCAST, IEEE)


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, PK, PV, KPM, DO, LSE, DELTA, DQ,
    qk_scale2, scale,
    Hq, G, L, S, P, D,
    spk_b, spk_h,
    HAS_KPM: tl.constexpr, CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    offs_m, offs_d, offs_n0, m_ok, d_ok, q_base, kv_base, p_base, qd_off, kv_tile = _query_tile(
        h, b, Hq, G, L, S, D, spk_b, spk_h, BLOCK_M, BLOCK_N, BLOCK_D)
    r_base = (b.to(tl.int64) * Hq + h) * L
    qd_mask = m_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + qd_off, mask=qd_mask, other=0.0)
    do = tl.load(DO + qd_off, mask=qd_mask, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse2 = tl.load(LSE + r_base + offs_m, mask=m_ok, other=float("inf")) * 1.4426950408889634
    delta = tl.load(DELTA + r_base + offs_m, mask=m_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    for start in range(0, P, BLOCK_N):
        offs_n = start + offs_n0
        n_ok = offs_n < P
        kv_off = p_base + tl.cast(start, tl.int64) * D + kv_tile
        kv_mask = n_ok[:, None] & d_ok[None, :]
        kt = tl.load(PK + kv_off, mask=kv_mask, other=0.0)
        vt = tl.load(PV + kv_off, mask=kv_mask, other=0.0)
        if UPCAST:
            kt = kt.to(tl.float32)
            vt = vt.to(tl.float32)
        s = _dot(q, tl.trans(kt), IEEE) * qk_scale2
        ok = n_ok[None, :] & m_ok[:, None]
        p = tl.where(ok, tl.exp2(s - lse2[:, None]), 0.0)
        dp = _dot(do, tl.trans(vt), IEEE)
        ds = p * (dp - delta[:, None])
        dsc = ds.to(PK.dtype.element_ty)
        if UPCAST:
            dsc = dsc.to(tl.float32)
        dq += _dot(dsc, kt, IEEE)

    end = S
    if CAUSAL:
        end = tl.minimum(S, tl.maximum((pid_m + 1) * BLOCK_M + S - L, 0))
    for start in range(0, end, BLOCK_N):
        offs_n = start + offs_n0
        n_ok = offs_n < S
        if HAS_KPM:
            n_ok = n_ok & (tl.load(KPM + b.to(tl.int64) * S + offs_n, mask=n_ok, other=0) != 0)
        kv_off = kv_base + tl.cast(start, tl.int64) * D + kv_tile
        kv_mask = n_ok[:, None] & d_ok[None, :]
        kt = tl.load(K + kv_off, mask=kv_mask, other=0.0)
        vt = tl.load(V + kv_off, mask=kv_mask, other=0.0)
        if UPCAST:
            kt = kt.to(tl.float32)
            vt = vt.to(tl.float32)
        s = _dot(q, tl.trans(kt), IEEE) * qk_scale2
        ok = n_ok[None, :] & m_ok[:, None]
        if CAUSAL:
            ok = ok & (offs_n[None, :] <= offs_m[:, None] + (S - L))
        p = tl.where(ok, tl.exp2(s - lse2[:, None]), 0.0)
        dp = _dot(do, tl.trans(vt), IEEE)
        ds = p * (dp - delta[:, None])
        dsc = ds.to(K.dtype.element_ty)
        if UPCAST:
            dsc = dsc.to(tl.float32)
        dq += _dot(dsc, kt, IEEE)

    dq = dq * scale
    tl.store(DQ + qd_off, dq.to(DQ.dtype.element_ty), mask=qd_mask)


# ---------------------------------------------------------------------------------------------------
# Host side.

def _block_d(D: int) -> int:
    return max(16, next_power_of_2(D))


def _config(D: int, backward: bool, dtype=torch.float16):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages). Small blocks under the interpreter keep tests fast
    while still crossing block boundaries. On sm_90 (benchmarks/compile_check_kernels.py, cuobjdump):
    these tiles fit the shared memory and do not spill registers; with 4 warps the 128-row forward,
    the head-dim-256 tiles and the backward at head dims 80-256 spill 8-112 bytes per thread. fp32
    dots in IEEE precision run on the FMA units with whole operand tiles in registers: the tensor-core
    tiles spill 8-17 KB per thread there, hence the small fp32 tiles. Timings that would tune these
    are owed."""
    if _interpreting():
        return 16, 16, 1, 1
    bd = _block_d(D)
    if dtype == torch.float32:
        bm, bn, warps = (32, 16, 4) if bd <= 64 else (16, 16, 4) if bd <= 128 else (16, 16, 8)
        return bm, bn, warps, 1
    if backward:
        return (64, 64, 4, 2) if bd <= 64 else (64, 32, 8, 2) if bd <= 128 else (32, 32, 8, 1)
    return (128, 64, 8, 3) if bd <= 64 else (64, 64, 4, 3) if bd <= 128 else (64, 32, 8, 2)


def _nonempty(t: torch.Tensor) -> torch.Tensor:
    """Triton wants a real pointer even where no element is read."""
    return t if t.numel() > 0 else _replay.empty((1,), t.dtype, t.device)


def _prefix_args(prefix: torch.Tensor | None, B: int, Hkv: int, D: int, like: torch.Tensor):
    """(tensor, P, batch stride, head stride) for a contiguous (Hkv, P, D) or (B, Hkv, P, D) prefix."""
    if prefix is None or prefix.shape[-2] == 0:
        return _nonempty(like.new_empty(0)), 0, 0, 0
    prefix = prefix.contiguous()
    P = prefix.shape[-2]
    sb = 0 if prefix.dim() == 3 else Hkv * P * D
    return prefix, P, sb, P * D


def _kpm_args(key_padding_mask: torch.Tensor | None, device):
    if key_padding_mask is None:
        return _replay.empty((1,), torch.int8, device), False
    return _nonempty(key_padding_mask.contiguous().view(torch.int8)), True


def supported_head_dim(D: int) -> bool:
    return 1 <= D <= MAX_HEAD_DIM


_FORWARD_PROGRAMS: dict = _replay.register_cache({})


def forward(q, k, v, prefix_k=None, prefix_v=None, key_padding_mask=None, causal=False, scale=None,
            block_m=None, block_n=None):
    """See :func:`_forward`; calls with a key seen before replay its launch from C++ (kernels/_replay.py):
    decoding a few tokens is bound by the host."""
    if not _replay.active(q):
        return _forward(q, k, v, prefix_k, prefix_v, key_padding_mask, causal, scale, block_m, block_n)
    key = _replay.key_of(q, k, v, prefix_k, prefix_v, key_padding_mask, bool(causal), scale, block_m, block_n)
    return _replay.call(_FORWARD_PROGRAMS, key, [q, k, v, prefix_k, prefix_v, key_padding_mask], _forward, q, k, v,
                        prefix_k, prefix_v, key_padding_mask, causal, scale, block_m, block_n, single=False)


def _forward(q, k, v, prefix_k=None, prefix_v=None, key_padding_mask=None, causal=False, scale=None,
             block_m=None, block_n=None):
    """Returns ``(out, lse)``: ``out`` like ``q``; ``lse`` (B, Hq, L) fp32, natural log, ``+inf`` on
    rows that see no key."""
    B, Hq, L, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    scale = D ** -0.5 if scale is None else float(scale)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    out = _replay.empty(q.shape, q.dtype, q.device)
    lse = _replay.empty((B, Hq, L), torch.float32, q.device)
    if out.numel() == 0:
        _replay.unrecordable("no output: the log-sum-exp is filled by torch")
        return out, lse.fill_(float("inf"))
    pk, P, spk_b, spk_h = _prefix_args(prefix_k, B, Hkv, D, q)
    pv, _, _, _ = _prefix_args(prefix_v, B, Hkv, D, q)
    kpm, has_kpm = _kpm_args(key_padding_mask, q.device)
    bm, bn, warps, stages = _config(D, backward=False, dtype=q.dtype)
    bm, bn = block_m or bm, block_n or bn
    grid = (cdiv(L, bm), Hq, B)
    _replay.launch(
        _fwd_kernel, grid,
        q, _nonempty(k), _nonempty(v), pk, pv, kpm, out, lse,
        scale * LOG2E, Hq, Hq // Hkv, L, S, P, D, spk_b, spk_h,
        HAS_KPM=has_kpm, CAUSAL=bool(causal), BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=_block_d(D),
        UPCAST=_interpreting(), IEEE=q.dtype == torch.float32 and not _interpreting(),
        num_warps=warps, num_stages=stages,
    )
    return out, lse


def backward(grad_out, q, k, v, prefix_k, prefix_v, key_padding_mask, out, lse, causal=False, scale=None,
             block_m=None, block_n=None):
    """Returns ``(dq, dk, dv, d_prefix_k, d_prefix_v)``; the prefix gradients have the prefix's shape
    (summed over the batch when it is shared) and are None without a prefix."""
    B, Hq, L, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G = Hq // Hkv
    scale = D ** -0.5 if scale is None else float(scale)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    grad_out, out, lse = grad_out.contiguous(), out.contiguous(), lse.contiguous()
    dq = torch.zeros_like(q)
    dk = torch.zeros_like(k)
    dv = torch.zeros_like(v)
    has_prefix = prefix_k is not None
    P = prefix_k.shape[-2] if has_prefix else 0
    dpk_part = torch.zeros(B, Hkv, P, D, dtype=torch.float32, device=q.device)
    dpv_part = torch.zeros_like(dpk_part)
    if B * Hq * L > 0 and B * Hkv * (S + P) > 0:
        delta = (grad_out.float() * out.float()).sum(-1)
        pk, P, spk_b, spk_h = _prefix_args(prefix_k, B, Hkv, D, q)
        pv, _, _, _ = _prefix_args(prefix_v, B, Hkv, D, q)
        kpm, has_kpm = _kpm_args(key_padding_mask, q.device)
        bm, bn, warps, stages = _config(D, backward=True, dtype=q.dtype)
        bm, bn = block_m or bm, block_n or bn
        common = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=_block_d(D), UPCAST=_interpreting(),
                      IEEE=q.dtype == torch.float32 and not _interpreting(), num_warps=warps, num_stages=stages)
        qk_scale2 = scale * LOG2E
        nb_p = cdiv(P, bn)
        _bwd_dkdv_kernel[(nb_p + cdiv(S, bn), Hkv, B)](
            q, _nonempty(k), _nonempty(v), pk, pv, grad_out, lse, delta, kpm, _nonempty(dk), _nonempty(dv),
            _nonempty(dpk_part), _nonempty(dpv_part), qk_scale2, scale,
            Hq, G, L, S, P, D, Hkv * S * D, S * D, spk_b, spk_h, Hkv * P * D, P * D, nb_p,
            HAS_KPM=has_kpm, CAUSAL=bool(causal), **common,
        )
        _bwd_dq_kernel[(cdiv(L, bm), Hq, B)](
            q, _nonempty(k), _nonempty(v), pk, pv, kpm, grad_out, lse, delta, dq, qk_scale2, scale,
            Hq, G, L, S, P, D, spk_b, spk_h,
            HAS_KPM=has_kpm, CAUSAL=bool(causal), **common,
        )
    if not has_prefix:
        return dq, dk, dv, None, None
    if prefix_k.dim() == 3:
        dpk, dpv = dpk_part.sum(0), dpv_part.sum(0)
    else:
        dpk, dpv = dpk_part, dpv_part
    return dq, dk, dv, dpk.to(prefix_k.dtype), dpv.to(prefix_v.dtype)
