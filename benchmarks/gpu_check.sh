#!/usr/bin/env bash
# The one GPU check: build the CUDA extension, run the GPU tests, run every benchmark, write JSON.
# Usage on the GPU machine, from the repository root:  bash benchmarks/gpu_check.sh [kernels|steps|all] [WORK_DIR]
# "kernels" (about 9 minutes at most): build, info, GPU tests, op benchmarks. "steps" (about 7): build
# (kept from a kernels run on the same machine), the training-step benchmark. Each step has a time limit
# so that a part fits one device call.
# Results: WORK_DIR (default benchmarks/results/latest) holds the logs and JSON; when $OUT is set
# (the device tool), they are also packed into $OUT/gpu_check.tar.gz with $OUT/summary.txt beside it.
set -uo pipefail
part=${1:-all}
case "$part" in kernels|steps|all) ;; *) echo "part must be kernels, steps or all, got $part"; exit 2 ;; esac
work=${2:-benchmarks/results/latest}
mkdir -p "$work"
export PET_FAST_CACHE=${PET_FAST_CACHE:-/tmp/pet_fast_cache}
# Compile for the card in this machine only (sm_90a on an H100/H200).
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$(python -c "import torch; c = torch.cuda.get_device_capability(); print(f'{c[0]}.{c[1]}' + ('a' if c[0] >= 9 else ''))" 2>/dev/null || echo 9.0a)}
status=0
step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to WORK_DIR/NAME.log
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" > "$work/$name.log" 2>&1
  local rc=$?
  echo "$name: rc=$rc in $((SECONDS - t0)) s" | tee -a "$work/summary.txt"
  [ $rc -eq 0 ] || status=1
  return $rc
}
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  python -c "import torch, triton, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'transformers', transformers.__version__)"
  git rev-parse --short HEAD 2>/dev/null || true
} > "$work/summary.txt" 2>&1
# Build in place (the GPU machine has torch with CUDA, nvcc and ninja; no network).
PET_FAST_BUILD_CUDA=1 step build 300 pip install --no-build-isolation --no-deps -e .
step info 60 python -m pet_fast info
if [ "$part" != steps ]; then
# GPU tests (marked gpu): kernels on real hardware, the larger property profile, determinism, edge inputs.
TRITON_INTERPRET=0 PET_FAST_HYPOTHESIS_PROFILE=gpu PET_FAST_PROPERTY_COUNTS="$work/property_counts.txt" \
  step gpu_tests 240 python -m pytest -q -m gpu --maxfail=20 --junitxml="$work/gpu_tests.xml"
tail -3 "$work/gpu_tests.log" | tee -a "$work/summary.txt"
for bench in benchmarks/bench_*.py; do
  [ -e "$bench" ] || continue
  name=$(basename "$bench" .py)
  [ "$name" = bench_step ] && continue  # the steps part below
  step "$name" 120 python "$bench" --json "$work/$name.json"
  tail -30 "$work/$name.log"
done
fi
if [ "$part" != kernels ]; then
# Whole training steps (BERT-base 32x128 and 16x512, Llama ~1B 4x1024; eager rows of all models first,
# then torch.compile rows); rows not started within the budget are written as skipped.
step bench_step $(( ${STEP_BUDGET_S:-300} + 120 )) python benchmarks/bench_step.py --json "$work/bench_step.json" --budget-s "${STEP_BUDGET_S:-300}"
tail -60 "$work/bench_step.log"
fi
if [ -n "${OUT:-}" ]; then
  tar czf "$OUT/gpu_check.tar.gz" -C "$work" .
  cp "$work/summary.txt" "$OUT/summary.txt"
fi
exit $status
