"""Prefix attention: the fused kernels against concatenation + SDPA, FlexAttention, and SDPA without a
prefix (the limit: what attention costs when there is no prefix and no padding).

Training shapes (forward, and forward+backward with gradients for q, k, v and the prefix):
  B32 H12 L512 D64 P20 (padding), causal B4 H32 L2048 D128 P64 (padding), causal B8 H16 L1024 D128
  P30 with Hkv=4 (padding).
Decode shapes (no autograd): B32 Hq32 Hkv8 D128 P20, 1 new token, caches of 512 and 4096 keys.
Every row gives its median in microseconds, the ratio to the limit measured in the same run, and the
speed-up over concatenation + SDPA with the padding mask. "pet_fast eager (sdpa)" is the op's eager
backend (what auto falls back to, and the CPU path); "reference (definition)" is the op's materialised
reference, timed on the smaller shapes only (it holds fp32 scores of every query and key).
bf16 on a GPU; ``--quick`` runs tiny fp32 shapes on the CPU with the eager paths and SDPA only.

    python benchmarks/bench_prefix_attention.py --json benchmarks/results/prefix_attention.json
"""
from __future__ import annotations

import functools
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import bench_us, checkpoint, keep_partial, parser, print_table, write  # noqa: E402

import pet_fast  # noqa: E402
from pet_fast.ops import prefix_attention as attention_ops  # noqa: E402

REFERENCE_MAX_SCORES = 2 ** 27  # time the reference only where B * Hq * L * (P + S) is at most this


def make_inputs(B, Hq, Hkv, L, S, D, P, dtype, device, grad):
    g = torch.Generator(device="cpu").manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype).requires_grad_(grad)
    q, k, v = r(B, Hq, L, D), r(B, Hkv, S, D), r(B, Hkv, S, D)
    pk, pv = r(Hkv, P, D), r(Hkv, P, D)
    # right padding, lengths between S/2 and S
    lengths = torch.linspace(S, S // 2, B).round().long()
    kpm = (torch.arange(S)[None, :] < lengths[:, None]).to(device)
    return q, k, v, pk, pv, kpm


def dense_mask(B, L, S, P, kpm, causal, device):
    """(B, 1, L, P + S) bool, True = attend: what the concatenating libraries build."""
    allowed = torch.ones(B, 1, L, P + S, dtype=torch.bool, device=device)
    if kpm is not None:
        allowed[..., P:] &= kpm[:, None, None, :]
    if causal:
        i = torch.arange(L, device=device)[:, None]
        j = torch.arange(S, device=device)[None, :]
        allowed[..., P:] &= j <= i + (S - L)
    return allowed


def cat_sdpa(q, k, v, pk, pv, kpm, causal, use_mask):
    B, Hq, L, D = q.shape
    Hkv, S, P = k.shape[1], k.shape[2], pk.shape[1]
    kk = torch.cat([pk.unsqueeze(0).expand(B, -1, -1, -1), k], 2)
    vv = torch.cat([pv.unsqueeze(0).expand(B, -1, -1, -1), v], 2)
    gqa = Hq != Hkv
    if use_mask:
        mask = dense_mask(B, L, S, P, kpm, causal, q.device)
        return F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask, enable_gqa=gqa)
    if causal:  # bottom-right causal over [prefix; keys] is exactly "prefix + j <= i + S - L"
        from torch.nn.attention.bias import causal_lower_right

        return F.scaled_dot_product_attention(q, kk, vv, attn_mask=causal_lower_right(L, P + S), enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, kk, vv, enable_gqa=gqa)


def limit_sdpa(q, k, v, causal):
    """No prefix, no padding (L == S in the training shapes, so is_causal is the same alignment)."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal and q.shape[2] == k.shape[2],
                                          enable_gqa=q.shape[1] != k.shape[1])


def _flash_only(fn, *args, **kwargs):
    """``fn`` with torch's flash attention as its only SDPA backend, and pet_fast's merged path told to
    use flash for the sequence part (PET_FAST_PREFIX_CUDNN=0): what the cuDNN rows are compared with."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    before = os.environ.get("PET_FAST_PREFIX_CUDNN")
    os.environ["PET_FAST_PREFIX_CUDNN"] = "0"
    try:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return fn(*args, **kwargs)
    finally:
        if before is None:
            del os.environ["PET_FAST_PREFIX_CUDNN"]
        else:
            os.environ["PET_FAST_PREFIX_CUDNN"] = before


def sequence_backends() -> dict:
    """What the merged path's probe chose per (device, dtype, head dim, causal): the JSON's record of it."""
    from pet_fast.kernels import prefix_attention_merge as merge

    return {str(k): v for k, v in merge._SEQUENCE_BACKEND.items()}


def flex_fn(B, Hq, Hkv, L, S, P, kpm, causal, device):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    shift = S - L

    def mask_mod(b, h, i, t):
        j = t - P
        seq_ok = kpm[b, j.clamp(min=0)] & ((j <= i + shift) if causal else (j >= 0))
        return (t < P) | seq_ok

    block_mask = create_block_mask(mask_mod, B, None, L, P + S, device=device)
    compiled = torch.compile(flex_attention)

    def run(q, k, v, pk, pv, kpm_, causal_):
        kk = torch.cat([pk.unsqueeze(0).expand(B, -1, -1, -1), k], 2)
        vv = torch.cat([pv.unsqueeze(0).expand(B, -1, -1, -1), v], 2)
        return compiled(q, kk, vv, block_mask=block_mask, enable_gqa=Hq != Hkv)

    return run


REPS = {}  # bench_us keyword arguments; --quick uses fewer repetitions


def timed(fn, inputs, grad):
    """Median microseconds of the forward, or of forward + backward to every input that needs it."""
    if not grad:
        with torch.no_grad():
            return bench_us(lambda: fn(*inputs), **REPS)
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    out = fn(*inputs)
    gy = torch.randn_like(out)

    def step():
        torch.autograd.grad(fn(*inputs), leaves, gy, allow_unused=True)  # the limit has no prefix

    return bench_us(step, **REPS)


def _with_dropout(q, k, v, pk, pv, m, c, backend):
    return pet_fast.prefix_attention(q, k, v, pk, pv, key_padding_mask=m, causal=c, dropout_p=DROPOUT_P,
                                     backend=backend)


def training_rows(quick, device, dtype, flex=True):
    if quick:
        shapes = [("tiny B2 H2 L64 D32 P4", 2, 2, 2, 64, 64, 32, 4, False),
                  ("tiny causal GQA B2 H4/2 L48 D32 P5", 2, 4, 2, 48, 48, 32, 5, True)]
    else:
        shapes = [("B32 H12 L512 D64 P20", 32, 12, 12, 512, 512, 64, 20, False),
                  ("causal B4 H32 L2048 D128 P64", 4, 32, 32, 2048, 2048, 128, 64, True),
                  ("causal GQA B8 H16/4 L1024 D128 P30", 8, 16, 4, 1024, 1024, 128, 30, True)]
    rows = []
    for name, B, Hq, Hkv, L, S, D, P, causal in shapes:
        checkpoint(rows)  # the shapes measured so far
        for grad in (False, True):
            mode = "fwd+bwd" if grad else "fwd"
            q, k, v, pk, pv, kpm = make_inputs(B, Hq, Hkv, L, S, D, P, dtype, device, grad)
            cands = {
                "sdpa, no prefix, no padding (limit)": (lambda q, k, v, pk, pv, m, c: limit_sdpa(q, k, v, c)),
                "cat + sdpa, no padding": (lambda q, k, v, pk, pv, m, c: cat_sdpa(q, k, v, pk, pv, m, c, False)),
                "cat + sdpa + padding mask": (lambda q, k, v, pk, pv, m, c: cat_sdpa(q, k, v, pk, pv, m, c, True)),
                "pet_fast eager (sdpa) + padding": (lambda q, k, v, pk, pv, m, c: pet_fast.prefix_attention(
                    q, k, v, pk, pv, key_padding_mask=m, causal=c, backend="eager")),
            }
            if B * Hq * L * (P + S) <= REFERENCE_MAX_SCORES:
                cands["reference (definition) + padding"] = (lambda q, k, v, pk, pv, m, c: attention_ops.reference(
                    q, k, v, pk, pv, key_padding_mask=m, causal=c))
            if not quick:
                cands["pet_fast triton + padding"] = lambda q, k, v, pk, pv, m, c: pet_fast.prefix_attention(
                    q, k, v, pk, pv, key_padding_mask=m, causal=c, backend="triton")
                if grad:  # attention dropout in training (BERT's default 0.1): the kernels' draws against SDPA's
                    for backend in ("triton", "eager"):
                        cands[DROPOUT_ROW[backend]] = functools.partial(_with_dropout, backend=backend)
                # fwd+bwd: the merged path (torch flash + Triton prefix merge) where it applies (no GQA,
                # causal only with L == S); fwd: the flash-style Triton kernels
                cands["pet_fast triton, no padding"] = lambda q, k, v, pk, pv, m, c: pet_fast.prefix_attention(
                    q, k, v, pk, pv, causal=c, backend="triton")
                cands["pet_fast triton own kernels, no padding"] = lambda q, k, v, pk, pv, m, c: attention_ops.own_kernels(
                    q, k, v, pk, pv, causal=c)
                if not attention_ops.merged_reasons(q, k, pk, None, causal):
                    # the sequence part through cuDNN's attention where the probe took it, then forced to flash
                    cands["pet_fast triton merged, no padding"] = lambda q, k, v, pk, pv, m, c: attention_ops.merged(
                        q, k, v, pk, pv, causal=c)
                    cands["pet_fast triton flash-merge, no padding"] = lambda q, k, v, pk, pv, m, c: _flash_only(
                        attention_ops.merged, q, k, v, pk, pv, causal=c)
                    cands["sdpa flash only, no prefix, no padding"] = lambda q, k, v, pk, pv, m, c: _flash_only(
                        limit_sdpa, q, k, v, c)
                try:
                    if not flex:
                        raise RuntimeError("skipped (--no-flex)")
                    cands["flex (cat) + padding"] = flex_fn(B, Hq, Hkv, L, S, P, kpm, causal, device)
                except Exception as exc:  # FlexAttention needs a recent torch and a GPU
                    rows.append(dict(shape=name, mode=mode, impl="flex (cat) + padding", error=repr(exc)[:200]))
            results = {}
            for impl, fn in cands.items():
                try:
                    results[impl] = timed(fn, (q, k, v, pk, pv, kpm, causal), grad)
                except Exception as exc:
                    rows.append(dict(shape=name, mode=mode, impl=impl, error=repr(exc)[:200]))
            limit = results.get("sdpa, no prefix, no padding (limit)")
            cat_mask = results.get("cat + sdpa + padding mask")
            for impl, us in results.items():
                rows.append(dict(shape=name, mode=mode, impl=impl, us=round(us, 1),
                                 x_limit=round(us / limit, 3) if limit else None,
                                 speedup_vs_cat_mask=round(cat_mask / us, 3) if cat_mask else None))
    checkpoint(rows, section_done=True)
    return rows


def _python_launches(fn):
    """``fn()`` with the Triton launches from Python (the triton rows replay them from C++: kernels/_replay.py)."""
    from pet_fast.kernels import _replay

    with _replay.disabled():
        return fn()


def decode_rows(quick, device, dtype):
    if quick:
        shapes = [("decode tiny B4 H4/2 D32 P4 cache 64", 4, 4, 2, 1, 64, 32, 4)]
    else:
        shapes = [(f"decode B32 H32/8 D128 P20 cache {S}", 32, 32, 8, 1, S, 128, 20) for S in (512, 4096)]
        # several new tokens per sequence (speculative decoding, chunked prefill's tail): causal, bottom-right
        shapes.append(("decode B32 H32/8 D128 P20 cache 4096, 4 new tokens", 32, 32, 8, 4, 4096, 128, 20))
    rows = []
    for name, B, Hq, Hkv, L, S, D, P in shapes:
        q, k, v, pk, pv, kpm = make_inputs(B, Hq, Hkv, L, S, D, P, dtype, device, False)
        cands = {
            "sdpa, no prefix, no padding (limit)": lambda: limit_sdpa(q, k, v, False),
            "cat + sdpa, no padding": lambda: cat_sdpa(q, k, v, pk, pv, kpm, True, False),
            "cat + sdpa + padding mask": lambda: cat_sdpa(q, k, v, pk, pv, kpm, True, True),
            "pet_fast eager (sdpa) + padding": lambda: pet_fast.prefix_attention(
                q, k, v, pk, pv, key_padding_mask=kpm, causal=True, backend="eager"),
        }
        if not quick:
            cands["pet_fast cuda decode + padding"] = lambda: pet_fast.prefix_attention(
                q, k, v, pk, pv, key_padding_mask=kpm, causal=True, backend="cuda")
            cands["pet_fast triton + padding"] = lambda: pet_fast.prefix_attention(
                q, k, v, pk, pv, key_padding_mask=kpm, causal=True, backend="triton")
            cands["pet_fast triton + padding, python launches"] = lambda: _python_launches(
                lambda: pet_fast.prefix_attention(q, k, v, pk, pv, key_padding_mask=kpm, causal=True, backend="triton"))
        results = {}
        for impl, fn in cands.items():
            try:
                with torch.no_grad():
                    results[impl] = bench_us(fn, **REPS)
            except Exception as exc:
                rows.append(dict(shape=name, mode="decode", impl=impl, error=repr(exc)[:200]))
        limit = results.get("sdpa, no prefix, no padding (limit)")
        cat_mask = results.get("cat + sdpa + padding mask")
        for impl, us in results.items():
            rows.append(dict(shape=name, mode="decode", impl=impl, us=round(us, 1),
                             x_limit=round(us / limit, 3) if limit else None,
                             speedup_vs_cat_mask=round(cat_mask / us, 3) if cat_mask else None))
    checkpoint(rows, section_done=True)
    return rows


BACKEND_IMPLS = {"pet_fast eager (sdpa) + padding": "eager", "pet_fast triton + padding": "triton",
                 "pet_fast cuda decode + padding": "cuda"}
# Without padding the eager backend runs concatenation + SDPA without a mask, the triton backend (for a
# gradient) its merged path (cuDNN or flash for the sequence) where the call allows it: their rows give
# the "fwd+bwd, no padding" order.
NO_PADDING_IMPLS = {"cat + sdpa, no padding": "eager", "pet_fast triton, no padding": "triton"}
DROPOUT_P = 0.1
DROPOUT_ROW = {b: f"pet_fast {name} + padding + dropout {DROPOUT_P}"
               for b, name in (("triton", "triton"), ("eager", "eager (sdpa)"))}
DROPOUT_IMPLS = {row: b for b, row in DROPOUT_ROW.items()}  # the "fwd+bwd, dropout" order


def dispatch_table(rows) -> dict:
    """auto's order per kind of call (decode, fwd, fwd+bwd from the padded rows of each backend,
    fwd+bwd without padding from the unpadded ones, fwd+bwd with dropout from the dropout rows): the
    backend that is fastest on more shapes first, ties broken by total time; only shapes where every
    compared backend ran count."""
    orders = {}
    for mode, row_mode, impls in [("decode", "decode", BACKEND_IMPLS), ("fwd", "fwd", BACKEND_IMPLS),
                                  ("fwd+bwd", "fwd+bwd", BACKEND_IMPLS),
                                  ("fwd+bwd, no padding", "fwd+bwd", NO_PADDING_IMPLS),
                                  ("fwd+bwd, dropout", "fwd+bwd", DROPOUT_IMPLS)]:
        per_shape = {}
        for r in rows:
            if r.get("mode") == row_mode and r.get("impl") in impls and r.get("us") is not None:
                per_shape.setdefault(r["shape"], {})[impls[r["impl"]]] = r["us"]
        backends = sorted({b for t in per_shape.values() for b in t})
        shapes = [t for t in per_shape.values() if set(t) == set(backends)]
        if len(backends) < 2 or not shapes:
            continue
        wins = {b: sum(min(t, key=t.get) == b for t in shapes) for b in backends}
        total = {b: sum(t[b] for t in shapes) for b in backends}
        orders[mode] = sorted(backends, key=lambda b: (-wins[b], total[b]))
    return {"orders": orders}


def main(argv=None):
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--no-flex", action="store_true", help="leave out the FlexAttention rows (each compiles for tens of s)")
    p.add_argument("--dispatch-table", help="write auto's measured backend order here (GPU runs; copy it to "
                   "pet_fast/ops/prefix_attention_timings.json to ship it)")
    args = p.parse_args(argv)
    on_gpu = torch.cuda.is_available() and not args.quick
    device = "cuda" if on_gpu else "cpu"
    dtype = torch.bfloat16 if on_gpu else torch.float32
    if not on_gpu:
        args.quick = True
    if args.quick:
        REPS.update(warmup=3, rep=15)
        if not on_gpu:
            torch.set_num_threads(1)  # a smoke run: fewer threads fight less over shared cores
    keep_partial(args.json)
    rows = training_rows(args.quick, device, dtype, flex=not args.no_flex) + decode_rows(args.quick, device, dtype)
    print_table(rows, ["shape", "mode", "impl", "us", "x_limit", "speedup_vs_cat_mask", "error"])
    backends = sequence_backends()
    print("merged path's sequence part (probe):", backends or "not used")
    write(args.json, rows, op="prefix_attention", dtype=str(dtype), quick=bool(args.quick),
          merged_sequence_backend=backends)
    if args.dispatch_table and on_gpu:
        import json

        with open(args.dispatch_table, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(0), "dtype": str(dtype).replace("torch.", ""),
                       **dispatch_table(rows)}, f, indent=1)


if __name__ == "__main__":
    main()
