"""benchmarks/compile_check.py drives a launcher with recorders in place of the kernels and compiles what it
captured for sm_90 (no GPU, no interpreter): here on the smallest module."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import configs_as_on_a_gpu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_compile_check_compiles_the_masked_weights_launches_for_sm90(tmp_path):
    triton = pytest.importorskip("triton")
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        pytest.skip("triton without its NVIDIA backend's ptxas")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PET_FAST_AUTOTUNE")}
    out_json = tmp_path / "compile.json"
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "compile_check.py"), "--only",
                          "masked_weights", "--dtypes", "bf16,fp32", "--json", str(out_json)],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    report = json.loads(out_json.read_text())
    results = report["results"]
    # aligned and odd weight lists in two dtypes, with weights in that dtype or float32: the ALIGNED=True and
    # False specialisations of the forward's kernel and of the backward's (the scores' gradients)
    assert {(r["kernel"], r["consts"]["ALIGNED"]) for r in results} == {
        (k, a) for k in ("_grouped_kernel", "_grouped_grads_kernel") for a in (True, False)}
    assert len(results) == 12  # (bf16, bf16 weights), (bf16, fp32 weights), fp32: x 2 alignments x 2 kernels
    assert {r["sig"]["W_CARRIER"] for r in results} == {"*bf16", "*fp32"}
    for r in results:
        assert r["status"] == "ok", r
        assert 0 <= r["shared"] <= report["limit"]
        assert r["sig"]["W_PTRS"].startswith("*")  # the table of addresses passed as a tensor
        # the vector hints of aligned lists take effect (128-bit loads), and only there
        assert (r["v4_loads"] > 0) == r["consts"]["ALIGNED"], r
    assert {r["sig"]["OUT"] for r in results if r["kernel"] == "_grouped_kernel"} == {"*bf16", "*fp32"}
    assert {r["sig"]["OUT"] for r in results if r["kernel"] == "_grouped_grads_kernel"} == {"*fp32"}  # the scores
    assert report["launcher_failures"] == [] and report["not_launched"] == []


def _tile(c, *names):
    return tuple(c.kwargs[n] for n in names) + (c.num_warps, c.num_stages)


def test_every_captured_launch_asks_for_fma_contraction():
    """Each launcher of every kernel module, driven by compile_check.py's capture: every launch passes
    enable_fp_fusion=True (kernels/_host.py FP_FUSION), which the kernels' arithmetic is written for and which
    Triton announced it would stop defaulting to; and compile_check compiles what each launch asked for."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PET_FAST_AUTOTUNE")}
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "compile_check.py"), "--_capture",
                          "--dtypes", "bf16"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout)
    assert got["failed"] == []
    kernels = {(s["module"], s["kernel"]) for s in got["specs"]}
    assert {m for m, _ in kernels} >= {"bottleneck_adapter", "adapter_fusion", "stacked_adapter_fusion",
                                      "masked_linear", "masked_weights", "prefix_attention"}
    left_to_default = sorted({f"{s['module']}.{s['kernel']}" for s in got["specs"] if s["fp_fusion"] is not True})
    assert left_to_default == []


def test_tf32_masked_gemm_configs_keep_the_tiles_whose_stages_fit_sm90():
    """compile_check found 9 of the 12 tensor-core configs over sm_90's shared memory with TF32 from scores
    (the float32 x, weight and scores tiles), 1 from packed bits; the pruner keeps the others only, and all
    of them for 2-byte inputs."""
    import triton

    ml = pytest.importorskip("pet_fast.kernels.masked_linear")
    names = ("BLOCK_M", "BLOCK_N", "BLOCK_K")
    configs = [triton.Config(dict(zip(names, t[:3]), GROUP=8), num_warps=t[3], num_stages=t[4]) for t in ml._GEMM_CONFIGS]
    prune = ml._prune("BLOCK_K", check_shared=True)
    scores = prune(configs, {}, FP32_DOT=True, PRECISION="tf32", FROM_BITS=False)
    assert {_tile(c, *names) for c in scores} == {(64, 64, 64, 4, 4), (64, 64, 64, 8, 3), (128, 128, 32, 4, 4)}
    bits = prune(configs, {}, FP32_DOT=True, PRECISION="tf32", FROM_BITS=True)
    assert {_tile(c, *names) for c in configs} - {_tile(c, *names) for c in bits} == {(256, 128, 64, 8, 3)}
    assert prune(configs, {}, FP32_DOT=False, PRECISION="tf32", FROM_BITS=False) == configs
    # the dx kernel: the same tiles in its transposed names (BLOCK_N the reduction) give the same choice
    dx = [triton.Config({"BLOCK_M": c.kwargs["BLOCK_M"], "BLOCK_N": c.kwargs["BLOCK_K"], "BLOCK_K": c.kwargs["BLOCK_N"],
                         "GROUP": 8}, num_warps=c.num_warps, num_stages=c.num_stages) for c in configs]
    kept = ml._prune("BLOCK_N", check_shared=True)(dx, {}, FP32_DOT=True, PRECISION="tf32", FROM_BITS=False)
    assert {_tile(c, "BLOCK_M", "BLOCK_K", "BLOCK_N") for c in kept} == {_tile(c, *names) for c in scores}


def test_float32_adapter_row_backward_keeps_the_tiles_that_fit_sm90():
    """compile_check measured the row backward's float32 tiles with BLOCK_N x BLOCK_D x RP = 2^19 at 295-305 KB
    of shared memory: pruned for float32 inputs, kept for 2-byte ones (and by the forward)."""
    import triton

    ka = pytest.importorskip("pet_fast.kernels.bottleneck_adapter")
    configs = [triton.Config({"BLOCK_N": bn, "BLOCK_D": bd}, num_warps=w, num_stages=st)
               for bn, bd, w, st in [(64, 64, 8, 3), (32, 64, 8, 3), (64, 128, 8, 3), (32, 64, 4, 3), (16, 32, 8, 2)]]
    tiles = lambda cs: {_tile(c, "BLOCK_N", "BLOCK_D") for c in cs}  # noqa: E731
    assert (64, 128, 8, 3) not in tiles(ka.prune_bwd_row_configs(configs, {}, RP=64, UPCAST=True))
    assert tiles(ka.prune_bwd_row_configs(configs, {}, RP=64, UPCAST=True)) == {
        (64, 64, 8, 3), (32, 64, 8, 3), (32, 64, 4, 3), (16, 32, 8, 2)}
    assert tiles(ka.prune_bwd_row_configs(configs, {}, RP=256, UPCAST=True)) == {(16, 32, 8, 2)}
    assert tiles(ka.prune_bwd_row_configs(configs, {}, RP=64, UPCAST=False)) == tiles(
        ka.prune_row_configs(configs, {}, RP=64, UPCAST=False))
    assert (64, 128, 8, 3) in tiles(ka.prune_row_configs(configs, {}, RP=64, UPCAST=True))


def test_float32_adapter_row_backward_from_rp64_tries_the_16x32_tile_only():
    """compile_check under Triton 3.6 measured every float32 row-backward tile of the adapter but (16, 32)
    spilling 344-4240 bytes at RP=64: from RP=64 the adapter's autotuner keeps that one (below, all of its
    tiles and splits are kept); 2-byte products keep every tile, and the stacked fusion's own pruning is not
    narrowed."""
    ka = pytest.importorskip("pet_fast.kernels.bottleneck_adapter")
    sf = pytest.importorskip("pet_fast.kernels.stacked_adapter_fusion")
    configs = configs_as_on_a_gpu(ka, ka.adapter_row_configs)
    tiles = lambda cs: {_tile(c, "BLOCK_N", "BLOCK_D", "SPLIT_D") for c in cs}  # noqa: E731
    at = lambda rp, upcast: ka.prune_adapter_bwd_configs(  # noqa: E731
        configs, {"N": 4096, "D": 768, "X": None}, RP=rp, UPCAST=upcast)
    assert tiles(at(64, True)) == tiles(at(256, True)) == {(16, 32, 1, 8, 2)}
    assert (64, 64, 1, 8, 3) in tiles(at(16, True))  # narrow bottlenecks: the measured spills were at RP=64
    assert tiles(at(64, False)) == tiles(ka.prune_adapter_configs(configs, {"N": 4096, "D": 768, "X": None},
                                                                   RP=64, UPCAST=False))
    fusion = sf.bwd_row_configs()
    assert len(sf.prune_fusion_bwd_row_configs(fusion, {}, RP=64, UPCAST=True)) > 1


def test_128_row_adapter_tiles_are_tried_for_2_byte_products_only():
    """The forward and row-backward autotuners try 128-token tiles (each program re-reads both weights: fewer
    programs, fewer reads); compile_check measured their float32 builds spilling at RP=64, so float32
    products (UPCAST) never try them, and no dtype does where BLOCK_N x RP passes the registers."""
    ka = pytest.importorskip("pet_fast.kernels.bottleneck_adapter")
    configs = configs_as_on_a_gpu(ka, ka.row_configs)
    tiles = lambda cs: {_tile(c, "BLOCK_N", "BLOCK_D") for c in cs}  # noqa: E731
    assert (128, 64, 8, 3) in tiles(configs)
    for prune in (ka.prune_row_configs, ka.prune_bwd_row_configs):
        assert (128, 64, 8, 3) in tiles(prune(configs, {}, RP=64, UPCAST=False))
        assert not any(c.kwargs["BLOCK_N"] > 64 for c in prune(configs, {}, RP=64, UPCAST=True))
        assert not any(c.kwargs["BLOCK_N"] > 64 for c in prune(configs, {}, RP=128, UPCAST=False))


def _compile_masked_weights_bf16(cache):
    """compile_check.py's autotune compiles of masked_weights in bf16 into the Triton cache ``cache``."""
    triton = pytest.importorskip("triton")
    if not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")):
        pytest.skip("triton without its NVIDIA backend's ptxas")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PET_FAST_AUTOTUNE")}
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "compile_check.py"), "--only",
                          "masked_weights", "--dtypes", "bf16", "--modes", "autotune", "--cache-dir", str(cache)],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return sorted(os.listdir(cache))


@pytest.fixture(scope="module")
def warm_cache(tmp_path_factory):
    """One compile of masked_weights (bf16, autotune) for the tests below, which copy it before use."""
    cache = tmp_path_factory.mktemp("warm_cache")
    assert _compile_masked_weights_bf16(cache)
    return cache


def test_a_packed_cache_unpacked_elsewhere_is_hit_by_the_same_compiles(tmp_path, warm_cache):
    """benchmarks/triton_cache_pack.py: the masked_weights compiles made into one cache, packed (metadata,
    cubin, PTX only) and unpacked under another directory, are found there by the same compiles (no new
    entry), with their group files pointing at the unpacked files."""
    sys.path.insert(0, ROOT)
    from benchmarks import triton_cache_pack

    compile_into = _compile_masked_weights_bf16
    shutil.copytree(warm_cache, tmp_path / "a")
    made = sorted(os.listdir(tmp_path / "a"))
    assert made
    archive = tmp_path / "warm.tar.gz"
    assert triton_cache_pack.pack(str(tmp_path / "a"), str(archive)) == len(made)
    b = tmp_path / "b"
    assert triton_cache_pack.unpack(str(archive), str(b)) == len(made)
    for entry in made:
        files = os.listdir(b / entry)
        assert not any(f.endswith((".llir", ".ttir", ".ttgir", ".source")) for f in files)
        for grp in (f for f in files if f.startswith("__grp__")):
            paths = json.loads((b / entry / grp).read_text())["child_paths"].values()
            assert paths and all(os.path.exists(p) and p.startswith(str(b)) for p in paths)
    assert compile_into(b) == made
    for entry in made:  # every compile found its entry: a miss would have written the IRs again
        assert not any(f.endswith((".llir", ".ttir", ".ttgir")) for f in os.listdir(b / entry)), entry
    assert triton_cache_pack.unpack(str(archive), str(b)) == 0  # existing entries are kept


_JIT_WARMUP = """
import os, sys
import torch
from triton.backends.compiler import GPUTarget
from triton.runtime import driver


class SM90:  # a driver that reports an H100 without one: enough for the JIT to specialise and compile
    def get_current_device(self): return 0
    def get_current_stream(self, device=None): return 0
    def get_current_target(self): return GPUTarget("cuda", 90, 32)
    def get_active_torch_device(self): return torch.device("cpu")


driver.set_active(SM90())
import pet_fast.kernels.masked_weights as W

real = W._grouped_kernel
W._grouped_kernel = type("Warm", (), {"__getitem__": lambda self, grid: lambda *a, **k: real.warmup(*a, grid=grid, **k)})()
ws = [torch.randn(768, 768).to(torch.bfloat16), torch.randn(3072, 768).to(torch.bfloat16)]
W.grouped_masked_weights(ws, [torch.randn(768, 768), torch.randn(3072, 768)], 0.0, torch.bfloat16)
"""


def test_the_jit_finds_what_compile_check_compiled(tmp_path, warm_cache):
    """The launcher's own JIT path (JITFunction.warmup, with a driver that reports sm_90) looks up the key
    compile_check.py compiled under: with its cache it compiles nothing, with an empty one it does. What a
    warm cache carried to a GPU machine relies on (besides the machine's Triton build being the same)."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PET_FAST_AUTOTUNE")}
    warm, empty = tmp_path / "warm", tmp_path / "empty"
    shutil.copytree(warm_cache, warm)

    def compiled_by_warmup(cache):
        """The entries the warm-up call compiled (a compile writes the LLVM IR beside the cubin)."""
        cache.mkdir(exist_ok=True)
        before = set(cache.rglob("*.llir"))
        run = subprocess.run([sys.executable, "-c", _JIT_WARMUP], capture_output=True, text=True,
                             env=dict(env, TRITON_CACHE_DIR=str(cache)), cwd=ROOT, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
        return set(cache.rglob("*.llir")) - before

    assert compiled_by_warmup(warm) == set()  # found: nothing compiled
    assert len(compiled_by_warmup(empty)) == 1  # the same call compiles where the cache is empty
