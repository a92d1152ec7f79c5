#!/usr/bin/env bash
# Syntax- and type-check the torch-side bindings (csrc/*.cpp) with g++ against the installed torch's
# headers. The CPU build of torch ships the c10/ATen CUDA headers but not the CUDA libraries' headers
# they include, so a few declarations (handle and status types only) are stubbed here; nothing is
# linked or run. Catches a binding that would not compile on the GPU machine before a GPU session. One
# file per CPU at a time.
set -euo pipefail
cd "$(dirname "$0")/.."
source .ci/parallel.sh
if ! command -v g++ >/dev/null 2>&1 || ! python -c "import torch" 2>/dev/null; then
  echo "check_bindings: g++ or torch missing, skipping"
  exit 0
fi
cuda_inc=""
for d in "${CUDA_HOME:-/usr/local/cuda}/include" /usr/local/cuda/include; do
  [ -f "$d/cuda_runtime.h" ] && cuda_inc=$d && break
done
if [ -z "$cuda_inc" ]; then
  echo "check_bindings: cuda_runtime.h not found, skipping"
  exit 0
fi
stub=$(mktemp -d)
trap 'rm -rf "$stub"' EXIT
mkdir -p "$stub/c10/cuda/impl"
echo '#pragma once' > "$stub/c10/cuda/impl/cuda_cmake_macros.h"
cat > "$stub/cublas_v2.h" <<'H'
#pragma once
typedef struct cublasContext* cublasHandle_t;
typedef int cublasStatus_t;
#define CUBLAS_STATUS_SUCCESS 0
H
cat > "$stub/cublasLt.h" <<'H'
#pragma once
typedef struct cublasLtContext* cublasLtHandle_t;
H
cat > "$stub/cusparse.h" <<'H'
#pragma once
typedef struct cusparseContext* cusparseHandle_t;
typedef int cusparseStatus_t;
#define CUSPARSE_STATUS_SUCCESS 0
inline const char* cusparseGetErrorString(cusparseStatus_t) { return ""; }
H
cat > "$stub/cusolverDn.h" <<'H'
#pragma once
typedef struct cusolverDnContext* cusolverDnHandle_t;
H
cat > "$stub/cusolver_common.h" <<'H'
#pragma once
typedef int cusolverStatus_t;
#define CUSOLVER_STATUS_SUCCESS 0
#define CUSOLVER_STATUS_INVALID_VALUE 3
H
# TORCH_INCLUDE: another torch release's include/ folder (e.g. the GPU machine's, unpacked from its wheel)
torch_inc=${TORCH_INCLUDE:-$(python -c "import os, torch; print(os.path.join(os.path.dirname(torch.__file__), 'include'))")}
torch_label=${TORCH_INCLUDE:+headers in $TORCH_INCLUDE}
py_inc=$(python -c "import sysconfig; print(sysconfig.get_paths()['include'])")
# Every binding includes torch/extension.h (bindings.h): parsed once into a precompiled header that each
# file's check then loads (about 35 s per file without it, 10 s with it, on this project's CPU machine). A
# header g++ finds unusable is parsed as usual (the check stays the same, only slower).
echo '#include <torch/extension.h>' > "$stub/pet_fast_pch.h"
g++ -std=c++17 -Wno-c++20-extensions -DTORCH_EXTENSION_NAME=_C -DPET_FAST_CUDA -I"$torch_inc" \
  -I"$torch_inc/torch/csrc/api/include" -I"$cuda_inc" -I"$stub" -I"$py_inc" -Icsrc -x c++-header "$stub/pet_fast_pch.h" \
  -o "$stub/pet_fast_pch.h.gch" || rm -f "$stub/pet_fast_pch.h.gch"
n=0
for f in csrc/*.cpp; do
  # -std=c++17 and -DPET_FAST_CUDA (the CUDA-only code paths) as setup.py and pet_fast/_ext.py build them
  run g++ -std=c++17 -Wno-c++20-extensions -fsyntax-only -DTORCH_EXTENSION_NAME=_C -DPET_FAST_CUDA -I"$torch_inc" -I"$torch_inc/torch/csrc/api/include" \
    -I"$cuda_inc" -I"$stub" -I"$py_inc" -Icsrc -include "$stub/pet_fast_pch.h" "$f"
  n=$((n + 1))
done
finish
echo "check_bindings: $n binding file(s) type-check against torch ${torch_label:-$(python -c 'import torch; print(torch.__version__)')}"
