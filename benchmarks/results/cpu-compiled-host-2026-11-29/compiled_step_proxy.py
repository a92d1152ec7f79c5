"""Host time of training steps, eager and under torch.compile (default mode), on the CPU with every Triton launch
stubbed (benchmarks/profile_host_step.py's model: BERT-base depth, width 64, batch 2 x 16, bf16 autocast, the
replay built for the CPU): each row against its floor timed the same way, rows interleaved, best of five rounds.

    python benchmarks/results/cpu-compiled-host-2026-11-29/compiled_step_proxy.py floor floor+compile houlsby/triton houlsby/triton+compile
"""
import sys, time
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[3]))
import benchmarks.profile_host_step as P
import torch
from pet_fast import bench
torch.set_num_threads(1); torch.set_flush_denormal(True)
import pet_fast.methods.fusion as _fm; _fm.FOLD_MIN_TOKENS_PER_WIDTH = 0.0
replay = P.replay_module()
from pet_fast.kernels import _replay
rows = sys.argv[1:]
steps = {}
with _replay.through_interpreter(replay):
    for name in rows:
        base = name.replace("+compile", "")
        kind, _, backend = base.partition("/")
        row = bench.Row("bert-deep-narrow", name, kind, backend or None, "+compile" in name)
        t0 = time.perf_counter()
        step = P.make_step(row, torch.bfloat16)
        step()
        print(f"{name}: warm {time.perf_counter()-t0:.1f}s", flush=True)
        steps[name] = step
    for cache in _replay._CACHES:
        for entry in cache.values():
            if isinstance(entry, _replay.Entry):
                entry.program.set_launcher(P._count_replayed)
    with P.kernels_stubbed():
        for name, step in steps.items():
            for _ in range(3): step()
        best = {n: 1e9 for n in steps}
        for rnd in range(5):
            for name, step in steps.items():
                t0 = time.perf_counter()
                for _ in range(5): step()
                best[name] = min(best[name], (time.perf_counter() - t0) / 5)
fl = {True: best.get("floor+compile"), False: best.get("floor")}
for n, t in best.items():
    f = fl["+compile" in n]
    print(f"{n:32s} {t*1e3:7.2f} ms  x floor {t/f if f else float('nan'):.3f}")
