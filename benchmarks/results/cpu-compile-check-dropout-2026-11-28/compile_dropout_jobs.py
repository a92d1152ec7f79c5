"""The dropout specialisations of compile_check_kernels.py at the tiles _config gives dropout calls (bf16)."""
import sys
sys.argv = ["x"]
import os
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, os.path.join(ROOT, "benchmarks")); sys.path.insert(0, ROOT)
import compile_check_kernels as C
import pet_fast.kernels.prefix_attention as PA
import torch
from concurrent.futures import ProcessPoolExecutor
want = set()
for D in (32, 64, 128, 256):
    for bw in (False, True):
        bm, bn, w, st = PA._config(D, bw, torch.bfloat16, dropout=True)
        want.add((bm, bn, w, st))
jobs = [j for j in C.prefix_attention_jobs(["bf16"], False) if j["tag"].endswith("dropout")
        and (j["consts"]["BLOCK_M"], j["consts"]["BLOCK_N"], j["warps"], j["stages"]) in want]
print(len(jobs), want, flush=True)
with ProcessPoolExecutor(2) as pool:
    for r in pool.map(C.compile_one, jobs):
        print(r["kernel"], r["warps"], r["stages"], r["tag"], "REG", r.get("REG"), "STACK", r.get("STACK"), r.get("error", ""), flush=True)
