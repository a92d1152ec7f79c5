"""Triton kernels for attention over ``[prefix; keys]`` without building the concatenation.

Forward: one program per (query block, query head, batch). It runs an online softmax (fp32, base 2)
first over the P prefix keys/values, read from their own tensors (batch stride 0 when the prefix is
shared by the batch), then over the sequence keys. Query head ``h`` reads key/value head ``h // group``.
It returns the output and the natural log-sum-exp per row (fp32, ``+inf`` for a row that sees no key,
whose output is zeros).

Padding and causality decide which key blocks a program visits, not how it loads them. A scan of the
sequence's int8 padding row gives the range [lo, hi) of keys that are not padding; the bottom-right
causal bound cuts it for the program's rows. Keys outside are never read (left or right padding, an
unused cache tail: whatever they hold). Inside, the blocks that every row of the program sees run
without any mask, and the rest (the causal diagonal, the partial last block, masked keys between
unmasked ones) with the masks applied to the scores; the key and value loads never depend on loaded
data, so they pipeline. Masked keys between unmasked ones are read and weighted by zero: they must be
finite, as under SDPA with a boolean mask.

Backward (flash-attention-2 scheme): ``delta = rowsum(dO * O)`` in fp32 from one small kernel, one kernel
for the key and value gradients per (key block, kv head, batch) that loops over the query heads of the
group and the query blocks (no atomics: each program owns its key rows; unmasked where the queries see
every key of the block); its first programs take the prefix key blocks (fp32 partials per batch, summed
with torch when the prefix is shared), the others the sequence key blocks, in one launch. One more kernel
computes ``dq`` per query block over the same key ranges as the forward. Accumulation is fp32 everywhere.

Attention dropout (DROPOUT): each kernel draws, for every weight it visits, the same Philox number from a
seed the caller passes in a device tensor (:func:`_dropout_uniform`), so nothing is stored between the
forward and the backward: the forward drops weights from the values' sum (not from the normaliser, so the
log-sum-exp is the undropped softmax's) and scales the output by 1 / (1 - p); the backward applies the same
mask to P in dv and to dO V^T in the scores' gradient, with delta = rowsum(dO * O) of the dropped output.

Tiles: fp16/bf16 calls on a GPU are autotuned over a few tiles per head-dim class, keyed by the head dim,
the size classes of L and S, padding and causality; the interpreter, float32 and PET_FAST_AUTOTUNE=0 use
the fixed tiles of :func:`_config`.

Layouts: q, k, v, dO and O are read through their batch, head and row strides (the last dim contiguous;
k and v share theirs), so the (B, L, H, D) memory of an attention layer's projections is read in place;
the output and dq, dk, dv are written in (B, L, H, D) memory (returned as (B, H, L, D) views), which the
layer transposes back, and its projections take the gradients, with no copy. The prefix is contiguous.
The head dimension is padded to a power of two with masks, so any D <= 256 runs. No autograd here: see
``pet_fast/ops/prefix_attention.py``.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from . import _replay
from ._host import FP_FUSION, cdiv, next_power_of_2
from .bottleneck_adapter import autotuning, n_bucket

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
MAX_HEAD_DIM = 256


_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"  # read once, as Triton itself does at import


def _interpreting() -> bool:
    return _INTERPRET


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _query_tile(h, b, G, L, D, spk_b, spk_h, sq_b, sq_h, sq_l, sk_b, sk_h, sk_l,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Index set-up of a program that owns BLOCK_M query rows of head h in batch b (forward and dq):
    row/column/key-tile ranges, their masks, the head's base offsets of k/v and the prefix, the query
    tile's offsets and the offsets inside one key tile of the sequence (rows sk_l apart) and of the prefix
    (rows D apart).

    A tensor may hold 2**31 elements: bases and rows are int64 before they meet a stride; key blocks
    start at an int64 scalar (added by the caller) and only the offsets inside a tile stay int32."""
    hk = h // G
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n0 = tl.arange(0, BLOCK_N)
    q_base = b.to(tl.int64) * sq_b + h.to(tl.int64) * sq_h
    kv_base = b.to(tl.int64) * sk_b + hk.to(tl.int64) * sk_h
    p_base = b.to(tl.int64) * spk_b + hk.to(tl.int64) * spk_h
    q_off = q_base + offs_m.to(tl.int64)[:, None] * sq_l + offs_d[None, :]
    kv_tile = offs_n0[:, None] * sk_l + offs_d[None, :]
    p_tile = offs_n0[:, None] * D + offs_d[None, :]
    return offs_m, offs_d, offs_n0, offs_m < L, offs_d < D, kv_base, p_base, q_off, kv_tile, p_tile


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
def _dropout_uniform(seed, stream, m_start, cols, BLOCK_M: tl.constexpr, TRANSPOSED: tl.constexpr = False):
    """(BLOCK_M, len(cols)) uniform numbers in [0, 1): entry (i, n) decides whether the attention weight
    of query row ``m_start + i`` on key column ``cols[n]`` (0..P-1 the prefix, P.. the sequence) in
    ``stream`` (batch * Hq + query head) is dropped. One Philox-4x32-10 call under the 64-bit seed, with
    counters (column, row // 4, stream, 0), gives the numbers of 4 consecutive rows (``m_start`` is a
    multiple of 4 in every kernel: query tiles start at multiples of their height). The forward and both
    backward kernels draw the same number for the same weight, whatever their tiles; nothing is stored
    between them. TRANSPOSED: the (len(cols), BLOCK_M) tile of the same numbers (the dk/dv kernel's
    orientation), built as such rather than transposed after."""
    groups = m_start // 4 + tl.arange(0, BLOCK_M // 4)
    if TRANSPOSED:
        c0 = (cols[:, None] + groups[None, :] * 0).to(tl.uint32)
        c1 = (groups[None, :] + cols[:, None] * 0).to(tl.uint32)
    else:
        c0 = (cols[None, :] + groups[:, None] * 0).to(tl.uint32)
        c1 = (groups[:, None] + cols[None, :] * 0).to(tl.uint32)
    c2 = c0 * 0 + stream.to(tl.uint32)
    r0, r1, r2, r3 = tl.philox(seed, c0, c1, c2, c2 * 0)
    # [..., i, j] holds r[2 j + i], the number of row 4 g + 2 j + i of group g
    r = tl.join(tl.join(r0, r1), tl.join(r2, r3))
    if TRANSPOSED:  # (cols, groups, i, j) -> (cols, groups, j, i)
        r = tl.reshape(tl.permute(r, (0, 1, 3, 2)), (cols.shape[0], BLOCK_M))
    else:  # (groups, cols, i, j) -> (groups, j, i, cols)
        r = tl.reshape(tl.permute(r, (0, 3, 2, 1)), (BLOCK_M, cols.shape[0]))
    return tl.uint_to_uniform_float(r)


@triton.jit
def _dropout_seed(SEED, DROPOUT: tl.constexpr):
    """The seed of the dropout draws, from SEED (int64) under DROPOUT, else 0 that no draw reads."""
    if DROPOUT:
        seed = tl.load(SEED)
    else:
        seed = 0
    return seed


@triton.jit
def _dropout_stream(SEED, b, h, Hq, DROPOUT: tl.constexpr):
    """(seed, stream) of a program's dropout draws for query head h of batch b: :func:`_dropout_seed` and
    the stream b * Hq + h."""
    return _dropout_seed(SEED, DROPOUT), b * Hq + h


@triton.jit
def _softmax_fold(s, vt, m_i, l_i, acc, qk_scale2, V, seed, stream, m_start, cols, p_drop,
                  UPCAST: tl.constexpr, IEEE: tl.constexpr, MASKED: tl.constexpr, DROPOUT: tl.constexpr):
    """Folds one block of raw scores ``s`` = q . k (-inf where masked) and its values into the running row
    max ``m_i``, sum ``l_i`` and weighted values ``acc``, in base 2: the weights are exp2(s * qk_scale2 - m)
    (probabilities rounded to V's dtype for the product, as flash attention does). The scale is applied to
    the row max and inside the exponent's FMA, not to every score first: one multiplication per score fewer
    (qk_scale2 > 0, so the max of the scaled scores is the scaled max, exactly). Rows with no key yet stay
    (-inf, 0, 0); unmasked blocks (MASKED false) have a finite score in every row, so they skip that guard.
    Under DROPOUT the dropped weights (query rows from ``m_start``, key columns ``cols``) leave the values'
    sum but not the normaliser ``l_i``: the caller scales the output by 1 / (1 - p_drop)."""
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale2)
    if MASKED:
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_safe = m_new
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s * qk_scale2 - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if DROPOUT:
        p = tl.where(_dropout_uniform(seed, stream, m_start, cols, s.shape[0]) >= p_drop, p, 0.0)
    pc = p.to(V.dtype.element_ty)
    if UPCAST:
        pc = pc.to(tl.float32)
    acc = acc * alpha[:, None] + _dot(pc, vt, IEEE)
    return m_new, l_i, acc


@triton.jit
def _online_softmax_step(q, kt, vt, ok, m_i, l_i, acc, qk_scale2, V, seed, stream, m_start, cols, p_drop,
                         UPCAST: tl.constexpr, IEEE: tl.constexpr, DROPOUT: tl.constexpr):
    """One key block of the online softmax: the scores of q against kt where ``ok``, folded in."""
    s = tl.where(ok, _dot(q, tl.trans(kt), IEEE), float("-inf"))
    return _softmax_fold(s, vt, m_i, l_i, acc, qk_scale2, V, seed, stream, m_start, cols, p_drop, UPCAST, IEEE, True,
                         DROPOUT)


@triton.jit
def _load_rows(K, V, off, d_ok, EVEN_D: tl.constexpr, UPCAST: tl.constexpr):
    """One block of keys and values that are all in bounds: no row mask, and no mask at all when the head
    dim fills BLOCK_D, so the loads vectorise and pipeline."""
    if EVEN_D:
        kt = tl.load(K + off)
        vt = tl.load(V + off)
    else:
        kt = tl.load(K + off, mask=d_ok[None, :], other=0.0)
        vt = tl.load(V + off, mask=d_ok[None, :], other=0.0)
    if UPCAST:
        kt = kt.to(tl.float32)
        vt = vt.to(tl.float32)
    return kt, vt


@triton.jit
def _key_range(KPM, b, S, HAS_KPM: tl.constexpr, SCAN: tl.constexpr):
    """``(lo, hi, holes)`` of batch b's sequence keys: every key outside [lo, hi) is masked (left or right
    padding, a cache's unused tail), so the key loops skip it and never read its key or value; ``holes``
    is true when masked keys also lie inside [lo, hi) (those are read, and weighted by zero). (0, 0) when
    no key is unmasked. One pass over the sequence's mask row, SCAN bytes at a time."""
    zero = b * 0
    if HAS_KPM:
        lo = zero + S
        hi = zero
        count = zero
        row = KPM + b.to(tl.int64) * S
        for s0 in range(0, S, SCAN):
            offs = s0 + tl.arange(0, SCAN)
            ok = tl.load(row + offs, mask=offs < S, other=0) != 0
            lo = tl.minimum(lo, tl.min(tl.where(ok, offs, S), 0))
            hi = tl.maximum(hi, tl.max(tl.where(ok, offs + 1, 0), 0))
            count += tl.sum(ok.to(tl.int32), 0)
        lo = tl.minimum(lo, hi)
        holes = count < hi - lo
    else:
        lo = zero
        hi = zero + S
        holes = zero != 0
    return lo, hi, holes


@triton.jit
def _query_key_bounds(KPM, b, pid_m, L, S, HAS_KPM: tl.constexpr, CAUSAL: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SCAN: tl.constexpr):
    """The sequence keys a tile of BLOCK_M queries visits (forward and dq): ``[lo, mid)`` in whole blocks
    that every row of the tile sees (no mask), then ``[mid, end)`` with the padding and bottom-right
    causal masks. Keys past ``end`` (padding, or after the tile's last row under causal) are skipped."""
    lo, hi, holes = _key_range(KPM, b, S, HAS_KPM, SCAN)
    end = hi
    full = hi
    if CAUSAL:  # row i sees key j when j <= i + S - L
        end = tl.minimum(end, tl.maximum((pid_m + 1) * BLOCK_M + S - L, 0))
        full = tl.minimum(end, tl.maximum(pid_m * BLOCK_M + 1 + S - L, 0))
    full = tl.where(holes, lo, full)
    mid = lo + tl.maximum(full - lo, 0) // BLOCK_N * BLOCK_N
    return lo, mid, end


@triton.jit
def _seq_mask(KPM, b, S, offs_m, offs_n, end, L, HAS_KPM: tl.constexpr, CAUSAL: tl.constexpr):
    """(keys in bounds (BLOCK_N,), (BLOCK_M, BLOCK_N) mask) of a masked block of sequence keys."""
    n_ok = offs_n < end
    ok = n_ok
    if HAS_KPM:
        ok = ok & (tl.load(KPM + b.to(tl.int64) * S + offs_n, mask=n_ok, other=0) != 0)
    ok = ok[None, :]
    if CAUSAL:
        ok = ok & (offs_n[None, :] <= offs_m[:, None] + (S - L))
    return n_ok, ok


@triton.jit
def _fwd_kernel(
    Q, K, V, PK, PV, KPM, O, LSE, SEED,
    qk_scale2,  # scale * log2(e)
    p_drop, inv_keep,  # attention dropout's probability and 1 / (1 - p_drop) (DROPOUT; SEED holds its seed)
    Hq, G, L, S, P, D,
    spk_b, spk_h,  # prefix strides (batch stride 0 when shared); rows are D apart
    sq_b, sq_h, sq_l,  # strides of q (batch, head, row; the last dim is contiguous in every tensor)
    sk_b, sk_h, sk_l,  # strides of k and v (the same)
    so_b, so_h, so_l,  # strides of the output
    tune_l, tune_s,  # the autotuner's size classes of L and S (unused in the body)
    HAS_KPM: tl.constexpr, CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
    SCAN: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr, DROPOUT: tl.constexpr,
):
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    offs_m, offs_d, offs_n0, m_ok, d_ok, kv_base, p_base, q_off, kv_tile, p_tile = _query_tile(
        h, b, G, L, D, spk_b, spk_h, sq_b, sq_h, sq_l, sk_b, sk_h, sk_l, BLOCK_M, BLOCK_N, BLOCK_D)
    seed, stream = _dropout_stream(SEED, b, h, Hq, DROPOUT)
    m_start = pid_m * BLOCK_M  # dropout's first row

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
        kt, vt = _load_kv(PK, PV, p_base + tl.cast(start, tl.int64) * D + p_tile, n_ok[:, None] & d_ok[None, :],
                          UPCAST)
        m_i, l_i, acc = _online_softmax_step(q, kt, vt, n_ok[None, :], m_i, l_i, acc, qk_scale2, PV, seed, stream,
                                             m_start, offs_n, p_drop, UPCAST, IEEE, DROPOUT)

    # Sequence keys (dropout's columns P + j): whole blocks every row sees, without masks; then the masked rest.
    lo, mid, end = _query_key_bounds(KPM, b, pid_m, L, S, HAS_KPM, CAUSAL, BLOCK_M, BLOCK_N, SCAN)
    for start in range(lo, mid, BLOCK_N):
        kt, vt = _load_rows(K, V, kv_base + tl.cast(start, tl.int64) * sk_l + kv_tile, d_ok, EVEN_D, UPCAST)
        m_i, l_i, acc = _softmax_fold(_dot(q, tl.trans(kt), IEEE), vt, m_i, l_i, acc, qk_scale2, V, seed, stream,
                                      m_start, P + start + offs_n0, p_drop, UPCAST, IEEE, False, DROPOUT)
    for start in range(mid, end, BLOCK_N):
        offs_n = start + offs_n0
        n_ok, ok = _seq_mask(KPM, b, S, offs_m, offs_n, end, L, HAS_KPM, CAUSAL)
        kt, vt = _load_kv(K, V, kv_base + tl.cast(start, tl.int64) * sk_l + kv_tile, n_ok[:, None] & d_ok[None, :],
                          UPCAST)
        m_i, l_i, acc = _online_softmax_step(q, kt, vt, ok, m_i, l_i, acc, qk_scale2, V, seed, stream, m_start,
                                             P + offs_n, p_drop, UPCAST, IEEE, DROPOUT)

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    if DROPOUT:
        out = out * inv_keep
    lse = tl.where(empty, float("inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)
    o_off = b.to(tl.int64) * so_b + h.to(tl.int64) * so_h + offs_m.to(tl.int64)[:, None] * so_l + offs_d[None, :]
    tl.store(O + o_off, out.to(O.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
    tl.store(LSE + (b.to(tl.int64) * Hq + h) * L + offs_m, lse, mask=m_ok)


@triton.jit
def _delta_kernel(O, DO, DELTA, R, H, L, D, so_b, so_h, so_l, sdo_b, sdo_h, sdo_l,
                  BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """``delta = rowsum(dO * O)`` in fp32 over the R = B * H * L rows of D (row r is (b, h, l) in that order;
    O and dO read through their strides): one read of each, no fp32 copies."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (rows < R)[:, None] & (offs_d < D)[None, :]
    l_ = rows % L
    bh = rows // L
    h = bh % H
    b = bh // H
    o = tl.load(O + (b * so_b + h * so_h + l_ * so_l)[:, None] + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + (b * sdo_b + h * sdo_h + l_ * sdo_l)[:, None] + offs_d[None, :], mask=mask, other=0.0)
    tl.store(DELTA + rows, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), mask=rows < R)


@triton.jit
def _dkdv_step(kt, vt, q, do, lse2, delta, ok, dk, dv, qk_scale2, DO, Q, seed, stream, cols, m_start, p_drop, inv_keep,
               UPCAST: tl.constexpr, IEEE: tl.constexpr, MASKED: tl.constexpr, DROPOUT: tl.constexpr):
    """One block of queries folded into a key block's dk, dv (``ok`` (BLOCK_N, BLOCK_M) when MASKED).
    Under DROPOUT, with Z the kept weights over 1 - p_drop: dv takes (P * Z)^T dO, and the scores' gradient
    is P * (Z * dO V^T - delta), delta = rowsum(dO * O) of the dropped output (flash attention's)."""
    s = _dot(kt, tl.trans(q), IEEE) * qk_scale2  # (BLOCK_N, BLOCK_M)
    p = tl.exp2(s - lse2[None, :])
    if MASKED:
        p = tl.where(ok, p, 0.0)
    if DROPOUT:
        keep = _dropout_uniform(seed, stream, m_start, cols, q.shape[0], True) >= p_drop
        pc = tl.where(keep, p * inv_keep, 0.0).to(DO.dtype.element_ty)
    else:
        pc = p.to(DO.dtype.element_ty)
    if UPCAST:
        pc = pc.to(tl.float32)
    dv += _dot(pc, do, IEEE)
    dp = _dot(vt, tl.trans(do), IEEE)
    if DROPOUT:
        dp = tl.where(keep, dp * inv_keep, 0.0)
    ds = p * (dp - delta[None, :])
    dsc = ds.to(Q.dtype.element_ty)
    if UPCAST:
        dsc = dsc.to(tl.float32)
    dk += _dot(dsc, q, IEEE)
    return dk, dv


@triton.jit
def _load_query_rows(Q, DO, LSE, DELTA, qd_off, r_off, qd_mask, m_ok,
                     MASKED: tl.constexpr, EVEN_D: tl.constexpr, UPCAST: tl.constexpr):
    """q, dO (laid out alike), log2-sum-exp and delta of a block of query rows (all in bounds unless MASKED)."""
    if MASKED:
        q = tl.load(Q + qd_off, mask=qd_mask, other=0.0)
        do = tl.load(DO + qd_off, mask=qd_mask, other=0.0)
        lse2 = tl.load(LSE + r_off, mask=m_ok, other=float("inf")) * 1.4426950408889634
        delta = tl.load(DELTA + r_off, mask=m_ok, other=0.0)
    else:
        if EVEN_D:
            q = tl.load(Q + qd_off)
            do = tl.load(DO + qd_off)
        else:
            q = tl.load(Q + qd_off, mask=qd_mask, other=0.0)
            do = tl.load(DO + qd_off, mask=qd_mask, other=0.0)
        lse2 = tl.load(LSE + r_off) * 1.4426950408889634
        delta = tl.load(DELTA + r_off)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    return q, do, lse2, delta


@triton.jit
def _dkdv_block(
    Q, K, V, DO, LSE, DELTA, KPM, DK, DV,
    qk_scale2, scale, seed, p_drop, inv_keep,
    Hq, G, L, N, S_SEQ, D, col0,  # col0: dropout's column of key 0 (0 for the prefix, P for the sequence)
    sk_b, sk_h, sk_l,  # key/value strides of these keys (batch stride 0 for a shared prefix)
    sdk_b, sdk_h, sdk_l,  # strides of the gradient buffers
    sq_b, sq_h, sq_l,  # strides of q and dO (the same)
    pid_n, hk, b,
    IS_PREFIX: tl.constexpr, HAS_KPM: tl.constexpr, CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr, DROPOUT: tl.constexpr,
):
    """dk, dv of one block of BLOCK_N keys (prefix or sequence), over every query that sees them. The
    query blocks that see every key of the block run without masks; a block with no unmasked key
    writes zeros without visiting a query."""
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_m0 = tl.arange(0, BLOCK_M)
    d_ok = offs_d < D
    in_bounds = offs_n < N
    n_ok = in_bounds
    if not IS_PREFIX:
        if HAS_KPM:
            n_ok = n_ok & (tl.load(KPM + b.to(tl.int64) * S_SEQ + offs_n, mask=in_bounds, other=0) != 0)

    k_base = b.to(tl.int64) * sk_b + hk.to(tl.int64) * sk_h
    rows64 = offs_n.to(tl.int64)[:, None]  # N * stride may pass 2**31
    kv_off = k_base + rows64 * sk_l + offs_d[None, :]
    kv_mask = in_bounds[:, None] & d_ok[None, :]
    kt = tl.load(K + kv_off, mask=kv_mask, other=0.0)
    vt = tl.load(V + kv_off, mask=kv_mask, other=0.0)
    if UPCAST:
        kt = kt.to(tl.float32)
        vt = vt.to(tl.float32)

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)

    # Query blocks, from the first that sees a key of the block (causal: query i sees key j when
    # i >= j - (S - L)) to L: [m_mid, m_full) unmasked (every row sees every key of the block), and masked
    # the blocks before it (the causal diagonal; all of them when some key of the block is masked) and the
    # partial last block. Nothing when no key of the block is unmasked.
    n_valid = tl.sum(n_ok.to(tl.int32), 0)
    m_begin = pid_n * 0
    m_seen = m_begin  # the first query row that sees every key of the block
    if not IS_PREFIX:
        if CAUSAL:
            m_begin = tl.maximum(pid_n * BLOCK_N - (S_SEQ - L), 0) // BLOCK_M * BLOCK_M
            m_seen = tl.maximum(pid_n * BLOCK_N + BLOCK_N - 1 - (S_SEQ - L), m_begin)
    m_mid = m_begin + tl.cdiv(m_seen - m_begin, BLOCK_M) * BLOCK_M
    m_mid = tl.minimum(tl.where(n_valid == BLOCK_N, m_mid, L), L)
    m_full = m_mid + tl.maximum(L - m_mid, 0) // BLOCK_M * BLOCK_M
    n_head = tl.cdiv(m_mid - m_begin, BLOCK_M)
    n_masked = tl.where(n_valid > 0, n_head + (m_full < L).to(tl.int32), 0)
    m_full = tl.where(n_valid > 0, m_full, m_mid)

    qd_tile = offs_m0[:, None] * sq_l + offs_d[None, :]
    cols = col0 + offs_n
    for g in range(0, G):
        h = hk * G + g
        stream = b * Hq + h
        q_base = b.to(tl.int64) * sq_b + h.to(tl.int64) * sq_h
        r_base = (b.to(tl.int64) * Hq + h) * L
        for i in range(0, n_masked):  # one loop over both masked runs keeps the registers of one loop body
            start = tl.where(i < n_head, m_begin + i * BLOCK_M, m_full)
            offs_m = start + offs_m0
            m_ok = offs_m < L
            q, do, lse2, delta = _load_query_rows(Q, DO, LSE, DELTA, q_base + tl.cast(start, tl.int64) * sq_l + qd_tile,
                                                  r_base + offs_m, m_ok[:, None] & d_ok[None, :], m_ok, True, EVEN_D,
                                                  UPCAST)
            ok = n_ok[:, None] & m_ok[None, :]
            if not IS_PREFIX:
                if CAUSAL:
                    ok = ok & (offs_n[:, None] <= offs_m[None, :] + (S_SEQ - L))
            dk, dv = _dkdv_step(kt, vt, q, do, lse2, delta, ok, dk, dv, qk_scale2, DO, Q, seed, stream, cols, start,
                                p_drop, inv_keep, UPCAST, IEEE, True, DROPOUT)
        for start in range(m_mid, m_full, BLOCK_M):
            offs_m = start + offs_m0
            q, do, lse2, delta = _load_query_rows(Q, DO, LSE, DELTA, q_base + tl.cast(start, tl.int64) * sq_l + qd_tile,
                                                  r_base + offs_m, d_ok[None, :], offs_m < L, False, EVEN_D, UPCAST)
            dk, dv = _dkdv_step(kt, vt, q, do, lse2, delta, n_ok, dk, dv, qk_scale2, DO, Q, seed, stream, cols, start,
                                p_drop, inv_keep, UPCAST, IEEE, False, DROPOUT)

    # masked keys get zeros (a padded key's non-finite value would leave NaN through 0 * inf)
    dk = tl.where(n_ok[:, None], dk * scale, 0.0)
    dv = tl.where(n_ok[:, None], dv, 0.0)
    g_off = b.to(tl.int64) * sdk_b + hk.to(tl.int64) * sdk_h + rows64 * sdk_l + offs_d[None, :]
    tl.store(DK + g_off, dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + g_off, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, PK, PV, DO, LSE, DELTA, KPM, DK, DV, DPK, DPV, SEED,
    qk_scale2, scale, p_drop, inv_keep,
    Hq, G, L, S, P, D,
    sk_b, sk_h, sk_l,  # strides of k and v (the same)
    sdk_b, sdk_h, sdk_l,  # strides of dk and dv (the same)
    sq_b, sq_h, sq_l,  # strides of q and dO (the same)
    spk_b, spk_h, sdp_b, sdp_h,  # the prefix's and its fp32 partials' (rows D apart)
    tune_l, tune_s,  # the autotuner's size classes of L and S (unused in the body)
    HAS_KPM: tl.constexpr, CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr, DROPOUT: tl.constexpr,
):
    pid = tl.program_id(0)
    hk = tl.program_id(1)
    b = tl.program_id(2)
    seed = _dropout_seed(SEED, DROPOUT)  # the streams are per query head: _dkdv_block's loop
    nb_p = tl.cdiv(P, BLOCK_N)  # the first programs take the prefix key blocks (the longest: every query sees them)
    if pid < nb_p:
        _dkdv_block(Q, PK, PV, DO, LSE, DELTA, KPM, DPK, DPV, qk_scale2, scale, seed, p_drop, inv_keep,
                    Hq, G, L, P, S, D, 0, spk_b, spk_h, D, sdp_b, sdp_h, D, sq_b, sq_h, sq_l, pid, hk, b,
                    True, False, False, BLOCK_M, BLOCK_N, BLOCK_D, EVEN_D, UPCAST, IEEE, DROPOUT)
    else:
        _dkdv_block(Q, K, V, DO, LSE, DELTA, KPM, DK, DV, qk_scale2, scale, seed, p_drop, inv_keep,
                    Hq, G, L, S, S, D, P, sk_b, sk_h, sk_l, sdk_b, sdk_h, sdk_l, sq_b, sq_h, sq_l, pid - nb_p, hk, b,
                    False, HAS_KPM, CAUSAL, BLOCK_M, BLOCK_N, BLOCK_D, EVEN_D, UPCAST, IEEE, DROPOUT)


@triton.jit
def _dq_step(q, do, kt, vt, ok, lse2, delta, dq, qk_scale2, K, seed, stream, m_start, cols, p_drop, inv_keep,
             UPCAST: tl.constexpr, IEEE: tl.constexpr, MASKED: tl.constexpr, DROPOUT: tl.constexpr):
    """One block of keys folded into a query block's dq (``ok`` (BLOCK_M, BLOCK_N) when MASKED); dropout
    as in :func:`_dkdv_step`."""
    s = _dot(q, tl.trans(kt), IEEE) * qk_scale2
    p = tl.exp2(s - lse2[:, None])
    if MASKED:
        p = tl.where(ok, p, 0.0)
    dp = _dot(do, tl.trans(vt), IEEE)
    if DROPOUT:
        dp = tl.where(_dropout_uniform(seed, stream, m_start, cols, q.shape[0]) >= p_drop, dp * inv_keep, 0.0)
    ds = p * (dp - delta[:, None])
    dsc = ds.to(K.dtype.element_ty)
    if UPCAST:
        dsc = dsc.to(tl.float32)
    return dq + _dot(dsc, kt, IEEE)


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, PK, PV, KPM, DO, LSE, DELTA, DQ, SEED,
    qk_scale2, scale, p_drop, inv_keep,
    Hq, G, L, S, P, D,
    spk_b, spk_h,
    sq_b, sq_h, sq_l, sk_b, sk_h, sk_l,  # strides of q and dO (the same), and of k and v (the same)
    sdq_b, sdq_h, sdq_l,  # strides of dq
    tune_l, tune_s,  # the autotuner's size classes of L and S (unused in the body)
    HAS_KPM: tl.constexpr, CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
    SCAN: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr, DROPOUT: tl.constexpr,
):
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    offs_m, offs_d, offs_n0, m_ok, d_ok, kv_base, p_base, q_off, kv_tile, p_tile = _query_tile(
        h, b, G, L, D, spk_b, spk_h, sq_b, sq_h, sq_l, sk_b, sk_h, sk_l, BLOCK_M, BLOCK_N, BLOCK_D)
    seed, stream = _dropout_stream(SEED, b, h, Hq, DROPOUT)
    m_start = pid_m * BLOCK_M
    q, do, lse2, delta = _load_query_rows(Q, DO, LSE, DELTA, q_off, (b.to(tl.int64) * Hq + h) * L + offs_m,
                                          m_ok[:, None] & d_ok[None, :], m_ok, True, EVEN_D, UPCAST)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    for start in range(0, P, BLOCK_N):
        n_ok = (start + offs_n0) < P
        kt, vt = _load_kv(PK, PV, p_base + tl.cast(start, tl.int64) * D + p_tile, n_ok[:, None] & d_ok[None, :],
                          UPCAST)
        dq = _dq_step(q, do, kt, vt, n_ok[None, :] & m_ok[:, None], lse2, delta, dq, qk_scale2, PK, seed, stream,
                      m_start, start + offs_n0, p_drop, inv_keep, UPCAST, IEEE, True, DROPOUT)

    # rows past L have lse = +inf (p = 0): the unmasked blocks need no row mask
    lo, mid, end = _query_key_bounds(KPM, b, pid_m, L, S, HAS_KPM, CAUSAL, BLOCK_M, BLOCK_N, SCAN)
    for start in range(lo, mid, BLOCK_N):
        kt, vt = _load_rows(K, V, kv_base + tl.cast(start, tl.int64) * sk_l + kv_tile, d_ok, EVEN_D, UPCAST)
        dq = _dq_step(q, do, kt, vt, m_ok, lse2, delta, dq, qk_scale2, K, seed, stream, m_start,
                      P + start + offs_n0, p_drop, inv_keep, UPCAST, IEEE, False, DROPOUT)
    for start in range(mid, end, BLOCK_N):
        offs_n = start + offs_n0
        n_ok, ok = _seq_mask(KPM, b, S, offs_m, offs_n, end, L, HAS_KPM, CAUSAL)
        kt, vt = _load_kv(K, V, kv_base + tl.cast(start, tl.int64) * sk_l + kv_tile, n_ok[:, None] & d_ok[None, :],
                          UPCAST)
        dq = _dq_step(q, do, kt, vt, ok & m_ok[:, None], lse2, delta, dq, qk_scale2, K, seed, stream, m_start,
                      P + offs_n, p_drop, inv_keep, UPCAST, IEEE, True, DROPOUT)

    dq = dq * scale
    dq_off = b.to(tl.int64) * sdq_b + h.to(tl.int64) * sdq_h + offs_m.to(tl.int64)[:, None] * sdq_l + offs_d[None, :]
    tl.store(DQ + dq_off, dq.to(DQ.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])


@triton.jit
def _dropout_keep_kernel(SEED, KEEP, Hq, L, NCOLS, p_drop, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """KEEP (B, Hq, L, NCOLS) int8: 1 where the kernels keep the weight of query row i on key column j
    under SEED and p_drop, 0 where they drop it (the draws of :func:`_dropout_uniform`)."""
    h = tl.program_id(1)
    b = tl.program_id(2)
    seed, stream = _dropout_stream(SEED, b, h, Hq, True)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    base = KEEP + ((b.to(tl.int64) * Hq + h) * L + offs_m.to(tl.int64)[:, None]) * NCOLS
    for start in range(0, NCOLS, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        keep = _dropout_uniform(seed, stream, tl.program_id(0) * BLOCK_M, cols, BLOCK_M) >= p_drop
        tl.store(base + cols[None, :], keep.to(tl.int8), mask=(offs_m < L)[:, None] & (cols < NCOLS)[None, :])


@triton.jit
def _sum_parts_kernel(PART, OK, OV, half, splits, BLOCK: tl.constexpr, SPLIT_BLOCK: tl.constexpr):
    """Adds the rows of the (splits, 2 * half) fp32 buffer in a fixed order (the same bits every run:
    SPLIT_BLOCK running sums per column, one tile of rows at a time, then one tree sum over them) and
    writes elements [0, half) to OK and [half, 2 * half) to OV, each in its own dtype. A tile of rows per
    step keeps many loads in flight however many splits there are."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    # in int64 (half comes as int32 below 2**31: 2 * half wrapped negative from 2**30, and nothing was stored)
    total = tl.full((), 2, tl.int64) * half
    m = i < total
    r0 = tl.arange(0, SPLIT_BLOCK)
    acc = tl.zeros((SPLIT_BLOCK, BLOCK), dtype=tl.float32)
    for start in range(0, splits, SPLIT_BLOCK):
        r = start + r0
        acc += tl.load(PART + r.to(tl.int64)[:, None] * total + i[None, :], mask=(r < splits)[:, None] & m[None, :],
                       other=0.0)
    acc_sum = tl.sum(acc, 0)
    tl.store(OK + i, acc_sum.to(OK.dtype.element_ty), mask=m & (i < half))
    tl.store(OV + (i - half), acc_sum.to(OV.dtype.element_ty), mask=m & (i >= half))


# ---------------------------------------------------------------------------------------------------
# Host side.

def _block_d(D: int) -> int:
    return max(16, next_power_of_2(D))


def _config(D: int, backward: bool, dtype=torch.float16, dropout: bool = False):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) without autotuning (the interpreter, float32, and
    PET_FAST_AUTOTUNE=0), and the first tile the autotuner tries. Small blocks under the interpreter keep
    tests fast while still crossing block boundaries. On sm_90 (benchmarks/compile_check_kernels.py,
    cuobjdump): these tiles and those of the autotuner's lists below fit the shared memory and do not spill
    registers (the 32x128 head-dim-128 dk/dv: 24 bytes; with strides past 2**31, the 64x64 4-warp head-dim-128
    forward: 24); with 4 warps the 128-row forward (88 bytes), and
    the backward at head dim 64 with 64x64 tiles (64 bytes), spill.
    fp32 dots in IEEE precision run on the FMA units with whole operand tiles in registers: the
    tensor-core tiles spill 8-17 KB per thread there, hence the small fp32 tiles.
    Attention dropout's draws take registers: with it the head-dim-64 backward (dk/dv: 88-128 bytes) and
    the head-dim-128 forward (24 bytes) would spill at these tiles, and take others that do not (every
    head-dim class's dropout tiles compiled without spills; the head-dim-32 backward would spill 120 bytes
    at the head-dim-64 one)."""
    if _interpreting():
        return 16, 16, 1, 1
    bd = _block_d(D)
    if dtype == torch.float32:
        bm, bn, warps = (32, 16, 4) if bd <= 64 else (16, 16, 4) if bd <= 128 else (16, 16, 8)
        return bm, bn, warps, 1
    if backward:
        if dropout and bd == 64:
            return 64, 32, 8, 2
        return (64, 64, 8, 2) if bd <= 64 else (64, 32, 8, 2) if bd <= 128 else (32, 32, 8, 1)
    if dropout and 64 < bd <= 128:
        return 128, 32, 8, 3
    return (128, 64, 8, 3) if bd <= 64 else (64, 64, 4, 3) if bd <= 128 else (64, 32, 8, 2)


# Tiles the autotuner tries for fp16/bf16 on a GPU, per BLOCK_D class (<= 64, 128, 256), after the default
# of _config: (BLOCK_M, BLOCK_N, num_warps, num_stages). The forward's 16-row tiles are for decoding (a few
# query rows; the pruner keeps them only there). The dk/dv kernel holds a BLOCK_N key tile and steps over
# queries, the dq kernel the other way round: flash-attention-2's long key tiles and short query steps.
_FWD_TILES = {
    64: [(64, 64, 4, 4), (64, 128, 8, 3), (16, 64, 4, 3), (16, 128, 4, 3)],
    128: [(128, 64, 8, 3), (128, 32, 8, 3), (64, 32, 4, 3), (16, 64, 4, 3)],
    256: [(32, 32, 4, 2), (16, 32, 4, 2)],
}
_DKDV_TILES = {
    64: [(32, 128, 8, 3), (64, 128, 8, 3), (32, 64, 4, 3)],
    128: [(32, 64, 8, 2), (16, 128, 8, 2), (32, 128, 8, 2)],  # the last spills 24 bytes: a 128-key tile
    256: [(16, 32, 4, 1)],
}
_DQ_TILES = {
    64: [(128, 32, 4, 3), (128, 64, 8, 2), (64, 32, 4, 3)],
    128: [(128, 32, 8, 2), (128, 64, 8, 2), (64, 64, 8, 2)],
    256: [(32, 32, 4, 1)],
}


def _tile_class(bd: int) -> int:
    return 64 if bd <= 64 else 128 if bd <= 128 else 256


def _class_tiles(extra: dict, backward: bool) -> dict:
    """BLOCK_D class -> its tiles: _config's default first, then the extra ones."""
    return {cls: list(dict.fromkeys([_config(cls, backward)] + tiles)) for cls, tiles in extra.items()}


def _tile_configs(tiles: dict) -> list:
    unique = dict.fromkeys(t for ts in tiles.values() for t in ts)
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st) for bm, bn, w, st in unique]


def _prune(tiles: dict, few_rows_tiles: bool):
    def prune(configs, named_args, **kwargs):
        """Keep the tiles of the call's BLOCK_D class; in the forward, 16-row tiles only for up to 16 query
        rows, and only those there (decoding), 128-row tiles only from 128 rows on."""
        mine = set(tiles[_tile_class(kwargs.get("BLOCK_D", named_args.get("BLOCK_D", 64)))])
        kept = [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in mine]
        if few_rows_tiles:
            rows = named_args["L"]
            if rows <= 16:
                kept = [c for c in kept if c.kwargs["BLOCK_M"] == 16] or kept
            else:
                kept = [c for c in kept if c.kwargs["BLOCK_M"] > 16 and (c.kwargs["BLOCK_M"] < 128 or rows >= 128)] \
                    or kept
        return kept
    return prune


def _autotuned(kernel, extra: dict, backward: bool, few_rows_tiles: bool = False):
    tiles = _class_tiles(extra, backward)
    params = {p.name for p in _replay._jit_function(kernel).params}
    return triton.autotune(_tile_configs(tiles), key=[k for k in _TUNE_KEY if k in params],
                           prune_configs_by={"early_config_prune": _prune(tiles, few_rows_tiles)})(kernel)


# Every constexpr that is not a tile size is in the key (EVEN_D, UPCAST, IEEE and SCAN follow from the others).
_TUNE_KEY = ["D", "tune_l", "tune_s", "HAS_KPM", "CAUSAL", "BLOCK_D", "DROPOUT", "EVEN_D", "UPCAST", "IEEE", "SCAN"]
_fwd_tuned = _autotuned(_fwd_kernel, _FWD_TILES, False, few_rows_tiles=True)
_dkdv_tuned = _autotuned(_bwd_dkdv_kernel, _DKDV_TILES, True)
_dq_tuned = _autotuned(_bwd_dq_kernel, _DQ_TILES, True)


def _tuned(dtype: torch.dtype, block_m) -> bool:
    """Autotune fp16/bf16 calls on a GPU unless a tile is forced (or PET_FAST_AUTOTUNE=0)."""
    return autotuning() and dtype != torch.float32 and block_m is None


# Bytes of the key padding mask the key-range scan reads per step: one constant on a GPU (a compile-time
# constant: each value would be one more compile per tile); small under the interpreter, so that the tests'
# short rows take several steps.
_SCAN = 32 if _INTERPRET else 1024


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


def _dropout_args(dropout_p: float, seed: torch.Tensor | None, device) -> tuple:
    """(seed pointer, p_drop, 1 / (1 - p_drop), DROPOUT) of a launch: the seed tensor (int64, one element
    read on the device, so that CUDA graphs and compiled code draw a new mask per step from torch's
    generator) under dropout, else an unread placeholder."""
    if dropout_p <= 0.0:
        return _replay.empty((1,), torch.int64, device), 0.0, 1.0, False
    if seed is None:
        raise ValueError("dropout_p > 0 needs a seed tensor (int64, one element, on the inputs' device)")
    return seed, float(dropout_p), 1.0 / (1.0 - float(dropout_p)), True


def dropout_keep(seed: torch.Tensor, shape: tuple, dropout_p: float) -> torch.Tensor:
    """Bool (B, Hq, L, P + S) of ``shape``: which attention weights the kernels keep under ``seed`` and
    ``dropout_p`` (key columns 0..P-1 the prefix, then the sequence). For tests and references: the
    kernels themselves store no mask."""
    B, Hq, L, ncols = shape
    keep = torch.empty((B, Hq, L, ncols), dtype=torch.int8, device=seed.device)
    if keep.numel():
        _dropout_keep_kernel[(cdiv(L, 64), Hq, B)](seed, keep, Hq, L, ncols, float(dropout_p), BLOCK_M=64, BLOCK_N=64,
                                                   **FP_FUSION)
    return keep.bool()


# Layouts, shared with the merged path (prefix_attention_merge.py). Inputs are read through their strides;
# outputs and q, k, v's gradients are (B, H, L, D) views of (B, L, H, D) memory: the layout in which torch's
# flash and cuDNN kernels return theirs for projections' q, k, v, and in which an attention layer wants the
# output back (``out.transpose(1, 2)`` is then contiguous, and the gradients reach the projections without
# a copy).

def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when its last dim is contiguous (the kernels read any batch, head and row strides: the
    (B, L, H, D) memory of projections seen as (B, H, L, D) is read in place), else a contiguous copy."""
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _keys(k: torch.Tensor, v: torch.Tensor):
    """k and v with one set of strides between them (the kernels read both at one offset): in place when
    they already share them (two projections' outputs), else contiguous copies."""
    k, v = _rows(k), _rows(v)
    if k.stride() != v.stride():
        k, v = k.contiguous(), v.contiguous()
    return k, v


def blhd_strides(B: int, H: int, L: int, D: int) -> tuple:
    """The strides of a (B, H, L, D) view of (B, L, H, D) memory."""
    return (L * H * D, D, H * D, 1)


def in_blhd(t: torch.Tensor) -> torch.Tensor:
    """``t`` (B, H, L, D) itself when its memory is (B, L, H, D) (:func:`blhd_strides`), else a copy so laid out."""
    B, H, L, D = t.shape
    if t.stride() == blhd_strides(B, H, L, D):
        return t
    return torch.empty((B, L, H, D), dtype=t.dtype, device=t.device).transpose(1, 2).copy_(t)


def blhd_empty(shape, dtype, device) -> torch.Tensor:
    """The (B, L, H, D) memory of an output or gradient of (B, H, L, D) ``shape``, allocated through the
    replay's recorder and returned as allocated (what a program returns: callers transpose it)."""
    B, H, L, D = shape
    return _replay.empty((B, L, H, D), dtype, device)


def _bhl(t: torch.Tensor) -> tuple:
    """(batch, head, row) strides of a (B, H, L, D) tensor."""
    return t.stride(0), t.stride(1), t.stride(2)


def supported_head_dim(D: int) -> bool:
    return 1 <= D <= MAX_HEAD_DIM


def _launch_args(q, D: int, backward: bool, block_m, block_n, dropout: bool = False):
    """(autotuned?, keyword arguments) shared by the forward and the backward: the autotuner picks the tile
    of fp16/bf16 GPU calls, _config (or the forced block_m/block_n) the others. The grids read the tile from
    the launch's meta-parameters either way."""
    common = dict(BLOCK_D=_block_d(D), EVEN_D=_block_d(D) == D, UPCAST=_interpreting(),
                  IEEE=q.dtype == torch.float32 and not _interpreting())
    if _tuned(q.dtype, block_m):
        return True, common
    bm, bn, warps, stages = _config(D, backward=backward, dtype=q.dtype, dropout=dropout)
    common.update(BLOCK_M=block_m or bm, BLOCK_N=block_n or bn, num_warps=warps, num_stages=stages)
    return False, common


_FORWARD_PROGRAMS: dict = _replay.register_cache({})


def forward(q, k, v, prefix_k=None, prefix_v=None, key_padding_mask=None, causal=False, scale=None,
            block_m=None, block_n=None, dropout_p=0.0, seed=None):
    """Returns ``(out, lse)``: ``out`` (B, Hq, L, D) in (B, L, Hq, D) memory (:func:`blhd_empty`); ``lse``
    (B, Hq, L) fp32, natural log, ``+inf`` on rows that see no key. q, k and v are read in place when their
    last dim is contiguous (k and v with the same strides). With ``dropout_p`` > 0 each attention weight
    is dropped with that probability (the kept ones scaled by 1 / (1 - dropout_p)), drawn from ``seed``
    (int64, one element on q's device; :func:`dropout_keep` shows the draws); ``lse`` is the undropped softmax's. Calls
    with a key seen before replay the launch from C++ (kernels/_replay.py): decoding a few tokens is bound
    by the host."""
    q = _rows(q)
    k, v = _keys(k, v)
    args = (q, k, v, prefix_k, prefix_v, key_padding_mask, causal, scale, block_m, block_n, dropout_p, seed)
    if not _replay.active(q):
        out, lse = _forward(*args)
    else:
        key = forward_key(*args)
        out, lse = _replay.call(_FORWARD_PROGRAMS, key, [q, k, v, prefix_k, prefix_v, key_padding_mask, seed],
                                _forward, *args, single=False)
    return out.transpose(1, 2), lse


def forward_key(q, k, v, prefix_k, prefix_v, key_padding_mask, causal, scale, block_m=None, block_n=None,
                dropout_p=0.0, seed=None) -> tuple:
    """The replay key of a forward call (after :func:`forward` has laid out q, k, v): the kernels take
    q's and k's strides as arguments."""
    return _replay.key_of(q, k, v, prefix_k, prefix_v, key_padding_mask, bool(causal), scale, block_m, block_n,
                          float(dropout_p), seed) + (q.stride(), k.stride())


def positive_scale(scale, D: int) -> float:
    """The softmax scale a launch takes (D ** -0.5 for None). The kernels apply it to the row max of the
    unscaled scores, as flash attention does, which holds for a scale > 0 only: others raise ValueError
    (the op sends them to its eager backend)."""
    scale = D ** -0.5 if scale is None else float(scale)
    if not scale > 0:
        raise ValueError(f"scale must be > 0 for the Triton prefix-attention kernels, got {scale}")
    return scale


def _forward(q, k, v, prefix_k=None, prefix_v=None, key_padding_mask=None, causal=False, scale=None,
             block_m=None, block_n=None, dropout_p=0.0, seed=None):
    """:func:`forward` with q, k and v as it makes them; returns the output as allocated, (B, L, Hq, D)."""
    B, Hq, L, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    scale = positive_scale(scale, D)
    out = blhd_empty(q.shape, q.dtype, q.device)
    lse = _replay.empty((B, Hq, L), torch.float32, q.device)
    if out.numel() == 0:
        _replay.unrecordable("no output: the log-sum-exp is filled by torch")
        return out, lse.fill_(float("inf"))
    pk, P, spk_b, spk_h = _prefix_args(prefix_k, B, Hkv, D, q)
    pv, _, _, _ = _prefix_args(prefix_v, B, Hkv, D, q)
    kpm, has_kpm = _kpm_args(key_padding_mask, q.device)
    seed, p_drop, inv_keep, dropout = _dropout_args(dropout_p, seed, q.device)
    tuned, kw = _launch_args(q, D, False, block_m, block_n, dropout)
    _replay.launch(
        _fwd_tuned if tuned else _fwd_kernel, lambda meta: (cdiv(L, meta["BLOCK_M"]), Hq, B),
        q, _nonempty(k), _nonempty(v), pk, pv, kpm, out, lse, seed,
        scale * LOG2E, p_drop, inv_keep, Hq, Hq // Hkv, L, S, P, D, spk_b, spk_h, *_bhl(q), *_bhl(k),
        *blhd_strides(B, Hq, L, D)[:3],
        n_bucket(L), n_bucket(S), HAS_KPM=has_kpm, CAUSAL=bool(causal), SCAN=_SCAN, DROPOUT=dropout, **kw)
    return out, lse


_BACKWARD_PROGRAMS: dict = _replay.register_cache({})


def backward(grad_out, q, k, v, prefix_k, prefix_v, key_padding_mask, out, lse, causal=False, scale=None,
             block_m=None, block_n=None, dropout_p=0.0, seed=None):
    """Returns ``(dq, dk, dv, d_prefix_k, d_prefix_v)``: dq, dk and dv in (B, L, H, D) memory
    (:func:`blhd_empty`), the prefix gradients in the prefix's shape (summed over the batch when it is
    shared), None without a prefix. q, k, v, dO and O are read in place when their last dim is contiguous
    (and dO laid out as q, as an attention layer's are: else both are copied). ``dropout_p`` and ``seed``
    must be the forward's: the kernels draw the same numbers again.
    Four launches: ``delta = rowsum(dO * O)``, dk/dv (and the prefix's fp32 partials), dq, and the
    partials' sum into the prefix's dtype in a fixed order; every gradient is written whole by the kernels
    (no zero fill), except when there is nothing to attend (zeros, from torch). Calls with a key seen
    before replay the launches from C++ (kernels/_replay.py)."""
    q, grad_out, out, lse = _rows(q), _rows(grad_out), _rows(out), lse.contiguous()
    if grad_out.stride() != q.stride():  # the kernels read both at one offset
        q, grad_out = q.contiguous(), grad_out.contiguous()
    k, v = _keys(k, v)
    args = (grad_out, q, k, v, prefix_k, prefix_v, key_padding_mask, out, lse, causal, scale, block_m, block_n,
            dropout_p, seed)
    if not _replay.active(q):
        grads = _backward(*args)
    else:
        key = backward_key(*args)
        grads = _replay.call(_BACKWARD_PROGRAMS, key, [grad_out, q, k, v, prefix_k, prefix_v, key_padding_mask, out,
                                                       lse, seed], _backward, *args, single=False)
    dq, dk, dv, dpk, dpv = grads
    return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2), dpk, dpv


def backward_key(grad_out, q, k, v, prefix_k, prefix_v, key_padding_mask, out, lse, causal, scale, block_m=None,
                 block_n=None, dropout_p=0.0, seed=None) -> tuple:
    """The replay key of a backward call (after :func:`backward` has laid out its inputs), strides included."""
    return _replay.key_of(grad_out, q, k, v, prefix_k, prefix_v, key_padding_mask, out, lse, bool(causal), scale,
                          block_m, block_n, float(dropout_p), seed) + tuple(t.stride() for t in (grad_out, q, k, out))


def _backward(grad_out, q, k, v, prefix_k, prefix_v, key_padding_mask, out, lse, causal, scale, block_m, block_n,
              dropout_p=0.0, seed=None):
    """:func:`backward` with its inputs as it makes them; dq, dk, dv returned as allocated, (B, L, H, D)."""
    B, Hq, L, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G = Hq // Hkv
    scale = positive_scale(scale, D)
    has_prefix = prefix_k is not None
    P = prefix_k.shape[-2] if has_prefix else 0
    dq = blhd_empty(q.shape, q.dtype, q.device)
    dk, dv = (blhd_empty(t.shape, t.dtype, t.device) for t in (k, v))
    shared = has_prefix and prefix_k.dim() == 3
    dpk = _replay.empty(prefix_k.shape, prefix_k.dtype, q.device) if has_prefix else None
    dpv = _replay.empty(prefix_v.shape, prefix_v.dtype, q.device) if has_prefix else None
    if B * Hq * L == 0 or B * Hkv * (S + P) == 0:  # nothing to attend: zero gradients
        _replay.unrecordable("no attention: the gradients are zero-filled by torch")
        return tuple(None if t is None else t.zero_() for t in (dq, dk, dv, dpk, dpv))
    half = Hkv * P * D  # one batch's prefix gradient
    # the prefix's fp32 partials: per batch one row [d_prefix_k | d_prefix_v] when the prefix is shared (rows
    # summed over the batch), else one row [every batch's d_prefix_k | every batch's d_prefix_v] (cast only)
    part = _replay.empty((B, 2, half) if shared else (2, B, half), torch.float32, q.device)
    dpk_part, dpv_part = (part[:, 0], part[:, 1]) if shared else (part[0], part[1])
    sdp_b = 2 * half if shared else half
    delta = _replay.empty((B, Hq, L), torch.float32, q.device)
    rows = B * Hq * L
    _replay.launch(_delta_kernel, (cdiv(rows, 64),), out, grad_out, delta, rows, Hq, L, D, *_bhl(out),
                   *_bhl(grad_out), BLOCK_R=64, BLOCK_D=_block_d(D))
    pk, P, spk_b, spk_h = _prefix_args(prefix_k, B, Hkv, D, q)
    pv, _, _, _ = _prefix_args(prefix_v, B, Hkv, D, q)
    kpm, has_kpm = _kpm_args(key_padding_mask, q.device)
    seed, p_drop, inv_keep, dropout = _dropout_args(dropout_p, seed, q.device)
    tuned, kw = _launch_args(q, D, True, block_m, block_n, dropout)
    sizes = (n_bucket(L), n_bucket(S))
    flags = dict(HAS_KPM=has_kpm, CAUSAL=bool(causal), DROPOUT=dropout, **kw)
    qk_scale2 = scale * LOG2E
    _replay.launch(
        _dkdv_tuned if tuned else _bwd_dkdv_kernel,
        lambda meta: (cdiv(P, meta["BLOCK_N"]) + cdiv(S, meta["BLOCK_N"]), Hkv, B),
        q, _nonempty(k), _nonempty(v), pk, pv, grad_out, lse, delta, kpm, _nonempty(dk), _nonempty(dv),
        _nonempty(dpk_part), _nonempty(dpv_part), seed, qk_scale2, scale, p_drop, inv_keep,
        Hq, G, L, S, P, D, *_bhl(k), *blhd_strides(B, Hkv, S, D)[:3], *_bhl(q), spk_b, spk_h, sdp_b, P * D,
        *sizes, **flags)
    _replay.launch(
        _dq_tuned if tuned else _bwd_dq_kernel, lambda meta: (cdiv(L, meta["BLOCK_M"]), Hq, B),
        q, _nonempty(k), _nonempty(v), pk, pv, kpm, grad_out, lse, delta, dq, seed, qk_scale2, scale, p_drop, inv_keep,
        Hq, G, L, S, P, D, spk_b, spk_h, *_bhl(q), *_bhl(k), *blhd_strides(B, Hq, L, D)[:3], *sizes, SCAN=_SCAN,
        **flags)
    if has_prefix and P > 0:
        splits, width = (B, 2 * half) if shared else (1, 2 * B * half)
        block, split_block = (128, 4) if _interpreting() else (128, 32)
        _replay.launch(_sum_parts_kernel, (cdiv(width, block),), part, dpk, dpv, width // 2, splits, BLOCK=block,
                       SPLIT_BLOCK=split_block, num_warps=4)
    return dq, dk, dv, dpk, dpv
