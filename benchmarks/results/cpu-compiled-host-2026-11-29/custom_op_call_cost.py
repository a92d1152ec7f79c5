"""Host time of one call of the adapter's triton custom ops (forward and backward) as compiled code makes it
(torch.ops.pet_fast..., grad mode off), against the same Python function called directly; launches stubbed,
replayed from the CPU build of the replay. CPU only."""
import sys, os, time
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[3]))
os.environ["TRITON_INTERPRET"] = "1"
import benchmarks.profile_host_step as P
import torch
torch.set_num_threads(1); torch.set_flush_denormal(True)
replay = P.replay_module()
from pet_fast.kernels import _replay
import pet_fast.ops.bottleneck_adapter as OB
d, r, n = 64, 8, 32
x = torch.randn(n, d); wd = torch.randn(r, d, requires_grad=True); bd = torch.randn(r, requires_grad=True)
wu = torch.randn(d, r, requires_grad=True); bu = torch.randn(d, requires_grad=True); dy = torch.randn(n, d)
fargs = (x, wd, bd, wu, bu, None, 1.0, x, "gelu", True, False, None, None, 0.0, None)
bargs = (dy, x, wd, bd, wu, bu, None, 1.0, False, "gelu", False, True, False, None, None, 0.0, None)
def t(f, *a, k=3000):
    for _ in range(100): f(*a)
    best = 1e9
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(k): f(*a)
        best = min(best, (time.perf_counter() - t0) / k)
    return best * 1e6
fop = torch.ops.pet_fast.bottleneck_adapter_triton.default
bop = torch.ops.pet_fast.bottleneck_adapter_triton_backward.default
with _replay.through_interpreter(replay):
    with torch.enable_grad():
        y = OB.TRITON.impl(*fargs); y.backward(dy)  # record both programs via the Function
    OB._triton_forward(*fargs); OB._triton_backward(*bargs)
    for cache in _replay._CACHES:
        for entry in cache.values():
            if isinstance(entry, _replay.Entry):
                entry.program.set_launcher(P._count_replayed)
    with P.kernels_stubbed(), torch.no_grad():
        print(f"fwd: op {t(fop, *fargs):.2f} us, function {t(OB._triton_forward, *fargs):.2f} us")
        print(f"bwd: op {t(bop, *bargs):.2f} us, function {t(OB._triton_backward, *bargs):.2f} us")
        print(f"key_of {t(_replay.key_of, x, wd, bd, wu, bu, None, 1.0, x, 'gelu', True, None, None):.2f}")
