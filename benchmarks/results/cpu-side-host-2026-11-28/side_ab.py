# One process, rounds interleaved: the base forward, the side step with the code before 09a6b64 (old _base_eval
# and mask building, restored by monkeypatching), the side step as committed. Run from the repository root:
#     python benchmarks/results/cpu-side-host-2026-11-28/side_ab.py [rounds]
"""A/B of the side-tuning step's host time (CPU proxy of profile_host_step.py, Triton not involved)."""
import sys, time, statistics, contextlib
sys.path.insert(0, "benchmarks"); sys.path.insert(0, ".")
import profile_host_step as P
import torch
from pet_fast import bench
from pet_fast.methods import side
torch.set_num_threads(1)

@contextlib.contextmanager
def old_base_eval(host):
    holder = host._modules.get("pet_fast_tasks")
    skip = set(map(id, holder.modules())) if holder is not None else set()
    flags = [(m, m.training) for m in host.modules() if id(m) not in skip]
    for m, _ in flags:
        m.training = False
    try:
        yield
    finally:
        for m, t in flags:
            m.training = t

new_base_eval = side._base_eval
def old_net_forward(self, emb, attention_mask=None):
    B, T, _ = emb.shape
    x = self.proj_in(emb.to(self.proj_in.weight.dtype)) + self.pos[:T]
    allowed = torch.ones(B, 1, T, T, dtype=torch.bool, device=emb.device)
    if attention_mask is not None:
        allowed = allowed & attention_mask.to(torch.bool).view(B, 1, 1, T)
    if self.causal:
        allowed = allowed & torch.ones(T, T, dtype=torch.bool, device=emb.device).tril()
    allowed = allowed | torch.eye(T, dtype=torch.bool, device=emb.device)
    for block in self.blocks:
        x = block(x, allowed)
    return self.proj_out(self.norm(x))
new_net_forward = side.SideNetwork.forward

def use(old):
    side._base_eval = old_base_eval if old else new_base_eval
    side.SideNetwork.forward = old_net_forward if old else new_net_forward

steps = {n: P.make_step(bench.Row("bert-deep-narrow", n, n.split("/")[0], n.partition("/")[2] or None), torch.bfloat16)
         for n in ("base-forward", "side/eager")}
times = {k: [] for k in ("base", "old", "new")}
with P.kernels_stubbed():
    for rnd in range(int(sys.argv[1]) if len(sys.argv) > 1 else 12):
        for label in ("base", "old", "new"):
            use(label == "old")
            step = steps["base-forward" if label == "base" else "side/eager"]
            for _ in range(2): step()
            for _ in range(10):
                t0 = time.perf_counter(); step(); times[label].append(time.perf_counter() - t0)
med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
print({k: round(v, 3) for k, v in med.items()})
print(f"side/eager vs base-forward: old {med['old']/med['base']:.3f}x  new {med['new']/med['base']:.3f}x  (new - old {med['new']-med['old']:+.3f} ms)")
