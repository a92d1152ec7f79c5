# Sourced by the CI scripts: `run CMD...` starts CMD in the background, at most one job per CPU at a time;
# `finish` waits for every job. Under `set -e` the first failing job (its output above) stops the script.
jobs_max=$(nproc 2>/dev/null || echo 2)
pids=()
run() {
  if [ "${#pids[@]}" -ge "$jobs_max" ]; then
    wait "${pids[0]}"
    pids=("${pids[@]:1}")
  fi
  "$@" &
  pids+=($!)
}
finish() {
  local p
  for p in "${pids[@]}"; do wait "$p"; done
  pids=()
}
