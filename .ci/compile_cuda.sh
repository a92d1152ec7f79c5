#!/usr/bin/env bash
# Compile every csrc/*.cu with nvcc (object files only: nothing runs here), one compile per CPU at a time:
# to sm_90a machine code (the GPUs this project measures on: ptxas's errors and resource limits included)
# and to compute_80 PTX (every sm_80 code path through the front end; ptxas, most of the time of a compile,
# once per file is enough on this 2-core machine).
set -euo pipefail
cd "$(dirname "$0")/.."
source .ci/parallel.sh
if ! command -v nvcc >/dev/null 2>&1; then
  echo "compile_cuda: nvcc not found, skipping"
  exit 0
fi
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
shopt -s nullglob
n=0
for f in csrc/*.cu; do
  run nvcc -std=c++17 -O2 -Icsrc -gencode "arch=compute_90a,code=sm_90a" -c "$f" -o "$out/$(basename "$f" .cu)_90a.o"
  run nvcc -std=c++17 -O2 -Icsrc -gencode "arch=compute_80,code=compute_80" -c "$f" -o "$out/$(basename "$f" .cu)_80.o"
  n=$((n + 1))
done
finish
echo "compile_cuda: $n .cu file(s) compiled for sm_90a and to compute_80 PTX"
