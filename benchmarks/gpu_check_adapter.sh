#!/usr/bin/env bash
# GPU check of the adapter kernels only (a subset of gpu_check.sh, for a short device session):
# build the CUDA extension, run the adapter GPU tests, run the adapter benchmark, write JSON + the
# dispatch table. Usage on the GPU machine, from the repository root:
#   bash benchmarks/gpu_check_adapter.sh [OUT_DIR]
# Then commit OUT_DIR/bench_bottleneck_adapter.json under benchmarks/results/ and OUT_DIR/dispatch_table.json
# as benchmarks/results/dispatch_table.json (read by pet_fast/ops/_timings.py).
set -uo pipefail
out=${1:-${OUT:-benchmarks/results/latest}}
mkdir -p "$out"
export PET_FAST_CACHE=${PET_FAST_CACHE:-/tmp/pet_fast_cache}
status=0
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} > "$out/device.txt" 2>&1
PET_FAST_BUILD_CUDA=1 pip install --no-build-isolation --no-deps -e . > "$out/build.log" 2>&1 || { echo "build failed"; tail -30 "$out/build.log"; status=1; }
python -m pet_fast info > "$out/info.txt" 2>&1
TRITON_INTERPRET=0 python -m pytest -q -m gpu tests/test_kernels_bottleneck_adapter.py tests/test_kernels_adapter_fusion.py \
  --junitxml="$out/gpu_tests_adapter.xml" > "$out/gpu_tests_adapter.log" 2>&1 || status=1
tail -15 "$out/gpu_tests_adapter.log"
python benchmarks/bench_bottleneck_adapter.py --json "$out/bench_bottleneck_adapter.json" \
  > "$out/bench_bottleneck_adapter.log" 2>&1 || { echo "benchmark failed"; status=1; }
tail -40 "$out/bench_bottleneck_adapter.log"
exit $status
