"""`pet-fast bench` end to end on the CPU (tiny models, eager), its JSON, and `--compare`."""
import json
import os
import subprocess
import sys

import pytest
import torch

from pet_fast import bench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(*args, timeout=240):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-m", "pet_fast", "bench", *args], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "a.json"
    out = _cli("--quick", "--json", str(path))
    return path, out, json.loads(path.read_text())


def test_quick_run_writes_every_row(quick_run):
    path, out, doc = quick_run
    env = doc["env"]
    assert {"device", "torch", "python", "triton", "git", "time"} <= env.keys()
    step = doc["step"]
    assert step["label"].startswith("CPU eager")
    assert step["settings"]["quick"] is True and step["settings"]["compile"] is False
    assert step["settings"]["optimizer"] == "AdamW(lr=1e-5, fused=True)"
    rows = step["rows"]
    want = {(m, r.row) for m in bench.QUICK_MODELS for r in bench.plan([m], compile_rows=False, auto_rows=False)}
    assert {(r["model"], r["row"]) for r in rows} == want
    for method in bench.METHODS:  # (the GPU-only rows: none here)
        assert any(r["row"] == f"{method}/eager" for r in rows) != (method in bench.GPU_GRAPH_METHODS)
    for r in rows:
        if r["row"] in bench.EXTERNAL:  # (AdapterHub's or PEFT's rows, where installed: noted, may fail)
            continue
        assert "note" not in r, r  # every row ran (no error)
        assert r["ms"] > 0 and r["tokens_per_s"] > 0 and r["peak_mem_mb"] is None  # no peak memory on the CPU
        assert r["vs_floor"] == pytest.approx(r["ms"] / next(f["ms"] for f in rows if f["model"] == r["model"]
                                                               and f["row"] == "floor"), rel=1e-2)
        assert r["trainable_params"] > 0 or r["row"] == "base-forward"
    by = {(r["model"], r["row"]): r for r in rows}
    assert by[("bert-tiny-4x32", "full")]["trainable_params"] > by[("bert-tiny-4x32", "houlsby/eager")]["trainable_params"]
    assert by[("llama-tiny-4x32", "floor")]["left_padding"] is True
    # the op benchmarks ran as subprocesses and their JSON is embedded
    assert set(doc["ops"]) == {"bench_bottleneck_adapter", "bench_host_overhead", "bench_masked_linear",
                               "bench_prefix_attention"}
    assert all(d.get("rows") for d in doc["ops"].values())
    assert "floor" in out and "[1/" in out  # table and progress printed
    assert "chart" in out  # a PNG or a message saying why there is none
    assert os.path.exists(path.with_suffix(".png")) == ("chart: skipped" not in out)


def test_compare_two_runs(quick_run, tmp_path):
    path_a = quick_run[0]
    path_b = tmp_path / "b.json"
    _cli("--step", "--quick", "--models", "bert-tiny-4x32", "--rows", "floor", "houlsby/*", "--json", str(path_b))
    rows_b = json.loads(path_b.read_text())["step"]["rows"]
    assert [r["row"] for r in rows_b] == ["floor", "houlsby/eager", "houlsby/auto"]  # asked for: auto too
    assert all(r["ms"] > 0 for r in rows_b)
    out = _cli("--compare", str(path_a), str(path_b))
    lines = [line for line in out.splitlines() if line.startswith("bert-tiny-4x32")]
    assert len(lines) == 2 and "B/A" in out  # the rows both files have


def test_compare_ratios(tmp_path, capsys):
    def doc(ms, us):
        return {"env": {"device": "x"}, "step": {"label": "l", "rows": [
            {"model": "m", "row": "floor", "ms": ms, "peak_mem_mb": 100.0},
            {"model": "m", "row": "only-here", "ms": 1.0}]},
            "ops": {"bench_x": {"rows": [{"op": "a", "n": 4, "us": us, "vs_eager": 2.0}]}}}
    (tmp_path / "a.json").write_text(json.dumps(doc(10.0, 4.0)))
    b = doc(15.0, 2.0)
    b["step"]["rows"].pop()
    (tmp_path / "b.json").write_text(json.dumps(b))
    rows = bench.compare(str(tmp_path / "a.json"), str(tmp_path / "b.json"))
    assert rows[0]["B/A"] == 1.5 and rows[0]["mem B/A"] == 1.0 and len(rows) == 2
    assert rows[1]["bench"] == "bench_x" and rows[1]["B/A"] == 0.5


def test_ratios_use_the_compiled_floor_for_compiled_rows():
    rows = [{"model": "m", "row": "floor", "compiled": False, "ms": 10.0},
            {"model": "m", "row": "floor+compile", "compiled": True, "ms": 5.0},
            {"model": "m", "row": "full", "compiled": False, "ms": 20.0},
            {"model": "m", "row": "x/auto", "compiled": False, "ms": 12.0},
            {"model": "m", "row": "x/auto+compile", "compiled": True, "ms": 6.0},
            {"model": "m", "row": "y", "compiled": False, "note": "error: boom"}]
    bench.add_ratios(rows)
    assert rows[3]["vs_floor"] == 1.2 and rows[4]["vs_floor"] == 1.2 and rows[4]["floor_row"] == "floor+compile"
    assert rows[3]["vs_full"] == 0.6 and "vs_floor" not in rows[5]


def test_memory_against_full_and_side_tuning_against_the_base_forward():
    """The targets' other yardsticks: peak memory against full fine-tuning's (mask-tuning) and the step against
    a forward of the frozen base (side-tuning, with and without the cache)."""
    rows = [{"model": "m", "row": "floor", "compiled": False, "ms": 10.0, "peak_mem_mb": 100.0},
            {"model": "m", "row": "full", "compiled": False, "ms": 20.0, "peak_mem_mb": 400.0},
            {"model": "m", "row": "base-forward", "compiled": False, "ms": 4.0},
            {"model": "m", "row": "mask/auto", "compiled": False, "ms": 21.0, "peak_mem_mb": 420.0},
            {"model": "m", "row": "side/auto", "compiled": False, "ms": 5.0, "peak_mem_mb": 90.0},
            {"model": "m", "row": "side-cache/auto", "compiled": False, "ms": 2.0},
            {"model": "n", "row": "side/auto", "compiled": False, "ms": 5.0},
            {"model": "m", "row": "side-graphs/auto", "compiled": False, "ms": 3.0}]
    bench.add_ratios(rows)
    assert rows[3]["mem_vs_full"] == 1.05 and rows[4]["mem_vs_full"] == 0.225 and "mem_vs_full" not in rows[5]
    assert rows[4]["vs_base_forward"] == 1.25 and rows[5]["vs_base_forward"] == 0.5
    assert "vs_base_forward" not in rows[3] and "vs_base_forward" not in rows[6]  # not side; no base row in n
    assert rows[7]["vs_base_forward"] == 0.75
    assert {"mem_vs_full", "vs_base_forward"} <= set(bench.COLUMNS)


def test_cudagraph_rows_use_the_cudagraph_floor():
    rows = [{"model": "m", "row": "floor", "compiled": False, "ms": 10.0},
            {"model": "m", "row": "floor+compile", "compiled": True, "ms": 5.0},
            {"model": "m", "row": "floor+cudagraphs", "compiled": True, "ms": 4.0},
            {"model": "m", "row": "x/auto+cudagraphs", "compiled": True, "ms": 5.0},
            {"model": "m", "row": "full+cudagraphs", "compiled": True, "ms": 10.0}]
    bench.add_ratios(rows)
    assert rows[3]["vs_floor"] == 1.25 and rows[3]["floor_row"] == "floor+cudagraphs" and rows[3]["vs_full"] == 0.5


def test_plan_has_cudagraph_rows_for_the_key_rows_when_asked():
    rows = bench.plan(["bert-32x128", "llama1b-4x1024"], compile_rows=True, cudagraph_rows=True)
    graphs = [r for r in rows if r.row.endswith("+cudagraphs")]
    assert [r.row[:-len("+cudagraphs")] for r in graphs] == bench.KEY_COMPILED
    assert {r.model for r in graphs} == {"bert-32x128"}
    assert all(r.compiled and r.compile_mode == "reduce-overhead" for r in graphs)
    assert all(r.compile_mode is None for r in rows if r.row.endswith("+compile"))
    # right after the first model's key compiled rows, before the second model's eager rows
    names = [r.row for r in rows]
    assert names.index("full+cudagraphs") < [(r.model, r.compiled) for r in rows].index(("llama1b-4x1024", False))
    assert not any(r.row.endswith("+cudagraphs") for r in bench.plan(["bert-32x128"], compile_rows=True))
    assert not any(r.row.endswith("+cudagraphs") for r in bench.plan(["bert-32x128"], compile_rows=False,
                                                                      cudagraph_rows=True))


def test_plan_has_kernel_rows_on_a_gpu_only():
    cpu = {r.row for r in bench.plan(["bert-32x128"], compile_rows=True)}
    gpu = {r.row for r in bench.plan(["bert-32x128"], compile_rows=True, kernel_rows=True)}
    assert not any(r.endswith("/triton") for r in cpu)
    # eager only: no compiled copies
    assert gpu - cpu == ({f"{m}/triton" for m in bench.KERNEL_ROWS} | {f"{m}/cuda" for m in bench.CUDA_ROWS}
                         | {f"{m}/triton-py" for m in bench.PY_LAUNCH_ROWS}
                         | {f"{m}/auto" for m in bench.KERNEL_ONLY_METHODS})
    # (AdapterFusion with dropout on its scores: the first model's batch only)
    two = bench.plan(["bert-32x128", "bert-16x512"], compile_rows=False, kernel_rows=True)
    assert {r.model for r in two if r.kind in bench.KERNEL_ONLY_METHODS} == {"bert-32x128"}


def test_plan_orders_rows_for_a_time_budget():
    rows = bench.plan(["bert-32x128", "llama1b-4x1024"], compile_rows=True)
    kinds = [(r.model, r.compiled) for r in rows]
    first_model_eager = kinds.index(("bert-32x128", True))
    assert set(kinds[:first_model_eager]) == {("bert-32x128", False)}
    assert [r.row for r in rows[first_model_eager:first_model_eager + 2]] == ["floor+compile", "houlsby/auto+compile"]
    llama_eager = kinds.index(("llama1b-4x1024", False))
    assert all(c for _, c in kinds[first_model_eager:llama_eager])  # the key compiled rows of the first model
    assert llama_eager - first_model_eager == len(bench.KEY_COMPILED)
    assert all(c for _, c in kinds[kinds.index(("llama1b-4x1024", True)):])
    assert len(rows) == len({(r.model, r.row) for r in rows})
    names = {r.row for r in rows if r.model == "bert-32x128"}
    for m in bench.METHODS:
        if m in bench.GPU_GRAPH_METHODS:  # auto only, never compiled (compiling runs the eager base)
            assert f"{m}/auto" in names and not any(n.startswith(f"{m}/") and n != f"{m}/auto" for n in names)
            continue
        assert {f"{m}/eager", f"{m}/auto", f"{m}/eager+compile", f"{m}/auto+compile"} <= names
    cpu = {r.row for r in bench.plan(["bert-32x128"], compile_rows=True, auto_rows=False)}
    assert not any(n.startswith("side-graphs") for n in cpu)
    assert {"floor", "floor+compile", "full", "full+compile", "base-forward"} <= names
    with pytest.raises(ValueError, match="--models"):
        bench.step_benchmark(quick=True, models=["nope"])


def test_profile_adapter_quick(tmp_path):
    """benchmarks/profile_adapter.py (per-kernel time of one adapter forward+backward) runs and writes rows."""
    path = tmp_path / "prof.json"
    subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "profile_adapter.py"), "--quick", "--json",
                    str(path)], check=True, capture_output=True, timeout=300, env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    rows = json.loads(path.read_text())["rows"]
    whole = [r for r in rows if r["kernel"] == "(whole call)"]
    assert [r["backend"] for r in whole] == ["eager"]
    assert whole[0]["host_us_per_call"] > 0 and whole[0]["wall_us_per_call"] > 0
    assert any(r["kernel"].startswith("aten::") and r["us_per_call"] > 0 for r in rows)


def test_profile_step_quick(tmp_path):
    """benchmarks/profile_step.py (host vs device time and top ops of whole steps) runs and writes rows."""
    path = tmp_path / "prof_step.json"
    subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "profile_step.py"), "--quick", "--rows", "floor",
                    "houlsby/eager", "--steps", "1", "--json", str(path)], check=True, capture_output=True, timeout=300,
                   env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    rows = json.loads(path.read_text())["rows"]
    assert [r["row"] for r in rows] == ["floor", "houlsby/eager"]
    for r in rows:
        assert "error" not in r, r
        assert r["wall_ms"] > 0 and r["host_ops_per_step"] > 0
        assert r["top_host_ops"] and r["top_host_ops"][0]["us_per_step"] > 0
    # the adapters add host-side ops to the frozen model's step
    assert rows[1]["host_ops_per_step"] > rows[0]["host_ops_per_step"]


def test_profile_host_step_stubs_the_kernels_and_counts_their_launches(tmp_path):
    """benchmarks/profile_host_step.py times steps with every Triton launch stubbed: a triton row counts its
    stubbed launches (per mask-tuning step: the grouped masked weights forward, the grouped scores' gradients
    backward), eager rows launch none. Under bf16 autocast (--autocast) as the GPU's step, with its casts counted."""
    path = tmp_path / "host_step.json"
    subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "profile_host_step.py"), "--rows", "floor",
                    "mask/triton", "houlsby/triton", "--steps", "1", "--repeats", "1", "--autocast", "--json", str(path)],
                   check=True, capture_output=True, timeout=300, env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    doc = json.loads(path.read_text())
    rows = {r["row"]: r for r in doc["rows"]}
    assert doc["autocast"] == "bf16" and rows["floor"]["casts"] > 0  # (autocast casts the frozen weights)
    assert set(rows) == {"floor", "houlsby/triton", "mask/triton"}
    assert rows["floor"]["stubbed_launches"] == 0 and rows["floor"]["vs_floor"] == 1.0
    assert rows["mask/triton"]["stubbed_launches"] == 2.0
    assert rows["houlsby/triton"]["stubbed_launches"] == 96.0  # 24 adapters: 1 forward + 3 backward launches
    assert all(r["ms"] > 0 for r in rows.values())


def test_host_overhead_with_stubbed_kernels_times_the_serving_paths(tmp_path):
    """bench_host_overhead.py --stub-kernels on the CPU: the triton and cuda rows without gradients run
    through the ops' real Python to stubbed kernels (the extension's serving entry points included), beside
    F.linear for the packed mask; nothing else of the kernel backends runs."""
    path = tmp_path / "host.json"
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_host_overhead.py"), "--quick",
                          "--stub-kernels", "--calls", "3", "--ops", "bottleneck_adapter", "masked_linear (packed)",
                          "--json", str(path)], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    assert out.returncode == 0, out.stderr[-2000:]
    doc = json.loads(path.read_text())
    rows = {(r["op"], r["mode"], r["impl"]): r for r in doc["rows"]}
    assert doc["stubbed_kernels"] is True
    for key in [("bottleneck_adapter", "fwd", "op/cuda"), ("bottleneck_adapter", "fwd", "op/triton"),
                ("masked_linear (packed)", "fwd", "torch"), ("masked_linear (packed)", "fwd", "op/cuda"),
                ("masked_linear (packed)", "fwd", "op/triton"), ("masked_linear (packed)", "fwd", "op/cuda (3 tasks)"),
                ("bottleneck_adapter", "fwd+bwd", "op/eager")]:
        assert rows[key]["host_us"] > 0, key
    assert not [k for k in rows if k[1] == "fwd+bwd" and k[2] in ("op/cuda", "op/triton")]
    assert not [k for k in rows if k[0] == "masked_linear (packed)" and k[1] == "fwd+bwd"]
    assert not [r for r in doc["rows"] if "error" in r]


def test_profile_host_step_puts_back_every_kernel_even_those_imported_inside_the_block():
    """A kernel module that imports another's helper must get the real one: in a fresh process (nothing
    imported yet), after the stubbing block no module of pet_fast.kernels holds a stub."""
    code = ("import os, sys, importlib, pkgutil; os.environ['TRITON_INTERPRET'] = '1'; "
            f"sys.path.insert(0, {os.path.join(ROOT, 'benchmarks')!r}); import profile_host_step as P\n"
            "with P.kernels_stubbed(): pass\n"
            "import pet_fast.kernels as k\n"
            "mods = [importlib.import_module('pet_fast.kernels.' + i.name) for i in pkgutil.iter_modules(k.__path__)]\n"
            "print(sum(isinstance(v, P._Stub) for m in mods for v in vars(m).values()), len(mods))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT,
                         env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    assert out.returncode == 0, out.stderr[-2000:]
    stubs, modules = map(int, out.stdout.split()[-2:])
    assert modules >= 8 and stubs == 0


def test_step_benchmark_reports_each_row_as_it_goes():
    seen = []
    doc = bench.step_benchmark(quick=True, models=["bert-tiny-4x32"], rows=["floor", "full"], warmup=1, steps=1,
                               on_row=lambda rows: seen.append(len(rows)))
    assert seen == [1, 2] and len(doc["rows"]) == 2


def test_paired_rows_alternate_with_the_reference_round_by_round(monkeypatch):
    """A row timed against a reference runs its steps and the reference's in alternation, and reports the
    median of the per-round ratios: a host that slows down mid-run moves both sides of a round alike."""
    order, clock = [], [0.0]
    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock[0])

    def timed(name, seconds):
        def step():
            order.append(name)
            clock[0] += seconds[0]
        return step

    row_cost, ref_cost = [2.0], [1.0]
    row_step = timed("row", row_cost)
    monkeypatch.setattr(bench, "make_step", lambda row, spec, device, **kw: (row_step, [torch.zeros(3)], (1, 4)))
    ref = timed("ref", ref_cost)

    def slow_down():  # from the second round on, everything takes 5x as long
        row_cost[0], ref_cost[0] = 10.0, 5.0
    monkeypatch.setattr(bench, "_sync", lambda device: slow_down() if order.count("ref") >= 2 else None)
    rec = bench.run_row(bench.Row("m", "houlsby/eager", "houlsby", "eager"), None, torch.device("cpu"),
                        warmup=1, steps=6, reference=ref, rounds=3)
    assert order == ["row"] + ["row", "row", "ref", "ref"] * 3  # warm-up, then 3 rounds of 2 + 2
    assert rec["vs_floor_rounds"] == [2.0, 2.0, 2.0] and rec["vs_floor_paired"] == 2.0
    assert rec["steps"] == 6 and "_step" not in rec


def test_paired_step_benchmark_reports_ratios_against_the_floor_kept_alive():
    doc = bench.step_benchmark(quick=True, models=["bert-tiny-4x32"], rows=["full", "floor", "houlsby/eager"],
                               warmup=1, steps=2, paired=2)
    rows = {r["row"]: r for r in doc["rows"]}
    assert [r["row"] for r in doc["rows"]] == ["floor", "full", "houlsby/eager"]  # the floor first
    assert doc["settings"]["paired_rounds"] == 2
    assert "vs_floor_paired" not in rows["floor"] and rows["floor"]["vs_floor"] == 1.0
    for name in ("full", "houlsby/eager"):
        r = rows[name]
        assert len(r["vs_floor_rounds"]) == 2 and r["vs_floor"] == r["vs_floor_paired"] > 0
    expected = round(rows["houlsby/eager"]["vs_floor_paired"] / rows["full"]["vs_floor_paired"], 3)
    assert rows["houlsby/eager"]["vs_full"] == expected
    assert rows["floor"]["vs_full"] == round(1 / rows["full"]["vs_floor_paired"], 3)
    with pytest.raises(ValueError, match="paired"):
        bench.step_benchmark(quick=True, models=["bert-tiny-4x32"], rows=["floor"], paired=-1)


def test_every_benchmark_script_imports():
    """The GPU-only scripts (checks, profiles) run nowhere in CI: at least each must import and parse its
    command line without a GPU, so a GPU session does not lose a call to a typo."""
    scripts = sorted(p for p in os.listdir(os.path.join(ROOT, "benchmarks"))
                     if p.endswith(".py") and p not in ("__init__.py", "common.py"))  # common: a module, no CLI
    assert {"check_masked_linear_serving.py", "check_prefix_merge.py", "profile_step.py"} <= set(scripts)
    # one process runs every script as __main__ with --help (torch imported once, not once per script)
    driver = (
        "import contextlib, io, json, os, runpy, sys, traceback\n"
        "res = {}\n"
        "for path in sys.argv[1:]:\n"
        "    sys.argv, out, code = [path, '--help'], io.StringIO(), None\n"
        "    try:\n"
        "        with contextlib.redirect_stdout(out):\n"
        "            runpy.run_path(path, run_name='__main__')\n"
        "    except SystemExit as e:\n"
        "        code = e.code\n"
        "    except BaseException:\n"
        "        code = traceback.format_exc()[-800:]\n"
        "    res[os.path.basename(path)] = [code, 'usage' in out.getvalue().lower()]\n"
        "print(json.dumps(res))\n")
    out = subprocess.run([sys.executable, "-c", driver] + [os.path.join(ROOT, "benchmarks", n) for n in scripts],
                         capture_output=True, text=True, timeout=600, env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    assert out.returncode == 0, out.stderr[-2000:]
    results = json.loads(out.stdout.strip().splitlines()[-1])
    assert sorted(results) == scripts
    for name, (code, usage) in results.items():
        assert code in (0, None) and usage, (name, code)


def test_a_cudagraph_row_says_when_inductor_skipped_cuda_graphs(monkeypatch):
    calls = iter([3, 5])
    monkeypatch.setattr(bench, "_cudagraph_skips", lambda: next(calls))
    monkeypatch.setattr(bench, "make_step", lambda row, spec, device, **kw: (lambda: None, [torch.zeros(2)], (1, 4)))
    row = bench.Row("m", "houlsby/auto+cudagraphs", "houlsby", "auto", True, compile_mode="reduce-overhead")
    rec = bench.run_row(row, None, torch.device("cpu"), warmup=1, steps=2)
    assert rec["note"] == "CUDA graphs skipped for 2 graph(s) (inductor's cudagraph_skips)"
    calls = iter([4, 4])
    monkeypatch.setattr(bench, "_cudagraph_skips", lambda: next(calls))
    assert "note" not in bench.run_row(row, None, torch.device("cpu"), warmup=1, steps=2)

def test_cudagraph_skips_reads_inductors_counter():
    from torch._dynamo.utils import counters

    before = bench._cudagraph_skips()
    counters["inductor"]["cudagraph_skips"] += 1
    try:
        assert bench._cudagraph_skips() == before + 1
    finally:
        counters["inductor"]["cudagraph_skips"] -= 1


@pytest.mark.parametrize("kind", bench.OPTIMIZERS)
def test_the_steps_optimizer_is_adamw_in_the_implementation_asked(kind):
    p = [torch.nn.Parameter(torch.ones(3))]
    opt = bench.make_optimizer(p, kind)
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults[kind] is True
    other = next(k for k in bench.OPTIMIZERS if k != kind)
    assert not opt.defaults[other]
    p[0].grad = torch.ones(3)
    opt.step()  # the fused implementation runs on the CPU too
    assert (p[0] < 1).all()


def test_an_unknown_optimizer_is_refused_by_name():
    with pytest.raises(ValueError, match="optimizer must be one of"):
        bench.make_optimizer([torch.nn.Parameter(torch.ones(1))], "sgd")
    with pytest.raises(ValueError, match="optimizer must be one of"):
        bench.step_benchmark(quick=True, optimizer="sgd")


def test_a_rows_peak_memory_is_its_steady_steps_not_the_first_steps_one_off_buffers(monkeypatch):
    """The first warm-up steps hold one-off memory beside the step's own (Triton's autotuner benchmarks with a
    256 MiB buffer while the activations are alive; the first calls run through Python autograd.Functions):
    the row's peak is that of its last warm-up step, and the first steps' peak is reported apart."""
    MiB = 2**20

    class Memory:  # a fake allocator: 100 MiB kept by another row, 50 MiB per step, 256 MiB in the first
        now, top, steps = 100 * MiB, 100 * MiB, 0

        @classmethod
        def allocated(cls, device):
            return cls.now

        @classmethod
        def peak(cls, device):
            return cls.top

        @classmethod
        def reset_peak(cls, device):
            cls.top = cls.now

    def step():
        Memory.steps += 1
        Memory.top = max(Memory.top, Memory.now + (50 + (256 if Memory.steps == 1 else 0)) * MiB)

    monkeypatch.setattr(bench, "MEMORY", Memory)
    monkeypatch.setattr(bench, "_sync", lambda device: None)
    monkeypatch.setattr(bench, "make_step", lambda row, spec, device, **kw: (step, [torch.zeros(3)], (1, 4)))
    rec = bench.run_row(bench.Row("m", "houlsby/triton", "houlsby", "triton"), None, torch.device("cuda"),
                        warmup=3, steps=2)
    assert rec["peak_mem_mb"] == 50.0
    assert rec["peak_mem_warmup_mb"] == 306.0
    Memory.steps = 0  # a single warm-up step: nothing to tell apart
    rec = bench.run_row(bench.Row("m", "houlsby/triton", "houlsby", "triton"), None, torch.device("cuda"),
                        warmup=1, steps=2)
    assert rec["peak_mem_mb"] == 306.0 and "peak_mem_warmup_mb" not in rec


def test_chart_draws_one_panel_per_model(tmp_path):
    """pet-fast bench's PNG (matplotlib, in the test extras): a file that is a PNG, one panel per model with
    timed rows; nothing drawn without timed rows."""
    pytest.importorskip("matplotlib")
    rows = [dict(model=m, row=r, compiled=r.endswith("+compile"), vs_floor=v)
            for m in ("bert-32x128", "llama1b-4x1024")
            for r, v in (("floor", 1.0), ("houlsby/auto", 1.08), ("floor+compile", 1.0), ("houlsby/auto+compile", 1.12))]
    logged = []
    path = bench.chart({"step": {"rows": rows, "label": "test"}}, str(tmp_path / "c.png"), log=logged.append)
    assert path == str(tmp_path / "c.png") and open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    h, w = matplotlib.image.imread(path).shape[:2]
    assert h > w / 2  # two panels stacked (12 x 8 inches)
    assert bench.chart({"step": {"rows": [dict(model="m", row="x", compiled=False, note="error")]}},
                       str(tmp_path / "none.png"), log=logged.append) is None
    assert "no timed step rows" in logged[-1] and not (tmp_path / "none.png").exists()


def test_paired_ratios_stay_within_what_was_timed_in_rounds():
    """vs_base_forward divides the two rows' paired ratios when both were timed in rounds against the floor (their
    separate medians keep the host drift the rounds remove); vs_full of a compiled row with no compiled full row
    divides milliseconds (the rounds are the eager floor's)."""
    rows = [{"model": "m", "row": "floor", "compiled": False, "ms": 35.0},
            {"model": "m", "row": "floor+compile", "compiled": True, "ms": 20.0},
            {"model": "m", "row": "full", "compiled": False, "ms": 45.0, "vs_floor_paired": 1.5},
            {"model": "m", "row": "base-forward", "compiled": False, "ms": 10.0, "vs_floor_paired": 0.40},
            {"model": "m", "row": "side/auto", "compiled": False, "ms": 16.0, "vs_floor_paired": 0.45}]
    bench.add_ratios(rows)
    assert rows[4]["vs_base_forward"] == 1.125  # (16 / 10 = 1.6 from the separate medians)
    assert rows[1]["vs_full"] == round(20 / 45, 3)  # (not the eager floor's 1 / 1.5)
    assert rows[0]["vs_full"] == round(1 / 1.5, 3)


def test_a_row_name_selects_itself_and_its_compiled_variants_only():
    rows = bench.plan(["bert-32x128"], compile_rows=True, kernel_rows=True, cudagraph_rows=True)
    pick = lambda pat: {r.row for r in rows if bench._matches(r, pat)}  # noqa: E731
    assert pick("houlsby/triton") == {"houlsby/triton"}  # not houlsby/triton-py
    assert pick("houlsby/auto") >= {"houlsby/auto", "houlsby/auto+compile", "houlsby/auto+cudagraphs"}
    assert all(n.startswith("houlsby/") for n in pick("houlsby")) and "houlsby/triton-py" in pick("houlsby")
    assert pick("floor") >= {"floor", "floor+compile"} and "full" not in pick("floor")


def test_a_partial_step_section_has_the_ratios_of_the_rows_so_far():
    rows = [{"model": "m", "row": "floor", "compiled": False, "ms": 10.0},
            {"model": "m", "row": "houlsby/auto", "compiled": False, "ms": 11.0, "vs_floor_paired": 1.08}]
    part = bench._partial_step(rows)
    assert part["partial"] and part["rows"][1]["vs_floor"] == 1.08 and "vs_floor" not in rows[1]


def test_the_environment_records_the_switches_that_change_the_rows(monkeypatch):
    monkeypatch.setenv("PET_FAST_TRITON_REPLAY", "0")
    assert bench.package_versions()["switches"]["PET_FAST_TRITON_REPLAY"] == "0"
