"""Compile the adapter Triton kernels for sm_90 (H100) without a GPU, and check their shared memory.

Catches what the interpreter cannot: type and shape errors of the GPU compiler, and tiles whose
shared memory would not fit (the fixed-tile kernels must fit; of the autotuned ones, at least the
smallest configuration must), with the registers and spill stack of each (cuobjdump). Needs triton with its NVIDIA backend (ptxas ships with it); slow on a
small CPU (minutes):  python benchmarks/compile_check_adapter.py [--all-dtypes]
"""
import argparse
import os
import sys

_parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
_parser.add_argument("--all-dtypes", action="store_true", help="bf16, fp32 and fp16 (default: bf16 only)")
ARGS = _parser.parse_args()
os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import pet_fast.kernels.adapter_fusion as A  # noqa: E402
import pet_fast.kernels.stacked_adapter_fusion as F  # noqa: E402
import pet_fast.kernels.bottleneck_adapter as B  # noqa: E402

target = GPUTarget("cuda", 90, 32)


def comp(fn, ptrs, ints, floats, consts, num_warps=4, num_stages=3):
    """Compile one specialisation of a @triton.jit function; returns its shared memory in bytes.
    ptrs: pointer argument -> type ("*bf16"); floats: fp32 scalars; other runtime arguments are i32."""
    names = fn.arg_names
    sig = {}
    for name in names:
        if name in consts:
            sig[name] = "constexpr"
        elif name in ptrs:
            sig[name] = ptrs[name]
        else:
            sig[name] = "fp32" if name in floats else "i32"
    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in consts.items()})
    compiled = triton.compile(src, target=target, options=dict(num_warps=num_warps, num_stages=num_stages))
    usage = resource_usage(compiled.asm["cubin"])
    if usage:
        print(f"  {fn.__name__} warps={num_warps} stages={num_stages}: {usage}", flush=True)
    return compiled.metadata.shared


CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def resource_usage(cubin: bytes) -> str:
    """Registers per thread and local-memory stack (spills) of a cubin, from the cuobjdump Triton ships."""
    if not os.path.exists(CUOBJDUMP):
        return ""
    import subprocess
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([CUOBJDUMP, "-res-usage", f.name], capture_output=True, text=True).stdout
    fields = [w for line in out.splitlines() if "REG:" in line for w in line.split() if w.split(":")[0] in ("REG", "STACK")]
    return " ".join(fields)


LIMIT = 232448  # H100 shared memory per block (227 KiB)
failed = 0
for dt in (["bf16", "fp32", "fp16"] if ARGS.all_dtypes else ["bf16"]):
    up = dt == "fp32"
    P = lambda *n: {x: "*" + dt for x in n}
    for rp, act, smode in [(256, 2, 1), (128, 1, 2), (64, 3, 0), (32, 4, 1), (16, 5, 2), (16, 0, 0)]:
        cfgs = B.prune_row_configs(B.row_configs(), {}, RP=rp)
        small = [c for c in cfgs if c.num_stages == 2] or cfgs[-1:]
        for cfg in small:
            bn, bd = cfg.kwargs["BLOCK_N"], cfg.kwargs["BLOCK_D"]
            c = dict(HAS_BD=True, HAS_BU=True, S_MODE=smode, HAS_RES=True, ADD_X=True, LN=False, HAS_LNW=False, HAS_LNB=False, ACT=act, BLOCK_N=bn, BLOCK_D=bd, RP=rp, UPCAST=up)
            sh = comp(B._fwd_kernel, P("X","WD","BD","WU","BU","S","RES","Y","CD","LNW","LNB"), [], ["s_value", "eps"], c, cfg.num_warps, cfg.num_stages)
            c = dict(HAS_BD=True, S_MODE=smode, ADD_DY=True, LN=False, HAS_LNW=False, HAS_LNB=False, ACT=act, BLOCK_N=bn, BLOCK_D=bd, RP=rp, UPCAST=up)
            p = P("X","WD","BD","WU","S","DY","DX","HBUF","DABUF","CD","LNW","LNB","YBUF")
            sh2 = comp(B._bwd_rows_kernel, p, [], ["s_value", "eps"], c, cfg.num_warps, cfg.num_stages)
            c = dict(HAS_BD=True, HAS_BU=True, S_MODE=smode, ACT=act, BLOCK_N=bn, BLOCK_D=bd, RP=rp, KP=8, UPCAST=up)
            p = P("X","QK","WD","BD","WU","BU","S","CTX"); p.update(ABUF="*fp32", PBUF="*fp32")
            sh3 = comp(F._fwd_kernel, p, [], ["s_value", "inv_t"], c, cfg.num_warps, cfg.num_stages)
            if dt != "fp32":  # float32 master weights with half-precision x, and a float32 residual stream
                c = dict(HAS_BD=True, HAS_BU=True, S_MODE=smode, HAS_RES=True, ADD_X=True, LN=False, HAS_LNW=False, HAS_LNB=False, ACT=act, BLOCK_N=bn, BLOCK_D=bd, RP=rp, UPCAST=up)
                p = P("X", "CD", "LNW", "LNB"); p.update({k: "*fp32" for k in ("WD", "BD", "WU", "BU", "S", "RES", "Y")})
                sh = max(sh, comp(B._fwd_kernel, p, [], ["s_value", "eps"], c, cfg.num_warps, cfg.num_stages))
                c = dict(HAS_BD=True, S_MODE=smode, ADD_DY=True, LN=False, HAS_LNW=False, HAS_LNB=False, ACT=act, BLOCK_N=bn, BLOCK_D=bd, RP=rp, UPCAST=up)
                p = P("X", "DX", "HBUF", "DABUF", "CD", "LNW", "LNB", "YBUF"); p.update({k: "*fp32" for k in ("WD", "BD", "WU", "S", "DY")})
                sh2 = max(sh2, comp(B._bwd_rows_kernel, p, [], ["s_value", "eps"], c, cfg.num_warps, cfg.num_stages))
                # Pfeiffer under autocast: the float32 stream x, its frozen LayerNorm applied in the kernels,
                # the products in dt (CD), x's gradient float32
                c = dict(HAS_BD=True, HAS_BU=True, S_MODE=smode, HAS_RES=False, ADD_X=False, LN=True, HAS_LNW=True, HAS_LNB=True, ACT=act, BLOCK_N=bn, BLOCK_D=bd, RP=rp, UPCAST=False)
                p = P("CD"); p.update({k: "*fp32" for k in ("X", "WD", "BD", "WU", "BU", "S", "RES", "Y", "LNW", "LNB")})
                sh = max(sh, comp(B._fwd_kernel, p, [], ["s_value", "eps"], c, cfg.num_warps, cfg.num_stages))
                c = dict(HAS_BD=True, S_MODE=smode, ADD_DY=True, LN=True, HAS_LNW=True, HAS_LNB=True, ACT=act, BLOCK_N=bn, BLOCK_D=bd, RP=rp, UPCAST=False)
                p = P("HBUF", "DABUF", "CD", "YBUF"); p.update({k: "*fp32" for k in ("X", "WD", "BD", "WU", "S", "DY", "DX", "LNW", "LNB")})
                sh2 = max(sh2, comp(B._bwd_rows_kernel, p, [], ["s_value", "eps"], c, cfg.num_warps, cfg.num_stages))
            ok = max(sh, sh2, sh3) <= LIMIT
            failed += not ok
            print("autotuned, smallest tile", dt, rp, bn, bd, cfg.num_stages, sh, sh2, sh3, "fits" if ok else "TOO BIG", flush=True)
        bn, bd, w = B._blocks(rp)
        c = dict(NEED_W=True, HAS_BU=True, NEED_BD=True, NEED_DS=True, S_MODE=smode, BLOCK_N=bn, BLOCK_D=bd, RP=rp,
                 UPCAST=up)
        p = P("X","DY","HBUF","DABUF","WU","BU","S"); p.update(PART="*fp32")
        sh = comp(B._bwd_cols_kernel, p, [], ["s_value"], c, w, 2 if rp >= 128 else 3)
        if dt != "fp32":  # float32 master weights
            p.update(WU="*fp32", BU="*fp32", S="*fp32")
            sh = max(sh, comp(B._bwd_cols_kernel, p, [], ["s_value"], c, w, 2 if rp >= 128 else 3))
        failed += sh > LIMIT
        print("adapter bwd reduction", dt, rp, bn, bd, sh, "fits" if sh <= LIMIT else "TOO BIG", flush=True)
        if rp == 256:  # the split sum has no tile depending on r: once per dtype
            p = {"PART": "*fp32", "O0": "*" + dt, "O1": "*" + dt, "O2": "*" + dt, "O3": "*" + dt, "O4": "*fp32"}
            sh = comp(B._sum_splits_kernel, p, [], [], dict(BLOCK=1024), 4, 3)
            failed += sh > LIMIT
            print("adapter bwd split sum", dt, sh, flush=True)
        bn, bd, w = F._blocks(rp)
        st = 2 if rp >= 128 else 3
        low = not up  # fp16/bf16: qk and dctx in fp32, da and h in the input dtype
        c = dict(HAS_BU=True, S_MODE=smode, ACT=act, WRITE_H=low, BLOCK_N=bn, BLOCK_D=bd, RP=rp, KP=8, UPCAST=up)
        p = P("X","WD","WU","BU","S","DX","DA","HB"); p.update({k: "*fp32" for k in ["QK","DCTX","DQK","ABUF","PBUF","DABUF","DSCBUF"]})
        sh = comp(F._bwd_rows_kernel, p, [], ["s_value", "inv_t"], c, w, st)
        bn, bd, w, st = F._cols_blocks(rp)
        c = dict(HAS_BU=True, S_MODE=smode, NEED_W=True, NEED_DS=True, NEED_BD=True, H_IS_A=up, ACT=act,
                 BLOCK_N=bn, BLOCK_D=bd, RP=rp, UPCAST=up)
        p = P("X","WU","BU","S","HB","DA"); p.update({k: "*fp32" for k in ["QK","DCTX","PBUF","DSCBUF","PART"]})
        sh2 = comp(F._bwd_cols_kernel, p, [], ["s_value"], c, w, st)
        failed += max(sh, sh2) > LIMIT
        print("fusion bwd", dt, rp, bn, bd, sh, sh2, "fits" if max(sh, sh2) <= LIMIT else "TOO BIG", flush=True)
    bn, bd, w = A._attn_blocks(768)
    for kern, p in [(A._attn_fwd_kernel, dict(V="*"+dt, QK="*"+dt, CTX="*"+dt, PBUF="*fp32")),
                    (A._attn_bwd_kernel, dict(V="*"+dt, QK="*"+dt, DCTX="*"+dt, PBUF="*fp32", DV="*"+dt, DQK="*"+dt))]:
        sh = comp(kern, p, [], ["inv_t"], dict(BLOCK_N=bn, BLOCK_D=bd, KP=8), w, 3)
        failed += sh > LIMIT
        print("fusion attention", dt, sh, flush=True)
sys.exit(1 if failed else 0)
