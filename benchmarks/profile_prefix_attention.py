"""Where the time of one prefix-attention forward+backward goes, per path: GPU time per kernel
(torch.profiler) and host time per call, beside SDPA without a prefix (the limit), so that a slow path
shows which of its kernels (forward, delta, dk/dv, dq, the merge, torch's cuDNN or flash kernels) is slow.

    python benchmarks/profile_prefix_attention.py --json out.json     # GPU, bf16, B32 H12 L512 D64 P20
    python benchmarks/profile_prefix_attention.py --shape 4,32,32,2048,128,64 --causal
    python benchmarks/profile_prefix_attention.py --quick             # CPU smoke run (tiny, eager paths)

--shape is B,Hq,Hkv,L,D,P (S = L). Rows: per path one summary row (host, wall and GPU microseconds per
call) and one row per kernel. Paths: "triton + padding" (the bench's right padding, lengths S..S/2),
"triton, no padding" (the merged path where the call allows it), "own kernels, no padding", "sdpa limit"
(no prefix, no padding), "cat + sdpa + mask". Also prints the tiles the autotuners chose.
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402
from benchmarks.bench_prefix_attention import cat_sdpa, limit_sdpa, make_inputs, sequence_backends  # noqa: E402
import pet_fast  # noqa: E402
from pet_fast.ops import prefix_attention as attention_ops  # noqa: E402


def paths(gpu: bool) -> dict:
    """label -> fn(q, k, v, pk, pv, kpm, causal)."""
    out = {
        "sdpa limit": lambda q, k, v, pk, pv, m, c: limit_sdpa(q, k, v, c),
        "cat + sdpa + mask": lambda q, k, v, pk, pv, m, c: cat_sdpa(q, k, v, pk, pv, m, c, True),
        "eager (sdpa) + padding": lambda q, k, v, pk, pv, m, c: pet_fast.prefix_attention(
            q, k, v, pk, pv, key_padding_mask=m, causal=c, backend="eager"),
    }
    if gpu:
        out.update({
            "triton + padding": lambda q, k, v, pk, pv, m, c: pet_fast.prefix_attention(
                q, k, v, pk, pv, key_padding_mask=m, causal=c, backend="triton"),
            "triton, no padding": lambda q, k, v, pk, pv, m, c: pet_fast.prefix_attention(
                q, k, v, pk, pv, causal=c, backend="triton"),
            "own kernels, no padding": lambda q, k, v, pk, pv, m, c: attention_ops.own_kernels(q, k, v, pk, pv, causal=c),
        })
    return out


def tuned_tiles() -> dict:
    """The tiles the prefix kernels' autotuners chose, per kernel and key (empty when none ran)."""
    from pet_fast.kernels import prefix_attention as kernels

    out = {}
    for name in ("_fwd_tuned", "_dkdv_tuned", "_dq_tuned"):
        cache = getattr(getattr(kernels, name), "cache", {})
        out[name] = {str(key): str(cfg) for key, cfg in cache.items()}
    return out


def main():
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--shape", default="32,12,12,512,64,20", help="B,Hq,Hkv,L,D,P (S = L)")
    p.add_argument("--causal", action="store_true")
    args = p.parse_args()
    gpu = torch.cuda.is_available() and not args.quick
    device, dtype = ("cuda", torch.bfloat16) if gpu else ("cpu", torch.float32)
    B, Hq, Hkv, L, D, P = (2, 2, 2, 32, 16, 4) if args.quick else (int(v) for v in args.shape.split(","))
    calls = 10 if gpu else 2
    q, k, v, pk, pv, kpm = make_inputs(B, Hq, Hkv, L, L, D, P, dtype, device, True)
    leaves = [q, k, v, pk, pv]
    rows = []
    for label, fn in paths(gpu).items():
        dy = torch.randn_like(fn(q, k, v, pk, pv, kpm, args.causal))

        def call(fn=fn):
            torch.autograd.grad(fn(q, k, v, pk, pv, kpm, args.causal), leaves, dy, allow_unused=True)

        try:
            rows += common.profile_rows(call, calls, {"path": label})
        except Exception as exc:  # noqa: BLE001 - one path's failure is a row, not the end of the run
            rows.append({"path": label, "kernel": "(failed)", "note": repr(exc)[:160]})
        common.write(args.json, rows, partial=True)
    common.print_table(rows, ["path", "kernel", "us_per_call", "launches_per_call", "host_us_per_call",
                              "wall_us_per_call", "gpu_us_per_call", "note"])
    tiles = tuned_tiles() if gpu else {}
    for kernel, chosen in tiles.items():
        for key, config in chosen.items():
            print("autotune", kernel, key, config)
    backends = sequence_backends()
    print("merged path's sequence part (probe):", backends or "not used")
    common.write(args.json, rows, shape=dict(B=B, Hq=Hq, Hkv=Hkv, L=L, D=D, P=P, causal=args.causal),
                 dtype=str(dtype), tuned=tiles, merged_sequence_backend=backends)


if __name__ == "__main__":
    main()
