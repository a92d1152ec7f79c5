"""Attention over ``[prefix; keys]`` as torch's attention (cuDNN or flash) over the sequence plus a Triton merge.

The sequence part (the L x S scores) goes to PyTorch's own kernels: on CUDA cuDNN's attention
(``aten::_scaled_dot_product_cudnn_attention`` and its backward, which recent torch's SDPA prefers on an
H100 with a recent cuDNN) where a one-time probe finds that it runs and the merged path through it matches a float32
reference (:func:`sequence_backend`), else flash attention (``aten::_scaled_dot_product_flash_attention``);
the ``_for_cpu`` flash variants on the CPU. Only the small L x P prefix part is computed here, in two
Triton kernels:

Forward, ``_merge_fwd_kernel``, one program per (query tile, head, batch): it computes the tile's
prefix scores from the prefix keys/values read from their own tensors (batch stride 0 when shared by
the batch), runs its own max and sum over them (fp32, base 2), reads the flash output ``o_s`` and
log-sum-exp ``lse_s`` of the same rows and writes

    lse = logaddexp(lse_s, lse_p)
    o   = exp(lse_s - lse) * o_s + sum_p exp(s_p - lse) v_p

Why the merge is exact: the softmax over the union of two key sets has the normaliser
``exp(lse) = exp(lse_s) + exp(lse_p)``; ``o_s`` is the sequence part's average of the values under its
own normaliser ``exp(lse_s)``, so ``exp(lse_s - lse) * o_s`` re-weights it to the joint one, and the
prefix terms are added with the joint normaliser directly. Only roundings differ from one softmax
over the concatenation (``o_s`` is rounded to q's dtype once by the flash kernel).

What the forward saves (ops/prefix_attention.py): q, k, v, the prefix, and the MERGED output and
log-sum-exp (nothing of ``o_s`` / ``lse_s``). The flash (or cuDNN) backward called with the merged ``o`` and
``lse`` computes ``P = exp(s - lse)`` (the joint softmax's probabilities on the sequence keys) and
``D = rowsum(dO * o)`` (the joint softmax's term), so its ``dq_s``, ``dk``, ``dv`` are exactly those
of the joint attention restricted to the sequence keys. The prefix remainder is
``_merge_bwd_kernel``, one program per (query tile, head, batch): ``P = exp(s_p - lse)``,
``D = rowsum(dO * o)``, ``dS = P * (dO v_p^T - D)``, ``dq = dq_s + scale * dS pk``, and fp32 partial
sums ``scale * dS^T q`` and ``P^T dO`` of the prefix gradients per program, written to a buffer and
added by ``_sum_parts_kernel`` in a fixed order (the same bits every run; no atomics), over the
query tiles, and over the batch when the prefix is shared.

Scope (checked by the caller, pet_fast/ops/prefix_attention.py): no key padding mask, as many
key/value heads as query heads, non-causal or causal with L == S (flash's causal mask is top-left
aligned, equal to the op's bottom-right one only there), L, S >= 1, D % 8 == 0 and D <= 256; fp16/bf16
on CUDA (sm80+), and on the CPU under ``TRITON_INTERPRET=1`` for the tests. The flash path ran on an
H100 (the GPU tests of the third GPU session); the cuDNN one has not run on a GPU yet. The flash
backward on CUDA accumulates ``dq`` with atomics, so its ``dq``/``dk``/``dv`` follow torch's own
determinism setting, and with deterministic algorithms on cuDNN is not used (as torch's SDPA does);
the prefix gradients are reduced here in a fixed order. q, k, v and dO are
read through their strides when their rows are contiguous (no copy of the (B, L, H, D) layout of
projections); the output, dq, dk and dv are returned as (B, H, L, D) views of (B, L, H, D) memory, the
layout torch's kernels give for such inputs and the one attention layers transpose back: the layer's
``out.transpose(1, 2)`` and the projections' gradients then need no copy (dk/dv are copied only when
torch's kernels give another layout).
"""
from __future__ import annotations

import os
import warnings

import torch
import triton
import triton.language as tl

from . import _replay
from ._host import cdiv, next_power_of_2

from .prefix_attention import LOG2E, _interpreting  # shared with the op's own kernels
from .prefix_attention import _dot as _mm, _load_kv, _online_softmax_step, _sum_parts_kernel, positive_scale
from .prefix_attention import _rows, in_blhd  # the layouts both paths share


@triton.jit
def _merge_tile(Q, b, h, L, D, sq_b, sq_h, sq_l, spk_b, spk_h,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr):
    """Set-up of a program owning BLOCK_M query rows of head h in batch b (forward and backward): row and
    column ranges and masks, int64 rows/batch/head, the query tile (upcast under UPCAST), the prefix's
    base offset and the offsets inside one prefix block."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n0 = tl.arange(0, BLOCK_N)
    m_ok = offs_m < L
    d_ok = offs_d < D
    rows = offs_m.to(tl.int64)
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    md_mask = m_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b64 * sq_b + h64 * sq_h + rows[:, None] * sq_l + offs_d[None, :], mask=md_mask, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    p_base = b64 * spk_b + h64 * spk_h
    kv_tile = offs_n0[:, None] * D + offs_d[None, :]
    return offs_d, offs_n0, m_ok, d_ok, rows, b64, h64, md_mask, q, p_base, kv_tile


@triton.jit
def _blhd_offsets(b64, h64, rows, offs_d, H, L, D):
    """Offsets of rows ``rows`` (int64) of head h in batch b in (B, L, H, D) memory: the merged path's output
    and dq (computed from the sizes, not passed strides: fewer live registers in the backward)."""
    return (b64 * L + rows[:, None]) * (H * D) + h64 * D + offs_d[None, :]


@triton.jit
def _merge_fwd_kernel(
    Q, PK, PV, OS, LSES, O, LSE,
    qk_scale2,  # scale * log2(e)
    H, L, P, D,
    sq_b, sq_h, sq_l,  # strides of q (its last dim is contiguous)
    sos_b, sos_h, sos_l,  # strides of o_s (its last dim is contiguous; the output is (B, L, H, D) memory)
    sls_b, sls_h, sls_l,  # strides of lse_s
    spk_b, spk_h,  # prefix strides (batch stride 0 when shared); rows D apart
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    h = tl.program_id(1)
    b = tl.program_id(2)
    offs_d, offs_n0, m_ok, d_ok, rows, b64, h64, md_mask, q, p_base, kv_tile = _merge_tile(
        Q, b, h, L, D, sq_b, sq_h, sq_l, spk_b, spk_h, BLOCK_M, BLOCK_N, BLOCK_D, UPCAST)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, P, BLOCK_N):
        n_ok = (start + offs_n0) < P
        # the op's own online-softmax step (P >= 1: every row sees the first prefix key, m_i is finite)
        kt, vt = _load_kv(PK, PV, p_base + tl.cast(start, tl.int64) * D + kv_tile, n_ok[:, None] & d_ok[None, :],
                          UPCAST)
        m_i, l_i, acc = _online_softmax_step(q, kt, vt, n_ok[None, :], m_i, l_i, acc, qk_scale2, PV, 0, 0, 0, 0, 0.0,
                                             UPCAST, IEEE, False)

    lse_s2 = tl.load(LSES + b64 * sls_b + h64 * sls_h + rows * sls_l, mask=m_ok, other=0.0) * 1.4426950408889634
    lse_p2 = m_i + tl.log2(l_i)
    top = tl.maximum(lse_s2, lse_p2)
    lse2 = top + tl.log2(tl.exp2(lse_s2 - top) + tl.exp2(lse_p2 - top))
    w_s = tl.exp2(lse_s2 - lse2)
    w_p = tl.exp2(m_i - lse2)  # acc holds sum_p exp2(s_p - m_i) v_p
    o_s = tl.load(OS + b64 * sos_b + h64 * sos_h + rows[:, None] * sos_l + offs_d[None, :],
                  mask=md_mask, other=0.0).to(tl.float32)
    out = w_s[:, None] * o_s + w_p[:, None] * acc
    tl.store(O + _blhd_offsets(b64, h64, rows, offs_d, H, L, D), out.to(O.dtype.element_ty), mask=md_mask)
    tl.store(LSE + (b64 * H + h64) * L + rows, lse2 * 0.6931471805599453, mask=m_ok)


@triton.jit
def _merge_bwd_kernel(
    Q, PK, PV, DO, O, LSE, DQS, DQ, PART,
    qk_scale2, scale,
    H, L, P, D,
    sq_b, sq_h, sq_l,  # strides of q
    sdo_b, sdo_h, sdo_l,  # strides of dO
    sdq_b, sdq_h, sdq_l,  # strides of the flash backward's dq (every last dim is contiguous; o and the dq
    # written here are (B, L, H, D) memory: _blhd_offsets)
    spk_b, spk_h,
    spart_m, spart_b, spart_w,  # part buffer strides: query tile, batch, which (0: d_prefix_k, 1: d_prefix_v)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    offs_d, offs_n0, m_ok, d_ok, rows, b64, h64, md_mask, q, p_base, kv_tile = _merge_tile(
        Q, b, h, L, D, sq_b, sq_h, sq_l, spk_b, spk_h, BLOCK_M, BLOCK_N, BLOCK_D, UPCAST)
    bh = b64 * H + h64
    do = tl.load(DO + b64 * sdo_b + h64 * sdo_h + rows[:, None] * sdo_l + offs_d[None, :], mask=md_mask, other=0.0)
    if UPCAST:
        do = do.to(tl.float32)
    o = tl.load(O + _blhd_offsets(b64, h64, rows, offs_d, H, L, D), mask=md_mask, other=0.0).to(tl.float32)
    delta = tl.sum(do.to(tl.float32) * o, 1)
    lse2 = tl.load(LSE + bh * L + rows, mask=m_ok, other=0.0) * 1.4426950408889634
    part_base = pid_m.to(tl.int64) * spart_m + b64 * spart_b + h64 * P * D
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, P, BLOCK_N):
        n_ok = (start + offs_n0) < P
        kv_mask = n_ok[:, None] & d_ok[None, :]
        kt, vt = _load_kv(PK, PV, p_base + tl.cast(start, tl.int64) * D + kv_tile, kv_mask, UPCAST)
        s = _mm(q, tl.trans(kt), IEEE) * qk_scale2
        p = tl.where(m_ok[:, None] & n_ok[None, :], tl.exp2(s - lse2[:, None]), 0.0)
        dp = _mm(do, tl.trans(vt), IEEE)
        ds = p * (dp - delta[:, None])
        dsc = ds.to(Q.dtype.element_ty)
        pc = p.to(DO.dtype.element_ty)
        if UPCAST:
            dsc = dsc.to(tl.float32)
            pc = pc.to(tl.float32)
        dq += _mm(dsc, kt, IEEE)
        dpk = _mm(tl.trans(dsc), q, IEEE) * scale  # (BLOCK_N, BLOCK_D)
        dpv = _mm(tl.trans(pc), do, IEEE)
        g_off = part_base + tl.cast(start, tl.int64) * D + kv_tile
        tl.store(PART + g_off, dpk, mask=kv_mask)
        tl.store(PART + spart_w + g_off, dpv, mask=kv_mask)
    dq_s = tl.load(DQS + b64 * sdq_b + h64 * sdq_h + rows[:, None] * sdq_l + offs_d[None, :],
                   mask=md_mask, other=0.0).to(tl.float32)
    tl.store(DQ + _blhd_offsets(b64, h64, rows, offs_d, H, L, D), (dq_s + dq * scale).to(DQ.dtype.element_ty),
             mask=md_mask)


# ---------------------------------------------------------------------------------------------------
# Host side.

def _block_d(D: int) -> int:
    return max(16, next_power_of_2(D))


def _config(D: int, P: int, backward: bool):
    """(BLOCK_M, BLOCK_N, num_warps). Untimed on a GPU (a first guess: the prefix loop is short, the
    query tile is the whole work); for sm_90 every head dim 32..256 at P = 20 and 64 compiles without
    register spills (benchmarks/compile_check_kernels.py --only prefix_merge, cuobjdump). The
    backward's partial-sum buffer holds ceil(L / BLOCK_M) copies of the prefix gradients, hence its
    large query tile at small head dims."""
    if _interpreting():
        return 16, 16, 1
    bn = min(64, max(16, next_power_of_2(max(P, 1))))
    bd = _block_d(D)
    if backward:
        return (128, min(bn, 32), 8) if bd <= 64 else (64, 16, 8) if bd <= 128 else (32, 16, 8)
    return (128, bn, 8) if bd <= 64 else (64, bn, 8) if bd <= 128 else (32, min(bn, 32), 8)


def _prefix(prefix: torch.Tensor, H: int, D: int):
    """(P, batch stride, head stride) of a contiguous (H, P, D) or (B, H, P, D) prefix."""
    P = prefix.shape[-2]
    return P, (0 if prefix.dim() == 3 else H * P * D), P * D


def _flash_forward(q, k, v, causal: bool, scale: float):
    """(o_s, lse_s (B, H, L), natural log) of the sequence part from torch's own kernels: cuDNN's attention
    where :func:`sequence_backend` chose it, else flash attention (the ``_for_cpu`` variant on the CPU)."""
    if q.device.type == "cuda":
        if sequence_backend(q, causal) == "cudnn":
            try:
                res = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, causal, False,
                                                                         scale=scale)
                return res[0], res[1].squeeze(-1)
            except RuntimeError as exc:
                _cudnn_refused(q, causal, exc)
        res = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)
        return res[0], res[1]
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)


def _flash_backward(grad_out, q, k, v, out, lse, causal: bool, scale: float):
    """(dq_s, dk, dv) of the sequence part, given the MERGED output and log-sum-exp: either backend
    recomputes P = exp(s - lse) and D = rowsum(dO * out) from what it is given."""
    if q.device.type == "cuda":
        unused = torch.empty((), dtype=torch.long, device=q.device)  # no dropout: the philox state is not read
        if sequence_backend(q, causal) == "cudnn":
            try:
                return torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
                    grad_out, q, k, v, out, lse.unsqueeze(-1), unused, unused, None, None, None, q.shape[2],
                    k.shape[2], 0.0, causal, scale=scale)
            except RuntimeError as exc:
                _cudnn_refused(q, causal, exc)
        # dense (not varlen) call: no cumulative lengths
        return torch.ops.aten._scaled_dot_product_flash_attention_backward(
            grad_out, q, k, v, out, lse, None, None, q.shape[2], k.shape[2], 0.0, causal, unused, unused,
            scale=scale)
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        grad_out, q, k, v, out, lse, 0.0, causal, scale=scale)


# (device index, dtype, head dim, causal) -> "cudnn" or "flash", decided by one probe each
_SEQUENCE_BACKEND: dict = {}


def sequence_backend(q: torch.Tensor, causal: bool) -> str:
    """Which of torch's kernels computes the sequence part on CUDA: cuDNN's attention (recent torch's SDPA
    prefers it to flash attention on an H100 with a recent cuDNN) when PET_FAST_PREFIX_CUDNN is not 0 and a
    probe on this device, dtype, head dim and causality has shown that torch's private cuDNN ops run and
    that the whole merged path through them, forward and backward, matches a float32 reference; else
    flash attention. The probe runs once per key (not while a CUDA graph is being captured: flash then,
    and the probe waits for a later call). A later shape that cuDNN refuses moves the key to flash."""
    if os.environ.get("PET_FAST_PREFIX_CUDNN", "1") == "0" or torch.are_deterministic_algorithms_enabled():
        return "flash"  # torch's SDPA also leaves cuDNN's attention out when determinism is asked for
    key = (q.device.index, q.dtype, q.shape[-1], bool(causal))
    choice = _SEQUENCE_BACKEND.get(key)
    if choice is None:
        if torch.cuda.is_current_stream_capturing():
            return "flash"
        _SEQUENCE_BACKEND[key] = "flash"  # while probing (the probe's own calls)
        choice = _SEQUENCE_BACKEND[key] = "cudnn" if _cudnn_matches(q.device, *key[1:]) else "flash"
    return choice


def _cudnn_refused(q: torch.Tensor, causal: bool, exc: Exception) -> None:
    """A shape the probe did not see that cuDNN refuses (an error raised on the host, before any launch):
    this key's calls take flash from now on, with one warning."""
    _SEQUENCE_BACKEND[(q.device.index, q.dtype, q.shape[-1], bool(causal))] = "flash"
    warnings.warn(f"pet_fast prefix attention: cuDNN's attention refused a call ({exc}); torch's flash "
                  "attention takes the sequence part from now on", RuntimeWarning, stacklevel=3)


def _cudnn_matches(device, dtype, D: int, causal: bool) -> bool:
    """The merged path with cuDNN for the sequence against float32 attention over the concatenation, on a
    small problem in the layout projections give (B, L, H, D memory), L = S not a multiple of 128."""
    B, H, L, P = 2, 3, 136, 20
    g = torch.Generator(device=device).manual_seed(0)
    r = lambda *shape: torch.randn(*shape, generator=g, device=device, dtype=torch.float32)  # noqa: E731
    q, k, v = (r(B, L, H, D).to(dtype).transpose(1, 2) for _ in range(3))
    pk, pv, dout = r(H, P, D).to(dtype), r(H, P, D).to(dtype), r(B, L, H, D).to(dtype).transpose(1, 2)
    scale = D ** -0.5
    key = (device.index, dtype, D, bool(causal))
    try:
        _SEQUENCE_BACKEND[key] = "cudnn"
        out, lse = forward(q, k, v, pk, pv, causal, scale)
        got = (out,) + tuple(backward(dout, q, k, v, pk, pv, out, lse, causal, scale))
    except Exception:  # noqa: BLE001 - whatever stops the cuDNN route sends the calls to flash
        return False
    finally:
        _SEQUENCE_BACKEND[key] = "flash"
    # the op's forward and backward run with autograd off, and maybe under the model's autocast
    with torch.enable_grad(), torch.autocast(device.type, enabled=False):
        leaves = [t.detach().float().requires_grad_() for t in (q, k, v, pk, pv)]
        fq, fk, fv, fpk, fpv = leaves
        kk = torch.cat([fpk.expand(B, -1, -1, -1), fk], 2)
        vv = torch.cat([fpv.expand(B, -1, -1, -1), fv], 2)
        s = fq @ kk.transpose(-1, -2) * scale
        if causal:  # L == S: query i sees the prefix and keys j <= i
            seen = torch.ones(L, P + L, dtype=torch.bool, device=device).tril(P)
            s = s.masked_fill(~seen, float("-inf"))
        ref_out = s.softmax(-1) @ vv
        ref = (ref_out,) + torch.autograd.grad(ref_out, leaves, dout.float())
    ok = torch.allclose(lse.float(), s.logsumexp(-1), rtol=0, atol=3e-2)
    for a, b in zip(got, ref):
        ok = ok and bool(((a.float() - b).abs().max() <= 3e-2 * b.abs().max().clamp_min(1.0)).item())
    return ok


_MERGE_FORWARD_PROGRAMS: dict = _replay.register_cache({})
_MERGE_BACKWARD_PROGRAMS: dict = _replay.register_cache({})


def _strides(*tensors) -> tuple:
    """Part of a replay key: the merge kernels take these tensors' strides as arguments, and a key's
    contiguity flag alone does not tell two non-contiguous layouts apart."""
    return tuple(t.stride() for t in tensors)


def forward(q, k, v, prefix_k, prefix_v, causal: bool, scale: float):
    """Returns ``(out, lse)``: ``out`` (B, H, L, D) in (B, L, H, D) memory; ``lse`` (B, H, L) fp32 natural
    log. A prefix that is None (or has P = 0) leaves the flash result as it is (laid out so). The merge's
    launch is recorded once per key and replayed from C++ afterwards (kernels/_replay.py): a training step
    calls it in every layer, and the step is bound by the host."""
    B, H, L, D = q.shape
    scale = positive_scale(scale, D)
    q, k, v = _rows(q), _rows(k), _rows(v)
    o_s, lse_s = _flash_forward(q, k, v, bool(causal), scale)
    if prefix_k is None or prefix_k.shape[-2] == 0:
        return in_blhd(o_s), lse_s.contiguous()
    pk, pv = prefix_k.contiguous(), prefix_v.contiguous()
    if o_s.stride(-1) != 1:
        o_s = o_s.contiguous()
    if not _replay.active(q):
        out, lse = _merge_forward(q, pk, pv, o_s, lse_s, scale)
    else:
        key = _replay.key_of(q, pk, pv, o_s, lse_s, scale) + _strides(q, o_s, lse_s)
        out, lse = _replay.call(_MERGE_FORWARD_PROGRAMS, key, [q, pk, pv, o_s, lse_s], _merge_forward, q, pk, pv, o_s,
                                lse_s, scale, single=False)
    return out.transpose(1, 2), lse


def _merge_forward(q, pk, pv, o_s, lse_s, scale: float):
    """The merge of the flash result ``(o_s, lse_s)`` with the prefix (contiguous ``pk``/``pv``); the output
    is returned as allocated, (B, L, H, D)."""
    B, H, L, D = q.shape
    P, spk_b, spk_h = _prefix(pk, H, D)
    out = _replay.empty((B, L, H, D), q.dtype, q.device)
    lse = _replay.empty((B, H, L), torch.float32, q.device)
    bm, bn, warps = _config(D, P, backward=False)
    _replay.launch(
        _merge_fwd_kernel, (cdiv(L, bm), H, B),
        q, pk, pv, o_s, lse_s, out, lse, scale * LOG2E, H, L, P, D, q.stride(0), q.stride(1), q.stride(2),
        o_s.stride(0), o_s.stride(1), o_s.stride(2), lse_s.stride(0), lse_s.stride(1), lse_s.stride(2), spk_b, spk_h,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=_block_d(D), UPCAST=_interpreting(),
        IEEE=q.dtype == torch.float32 and not _interpreting(), num_warps=warps,
    )
    return out, lse


def backward(grad_out, q, k, v, prefix_k, prefix_v, out, lse, causal: bool, scale: float):
    """Returns ``(dq, dk, dv, d_prefix_k, d_prefix_v)``: dq, dk and dv in (B, L, H, D) memory
    (as torch's kernels give them for projections' inputs: no copy then), the prefix
    gradients contiguous in the prefix's shape (summed over the batch when it is shared, (H, P, D)) or None
    without a prefix. The prefix part's two launches are recorded once per key and replayed from C++
    afterwards."""
    q, k, v, grad_out = (_rows(t) for t in (q, k, v, grad_out))
    out, lse = in_blhd(out), lse.contiguous()  # as the forward makes it; the kernel writes dq at its offsets
    dq_s, dk, dv = _flash_backward(grad_out, q, k, v, out, lse, bool(causal), positive_scale(scale, q.shape[-1]))
    dk, dv = in_blhd(dk), in_blhd(dv)
    if prefix_k is None or prefix_k.shape[-2] == 0:
        empty = None if prefix_k is None else (torch.zeros_like(prefix_k), torch.zeros_like(prefix_v))
        return (in_blhd(dq_s), dk, dv) + ((None, None) if empty is None else empty)
    pk, pv = prefix_k.contiguous(), prefix_v.contiguous()
    if dq_s.stride(-1) != 1:
        dq_s = dq_s.contiguous()
    scale = float(scale)
    args = (grad_out, q, pk, pv, out, lse, dq_s, scale)
    if not _replay.active(q):
        dq, dpk, dpv = _merge_backward(*args)
    else:
        key = _replay.key_of(*args) + _strides(grad_out, q, dq_s)
        dq, dpk, dpv = _replay.call(_MERGE_BACKWARD_PROGRAMS, key, [grad_out, q, pk, pv, out, lse, dq_s],
                                    _merge_backward, *args, single=False)
    return dq.transpose(1, 2), dk, dv, dpk, dpv


def _merge_backward(grad_out, q, pk, pv, out, lse, dq_s, scale: float):
    """(dq as allocated, (B, L, H, D); d_prefix_k, d_prefix_v) from the flash backward's ``dq_s`` and the
    prefix (contiguous)."""
    B, H, L, D = q.shape
    P, spk_b, spk_h = _prefix(pk, H, D)
    bm, bn, warps = _config(D, P, backward=True)
    n_m = cdiv(L, bm)
    half = H * P * D  # one batch's prefix gradient
    shared = pk.dim() == 3
    if shared:  # rows (tile, batch), each [dpk | dpv] of one batch: summed over tiles and the batch
        part = _replay.empty((n_m, B, 2, half), torch.float32, q.device)
        s_m, s_b, s_w = B * 2 * half, 2 * half, half
    else:  # rows (tile), each [dpk of every batch | dpv of every batch]: summed over tiles
        part = _replay.empty((n_m, 2, B, half), torch.float32, q.device)
        s_m, s_b, s_w = 2 * B * half, half, B * half
    dq = _replay.empty((B, L, H, D), q.dtype, q.device)
    _replay.launch(
        _merge_bwd_kernel, (n_m, H, B),
        q, pk, pv, grad_out, out, lse, dq_s, dq, part, scale * LOG2E, scale, H, L, P, D,
        q.stride(0), q.stride(1), q.stride(2), grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
        dq_s.stride(0), dq_s.stride(1), dq_s.stride(2), spk_b, spk_h, s_m, s_b, s_w,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=_block_d(D), UPCAST=_interpreting(),
        IEEE=q.dtype == torch.float32 and not _interpreting(), num_warps=warps,
    )
    dpk = _replay.empty(pk.shape, pk.dtype, q.device)
    dpv = _replay.empty(pv.shape, pv.dtype, q.device)
    rows = part.view(-1, dpk.numel() * 2)
    block, split_block = (128, 4) if _interpreting() else (128, 32)
    _replay.launch(_sum_parts_kernel, (cdiv(rows.shape[1], block),), rows, dpk, dpv, dpk.numel(), rows.shape[0],
                   BLOCK=block, SPLIT_BLOCK=split_block, num_warps=4)
    return dq, dpk, dpv
