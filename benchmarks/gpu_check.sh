#!/usr/bin/env bash
# The one GPU check: build the CUDA extension, run the GPU tests, run every benchmark, write JSON.
# Usage on the GPU machine, from the repository root:  bash benchmarks/gpu_check.sh [OUT_DIR]
set -uo pipefail
out=${1:-${OUT:-benchmarks/results/latest}}
mkdir -p "$out"
export PET_FAST_CACHE=${PET_FAST_CACHE:-/tmp/pet_fast_cache}
status=0
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} > "$out/device.txt" 2>&1
# Build in place (the GPU machine has torch with CUDA, nvcc and ninja; no network).
PET_FAST_BUILD_CUDA=1 pip install --no-build-isolation --no-deps -e . > "$out/build.log" 2>&1 || { echo "build failed"; status=1; }
python -m pet_fast info > "$out/info.txt" 2>&1
# GPU tests (those marked gpu) and the kernel tests on real hardware.
TRITON_INTERPRET=0 python -m pytest -q -m gpu --junitxml="$out/gpu_tests.xml" > "$out/gpu_tests.log" 2>&1 || status=1
tail -3 "$out/gpu_tests.log"
for bench in benchmarks/bench_*.py; do
  [ -e "$bench" ] || continue
  name=$(basename "$bench" .py)
  [ "$name" = bench_step ] && continue  # run below, with a time budget
  echo "== $name"
  python "$bench" --json "$out/$name.json" > "$out/$name.log" 2>&1 || { echo "$name failed"; status=1; }
  tail -25 "$out/$name.log"
done
# Whole training steps (BERT-base 32x128 and 16x512, Llama ~1B 4x1024; eager rows of all models first,
# then torch.compile rows); rows not started within the budget are written as skipped.
echo "== bench_step"
python benchmarks/bench_step.py --json "$out/bench_step.json" --budget-s "${STEP_BUDGET_S:-360}" > "$out/bench_step.log" 2>&1 || { echo "bench_step failed"; status=1; }
tail -60 "$out/bench_step.log"
exit $status
