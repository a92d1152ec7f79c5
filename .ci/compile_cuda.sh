#!/usr/bin/env bash
# Compile every csrc/*.cu with nvcc for sm_80 and sm_90a (object files only: nothing runs here), one
# compile per CPU at a time.
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
  for arch in 80 90a; do
    run nvcc -std=c++17 -O2 -Icsrc -gencode "arch=compute_${arch},code=sm_${arch}" -c "$f" -o "$out/$(basename "$f" .cu)_${arch}.o"
  done
  n=$((n + 1))
done
finish
echo "compile_cuda: $n .cu file(s) compiled for sm_80 and sm_90a"
