"""Compile every Triton launch of pet_fast's launchers for sm_90 (H100) without a GPU.

The launchers of pet_fast.kernels run on small CPU tensors with every Triton kernel object of the package
replaced by a recorder (``kernel[grid](...)`` and ``_replay.launch`` both end there): nothing runs, each
launch's arguments are kept. Each launch is then specialised as Triton's binder would on a GPU (argument
types, integers equal to 1 as constexprs, 16-divisibility of sizes and pointers) and compiled with
``triton.compile`` for ``GPUTarget("cuda", 90, 32)``; an autotuned kernel once per configuration its
autotuner would compile for that launch (its early pruning applied; ``--unpruned``: every configuration in
``kernel.configs``). The launches are captured twice, as the package is imported with autotuning (model
runs, benchmarks) and with ``PET_FAST_AUTOTUNE=0`` (the GPU tests: one tile per kernel). Identical
specialisations are compiled once.

Reported per kernel and configuration: ok, the compiler's error, or shared memory
(``compiled.metadata.shared``) above the H100's 232448 bytes per block; with registers per thread and
spill stack from the cuobjdump Triton ships, when present. An autotuned configuration over the limit does
not fail a GPU run (the autotuner skips a config that raises OutOfResources) but costs its compile there.

A full run compiles 642 specialisations on 2 shared CPU cores with a cold cache (``--cache-dir``): about 13.5
minutes with triton 3.9, 9 with triton 3.6; reruns with a warm cache are fast; ``--dtypes bf16`` compiles about
a third of them.

    python benchmarks/compile_check.py [--only MODULE ...] [--dtypes bf16,fp16,fp32] [--json PATH]
                                       [--unpruned] [--cache-dir DIR]

MODULE: bottleneck_adapter, adapter_fusion, stacked_adapter_fusion, masked_linear, masked_weights,
prefix_attention, prefix_attention_merge. Exits 1 on any compile error or shared-memory overflow.
"""
import argparse
import importlib
import json
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIMIT = 232448  # H100 shared memory per block, opt-in maximum (227 KiB)
MODULES = ["bottleneck_adapter", "adapter_fusion", "stacked_adapter_fusion", "masked_linear", "masked_weights",
           "prefix_attention", "prefix_attention_merge"]
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
# (D, Hq, Hkv, L, S, P, causal) of bench_prefix_attention.py's rows and of the BERT-base prefix-tuning step
BENCH_PREFIX = [(64, 12, 12, 512, 512, 20, False), (128, 32, 32, 2048, 2048, 64, True), (128, 16, 4, 1024, 1024, 30, True),
                (128, 32, 8, 1, 512, 20, True), (128, 32, 8, 1, 4096, 20, True), (64, 12, 12, 128, 128, 20, False)]
KERNEL_TYPES = ("JITFunction", "InterpretedFunction", "Autotuner", "Heuristics")


# ---------------------------------------------------------------------------------------------------
# Capture (run in a child process per autotune mode: the kernels modules read the environment at import)

class _Recorder:
    """Stands for one Triton kernel object: ``kernel[grid](*args, **kwargs)`` records and runs nothing."""

    def __init__(self, module, name, kernel, sink):
        self.module, self.name, self.kernel, self.sink = module, name, kernel, sink

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.sink.append((self.module, self.name, self.kernel, args, kwargs))
        return launch


def _specs_of(module, name, kernel, args, kwargs, case, mode, unpruned):
    """Specialisations (JSON-able dicts) of one captured launch: one per configuration compiled."""
    import torch
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend
    from pet_fast.kernels import _replay as R

    jit = R._jit_function(kernel)
    names = [p.name for p in jit.params]
    configs = [None]
    if hasattr(kernel, "configs"):  # autotuner
        configs = list(kernel.configs)
        prune = getattr(kernel, "early_config_prune", None)
        if prune is not None and not unpruned:
            configs = list(prune(configs, dict(zip(kernel.arg_names, args)), **kwargs))
    out = []
    for cfg in configs:
        kw = dict(kwargs)
        if cfg is not None:
            kw.update(cfg.kwargs)
        values = dict(zip(names, args))
        values.update({k: v for k, v in kw.items() if k in names})
        types = R.binder_types(jit, values)
        sig, consts, div, attrv = {}, {}, [], {}
        for p in jit.params:
            v = values[p.name]
            if types[p.name] == "constexpr":
                sig[p.name] = "constexpr"
                consts[p.name] = v.item() if isinstance(v, torch.Tensor) else v
            else:
                sig[p.name] = types[p.name]
                # the binder's attribute ("D": divisible by 16), as the JIT passes it on (_pack_args)
                attrv[p.name] = native_specialize_impl(BaseBackend, v, p.is_const, not p.do_not_specialize,
                                                       not p.do_not_specialize_on_alignment)[1]
                if attrv[p.name] == "D":
                    div.append(p.name)
        warps = kw.get("num_warps", cfg.num_warps if cfg is not None else 4)
        stages = kw.get("num_stages", cfg.num_stages if cfg is not None else 3)
        ctas = kw.get("num_ctas", getattr(cfg, "num_ctas", 1) if cfg is not None else 1)
        tile = {k: v for k, v in sorted(cfg.kwargs.items())} if cfg is not None else {}
        out.append(dict(module=module, kernel=name, fn=jit.fn.__name__ if hasattr(jit, "fn") else jit.__name__,
                        sig=sig, consts=consts, div=div, attrv=attrv, num_warps=warps, num_stages=stages, num_ctas=ctas,
                        tile=tile, autotuned=cfg is not None, case=case, mode=mode,
                        fp_fusion=kw.get("enable_fp_fusion")))  # None: the launch left it to Triton's default
    return out


def _cases(module_name, dtypes, tuned):
    """(case label, thunk calling the launcher) for one module; thunks use CPU tensors. ``tuned`` (import
    with autotuning: the benchmarks and model runs) takes model shapes, whose sizes are multiples of 16;
    otherwise (PET_FAST_AUTOTUNE=0: the GPU tests) odd shapes too, as the tests use."""
    odd = lambda shapes: [] if tuned else shapes  # noqa: E731
    import torch
    g = torch.Generator().manual_seed(0)
    mk = lambda *s, dt=torch.float32: torch.randn(*s, generator=g).to(dt)  # noqa: E731
    dts = [getattr(torch, DTYPES[d]) for d in dtypes]
    short = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
    cases = []
    if module_name == "bottleneck_adapter":
        import pet_fast.kernels.bottleneck_adapter as K
        for dt in dts:
            for n, d, r in [(256, 768, 64), (256, 4096, 64), (256, 768, 256), (256, 4096, 256)] + odd([(37, 200, 5)]):
                for form in ("plain", "add_input", "layer_norm"):
                    def run(n=n, d=d, r=r, dt=dt, form=form):
                        x, wd, bd, wu, bu, dy = mk(n, d, dt=dt), mk(r, d, dt=dt), mk(r, dt=dt), mk(d, r, dt=dt), \
                            mk(d, dt=dt), mk(n, d, dt=dt)
                        s = mk(d, dt=dt) if form != "plain" else None
                        res = mk(n, d, dt=dt) if form == "add_input" else None
                        ln = (mk(d, dt=dt), mk(d, dt=dt), 1e-5) if form == "layer_norm" else None
                        K._forward(x, wd, bd, wu, bu, s, 1.0, res, "gelu", form == "add_input", ln, None)
                        K._backward(dy, x, wd, bd, wu, bu, s, 1.0, res is not None, "gelu", s is not None, True,
                                    ln, None)
                    cases.append((f"n={n} d={d} r={r} {short[dt]} {form}", run))
    elif module_name == "adapter_fusion":
        import pet_fast.kernels.adapter_fusion as A
        for dt in dts:
            # and with a score mask and its shared term t0 (dropout on the scores)
            for n, k, d, masked in [(256, 3, 768, False), (256, 8, 4096, False), (256, 3, 768, True)] + odd(
                    [(37, 3, 200, False)]):
                def run(n=n, k=k, d=d, dt=dt, masked=masked):
                    v, qk = mk(n, k, d, dt=dt), mk(n, d, dt=dt)
                    sm, t0 = (mk(n, k), mk(n, dt=dt)) if masked else (None, None)
                    ctx, p = A.attention_forward(v, qk, 1.0, sm, t0)
                    A.attention_backward(mk(n, d, dt=dt), v, qk, p, 1.0, sm, masked)
                cases.append((f"n={n} k={k} d={d} {short[dt]}" + (" score mask" if masked else ""), run))
    elif module_name == "stacked_adapter_fusion":
        import pet_fast.kernels.stacked_adapter_fusion as F
        for dt in dts:
            # qk and dctx in the input dtype (no key or value projection), and for fp16/bf16 also in fp32, as the
            # op passes them with the key and value projections (AdapterFusion's default)
            shapes = [(256, 768, 64, 3, dt), (256, 768, 64, 8, dt), (256, 768, 256, 3, dt)] + odd([(37, 200, 5, 3, dt)])
            if dt != torch.float32:
                shapes += [(256, 768, 64, 3, torch.float32), (256, 768, 64, 8, torch.float32)]
            # and with qk's bias (the folded query-key product: AdapterFusion in a training step under autocast),
            # and with a score mask and its shared term t0 (dropout on the scores), folded or not
            qt_step = shapes[-1][4]
            shapes = ([(n, d, r, k, qt, False, False) for n, d, r, k, qt in shapes]
                      + [(256, 768, 64, 3, qt_step, True, False), (256, 768, 64, 3, qt_step, True, True),
                         (256, 768, 64, 3, qt_step, False, True)])
            for n, d, r, k, qt, with_b, masked in shapes:
                def run(n=n, d=d, r=r, k=k, dt=dt, qt=qt, with_b=with_b, masked=masked):
                    x, qk = mk(n, d, dt=dt), mk(n, d, dt=qt)
                    wd, bd, wu, bu = mk(k, r, d, dt=dt), mk(k, r, dt=dt), mk(k, d, r, dt=dt), mk(k, d, dt=dt)
                    s = mk(k, dt=dt)
                    b = mk(d, dt=dt) if with_b else None
                    sm, t0 = (mk(n, k), mk(n, dt=dt)) if masked else (None, None)
                    ctx, abuf, pbuf = F._forward(x, qk, wd, bd, wu, bu, s, 1.0, "relu", 0.5, b, sm, t0)
                    F._backward(mk(n, d, dt=qt), x, qk, wd, bd, wu, bu, s, 1.0, "relu", 0.5, abuf, pbuf, True, True, b,
                                False, sm, masked)
                cases.append((f"n={n} d={d} r={r} k={k} {short[dt]}" + (" qk fp32" if qt != dt else "")
                              + (" qk bias" if with_b else "") + (" score mask" if masked else ""), run))
    elif module_name == "masked_linear":
        import pet_fast.kernels.masked_linear as M
        for dt in dts:
            tf32s = (False, True) if dt == torch.float32 else (False,)
            # M = 1 (serving one token) is its own specialisation: Triton turns integers equal to 1 into constants
            for m, n, kk in [(256, 768, 768), (1, 768, 768)] + odd([(37, 50, 70)]):
                for tf32 in tf32s:
                    def run(m=m, n=n, kk=kk, dt=dt, tf32=tf32):
                        before = torch.backends.cuda.matmul.allow_tf32
                        torch.backends.cuda.matmul.allow_tf32 = tf32
                        try:
                            x, w, b, dy = mk(m, kk, dt=dt), mk(n, kk, dt=dt), mk(n, dt=dt), mk(m, n, dt=dt)
                            s = mk(n, kk)
                            bits = M.pack(s, 0.0)
                            for mask in (dict(scores=s), dict(bits=bits)):
                                M.forward(x, w, bias=b, threshold=0.0, **mask)
                                M.grad_input(dy, w, threshold=0.0, **mask)
                                M.grad_weight(dy, x, w, threshold=0.0, weight_grad=True, bias_grad=True, **mask)
                            M.pack(s.to(dt), 0.0)
                            wm = M.masked_weight(w, s, 0.0, dt)
                            M.mask_grads(wm, w, s, 0.0, scores_dtype=torch.float32, weight_grad=True)
                        finally:
                            torch.backends.cuda.matmul.allow_tf32 = before
                    cases.append((f"M={m} N={n} K={kk} {short[dt]}{' tf32' if tf32 else ''}", run))
    elif module_name == "masked_weights":
        import pet_fast.kernels.masked_weights as W
        for dt in dts:
            # weights in the products' dtype, and float32 master weights under autocast (mask-tuning's step)
            for wdt in dict.fromkeys((dt, torch.float32)):
                for shapes in [[(768, 768), (3072, 768)]] + odd([[(37, 50), (5, 7)]]):
                    def run(shapes=shapes, dt=dt, wdt=wdt):
                        W._TABLES.clear()
                        ws = [mk(*s, dt=wdt) for s in shapes]
                        ss = [mk(*s) for s in shapes]
                        W.grouped_masked_weights(ws, ss, 0.0, dt)
                        W.grouped_scores_grads([mk(*s, dt=dt) for s in shapes], ws, ss)  # the backward's kernel
                    cases.append((f"{shapes} {short[dt]} weights {short[wdt]}", run))
    elif module_name == "prefix_attention":
        import pet_fast.kernels.prefix_attention as P
        for dt in dts:
            # L = 1: decoding one token (forward only), its own specialisation; then the shapes of
            # bench_prefix_attention.py and of the BERT step (B = 1: the batch size is no kernel argument),
            # whose specialisations (head counts, P = 20 or 30 not multiples of 16, G = 1) a warm cache needs
            shapes = [(D, 2, 4, 4, 128, 128, 16, False, True) for D in (64, 128)] + \
                [(D, 2, 8, 2, 64, 64, 20, True, False) for D in (64, 128)] + \
                [(D, 2, 8, 2, 1, 512, 20, True, False) for D in (64, 128)] + \
                odd([(D, 1, 4, 1, 37, 37, 5, True, True) for D in (64, 128)]) + \
                [(D, 1, Hq, Hkv, L, S, Pn, causal, padded) for D, Hq, Hkv, L, S, Pn, causal in BENCH_PREFIX
                 for padded in (True, False)]
            for D, B, Hq, Hkv, L, S, Pn, causal, padded in shapes:
                def run(B=B, Hq=Hq, Hkv=Hkv, L=L, S=S, Pn=Pn, causal=causal, padded=padded, D=D, dt=dt):
                    q, k, v = mk(B, Hq, L, D, dt=dt), mk(B, Hkv, S, D, dt=dt), mk(B, Hkv, S, D, dt=dt)
                    pk, pv = mk(Hkv, Pn, D, dt=dt), mk(Hkv, Pn, D, dt=dt)
                    kpm = torch.ones(B, S, dtype=torch.bool) if padded else None
                    out, lse = P._forward(q, k, v, pk, pv, kpm, causal)
                    if L > 1:
                        P.backward(mk(B, Hq, L, D, dt=dt), q, k, v, pk, pv, kpm, out, lse, causal)
                cases.append((f"B={B} Hq={Hq} Hkv={Hkv} L={L} S={S} P={Pn} D={D} {short[dt]}"
                              f"{' causal' if causal else ''}{' padded' if padded else ''}", run))
            # attention dropout (a training BERT layer's 0.1; its Philox draws are their own specialisations),
            # and the keep-mask kernel the GPU tests read the draws with
            for D, causal, padded in [(64, False, True), (64, False, False), (128, True, True)]:
                def run(D=D, causal=causal, padded=padded, dt=dt):
                    q, k, v = mk(1, 12, 128, D, dt=dt), mk(1, 12, 128, D, dt=dt), mk(1, 12, 128, D, dt=dt)
                    pk, pv = mk(12, 20, D, dt=dt), mk(12, 20, D, dt=dt)
                    kpm = torch.ones(1, 128, dtype=torch.bool) if padded else None
                    seed = torch.zeros(1, dtype=torch.int64)
                    out, lse = P._forward(q, k, v, pk, pv, kpm, causal, dropout_p=0.1, seed=seed)
                    P.backward(mk(1, 12, 128, D, dt=dt), q, k, v, pk, pv, kpm, out, lse, causal, dropout_p=0.1,
                               seed=seed)
                    P.dropout_keep(seed, (1, 12, 128, 148), 0.1)
                cases.append((f"B=1 Hq=12 L=S=128 P=20 D={D} {short[dt]}{' causal' if causal else ''}"
                              f"{' padded' if padded else ''} dropout 0.1", run))
    elif module_name == "prefix_attention_merge":
        import pet_fast.kernels.prefix_attention_merge as PM
        # flash attention is not what is checked: shaped stand-ins for its results
        PM._flash_forward = lambda q, k, v, causal, scale: (
            torch.empty(q.shape, dtype=q.dtype), torch.empty(q.shape[:3], dtype=torch.float32))
        PM._flash_backward = lambda go, q, k, v, out, lse, causal, scale: (
            torch.empty_like(q), torch.empty_like(k), torch.empty_like(v))
        for dt in dts:
            for D in (64, 128):
                for B, H, L, Pn, shared in [(2, 4, 128, 20, True), (2, 4, 128, 64, False)] + odd([(1, 3, 37, 5, True)]):
                    def run(B=B, H=H, L=L, Pn=Pn, shared=shared, D=D, dt=dt):
                        q, k, v = mk(B, H, L, D, dt=dt), mk(B, H, L, D, dt=dt), mk(B, H, L, D, dt=dt)
                        shape = (H, Pn, D) if shared else (B, H, Pn, D)
                        pk, pv = mk(*shape, dt=dt), mk(*shape, dt=dt)
                        out, lse = PM.forward(q, k, v, pk, pv, True, D ** -0.5)
                        PM.backward(mk(B, H, L, D, dt=dt), q, k, v, pk, pv, out, lse, True, D ** -0.5)
                    cases.append((f"B={B} H={H} L={L} P={Pn} D={D} {short[dt]}{' shared' if shared else ''}", run))
    else:
        raise SystemExit(f"unknown module {module_name!r}; known: {', '.join(MODULES)}")
    return cases


def capture(only, dtypes, unpruned):
    """Runs the launchers of ``only`` with recorders in place of the kernels; returns (specs, launchers
    that raised, kernels never launched)."""
    import torch
    import pet_fast.kernels as package
    torch.set_num_threads(1)
    modules = {info.name: importlib.import_module(f"{package.__name__}.{info.name}")
               for info in pkgutil.iter_modules(package.__path__)}
    sink, kernels = [], {}
    for mname, module in modules.items():
        for name, value in list(vars(module).items()):
            if type(value).__name__ in KERNEL_TYPES:
                kernels[(mname, name)] = value
                setattr(module, name, _Recorder(mname, name, value, sink))
    tuned = os.environ.get("PET_FAST_AUTOTUNE", "1") != "0"
    mode = "autotune" if tuned else "PET_FAST_AUTOTUNE=0"
    specs, failed, launched = [], [], set()
    for mname in only:
        for case, run in _cases(mname, dtypes, tuned):
            del sink[:]
            try:
                run()
            except Exception as e:  # noqa: BLE001 - a launcher that cannot be driven is reported
                failed.append(dict(module=mname, case=case, mode=mode, error=f"{type(e).__name__}: {e}"[:500]))
                continue
            for module, name, kernel, args, kwargs in sink:
                launched.add((module, name))
                specs += _specs_of(module, name, kernel, args, kwargs, f"{mname}: {case}", mode, unpruned)
    # a kernel is covered when it or the autotuner wrapping it was launched; a jit function called from
    # another one (a device helper) is no kernel
    wrapped, jits = {}, {}
    for key, k in kernels.items():
        jit = k
        while hasattr(jit, "fn") and not hasattr(jit, "params"):
            jit = jit.fn
        wrapped.setdefault(id(jit), []).append(key)
        jits[id(jit)] = jit
    sources = {i: getattr(j, "src", "") for i, j in jits.items()}
    for i, j in jits.items():
        name = j.fn.__name__ if hasattr(j, "fn") else j.__name__
        if any(re.search(rf"\b{re.escape(name)}\(", src) for o, src in sources.items() if o != i):
            del wrapped[i]
    uncovered = [f"{m}.{n}" for keys in wrapped.values() if keys[0][0] in only
                 and not any(k in launched for k in keys) for m, n in keys]
    return specs, failed, uncovered


# ---------------------------------------------------------------------------------------------------
# Compile

def resource_usage(cubin):
    """{"REG": registers per thread, "STACK": local-memory stack bytes (spills)} from cuobjdump, if shipped."""
    import triton
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not cubin or not os.path.exists(tool):
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    fields = [w.split(":") for line in out.splitlines() if "REG:" in line for w in line.split()]
    return {k.lower(): int(v) for k, v in (f for f in fields if len(f) == 2) if k in ("REG", "STACK")}


def _jit_options() -> dict:
    """The options a JIT launch adds from Triton's knobs (JITFunction.run): part of the compile's cache key,
    so that what is compiled here is found by the launches on a GPU (a warm cache, triton_cache_pack.py)."""
    from triton import knobs

    out = dict(debug=bool(knobs.runtime.debug), instrumentation_mode=knobs.compilation.instrumentation_mode)
    if hasattr(knobs.compilation, "fpsan_homomorphic_casts"):  # Triton 3.9
        out["fpsan_homomorphic_casts"] = knobs.compilation.fpsan_homomorphic_casts
    return out


def compile_spec(spec):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from pet_fast.kernels import _replay as R

    module = importlib.import_module(f"pet_fast.kernels.{spec['module']}")
    jit = R._jit_function(getattr(module, spec["kernel"]))
    options = dict(num_warps=spec["num_warps"], num_stages=spec["num_stages"], **_jit_options())
    if spec["num_ctas"] != 1:
        options["num_ctas"] = spec["num_ctas"]
    if spec.get("fp_fusion") is not None:
        options["enable_fp_fusion"] = spec["fp_fusion"]
    # signature, constexprs and attributes as the JIT itself packs them from the binder's specialisation
    # (their layout, part of the cache key, changes between Triton versions)
    specialization = [("constexpr", spec["consts"][p.name]) if spec["sig"][p.name] == "constexpr"
                      else (spec["sig"][p.name], spec["attrv"].get(p.name)) for p in jit.params]
    bound = {p.name: spec["consts"].get(p.name) for p in jit.params}
    target = GPUTarget("cuda", 90, 32)
    _, signature, consts, attrs = jit._pack_args(make_backend(target), dict(options), bound, specialization, None)
    t0 = time.time()
    try:
        compiled = triton.compile(ASTSource(fn=jit, signature=signature, constexprs=consts, attrs=attrs),
                                  target=target, options=options)
        meta = compiled.metadata
        res = dict(shared=meta.shared)
        for k in ("n_regs", "n_spills"):
            if getattr(meta, k, None) is not None:
                res[k] = getattr(meta, k)
        res.update(resource_usage(compiled.asm.get("cubin")))
        ptx = compiled.asm.get("ptx") or ""
        # 128-bit global accesses (ld/st.global.v4.b32 and the like): whether the vector hints took effect
        res["v4_loads"], res["v4_stores"] = ptx.count("ld.global.v4"), ptx.count("st.global.v4")
        res["status"] = "ok" if meta.shared <= LIMIT else "smem"
    except Exception as e:  # noqa: BLE001 - every compiler error is a finding
        lines = [ln for ln in str(e).splitlines() if ln.strip()]
        res = dict(status="error", error=f"{type(e).__name__}: " + " | ".join(lines[:6])[:800])
    res["seconds"] = round(time.time() - t0, 2)
    return res


def _key(spec):
    return json.dumps([spec["module"], spec["kernel"], spec["sig"], spec["consts"], sorted(spec["div"]),
                       spec["num_warps"], spec["num_stages"], spec["num_ctas"], spec.get("fp_fusion")], sort_keys=True,
                      default=str)


def _flags(spec):
    skip = set(spec["tile"])
    return " ".join(f"{k}={v}" for k, v in spec["consts"].items() if k not in skip)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", nargs="+", default=MODULES, metavar="MODULE", help="kernel modules (default: all)")
    p.add_argument("--dtypes", default="bf16,fp16,fp32", help="comma-separated (default: %(default)s)")
    p.add_argument("--json", help="write every specialisation's result here")
    p.add_argument("--unpruned", action="store_true",
                   help="every configuration in an autotuner's list, also those its early pruning drops")
    p.add_argument("--modes", default="autotune,PET_FAST_AUTOTUNE=0",
                   help="import modes to capture (default: %(default)s)")
    p.add_argument("--cache-dir", help="TRITON_CACHE_DIR for the compiles (default: Triton's)")
    p.add_argument("--_capture", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    dtypes = args.dtypes.split(",")
    for m in args.only:
        if m not in MODULES:
            p.error(f"unknown module {m!r}; known: {', '.join(MODULES)}")
    if args._capture:
        specs, failed, uncovered = capture(args.only, dtypes, args.unpruned)
        json.dump(dict(specs=specs, failed=failed, uncovered=uncovered), sys.stdout)
        return 0

    os.environ.pop("TRITON_INTERPRET", None)
    if args.cache_dir:
        os.environ["TRITON_CACHE_DIR"] = args.cache_dir
    t_start = time.time()
    specs, failed, uncovered = [], [], set()
    for mode in args.modes.split(","):
        env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PET_FAST_AUTOTUNE")}
        if mode != "autotune":
            env["PET_FAST_AUTOTUNE"] = "0"
        cmd = [sys.executable, os.path.abspath(__file__), "--_capture", "--only", *args.only, "--dtypes", args.dtypes]
        out = subprocess.run(cmd + (["--unpruned"] if args.unpruned else []), capture_output=True, text=True,
                             env=env)
        if out.returncode != 0:
            print(out.stderr[-4000:], file=sys.stderr)
            return 2
        got = json.loads(out.stdout)
        specs += got["specs"]
        failed += got["failed"]
        uncovered |= set(got["uncovered"])
    unique, cases = {}, {}
    for s in specs:
        k = _key(s)
        unique.setdefault(k, s)
        cases.setdefault(k, []).append(f"{s['case']} [{s['mode']}]")
    print(f"{len(specs)} launch configurations captured, {len(unique)} distinct specialisations "
          f"(triton {__import__('triton').__version__}); compiling for sm_90", flush=True)
    results = []
    for i, (k, s) in enumerate(unique.items()):
        r = dict(s, **compile_spec(s), cases=cases[k])
        r.pop("case")
        r.pop("mode")
        results.append(r)
        tile = " ".join(f"{a}={b}" for a, b in r["tile"].items())
        regs = f"reg={r['reg']} stack={r['stack']}" if "reg" in r else \
            (f"n_regs={r['n_regs']} spills={r['n_spills']}" if "n_regs" in r else "")
        what = r.get("error") or f"shared={r['shared']} {regs}"
        more = f" +{len(r['cases']) - 1}" if len(r["cases"]) > 1 else ""
        print(f"[{i + 1}/{len(unique)}] {r['status']:5} {r['module']}.{r['kernel']} w{r['num_warps']}s{r['num_stages']} "
              f"{tile} | {_flags(r)} | {what} | {r['cases'][0]}{more} ({r['seconds']} s)", flush=True)
    bad = [r for r in results if r["status"] != "ok"]
    elapsed = round(time.time() - t_start, 1)
    print(f"\n{len(results)} compiled in {elapsed} s: {sum(r['status'] == 'ok' for r in results)} ok, "
          f"{sum(r['status'] == 'error' for r in results)} compile errors, "
          f"{sum(r['status'] == 'smem' for r in results)} over {LIMIT} B of shared memory")
    for r in bad:
        print(f"FAIL {r['status']} {r['module']}.{r['kernel']} w{r['num_warps']}s{r['num_stages']} {r['tile']} "
              f"{_flags(r)}: {r.get('error') or r['shared']} -- e.g. {r['cases'][0]}")
    for f in failed:
        print(f"LAUNCHER FAILED ON CPU ({f['mode']}) {f['module']}: {f['case']}: {f['error']}")
    for u in sorted(uncovered):
        print(f"NOT LAUNCHED: {u}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(triton=__import__("triton").__version__, target="cuda:90", limit=LIMIT, seconds=elapsed,
                           results=results, launcher_failures=failed, not_launched=sorted(uncovered)), fh, indent=1)
    return 1 if bad or failed else 0


if __name__ == "__main__":
    sys.exit(main())
