#!/usr/bin/env bash
# The one GPU check: build the CUDA extension, run the GPU tests, run every benchmark, write JSON.
# Usage on the GPU machine, from the repository root:
#   DEADLINE_S=560 bash benchmarks/gpu_check.sh [all|kernels|steps] [WORK_DIR]
# "all": build, info, GPU tests, op benchmarks, then the training-step benchmark with the time left.
# "kernels": the same without the step benchmark. "steps": the step benchmark only. The build is kept
# when pet_fast._C already imports (the warm machine of an earlier call). TESTS_LIMIT_S=0 skips the tests.
# DEADLINE_S (default 3000) bounds the whole script: every step's own limit is cut to the time left,
# and the step benchmark gets what the earlier steps left over.
# BENCHES="masked_linear prefix_attention bottleneck_adapter profile_step" picks and orders the op benchmarks
# (not in the default list: host_overhead, host time per op call; profile_step, where whole training steps spend their time;
# profile_adapter, the adapter's kernels at ADAPTER_PROFILES="N,d,r:site ..." (default the BERT-base step's); profile_prefix,
# prefix attention's kernels per path at PREFIX_PROFILES="B,Hq,Hkv,L,D,P[:causal] ..."; none; masked_serving
# and prefix_merge, one-minute checks of the CUDA serving kernel and of prefix attention's merged path).
# STEP_FIRST=1 runs the step benchmark before the op benchmarks, with STEP_ARGS (e.g. "--models
# bert-32x128 --rows floor full houlsby/auto --no-compile") and a budget of STEP_BUDGET_S seconds.
# Results: WORK_DIR (default benchmarks/results/latest) holds the logs and JSON; when $OUT is set
# (the device tool), they are also packed into $OUT/gpu_check.tar.gz with $OUT/summary.txt beside it.
set -uo pipefail
part=${1:-all}
case "$part" in kernels|steps|all) ;; *) echo "part must be all, kernels or steps, got $part"; exit 2 ;; esac
work=${2:-benchmarks/results/latest}
deadline=${DEADLINE_S:-3000}
mkdir -p "$work"
export PYTHONUNBUFFERED=1
export PET_FAST_CACHE=${PET_FAST_CACHE:-/tmp/pet_fast_cache}
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/pet_fast_triton_cache}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
# Compile for the card in this machine only (sm_90a on an H100/H200).
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$(python -c "import torch; c = torch.cuda.get_device_capability(); print(f'{c[0]}.{c[1]}' + ('a' if c[0] >= 9 else ''))" 2>/dev/null || echo 9.0a)}
status=0
# With the device tool's $OUT: the logs and JSON are packed there after every step and when the script ends,
# also when it is stopped (SIGTERM at a time limit), so that a run cut short still brings back what it measured.
pack() {
  if [ -n "${OUT:-}" ]; then
    tar czf "$OUT/gpu_check.tar.gz" -C "$work" . 2>/dev/null
    cp "$work/summary.txt" "$OUT/summary.txt" 2>/dev/null
  fi
}
trap pack EXIT
trap 'echo "stopped by a signal at $SECONDS s" >> "$work/summary.txt"; exit 143' TERM INT
if [ -f "$PET_FAST_CACHE/replay_failed" ]; then  # an earlier run on this machine found the replay failing
  export PET_FAST_TRITON_REPLAY=0
fi
left() { echo $(( deadline - SECONDS )); }
step() {  # step NAME SECONDS COMMAND...: run with a time limit (cut to the time left), log to WORK_DIR/NAME.log
  local name=$1 limit=$2; shift 2
  local room=$(( $(left) - 15 ))
  [ "$limit" -gt "$room" ] && limit=$room
  if [ "$limit" -lt 20 ]; then
    echo "$name: skipped, $(left) s left" | tee -a "$work/summary.txt"; status=1; return 1
  fi
  local t0=$SECONDS
  # in the background and waited for: a signal to this script runs its trap at once, not after the step
  timeout -k 10 "$limit" "$@" > "$work/$name.log" 2>&1 &  # (killed 10 s after its SIGTERM if it ignores it)
  wait $!
  local rc=$?
  echo "$name: rc=$rc in $((SECONDS - t0)) s (limit $limit s)" | tee -a "$work/summary.txt"
  [ $rc -eq 0 ] || status=1
  pack
  return $rc
}
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader || true
  python -c "import sys, torch, triton, transformers; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'transformers', transformers.__version__)"
  python -c "import peft; print('peft', peft.__version__)" 2>/dev/null || echo "peft: not installed"
  # Triton's compile cache is keyed by its own build (libtriton among others): the same hash as a wheel
  # elsewhere means kernels compiled there for sm_90 (benchmarks/compile_check.py --cache-dir) would be hits here
  python -c "import hashlib, os, triton; p = os.path.join(os.path.dirname(triton.__file__), '_C', 'libtriton.so'); print('libtriton sha256', hashlib.sha256(open(p, 'rb').read()).hexdigest())" 2>/dev/null || true
  git rev-parse --short HEAD 2>/dev/null || true
  echo "PET_FAST_TRITON_REPLAY=${PET_FAST_TRITON_REPLAY:-1}"
} > "$work/summary.txt" 2>&1
cat "$work/summary.txt"
# Build in place (the GPU machine has torch with CUDA, nvcc and ninja; no network). The editable
# install also maps pet_fast.kernels to kernels/.
if python -c "import pet_fast._C" 2>/dev/null; then
  echo "build: kept" | tee -a "$work/summary.txt"
else
  PET_FAST_BUILD_CUDA=1 step build 240 python -m pip install --no-build-isolation --no-deps -e . ||
    # without the prebuilt extension (pet_fast._ext then builds it just in time)
    PET_FAST_BUILD_CUDA=0 step install 60 python -m pip install --no-build-isolation --no-deps -e .
  tail -5 "$work/build.log"
fi
# Kernels compiled elsewhere for sm_90 (benchmarks/triton_cache_pack.py; carry the archive to the machine):
# Triton finds them only where its own build gives the same keys (summary.txt: libtriton sha256)
warm=${TRITON_WARM_CACHE:-triton_warm_cache.tar.gz}
if [ -f "$warm" ]; then
  python benchmarks/triton_cache_pack.py unpack "$warm" "$TRITON_CACHE_DIR" 2>&1 | tail -1 | tee -a "$work/summary.txt"
fi
step info 60 python -m pet_fast info
cat "$work/info.log"
if [ "$part" != steps ] && [ "${TESTS_LIMIT_S:-170}" != 0 ]; then
  # GPU tests (marked gpu): every kernel on real hardware vs float64 references, determinism, edge inputs.
  # One tile per kernel (PET_FAST_AUTOTUNE=0) so that the many test shapes do not each run the autotuner.
  xdist=""; python -c "import xdist" 2>/dev/null && xdist="-n $(( $(nproc) * 3 / 4 ))"
  # Each failure's text goes to failures.log as it happens (tests/conftest.py): a suite cut at its limit
  # never prints pytest's summary.
  export PET_FAST_FAILURE_LOG="$work/failures.log"
  rm -f "$PET_FAST_FAILURE_LOG"  # a rerun into the same folder reports its own failures only
  # The launch replay (recorded Triton launches made from C++, kernels/_replay.py) goes first and alone:
  # if any of its GPU tests fails or crashes, every later step (tests, benchmarks, and later calls on this
  # machine through the marker file) runs with PET_FAST_TRITON_REPLAY=0, every launch from Python.
  replay_files="tests/test_triton_replay.py tests/test_adapter_replayed_call.py tests/test_stacked_fusion_replay.py tests/test_fusion_replayed_call.py"
  if [ "${PET_FAST_TRITON_REPLAY:-1}" != 0 ]; then
    # shellcheck disable=SC2086
    TRITON_INTERPRET=0 PET_FAST_AUTOTUNE=0 step replay_tests ${REPLAY_TESTS_LIMIT_S:-120} python -m pytest -v -m gpu $xdist \
      -p no:cacheprovider -rfE --junitxml="$work/replay_tests.xml" $replay_files
    replay_rc=$?
    grep -E "^(FAILED|ERROR)|passed|failed|crashed" "$work/replay_tests.log" | tail -15 | tee -a "$work/summary.txt"
    if [ $replay_rc -ne 0 ]; then
      export PET_FAST_TRITON_REPLAY=0
      mkdir -p "$PET_FAST_CACHE" && touch "$PET_FAST_CACHE/replay_failed"
      echo "replay: OFF for the rest of this run and later runs on this machine (its GPU tests: rc=$replay_rc)" | tee -a "$work/summary.txt"
    fi
  fi
  # What the last run (results/h100-2026-11-27c) failed or did not reach before its limit goes first, so that
  # a run cut at its limit still checks it; tests new since then (the side-tuning base's CUDA graphs) first of all.
  first="tests/test_side_base_graphs.py tests/test_kernels_adapter_fusion.py tests/test_prefix_attention_sdpa.py tests/test_kernels_prefix_attention.py tests/test_properties.py tests/test_compile_models.py tests/test_edge_inputs.py tests/test_determinism.py"
  # every other test file after them; the replay's ran above
  files="$first $(ls tests/test_*.py | grep -v -x -F -f <(tr ' ' '\n' <<< "$first $replay_files"))"
  # shellcheck disable=SC2086
  TRITON_INTERPRET=0 PET_FAST_AUTOTUNE=0 PET_FAST_PROPERTY_COUNTS="$work/property_counts.txt" \
    step gpu_tests ${TESTS_LIMIT_S:-170} python -m pytest -v -m gpu $xdist --maxfail=40 -p no:cacheprovider -rfE \
    --junitxml="$work/gpu_tests.xml" $files
  grep -E "^(FAILED|ERROR)|passed|failed" "$work/gpu_tests.log" | tail -40 | tee -a "$work/summary.txt"
  if [ -s "$PET_FAST_FAILURE_LOG" ]; then
    echo "failures.log: $(grep -c '^=== ' "$PET_FAST_FAILURE_LOG") failure(s), last lines of each:" | tee -a "$work/summary.txt"
    awk '/^=== /{if (h) print h; print; h=""; next} /^E /{h=$0} END{if (h) print h}' "$PET_FAST_FAILURE_LOG" |
      cut -c1-300 | tail -40 | tee -a "$work/summary.txt"
  fi
  unset PET_FAST_FAILURE_LOG
  # A suite cut at its limit can leave xdist workers running kernels and holding CPUs: the benchmarks
  # after it would then time a shared GPU and host (seen once: eager rows twice as slow as the run before).
  pkill -9 -f "pytest" 2>/dev/null
  for pid in $(nvidia-smi --query-compute-apps=pid --format=csv,noheader 2>/dev/null); do
    [ "$pid" != "$$" ] && kill -9 "$pid" 2>/dev/null
  done
  sleep 2
fi
step_bench() {
  local budget=$(( $(left) - 60 ))
  [ -n "${STEP_BUDGET_S:-}" ] && [ "$STEP_BUDGET_S" -lt "$budget" ] && budget=$STEP_BUDGET_S
  if [ "$budget" -lt 10 ]; then  # (the benchmark takes a positive budget)
    echo "bench_step: skipped, $(left) s left" | tee -a "$work/summary.txt"; status=1; return
  fi
  # shellcheck disable=SC2086
  step bench_step $(( budget + 45 )) python benchmarks/bench_step.py --json "$work/bench_step.json" --budget-s "$budget" ${STEP_ARGS:-}
  tail -40 "$work/bench_step.log"
}
[ "$part" != kernels ] && [ "${STEP_FIRST:-0}" = 1 ] && step_bench
bench_op() {  # bench_op NAME: one op benchmark (and the adapter's per-kernel profile after it)
  case "$1" in
    bottleneck_adapter)
      step bench_bottleneck_adapter 150 python benchmarks/bench_bottleneck_adapter.py --json "$work/bench_bottleneck_adapter.json"
      tail -45 "$work/bench_bottleneck_adapter.log"
      # GPU time per kernel and host time per call of one adapter forward+backward, per backend
      step profile_adapter 60 python benchmarks/profile_adapter.py --json "$work/profile_adapter.json"
      tail -40 "$work/profile_adapter.log" ;;
    profile_adapter)  # the adapter's kernels alone at the BERT-base step's shape: GPU time, the autotuner's choices
      for spec in ${ADAPTER_PROFILES:-4096,768,64:houlsby 4096,768,64:pfeiffer 4096,768,64:plain}; do
        step "profile_adapter_${spec//[,:]/_}" 60 python benchmarks/profile_adapter.py --shape "${spec%%:*}" \
          --site "${spec##*:}" --json "$work/profile_adapter_${spec//[,:]/_}.json"
        tail -25 "$work/profile_adapter_${spec//[,:]/_}.log"
      done ;;
    profile_prefix)  # prefix attention's kernels per path at the bench's shapes: GPU time, the autotuners' tiles
      for spec in ${PREFIX_PROFILES:-32,12,12,512,64,20 4,32,32,2048,128,64:causal}; do
        step "profile_prefix_${spec//[,:]/_}" 60 python benchmarks/profile_prefix_attention.py --shape "${spec%%:*}" \
          $([[ $spec == *:causal ]] && echo --causal) --json "$work/profile_prefix_${spec//[,:]/_}.json"
        tail -40 "$work/profile_prefix_${spec//[,:]/_}.log"
      done ;;
    none) ;;
    masked_linear)
      step bench_masked_linear 150 python benchmarks/bench_masked_linear.py --json "$work/bench_masked_linear.json" --dispatch-table "$work/masked_linear_timings.json"
      tail -45 "$work/bench_masked_linear.log" ;;
    prefix_attention)
      step bench_prefix_attention 160 python benchmarks/bench_prefix_attention.py --no-flex --json "$work/bench_prefix_attention.json" --dispatch-table "$work/prefix_attention_timings.json"
      tail -45 "$work/bench_prefix_attention.log" ;;
    masked_serving)  # the CUDA serving kernel alone: correctness against eager, kernel and op times
      step check_masked_linear_serving 90 python benchmarks/check_masked_linear_serving.py --json "$work/check_masked_linear_serving.json"
      tail -20 "$work/check_masked_linear_serving.log" ;;
    prefix_merge)  # the merged training path of prefix attention alone (cuDNN or flash + Triton merge): errors and times
      step check_prefix_merge 90 python benchmarks/check_prefix_merge.py --json "$work/check_prefix_merge.json"
      tail -20 "$work/check_prefix_merge.log" ;;
    host_overhead)  # host time per op call, per backend, beside the eager functions (tiny shapes)
      step bench_host_overhead 60 python benchmarks/bench_host_overhead.py --json "$work/bench_host_overhead.json"
      tail -25 "$work/bench_host_overhead.log" ;;
    profile_step)  # host vs GPU time and top kernels of whole steps (PROFILE_ROWS picks the rows)
      # shellcheck disable=SC2086
      step profile_step 150 python benchmarks/profile_step.py --json "$work/profile_step.json" ${PROFILE_ROWS:+--rows $PROFILE_ROWS}
      tail -20 "$work/profile_step.log" ;;
    *) echo "unknown benchmark $1" | tee -a "$work/summary.txt" ;;
  esac
}
if [ "$part" != steps ]; then
  # BENCHES orders the op benchmarks (the first ones get the time when the deadline is short).
  for b in ${BENCHES:-bottleneck_adapter masked_linear prefix_attention}; do bench_op "$b"; done
fi
# Whole training steps (BERT-base 32x128 eager rows first, then its key torch.compile rows, then the
# other models); rows not started within the budget are written as skipped, and the JSON is rewritten
# after every row so that a run stopped at the limit keeps what it measured.
[ "$part" != kernels ] && [ "${STEP_FIRST:-0}" != 1 ] && step_bench
exit $status  # (the EXIT trap packs the results into $OUT)
