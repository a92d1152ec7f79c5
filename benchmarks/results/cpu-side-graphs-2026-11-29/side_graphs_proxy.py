# Host time of side-tuning's step with the base replayed from a graph, on the CPU (profile_host_step.py's proxy:
# BERT-base depth, bf16 autocast, no optimizer update). The CPU has no CUDA graphs: here a graph's capture runs
# the base once and its replay does nothing, so the "side-graphs" step times everything a GPU step's host does
# but the replay's own launch (a few microseconds) and none of the base's GPU work (which runs while the host
# goes on). Rows timed in interleaved rounds, one process. Run from the repository root:
#     python benchmarks/results/cpu-side-graphs-2026-11-29/side_graphs_proxy.py [rounds] [model]
"""CPU proxy of the side-graphs step's host time against the base forward and the eager side step."""
import random
import statistics
import sys
import time

sys.path.insert(0, "benchmarks")
sys.path.insert(0, ".")
import profile_host_step as P  # noqa: E402
import torch  # noqa: E402
from pet_fast import bench  # noqa: E402
from pet_fast.methods import _base_graphs  # noqa: E402

torch.set_num_threads(1)


class NoReplay:
    def capture(self, fn):
        return (lambda: None), fn()


_base_graphs.CudaGraphs = NoReplay
_base_graphs.BaseGraphs.usable = staticmethod(lambda call: True)
model = sys.argv[2] if len(sys.argv) > 2 else "bert-base-32x128"
rows = ("base-forward", "side/eager", "side-graphs/auto")
steps = {n: P.make_step(bench.Row(model, n, n.split("/")[0], n.partition("/")[2] or None), torch.bfloat16) for n in rows}
times = {n: [] for n in rows}
with P.kernels_stubbed():
    for _ in range(int(sys.argv[1]) if len(sys.argv) > 1 else 30):
        order = list(rows)
        random.shuffle(order)
        for n in order:
            steps[n]()
            for _ in range(3):
                t0 = time.perf_counter()
                steps[n]()
                times[n].append(time.perf_counter() - t0)
    counts = {}
    for n in rows:
        c = P._CountOps()
        with c:
            steps[n]()
        counts[n] = sum(c.ops.values())
low = {n: statistics.quantiles(v, n=5)[0] * 1e3 for n, v in times.items()}  # 20th percentile: least disturbed
med = {n: statistics.median(v) * 1e3 for n, v in times.items()}
print(f"model {model}, {len(times[rows[0]])} steps per row")
print("row                 p20 ms  median ms  vs base-forward (p20)  aten ops")
for n in rows:
    print(f"{n:18s} {low[n]:7.2f} {med[n]:9.2f} {low[n] / low['base-forward']:10.3f} {counts[n]:14d}")
