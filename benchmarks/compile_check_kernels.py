"""Compile the masked_linear, masked_weights and prefix_attention Triton kernels for sm_90 (H100) without a GPU.

Catches what the interpreter cannot: type, layout and tl.dot shape errors of the GPU compiler in the
non-upcast fp16/bf16/fp32 paths, and tiles whose shared memory would not fit an H100 (232448 B). Every
autotune configuration is compiled (the autotuner compiles them all on the GPU), plus the single tile
of PET_FAST_AUTOTUNE=0 (the GPU tests); prefix_attention at the tiles its launchers pick per head dim
and dtype. Prints shared memory, registers per thread (REG) and local-memory stack (STACK, spills) of
each cubin, read with the cuobjdump Triton ships.

The signatures follow the launchers: pointers in the dtypes they pass (bit words *i32, key padding
*i8, log-sum-exp / delta / prefix partials *fp32), i32 sizes, fp32 scalars. "aligned" compiles as the
GPU specialises model shapes (16-byte aligned pointers, sizes that are multiples of 16); "odd" as it
specialises the odd shapes of the GPU tests (no divisibility on sizes); "i64" with the strides that
pass 2**31 on very long inputs. Needs triton with its NVIDIA backend (ptxas ships with it); slow on a
small CPU: 435 specialisations in about 9.5 minutes on 2 shared cores with a cold triton cache (--quick:
about 100 in 2 minutes; the triton cache makes reruns fast):

    python benchmarks/compile_check_kernels.py [--only masked_linear|masked_weights|prefix_attention|prefix_merge]
                                               [--dtypes bf16,fp16,fp32]
                                               [--jobs N] [--quick]

Exits 1 when a specialisation fails to compile or needs more shared memory than an H100 has.
"""
import argparse
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor

os.environ.pop("TRITON_INTERPRET", None)  # the kernels modules read it at import: GPU configs, no upcast
os.environ.pop("PET_FAST_AUTOTUNE", None)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from benchmarks import compile_check  # noqa: E402

import pet_fast.kernels.masked_linear as ML  # noqa: E402
import pet_fast.kernels.masked_weights as MW  # noqa: E402
import pet_fast.kernels.prefix_attention as PA  # noqa: E402
import pet_fast.kernels.prefix_attention_merge as PAM  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
LIMIT = 232448  # H100 shared memory per block (227 KiB)
KERNELS = {
    "ml_forward": ML._forward_kernel.fn, "ml_grad_input": ML._grad_input_kernel.fn,
    "ml_grad_weight": ML._grad_weight_kernel.fn, "ml_pack": ML._pack_kernel.fn, "mw_grouped": MW._grouped_kernel,
    "pa_fwd": PA._fwd_kernel, "pa_bwd_dkdv": PA._bwd_dkdv_kernel, "pa_bwd_dq": PA._bwd_dq_kernel, "pa_delta": PA._delta_kernel,
    "pam_fwd": PAM._merge_fwd_kernel, "pam_bwd": PAM._merge_bwd_kernel, "pam_sum": PAM._sum_parts_kernel,
}


def resource_usage(cubin: bytes) -> dict:
    """Registers per thread (REG) and local-memory stack (STACK, spills) of a cubin (compile_check.py's reader)."""
    return {k.upper(): v for k, v in compile_check.resource_usage(cubin).items()}


def signature(fn, types, consts, div):
    """(signature, constexprs, attrs) of one specialisation. types: argument -> type ("*bf16", "i64",
    "fp32"), the others i32; div: the runtime arguments the GPU would see as multiples of 16 (pointers
    always: torch allocations are 16-byte aligned)."""
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name] = "constexpr"
            continue
        sig[name] = types.get(name, "i32")
        if sig[name].startswith("*") or name in div:
            attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, {(fn.arg_names.index(k),): v for k, v in consts.items()}, attrs


def compile_one(job):
    """Compile one job (a dict, see the builders below); returns it with shared/REG/STACK or the error."""
    fn = KERNELS[job["kernel"]]
    sig, consts, attrs = signature(fn, job["types"], job["consts"], job["div"])
    t0 = time.time()
    try:
        src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
        options = dict(num_warps=job["warps"], num_stages=job["stages"], enable_fp_fusion=True)  # as the launches
        compiled = triton.compile(src, target=TARGET, options=options)
        res = dict(job, shared=compiled.metadata.shared, **resource_usage(compiled.asm["cubin"]))
    except Exception as e:  # noqa: BLE001 - every compiler error is a finding
        msg = " ".join(str(e).split())
        res = dict(job, error=f"{type(e).__name__}: {msg[:600]}")
    res["seconds"] = time.time() - t0
    return res


# ---------------------------------------------------------------------------------------------------
# masked_linear: every autotune configuration (and the PET_FAST_AUTOTUNE=0 tile), bits or scores.

def _cfg_key(c):
    return tuple(sorted(c.kwargs.items())), c.num_warps, c.num_stages


def _ml_cfgs(kernel, configs_fn, **call):
    """The configs the autotuner of ``kernel`` compiles for a call with these constexprs (its pruner
    applied), followed by the PET_FAST_AUTOTUNE=0 tile for that call (the GPU tests) when not among them."""
    prune = getattr(kernel, "early_config_prune", None) or (lambda configs, nargs, **kw: configs)
    key = _cfg_key
    saved = ML._TUNE
    try:
        ML._TUNE = False
        untuned = prune(configs_fn(), {}, **call)
        ML._TUNE = True
        tuned = prune(configs_fn(), {}, **call)
    finally:
        ML._TUNE = saved
    seen = {key(c) for c in tuned}
    return tuned + [c for c in untuned if key(c) not in seen], untuned[0]


def masked_linear_jobs(dtypes, quick):
    jobs = []
    ints = {"M", "N", "K", "n_words"}
    for dt in dtypes:
        t = "*" + dt
        flags = dict(UPCAST=False, FP32_DOT=dt == "fp32", PRECISION="ieee")  # allow_tf32 is off by default
        gemm, gemm0 = _ml_cfgs(ML._forward_kernel, lambda: ML._configs(ML._GEMM_CONFIGS), **flags)
        dgrad, dgrad0 = _ml_cfgs(ML._grad_input_kernel, lambda: ML._configs(ML._GEMM_CONFIGS, transpose=True), **flags)
        wgrad, wgrad0 = _ml_cfgs(ML._grad_weight_kernel, ML._wgrad_configs, **flags)
        pack, pack0 = _ml_cfgs(ML._pack_kernel, ML._pack_configs)
        if quick:  # the first tuned tile and the PET_FAST_AUTOTUNE=0 one
            gemm, dgrad, wgrad = ([cs[0]] + ([c0] if c0 is not cs[0] and _cfg_key(c0) != _cfg_key(cs[0]) else [])
                                  for cs, c0 in ((gemm, gemm0), (dgrad, dgrad0), (wgrad, wgrad0)))
            pack = [pack0]
        name = lambda c: " ".join(f"{k}={v}" for k, v in c.kwargs.items() if k != "GROUP")  # noqa: E731
        for from_bits in (True, False):
            s = "*i32" if from_bits else "*fp32"  # the launchers pass the bits (or the scores) as both
            for c in gemm:
                jobs.append(dict(kernel="ml_forward", dtype=dt, tag=f"bits={int(from_bits)} {name(c)}", warps=c.num_warps,
                                 stages=c.num_stages, div=ints, variant="aligned",
                                 types=dict(x_ptr=t, w_ptr=t, s_ptr=s, bits_ptr=s, b_ptr=t, y_ptr=t, threshold="fp32"),
                                 consts=dict(FROM_BITS=from_bits, HAS_BIAS=True, **flags, **c.kwargs)))
            for c in dgrad:
                jobs.append(dict(kernel="ml_grad_input", dtype=dt, tag=f"bits={int(from_bits)} {name(c)}", warps=c.num_warps,
                                 stages=c.num_stages, div=ints, variant="aligned",
                                 types=dict(dy_ptr=t, w_ptr=t, s_ptr=s, bits_ptr=s, dx_ptr=t, threshold="fp32"),
                                 consts=dict(FROM_BITS=from_bits, **flags, **c.kwargs)))
            for c in wgrad:
                for wg, bg in ((True, True), (False, False)) if c is wgrad0 else ((True, True),):
                    # d_scores in the scores' dtype (fp32 for the op), d_weight in the weight's, d_bias in dy's
                    jobs.append(dict(kernel="ml_grad_weight", dtype=dt, tag=f"bits={int(from_bits)} wgrad={int(wg)} "
                                     f"bgrad={int(bg)} {name(c)}", warps=c.num_warps, stages=c.num_stages,
                                     div=ints, variant="aligned",
                                     types=dict(dy_ptr=t, x_ptr=t, w_ptr=t, s_ptr=s, bits_ptr=s, ds_ptr="*fp32",
                                                dw_ptr=t if wg else "*fp32", db_ptr=t if bg else "*fp32",
                                                threshold="fp32"),
                                     consts=dict(FROM_BITS=from_bits, WEIGHT_GRAD=wg, BIAS_GRAD=bg, **flags, **c.kwargs)))
        # the GPU tests' odd shapes: sizes without divisibility, the PET_FAST_AUTOTUNE=0 tile, bits
        for kern, c, types, consts in (
                ("ml_forward", gemm0,
                 dict(x_ptr=t, w_ptr=t, s_ptr="*i32", bits_ptr="*i32", b_ptr=t, y_ptr=t, threshold="fp32"),
                 dict(FROM_BITS=True, HAS_BIAS=False, **flags)),
                ("ml_grad_input", dgrad0, dict(dy_ptr=t, w_ptr=t, s_ptr="*i32", bits_ptr="*i32", dx_ptr=t, threshold="fp32"),
                 dict(FROM_BITS=True, **flags)),
                ("ml_grad_weight", wgrad0, dict(dy_ptr=t, x_ptr=t, w_ptr=t, s_ptr="*i32", bits_ptr="*i32", ds_ptr=t,
                                                dw_ptr=t, db_ptr=t, threshold="fp32"),
                 dict(FROM_BITS=True, WEIGHT_GRAD=True, BIAS_GRAD=False, **flags))):
            tag = "bits=1" + (" wgrad=1 bgrad=0 " if kern == "ml_grad_weight" else " ") + name(c)
            jobs.append(dict(kernel=kern, dtype=dt, tag=tag, warps=c.num_warps, stages=c.num_stages, div=set(),
                             variant="odd", types=types, consts=dict(consts, **c.kwargs)))
        for c in pack:  # scores in this dtype
            for variant, div in (("aligned", {"K", "n_words"}), ("odd", set())):
                jobs.append(dict(kernel="ml_pack", dtype=dt, tag=name(c), warps=c.num_warps,
                                 stages=c.num_stages, div=div, variant=variant,
                                 types=dict(s_ptr=t, out_ptr="*i32", threshold="fp32"), consts=dict(c.kwargs)))
    return jobs


# ---------------------------------------------------------------------------------------------------
# prefix_attention: the tiles the launchers pick per head dim and dtype.

HEAD_DIMS = (32, 64, 80, 96, 128, 256)
TORCH_DT = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def _pa_tiles(D: int, dt: str, backward: bool) -> dict:
    """kernel name -> the tiles its launcher may take at this head dim and dtype: the fixed tiles of
    _config (float32, PET_FAST_AUTOTUNE=0; with and without attention dropout) and, for fp16/bf16, every
    tile its autotuner tries (each is compiled on the GPU; the forward's 16-row decoding tiles included)."""
    import torch

    dtype = getattr(torch, TORCH_DT[dt])
    cls = PA._tile_class(PA._block_d(D))
    names = ("pa_bwd_dkdv", "pa_bwd_dq") if backward else ("pa_fwd",)
    extra = (PA._DKDV_TILES, PA._DQ_TILES) if backward else (PA._FWD_TILES,)
    out = {}
    for name, tiles in zip(names, extra):
        # the fixed tile, and the one calls with attention dropout take in its place
        fixed = [PA._config(D, backward=backward, dtype=dtype, dropout=drop) for drop in (False, True)]
        out[name] = list(dict.fromkeys(fixed if dt == "fp32" else PA._class_tiles(tiles, backward)[cls] + fixed[1:]))
    return out


# the launchers' stride arguments (batch, head, row of q, k/v, the output, dO, the gradients; the prefix's)
PA_STRIDES = tuple(f"s{t}_{d}" for t in ("q", "k", "o", "do", "dq", "dk") for d in "bhl") + (
    "spk_b", "spk_h", "sdp_b", "sdp_h")


def prefix_attention_jobs(dtypes, quick):
    jobs = []
    for dt in dtypes:
        t = "*" + dt
        # D is a runtime argument (a multiple of 16 for these): head dims with the same BLOCK_D, EVEN_D and
        # tiles share one compiled kernel
        groups = {}
        for D in HEAD_DIMS if not quick else (64, 256):
            tiles = {**_pa_tiles(D, dt, False), **_pa_tiles(D, dt, True)}
            key = (PA._block_d(D), PA._block_d(D) == D, tuple((k, tuple(v)) for k, v in sorted(tiles.items())))
            groups.setdefault(key, []).append(D)
        for (bd, even, tiles), dims in groups.items():
            D = "/".join(map(str, dims))
            for kernel, kernel_tiles in tiles:
                for bm, bn, warps, stages in (kernel_tiles[:1] if quick else kernel_tiles):
                    blocks = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, EVEN_D=even, UPCAST=False, IEEE=dt == "fp32")
                    if kernel != "pa_bwd_dkdv":
                        blocks["SCAN"] = 1024
                    # (causal, padding mask, GQA, variant): GQA keeps G a runtime i32 (G=1 is specialised
                    # to the constant 1 by the GPU launcher); "odd": L/S/P without divisibility; "i64": the
                    # batch and head strides past 2**31. Beyond the first tile, the aligned padded causal
                    # GQA case only (the tiles differ in shape, not in code paths), with and without attention
                    # dropout (its Philox draws add registers to every tile).
                    combos = [(False, False, True, "aligned", False), (False, True, True, "aligned", False),
                              (True, False, True, "aligned", False), (True, True, True, "aligned", False),
                              (True, True, False, "aligned", False), (False, True, True, "odd", False),
                              (True, True, True, "i64", False), (True, True, True, "aligned", True),
                              (False, True, True, "odd", True)]
                    if quick or (bm, bn, warps, stages) != kernel_tiles[0]:
                        combos = [combos[3], combos[5], combos[7]] if quick else [combos[3], combos[7]]
                    for causal, kpm, gqa, variant, dropout in combos:
                        consts = dict(HAS_KPM=kpm, CAUSAL=causal, DROPOUT=dropout, **blocks)
                        if not gqa:
                            consts["G"] = 1
                        strides = PA_STRIDES
                        div = {"D", "Hq", "tune_l", "tune_s", *strides}
                        if variant == "aligned":
                            div |= {"L", "S", "P"}
                        i64 = {k: "i64" for k in strides} if variant == "i64" else {}
                        tag = (f"D={D} causal={int(causal)} kpm={int(kpm)} G={'n' if gqa else 1} BM={bm} BN={bn}"
                               f"{' dropout' if dropout else ''}")
                        drop = dict(SEED="*i64", p_drop="fp32", inv_keep="fp32")
                        common = dict(dtype=dt, tag=tag, warps=warps, stages=stages, div=div, variant=variant,
                                      consts=consts)
                        if kernel == "pa_fwd":
                            jobs.append(dict(kernel=kernel, **common, types=dict(
                                Q=t, K=t, V=t, PK=t, PV=t, KPM="*i8", O=t, LSE="*fp32", qk_scale2="fp32", **drop,
                                **i64)))
                        elif kernel == "pa_bwd_dkdv":
                            jobs.append(dict(kernel=kernel, **common, types=dict(
                                Q=t, K=t, V=t, PK=t, PV=t, DO=t, LSE="*fp32", DELTA="*fp32", KPM="*i8", DK=t, DV=t,
                                DPK="*fp32", DPV="*fp32", qk_scale2="fp32", scale="fp32", **drop, **i64)))
                        else:
                            jobs.append(dict(kernel=kernel, **common, types=dict(
                                Q=t, K=t, V=t, PK=t, PV=t, KPM="*i8", DO=t, LSE="*fp32", DELTA="*fp32", DQ=t,
                                qk_scale2="fp32", scale="fp32", **drop, **i64)))
        jobs.append(dict(kernel="pa_delta", dtype=dt, tag="BLOCK_R=64", warps=4, stages=1,
                         div={"D", "H", "L"} | set(PA_STRIDES),
                         variant="aligned", consts=dict(BLOCK_R=64, BLOCK_D=64),
                         types=dict(O=t, DO=t, DELTA="*fp32")))
    return jobs


def prefix_merge_jobs(dtypes, quick):
    """The merged path's kernels (kernels/prefix_attention_merge.py: fp16/bf16 on CUDA only) at the tiles
    its launchers pick per head dim and prefix length."""
    jobs = []
    for dt in [d for d in dtypes if d in ("bf16", "fp16")]:
        t = "*" + dt
        for D in ((64, 128) if quick else (32, 64, 80, 96, 128, 256)):
            for P in ((20,) if quick else (20, 64)):
                for variant in (("odd",) if quick else ("aligned", "odd", "i64")):
                    div = {"D"} | ({"L", "P", "H"} if variant == "aligned" else set())
                    i64 = variant == "i64"
                    for backward in (False, True):
                        bm, bn, warps = PAM._config(D, P, backward)
                        consts = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=PAM._block_d(D), UPCAST=False, IEEE=False)
                        common = dict(dtype=dt, tag=f"D={D} P={P} BM={bm} BN={bn}", warps=warps, stages=1,
                                      div=div, variant=variant, consts=consts)
                        if not backward:
                            strides = ("sq_b", "sq_h", "sq_l", "sos_b", "sos_h", "sos_l", "sls_b", "sls_h", "sls_l",
                                       "spk_b", "spk_h")
                            jobs.append(dict(kernel="pam_fwd", **common, types=dict(
                                Q=t, PK=t, PV=t, OS=t, LSES="*fp32", O=t, LSE="*fp32", qk_scale2="fp32",
                                **({k: "i64" for k in strides} if i64 else {}))))
                        else:
                            strides = ("sq_b", "sq_h", "sq_l", "sdo_b", "sdo_h", "sdo_l", "sdq_b", "sdq_h", "sdq_l",
                                       "spk_b", "spk_h", "spart_m", "spart_b", "spart_w")
                            jobs.append(dict(kernel="pam_bwd", **common, types=dict(
                                Q=t, PK=t, PV=t, DO=t, O=t, LSE="*fp32", DQS=t, DQ=t, PART="*fp32",
                                qk_scale2="fp32", scale="fp32", **({k: "i64" for k in strides} if i64 else {}))))
        jobs.append(dict(kernel="pam_sum", dtype=dt, tag="BLOCK=128 SPLIT_BLOCK=32", warps=4, stages=1, div=set(),
                         variant="odd", consts=dict(BLOCK=128, SPLIT_BLOCK=32),
                         types=dict(PART="*fp32", OK=t, OV=t)))
    return jobs


def masked_weights_jobs(dtypes, quick):
    """The grouped masked-weights kernel: float32 weights and scores (mixed-precision training) or both in
    the dtype, writing the dtype; with and without the alignment hints (ALIGNED)."""
    jobs = []
    for dt in dtypes:
        for src in sorted({"fp32", dt}):
            for aligned in (True, False):
                jobs.append(dict(kernel="mw_grouped", dtype=dt, tag=f"from {src} ALIGNED={int(aligned)}", warps=4,
                                 stages=1, div=set(), variant="aligned" if aligned else "odd",
                                 consts=dict(BLOCK=MW.BLOCK, ALIGNED=aligned),
                                 types=dict(W_PTRS="*i64", S_PTRS="*i64", OUT="*" + dt, TILE_TENSOR="*i32",
                                            TILE_START="*i64", SIZES="*i64", OUT_OFFSETS="*i64", threshold="fp32",
                                            W_CARRIER="*" + src, S_CARRIER="*" + src)))
    return jobs


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", choices=["masked_linear", "masked_weights", "prefix_attention", "prefix_merge"])
    ap.add_argument("--dtypes", default="bf16,fp16,fp32")
    ap.add_argument("--jobs", type=int, default=1, help="parallel compiles (processes)")
    ap.add_argument("--quick", action="store_true", help="a few specialisations per kernel")
    args = ap.parse_args()
    dtypes = args.dtypes.split(",")
    jobs = []
    if args.only in (None, "masked_linear"):
        jobs += masked_linear_jobs(dtypes, args.quick)
    if args.only in (None, "masked_weights"):
        jobs += masked_weights_jobs(dtypes, args.quick)
    if args.only in (None, "prefix_attention"):
        jobs += prefix_attention_jobs(dtypes, args.quick)
    if args.only in (None, "prefix_merge"):
        jobs += prefix_merge_jobs(dtypes, args.quick)
    print(f"{len(jobs)} specialisations for sm_90 (triton {triton.__version__}); "
          f"shared memory limit {LIMIT} B", flush=True)
    t0 = time.time()
    failed, worst = [], []
    pool = ProcessPoolExecutor(args.jobs) if args.jobs > 1 else None
    results = pool.map(compile_one, jobs) if pool else map(compile_one, jobs)
    for r in results:
        head = f"{r['kernel']:15s} {r['dtype']:4s} {r['variant']:7s} w={r['warps']} s={r['stages']} {r['tag']}"
        if "error" in r:
            failed.append(r)
            print(f"FAIL {head}: {r['error']}", flush=True)
            continue
        big = r["shared"] > LIMIT
        if big:
            failed.append(r)
        reg, stack = r.get("REG", "?"), r.get("STACK", "?")
        worst.append((stack if isinstance(stack, int) else 0, head, reg))
        print(f"{'TOO BIG' if big else 'ok':7s} {head}: shared {r['shared']} B  REG {reg}  STACK {stack}"
              f"  ({r['seconds']:.1f} s)", flush=True)
    if pool:
        pool.shutdown()
    worst.sort(reverse=True)
    print(f"\n{len(jobs)} compiled in {time.time() - t0:.0f} s; {len(failed)} failed or too big")
    spills = [w for w in worst if w[0] > 0]
    print(f"{len(spills)} with spills" + (", the largest:" if spills else ""))
    for stack, head, reg in spills[:15]:
        print(f"  STACK {stack:5d}  REG {reg}  {head}")
    for r in failed:
        print(f"FAILED {r['kernel']} {r['dtype']} {r['variant']} {r['tag']}: {r.get('error', 'shared %d B' % r.get('shared', 0))}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
